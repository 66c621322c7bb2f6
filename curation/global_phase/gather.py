"""Step 1 of the global phase: gather the per-video tables into files per hash bucket of video ids, the units
split per (kind, category) so a reader of one (kind, category, bucket) reads only its own file."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from collections import Counter

from curation.execute import run_items
from curation.global_phase.tables import BUCKETS, clip_schema, key_dir, sha, unit_schema
from curation.storage import Store

TASKS_PER_CPU = 4  # gather tasks per cluster CPU: enough to balance uneven buckets, few enough to amortise


def cluster_cpus(runner: str) -> int:
    """The CPUs of the Ray cluster (1 for the sequential runner): it sizes the fan-out of the steps whose
    outputs do not depend on it (gather); steps whose file names depend on their partitions size them from
    the data alone."""
    if runner == "sequential":
        return 1
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def gather_tables(store: Store, map_hash: str, gdir: str, runner: str) -> dict:
    """Gather ``tables/<map_hash>/`` into ``gdir``: per bucket its clips file and one units file per (kind,
    category); returns the counts (units per kind and category, vector dims, clips, videos), per (kind,
    category) its files with their row counts in bucket order (``parts``) and the digest of it all."""
    n_items = min(BUCKETS, TASKS_PER_CPU * cluster_cpus(runner))
    per = -(-BUCKETS // n_items)
    items = [
        {"buckets": list(range(b, min(BUCKETS, b + per))), "src": f"tables/{map_hash}", "dst": gdir}
        for b in range(0, BUCKETS, per)
    ]
    res = [r for it in run_items(items, _gather_buckets, runner, store=store) for r in it["buckets"]]
    res.sort(key=lambda r: r["bucket"])
    units: Counter = Counter()
    dims: dict = {}
    parts: dict[str, list] = {}
    for r in res:
        units.update(r["units"])
        dims.update(r["dims"])
        for key, n in sorted(r["units"].items()):
            kind, cat = key.split("\t")
            parts.setdefault(key, []).append([unit_file(gdir, kind, cat, r["bucket"]), n])
    return {
        "units": dict(units),
        "dims": dims,
        "clips": sum(r["clips"] for r in res),
        "videos": sum(r["videos"] for r in res),
        "parts": parts,
        "digest": sha("".join(r["digest"] for r in res), 64),
    }


def unit_file(gdir: str, kind: str, category: str, bucket: int) -> str:
    return f"{gdir}/units/{key_dir(kind, category)}/{bucket:02x}.parquet"


def _gather_buckets(item: dict, store: Store) -> dict:
    """Several buckets per item: Ray's per-task overhead stays small next to the reads."""
    res = [
        _gather_bucket({"bucket": b, "src": item["src"], "dst": item["dst"]}, store) for b in item["buckets"]
    ]
    return {"buckets": res}


def _gather_bucket(item: dict, store: Store) -> dict:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    b, src, dst = item["bucket"], item["src"], item["dst"]
    counts: Counter = Counter()
    dims: dict[str, int] = {}
    n_clips = n_videos = 0
    h = hashlib.sha256()  # what this bucket holds: a video added or re-exported changes it
    for what, schema in (("units", unit_schema()), ("clips", clip_schema())):
        files = list(store.list(f"{src}/{what}/{b:02x}/", ".parquet"))
        if not files:
            continue
        writers: dict = {}  # units: one streaming writer per (kind, category) of this bucket
        with contextlib.ExitStack() as stack:  # an error leaves no file behind (each writer is atomic)
            def writer(key: str, rel: str, writers=writers, schema=schema):
                if key not in writers:
                    f = stack.enter_context(store.writer(rel))
                    writers[key] = pq.ParquetWriter(f, schema, compression="zstd")
                return writers[key]

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
                if what == "clips":
                    writer("clips", f"{dst}/clips-{b:02x}.parquet").write_table(t)
                    n_clips += t.num_rows
                    n_videos += 1
                    continue
                kinds, cats = t.column("kind").to_pylist(), t.column("category").to_pylist()
                for kind, cat in sorted(set(zip(kinds, cats))):
                    key = f"{kind}\t{cat}"
                    part = t.filter(pc.and_(pc.equal(t["kind"], kind), pc.equal(t["category"], cat)))
                    writer(key, unit_file(dst, kind, cat, b)).write_table(part)
                    counts[key] += part.num_rows
                    dims.setdefault(kind, len(part.column("vector")[0]))
            for w in writers.values():
                w.close()
    return {
        "bucket": b,
        "units": dict(counts),
        "dims": dims,
        "clips": n_clips,
        "videos": n_videos,
        "digest": h.hexdigest(),
    }
