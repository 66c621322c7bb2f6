"""Model families chosen by name in the training YAML (model.family): how each is built, trained, sampled.

`family(cfg)` picks a family's record once; callers use its fields and never test the family name.
Both the loop and the sampler import this module (and never each other's internals): loop -> sample -> models.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from model.flow import Conditioning, apply_condition_dropout, euler_sample, rf_loss
from model.mmdit import MMDiT, mmdit_config
from model.phantom_wan import WAN_LOSS_ARGS, condition_dropout, guided_sample
from training.config import TrainConfig
from training.encoders import DEFAULT_BACKENDS, IMAGE_BACKENDS, TEXT_BACKENDS, VAE_BACKENDS


@dataclass(frozen=True)
class Family:
    """One model family, bound to one config: everything the trainer and the sampler do differently."""

    name: str
    # () -> the network, with its pretrained weights and LoRA adapters when configured
    build: Callable[[], torch.nn.Module]
    # (model, x0, cond, generator=, **cfg.flow.loss) -> (loss, info): model.flow.rf_loss, family defaults
    loss: Callable[..., tuple[torch.Tensor, dict]]
    # (cond, generator=, **cfg.flow.dropout) -> cond: the training-time condition dropout
    dropout: Callable[..., Conditioning]
    # (model, cond, shape, steps=, w_img=, w_txt=, generator=[, null_text=]) -> (B, C, T, h, w) latents,
    # two-weight guidance; null_text is passed only when negative_prompt is set
    sample: Callable[..., torch.Tensor]
    # The prompt whose text-encoder states are the null text of guidance at sampling (phantom_wan: the
    # release's negative prompt unless the config says otherwise); None: the sampler's all-zero null text.
    negative_prompt: str | None = None
    # Checkpoints hold only the trainable weights (LoRA adapters); build() recreates the rest.
    adapters_only: bool = False


def _mmdit(cfg: TrainConfig) -> Family:
    """The paper's MMDiT, trained from scratch: logit-normal t, references removed by dropout, Euler."""
    return Family(
        name="mmdit",
        build=lambda: MMDiT(mmdit_config(cfg.model.preset, **cfg.model.overrides)),
        loss=rf_loss,
        dropout=apply_condition_dropout,
        sample=euler_sample,
    )


def _phantom_wan(cfg: TrainConfig) -> Family:
    """The Wan2.1 DiT: shifted uniform t, dropped references keep their slots, the release's sampler (its
    schedule, integer timesteps, UniPC, the encoded negative prompt as null text)."""

    def build() -> torch.nn.Module:
        from training.wan import build_phantom_wan  # loads weights files and peft: only when building

        return build_phantom_wan(cfg.model)

    wan = cfg.model.wan
    return Family(
        name="phantom_wan",
        build=build,
        loss=partial(rf_loss, **WAN_LOSS_ARGS),
        dropout=condition_dropout,
        sample=partial(guided_sample, shift=wan.sample_shift, solver=wan.sample_solver),
        negative_prompt=wan.negative_prompt,
        adapters_only=wan.finetune == "lora",
    )


FAMILIES: dict[str, Callable[[TrainConfig], Family]] = {"mmdit": _mmdit, "phantom_wan": _phantom_wan}


def family(cfg: TrainConfig) -> Family:
    """The record of cfg.model.family, bound to cfg."""
    name = cfg.model.family
    if name not in FAMILIES:
        raise ValueError(f"model.family={name!r}; allowed: {', '.join(map(repr, FAMILIES))}")
    return FAMILIES[name](cfg)


def build_model(cfg: TrainConfig) -> torch.nn.Module:
    """family(cfg).build(), for callers that need only the network."""
    return family(cfg).build()


def encoder_cfg(cfg: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Put the encoders on the training device unless the YAML pins one."""
    out = {k: dict(v or {}) for k, v in (cfg or {}).items()}
    for section, registry in (("vae", VAE_BACKENDS), ("text", TEXT_BACKENDS), ("image", IMAGE_BACKENDS)):
        sub = out.setdefault(section, {})
        name = sub.get("backend", DEFAULT_BACKENDS[section])
        if name in registry and "device" in registry[name][1] and "device" not in sub:
            sub["device"] = str(device)
    return out
