"""Box geometry shared by grounding, faces and the sample ground truth; boxes are [x0, y0, x1, y1] pixels."""

from __future__ import annotations

from collections.abc import Sequence

Box = Sequence[float]


def _intersection(a: Box, b: Box) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return ix * iy


def box_area(a: Box) -> float:
    return max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])


def box_iou(a: Box, b: Box) -> float:
    inter = _intersection(a, b)
    union = box_area(a) + box_area(b) - inter
    return inter / union if union > 0 else 0.0


def containment(inner: Box, outer: Box) -> float:
    """Fraction of ``inner``'s area inside ``outer``."""
    area = box_area(inner)
    return _intersection(inner, outer) / area if area > 0 else 0.0
