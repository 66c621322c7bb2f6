"""Resume and reuse on the bundled sample (default pipeline, sequential runner, 4 videos):

- ``resume_redo_frac``: a run SIGKILLed once half of its videos are committed, then resumed: the fraction
  of the videos finished before the kill that the resume processed again (goal 0);
- ``rerun_after_pair_change_ratio``: wall time of a re-run after changing ``pair.low`` / the first run's
  (goal <= 0.2), with ``rerun_after_pair_change_videos_reprocessed`` (goal 0)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VIDEOS = "gen01,gen02,gen04,gen07"
REPO = Path(__file__).resolve().parents[1]


def _rows(cfg):
    from curation.demo.footage import build_sample
    from curation.sources import load_source

    spec = cfg.sources["sample"]
    build_sample(spec.sample_dir)  # the sample source reads a built folder (as `python -m curation.run` does)
    wanted = set(VIDEOS.split(","))
    return [r for r in load_source(spec, str(REPO / "output" / "sample")) if r["video_id"] in wanted]


def run() -> dict[str, float]:
    from curation.config import load_config
    from curation.manifest import Manifest
    from curation.runner import replace_stage_params, run_pipeline
    from curation.stage import StageContext

    os.chdir(REPO)
    cfg = load_config("pipelines.yaml")
    rows = _rows(cfg)
    tmp = Path(tempfile.mkdtemp(prefix="bench-resume-"))

    out = tmp / "first"
    t0 = time.time()
    first = run_pipeline(cfg, "default", rows, StageContext(out_dir=str(out)), runner="sequential")
    t_first = time.time() - t0
    low = float(next(s for s in cfg.pipelines["default"] if s.stage == "pair").params.get("low", 0.78))
    changed = replace_stage_params(cfg, "default", "pair", low=round(low - 0.02, 4))
    t0 = time.time()
    again = run_pipeline(changed, "default", rows, StageContext(out_dir=str(out)), runner="sequential")
    t_again = time.time() - t0

    killed = tmp / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "curation.run", "--runner", "sequential", "--videos", VIDEOS,
           "--out", str(killed)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    m = Manifest(killed)
    deadline = time.time() + 900
    while proc.poll() is None and time.time() < deadline and len(list(m.records())) < len(rows) // 2:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {r["video_id"]: r["committed_at"] for r in m.records()}
    resumed = run_pipeline(cfg, "default", rows, StageContext(out_dir=str(killed)), runner="sequential")
    after = {r["video_id"]: r["committed_at"] for r in m.records()}
    redone = sum(after.get(v) != t for v, t in before.items())
    return {
        "resume_redo_frac": redone / max(1, len(before)),
        "resume_videos_finished_before_kill": len(before),
        "resume_videos_skipped": resumed.videos_skipped,
        "rerun_after_pair_change_ratio": t_again / t_first,
        "rerun_after_pair_change_videos_reprocessed": again.videos_committed,
        "curate_sample4_first_run_s": t_first,
        "curate_sample4_triplets": first.global_summary.get("triplets_out", 0),
    }


if __name__ == "__main__":
    print(run())
