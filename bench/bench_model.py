"""Benchmark of the MMDiT: windowed (plain and shifted) vs full joint attention in one block, a tiny step."""

from __future__ import annotations

import contextlib
import json
import statistics
import time

import torch

# One block at >= 4k video tokens: 32 latent frames of 12 x 12 patches = 4608 video tokens, 1 reference
# (144 tokens), 32 text tokens; hidden 128, 2 heads of 64. Windows of 2 latent frames = 288 video tokens,
# so 16 windows, each [288 video | 144 reference | 32 text] = 464 tokens against 4784 for full attention.
# Why hidden 128: attention over linear cost per token is about N / (6 * hidden); here 6.2, close to a
# 720p Phantom-scale model (N ~ 75k tokens, hidden ~ 1.5-3k: 4-8), whereas hidden 256 would make the
# block linear-bound (2.9) and understate what windows save. The paper's 9-frame window is timed too.
BLOCK = dict(hidden=128, num_heads=2, frames=32, side=12, window_frames=2, n_refs=1, text_len=32)
PAPER_WINDOW_FRAMES = 9


def _block_inputs(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    fr, side, D = BLOCK["frames"], BLOCK["side"], cfg.hidden
    n_vid, n_ref = fr * side * side, BLOCK["n_refs"] * side * side
    vis = torch.randn(1, n_vid + n_ref, D, generator=g, requires_grad=True)
    txt = torch.randn(1, BLOCK["text_len"], D, generator=g, requires_grad=True)
    c = torch.randn(1, D, generator=g)
    return vis, txt, c, n_vid


def _block_and_args(window_size: int, shifted: bool = False):
    """The block and its inputs; shifted: the odd blocks' window grid (offset by half a window, in frames)."""
    from model.mmdit import MMDiTBlock, Rope3D, mmdit_config

    cfg = mmdit_config("tiny", hidden=BLOCK["hidden"], num_heads=BLOCK["num_heads"], window_size=window_size)
    torch.manual_seed(0)
    block = MMDiTBlock(cfg)
    torch.nn.init.normal_(block.vis_mod[-1].weight, std=0.02)  # live gates, as after training
    torch.nn.init.normal_(block.txt_mod[-1].weight, std=0.02)
    vis, txt, c, n_vid = _block_inputs(cfg)
    fr, side, n_refs = BLOCK["frames"], BLOCK["side"], BLOCK["n_refs"]
    # RoPE positions as MMDiT.positions: video (t, y, x), then reference i at (fr + i, y, x)
    axes = (torch.arange(fr + n_refs), torch.arange(side), torch.arange(side))
    pos = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3).float()
    rope = Rope3D(cfg.head_dim, cfg.rope_axes_dim, cfg.rope_theta)(pos)
    txt_mask = torch.ones(1, BLOCK["text_len"], dtype=torch.bool)
    ref_mask = torch.ones(1, n_refs * side * side, dtype=torch.bool)
    shift = (window_size // 2) * side * side if shifted else 0
    return block, (vis, txt, c, rope, n_vid, txt_mask, ref_mask, window_size * side * side, shift)


def _fwd_bwd(block, args):
    vis, txt = block(*args)
    (vis.square().mean() + txt.square().mean()).backward()


def _time_blocks(setups: tuple[tuple[int, bool], ...], repeats: int) -> list[float]:
    """Seconds per forward+backward for each (window size, shifted); runs interleaved and keeps the
    fastest, so load from other processes on a shared machine biases neither side."""
    blocks = [_block_and_args(w, shifted) for w, shifted in setups]
    for block, args in blocks:
        _fwd_bwd(block, args)  # warm-up
    times = [[] for _ in blocks]
    for _ in range(repeats):
        for i, (block, args) in enumerate(blocks):
            t0 = time.perf_counter()
            _fwd_bwd(block, args)
            times[i].append(time.perf_counter() - t0)
    return [min(t) for t in times]


def _peak_alloc_bytes(window_size: int, math_kernel: bool = False) -> float:
    """Peak bytes held by tensors allocated during one forward+backward of the block (CPU).

    From the profiler's allocation timeline: every allocation and free is a [memory] event with a signed
    size; the running sum's maximum is the peak above what existed before (weights, inputs).
    math_kernel: force SDPA's reference kernel, which materializes the (S, S) score matrix per head, to
    show the memory a non-fused attention kernel needs (CPU SDPA is otherwise a fused flash kernel).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    block, args = _block_and_args(window_size)
    ctx = sdpa_kernel([SDPBackend.MATH]) if math_kernel else contextlib.nullcontext()
    with ctx, profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _fwd_bwd(block, args)
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    cur = peak = 0
    for _, nbytes in events:
        cur += nbytes
        peak = max(peak, cur)
    return float(peak)


def _attention_matrix_ratio(window_frames: int = BLOCK["window_frames"]) -> float:
    """Analytic: scores held by windowed attention (nW * (S + R)^2) over full attention (N^2)."""
    side = BLOCK["side"]
    n_vid = BLOCK["frames"] * side * side
    shared = BLOCK["n_refs"] * side * side + BLOCK["text_len"]
    S = window_frames * side * side
    n_windows = -(-n_vid // S)
    return n_windows * (S + shared) ** 2 / (n_vid + shared) ** 2


def _flop_speedup_analytic(window_frames: int = BLOCK["window_frames"]) -> float:
    """Forward FLOPs of the block, full over windowed: linear layers (24 * D^2 per token: QKV, projection,
    4x MLP, each a multiply-add) are the same in both; attention costs 4 * S^2 * D per sequence of S."""
    side, D = BLOCK["side"], BLOCK["hidden"]
    n_vid = BLOCK["frames"] * side * side
    shared = BLOCK["n_refs"] * side * side + BLOCK["text_len"]
    S = window_frames * side * side
    linear = 24 * D * D * (n_vid + shared)
    full = linear + 4 * (n_vid + shared) ** 2 * D
    windowed = linear + -(-n_vid // S) * 4 * (S + shared) ** 2 * D
    return full / windowed


def _tiny_step_ms(steps: int = 10) -> float:
    from model.flow import Conditioning, rf_loss
    from model.mmdit import MMDiT, mmdit_config

    torch.manual_seed(0)
    model = MMDiT(mmdit_config("tiny")).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    B, n = 2, 2  # a 4-frame 32x32 video as pixel_patch latents (12, 4, 16, 16), 2 references, 16 text tokens
    x0 = torch.randn(B, 12, 4, 16, 16, generator=g)
    cond = Conditioning(
        text=torch.randn(B, 16, 384, generator=g),
        text_mask=torch.ones(B, 16, dtype=torch.bool),
        ref_latents=torch.randn(B, n, 12, 16, 16, generator=g),
        ref_clip=torch.randn(B, n, 1280, generator=g),
    )
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        loss, _ = rf_loss(model, x0, cond, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 2:  # skip warm-up
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def run() -> dict[str, float]:
    torch.set_num_threads(2)
    wf = BLOCK["window_frames"]
    full_s, win_s, win_shift_s, win9_s = _time_blocks(
        ((0, False), (wf, False), (wf, True), (PAPER_WINDOW_FRAMES, False)), repeats=3
    )
    full_mem = _peak_alloc_bytes(0)
    win_mem = _peak_alloc_bytes(BLOCK["window_frames"])
    return {
        "window_bench_video_tokens": float(BLOCK["frames"] * BLOCK["side"] ** 2),
        "window_block_fwd_bwd_full_s": full_s,
        "window_block_fwd_bwd_windowed_s": win_s,
        "window_vs_full_attn_speedup": full_s / win_s,
        # odd blocks: a 1-frame first window, 15 windows of 2 frames, a 1-frame last one (3 SDPA calls)
        "window_shifted_vs_full_attn_speedup": full_s / win_shift_s,
        "window9_vs_full_attn_speedup": full_s / win9_s,
        "window9_vs_full_flop_speedup_analytic": _flop_speedup_analytic(PAPER_WINDOW_FRAMES),
        "window_attn_peak_mem_ratio": win_mem / full_mem,
        "window_block_peak_mem_full_mb": full_mem / 2**20,
        "window_block_peak_mem_windowed_mb": win_mem / 2**20,
        "window_attn_peak_mem_ratio_math_kernel": _peak_alloc_bytes(BLOCK["window_frames"], True)
        / _peak_alloc_bytes(0, True),
        "window_attn_matrix_ratio_analytic": _attention_matrix_ratio(),
        "window_vs_full_flop_speedup_analytic": _flop_speedup_analytic(),
        "mmdit_tiny_step_ms": _tiny_step_ms(),
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=1))
