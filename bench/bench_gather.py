"""The global phase's gather step at two sizes 10x apart in videos per bucket, on a real S3 API (moto on
loopback, every request through ``bench_io_overlap.LatencyProxy``, which adds ``LATENCY_S`` to each one, as
a round trip to a bucket in the same region would):

- ``gather_worker_peak_rss_mb_{small,large}`` and their ``_ratio``: the peak RSS of the process that gathers
  the buckets (a child running the step with the sequential runner: what one Ray task of the step holds,
  one bucket at a time);
- ``gather_s_{small,large}``: the step's wall time; ``gather_store_requests_{small,large}``: the requests
  the proxy passed on, and ``gather_store_requests_per_video`` the ones a video adds (the rest, the 2 x 256
  bucket listings and the files written, are per bucket);
- ``gather_videos_per_bucket_{small,large}``: the size (Panda-70M's 3.8M videos over the 256 buckets: ~15k).

The synthetic tables have Panda-70M's shape: ``UNITS_PER_VIDEO`` units of 768-d vectors and
``CLIPS_PER_VIDEO`` clip rows of ``ROW_BYTES`` bytes per video (150M units and 70M clips over 3.8M videos),
all of them in ``BUCKETS_USED`` buckets (the other buckets list empty), so a bucket holds as many videos as a
large run's.
``BENCH_GATHER_SMALL`` sets the small size's videos per bucket (the large one is 10x)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid

from bench.bench_io_overlap import LatencyProxy
from bench.bench_map_io import REPO, CountingS3, s3_env

SMALL = 150  # videos per bucket
BUCKETS_USED = 2
UNITS_PER_VIDEO, CLIPS_PER_VIDEO, DIM, ROW_BYTES = 40, 18, 768, 1000
CATEGORIES = {"human": 0.6, "animal": 0.1, "product": 0.1, "landmark": 0.1, "vehicle": 0.1}
LATENCY_S = 0.02

_GEN = """
import json, sys
import numpy as np, pyarrow as pa
from curation.global_phase.tables import bucket_of, clip_schema, unit_schema, write_parquet
from curation.storage import Store

root, cats = sys.argv[1], json.loads(sys.argv[8])
per_bucket, buckets, units, clips, dim, row_bytes = map(int, sys.argv[2:8])
store = Store(root)
rng = np.random.default_rng(0)
names, probs = list(cats), np.array(list(cats.values()))
left = {b: per_bucket for b in range(buckets)}
i = 0
while any(left.values()):
    vid, i = f"v{i:08d}", i + 1
    b = bucket_of(vid)
    if not left.get(b):
        continue
    left[b] -= 1
    x = rng.standard_normal((units, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ut = pa.table({
        "kind": ["subject"] * units, "bucket": [b] * units, "video_id": [vid] * units,
        "clip_id": [f"{vid}-{k % clips:04d}" for k in range(units)], "subject": list(range(units)),
        "category": [names[k] for k in rng.choice(len(names), units, p=probs / probs.sum())],
        "vector": pa.ListArray.from_arrays(pa.array(np.arange(units + 1, dtype=np.int32) * dim),
                                           pa.array(x.ravel())),
        "phashes": [list(p) for p in rng.integers(0, 2**63, (units, 2), dtype=np.int64).astype(np.uint64)],
        "crop_path": [f"{vid}/crop-{k}.jpg" for k in range(units)], "crop_box": [[0, 0, 64, 64]] * units,
        "crop_box_tight": [[0, 0, 64, 64]] * units, "crop_ref": [0] * units, "ref_t_s": [0.0] * units,
        "ref_frame_index": [0] * units, "v_n_clips": [clips] * units,
    }, schema=unit_schema())
    ct = pa.table({
        "bucket": [b] * clips, "video_id": [vid] * clips, "clip_id": [f"{vid}-{k:04d}" for k in range(clips)],
        "row": [json.dumps({"caption": rng.bytes(row_bytes // 2).hex()}) for _ in range(clips)],
    }, schema=clip_schema())
    write_parquet(store, f"tables/bench/units/{b:02x}/{vid}.parquet", ut)
    write_parquet(store, f"tables/bench/clips/{b:02x}/{vid}.parquet", ct)
"""

_RUN = """
import json, sys, time
from curation.global_phase.gather import gather_tables
from curation.storage import Store

t = time.time()
g = gather_tables(Store(sys.argv[1]), "bench", "g", "sequential")
# VmHWM, not getrusage's ru_maxrss: Linux carries the parent's RSS at fork through exec into ru_maxrss,
# and the parent here is moto holding every object
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"s": time.time() - t, "videos": g["videos"], "units": sum(g["units"].values()),
                  "peak_rss_mb": hwm / 1024}))
"""


def _child(code: str, env: dict, *args) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                         cwd=REPO, env={**os.environ, **env, "OMP_NUM_THREADS": "1"})
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    lines = out.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else {}


def measure(per_bucket: int) -> dict:
    import boto3

    srv = CountingS3().start()
    proxy = LatencyProxy(srv.url).start()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-gather-cache-") as cache, s3_env(srv.url, cache):
            bucket = f"gather-{uuid.uuid4().hex[:8]}"
            boto3.client("s3", endpoint_url=srv.url, region_name="us-east-1").create_bucket(Bucket=bucket)
            root = f"s3://{bucket}/run"
            _child(_GEN, {}, root, per_bucket, BUCKETS_USED, UNITS_PER_VIDEO, CLIPS_PER_VIDEO, DIM, ROW_BYTES,
                   json.dumps(CATEGORIES))
            proxy.delay_s, proxy.requests = LATENCY_S, 0
            t = time.time()
            r = _child(_RUN, {"AWS_ENDPOINT_URL": proxy.url}, root)
            r["wall_s"] = time.time() - t
            r["requests"] = proxy.requests
            return r
    finally:
        proxy.stop()
        srv.stop()


def run() -> dict[str, float]:
    small = int(os.environ.get("BENCH_GATHER_SMALL", SMALL))
    out: dict[str, float] = {"gather_latency_s": LATENCY_S}
    for tag, per in (("small", small), ("large", 10 * small)):
        r = measure(per)
        print(f"bench_gather {tag}: {json.dumps(r)}", file=sys.stderr)
        out[f"gather_videos_per_bucket_{tag}"] = per
        out[f"gather_worker_peak_rss_mb_{tag}"] = round(r["peak_rss_mb"], 1)
        out[f"gather_s_{tag}"] = round(r["s"], 1)
        out[f"gather_store_requests_{tag}"] = r["requests"]
    out["gather_worker_peak_rss_mb_ratio"] = round(
        out["gather_worker_peak_rss_mb_large"] / out["gather_worker_peak_rss_mb_small"], 2)
    # the requests a video adds (its two tables' GETs; the listings and the files written are per bucket)
    added = out["gather_store_requests_large"] - out["gather_store_requests_small"]
    out["gather_store_requests_per_video"] = round(added / (9 * small * BUCKETS_USED), 2)
    out["gather_s_ratio"] = round(out["gather_s_large"] / max(out["gather_s_small"], 1e-9), 2)
    return out


if __name__ == "__main__":
    print(json.dumps(run(), indent=1))
