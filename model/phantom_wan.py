"""Phantom-Wan: the Wan2.1 DiT (diffusers WanTransformer3DModel) with Phantom's reference conditioning.

What the released inference does (svjack/Phantom, phantom_wan/subject2video.py and generate.py), and where
it is mirrored here:
  * each reference image is letterboxed with white to the video size (generate.load_ref_images), scaled
    to [-1, 1] and VAE-encoded on its own as a one-frame video: (C, 1, h, w) per reference
    (Phantom_Wan_S2V.get_vae_latents); the references are concatenated along the *frame* axis after the
    video latents: target_shape frames = (F - 1) / 4 + 1 + n_refs.  -> PhantomWan.forward
  * at every denoising step the last n frames are overwritten with the clean reference latents before the
    transformer runs, so the references are never noised; the whole sequence gets the same timestep; the
    reference frames are cut off the result (x0[:, :-n]).  -> PhantomWan.forward (append clean refs,
    return only the video frames, so model.flow.rf_loss never sees the reference frames)
  * guidance with two weights: noise_pred = neg + w_img * (pos_i - neg) + w_txt * (pos_it - pos_i), where
    pos_it = (text, refs), pos_i = (negative prompt, refs), neg = (negative prompt, refs replaced by zeros
    of the same shape: ref_latents_neg = zeros_like); the negative prompt is encoded by UMT5, by default
    the config's sample_neg_prompt (training.config.WAN_NEGATIVE_PROMPT).  -> guided_sample(null_text=...)
  * the schedule (FlowUniPCMultistepScheduler built with shift=1, then set_timesteps(steps, shift=5.0)):
    sigmas = linspace(0.999, 0, steps + 1)[:-1] shifted by sigma' = shift * sigma / (1 + (shift - 1) * sigma),
    then 0 appended; the model is fed the integer timesteps int(1000 * sigma') (999, 995, ..., 92 for 50
    steps at shift 5), the UniPC solver (order 2, bh2, predictor-corrector) steps on the sigmas.
    -> release_schedule; guided_sample runs UniPC (the default and the release's only solver: diffusers'
    UniPCMultistepScheduler given these sigmas, the same update) or Euler on the same grid.
  * noise is drawn for the whole (C, T + n, h, w) latent and the reference part overwritten.  -> release_noise
Training draws t uniformly and shifts it the same way (WAN_LOSS_ARGS, the arguments of model.flow.rf_loss).
The text goes through UMT5 (Wan's T5 encoder): the per-token states of the real tokens, zero-padded to
text_len (512 in Wan), which the DiT attends to without a mask, as WanModel does.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.flow import Conditioning, draw_condition_dropout, draw_random
from model.sp import SeqParallel, gather_seq, heads_to_seq, seq_to_heads, split_seq

# diffusers WanTransformer3DModel configs of the released Wan2.1 T2V models (Wan2.1 config files).
WAN_PRESETS: dict[str, dict] = {
    # dim 1536, 12 heads, 30 layers, ffn 8960 (Wan2.1-T2V-1.3B; Phantom-Wan-1.3B continues from it)
    "1.3B": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30),
    # dim 5120, 40 heads, 40 layers, ffn 13824 (Wan2.1-T2V-14B)
    "14B": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40),
    # the same classes at toy width, for tests and CPU runs
    "tiny": dict(num_attention_heads=2, attention_head_dim=12, ffn_dim=48, num_layers=2, freq_dim=32),
}
_WAN_COMMON = dict(
    patch_size=(1, 2, 2),
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
)
NUM_TRAIN_TIMESTEPS = 1000  # Wan's timestep embedding takes t in [0, 1000]


def wan_transformer_config(preset: str, **overrides) -> dict:
    """The diffusers WanTransformer3DModel kwargs of a preset, with overrides (unknown preset raises)."""
    if preset not in WAN_PRESETS:
        raise ValueError(f"unknown phantom_wan preset {preset!r}; allowed: {sorted(WAN_PRESETS)}")
    cfg = {**_WAN_COMMON, **WAN_PRESETS[preset], **overrides}  # later wins: overrides may resize a preset
    cfg["patch_size"] = tuple(cfg["patch_size"])
    return cfg


def build_wan_transformer(preset: str, **overrides):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(**wan_transformer_config(preset, **overrides))


class WanOutput(NamedTuple):
    video: torch.Tensor  # (B, C, T, h, w) predicted velocity of the video latents only
    ref: torch.Tensor | None = None  # never returned: the reference frames are cut off


class PhantomWan(nn.Module):
    """Wraps a WanTransformer3DModel with the MMDiT call signature, so loop, loss and samplers see one API.

    ref_mask marks which reference *slots* are real (batches pad to the largest reference count); a dropped
    reference stays a real slot whose latent is all zeros, exactly like the release's negative branch. Samples
    with different reference counts run as separate groups: the Wan DiT has no attention mask, and a padded
    zero frame would change a sample's sequence.
    """

    def __init__(self, transformer: nn.Module, text_len: int = 512) -> None:
        super().__init__()
        self.transformer = transformer
        self.text_len = text_len
        # Under FSDP every rank must run the transformer the same number of times per step (each run
        # all-gathers every block), whatever reference counts its batch holds: then one run per sample.
        self.one_call_per_sample = False
        self.sp: SeqParallel | None = None

    def set_sequence_parallel(self, sp: SeqParallel | None) -> None:
        """Split every forward's tokens over sp's ranks: each block holds 1/P of the (T + n) * h * w tokens,
        self-attention runs Ulysses (UlyssesWanAttnProcessor); None = one rank, diffusers' own processor.
        All ranks of the group must call forward with the same inputs."""
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor

        if sp is not None:
            sp.heads(int(self.transformer.config.num_attention_heads))  # P > heads raises here
        for block in self.transformer.blocks:
            block.attn1.set_processor(WanAttnProcessor() if sp is None else UlyssesWanAttnProcessor(sp))
        self.sp = sp

    @property
    def in_channels(self) -> int:
        return int(self.transformer.config.in_channels)

    def shard_units(self) -> list[nn.Module]:
        """The blocks FSDP2 shards one by one (each also an activation-checkpointing unit)."""
        return list(self.transformer.blocks)

    def pad_text(self, text: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> (B, text_len, D): real-token states then zeros, as WanModel pads its context."""
        B, L, D = text.shape
        if L >= self.text_len:
            return text[:, : self.text_len]
        return torch.cat([text, text.new_zeros(B, self.text_len - L, D)], dim=1)

    def forward(
        self, x, t, text, text_mask=None, ref_latents=None, ref_clip=None, ref_mask=None, timestep=None
    ) -> WanOutput:
        """x: (B, C, T, h, w) noisy video latents; t: (B,) in [0, 1] (1 = noise); text: (B, L, D) with padded
        positions zero; ref_latents: (B, n, C, h, w) clean; ref_mask: (B, n) real slots (packed first).
        timestep: (B,) what Wan's time embedding sees, default 1000 * t; the sampler passes the release's
        integer timesteps (int64, so no mixed-precision cast rounds them).
        ref_clip is not used: Wan2.1-T2V has no image-embedding branch and Phantom-Wan adds none."""
        B, C, T = x.shape[:3]
        # The compute dtype: under FSDP2 mixed precision the root's weights are unsharded in bf16 here.
        dtype = self.transformer.patch_embedding.weight.dtype
        context = self.pad_text(text).to(dtype)
        # Kept in fp32 (or int64): the sinusoidal embedding upcasts anyway, and bf16 would round 999 to 1000.
        timestep = t.float() * NUM_TRAIN_TIMESTEPS if timestep is None else timestep.to(x.device)
        if ref_latents is None or ref_latents.shape[1] == 0:
            counts = torch.zeros(B, dtype=torch.long)
        elif ref_mask is None:
            counts = torch.full((B,), ref_latents.shape[1], dtype=torch.long)
        else:
            counts = ref_mask.bool().sum(1).cpu()
        out = None
        if self.one_call_per_sample:
            groups = [(int(counts[i]), torch.tensor([i], device=x.device)) for i in range(B)]
        else:
            groups = [
                (n, (counts == n).nonzero().flatten().to(x.device)) for n in sorted(set(counts.tolist()))
            ]
        for n, idx in groups:
            hidden = x[idx]
            if n:
                refs = (
                    ref_latents[idx, :n].transpose(1, 2).to(hidden.dtype)
                )  # (b, n, C, h, w) -> (b, C, n, h, w)
                hidden = torch.cat([hidden, refs], dim=2)  # (b, C, T + n, h, w): refs after the video frames
            if self.sp is None:
                pred = self.transformer(
                    hidden.to(dtype),
                    timestep=timestep[idx],
                    encoder_hidden_states=context[idx],
                    return_dict=False,
                )[0]
            else:
                pred = self.sp_transformer(hidden.to(dtype), timestep[idx], context[idx])
            pred = pred[:, :, :T]  # the reference frames never leave the model
            if out is None:
                out = pred.new_zeros(B, *pred.shape[1:])
            out[idx] = pred
        return WanOutput(video=out)

    def sp_transformer(self, hidden: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor):
        """WanTransformer3DModel.forward (Wan2.1 path), this rank's share of the tokens through the blocks.

        hidden: (B, C, F, H, W) the same on every rank of the group -> (B, C_out, F, H, W) on every rank.
        """
        tr, sp = self.transformer, self.sp
        B, C, Fr, H, W = hidden.shape
        pt, ph, pw = tr.config.patch_size
        f, h, w = Fr // pt, H // ph, W // pw
        n = f * h * w
        cos, sin = tr.rope(hidden)  # (1, n, 1, hd) each
        rope = ShardedRope(split_seq(cos, sp), split_seq(sin, sp), n)
        # The Conv3d patch embedding (stride = kernel) is one linear map per patch: embed only this rank's.
        patches = hidden.reshape(B, C, f, pt, h, ph, w, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
        patches = split_seq(patches.reshape(B, n, C * pt * ph * pw), sp)  # (B, k, C*pt*ph*pw)
        conv = tr.patch_embedding
        x = torch.nn.functional.linear(patches, conv.weight.flatten(1), conv.bias)  # (B, k, D)
        temb, timestep_proj, context, _ = tr.condition_embedder(timestep, context, None)
        timestep_proj = timestep_proj.unflatten(1, (6, -1))  # (B, 6, D)
        for block in tr.blocks:
            if torch.is_grad_enabled() and tr.gradient_checkpointing:
                x = checkpoint(block, x, context, timestep_proj, rope, use_reentrant=False)
            else:
                x = block(x, context, timestep_proj, rope)
        shift, scale = (tr.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
        x = (tr.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
        x = gather_seq(tr.proj_out(x), sp, n)  # (B, n, pt*ph*pw*C_out): every rank computes the same loss
        x = x.reshape(B, f, h, w, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)


class ShardedRope(NamedTuple):
    """What the blocks pass to self-attention under SP: this rank's rotary tables and the true length."""

    cos: torch.Tensor  # (1, k, 1, hd), k = ceil(n / P)
    sin: torch.Tensor
    n_tokens: int  # n: the gathered sequence is cut back to it (the last shard's padding)


class UlyssesWanAttnProcessor:
    """diffusers WanAttnProcessor's self-attention (Wan2.1: no image branch) with the Ulysses all-to-all:
    projections, qk-norm and RoPE on this rank's tokens, attention over all tokens for this rank's heads."""

    def __init__(self, sp: SeqParallel) -> None:
        self.sp = sp

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None or attention_mask is not None or attn.add_k_proj is not None:
            raise ValueError("UlyssesWanAttnProcessor is for the unmasked self-attention (attn1) only")
        if not isinstance(rotary_emb, ShardedRope):
            raise ValueError("sequence parallel attention runs inside PhantomWan.sp_transformer only")
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))  # (B, k, nh, hd)
        k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        q, k = _wan_rope(q, rotary_emb.cos, rotary_emb.sin), _wan_rope(k, rotary_emb.cos, rotary_emb.sin)
        n, sp = rotary_emb.n_tokens, self.sp
        q, k, v = (seq_to_heads(a, sp)[:, :n].transpose(1, 2) for a in (q, k, v))  # (B, nh_r, n, hd)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)  # (B, n, nh_r, hd)
        out = torch.nn.functional.pad(out, (0, 0, 0, 0, 0, sp.size * hidden_states.shape[1] - n))
        out = heads_to_seq(out, sp, attn.heads).flatten(2).type_as(hidden_states)  # (B, k, D)
        return attn.to_out[1](attn.to_out[0](out))


def _wan_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # diffusers WanAttnProcessor's rotation of interleaved pairs; x: (B, k, nh, hd), cos/sin: (1, k, 1, hd)
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x1 * s + x2 * c
    return out.type_as(x)


# ----------------------------------------------------------------------------- flow matching

# model.flow.rf_loss arguments for Phantom-Wan: t uniform in (0, 1), then shifted by 5.0 as Wan trains.
WAN_LOSS_ARGS: dict = {"t_mode": "uniform", "shift": 5.0}


def drop_refs_keep_slots(cond: Conditioning, which: torch.Tensor) -> Conditioning:
    """Zero the references of the samples in `which` ((B,) bool) but keep their slots (ref_latents_neg)."""
    keep = (~which.bool()).to(cond.text.device)

    def z(a):
        return None if a is None else a * keep.view(-1, *([1] * (a.dim() - 1))).to(a.dtype)

    return replace(cond, ref_latents=z(cond.ref_latents), ref_clip=z(cond.ref_clip))


def condition_dropout(
    cond: Conditioning,
    p_text: float = 0.1,
    p_image: float = 0.1,
    p_both: float = 0.0,
    generator: torch.Generator | None = None,
) -> Conditioning:
    """Joint dropout state per sample (none / text / image / both), so each guidance branch is trained.

    The state is drawn by model.flow.draw_condition_dropout (P(text only) = p_text, P(image only) = p_image,
    P(both) = p_both). Text dropped: zero states (the null context the sampler uses); image dropped:
    reference latents zeroed with their slots kept (the release's negative branch), not removed as
    model.flow.apply_condition_state does for the MMDiT.
    """
    state = draw_condition_dropout(
        cond.batch_size, p_text, p_image, p_both, generator, device=cond.text.device
    )
    drop_t = (state == 1) | (state == 3)
    drop_i = (state == 2) | (state == 3)
    return drop_refs_keep_slots(cond.drop_text(drop_t), drop_i)


class Schedule(NamedTuple):
    sigmas: torch.Tensor  # (steps + 1,) float64, from about 1 down to exactly 0 (the release holds float32)
    timesteps: torch.Tensor  # (steps,) int64: what the model is fed at each step


def release_schedule(
    steps: int, shift: float = 5.0, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
) -> Schedule:
    """The released sampler's grid: FlowUniPCMultistepScheduler(shift=1).set_timesteps(steps, shift=shift).

    sigma_k = shift * s_k / (1 + (shift - 1) * s_k) with s_k = s_max * (1 - k / steps), k < steps, where
    s_max = 1 - 1 / num_train_timesteps in float32 (the top of the scheduler's training grid); then 0.
    timestep_k = int(num_train_timesteps * sigma_k), truncated. Computed in float64 exactly as numpy's
    linspace does, so the integer timesteps match the release's bit for bit.
    """
    if steps < 1:
        raise ValueError(f"steps={steps}: at least one sampling step")
    top = torch.tensor(1.0 - 1.0 / num_train_timesteps, dtype=torch.float32).item()
    s = torch.arange(steps, dtype=torch.float64) * (-top / steps) + top  # linspace(top, 0, steps + 1)[:-1]
    s = shift * s / (1 + (shift - 1) * s)
    timesteps = (s * num_train_timesteps).to(torch.int64)
    return Schedule(torch.cat([s, s.new_zeros(1)]), timesteps)


def release_noise(shape: tuple[int, ...], n_refs: list[int], generator=None, device=None) -> torch.Tensor:
    """(B, C, T, h, w) starting noise drawn as the release draws it: randn(C, T + n, h, w) per sample (the
    reference frames' share is overwritten by the clean references), so a seed gives the release's noise."""
    B, C, T, h, w = shape
    draws = [draw_random(torch.randn, (C, T + n, h, w), generator, device)[:, :T] for n in n_refs[:B]]
    return torch.stack(draws)


@torch.no_grad()
def guided_sample(
    model,
    cond: Conditioning,
    shape: tuple[int, ...],
    steps: int = 50,
    w_img: float = 5.0,
    w_txt: float = 7.5,
    shift: float = 5.0,
    generator: torch.Generator | None = None,
    null_text: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    solver: str = "unipc",
) -> torch.Tensor:
    """Sample (B, C, T, h, w) video latents with Phantom's two-weight guidance on the release's schedule.

    solver: "unipc" (default; the release's multistep UniPC flow solver, here diffusers'
    UniPCMultistepScheduler fed release_schedule's sigmas and timesteps, the same update) or "euler"
    (x += (sigma_next - sigma) * v on the same grid). The model is fed the integer timesteps.
    null_text: (B or 1, L, D) UMT5 states of the negative prompt (zero past its real tokens), the release's
    null text; None = the all-zero context that text dropout trains.
    noise: the starting (B, C, T, h, w) noise; else drawn from `generator` as the release draws it.
    """
    if solver not in ("unipc", "euler"):
        raise ValueError(f"solver={solver!r}; allowed: 'unipc', 'euler'")
    dev = cond.text.device
    B = shape[0]
    if noise is None:  # reference frames per sample, counted as PhantomWan.forward counts them
        n_refs = [0] * B if cond.ref_latents is None else cond.full_ref_mask().sum(1).tolist()
        noise = release_noise(shape, n_refs, generator, dev)
    x = noise.float()
    if null_text is None:
        null = cond.drop_text()
    else:
        null_text = null_text.to(cond.text).expand(B, -1, -1)
        mask = torch.ones(null_text.shape[:2], dtype=torch.bool, device=dev)
        null = replace(cond, text=null_text, text_mask=mask)
    neg = drop_refs_keep_slots(null, torch.ones(B, dtype=torch.bool, device=dev))
    length = max(c.text.shape[1] for c in (cond, null, neg))
    cond3 = Conditioning.cat([_pad_text_to(c, length) for c in (neg, null, cond)])  # neg, pos_i, pos_it
    schedule = release_schedule(steps, shift)
    sigmas, timesteps = schedule.sigmas.float(), schedule.timesteps

    def velocity(x, i):  # the guided flow at step i: all three branches in one batch of 3B
        s, ts = sigmas[i].to(dev).expand(3 * B), timesteps[i].to(dev).expand(3 * B)
        v3 = model(torch.cat([x] * 3, 0), s, timestep=ts, **cond3.as_kwargs()).video.float()
        v_neg, v_i, v_it = v3.chunk(3, dim=0)
        return v_neg + w_img * (v_i - v_neg) + w_txt * (v_it - v_i)

    if solver == "euler":
        for i in range(steps):
            x = x + (sigmas[i + 1] - sigmas[i]).to(dev) * velocity(x, i)  # d sigma < 0: towards data
        return x
    from diffusers import UniPCMultistepScheduler

    # flow_shift=1: the sigmas passed in are already shifted (set_timesteps applies flow_shift to them).
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        flow_shift=1.0,
    )  # fmt: skip
    scheduler.set_timesteps(sigmas=schedule.sigmas[:-1].numpy(), device=dev)
    if not torch.equal(scheduler.timesteps.cpu(), timesteps):  # a diffusers that moves the grid
        raise RuntimeError(f"UniPC timesteps {scheduler.timesteps.tolist()} != {timesteps.tolist()}")
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(velocity(x, i), t, x, return_dict=False)[0]
    return x


def _pad_text_to(c: Conditioning, length: int) -> Conditioning:
    L = c.text.shape[1]
    if L == length:
        return c
    B, _, D = c.text.shape
    return replace(
        c,
        text=torch.cat([c.text, c.text.new_zeros(B, length - L, D)], 1),
        text_mask=torch.cat([c.text_mask.bool(), c.text_mask.new_zeros(B, length - L, dtype=torch.bool)], 1),
    )


# ----------------------------------------------------------------------------- key layouts

# Original Wan layout (WanModel in Wan2.1 / Phantom-Wan .pth) <-> diffusers WanTransformer3DModel.
# Tensors are identical (same Conv3d patch embedding, same (p_t, p_h, p_w, c) output order); only names
# differ. Two things are not one-to-one renames: the original's affine cross-attention norm is `norm3`
# (diffusers `norm2`), and the per-block modulation is `modulation` (diffusers `scale_shift_table`).
_TOP = [
    ("patch_embedding.", "patch_embedding."),
    ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("time_projection.1.", "condition_embedder.time_proj."),
    ("head.head.", "proj_out."),
    ("head.modulation", "scale_shift_table"),
    # I2V / image-conditioned variants (CLIP image embedding MLP)
    ("img_emb.proj.0.", "condition_embedder.image_embedder.norm1."),
    ("img_emb.proj.1.", "condition_embedder.image_embedder.ff.net.0.proj."),
    ("img_emb.proj.3.", "condition_embedder.image_embedder.ff.net.2."),
    ("img_emb.proj.4.", "condition_embedder.image_embedder.norm2."),
]
_BLOCK = [
    ("modulation", "scale_shift_table"),
    ("norm3.", "norm2."),
    ("ffn.0.", "ffn.net.0.proj."),
    ("ffn.2.", "ffn.net.2."),
    ("cross_attn.k_img.", "attn2.add_k_proj."),
    ("cross_attn.v_img.", "attn2.add_v_proj."),
    ("cross_attn.norm_k_img.", "attn2.norm_added_k."),
]
for _orig, _diff in (("self_attn", "attn1"), ("cross_attn", "attn2")):
    _BLOCK += [
        (f"{_orig}.q.", f"{_diff}.to_q."),
        (f"{_orig}.k.", f"{_diff}.to_k."),
        (f"{_orig}.v.", f"{_diff}.to_v."),
        (f"{_orig}.o.", f"{_diff}.to_out.0."),
        (f"{_orig}.norm_q.", f"{_diff}.norm_q."),
        (f"{_orig}.norm_k.", f"{_diff}.norm_k."),
    ]
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
_PREFIXES = ("model.diffusion_model.", "module.", "_orig_mod.")


def _rename(key: str, table_top, table_block, side: int) -> str:
    other = 1 - side
    m = _BLOCK_RE.match(key)
    if m:
        idx, rest = m.groups()
        for pair in table_block:
            src = pair[side]
            if rest == src or (src.endswith(".") and rest.startswith(src)):
                return f"blocks.{idx}.{pair[other]}{rest[len(src) :]}"
    else:
        for pair in table_top:
            src = pair[side]
            if key == src or (src.endswith(".") and key.startswith(src)):
                return pair[other] + key[len(src) :]
    raise KeyError(key)


def _convert(state: dict[str, torch.Tensor], side: int, what: str) -> dict[str, torch.Tensor]:
    out, unknown = {}, []
    for key, value in state.items():
        k = key
        for prefix in _PREFIXES:
            if k.startswith(prefix):
                k = k[len(prefix) :]
        if k in ("freqs",) or k.startswith("rope."):  # rope tables: buffers, rebuilt by each model
            continue
        try:
            new = _rename(k, _TOP, _BLOCK, side)
        except KeyError:
            unknown.append(key)
            continue
        if new in out:
            raise ValueError(f"{what}: two keys map to {new}")
        out[new] = value
    if unknown:
        raise ValueError(f"{what}: {len(unknown)} keys of no known Wan layout, e.g. {unknown[:5]}")
    return out


def original_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original Wan/Phantom-Wan state dict -> diffusers WanTransformer3DModel keys (unknown keys raise)."""
    return _convert(state, 0, "original -> diffusers")


def diffusers_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers WanTransformer3DModel state dict -> original Wan keys (what Phantom-Wan-1.3B.pth holds)."""
    return _convert(state, 1, "diffusers -> original")


def detect_layout(keys) -> str:
    """'original' or 'diffusers' from a state dict's keys."""
    keys = list(keys)
    stripped = [k.split("model.diffusion_model.", 1)[-1] for k in keys]
    if any(".self_attn." in k or k.startswith("head.head") for k in stripped):
        return "original"
    if any(".attn1." in k or k.startswith("proj_out") for k in stripped):
        return "diffusers"
    raise ValueError(f"not a Wan transformer state dict (keys like {keys[:3]})")
