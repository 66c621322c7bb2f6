"""Benchmark of the sources: Panda-70M CSV parsing throughput, the safe-literal overhead, the sample build."""

from __future__ import annotations

import ast
import csv
import os
import shutil
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
