"""Rectified-flow math for Phantom: noising, timesteps, video-only loss, condition dropout, dual-CFG Euler."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

# Convention (paper §3.3): x_t = (1 - t) * x0 + t * eps, t = 0 is data and t = 1 is pure noise; the model
# regresses the constant velocity u = dx_t/dt = eps - x0, and sampling integrates from t = 1 down to t = 0.


@dataclass
class Conditioning:
    """Everything the MMDiT is conditioned on besides (x_t, t). Shapes as in MMDiT.forward."""

    text: torch.Tensor  # (B, L, text_dim)
    text_mask: torch.Tensor  # (B, L) bool
    ref_latents: torch.Tensor | None = None  # (B, n, C, H, W)
    ref_clip: torch.Tensor | None = None  # (B, n, clip_dim) or (B, n, k, clip_dim)
    ref_mask: torch.Tensor | None = None  # (B, n) bool

    @property
    def batch_size(self) -> int:
        return self.text.shape[0]

    @property
    def num_refs(self) -> int:
        for r in (self.ref_latents, self.ref_clip):
            if r is not None:
                return r.shape[1]
        return 0

    def full_ref_mask(self) -> torch.Tensor:
        """(B, n) bool, all True where ref_mask was not given."""
        if self.ref_mask is not None:
            return self.ref_mask.bool()
        return torch.ones(self.batch_size, self.num_refs, dtype=torch.bool, device=self.text.device)

    def as_kwargs(self) -> dict:
        return {
            "text": self.text,
            "text_mask": self.text_mask,
            "ref_latents": self.ref_latents,
            "ref_clip": self.ref_clip,
            "ref_mask": self.ref_mask,
        }

    def drop_text(self, which: torch.Tensor | None = None) -> Conditioning:
        """Remove the text for the samples in `which` ((B,) bool; None = all): zero states, all-False mask."""
        which = _which(which, self.batch_size, self.text.device)
        keep = ~which
        return replace(
            self,
            text=self.text * keep[:, None, None].to(self.text.dtype),
            text_mask=self.text_mask.bool() & keep[:, None],
        )

    def drop_image(self, which: torch.Tensor | None = None) -> Conditioning:
        """Remove every reference (VAE and CLIP) for the samples in `which`: zero features, ref_mask False."""
        if self.num_refs == 0:
            return self
        which = _which(which, self.batch_size, self.text.device)
        keep = ~which
        return replace(
            self,
            ref_latents=_zero_rows(self.ref_latents, keep),
            ref_clip=_zero_rows(self.ref_clip, keep),
            ref_mask=self.full_ref_mask() & keep[:, None],
        )

    def to(self, device=None, dtype=None) -> Conditioning:
        """Move to a device; float tensors also to `dtype` (masks stay bool)."""

        def mv(a):
            if a is None:
                return None
            return a.to(device=device, dtype=dtype) if a.is_floating_point() else a.to(device=device)

        return Conditioning(**{k: mv(a) for k, a in self.as_kwargs().items()})

    @staticmethod
    def cat(conds: list[Conditioning]) -> Conditioning:
        """Stack along the batch (all must have the same L and n)."""
        out = {}
        for key in ("text", "text_mask", "ref_latents", "ref_clip"):
            vals = [getattr(c, key) for c in conds]
            out[key] = None if vals[0] is None else torch.cat(vals, dim=0)
        out["ref_mask"] = torch.cat([c.full_ref_mask() for c in conds], 0) if conds[0].num_refs else None
        return Conditioning(**out)


def _which(which, B, device) -> torch.Tensor:
    return torch.ones(B, dtype=torch.bool, device=device) if which is None else which.bool().to(device)


def _zero_rows(a: torch.Tensor | None, keep: torch.Tensor) -> torch.Tensor | None:
    # a: (B, ...) ; keep: (B,) bool
    if a is None:
        return None
    return a * keep.view(-1, *([1] * (a.dim() - 1))).to(a.dtype)


def add_noise(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) * x0 + t * eps; t: (B,) broadcast over the other dims of x0."""
    t = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - t) * x0 + t * eps


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """u = dx_t/dt = eps - x0."""
    return eps - x0


def draw_random(fn, shape, generator: torch.Generator | None, device=None, dtype=None) -> torch.Tensor:
    """Random numbers from `generator` on its own device, then moved to `device` (a CPU generator can
    feed CUDA tensors and the draws do not depend on where they end up)."""
    gdev = generator.device if generator is not None else (device or "cpu")
    out = fn(*shape, generator=generator, device=gdev, dtype=dtype)
    return out if device is None else out.to(device)


def sample_timesteps(
    B: int,
    generator: torch.Generator | None = None,
    mode: str = "logit_normal",
    mean: float = 0.0,
    std: float = 1.0,
    device=None,
) -> torch.Tensor:
    """(B,) training timesteps in (0, 1). logit_normal (SD3's default noise sampling) or uniform."""
    if mode == "logit_normal":
        return torch.sigmoid(mean + std * draw_random(torch.randn, (B,), generator, device))
    if mode == "uniform":
        return draw_random(torch.rand, (B,), generator, device)
    raise ValueError(f"unknown timestep mode {mode!r}; allowed: 'logit_normal', 'uniform'")


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """t' = shift * t / (1 + (shift - 1) * t): > 1 moves times towards noise (SD3's resolution shift, Wan's
    sigma shift); shift = 1 leaves t exactly as it is."""
    return shift * t / (1 + (shift - 1) * t)


def video_mse(pred_video: torch.Tensor, target_video: torch.Tensor) -> torch.Tensor:
    """(B,) per-sample MSE over the video latents only; the reference tail never enters (eq. 4)."""
    return F.mse_loss(pred_video.float(), target_video.float(), reduction="none").flatten(1).mean(1)


def rf_loss(
    model,
    x0: torch.Tensor,
    cond: Conditioning,
    generator: torch.Generator | None = None,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    t_mode: str = "logit_normal",
    t_mean: float = 0.0,
    t_std: float = 1.0,
    shift: float = 1.0,
) -> tuple[torch.Tensor, dict]:
    """Rectified-flow loss ||v - (eps - x0)||^2 on the video tokens only.

    x0: (B, C, T, H, W) clean video latents. t, noise: optional fixed values (else drawn from `generator`).
    A drawn t is sampled by t_mode / t_mean / t_std, then moved by shift_time(t, shift) (Phantom-Wan trains
    with uniform t and shift 5.0, as Wan does); a given t is used as it is.
    Returns (scalar loss, info) with info = {"loss_per_sample": (B,), "t": (B,)} (detached).
    """
    B = x0.shape[0]
    if t is None:
        t = shift_time(sample_timesteps(B, generator, t_mode, t_mean, t_std, device=x0.device), shift)
    if noise is None:
        noise = draw_random(torch.randn, x0.shape, generator, x0.device, x0.dtype)
    xt = add_noise(x0, noise, t)
    out = model(xt, t.to(x0.dtype), **cond.as_kwargs())
    per_sample = video_mse(out.video, velocity_target(x0, noise))
    return per_sample.mean(), {"loss_per_sample": per_sample.detach(), "t": t.detach()}


# Joint dropout states of a training sample: which conditions are removed. Each state trains one branch
# of the two-weight guidance (eq. 5): NONE -> x^TI, TEXT -> x^I (references only), BOTH -> x^0
# (unconditional); IMAGE (text only) keeps the model usable without references.
DROP_NONE, DROP_TEXT, DROP_IMAGE, DROP_BOTH = 0, 1, 2, 3


def draw_condition_dropout(
    batch_size: int,
    p_text: float,
    p_image: float,
    p_both: float,
    generator: torch.Generator | None = None,
    device=None,
) -> torch.Tensor:
    """(B,) int64 joint dropout state per sample: 0 none, 1 text dropped, 2 image dropped, 3 both dropped.

    The rates are of the exclusive states: P(1) = p_text, P(2) = p_image, P(3) = p_both and
    P(0) = 1 - p_text - p_image - p_both, so the unconditional branch is trained at exactly p_both.
    One uniform draw per sample from `generator` (on its own device), then moved to `device`.
    """
    rates = {"p_text": p_text, "p_image": p_image, "p_both": p_both}
    for name, p in rates.items():
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"{name}={p} must be in [0, 1]")
    total = float(p_text) + float(p_image) + float(p_both)
    if total > 1.0 + 1e-9:
        raise ValueError(f"p_text + p_image + p_both = {total:.4g} must be <= 1 (the states are exclusive)")
    if batch_size < 0:
        raise ValueError(f"batch_size={batch_size} must be >= 0")
    u = draw_random(torch.rand, (batch_size,), generator, dtype=torch.float64)  # (B,), generator's device
    edges = torch.tensor([p_text, p_text + p_image, total], dtype=torch.float64, device=u.device)
    # bucket k = number of edges <= u: u < p_text -> 0 (text), < p_text + p_image -> 1 (image),
    # < total -> 2 (both), else 3 (none)
    states = torch.tensor([DROP_TEXT, DROP_IMAGE, DROP_BOTH, DROP_NONE], device=u.device)
    out = states[torch.bucketize(u, edges, right=True)]
    return out if device is None else out.to(device)


def apply_condition_state(cond: Conditioning, state: torch.Tensor) -> Conditioning:
    """Remove what `state` ((B,) ints from draw_condition_dropout) says: text for 1 and 3 (zero states,
    all-False mask), every reference (VAE and CLIP, ref_mask False) for 2 and 3. State 3 gives exactly
    the unconditional input euler_sample uses for x^0."""
    state = torch.as_tensor(state)
    if state.shape != (cond.batch_size,):
        raise ValueError(f"state has shape {tuple(state.shape)}, expected ({cond.batch_size},)")
    if state.is_floating_point() or state.dtype == torch.bool:
        raise ValueError(f"state must be integer (0 none, 1 text, 2 image, 3 both), got {state.dtype}")
    if state.numel() and (int(state.min()) < DROP_NONE or int(state.max()) > DROP_BOTH):
        raise ValueError(f"state values must be in 0..3, got {sorted(set(state.tolist()))}")
    state = state.to(cond.text.device)
    drop_text = (state == DROP_TEXT) | (state == DROP_BOTH)
    drop_image = (state == DROP_IMAGE) | (state == DROP_BOTH)
    return cond.drop_text(drop_text).drop_image(drop_image)


def apply_condition_dropout(
    cond: Conditioning,
    p_text: float = 0.0,
    p_image: float = 0.0,
    p_ref_vae: float = 0.7,
    generator: torch.Generator | None = None,
    p_both: float | None = None,
) -> Conditioning:
    """Training-time dropout: a joint state per sample (draw_condition_dropout, apply_condition_state),
    then VAE-only dropout per reference.

    p_text, p_image, p_both: rates of the exclusive states text dropped / every reference dropped / both
      dropped (see draw_condition_dropout). p_both=None means p_text * p_image, the rate independent
      text and image drops would give; set it to train the unconditional branch of eq. 5 at a chosen rate.
    p_ref_vae: zero the VAE latent of a reference while keeping its CLIP feature, so the pixel-level
      VAE features do not overshadow the semantic CLIP ones (paper §3.3 uses 0.7). The zeroed reference
      stays in ref_mask: the model sees a blank latent frame, as in feature dropout.
    """
    if not 0.0 <= p_ref_vae <= 1.0:
        raise ValueError(f"p_ref_vae={p_ref_vae} must be in [0, 1]")
    B, dev = cond.batch_size, cond.text.device
    p_both = p_text * p_image if p_both is None else p_both
    state = draw_condition_dropout(B, p_text, p_image, p_both, generator=generator, device=dev)
    out = apply_condition_state(cond, state)
    if out.ref_latents is not None and p_ref_vae > 0:
        n = out.ref_latents.shape[1]
        keep_vae = draw_random(torch.rand, (B, n), generator, dev) >= p_ref_vae  # (B, n)
        out = replace(
            out,
            ref_latents=out.ref_latents * keep_vae[:, :, None, None, None].to(out.ref_latents.dtype),
        )
    return out


def timestep_schedule(steps: int, shift: float = 1.0, device=None) -> torch.Tensor:
    """(steps + 1,) times from 1 to 0; shift > 1 spends more steps at high noise (SD3's resolution shift)."""
    return shift_time(torch.linspace(1.0, 0.0, steps + 1, device=device), shift)


@torch.no_grad()
def euler_sample(
    model,
    cond: Conditioning,
    shape: tuple[int, ...],
    steps: int = 50,
    w_img: float = 3.0,
    w_txt: float = 7.5,
    generator: torch.Generator | None = None,
    shift: float = 1.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Euler integration of the flow from t = 1 (noise) to t = 0 with Phantom's two-weight guidance (eq. 5).

    v = v_uncond + w_img * (v_img - v_uncond) + w_txt * (v_txt_img - v_img), where v_img is conditioned on
    the references only and v_txt_img on text and references. The three branches run as one batch of 3B.
    shape: (B, C, T, H, W). Returns the (B, C, T, H, W) sample at t = 0.
    """
    dev = cond.text.device
    x = noise if noise is not None else draw_random(torch.randn, shape, generator, dev)
    B = shape[0]
    img_only = cond.drop_text()
    cond3 = Conditioning.cat([img_only.drop_image(), img_only, cond])  # uncond, image, text+image
    ts = timestep_schedule(steps, shift, device=dev)
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        v3 = model(torch.cat([x] * 3, 0), t.expand(3 * B), **cond3.as_kwargs()).video
        v_u, v_i, v_ti = v3.chunk(3, dim=0)
        v = v_u + w_img * (v_i - v_u) + w_txt * (v_ti - v_i)
        x = x + (t_next - t) * v  # dt < 0: moves towards data
    return x


@torch.no_grad()
def euler_sample_cond(
    model,
    cond: Conditioning,
    shape: tuple[int, ...],
    steps: int = 50,
    generator: torch.Generator | None = None,
    shift: float = 1.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain conditional Euler sampling (no guidance): the w_img = w_txt = 1 case of euler_sample."""
    dev = cond.text.device
    x = noise if noise is not None else draw_random(torch.randn, shape, generator, dev)
    ts = timestep_schedule(steps, shift, device=dev)
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        x = x + (t_next - t) * model(x, t.expand(shape[0]), **cond.as_kwargs()).video
    return x
