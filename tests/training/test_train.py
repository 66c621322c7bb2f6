"""End-to-end trainer tests on small real shards: exact resume after a kill, bad data, sampling, config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from tests.training.conftest import TINY
from training import checkpoint as ckpt
from training.config import ConfigError, load_config
from training.loop import WarmupCosine, phase_at, read_metrics, train


def _config(tmp_path, shards, name, cache_dir=None, **log):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(TINY))
    overrides = {"data.shards": str(shards), "log.out_dir": str(tmp_path / name), "data.cache_dir": cache_dir}
    overrides.update({f"log.{k}": v for k, v in log.items()})
    return load_config(path, overrides)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corrupt_shards):
    """One uninterrupted run, and one killed at step 2 (mid-phase) and at 4 (phase boundary), resumed.

    Both share an encoder-output cache: the first run fills it, the resumed one reads it, so equal
    losses also show that cached encodings equal fresh ones.
    """
    tmp = tmp_path_factory.mktemp("train")
    cache = str(tmp / "cache")
    full_cfg = _config(tmp, corrupt_shards, "full", cache, sample_every=6, sample_steps=2)
    full = train(full_cfg)
    cut_cfg = _config(tmp, corrupt_shards, "cut", cache, sample_every=6, sample_steps=2)
    parts = [train(cut_cfg, stop_at_step=2), train(cut_cfg, stop_at_step=4), train(cut_cfg)]
    return full_cfg, full, cut_cfg, parts


def test_resume_continues_the_same_loss_curve(runs):
    full_cfg, full, cut_cfg, parts = runs
    assert [p["step"] for p in parts] == [2, 4, 6]
    assert sum((p["losses"] for p in parts), []) == full["losses"]  # exact, on CPU
    assert [r["loss"] for r in read_metrics(cut_cfg.log.out_dir)] == pytest.approx(full["losses"], abs=0)
    a = ckpt.load_checkpoint(ckpt.latest_checkpoint(f"{full_cfg.log.out_dir}/checkpoints"))
    b = ckpt.load_checkpoint(ckpt.latest_checkpoint(f"{cut_cfg.log.out_dir}/checkpoints"))
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    assert not all(torch.equal(a["model"][k], a["ema"][k]) for k in a["model"])  # EMA lags the weights
    assert a["ranks"][0]["position"] == b["ranks"][0]["position"]
    assert a["scheduler"] == b["scheduler"] and a["step"] == 6
    assert full["cache_hits"] < sum(p["cache_hits"] for p in parts)  # the resumed run read the cache


def test_fsdp2_matches_plain_training(runs, tmp_path, corrupt_shards):
    """FSDP2 (fully_shard, gloo, one process) runs the same loop: same losses, plain full state dicts."""
    import socket

    import torch.distributed as dist

    from training.loop import Context, fully_shard_model

    full_cfg, full = runs[0], runs[1]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        cfg = _config(tmp_path, corrupt_shards, "fsdp")
        cfg.scaling.strategy = "fsdp"
        ctx = Context(prepare_model=lambda m: fully_shard_model(m, torch.device("cpu")))
        out = train(cfg, ctx, stop_at_step=2)
    finally:
        dist.destroy_process_group()
    assert out["losses"] == pytest.approx(full["losses"][:2], rel=1e-5)
    sharded = ckpt.load_checkpoint(ckpt.latest_checkpoint(f"{cfg.log.out_dir}/checkpoints"))
    plain = ckpt.load_checkpoint(ckpt.latest_checkpoint(f"{full_cfg.log.out_dir}/checkpoints"))
    assert sharded["model"].keys() == plain["model"].keys() == sharded["ema"].keys()
    assert all(type(v) is torch.Tensor for v in sharded["model"].values())  # gathered, not DTensors


def test_corrupt_samples_counted_not_fatal(runs):
    _, full, _, parts = runs
    assert sum(full["corrupt"].values()) >= 1
    assert parts[-1]["corrupt"] == full["corrupt"]  # counts survive the resumes


def test_checkpoint_contents_are_weights_only(runs):
    full_cfg = runs[0]
    path = ckpt.latest_checkpoint(f"{full_cfg.log.out_dir}/checkpoints")
    state = torch.load(path, map_location="cpu", weights_only=True)  # raises on anything but plain data
    assert {"model", "ema", "optimizer", "scheduler", "ranks", "config", "step"} <= set(state)
    assert isinstance(state["ranks"][0]["rng"]["generator"], torch.Tensor)
    assert not list(path.parent.glob(".*tmp*"))  # no torn temporary files left behind


def test_sample_video_written(runs, tmp_path):
    import decord

    from training.sample import main

    full_cfg = runs[0]
    periodic = f"{full_cfg.log.out_dir}/samples/step_00000006.mp4"
    assert len(decord.VideoReader(periodic)) == 2
    from PIL import Image
    from skimage import data

    refs = []
    for i, img in enumerate((data.astronaut(), data.chelsea())):
        refs.append(str(tmp_path / f"ref{i}.jpg"))
        Image.fromarray(img).save(refs[-1])
    out = tmp_path / "out.mp4"
    ckpt_path = ckpt.latest_checkpoint(f"{full_cfg.log.out_dir}/checkpoints")
    args = ["--checkpoint", str(ckpt_path), "--refs", *refs, "--prompt", "an astronaut holds a cat"]
    assert main([*args, "--out", str(out), "--steps", "2", "--num-frames", "3", "--device", "cpu"]) == 0
    vr = decord.VideoReader(str(out))
    assert len(vr) == 3 and vr[0].shape == (32, 64, 3)  # size of the last phase's first bucket


def test_schedule_and_phases():
    sched = WarmupCosine(warmup_steps=2, total_steps=10, min_ratio=0.1)
    assert sched(0) == 0.5 and sched(1) == 1.0 and sched(10) == pytest.approx(0.1)
    assert all(sched(i) >= sched(i + 1) for i in range(1, 10))
    assert phase_at(TINY_PHASES, 0) == (0, 0) and phase_at(TINY_PHASES, 4) == (1, 4)
    assert phase_at(TINY_PHASES, 6) == (2, 6)


def test_config_rejects_unknown_and_bad_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"optim": {"lr": 1e-3, "lr_warmpu": 5}}))
    with pytest.raises(ConfigError, match="optim.lr_warmpu"):
        load_config(path)
    with pytest.raises(ConfigError, match="scaling.strategy"):
        load_config(None, {"scaling.strategy": "zero3"})
    with pytest.raises(ConfigError, match=r"phases\[0\].steps"):
        load_config(None, {"phases": [{"steps": "many"}]})
    configs = Path(__file__).resolve().parents[2] / "configs"
    cfg = load_config(configs / "train_tiny.yaml")
    assert len(cfg.phases) == 2 and cfg.total_steps == 200
    big = load_config(configs / "train_1b.yaml")
    assert [p.steps for p in big.phases] == [50_000, 20_000] and [720, 1280] in big.phases[1].buckets


@pytest.mark.gpu
def test_bf16_training_on_gpu(tmp_path, triplet_shards):
    """The GPU path: encoders and MMDiT on CUDA under bf16 autocast; a few finite-loss steps."""
    cfg = _config(tmp_path, triplet_shards, "gpu")
    cfg.scaling.use_gpu = True
    from training.loop import Context

    out = train(cfg, Context(device=torch.device("cuda")), stop_at_step=3)
    assert out["step"] == 3 and all(torch.isfinite(torch.tensor(out["losses"])))


TINY_PHASES = load_config(None, {"phases": TINY["phases"]}).phases


def test_sigkill_then_resume_gives_the_same_curve(runs, tmp_path, corrupt_shards):
    """A real kill: SIGKILL the --no-ray process once its step-2 checkpoint exists, rerun, compare."""
    import os
    import signal
    import subprocess
    import sys
    import time

    full = runs[1]
    config = tmp_path / "kill.yaml"
    config.write_text(yaml.safe_dump(dict(TINY, log=dict(TINY["log"], ckpt_every=2))))
    out_dir = tmp_path / "killed"
    repo = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "training/run.py", "--config", str(config), "--shards", str(corrupt_shards)]
    cmd += ["--out-dir", str(out_dir), "--no-ray"]
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out_dir / "checkpoints" / "step_00000002.pt").exists():
            assert proc.poll() is None and time.monotonic() < deadline, (
                "run ended before its first checkpoint"
            )
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL  # really killed, not finished
    assert ckpt.latest_checkpoint(out_dir / "checkpoints").name != "step_00000006.pt"
    subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True, timeout=300)
    assert [r["loss"] for r in read_metrics(out_dir)] == full["losses"]
