"""Benchmark of the sources: Panda-70M CSV parsing throughput, the safe-literal overhead, the sample build,
and the Ray source ingest (``curation.ingest``): the driver's peak RSS on synthetic Panda CSVs of 100k and
1M rows (the 1M case only with ``BENCH_INGEST_1M=1``: about 10 minutes on 2 cores), its growth from 100k to
1M rows, the rows per second, and the largest Ray worker's peak RSS, private memory (USS, by task) and heap
(``Anonymous`` in smaps_rollup: USS also counts object-store pages only that worker maps). Knobs for
experiments: ``BENCH_PART_ROWS`` (records per part, default 10 000), ``BENCH_ROWS_PER_BLOCK`` (videos per
block; default as the runner cuts them, ``ingest.block_rows``) and ``BENCH_BLOCK_KB`` (Ray Data's target
block size for the ingest's dataset)."""

from __future__ import annotations

import ast
import csv
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

N_ROWS = 20_000  # about the size of one Panda-70M validation CSV shard
N_SPANS = 6
N_LABEL_ROWS = 5_000
# An ASSUMED mix of Panda-70M's desirable_filtering labels per span (the real shares are not measured here):
# most spans desirable, the rest spread over the five reasons the Panda authors filter on.
PANDA_LABEL_MIX = {
    "desirable": 0.80,
    "0_low_desirable_score": 0.06,
    "1_still_foreground_image": 0.05,
    "2_tiny_camera_movement": 0.04,
    "3_screen_in_screen": 0.03,
    "4_computer_screen_recording": 0.02,
}


def _write_panda_csv(path: str, videos_dir: str) -> None:
    from curation.sources.panda70m import format_time

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["videoID", "url", "timestamp", "caption", "matching_score"])
        for i in range(N_ROWS):
            vid = f"v{i:010d}"
            if i % 10 == 0:  # every tenth video is on disk, the rest become missing_video rejections
                open(os.path.join(videos_dir, f"{vid}.mp4"), "wb").close()
            stamps = [[format_time(k * 4.0), format_time(k * 4.0 + 3.5)] for k in range(N_SPANS)]
            caps = [f"A person in a red jacket walks along a busy street, shot {k}." for k in range(N_SPANS)]
            w.writerow(
                [
                    vid,
                    f"https://www.youtube.com/watch?v={vid}",
                    repr(stamps),
                    repr(caps),
                    repr([0.4] * N_SPANS),
                ]
            )


def _write_panda7_csv(path: str, seed: int = 0) -> int:
    """A training-format CSV (7 columns) of N_LABEL_ROWS videos, 1-20 spans each, labels drawn from
    PANDA_LABEL_MIX; returns the number of spans. No video is on disk: the label filter acts first."""
    import random

    from curation.sources.panda70m import format_time

    rng = random.Random(seed)
    labels, weights = list(PANDA_LABEL_MIX), list(PANDA_LABEL_MIX.values())
    n_spans = 0
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["videoID", "url", "timestamp", "caption", "matching_score", "desirable_filtering",
                    "shot_boundary_detection"])
        for i in range(N_LABEL_ROWS):
            k = rng.randint(1, 20)
            n_spans += k
            stamps = [[format_time(j * 8.0), format_time(j * 8.0 + 6.0)] for j in range(k)]
            shots = [[[format_time(0.0), format_time(2.5)], [format_time(2.5), format_time(6.0)]]] * k
            w.writerow([f"L{i:010d}", "", repr(stamps), repr([f"clip {j}" for j in range(k)]),
                        repr([0.3] * k), repr(rng.choices(labels, weights, k=k)), repr(shots)])
    return n_spans


def label_prefilter(tmp: str) -> dict[str, float]:
    """``panda_label_prefilter_frac``: the share of spans ``keep_labels: [desirable]`` takes out before any
    download or decode, on the synthetic label mix; and ``panda_label_videos_skipped_frac``."""
    from curation.sources.panda70m import iter_panda_csv

    csv_path = os.path.join(tmp, "panda7.csv")
    n_spans = _write_panda7_csv(csv_path)
    videos = os.path.join(tmp, "videos7")
    os.makedirs(videos, exist_ok=True)
    skipped = videos_out = n_videos = 0
    t0 = time.perf_counter()
    for r in iter_panda_csv(csv_path, videos, keep_labels=["desirable"]):
        n_videos += 1
        skipped += len(r.get("skipped_spans") or [])
        videos_out += str(r.get("reason") or "").startswith("panda:")
    dt = time.perf_counter() - t0
    return {"panda_label_prefilter_frac": skipped / n_spans,
            "panda_label_videos_skipped_frac": videos_out / n_videos,
            "panda_label_rows_per_s": N_LABEL_ROWS / dt}


def write_synthetic_panda_csv(path: str, n_rows: int, seed: int = 0) -> int:
    """A Panda-70M training-format CSV (the 7 columns the reader knows) of ``n_rows`` videos, 1-20 spans
    each with captions, scores, labels from PANDA_LABEL_MIX and two shots per span, streamed to disk in
    chunks from per-span-count templates (a 1M-row file in well under a minute). Returns the spans."""
    from curation.sources.panda70m import format_time

    rng = random.Random(seed)
    labels, weights = list(PANDA_LABEL_MIX), list(PANDA_LABEL_MIX.values())

    def cells(values) -> str:  # one CSV line's worth of fields, quoted as csv.writer quotes them
        buf = io.StringIO()
        csv.writer(buf, lineterminator="").writerow(values)
        return buf.getvalue()

    templates = {}
    for k in range(1, 21):
        stamps = [[format_time(j * 8.0), format_time(j * 8.0 + 6.0)] for j in range(k)]
        caps = [f"A person in a red jacket walks along a busy street, shot {j}." for j in range(k)]
        shots = [[[format_time(0.0), format_time(2.5)], [format_time(2.5), format_time(6.0)]]] * k
        templates[k] = (cells([repr(stamps), repr(caps), repr([0.31] * k)]), cells([repr(shots)]),
                        [cells([repr(rng.choices(labels, weights, k=k))]) for _ in range(32)])
    n_spans = 0
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write("videoID,url,timestamp,caption,matching_score,desirable_filtering,shot_boundary_detection\n")
        chunk = []
        for i in range(n_rows):
            k = rng.randint(1, 20)
            n_spans += k
            mid, shots, labs = templates[k]
            vid = f"s{i:010d}"
            chunk.append(f"{vid},https://www.youtube.com/watch?v={vid},{mid},{labs[i % 32]},{shots}\n")
            if len(chunk) >= 10_000:
                f.write("".join(chunk))
                chunk = []
        f.write("".join(chunk))
    return n_spans


_INGEST_CHILD = """
import json, os, sys, threading, time
import psutil
from curation.config import RayConfig, RunConfig
from curation.execute import init_ray
from curation.ingest import block_rows, ensure_csv_parts, panda_dataset
from curation.sources.panda70m import PandaCsvSource
from curation.storage import Store

csv_path, videos, out = sys.argv[1:4]
init_ray(RayConfig(num_cpus=int(sys.argv[4])))
if os.environ.get("BENCH_BLOCK_KB"):
    import ray.data
    ray.data.DataContext.get_current().target_max_block_size = int(os.environ["BENCH_BLOCK_KB"]) * 1024
me = psutil.Process()
worker_peak = [0, ""]
by_task: dict = {}  # task name -> its workers' peak USS
uss_peak = [0, ""]  # private pages only: a worker's RSS also counts the object-store pages it maps (shared)
stop = threading.Event()

anon_peak = [0]


def anon_now():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def hwm(p):
    try:
        for line in open(f"/proc/{p.pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0

anon_w = [0, ""]  # a worker's own heap (Anonymous in smaps_rollup), the part its code controls
shm_w = [0]  # object-store pages mapped by that worker alone (private file pages, counted in its USS)


def rollup(p):
    anon = shm = 0
    try:
        for line in open(f"/proc/{p.pid}/smaps_rollup"):
            k, _, v = line.partition(":")
            if k == "Anonymous":
                anon = int(v.split()[0]) * 1024
            elif k in ("Private_Clean", "Private_Dirty"):
                shm += int(v.split()[0]) * 1024
    except OSError:
        pass
    return anon, max(0, shm - anon)


def sample():  # the peak RSS (VmHWM) of every Ray worker process under this driver, until the end
    while True:
        anon_peak[0] = max(anon_peak[0], anon_now())
        for c in me.children(recursive=True):
            try:
                cmd = " ".join(c.cmdline())  # a worker names itself ray::<task>; not the raylet (plasma)
                if cmd.startswith("ray::") and hwm(c) > worker_peak[0]:
                    worker_peak[:] = [hwm(c), cmd.split()[0]]
                if cmd.startswith("ray::"):
                    u = c.memory_full_info().uss
                    if u > uss_peak[0]:
                        uss_peak[:] = [u, cmd.split()[0]]
                    by_task[cmd.split()[0]] = max(by_task.get(cmd.split()[0], 0), u)
                    a, s = rollup(c)
                    if a > anon_w[0]:
                        anon_w[:] = [a, cmd.split()[0]]
                    shm_w[0] = max(shm_w[0], s)
            except psutil.Error:
                pass
        if stop.wait(0.5):
            return

threading.Thread(target=sample, daemon=True).start()
t0 = time.perf_counter()
src = PandaCsvSource(csv_path, videos, "panda70m", ("desirable",))
store = Store(out)
parts = ensure_csv_parts(src, store, int(os.environ.get("BENCH_PART_ROWS") or 10_000))
def count(batch):  # in the worker: as in the runner, only small items reach the driver
    import pandas as pd

    return pd.DataFrame({"n": [len(batch)]})


n = 0
rc = RunConfig()
rpb = block_rows(parts, rc.videos_per_block, rc.max_source_blocks)  # as the runner cuts it
rpb = int(os.environ.get("BENCH_ROWS_PER_BLOCK") or rpb)
for batch in panda_dataset(src, parts, store, rpb).map_batches(count, batch_format="pandas").iter_batches(
        batch_size=None, batch_format="pandas"):
    n += int(batch["n"].sum())  # the driver counts: it never holds the records
dt = time.perf_counter() - t0
stop.set()
time.sleep(0.6)
print(json.dumps({"rows": n, "csv_rows": parts.rows, "wall_s": dt, "parts": len(parts.paths),
                  "driver_peak_rss_mb": hwm(psutil.Process()) / 2**20,
                  "driver_peak_anon_mb": anon_peak[0] / 2**20,
                  "worker_peak_rss_mb": worker_peak[0] / 2**20, "worker_peak_was": worker_peak[1],
                  "worker_peak_uss_mb": uss_peak[0] / 2**20, "worker_peak_uss_was": uss_peak[1],
                  "worker_peak_uss_mb_by_task": {k: round(v / 2**20) for k, v in by_task.items()},
                  "worker_peak_anon_mb": anon_w[0] / 2**20, "worker_peak_anon_was": anon_w[1],
                  "worker_peak_private_file_mb": shm_w[0] / 2**20}))
"""


def ingest_once(tmp: str, n_rows: int, num_cpus: int = 2) -> dict:
    """The Ray ingest of a synthetic ``n_rows`` CSV in a child process that does only that (so its VmHWM is
    the ingest's driver peak; not getrusage's ru_maxrss, which Linux carries from the forking parent through
    exec); the CSV is deleted afterwards."""
    csv_path = os.path.join(tmp, f"panda_{n_rows}.csv")
    t0 = time.perf_counter()
    write_synthetic_panda_csv(csv_path, n_rows)
    gen_s = time.perf_counter() - t0
    videos = os.path.join(tmp, "videos_ingest")
    os.makedirs(videos, exist_ok=True)
    for i in range(0, n_rows, 10):  # every tenth video on disk
        open(os.path.join(videos, f"s{i:010d}.mp4"), "wb").close()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo, "RAY_USAGE_STATS_ENABLED": "0"}
    try:
        proc = subprocess.run([sys.executable, "-c", _INGEST_CHILD, csv_path, videos,
                               os.path.join(tmp, f"out_{n_rows}"), str(num_cpus)],
                              capture_output=True, text=True, env=env, cwd=repo, check=True)
    finally:
        os.unlink(csv_path)
        shutil.rmtree(videos, ignore_errors=True)
        shutil.rmtree(os.path.join(tmp, f"out_{n_rows}"), ignore_errors=True)
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["rows"] == res["csv_rows"] == n_rows, res
    return {**res, "gen_s": gen_s}


def source_ingest(tmp: str) -> dict[str, float]:
    """``source_ingest_driver_peak_rss_mb_{100k,1m}``, their ratio (goal <= 1.3), ``source_ingest_rows_per_s``
    and ``source_ingest_worker_peak_rss_mb`` (the largest Ray worker), with its private memory (USS) at both
    sizes and their ratio."""
    out: dict[str, float] = {}
    small = ingest_once(tmp, 100_000)
    out["source_ingest_driver_peak_rss_mb_100k"] = small["driver_peak_rss_mb"]
    out["source_ingest_rows_per_s"] = small["rows"] / small["wall_s"]
    out["source_ingest_worker_peak_rss_mb"] = small["worker_peak_rss_mb"]
    out["source_ingest_worker_peak_uss_mb_100k"] = small["worker_peak_uss_mb"]
    out["source_ingest_driver_peak_anon_mb_100k"] = small["driver_peak_anon_mb"]
    out["source_ingest_worker_peak_anon_mb_100k"] = small["worker_peak_anon_mb"]  # the worker's own heap
    if os.environ.get("BENCH_INGEST_1M") == "1":
        big = ingest_once(tmp, 1_000_000)
        out["source_ingest_driver_peak_rss_mb_1m"] = big["driver_peak_rss_mb"]
        ratio = big["driver_peak_rss_mb"] / small["driver_peak_rss_mb"]
        out["source_ingest_driver_rss_ratio_1m_over_100k"] = ratio
        out["source_ingest_rows_per_s_1m"] = big["rows"] / big["wall_s"]
        out["source_ingest_driver_peak_anon_mb_1m"] = big["driver_peak_anon_mb"]
        out["source_ingest_worker_peak_rss_mb"] = max(small["worker_peak_rss_mb"], big["worker_peak_rss_mb"])
        out["source_ingest_worker_peak_uss_mb_1m"] = big["worker_peak_uss_mb"]
        out["source_ingest_worker_peak_anon_mb_1m"] = big["worker_peak_anon_mb"]
        out["source_ingest_worker_anon_ratio_1m_over_100k"] = big["worker_peak_anon_mb"] / max(
            1e-9, small["worker_peak_anon_mb"])
        out["source_ingest_worker_uss_ratio_1m_over_100k"] = big["worker_peak_uss_mb"] / max(
            1e-9, small["worker_peak_uss_mb"])
    return out


def run() -> dict[str, float]:
    from curation.demo.footage import build_sample
    from curation.demo.ground_truth import load_ground_truth
    from curation.sources.panda70m import parse_literal, read_panda_csv

    out: dict[str, float] = {}
    tmp = tempfile.mkdtemp(prefix="bench_sources_")
    try:
        videos = os.path.join(tmp, "videos")
        os.makedirs(videos)
        csv_path = os.path.join(tmp, "panda.csv")
        _write_panda_csv(csv_path, videos)
        t0 = time.perf_counter()
        recs = read_panda_csv(csv_path, videos)
        dt = time.perf_counter() - t0
        out["sources_panda_rows_per_s"] = N_ROWS / dt
        out["sources_panda_ok_frac"] = sum(r["status"] == "ok" for r in recs) / len(recs)
        out.update(label_prefilter(tmp))
        out.update(source_ingest(tmp))

        # the ast check before literal_eval, side by side with plain literal_eval on the same texts
        texts = [repr([["0:00:00.000", "0:00:05.005"]] * N_SPANS)] * 5000
        t0 = time.perf_counter()
        for t in texts:
            ast.literal_eval(t)
        plain = time.perf_counter() - t0
        t0 = time.perf_counter()
        for t in texts:
            parse_literal(t)
        safe = time.perf_counter() - t0
        out["sources_safe_literal_over_plain"] = safe / plain

        sample_dir = os.path.join(tmp, "sample")
        t0 = time.perf_counter()
        paths = build_sample(sample_dir)
        out["sources_sample_build_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        build_sample(sample_dir)
        out["sources_sample_rebuild_skip_s"] = time.perf_counter() - t0
        gt = load_ground_truth(paths)
        out["sources_sample_footage_s"] = sum(v["duration_s"] for v in gt["videos"].values())
        out["sources_sample_shots"] = float(sum(len(v["shots"]) for v in gt["videos"].values()))
        out["sources_sample_mb"] = (
            sum(os.path.getsize(os.path.join(paths.videos_dir, f)) for f in os.listdir(paths.videos_dir))
            / 2**20
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


if __name__ == "__main__":
    for k, v in run().items():
        print(f"{k:36s} {v:.4f}")
