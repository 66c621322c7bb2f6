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
    ``stale`` (nothing is written then).

    The tables stream through: they are read ``IO_THREADS`` at a time in listing order (``Store.read_each``)
    and each goes to its (kind, category) file as it arrives, so the task holds its read-ahead and one row
    group per file (``ROW_GROUP_ROWS``), not the bucket: a bucket of Panda-70M holds ~15k videos."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    b, src, dst = item["bucket"], item["src"], item["dst"]
    prior: dict[tuple[str, str], dict] = {}
    for p in item["priors"]:
        rel = videos_file(p, b)
        if store.exists(rel):
            for r in pq.read_table(io.BytesIO(store.read_bytes(rel))).to_pylist():
                prior[(r["what"], r["rel"])] = r
    listed = [(what, *f) for what in ("units", "clips") for f in _listing(store, f"{src}/{what}/{b:02x}/")]
    seen: list[dict] = []  # what the bucket holds, over every generation
    changed: list[tuple] = []  # held by an earlier generation, but another size or time: read to compare
    new: list[tuple] = []
    for what, rel, size, mtime in listed:
        old = prior.get((what, rel))
        if old is None:
            new.append((what, rel, size, mtime))
        elif old["size"] == size and old["mtime_ns"] == mtime and mtime >= 0:
            seen.append(old)
        else:
            changed.append((what, rel, size, mtime))
    names = {(what, rel) for what, rel, *_ in listed}
    stale = any(k not in names for k in prior)
    for (what, rel, size, mtime), data in zip(changed, store.read_each(c[1] for c in changed)):
        rec = _record(what, rel, size, mtime, _table(data, what))
        seen.append(rec)
        stale = stale or prior[(what, rel)]["ident"] != rec["ident"]  # the same content written again is kept
    out = {"bucket": b, "stale": stale, "new": len(new)}
    empty = {"units": {}, "dims": {}, "clips": 0, "videos": 0, "new_videos": 0}
    if stale:  # the caller gathers everything again in a new epoch: nothing of this scan is kept
        return {**out, "digest": "", **empty}
    if not new:
        return {**out, "digest": _bucket_digest(seen), **empty}
    new_rows = []
    with contextlib.ExitStack() as stack:  # an error leaves no file behind (each writer is atomic)
        files = _BucketFiles(store, dst, b, stack)
        for (what, rel, size, mtime), data in zip(new, store.read_each(n[1] for n in new)):
            t = _table(data, what)
            rec = _record(what, rel, size, mtime, t)
            seen.append(rec)
            new_rows.append(rec)
            files.add(what, t)
        files.close()
    # the bucket's video list last: a generation killed before it is gathered again whole
    vt = pa.Table.from_pylist(new_rows, schema=_videos_schema())
    with store.writer(videos_file(dst, b)) as f:
        pq.write_table(vt, f, compression="zstd")
    return {
        **out,
        "digest": _bucket_digest(seen),
        "units": dict(files.counts),
        "dims": files.dims,
        "clips": files.n_clips,
        "videos": files.n_videos,
        "new_videos": len({rec["rel"].rsplit("/", 1)[-1] for rec in new_rows}),  # units or clips table
    }


ROW_GROUP_ROWS = 1024  # rows a gathered file buffers before it writes a row group (~3 MB of 768-d vectors)


def _table(data: bytes, what: str):
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(data), schema=unit_schema() if what == "units" else clip_schema())


def _record(what: str, rel: str, size: int, mtime: int, t) -> dict:
    return {"what": what, "rel": rel, "size": size, "mtime_ns": mtime, "ident": _ident(t)}


def _bucket_digest(seen: list[dict]) -> str:
    """What a bucket holds over every generation, in the order of a from-scratch run."""
    h = hashlib.sha256()
    for rec in sorted(seen, key=lambda r: (r["what"] != "units", r["rel"])):
        h.update(rec["rel"].encode() + b"\0" + bytes.fromhex(rec["ident"]))
    return h.hexdigest()


class _BucketFiles:
    """A bucket's gathered files of one generation: its clips file and one units file per (kind, category),
    each a streaming Parquet writer (its atomic store writer entered on ``stack``) that buffers up to
    ``ROW_GROUP_ROWS`` rows (row groups of ~1k rows, not one per video) and counts what it took."""

    def __init__(self, store: Store, dst: str, bucket: int, stack: contextlib.ExitStack):
        self.store, self.dst, self.bucket, self.stack = store, dst, bucket, stack
        self.writers: dict[str, object] = {}
        self.buffers: dict[str, list] = {}
        self.buffered: Counter = Counter()  # rows in each buffer
        self.counts: Counter = Counter()
        self.dims: dict[str, int] = {}
        self.n_clips = self.n_videos = 0

    def add(self, what: str, t) -> None:
        import pyarrow.compute as pc

        if not t.num_rows:
            return
        if what == "clips":
            self._put("clips", f"{self.dst}/clips-{self.bucket:02x}.parquet", clip_schema(), t)
            self.n_clips += t.num_rows
            self.n_videos += 1
            return
        kinds, cats = t.column("kind").to_pylist(), t.column("category").to_pylist()
        for kind, cat in sorted(set(zip(kinds, cats))):
            key = f"{kind}\t{cat}"
            part = t.filter(pc.and_(pc.equal(t["kind"], kind), pc.equal(t["category"], cat)))
            self._put(key, unit_file(self.dst, kind, cat, self.bucket), unit_schema(), part)
            self.counts[key] += part.num_rows
            self.dims.setdefault(kind, len(part.column("vector")[0]))

    def _put(self, key: str, rel: str, schema, t) -> None:
        import pyarrow.parquet as pq

        if key not in self.writers:
            f = self.stack.enter_context(self.store.writer(rel))
            self.writers[key] = pq.ParquetWriter(f, schema, compression="zstd")
            self.buffers[key] = []
        self.buffers[key].append(t)
        self.buffered[key] += t.num_rows
        if self.buffered[key] >= ROW_GROUP_ROWS:
            self._flush(key)

    def _flush(self, key: str) -> None:
        import pyarrow as pa

        if self.buffers[key]:
            self.writers[key].write_table(pa.concat_tables(self.buffers[key]))  # one row group
            self.buffers[key], self.buffered[key] = [], 0

    def close(self) -> None:
        for key, w in self.writers.items():
            self._flush(key)
            w.close()
