"""The write_shards stage (global): in-pair and cross-pair triplets written as WebDataset shards.

The work runs in the distributed global phase (curation/global_phase.py): sample plans per partition, one
writer per partition, shards named shard-<partition>-<seq>.tar, a small record per finished shard under
``_records/`` and the index ``_index.json`` (names starting with "_" are skipped by Ray Data, webdataset and
HF datasets, so every client reads the folder as it is). The composition rules live in
curation/composition.py, the scenario taxonomy in curation/scenarios.py."""

from __future__ import annotations

import dataclasses

from curation.composition import MAX_REFS, MIDDLE_REF, best_crop  # noqa: F401  (re-exported)
from curation.config import field
from curation.stage import Record, Stage, register_stage


@register_stage("write_shards")
class WriteShards(Stage):
    """Triplets per clip: ``in_pair`` (each subject's reference cropped from the clip itself) and up to
    ``cross_per_clip`` ``cross_pair`` samples (each subject's reference is the crop of a partner drawn with a
    seeded choice inside the band from another source; face-ID vetoes for people; subjects without a partner
    keep their own crop, flagged). 1-4 references per sample. ``in_pair_keep`` / ``cross_pair_keep`` set the
    share of clips that give each kind of sample, ``category_weights`` / ``scenario_weights`` the keep
    probability of a sample by its subjects' categories / scenario labels, ``scenario_quotas`` a cap per
    primary scenario; ``eval_frac`` of the sources (by hash of the near-duplicate group) go to
    ``eval_subdir`` instead of ``shards_subdir``."""

    kind = "global"

    @dataclasses.dataclass
    class Params:
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
            from curation import scenarios
            from curation.config import ConfigError
            from curation.shards import safe_component

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

    def process(self, rows: list[Record]) -> list[Record]:
        raise RuntimeError(
            "write_shards runs in the global phase over the exported tables: "
            "curation.global_phase.run_global(specs, store, ctx, map_hash)"
        )
