"""The tiny Phantom-Wan config end to end on real shards: DCP kill/resume, latent precompute, sample CLI."""

from __future__ import annotations

import os

import pytest
import torch
import yaml

from tests.training.conftest import TINY
from tests.training.wan_assets import tiny_wan_config, write_tiny_wan_assets
from training import checkpoint as ckpt
from training.config import load_config
from training.loop import read_metrics, train


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_tiny_wan_assets(tmp_path_factory.mktemp("tiny_wan"))


def _cfg(tmp_path, assets, shards, name, **over):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tiny_wan_config(assets, shards, tmp_path / name)))
    return load_config(path, over)


@pytest.fixture(scope="module")
def wan_runs(tmp_path_factory, assets, corrupt_shards):
    """Uninterrupted, and stopped at step 2 then resumed from its DCP folder."""
    tmp = tmp_path_factory.mktemp("wan")
    full = train(_cfg(tmp, assets, corrupt_shards, "full"))
    cut_cfg = _cfg(tmp, assets, corrupt_shards, "cut")
    parts = [train(cut_cfg, stop_at_step=2), train(cut_cfg)]
    return tmp, full, cut_cfg, parts


def test_dcp_resume_gives_the_same_curve(wan_runs):
    tmp, full, cut_cfg, parts = wan_runs
    assert [p["step"] for p in parts] == [2, 4]
    assert sum((p["losses"] for p in parts), []) == full["losses"]  # exact on CPU
    latest = ckpt.latest_checkpoint(f"{cut_cfg.log.out_dir}/checkpoints")
    assert latest.is_dir() and (latest / ".metadata").exists() and (latest / "rank_0.pt").exists()
    a = ckpt.read_sharded_weights(latest, "model")
    b = ckpt.read_sharded_weights(ckpt.latest_checkpoint(tmp / "full" / "checkpoints"), "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("transformer.blocks.1.attn1") for k in a)
    assert sum(full["corrupt"].values()) >= 1 and parts[-1]["corrupt"] == full["corrupt"]


def test_sample_cli_and_load_sampler_on_a_dcp_checkpoint(wan_runs, tmp_path):
    import decord
    import numpy as np
    from PIL import Image
    from skimage import data

    from training.sample import load_sampler, main

    _, _, cut_cfg, _ = wan_runs
    path = ckpt.latest_checkpoint(f"{cut_cfg.log.out_dir}/checkpoints")
    sampler = load_sampler(str(path), model="phantom_wan")
    refs = [data.astronaut(), data.chelsea()]
    a = sampler.generate(refs, "an astronaut holds a cat", seed=1, steps=2, num_frames=5)
    b = sampler.generate(refs, "an astronaut holds a cat", seed=1, steps=2, num_frames=5)
    assert a.shape == (5, 32, 64, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    with pytest.raises(ValueError, match="phantom_wan"):
        load_sampler(str(path), model="mmdit")
    files = []
    for i, img in enumerate(refs):
        files += ["--ref", str(tmp_path / f"r{i}.png")]
        Image.fromarray(img).save(files[-1])
    out = tmp_path / "x.mp4"
    args = ["--model", "phantom_wan", "--ckpt", str(path), *files, "--prompt", "a cat", "--w-img", "3"]
    assert main([*args, "--w-txt", "7.5", "--out", str(out), "--steps", "2", "--num-frames", "5"]) == 0
    assert len(decord.VideoReader(str(out))) == 5


def test_precomputed_latents_train_like_raw_shards(tmp_path, assets, corrupt_shards, wan_runs):
    """Ray Data precompute, then the same config on latent shards: same losses, no encoder ever built."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    from training.precompute import precompute

    cfg = _cfg(tmp_path, assets, corrupt_shards, "lat")
    try:
        stats = precompute(
            cfg, str(corrupt_shards), str(tmp_path / "latents"), num_actors=1, cpus_per_actor=1
        )
    finally:
        ray.shutdown()
    assert stats["shards"] == 4 and stats["samples"] == 24 and stats["skipped"] + stats["errors"] >= 2
    out = train(
        _cfg(tmp_path, assets, corrupt_shards, "lat", **{"data.latent_shards": str(tmp_path / "latents")})
    )
    assert not out["encoders_built"]  # the hot path never loaded the VAE or the text encoder
    raw = wan_runs[1]
    assert out["losses"] == pytest.approx(raw["losses"], rel=1e-5)
    assert out["corrupt"] == {k: v for k, v in raw["corrupt"].items() if not k.startswith("tar:")}


def test_dcp_checkpoints_survive_sigkill(tmp_path, corrupt_shards):
    """MMDiT tiny config, checkpoint_format dcp: SIGKILL once the step-2 folder exists, rerun, same curve."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    config = tmp_path / "kill.yaml"
    phases = [dict(TINY["phases"][0], steps=4)]
    config.write_text(
        yaml.safe_dump(
            dict(TINY, phases=phases, log=dict(TINY["log"], ckpt_every=2, checkpoint_format="dcp"))
        )
    )
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1")

    def cmd(out):
        return [sys.executable, "training/run.py", "--config", str(config), "--shards", str(corrupt_shards),
                "--out-dir", str(out), "--no-ray"]  # fmt: skip

    subprocess.run(cmd(tmp_path / "whole"), cwd=repo, env=env, check=True, capture_output=True, timeout=300)
    out_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        cmd(out_dir), cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 120
        while not (out_dir / "checkpoints" / "step_00000002" / "meta.pt").exists():
            assert proc.poll() is None and time.monotonic() < deadline, (
                "run ended before its first checkpoint"
            )
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert ckpt.latest_checkpoint(out_dir / "checkpoints").name != "step_00000004"
    subprocess.run(cmd(out_dir), cwd=repo, env=env, check=True, capture_output=True, timeout=300)
    assert [r["loss"] for r in read_metrics(out_dir)] == [r["loss"] for r in read_metrics(tmp_path / "whole")]
    from training.sample import load_sampler  # the evaluation interface reads MMDiT DCP folders too

    sampler = load_sampler(str(ckpt.latest_checkpoint(out_dir / "checkpoints")), model="mmdit")
    import numpy as np

    video = sampler.generate([np.full((20, 30, 3), 200, np.uint8)], "a cat", steps=1, num_frames=2)
    assert video.shape == (2, 32, 64, 3) and video.dtype == np.uint8


def _rank_main(rank, world, port, jobs, out_json):
    """One FSDP2 rank (gloo, CPU) running several trainings in turn; rank 0 writes the losses of each."""
    import json
    from pathlib import Path

    import torch.distributed as dist

    from training.config import config_from_dict
    from training.loop import Context, fully_shard_model

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        losses = []
        for cfg_dict, stop_at in jobs:
            ctx = Context(
                rank=rank, world_size=world, prepare_model=lambda m: fully_shard_model(m, torch.device("cpu"))
            )
            losses.append(train(config_from_dict(cfg_dict), ctx, stop_at_step=stop_at)["losses"])
        if rank == 0:
            Path(out_json).write_text(json.dumps(losses))
    finally:
        dist.destroy_process_group()


def test_two_rank_fsdp_dcp_resume_without_a_gather(tmp_path, assets, triplet_shards):
    """2 FSDP2 ranks: each writes only its own shard file; stop at 2 + resume = the uninterrupted curve; the
    folder reassembles into full tensors in one plain process."""
    import json
    import socket

    over = {"scaling.strategy": "fsdp", "scaling.num_workers": 2}
    whole = _cfg(tmp_path, assets, triplet_shards, "w2", **over)
    cut = _cfg(tmp_path, assets, triplet_shards, "c2", **over)
    jobs = [(whole.to_dict(), None), (cut.to_dict(), 2), (cut.to_dict(), None)]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out_json = tmp_path / "losses.json"
    torch.multiprocessing.start_processes(
        _rank_main, args=(2, port, jobs, str(out_json)), nprocs=2, start_method="spawn"
    )
    full, first, rest = json.loads(out_json.read_text())
    assert len(full) == 4 and first + rest == full
    latest = ckpt.latest_checkpoint(tmp_path / "c2" / "checkpoints")
    assert sorted(p.name for p in latest.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert sorted(p.name for p in latest.glob("rank_*.pt")) == ["rank_0.pt", "rank_1.pt"]
    from training.models import build_model

    weights = ckpt.read_sharded_weights(latest, "ema")
    plain = build_model(cut).state_dict()
    assert weights.keys() == plain.keys() and all(weights[k].shape == plain[k].shape for k in plain)
    with pytest.raises(ValueError, match="2 ranks"):
        train(cut)  # one process cannot continue a 2-rank run's data streams


def test_lora_run_checkpoints_only_the_adapters(tmp_path, assets, triplet_shards):
    from training.sample import load_sampler

    over = {"model.wan.finetune": "lora", "model.wan.lora": {"rank": 4, "alpha": 4}, "phases[0].steps": 2}
    for fmt in ("dcp", "full"):
        cfg = _cfg(tmp_path, assets, triplet_shards, f"lora_{fmt}", **over, **{"log.checkpoint_format": fmt})
        out = train(cfg)
        assert out["step"] == 2 and all(torch.isfinite(torch.tensor(out["losses"])))
        path = ckpt.latest_checkpoint(f"{cfg.log.out_dir}/checkpoints")
        saved = ckpt.load_weights_for_inference(path)[1]
        assert saved and all("lora_" in k for k in saved)  # the frozen base comes from the pinned weights
        video = load_sampler(str(path), model="phantom_wan").generate(
            [torch.zeros(40, 30, 3, dtype=torch.uint8).numpy()], "a box", steps=1, num_frames=5
        )
        assert video.shape == (5, 32, 64, 3)
