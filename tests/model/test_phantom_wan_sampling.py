"""Phantom-Wan sampling against the released inference's formulas (svjack/Phantom subject2video.py and its
FlowUniPCMultistepScheduler), re-implemented here the plain way: one model call per guidance branch on the
(C, T + n, h, w) latent with the references written into its tail, integer timesteps, the release's grid."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model.flow import Conditioning
from model.phantom_wan import (
    PhantomWan,
    build_wan_transformer,
    guided_sample,
    release_noise,
    release_schedule,
)

C, TEXT_DIM, TEXT_LEN = 4, 32, 16
T, N_REFS, H, W = 2, 2, 4, 4
W_IMG, W_TXT = 5.0, 7.5


def test_release_schedule_is_the_shifted_grid():
    """sigma_k = shift * s_k / (1 + (shift - 1) * s_k) with s_k = 0.999 (1 - k / N), then 0;
    timestep_k = int(1000 * sigma_k)."""
    sigmas, timesteps = release_schedule(50, 5.0)
    s = 0.999 * (1 - np.arange(50) / 50)
    formula = 5 * s / (1 + 4 * s)
    np.testing.assert_allclose(sigmas[:-1].numpy(), formula, rtol=1e-7)
    assert sigmas[-1] == 0 and sigmas.shape == (51,) and timesteps.dtype == torch.int64
    assert timesteps.tolist()[:6] == [999, 995, 991, 987, 982, 978] and timesteps.tolist()[-3:] == [
        241,
        172,
        92,
    ]
    assert release_schedule(10, 5.0).timesteps.tolist() == [999, 978, 952, 920, 882, 833, 768, 681, 555, 356]
    assert release_schedule(4, 1.0).timesteps.tolist() == [999, 749, 499, 249]  # unshifted: 0.999 * (1 - k/4)


@pytest.mark.parametrize("steps,shift", [(50, 5.0), (40, 3.0), (7, 8.0), (1000, 5.0)])
def test_release_schedule_matches_the_release_bit_for_bit(steps, shift):
    """The release's own arithmetic (numpy float64, float32 sigma_max, int64 truncation), step by step."""
    alphas = np.linspace(1, 1 / 1000, 1000)[::-1].copy()
    train_sigmas = torch.from_numpy(1.0 - alphas).to(torch.float32)  # FlowUniPC __init__, shift=1
    s = np.linspace(train_sigmas[0].item(), train_sigmas[-1].item(), steps + 1).copy()[:-1]
    s = shift * s / (1 + (shift - 1) * s)
    want_t = torch.from_numpy(s * 1000).to(dtype=torch.int64)
    want_sigmas = torch.from_numpy(np.concatenate([s, [0]]).astype(np.float32))
    got = release_schedule(steps, shift)
    assert torch.equal(got.timesteps, want_t)
    assert torch.equal(got.sigmas.float(), want_sigmas)


def test_release_noise_is_drawn_with_the_reference_frames():
    g = torch.Generator().manual_seed(7)
    want = torch.randn(C, T + 3, H, W, generator=torch.Generator().manual_seed(7))[:, :T]
    got = release_noise((1, C, T, H, W), [3], g)
    assert torch.equal(got[0], want)


def _setup(seed=0):
    torch.manual_seed(seed)
    transformer = build_wan_transformer("tiny", in_channels=C, out_channels=C, text_dim=TEXT_DIM).eval()
    g = torch.Generator().manual_seed(seed + 1)
    cond = Conditioning(
        text=torch.randn(1, 5, TEXT_DIM, generator=g),
        text_mask=torch.ones(1, 5, dtype=torch.bool),
        ref_latents=torch.randn(1, N_REFS, C, H, W, generator=g),
        ref_clip=None,
        ref_mask=torch.ones(1, N_REFS, dtype=torch.bool),
    )
    null_text = torch.randn(1, 7, TEXT_DIM, generator=g)  # the encoded negative prompt's real tokens
    return transformer, cond, null_text


def _pad(context):  # WanModel: the real-token states, zero-padded to text_len
    return torch.cat([context, context.new_zeros(1, TEXT_LEN - context.shape[1], TEXT_DIM)], 1)


def _lam(s: float) -> float:  # log-SNR of the flow path x = (1 - s) x0 + s eps
    return math.log(1 - s) - math.log(s) if s > 0 else math.inf


@torch.no_grad()
def _release_sample(transformer, cond, null_text, steps, seed, solver, integer_t=True):
    """subject2video.Phantom_Wan_S2V.generate, batch of one, with a tiny diffusers transformer as WanModel."""
    sigmas, timesteps = release_schedule(steps, 5.0)
    sigmas = sigmas.float().double().tolist()  # the scheduler holds float32 sigmas
    ref = cond.ref_latents[0].transpose(0, 1)  # (C, n, h, w): the references along frames
    ref_neg = torch.zeros_like(ref)
    context, context_null = _pad(cond.text), _pad(null_text)
    latent = torch.randn(C, T + N_REFS, H, W, generator=torch.Generator().manual_seed(seed))

    def model(lat, r, ctx, i):
        t = timesteps[i : i + 1] if integer_t else torch.tensor([1000 * sigmas[i]])
        x = torch.cat([lat[:, :-N_REFS], r], dim=1)[None]
        return transformer(x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0][0]

    def noise_pred(lat, i):
        pos_it, pos_i = model(lat, ref, context, i), model(lat, ref, context_null, i)
        neg = model(lat, ref_neg, context_null, i)
        return neg + W_IMG * (pos_i - neg) + W_TXT * (pos_it - pos_i)

    if solver == "euler":
        for i in range(steps):
            latent = latent + (sigmas[i + 1] - sigmas[i]) * noise_pred(latent, i)
        return latent[:, :-N_REFS][None]

    # FlowUniPCMultistepScheduler.step: data prediction (predict_x0), solver_order 2, bh2, UniC corrector,
    # first step order 1 (warm-up), last step order 1 (lower_order_final).
    ms, last, last_order = [], None, None
    for i in range(steps):
        m = latent - sigmas[i] * noise_pred(latent, i)  # x0 prediction of the flow output
        if i > 0:  # UniC: correct x_i with the new prediction, at the previous step's order
            s0, t = sigmas[i - 1], sigmas[i]
            h = _lam(t) - _lam(s0)
            hh = -h
            h_phi_1 = math.expm1(hh)
            b_h = h_phi_1
            x_ = t / s0 * last - (1 - t) * h_phi_1 * ms[-1]
            if last_order == 1:
                corr = 0.5 * (m - ms[-1])
            else:
                rk = (_lam(sigmas[i - 2]) - _lam(s0)) / h
                h_phi_k = h_phi_1 / hh - 1
                b = [h_phi_k / b_h, (h_phi_k / hh - 0.5) * 2 / b_h]
                rho = np.linalg.solve(np.array([[1.0, 1.0], [rk, 1.0]]), np.array(b))
                corr = rho[0] * (ms[-2] - ms[-1]) / rk + rho[1] * (m - ms[-1])
            latent = x_ - (1 - t) * b_h * corr
        ms.append(m)
        order = min(2, steps - i, i + 1)
        last, last_order = latent, order
        s0, t = sigmas[i], sigmas[i + 1]
        h = _lam(t) - _lam(s0)
        h_phi_1 = math.expm1(-h)
        latent = t / s0 * latent - (1 - t) * h_phi_1 * ms[-1]  # UniP, order 1
        if order == 2:
            rk = (_lam(sigmas[i - 1]) - _lam(s0)) / h
            latent = latent - (1 - t) * h_phi_1 * 0.5 * (ms[-2] - ms[-1]) / rk
    return latent[:, :-N_REFS][None]


@pytest.mark.parametrize("solver,steps", [("euler", 4), ("unipc", 5)])
def test_guided_sample_reproduces_the_release_loop(solver, steps):
    """Same seed, weights and negative-prompt states: the sampled latents equal the release's to rounding,
    and feeding 1000 * sigma instead of the integer timesteps, or an all-zero null text, does not."""
    transformer, cond, null_text = _setup()
    model = PhantomWan(transformer, text_len=TEXT_LEN).eval()
    g = torch.Generator().manual_seed(3)
    got = guided_sample(model, cond, (1, C, T, H, W), steps=steps, w_img=W_IMG, w_txt=W_TXT,
                        generator=g, null_text=null_text, solver=solver)  # fmt: skip
    want = _release_sample(transformer, cond, null_text, steps, 3, solver)
    assert got.abs().max() > 0.1  # a real sample, not a vanishing field
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    float_t = _release_sample(transformer, cond, null_text, steps, 3, solver, integer_t=False)
    assert (float_t - want).abs().max() > 1e-2
    zero_null = guided_sample(model, cond, (1, C, T, H, W), steps=steps, w_img=W_IMG, w_txt=W_TXT,
                              generator=torch.Generator().manual_seed(3), solver=solver)  # fmt: skip
    assert (zero_null - want).abs().max() > 1e-2
