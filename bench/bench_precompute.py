"""Benchmark of latent precompute: training samples/s from latent shards / from raw shards, same config.

The config is configs/phantom_wan_tiny.yaml (tiny random-init Wan DiT, AutoencoderKLWan and UMT5 of the
real classes) on small shards cut from real footage; the raw run decodes mp4s and runs the VAE, the text
and image encoders every step, the latent run reads what training/precompute.py wrote once.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEPS = 20
WARMUP = 3


def _steps_per_s(cfg_path: Path, overrides: dict) -> float:
    from training.config import load_config
    from training.loop import read_metrics, train

    cfg = load_config(cfg_path, overrides)
    train(cfg)
    rows = [r for r in read_metrics(cfg.log.out_dir) if r["step"] > WARMUP]
    return statistics.median(r["samples_per_s"] for r in rows)


def measure() -> dict[str, float]:
    import yaml

    from tests.training.conftest import write_triplet_shards
    from tests.training.wan_assets import tiny_wan_config, write_tiny_wan_assets
    from training.config import load_config
    from training.precompute import precompute

    with tempfile.TemporaryDirectory(prefix="bench_precompute") as tmp:
        tmp = Path(tmp)
        shards = write_triplet_shards(tmp / "shards", num_samples=24)
        assets = write_tiny_wan_assets(tmp / "assets")
        data = tiny_wan_config(assets, shards, tmp / "raw")
        data["phases"][0]["steps"] = STEPS
        data["log"].update(ckpt_every=10_000, checkpoint_format="full")
        cfg_path = tmp / "bench.yaml"
        cfg_path.write_text(yaml.safe_dump(data))
        t0 = time.perf_counter()
        precompute(load_config(cfg_path), str(shards), str(tmp / "latents"), use_ray=False)
        precompute_s = time.perf_counter() - t0
        raw = _steps_per_s(cfg_path, {"log.out_dir": str(tmp / "raw")})
        lat = _steps_per_s(
            cfg_path, {"log.out_dir": str(tmp / "lat"), "data.latent_shards": str(tmp / "latents")}
        )
    return {
        "precompute_speedup": round(lat / raw, 2),
        "precompute_raw_samples_per_s": round(raw, 2),
        "precompute_latent_samples_per_s": round(lat, 2),
        "precompute_24_samples_s": round(precompute_s, 1),
    }


def run() -> dict[str, float]:
    """In a child process (OMP_WAIT_POLICY must be set before torch loads)."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1")
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "bench.bench_precompute", "--child"], cwd=repo, env=env,
                         capture_output=True, text=True, timeout=900)  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"bench_precompute child failed: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(measure() if "--child" in sys.argv else run()))
