"""Steps 2-4 of the global phase: search each (kind, category) for candidates (exact blocks or faiss IVF, by
generation: ivf.py), near-duplicate video groups from the copy-paste edges, and the final verdicts (band,
near-dup, top_k)."""

from __future__ import annotations

import logging
from collections import Counter, defaultdict

import numpy as np

from curation import pairing
from curation.execute import run_items
from curation.global_phase import components, ivf
from curation.global_phase.tables import KINDS, key_dir, write_parquet
from curation.shards import safe_component
from curation.storage import Store

log = logging.getLogger(__name__)


def find_pairs(
    store: Store, gather: dict, pp: dict, pdir: str, runner: str, search_dir: str | None = None
) -> dict:
    """Steps 2-4 over the gathered units, written under ``pdir``: the final pair files per kind, the score
    histogram, the verdict counts, the near-duplicate counts and the search work done (``search``).

    ``gather`` holds the generations of units (``gather_generations``) or one set of parts (``gather_tables``:
    one generation). The search partials go under ``search_dir`` (default ``pdir``), keyed by generation: the
    ones that exist are kept, so a new generation costs its own blocks (new x all and all x new) only. The
    merge into each query block's top-m and the steps after it are linear and run over everything."""
    sdir = search_dir or pdir
    gens = [g["parts"] for g in gather["generations"]] if "generations" in gather else [gather["parts"]]
    hist = {k: np.zeros(pp["hist_bins"], np.int64) for k in KINDS}
    raw: dict[str, list[tuple[str, str]]] = {k: [] for k in KINDS}
    copies = []
    work = Counter()
    items = []
    for key, n in sorted(gather["units"].items()):
        kind, cat = key.split("\t")
        if n < 2:
            continue
        catdir = f"{kind}/{safe_component(cat)}"
        per_gen = [list(parts.get(key, [])) for parts in gens]
        if use_ivf(n, pp):
            blocks, w = ivf.search_category(store, per_gen, pp, f"{sdir}/ivf/{key_dir(kind, cat)}", runner)
        else:
            blocks, w = ivf.search_exact(store, per_gen, pp, sdir, key_dir(kind, cat), runner)
        work.update(w)
        items += [
            {
                "kind": kind,
                "r0": blk["r0"],
                "n": blk["n"],
                "files": blk["files"],
                "partials": blk["partials"],
                "m": pp["candidates"],
                "out": f"{pdir}/raw/{catdir}/g{blk['gen']:04d}-b{blk['block']:06d}.parquet",
                "copies": f"{pdir}/copies/{catdir}/g{blk['gen']:04d}-b{blk['block']:06d}.parquet",
            }
            for blk in blocks
        ]
    res = run_items(items, _search_block, runner, store=store, params=pp)
    for it, r in zip(items, res):
        hist[it["kind"]] += np.asarray(r["hist"], np.int64)
        raw[it["kind"]].append((it["out"], it["out"].replace(f"{pdir}/raw/", f"{pdir}/pairs/")))
        copies.append(it["copies"])
    dd = components.near_duplicate_groups(
        store, copies, f"{pdir}/dedup", f"{pdir}/dedup/groups.parquet", pp, runner
    )
    gfile = f"{pdir}/dedup/groups.parquet"
    items = [{"kind": k, "raw": a, "out": b, "groups": gfile} for k in KINDS for a, b in raw[k]]
    res = run_items(items, _finalize_block, runner, store=store, params=pp)
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
        "search": dict(work),
    }


def use_ivf(n: int, pp: dict) -> bool:
    """The sharded IVF search for a category of ``n`` units (``faiss`` / ``ray``: always; ``auto``: above
    ``exact_max``); exact blocked products otherwise."""
    return pp["method"] in ("faiss", "ray") or (pp["method"] == "auto" and n > pp["exact_max"])


# ---------------------------------------------------------------------------------------------------------
# step 2: search (ivf.py: exact blocks or the sharded IVF, by generation), then per query block its merged
# top-m with the band verdicts


def _phash_matrix(col) -> tuple[np.ndarray, np.ndarray]:
    """A list<uint64> column as a padded (P, K) matrix and its per-row counts."""
    import pyarrow as pa

    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if arr.null_count:
        arr = pa.compute.fill_null(arr, pa.scalar([], arr.type))
    lens = np.diff(arr.offsets.to_numpy()).astype(np.int64)
    vals = arr.flatten().to_numpy(zero_copy_only=False).astype(np.uint64)
    m = np.zeros((len(arr), max(1, int(lens.max()) if len(lens) else 1)), np.uint64)
    rows = np.repeat(np.arange(len(arr)), lens)
    cols = np.arange(len(vals)) - np.repeat(np.cumsum(lens) - lens, lens)
    m[rows, cols] = vals
    return m, lens


def _min_phash_distance(qph, cph) -> np.ndarray:
    """Min Hamming distance between the pHash sets of aligned rows (two list<uint64> columns; -1 where
    either has none)."""
    pa_, na = _phash_matrix(qph)
    pb, nb = _phash_matrix(cph)
    d = np.bitwise_count(pa_[:, :, None] ^ pb[:, None, :]).astype(np.int32)  # (P, Ka, Kb)
    valid = (np.arange(pa_.shape[1])[None, :, None] < na[:, None, None]) & (
        np.arange(pb.shape[1])[None, None, :] < nb[:, None, None]
    )
    d = np.where(valid, d, 999).reshape(len(pa_), -1).min(1) if len(pa_) else np.zeros(0, np.int32)
    return np.where(d >= 999, -1, d)


def _search_block(item: dict, store: Store, params: dict) -> dict:
    """Candidates of one query block (its partials merged into each query's top-m): every one with its score,
    band verdict (``in_band``, ``copy_paste`` by score or pHash, ``different_subject``) and pHash distance;
    plus the copy edges."""
    import pyarrow as pa

    kind = item["kind"]
    out_rel, copies_rel = item["out"], item["copies"]
    if store.exists(out_rel) and store.exists(copies_rel):
        return {"skipped": 1, "hist": [0] * params["hist_bins"]}
    low, high = (
        (params["low"], params["high"]) if kind == "subject" else (params["face_low"], params["face_high"])
    )
    nb, cm = ivf.merged(item["partials"], store, item["r0"], item["n"], item["m"])
    qmeta = pa.concat_tables([ivf.read_table(store, f, ivf.META + ["bucket"]) for f, _ in item["files"]])
    qi, rank = np.nonzero(nb.idx >= 0)
    qm = qmeta.take(pa.array(qi, pa.int64()))
    if cm is None:
        cm = qmeta.slice(0, 0)
    score = nb.score[qi, rank].astype(np.float32)
    # the band rule; its top_k comes after the near-duplicate groups (final verdicts), so every in-band one
    # stays in the band here
    band = pairing.classify(nb, low, high, top_k=nb.m)[qi, rank]
    verdict = np.where(
        band == pairing.COPY_PASTE,
        "copy_paste",
        np.where(band == pairing.DIFFERENT_SUBJECT, "different_subject", "in_band"),
    )
    pd_ = np.full(len(qi), -1, np.int32)
    if params["phash_copy_distance"] >= 0 and len(qi):
        pd_ = _min_phash_distance(qm.column("phashes"), cm.column("phashes"))
        verdict = np.where((pd_ >= 0) & (pd_ <= params["phash_copy_distance"]), "copy_paste", verdict)
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
        if len(qi)
        else np.zeros(0, bool)
    )
    copies = t.filter(pa.array(cross)).select(
        ["q_video", "q_clip", "c_video", "c_clip", "q_v_n_clips", "c_v_n_clips"]
    )
    write_parquet(store, copies_rel, copies)
    write_parquet(store, out_rel, t)
    hist = np.histogram(score, bins=params["hist_bins"], range=(-1.0, 1.0))[0]
    return {"skipped": 0, "hist": hist.tolist(), "candidates": int(len(qi))}


# ---------------------------------------------------------------------------------------------------------
# step 3: near-duplicate video groups from copy-paste edges (no all-pairs: only what the search found); the
# distributed steps are in components.py, this in-memory version is their reference in the tests


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


def read_groups(store: Store, rel: str) -> dict[str, str]:
    """The whole near-duplicate map (video -> group) of a groups file (tests and small tools)."""
    t = ivf.read_table(store, rel)
    return dict(zip(t.column("video_id").to_pylist(), t.column("group").to_pylist()))


def groups_of_videos(store: Store, rel: str, videos) -> dict[str, str]:
    """The near-duplicate group of each of ``videos`` (an Arrow array) that is in one: the rows of the groups
    file ``rel`` of those videos only, read with a filter."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pds

    if not len(videos) or not store.exists(rel):
        return {}
    ds = pds.dataset(store.path(rel), format="parquet", filesystem=store.fs)
    t = ds.to_table(filter=pc.field("video_id").isin(videos), columns=["video_id", "group"])
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


def _finalize_block(item: dict, store: Store, params: dict) -> dict:
    """The final verdicts of one query block's candidates; the near-duplicate groups of its own videos (query
    and candidate) are read from ``item["groups"]``, never the whole map."""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = ivf.read_table(store, item["raw"])
    qv_col, cv_col = t.column("q_video"), t.column("c_video")
    vids = pc.unique(pa.chunked_array([*qv_col.chunks, *cv_col.chunks], type=qv_col.type))
    groups = groups_of_videos(store, item["groups"], vids)
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
    # rows are in bucket order (a query block follows the gather files): small row groups let each plan
    # partition read only the groups of its buckets
    write_parquet(store, item["out"], t, row_group_size=4096)
    return {"verdicts": dict(Counter(v.tolist()))}
