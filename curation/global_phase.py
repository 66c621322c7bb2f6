"""The global phase, distributed: each committed video's columnar tables -> near-duplicate video groups ->
cross-video pairs (faiss IVF / exact blocks searched in map_batches) -> sample plans -> WebDataset shards,
every step a job over files in the store, resumable by its outputs and keyed by a hash of what made them.

Layout under the store (``map_hash``: the per-video phase; ``pair_hash``: + the pair spec; ``global_hash``:
+ the write_shards spec, so changing write_shards keeps the pairs and changing pair keeps the tables):

    tables/<map_hash>/units/<bb>/<video>.parquet     pairable units of one video (export_video)
    tables/<map_hash>/clips/<bb>/<video>.parquet     its ok clips, the row as JSON text
    global/gather-<map_hash>/{units,clips}-<bb>.parquet   one file per hash bucket bb (00..ff) of video ids
    global/pairs-<pair_hash>/raw/<kind>/<cat>/block-N.parquet   every candidate with its score (search)
    global/pairs-<pair_hash>/copies/...               copy-paste edges between videos (for dedup)
    global/pairs-<pair_hash>/dedup/groups.parquet     near-duplicate video groups
    global/pairs-<pair_hash>/pairs/<kind>/<cat>/block-N.parquet   final verdicts (band, top_k, near-dup)
    global/plans-<global_hash>/part-P.parquet         one row per sample, partition P = a range of buckets
    <shards_subdir>/shard-P-S.tar, .records/shard-P-S.tar.json, .index.json   (and <eval_subdir>/ likewise)

The driver holds counts, object references and per-shard entries only, never rows: its memory is bounded by
the number of partitions and shards, not by the number of clips. ``runner="sequential"`` runs the very same
step functions over the same files in one process (tests)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import tempfile
import time
from collections import Counter, defaultdict

import numpy as np

from curation import pairing, scenarios
from curation.composition import (
    best_crop,
    category_keep,
    compose_clip,
    eligible_partners,
    keep_fraction,
    tight_box,
)
from curation.scenarios import unit_draw
from curation.shards import INDEX_FILE, INDEX_NAMES, RECORDS_DIR, member_bytes, plan_shards, safe_component
from curation.storage import Store

log = logging.getLogger(__name__)

BUCKETS = 256  # hash buckets of video ids: folder sharding of the tables and the unit of the gather step
GATHER_ITEMS = 32  # gather tasks (8 buckets each)
SEARCH_BLOCK_ROWS = 8192  # query rows per search item (fixed: output names must not depend on the cluster)
KINDS = ("subject", "face")


# ---------------------------------------------------------------------------------------------------------
# keys and hashes


def _sha(text: str, n: int = 16) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def bucket_of(video_id: str) -> int:
    return int(hashlib.sha1(str(video_id).encode()).hexdigest()[:2], 16)


def _video_file(video_id: str) -> str:
    b = bucket_of(video_id)
    digest = hashlib.sha1(str(video_id).encode()).hexdigest()[:10]
    return f"{b:02x}/{safe_component(video_id)[:80]}-{digest}.parquet"


def _params_dict(params) -> dict:
    return dataclasses.asdict(params) if dataclasses.is_dataclass(params) else dict(params or {})


def step_hashes(map_hash: str, pair_params, shard_params, data_digest: str = "") -> tuple[str, str]:
    """(pair_hash, global_hash): the pairs depend on the map phase (its hash and the digest of the tables
    gathered, so videos joining later redo the global steps) and the pair params; the plans and shards on
    those and the write_shards params."""
    pair_hash = _sha(
        json.dumps({"map": map_hash, "data": data_digest, "pair": _params_dict(pair_params)}, sort_keys=True)
    )
    global_hash = _sha(
        json.dumps({"pair": pair_hash, "write_shards": _params_dict(shard_params)}, sort_keys=True)
    )
    return pair_hash, global_hash


def _phash_int(h: str) -> int:
    return int(h, 16)


# ---------------------------------------------------------------------------------------------------------
# export: one video's columnar tables, written by the worker that commits the video


def _unit_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("kind", pa.string()),
            ("bucket", pa.int16()),
            ("video_id", pa.string()),
            ("clip_id", pa.string()),
            ("subject", pa.int32()),
            ("category", pa.string()),
            ("vector", pa.list_(pa.float32())),
            ("phashes", pa.list_(pa.uint64())),
            ("crop_path", pa.string()),
            ("crop_box", pa.list_(pa.int32())),
            ("crop_box_tight", pa.list_(pa.int32())),
            ("crop_ref", pa.int32()),
            ("ref_t_s", pa.float64()),
            ("ref_frame_index", pa.int64()),
            ("v_n_clips", pa.int32()),
        ]
    )


def _clip_schema():
    import pyarrow as pa

    return pa.schema(
        [("bucket", pa.int16()), ("video_id", pa.string()), ("clip_id", pa.string()), ("row", pa.string())]
    )


def _mean_unit(v: np.ndarray) -> np.ndarray:
    m = v.mean(0)
    return m / max(float(np.linalg.norm(m)), 1e-12)


def subject_tight_box(row: dict, subject: dict, crop: dict) -> list[int]:
    """The tight box of a subject's reference crop (composition.tight_box with the face found on the same
    reference frame, if any)."""
    face = next((f for f in subject.get("faces") or [] if f.get("ref") == crop.get("ref")), None)
    w = int(row.get("clip_width") or row.get("width") or 1 << 16)
    h = int(row.get("clip_height") or row.get("height") or 1 << 16)
    return tight_box(crop["box"], w, h, subject.get("category"), face["box"] if face else None)


def video_units(rows: list[dict], local_root: str) -> tuple[list[dict], dict[str, str]]:
    """The pairable units of one video's ok rows: per subject and kind (subject crops, faces) the unit mean of
    its non-duplicate item embeddings, its crop pHashes and its best crop. Returns (units, errors by clip)."""
    units, errors = [], {}
    ok = [r for r in rows if r.get("status", "ok") == "ok" and r.get("clip_id")]
    cache: dict[str, np.ndarray] = {}
    per_clip: list[list[dict]] = []
    for r in ok:
        clip_units = []
        for kind, file_key, item_key in (
            ("subject", "embedding_file", "crops"),
            ("face", "face_embedding_file", "faces"),
        ):
            subjects = r.get("subjects") or []
            items = [s.get(item_key) or [] for s in subjects]
            if not r.get(file_key) or not any(items):
                continue
            rel = r[file_key]
            try:
                if rel not in cache:
                    base = os.path.realpath(local_root)
                    path = os.path.realpath(os.path.join(base, rel))
                    if not path.startswith(base + os.sep):
                        raise ValueError(f"path {rel!r} escapes {base}")
                    cache[rel] = np.load(path, allow_pickle=False)
                emb = cache[rel]
                if emb.ndim != 2:
                    raise ValueError(f"expected (n, D), got shape {emb.shape}")
            except (OSError, ValueError) as e:
                errors[str(r["clip_id"])] = f"unreadable {rel}: {type(e).__name__}"
                log.warning(
                    "export: %s/%s: %s", r.get("video_id"), r.get("clip_id"), errors[str(r["clip_id"])]
                )
                continue
            for si, its in enumerate(items):
                keep = [
                    it for it in its if it.get("duplicate_of") is None and 0 <= int(it["emb_row"]) < len(emb)
                ]
                # the reference image is the subject's own crop; a face unit of a subject without one falls
                # back to its face crop
                crop = best_crop(subjects[si]) or (best_crop({"crops": its}) if kind == "face" else None)
                if not keep or crop is None:
                    continue
                meta = r.get("ref_frames") or []
                t = meta[crop["ref"]] if 0 <= crop["ref"] < len(meta) else {}
                clip_units.append(
                    {
                        "kind": kind,
                        "bucket": bucket_of(r["video_id"]),
                        "video_id": str(r["video_id"]),
                        "clip_id": str(r["clip_id"]),
                        "subject": si,
                        "category": str(subjects[si].get("category")),
                        "vector": _mean_unit(emb[[int(it["emb_row"]) for it in keep]].astype(np.float32)),
                        "phashes": [_phash_int(it["phash"]) for it in its if it.get("phash")],
                        "crop_path": crop["path"],
                        "crop_box": [int(v) for v in crop["box"]],
                        "crop_box_tight": subject_tight_box(r, subjects[si], crop),
                        "crop_ref": int(crop["ref"]),
                        "ref_t_s": t.get("t_s"),
                        "ref_frame_index": t.get("frame_index"),
                    }
                )
        per_clip.append(clip_units)
    n_clips = sum(1 for u in per_clip if u)
    for clip_units in per_clip:
        for u in clip_units:
            u["v_n_clips"] = n_clips
            units.append(u)
    return units, errors


def _units_table(units: list[dict]):
    import pyarrow as pa

    schema = _unit_schema()
    cols = {f.name: [u[f.name] for u in units] for f in schema}
    cols["vector"] = [np.asarray(v, np.float32).tolist() for v in cols["vector"]]
    return pa.table(cols, schema=schema)


def _write_parquet(store: Store, rel: str, table, row_group_size: int | None = None) -> None:
    import pyarrow.parquet as pq

    with store.writer(rel) as f:
        pq.write_table(table, f, compression="zstd", row_group_size=row_group_size)


def export_video(rows: list[dict], store: Store, local_root: str, map_hash: str) -> None:
    """Write one committed video's columnar tables into ``store`` under ``tables/<map_hash>/``: its pairable
    units and its ok clips (the row as JSON text). Idempotent (the same objects are overwritten atomically);
    embeddings are read from ``local_root`` (the worker's copy), never downloaded."""
    import pyarrow as pa

    if not rows:
        return
    vid = str(rows[0]["video_id"])
    units, errors = video_units(rows, local_root)
    _write_parquet(store, f"tables/{map_hash}/units/{_video_file(vid)}", _units_table(units))
    ok = sorted(
        (r for r in rows if r.get("status", "ok") == "ok" and r.get("clip_id")),
        key=lambda r: str(r["clip_id"]),
    )
    recs = []
    for r in ok:
        r = {k: v for k, v in r.items() if not k.startswith("_")}
        if str(r["clip_id"]) in errors:
            r["pair_error"] = errors[str(r["clip_id"])]
        recs.append(r)
    table = pa.table(
        {
            "bucket": [bucket_of(vid)] * len(recs),
            "video_id": [vid] * len(recs),
            "clip_id": [str(r["clip_id"]) for r in recs],
            "row": [json.dumps(r, sort_keys=True) for r in recs],
        },
        schema=_clip_schema(),
    )
    _write_parquet(store, f"tables/{map_hash}/clips/{_video_file(vid)}", table)


# ---------------------------------------------------------------------------------------------------------
# running a step's items: Ray Data map_batches over the items, or a loop


_REFS: dict = {}


def _resolve(v):
    """ObjectRefs in fn_kwargs are fetched once per worker process (the search bundle, the group map)."""
    try:
        import ray
    except ImportError:  # pragma: no cover
        return v
    if isinstance(v, ray.ObjectRef):
        key = v.hex()
        if key not in _REFS:
            if len(_REFS) > 32:
                _REFS.clear()
            _REFS[key] = ray.get(v)
        return _REFS[key]
    return v


def _apply_batch(batch, fn, kwargs):
    import pandas as pd

    kw = {k: _resolve(v) for k, v in kwargs.items()}
    return pd.DataFrame({"r": [json.dumps(fn(json.loads(s), **kw)) for s in batch["item"]]})


def run_items(items: list[dict], fn, runner: str, num_cpus: float = 1.0, **kwargs) -> list[dict]:
    """``fn(item, **kwargs)`` for every item, returning its small JSON-able result: on Ray Data
    (``map_batches``, one item per batch) or in this process. Results come back in item order."""
    if not items:
        return []
    if runner == "sequential":
        return [fn(json.loads(json.dumps(it)), **kwargs) for it in items]
    import ray

    tagged = [{"item": json.dumps({**it, "_order": i})} for i, it in enumerate(items)]
    kw = {
        k: (
            v
            if isinstance(v, ray.ObjectRef) or isinstance(v, (str, int, float, bool, type(None), Store))
            else ray.put(v)
        )
        for k, v in kwargs.items()
    }
    ds = ray.data.from_items(tagged, override_num_blocks=len(tagged))
    out = ds.map_batches(
        _apply_batch,
        fn_kwargs={"fn": fn, "kwargs": kw},
        batch_size=1,
        num_cpus=num_cpus,
        batch_format="pandas",
    )
    res = [json.loads(r["r"]) for r in out.iter_rows()]
    return sorted(res, key=lambda r: r.get("_order", 0))


def _ordered(fn):
    def wrapped(item, **kw):
        order = item.pop("_order", 0)
        return {**fn(item, **kw), "_order": order}

    wrapped.__name__ = fn.__name__
    return wrapped


# ---------------------------------------------------------------------------------------------------------
# step 1: gather the per-video tables into one file per bucket


def _gather_buckets(item: dict, store: Store) -> dict:
    """Several buckets per item: Ray's per-task overhead stays small next to the reads."""
    res = [
        _gather_bucket({"bucket": b, "src": item["src"], "dst": item["dst"]}, store) for b in item["buckets"]
    ]
    return {"buckets": res}


def _gather_bucket(item: dict, store: Store) -> dict:
    import pyarrow.parquet as pq

    b, src, dst = item["bucket"], item["src"], item["dst"]
    counts: Counter = Counter()
    dims: dict[str, int] = {}
    n_clips = n_videos = 0
    h = hashlib.sha256()  # what this bucket holds: a video added or re-exported changes it
    for what, schema in (("units", _unit_schema()), ("clips", _clip_schema())):
        files = list(store.list(f"{src}/{what}/{b:02x}/", ".parquet"))
        if not files:
            continue
        with store.writer(f"{dst}/{what}-{b:02x}.parquet") as f:
            w = pq.ParquetWriter(f, schema, compression="zstd")
            for rel in files:
                data = store.read_bytes(rel)
                t = pq.read_table(io.BytesIO(data), schema=schema)
                # The digest names what the bucket holds, not the float noise of its vectors: CPU kernels
                # move embeddings by ~1e-7 with their thread count (a Ray worker vs the driver); a changed
                # embedder changes the map hash instead.
                ident = t.drop_columns([c for c in ("vector",) if c in t.column_names]).to_pylist()
                blob = json.dumps(ident, sort_keys=True, default=str).encode()
                h.update(rel.encode() + b"\0" + hashlib.sha256(blob).digest())
                if not t.num_rows:
                    continue
                w.write_table(t)
                if what == "units":
                    kinds, cats = t.column("kind").to_pylist(), t.column("category").to_pylist()
                    counts.update(f"{k}\t{c}" for k, c in zip(kinds, cats))
                    for k, v in zip(kinds, t.column("vector").to_pylist()):
                        dims.setdefault(k, len(v))
                else:
                    n_clips += t.num_rows
                    n_videos += 1
            w.close()
    return {
        "bucket": b,
        "units": dict(counts),
        "dims": dims,
        "clips": n_clips,
        "videos": n_videos,
        "digest": h.hexdigest(),
    }


# ---------------------------------------------------------------------------------------------------------
# step 2: search (per kind and category: a bundle of vectors + index in the object store, query blocks)


def _read_units(store: Store, files: list[str], kind: str, category: str, columns=None):
    import pyarrow.compute as pc
    import pyarrow.dataset as pds

    ds = pds.dataset([store.path(f) for f in files], format="parquet", filesystem=store.fs)
    flt = (pc.field("kind") == kind) & (pc.field("category") == category)
    return ds.to_table(filter=flt, columns=columns)


def build_bundle(store: Store, files: list[str], kind: str, category: str, params: dict) -> dict:
    """Everything a search task needs for one (kind, category): unit vectors (N, D), group ids, pHashes
    (N, K) with a count, the candidate metadata columns, and the faiss index (serialised) when the set is
    larger than ``exact_max`` (or method says so); exact blocked products otherwise."""
    import faiss  # noqa: F401  (fail early where faiss is missing)

    t = _read_units(store, files, kind, category)
    n = t.num_rows
    vec = t.column("vector").combine_chunks()
    x = np.asarray(vec.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(n, -1)
    x = pairing.normalize(x)
    gkey = t.column("clip_id" if params["same_source"] else "video_id").to_pylist()
    _, groups = np.unique(np.array(gkey, dtype=object).astype(str), return_inverse=True)
    ph = t.column("phashes").to_pylist()
    kmax = max([len(p) for p in ph] + [1])
    phm = np.zeros((n, kmax), np.uint64)
    phn = np.zeros(n, np.int32)
    for i, p in enumerate(ph):
        phm[i, : len(p)] = p
        phn[i] = len(p)
    meta = t.drop_columns(["vector", "phashes", "kind"])
    method = params["method"]
    use_faiss = method == "faiss" or (method in ("auto", "ray") and n > params["exact_max"])
    index = None
    if use_faiss:
        import faiss

        index = faiss.serialize_index(pairing.build_faiss(x))
    return {
        "x": x,
        "groups": groups.astype(np.int64),
        "phm": phm,
        "phn": phn,
        "meta": meta,
        "index": index,
        "extra": int(np.unique(groups, return_counts=True)[1].max()) if n else 0,
        "n": n,
    }


_INDEX_CACHE: dict = {}


def _neighbours(bundle: dict, r0: int, r1: int, m: int, nprobe: int) -> pairing.Neighbours:
    import torch

    if bundle["index"] is None:
        import warnings

        torch.set_num_threads(1)
        with warnings.catch_warnings():  # the object store's arrays are read-only; nothing writes to them
            warnings.simplefilter("ignore", UserWarning)
            xt = torch.from_numpy(bundle["x"])
            gt = torch.from_numpy(bundle["groups"])
        rows, _ = pairing._strip(xt, gt, r0, r1, m, symmetric=False)
        rows.idx[~np.isfinite(rows.score)] = -1
        return pairing._pad(rows, m)
    import faiss

    key = id(bundle["index"])
    if key not in _INDEX_CACHE:
        _INDEX_CACHE.clear()
        faiss.omp_set_num_threads(1)
        _INDEX_CACHE[key] = faiss.deserialize_index(bundle["index"])
    return pairing.faiss_search(
        _INDEX_CACHE[key], bundle["x"], bundle["groups"], np.arange(r0, r1), m, nprobe, bundle["extra"]
    )


def _min_phash_distance(phm, phn, q: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Min Hamming distance between the pHash sets of rows q[i] and c[i] (-1 where either has none)."""
    a, b = phm[q][:, :, None], phm[c][:, None, :]  # (P, K, 1), (P, 1, K)
    d = np.bitwise_count(a ^ b).astype(np.int32)
    ka = np.arange(phm.shape[1])
    valid = (ka[None, :, None] < phn[q][:, None, None]) & (ka[None, None, :] < phn[c][:, None, None])
    d = np.where(valid, d, 999).reshape(len(q), -1).min(1)
    return np.where(d >= 999, -1, d)


def _search_block(item: dict, store: Store, bundles: dict, params: dict) -> dict:
    """Candidates of query rows [r0, r1): every one with its exact score, band verdict (``in_band``,
    ``copy_paste`` by score or pHash, ``different_subject``) and pHash distance; plus the copy edges."""
    import pyarrow as pa

    r0, r1, kind = item["r0"], item["r1"], item["kind"]
    out_rel, copies_rel = item["out"], item["copies"]
    if store.exists(out_rel) and store.exists(copies_rel):
        return {"skipped": 1, "hist": [0] * params["hist_bins"]}
    bundle = _resolve(bundles[item["bundle"]])
    low, high = (
        (params["low"], params["high"]) if kind == "subject" else (params["face_low"], params["face_high"])
    )
    n = bundle["n"]
    m = min(params["candidates"], n - 1)
    nb = _neighbours(bundle, r0, r1, m, params["nprobe"])
    qi, rank = np.nonzero(nb.idx >= 0)
    c = nb.idx[qi, rank]
    q = qi + r0
    score = nb.score[qi, rank].astype(np.float32)
    verdict = np.where(score > high, "copy_paste", np.where(score < low, "different_subject", "in_band"))
    pd_ = np.full(len(q), -1, np.int32)
    if params["phash_copy_distance"] >= 0 and len(q):
        pd_ = _min_phash_distance(bundle["phm"], bundle["phn"], q, c)
        verdict = np.where((pd_ >= 0) & (pd_ <= params["phash_copy_distance"]), "copy_paste", verdict)
    meta = bundle["meta"]
    qm, cm = meta.take(pa.array(q)), meta.take(pa.array(c))
    inband = pa.array(verdict == "in_band")
    cols = {
        "bucket": qm.column("bucket"),
        "q_video": qm.column("video_id"),
        "q_clip": qm.column("clip_id"),
        "q_subject": qm.column("subject"),
        "c_video": cm.column("video_id"),
        "c_clip": cm.column("clip_id"),
        "c_subject": cm.column("subject"),
        "rank": pa.array(rank.astype(np.int16)),
        "score": pa.array(np.round(score, 3)),
        "band": pa.array(verdict.astype(str)),
        "phash_distance": pa.array(pd_.astype(np.int16)),
        "q_v_n_clips": qm.column("v_n_clips"),
        "c_v_n_clips": cm.column("v_n_clips"),
    }
    import pyarrow.compute as pc

    for name in ("crop_path", "crop_box", "crop_box_tight", "crop_ref", "ref_t_s", "ref_frame_index"):
        col = cm.column(name)
        cols[f"c_{name}"] = pc.if_else(inband, col, pa.scalar(None, col.type))
    t = pa.table(cols)
    cross = (verdict == "copy_paste") & (
        pa.compute.not_equal(cols["q_video"], cols["c_video"]).to_numpy(zero_copy_only=False)
        if len(q)
        else np.zeros(0, bool)
    )
    copies = t.filter(pa.array(cross)).select(
        ["q_video", "q_clip", "c_video", "c_clip", "q_v_n_clips", "c_v_n_clips"]
    )
    _write_parquet(store, copies_rel, copies)
    _write_parquet(store, out_rel, t)
    hist = np.histogram(score, bins=params["hist_bins"], range=(-1.0, 1.0))[0]
    return {"skipped": 0, "hist": hist.tolist(), "candidates": int(len(q))}


# ---------------------------------------------------------------------------------------------------------
# step 3: near-duplicate video groups from copy-paste edges (no all-pairs: only what the search found)


def near_duplicate_groups(
    edges: list[tuple[str, str, str, str, int, int]], min_frac: float
) -> dict[str, str]:
    """Video -> group (its smallest member id) for videos that are near-duplicates: a pair of videos whose
    copy-paste edges (q_video, q_clip, c_video, c_clip, q_n_clips, c_n_clips) cover at least ``min_frac`` of
    the pairable clips of each (a re-upload: the same shots under another name). Connected components, so
    three copies form one group. Videos in no group are absent."""
    clips: dict[tuple[str, str], dict[str, set]] = defaultdict(lambda: defaultdict(set))
    n_of: dict[str, int] = {}
    for qv, qc, cv, cc, qn, cn in edges:
        if qv == cv:
            continue
        a, b = sorted((qv, cv))
        clips[(a, b)][qv].add(qc)
        clips[(a, b)][cv].add(cc)
        n_of[qv], n_of[cv] = max(1, int(qn)), max(1, int(cn))
    parent: dict[str, str] = {}

    def find(v):
        while parent.get(v, v) != v:
            parent[v] = parent.get(parent[v], parent[v])
            v = parent[v]
        return v

    for (a, b), got in sorted(clips.items()):
        if all(len(got[v]) / n_of[v] >= min_frac for v in (a, b)):
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    members = set(parent) | {p for p in parent.values()}
    return {
        v: find(v) for v in sorted(members) if find(v) != v or any(find(u) == v and u != v for u in members)
    }


def _dedup(item: dict, store: Store, params: dict) -> dict:
    import pyarrow as pa
    import pyarrow.dataset as pds

    files = item["copies"]
    if params["near_dup_min_frac"] < 0 or not files:
        groups = {}
    else:
        t = pds.dataset([store.path(f) for f in files], format="parquet", filesystem=store.fs).to_table()
        edges = list(
            zip(
                *(
                    t.column(c).to_pylist()
                    for c in ("q_video", "q_clip", "c_video", "c_clip", "q_v_n_clips", "c_v_n_clips")
                )
            )
        )
        groups = near_duplicate_groups(edges, params["near_dup_min_frac"])
    vids = sorted(groups)
    _write_parquet(
        store,
        item["out"],
        pa.table(
            {"video_id": vids, "group": [groups[v] for v in vids]},
            schema=pa.schema([("video_id", pa.string()), ("group", pa.string())]),
        ),
    )
    return {"near_duplicate_videos": len(vids), "near_duplicate_groups": len(set(groups.values()))}


def _read_groups(store: Store, rel: str) -> dict[str, str]:
    import pyarrow.parquet as pq

    t = pq.read_table(io.BytesIO(store.read_bytes(rel)))
    return dict(zip(t.column("video_id").to_pylist(), t.column("group").to_pylist()))


# ---------------------------------------------------------------------------------------------------------
# step 4: final verdicts (near-duplicate sources, top_k among what is left in the band)


def final_verdicts(band: np.ndarray, q_key: np.ndarray, same_group: np.ndarray, top_k: int) -> np.ndarray:
    """Per candidate row (sorted by query, then rank): ``near_duplicate_source`` where the two videos are one
    source, else ``pair`` for the first ``top_k`` in-band candidates of each query and ``beyond_top_k`` for
    the rest of the band; other band verdicts unchanged."""
    v = band.astype(object).copy()
    v[same_group] = "near_duplicate_source"
    inband = v == "in_band"
    # rank among the in-band candidates of the same query: cumulative count within runs of equal q_key
    order = np.arange(len(v))
    starts = np.r_[True, q_key[1:] != q_key[:-1]] if len(v) else np.zeros(0, bool)
    run_id = np.cumsum(starts) - 1
    c = np.cumsum(inband)
    base = np.r_[0, c][order[starts]] if len(v) else np.zeros(0, int)
    r = c - base[run_id]
    v[inband & (r <= top_k)] = "pair"
    v[inband & (r > top_k)] = "beyond_top_k"
    return v.astype(str)


def _finalize_block(item: dict, store: Store, groups: dict, params: dict) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pq.read_table(io.BytesIO(store.read_bytes(item["raw"])))
    qv, cv = t.column("q_video").to_pylist(), t.column("c_video").to_pylist()
    if params["same_source"]:
        same = np.zeros(len(qv), bool)
    else:
        same = np.array(
            [qa != ca and groups.get(qa, qa) == groups.get(ca, ca) for qa, ca in zip(qv, cv)], bool
        )
    qk = np.array(
        [f"{c}#{s}" for c, s in zip(t.column("q_clip").to_pylist(), t.column("q_subject").to_pylist())],
        dtype=object,
    )
    top_k = params["top_k"] if item["kind"] == "subject" else params["face_top_k"]
    v = final_verdicts(np.asarray(t.column("band").to_pylist(), dtype=object), qk, same, top_k)
    t = t.append_column("verdict", pa.array(v.tolist(), pa.string()))
    t = t.append_column("q_group", pa.array([groups.get(x, x) for x in qv], pa.string()))
    t = t.append_column("c_group", pa.array([groups.get(x, x) for x in cv], pa.string()))
    # rows are in bucket order (the bundle follows the gather files): small row groups let each plan
    # partition read only the groups of its buckets
    _write_parquet(store, item["out"], t, row_group_size=4096)
    return {"verdicts": dict(Counter(v.tolist()))}


# ---------------------------------------------------------------------------------------------------------
# step 5: sample plans, one partition (a range of buckets) per item


def split_of(group: str, eval_frac: float, seed: int) -> str:
    """``eval`` for a deterministic ``eval_frac`` of sources (by hash of the near-duplicate group id, so a
    re-upload never lands on the other side), else ``train``."""
    return "eval" if eval_frac > 0 and unit_draw("eval", seed, group) < eval_frac else "train"


_PAIR_COLS = [
    "q_clip",
    "q_subject",
    "c_video",
    "c_clip",
    "c_subject",
    "score",
    "verdict",
    "c_group",
    "rank",
    "c_crop_path",
    "c_crop_box",
    "c_crop_box_tight",
    "c_crop_ref",
    "c_ref_t_s",
    "c_ref_frame_index",
]


def _read_pairs(store: Store, files: list[str], lo: int, hi: int, kind: str):
    """The pair records of queries in buckets [lo, hi) that the composition rules can use: for subject
    embeddings the pairs and the copies (a copy vetoes a face-only pair), for faces every verdict (a face
    rejection vetoes an embedding pair)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pds

    if not files:
        return []
    ds = pds.dataset([store.path(f) for f in files], format="parquet", filesystem=store.fs)
    flt = (pc.field("bucket") >= lo) & (pc.field("bucket") < hi)
    if kind == "subject":
        flt = flt & pc.field("verdict").isin(["pair", "copy_paste", "near_duplicate_source"])
    return ds.to_table(filter=flt, columns=_PAIR_COLS).to_pylist()


def _filter_scores(row: dict) -> dict:
    return {k: v for k, v in sorted(row.items()) if k.endswith("_score") and isinstance(v, (int, float))}


def sample_meta(
    row: dict,
    plan: dict,
    key: str,
    labels: list[str],
    split: str,
    group: str,
    config_hash: str,
    global_hash: str,
) -> dict:
    """The sample's JSON: the clip, its caption, and per reference its subject, source, crop, both scores
    and the identity verdict; scenario labels; the split."""
    subjects = row.get("subjects") or []
    subj_meta = []
    for k, ref in enumerate(plan["refs"]):
        s = subjects[ref["subject"]]
        crop = ref["crop"]
        subj_meta.append(
            {
                "subject": ref["subject"],
                "name": s.get("name"),
                "description": s.get("description"),
                "category": s.get("category"),
                "boxes": list(s.get("boxes") or []),
                "ref": {
                    "file": f"ref_{k}.jpg",
                    "kind": ref["ref_kind"],
                    "clip_id": ref["clip_id"],
                    "video_id": ref["video_id"],
                    "subject": ref["src_subject"],
                    "ref_index": crop.get("ref"),
                    "t_s": crop.get("t_s"),
                    "frame_index": crop.get("frame_index"),
                    "crop_box": crop.get("box"),
                    "crop_box_tight": crop.get("box_tight"),
                },
                "similarity": ref["similarity"],
                "face_similarity": ref["face_similarity"],
                "identity": ref["identity"],
                "face_det_scores": [f.get("det_score") for f in s.get("faces") or []],
            }
        )
    return {
        "key": key,
        "pair_type": plan["pair_type"],
        "clip_id": row.get("clip_id"),
        "video_id": row.get("video_id"),
        "source": row.get("source"),
        "source_group": group,
        "split": split,
        "span": [row.get("start_s"), row.get("end_s")],
        "fps": row.get("fps"),
        "width": row.get("clip_width") or row.get("width"),
        "height": row.get("clip_height") or row.get("height"),
        "n_frames": row.get("clip_n_frames") or row.get("n_frames"),
        "caption": row.get("caption"),
        "caption_origin": row.get("caption_origin"),
        "ref_frames": row.get("ref_frames"),
        "subjects": subj_meta,
        "n_subjects": len(subjects),
        "refs_truncated": len(subjects) > len(plan["refs"]),
        "scenarios": labels,
        "primary_scenario": scenarios.primary(labels),
        "scores": _filter_scores(row),
        "config_hash": config_hash,
        "global_hash": global_hash,
    }


def _plan_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("key", pa.string()),
            ("split", pa.string()),
            ("pair_type", pa.string()),
            ("clip_id", pa.string()),
            ("video_id", pa.string()),
            ("scenario", pa.string()),
            ("clip_path", pa.string()),
            ("refs", pa.list_(pa.string())),
            ("caption", pa.string()),
            ("meta", pa.string()),
            ("draw", pa.float64()),
        ]
    )


def _plan_partition(item: dict, store: Store, groups: dict, params: dict) -> dict:
    """Sample plans of the clips of buckets [lo, hi): pairs joined to clips, identity rules, partner draw,
    composition, ratios, category balance, scenario labels, weights and quotas, the held-out split."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    lo, hi, wp = item["lo"], item["hi"], params["write"]
    seed = wp["seed"]
    by_q: dict[tuple[str, str, int], list[dict]] = defaultdict(list)
    for kind in KINDS:
        for rec in _read_pairs(store, item["pairs"][kind], lo, hi, kind):
            by_q[(kind, rec["q_clip"], rec["q_subject"])].append(rec)
    for v in by_q.values():
        v.sort(key=lambda r: r["rank"])
    rejections: Counter = Counter()
    plans = []
    for b in range(lo, hi):
        rel = f"{item['gather']}/clips-{b:02x}.parquet"
        if not store.exists(rel):
            continue
        t = pq.read_table(io.BytesIO(store.read_bytes(rel)))
        for row_json in t.column("row").to_pylist():
            row = json.loads(row_json)
            group = groups.get(row["video_id"], row["video_id"])
            split = split_of(group, wp["eval_frac"], seed)
            partners = {}
            for si, s in enumerate(row.get("subjects") or []):
                emb = [c for c in by_q.get(("subject", row["clip_id"], si), [])]
                face = [c for c in by_q.get(("face", row["clip_id"], si), [])]
                # a partner on the other side of the held-out split would leak the eval subject into training
                for lst in (emb, face):
                    for c in lst:
                        if c["verdict"] == "pair" and split_of(c["c_group"], wp["eval_frac"], seed) != split:
                            c["verdict"] = "split"
                            rejections["pair:other_split"] += 1
                got, vetoes = eligible_partners(s, emb, face, tuple(wp["face_categories"]))
                for vt in vetoes:
                    rejections[f"pair:{vt['reason']}"] += 1
                partners[si] = [
                    dataclasses.replace(p, crop={**p.crop, "box_tight": _c_tight(p, emb, face)}) for p in got
                ]
            for plan in compose_clip(
                row,
                partners,
                in_pair=wp["in_pair"],
                cross_pair=wp["cross_pair"],
                cross_per_clip=wp["cross_per_clip"],
                seed=seed,
            ):
                key = safe_component(f"{row['clip_id']}_{plan['pair_type']}{plan['j']}")
                ratio = wp["in_pair_keep"] if plan["pair_type"] == "in_pair" else wp["cross_pair_keep"]
                if not keep_fraction(ratio, "ratio", seed, key):
                    rejections[f"write_shards:{plan['pair_type']}_ratio"] += 1
                    continue
                subjects = row.get("subjects") or []
                cats = [str(subjects[r["subject"]].get("category")) for r in plan["refs"]]
                if not category_keep(wp["category_weights"], cats, key, seed):
                    rejections["write_shards:category_balance"] += 1
                    continue
                labels = scenarios.labels([s.get("category") for s in subjects], row.get("caption"))
                if not scenarios.keep_by_weight(wp["scenario_weights"], labels, key, seed):
                    rejections["write_shards:scenario_weight"] += 1
                    continue
                for r in plan["refs"]:
                    if r["ref_kind"] == "in_video":
                        s = subjects[r["subject"]]
                        r["crop"] = {**r["crop"], "box_tight": subject_tight_box(row, s, best_crop(s))}
                meta = sample_meta(
                    row, plan, key, labels, split, group, params["config_hash"], params["global_hash"]
                )
                plans.append(
                    {
                        "key": key,
                        "split": split,
                        "pair_type": plan["pair_type"],
                        "clip_id": str(row["clip_id"]),
                        "video_id": str(row["video_id"]),
                        "scenario": meta["primary_scenario"],
                        "clip_path": row.get("clip_path") or "",
                        "refs": [r["crop"]["path"] for r in plan["refs"]],
                        "caption": row.get("caption") or "",
                        "meta": json.dumps(meta, sort_keys=True),
                        "draw": unit_draw("quota", seed, key),
                    }
                )
    # per-scenario quotas, spread over the partitions (each keeps its share, lowest draws first)
    for scen, quota in wp["scenario_quotas"].items():
        share = math.ceil(int(quota) / item["n_partitions"])
        mine = sorted((p for p in plans if p["scenario"] == scen), key=lambda p: (p["draw"], p["key"]))
        drop = {p["key"] for p in mine[share:]}
        if drop:
            rejections["write_shards:scenario_quota"] += len(drop)
            plans = [p for p in plans if p["key"] not in drop]
    plans.sort(key=lambda p: p["key"])
    keys = [p["key"] for p in plans]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate sample keys in one partition")
    _write_parquet(store, item["out"], pa.Table.from_pylist(plans, schema=_plan_schema()))
    return {"samples": len(plans), "rejections": dict(rejections)}


def _c_tight(p, emb: list[dict], face: list[dict]):
    for c in emb + face:
        if str(c["c_clip"]) == p.clip_id and int(c["c_subject"]) == p.subject and c.get("c_crop_box_tight"):
            return list(c["c_crop_box_tight"])
    return None


# ---------------------------------------------------------------------------------------------------------
# step 6: shards, one writer per partition and split


def shard_name(partition: int, seq: int) -> str:
    return f"shard-{partition:05d}-{seq:06d}.tar"


def _sha256_bytes_of(store: Store, rel: str) -> str:
    h = hashlib.sha256()
    with store.fs.open_input_stream(store.path(rel)) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _write_tar_local(path: str, samples: list[dict], store: Store) -> None:
    """A WebDataset tar, byte-reproducible: ustar headers with a fixed mtime, owner and mode; the members of
    a sample ``<key>.<ext>`` in sorted extension order."""
    import tarfile

    with open(path, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for s in samples:
            key = s["__key__"]
            for ext in sorted(k for k in s if k != "__key__"):
                v = s[ext]
                data = store.read_bytes(v[1]) if isinstance(v, tuple) else v
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size, ti.mtime, ti.mode = len(data), 0, 0o444
                ti.uname = ti.gname = "phantom"
                tf.addfile(ti, io.BytesIO(data))


def _file_size(store: Store, rel: str) -> int:
    from pyarrow import fs

    info = store.fs.get_file_info(store.path(rel))
    if info.type != fs.FileType.File:
        raise FileNotFoundError(f"missing {rel}")
    return int(info.size)


def _write_partition(item: dict, store: Store, params: dict) -> dict:
    """The shards of one partition: samples (sorted by key) in shards of at most maxcount samples / maxsize
    bytes named shard-<partition>-<seq>.tar, each written under a temporary name and moved into place, then
    one small record per finished shard. A re-run keeps every shard whose record matches its plan."""
    import pyarrow.parquet as pq

    p, wp, gh = item["partition"], params["write"], params["global_hash"]
    t = pq.read_table(io.BytesIO(store.read_bytes(item["plans"])))
    rejections: Counter = Counter()
    counts: Counter = Counter()
    eval_videos: set[str] = set()  # partitions hold disjoint videos: the driver adds the counts up
    entries, written, kept = [], 0, 0
    by_split: dict[str, list[dict]] = defaultdict(list)
    for rec in t.to_pylist():
        by_split[rec["split"]].append(rec)
    for split, recs in sorted(by_split.items()):
        subdir = wp["shards_subdir"] if split == "train" else wp["eval_subdir"]
        samples, sizes = [], []
        for rec in recs:
            try:
                if not rec["clip_path"]:
                    raise FileNotFoundError("no clip_path")
                files = [("mp4", rec["clip_path"])] + [(f"ref_{k}.jpg", r) for k, r in enumerate(rec["refs"])]
                size = 0
                for _, rel in files:
                    size += member_bytes(_file_size(store, rel))
            except (OSError, ValueError) as e:
                rejections[f"write_shards:{type(e).__name__}"] += 1
                log.warning("write_shards: %s: %s", rec["key"], e)
                continue
            js = rec["meta"].encode()
            txt = rec["caption"].encode()
            size += member_bytes(len(js)) + member_bytes(len(txt))
            sample = {"__key__": rec["key"], "json": js, "txt": txt}
            sample.update({ext: ("file", rel) for ext, rel in files})
            samples.append((sample, rec))
            sizes.append(size)
            counts["samples"] += 1
            counts[f"pair_type:{rec['pair_type']}"] += 1
            counts.update(f"scenario:{t}" for t in json.loads(rec["meta"])["scenarios"])
            if split == "eval":
                counts["eval_samples"] += 1
                eval_videos.add(rec["video_id"])
        for seq, (a, b) in enumerate(plan_shards(sizes, wp["maxcount"], int(wp["maxsize_mb"] * (1 << 20)))):
            name = shard_name(p, seq)
            keys = [s["__key__"] for s, _ in samples[a:b]]
            # what the shard holds: keys, sample JSON and member files (a changed partner changes it)
            digest = _sha(
                "\n".join(f"{r['key']}\t{r['meta']}\t{r['clip_path']}\t{r['refs']}" for _, r in samples[a:b]),
                64,
            )
            rec_rel, shard_rel = f"{subdir}/{RECORDS_DIR}/{name}.json", f"{subdir}/{name}"
            prev = store.read_json(rec_rel)
            if (
                prev
                and prev.get("global_hash") == gh
                and prev.get("plan_sha256") == digest
                and store.is_file(shard_rel)
                and store.size(shard_rel) == prev.get("bytes")
                and (not wp["verify_on_resume"] or _sha256_bytes_of(store, shard_rel) == prev.get("sha256"))
            ):
                entries.append({k: prev[k] for k in ("name", "split", "samples", "bytes", "sha256")})
                kept += 1
                continue
            fd, tmp = tempfile.mkstemp(suffix=".tar.tmp")
            os.close(fd)
            try:
                _write_tar_local(tmp, [s for s, _ in samples[a:b]], store)
                h = hashlib.sha256()
                with open(tmp, "rb") as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
                store.put_file(shard_rel, tmp)
                entry = {
                    "name": name,
                    "split": split,
                    "samples": b - a,
                    "bytes": os.path.getsize(tmp),
                    "sha256": h.hexdigest(),
                }
            finally:
                os.unlink(tmp)
            store.write_json(
                rec_rel,
                {
                    **entry,
                    "global_hash": gh,
                    "plan_sha256": digest,
                    "partition": p,
                    "first_key": keys[0],
                    "last_key": keys[-1],
                },
            )
            entries.append(entry)
            written += 1
    counts["eval_videos"] = len(eval_videos)
    return {
        "entries": entries,
        "written": written,
        "kept": kept,
        "rejections": dict(rejections),
        "counts": dict(counts),
    }


# ---------------------------------------------------------------------------------------------------------
# the driver


def _params_of(specs) -> tuple:
    from curation.config import validate_stage_spec
    from curation.stages.pair import Pair
    from curation.stages.write_shards import WriteShards

    pair_p, shard_p = Pair.Params(), WriteShards.Params()
    for spec in specs:
        if spec.stage == "pair":
            pair_p = validate_stage_spec(spec, "pair")
        elif spec.stage == "write_shards":
            shard_p = validate_stage_spec(spec, "write_shards")
    return pair_p, shard_p


def _done(store: Store, rel: str):
    return store.read_json(rel)


def n_partitions(n_clips: int, wp: dict) -> int:
    """Partitions (ranges of the 256 buckets) for the plans and writers: ``partitions`` when set, else one
    per ``clips_per_partition`` clips, a power of two at most 256."""
    want = wp["partitions"] or max(1, math.ceil(n_clips / wp["clips_per_partition"]))
    p = 1
    while p < want and p < BUCKETS:
        p *= 2
    return p


def run_global(specs, store: Store, ctx, map_hash: str, runner: str = "ray") -> dict:
    """The global phase over the tables ``export_video`` wrote under ``tables/<map_hash>/``. Returns the
    summary counts. Each step is skipped when its outputs (a ``_done.json`` under its hash) exist."""
    t0 = time.time()
    pair_p, shard_p = _params_of(specs)
    pp, wp = _params_dict(pair_p), _params_dict(shard_p)
    gdir = f"global/gather-{map_hash}"
    timings = {}

    # 1. gather
    gather = _done(store, f"{gdir}/_done.json")
    if gather is None:
        items = [
            {"buckets": list(range(b, b + BUCKETS // GATHER_ITEMS)), "src": f"tables/{map_hash}", "dst": gdir}
            for b in range(0, BUCKETS, BUCKETS // GATHER_ITEMS)
        ]
        res = [
            r
            for it in run_items(items, _ordered(_gather_buckets), runner, store=store)
            for r in it["buckets"]
        ]
        units: Counter = Counter()
        dims: dict = {}
        for r in res:
            units.update(r["units"])
            dims.update(r["dims"])
        gather = {
            "units": dict(units),
            "dims": dims,
            "clips": sum(r["clips"] for r in res),
            "videos": sum(r["videos"] for r in res),
            "units_files": [f"{gdir}/units-{r['bucket']:02x}.parquet" for r in res if r["units"]],
            "digest": _sha("".join(r["digest"] for r in res), 64),
        }
        store.write_json(f"{gdir}/_done.json", gather)
    timings["gather_s"] = round(time.time() - t0, 2)
    pair_hash, global_hash = step_hashes(map_hash, pair_p, shard_p, gather["digest"])
    pdir, sdir = f"global/pairs-{pair_hash}", f"global/plans-{global_hash}"
    final = _done(store, f"{sdir}/_done.json")
    if final and store.exists(f"{wp['shards_subdir']}/{INDEX_FILE}"):
        return {**final["summary"], "resumed": True}

    # 2-4. pairs (search, near-duplicate groups, final verdicts)
    pairs_done = _done(store, f"{pdir}/_done.json")
    if pairs_done is None:
        pairs_done = _pairs(store, gather, pp, pdir, runner)
        store.write_json(f"{pdir}/_done.json", pairs_done)
        store.write_json(f"{pdir}/histogram.json", pairs_done["histogram"])
    timings["pairs_s"] = round(time.time() - t0 - sum(timings.values()), 2)

    # 5. plans
    n_part = n_partitions(gather["clips"], wp)
    span = BUCKETS // n_part
    groups = _read_groups(store, f"{pdir}/dedup/groups.parquet")
    params = {"write": wp, "config_hash": ctx.config_hash or map_hash, "global_hash": global_hash}
    plan_items = [
        {
            "lo": p * span,
            "hi": (p + 1) * span,
            "partition": p,
            "n_partitions": n_part,
            "gather": gdir,
            "pairs": pairs_done["files"],
            "out": f"{sdir}/part-{p:05d}.parquet",
        }
        for p in range(n_part)
    ]
    plans_done = _done(store, f"{sdir}/_plans_done.json")
    if plans_done is None:
        res = run_items(
            plan_items, _ordered(_plan_partition), runner, store=store, groups=groups, params=params
        )
        rej: Counter = Counter()
        for r in res:
            rej.update(r["rejections"])
        plans_done = {"samples": sum(r["samples"] for r in res), "rejections": dict(rej)}
        store.write_json(f"{sdir}/_plans_done.json", plans_done)
    timings["plans_s"] = round(time.time() - t0 - sum(timings.values()), 2)

    # 6. shards
    for sub in (wp["shards_subdir"], wp["eval_subdir"]):
        for stale in (*INDEX_NAMES, ".progress.json"):
            store.delete(f"{sub}/{stale}")
        if store.is_local and os.path.isdir(store.path(sub)):
            for name in os.listdir(store.path(sub)):  # temp files of a writer killed mid-shard
                if ".tmp" in name:
                    os.unlink(os.path.join(store.path(sub), name))
    w_items = [{"partition": it["partition"], "plans": it["out"]} for it in plan_items]
    res = run_items(w_items, _ordered(_write_partition), runner, store=store, params=params)
    entries = sorted((e for r in res for e in r["entries"]), key=lambda e: (e["split"], e["name"]))
    rej = Counter(plans_done["rejections"])
    for r in res:
        rej.update(r["rejections"])
    for split, sub in (("train", wp["shards_subdir"]), ("eval", wp["eval_subdir"])):
        mine = [e for e in entries if e["split"] == split]
        names = {e["name"] for e in mine}
        for rel in store.list(f"{sub}/"):
            base = rel.rsplit("/", 1)[-1]
            if (base.startswith("shard-") and base.endswith(".tar") and base not in names) or (
                f"/{RECORDS_DIR}/" in rel and base[: -len(".json")] not in names
            ):
                store.delete(rel)  # from an earlier, different run
        if mine or split == "train":
            store.write_json(
                f"{sub}/{INDEX_FILE}",
                {
                    "config_hash": params["config_hash"],
                    "global_hash": global_hash,
                    "split": split,
                    "shards": [{k: e[k] for k in ("name", "samples", "bytes", "sha256")} for e in mine],
                    "total_samples": sum(e["samples"] for e in mine),
                    "total_bytes": sum(e["bytes"] for e in mine),
                },
                indent=1,
            )
    timings["shards_s"] = round(time.time() - t0 - sum(timings.values()), 2)

    counts: Counter = Counter()
    for r in res:
        counts.update(r["counts"])
    summary = {
        "triplets_out": counts["samples"],
        "triplets_by_pair_type": {
            k.split(":", 1)[1]: v for k, v in sorted(counts.items()) if k.startswith("pair_type:")
        },
        "rejections_by_reason": dict(sorted(rej.items(), key=lambda kv: -kv[1])),
        "near_duplicate_videos": pairs_done["near_duplicate_videos"],
        "near_duplicate_groups": pairs_done["near_duplicate_groups"],
        "shards": sum(e["split"] == "train" for e in entries),
        "eval_shards": sum(e["split"] == "eval" for e in entries),
        "eval_videos": counts["eval_videos"],
        "eval_triplets": counts["eval_samples"],
        "scenarios": {t: counts[f"scenario:{t}"] for t in scenarios.TAXONOMY},
        "pair_verdicts": pairs_done["verdicts"],
        "units": gather["units"],
        "clips_in": gather["clips"],
        "partitions": n_part,
        "shards_written": sum(r["written"] for r in res),
        "shards_kept": sum(r["kept"] for r in res),
        "pair_hash": pair_hash,
        "global_hash": global_hash,
        "timings_s": timings,
    }
    store.write_json(f"{sdir}/_done.json", {"summary": summary})
    log.info(
        "global phase %s: %d triplets in %d shards (%.1f s)",
        global_hash,
        summary["triplets_out"],
        summary["shards"] + summary["eval_shards"],
        time.time() - t0,
    )
    return summary


def _pairs(store: Store, gather: dict, pp: dict, pdir: str, runner: str) -> dict:
    files = gather["units_files"]
    hist = {k: np.zeros(pp["hist_bins"], np.int64) for k in KINDS}
    raw: dict[str, list[tuple[str, str]]] = {k: [] for k in KINDS}
    copies = []
    # one bundle per (kind, category), built in tasks; one map_batches job over the query blocks of all
    bundles, items = {}, []
    for key, n in sorted(gather["units"].items()):
        kind, cat = key.split("\t")
        if n < 2:
            continue
        catdir = f"{kind}/{safe_component(cat)}"
        bundles[key] = _bundle_ref(store, files, kind, cat, pp, runner)
        items += [
            {
                "bundle": key,
                "kind": kind,
                "r0": r0,
                "r1": min(n, r0 + SEARCH_BLOCK_ROWS),
                "out": f"{pdir}/raw/{catdir}/block-{r0:010d}.parquet",
                "copies": f"{pdir}/copies/{catdir}/block-{r0:010d}.parquet",
            }
            for r0 in range(0, n, SEARCH_BLOCK_ROWS)
        ]
    res = run_items(items, _ordered(_search_block), runner, store=store, bundles=bundles, params=pp)
    for it, r in zip(items, res):
        hist[it["kind"]] += np.asarray(r["hist"], np.int64)
        raw[it["kind"]].append((it["out"], it["out"].replace(f"{pdir}/raw/", f"{pdir}/pairs/")))
        copies.append(it["copies"])
    del bundles
    dd = run_items(
        [{"copies": copies, "out": f"{pdir}/dedup/groups.parquet"}],
        _ordered(_dedup),
        runner,
        store=store,
        params=pp,
    )[0]
    groups = _read_groups(store, f"{pdir}/dedup/groups.parquet")
    items = [{"kind": k, "raw": a, "out": b} for k in KINDS for a, b in raw[k]]
    res = run_items(items, _ordered(_finalize_block), runner, store=store, groups=groups, params=pp)
    verdicts = {k: Counter() for k in KINDS}
    for it, r in zip(items, res):
        verdicts[it["kind"]].update(r["verdicts"])
    edges = [round(float(e), 4) for e in np.linspace(-1, 1, pp["hist_bins"] + 1)]
    band = {"low": pp["low"], "high": pp["high"], "face_low": pp["face_low"], "face_high": pp["face_high"]}
    histogram = {
        ("subjects" if k == "subject" else "faces"): {
            "edges": edges,
            "counts": hist[k].tolist(),
            "n": int(hist[k].sum()),
            "verdicts": dict(verdicts[k]),
            "units": int(sum(n for key, n in gather["units"].items() if key.startswith(k + "\t"))),
        }
        for k in KINDS
    }
    histogram["band"] = band
    for k in KINDS:
        h = histogram["subjects" if k == "subject" else "faces"]
        if h["n"]:
            log.info(
                "pair %s: %d units, verdicts %s, score histogram:\n%s",
                k,
                h["units"],
                h["verdicts"],
                pairing.ascii_histogram(h),
            )
    return {
        "files": {k: [b for _, b in raw[k]] for k in KINDS},
        "histogram": histogram,
        "verdicts": {k: dict(v) for k, v in verdicts.items()},
        **dd,
    }


def _bundle_ref(store: Store, files, kind, cat, pp, runner):
    if runner == "sequential":
        return build_bundle(store, files, kind, cat, pp)
    import ray

    # built in a task: the vectors go from the files to the object store without passing the driver
    return ray.remote(num_cpus=1)(build_bundle).remote(store, files, kind, cat, pp)


# ---------------------------------------------------------------------------------------------------------
# the pair stage on in-memory rows (the Pair stage's process(); tests and small tools): the same steps over
# a temporary local store


def pair_rows(rows: list[dict], pair_params, out_dir: str) -> list[dict]:
    """Rows with ``pairs`` / ``pair_rejections`` / ``face_pairs`` / ``face_pair_rejections`` on each subject,
    computed by the global phase's own steps (export, gather, search, near-duplicate groups, verdicts) over a
    temporary store; the histogram goes to ``<out_dir>/pairing/histogram.json``."""
    import pyarrow.dataset as pds

    from curation.shards import atomic_write_json

    rows = [{**r, "subjects": [dict(s) for s in r.get("subjects") or []]} for r in rows]
    pp = _params_dict(pair_params)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(tmp)
        by_video: dict[str, list[dict]] = defaultdict(list)
        for r in rows:
            by_video[str(r["video_id"])].append(r)
        for vrows in by_video.values():
            export_video(vrows, store, out_dir, "m")
            _, errors = video_units(vrows, out_dir)
            for r in vrows:
                if str(r.get("clip_id")) in errors:
                    r["pair_error"] = errors[str(r["clip_id"])]
        gather = {"units": {}, "units_files": []}
        for b in range(BUCKETS):
            res = _gather_bucket({"bucket": b, "src": "tables/m", "dst": "g"}, store)
            for k, n in res["units"].items():
                gather["units"][k] = gather["units"].get(k, 0) + n
            if res["units"]:
                gather["units_files"].append(f"g/units-{b:02x}.parquet")
        done = _pairs(store, gather, pp, "p", "sequential")
        at = {(r.get("clip_id"), si): s for r in rows for si, s in enumerate(r["subjects"])}
        for kind, pk, rk in (
            ("subject", "pairs", "pair_rejections"),
            ("face", "face_pairs", "face_pair_rejections"),
        ):
            seen_units = set()
            files = done["files"][kind]
            recs = (
                pds.dataset([store.path(f) for f in files], format="parquet").to_table().to_pylist()
                if files
                else []
            )
            for rec in recs:
                s = at[(rec["q_clip"], rec["q_subject"])]
                if (rec["q_clip"], rec["q_subject"]) not in seen_units:
                    seen_units.add((rec["q_clip"], rec["q_subject"]))
                    s.setdefault(pk, [])
                    s.setdefault(rk, [])
                out = {
                    "clip_id": rec["c_clip"],
                    "video_id": rec["c_video"],
                    "subject": rec["c_subject"],
                    "score": rec["score"],
                }
                if (
                    rec["phash_distance"] >= 0
                    and rec["band"] == "copy_paste"
                    and rec["score"] <= (pp["high"] if kind == "subject" else pp["face_high"])
                ):
                    out["phash_distance"] = rec["phash_distance"]
                if rec["verdict"] == "pair":
                    s[pk].append(out)
                else:
                    s[rk].append({**out, "reason": rec["verdict"]})
        atomic_write_json(os.path.join(out_dir, "pairing", "histogram.json"), done["histogram"])
    return rows
