"""The pair stage (global): cross-video subject pairs by embedding cosine in a band; face pairs likewise.

The work runs in the distributed global phase (curation/global_phase.py): units from each video's tables,
near-duplicate video groups, a faiss IVF (or exact blocked) search per category in map_batches, every
candidate kept with its verdict and score in Parquet. ``Pair(...)(rows)`` runs those same steps over rows in
memory (a temporary store) and attaches the verdicts to the subjects, for tests and small tools."""

from __future__ import annotations

import dataclasses

from curation.config import field
from curation.stage import Record, Stage, register_stage


@register_stage("pair")
class Pair(Stage):
    """Each subject's vector is the unit mean of its non-duplicate crop embeddings; per category the
    ``candidates`` nearest subjects of other sources are scored (exact blocked search up to ``exact_max``
    subjects, faiss IVF above: ``method``), labelled by the band rule: ``pair`` (the first ``top_k`` in
    [low, high]), ``copy_paste`` (above high, or a crop within ``phash_copy_distance`` bits by pHash),
    ``different_subject`` (below low), ``beyond_top_k``, ``near_duplicate_source`` (the two videos are
    re-uploads of one another: copy-paste edges cover ``near_dup_min_frac`` of the clips of both). A source is
    a video (or its near-duplicate group), never a clip, unless ``same_source`` lets other clips of the same
    video pair. Subjects with faces get face pairs the same way with the face band."""

    kind = "global"

    @dataclasses.dataclass
    class Params:
        low: float = field(0.78, ge=-1.0, le=1.0)  # MobileNetV2 features; set per embedder in the YAML
        high: float = field(0.99, ge=-1.0, le=1.0)
        top_k: int = field(4, ge=1)
        candidates: int = field(16, ge=1)  # neighbours scored per subject (every one recorded)
        same_source: bool = False  # also pair with other clips of the same source video
        method: str = field("auto", choices=["auto", "exact", "faiss", "ray"])
        exact_max: int = field(20000, ge=1)  # auto: exact search up to this many subjects per category
        nprobe: int = field(0, ge=0)  # faiss lists visited per query; 0: auto (a sixteenth, >= 16)
        phash_copy_distance: int = field(4, ge=-1, le=64)  # crops this close across videos are copies; -1 off
        face_low: float = field(0.5, ge=-1.0, le=1.0)
        face_high: float = field(0.99, ge=-1.0, le=1.0)
        face_top_k: int = field(4, ge=1)
        hist_bins: int = field(40, ge=2)
        # videos whose copy-paste edges cover this fraction of the pairable clips of both are one source
        # (re-uploads); -1 turns near-duplicate grouping off
        near_dup_min_frac: float = field(0.5, ge=-1.0, le=1.0)

        def validate(self, path: str = "") -> None:
            from curation.config import ConfigError

            if self.low > self.high or self.face_low > self.face_high:
                raise ConfigError(
                    f"{path}: the band needs low <= high (low={self.low}, high={self.high}, "
                    f"face_low={self.face_low}, face_high={self.face_high})"
                )

    def process(self, rows: list[Record]) -> list[Record]:
        from curation.global_phase import pair_rows

        return pair_rows(rows, self.params, self.ctx.out_dir)
