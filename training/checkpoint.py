"""Training checkpoints: full weights_only .pt files or sharded DCP folders, atomic; RNG states, EMA."""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
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

# step_00000006.pt (full) or step_00000006/ (a torch.distributed.checkpoint folder)
_STEP_RE = re.compile(r"^step_(\d+)(\.pt)?$")
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

    The averages are plain tensors aligned with the trainable parameters (local shards under FSDP; only the
    adapters under LoRA), so saving and loading go through the model itself with `swapped()`: one code
    path for every strategy.
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = [p.detach().clone().float() for p in _trainable(model)]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        params = [p.detach().float() for p in _trainable(model)]
        # shadow <- decay * shadow + (1 - decay) * param
        torch._foreach_lerp_(self.shadow, params, 1.0 - self.decay)

    @contextlib.contextmanager
    def swapped(self, model: torch.nn.Module):
        """Temporarily put the EMA weights into `model` (for sampling or state dicts)."""
        params = _trainable(model)
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

    def state_dict(
        self, model: torch.nn.Module, options: StateDictOptions = _FULL
    ) -> dict[str, torch.Tensor]:
        with self.swapped(model):
            # Copies: an unsharded CPU state dict aliases the parameters, which the swap then restores.
            return {k: v.detach().clone() for k, v in get_model_state_dict(model, options=options).items()}

    def load_state_dict(
        self, model: torch.nn.Module, state: dict[str, torch.Tensor], options: StateDictOptions | None = None
    ) -> None:
        """Load EMA weights through the model; the caller loads the model's own weights afterwards."""
        set_model_state_dict(model, state, options=options or StateDictOptions(full_state_dict=True))
        self.shadow = [p.detach().clone().float() for p in _trainable(model)]


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _has_frozen(model: torch.nn.Module) -> bool:
    return any(not p.requires_grad for p in model.parameters())


# ----------------------------------------------------------------------------- files


def _options(model, **kw) -> StateDictOptions:
    """Frozen parameters (a LoRA base) come from the pinned base weights, never from checkpoints."""
    frozen = _has_frozen(model)
    return StateDictOptions(ignore_frozen_params=frozen, strict=not frozen, **kw)


def training_state(model, optimizer, scheduler, ema: EMA | None) -> dict[str, Any]:
    """Model, EMA, optimizer and scheduler as full CPU state dicts (collective: call on all ranks)."""
    full = _options(model, full_state_dict=True, cpu_offload=True)
    state = {
        "model": get_model_state_dict(model, options=full),
        "optimizer": get_optimizer_state_dict(model, optimizer, options=full),
        "scheduler": scheduler.state_dict(),
    }
    if ema is not None:
        state["ema"] = ema.state_dict(model, full)
    return state


def load_training_state(state: dict[str, Any], model, optimizer, scheduler, ema: EMA | None) -> None:
    """Inverse of training_state (EMA first: it is loaded by passing through the model's parameters)."""
    full = _options(model, full_state_dict=True)
    if ema is not None and "ema" in state:
        ema.load_state_dict(model, state["ema"], full)
    set_model_state_dict(model, state["model"], options=full)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=full)
    scheduler.load_state_dict(state["scheduler"])


# ----------------------------------------------------------------------------- sharded (DCP) checkpoints


def _sharded_templates(model, optimizer, ema: EMA | None) -> dict[str, Any]:
    """Each rank's own shards (DTensors under FSDP2), copied so loading into them never aliases params."""
    opts = _options(model)
    state = {
        "model": {k: v.detach().clone() for k, v in get_model_state_dict(model, options=opts).items()},
        "optimizer": get_optimizer_state_dict(model, optimizer, options=opts),
    }
    if ema is not None:
        state["ema"] = ema.state_dict(model, opts)
    return state


def save_sharded(
    path: str | os.PathLike,
    model,
    optimizer,
    scheduler,
    ema: EMA | None,
    meta: dict[str, Any],
    rank_state: dict[str, Any],
    rank: int,
    distributed: bool,
) -> Path:
    """A DCP folder: every rank writes its own shards (no gather), its rank_<r>.pt, and rank 0 meta.pt.

    Written under a temporary name and renamed by rank 0 once every rank is done, so a kill mid-write
    leaves the previous checkpoint as the latest one. Ranks may write to folders of their own (``path`` on
    each rank's local disk, a run in a store): each then holds only its part, which the caller uploads.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if distributed:
        dist.barrier()
    dcp.save(_sharded_templates(model, optimizer, ema), checkpoint_id=str(tmp))  # collective
    _save_file(tmp / f"rank_{rank}.pt", rank_state)
    if rank == 0:
        _save_file(tmp / "meta.pt", dict(meta, scheduler=scheduler.state_dict()))
    if distributed:
        dist.barrier()
    if rank == 0:
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    if distributed:
        dist.barrier()
    if rank != 0 and tmp.exists():  # a folder of this rank's own (a run in a store): its part, renamed too
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    return path


def load_sharded(path: str | os.PathLike, model, optimizer, scheduler, ema: EMA | None, rank: int) -> dict:
    """Each rank reads only its shards into model, optimizer and EMA; returns meta.pt plus its rank state."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    state = _sharded_templates(model, optimizer, ema)
    dcp.load(state, checkpoint_id=str(path))  # collective; reshards if the layout changed
    opts = _options(model)
    if ema is not None:
        ema.load_state_dict(model, state["ema"], opts)
    set_model_state_dict(model, state["model"], options=opts)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=opts)
    meta = load_checkpoint(path / "meta.pt")
    scheduler.load_state_dict(meta["scheduler"])
    own = path / f"rank_{rank}.pt"
    if not own.exists():
        raise ValueError(f"{path} has no state for rank {rank} (written by fewer ranks than this run has)")
    meta["rank_state"] = load_checkpoint(own)
    meta["world_size"] = len(list(path.glob("rank_*.pt")))
    return meta


def read_sharded_weights(path: str | os.PathLike, key: str) -> dict[str, torch.Tensor]:
    """Full tensors of one entry ("model" or "ema") of a DCP folder, in one process (sampling, export)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(path))
    template = {}
    for name, md in reader.read_metadata().state_dict_metadata.items():
        if name.startswith(key + ".") and isinstance(md, TensorStorageMetadata):
            template[name[len(key) + 1 :]] = torch.empty(md.size, dtype=md.properties.dtype)
    if not template:
        raise ValueError(f"{path}: no {key!r} tensors in this checkpoint")
    dcp.load({key: template}, checkpoint_id=str(path))
    return template


def load_weights_for_inference(path: str | os.PathLike, use_ema: bool = True):
    """(stored config dict, weights) of a .pt file or a DCP folder; EMA weights when present and asked."""
    path = Path(path)
    if path.is_dir():
        meta = load_checkpoint(path / "meta.pt")
        try:
            weights = read_sharded_weights(path, "ema" if use_ema else "model")
        except ValueError:
            weights = read_sharded_weights(path, "model")
        return meta["config"], weights
    state = load_checkpoint(path)
    weights = state["ema"] if use_ema and "ema" in state else state["model"]
    return state["config"], weights


def _save_file(path: Path, obj: Any) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


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


def checkpoint_path(ckpt_dir: str | os.PathLike, step: int, fmt: str = "full") -> Path:
    """step_XXXXXXXX.pt for a full checkpoint, step_XXXXXXXX/ for a DCP folder."""
    return Path(ckpt_dir) / (f"step_{step:08d}.pt" if fmt == "full" else f"step_{step:08d}")


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in step order (temporary files of an interrupted write are ignored)."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _STEP_RE.match(p.name))]
    # A DCP folder counts once its meta.pt is in (it is renamed into place only when complete).
    return [p for _, p in sorted(found) if p.is_file() or (p / "meta.pt").exists()]


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(ckpt_dir)
    return found[-1] if found else None


def prune_checkpoints(ckpt_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (keep <= 0 keeps everything)."""
    if keep <= 0:
        return
    for p in list_checkpoints(ckpt_dir)[:-keep]:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
