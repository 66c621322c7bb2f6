"""Step 1 of the global phase: gather the per-video tables into one file per hash bucket of video ids."""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter

from curation.execute import run_items
from curation.global_phase.tables import BUCKETS, clip_schema, sha, unit_schema
from curation.storage import Store

GATHER_ITEMS = 32  # gather tasks (8 buckets each)


def gather_tables(store: Store, map_hash: str, gdir: str, runner: str) -> dict:
    """Gather ``tables/<map_hash>/`` into ``gdir``: per bucket its units and clips files; returns the counts
    (units per kind and category, vector dims, clips, videos), the units files and the digest of it all."""
    items = [
        {"buckets": list(range(b, b + BUCKETS // GATHER_ITEMS)), "src": f"tables/{map_hash}", "dst": gdir}
        for b in range(0, BUCKETS, BUCKETS // GATHER_ITEMS)
    ]
    res = [r for it in run_items(items, _gather_buckets, runner, store=store) for r in it["buckets"]]
    units: Counter = Counter()
    dims: dict = {}
    for r in res:
        units.update(r["units"])
        dims.update(r["dims"])
    return {
        "units": dict(units),
        "dims": dims,
        "clips": sum(r["clips"] for r in res),
        "videos": sum(r["videos"] for r in res),
        "units_files": [f"{gdir}/units-{r['bucket']:02x}.parquet" for r in res if r["units"]],
        "digest": sha("".join(r["digest"] for r in res), 64),
    }


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
    for what, schema in (("units", unit_schema()), ("clips", clip_schema())):
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
