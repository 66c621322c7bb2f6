"""Ground truth of the bundled demo footage (identities, boxes, exact copies) for pairing tests."""

from __future__ import annotations

import json
import os

from curation.boxes import box_iou
from curation.sources.sample import SamplePaths


def load_ground_truth(path: str | os.PathLike | SamplePaths) -> dict:
    if isinstance(path, SamplePaths):
        path = path.ground_truth
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def shot_key(video_id: str, shot_index: int) -> str:
    return f"{video_id}:{shot_index}"


def shot_at(gt: dict, video_id: str, t_s: float) -> dict | None:
    """The ground-truth shot of ``video_id`` that contains time ``t_s`` (seconds in the source video)."""
    v = gt["videos"].get(video_id)
    if v is None:
        return None
    for s in v["shots"]:
        if s["start_s"] <= t_s < s["end_s"] or (t_s == s["end_s"] and s is v["shots"][-1]):
            return s
    return None


def _interp_box(track: list[dict], frame: float, key: str) -> list[float] | None:
    pts = [(t["frame_index"], t[key]) for t in track if t.get(key) is not None]
    if not pts:
        return None
    if frame <= pts[0][0]:
        return list(pts[0][1])
    for (f0, b0), (f1, b1) in zip(pts, pts[1:]):
        if frame <= f1:
            a = (frame - f0) / max(1e-9, f1 - f0)
            return [u + (v - u) * a for u, v in zip(b0, b1)]
    return list(pts[-1][1])


def subject_boxes_at(
    gt: dict, video_id: str, t_s: float
) -> list[tuple[str, list[float], list[float] | None]]:
    """(identity, box, face_box) of every annotated subject at time ``t_s`` of ``video_id``, in that
    video's pixels (linear between annotated frames, exact for the generated shots)."""
    shot = shot_at(gt, video_id, t_s)
    if shot is None:
        return []
    frame = t_s * gt["videos"][video_id]["fps"]
    return [
        (s["identity"], _interp_box(s["track"], frame, "box"), _interp_box(s["track"], frame, "face_box"))
        for s in shot["subjects"]
    ]


def identity_at(
    gt: dict, video_id: str, t_s: float, box, frame_wh: tuple[int, int] | None = None, min_iou: float = 0.3
) -> str | None:
    """The identity of the subject whose box (or face box) overlaps ``box`` most at time ``t_s`` (seconds in
    the source video), or None when none reaches ``min_iou``. ``frame_wh``: the size of the frame ``box`` is
    in, when it differs from the source video's (a resized clip)."""
    v = gt["videos"].get(video_id)
    if v is None:
        return None
    sx = sy = 1.0
    if frame_wh is not None:
        sx, sy = v["width"] / frame_wh[0], v["height"] / frame_wh[1]
    q = [box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy]
    best, best_iou = None, min_iou
    for identity, b, face in subject_boxes_at(gt, video_id, t_s):
        iou = max(box_iou(q, b) if b else 0.0, box_iou(q, face) if face else 0.0)
        if iou >= best_iou:
            best, best_iou = identity, iou
    return best


def _shots(gt: dict, include_bad: bool):
    for vid, v in gt["videos"].items():
        for s in v["shots"]:
            if s["bad"] and not include_bad:
                continue
            yield vid, shot_key(vid, s["index"]), s


def copy_pairs(gt: dict) -> set[frozenset[str]]:
    """{frozenset((copy shot, original shot))} for every exact-copy shot."""
    return {frozenset((key, s["copy_of"])) for _, key, s in _shots(gt, True) if s["copy_of"]}


def true_cross_pairs(gt: dict, include_bad: bool = False) -> set[frozenset[str]]:
    """{frozenset(("video:shot", "video:shot"))} for shots showing the same identity in DIFFERENT source
    videos, excluding exact copies of each other (copy/original, or two copies of one original) and, unless
    ``include_bad``, the deliberately bad shots."""
    by_identity: dict[str, list[tuple[str, str, str]]] = {}
    for vid, key, s in _shots(gt, include_bad):
        origin = s["copy_of"] or key
        for sub in s["subjects"]:
            by_identity.setdefault(sub["identity"], []).append((vid, key, origin))
    pairs = set()
    for items in by_identity.values():
        for i, (va, ka, oa) in enumerate(items):
            for vb, kb, ob in items[i + 1 :]:
                if va != vb and oa != ob:
                    pairs.add(frozenset((ka, kb)))
    return pairs
