"""The global phase: cross-video pairs and shard writing over the committed videos' tables, a file a step."""

from curation.global_phase.params import STEPS, PairParams, ShardParams, validate_step
from curation.global_phase.plans import split_of
from curation.global_phase.run import pair_rows, run_global
from curation.global_phase.tables import export_video

__all__ = [
    "STEPS",
    "PairParams",
    "ShardParams",
    "export_video",
    "pair_rows",
    "run_global",
    "split_of",
    "validate_step",
]
