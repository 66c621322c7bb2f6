"""Sequence parallelism on CPU (gloo, 2 processes): a tiny MMDiT on a long sequence, SP=2 against SP=1.

sp2_vs_sp1_loss_abs_diff: |loss(SP=2) - loss(SP=1)| on the same weights and batch.
sp2_activation_peak_ratio: activation memory per rank with SP=2 / SP=1 (goal <= 0.6), measured as the bytes
  of every distinct tensor autograd saves for backward during the forward (what a step holds at its peak).
sp2_step_ratio: median forward + backward time per step, SP=2 / SP=1 (reported; 2 shared cores, gloo).
"""

from __future__ import annotations

import json
import socket
import tempfile
import time
from pathlib import Path

STEPS = 3
SHAPE = (1, 12, 16, 16, 16)  # (B, C, T, H, W): 16 frames of 8 x 8 patches = 1,024 video tokens + 64 per ref


def _measure(model, x0, cond, t, noise):
    import torch

    from model.flow import rf_loss

    saved: dict[int, int] = {}

    def pack(x):
        if isinstance(x, torch.Tensor) and not isinstance(x, torch.nn.Parameter):
            st = x.untyped_storage()
            saved[st.data_ptr()] = st.nbytes()
        return x

    times, loss = [], None
    for _ in range(STEPS):
        model.zero_grad(set_to_none=True)
        saved.clear()
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            loss, _ = rf_loss(model, x0, cond, t=t, noise=noise)
        loss.backward()
        times.append(time.perf_counter() - t0)
    return float(loss.detach()), sum(saved.values()), sorted(times)[len(times) // 2]


def _rank(rank: int, port: int, out: str, device: str = "cpu") -> None:
    import torch
    import torch.distributed as dist

    from model.flow import Conditioning
    from model.mmdit import MMDiT, mmdit_config
    from model.sp import SeqParallel

    torch.set_num_threads(1)
    backend = "nccl" if device == "cuda" else "gloo"  # cuda: one GPU per rank
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = MMDiT(mmdit_config("tiny", depth=4, window_size=4))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        B, C, T, H, W = SHAPE
        x0 = torch.randn(SHAPE, generator=g)
        cond = Conditioning(
            text=torch.randn(B, 16, 384, generator=g),
            text_mask=torch.ones(B, 16, dtype=torch.bool),
            ref_latents=torch.randn(B, 1, C, H, W, generator=g),
            ref_clip=torch.randn(B, 1, 1280, generator=g),
        )
        t, noise = torch.rand(B, generator=g), torch.randn(SHAPE, generator=g)
        if device == "cuda":
            dev = torch.device("cuda", rank)
            model, x0, t, noise = model.to(dev), x0.to(dev), t.to(dev), noise.to(dev)
            cond = Conditioning(**{k: v.to(dev) for k, v in vars(cond).items() if v is not None})
        res = {}
        if rank == 0:  # SP=1: rank 0 alone, the other rank waits at the barrier
            res["sp1"] = _measure(model, x0, cond, t, noise)
        dist.barrier()
        model.set_sequence_parallel(SeqParallel(dist.new_group([0, 1])))
        res["sp2"] = _measure(model, x0, cond, t, noise)
        if rank == 0:
            Path(out).write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()


def measure(device: str = "cpu", prefix: str = "") -> dict[str, float]:
    """SP=2 against SP=1 on two processes: gloo on the CPU, or NCCL with one GPU per rank (``cuda``)."""
    import torch

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="bench_sp") as tmp:
        out = str(Path(tmp) / "sp.json")
        torch.multiprocessing.start_processes(_rank, args=(port, out, device), nprocs=2, start_method="spawn")
        res = json.loads(Path(out).read_text())
    (l1, m1, s1), (l2, m2, s2) = res["sp1"], res["sp2"]
    return {
        f"{prefix}sp2_vs_sp1_loss_abs_diff": abs(l2 - l1),
        f"{prefix}sp2_activation_peak_ratio": round(m2 / m1, 3),
        f"{prefix}sp2_step_ratio": round(s2 / s1, 3),
        f"{prefix}sp1_activation_mb": round(m1 / 1e6, 2),
        f"{prefix}sp_tokens": float(
            SHAPE[2] * (SHAPE[3] // 2) * (SHAPE[4] // 2) + (SHAPE[3] // 2) * (SHAPE[4] // 2)
        ),
    }


def run() -> dict[str, float]:
    return measure("cpu")


if __name__ == "__main__":
    print(json.dumps(run()))
