"""Benchmark of the trainer: the shard loader alone vs tiny-config training steps, on the same shards."""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LOADER_BATCHES = 40
TRAIN_STEPS = 20
WARMUP_STEPS = 3  # first steps pay for worker start-up and allocator warm-up


def _shards(root: Path) -> Path:
    """The curated sample shards when `make curate` has run, else small shards cut from real footage."""
    from curation.shards import INDEX_FILE

    curated = Path("output/sample/shards")
    if (curated / INDEX_FILE).exists():
        return curated
    from tests.training.conftest import write_triplet_shards

    return write_triplet_shards(root / "shards", num_samples=24)


def measure() -> dict[str, float]:
    """Loader and training throughput in this process (run() calls it in a fresh one)."""
    from curation.shards import list_shards
    from training.config import load_config
    from training.data import StreamSpec, build_loader
    from training.loop import read_metrics, train

    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="bench_training") as tmp:
        shards = _shards(Path(tmp))
        cfg = load_config(
            repo / "configs" / "train_tiny.yaml",
            {
                "data.shards": str(shards),
                "log.out_dir": f"{tmp}/run",
                "log.log_every": 1,
                "log.ckpt_every": 10_000,
                "log.sample_every": 0,
                "log.tensorboard": False,
                "phases[0].steps": TRAIN_STEPS,
                "phases[1].steps": 1,
            },
        )
        phase = cfg.phases[0]

        # The loader alone: same phase, same workers, batches pulled as fast as it can make them.
        spec = StreamSpec(
            urls=list_shards(shards),
            buckets=phase.buckets,
            num_frames=phase.num_frames,
            fps=phase.fps,
            batch_size=phase.batch_size,
            seed=cfg.seed,
            num_streams=max(1, cfg.data.num_workers),
            shuffle_buffer=cfg.data.shuffle_buffer,
            shuffle_initial=cfg.data.shuffle_initial,
        )
        batches = iter(build_loader(spec, cfg.data.num_workers, cfg.data.prefetch_factor))
        next(batches)  # worker start-up
        t0 = time.perf_counter()
        n = sum(len(b["keys"]) for b in itertools.islice(batches, LOADER_BATCHES))
        loader_sps = n / (time.perf_counter() - t0)
        del batches

        # Training: the same loop `make train` runs (encoders + MMDiT forward/backward + AdamW + EMA).
        train(cfg, stop_at_step=TRAIN_STEPS)
        rows = [r for r in read_metrics(cfg.log.out_dir) if r["step"] > WARMUP_STEPS]
        step_ms = statistics.median(r["step_ms"] for r in rows)
        train_sps = statistics.median(r["samples_per_s"] for r in rows)
        losses = [r["loss"] for r in read_metrics(cfg.log.out_dir)]
    return {
        "loader_samples_per_s": round(loader_sps, 2),
        "train_samples_per_s": round(train_sps, 2),
        "train_tiny_step_ms": round(step_ms, 1),
        "loader_over_train_ratio": round(loader_sps / train_sps, 2),
        "train_tiny_loss_first": round(losses[0], 4),
        "train_tiny_loss_last": round(losses[-1], 4),
    }


def run() -> dict[str, float]:
    """Measure in a child process: OpenMP reads OMP_WAIT_POLICY once, when torch loads, and spinning
    OpenMP threads make torch many times slower on 2 shared cores."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1")
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-m", "bench.bench_training", "--child"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if out.returncode != 0:
        raise RuntimeError(f"bench_training child failed: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(measure() if "--child" in sys.argv else run()))
