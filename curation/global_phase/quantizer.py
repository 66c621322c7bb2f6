"""The IVF's coarse quantizer as plain arrays: spherical k-means (faiss) and the nearest lists of unit
rows, for one level (every list centroid scored) and for two levels (first-level cells, each split into
its own lists by its own k-means, so a category of 90M units gets ~88k lists of ~1,024 units without one
k-means over 88k centroids; units find their lists through an HNSW graph over the list centroids, not by
scoring all 88k). No storage here: ``ivf`` reads and
writes the files."""

from __future__ import annotations

import numpy as np

HNSW_M = 32  # graph neighbours per centroid
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128  # at least 2 x the lists asked for


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


def hnsw(c: np.ndarray) -> bytes:
    """An HNSW graph (faiss, inner product) over the list centroids ``c``, serialised: the two-level
    quantizer's nearest-list search, so a unit is scored against ~log(nlist) x M centroids, not all 88k.
    Built on one thread, in list order, so the same centroids give the same bytes."""
    import faiss

    faiss.omp_set_num_threads(1)
    index = faiss.IndexHNSWFlat(c.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    index.add(np.ascontiguousarray(c, np.float32))
    return faiss.serialize_index(index).tobytes()


def nearest_hnsw(x: np.ndarray, graph: bytes, k: int) -> np.ndarray:
    """(rows, k) ids of each row's ``k`` nearest lists in the serialised HNSW ``graph``, best first; -1 where
    the graph search returns fewer. Measured against the exact nearest lists on a 600k-unit 768-d category
    of 591 lists: the same first list for 0.9999 of units, the same recall at 32 probes."""
    import faiss

    faiss.omp_set_num_threads(1)
    index = faiss.deserialize_index(np.frombuffer(graph, np.uint8))
    index.hnsw.efSearch = max(HNSW_EF_SEARCH, 2 * k)
    return index.search(np.ascontiguousarray(x, np.float32), k)[1].astype(np.int64)


def lists_per_cell(sampled: int, rate: float, list_rows: int, min_per_list: int) -> int:
    """Lists of a first-level cell with ``sampled`` training rows drawn at ``rate``: about its units /
    ``list_rows``, never fewer than ``min_per_list`` training rows a list (faiss asks for 39)."""
    units = sampled / max(rate, 1e-12)
    return int(max(1, min(round(units / list_rows), sampled // min_per_list)))
