"""Evaluation end to end: a tiny checkpoint trained here, generated and scored on held-out shards and on a
JSONL of cases, through the function and the CLI; fixed seeds; off metrics reported as off."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.curation.test_inspect import write_triplets
from tests.training.conftest import TINY
from training import checkpoint as ckpt
from training.evaluate import case_seed, evaluate

REPO = Path(__file__).resolve().parents[2]
# no model for them on this machine (Aesthetics, MotionSmoothness: OpenS2V-Eval's, training/eval_bench.py)
OFF = {"CLIP-I", "CLIP-T", "DINO-I", "Aesthetic", "Aesthetics", "MotionSmoothness"}
ON = {"FaceSim-SFace", "MobileNetV2-I", "Motion", "TempCons-MobileNetV2", "CopyPaste", "MotionAmplitude"}


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, triplet_shards) -> Path:
    """A tiny MMDiT trained for 3 steps on real triplet shards."""
    from training.config import load_config
    from training.loop import train

    tmp = tmp_path_factory.mktemp("eval_train")
    cfg = copy.deepcopy(TINY)
    cfg["phases"][0]["steps"], cfg["phases"][1]["steps"] = 2, 1
    (tmp / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    train(
        load_config(tmp / "tiny.yaml", {"data.shards": str(triplet_shards), "log.out_dir": str(tmp / "run")})
    )
    return ckpt.latest_checkpoint(tmp / "run" / "checkpoints")


@pytest.fixture(scope="module")
def eval_shards(tmp_path_factory) -> Path:
    """A held-out split in the curation's triplet format: 4 videos, 8 samples (in- and cross-pair)."""
    return write_triplets(tmp_path_factory.mktemp("eval_set"), n_videos=4, maxcount=3, subdir="shards_eval")


@pytest.fixture(scope="module")
def report(tiny_ckpt, eval_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_out")
    return out, evaluate(str(tiny_ckpt), str(eval_shards), str(out), steps=2, batch_cases=3, limit=4)


def test_every_case_is_generated_and_scored(report, eval_shards):
    import decord

    out, rep = report
    assert rep["n_cases"] == rep["n_ok"] == 4 and rep["n_failed"] == 0
    assert rep["generator"].startswith("training.sample") and rep["regions"] == "whole frames"
    saved = json.loads((out / "eval.json").read_text())
    assert {k: v for k, v in saved.items() if k != "cases"} == json.loads(json.dumps(rep))
    cases = saved["cases"]
    assert sorted(c["key"] for c in cases) == sorted(
        ["v00-0000_in_pair0", "v00-0000_cross_pair0", "v01-0000_in_pair0", "v01-0000_cross_pair0"]
    )
    for c in cases:
        assert c["status"] == "ok" and set(c["metrics"]) == ON
        vr = decord.VideoReader(str(out / c["video"]))
        assert len(vr) == c["frames"] == 2 and vr[0].shape == (32, 64, 3)  # the last phase's bucket
        assert c["metrics"]["MobileNetV2-I"]["value"] is not None
        assert -1.0 <= c["metrics"]["CopyPaste"]["value"] <= 1.0 and c["metrics"]["Motion"]["value"] >= 0
        assert c["seed"] == case_seed(c["key"], 0)
        assert all((out / f).is_file() for f in c["ref_files"]) and (out / c["frames_file"]).is_file()
    assert rep["summary"]["MobileNetV2-I"]["n"] == 4 and rep["summary"]["Motion"]["n"] == 4
    # the tiny model's frames hold no face: no number, a counted reason
    assert (
        rep["summary"]["FaceSim-SFace"]["n"] + sum(rep["summary"]["FaceSim-SFace"]["missing"].values()) == 4
    )


def test_metrics_without_a_model_are_reported_off(report):
    out, rep = report
    for name in OFF:
        assert rep["metrics"][name]["status"] == "off" and rep["metrics"][name]["reason"]
        assert name not in rep["summary"]
    assert all(rep["metrics"][n]["status"] == "on" and rep["metrics"][n]["model"] for n in ON)
    md = (out / "eval.md").read_text()
    assert "| CLIP-T | off: no CLIP checkpoint configured" in md
    assert "| MobileNetV2-I | torchvision MobileNetV2" in md and md.count("_pair0 |") == 4


def test_html_shows_references_prompt_and_video_side_by_side(report):
    out, rep = report
    page = (out / "index.html").read_text()
    saved = json.loads((out / "eval.json").read_text())["cases"]
    assert page.count('class="card"') == 4 and page.count("<video ") == 4
    for c in saved:
        assert f'src="{c["video"]}"' in page and c["prompt"] in page
        assert all(f'src="{f}"' in page for f in c["ref_files"])
    assert not (out / ".cards.html").exists()


def test_fixed_seeds_give_the_same_videos_and_scores(report, tiny_ckpt, eval_shards, tmp_path):
    out, _ = report
    again = evaluate(str(tiny_ckpt), str(eval_shards), str(tmp_path / "again"), steps=2, limit=2)
    first = {c["key"]: c for c in json.loads((out / "eval.json").read_text())["cases"]}
    for c in json.loads((tmp_path / "again" / "eval.json").read_text())["cases"]:
        assert c["seed"] == first[c["key"]]["seed"] and c["metrics"] == first[c["key"]]["metrics"]
    assert again["n_cases"] == 2
    assert case_seed("a", 0) != case_seed("b", 0) and case_seed("a", 1) != case_seed("a", 0)


def test_jsonl_cases_through_the_script_with_a_bad_line_recorded(tiny_ckpt, tmp_path):
    from PIL import Image
    from skimage import data

    Image.fromarray(data.chelsea()).save(tmp_path / "cat.png")
    Image.fromarray(data.astronaut()).save(tmp_path / "woman.jpg")
    lines = [
        {"refs": ["cat.png"], "prompt": "a cat sleeps on a sofa", "seed": 7, "key": "cat"},
        {
            "refs": ["woman.jpg", "cat.png"],
            "prompt": "a woman holds a cat",
            "subjects": [{"name": "woman", "category": "human"}, {"name": "cat", "category": "animal"}],
        },
        {"refs": ["missing.png"], "prompt": "nothing here"},
    ]
    (tmp_path / "cases.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    (tmp_path / "metrics.yaml").write_text("evaluation:\n  n_frames: 2\n  copy_paste: {threshold: 0.95}\n")
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "training" / "evaluate.py"),
            "--ckpt",
            str(tiny_ckpt),
            "--eval-set",
            str(tmp_path / "cases.jsonl"),
            "--out",
            str(tmp_path / "out"),
            "--steps",
            "2",
            "--metrics",
            str(tmp_path / "metrics.yaml"),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "| MobileNetV2-I |" in run.stdout and "| CLIP-I | off" in run.stdout
    rep = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert (rep["n_cases"], rep["n_ok"], rep["n_failed"]) == (3, 2, 1)
    by_key = {c["key"]: c for c in rep["cases"]}
    assert by_key["cat"]["seed"] == 7 and by_key["cat"]["n_refs"] == 1
    assert by_key["line00002"]["n_refs"] == 2 and by_key["line00002"]["status"] == "ok"
    bad = by_key["line00003"]
    assert bad["status"] == "failed" and "cases.jsonl:3" in bad["error"] and "missing.png" in bad["error"]
    assert "failed: cases.jsonl:3" in (tmp_path / "out" / "index.html").read_text()


def test_a_missing_set_or_model_is_one_clear_line(tiny_ckpt, tmp_path, capsys):
    from training.evaluate import main

    assert main(["--ckpt", str(tiny_ckpt), "--eval-set", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert "is neither a shard folder nor a .jsonl file" in capsys.readouterr().err
    (tmp_path / "m.yaml").write_text(f"clip: {{model_path: {tmp_path / 'no_clip.pt'}}}\n")
    (tmp_path / "c.jsonl").write_text("")
    args = [
        "--ckpt",
        str(tiny_ckpt),
        "--eval-set",
        str(tmp_path / "c.jsonl"),
        "--metrics",
        str(tmp_path / "m.yaml"),
    ]
    assert main([*args, "--out", str(tmp_path / "o")]) == 2
    assert "CLIP checkpoint not found" in capsys.readouterr().err


@pytest.mark.gpu
def test_evaluate_on_gpu(tiny_ckpt, eval_shards, tmp_path):
    rep = evaluate(str(tiny_ckpt), str(eval_shards), str(tmp_path), steps=2, limit=2, device="cuda")
    assert rep["n_ok"] == 2 and rep["summary"]["MobileNetV2-I"]["n"] == 2
