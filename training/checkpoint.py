"""Training checkpoints: atomic writes, weights_only loads, RNG states as tensors, EMA, full state dicts."""

from __future__ import annotations

import contextlib
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

_STEP_RE = re.compile(r"step_(\d+)\.pt$")
# Full (unsharded) state dicts on CPU: the same file serves DDP, FSDP and plain single-process runs.
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


# ----------------------------------------------------------------------------- RNG states


def rng_state(generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Every RNG the loop touches, as tensors (weights_only loads accept nothing else that is not plain)."""
    version, mt_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "torch_cpu": torch.get_rng_state(),
        "python_mt": torch.tensor(mt_state, dtype=torch.int64),
        "python_meta": torch.tensor([version, 0 if gauss is None else 1], dtype=torch.int64),
        "python_gauss": torch.tensor([0.0 if gauss is None else gauss], dtype=torch.float64),
        "numpy_keys": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_meta": torch.tensor([np_pos, np_has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor([np_gauss], dtype=torch.float64),
    }
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda_{i}"] = s
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> None:
    """Inverse of rng_state."""
    torch.set_rng_state(state["torch_cpu"])
    version, has_gauss = (int(x) for x in state["python_meta"])
    gauss = float(state["python_gauss"][0]) if has_gauss else None
    random.setstate((version, tuple(int(x) for x in state["python_mt"]), gauss))
    pos, np_has_gauss = (int(x) for x in state["numpy_meta"])
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, pos, np_has_gauss, float(state["numpy_gauss"][0])))
    if torch.cuda.is_available():
        cuda = [state[f"cuda_{i}"] for i in range(torch.cuda.device_count()) if f"cuda_{i}" in state]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


# ----------------------------------------------------------------------------- EMA


class EMA:
    """Exponential moving average of a (possibly DDP/FSDP-wrapped) model's local parameter tensors.

    The averages are plain tensors aligned with model.parameters() (local shards under FSDP), so saving
    and loading go through the model itself with `swapped()`: one code path for every strategy.
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = [p.detach().clone().float() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        params = [p.detach().float() for p in model.parameters()]
        # shadow <- decay * shadow + (1 - decay) * param
        torch._foreach_lerp_(self.shadow, params, 1.0 - self.decay)

    @contextlib.contextmanager
    def swapped(self, model: torch.nn.Module):
        """Temporarily put the EMA weights into `model` (for sampling or state dicts)."""
        params = list(model.parameters())
        backup = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, s in zip(params, self.shadow):
                p.copy_(s)
        try:
            yield model
        finally:
            with torch.no_grad():
                for p, b in zip(params, backup):
                    p.copy_(b)

    def state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        with self.swapped(model):
            # Copies: an unsharded CPU state dict aliases the parameters, which the swap then restores.
            return {k: v.detach().clone() for k, v in get_model_state_dict(model, options=_FULL).items()}

    def load_state_dict(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Load EMA weights through the model; the caller loads the model's own weights afterwards."""
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
        self.shadow = [p.detach().clone().float() for p in model.parameters()]


# ----------------------------------------------------------------------------- files


def training_state(model, optimizer, scheduler, ema: EMA | None) -> dict[str, Any]:
    """Model, EMA, optimizer and scheduler as full CPU state dicts (collective: call on all ranks)."""
    state = {
        "model": get_model_state_dict(model, options=_FULL),
        "optimizer": get_optimizer_state_dict(model, optimizer, options=_FULL),
        "scheduler": scheduler.state_dict(),
    }
    if ema is not None:
        state["ema"] = ema.state_dict(model)
    return state


def load_training_state(state: dict[str, Any], model, optimizer, scheduler, ema: EMA | None) -> None:
    """Inverse of training_state (EMA first: it is loaded by passing through the model's parameters)."""
    full = StateDictOptions(full_state_dict=True)
    if ema is not None and "ema" in state:
        ema.load_state_dict(model, state["ema"])
    set_model_state_dict(model, state["model"], options=full)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=full)
    scheduler.load_state_dict(state["scheduler"])


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write atomically: a reader sees the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load with weights_only=True: tensors and plain containers only, no arbitrary unpickling."""
    return torch.load(path, map_location="cpu", weights_only=True)


def checkpoint_path(ckpt_dir: str | os.PathLike, step: int) -> Path:
    return Path(ckpt_dir) / f"step_{step:08d}.pt"


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in step order (temporary files of an interrupted write are ignored)."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _STEP_RE.search(p.name)) and p.name[0] != "."]
    return [p for _, p in sorted(found)]


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(ckpt_dir)
    return found[-1] if found else None


def prune_checkpoints(ckpt_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (keep <= 0 keeps everything)."""
    if keep <= 0:
        return
    for p in list_checkpoints(ckpt_dir)[:-keep]:
        p.unlink(missing_ok=True)
