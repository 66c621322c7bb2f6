"""The default pipeline end to end on the bundled sample: sequential vs a real local Ray, shards that
validate, and a run killed with SIGKILL that resumes to the same output as an uninterrupted one."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from curation import run as curate
from curation.manifest import Manifest

# Four generated videos: the astronaut, the cat and Grace Hopper recur across them, gen02 holds an
# exact copy of a gen01 shot and gen04 a near-black shot, so pairing, copy rejection and filters all act.
VIDEOS = "gen01,gen02,gen04,gen07"
REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _run(out: Path, runner: str = "sequential") -> dict:
    assert curate.main(["--runner", runner, "--videos", VIDEOS, "--out", str(out)]) == 0
    return json.loads((out / "summary.json").read_text())


def _rows(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "error"} for r in Manifest(out).rows()]


def _shards(out: Path) -> dict:
    index = json.loads((out / "shards" / "index.json").read_text())
    files = sorted(p.name for p in (out / "shards").iterdir() if not p.name.startswith("."))
    return {"index": index, "files": files}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("seq")
    return out, _run(out)


def test_sequential_run_makes_valid_shards(reference):
    out, summary = reference
    assert summary["videos_in"] == 4 and summary["clips"] >= 12
    assert summary["triplets_out"] > 0
    assert summary["triplets_by_pair_type"].get("cross_pair", 0) > 0
    assert summary["rejections_by_reason"].get("quality:too_dark", 0) >= 1
    assert "aesthetic" in summary["filters_off"]  # no aesthetic weights offline: said, not faked
    res = subprocess.run([sys.executable, "-m", "curation.inspect", "validate", str(out / "shards")],
                         capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stdout + res.stderr


def test_ray_runner_gives_the_same_records_and_shards(reference, tmp_path):
    import ray

    out_seq, _ = reference
    try:
        _run(tmp_path, runner="ray")
    finally:
        ray.shutdown()
    assert _rows(tmp_path) == _rows(out_seq)
    assert _shards(tmp_path) == _shards(out_seq)


def _kill_when(out: Path, ready) -> bool:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "curation.run", "--runner", "sequential", "--videos",
                             VIDEOS, "--out", str(out)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    return False


def test_killed_run_resumes_to_the_same_output(reference, tmp_path):
    out_seq, _ = reference
    manifest = Manifest(tmp_path)
    # Kill once in the middle of the per-video phase, once while the shards are being written.
    assert _kill_when(tmp_path, lambda: len(list(manifest.records())) >= 2)
    done_before = {r["video_id"]: r["committed_at"] for r in manifest.records()}
    assert 2 <= len(done_before) < 4
    _kill_when(tmp_path, lambda: (tmp_path / "shards").exists())
    summary = _run(tmp_path)
    # Finished videos were not redone: their manifest files are the ones the killed run wrote.
    after = {r["video_id"]: r["committed_at"] for r in manifest.records()}
    assert all(after[v] == t for v, t in done_before.items())
    assert summary["videos_skipped_already_done"] == 4
    assert _rows(tmp_path) == _rows(out_seq)
    assert _shards(tmp_path) == _shards(out_seq)
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith((".tmp", ".partial"))]


def test_production_pipeline_without_models_is_a_clear_error(tmp_path, capsys):
    rc = curate.main(["--pipeline", "production", "--runner", "sequential", "--videos", "gen01",
                      "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 3 and "not found at models/" in err and "make weights" in err
