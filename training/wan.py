"""Phantom-Wan weights: build the Wan2.1 DiT, load local sha256-pinned weights in either layout, add LoRA."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from curation.models import ModelNotFound, verify_sha256
from model.phantom_wan import (
    PhantomWan,
    build_wan_transformer,
    detect_layout,
    diffusers_to_original,
    original_to_diffusers,
)

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def load_state_file(path: str | Path, sha256: str | None) -> dict[str, torch.Tensor]:
    """One weight file -> state dict: sha256 checked, then safetensors or torch.load(weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotFound(f"weight file {path} does not exist (copy it there; nothing is downloaded)")
    verify_sha256(path, sha256, "Wan weight file", "model.wan.weights_sha256")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    # Training scripts often wrap the weights: {"state_dict": ...}, {"module": ...}, {"model": ...}.
    while isinstance(state, dict) and len(state) == 1 and isinstance(next(iter(state.values())), dict):
        state = next(iter(state.values()))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a flat state dict of tensors")
    return state


def weight_files(path: str | Path) -> list[Path]:
    """The weight files of a single file or a folder (sharded checkpoints: every shard its index names)."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise ModelNotFound(f"Wan weights not found at {p} (a local folder or file; nothing is downloaded)")
    for index in sorted(p.glob("*.index.json")):
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [p / n for n in names]
    files = sorted(f for f in p.iterdir() if f.suffix in WEIGHT_SUFFIXES and f.is_file())
    safetensors = [f for f in files if f.suffix == ".safetensors"]
    files = safetensors or files  # a folder with both formats: the safetensors copy
    if not files:
        raise ModelNotFound(f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) in {p}")
    return files


def load_wan_state(path: str | Path, sha256: str | dict[str, str] | None) -> dict[str, torch.Tensor]:
    """Weights at `path` (file or folder, original or diffusers layout) as a diffusers-layout state dict.

    sha256: the file's digest, or {file name relative to the folder: digest} covering every file read.
    """
    root = Path(path)
    state: dict[str, torch.Tensor] = {}
    for f in weight_files(root):
        if isinstance(sha256, dict):
            rel = str(f.relative_to(root)) if root.is_dir() else f.name
            digest = sha256.get(rel)  # None: verify_sha256 refuses it, naming the key and `unpinned`
        else:
            digest = sha256
        state.update(load_state_file(f, digest))
    layout = detect_layout(state)
    return original_to_diffusers(state) if layout == "original" else state


def load_into(transformer: torch.nn.Module, state: dict[str, torch.Tensor], what: str, strict: bool = True):
    """Copy a diffusers-layout state dict into the transformer; shape mismatches always raise."""
    own = transformer.state_dict()
    bad = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise ValueError(f"{what}: shapes differ from the configured model for {bad[:3]} (wrong preset?)")
    missing, unexpected = transformer.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("rope.")]
    if strict and (missing or unexpected):
        raise ValueError(f"{what}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    log.info("%s: loaded %d tensors", what, len(state) - len(unexpected))


def save_original_layout(transformer: torch.nn.Module, path: str | Path) -> Path:
    """Write the transformer's weights in the original Wan layout (what Phantom-Wan-*.pth files hold)."""
    path = Path(path)
    state = diffusers_to_original({k: v.detach().cpu() for k, v in transformer.state_dict().items()})
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


def add_lora(transformer: torch.nn.Module, lora) -> torch.nn.Module:
    """peft LoRA adapters on the attention/FFN projections; everything else frozen."""
    from peft import LoraConfig, inject_adapter_in_model

    transformer.requires_grad_(False)
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        init_lora_weights=True,  # B = 0: the adapted model starts equal to the base
    )
    transformer = inject_adapter_in_model(config, transformer)
    n_train = sum(p.numel() for p in transformer.parameters() if p.requires_grad)
    if n_train == 0:
        raise ValueError(f"model.wan.lora.target_modules {lora.target_modules} matched no module")
    return transformer


def build_phantom_wan(model_cfg) -> PhantomWan:
    """model.family = phantom_wan: preset + overrides -> WanTransformer3DModel, then weights, then LoRA."""
    wan = model_cfg.wan
    transformer = build_wan_transformer(model_cfg.preset, **model_cfg.overrides)
    if wan.weights:
        load_into(transformer, load_wan_state(wan.weights, wan.weights_sha256), f"base weights {wan.weights}")
    if wan.phantom_ckpt:
        state = load_wan_state(wan.phantom_ckpt, wan.phantom_sha256)
        # The release loads Phantom-Wan-*.pth with strict=False over a freshly built WanModel; here every
        # key must be known (strict) so a wrong file fails loudly instead of leaving random weights.
        load_into(transformer, state, f"Phantom-Wan checkpoint {wan.phantom_ckpt}")
    if wan.dtype != "float32":
        # diffusers keeps the norms, time embedder and modulation tables of Wan in fp32 at low precision.
        keep = set(getattr(transformer, "_keep_in_fp32_modules", None) or [])
        transformer = transformer.to(getattr(torch, wan.dtype))
        for name, module in transformer.named_modules():
            if keep & set(name.split(".")):
                module.float()
    if wan.grad_checkpoint:
        transformer.enable_gradient_checkpointing()
    if wan.finetune == "lora":
        transformer = add_lora(transformer, wan.lora)
    return PhantomWan(transformer, text_len=wan.text_len)


__all__ = [
    "add_lora",
    "build_phantom_wan",
    "diffusers_to_original",
    "load_into",
    "load_state_file",
    "load_wan_state",
    "save_original_layout",
    "weight_files",
]
