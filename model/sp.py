"""Sequence parallelism: shard a token sequence over a process group, Ulysses all-to-all over heads.

One sequence group of P ranks holds ONE batch: every rank has the same inputs (the small latents, text,
references), embeds only its own 1/P of the visual tokens, and keeps only that share through the blocks.
Attention needs every token, so it swaps the split (DeepSpeed-Ulysses): an all-to-all turns
(B, S/P, nh, hd) sequence shards into (B, S, nh_r, hd) head shards, attention runs over the whole sequence
for this rank's heads (window layout, appended references and text exactly as on one rank), and the
inverse all-to-all brings (B, S/P, nh, hd) back. Heads that do not divide by P are split unevenly
(nh_r = nh // P or one more); P > nh is refused (that needs ring attention, not built here).

A sequence of S tokens is cut into P equal chunks of ceil(S / P); the last is zero-padded. The padding only
ever sits at the end of the gathered sequence, so attention strips it (`full[:, :S]`) and no mask is needed.

Gradients: the model's output (C·p² values per token, ~1% of the hidden width) is gathered so every rank
of the group computes the very same loss as one rank would; `gather_seq` then hands each rank the gradient
of its own tokens only, scaled by P, and every replicated computation (text stream, time embedding) feeds
only this rank's tokens or heads downstream. So each rank's parameter gradient is P times its share of the
one-rank gradient, and the MEAN over the sequence group is the one-rank gradient: to FSDP2 or DDP, which
average over all ranks, the ranks of a sequence group look like data-parallel replicas of one batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F


@dataclass(frozen=True)
class SeqParallel:
    """The sequence group this rank belongs to (a torch.distributed process group of P ranks)."""

    group: object  # torch.distributed.ProcessGroup

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    def shard_len(self, n: int) -> int:
        """Tokens per rank for a sequence of n: ceil(n / P) (the last rank's share is zero-padded)."""
        return math.ceil(n / self.size)

    def heads(self, num_heads: int) -> list[tuple[int, int]]:
        """[start, end) heads of every rank: nh // P each, the first nh % P ranks one more."""
        return head_split(num_heads, self.size)


def head_split(num_heads: int, size: int) -> list[tuple[int, int]]:
    if num_heads < size:
        raise ValueError(
            f"sequence parallel degree {size} > {num_heads} attention heads: Ulysses splits heads, and ring "
            "attention (for more ranks than heads) is not implemented; use sp_degree <= num_heads"
        )
    base, extra = divmod(num_heads, size)
    out, start = [], 0
    for r in range(size):
        n = base + (r < extra)
        out.append((start, start + n))
        start += n
    return out


def split_seq(x: torch.Tensor, sp: SeqParallel, dim: int = 1) -> torch.Tensor:
    """This rank's chunk of `x` along `dim` (ceil(n / P) entries, zero-padded at the end). Differentiable:
    the gradient of the other chunks is zero here, as it should be (they belong to the other ranks)."""
    n = x.shape[dim]
    k = sp.shard_len(n)
    pad = k * sp.size - n
    if pad:
        widths = [0, 0] * (x.dim() - 1 - dim) + [0, pad]
        x = F.pad(x, widths)
    return x.narrow(dim, sp.rank * k, k)


class _GatherSeq(torch.autograd.Function):
    """(B, k, ...) chunks -> (B, n, ...) on every rank; backward: this rank's chunk of the gradient only
    (the whole gradient of its chunk: every rank computes the same loss from the result), times P so that
    the mean over the group, not the sum, is the one-rank gradient (module doc)."""

    @staticmethod
    def forward(ctx, x, group, n):
        ctx.group, ctx.k = group, x.shape[1]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=1)[:, :n]

    @staticmethod
    def backward(ctx, grad):
        r, k = dist.get_rank(ctx.group), ctx.k
        g = grad[:, r * k : (r + 1) * k]
        if g.shape[1] < k:  # the padded tail of the last chunk
            g = torch.cat([g, g.new_zeros(g.shape[0], k - g.shape[1], *g.shape[2:])], dim=1)
        return g * dist.get_world_size(ctx.group), None, None


def gather_seq(x: torch.Tensor, sp: SeqParallel, n: int) -> torch.Tensor:
    """(B, ceil(n/P), ...) per rank -> the whole (B, n, ...) on every rank of the group (padding dropped)."""
    return _GatherSeq.apply(x, sp.group, n)


def _seq_to_heads(x: torch.Tensor, group, heads: list[tuple[int, int]]) -> torch.Tensor:
    # x: (B, k, nh, hd) all heads of this rank's k tokens -> (B, P*k, nh_r, hd) this rank's heads, all tokens
    B, k, _, hd = x.shape
    r = dist.get_rank(group)
    send = torch.cat([x[:, :, a:b].reshape(-1) for a, b in heads])
    nh_r = heads[r][1] - heads[r][0]
    recv = x.new_empty(len(heads) * B * k * nh_r * hd)
    dist.all_to_all_single(
        recv, send, [B * k * nh_r * hd] * len(heads), [B * k * (b - a) * hd for a, b in heads], group=group
    )
    return recv.view(len(heads), B, k, nh_r, hd).transpose(0, 1).reshape(B, len(heads) * k, nh_r, hd)


def _heads_to_seq(y: torch.Tensor, group, heads: list[tuple[int, int]]) -> torch.Tensor:
    # y: (B, P*k, nh_r, hd) -> (B, k, nh, hd): the inverse of _seq_to_heads
    P = len(heads)
    B, S, nh_r, hd = y.shape
    k = S // P
    send = y.view(B, P, k, nh_r, hd).transpose(0, 1).reshape(-1)  # rank p's tokens first
    sizes = [B * k * (b - a) * hd for a, b in heads]
    recv = y.new_empty(sum(sizes))
    dist.all_to_all_single(recv, send, sizes, [B * k * nh_r * hd] * P, group=group)
    parts = [c.view(B, k, b - a, hd) for c, (a, b) in zip(recv.split(sizes), heads)]
    return torch.cat(parts, dim=2)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, heads):
        ctx.group, ctx.heads = group, heads
        return _seq_to_heads(x.contiguous(), group, heads)

    @staticmethod
    def backward(ctx, grad):
        return _heads_to_seq(grad.contiguous(), ctx.group, ctx.heads), None, None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, group, heads):
        ctx.group, ctx.heads = group, heads
        return _heads_to_seq(y.contiguous(), group, heads)

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_heads(grad.contiguous(), ctx.group, ctx.heads), None, None


def seq_to_heads(x: torch.Tensor, sp: SeqParallel) -> torch.Tensor:
    """Ulysses all-to-all: (B, S/P, nh, hd) token shard -> (B, S, nh_r, hd) head shard (S = P * shard)."""
    return _SeqToHeads.apply(x, sp.group, sp.heads(x.shape[2]))


def heads_to_seq(y: torch.Tensor, sp: SeqParallel, num_heads: int) -> torch.Tensor:
    """The inverse all-to-all: (B, S, nh_r, hd) -> (B, S/P, nh, hd)."""
    return _HeadsToSeq.apply(y, sp.group, sp.heads(num_heads))


class _GatherHeads(torch.autograd.Function):
    """(B, L, nh_r, hd) -> (B, L, nh, hd) on every rank; backward: the gradients every rank holds for this
    rank's heads, summed (each rank's copy of the result feeds only its own share downstream)."""

    @staticmethod
    def forward(ctx, x, group, heads):
        ctx.group, ctx.heads = group, heads
        width = max(b - a for a, b in heads)
        pad = width - x.shape[2]
        xp = torch.cat([x, x.new_zeros(*x.shape[:2], pad, x.shape[3])], dim=2) if pad else x
        parts = [torch.empty_like(xp) for _ in heads]
        dist.all_gather(parts, xp.contiguous(), group=group)
        return torch.cat([p[:, :, : b - a] for p, (a, b) in zip(parts, heads)], dim=2)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        a, b = ctx.heads[dist.get_rank(ctx.group)]
        return grad[:, :, a:b].contiguous(), None, None


def gather_heads(x: torch.Tensor, sp: SeqParallel, num_heads: int) -> torch.Tensor:
    """This rank's heads of a replicated stream's attention output -> all heads, on every rank."""
    return _GatherHeads.apply(x, sp.group, sp.heads(num_heads))


def local_heads(x: torch.Tensor, sp: SeqParallel) -> torch.Tensor:
    """(B, L, nh, hd) computed on every rank -> (B, L, nh_r, hd), this rank's heads."""
    a, b = sp.heads(x.shape[2])[sp.rank]
    return x[:, :, a:b]
