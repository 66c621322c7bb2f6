"""Optical flow of frame pairs and the motion statistics the motion filter and the Motion metric share."""

from __future__ import annotations

import cv2
import numpy as np


def resize_short(img: np.ndarray, short_side: int) -> np.ndarray:
    h, w = img.shape[:2]
    if min(h, w) == short_side:
        return img
    s = short_side / min(h, w)
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    return cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=interp)


def dense_flow(a_gray: np.ndarray, b_gray: np.ndarray, method: str) -> np.ndarray:
    """Optical flow from a to b, (h, w, 2) in pixels."""
    if method == "dis":
        dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_FAST)
        return dis.calc(a_gray, b_gray, None)
    return cv2.calcOpticalFlowFarneback(
        a_gray,
        b_gray,
        None,
        pyr_scale=0.5,
        levels=3,
        winsize=13,
        iterations=3,
        poly_n=5,
        poly_sigma=1.1,
        flags=0,
    )


def motion_stats(
    frames: np.ndarray, next_frames: np.ndarray, fps: float, gap: int, flow_short_side: int, method: str
) -> dict:
    """Flow statistics over the clip's frame pairs, in frame short-sides per second (resolution and frame
    rate independent): ``mean`` (median over pairs of the mean flow magnitude: how much moves),
    ``global`` (mean magnitude of the per-pair global motion, the median flow vector: camera motion),
    ``residual`` (mean magnitude once the global motion is removed: subject motion), ``shake`` (mean
    change of the global motion vector between successive pairs: a steady pan has ~0, a shaking camera
    jumps about)."""
    per_s = fps / gap
    mags, globs, resid = [], [], []
    for a, b in zip(frames, next_frames):
        ga = resize_short(cv2.cvtColor(a, cv2.COLOR_RGB2GRAY), flow_short_side)
        gb = resize_short(cv2.cvtColor(b, cv2.COLOR_RGB2GRAY), flow_short_side)
        flow = dense_flow(ga, gb, method) * (per_s / min(ga.shape))  # (h, w, 2) short sides / s
        g = np.median(flow.reshape(-1, 2), axis=0)  # (2,) global motion
        mags.append(float(np.linalg.norm(flow, axis=-1).mean()))
        globs.append(g)
        resid.append(float(np.linalg.norm(flow - g, axis=-1).mean()))
    globs = np.asarray(globs)  # (P, 2)
    shake = float(np.linalg.norm(np.diff(globs, axis=0), axis=-1).mean()) if len(globs) > 1 else 0.0
    return {
        "mean": float(np.median(mags)),
        "global": float(np.linalg.norm(globs, axis=-1).mean()),
        "residual": float(np.median(resid)),
        "shake": shake,
    }
