"""Memory planner: per-GPU memory and tokens per rank of a training config, computed without allocating.

`python training/run.py --config configs/phantom_wan_14b.yaml --plan` prints one block per phase (its largest
bucket) and refuses (exit 3) a config whose plan does not fit in scaling.gpu_memory_gb.

What is counted, per rank, in GB (1e9 bytes):
  * weights and optimizer state, sharded by FSDP2 over all num_workers ranks (dp × sp; DDP replicates them):
    every parameter at its stored dtype (model.wan.dtype; the MMDiT is fp32); every trainable one also a
    gradient of that dtype, AdamW m and v of that dtype and an fp32 EMA copy. Counted on the meta device.
  * FSDP2 all-gather buffers: the largest shard unit (a transformer block) unsharded in the compute dtype,
    twice (the next block is prefetched).
  * activations of one micro-batch for this rank's ceil(S / sp) tokens (S = latent frames of the video plus
    one per reference, times h * w): with per-block checkpointing, each block's saved input (D values per
    token) plus one block recomputed in backward, about 20 * D + 2 * ffn values per token (q, k, v and their
    norms and rotations, attention and projection outputs, norms and modulations, the FFN's input, hidden
    and GELU; SDPA keeps only its log-sum-exp); without checkpointing, every block's. The compute dtype is
    bf16 on GPU (autocast / FSDP2 mixed precision), fp32 on CPU.
  * a fixed 1.5 GB for the CUDA context and workspace, plus 10% of the rest for allocator fragmentation.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from training.config import TrainConfig

GB = 1e9
CONTEXT_GB = 1.5
FRAGMENTATION = 0.10


@dataclass
class Network:
    """What the planner needs of the network, counted on the meta device."""

    params: int
    trainable: int
    hidden: int  # D, the width of a block's token states
    ffn: int  # the FFN's hidden width
    depth: int
    unit_params: int  # the largest FSDP unit (one block)
    param_bytes: int  # the stored dtype of the weights
    patch: tuple[int, int, int]  # (t, h, w) latent patch


@dataclass
class PhasePlan:
    phase: str
    bucket: tuple[int, int]
    tokens: int  # S: video and reference tokens of one sample
    tokens_per_rank: int  # ceil(S / sp) * batch size
    states_gb: float
    gather_gb: float
    activations_gb: float
    overhead_gb: float

    @property
    def total_gb(self) -> float:
        return self.states_gb + self.gather_gb + self.activations_gb + self.overhead_gb


def _latent_factors(cfg: TrainConfig) -> tuple[int, int]:
    """(temporal, spatial) downsampling of the configured VAE, read from its config file when it is there."""
    vae = dict(cfg.encoders.get("vae") or {})
    backend = vae.get("backend", "pixel_patch")
    if backend == "pixel_patch":
        return 1, int(vae.get("factor", 2))
    if backend == "wan_vae":
        conf = Path(str(vae.get("path", ""))) / "config.json"
        if conf.is_file():
            c = json.loads(conf.read_text())
            down = c.get("temperal_downsample", [False, True, True])
            return int(c.get("scale_factor_temporal") or 2 ** sum(down)), int(
                c.get("scale_factor_spatial") or 2 ** len(down)
            )
        return 4, 8  # Wan2.1's VAE
    raise ValueError(f"the planner does not know the latent size of VAE backend {backend!r}")


def network(cfg: TrainConfig) -> Network:
    """Parameter counts and widths of the configured network, built on the meta device (nothing allocated)."""
    if cfg.model.family == "mmdit":
        from model.mmdit import MMDiT, mmdit_config

        mcfg = mmdit_config(cfg.model.preset, **cfg.model.overrides)
        with torch.device("meta"):
            net = MMDiT(mcfg)
        blocks, hidden, ffn = net.blocks, mcfg.hidden, int(mcfg.hidden * mcfg.mlp_ratio)
        patch, param_bytes, trainable = (1, mcfg.patch_size, mcfg.patch_size), 4, None
    else:
        from model.phantom_wan import build_wan_transformer

        wan = cfg.model.wan
        with torch.device("meta"):
            net = build_wan_transformer(cfg.model.preset, **cfg.model.overrides)
        c = net.config
        blocks, hidden, ffn = net.blocks, c.num_attention_heads * c.attention_head_dim, c.ffn_dim
        patch, param_bytes = tuple(c.patch_size), torch.finfo(getattr(torch, wan.dtype)).bits // 8
        trainable = None
        if wan.finetune == "lora":
            targets = tuple(wan.lora.target_modules)
            trainable = sum(
                wan.lora.rank * (m.in_features + m.out_features)
                for name, m in net.named_modules()
                if isinstance(m, torch.nn.Linear) and any(name.endswith("." + t) for t in targets)
            )
    params = sum(p.numel() for p in net.parameters())
    return Network(
        params=params,
        trainable=params if trainable is None else trainable,
        hidden=hidden,
        ffn=ffn,
        depth=len(blocks),
        unit_params=max(sum(p.numel() for p in b.parameters()) for b in blocks),
        param_bytes=param_bytes,
        patch=patch,
    )


def plan(cfg: TrainConfig, net: Network | None = None) -> list[PhasePlan]:
    """One PhasePlan per phase, at the phase's largest bucket and data.max_refs references."""
    net = net or network(cfg)
    sc = cfg.scaling
    shards = sc.num_workers if sc.strategy == "fsdp" else 1
    act_bytes = 2 if sc.use_gpu else 4
    lora = cfg.model.family == "phantom_wan" and cfg.model.wan.finetune == "lora"
    b = net.param_bytes
    # frozen weights at b; trainable: weight and grad at b, AdamW m, v at b, fp32 EMA. LoRA adapters live
    # beside the frozen base (their own parameters).
    per_trainable = 3 * b + 4 + (b if lora else 0)
    states = (net.params * b + net.trainable * per_trainable) / shards
    gather = 2 * net.unit_params * (2 if sc.use_gpu else b) if sc.strategy == "fsdp" else 0
    grad_ckpt = _grad_ckpt(cfg)
    t_fac, s_fac = _latent_factors(cfg)
    pt, ph, pw = net.patch
    out = []
    for phase in cfg.phases:
        best = None
        for H, W in phase.buckets:
            frames = (phase.num_frames - 1) // t_fac + 1 + cfg.data.max_refs  # video latents + references
            S = (frames // pt) * (H // s_fac // ph) * (W // s_fac // pw)
            if best is None or S > best[0]:
                best = (S, (H, W))
        S, bucket = best
        local = math.ceil(S / sc.sp_degree) * phase.batch_size
        block = local * (20 * net.hidden + 2 * net.ffn) * act_bytes  # one block's saved tensors
        saved = local * net.hidden * act_bytes
        acts = (net.depth * saved + block) if grad_ckpt else net.depth * block
        acts += 2 * saved  # the embedded input and the last block's output
        base = states + gather + acts
        out.append(
            PhasePlan(
                phase=phase.name,
                bucket=bucket,
                tokens=S,
                tokens_per_rank=local,
                states_gb=states / GB,
                gather_gb=gather / GB,
                activations_gb=acts / GB,
                overhead_gb=(CONTEXT_GB if sc.use_gpu else 0.0) + FRAGMENTATION * base / GB,
            )
        )
    return out


def format_plan(cfg: TrainConfig, plans: list[PhasePlan], net: Network) -> str:
    sc = cfg.scaling
    dp = sc.num_workers // sc.sp_degree
    lines = [
        f"{cfg.model.family} {cfg.model.preset}: {net.params:,} params ({net.trainable:,} trainable), "
        f"{sc.num_workers} ranks = dp {dp} x sp {sc.sp_degree}, {sc.strategy}, "
        f"checkpointing {'on' if _grad_ckpt(cfg) else 'off'}, {cfg.data.max_refs} references",
    ]
    for p in plans:
        lines.append(
            f"  {p.phase} {p.bucket[0]}x{p.bucket[1]}: {p.tokens:,} tokens/sample, "
            f"{p.tokens_per_rank:,} per rank | weights+grads+AdamW+EMA {p.states_gb:.2f} GB, "
            f"all-gather {p.gather_gb:.2f} GB, activations {p.activations_gb:.2f} GB, "
            f"overhead {p.overhead_gb:.2f} GB -> {p.total_gb:.1f} of {sc.gpu_memory_gb:g} GB"
            + ("" if p.total_gb <= sc.gpu_memory_gb else "  DOES NOT FIT")
        )
    return "\n".join(lines)


def _grad_ckpt(cfg: TrainConfig) -> bool:
    if cfg.model.family == "phantom_wan":
        return cfg.model.wan.grad_checkpoint
    from model.mmdit import mmdit_config

    return mmdit_config(cfg.model.preset, **cfg.model.overrides).grad_checkpoint


def check(cfg: TrainConfig) -> tuple[bool, str]:
    """(fits, the printed plan): fits is False when any phase needs more than scaling.gpu_memory_gb."""
    net = network(cfg)
    plans = plan(cfg, net)
    text = format_plan(cfg, plans, net)
    return all(p.total_gb <= cfg.scaling.gpu_memory_gb for p in plans), text
