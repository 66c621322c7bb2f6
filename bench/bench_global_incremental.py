"""Incremental global phase bench: the search work redone when 1% of videos join a set that was already
searched, over the scale bench's synthetic Panda-shaped units (bench_global_scale's generator: 768-d, 60% of
units in one category, planted identities and re-uploads).

Three runs on Ray over one store: the first gathers and searches 99% of the videos (generation 0); the second
finds the 1% that joined, gathers them into generation 1 and searches new x all and all x new only; a third,
from scratch (its own generation folder and search folder), searches all of them at once. Figures:

- ``global_incremental_redo_frac``: distance computations (query x candidate vector scores) of the second run
  over those of the from-scratch run (the issue's goal: <= 0.05);
- ``global_incremental_read_frac``: vectors read by the search tasks, the same ratio (the IVF re-reads the old
  queries' probe vectors to score them against the new units);
- ``global_incremental_wall_frac``: the second run's gather + search + merge wall time over the from-scratch
  run's (the merge, near-duplicate and verdict steps are linear and run over everything);
- ``global_incremental_pair_agreement``: pairs (verdict ``pair``) found by both the incremental and the
  from-scratch result over those found by either (exact categories: identical; the IVF category reuses the
  centroids of generation 0, so an approximate search may differ on a few).

BENCH_GLOBAL_INCREMENTAL_N sets the units (default 40k, so the large category takes the IVF path: about 4
minutes on a 2-core machine)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

# the scale bench's generator of synthetic Panda-shaped tables (a script run in a child)
from bench.bench_global_scale import GEN, run_child

N = 40_000
DIM = 768
UNITS_PER_VIDEO = 50
ADDED = 0.01
CATEGORIES = {"human": 0.6, "animal": 0.1, "product": 0.1, "landmark": 0.1, "vehicle": 0.1}
REUPLOAD_FRAC = 0.01
PAIR = {"low": 0.6, "high": 0.99, "candidates": 16, "nprobe": 16}

_RUN = """
import json, os, shutil, sys, time
import numpy as np, pyarrow.dataset as pds, ray
from curation.global_phase import PairParams
from curation.global_phase.gather import gather_generations
from curation.global_phase.pairs import find_pairs
from curation.storage import Store

root, side, pair, added = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), float(sys.argv[4])
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
store = Store(root)
pp = {**PairParams().__dict__, **pair}
name = lambda rel: rel.rsplit("/", 1)[-1][: -len(".parquet")]
videos = sorted({name(r) for r in store.list("tables/synth/units/", ".parquet")})
rng = np.random.default_rng(3)
late = set(rng.choice(videos, max(1, round(added * len(videos))), replace=False).tolist())
moved = [r for r in store.list("tables/synth/", ".parquet") if name(r) in late]
for r in moved:  # not committed yet
    os.makedirs(os.path.dirname(os.path.join(side, r)), exist_ok=True)
    shutil.move(store.path(r), os.path.join(side, r))

def run(gen_base, pdir, sdir):
    t0 = time.time()
    g = gather_generations(store, "synth", gen_base, "ray")
    done = find_pairs(store, g, pp, pdir, "ray", search_dir=sdir)
    files = [store.path(f) for k in done["files"] for f in done["files"][k]]
    t = pds.dataset(files, format="parquet").to_table(columns=["q_clip", "q_subject", "c_clip", "c_subject",
                                                             "verdict"])
    keys = zip(*(t.column(c).to_pylist() for c in ("q_clip", "q_subject", "c_clip", "c_subject", "verdict")))
    pairs = {k[:4] for k in keys if k[4] == "pair"}
    return {"wall_s": time.time() - t0, "search": done["search"], "units": sum(g["units"].values()),
            "generations": len(g["generations"]), "new_videos": g["new_videos"]}, pairs

first, _ = run("gen", "p0", "s")
for r in moved:
    shutil.move(os.path.join(side, r), store.path(r))
inc, inc_pairs = run("gen", "p1", "s")
full, full_pairs = run("gen-fresh", "pf", "s-fresh")
both = len(inc_pairs & full_pairs) / max(1, len(inc_pairs | full_pairs))
print(json.dumps({"first": first, "incremental": inc, "full": full, "late_videos": len(late),
                  "videos": len(videos), "pair_agreement": both, "pairs": len(full_pairs)}))
"""


def measure(n: int) -> dict:
    root = tempfile.mkdtemp(prefix=f"bench-global-incremental-{n}-")
    try:
        run_child(GEN, root, n, DIM, UNITS_PER_VIDEO, json.dumps(CATEGORIES), REUPLOAD_FRAC)
        return json.loads(run_child(_RUN, root, os.path.join(root, "side"), json.dumps(PAIR), ADDED))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run() -> dict[str, float]:
    r = measure(int(os.environ.get("BENCH_GLOBAL_INCREMENTAL_N", N)))
    print(f"bench_global_incremental: {json.dumps(r)}", file=sys.stderr)
    inc, full = r["incremental"], r["full"]
    assert inc["units"] == full["units"] and inc["generations"] == 2
    return {
        "global_incremental_units": full["units"],
        "global_incremental_added_videos_frac": round(r["late_videos"] / r["videos"], 4),
        "global_incremental_redo_frac": round(inc["search"]["scored"] / max(1, full["search"]["scored"]), 4),
        "global_incremental_read_frac": round(inc["search"]["read"] / max(1, full["search"]["read"]), 4),
        "global_incremental_wall_frac": round(inc["wall_s"] / max(1e-9, full["wall_s"]), 3),
        "global_incremental_pair_agreement": round(r["pair_agreement"], 4),
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=1))
