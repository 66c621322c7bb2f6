"""The training loop shared by Ray Train workers and the --no-ray path: phases, RF loss, EMA, resume; the run
folder local or in a store (s3://, gs://)."""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from curation.shards import list_shards
from curation.storage import Store, is_uri, scratch_dir
from training import checkpoint as ckpt
from training.config import PhaseConfig, TrainConfig
from training.data import IMAGE_PAIR, CorruptTally, DataPosition, StreamSpec, build_loader
from training.encode import EncodingCache, LazyEncoders, encode_batch, encoder_signature, latent_tag
from training.encoders import write_unpinned_record
from training.models import family
from training.parallel import Layout, enable_sequence_parallel

__all__ = ["Context", "RunFolder", "fully_shard_model", "read_metrics", "train"]

log = logging.getLogger(__name__)

CSV_FIELDS = ["step", "phase", "loss", "lr", "grad_norm", "samples_per_s", "step_ms", "corrupt", "wall_s"]


@dataclass
class Context:
    """Where the loop runs: rank layout, device, how to wrap the model, and an optional metrics hook."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    prepare_model: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m
    report: Callable[[dict[str, float]], None] | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()


# ----------------------------------------------------------------------------- schedule


class WarmupCosine:
    """LR multiplier: linear warmup to 1, then cosine decay to min_ratio at total_steps (picklable)."""

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float) -> None:
        self.warmup_steps, self.total_steps, self.min_ratio = warmup_steps, total_steps, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def phase_at(phases: list[PhaseConfig], step: int) -> tuple[int, int]:
    """(phase index, first step of that phase) for a global step; past the end -> (len(phases), total)."""
    start = 0
    for i, phase in enumerate(phases):
        if step < start + phase.steps:
            return i, start
        start += phase.steps
    return len(phases), start


# ----------------------------------------------------------------------------- logging


class MetricsLog:
    """CSV (always) and TensorBoard (optional) on rank 0; a resume drops rows past the resumed step."""

    def __init__(self, out_dir: Path, resume_step: int, tensorboard: bool) -> None:
        self.path = out_dir / "metrics.csv"
        rows = []
        if self.path.exists() and resume_step > 0:
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resume_step + 1)

    def write(self, row: dict[str, float]) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=CSV_FIELDS).writerow(row)
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("step", "phase"):
                    self.tb.add_scalar(f"train/{k}", v, int(row["step"]))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(out_dir: str | os.PathLike) -> list[dict[str, float]]:
    """metrics.csv (of a run folder or a store URI) as a list of float rows (tests and the benchmark compare
    loss curves with it)."""
    if is_uri(out_dir):
        text = Store(str(out_dir)).read_bytes("metrics.csv").decode()
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(io.StringIO(text))]
    with open(Path(out_dir) / "metrics.csv", newline="") as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


# ----------------------------------------------------------------------------- the run folder

# A complete checkpoint in a store: a full step_N.pt object, or a DCP folder once its meta.pt is in.
_STORE_CKPT = re.compile(r"^checkpoints/(step_\d+)(\.pt|/meta\.pt)$")


class RunFolder:
    """Where a run keeps metrics.csv, samples/, tensorboard/ and checkpoints/: ``log.out_dir`` itself when it
    is a local folder; for a store URI (``s3://bucket/run``), local scratch folders whose finished files are
    uploaded (curation.storage), since the ranks of a multi-node job share no disk.

    In a store, every rank writes its part of a DCP checkpoint to a folder of its own and uploads it; rank 0
    uploads the folder's ``meta.pt`` last, after every rank's part (and after metrics.csv), so a checkpoint
    is complete exactly when that object exists; a full ``step_N.pt`` is one object. A resume takes the
    newest complete checkpoint in the store and pulls it to local scratch before loading it.
    """

    def __init__(self, out_dir: str, ctx: Context) -> None:
        self.store = Store(out_dir)
        self.remote = not self.store.is_local
        self.ctx = ctx
        self._uploaded: dict[str, tuple[int, int]] = {}
        if not self.remote:
            self.dir = Path(out_dir)
            self.ckpt_dir = self.dir / "checkpoints"
            return
        work = Path(scratch_dir(self.store))
        self.dir = work / "run"  # rank 0's copy of the run files
        self.ckpt_dir = work / f"checkpoints-rank{ctx.rank}"  # this rank's part of each checkpoint
        # What a killed run left in scratch is stale: the store holds the run.
        shutil.rmtree(self.ckpt_dir, ignore_errors=True)
        if ctx.rank == 0:
            shutil.rmtree(self.dir, ignore_errors=True)
            if self.store.is_file("metrics.csv"):  # the rows up to the last checkpoint (MetricsLog cuts)
                self._pull("metrics.csv", self.dir / "metrics.csv")

    def where(self, path: Path) -> str:
        """A checkpoint's name for logs: its path, or its URI in the store."""
        return self.store.uri_of(f"checkpoints/{path.name}") if self.remote else str(path)

    def _pull(self, rel: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with self.store.fs.open_input_stream(self.store.path(rel)) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)

    def _barrier(self) -> None:
        if self.ctx.distributed:
            dist.barrier()

    def store_checkpoints(self) -> list[str]:
        """Names (step_N.pt, step_N) of the complete checkpoints in the store, in step order."""
        found = {}
        for rel in self.store.list("checkpoints"):
            if m := _STORE_CKPT.match(rel):
                found[int(m.group(1)[len("step_") :])] = m.group(1) + (".pt" if m.group(2) == ".pt" else "")
        return [found[k] for k in sorted(found)]

    def latest(self) -> Path | None:
        """The newest complete checkpoint as a local path (pulled from the store for a remote run)."""
        if not self.remote:
            return ckpt.latest_checkpoint(self.ckpt_dir)
        names = self.store_checkpoints()
        if not names:
            return None
        rel, dest = f"checkpoints/{names[-1]}", self.ckpt_dir / names[-1]
        if names[-1].endswith(".pt"):
            self._pull(rel, dest)
        else:  # every file: DCP reshards from any rank's files, and counts the ranks by their rank_*.pt
            for f in self.store.list(rel):
                self._pull(f, dest / f[len(rel) + 1 :])
        return dest

    def loaded(self, path: Path) -> None:
        """A pulled checkpoint is loaded: free its scratch copy."""
        if self.remote and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif self.remote:
            path.unlink(missing_ok=True)

    def publish(self, path: Path) -> None:
        """Upload a checkpoint this rank has just written (its part of a DCP folder; rank 0 a full .pt), the
        completion marker last. Collective for a DCP folder."""
        if not self.remote:
            return
        rel = f"checkpoints/{path.name}"
        if path.is_dir():
            if self.ctx.rank == 0:
                self.store.delete_dir(rel)  # what a killed upload of this step left
            self._barrier()
            for f in sorted(p for p in path.rglob("*") if p.is_file() and p.name != "meta.pt"):
                self.store.put_file(f"{rel}/{f.relative_to(path).as_posix()}", f)
            self._barrier()
            if self.ctx.rank == 0:
                self.sync()
                self.store.put_file(f"{rel}/meta.pt", path / "meta.pt")
            shutil.rmtree(path, ignore_errors=True)
        else:
            self.sync()
            self.store.put_file(rel, path)
            path.unlink()

    def prune(self, keep: int) -> None:
        """All but the newest ``keep`` checkpoints deleted (keep <= 0 keeps everything); rank 0."""
        if not self.remote:
            ckpt.prune_checkpoints(self.ckpt_dir, keep)
            return
        if keep <= 0:
            return
        for name in self.store_checkpoints()[:-keep]:
            rel = f"checkpoints/{name}"
            if name.endswith(".pt"):
                self.store.delete(rel)
            else:
                self.store.delete(f"{rel}/meta.pt")  # incomplete at once, never a torn "complete" one
                self.store.delete_dir(rel)

    def sync(self) -> None:
        """Rank 0 uploads the run files (metrics.csv, samples, tensorboard) changed since the last upload."""
        if not self.remote or self.ctx.rank != 0 or not self.dir.is_dir():
            return
        for f in sorted(p for p in self.dir.rglob("*") if p.is_file() and ".tmp" not in p.name):
            rel, st = f.relative_to(self.dir).as_posix(), f.stat()
            if self._uploaded.get(rel) != (st.st_size, st.st_mtime_ns):
                self.store.put_file(rel, f)
                self._uploaded[rel] = (st.st_size, st.st_mtime_ns)


# ----------------------------------------------------------------------------- the loop


def _all_reduce_mean(x: torch.Tensor, ctx: Context) -> torch.Tensor:
    if ctx.distributed:
        x = x.clone()
        dist.all_reduce(x)
        x /= ctx.world_size
    return x


def _gather(obj: Any, ctx: Context) -> list[Any]:
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def fully_shard_model(model: torch.nn.Module, device: torch.device, mp_policy=None) -> torch.nn.Module:
    """FSDP2: shard each transformer block, then the root (works on CPU/gloo too, unlike Ray's FSDP1 wrapper).

    mp_policy: an optional torch.distributed.fsdp.MixedPrecisionPolicy (bf16 params for compute).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model.to(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    kw = {"mesh": mesh} | ({"mp_policy": mp_policy} if mp_policy is not None else {})
    units = model.shard_units() if hasattr(model, "shard_units") else list(model.blocks)
    if hasattr(model, "one_call_per_sample"):  # the same collectives on every rank (PhantomWan)
        model.one_call_per_sample = dist.get_world_size() > 1
    for block in units:
        fully_shard(block, **kw)
    return fully_shard(model, **kw)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(cfg: TrainConfig, ctx: Context | None = None, stop_at_step: int | None = None) -> dict[str, Any]:
    """Train through every phase (resuming from out_dir/checkpoints if there is one; out_dir may be a store
    URI, see RunFolder).

    stop_at_step: leave right after that step's checkpoint, as if killed there (tests, debugging).
    Returns a summary: final step, losses seen by this call, skipped-sample counts.
    """
    ctx = ctx or Context()
    run = RunFolder(cfg.log.out_dir, ctx)
    is_main = ctx.rank == 0
    if is_main:
        run.dir.mkdir(parents=True, exist_ok=True)
    use_cuda = ctx.device.type == "cuda"
    seed_everything(cfg.seed)

    enc = LazyEncoders(cfg.encoders, ctx.device)
    fam = family(cfg)
    model = fam.build().to(ctx.device)
    model = ctx.prepare_model(model)
    # dp x sp: the ranks of a sequence group share one batch, one random stream, and split its tokens.
    layout = Layout(ctx.rank, ctx.world_size, cfg.scaling.sp_degree)
    if layout.sp_degree > 1:
        enable_sequence_parallel(model, layout, ctx.device)
    # After the model: building an encoder draws from the global RNG, which must not change the model's
    # init between a run on raw shards and one on latent shards.
    if not cfg.data.latent_shards:
        enc()  # raw shards: the encoders are on the hot path, fail early if one is missing
    if is_main:  # model files loaded under `sha256: unpinned` (unchecked): unpinned_models.json
        write_unpinned_record(run.dir)
    ema = ckpt.EMA(model, cfg.optim.ema_decay)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas),
        eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
    )
    total = cfg.total_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(cfg.optim.warmup_steps, total, cfg.optim.min_lr_ratio)
    )
    # One generator per data rank for everything random in the loss (t, noise, condition dropout).
    generator = torch.Generator(device=ctx.device).manual_seed(cfg.seed * 1000 + layout.dp_rank)
    num_streams = max(1, cfg.data.num_workers)
    position = DataPosition(num_streams)
    tally = CorruptTally()
    step = 0
    saved_phase = 0

    latest = run.latest()
    if latest is not None:
        if latest.is_dir():  # DCP: each rank reads its own shards and its own rank state
            state = ckpt.load_sharded(latest, model, optimizer, scheduler, ema, ctx.rank)
            n_ranks, mine = state["world_size"], state["rank_state"]
        else:
            state = ckpt.load_checkpoint(latest)
            ckpt.load_training_state(state, model, optimizer, scheduler, ema)
            n_ranks = len(state["ranks"])
            mine = state["ranks"][ctx.rank] if ctx.rank < n_ranks else None
        if n_ranks != ctx.world_size:
            raise ValueError(f"{latest} was written by {n_ranks} ranks, this run has {ctx.world_size}")
        ckpt.set_rng_state(mine["rng"], generator)
        position.load_state_dict(mine["position"])
        tally.load_state_dict(mine["corrupt"])
        step = int(state["step"])
        saved_phase = int(state["phase"])
        log.info("resumed from %s at step %d", run.where(latest), step)
        del state
        run.loaded(latest)
    metrics = MetricsLog(run.dir, step, cfg.log.tensorboard) if is_main else None

    latent = bool(cfg.data.latent_shards)
    urls = list_shards(cfg.data.latent_shards or cfg.data.shards, cfg.data.verify_sha256)
    # Image pairs mixed in: precomputed beside latent shards (the same phase tags), raw otherwise.
    pairs = cfg.data.image_pair_latents if latent else cfg.data.image_pairs
    image_urls = list_shards(pairs, cfg.data.verify_sha256) if pairs else None
    image_pair_batches = 0
    cache = EncodingCache(cfg.data.cache_dir, encoder_signature(cfg.encoders)) if cfg.data.cache_dir else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_cuda else contextlib.nullcontext()
    losses: list[float] = []
    t_start = time.perf_counter()

    def save(step: int, phase_idx: int) -> None:
        rank_state = {
            "rng": ckpt.rng_state(generator),
            "position": position.state_dict(),
            "corrupt": tally.state_dict(),
        }
        if cfg.log.checkpoint_format == "dcp":
            meta = {"step": step, "phase": phase_idx, "config": cfg.to_dict()}
            path = ckpt.checkpoint_path(run.ckpt_dir, step, "dcp")
            ckpt.save_sharded(
                path, model, optimizer, scheduler, ema, meta, rank_state, ctx.rank, ctx.distributed
            )
            run.publish(path)  # a run in a store: every rank uploads its part (collective)
            if is_main:
                run.prune(cfg.log.keep_checkpoints)
            if ctx.distributed:
                dist.barrier()
            return
        state = ckpt.training_state(model, optimizer, scheduler, ema)  # collective under FSDP
        ranks = _gather(rank_state, ctx)
        if is_main:
            state.update(step=step, phase=phase_idx, ranks=ranks, config=cfg.to_dict())
            run.publish(ckpt.save_checkpoint(ckpt.checkpoint_path(run.ckpt_dir, step), state))
            run.prune(cfg.log.keep_checkpoints)
        if ctx.distributed:
            dist.barrier()

    phase_idx, phase_start = phase_at(cfg.phases, step)
    if phase_idx != saved_phase:  # resumed on a phase boundary: the new phase's stream starts at 0
        tally.new_phase()
        position = DataPosition(num_streams)
    while phase_idx < len(cfg.phases):
        phase = cfg.phases[phase_idx]
        spec = StreamSpec(
            urls=urls,
            buckets=phase.buckets,
            num_frames=phase.num_frames,
            fps=phase.fps,
            batch_size=phase.batch_size,
            # Each phase reads its own stream, so its data position restarts at 0.
            seed=cfg.seed + 7919 * phase_idx,
            rank=layout.dp_rank,
            world_size=layout.dp_size,
            num_streams=num_streams,
            start_batch=position.consumed,
            stream_skip=list(position.next_group),
            shuffle_buffer=cfg.data.shuffle_buffer,
            shuffle_initial=cfg.data.shuffle_initial,
            max_refs=cfg.data.max_refs,
            image_urls=image_urls,
            image_ratio=cfg.data.image_pair_ratio,
        )
        if latent:  # the members training/precompute.py wrote for this phase
            spec.latent_tag = latent_tag(
                encoder_signature(cfg.encoders),
                phase_idx,
                phase.buckets,
                phase.num_frames,
                phase.fps,
                spec.seed,
                cfg.data.max_refs,
            )
        loader = build_loader(spec, cfg.data.num_workers, cfg.data.prefetch_factor, cfg.data.mp_context)
        batches = iter(loader)
        phase_end = phase_start + phase.steps
        while step < phase_end:
            t0 = time.perf_counter()
            model.train()
            n_samples = 0
            loss_sum = torch.zeros((), device=ctx.device)
            for micro in range(cfg.optim.grad_accum):
                batch = next(batches)
                position.update(batch)
                tally.update(batch)
                n_samples += len(batch["keys"])
                image_pair_batches += batch["meta"][0].get("pair_type") == IMAGE_PAIR
                x0, cond = encode_batch(batch, enc, ctx.device, cache)
                cond = fam.dropout(cond, generator=generator, **cfg.flow.dropout)
                last = micro == cfg.optim.grad_accum - 1
                # DDP: all-reduce gradients only on the last micro-batch.
                sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
                with sync, autocast:
                    loss, _ = fam.loss(model, x0, cond, generator=generator, **cfg.flow.loss)
                    (loss / cfg.optim.grad_accum).backward()
                loss_sum += loss.detach().float()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: the norm over all shards is a DTensor
                grad_norm = grad_norm.full_tensor()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            ema.update(model)
            step += 1
            mean_loss = float(_all_reduce_mean(loss_sum / cfg.optim.grad_accum, ctx))
            losses.append(mean_loss)
            step_s = time.perf_counter() - t0

            if step % cfg.log.log_every == 0 or step == total:
                corrupt = torch.tensor(float(tally.total()), device=ctx.device)
                corrupt = float(_all_reduce_mean(corrupt, ctx)) * layout.dp_size
                row = {
                    "step": step,
                    "phase": phase_idx,
                    "loss": mean_loss,
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                    "samples_per_s": n_samples * layout.dp_size / step_s,
                    "step_ms": 1000 * step_s,
                    "corrupt": corrupt,
                    "wall_s": time.perf_counter() - t_start,
                }
                if metrics is not None:
                    metrics.write(row)
                if ctx.report is not None:
                    ctx.report(row)
            if cfg.log.sample_every and step % cfg.log.sample_every == 0:
                _write_sample(cfg, model, ema, enc, batch, step, ctx, run.dir)
            done = step == total or step == stop_at_step
            if step % cfg.log.ckpt_every == 0 or done:
                save(step, phase_idx)
            if step == stop_at_step:
                break
        del batches, loader
        if step == stop_at_step:
            break
        tally.new_phase()
        position = DataPosition(num_streams)
        phase_idx, phase_start = phase_idx + 1, phase_end

    if metrics is not None:
        metrics.close()
    unpinned = write_unpinned_record(run.dir) if is_main else []  # with encoders built later (samples)
    run.sync()
    return {
        "unpinned_model_files": unpinned,
        "step": step,
        "losses": losses,
        "corrupt": tally.totals(),
        "cache_hits": cache.hits if cache else 0,
        "encoders_built": enc.built,
        "image_pair_batches": image_pair_batches,
    }


def _write_sample(
    cfg: TrainConfig, model, ema: ckpt.EMA, enc, batch, step: int, ctx: Context, run_dir: Path
) -> None:
    """EMA sample for the first item of the last batch, written as an mp4 by rank 0.

    Under FSDP every rank must take part in the forward passes; under DDP rank 0 samples alone on the
    unwrapped module.
    """
    from training.data import decode_image, letterbox
    from training.sample import generate, write_mp4

    sharded = cfg.scaling.strategy == "fsdp" and ctx.distributed
    if ctx.rank != 0 and not sharded:
        return
    net = model if sharded else getattr(model, "module", model)
    if "refs" in batch:
        n = int(batch["ref_mask"][0].sum())
        refs = batch["refs"][0, :n]
        num_frames = batch["video"].shape[2]
        if batch["meta"][0].get("pair_type") == IMAGE_PAIR:  # a one-frame batch: sample a clip anyway
            num_frames = cfg.phases[phase_at(cfg.phases, step - 1)[0]].num_frames
    else:  # latent shards carry the reference images for exactly this
        size = tuple(batch["bucket"])
        refs = torch.stack([letterbox(decode_image(b), size) for b in batch["ref_images"][0]])
        num_frames = cfg.phases[phase_at(cfg.phases, step - 1)[0]].num_frames
    with ema.swapped(model):
        net.eval()
        video = generate(
            net,
            enc() if callable(enc) else enc,
            refs,
            batch["captions"][0],
            num_frames=num_frames,
            steps=cfg.log.sample_steps,
            w_img=cfg.log.sample_w_img,
            w_txt=cfg.log.sample_w_txt,
            seed=cfg.seed,
            device=ctx.device,
            cfg=cfg,
        )
    if ctx.rank == 0:
        path = run_dir / "samples" / f"step_{step:08d}.mp4"
        write_mp4(video, path, fps=cfg.phases[0].fps)
