"""Tests of the MMDiT: shapes for 0-4 references, zero init, windowed injection vs a per-window loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from model.mmdit import (
    MMDIT_CONFIGS,
    MMDiT,
    MMDiTConfig,
    count_params,
    mmdit_config,
    window_groups,
    windowed_joint_attention,
)

C, TEXT_DIM, CLIP_DIM = 12, 384, 1280  # the tiny preset's widths (pixel_patch, MiniLM, MobileNetV2)


def tiny_model(seed: int = 0, perturb: float = 0.0, **overrides) -> MMDiT:
    """The tiny preset under a fixed seed; perturb > 0 adds noise to every weight so the zero-initialized
    layers (adaLN, output) are live and outputs depend on every input, as after some training."""
    torch.manual_seed(seed)
    model = MMDiT(mmdit_config("tiny", **overrides)).eval()
    if perturb:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(perturb * torch.randn(p.shape, generator=g))
    return model


def make_inputs(B=2, n=2, T=5, H=8, W=8, L=6, k=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    text_mask = torch.ones(B, L, dtype=torch.bool)
    text_mask[-1, L // 2 :] = False  # the last sample has a shorter prompt
    clip_shape = (B, n, CLIP_DIM) if k is None else (B, n, k, CLIP_DIM)
    return dict(
        x=torch.randn(B, C, T, H, W, generator=g),
        t=torch.rand(B, generator=g),
        text=torch.randn(B, L, TEXT_DIM, generator=g),
        text_mask=text_mask,
        ref_latents=torch.randn(B, n, C, H, W, generator=g) if n else None,
        ref_clip=torch.randn(*clip_shape, generator=g) if n else None,
    )


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4])
def test_shapes_and_zero_output_at_init(n):
    model = tiny_model()
    inp = make_inputs(n=n)
    out = model(**inp)
    assert out.video.shape == inp["x"].shape
    if n == 0:
        assert out.ref is None
    else:
        assert out.ref.shape == (2, n, C, 8, 8)
        assert torch.equal(out.ref, torch.zeros_like(out.ref))
    # adaLN-Zero and a zero output layer: exactly zero, not merely small
    assert torch.equal(out.video, torch.zeros_like(out.video))


@pytest.mark.parametrize("n", [0, 1, 4])
def test_perturbed_model_shapes_finite_and_token_clip(n):
    model = tiny_model(perturb=0.05)
    inp = make_inputs(n=n, k=3)  # CLIP tokens (B, n, k, clip_dim) instead of pooled vectors
    out = model(**inp)
    assert out.video.shape == inp["x"].shape and torch.isfinite(out.video).all()
    assert out.video.abs().max() > 0
    assert (out.ref is None) == (n == 0)


def test_references_change_the_video():
    model = tiny_model(perturb=0.05)
    inp = make_inputs(n=2)
    base = model(**inp).video
    vae_changed = model(**{**inp, "ref_latents": inp["ref_latents"] + 1.0}).video
    clip_changed = model(**{**inp, "ref_clip": inp["ref_clip"] * -1.0}).video
    assert (base - vae_changed).abs().max() > 1e-4
    assert (base - clip_changed).abs().max() > 1e-4


def test_masked_references_are_ignored_and_do_not_move_the_video():
    """Padded references (ref_mask False) change nothing, and all-masked equals no references at all:
    references never shift the video's positions or windows."""
    model = tiny_model(perturb=0.05, window_size=2)  # T=5 -> windows of 2, 2, 1 frames (one partial)
    inp = make_inputs(n=4)
    ref_mask = torch.tensor([[True, True, False, False], [True, False, False, False]])
    out_padded = model(**inp, ref_mask=ref_mask).video
    # the same samples one at a time with only their real references
    for b, n_real in enumerate((2, 1)):
        single = {
            "x": inp["x"][b : b + 1],
            "t": inp["t"][b : b + 1],
            "text": inp["text"][b : b + 1],
            "text_mask": inp["text_mask"][b : b + 1],
            "ref_latents": inp["ref_latents"][b : b + 1, :n_real],
            "ref_clip": inp["ref_clip"][b : b + 1, :n_real],
        }
        torch.testing.assert_close(model(**single).video, out_padded[b : b + 1], atol=1e-4, rtol=1e-4)
    none_real = model(**inp, ref_mask=torch.zeros(2, 4, dtype=torch.bool)).video
    no_refs = model(**{**inp, "ref_latents": None, "ref_clip": None}).video
    torch.testing.assert_close(none_real, no_refs, atol=1e-4, rtol=1e-4)


def test_padded_text_is_ignored():
    model = tiny_model(perturb=0.05)
    inp = make_inputs(n=1)
    garbage = inp["text"].clone()
    garbage[~inp["text_mask"]] = 100.0
    torch.testing.assert_close(model(**inp).video, model(**{**inp, "text": garbage}).video)


def loop_reference(q_vid, k_vid, v_vid, q_ctx, k_ctx, v_ctx, ctx_mask, window_tokens, shift=0):
    """Figure 5 done literally, one sample and one window at a time: cut the video at 0, shift (if any),
    shift + W, shift + 2W, ..., Nv; build [window | references + text], drop the masked context keys,
    softmax attention in float64, keep the window's video rows, average the context rows."""
    B, Nv, nh, hd = q_vid.shape
    Nc = q_ctx.shape[1]
    out_vid = torch.zeros(B, Nv, nh * hd, dtype=torch.float64)
    out_ctx = torch.zeros(B, Nc, nh * hd, dtype=torch.float64)
    edges = [0, *range(shift or window_tokens, Nv, window_tokens), Nv]
    spans = list(zip(edges[:-1], edges[1:]))
    for b in range(B):
        keep = ctx_mask[b]
        for s, e in spans:
            q = torch.cat([q_vid[b, s:e], q_ctx[b]]).double()  # (S + Nc, nh, hd)
            k = torch.cat([k_vid[b, s:e], k_ctx[b, keep]]).double()
            v = torch.cat([v_vid[b, s:e], v_ctx[b, keep]]).double()
            att = torch.softmax(torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd), dim=-1)
            o = torch.einsum("hqk,khd->qhd", att, v).reshape(-1, nh * hd)
            out_vid[b, s:e] = o[: e - s]
            out_ctx[b] += o[e - s :] / len(spans)
    return out_vid, out_ctx


def random_qkv(Nv, B=2, nh=2, hd=8, Nc=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, N, nh, hd, generator=g) for N in (Nv, Nv, Nv, Nc, Nc, Nc)]


@pytest.mark.parametrize(
    "Nv,window_tokens,shift",
    [
        (37, 8, 0),  # uneven last window (5 tokens)
        (37, 8, 4),  # shifted: 4 | 8 8 8 8 | 1
        (32, 8, 0),  # windows tile exactly
        (32, 8, 4),  # shifted: 4 | 8 8 8 | 4
        (13, 8, 3),  # shifted: 3 | 8 | 2
        (10, 8, 4),  # shifted: 4 | 6 (no full window at all)
        (20, 0, 0),  # full attention
        (20, 64, 0),  # one window larger than the video
    ],
)
@pytest.mark.parametrize("padded_ctx", [False, True])
def test_windowed_attention_matches_per_window_loop(Nv, window_tokens, shift, padded_ctx):
    qkv = random_qkv(Nv)  # context: e.g. 2 refs x 3 tokens + 5 text tokens
    ctx_mask = torch.ones(2, 11, dtype=torch.bool)
    if padded_ctx:
        ctx_mask[0, 3:6] = False  # a padded reference
        ctx_mask[1, 9:] = False  # padded text
    out_vid, out_ctx = windowed_joint_attention(*qkv, ctx_mask, window_tokens, shift_tokens=shift)
    ref_vid, ref_ctx = loop_reference(*qkv, ctx_mask, window_tokens if window_tokens > 0 else Nv, shift)
    torch.testing.assert_close(out_vid.double(), ref_vid, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_ctx.double(), ref_ctx, atol=1e-5, rtol=1e-5)
    # context-only blocks: the same video rows without context queries
    vid_only, none = windowed_joint_attention(
        *qkv, ctx_mask, window_tokens, ctx_queries=False, shift_tokens=shift
    )
    assert none is None
    torch.testing.assert_close(vid_only.double(), ref_vid, atol=1e-5, rtol=1e-5)


def test_window_groups():
    assert window_groups(37, 8) == [(0, 8, 4), (32, 5, 1)]
    assert window_groups(37, 8, 4) == [(0, 4, 1), (4, 8, 4), (36, 1, 1)]
    assert window_groups(32, 8, 4) == [(0, 4, 1), (4, 8, 3), (28, 4, 1)]
    assert window_groups(32, 8) == [(0, 8, 4)]
    assert window_groups(10, 8, 4) == [(0, 4, 1), (4, 6, 1)]
    assert window_groups(20, 0) == window_groups(20, 20, 5) == window_groups(20, 64) == [(0, 20, 1)]
    for Nv, W, s in [(37, 8, 4), (101, 9, 4), (9, 2, 1)]:  # a partition of [0, Nv), in order
        spans = [(a + i * n, a + (i + 1) * n) for a, n, c in window_groups(Nv, W, s) for i in range(c)]
        assert spans[0][0] == 0 and spans[-1][1] == Nv and all(x[1] == y[0] for x, y in zip(spans, spans[1:]))
    with pytest.raises(ValueError, match="shift"):
        window_groups(37, 8, 8)


class SDPACalls(TorchFunctionMode):
    """Records the query length and mask of every scaled_dot_product_attention call (observes only)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.calls.append((args[0].shape[-2], kwargs.get("attn_mask")))
        return func(*args, **kwargs)


def test_no_window_is_padded_or_masked():
    """An uneven last window and the shifted grid's short first window run as their own calls at their
    true length: with all context real, no call has a mask and no query row is padding."""
    qkv = random_qkv(37, Nc=5)
    mask = torch.ones(2, 5, dtype=torch.bool)
    for shift, lengths in [(0, [8, 5]), (4, [4, 8, 1])]:
        with SDPACalls() as rec:
            windowed_joint_attention(*qkv, mask, 8, ctx_queries=False, shift_tokens=shift)
        assert [n for n, _ in rec.calls] == lengths
        assert all(m is None for _, m in rec.calls)


def test_shifted_grid_moves_window_ends_into_the_next_window():
    """Unshifted, the last token of window 0 cannot see window 1; shifted by half a window it shares a
    window with the start of window 1 and no longer sees the start of window 0."""
    B, Nv, Nc, W = 1, 24, 5, 8
    q, k, v, qc, kc, vc = random_qkv(Nv, B=B, Nc=Nc, seed=1)
    mask = torch.ones(B, Nc, dtype=torch.bool)

    def changed(shift, pos_changed):
        k2, v2 = k.clone(), v.clone()
        k2[:, pos_changed] += 1.0
        v2[:, pos_changed] += 1.0
        a, _ = windowed_joint_attention(q, k, v, qc, kc, vc, mask, W, shift_tokens=shift)
        b, _ = windowed_joint_attention(q, k2, v2, qc, kc, vc, mask, W, shift_tokens=shift)
        return (a - b).abs().amax(dim=(0, 2))  # (Nv,) how much each video token's output moved

    d = changed(0, W)  # the first token of window 1
    assert d[W - 1] == 0 and d[W : 2 * W].min() > 1e-3
    d = changed(W // 2, W)
    assert d[W - 1] > 1e-3  # window [4, 12) now holds tokens 7 and 8
    assert d[: W // 2].max() == 0 and d[3 * W // 2 :].max() == 0
    d = changed(W // 2, 0)  # token 0 sits in the short first window [0, 4)
    assert d[: W // 2].min() > 1e-3 and d[W // 2 :].max() == 0


def test_windows_are_local_and_context_is_shared():
    B, Nv, Nc, S = 1, 24, 5, 8
    q, k, v, qc, kc, vc = random_qkv(Nv, B=B, Nc=Nc, seed=1)
    mask = torch.ones(B, Nc, dtype=torch.bool)
    vid, ctx = windowed_joint_attention(q, k, v, qc, kc, vc, mask, S)
    k2, v2 = k.clone(), v.clone()
    k2[:, S : 2 * S] += 1.0  # change only window 1
    v2[:, S : 2 * S] += 1.0
    vid2, ctx2 = windowed_joint_attention(q, k2, v2, qc, kc, vc, mask, S)
    torch.testing.assert_close(vid2[:, :S], vid[:, :S])  # window 0 never sees window 1
    torch.testing.assert_close(vid2[:, 2 * S :], vid[:, 2 * S :])
    assert (vid2[:, S : 2 * S] - vid[:, S : 2 * S]).abs().max() > 1e-3
    assert (ctx2 - ctx).abs().max() > 1e-3  # the shared tokens see every window


def test_odd_blocks_use_the_shifted_grid():
    """The model shifts odd blocks by half a window (in whole frames), and only when there is more than
    one window; turning the shift off changes the output."""
    inp = make_inputs(n=2, T=5)
    model = tiny_model(perturb=0.05, window_size=2)  # 8x8 latents, patch 2: 16 tokens per frame
    assert model.window_tokens(5, 4, 4) == 32 and model.window_shift(5, 4, 4) == 16
    assert tiny_model(window_size=5).window_shift(5, 4, 4) == 0  # one window: nothing to shift into
    assert tiny_model(window_size=5, window_unit="tokens").window_shift(5, 4, 4) == 2
    assert tiny_model(window_size=2, shift_windows=False).window_shift(5, 4, 4) == 0
    with SDPACalls() as rec:
        shifted = model(**inp).video
    # query lengths: block 0 has windows of 2, 2 | 1 frames, block 1 of 1 | 2, 2 frames; each window also
    # holds the 40 context rows (2 references x 16 tokens, 6 text tokens, 2 CLIP tokens)
    assert [n for n, _ in rec.calls] == [32 + 40, 16 + 40, 16 + 40, 32 + 40]
    plain = tiny_model(perturb=0.05, window_size=2, shift_windows=False)(**inp).video
    assert (shifted - plain).abs().max() > 1e-4


def test_single_window_equals_full_attention_and_windows_matter():
    inp = make_inputs(n=2, T=4)
    full = tiny_model(perturb=0.05, window_size=0)(**inp).video
    one_window = tiny_model(perturb=0.05, window_size=4)(**inp).video  # 4 frames = the whole video
    by_tokens = tiny_model(perturb=0.05, window_size=4 * 16, window_unit="tokens")(**inp).video
    windowed = tiny_model(perturb=0.05, window_size=1)(**inp).video
    torch.testing.assert_close(one_window, full)
    torch.testing.assert_close(by_tokens, full)
    assert (windowed - full).abs().max() > 1e-4


def test_deterministic_under_seed():
    inp = make_inputs(n=3)
    a = tiny_model(seed=3, perturb=0.05)(**inp).video
    b = tiny_model(seed=3, perturb=0.05)(**inp).video
    c = tiny_model(seed=4, perturb=0.05)(**inp).video
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_grad_checkpoint_gives_the_same_gradients_and_saves_less():
    """Same gradients with and without checkpointing, and the blocks' activations are not kept for
    backward (counted with a saved-tensor hook: checkpointed regions save through their own hooks)."""
    inp = make_inputs(n=2, T=3)
    grads, saved = [], []
    for ckpt in (False, True):
        model = tiny_model(perturb=0.05, window_size=1, grad_checkpoint=ckpt).train()
        nbytes = []

        def pack(t, nbytes=nbytes):
            nbytes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(**inp).video.square().mean()
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        saved.append(sum(nbytes))
    assert grads[0].numel() == sum(p.numel() for p in model.parameters() if p.requires_grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)
    print("saved bytes without, with checkpointing:", saved)
    assert saved[1] < 0.5 * saved[0], saved


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ValueError, match="unknown MMDiTConfig keys"):
        mmdit_config("tiny", hiden=32)
    with pytest.raises(ValueError, match="unknown MMDiT preset"):
        mmdit_config("huge")
    with pytest.raises(ValueError, match="window_unit"):
        MMDiTConfig(window_unit="seconds")
    with pytest.raises(ValueError, match="divisible"):
        MMDiTConfig(hidden=65, num_heads=4)
    with pytest.raises(ValueError):
        tiny_model()(**{**make_inputs(n=0), "x": torch.randn(1, C, 2, 7, 8)})


def test_presets():
    tiny = MMDIT_CONFIGS["tiny"]
    assert (tiny.hidden, tiny.depth, tiny.num_heads, tiny.head_dim) == (64, 2, 4, 16)
    with torch.device("meta"):  # parameter count without allocating 1B weights
        sizes = {name: count_params(MMDiT(cfg)) for name, cfg in MMDIT_CONFIGS.items()}
    assert sizes["tiny"] < sizes["S"] < sizes["B"] < sizes["1B"]
    assert 0.8e9 < sizes["1B"] < 1.5e9
    assert MMDIT_CONFIGS["1B"].grad_checkpoint and not tiny.grad_checkpoint


@pytest.mark.gpu
def test_bf16_autocast_on_cuda_matches_fp32():
    model = tiny_model(perturb=0.05).cuda()
    inp = {k: v.cuda() if v is not None else None for k, v in make_inputs(n=2).items()}
    ref = model(**inp).video
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(**inp).video
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=5e-2)
