"""Aesthetic scorers (capability "aesthetic"): LAION-style CLIP + linear-stack predictor, local weights."""

from __future__ import annotations

import re
from typing import Protocol

import numpy as np

from curation.stage import register_backend


class AestheticScorer(Protocol):
    name: str

    def load(self) -> AestheticScorer: ...

    def score(self, frames_rgb) -> np.ndarray:
        """uint8 frames (N, H, W, 3), or a list of (H_i, W_i, 3) of any sizes -> (N,) aesthetic scores
        (LAION scale: about 1-10, higher is better)."""


def linear_stack_from_state_dict(state: dict):
    """The improved-aesthetic-predictor head: Linear layers only (its Dropouts are no-ops at eval and it
    has no activations), in key order. Accepts ``layers.0.weight, layers.2.weight, ...`` (the MLP of
    sac+logos+ava1-l14-linearMSE.pth) or a single ``weight``/``bias`` (the LAION-5B linear predictor)."""
    import torch

    state = {k.removeprefix("module."): v for k, v in state.items()}
    weights = sorted(
        (k for k in state if k.endswith("weight")),
        key=lambda k: [int(t) if t.isdigit() else t for t in re.split(r"[.]", k)],
    )
    if not weights:
        raise ValueError("aesthetic head: no '*weight' tensors in the state dict")
    layers = []
    for wk in weights:
        w = state[wk]
        b = state.get(wk[: -len("weight")] + "bias")
        if w.ndim != 2:
            raise ValueError(f"aesthetic head: {wk} has shape {tuple(w.shape)}; expected Linear weights")
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
        lin.weight.data.copy_(w)
        if b is not None:
            lin.bias.data.copy_(b)
        layers.append(lin)
    for prev, nxt in zip(layers[:-1], layers[1:]):
        if prev.out_features != nxt.in_features:
            raise ValueError(f"aesthetic head: layer sizes do not chain ({prev} -> {nxt})")
    if layers[-1].out_features != 1:
        raise ValueError(f"aesthetic head: the last layer must output 1 value, got {layers[-1].out_features}")
    return torch.nn.Sequential(*layers).eval()


@register_backend("aesthetic", "laion_mlp")
class LaionAesthetic:
    """open_clip image tower (architecture by name, weights from a local checkpoint) -> L2-normalised image
    embedding (N, D) -> linear stack -> (N,) score. The production setting is ViT-L-14-quickgelu with
    OpenAI's CLIP weights and the improved-aesthetic-predictor MLP (768 -> 1024 -> 128 -> 64 -> 16 -> 1)."""

    name = "laion_mlp"

    def __init__(
        self,
        clip_arch: str = "ViT-L-14-quickgelu",
        clip_path: str = "",
        mlp_path: str = "",
        clip_sha256: str = "",
        mlp_sha256: str = "",
        clip_config: str = "",
        models_dir: str = "models",
        device: str = "auto",
        batch_size: int = 16,
    ):
        self.clip_arch = clip_arch
        self.clip_path = clip_path
        self.mlp_path = mlp_path
        self.clip_sha256 = clip_sha256
        self.mlp_sha256 = mlp_sha256
        self.clip_config = clip_config  # a JSON model config to register (custom architectures)
        self.models_dir = models_dir
        self.device = device
        self.batch_size = batch_size
        self.model = None

    def load(self) -> LaionAesthetic:
        import open_clip
        import torch

        from curation.models import locate_model_path, resolve_model_path

        key = "pipelines.<name>[aesthetic].backend"
        clip_file = resolve_model_path(
            self.clip_path,
            self.models_dir,
            "CLIP checkpoint of the aesthetic predictor",
            f"{key}.clip_path",
            self.clip_sha256 or None,
        )
        mlp_file = resolve_model_path(
            self.mlp_path,
            self.models_dir,
            "aesthetic predictor MLP weights",
            f"{key}.mlp_path",
            self.mlp_sha256 or None,
        )
        if self.clip_config:  # an architecture, no weights (a changed one cannot load the pinned weights)
            open_clip.add_model_config(
                locate_model_path(
                    self.clip_config, self.models_dir, "open_clip model config", f"{key}.clip_config"
                )
            )
        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model, _, preprocess = open_clip.create_model_and_transforms(self.clip_arch, pretrained=None)
        # open_clip's loader: torch.load(weights_only=True) or safetensors, plus its key conversions.
        open_clip.load_checkpoint(model, str(clip_file), weights_only=True)
        if str(mlp_file).endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(str(mlp_file))
        else:
            state = torch.load(mlp_file, map_location="cpu", weights_only=True)
        head = linear_stack_from_state_dict(state.get("state_dict", state))
        embed_dim = model.visual.output_dim
        if head[0].in_features != embed_dim:
            raise ValueError(
                f"aesthetic MLP expects {head[0].in_features}-d embeddings but {self.clip_arch} "
                f"gives {embed_dim}-d"
            )
        self.model = model.visual.eval().to(device)  # only the image tower is needed
        self.head = head.to(device)
        self.preprocess = preprocess
        self.torch_device = torch.device(device)
        return self

    def score(self, frames_rgb) -> np.ndarray:
        import torch
        from PIL import Image

        if self.model is None:
            self.load()
        out = []
        for i in range(0, len(frames_rgb), self.batch_size):
            # open_clip's eval transform (resize short side, centre crop, CLIP mean/std): (B, 3, S, S)
            x = torch.stack(
                [self.preprocess(Image.fromarray(f)) for f in frames_rgb[i : i + self.batch_size]]
            )
            with torch.inference_mode():
                emb = self.model(x.to(self.torch_device)).float()  # (B, D)
                emb = emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                out.append(self.head(emb).squeeze(-1).cpu().numpy())  # (B,)
        return np.concatenate(out) if out else np.zeros(0, np.float32)
