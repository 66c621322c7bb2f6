"""`make eval`'s command (python -m training.eval_compare): a tiny checkpoint and the weights its training
started from, scored on the same cases through the same metrics, and the side-by-side report."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.curation.test_inspect import write_triplets
from tests.training.conftest import TINY
from tests.training.test_opens2v import _case_file
from training import checkpoint as ckpt
from training.eval_compare import main, run, start_sampler


def _train(tmp: Path, shards: Path, lr: float) -> Path:
    from training.config import load_config
    from training.loop import train

    cfg = copy.deepcopy(TINY)
    cfg["phases"][0]["steps"], cfg["phases"][1]["steps"] = 2, 1
    cfg["optim"]["lr"] = lr
    (tmp / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    train(load_config(tmp / "tiny.yaml", {"data.shards": str(shards), "log.out_dir": str(tmp / "run")}))
    return ckpt.latest_checkpoint(tmp / "run" / "checkpoints")


@pytest.fixture(scope="module")
def still_ckpt(tmp_path_factory, triplet_shards) -> Path:
    """A tiny MMDiT trained 3 steps at learning rate 0: its weights are the ones training started from."""
    return _train(tmp_path_factory.mktemp("still"), triplet_shards, 0.0)


@pytest.fixture(scope="module")
def tuned_ckpt(tmp_path_factory, triplet_shards) -> Path:
    return _train(tmp_path_factory.mktemp("tuned"), triplet_shards, 2e-3)


@pytest.fixture(scope="module")
def eval_shards(tmp_path_factory) -> Path:
    return write_triplets(tmp_path_factory.mktemp("eval_set"), n_videos=2, maxcount=2, subdir="shards_eval")


def test_starting_weights_are_the_trainers(still_ckpt, tuned_ckpt):
    _, start_w = ckpt.load_weights_for_inference(still_ckpt, use_ema=False)
    got = start_sampler(still_ckpt).model.state_dict()
    assert set(got) == set(start_w) and all(torch.equal(got[k], start_w[k]) for k in got)
    _, tuned_w = ckpt.load_weights_for_inference(tuned_ckpt, use_ema=False)
    assert any(not torch.equal(got[k], tuned_w[k]) for k in got)  # training moved them


def test_make_eval_command_writes_both_runs_and_the_comparison(still_ckpt, eval_shards, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = main(
        ["--ckpt", str(still_ckpt), "--eval-set", str(eval_shards), "--out", str(out), "--steps", "2"]
        + ["--limit", "2", "--device", "cpu"]
    )
    printed = capsys.readouterr().out
    assert rc == 0
    stem = still_ckpt.stem
    a = json.loads((out / "start" / "eval.json").read_text())
    b = json.loads((out / stem / "eval.json").read_text())
    assert a["n_ok"] == b["n_ok"] == 2 and "starting weights" in a["checkpoint"]
    assert [c["seed"] for c in a["cases"]] == [c["seed"] for c in b["cases"]]  # the same cases and seeds
    assert a["metrics"] == b["metrics"]  # the same metric models
    assert b["metrics"]["MotionAmplitude"]["status"] == "on" and b["metrics"]["Aesthetics"]["status"] == "off"
    md = (out / "eval.md").read_text()
    assert f"| metric | start | {stem} | {stem} − start |" in md
    assert "## Metric means per category" in md and "| MotionAmplitude |" in md
    # weights equal to the start (EMA up to rounding): every metric of every case about equal, change ~0
    for ca, cb in zip(a["cases"], b["cases"]):
        for m, s in ca["metrics"].items():
            if s.get("value") is not None:
                assert cb["metrics"][m]["value"] == pytest.approx(s["value"], abs=2e-3), m
    page = (out / "index.html").read_text()
    assert page.count("<video") == 4 and "start/videos/" in page and f"{stem}/videos/" in page
    assert "| metric | start |" in printed


def test_opens2v_cases_compare_with_motion_in_the_total(tuned_ckpt, tmp_path):
    f = _case_file(tmp_path)
    res = run(str(tuned_ckpt), f, str(tmp_path / "eval"), steps=2, device="cpu")
    assert res["runs"] == ["start", tuned_ckpt.stem]
    for rep in res["reports"].values():
        o = rep["opens2v"]
        amp = o["metrics"]["MotionAmplitude"]
        assert amp["n"] == 2 and o["total"] == pytest.approx(0.02 * amp["normalised"], abs=1e-6)
        assert {"Aesthetics", "MotionSmoothness", "GmeScore"} <= set(o["missing"])
        assert rep["frames_per_video"]["suite"] == 32 and rep["frames_per_video"]["MotionAmplitude"] == "all"
    md = (tmp_path / "eval" / "eval.md").read_text()
    assert (
        "## OpenS2V-Eval" in md
        and "### faceobj (face-entity)" in md
        and "A man holds a cup." in (tmp_path / "eval" / "index.html").read_text()
    )
    assert "OpenS2V total" in res["comparison"]["means"]


def test_no_checkpoint_is_one_clear_line(eval_shards, tmp_path, capsys):
    assert main(["--eval-set", str(eval_shards)]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["--ckpt", str(tmp_path / "step_1.pt"), "--eval-set", str(eval_shards)]) == 2
    assert "does not exist" in capsys.readouterr().err
