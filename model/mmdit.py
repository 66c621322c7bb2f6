"""Phantom's dual-stream MMDiT with windowed joint attention and dynamic reference injection (paper §3.2)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.sp import SeqParallel, gather_heads, gather_seq, heads_to_seq, local_heads, seq_to_heads, split_seq

# How the two streams are built (eq. 1-2 of the paper):
#   text stream   F_T = text tokens (B, L, text_dim) ⊕ reference CLIP tokens (B, n*k, clip_dim), each
#                 projected to `hidden` first;
#   visual stream F_V = video latent patches (B, T*h*w, hidden) ⊕ reference VAE patches (B, n*h*w, hidden),
#                 where h = H / patch, w = W / patch; each reference is one latent frame of the video's H, W.
# Positions (3D RoPE on visual tokens only; text tokens are not rotated, as in SD3):
#   video token (t, y, x) -> (t, y, x);  reference i token (y, x) -> (T + i, y, x).
#   So a reference sits "after" the video on the time axis (the t+n of eq. 2) and adding or removing
#   references never moves a video token.
# Windows (Figure 5): the video tokens, in (t, y, x) raster order, are cut into consecutive windows of
#   `window_size` latent frames (window_unit="frames", our reading of "windows of size 9") or of
#   `window_size` tokens (window_unit="tokens"); window_size=0 means one window over all video tokens
#   (full attention). Each window sees [its video tokens, all reference VAE tokens, all text+CLIP
#   tokens]; the per-window outputs of the shared reference and text tokens are averaged over windows.
#   Odd blocks shift the window grid by half a window (shift_windows; whole frames for "frames"), so the
#   tokens at the end of a window share a window with the start of the next one and information crosses
#   window borders between blocks ("the in-situ features are sequentially shifted to the start of the
#   next window"). Windows are never padded: each run of equal windows is one attention call, and a
#   shorter first (shifted) or last window is its own call, so no mask is needed for the video part.
# Sequence parallel (model.sp, set_sequence_parallel): each rank of a sequence group embeds and keeps 1/P
#   of the visual tokens (video ⊕ references) through every block; the text stream (a few hundred tokens)
#   is on every rank. Attention swaps token shards for head shards (Ulysses all-to-all), so the windows,
#   the appended references and text and the per-window averages are computed over the WHOLE sequence,
#   exactly as on one rank, for this rank's heads; the text stream's heads are then gathered.


@dataclass
class MMDiTConfig:
    in_channels: int = 16  # latent channels C of the video VAE
    patch_size: int = 2  # spatial patch; temporal patch is 1 so a reference is exactly one latent frame
    hidden: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    text_dim: int = 4096  # width of the text encoder's hidden states
    clip_dim: int = 1024  # width of the reference image features
    window_size: int = 9  # 0 = full attention
    window_unit: str = "frames"  # "frames" (latent frames per window) or "tokens"
    shift_windows: bool = True  # odd blocks shift the window grid by window_size // 2 (Figure 5)
    rope_theta: float = 10000.0
    rope_axes_dim: tuple[int, int, int] | None = None  # (t, h, w) split of head_dim; None = auto
    qk_norm: bool = True  # RMSNorm on q and k, keeps joint attention logits bounded (SD3.5, Wan)
    pooled_text: bool = True  # add a masked mean of the text states to the adaLN conditioning
    context_only_last: bool = True  # last block updates only the visual stream (SD3)
    grad_checkpoint: bool = False  # recompute each block in backward: activations of one block, not all

    def __post_init__(self):
        if self.hidden % self.num_heads:
            raise ValueError(f"hidden={self.hidden} is not divisible by num_heads={self.num_heads}")
        if self.window_unit not in ("frames", "tokens"):
            raise ValueError(f"window_unit={self.window_unit!r}; allowed: 'frames', 'tokens'")
        if self.window_size < 0:
            raise ValueError(f"window_size={self.window_size} must be >= 0 (0 = full attention)")
        if self.rope_axes_dim is not None:
            self.rope_axes_dim = tuple(int(d) for d in self.rope_axes_dim)
            if (
                len(self.rope_axes_dim) != 3
                or sum(self.rope_axes_dim) != self.head_dim
                or any(d % 2 for d in self.rope_axes_dim)
            ):
                raise ValueError(
                    f"rope_axes_dim={self.rope_axes_dim} must be 3 even numbers summing to "
                    f"head_dim={self.head_dim}"
                )

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads

    @classmethod
    def from_dict(cls, d: dict) -> MMDiTConfig:
        """Build from a dict (e.g. YAML); an unknown key raises with the allowed keys."""
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - allowed)
        if unknown:
            raise ValueError(f"unknown MMDiTConfig keys {unknown}; allowed: {sorted(allowed)}")
        return cls(**d)


def mmdit_config(name: str, **overrides) -> MMDiTConfig:
    """A preset from MMDIT_CONFIGS with overrides (unknown keys raise)."""
    if name not in MMDIT_CONFIGS:
        raise ValueError(f"unknown MMDiT preset {name!r}; allowed: {sorted(MMDIT_CONFIGS)}")
    base = {f.name: getattr(MMDIT_CONFIGS[name], f.name) for f in fields(MMDiTConfig)}
    return MMDiTConfig.from_dict({**base, **overrides})


MMDIT_CONFIGS: dict[str, MMDiTConfig] = {
    # tiny runs the exact code path of the big ones; its widths match the offline encoders
    # (pixel_patch VAE: 12 channels, MiniLM: 384, MobileNetV2: 1280).
    "tiny": MMDiTConfig(
        in_channels=12,
        patch_size=2,
        hidden=64,
        depth=2,
        num_heads=4,
        text_dim=384,
        clip_dim=1280,
        window_size=2,
    ),
    "S": MMDiTConfig(hidden=384, depth=12, num_heads=6),
    "B": MMDiTConfig(hidden=768, depth=12, num_heads=12),
    # ~1.1B parameters (dual stream: ~36*hidden^2 per block)
    "1B": MMDiTConfig(hidden=1152, depth=24, num_heads=18, grad_checkpoint=True),
}


class ModelOutput(NamedTuple):
    video: torch.Tensor  # (B, C, T, H, W) predicted velocity of the video latents
    ref: torch.Tensor | None  # (B, n, C, H, W) the reference tail; excluded from the loss (eq. 4)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # x: (B, N, D); shift, scale: (B, D)
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> (B, hidden): sinusoidal features of 1000*t through an MLP (as DiT)."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(
            -math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half
        )
        args = 1000.0 * t.float()[:, None] * freqs[None]  # (B, half)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class Rope3D(nn.Module):
    """Rotary angles for (t, y, x) positions, head_dim split into (t, h, w) parts."""

    def __init__(self, head_dim: int, axes_dim: tuple[int, int, int] | None, theta: float):
        super().__init__()
        if axes_dim is None:
            hw = 2 * ((head_dim // 3) // 2)  # even share for h and w, the rest to t
            axes_dim = (head_dim - 2 * hw, hw, hw)
        self.axes_dim = axes_dim
        for i, d in enumerate(axes_dim):
            inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)  # (d/2,)
            self.register_buffer(f"inv_freq{i}", inv, persistent=False)

    def forward(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # pos: (N, 3) float positions -> cos, sin: (N, head_dim/2)
        angles = torch.cat(
            [pos[:, i : i + 1] * getattr(self, f"inv_freq{i}")[None] for i in range(3)],
            dim=-1,
        )
        return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, N, nh, hd); cos, sin: (N, hd/2); rotates consecutive pairs (x0, x1) of the head dim
    xf = x.float().unflatten(-1, (-1, 2))  # (B, N, nh, hd/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None], sin[None, :, None]
    out = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2)
    return out.to(x.dtype)


class StreamQKV(nn.Module):
    """One stream's adaLN-modulated pre-attention half: norm, modulate, QKV, qk-norm."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.nh, self.hd = cfg.num_heads, cfg.head_dim
        self.norm = nn.LayerNorm(cfg.hidden, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden)
        self.q_norm = nn.RMSNorm(self.hd, eps=1e-6) if cfg.qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.hd, eps=1e-6) if cfg.qk_norm else nn.Identity()

    def forward(self, x, shift, scale):
        q, k, v = (
            self.qkv(modulate(self.norm(x), shift, scale)).unflatten(-1, (3, self.nh, self.hd)).unbind(2)
        )
        return self.q_norm(q), self.k_norm(k), v  # each (B, N, nh, hd)


class StreamOut(nn.Module):
    """One stream's post-attention half: gated projection, then gated adaLN MLP."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.norm = nn.LayerNorm(cfg.hidden, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(cfg.hidden * cfg.mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.hidden, mlp_hidden),
            nn.GELU(approximate="tanh"),
            nn.Linear(mlp_hidden, cfg.hidden),
        )

    def forward(self, x, attn, gate1, shift2, scale2, gate2):
        x = x + gate1.unsqueeze(1) * self.proj(attn)
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm(x), shift2, scale2))


def window_groups(n_vid: int, window_tokens: int, shift_tokens: int = 0) -> list[tuple[int, int, int]]:
    """How the Nv video tokens are cut into windows, as runs of equal windows (start, size, count).

    Unshifted: [0, W), [W, 2W), ... with a shorter last window when W does not divide Nv. Shifted by s
    (0 < s < W, the alternate blocks of Figure 5): [0, s), [s, s + W), [s + W, s + 2W), ..., so the last
    W - s tokens of each unshifted window move to the start of the next one. window_tokens = 0 or >= Nv
    is one window over the whole video and is never shifted (there is no next window to move into).
    Every run becomes one attention call over equal-length sequences: no window is padded or masked.
    """
    W = window_tokens if 0 < window_tokens < n_vid else n_vid
    if W == n_vid:
        return [(0, n_vid, 1)]
    if not 0 <= shift_tokens < W:
        raise ValueError(f"window shift {shift_tokens} must be in [0, window_tokens={W})")
    groups = [(0, shift_tokens, 1)] if shift_tokens else []
    body = (n_vid - shift_tokens) // W
    if body:
        groups.append((shift_tokens, W, body))
    tail_start = shift_tokens + body * W
    if tail_start < n_vid:
        groups.append((tail_start, n_vid - tail_start, 1))
    return groups


def _window_seqs(a_vid, a_ctx, start: int, size: int, count: int) -> torch.Tensor:
    """Video tokens [start, start + size*count) as `count` windows, each followed by a copy of the context.

    a_vid: (B, Nv, nh, hd); a_ctx: (B, Nc, nh, hd) or None -> (B*count, nh, size (+ Nc), hd).
    """
    B, _, nh, hd = a_vid.shape
    a = a_vid[:, start : start + size * count].reshape(B, count, size, nh, hd)
    if a_ctx is not None:
        a = torch.cat([a, a_ctx.unsqueeze(1).expand(B, count, *a_ctx.shape[1:])], dim=2)
    return a.flatten(0, 1).transpose(1, 2)


def windowed_joint_attention(
    q_vid,
    k_vid,
    v_vid,
    q_ctx,
    k_ctx,
    v_ctx,
    ctx_mask,
    window_tokens: int,
    ctx_queries: bool = True,
    shift_tokens: int = 0,
):
    """Joint attention of video windows with shared context tokens (Phantom's dynamic injection, Fig. 5).

    q/k/v_vid: (B, Nv, nh, hd) video tokens in (t, y, x) raster order.
    q/k/v_ctx: (B, Nc, nh, hd) tokens appended to EVERY window: reference VAE tokens then text+CLIP tokens.
    ctx_mask: (B, Nc) bool, True = real token (padded references and padded text are never attended to).
    window_tokens: video tokens per window (0 or >= Nv: a single window, i.e. full attention).
    shift_tokens: offset of the window grid (window_groups); 0 in even blocks, about W/2 in odd ones.
    Returns (B, Nv, nh*hd) video output and (B, Nc, nh*hd) context output averaged over the windows
    (None if not ctx_queries, e.g. the text stream of a context-only last block).
    """
    B, Nv, nh, hd = q_vid.shape
    Nc = k_ctx.shape[1]
    groups = window_groups(Nv, window_tokens, shift_tokens)
    n_windows = sum(count for _, _, count in groups)
    ctx_mask = ctx_mask.bool()
    # Only padded context (a batch with fewer references or a shorter prompt) needs a mask; the video
    # part of every window is real.
    ctx_all_real = bool(ctx_mask.all())

    out_vid, ctx_sum = [], None
    for start, size, count in groups:
        k = _window_seqs(k_vid, k_ctx, start, size, count)  # (B*count, nh, size+Nc, hd)
        v = _window_seqs(v_vid, v_ctx, start, size, count)
        q = _window_seqs(q_vid, q_ctx if ctx_queries else None, start, size, count)
        attn_mask = None
        if not ctx_all_real:
            key_valid = torch.cat(
                [ctx_mask.new_ones(B, count, size), ctx_mask.unsqueeze(1).expand(B, count, Nc)], dim=2
            )  # (B, count, size+Nc)
            attn_mask = key_valid.flatten(0, 1)[:, None, None, :]  # (B*count, 1, 1, size+Nc)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B*count, nh, Sq, hd)
        out = out.transpose(1, 2).reshape(B, count, -1, nh * hd)  # (B, count, Sq, D)
        out_vid.append(out[:, :, :size].reshape(B, count * size, nh * hd))
        if ctx_queries:
            s = out[:, :, size:].sum(dim=1)  # (B, Nc, D)
            ctx_sum = s if ctx_sum is None else ctx_sum + s
    out_vid = torch.cat(out_vid, dim=1) if len(out_vid) > 1 else out_vid[0]
    out_ctx = ctx_sum / n_windows if ctx_queries else None  # the mean of the per-window copies
    return out_vid, out_ctx


class MMDiTBlock(nn.Module):
    """Dual-stream block: own adaLN-Zero, QKV and MLP for the visual and text streams, joint attention."""

    def __init__(self, cfg: MMDiTConfig, context_only: bool = False):
        super().__init__()
        self.context_only = context_only
        D = cfg.hidden
        self.vis_mod = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))
        self.vis_qkv, self.vis_out = StreamQKV(cfg), StreamOut(cfg)
        # context-only: the text stream only supplies keys/values, so it needs just shift/scale
        self.txt_mod = nn.Sequential(nn.SiLU(), nn.Linear(D, (2 if context_only else 6) * D))
        self.txt_qkv = StreamQKV(cfg)
        self.txt_out = None if context_only else StreamOut(cfg)

    def forward(
        self, vis, txt, c, rope, n_vid, txt_mask, ref_tok_mask, window_tokens, window_shift=0, sp=None
    ):
        """vis: (B, Nv+Nr, D) video ⊕ reference tokens; txt: (B, Lt, D) text ⊕ CLIP tokens; c: (B, D).

        rope: (cos, sin) for the Nv+Nr visual tokens; n_vid = Nv; txt_mask: (B, Lt); ref_tok_mask: (B, Nr).
        window_tokens, window_shift: the window grid of this block (window_groups).
        sp: a model.sp.SeqParallel: vis and rope are then this rank's ceil((Nv+Nr)/P) tokens (module doc).
        Returns updated (vis, txt); txt is None after a context-only block.
        """
        v_shift1, v_scale1, v_gate1, v_shift2, v_scale2, v_gate2 = self.vis_mod(c).chunk(6, dim=1)
        t_mods = self.txt_mod(c).chunk(2 if self.context_only else 6, dim=1)
        qv, kv, vv = self.vis_qkv(vis, v_shift1, v_scale1)  # (B, Nv+Nr, nh, hd); SP: (B, k, nh, hd)
        qv, kv = apply_rope(qv, *rope), apply_rope(kv, *rope)
        qt, kt, vt = self.txt_qkv(txt, t_mods[0], t_mods[1])  # (B, Lt, nh, hd)
        n_ref, nh = ref_tok_mask.shape[1], qv.shape[2]
        if sp is not None:  # token shard -> all tokens of this rank's heads, the padding cut off
            qv, kv, vv = (seq_to_heads(a, sp)[:, : n_vid + n_ref] for a in (qv, kv, vv))  # (B, N, nh_r, hd)
            qt, kt, vt = (local_heads(a, sp) for a in (qt, kt, vt))  # (B, Lt, nh_r, hd)

        # context appended to every window = [reference VAE tokens, text + CLIP tokens]
        q_ctx = torch.cat([qv[:, n_vid:], qt], dim=1)
        k_ctx, v_ctx = (
            torch.cat([kv[:, n_vid:], kt], dim=1),
            torch.cat([vv[:, n_vid:], vt], dim=1),
        )
        ctx_mask = torch.cat([ref_tok_mask, txt_mask], dim=1)
        out_vid, out_ctx = windowed_joint_attention(
            qv[:, :n_vid],
            kv[:, :n_vid],
            vv[:, :n_vid],
            q_ctx,
            k_ctx,
            v_ctx,
            ctx_mask,
            window_tokens,
            shift_tokens=window_shift,
        )
        attn_vis = torch.cat([out_vid, out_ctx[:, :n_ref]], dim=1)  # (B, Nv+Nr, D); SP: (B, N, nh_r*hd)
        attn_txt = out_ctx[:, n_ref:]
        if sp is not None:  # back to this rank's tokens with every head; the text stream's heads gathered
            attn_vis = attn_vis.unflatten(-1, (-1, qv.shape[-1]))  # (B, N, nh_r, hd)
            attn_vis = F.pad(attn_vis, (0, 0, 0, 0, 0, sp.size * vis.shape[1] - attn_vis.shape[1]))
            attn_vis = heads_to_seq(attn_vis, sp, nh).flatten(2)  # (B, k, D)
            if not self.context_only:
                attn_txt = gather_heads(attn_txt.unflatten(-1, (-1, qv.shape[-1])), sp, nh).flatten(2)
        vis = self.vis_out(vis, attn_vis, v_gate1, v_shift2, v_scale2, v_gate2)
        if self.context_only:
            return vis, None
        txt = self.txt_out(txt, attn_txt, t_mods[2], t_mods[3], t_mods[4], t_mods[5])
        return vis, txt


class FinalLayer(nn.Module):
    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.hidden, elementwise_affine=False, eps=1e-6)
        self.mod = nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden, 2 * cfg.hidden))
        self.linear = nn.Linear(cfg.hidden, cfg.patch_size**2 * cfg.in_channels)

    def forward(self, x, c):
        shift, scale = self.mod(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class MMDiT(nn.Module):
    """Phantom's generator G_theta(x_t, t, F_T, F_V) (eq. 3). Shapes in `forward`."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.cfg = cfg
        D, p = cfg.hidden, cfg.patch_size
        self.patch_embed = nn.Linear(cfg.in_channels * p * p, D)  # shared by video and reference latents
        self.t_embed = TimestepEmbedder(D)
        self.text_in = nn.Sequential(nn.RMSNorm(cfg.text_dim, eps=1e-6), nn.Linear(cfg.text_dim, D))
        self.clip_in = nn.Sequential(nn.RMSNorm(cfg.clip_dim, eps=1e-6), nn.Linear(cfg.clip_dim, D))
        self.pooled_in = (
            nn.Sequential(
                nn.RMSNorm(cfg.text_dim, eps=1e-6), nn.Linear(cfg.text_dim, D), nn.SiLU(), nn.Linear(D, D)
            )
            if cfg.pooled_text
            else None
        )
        self.rope = Rope3D(cfg.head_dim, cfg.rope_axes_dim, cfg.rope_theta)
        self.blocks = nn.ModuleList(
            [
                MMDiTBlock(cfg, context_only=cfg.context_only_last and i == cfg.depth - 1)
                for i in range(cfg.depth)
            ]
        )
        self.final = FinalLayer(cfg)
        self.sp: SeqParallel | None = None
        self.initialize_weights()

    def set_sequence_parallel(self, sp: SeqParallel | None) -> None:
        """Split every forward's visual tokens over sp's ranks (Ulysses attention); None = one rank.
        All ranks of the group must call forward with the same inputs."""
        if sp is not None:
            sp.heads(self.cfg.num_heads)  # P > heads raises here, not in the first forward
        self.sp = sp

    def initialize_weights(self):
        def _basic(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

        self.apply(_basic)
        for lin in (self.t_embed.mlp[0], self.t_embed.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        # adaLN-Zero: every gate, shift and scale starts at 0 so each block is the identity at init,
        # and the final layer is zero so the model outputs exactly 0.
        for blk in self.blocks:
            for mod in (blk.vis_mod, blk.txt_mod):
                nn.init.zeros_(mod[-1].weight)
                nn.init.zeros_(mod[-1].bias)
        for lin in (self.final.mod[-1], self.final.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def window_tokens(self, T: int, h: int, w: int) -> int:
        """Video tokens per attention window (0 = full attention)."""
        if self.cfg.window_size == 0:
            return 0
        return self.cfg.window_size * (h * w if self.cfg.window_unit == "frames" else 1)

    def window_shift(self, T: int, h: int, w: int) -> int:
        """Offset of the window grid in the odd blocks, in tokens: half a window, in whole frames for
        window_unit="frames"; 0 when windows are off, not shifted, or one window covers the video."""
        cfg = self.cfg
        if not cfg.shift_windows or cfg.window_size == 0 or self.window_tokens(T, h, w) >= T * h * w:
            return 0
        return (cfg.window_size // 2) * (h * w if cfg.window_unit == "frames" else 1)

    def positions(self, T: int, h: int, w: int, n_ref: int, device) -> torch.Tensor:
        """(T*h*w + n_ref*h*w, 3) RoPE positions: video (t, y, x), then reference i at (T + i, y, x)."""
        t = torch.arange(T + n_ref, device=device, dtype=torch.float32)
        y = torch.arange(h, device=device, dtype=torch.float32)
        x = torch.arange(w, device=device, dtype=torch.float32)
        return torch.stack(torch.meshgrid(t, y, x, indexing="ij"), dim=-1).reshape(-1, 3)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, F, H, W) -> (B, F*h*w, C*p*p) with tokens in (f, y, x) raster order
        B, C, Fr, H, W = x.shape
        p = self.cfg.patch_size
        x = x.view(B, C, Fr, H // p, p, W // p, p).permute(0, 2, 3, 5, 1, 4, 6)  # (B, F, h, w, C, p, p)
        return x.reshape(B, Fr * (H // p) * (W // p), C * p * p)

    def unpatchify(self, x: torch.Tensor, Fr: int, H: int, W: int) -> torch.Tensor:
        # x: (B, F*h*w, C*p*p) -> (B, C, F, H, W)
        B, C, p = x.shape[0], self.cfg.in_channels, self.cfg.patch_size
        x = x.view(B, Fr, H // p, W // p, C, p, p).permute(0, 4, 1, 2, 5, 3, 6)  # (B, C, F, h, p, w, p)
        return x.reshape(B, C, Fr, H, W)

    def forward(self, x, t, text, text_mask, ref_latents=None, ref_clip=None, ref_mask=None) -> ModelOutput:
        """Predict the velocity of the video latents (and of the reference tail, which the loss ignores).

        x: (B, C, T, H, W) noisy video latents; t: (B,) in [0, 1] (1 = pure noise).
        text: (B, L, text_dim) float; text_mask: (B, L) bool, True = real token.
        ref_latents: (B, n, C, H, W) clean reference VAE latents (n = 0..4, same H, W as x) or None.
        ref_clip: (B, n, clip_dim) pooled or (B, n, k, clip_dim) token CLIP features, or None.
        ref_mask: (B, n) bool, True = real reference; None = all real.
        Returns ModelOutput(video=(B, C, T, H, W), ref=(B, n, C, H, W) or None).
        """
        cfg = self.cfg
        B, C, T, H, W = x.shape
        p = cfg.patch_size
        if C != cfg.in_channels or H % p or W % p:
            raise ValueError(f"x {tuple(x.shape)} needs C={cfg.in_channels} and H, W divisible by {p}")
        h, w = H // p, W // p
        n_ref = 0 if ref_latents is None else ref_latents.shape[1]
        if ref_clip is not None and ref_clip.shape[1] != n_ref and ref_latents is not None:
            raise ValueError(f"ref_clip has {ref_clip.shape[1]} references, ref_latents {n_ref}")
        n_ref_any = n_ref if ref_latents is not None else (0 if ref_clip is None else ref_clip.shape[1])
        if ref_mask is None:
            ref_mask = torch.ones(B, n_ref_any, dtype=torch.bool, device=x.device)
        ref_mask = ref_mask.bool()
        text_mask = text_mask.bool()

        # visual stream: video ⊕ reference latent patches (eq. 2)
        vis = self.patchify(x)  # (B, T*h*w, C*p*p)
        n_vid = vis.shape[1]
        if n_ref:
            if ref_latents.shape[2:] != (C, H, W):
                raise ValueError(f"ref_latents {tuple(ref_latents.shape)} must be (B, n, {C}, {H}, {W})")
            refs = self.patchify(ref_latents.transpose(1, 2))  # (B, n*h*w, C*p*p)
            vis = torch.cat([vis, refs.to(vis.dtype)], dim=1)
        n_tok = vis.shape[1]
        if self.sp is not None:  # this rank's share of the visual tokens, embedded here only
            vis = split_seq(vis, self.sp)  # (B, ceil(N/P), C*p*p)
        vis = self.patch_embed(vis)  # (B, Nv+Nr, D); SP: (B, ceil(N/P), D)
        ref_tok_mask = ref_mask.repeat_interleave(h * w, dim=1) if n_ref else ref_mask[:, :0]  # (B, Nr)

        # text stream: text ⊕ reference CLIP tokens (eq. 1)
        txt = self.text_in(text)  # (B, L, D)
        txt_mask = text_mask
        if ref_clip is not None and ref_clip.shape[1] > 0:
            clip = ref_clip if ref_clip.dim() == 4 else ref_clip.unsqueeze(2)  # (B, n, k, clip_dim)
            k_tok = clip.shape[2]
            txt = torch.cat([txt, self.clip_in(clip.flatten(1, 2))], dim=1)  # (B, L + n*k, D)
            txt_mask = torch.cat([text_mask, ref_mask.repeat_interleave(k_tok, dim=1)], dim=1)

        c = self.t_embed(t)  # (B, D)
        if self.pooled_in is not None:
            m = text_mask.unsqueeze(-1).to(text.dtype)
            pooled = (text * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, text_dim); 0 when text is dropped
            c = c + self.pooled_in(pooled)

        cos, sin = self.rope(self.positions(T, h, w, n_ref, x.device))
        if self.sp is not None:
            cos, sin = split_seq(cos, self.sp, dim=0), split_seq(sin, self.sp, dim=0)
        wt, ws = self.window_tokens(T, h, w), self.window_shift(T, h, w)
        for i, blk in enumerate(self.blocks):
            args = (vis, txt, c, (cos, sin), n_vid, txt_mask, ref_tok_mask, wt, ws if i % 2 else 0, self.sp)
            if self.cfg.grad_checkpoint and self.training and torch.is_grad_enabled():
                vis, txt = checkpoint(blk, *args, use_reentrant=False)
            else:
                vis, txt = blk(*args)

        out = self.final(vis, c)  # (B, Nv+Nr, C*p*p)
        if self.sp is not None:  # every rank computes the same loss from the whole output (model.sp)
            out = gather_seq(out, self.sp, n_tok)
        video = self.unpatchify(out[:, :n_vid], T, H, W)
        ref = None
        if n_ref:
            ref = self.unpatchify(out[:, n_vid:], n_ref, H, W).transpose(1, 2)  # (B, n, C, H, W)
        return ModelOutput(video=video, ref=ref)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
