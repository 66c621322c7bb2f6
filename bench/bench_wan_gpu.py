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


def bench_1p3b() -> dict[str, float]:
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from model.flow import Conditioning
    from model.phantom_wan import WAN_PRESETS, PhantomWan, build_wan_transformer, wan_flow_loss
    from training.loop import fully_shard_model

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    if not dist.is_initialized():
        dist.init_process_group("nccl", rank=0, world_size=1)
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    torch.manual_seed(0)
    transformer = build_wan_transformer("1.3B")
    transformer.enable_gradient_checkpointing()
    model = PhantomWan(transformer, text_len=512)
    n_params = sum(p.numel() for p in model.parameters())
    n_matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model = fully_shard_model(model, dev, mp_policy=mp)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    frames, refs, h, w = 1 + 80 // 4, 2, 480 // 8, 832 // 8
    g = torch.Generator(device=dev).manual_seed(0)
    x0 = torch.randn(1, 16, frames, h, w, device=dev, generator=g)
    cond = Conditioning(
        text=torch.randn(1, 120, 4096, device=dev, generator=g),
        text_mask=torch.ones(1, 120, dtype=torch.bool, device=dev),
        ref_latents=torch.randn(1, refs, 16, h, w, device=dev, generator=g),
        ref_mask=torch.ones(1, refs, dtype=torch.bool, device=dev),
    )
    times = []
    torch.cuda.reset_peak_memory_stats(dev)
    for i in range(WARMUP + TIMED):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = wan_flow_loss(model, x0, cond, generator=g)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= WARMUP:
            times.append(time.perf_counter() - t0)
    step_s = sorted(times)[len(times) // 2]
    preset = WAN_PRESETS["1.3B"]
    dim = preset["num_attention_heads"] * preset["attention_head_dim"]
    seq = (frames + refs) * (h // 2) * (w // 2)
    flops = model_flops_per_sample(n_matmul, preset["num_layers"], dim, seq, 512)
    dist.destroy_process_group()
    return {
        "wan1p3b_params_m": round(n_params / 1e6, 1),
        "wan1p3b_tokens": float(seq),
        "wan1p3b_step_s": round(step_s, 3),
        "wan1p3b_peak_mem_gb": round(torch.cuda.max_memory_allocated(dev) / 1e9, 2),
        "wan1p3b_mfu": round(flops / step_s / H200_BF16_FLOPS, 4),
        "wan1p3b_loss_finite": float(torch.isfinite(loss).item()),
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
    out = bench_1p3b()
    out.update(bench_tiny_end_to_end())
    return out


if __name__ == "__main__":
    print(json.dumps(run()))
