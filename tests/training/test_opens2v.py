"""OpenS2V-Eval: its case files, its normalisation and total (checked by hand), another model's videos by
case id, and the side-by-side comparison of two runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import skimage.data
from PIL import Image

from curation.metrics import MetricSuite, metrics_config
from training import opens2v
from training.evaluate import evaluate, iter_cases
from training.sample import write_mp4


def _case_file(root) -> str:
    """A benchmark-format case file with three categories and one case whose image is missing."""
    (root / "Images/singleobject/cup").mkdir(parents=True)
    (root / "Images/singleface/man").mkdir(parents=True)
    Image.fromarray(skimage.data.coffee()).save(root / "Images/singleobject/cup/1.jpg")
    Image.fromarray(skimage.data.astronaut()).save(root / "Images/singleface/man/2.jpg")
    cases = {
        "singleobj_1": {
            "img_paths": ["Images/singleobject/cup/1.jpg"],
            "prompt": "A cup of coffee on a table.",
            "synthesis_flag": "wrong",
            "class_label": ["Cup"],
        },
        "faceobj_2": {
            "img_paths": ["Images/singleface/man/2.jpg", "Images/singleobject/cup/1.jpg"],
            "prompt": "A man holds a cup.",
            "class_label": ["Man", "Cup"],
        },
        "humanobj_3": {"img_paths": ["Images/missing.jpg"], "prompt": "x", "class_label": ["Man"]},
    }
    f = root / "Open-Domain_Eval.json"
    f.write_text(json.dumps(cases))
    return str(f)


def test_case_file_reads_cases_categories_and_subjects(tmp_path):
    f = _case_file(tmp_path)
    assert opens2v.is_case_file(f) and opens2v.domain_of(f) == "Open-Domain"
    got = {c.key: c for c in opens2v.iter_cases(f)}
    assert list(got) == ["singleobj_1", "faceobj_2", "humanobj_3"]
    assert got["singleobj_1"].refs[0].shape == skimage.data.coffee().shape
    assert got["singleobj_1"].subjects == [{"name": "Cup", "category": "object", "label": "Cup"}]
    man, cup = got["faceobj_2"].subjects
    assert (
        man["category"] == "human" and man["nexus"] is False and "nexus" not in cup
    )  # face refs not detected
    assert got["humanobj_3"].error and "missing.jpg" in got["humanobj_3"].error
    assert opens2v.case_category("multiobject_12") == "multiobject"
    assert opens2v.subjects_of("humanobj_1", ["Images/x/woman/1.jpg"], ["Woman"])[0]["name"] == "human"
    ev = list(iter_cases(f))  # the same cases through the evaluation's case iteration
    assert [c.key for c in ev] == list(got) and ev[1].subjects == got["faceobj_2"].subjects


def test_normalisation_and_total_by_hand():
    """Two cases with every metric; the numbers are merge_result.py's, worked out by hand."""
    recs = [
        {
            "key": "singleface_1",
            "status": "ok",
            "metrics": {
                "Aesthetics": {"value": 8.0},  # clamped to 7 -> 1.0 after (v - 4) / 3
                "MotionSmoothness": {"value": 0.9},
                "MotionAmplitude": {"value": -0.2},  # |v|
                "FaceSim-Cur": {"value": 0.6},
                "GmeScore": {"value": 0.7},
                "NexusScore": {"value": 0.0},  # zero: left out of the mean
                "NaturalScore": {"value": 4.0},
            },
        },
        {
            "key": "singleobj_2",
            "status": "ok",
            "metrics": {
                "Aesthetics": {"value": 5.0},
                "MotionSmoothness": {"value": 0.7},
                "MotionAmplitude": {"value": 0.4},
                "FaceSim-Cur": {"value": 0.9},  # not a face category: not in FaceSim's mean
                "GmeScore": {"value": 0.5},
                "NexusScore": {"value": 0.03},
                "NaturalScore": {"value": 2.0},
            },
        },
        {"key": "singleobj_3", "status": "failed", "metrics": {}},
    ]
    s = opens2v.summarise(recs, "Open-Domain")
    m = {k: v["normalised"] for k, v in s["metrics"].items()}
    aes = ((7.0 + 5.0) / 2 - 4) / 3  # 0.6667
    want = {
        "Aesthetics": aes,
        "MotionSmoothness": 0.8,
        "MotionAmplitude": 0.3,
        "FaceSim": 0.6,
        "GmeScore": 0.6,
        "NexusScore": 0.03 / 0.05,
        "NaturalScore": (3.0 - 1) / 4,
    }
    assert m == pytest.approx(want, abs=1e-6)
    total = 0.16 * aes + 0.06 * 0.8 + 0.02 * 0.3 + 0.20 * 0.6 + 0.12 * 0.6 + 0.20 * 0.6 + 0.24 * 0.5
    assert s["total"] == pytest.approx(total, abs=1e-6) and s["complete"]
    assert s["categories"]["singleface"]["metrics"]["NexusScore"]["n"] == 0
    # Human-Domain: no NexusScore, its own weights
    h = opens2v.score(recs, "Human-Domain")
    assert "NexusScore" not in h["metrics"]
    assert h["total"] == pytest.approx(
        0.18 * aes + 0.09 * 0.8 + 0.03 * 0.3 + 0.25 * 0.6 + 0.15 * 0.6 + 0.30 * 0.5, abs=1e-6
    )
    # a metric nobody computed counts 0 and is named
    part = opens2v.score([{"key": "singleobj_1", "metrics": {"GmeScore": {"value": 0.5}}}])
    assert part["total"] == pytest.approx(0.12 * 0.5) and not part["complete"]
    assert "NaturalScore" in part["missing"]


def _videos(folder, shift: int) -> None:
    folder.mkdir()
    base = np.asarray(Image.fromarray(skimage.data.coffee()).resize((96, 64)))
    for key in ("singleobj_1", "faceobj_2"):
        frames = np.stack([np.roll(base, shift * t, axis=1) for t in range(6)])
        write_mp4(frames, folder / f"{key}.mp4", fps=8)


def test_another_models_videos_are_scored_and_two_runs_compared(tmp_path):
    f = _case_file(tmp_path)
    cfg = metrics_config({"face": {"embedder": "off"}, "copy_paste": {"enabled": False}, "n_frames": 4})
    suite = MetricSuite(cfg, kinds=["video"])
    runs = []
    for name, shift in (("still", 0), ("moving", 4)):
        _videos(tmp_path / f"v_{name}", shift)
        out = tmp_path / "runs" / name
        rep = evaluate(None, f, str(out), suite=suite, videos=str(tmp_path / f"v_{name}"))
        assert rep["n_ok"] == 2 and rep["n_failed"] == 1  # the case with a missing image
        assert rep["generator"].startswith("videos in")
        o = rep["opens2v"]
        assert o["domain"] == "Open-Domain" and set(o["categories"]) == {"singleobj", "faceobj", "humanobj"}
        assert "GmeScore" in o["missing"] and "OpenS2V-Eval" in (out / "eval.md").read_text()
        runs.append(out)
    res = opens2v.compare([str(r) for r in runs], tmp_path / "cmp")
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert res["runs"] == ["still", "moving"] and "| Motion |" in md and "### faceobj" in md
    page = (tmp_path / "cmp" / "index.html").read_text()
    assert page.count("<video") == 4 and "A man holds a cup." in page and "../runs/moving/videos/" in page
    # one run is not a comparison
    with pytest.raises(ValueError):
        opens2v.compare([str(runs[0])], tmp_path / "cmp1")
