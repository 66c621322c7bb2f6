"""`ray job submit` of training/run.py to a loopback Ray cluster: 2 DDP workers, the job ends SUCCEEDED."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from tests.training.conftest import TINY
from training.loop import read_metrics

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _stop_own_cluster(temp_dir: str) -> None:
    """Stop only this test's Ray processes (`ray stop` would stop teammates' clusters too)."""
    mine = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if temp_dir.encode() in (proc / "cmdline").read_bytes():
                    mine.append(int(proc.name))
            except OSError:
                continue
    for pid in mine:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    time.sleep(1)  # workers and the job driver exit once their raylet is gone


def test_ray_job_submit_succeeds(tmp_path, triplet_shards):
    cfg = dict(TINY, phases=[dict(TINY["phases"][0], steps=2)])
    cfg["data"] = dict(cfg["data"], num_workers=1)
    cfg["scaling"] = {"num_workers": 2, "cpus_per_worker": 0.5}
    cfg["log"] = dict(cfg["log"], ckpt_every=2)
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(cfg))
    out_dir = tmp_path / "run"

    # A short temp dir (Ray's socket paths have a length limit) and our own ports, so a teammate's
    # cluster on the default ports is never touched.
    temp_dir = tempfile.mkdtemp(prefix="rayjob", dir="/tmp")
    gcs, dash, client, agent, agent_grpc, env_agent, metrics = _free_ports(7)
    env = dict(
        os.environ,
        RAY_USAGE_STATS_ENABLED="0",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_AUTH_MODE="disabled",
        HF_HUB_OFFLINE="1",
    )
    env.pop("RAY_ADDRESS", None)
    start = [
        RAY, "start", "--head", "--num-cpus", "2", "--node-ip-address", "127.0.0.1",
        "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
        "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
        "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port", str(env_agent),
        "--metrics-export-port", str(metrics), "--disable-usage-stats", "--temp-dir", temp_dir,
    ]  # fmt: skip
    try:
        subprocess.run(start, env=env, check=True, capture_output=True, timeout=120)
        submit = [
            RAY, "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--submission-id", "h2-train",
            "--working-dir", str(REPO), "--", sys.executable, "training/run.py", "--config", str(config),
            "--shards", str(triplet_shards), "--out-dir", str(out_dir),
        ]  # fmt: skip
        job = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=400)
        from ray.job_submission import JobStatus, JobSubmissionClient

        status = JobSubmissionClient(f"http://127.0.0.1:{dash}").get_job_status("h2-train")
        assert status == JobStatus.SUCCEEDED, job.stdout[-3000:] + job.stderr[-3000:]
    finally:
        _stop_own_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    rows = read_metrics(out_dir)
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert (out_dir / "checkpoints" / "step_00000002.pt").exists()
    assert all(r["samples_per_s"] > 0 for r in rows)
