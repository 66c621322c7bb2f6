"""Global-phase scale bench: gather, sharded search, near-duplicate groups and verdicts on Ray over synthetic
units shaped like Panda-70M (768-d, 60% of units in one category, planted identity clusters, planted
re-uploads) at two sizes 10x apart; wall time, the driver's and every Ray worker's peak RSS, recall of the
sharded search against an exact search on a query sample, and the planted near-duplicate groups found.

``make bench`` runs the small size only; ``make bench-scale`` (BENCH_GLOBAL_SCALE_LARGE=1) adds the large one
(over 10 minutes on a 2-core machine). BENCH_GLOBAL_SCALE_SUB_LISTS=<k> puts every IVF category on the
two-level quantizer (first-level cells of about k lists), which otherwise starts above 4M units a category.
Plans and shards are not part of it (bench_global measures those)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

SMALL, LARGE = 100_000, 1_000_000
DIM = 768
UNITS_PER_VIDEO = 50
CATEGORIES = {"human": 0.6, "animal": 0.1, "product": 0.1, "landmark": 0.1, "vehicle": 0.1}
REUPLOAD_FRAC = 0.01  # videos with one or two planted re-uploads (near-duplicate groups of 2-3)
PAIR = {"low": 0.6, "high": 0.99, "candidates": 16, "nprobe": 0}  # 0: the default (ivf.NPROBE)

GEN = """
import json, sys
import numpy as np, pyarrow as pa
from curation.global_phase.tables import bucket_of, unit_schema, write_parquet
from curation.storage import Store

root, n_units, dim, per, cats, reup = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), \\
    json.loads(sys.argv[5]), float(sys.argv[6])
store = Store(root)
rng = np.random.default_rng(0)
names, probs = list(cats), np.array(list(cats.values()))
n_videos = n_units // per
n_ids = max(2, n_units // 8)
id_cat = rng.choice(len(names), n_ids, p=probs / probs.sum())
base = rng.standard_normal((n_ids, dim)).astype(np.float32)
base /= np.linalg.norm(base, axis=1, keepdims=True)
schema = unit_schema()
groups = []
written = 0
v = 0
while written < n_units:
    vid = f"v{v:07d}"
    ids = rng.integers(0, n_ids, per)
    x = base[ids] + 0.5 * rng.standard_normal((per, dim)).astype(np.float32) / np.sqrt(dim)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ph = rng.integers(0, 2**63, (per, 2), dtype=np.int64).astype(np.uint64)
    copies = [vid]
    if rng.random() < reup:
        copies += [f"{vid}r{j}" for j in range(int(rng.integers(1, 3)))]
        groups.append(copies)
    for c in copies:
        t = pa.table({
            "kind": ["subject"] * per, "bucket": [bucket_of(c)] * per, "video_id": [c] * per,
            "clip_id": [f"{c}-{i:04d}" for i in range(per)], "subject": [0] * per,
            "category": [names[k] for k in id_cat[ids]],
            "vector": pa.ListArray.from_arrays(pa.array(np.arange(per + 1, dtype=np.int32) * dim),
                                               pa.array(x.ravel())),
            "phashes": [list(p) for p in ph], "crop_path": ["c.jpg"] * per,
            "crop_box": [[0, 0, 8, 8]] * per, "crop_box_tight": [[0, 0, 8, 8]] * per, "crop_ref": [0] * per,
            "ref_t_s": [0.0] * per, "ref_frame_index": [0] * per, "v_n_clips": [per] * per,
        }, schema=schema)
        write_parquet(store, f"tables/synth/units/{bucket_of(c):02x}/{c}.parquet", t)
        written += per
    v += 1
json.dump(groups, open(f"{root}/planted_groups.json", "w"))
"""

_RUN = """
import json, os, sys, threading, time
import numpy as np
import psutil, ray
from curation import execute
from curation.global_phase import PairParams, components, gather, ivf, pairs
from curation.global_phase.gather import gather_tables
from curation.global_phase.pairs import find_pairs, read_groups
from curation.storage import Store

root, pair = sys.argv[1], json.loads(sys.argv[2])
if os.environ.get("BENCH_GLOBAL_SCALE_SUB_LISTS"):  # the two-level quantizer at a size this machine runs
    ivf.TWO_LEVEL_LISTS = 1
    ivf.SUB_LISTS = int(os.environ["BENCH_GLOBAL_SCALE_SUB_LISTS"])
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
peak, uss, secs, step, stop = {}, {}, {}, ["gather"], threading.Event()

def sample():  # RSS and USS of this Ray's workers (descendants of this driver), 5 times a second, per step
    me = psutil.Process()
    while not stop.is_set():
        for p in me.children(recursive=True):
            try:
                cmd = " ".join(p.cmdline())
                if cmd.startswith("ray::") or "default_worker.py" in cmd:
                    m = p.memory_full_info()  # uss: private pages only (object-store pages are shared)
                    k = step[0]
                    peak[k] = max(peak.get(k, 0), m.rss)
                    uss[k] = max(uss.get(k, 0), m.uss)
            except psutil.Error:
                pass
        stop.wait(0.2)

def labelled(fn):  # names the step (the item function run_items maps) the sampler files its peaks under
    def run(items, f, *a, **kw):
        step[0] = getattr(f, "__name__", "?").lstrip("_")
        t = time.time()
        try:
            return fn(items, f, *a, **kw)
        finally:
            secs[step[0]] = secs.get(step[0], 0.0) + time.time() - t
    return run

for mod in (gather, pairs, ivf, components):
    mod.run_items = labelled(execute.run_items)
threading.Thread(target=sample, daemon=True).start()
store = Store(root)
pp = {**PairParams().__dict__, **pair}
t0 = time.time()
g = gather_tables(store, "synth", "g", "ray")
store.write_json("g/_done.json", g)
t1 = time.time()
done = find_pairs(store, g, pp, "p", "ray")
wall = time.time() - t0
time.sleep(0.5)
stop.set()
copies = sorted(store.list("p/copies/", ".parquet"))
t2 = time.time()
components.near_duplicate_groups(store, copies, "dedup2", "dedup2/groups.parquet", pp, "ray")
dedup_s = time.time() - t2
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024
found = read_groups(store, "p/dedup/groups.parquet")
planted = json.load(open(f"{root}/planted_groups.json"))
ok = sum(1 for grp in planted if len({found.get(v) for v in grp}) == 1 and found.get(grp[0]) is not None
         and sum(1 for x in found.values() if x == found[grp[0]]) == len(grp))
mb = lambda d: {k: round(v / 2**20, 1) for k, v in d.items()}
print(json.dumps({"wall_s": wall, "gather_s": t1 - t0, "dedup_s": dedup_s, "driver_mb": hwm,
                  "worker_mb": max(peak.values()) / 2**20, "worker_uss_mb": max(uss.values()) / 2**20,
                  "worker_rss_mb_by_step": mb(peak), "worker_uss_mb_by_step": mb(uss),
                  "s_by_step": {k: round(v, 1) for k, v in secs.items()},
                  "units": sum(g["units"].values()),
                  "groups_exact": ok / max(1, len(planted)), "planted": len(planted),
                  "verdicts": done["verdicts"]["subject"]}))
"""

_RECALL = """
import json, sys
import numpy as np, pyarrow.compute as pc, pyarrow.dataset as pds
from curation.global_phase.ivf import read_table
from curation.global_phase.gather import unit_file
from curation.storage import Store

root, pair, cat, nq = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4])
store = Store(root)
g = store.read_json("g/_done.json")
parts = g["parts"]["subject\\t" + cat]
rng = np.random.default_rng(1)
qf = [parts[i][0] for i in rng.choice(len(parts), min(len(parts), nq // 4), replace=False)]
q = [read_table(store, f, ["clip_id", "video_id", "vector"]).slice(0, 4) for f in qf]
qc = sum((t.column("clip_id").to_pylist() for t in q), [])
qv = np.array(sum((t.column("video_id").to_pylist() for t in q), []), dtype=object)
vec = lambda t: np.stack(t.column("vector").to_numpy(zero_copy_only=False)).astype(np.float32)
qx = np.concatenate([vec(t) for t in q])
qx /= np.linalg.norm(qx, axis=1, keepdims=True)
m = pair["candidates"]
best_s = np.full((len(qc), m), -np.inf, np.float32)
best_c = np.full((len(qc), m), "", dtype=object)
for f, _ in parts:  # exact top-m among other videos, one bucket file at a time
    t = read_table(store, f, ["clip_id", "video_id", "vector"])
    x = vec(t)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    s = qx @ x.T
    s[qv[:, None] == np.array(t.column("video_id").to_pylist(), dtype=object)[None, :]] = -np.inf
    cs = np.concatenate([best_s, s], 1)
    ids = np.array(t.column("clip_id").to_pylist(), dtype=object)[None, :].repeat(len(qc), 0)
    cc = np.concatenate([best_c, ids], 1)
    o = np.argsort(-cs, 1, kind="stable")[:, :m]
    best_s, best_c = np.take_along_axis(cs, o, 1), np.take_along_axis(cc, o, 1)
want = {(qc[i], best_c[i, j]) for i in range(len(qc)) for j in range(m)
        if pair["low"] <= best_s[i, j] <= pair["high"]}
files = [store.path(f) for f in store.list("p/raw/subject/", ".parquet")]
t = pds.dataset(files, format="parquet").to_table(
    filter=pc.field("q_clip").isin(qc), columns=["q_clip", "c_clip"])
got = set(zip(t.column("q_clip").to_pylist(), t.column("c_clip").to_pylist()))
recall = len(want & got) / max(1, len(want))
print(json.dumps({"recall": recall, "in_band_exact": len(want), "queries": len(qc)}))
"""


def run_child(code: str, *args) -> str:
    """Run ``code`` in a child Python (one thread per BLAS) from the repository root; its last stdout line."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env, cwd=root
    )
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    lines = out.stdout.strip().splitlines()
    return lines[-1] if lines else ""


def measure(n: int) -> dict:
    root = tempfile.mkdtemp(prefix=f"bench-global-scale-{n}-")
    try:
        run_child(GEN, root, n, DIM, UNITS_PER_VIDEO, json.dumps(CATEGORIES), REUPLOAD_FRAC)
        r = json.loads(run_child(_RUN, root, json.dumps(PAIR)))
        r.update(json.loads(run_child(_RECALL, root, json.dumps(PAIR), "human", 200)))
        return r
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run() -> dict[str, float]:
    out: dict[str, float] = {}
    small = int(os.environ.get("BENCH_GLOBAL_SCALE_SMALL", SMALL))  # sizes to look at (the figures: defaults)
    sizes = {"small": small}
    if os.environ.get("BENCH_GLOBAL_SCALE_LARGE"):
        sizes["large"] = int(os.environ.get("BENCH_GLOBAL_SCALE_LARGE_N", LARGE))
    for tag, n in sizes.items():
        r = measure(n)
        print(f"bench_global_scale {tag}: {json.dumps(r)}", file=sys.stderr)
        out[f"global_scale_units_{tag}"] = r["units"]
        out[f"global_scale_s_{tag}"] = round(r["wall_s"], 1)
        out[f"global_scale_worker_peak_rss_mb_{tag}"] = round(r["worker_mb"], 1)
        out[f"global_scale_worker_peak_uss_mb_{tag}"] = round(r["worker_uss_mb"], 1)
        out[f"global_scale_driver_peak_rss_mb_{tag}"] = round(r["driver_mb"], 1)
        out[f"global_scale_near_dup_s_{tag}"] = round(r["dedup_s"], 2)
        out[f"global_scale_recall_vs_exact_{tag}"] = round(r["recall"], 4)
        out[f"near_dup_groups_exact_{tag}"] = r["groups_exact"]
    big = "large" if "large" in sizes else "small"
    out["global_scale_recall_vs_exact"] = out[f"global_scale_recall_vs_exact_{big}"]
    out["near_dup_groups_exact"] = out[f"near_dup_groups_exact_{big}"]
    if "large" in sizes:
        for what in ("s", "worker_peak_rss_mb", "worker_peak_uss_mb", "driver_peak_rss_mb", "near_dup_s"):
            a, b = out[f"global_scale_{what}_small"], out[f"global_scale_{what}_large"]
            out[f"global_scale_{what}_ratio"] = round(b / max(a, 1e-9), 2)
    return out


if __name__ == "__main__":
    print(json.dumps(run(), indent=1))
