"""GPU benchmark of Phantom-Wan 1.3B (random init, bf16, FSDP2 on 1 GPU, activation checkpointing) at
480x832, 81 frames, 2 references: step time, peak memory, MFU; plus the tiny Wan config end to end on GPU.

Returns {} without CUDA, so `make bench` skips it on CPU machines; rerun it wherever a GPU exists:
`.venv/bin/python -m bench.bench_wan_gpu`.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

H200_BF16_FLOPS = 989e12  # dense bf16 peak
WARMUP, TIMED = 2, 5


def model_flops_per_sample(n_params_matmul: int, layers: int, dim: int, seq: int, text_len: int) -> float:
    """Forward + backward model FLOPs (no recompute): 6 * params * tokens for the linear layers, plus
    self-attention 12 * L * S^2 * dim and cross-attention 12 * L * S * text_len * dim."""
    return 6 * n_params_matmul * seq + 12 * layers * seq * seq * dim + 12 * layers * seq * text_len * dim


def bench_train_step(
    preset: str = "1.3B",
    device: str = "cuda",
    frames: int = 1 + 80 // 4,
    refs: int = 2,
    hw: tuple[int, int] = (480 // 8, 832 // 8),
    text_len: int = 512,
    prefix: str = "wan1p3b",
    **overrides,
) -> dict[str, float]:
    """Train steps of one preset under FSDP2 (world 1), bf16 mixed precision, activation checkpointing, on
    synthetic latents of the real shapes (video (16, 21, 60, 104) + 2 reference frames, 512 text states)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from model.flow import Conditioning, rf_loss
    from model.phantom_wan import WAN_LOSS_ARGS, PhantomWan, build_wan_transformer, wan_transformer_config
    from training.loop import fully_shard_model

    cuda = device == "cuda"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    dev = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    torch.manual_seed(0)
    arch = wan_transformer_config(preset, **overrides)
    transformer = build_wan_transformer(preset, **overrides)
    transformer.enable_gradient_checkpointing()
    model = PhantomWan(transformer, text_len=text_len)
    n_params = sum(p.numel() for p in model.parameters())
    n_matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "blocks" in n)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cuda else None
    model = fully_shard_model(model, dev, mp_policy=mp)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    h, w = hw
    C = arch["in_channels"]
    g = torch.Generator(device=dev).manual_seed(0)
    x0 = torch.randn(1, C, frames, h, w, device=dev, generator=g)
    cond = Conditioning(
        text=torch.randn(1, 120, arch["text_dim"], device=dev, generator=g),
        text_mask=torch.ones(1, 120, dtype=torch.bool, device=dev),
        ref_latents=torch.randn(1, refs, C, h, w, device=dev, generator=g),
        ref_mask=torch.ones(1, refs, dtype=torch.bool, device=dev),
    )
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    times = []
    for i in range(WARMUP + TIMED):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast:
            loss, _ = rf_loss(model, x0, cond, generator=g, **WAN_LOSS_ARGS)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= WARMUP:
            times.append(time.perf_counter() - t0)
    step_s = sorted(times)[len(times) // 2]
    dim = arch["num_attention_heads"] * arch["attention_head_dim"]
    p_t, p_h, p_w = arch["patch_size"]
    seq = (frames + refs) // p_t * (h // p_h) * (w // p_w)
    flops = model_flops_per_sample(n_matmul, arch["num_layers"], dim, seq, text_len)
    dist.destroy_process_group()
    return {
        f"{prefix}_params_m": round(n_params / 1e6, 1),
        f"{prefix}_tokens": float(seq),
        f"{prefix}_step_s": round(step_s, 3),
        f"{prefix}_peak_mem_gb": round(torch.cuda.max_memory_allocated(dev) / 1e9, 2) if cuda else 0.0,
        f"{prefix}_mfu": round(flops / step_s / H200_BF16_FLOPS, 4),
        f"{prefix}_loss_finite": float(torch.isfinite(loss).item()),
    }


def bench_tiny_end_to_end() -> dict[str, float]:
    import torch
    import yaml

    from tests.training.conftest import write_triplet_shards
    from tests.training.wan_assets import tiny_wan_config, write_tiny_wan_assets
    from training.config import load_config
    from training.loop import Context, train

    with tempfile.TemporaryDirectory(prefix="bench_wan_gpu") as tmp:
        tmp = Path(tmp)
        shards = write_triplet_shards(tmp / "shards", num_samples=12)
        data = tiny_wan_config(write_tiny_wan_assets(tmp / "assets"), shards, tmp / "run")
        data["scaling"]["use_gpu"] = True
        (tmp / "c.yaml").write_text(yaml.safe_dump(data))
        t0 = time.perf_counter()
        out = train(load_config(tmp / "c.yaml"), Context(device=torch.device("cuda")))
        return {
            "wan_tiny_gpu_steps": float(out["step"]),
            "wan_tiny_gpu_s": round(time.perf_counter() - t0, 1),
            "wan_tiny_gpu_loss_last": round(out["losses"][-1], 4),
        }


def run() -> dict[str, float]:
    import torch

    if not torch.cuda.is_available():
        return {}
    out = bench_train_step()
    out.update(bench_tiny_end_to_end())
    if torch.cuda.device_count() >= 2:  # the SP case: NCCL all-to-all, one GPU per rank
        from bench.bench_sp import measure

        out.update(measure("cuda", prefix="gpu_"))
    return out


if __name__ == "__main__":
    print(json.dumps(run()))
