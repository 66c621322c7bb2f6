"""Step 3 of the global phase, distributed: near-duplicate video groups as connected components of the
qualifying copy-paste edges, by min-label propagation; every step is a map over one partition of edges or
videos (hash partitions sized from the data), so no task holds all edges and each round is linear in edges.

Layout under ``<pdir>/dedup/``:

    long/p<P>/f<F>.parquet        both ends of each cross-video copy edge, partitioned by the video pair
    edges/p<P>/from-<Q>.parquet   qualifying video edges (both directions), partitioned by source video
    r<K>/msg/p<P>/from-<Q>.parquet  round K: (video, label) messages to the videos of partition P
    r<K>/labels/p<P>.parquet      round K: each video's label after the round (+ p<P>.json: labels changed)
    groups.parquet                video -> group (the smallest video id of its component)

Rounds stop when no label changes (a component of diameter d takes d rounds)."""

from __future__ import annotations

import io
import json
import math

import numpy as np

from curation.execute import run_items
from curation.global_phase.tables import write_parquet
from curation.storage import Store

EDGE_BYTES_PER_PARTITION = 32 << 20  # copy-edge Parquet bytes per partition (sets the fan-out)


def partition_of(values, n: int) -> np.ndarray:
    """Hash partition (0..n-1) of each string; the same in every process."""
    import pandas as pd

    return (pd.util.hash_array(np.asarray(values, dtype=object)) % np.uint64(n)).astype(np.int64)


def _read(store: Store, rel: str):
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(store.read_bytes(rel)))


def _read_all(store: Store, prefix: str, schema):
    import pyarrow as pa

    files = list(store.list(prefix, ".parquet"))
    return pa.concat_tables([_read(store, f) for f in files]) if files else schema.empty_table()


def _schemas():
    import pyarrow as pa

    s = pa.string()
    return {
        "long": pa.schema([("a", s), ("b", s), ("video", s), ("clip", s), ("n", pa.int32())]),
        "edge": pa.schema([("src", s), ("dst", s)]),
        "label": pa.schema([("video", s), ("label", s)]),
    }


def _split_by(store: Store, t, keys, n: int, rel_of) -> None:
    import pyarrow as pa

    part = partition_of(keys, n) if t.num_rows else np.zeros(0, np.int64)
    for p in range(n):
        write_parquet(store, rel_of(p), t.filter(pa.array(part == p)))


def split_edges(item: dict, store: Store) -> dict:
    """Cross-video copy edges of a few search blocks, both ends of each, to the partition of their pair."""
    import pyarrow as pa
    import pyarrow.compute as pc

    d, f, n = item["dir"], item["index"], item["partitions"]
    if store.exists(f"{d}/long/p{n - 1:05d}/f{f:06d}.parquet"):
        return {"skipped": 1}
    tabs = [_read(store, rel) for rel in item["copies"] if store.exists(rel)]
    t = pa.concat_tables(tabs) if tabs else None
    sch = _schemas()["long"]
    if t is None or not t.num_rows:
        long = sch.empty_table()
    else:
        t = t.filter(pc.not_equal(t["q_video"], t["c_video"]))
        a = pc.min_element_wise(t["q_video"], t["c_video"])
        b = pc.max_element_wise(t["q_video"], t["c_video"])
        ends = [
            pa.table(
                {"a": a, "b": b, "video": t[v], "clip": t[c], "n": pc.cast(t[k], pa.int32())}, schema=sch
            )
            for v, c, k in (("q_video", "q_clip", "q_v_n_clips"), ("c_video", "c_clip", "c_v_n_clips"))
        ]
        long = pa.concat_tables(ends)
    pair = pc.binary_join_element_wise(long["a"], long["b"], "\t").to_pylist()
    _split_by(store, long, pair, n, lambda p: f"{d}/long/p{p:05d}/f{f:06d}.parquet")
    return {"skipped": 0}


def qualify(item: dict, store: Store, params: dict) -> dict:
    """Video pairs of one partition whose copy edges cover ``min_frac`` of the clips of both videos; each
    written in both directions to the partition of its source video."""
    import pyarrow as pa
    import pyarrow.compute as pc

    d, p, n = item["dir"], item["partition"], item["partitions"]
    if store.exists(f"{d}/edges/p{n - 1:05d}/from-{p:05d}.parquet"):
        return {"skipped": 1, "edges": None}
    long = _read_all(store, f"{d}/long/p{p:05d}/", _schemas()["long"])
    g = long.group_by(["a", "b", "video"]).aggregate([("clip", "count_distinct"), ("n", "max")])
    frac = pc.divide(pc.cast(g["clip_count_distinct"], pa.float64()), pc.max_element_wise(g["n_max"], 1))
    ok = g.append_column("ok", pc.greater_equal(frac, params["near_dup_min_frac"]))
    per_pair = ok.group_by(["a", "b"]).aggregate([("ok", "all"), ("video", "count")])
    good = per_pair.filter(pc.and_(per_pair["ok_all"], pc.equal(per_pair["video_count"], 2)))
    both = pa.concat_tables(
        [
            pa.table({"src": good["a"], "dst": good["b"]}, schema=_schemas()["edge"]),
            pa.table({"src": good["b"], "dst": good["a"]}, schema=_schemas()["edge"]),
        ]
    )
    _split_by(store, both, both["src"].to_pylist(), n, lambda q: f"{d}/edges/p{q:05d}/from-{p:05d}.parquet")
    return {"skipped": 0, "edges": int(good.num_rows)}


def propagate(item: dict, store: Store) -> dict:
    """Round K, one partition of source videos: each edge sends its source's label to its destination."""
    import pyarrow as pa

    d, p, n, k = item["dir"], item["partition"], item["partitions"], item["round"]
    if store.exists(f"{d}/r{k:04d}/msg/p{n - 1:05d}/from-{p:05d}.parquet"):
        return {"skipped": 1}
    edges = _read_all(store, f"{d}/edges/p{p:05d}/", _schemas()["edge"])
    if k == 0:
        label = edges["src"]
    else:
        lab = _read(store, f"{d}/r{k - 1:04d}/labels/p{p:05d}.parquet")
        label = edges.join(lab, keys="src", right_keys="video", join_type="left outer")
        edges, label = label.select(["src", "dst"]), label["label"]
    msg = pa.table({"video": edges["dst"], "label": label}, schema=_schemas()["label"])
    _split_by(
        store, msg, msg["video"].to_pylist(), n, lambda q: f"{d}/r{k:04d}/msg/p{q:05d}/from-{p:05d}.parquet"
    )
    return {"skipped": 0}


def relabel(item: dict, store: Store) -> dict:
    """Round K, one partition of videos: the smallest of its label and the labels sent to it."""
    import pyarrow as pa
    import pyarrow.compute as pc

    d, p, k = item["dir"], item["partition"], item["round"]
    out = f"{d}/r{k:04d}/labels/p{p:05d}.parquet"
    if store.exists(out + ".json"):
        return json.loads(store.read_bytes(out + ".json"))
    sch = _schemas()["label"]
    msg = _read_all(store, f"{d}/r{k:04d}/msg/p{p:05d}/", sch)
    if k == 0:
        videos = pc.unique(msg["video"])
        old = pa.table({"video": videos, "label": videos}, schema=sch)
    else:
        old = _read(store, f"{d}/r{k - 1:04d}/labels/p{p:05d}.parquet")
    new = pa.concat_tables([old, msg]).group_by("video").aggregate([("label", "min")])
    new = new.rename_columns(["video", "label"]).sort_by("video")
    joined = new.join(old.rename_columns(["video", "old"]), keys="video")
    changed = int(pc.sum(pc.not_equal(joined["label"], joined["old"])).as_py() or 0)
    write_parquet(store, out, new.cast(sch))
    res = {"changed": changed, "videos": int(new.num_rows)}
    store.write_bytes(out + ".json", json.dumps(res).encode())
    return res


def write_groups(item: dict, store: Store) -> dict:
    """The last round's labels as one file of (video_id, group), sorted by video; the group counts."""
    import pyarrow as pa
    import pyarrow.compute as pc

    sch = pa.schema([("video_id", pa.string()), ("group", pa.string())])
    if item["round"] < 0:
        t = sch.empty_table()
    else:
        t = _read_all(store, f"{item['dir']}/r{item['round']:04d}/labels/", _schemas()["label"])
        t = t.rename_columns(["video_id", "group"]).sort_by("video_id").cast(sch)
    write_parquet(store, item["out"], t)
    return {"near_duplicate_videos": int(t.num_rows), "near_duplicate_groups": len(pc.unique(t["group"]))}


def near_duplicate_groups(
    store: Store, copies: list[str], d: str, out: str, params: dict, runner: str
) -> dict:
    """Connected components of the qualifying copy-paste edges of ``copies`` (search block files) under ``d``;
    writes ``out`` (video_id, group) and returns the counts."""
    if params["near_dup_min_frac"] < 0 or not copies:
        return run_items([{"dir": d, "round": -1, "out": out}], write_groups, runner, store=store)[0]
    nbytes = sum(store.size(f) for f in copies if store.exists(f))
    n = max(1, math.ceil(nbytes / EDGE_BYTES_PER_PARTITION))
    per = max(1, math.ceil(len(copies) / max(n, 1)))
    chunks = [copies[i : i + per] for i in range(0, len(copies), per)]
    run_items(
        [{"dir": d, "index": i, "partitions": n, "copies": c} for i, c in enumerate(chunks)],
        split_edges,
        runner,
        store=store,
    )
    parts = [{"dir": d, "partition": p, "partitions": n} for p in range(n)]
    run_items(parts, qualify, runner, store=store, params=params)
    k = 0
    while True:
        run_items([{**it, "round": k} for it in parts], propagate, runner, store=store)
        res = run_items([{**it, "round": k} for it in parts], relabel, runner, store=store)
        if sum(r["changed"] for r in res) == 0:
            break
        k += 1
    return run_items([{"dir": d, "round": k, "out": out}], write_groups, runner, store=store)[0]
