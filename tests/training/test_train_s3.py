"""Training from object storage: shards, run folder and DCP checkpoints in a real S3 API (moto's server on
loopback); a SIGKILLed run resumes from the store alone, with the same curve and weights; two ranks upload
their own parts; latents precomputed from and into S3; evaluation reads the shards where they are.

The shards are the trainer tests' small real triplet shards (tests/training/conftest.py, real footage and
photos), uploaded with their index: curating the sample into S3 is tested already
(tests/test_e2e.py::test_sample_curated_from_and_into_s3) and takes minutes on a real local Ray; these
tests are about the readers and the trainer, and need the same shards as the local trainer tests."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from curation.shards import iter_tar_samples, list_shards
from curation.storage import Store
from tests.training.conftest import TINY
from training import checkpoint as ckpt
from training.config import load_config
from training.loop import Context, RunFolder, read_metrics, train

REPO = Path(__file__).resolve().parents[2]
# The tiny config with DCP checkpoints every 2 steps, the newest 2 kept (pruning runs in the store too).
CONFIG = dict(TINY, log=dict(TINY["log"], ckpt_every=2, keep_checkpoints=2, checkpoint_format="dcp"))


@pytest.fixture(scope="module", autouse=True)
def scratch(tmp_path_factory):
    """The local scratch of runs in a store (curation.storage.scratch_dir), here and in subprocesses."""
    old = os.environ.get("PHANTOM_CACHE_DIR")
    os.environ["PHANTOM_CACHE_DIR"] = str(tmp_path_factory.mktemp("phantom-cache"))
    yield Path(os.environ["PHANTOM_CACHE_DIR"])
    if old is None:
        os.environ.pop("PHANTOM_CACHE_DIR")
    else:
        os.environ["PHANTOM_CACHE_DIR"] = old


@pytest.fixture(scope="module")
def bucket(s3_server) -> str:
    import boto3

    name = f"train-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return f"s3://{name}"


def upload(folder: Path, uri: str) -> str:
    """Every file of a local shards folder (tars and index) to ``uri``."""
    store = Store(uri)
    for p in sorted(folder.iterdir()):
        store.put_file(p.name, p)
    return store.uri


@pytest.fixture(scope="module")
def s3_shards(bucket, corrupt_shards) -> str:
    return upload(corrupt_shards, f"{bucket}/data/shards")


def test_the_trainer_shards_list_and_read_from_s3_as_from_disk(s3_shards, corrupt_shards):
    """The same shards, in the same order, with the same samples (the checks themselves: test_shards)."""
    local = list_shards(corrupt_shards, verify_sha256=True)
    urls = list_shards(s3_shards, verify_sha256=True)
    assert urls == [f"{s3_shards}/{Path(p).name}" for p in local]
    for path, url in zip(local, urls):
        assert list(iter_tar_samples(url)) == list(iter_tar_samples(path))


def test_evaluate_reads_s3_shards(s3_shards, corrupt_shards):
    from training.evaluate import iter_cases

    local, remote = list(iter_cases(corrupt_shards)), list(iter_cases(s3_shards))
    assert [c.key for c in remote] == [c.key for c in local] and len(local) == 24
    for a, b in zip(local, remote):
        assert (a.prompt, a.seed, a.error) == (b.prompt, b.seed, b.error)
        assert len(a.refs) == len(b.refs) and all(np.array_equal(x, y) for x, y in zip(a.refs, b.refs))


def _pull_weights(run_uri: str, name: str, tmp_path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The model and EMA tensors of one DCP checkpoint in the store."""
    store = Store(run_uri)
    local = tmp_path / run_uri.rsplit("/", 1)[-1] / name
    for rel in store.list(f"checkpoints/{name}"):
        dest = local / rel.rsplit("/", 1)[-1]
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(store.read_bytes(rel))
    return {key: ckpt.read_sharded_weights(local, key) for key in ("model", "ema")}


@pytest.fixture(scope="module")
def whole(s3_shards, bucket, tmp_path_factory):
    """(config file, run URI, summary) of an uninterrupted run: shards, metrics and checkpoints in S3."""
    config = tmp_path_factory.mktemp("s3train") / "s3.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    uri = f"{bucket}/runs/whole"
    # One intra-op thread here and in the killed run's process (OMP_NUM_THREADS=1 below): float sums then
    # run in the same order, whatever thread count earlier tests left this process with.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return config, uri, train(load_config(config, {"data.shards": s3_shards, "log.out_dir": uri}))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_train_from_s3_sigkill_resume_from_s3_is_exact(whole, s3_shards, bucket, tmp_path, scratch):
    """A run SIGKILLed after its step-2 checkpoint reached the store, then rerun, against the uninterrupted
    run: the same losses, weights and EMA."""
    config, whole_uri, whole = whole
    assert whole["step"] == 6 and sum(whole["corrupt"].values()) >= 1

    killed_uri = f"{bucket}/runs/killed"
    killed = Store(killed_uri)
    cmd = [sys.executable, "training/run.py", "--config", str(config), "--shards", s3_shards,
           "--out-dir", killed_uri, "--no-ray"]  # fmt: skip
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while not killed.is_file("checkpoints/step_00000002/meta.pt"):
            assert proc.poll() is None and time.monotonic() < deadline, (
                "run ended before its first checkpoint"
            )
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL  # really killed, not finished
    folder = RunFolder(killed_uri, Context())
    assert folder.store_checkpoints()[-1] != "step_00000006"
    # Every file of the killed run's last checkpoint is in the store.
    assert {r.rsplit("/", 1)[-1] for r in killed.list("checkpoints/step_00000002")} == {
        ".metadata", "__0_0.distcp", "rank_0.pt", "meta.pt"}  # fmt: skip

    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
    assert [r["loss"] for r in read_metrics(killed_uri)] == whole["losses"]
    assert [r["loss"] for r in read_metrics(whole_uri)] == whole["losses"]
    assert folder.store_checkpoints() == RunFolder(whole_uri, Context()).store_checkpoints() == [
        "step_00000004", "step_00000006"]  # fmt: skip
    a, b = (
        _pull_weights(whole_uri, "step_00000006", tmp_path),
        _pull_weights(killed_uri, "step_00000006", tmp_path),
    )
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    assert not all(torch.equal(a["model"][k], a["ema"][k]) for k in a["model"])  # EMA lags the weights
    assert not list(scratch.rglob("*.distcp"))  # local copies go once uploaded (or loaded)

    # A checkpoint folder without its marker (an upload killed midway) is never taken for a checkpoint.
    killed.write_bytes("checkpoints/step_00000099/__0_0.distcp", b"partial")
    assert folder.store_checkpoints()[-1] == "step_00000006"


def test_latents_precomputed_from_and_into_s3_train_like_raw_shards(whole, s3_shards, bucket):
    """training.precompute streams the raw shards from S3 and uploads latent shards and their index; the
    trainer reads those from S3 (sha256-checked) and gives the raw run's losses, no encoder built."""
    from training.precompute import precompute

    config, _, raw = whole
    cfg = load_config(config, {"data.shards": s3_shards})
    latents = f"{bucket}/data/latents"
    stats = precompute(cfg, s3_shards, latents, use_ray=False)
    assert stats["shards"] == 4 and stats["samples"] == 24
    index = json.loads(Store(latents).read_bytes("index.json"))
    assert index["source"] == s3_shards and len(list_shards(latents, verify_sha256=True)) == 4
    run = f"{bucket}/runs/latent"  # with full .pt checkpoints this time: one object each, pruned in the store
    over = {"data.latent_shards": latents, "data.verify_sha256": True, "log.checkpoint_format": "full"}
    out = train(load_config(config, {"data.shards": s3_shards, "log.out_dir": run, **over}))
    assert not out["encoders_built"] and out["losses"] == pytest.approx(raw["losses"], rel=1e-5)
    assert list(Store(run).list("checkpoints")) == [
        "checkpoints/step_00000004.pt",
        "checkpoints/step_00000006.pt",
    ]
    state = ckpt.load_checkpoint(io.BytesIO(Store(run).read_bytes("checkpoints/step_00000006.pt")))
    assert state["step"] == 6 and [r["loss"] for r in read_metrics(run)] == out["losses"]


def _rank_main(rank, world, port, jobs, out_json):
    """One FSDP2 rank (gloo, CPU) running several trainings in turn; rank 0 writes the losses of each."""
    import torch.distributed as dist

    from training.config import config_from_dict
    from training.loop import fully_shard_model

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


@pytest.mark.slow
def test_two_ranks_upload_their_own_parts_and_resume_from_s3(s3_shards, bucket, tmp_path):
    """2 FSDP2 ranks with no shared folder (each writes its checkpoint part in scratch of its own): each
    uploads its own shard file and rank state, rank 0 the marker; stopped at 2 and resumed from the store
    alone, the curve is the uninterrupted one."""
    import socket

    over = {
        "data.shards": s3_shards,
        "data.num_workers": 0,
        "scaling.strategy": "fsdp",
        "scaling.num_workers": 2,
    }
    config = tmp_path / "two.yaml"
    config.write_text(yaml.safe_dump(dict(CONFIG, phases=[dict(TINY["phases"][0], steps=3)])))
    whole = load_config(config, {**over, "log.out_dir": f"{bucket}/runs/two-whole"})
    cut = load_config(config, {**over, "log.out_dir": f"{bucket}/runs/two-cut"})
    jobs = [(whole.to_dict(), None), (cut.to_dict(), 2), (cut.to_dict(), None)]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out_json = tmp_path / "losses.json"
    torch.multiprocessing.start_processes(
        _rank_main, args=(2, port, jobs, str(out_json)), nprocs=2, start_method="spawn"
    )
    full, first, rest = json.loads(out_json.read_text())
    assert len(full) == 3 and first + rest == full
    assert [r["loss"] for r in read_metrics(cut.log.out_dir)] == pytest.approx(full, abs=0)
    names = {r.rsplit("/", 1)[-1] for r in Store(cut.log.out_dir).list("checkpoints/step_00000003")}
    assert names == {".metadata", "__0_0.distcp", "__1_0.distcp", "rank_0.pt", "rank_1.pt", "meta.pt"}
    a = _pull_weights(whole.log.out_dir, "step_00000003", tmp_path)
    b = _pull_weights(cut.log.out_dir, "step_00000003", tmp_path)
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
