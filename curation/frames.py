"""Frame access shared by stages: decord reads, and the reference-frame cache that lets one stage group
decode a clip's reference frames once (Phantom supp. §5: frames at 0.05, 0.5 and 0.95 of the clip)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

REF_FRACTIONS = (0.05, 0.5, 0.95)


def open_video(path: str, width: int = -1, height: int = -1):
    """A decord VideoReader (CPU, one thread). width/height -1 keep the native size."""
    import decord

    return decord.VideoReader(path, ctx=decord.cpu(0), width=width, height=height, num_threads=1)


def read_frames(path: str, indices: Sequence[int], width: int = -1, height: int = -1) -> np.ndarray:
    """RGB uint8 frames (N, H, W, 3) at ``indices``, in one batched decord call."""
    vr = open_video(path, width, height)
    n = len(vr)
    idx = [min(max(int(i), 0), n - 1) for i in indices]
    return vr.get_batch(idx).asnumpy()


def ref_frame_indices(n_frames: int, fractions: Sequence[float] = REF_FRACTIONS) -> list[int]:
    return [min(n_frames - 1, max(0, int(round(f * (n_frames - 1))))) for f in fractions]


def clip_abspath(row: dict, out_dir: str) -> str:
    p = row["clip_path"]
    return p if os.path.isabs(p) else os.path.join(out_dir, p)


def ref_frames(row: dict, out_dir: str, fractions: Sequence[float] = REF_FRACTIONS) -> list[np.ndarray]:
    """The clip's reference frames (RGB uint8, full clip resolution), decoded once per stage group and
    cached on the row under the transient key ``_ref_frames`` (with ``ref_frames`` metadata saved)."""
    cached = row.get("_ref_frames")
    if cached is not None:
        return cached
    path = clip_abspath(row, out_dir)
    vr = open_video(path)
    n = len(vr)
    idx = ref_frame_indices(n, fractions)
    frames = list(vr.get_batch(idx).asnumpy())
    fps = float(vr.get_avg_fps()) or float(row.get("fps") or 25.0)
    row["_ref_frames"] = frames
    row["ref_frames"] = [
        {"t_frac": float(f), "frame_index": int(i), "t_s": round(i / fps, 3)} for f, i in zip(fractions, idx)
    ]
    return frames
