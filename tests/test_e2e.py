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
from curation.shards import read_index

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
    index = read_index(out / "shards")
    files = sorted(p.name for p in (out / "shards").iterdir() if p.name.endswith(".tar"))
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


def test_pair_param_change_reruns_no_video(reference, tmp_path):
    """Changing the pairing band re-runs the global phase only: 0 videos re-processed, new shards."""
    import shutil

    import yaml

    out_seq, summary = reference
    out = tmp_path / "out"
    shutil.copytree(out_seq, out)
    cfg = yaml.safe_load((REPO / "pipelines.yaml").read_text())
    pair = next(s for s in cfg["pipelines"]["default"] if s["stage"] == "pair")
    pair["params"]["low"] = round(pair["params"]["low"] - 0.05, 3)
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg))
    assert curate.main(["--config", str(tmp_path / "p.yaml"), "--runner", "sequential", "--videos", VIDEOS,
                        "--out", str(out)]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["videos_processed_now"] == 0 and again["videos_skipped_already_done"] == 4
    assert again["map_hash"] == summary["map_hash"] and again["global"]["global_hash"] != summary["global"][
        "global_hash"]
    assert again["triplets_by_pair_type"].get("cross_pair", 0) >= summary["triplets_by_pair_type"].get(
        "cross_pair", 0)  # a wider band keeps at least the pairs it had


def test_sample_curated_from_and_into_s3(s3_public_bucket, tmp_path):
    """The sample's CSV and videos in a real S3 API (moto on loopback), curated on a real local Ray into
    the bucket; the shards read back from there with webdataset and Ray Data."""
    s3_bucket = s3_public_bucket  # its shards are read over plain http too
    import ray
    import webdataset as wds

    from curation.config import load_config
    from curation.demo.footage import build_sample
    from curation.storage import Store

    paths = build_sample(REPO / load_config(str(REPO / "pipelines.yaml")).sources["sample"].sample_dir)
    src = Store(f"{s3_bucket}/src")
    src.put_file("panda.csv", paths.csv)
    for vid in ("gen01", "gen02"):
        name = next(n for n in os.listdir(paths.videos_dir) if n.startswith(vid + "."))
        src.put_file(f"videos/{name}", os.path.join(paths.videos_dir, name))
    out = f"{s3_bucket}/run"
    try:
        rc = curate.main(["--source", "panda70m", "--csv", src.uri_of("panda.csv"),
                          "--videos-dir", src.uri_of("videos"), "--videos", "gen01,gen02", "--out", out])
    finally:
        ray.shutdown()
    assert rc == 0
    store = Store(out)
    summary = store.read_json("summary.json")
    assert summary["videos_in"] == 2 and summary["clips"] >= 4 and summary["triplets_out"] > 0
    assert Manifest(store).load("gen01")["status"] == "done"
    index = read_index(f"{out}/shards")
    assert index["total_samples"] == summary["triplets_out"]
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    urls = [f"{endpoint}/{store.path('shards/' + e['name'])}" for e in index["shards"]]  # path-style URLs
    got = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(got) == summary["triplets_out"] and all(g["mp4"][4:8] == b"ftyp" for g in got)
    try:
        ray.init(num_cpus=1, include_dashboard=False, configure_logging=False)
        ds = ray.data.read_webdataset(store.path("shards"), filesystem=store.fs)
        assert ds.count() == summary["triplets_out"]
    finally:
        ray.shutdown()
