"""Sequence parallelism on real torch.distributed (gloo, CPU processes): SP=2 gives SP=1's loss and
gradients for the MMDiT and Phantom-Wan, each rank holds only its share of the tokens, and training composes
with FSDP2 (DP=2 x SP=2, killed and resumed)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist

from model.flow import Conditioning, rf_loss
from model.sp import SeqParallel, head_split


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(fn, nprocs: int, *args) -> None:
    """Run fn(rank, world, port, *args) in nprocs fresh processes joined by a gloo group; a failure raises."""
    torch.multiprocessing.start_processes(
        _entry, args=(fn, nprocs, _free_port(), args), nprocs=nprocs, start_method="spawn"
    )


def _entry(rank, fn, world, port, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Small random values in every parameter: the zero-initialised gates would hide half the network."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _loss_and_grads(model, x0, cond, t, noise):
    model.zero_grad(set_to_none=True)
    loss, _ = rf_loss(model, x0, cond, t=t, noise=noise)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare(model, x0, cond, t, noise, sp) -> None:
    """SP=1 then SP=2 on the same model and batch; the SP gradients averaged over the group (model.sp)."""
    ref_loss, ref_grads = _loss_and_grads(model, x0, cond, t, noise)
    model.set_sequence_parallel(sp)
    try:
        sp_loss, sp_grads = _loss_and_grads(model, x0, cond, t, noise)
    finally:
        model.set_sequence_parallel(None)
    for g in sp_grads.values():
        dist.all_reduce(g, group=sp.group)
        g /= sp.size
    assert ref_grads.keys() == sp_grads.keys()
    assert torch.allclose(sp_loss, ref_loss, rtol=1e-5, atol=1e-6), (float(sp_loss), float(ref_loss))
    for name, g in ref_grads.items():
        assert g.abs().max() > 0 or sp_grads[name].abs().max() == 0, name
        assert torch.allclose(sp_grads[name], g, rtol=1e-4, atol=1e-5 * max(1.0, float(g.abs().max()))), name


def _mmdit_rank(rank, world):
    from model.mmdit import MMDiT, mmdit_config

    sp = SeqParallel(dist.new_group(list(range(world))))
    # 4 heads (even split) and 3 heads (2 + 1 per rank); windows of 2 frames, shifted in odd blocks; a
    # visual sequence of 3*3*2 video + 2*3*2 reference = 30 tokens, and with one reference 24.
    for heads, hidden in ((4, 64), (3, 48)):
        torch.manual_seed(0)
        cfg = mmdit_config("tiny", depth=3, num_heads=heads, hidden=hidden, window_size=2)
        model = MMDiT(cfg)
        _perturb(model, 1)
        g = torch.Generator().manual_seed(2)
        B, C, T, H, W = 2, cfg.in_channels, 3, 6, 4
        x0 = torch.randn(B, C, T, H, W, generator=g)
        text_mask = torch.tensor([[True] * 5 + [False] * 2, [True] * 7])
        cond = Conditioning(
            text=torch.randn(B, 7, cfg.text_dim, generator=g) * text_mask[..., None],
            text_mask=text_mask,
            ref_latents=torch.randn(B, 2, C, H, W, generator=g),
            ref_clip=torch.randn(B, 2, cfg.clip_dim, generator=g),
            ref_mask=torch.tensor([[True, True], [True, False]]),
        )
        t, noise = torch.rand(B, generator=g), torch.randn(x0.shape, generator=g)
        shapes = []
        hook = model.blocks[1].register_forward_pre_hook(lambda m, a, s=shapes: s.append(tuple(a[0].shape)))
        _compare(model, x0, cond, t, noise, sp)
        hook.remove()
        # every block sees this rank's 15 of the 30 visual tokens (SP=1 saw all 30)
        assert shapes == [(B, 30, hidden), (B, 15, hidden)], shapes
    # no references at all, and an odd sequence: 3*3*2 = 18 video tokens -> 9 per rank
    torch.manual_seed(0)
    model = MMDiT(mmdit_config("tiny", depth=2))
    _perturb(model, 3)
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(1, 12, 3, 6, 4, generator=g)
    cond = Conditioning(
        text=torch.randn(1, 4, 384, generator=g), text_mask=torch.ones(1, 4, dtype=torch.bool)
    )
    _compare(model, x0, cond, torch.rand(1, generator=g), torch.randn(x0.shape, generator=g), sp)


def test_mmdit_sp2_equals_sp1_loss_and_grads():
    spawn(_mmdit_rank, 2)


def _wan_rank(rank, world):
    from model.phantom_wan import PhantomWan, build_wan_transformer

    sp = SeqParallel(dist.new_group(list(range(world))))
    for heads in (2, 3):
        torch.manual_seed(0)
        tr = build_wan_transformer(
            "tiny", num_attention_heads=heads, in_channels=4, out_channels=4, text_dim=32
        )
        model = PhantomWan(tr, text_len=8)
        _perturb(model, 1)
        g = torch.Generator().manual_seed(2)
        B, C, T, H, W = 2, 4, 2, 6, 6  # 3 x 3 tokens per latent frame
        x0 = torch.randn(B, C, T, H, W, generator=g)
        cond = Conditioning(
            text=torch.randn(B, 5, 32, generator=g),
            text_mask=torch.ones(B, 5, dtype=torch.bool),
            ref_latents=torch.randn(B, 2, C, H, W, generator=g),
            ref_mask=torch.tensor([[True, True], [True, False]]),  # 4 and 3 frames: 36 and 27 tokens
        )
        t, noise = torch.rand(B, generator=g), torch.randn(x0.shape, generator=g)
        shapes = []
        hook = tr.blocks[1].register_forward_pre_hook(lambda m, a, s=shapes: s.append(tuple(a[0].shape)))
        _compare(model, x0, cond, t, noise, sp)
        hook.remove()
        D = heads * 12
        # SP=1: one call per reference count (27 then 36 tokens); SP=2: ceil(27/2) = 14 and 18 per rank
        assert shapes == [(1, 27, D), (1, 36, D), (1, 14, D), (1, 18, D)], shapes


def test_phantom_wan_sp2_equals_sp1_loss_and_grads():
    spawn(_wan_rank, 2)


def test_head_split_and_refusal():
    assert head_split(4, 2) == [(0, 2), (2, 4)]
    assert head_split(12, 8) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 9), (9, 10), (10, 11), (11, 12)]
    with pytest.raises(ValueError, match="ring attention"):
        head_split(2, 4)


# ----------------------------------------------------------------------------- the trainer


def _tiny_cfg(tmp_path, shards, name: str, **scaling):
    import yaml

    from tests.training.conftest import TINY
    from training.config import load_config

    data = dict(
        TINY,
        data=dict(TINY["data"], num_workers=0),
        phases=[dict(TINY["phases"][0], steps=4)],
        log=dict(TINY["log"], ckpt_every=2, checkpoint_format="dcp", out_dir=str(tmp_path / name)),
        scaling=dict(strategy="fsdp", **scaling),
    )
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, load_config(path, {"data.shards": str(shards)})


def _train_rank(rank, world, cfg_dict, out_json):
    import json
    from pathlib import Path

    from training.config import config_from_dict
    from training.loop import Context, fully_shard_model, train

    ctx = Context(
        rank=rank, world_size=world, prepare_model=lambda m: fully_shard_model(m, torch.device("cpu"))
    )
    losses = train(config_from_dict(cfg_dict), ctx)["losses"]
    if rank == 0:
        Path(out_json).write_text(json.dumps(losses))


def test_sp2_training_follows_the_one_rank_curve(tmp_path, corrupt_shards):
    """One batch per step split over 2 ranks (FSDP2 x SP=2) trains like one process on the same stream."""
    import json

    from training.loop import train

    _, one = _tiny_cfg(tmp_path, corrupt_shards, "one")
    _, two = _tiny_cfg(tmp_path, corrupt_shards, "two", num_workers=2, sp_degree=2)
    ref = train(one)["losses"]
    spawn(_train_rank, 2, two.to_dict(), str(tmp_path / "two.json"))
    got = json.loads((tmp_path / "two.json").read_text())
    assert len(got) == len(ref) == 4
    assert torch.allclose(torch.tensor(got), torch.tensor(ref), rtol=1e-4, atol=1e-6), (got, ref)


def _rank_process() -> None:
    """`python -m tests.training.test_sp CONFIG SHARDS RANK WORLD PORT`: one rank of a gloo training run."""
    import sys

    from training.config import load_config
    from training.loop import Context, fully_shard_model, train

    config, shards, rank, world, port = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cfg = load_config(config, {"data.shards": shards})
        ctx = Context(
            rank=rank, world_size=world, prepare_model=lambda m: fully_shard_model(m, torch.device("cpu"))
        )
        train(cfg, ctx)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # 3 runs of 4 processes: about 3 minutes on 2 shared cores
def test_dp2_sp2_four_ranks_resume_exactly_after_sigkill(tmp_path, corrupt_shards):
    """DP=2 x SP=2 on 4 processes: SIGKILL every rank once the step-2 DCP folder is complete, start them
    again, and the loss curve is the uninterrupted one, bit for bit."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from training import checkpoint as ckpt
    from training.loop import read_metrics

    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")

    def launch(config):
        port = _free_port()
        return [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.training.test_sp",
                    str(config),
                    str(corrupt_shards),
                    str(r),
                    "4",
                    str(port),
                ],
                cwd=repo,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )  # fmt: skip
            for r in range(4)
        ]

    def finish(procs):
        for p in procs:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err.decode()[-3000:]

    whole, _ = _tiny_cfg(tmp_path, corrupt_shards, "whole", num_workers=4, sp_degree=2)
    finish(launch(whole))
    killed, cfg = _tiny_cfg(tmp_path, corrupt_shards, "killed", num_workers=4, sp_degree=2)
    procs = launch(killed)
    marker = Path(cfg.log.out_dir) / "checkpoints" / "step_00000002" / "meta.pt"
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, (
                "no step-2 checkpoint"
            )
            time.sleep(0.02)
        for p in procs:
            p.send_signal(signal.SIGKILL)
    finally:
        for p in procs:
            p.wait(timeout=60)
    assert [p.returncode for p in procs] == [-signal.SIGKILL] * 4
    assert ckpt.latest_checkpoint(Path(cfg.log.out_dir) / "checkpoints").name == "step_00000002"
    finish(launch(killed))
    losses = [r["loss"] for r in read_metrics(cfg.log.out_dir)]
    assert len(losses) == 4 and losses == [r["loss"] for r in read_metrics(tmp_path / "whole")]
    latest = ckpt.latest_checkpoint(Path(cfg.log.out_dir) / "checkpoints")
    assert sorted(p.name for p in latest.glob("rank_*.pt")) == [f"rank_{r}.pt" for r in range(4)]
    assert len(list(latest.glob("*.distcp"))) == 4  # FSDP2 shards the weights over all dp x sp ranks


if __name__ == "__main__":
    _rank_process()
