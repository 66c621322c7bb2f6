"""Sequence parallelism on real torch.distributed (gloo, CPU processes): SP=2 gives SP=1's loss and gradients
for the MMDiT and Phantom-Wan, each rank holds only its share of the tokens, and training composes with FSDP2."""

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


def _compare(model, x0, cond, t, noise, sp, record) -> tuple[list, list]:
    """SP=1 then SP=2 on the same model and batch; the SP gradients summed over the group."""
    ref_loss, ref_grads = _loss_and_grads(model, x0, cond, t, noise)
    model.set_sequence_parallel(sp)
    try:
        sp_loss, sp_grads = _loss_and_grads(model, x0, cond, t, noise)
    finally:
        model.set_sequence_parallel(None)
    for g in sp_grads.values():
        dist.all_reduce(g, group=sp.group)
    assert ref_grads.keys() == sp_grads.keys()
    assert torch.allclose(sp_loss, ref_loss, rtol=1e-5, atol=1e-6), (float(sp_loss), float(ref_loss))
    for name, g in ref_grads.items():
        assert g.abs().max() > 0 or sp_grads[name].abs().max() == 0, name
        assert torch.allclose(sp_grads[name], g, rtol=1e-4, atol=1e-5 * max(1.0, float(g.abs().max()))), name
    return ref_grads, record


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
        hook = model.blocks[1].register_forward_pre_hook(lambda m, a: shapes.append(tuple(a[0].shape)))
        _compare(model, x0, cond, t, noise, sp, shapes)
        hook.remove()
        # every block sees this rank's 15 of the 30 visual tokens (SP=1 saw all 30)
        assert shapes == [(B, 30, hidden), (B, 15, hidden)], shapes
    # no references at all, and an odd sequence: 3*3*2 = 18 video tokens -> 9 per rank
    torch.manual_seed(0)
    model = MMDiT(mmdit_config("tiny", depth=2))
    _perturb(model, 3)
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(1, 12, 3, 6, 4, generator=g)
    cond = Conditioning(text=torch.randn(1, 4, 384, generator=g), text_mask=torch.ones(1, 4, dtype=torch.bool))
    _compare(model, x0, cond, torch.rand(1, generator=g), torch.randn(x0.shape, generator=g), sp, [])


def test_mmdit_sp2_equals_sp1_loss_and_grads():
    spawn(_mmdit_rank, 2)


def _wan_rank(rank, world):
    from model.phantom_wan import PhantomWan, build_wan_transformer

    sp = SeqParallel(dist.new_group(list(range(world))))
    for heads in (2, 3):
        torch.manual_seed(0)
        tr = build_wan_transformer("tiny", num_attention_heads=heads, in_channels=4, out_channels=4, text_dim=32)
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
        hook = tr.blocks[1].register_forward_pre_hook(lambda m, a: shapes.append(tuple(a[0].shape)))
        _compare(model, x0, cond, t, noise, sp, shapes)
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
