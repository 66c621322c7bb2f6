"""The global phase's driver: each committed video's columnar tables -> near-duplicate video groups ->
cross-video pairs (faiss IVF / exact blocks searched in map_batches) -> sample plans -> WebDataset shards,
every step a job over files in the store, resumable by its outputs and keyed by a hash of what made them.

Layout under the store (``map_hash``: the per-video phase; ``pair_hash``: + the data digest and the pair spec;
``global_hash``: + the write_shards spec, so changing write_shards keeps the pairs and changing pair keeps the
tables; ``search_hash``: the map phase, the gather epoch and the params the search depends on):

    tables/<map_hash>/units/<bb>/<video>.parquet     pairable units of one video (export_video)
    tables/<map_hash>/clips/<bb>/<video>.parquet     its ok clips, the row as JSON text
    global/gen-<map_hash>/state.json, e<E>-g<G>/...   the gathered generations (gather.py): each run gathers
                                                     the newly committed videos only, into a new generation
    global/search-<search_hash>/{exact,ivf}/...       search partials per (query generation, searched
                                                     generation), never redone (ivf.py)
    global/pairs-<pair_hash>/raw/<kind>/<cat>/g<G>-b<B>.parquet   every candidate with its score (merged)
    global/pairs-<pair_hash>/copies/...               copy-paste edges between videos (for dedup)
    global/pairs-<pair_hash>/dedup/groups.parquet     near-duplicate video groups
    global/pairs-<pair_hash>/pairs/<kind>/<cat>/...   final verdicts (band, top_k, near-dup)
    global/clips-<digest>/clips-<bb>.parquet          the clips of every generation, one file per bucket
                                                     (only when there is more than one generation)
    global/plans-<global_hash>/part-P.parquet         one row per sample, partition P = a range of buckets
    global/results/<global_hash>/<shards_subdir>/shard-P-S.tar, .records/, .index.json   (and <eval_subdir>/)
    <shards_subdir>, <eval_subdir>, global/current.json   the published pointers, written last (publish.py)

Only the search is incremental: the merge of the partials into each query's top-m, the near-duplicate
groups, the verdicts, plans and shards are linear in their inputs and run over everything when the data
changes (a new data digest keys them).

The driver holds counts, object references and per-shard entries only, never rows: its memory is bounded by
the number of partitions and shards, not by the number of clips. ``runner="sequential"`` runs the very same
step functions over the same files in one process (tests)."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import tempfile
import time
from collections import Counter, defaultdict

from curation import pairing, scenarios
from curation.execute import run_items
from curation.global_phase import plans, publish
from curation.global_phase.gather import gather_generations, gather_tables
from curation.global_phase.pairs import find_pairs
from curation.global_phase.params import PairParams, ShardParams, validate_step
from curation.global_phase.tables import BUCKETS, export_video, sha, video_units, write_parquet
from curation.global_phase.write import write_partition
from curation.shards import INDEX_FILE, RECORDS_DIR, atomic_write_json
from curation.storage import Store

log = logging.getLogger(__name__)


def _params_dict(params) -> dict:
    return dataclasses.asdict(params) if dataclasses.is_dataclass(params) else dict(params or {})


def step_hashes(map_hash: str, pair_params, shard_params, data_digest: str = "") -> tuple[str, str]:
    """(pair_hash, global_hash): the pairs depend on the map phase (its hash and the digest of the tables
    gathered, so videos joining later redo the global steps) and the pair params; the plans and shards on
    those and the write_shards params."""
    pair_hash = sha(
        json.dumps({"map": map_hash, "data": data_digest, "pair": _params_dict(pair_params)}, sort_keys=True)
    )
    global_hash = sha(
        json.dumps({"pair": pair_hash, "write_shards": _params_dict(shard_params)}, sort_keys=True)
    )
    return pair_hash, global_hash


NO_SEARCH = {"scored": 0, "read": 0, "tasks_run": 0, "tasks_skipped": 0}  # a step skipped: nothing searched
SEARCH_PARAMS = ("candidates", "same_source")  # the search partials depend on these (+ nprobe: ivf.py)


def search_hash(map_hash: str, epoch: int, pp: dict) -> str:
    """The key of the search partials: the map phase, the gather epoch (generations are numbered within it)
    and the pair params the search depends on; the band, top_k, pHash and near-duplicate params are applied
    after it, so changing them keeps every partial."""
    keep = {k: pp[k] for k in SEARCH_PARAMS}
    return sha(json.dumps({"map": map_hash, "epoch": epoch, "search": keep}, sort_keys=True))


def params_of(specs) -> tuple[PairParams, ShardParams]:
    """The typed params of the ``pair`` and ``write_shards`` specs (the defaults where one is absent)."""
    pair_p, shard_p = PairParams(), ShardParams()
    for spec in specs:
        if spec.stage == "pair":
            pair_p = validate_step(spec, "pair")
        elif spec.stage == "write_shards":
            shard_p = validate_step(spec, "write_shards")
    return pair_p, shard_p


def run_global(specs, store: Store, ctx, map_hash: str, runner: str = "ray") -> dict:
    """The global phase over the tables ``export_video`` wrote under ``tables/<map_hash>/``. Returns the
    summary counts. Each step is skipped when its outputs (a ``_done.json`` under its hash) exist."""
    t0 = time.time()
    pair_p, shard_p = params_of(specs)
    pp, wp = _params_dict(pair_p), _params_dict(shard_p)
    timings = {}

    # 1. gather: the newly committed videos into a new generation (a listing and nothing else when none is)
    gather = gather_generations(store, map_hash, f"global/gen-{map_hash}", runner)
    timings["gather_s"] = round(time.time() - t0, 2)
    pair_hash, global_hash = step_hashes(map_hash, pair_p, shard_p, gather["digest"])
    pdir, sdir = f"global/pairs-{pair_hash}", f"global/plans-{global_hash}"
    final = store.read_json(f"{sdir}/_done.json")
    if final and (publish.current(store) or {}).get("global_hash") == global_hash:
        return {**final["summary"], "resumed": True, "search": NO_SEARCH}

    # 2-4. pairs (search, near-duplicate groups, final verdicts)
    pairs_done = store.read_json(f"{pdir}/_done.json")
    search_dir = f"global/search-{search_hash(map_hash, gather['epoch'], pp)}"
    if pairs_done is None:
        pairs_done = find_pairs(store, gather, pp, pdir, runner, search_dir=search_dir)
        store.write_json(f"{pdir}/_done.json", pairs_done)
        store.write_json(f"{pdir}/histogram.json", pairs_done["histogram"])
    else:
        pairs_done = {**pairs_done, "search": NO_SEARCH}
    timings["pairs_s"] = round(time.time() - t0 - sum(timings.values()), 2)

    # 5. plans
    # partitions from the data (clips and candidate bytes); each plan task reads its own videos' rows of the
    # near-duplicate groups file, the driver never reads it
    n_part = plans.partitions_for(store, gather["clips"], pairs_done["files"], wp)
    gdir = clips_dir(store, gather, n_part, runner)
    params = {"write": wp, "config_hash": ctx.config_hash or map_hash, "global_hash": global_hash}
    plan_items = plans.plan_items(n_part, pairs_done["files"], gdir, f"{pdir}/dedup/groups.parquet", sdir)
    plans_done = store.read_json(f"{sdir}/_plans_done.json")
    if plans_done is None:
        res = run_items(plan_items, plans.plan_partition, runner, store=store, params=params)
        rej: Counter = Counter()
        for r in res:
            rej.update(r["rejections"])
        plans_done = {"samples": sum(r["samples"] for r in res), "rejections": dict(rej)}
        store.write_json(f"{sdir}/_plans_done.json", plans_done)
    timings["plans_s"] = round(time.time() - t0 - sum(timings.values()), 2)

    # 6. shards, under this result's own folders (the published result stays as it is meanwhile)
    subs = {"train": wp["shards_subdir"], "eval": wp["eval_subdir"]}
    params["dirs"] = {split: publish.result_dirs(store, sub, global_hash) for split, sub in subs.items()}
    for dirs in params["dirs"].values():
        if store.is_local and os.path.isdir(store.path(dirs["tars"])):
            for name in os.listdir(store.path(dirs["tars"])):  # temp files of a writer killed mid-shard
                if ".tmp" in name:
                    os.unlink(os.path.join(store.path(dirs["tars"]), name))
    w_items = [{"partition": it["partition"], "plans": it["out"]} for it in plan_items]
    res = run_items(w_items, write_partition, runner, store=store, params=params)
    entries = sorted((e for r in res for e in r["entries"]), key=lambda e: (e["split"], e["name"]))
    rej = Counter(plans_done["rejections"])
    for r in res:
        rej.update(r["rejections"])
    indexes = {}
    for split, sub in subs.items():
        mine = [e for e in entries if e["split"] == split]
        names = {e["name"] for e in mine}
        dirs = params["dirs"][split]
        # shards (and records) of a partition that a killed run wrote with more shards than it has now
        for rel in [*store.list(f"{dirs['tars']}/", ".tar"), *store.list(f"{dirs['meta']}/{RECORDS_DIR}/")]:
            if rel.rsplit("/", 1)[-1].removesuffix(".json") not in names:
                store.delete(rel)
        # eval: published when it has shards, or when an earlier result published one (emptied then)
        if mine or split == "train" or store.exists(f"{sub}/{INDEX_FILE}"):
            indexes[sub] = {
                "config_hash": params["config_hash"],
                "global_hash": global_hash,
                "split": split,
                "shards": [{k: e[k] for k in ("name", "samples", "bytes", "sha256")} for e in mine],
                "total_samples": sum(e["samples"] for e in mine),
                "total_bytes": sum(e["bytes"] for e in mine),
            }
    # 7. publish: the pointers last (publish.py); then the step folders no later run can reuse
    publish.publish(store, global_hash, indexes)
    collect_steps(store, map_hash, gather["epoch"], [pdir, sdir, search_dir, gdir])
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
        "generations": len(gather["generations"]),
        "new_videos": gather["new_videos"],
        "search": pairs_done["search"],
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


STEP_PREFIXES = ("gen-", "search-", "pairs-", "plans-", "clips-")


def collect_steps(store: Store, map_hash: str, epoch: int, keep: list[str]) -> list[str]:
    """After a publish, delete the step folders under ``global/`` that no later run reads: the pairs, plans,
    search and union-of-clips folders of earlier results (their shards stay under ``global/results/`` as
    ``publish`` keeps them), the gathered generations of this map phase's earlier epochs, and those of other
    map phases (a return to one gathers again). Kept: ``keep`` (this result's folders, including the search
    partials and the generations the next incremental run extends). Two listings of one level; returns the
    folders deleted."""
    names = {k.split("/", 2)[1] for k in keep if k.startswith("global/")}
    gone = []
    for name in store.subdirs("global"):
        if name.startswith(STEP_PREFIXES) and name not in names and name != f"gen-{map_hash}":
            store.delete_dir(f"global/{name}")
            gone.append(f"global/{name}")
    for name in store.subdirs(f"global/gen-{map_hash}"):
        if name.startswith("e") and not name.startswith(f"e{epoch:04d}-"):
            store.delete_dir(f"global/gen-{map_hash}/{name}")
            gone.append(f"global/gen-{map_hash}/{name}")
    return gone


def clips_dir(store: Store, gather: dict, n_part: int, runner: str) -> str:
    """The folder of one clips file per bucket that the plans read: the generation's own folder when there is
    one generation, else ``global/clips-<digest>/`` with every generation's clips of each bucket."""
    gens = gather["generations"]
    if len(gens) <= 1:
        return gens[0]["dir"] if gens else "global/no-clips"
    d = f"global/clips-{gather['digest'][:16]}"
    if store.exists(f"{d}/_done.json"):
        return d
    span = BUCKETS // n_part
    items = [
        {"lo": p * span, "hi": (p + 1) * span, "gens": [g["dir"] for g in gens], "out": d}
        for p in range(n_part)
    ]
    run_items(items, _union_clips, runner, store=store)
    store.write_json(f"{d}/_done.json", {"generations": len(gens)})
    return d


def _union_clips(item: dict, store: Store) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 0
    for b in range(item["lo"], item["hi"]):
        rels = [f"{g}/clips-{b:02x}.parquet" for g in item["gens"]]
        tabs = [pq.read_table(io.BytesIO(store.read_bytes(r))) for r in rels if store.exists(r)]
        if tabs:
            t = pa.concat_tables(tabs)
            write_parquet(store, f"{item['out']}/clips-{b:02x}.parquet", t)
            n += t.num_rows
    return {"clips": n}


# ---------------------------------------------------------------------------------------------------------
# the pair step on in-memory rows (tests and small tools): the same steps over a temporary local store


def pair_rows(rows: list[dict], pair_params, out_dir: str) -> list[dict]:
    """Rows with ``pairs`` / ``pair_rejections`` / ``face_pairs`` / ``face_pair_rejections`` on each subject,
    computed by the global phase's own steps (export, gather, search, near-duplicate groups, verdicts) over a
    temporary store; the histogram goes to ``<out_dir>/pairing/histogram.json``."""
    import pyarrow.dataset as pds

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
        gather = gather_tables(store, "m", "g", "sequential")
        done = find_pairs(store, gather, pp, "p", "sequential")
        at = {(r.get("clip_id"), si): s for r in rows for si, s in enumerate(r["subjects"])}
        for kind, pk, rk in (
            ("subject", "pairs", "pair_rejections"),
            ("face", "face_pairs", "face_pair_rejections"),
        ):
            low, high = (pp["low"], pp["high"]) if kind == "subject" else (pp["face_low"], pp["face_high"])
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
                # a copy by pHash, not by score: its distance says why
                if (
                    rec["phash_distance"] >= 0
                    and rec["band"] == "copy_paste"
                    and pairing.band_reason(rec["score"], low, high) != "copy_paste"
                ):
                    out["phash_distance"] = rec["phash_distance"]
                if rec["verdict"] == "pair":
                    s[pk].append(out)
                else:
                    s[rk].append({**out, "reason": rec["verdict"]})
        atomic_write_json(os.path.join(out_dir, "pairing", "histogram.json"), done["histogram"])
    return rows
