"""The IVF's coarse quantizer as plain arrays: spherical k-means (faiss) and the nearest lists of unit
rows, for one level (every list centroid scored) and for two levels (first-level cells, each split into
its own lists, so a category of 90M units gets ~88k lists of ~1,024 units without one k-means over 88k
centroids and without scoring every unit against 88k centroids). No storage here: ``ivf`` reads and
writes the files."""

from __future__ import annotations

import numpy as np


def kmeans(x: np.ndarray, k: int) -> np.ndarray:
    """``k`` unit-normalised centroids of the rows of ``x`` (spherical k-means, 20 iterations, seeded), on one
    thread (a Ray task owns one CPU). One centroid is the normalised mean; never more than the rows."""
    import faiss

    k = max(1, min(k, len(x)))
    if k == 1:
        c = x.mean(0, keepdims=True)
    else:
        faiss.omp_set_num_threads(1)
        km = faiss.Kmeans(x.shape[1], k, niter=20, seed=1234, spherical=True, verbose=False)
        km.cp.max_points_per_centroid = max(1, len(x) // k + 1)  # the sample is the size we chose
        km.cp.min_points_per_centroid = 1
        km.train(np.ascontiguousarray(x, np.float32))
        c = km.centroids
    return (c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def nearest(x: np.ndarray, c: np.ndarray, k: int) -> np.ndarray:
    """(rows, k) indices of each row's ``k`` best centroids of ``c`` by inner product, best first (ties: the
    lower index)."""
    s = x @ c.T
    return np.argsort(-s, axis=1, kind="stable")[:, : min(k, c.shape[0])]


def nearest_two_level(
    x: np.ndarray, cells: np.ndarray, lists: np.ndarray, cell_of: np.ndarray, k: int, probe_cells: int
) -> np.ndarray:
    """(rows, k) list ids of each row's ``k`` best lists among the lists of its ``probe_cells`` nearest
    first-level cells, best first (ties: the lower list id); -1 where those cells hold fewer than ``k``
    lists. ``lists`` holds every list's centroid, ``cell_of`` (sorted) the cell of each list, so a cell's
    lists are one contiguous run. One score matrix per cell (its rows x its lists), never rows x all lists."""
    n = len(x)
    near = nearest(x, cells, probe_cells)  # (rows, p1)
    starts = np.searchsorted(cell_of, np.arange(len(cells)), side="left")
    ends = np.searchsorted(cell_of, np.arange(len(cells)), side="right")
    best_s = np.full((n, k), -np.inf, np.float32)
    best_l = np.full((n, k), -1, np.int64)
    for c in np.unique(near):
        a, e = int(starts[c]), int(ends[c])
        if e <= a:
            continue
        rows = np.nonzero((near == c).any(1))[0]
        s = np.concatenate([best_s[rows], x[rows] @ lists[a:e].T], 1)
        ids = np.concatenate([best_l[rows], np.broadcast_to(np.arange(a, e), (len(rows), e - a))], 1)
        # score descending, then the lower list id (-1 placeholders sort last among -inf scores)
        o = np.lexsort((np.where(ids < 0, np.iinfo(np.int64).max, ids), -s), axis=-1)[:, :k]
        best_s[rows] = np.take_along_axis(s, o, 1)
        best_l[rows] = np.take_along_axis(ids, o, 1)
    return best_l


def lists_per_cell(sampled: int, rate: float, list_rows: int, min_per_list: int) -> int:
    """Lists of a first-level cell with ``sampled`` training rows drawn at ``rate``: about its units /
    ``list_rows``, never fewer than ``min_per_list`` training rows a list (faiss asks for 39)."""
    units = sampled / max(rate, 1e-12)
    return int(max(1, min(round(units / list_rows), sampled // min_per_list)))
