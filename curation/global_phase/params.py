"""The global steps' params (``pair``, ``write_shards`` in pipelines.yaml), checked at config load."""

from __future__ import annotations

import dataclasses

from curation import scenarios
from curation.config import ConfigError, StageSpec, field, from_dict
from curation.shards import safe_component


@dataclasses.dataclass
class PairParams:
    """Each subject's vector is the unit mean of its non-duplicate crop embeddings; per category the
    ``candidates`` nearest subjects of other sources are scored (exact blocked search up to ``exact_max``
    subjects, faiss IVF above: ``method``), labelled by the band rule: ``pair`` (the first ``top_k`` in
    [low, high]), ``copy_paste`` (above high, or a crop within ``phash_copy_distance`` bits by pHash),
    ``different_subject`` (below low), ``beyond_top_k``, ``near_duplicate_source`` (the two videos are
    re-uploads of one another: copy-paste edges cover ``near_dup_min_frac`` of the clips of both). A source is
    a video (or its near-duplicate group), never a clip, unless ``same_source`` lets other clips of the same
    video pair. Subjects with faces get face pairs the same way with the face band."""

    low: float = field(0.78, ge=-1.0, le=1.0)  # MobileNetV2 features; set per embedder in the YAML
    high: float = field(0.99, ge=-1.0, le=1.0)
    top_k: int = field(4, ge=1)
    candidates: int = field(16, ge=1)  # neighbours scored per subject (every one recorded)
    same_source: bool = False  # also pair with other clips of the same source video
    method: str = field("auto", choices=["auto", "exact", "faiss", "ray"])
    exact_max: int = field(20000, ge=1)  # auto: exact search up to this many subjects per category
    nprobe: int = field(0, ge=0)  # IVF lists probed per query; 0: ivf.NPROBE (32 lists of ~LIST_ROWS units)
    phash_copy_distance: int = field(4, ge=-1, le=64)  # crops this close across videos are copies; -1 off
    face_low: float = field(0.5, ge=-1.0, le=1.0)
    face_high: float = field(0.99, ge=-1.0, le=1.0)
    face_top_k: int = field(4, ge=1)
    hist_bins: int = field(40, ge=2)
    # videos whose copy-paste edges cover this fraction of the pairable clips of both are one source
    # (re-uploads); -1 turns near-duplicate grouping off
    near_dup_min_frac: float = field(0.5, ge=-1.0, le=1.0)

    def validate(self, path: str = "") -> None:
        if self.low > self.high or self.face_low > self.face_high:
            raise ConfigError(
                f"{path}: the band needs low <= high (low={self.low}, high={self.high}, "
                f"face_low={self.face_low}, face_high={self.face_high})"
            )


@dataclasses.dataclass
class ShardParams:
    """Triplets per clip: ``in_pair`` (each subject's reference cropped from the clip itself) and up to
    ``cross_per_clip`` ``cross_pair`` samples (each subject's reference is the crop of a partner drawn with a
    seeded choice inside the band from another source; face-ID vetoes for people; subjects without a partner
    keep their own crop, flagged). 1-4 references per sample. ``in_pair_keep`` / ``cross_pair_keep`` set the
    share of clips that give each kind of sample, ``category_weights`` / ``scenario_weights`` the keep
    probability of a sample by its subjects' categories / scenario labels, ``scenario_quotas`` a cap per
    primary scenario; ``eval_frac`` of the sources (by hash of the near-duplicate group) go to
    ``eval_subdir`` instead of ``shards_subdir``. The composition rules live in curation/composition.py, the
    scenario taxonomy in curation/scenarios.py."""

    maxcount: int = field(1000, ge=1)  # samples per shard
    maxsize_mb: float = field(1024.0, gt=0)  # bytes per shard (a lone oversize sample still gets one)
    in_pair: bool = True
    cross_pair: bool = True
    cross_per_clip: int = field(1, ge=0, le=8)
    shards_subdir: str = "shards"
    eval_subdir: str = "shards_eval"
    eval_frac: float = field(0.0, ge=0.0, le=1.0)  # held-out sources (the lead sets it in the YAML)
    in_pair_keep: float = field(1.0, ge=0.0, le=1.0)
    cross_pair_keep: float = field(1.0, ge=0.0, le=1.0)
    category_weights: dict[str, float] = field({})  # e.g. {human: 0.5}: keep half the human-only samples
    scenario_weights: dict[str, float] = field({})  # e.g. {people: 0.3}
    scenario_quotas: dict[str, int] = field({})  # e.g. {people: 100000}: at most this many per primary
    face_categories: list[str] = field(["human"])  # categories whose face-ID vetoes embedding pairs
    seed: int = field(0, ge=0)  # partner draws, ratios, weights, the split
    partitions: int = field(0, ge=0, le=256)  # plan / writer partitions; 0: one per clips_per_partition
    clips_per_partition: int = field(20000, ge=1)
    verify_on_resume: bool = True  # a kept shard's sha256 is checked against its record

    def validate(self, path: str = "") -> None:
        for name in ("shards_subdir", "eval_subdir"):
            v = getattr(self, name)
            if safe_component(v) != v:
                raise ConfigError(f"{path}.{name}: {v!r} must be one plain folder name")
        if self.shards_subdir == self.eval_subdir:
            raise ConfigError(f"{path}: shards_subdir and eval_subdir must differ")
        scenarios.validate_names(list(self.scenario_weights) + list(self.scenario_quotas), path)
        for what, d in (
            ("category_weights", self.category_weights),
            ("scenario_weights", self.scenario_weights),
        ):
            for k, w in d.items():
                if not 0.0 <= w <= 1.0:
                    raise ConfigError(f"{path}.{what}.{k}: {w!r} is out of range; must be in [0, 1]")
        for k, q in self.scenario_quotas.items():
            if q < 0:
                raise ConfigError(f"{path}.scenario_quotas.{k}: {q!r} must be >= 0")


# The global steps by their name in pipelines.yaml, in the order they run; they come after every map stage.
STEPS = {"pair": PairParams, "write_shards": ShardParams}


def validate_step(spec: StageSpec, path: str):
    """Check a global step exists and its params match its dataclass; returns the typed params."""
    if spec.stage not in STEPS:
        raise ConfigError(
            f"{path}.stage: unknown global step {spec.stage!r}; allowed values: {sorted(STEPS)}"
        )
    return from_dict(STEPS[spec.stage], spec.params, f"{path}.params")
