"""Pairing math: nearest neighbours (exact blocked, faiss ANN) and the similarity band rule; pure functions.

Every search returns, per query row, its ``m`` nearest rows from *other groups* (a group is a source video, or
a clip when other clips of the same source may pair) with exact fp32 cosine scores. The band rule then labels
each candidate: ``pair`` (low <= score <= high, the first ``top_k`` of them), ``copy_paste`` (above high:
likely the same footage), ``different_subject`` (below low) or ``beyond_top_k``. Nothing here loops over pairs
in Python: scores come from matrix products over blocks of rows, or from a faiss index.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np

log = logging.getLogger(__name__)

PAIR, COPY_PASTE, DIFFERENT_SUBJECT, BEYOND_TOP_K = 0, 1, 2, 3
VERDICTS = ("pair", "copy_paste", "different_subject", "beyond_top_k")


@dataclasses.dataclass
class Neighbours:
    """Per query row its ``m`` nearest rows of other groups, best first (``idx`` -1 / score -inf: none)."""

    idx: np.ndarray  # (N, m) int64
    score: np.ndarray  # (N, m) float32, exact cosine

    @property
    def m(self) -> int:
        return self.idx.shape[1]


def band_reason(score: float, low: float, high: float) -> str | None:
    """The band rule for one score: None when it pairs, else the rejection reason."""
    if score > high:
        return "copy_paste"
    if score < low:
        return "different_subject"
    return None


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, float32 (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def _empty(n: int, m: int) -> Neighbours:
    return Neighbours(np.full((n, m), -1, np.int64), np.full((n, m), -np.inf, np.float32))


def merge_topk(a: Neighbours, b: Neighbours, m: int) -> Neighbours:
    """Row-wise best ``m`` of two candidate lists for the same rows (duplicates are not expected)."""
    import torch

    idx = torch.from_numpy(np.concatenate([a.idx, b.idx], axis=1))
    sc = torch.from_numpy(np.concatenate([a.score, b.score], axis=1))
    top = torch.topk(sc, min(m, sc.shape[1]), dim=1)
    out = Neighbours(torch.gather(idx, 1, top.indices).numpy(), top.values.numpy())
    out.idx[~np.isfinite(out.score)] = -1  # masked (same-group) entries are no candidates
    return out


def _strip(x, groups, r0: int, r1: int, m: int, symmetric: bool):
    """Scores of rows [r0, r1) against rows [c0, N) (c0 = r0 when symmetric, else 0) with one matrix product;
    returns the strip's row top-m and, when symmetric, the top-m strip rows for each row r1.. (or None)."""
    import torch

    c0 = r0 if symmetric else 0
    q = x[r0:r1]  # (b, D)
    s = q @ x[c0:].T  # (b, N - c0) fp32 cosine
    gq, gc = groups[r0:r1], groups[c0:]
    s.masked_fill_(gq[:, None] == gc[None, :], float("-inf"))  # same group (and self) never pairs
    k = min(m, s.shape[1])
    top = torch.topk(s, k, dim=1)
    rows = Neighbours((top.indices + c0).numpy().astype(np.int64), top.values.numpy().astype(np.float32))
    cols = None
    if symmetric and r1 < x.shape[0]:
        # Columns right of the strip's own square: the square's pairs already reached both rows above.
        kc = min(m, s.shape[0])
        topc = torch.topk(s[:, r1 - r0 :].T, kc, dim=1)  # (N - r1, kc): best strip rows per column
        cols = Neighbours(
            (topc.indices + r0).numpy().astype(np.int64), topc.values.numpy().astype(np.float32)
        )
    return rows, cols


def _pad(nb: Neighbours, m: int) -> Neighbours:
    if nb.m >= m:
        return nb
    n = nb.idx.shape[0]
    pad = _empty(n, m - nb.m)
    return Neighbours(np.concatenate([nb.idx, pad.idx], 1), np.concatenate([nb.score, pad.score], 1))


def exact_block(x, groups, r0: int, r1: int, m: int) -> Neighbours:
    """Exact nearest ``m`` rows of other groups for the query rows [r0, r1) against every row (torch tensors
    ``x`` (N, D) and ``groups`` (N,)), best first, padded to ``m`` (idx -1: no candidate)."""
    rows, _ = _strip(x, groups, r0, r1, m, symmetric=False)
    rows.idx[~np.isfinite(rows.score)] = -1
    return _pad(rows, m)


def exact_strips(x: np.ndarray, groups: np.ndarray, m: int, strips: list[tuple[int, int]]) -> Neighbours:
    """Exact top-m over the upper-triangle strips given: each score block is computed once and serves both
    its rows and its columns (half the multiply-adds of the full matrix)."""
    import torch

    n = x.shape[0]
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    gt = torch.from_numpy(np.asarray(groups, dtype=np.int64))
    best = _empty(n, m)
    for r0, r1 in strips:
        rows, cols = _strip(xt, gt, r0, r1, m, symmetric=True)
        best_rows = merge_topk(Neighbours(best.idx[r0:r1], best.score[r0:r1]), _pad(rows, m), m)
        best.idx[r0:r1], best.score[r0:r1] = best_rows.idx, best_rows.score
        if cols is not None:
            tail = merge_topk(Neighbours(best.idx[r1:], best.score[r1:]), _pad(cols, m), m)
            best.idx[r1:], best.score[r1:] = tail.idx, tail.score
    return best


def _strips(n: int, block_rows: int) -> list[tuple[int, int]]:
    return [(r0, min(n, r0 + block_rows)) for r0 in range(0, n, block_rows)]


def topk_exact(x: np.ndarray, groups: np.ndarray, m: int, block_rows: int = 2048) -> Neighbours:
    """Exact nearest ``m`` rows of other groups for every row: blocked fp32 matrix products, upper triangle
    only. Memory per block: block_rows x N x 4 bytes."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return exact_strips(x, groups, m, _strips(x.shape[0], block_rows))


def _max_group_size(groups: np.ndarray) -> int:
    return int(np.unique(groups, return_counts=True)[1].max()) if len(groups) else 0


def faiss_factory(n: int, d: int, nlist: int = 0) -> tuple[str, int]:
    """The faiss index for ``n`` vectors of dimension ``d``: inverted lists (about sqrt(n), a power of two)
    over 4-bit fast-scan product codes, re-ranked with the exact vectors (so returned scores are exact)."""
    if nlist <= 0:
        nlist = 2 ** max(0, round(math.log2(max(1.0, math.sqrt(n)))))
    nlist = max(1, min(nlist, n // 39 or 1))  # faiss k-means wants >= 39 points per list
    if d % 8 == 0 and n >= 16 * 39:
        return f"IVF{nlist},PQ{d // 8}x4fs,RFlat", nlist
    return f"IVF{nlist},Flat", nlist


def build_faiss(x: np.ndarray, nlist: int = 0, train_max: int = 50_000, seed: int = 0):
    """A trained, filled faiss inner-product index over unit rows ``x`` (N, D)."""
    import faiss

    n, d = x.shape
    spec, nlist = faiss_factory(n, d, nlist)
    index = faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    train = x if n <= train_max else x[np.sort(rng.choice(n, train_max, replace=False))]
    index.train(np.ascontiguousarray(train))
    index.add(np.ascontiguousarray(x))
    return index


def auto_nprobe(nlist: int) -> int:
    """Lists visited per query when not configured: a sixteenth of them, at least 16. Measured on 1M clustered
    768-d vectors (1024 lists): 16 -> recall 0.92 of in-band pairs, 32 -> 0.96, 48 -> 0.98."""
    return min(nlist, max(16, nlist // 16))


def faiss_search(
    index, x: np.ndarray, groups: np.ndarray, rows: np.ndarray, m: int, nprobe: int, extra: int
) -> Neighbours:
    """Search ``x[rows]`` in ``index``, asking ``m + extra`` neighbours so that after dropping same-group hits
    (at most ``extra`` of them) ``m`` remain; returns those best first."""
    import faiss

    ivf = faiss.extract_index_ivf(index)
    ivf.nprobe = nprobe if nprobe > 0 else auto_nprobe(ivf.nlist)
    kk = min(m + extra, index.ntotal)
    score, idx = index.search(np.ascontiguousarray(x[rows]), kk)  # (b, kk) each
    same = (idx < 0) | (groups[np.maximum(idx, 0)] == groups[rows][:, None])
    score = np.where(same, -np.inf, score).astype(np.float32)
    order = np.argsort(-score, axis=1, kind="stable")[:, :m]
    out = Neighbours(np.take_along_axis(idx, order, 1).astype(np.int64), np.take_along_axis(score, order, 1))
    out.idx[~np.isfinite(out.score)] = -1
    return _pad(out, m)


def topk_faiss(
    x: np.ndarray, groups: np.ndarray, m: int, nprobe: int = 0, nlist: int = 0, block_rows: int = 65536
) -> Neighbours:
    """Approximate nearest ``m`` rows of other groups for every row with a faiss IVF-PQ index, re-ranked
    exactly. Recall depends on ``nprobe`` (lists visited per query)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    groups = np.asarray(groups, dtype=np.int64)
    index = build_faiss(x, nlist)
    extra = _max_group_size(groups)
    parts = [
        faiss_search(index, x, groups, np.arange(r0, r1), m, nprobe, extra)
        for r0, r1 in _strips(x.shape[0], block_rows)
    ]
    return Neighbours(np.concatenate([p.idx for p in parts]), np.concatenate([p.score for p in parts]))


def classify(nb: Neighbours, low: float, high: float, top_k: int) -> np.ndarray:
    """Verdict per candidate (N, m) int8: PAIR for the first ``top_k`` in-band candidates of each row,
    COPY_PASTE above high, DIFFERENT_SUBJECT below low, BEYOND_TOP_K for in-band ones past ``top_k``;
    -1 where there is no candidate."""
    s = nb.score
    v = np.full(s.shape, -1, np.int8)
    valid = nb.idx >= 0
    inband = valid & (s >= low) & (s <= high)
    rank = np.cumsum(inband, axis=1)  # 1-based rank among in-band candidates (scores are sorted)
    v[valid & (s > high)] = COPY_PASTE
    v[valid & (s < low)] = DIFFERENT_SUBJECT
    v[inband & (rank <= top_k)] = PAIR
    v[inband & (rank > top_k)] = BEYOND_TOP_K
    return v


def unordered_pairs(nb: Neighbours, verdict: np.ndarray, code: int = PAIR) -> tuple[np.ndarray, np.ndarray]:
    """Unique unordered pairs (i < j) with the given verdict in either direction: (P, 2) int64 and (P,)
    scores."""
    rows, cols = np.nonzero(verdict == code)
    a, b = nb.idx[rows, cols], rows.astype(np.int64)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    key = lo * (int(nb.idx.shape[0]) + 1) + hi
    _, first = np.unique(key, return_index=True)
    return np.stack([lo[first], hi[first]], 1), nb.score[rows, cols][first]


def histogram(scores: np.ndarray, bins: int = 40, lo: float = -1.0, hi: float = 1.0) -> dict:
    """A JSON-able histogram of finite scores: {edges, counts, n}."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    s = s[np.isfinite(s)]
    counts, edges = np.histogram(s, bins=bins, range=(lo, hi))
    return {
        "edges": [round(float(e), 4) for e in edges],
        "counts": [int(c) for c in counts],
        "n": int(s.size),
    }


def ascii_histogram(h: dict, width: int = 40) -> str:
    """The histogram as text lines for the log."""
    top = max(h["counts"]) or 1
    lines = []
    for i, c in enumerate(h["counts"]):
        if c:
            lines.append(
                f"{h['edges'][i]:+.2f}..{h['edges'][i + 1]:+.2f} {c:8d} {'#' * max(1, c * width // top)}"
            )
    return "\n".join(lines)
