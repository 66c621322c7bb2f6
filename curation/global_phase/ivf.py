"""Nearest-neighbour search of one (kind, category) in generations: the exact blocked search for small
categories, and the sharded IVF search for large ones (a coarse quantizer trained once on a sample, every unit
assigned to its list, vectors written to the store partitioned by list range, query blocks joined to the list
ranges they probe). Either way the result of query block B of generation G against the units of generation H
is one *partial* file (the top-m per query among those units), written once and never redone: a new
generation is searched new x everything and everything x new, and the partials merge into each query's top-m.
No task holds more than one list range or one generation of a small category, and one query block.

Candidates are ranked by their exact score, then by a stable id of the candidate unit (a 64-bit hash of its
clip and subject): scores come from fp32 matrix products, and every candidate within ``EPS`` of a query's m-th
best is scored again as a float64 dot product rounded to float32, so a score never depends on the block, the
generation or the BLAS kernel it was computed in, and the merged top-m of a query is the same whatever the
generations (for the exact search: byte-identical to a from-scratch run over the same units).

Layout under ``<search>/`` (``sdir``):

    exact/<kind>/<category>/g<G>/b<B>/h<H>.parquet      partial: block B of generation G x generation H
    ivf/<kind>/<category>/n<nlist>-p<nprobe>/train.json, centroids.npy   trained once (nlist, ranges)
        .../g<G>/lists/r<R>/b<B>.parquet     units of block B (gen G) whose list falls in range R
        .../g<G>/queries/b<B>.parquet        the query vectors of block B (written once)
        .../g<G>/probes/r<R>/b<B>.parquet    ids of block B's units probing a list of range R (+ the lists)
        .../g<G>/assign/b<B>.json            block B assigned (its files above are complete)
        .../partial/g<G>/b<B>/h<H>-r<R>.parquet   top-m of block B (gen G) among the units of gen H in range R

The centroids are reused while the category grows (a category retrains only when its wanted ``nlist``, about
units / LIST_ROWS, is more than twice or less than half the trained one, or the search params change), so an
incremental run's IVF lists differ from those a from-scratch run would train: its candidates can differ where
the IVF is approximate (a pair found by probing one set of lists and not the other); its scores never do.

Unit ids are positions in their generation's category (bucket files in order, rows in file order); a query
block is a run of consecutive bucket files. Same-source hits are excluded by comparing group ids (a 64-bit
hash of the video, or of the clip when ``same_source``), never by asking for more neighbours. Every step
skips the outputs that exist, so a killed run resumes where it stopped."""

from __future__ import annotations

import io
import json
import math

import numpy as np

from curation import pairing
from curation.execute import run_items
from curation.global_phase import quantizer
from curation.storage import Store, in_order

RANGE_ROWS = 65536  # database units per search task (about RANGE_ROWS x D x 4 bytes of vectors in memory)
BLOCK_ROWS = 16384  # query units per assign / merge task
EXACT_BLOCK_ROWS = 8192  # query units per exact search task (scored against one generation of a category)
EXACT_CHUNK_ROWS = 1024  # query rows per score matrix in an exact task (CHUNK x generation rows x 4 bytes)
# Training sample per list. faiss asks for >= 39; with 64 a list the centroids of a 600k-unit 768-d category
# were noisy enough that 32 probes found 0.94 of the exact in-band pairs, with 256 a list 0.98 (same probes,
# same search cost; k-means 17 s instead of 3 s on two threads).
TRAIN_PER_LIST = 256
TRAIN_PER_LIST_MIN = 64  # the sample per list once TRAIN_MAX caps it (large categories)
TRAIN_MAX = 262144  # at most this many training points (768-d: 800 MB) in the one training task
# Units per list: nlist grows with the category, so a query's work (nprobe x LIST_ROWS) does not.
LIST_ROWS = 1024
# One-level quantizer up to NLIST_MAX lists (4M units): one k-means over at most TRAIN_MAX points.
# Above it the quantizer has two levels: at most NLIST_MAX first-level cells of about SUB_LISTS lists
# each, every cell's lists trained on its own sample in its own task (README: "At scale").
NLIST_MAX = TRAIN_MAX // TRAIN_PER_LIST_MIN  # 4096
TWO_LEVEL_LISTS = NLIST_MAX  # above this many lists the quantizer has two levels
SUB_LISTS = 64  # lists per first-level cell (a cell: about SUB_LISTS x LIST_ROWS units)
NPROBE = 32  # lists probed per query when the params say 0
SCORE_ROWS = 4096  # candidate rows rescored in float64 at a time (was 65536: 2 x 384 MB at 768-d)
WIDEN_ROWS = 8192  # an indexed side of exact_scores up to this many rows is widened whole (48 MB at 768-d)
EPS = 1e-3  # candidates within EPS of a query's m-th fp32 score are scored again in float64
META = [
    "video_id",
    "clip_id",
    "subject",
    "v_n_clips",
    "phashes",
    "crop_path",
    "crop_box",
    "crop_box_tight",
    "crop_ref",
    "ref_t_s",
    "ref_frame_index",
]


def shape(n: int, pp: dict) -> dict:
    """nlist (about LIST_ROWS units a list, at most n / 39), nprobe, the training sample and the list ranges
    of a category of ``n`` units, and above TWO_LEVEL_LISTS lists the first-level cells of a two-level
    quantizer (at most NLIST_MAX). Lists of a fixed size and a fixed nprobe keep a query's work constant, so
    the search grows linearly with the category (with nlist ~ sqrt(n) it grew as n^1.5)."""
    nlist = max(1, min(math.ceil(n / LIST_ROWS), n // 39 or 1))
    if nlist <= TWO_LEVEL_LISTS:
        return {**_shape_of(nlist, pp), "train_n": train_size(n, nlist), "ranges": _ranges(n, nlist)}
    # two levels: the first trained like a one-level quantizer of ``cells`` lists; nlist is what the cells'
    # own k-means give (about the wanted one), fixed when the quantizer is trained (train.json)
    cells = min(NLIST_MAX, math.ceil(nlist / SUB_LISTS))
    sh = {**_shape_of(nlist, pp), "cells": cells, "train_n": train_size(n, cells)}
    return {**sh, "ranges": _ranges(n, nlist)}


def train_size(n: int, nlist: int) -> int:
    """The k-means sample of a category of ``n`` units: TRAIN_PER_LIST points a list, capped at TRAIN_MAX (a
    sample drawn once, seeded, whatever the size of the category). Above 1,024 lists the cap holds, so the
    sample per list falls, down to TRAIN_PER_LIST_MIN at NLIST_MAX."""
    return min(n, TRAIN_PER_LIST * nlist, TRAIN_MAX)


def _shape_of(nlist: int, pp: dict) -> dict:
    return {"nlist": nlist, "nprobe": min(nlist, pp["nprobe"] or NPROBE)}


def _ranges(n: int, nlist: int) -> int:
    return max(1, min(nlist, math.ceil(n / RANGE_ROWS)))


def blocks_of(parts: list, rows_per_block: int | None = None) -> list[dict]:
    """Query blocks: runs of consecutive (file, rows) parts of about ``rows_per_block`` (BLOCK_ROWS) units,
    with their first id."""
    target = rows_per_block or BLOCK_ROWS
    out, cur, r0, rows = [], [], 0, 0
    for f, n in parts:
        cur.append([f, n])
        rows += n
        if rows >= target:
            out.append({"r0": r0, "n": rows, "files": cur})
            r0, cur, rows = r0 + rows, [], 0
    if cur:
        out.append({"r0": r0, "n": rows, "files": cur})
    return out


def _hash64(values) -> np.ndarray:
    import pandas as pd

    return pd.util.hash_array(np.asarray(values, dtype=object)).view(np.int64)


def group_ids(t, same_source: bool) -> np.ndarray:
    """A 64-bit id per unit of its source (video, or clip when other clips of the same video may pair)."""
    return _hash64(t.column("clip_id" if same_source else "video_id").to_pylist())


def unit_ids(t) -> np.ndarray:
    """A stable 64-bit id per unit (its clip and subject): the tie-break between equal scores."""
    return _hash64(
        [f"{c}\t{s}" for c, s in zip(t.column("clip_id").to_pylist(), t.column("subject").to_pylist())]
    )


def _vectors(t, order: np.ndarray | None = None) -> np.ndarray:
    """The ``vector`` column as one unit-normalised (rows, D) float32 matrix (rows permuted by ``order``
    when given: row i is the table's row order[i]), filled a chunk at a time and normalised in place: no
    combined copy of the column, no second matrix."""
    col, n = t.column("vector"), t.num_rows
    if not n:
        return np.zeros((0, 0), np.float32)
    dest = None if order is None else np.argsort(order, kind="stable")  # table row -> matrix row
    x, a = None, 0
    for ch in col.chunks:
        if not len(ch):
            continue
        v = ch.flatten().to_numpy(zero_copy_only=False).reshape(len(ch), -1)
        if x is None:
            x = np.empty((n, v.shape[1]), np.float32)
        if dest is None:
            x[a : a + len(ch)] = v
        else:
            x[dest[a : a + len(ch)]] = v
        a += len(ch)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


def read_table(store: Store, rel: str, columns=None):
    """One Parquet file of the store, read from its file handle (no bytes copy of the file)."""
    import pyarrow.parquet as pq

    with store.open_input(rel) as f:
        return pq.read_table(f, columns=columns)


def _read_files(store: Store, files: list, columns=None):
    import pyarrow as pa

    return pa.concat_tables(list(in_order(lambda f: read_table(store, f[0], columns), files)))


def _write(store: Store, rel: str, table) -> None:
    from curation.global_phase.tables import write_parquet

    write_parquet(store, rel, table)


def _vec_col(x: np.ndarray):
    import pyarrow as pa

    n, dim = x.shape
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * dim)
    return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(x, np.float32).ravel()))


# ---------------------------------------------------------------------------------------------------------
# scoring: fp32 products, the near-best rescored in float64, ranked by (score, unit id)


def exact_scores(q: np.ndarray, c: np.ndarray, qi: np.ndarray | None = None, ci: np.ndarray | None = None):
    """Row-wise cosine of aligned unit rows (``q[qi]`` and ``c[ci]`` when the index arrays are given) as a
    float64 dot product rounded to float32: the same value for a pair whatever block, generation or kernel it
    is computed in. Gathered and widened SCORE_ROWS rows at a time (2 x SCORE_ROWS x D x 8 bytes); an indexed
    side with no more rows than there are pairs (and at most WIDEN_ROWS) is widened once and its float64 rows
    gathered (the same values; in a per-list rescoring a list's queries and units were rescored ~17 times a
    row, and widening each gathered copy again took two thirds of the search's time)."""
    n = len(q) if qi is None else len(qi)
    out = np.empty(n, np.float32)
    q64 = q.astype(np.float64) if qi is not None and len(q) <= min(n, WIDEN_ROWS) else None
    c64 = c.astype(np.float64) if ci is not None and len(c) <= min(n, WIDEN_ROWS) else None

    def rows(x, x64, idx, a):
        if idx is None:
            return x[a : a + SCORE_ROWS].astype(np.float64)
        sel = idx[a : a + SCORE_ROWS]
        return x64[sel] if x64 is not None else x[sel].astype(np.float64)

    for a in range(0, n, SCORE_ROWS):
        out[a : a + SCORE_ROWS] = np.einsum("ij,ij->i", rows(q, q64, qi, a), rows(c, c64, ci, a))
    return out


def top_m(
    q: np.ndarray,
    x: np.ndarray,
    qgroup: np.ndarray,
    cgroup: np.ndarray,
    cuid: np.ndarray,
    m: int,
    rescore: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each query row's best ``m`` rows of ``x`` from other groups: (query row, candidate row, score), sorted
    by query, then score descending, then candidate unit id. Every candidate within EPS of the row's m-th
    fp32 score is rescored exactly (``exact_scores``): ties and last-bit differences rank alike everywhere.
    ``rescore=False``: those candidates with their fp32 scores, unsorted (a superset of the best ``m``, for a
    caller that merges several lists first and rescores once, ``near_top``)."""
    if not len(q) or not len(x):
        z = np.zeros(0, np.int64)
        return z, z, np.zeros(0, np.float32)
    s = q @ x.T  # (b, n) fp32 cosine
    s[qgroup[:, None] == cgroup[None, :]] = -np.inf  # same source: filtered by id
    k = min(m, s.shape[1])
    kth = -np.partition(-s, k - 1, axis=1)[:, k - 1]
    qi, ci = np.nonzero(np.isfinite(s) & (s >= (kth - EPS)[:, None]))
    if not rescore:
        return qi, ci, s[qi, ci]
    sc = exact_scores(q, x, qi, ci)
    sel = _top_per_query(qi, -sc, cuid[ci], m)
    return qi[sel], ci[sel], sc[sel]


def near_top(qi: np.ndarray, s: np.ndarray, m: int) -> np.ndarray:
    """Indices of the fp32 candidates within EPS of their query's m-th best fp32 score (all of a query's when
    it has fewer than ``m``). Applied to the union of per-list supersets it keeps every candidate that can
    be in the query's exact top m (fp32 and float64 cosines differ by far less than EPS / 2), so rescoring
    only these gives the same top m as rescoring each list's."""
    if not len(qi):
        return np.zeros(0, np.int64)
    order = np.lexsort((-s, qi))
    q = qi[order]
    starts = np.r_[0, np.nonzero(q[1:] != q[:-1])[0] + 1]
    ends = np.r_[starts[1:], len(q)]
    kth = s[order[np.minimum(starts + m, ends) - 1]]  # per query: its m-th best (or its last) fp32 score
    bound = np.repeat(kth, ends - starts)
    return np.sort(order[s[order] >= bound - EPS])


def _top_per_query(qid: np.ndarray, neg_score: np.ndarray, cid: np.ndarray, m: int) -> np.ndarray:
    """Indices of the best ``m`` rows per query (score descending, then candidate id), sorted by query."""
    order = np.lexsort((cid, neg_score, qid))
    q = qid[order]
    starts = np.r_[True, q[1:] != q[:-1]] if len(q) else np.zeros(0, bool)
    first = np.maximum.accumulate(np.where(starts, np.arange(len(q)), 0)) if len(q) else np.zeros(0, int)
    return order[(np.arange(len(q)) - first) < m]


def _partial(meta, ci: np.ndarray, qid: np.ndarray, sc: np.ndarray, cuid: np.ndarray):
    import pyarrow as pa

    out = meta.take(pa.array(ci, pa.int64())).append_column("qid", pa.array(qid, pa.int64()))
    return out.append_column("score", pa.array(sc, pa.float32())).append_column(
        "cuid", pa.array(cuid, pa.int64())
    )


# ---------------------------------------------------------------------------------------------------------
# exact blocked search (small categories): one item per (query block, generation searched)


def exact_block(item: dict, store: Store, params: dict) -> dict:
    """Query block B of generation G against every unit of generation H: its partial top-m."""
    out = item["out"]
    if store.exists(out):
        return {"skipped": 1, "scored": 0, "read": 0}
    qt = _read_files(store, item["files"], ["vector", "video_id", "clip_id"])
    db = _read_files(store, item["db"], ["vector", *META])
    q, x = _vectors(qt), _vectors(db)
    qg, cg = group_ids(qt, params["same_source"]), group_ids(db, params["same_source"])
    cuid = unit_ids(db)
    got_q, got_c, got_s = [], [], []
    for a in range(0, len(q), EXACT_CHUNK_ROWS):
        qi, ci, sc = top_m(q[a : a + EXACT_CHUNK_ROWS], x, qg[a : a + EXACT_CHUNK_ROWS], cg, cuid, item["m"])
        got_q.append(qi + a)
        got_c.append(ci)
        got_s.append(sc)
    qi, ci, sc = np.concatenate(got_q), np.concatenate(got_c), np.concatenate(got_s)
    _write(store, out, _partial(db.drop_columns(["vector"]), ci, qi + item["r0"], sc, cuid[ci]))
    return {"skipped": 0, "scored": int(len(q)) * int(len(x)), "read": int(len(q) + len(x))}


def exact_items(sdir: str, key: str, gens: list[list], m: int) -> tuple[list[dict], list[dict]]:
    """The exact search of one category whose generations have the parts ``gens``: its search items (one per
    query block and generation searched) and its query blocks, each with the partial files to merge."""
    d = f"{sdir}/exact/{key}"
    items, blocks = [], []
    for g, parts in enumerate(gens):
        for b, blk in enumerate(blocks_of(parts, EXACT_BLOCK_ROWS)):
            outs = [f"{d}/g{g:04d}/b{b:06d}/h{h:04d}.parquet" for h in range(len(gens)) if gens[h]]
            items += [
                {**blk, "db": gens[h], "m": m, "out": f"{d}/g{g:04d}/b{b:06d}/h{h:04d}.parquet"}
                for h in range(len(gens))
                if gens[h]
            ]
            blocks.append({**blk, "gen": g, "block": b, "partials": outs})
    return items, blocks


# ---------------------------------------------------------------------------------------------------------
# the sharded IVF search (large categories): train, assign, search, each an item function for run_items


def train(item: dict, store: Store) -> dict:
    """k-means (spherical, faiss) on a seeded sample of ``train_n`` units, read one bucket file at a time;
    ``train.json`` (nlist, nprobe, ranges) is written after the centroids."""
    out = f"{item['dir']}/centroids.npy"
    if store.exists(f"{item['dir']}/train.json"):
        return {"skipped": 1}
    n, k = item["n"], item["train_n"]
    chosen = np.sort(np.random.default_rng(item["seed"]).choice(n, k, replace=False))
    x, off = None, 0  # the sample filled in place, one bucket file at a time (no list of pieces to join)
    for f, rows in item["files"]:
        lo, hi = np.searchsorted(chosen, [off, off + rows])
        if hi > lo:
            v = _vectors(read_table(store, f, ["vector"]))[chosen[lo:hi] - off]
            x = np.empty((k, v.shape[1]), np.float32) if x is None else x
            x[lo:hi] = v
        off += rows
    _save(store, out, quantizer.kmeans(x, item["nlist"]))
    keep = ("nlist", "nprobe", "ranges", "train_n", "n")
    store.write_json(f"{item['dir']}/train.json", {k: item[k] for k in keep})
    return {"skipped": 0, "trained_on": int(len(x))}


def _save(store: Store, rel: str, a: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, a)
    store.write_bytes(rel, buf.getvalue())


def _load(store: Store, rel: str) -> np.ndarray:
    return np.load(io.BytesIO(store.read_bytes(rel)), allow_pickle=False)


def _centroids(store: Store, d: str) -> np.ndarray:
    return _load(store, f"{d}/centroids.npy")


def _cell_ranges(n: int, cells: int, rate: float) -> int:
    """Tasks of the second-level training: about RANGE_ROWS sampled units each, whole cells."""
    return max(1, min(cells, math.ceil(rate * n / RANGE_ROWS)))


def _cells_of_range(r: int, cells: int, n_ranges: int) -> np.ndarray:
    return np.nonzero(np.arange(cells) * n_ranges // cells == r)[0]


def cell_sample(item: dict, store: Store) -> dict:
    """One block of a two-level quantizer's category: the units drawn for the second-level training (a
    seeded draw by unit id at ``rate``, so a rerun draws the same) with their nearest first-level cell,
    written per range of cells."""
    import pyarrow as pa

    d, b, cells, n_ranges = item["dir"], item["block"], item["cells"], item["cell_ranges"]
    done = f"{d}/level2/sample/b{b:06d}.json"
    if store.exists(done):
        return {"skipped": 1}
    t = _read_files(store, item["files"], ["vector", "clip_id", "subject"])
    keep = np.nonzero((unit_ids(t) & 0xFFFFF) < int(item["rate"] * (1 << 20)))[0]
    x = _vectors(t.select(["vector"]).take(pa.array(keep, pa.int64())))
    del t
    cell = quantizer.nearest(x, _centroids(store, f"{d}/level1"), 1)[:, 0] if len(x) else np.zeros(0, int)
    of_range = cell * n_ranges // cells
    for r in range(n_ranges):
        sel = np.nonzero(of_range == r)[0]
        part = pa.table({"cell": pa.array(cell[sel].astype(np.int32)), "vector": _vec_col(x[sel])})
        _write(store, f"{d}/level2/sample/r{r:05d}/b{b:06d}.parquet", part)
    store.write_json(done, {"rows": int(len(keep))})
    return {"skipped": 0}


def train_cells(item: dict, store: Store) -> dict:
    """One range of first-level cells: each cell's lists (about its units / LIST_ROWS, k-means on the cell's
    sample), saved with the number of lists of every cell of the range."""
    import pyarrow as pa

    d, r = item["dir"], item["range"]
    out = f"{d}/level2/r{r:05d}"
    if store.exists(f"{out}.json"):
        return {"skipped": 1}
    t = pa.concat_tables(
        [read_table(store, f"{d}/level2/sample/r{r:05d}/b{b:06d}.parquet") for b in range(item["blocks"])]
    )
    cell = t.column("cell").to_numpy()
    order = np.argsort(cell, kind="stable")
    x, cell = _vectors(t, order), cell[order]
    del t
    mats, counts = [], []
    for c in _cells_of_range(r, item["cells"], item["cell_ranges"]):
        a, e = np.searchsorted(cell, [c, c + 1])
        k = quantizer.lists_per_cell(e - a, item["rate"], LIST_ROWS, TRAIN_PER_LIST_MIN) if e > a else 0
        if k:
            mats.append(quantizer.kmeans(x[a:e], k))
        counts.append(k)
    dim = x.shape[1] if x.size else 0
    _save(store, f"{out}.npy", np.concatenate(mats) if mats else np.zeros((0, dim), np.float32))
    store.write_json(f"{out}.json", {"lists": counts})
    return {"skipped": 0, "lists": int(sum(counts))}


def join_cells(item: dict, store: Store) -> dict:
    """Every list's centroid in cell order (``centroids.npy``), the HNSW graph over them (``lists.hnsw``),
    then ``train.json`` (the final nlist and its list ranges), written last."""
    d = item["dir"]
    if store.exists(f"{d}/train.json"):
        return {"skipped": 1}
    mats = [_load(store, f"{d}/level2/r{r:05d}.npy") for r in range(item["cell_ranges"])]
    c = np.concatenate([m for m in mats if len(m)])
    del mats
    _save(store, f"{d}/centroids.npy", c)
    store.write_bytes(f"{d}/lists.hnsw", quantizer.hnsw(c))
    sh = {**_shape_of(len(c), item["pp"]), "ranges": _ranges(item["n"], len(c))}
    store.write_json(
        f"{d}/train.json", {**sh, "cells": item["cells"], "train_n": item["train_n"], "n": item["n"]}
    )
    return {"skipped": 0}


def train_two_level(store: Store, d: str, files: list, n: int, sh: dict, pp: dict, runner: str) -> None:
    """The two-level quantizer of a category under ``d``: the first level (``train`` of ``cells`` lists, under
    ``d/level1``), a sample drawn per query block and split by cell range, each range's cells trained in their
    own task, and the lists joined. Each step skips the outputs that exist."""
    cells = sh["cells"]
    first = {"dir": f"{d}/level1", "files": files, "seed": 0, "nlist": cells, "nprobe": 1, "ranges": 1}
    run_items([{**first, "n": n, "train_n": sh["train_n"]}], train, runner, store=store)
    rate = min(1.0, TRAIN_PER_LIST / LIST_ROWS)  # TRAIN_PER_LIST training units a list of LIST_ROWS
    n_ranges = _cell_ranges(n, cells, rate)
    blocks = blocks_of(files)
    common = {"dir": d, "cells": cells, "cell_ranges": n_ranges, "rate": rate}
    items = [{**common, "block": b, "files": blk["files"]} for b, blk in enumerate(blocks)]
    run_items(items, cell_sample, runner, store=store)
    items = [{**common, "range": r, "blocks": len(blocks)} for r in range(n_ranges)]
    run_items(items, train_cells, runner, store=store)
    run_items([{**common, "n": n, "pp": pp, "train_n": sh["train_n"]}], join_cells, runner, store=store)


def assign(item: dict, store: Store, params: dict) -> dict:
    """One query block of one generation: each unit's list (its nearest centroid) and the ``nprobe`` lists it
    probes; the units written to their list range, the block's query vectors once (``queries/``), and per
    range the queries that probe it with the lists they probe there (ids only: a query's vector is written
    once, not once per range it probes, which at 1M units was ten copies of every vector)."""
    import pyarrow as pa

    d, gd, b = item["dir"], item["gdir"], item["block"]
    done = f"{gd}/assign/b{b:06d}.json"
    if store.exists(done):
        return {"skipped": 1}
    c = _centroids(store, d)
    nlist, nprobe, n_ranges = c.shape[0], item["nprobe"], item["ranges"]
    t = _read_files(store, item["files"], ["vector", *META])
    x = _vectors(t)
    ids = np.arange(item["r0"], item["r0"] + t.num_rows, dtype=np.int64)
    grp = group_ids(t, params["same_source"])
    uid = unit_ids(t)
    top = _probed(store, d, x, c, nprobe, item.get("cells", 0))  # (b, nprobe) probed lists, nearest first
    own = top[:, 0]
    rng_of = lambda lists: lists * n_ranges // nlist  # noqa: E731  contiguous ranges of lists
    meta = t.drop_columns(["vector"])
    queries = pa.table({"qid": pa.array(ids), "qgroup": pa.array(grp), "vector": _vec_col(x)})
    _write(store, f"{gd}/queries/b{b:06d}.parquet", queries)
    del queries
    for r in range(n_ranges):
        sel = np.nonzero(rng_of(own) == r)[0]
        db = meta.take(pa.array(sel)).append_column("cuid", pa.array(uid[sel]))
        db = db.append_column("cgroup", pa.array(grp[sel])).append_column(
            "list", pa.array(own[sel].astype(np.int32))
        )
        db = db.append_column("vector", _vec_col(x[sel]))
        _write(store, f"{gd}/lists/r{r:05d}/b{b:06d}.parquet", db)
        hit = rng_of(top) == r  # (b, nprobe)
        qsel = np.nonzero(hit.any(1))[0]
        lists = [top[i][hit[i]].astype(np.int32) for i in qsel]
        probes = pa.table(
            {"qid": pa.array(ids[qsel]), "lists": pa.array([v.tolist() for v in lists], pa.list_(pa.int32()))}
        )
        _write(store, f"{gd}/probes/r{r:05d}/b{b:06d}.parquet", probes)
    store.write_bytes(done, json.dumps({"rows": int(t.num_rows)}).encode())
    return {"skipped": 0}


def _probed(store: Store, d: str, x: np.ndarray, c: np.ndarray, nprobe: int, cells: int) -> np.ndarray:
    """(rows, nprobe) the lists each row probes, nearest first; the first is the row's own list. Two levels
    (and fewer probes than lists): found through the HNSW graph over the list centroids (-1 where it returns
    fewer), every list scored for the rare row it returns none for."""
    if not cells or nprobe >= c.shape[0]:
        return quantizer.nearest(x, c, nprobe)
    top = quantizer.nearest_hnsw(x, store.read_bytes(f"{d}/lists.hnsw"), nprobe)
    bad = np.nonzero(top[:, 0] < 0)[0]
    if len(bad):
        top[bad] = quantizer.nearest(x[bad], c, nprobe)
    return top


def _probing(store: Store, gd: str, b: int, p) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The vectors, ids and groups of the queries of block ``b`` named in the probes table ``p``, read from
    the block's query file (a probes file of the earlier layout carries its own vectors and groups)."""
    import pyarrow as pa

    qid = p.column("qid").to_numpy()
    if "vector" in p.column_names:
        return _vectors(p), qid, p.column("qgroup").to_numpy()
    qt = read_table(store, f"{gd}/queries/b{b:06d}.parquet")
    pos = np.searchsorted(qt.column("qid").to_numpy(), qid)
    qgroup = qt.column("qgroup").to_numpy()[pos]
    return _vectors(qt.select(["vector"]).take(pa.array(pos))), qid, qgroup


def search(item: dict, store: Store, params: dict) -> dict:
    """One list range of one generation H against the query blocks (of any generation) that probe it and have
    no partial for it yet, one block at a time: per list, the scores of its probing queries against its units
    (other groups only), then the best ``m`` per query."""
    import pyarrow as pa

    d, h, r, m = item["dir"], item["h"], item["range"], item["m"]
    todo = [
        (g, b)
        for g, b in item["queries"]
        if not store.exists(f"{d}/partial/g{g:04d}/b{b:06d}/h{h:04d}-r{r:05d}.parquet")
    ]
    if not todo:
        return {"skipped": 1, "scored": 0, "read": 0}
    gd = f"{d}/g{h:04d}"
    db = pa.concat_tables(list(in_order(lambda b: read_table(store, f"{gd}/lists/r{r:05d}/b{b:06d}.parquet"),
                                        item["db"])))
    # the units sorted by list: numpy columns and one normalised matrix; the metadata stays in file order
    # (``order`` maps a sorted row back to it), so the range's vectors are held once
    order = np.argsort(db.column("list").to_numpy(), kind="stable")
    lists = db.column("list").to_numpy()[order]
    cgroup, cuid = db.column("cgroup").to_numpy()[order], db.column("cuid").to_numpy()[order]
    x = _vectors(db, order)
    meta = db.drop_columns(["vector", "cgroup", "list", "cuid"])
    scored, read = 0, db.num_rows
    del db
    uniq, starts = np.unique(lists, return_index=True)
    ends = np.r_[starts[1:], len(lists)]
    span = {int(lst): (int(a), int(e)) for lst, a, e in zip(uniq, starts, ends)}
    for g, b in todo:
        p = read_table(store, f"{d}/g{g:04d}/probes/r{r:05d}/b{b:06d}.parquet")
        read += p.num_rows
        q, qid, qgroup = _probing(store, f"{d}/g{g:04d}", b, p)
        lcol = p.column("lists").combine_chunks()
        flat = lcol.flatten().to_numpy()
        owner = np.repeat(np.arange(len(lcol)), np.diff(lcol.offsets.to_numpy()))
        got_q, got_c, got_s = [], [], []
        for lst in np.unique(flat):
            if int(lst) not in span:
                continue
            a, e = span[int(lst)]
            qs = owner[flat == lst]
            qi, ci, sc = top_m(q[qs], x[a:e], qgroup[qs], cgroup[a:e], cuid[a:e], m, rescore=False)
            scored += len(qs) * (e - a)
            got_q.append(qs[qi])
            got_c.append(ci + a)
            got_s.append(sc)
        qi = np.concatenate(got_q) if got_q else np.zeros(0, np.int64)
        ci = np.concatenate(got_c) if got_c else np.zeros(0, np.int64)
        sc = np.concatenate(got_s) if got_s else np.zeros(0, np.float32)
        # the lists' fp32 supersets merged per query, then one exact rescoring of what can be in its top m
        # (rescoring each list's top m did ~4x the float64 work at 1M units: a query probes several lists
        # of a range and keeps m of all of them)
        keep = near_top(qi, sc, m)
        qi, ci = qi[keep], ci[keep]
        sc = exact_scores(q, x, qi, ci)
        sel = _top_per_query(qid[qi], -sc, cuid[ci], m)
        out = _partial(meta, order[ci[sel]], qid[qi[sel]], sc[sel], cuid[ci[sel]])
        _write(store, f"{d}/partial/g{g:04d}/b{b:06d}/h{h:04d}-r{r:05d}.parquet", out)
    return {"skipped": 0, "scored": int(scored), "read": int(read)}


def trained_dir(store: Store, d: str, n: int, pp: dict) -> tuple[str, dict]:
    """The IVF of a category of ``n`` units under ``d``: a trained one (``d/trained.json`` lists them) whose
    nlist is within a factor two of the wanted one and whose nprobe is what the params ask for it (reused:
    its centroids stay while the category grows), else a new one to train."""
    want = shape(n, pp)
    for got in store.read_json(f"{d}/trained.json") or []:
        if want["nlist"] / 2 <= got["nlist"] <= want["nlist"] * 2 and _shape_of(got["nlist"], pp) == {
            "nlist": got["nlist"],
            "nprobe": got["nprobe"],
        }:
            return got["dir"], store.read_json(f"{got['dir']}/train.json")
    return f"{d}/n{want['nlist']}-p{want['nprobe']}", want


def search_category(store: Store, gens: list[list], pp: dict, d: str, runner: str) -> tuple[list, dict]:
    """Train (or reuse), assign and search one category under ``d`` whose generations have the parts
    ``gens``; returns its query blocks (each with the partial files to merge) and the work done."""
    n = sum(k for parts in gens for _, k in parts)
    m = pp["candidates"]
    dn, sh = trained_dir(store, d, n, pp)
    every = [p for parts in gens for p in parts]
    tr = {"nlist": sh["nlist"], "nprobe": sh["nprobe"], "ranges": sh["ranges"], "n": n}
    tr["train_n"] = sh.get("train_n", train_size(n, sh["nlist"]))
    if sh.get("cells"):
        train_two_level(store, dn, every, n, {**sh, **tr}, pp, runner)
    else:
        run_items([{"dir": dn, "files": every, "seed": 0, **tr}], train, runner, store=store)
    sh = store.read_json(f"{dn}/train.json")
    known = store.read_json(f"{d}/trained.json") or []
    if dn not in [k["dir"] for k in known]:
        store.write_json(
            f"{d}/trained.json", [*known, {"dir": dn, "nlist": sh["nlist"], "nprobe": sh["nprobe"]}]
        )
    by_gen = [blocks_of(parts) for parts in gens]
    blocks = [
        {
            **blk,
            "gen": g,
            "block": b,
            "dir": dn,
            "gdir": f"{dn}/g{g:04d}",
            "nprobe": sh["nprobe"],
            "ranges": sh["ranges"],
            "cells": sh.get("cells", 0),
        }
        for g, gb in enumerate(by_gen)
        for b, blk in enumerate(gb)
    ]
    run_items(blocks, assign, runner, store=store, params=pp)
    queries = [[blk["gen"], blk["block"]] for blk in blocks]
    items = [
        {"dir": dn, "h": h, "range": r, "m": m, "db": list(range(len(by_gen[h]))), "queries": queries}
        for h in range(len(gens))
        if by_gen[h]
        for r in range(sh["ranges"])
    ]
    res = run_items(items, search, runner, store=store, params=pp)
    for blk in blocks:
        blk["partials"] = [
            f"{dn}/partial/g{blk['gen']:04d}/b{blk['block']:06d}/h{h:04d}-r{r:05d}.parquet"
            for h in range(len(gens))
            if by_gen[h]
            for r in range(sh["ranges"])
        ]
    return blocks, _work(res)


def _work(res: list[dict]) -> dict:
    return {
        "scored": int(sum(r.get("scored", 0) for r in res)),
        "read": int(sum(r.get("read", 0) for r in res)),
        "tasks_run": int(sum(1 - r.get("skipped", 0) for r in res)),
        "tasks_skipped": int(sum(r.get("skipped", 0) for r in res)),
    }


def search_exact(store: Store, gens: list[list], pp: dict, sdir: str, key: str, runner: str):
    """The exact blocked search of one category: its query blocks (with their partials) and the work done."""
    items, blocks = exact_items(sdir, key, gens, pp["candidates"])
    res = run_items(items, exact_block, runner, store=store, params=pp)
    return blocks, _work(res)


def merged(partials: list[str], store: Store, r0: int, n: int, m: int):
    """The best ``m`` candidates of each query of a block over its partials: Neighbours with ids local to the
    block's rows, and the candidates' metadata in the order of ``np.nonzero(idx >= 0)``. The top m is picked
    on each partial's (qid, score, cuid) columns; the metadata of the winners is then read one partial at a
    time, so a task holds the block's top m rows of metadata, not every partial's."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = [f for f, there in zip(partials, in_order(store.exists, partials)) if there]
    nb = pairing.Neighbours(np.full((n, m), -1, np.int64), np.full((n, m), -np.inf, np.float32))
    if not files:
        return nb, None
    slim = list(in_order(lambda f: read_table(store, f, ["qid", "score", "cuid"]), files))
    src = np.concatenate([np.full(t.num_rows, i, np.int32) for i, t in enumerate(slim)])
    row = np.concatenate([np.arange(t.num_rows, dtype=np.int64) for t in slim])
    t = pa.concat_tables(slim)
    qid, sc = t.column("qid").to_numpy(), t.column("score").to_numpy()
    sel = _top_per_query(qid, -sc, t.column("cuid").to_numpy(), m)
    del t, slim
    qid, sc, src, row = qid[sel], sc[sel], src[sel], row[sel]
    pieces, pos = [], []
    for i, f in enumerate(files):
        k = np.nonzero(src == i)[0]
        if len(k):
            full = read_table(store, f)
            pieces.append(full.take(pa.array(row[k])).drop_columns(["qid", "score", "cuid"]))
            pos.append(k)
            del full
    if pieces:
        back = np.argsort(np.concatenate(pos), kind="stable")
        cands = pa.concat_tables(pieces).take(pa.array(back))
    else:
        with store.open_input(files[0]) as fh:
            schema = pq.read_schema(fh)
        cands = schema.empty_table().drop_columns(["qid", "score", "cuid"])
    starts = np.r_[True, qid[1:] != qid[:-1]] if len(qid) else np.zeros(0, bool)
    first = np.maximum.accumulate(np.where(starts, np.arange(len(qid)), 0)) if len(qid) else np.zeros(0, int)
    rank = np.arange(len(qid)) - first
    nb.idx[qid - r0, rank] = 0  # a placeholder >= 0: the candidate's metadata comes from ``cands``
    nb.score[qid - r0, rank] = sc
    return nb, cands
