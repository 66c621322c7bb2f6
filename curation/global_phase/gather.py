"""Step 1 of the global phase: gather the per-video tables into files per hash bucket of video ids, the units
split per (kind, category) so a reader of one (kind, category, bucket) reads only its own file.

Gathering is incremental, in *generations*: each run lists the committed videos' tables, compares them with
the videos the earlier generations gathered (each generation records its videos per bucket: name, size,
modification time and a digest of their content), and gathers only the new ones into a new generation (a new
set of per-(kind, category, bucket) files); earlier generations stay as they are. A video whose table changed
(another content digest) or disappeared starts a new *epoch*: everything is gathered again into its first
generation. Layout under ``global/gen-<map_hash>/``:

    state.json                                     the finished generations of the current epoch (last)
    e<E>-g<G>/units/<kind>/<category>/<bb>.parquet  the new units of bucket bb, one file per (kind, category)
    e<E>-g<G>/clips-<bb>.parquet                     their ok clips
    e<E>-g<G>/videos-<bb>.parquet                    the video tables gathered (what, rel, size, mtime, ident)

The data digest (which keys the pairs and the plans) is computed over every gathered video, whatever the
generation it came in, so an incremental run and a from-scratch run over the same videos agree on it."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from collections import Counter

from curation.execute import run_items
from curation.global_phase.tables import BUCKETS, clip_schema, key_dir, sha, unit_schema
from curation.storage import Store, call_with_retry

TASKS_PER_CPU = 4  # gather tasks per cluster CPU: enough to balance uneven buckets, few enough to amortise
STATE = "state.json"


def cluster_cpus(runner: str) -> int:
    """The CPUs of the Ray cluster (1 for the sequential runner): it sizes the fan-out of the steps whose
    outputs do not depend on it (gather); steps whose file names depend on their partitions size them from
    the data alone."""
    if runner == "sequential":
        return 1
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def gather_tables(store: Store, map_hash: str, gdir: str, runner: str) -> dict:
    """Gather all of ``tables/<map_hash>/`` into ``gdir`` (one generation, no earlier one): per bucket its
    clips file and one units file per (kind, category); returns the counts (units per kind and category,
    vector dims, clips, videos), per (kind, category) its files with their row counts in bucket order
    (``parts``) and the digest of it all."""
    res = _scan(store, map_hash, gdir, [], runner)
    gen = _generation(0, gdir, res)
    return {**{k: gen[k] for k in ("units", "dims", "clips", "videos", "parts")}, "digest": _digest(res)}


def gather_generations(store: Store, map_hash: str, base: str, runner: str) -> dict:
    """Gather the videos of ``tables/<map_hash>/`` that no earlier generation under ``base`` holds into a new
    generation (none when there is no new video). Returns the state: ``epoch``, ``generations`` (each with
    its dir, counts and parts), the totals over all generations (``units``, ``dims``, ``clips``, ``videos``,
    ``parts`` in generation then bucket order), the ``digest`` of every gathered video and ``new_videos``."""
    state = store.read_json(f"{base}/{STATE}") or {"epoch": 0, "generations": []}
    epoch, gens = state["epoch"], list(state["generations"])
    res = _scan(store, map_hash, _gen_dir(base, epoch, len(gens)), [g["dir"] for g in gens], runner)
    restarted = any(r["stale"] for r in res)
    if restarted:  # a gathered video changed or disappeared: a new epoch gathers everything again
        epoch, gens = epoch + 1, []
        res = _scan(store, map_hash, _gen_dir(base, epoch, 0), [], runner)
    new = sum(r["new"] for r in res)
    if new:
        gens.append(_generation(len(gens), _gen_dir(base, epoch, len(gens)), res))
    if new or restarted:
        store.write_json(f"{base}/{STATE}", {"epoch": epoch, "generations": gens})
    parts: dict[str, list] = {}
    for g in gens:
        for key, ps in g["parts"].items():
            parts.setdefault(key, []).extend(ps)
    return {
        "epoch": epoch,
        "generations": gens,
        **_totals(gens, parts),
        "digest": _digest(res),
        "new_videos": sum(r["new_videos"] for r in res),
    }


def _gen_dir(base: str, epoch: int, gen: int) -> str:
    return f"{base}/e{epoch:04d}-g{gen:04d}"


def _digest(res: list[dict]) -> str:
    return sha("".join(r["digest"] for r in sorted(res, key=lambda r: r["bucket"])), 64)


def _totals(items: list[dict], parts: dict[str, list]) -> dict:
    """Units per (kind, category), dims, clips and videos summed over ``items`` (bucket results or
    generations, in order), with their ``parts`` sorted by key."""
    units: Counter = Counter()
    dims: dict = {}
    for it in items:
        units.update(it["units"])
        dims.update(it["dims"])
    return {
        "units": dict(sorted(units.items())),
        "dims": dims,
        "clips": sum(it["clips"] for it in items),
        "videos": sum(it["videos"] for it in items),
        "parts": {k: parts[k] for k in sorted(parts)},
    }


def _generation(gen: int, gdir: str, res: list[dict]) -> dict:
    res = sorted(res, key=lambda r: r["bucket"])
    parts: dict[str, list] = {}
    for r in res:
        for key, n in sorted(r["units"].items()):
            kind, cat = key.split("\t")
            parts.setdefault(key, []).append([unit_file(gdir, kind, cat, r["bucket"]), n])
    return {"gen": gen, "dir": gdir, **_totals(res, parts)}


def _scan(store: Store, map_hash: str, dst: str, priors: list[str], runner: str) -> list[dict]:
    n_items = min(BUCKETS, TASKS_PER_CPU * cluster_cpus(runner))
    per = -(-BUCKETS // n_items)
    items = [
        {
            "buckets": list(range(b, min(BUCKETS, b + per))),
            "src": f"tables/{map_hash}",
            "dst": dst,
            "priors": priors,
        }
        for b in range(0, BUCKETS, per)
    ]
    return [r for it in run_items(items, _gather_buckets, runner, store=store) for r in it["buckets"]]


def unit_file(gdir: str, kind: str, category: str, bucket: int) -> str:
    return f"{gdir}/units/{key_dir(kind, category)}/{bucket:02x}.parquet"


def videos_file(gdir: str, bucket: int) -> str:
    return f"{gdir}/videos-{bucket:02x}.parquet"


def _videos_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("what", pa.string()),
            ("rel", pa.string()),
            ("size", pa.int64()),
            ("mtime_ns", pa.int64()),
            ("ident", pa.string()),
        ]
    )


def _gather_buckets(item: dict, store: Store) -> dict:
    """Several buckets per item: Ray's per-task overhead stays small next to the reads."""
    res = [_gather_bucket({**item, "bucket": b}, store) for b in item["buckets"]]
    return {"buckets": res}


def _listing(store: Store, prefix: str) -> list[tuple[str, int, int]]:
    """(rel, size, mtime_ns) of the Parquet files under ``prefix``, sorted (as ``Store.list`` names them)."""
    from pyarrow import fs

    try:
        infos = call_with_retry(
            store.fs.get_file_info,
            fs.FileSelector(store.path(prefix), recursive=True, allow_not_found=True),
            what=f"{store!r} listing {prefix!r}",
        )
    except FileNotFoundError:
        return []
    base = store.base.rstrip("/") + "/"
    out = []
    for info in infos:
        name = info.path.rsplit("/", 1)[-1]
        if info.type != fs.FileType.File or ".tmp" in name or not name.endswith(".parquet"):
            continue
        rel = info.path[len(base) :] if info.path.startswith(base) else info.path
        out.append((rel, int(info.size or 0), int(info.mtime_ns or -1)))
    return sorted(out)


def _ident(t) -> str:
    """What a video table holds, not the float noise of its vectors: CPU kernels move embeddings by ~1e-7 with
    their thread count (a Ray worker vs the driver); a changed embedder changes the map hash instead."""
    ident = t.drop_columns([c for c in ("vector",) if c in t.column_names]).to_pylist()
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


def _gather_bucket(item: dict, store: Store) -> dict:
    """One bucket: the video tables no earlier generation holds, gathered into this generation's files. A
    table an earlier generation holds with another content, or one that disappeared, marks the bucket
    ``stale`` (nothing is written then)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    b, src, dst = item["bucket"], item["src"], item["dst"]
    prior: dict[tuple[str, str], dict] = {}
    for p in item["priors"]:
        rel = videos_file(p, b)
        if store.exists(rel):
            for r in pq.read_table(io.BytesIO(store.read_bytes(rel))).to_pylist():
                prior[(r["what"], r["rel"])] = r
    counts: Counter = Counter()
    dims: dict[str, int] = {}
    n_clips = n_videos = 0
    seen: list[dict] = []
    new_rows: list[dict] = []
    schemas = {"units": unit_schema(), "clips": clip_schema()}
    tables: dict[tuple[str, str], object] = {}
    listed: set = set()
    stale = False
    for what in ("units", "clips"):
        for rel, size, mtime in _listing(store, f"{src}/{what}/{b:02x}/"):
            listed.add((what, rel))
            old = prior.get((what, rel))
            if old is not None and old["size"] == size and old["mtime_ns"] == mtime and mtime >= 0:
                seen.append(old)
                continue
            t = pq.read_table(io.BytesIO(store.read_bytes(rel)), schema=schemas[what])
            rec = {"what": what, "rel": rel, "size": size, "mtime_ns": mtime, "ident": _ident(t)}
            seen.append(rec)
            if old is not None:
                stale = stale or old["ident"] != rec["ident"]  # the same content written again is kept
                continue
            new_rows.append(rec)
            tables[(what, rel)] = t
    stale = stale or any(k not in listed for k in prior)
    h = hashlib.sha256()  # what this bucket holds, over every generation (the order of a from-scratch run)
    for rec in sorted(seen, key=lambda r: (r["what"] != "units", r["rel"])):
        h.update(rec["rel"].encode() + b"\0" + bytes.fromhex(rec["ident"]))
    out = {"bucket": b, "stale": stale, "new": len(new_rows), "digest": h.hexdigest()}
    if stale or not new_rows:
        return {**out, "units": {}, "dims": {}, "clips": 0, "videos": 0, "new_videos": 0}
    with contextlib.ExitStack() as stack:  # an error leaves no file behind (each writer is atomic)
        writers: dict = {}  # one streaming writer per (kind, category) of this bucket, and one for the clips

        def writer(key: str, rel: str, schema):
            if key not in writers:
                f = stack.enter_context(store.writer(rel))
                writers[key] = pq.ParquetWriter(f, schema, compression="zstd")
            return writers[key]

        for rec in new_rows:
            what, t = rec["what"], tables[(rec["what"], rec["rel"])]
            if not t.num_rows:
                continue
            if what == "clips":
                writer("clips", f"{dst}/clips-{b:02x}.parquet", schemas["clips"]).write_table(t)
                n_clips += t.num_rows
                n_videos += 1
                continue
            kinds, cats = t.column("kind").to_pylist(), t.column("category").to_pylist()
            for kind, cat in sorted(set(zip(kinds, cats))):
                key = f"{kind}\t{cat}"
                part = t.filter(pc.and_(pc.equal(t["kind"], kind), pc.equal(t["category"], cat)))
                writer(key, unit_file(dst, kind, cat, b), schemas["units"]).write_table(part)
                counts[key] += part.num_rows
                dims.setdefault(kind, len(part.column("vector")[0]))
        for w in writers.values():
            w.close()
    # the bucket's video list last: a generation killed before it is gathered again whole
    vt = pa.Table.from_pylist(new_rows, schema=_videos_schema())
    with store.writer(videos_file(dst, b)) as f:
        pq.write_table(vt, f, compression="zstd")
    return {
        **out,
        "units": dict(counts),
        "dims": dims,
        "clips": n_clips,
        "videos": n_videos,
        "new_videos": len({rec["rel"].rsplit("/", 1)[-1] for rec in new_rows}),  # units or clips table
    }
