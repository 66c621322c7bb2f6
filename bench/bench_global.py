"""Global-phase benchmark: pairing, the pairs-to-clips join and shard writing on Ray (the production path)
over
synthetic committed videos of 20k and 100k clips (generated embeddings; a few small real H.264 clips and JPEG
crops reused by reference); wall time and the driver's peak RSS (VmHWM of a fresh process per size)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

SIZES = (20_000, 100_000)
DIM = 64
CLIPS_PER_VIDEO = 50

_GEN = """
import sys
from curation.demo.tables import make_videos
make_videos(sys.argv[1], int(sys.argv[2]), dim=int(sys.argv[3]), clips_per_video=int(sys.argv[4]))
"""

_RUN = """
import json, os, sys, time
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
import ray
from curation.config import StageSpec
from curation.global_phase import run_global
from curation.stage import StageContext
from curation.storage import Store

root = sys.argv[1]
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
specs = [StageSpec(stage="pair", params={"low": 0.6, "high": 0.99, "candidates": 16}),
         StageSpec(stage="write_shards", params={"maxcount": 2000, "in_pair": False})]
t0 = time.time()
s = run_global(specs, Store(root), StageContext(out_dir=root), "synth", runner="ray")
wall = time.time() - t0
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024
print(json.dumps({"wall_s": wall, "hwm_mb": hwm, "triplets": s["triplets_out"], "shards": s["shards"],
                  "partitions": s["partitions"], "timings_s": s["timings_s"]}))
"""


def _py(code: str, *args) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        timeout=1800,
    )
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return out.stdout


def measure(n: int) -> dict:
    root = tempfile.mkdtemp(prefix=f"bench-global-{n}-")
    try:
        _py(_GEN, root, n, DIM, CLIPS_PER_VIDEO)
        return json.loads(_py(_RUN, root).strip().splitlines()[-1])
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run() -> dict[str, float]:
    out: dict[str, float] = {}
    for n in SIZES:
        r = measure(n)
        tag = f"{n // 1000}k"
        out[f"global_phase_s_{tag}"] = round(r["wall_s"], 2)
        out[f"global_phase_driver_peak_rss_mb_{tag}"] = round(r["hwm_mb"], 1)
        print(f"bench_global {tag}: {r}", file=sys.stderr)
    return out


if __name__ == "__main__":
    print(json.dumps(run(), indent=1))
