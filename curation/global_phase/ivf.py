"""Sharded nearest-neighbour search of one large (kind, category): an IVF coarse quantizer trained once on a
sample, every unit assigned to its list, vectors written to the store partitioned by list range, query blocks
joined to the list ranges they probe, top-m merged per query. No task holds more than one list range (or one
query block): memory per task is set by ``RANGE_ROWS`` / ``BLOCK_ROWS``, not by the category's size.

Layout under ``<pdir>/ivf/<kind>/<category>/``:

    centroids.npy                        (nlist, D) unit rows, trained on a sample of >= 39 x nlist units
    lists/r<R>/b<B>.parquet              units of query block B whose list falls in range R (+ their metadata)
    probes/r<R>/b<B>.parquet             units of block B probing a list of range R: id, group, vector, lists
    assign/b<B>.json                     block B assigned (its files above are complete)
    partial/b<B>/r<R>.parquet            top-m per query of block B among the units of range R

Unit ids are positions in the category (gather order: bucket files, rows in file order), the same ids the
exact search uses; a query block is a run of consecutive bucket files. Same-source hits are excluded by
comparing group ids (a 64-bit hash of the video, or of the clip when ``same_source``), never by asking for
more neighbours. Every step skips the outputs that exist, so a killed run resumes where it stopped."""

from __future__ import annotations

import io
import json
import math

import numpy as np

from curation import pairing
from curation.execute import run_items
from curation.storage import Store

RANGE_ROWS = 65536  # database units per search task (about RANGE_ROWS x D x 4 bytes of vectors in memory)
BLOCK_ROWS = 16384  # query units per assign / merge task
TRAIN_PER_LIST = 64  # training sample per list (faiss asks for >= 39)
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
    """nlist (a power of two near sqrt(n), at most n / 39), nprobe, the training sample and the list ranges
    of a category of ``n`` units."""
    nlist = 2 ** max(0, round(math.log2(max(1.0, math.sqrt(n)))))
    nlist = max(1, min(nlist, n // 39 or 1))
    nprobe = min(nlist, pp["nprobe"] or pairing.auto_nprobe(nlist))
    return {
        "nlist": nlist,
        "nprobe": nprobe,
        "train_n": min(n, TRAIN_PER_LIST * nlist),
        "ranges": max(1, min(nlist, math.ceil(n / RANGE_ROWS))),
    }


def blocks_of(parts: list) -> list[dict]:
    """Query blocks: runs of consecutive (file, rows) parts of about BLOCK_ROWS units, with their first id."""
    out, cur, r0, rows = [], [], 0, 0
    for f, n in parts:
        cur.append([f, n])
        rows += n
        if rows >= BLOCK_ROWS:
            out.append({"r0": r0, "n": rows, "files": cur})
            r0, cur, rows = r0 + rows, [], 0
    if cur:
        out.append({"r0": r0, "n": rows, "files": cur})
    return out


def group_ids(t, same_source: bool) -> np.ndarray:
    """A 64-bit id per unit of its source (video, or clip when other clips of the same video may pair)."""
    import pandas as pd

    col = t.column("clip_id" if same_source else "video_id").to_pylist()
    return pd.util.hash_array(np.asarray(col, dtype=object)).view(np.int64)


def _vectors(t) -> np.ndarray:
    vec = t.column("vector").combine_chunks()
    x = np.asarray(vec.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(t.num_rows, -1)
    return pairing.normalize(x)


def read_table(store: Store, rel: str, columns=None):
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(store.read_bytes(rel)), columns=columns)


def _write(store: Store, rel: str, table) -> None:
    from curation.global_phase.tables import write_parquet

    write_parquet(store, rel, table)


# ---------------------------------------------------------------------------------------------------------
# the steps (each an item function for run_items)


def train(item: dict, store: Store) -> dict:
    """k-means (spherical, faiss) on a seeded sample of ``train_n`` units, read one bucket file at a time."""
    import faiss

    out = f"{item['dir']}/centroids.npy"
    if store.exists(out):
        return {"skipped": 1}
    n, k = item["n"], item["train_n"]
    chosen = np.sort(np.random.default_rng(item["seed"]).choice(n, k, replace=False))
    xs, off = [], 0
    for f, rows in item["files"]:
        lo, hi = np.searchsorted(chosen, [off, off + rows])
        if hi > lo:
            xs.append(_vectors(read_table(store, f, ["vector"]))[chosen[lo:hi] - off])
        off += rows
    x = np.ascontiguousarray(np.concatenate(xs))
    faiss.omp_set_num_threads(1)
    km = faiss.Kmeans(x.shape[1], item["nlist"], niter=20, seed=1234, spherical=True, verbose=False)
    km.cp.max_points_per_centroid = max(1, k // item["nlist"] + 1)  # the sample is the size we chose
    km.cp.min_points_per_centroid = 1
    km.train(x)
    buf = io.BytesIO()
    np.save(buf, pairing.normalize(km.centroids))
    store.write_bytes(out, buf.getvalue())
    return {"skipped": 0, "trained_on": int(len(x))}


def _centroids(store: Store, d: str) -> np.ndarray:
    return np.load(io.BytesIO(store.read_bytes(f"{d}/centroids.npy")), allow_pickle=False)


def assign(item: dict, store: Store, params: dict) -> dict:
    """One query block: each unit's list (its nearest centroid) and the ``nprobe`` lists it probes; the units
    written to their list range, the queries to every range they probe."""
    import pyarrow as pa

    d, b = item["dir"], item["block"]
    done = f"{d}/assign/b{b:06d}.json"
    if store.exists(done):
        return {"skipped": 1}
    c = _centroids(store, d)
    nlist, nprobe, n_ranges = c.shape[0], item["nprobe"], item["ranges"]
    t = pa.concat_tables([read_table(store, f, ["vector", *META]) for f, _ in item["files"]])
    x = _vectors(t)
    ids = np.arange(item["r0"], item["r0"] + t.num_rows, dtype=np.int64)
    grp = group_ids(t, params["same_source"])
    s = x @ c.T  # (b, nlist)
    top = np.argsort(-s, axis=1, kind="stable")[:, :nprobe]  # (b, nprobe) probed lists, nearest first
    own = top[:, 0]
    rng_of = lambda lists: lists * n_ranges // nlist  # noqa: E731  contiguous ranges of lists
    meta = t.drop_columns(["vector"])
    for r in range(n_ranges):
        sel = np.nonzero(rng_of(own) == r)[0]
        db = meta.take(pa.array(sel)).append_column("cid", pa.array(ids[sel]))
        db = db.append_column("cgroup", pa.array(grp[sel])).append_column(
            "list", pa.array(own[sel].astype(np.int32))
        )
        db = db.append_column("vector", _vec_col(x[sel]))
        _write(store, f"{d}/lists/r{r:05d}/b{b:06d}.parquet", db)
        hit = rng_of(top) == r  # (b, nprobe)
        qsel = np.nonzero(hit.any(1))[0]
        lists = [top[i][hit[i]].astype(np.int32) for i in qsel]
        probes = pa.table(
            {
                "qid": pa.array(ids[qsel]),
                "qgroup": pa.array(grp[qsel]),
                "lists": pa.array([v.tolist() for v in lists], pa.list_(pa.int32())),
                "vector": _vec_col(x[qsel]),
            }
        )
        _write(store, f"{d}/probes/r{r:05d}/b{b:06d}.parquet", probes)
    store.write_bytes(done, json.dumps({"rows": int(t.num_rows)}).encode())
    return {"skipped": 0}


def _vec_col(x: np.ndarray):
    import pyarrow as pa

    n, dim = x.shape
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * dim)
    return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(x, np.float32).ravel()))


def search(item: dict, store: Store, params: dict) -> dict:
    """One list range against every query block that probes it, one block at a time: per list, the exact
    scores of its probing queries against its units (other groups only), then the best ``m`` per query."""
    import pyarrow as pa

    d, r, m = item["dir"], item["range"], item["m"]
    todo = [b for b in item["blocks"] if not store.exists(f"{d}/partial/b{b:06d}/r{r:05d}.parquet")]
    if not todo:
        return {"skipped": 1, "scored": 0}
    db = pa.concat_tables([read_table(store, f"{d}/lists/r{r:05d}/b{b:06d}.parquet") for b in item["blocks"]])
    order = np.argsort(db.column("list").to_numpy(), kind="stable")
    db = db.take(pa.array(order))
    lists = db.column("list").to_numpy()
    x, cgroup = _vectors(db), db.column("cgroup").to_numpy()
    meta = db.drop_columns(["vector", "cgroup", "list"])
    uniq, starts = np.unique(lists, return_index=True)
    ends = np.r_[starts[1:], len(lists)]
    span = {int(lst): (int(a), int(e)) for lst, a, e in zip(uniq, starts, ends)}
    scored = 0
    for b in todo:
        p = read_table(store, f"{d}/probes/r{r:05d}/b{b:06d}.parquet")
        q, qid, qgroup = _vectors(p), p.column("qid").to_numpy(), p.column("qgroup").to_numpy()
        lcol = p.column("lists").combine_chunks()
        flat = lcol.flatten().to_numpy()
        owner = np.repeat(np.arange(len(lcol)), np.diff(lcol.offsets.to_numpy()))
        got_q, got_c, got_s = [], [], []
        for lst in np.unique(flat):
            if int(lst) not in span:
                continue
            a, e = span[int(lst)]
            qs = owner[flat == lst]
            s = q[qs] @ x[a:e].T  # (queries probing lst, units in lst) exact fp32 cosine
            s[qgroup[qs][:, None] == cgroup[None, a:e]] = -np.inf  # same source: filtered by id
            scored += s.size
            k = min(m, s.shape[1])
            top = (
                np.argpartition(-s, k - 1, axis=1)[:, :k]
                if k < s.shape[1]
                else np.tile(np.arange(k), (len(qs), 1))
            )
            got_q.append(np.repeat(qs, k))
            got_c.append((top + a).ravel())
            got_s.append(np.take_along_axis(s, top, 1).ravel())
        qi = np.concatenate(got_q) if got_q else np.zeros(0, np.int64)
        ci = np.concatenate(got_c) if got_c else np.zeros(0, np.int64)
        sc = np.concatenate(got_s).astype(np.float32) if got_s else np.zeros(0, np.float32)
        keep = np.isfinite(sc)
        qi, ci, sc = qi[keep], ci[keep], sc[keep]
        sel = _top_per_query(qid[qi], -sc, db.column("cid").to_numpy()[ci], m)
        out = meta.take(pa.array(ci[sel])).append_column("qid", pa.array(qid[qi[sel]]))
        out = out.append_column("score", pa.array(sc[sel]))
        _write(store, f"{d}/partial/b{b:06d}/r{r:05d}.parquet", out)
    return {"skipped": 0, "scored": int(scored)}


def _top_per_query(qid: np.ndarray, neg_score: np.ndarray, cid: np.ndarray, m: int) -> np.ndarray:
    """Indices of the best ``m`` rows per query (score descending, then candidate id), sorted by query."""
    order = np.lexsort((cid, neg_score, qid))
    q = qid[order]
    starts = np.r_[True, q[1:] != q[:-1]] if len(q) else np.zeros(0, bool)
    first = np.maximum.accumulate(np.where(starts, np.arange(len(q)), 0)) if len(q) else np.zeros(0, int)
    return order[(np.arange(len(q)) - first) < m]


def merged(item: dict, store: Store, m: int):
    """The best ``m`` candidates of each query of a block over the ranges it probed: Neighbours with ids
    local to the block's rows, and the candidates' metadata in the order of ``np.nonzero(idx >= 0)``."""
    import pyarrow as pa

    d, b, r0, n = item["dir"], item["block"], item["r0"], item["n"]
    parts = [
        read_table(store, f"{d}/partial/b{b:06d}/r{r:05d}.parquet")
        for r in range(item["ranges"])
        if store.exists(f"{d}/partial/b{b:06d}/r{r:05d}.parquet")
    ]
    t = pa.concat_tables(parts)
    qid, sc = t.column("qid").to_numpy(), t.column("score").to_numpy()
    sel = _top_per_query(qid, -sc, t.column("cid").to_numpy(), m)
    t = t.take(pa.array(sel))
    qid, sc = qid[sel], sc[sel]
    nb = pairing.Neighbours(np.full((n, m), -1, np.int64), np.full((n, m), -np.inf, np.float32))
    starts = np.r_[True, qid[1:] != qid[:-1]] if len(qid) else np.zeros(0, bool)
    first = np.maximum.accumulate(np.where(starts, np.arange(len(qid)), 0)) if len(qid) else np.zeros(0, int)
    rank = np.arange(len(qid)) - first
    nb.idx[qid - r0, rank] = 0  # a placeholder >= 0: the candidate's metadata comes from ``t``
    nb.score[qid - r0, rank] = sc
    return nb, t.drop_columns(["qid", "score"])


def search_category(store: Store, parts: list, n: int, pp: dict, d: str, runner: str) -> list[dict]:
    """Train, assign and search one category under ``d``; returns its query blocks (r0, n, files, block)
    for the merge step, each with ``dir`` and ``ranges`` set."""
    sh = shape(n, pp)
    m = min(pp["candidates"], n - 1)
    blocks = [{**blk, "block": i, "dir": d, **sh} for i, blk in enumerate(blocks_of(parts))]
    run_items([{"dir": d, "files": parts, "n": n, "seed": 0, **sh}], train, runner, store=store)
    run_items(blocks, assign, runner, store=store, params=pp)
    items = [
        {"dir": d, "range": r, "m": m, "blocks": [blk["block"] for blk in blocks]}
        for r in range(sh["ranges"])
    ]
    run_items(items, search, runner, store=store, params=pp)
    return blocks
