"""Model families chosen by name in the training YAML (model.family): how each is built, trained, sampled.

Both the loop and the sampler import this module (and never each other's internals): loop -> sample -> models.
"""

from __future__ import annotations

from typing import Any

import torch

from model.flow import apply_condition_dropout, euler_sample, rf_loss
from training.config import TrainConfig
from training.encoders import DEFAULT_BACKENDS, IMAGE_BACKENDS, TEXT_BACKENDS, VAE_BACKENDS

FAMILIES = ("mmdit", "phantom_wan")


def build_model(cfg: TrainConfig) -> torch.nn.Module:
    """The network of cfg.model.family, with its pretrained weights and LoRA adapters when configured."""
    if cfg.model.family == "phantom_wan":
        from training.wan import build_phantom_wan

        return build_phantom_wan(cfg.model)
    from model.mmdit import MMDiT, mmdit_config

    return MMDiT(mmdit_config(cfg.model.preset, **cfg.model.overrides))


def loss_fn(cfg: TrainConfig):
    """(model, x0, cond, generator, **cfg.flow.loss) -> (loss, info) for the family."""
    if cfg.model.family == "phantom_wan":
        from model.phantom_wan import wan_flow_loss

        return wan_flow_loss
    return rf_loss


def dropout_fn(cfg: TrainConfig):
    """(cond, generator=..., **cfg.flow.dropout) -> cond: the family's training-time condition dropout."""
    if cfg.model.family == "phantom_wan":
        from model.phantom_wan import condition_dropout

        return condition_dropout
    return apply_condition_dropout


def sample_latents(cfg: TrainConfig, model, cond, shape, steps, w_img, w_txt, generator) -> torch.Tensor:
    """(B, C, T, h, w) latents from noise with the family's two-weight guidance."""
    if cfg.model.family == "phantom_wan":
        from model.phantom_wan import guided_sample

        return guided_sample(
            model,
            cond,
            shape,
            steps=steps,
            w_img=w_img,
            w_txt=w_txt,
            shift=cfg.model.wan.sample_shift,
            generator=generator,
            solver=cfg.model.wan.sample_solver,
        )
    return euler_sample(model, cond, shape, steps=steps, w_img=w_img, w_txt=w_txt, generator=generator)


def encoder_cfg(cfg: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Put the encoders on the training device unless the YAML pins one."""
    out = {k: dict(v or {}) for k, v in (cfg or {}).items()}
    for section, registry in (("vae", VAE_BACKENDS), ("text", TEXT_BACKENDS), ("image", IMAGE_BACKENDS)):
        sub = out.setdefault(section, {})
        name = sub.get("backend", DEFAULT_BACKENDS[section])
        if name in registry and "device" in registry[name][1] and "device" not in sub:
            sub["device"] = str(device)
    return out


def encoder_signature(cfg: dict[str, Any]) -> str:
    """Names the encoder setup, so cached or precomputed outputs of another setup are never reused."""
    return repr(sorted((k, sorted((v or {}).items())) for k, v in (cfg or {}).items()))
