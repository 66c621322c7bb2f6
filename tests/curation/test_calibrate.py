"""Pairing-band calibration: the fit on synthetic scores, labelled sets, the bundled set, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from curation import calibrate as cal

REPO = Path(__file__).resolve().parents[2]


# --- the fit on synthetic score arrays -------------------------------------------------------------------


def best_recall(same, different, high, target):
    """Brute force: the most recall any low reaches at precision >= target (band [low, high])."""
    best = 0.0
    for t in np.unique(np.concatenate([same, different])):
        m = cal.band_metrics(same, different, [], t, high)
        if m["same_kept"] and m["precision"] >= target:
            best = max(best, m["recall"])
    return best


def test_fit_puts_each_edge_mid_gap_between_separated_distributions():
    rng = np.random.default_rng(0)
    same = rng.uniform(0.80, 0.92, 200)
    different = rng.uniform(0.30, 0.70, 1000)
    copy = rng.uniform(0.96, 1.00, 100)
    fit = cal.fit_band(same, different, copy, precision_target=0.95, copy_target=0.95)
    assert fit["target_met"] and fit["high_fitted"]
    assert fit["precision"] == fit["recall"] == fit["copy_rejected"] == fit["different_rejected"] == 1.0
    assert fit["low"] == pytest.approx((different.max() + same.min()) / 2, abs=6e-4)
    assert fit["high"] == pytest.approx((same.max() + copy.min()) / 2, abs=6e-4)
    assert fit["low"] == round(fit["low"], 3) and fit["high"] == round(fit["high"], 3)


def test_edges_are_rounded_only_as_far_as_the_gap_allows():
    same, different = np.array([0.81912, 0.9]), np.array([0.5, 0.81903])  # a gap narrower than 0.001
    low, met = cal.fit_low(same, different, 0.95, precision_target=0.99)
    assert met and 0.81903 < low <= 0.81912 and low == round(low, 4)
    assert cal.fmt_edge(low) == str(low) and cal.fmt_edge(0.8) == "0.800"
    m = cal.band_metrics(same, different, [], float(cal.fmt_edge(low)), 0.95)
    assert m["precision"] == m["recall"] == 1.0


def test_fit_low_keeps_the_most_recall_the_precision_target_allows():
    rng = np.random.default_rng(1)
    same = np.clip(rng.normal(0.85, 0.05, 500), -1, 0.97)
    different = rng.normal(0.60, 0.08, 2000)
    for target in (0.9, 0.95, 0.99):
        low, met = cal.fit_low(same, different, 0.98, target)
        m = cal.band_metrics(same, different, [], low, 0.98)
        assert met and m["precision"] >= target
        assert m["recall"] == pytest.approx(best_recall(same, different, 0.98, target))
    # a stricter target never buys recall
    lows = [cal.fit_low(same, different, 0.98, t)[0] for t in (0.8, 0.9, 0.95, 0.99)]
    assert lows == sorted(lows) and lows[0] < lows[-1]


def test_fit_high_rejects_the_copy_share_asked_and_keeps_the_most_same_pairs():
    rng = np.random.default_rng(2)
    same = rng.uniform(0.70, 0.95, 400)
    copy = rng.uniform(0.90, 1.00, 300)  # overlaps the same-subject scores
    edges = np.unique(np.concatenate([same, copy]))
    for target in (0.8, 0.95, 1.0):
        high = cal.fit_high(same, copy, target)
        assert (copy > high).mean() >= target
        # brute force: no edge that rejects enough copies keeps more same-subject pairs
        best = max((same <= t).sum() for t in edges if (copy > t).mean() >= target)
        assert (same <= high).sum() == best
        # ... and of those edges this one rejects the most copies: none kept above the highest kept same
        assert not ((copy <= high) & (copy > same[same <= high].max())).any()


def test_an_unreachable_precision_target_is_reported():
    rng = np.random.default_rng(3)
    s = rng.uniform(0.5, 0.9, 300)
    fit = cal.fit_band(s, rng.uniform(0.5, 0.9, 3000), [0.99] * 10, precision_target=0.95)
    assert not fit["target_met"] and fit["precision"] < 0.95


def test_without_copy_pairs_high_stays_as_configured():
    fit = cal.fit_band([0.8, 0.85, 0.9], [0.3, 0.5], [], default_high=0.97)
    assert fit["high"] == 0.97 and not fit["high_fitted"] and fit["low"] == pytest.approx(0.65)


# --- labelled sets ----------------------------------------------------------------------------------------


def _write_img(path: Path, seed: int, size=(40, 30)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)


def test_pair_file_paths_may_not_leave_its_folder(tmp_path):
    setdir = tmp_path / "set"
    _write_img(setdir / "a.png", 0)
    _write_img(tmp_path / "outside.png", 1)
    (setdir / "link.png").symlink_to(tmp_path / "outside.png")
    cases = {
        "../outside.png": "resolves outside the set's folder",
        str(tmp_path / "outside.png"): "must be relative to the set's folder",
        "link.png": "resolves outside the set's folder",  # a symlink out is refused too
        "missing.png": "does not exist",
    }
    for bad, msg in cases.items():
        f = setdir / "pairs.jsonl"
        f.write_text(json.dumps({"image_a": "a.png", "image_b": bad, "label": "same"}) + "\n")
        with pytest.raises(cal.CalibrationError, match=msg) as e:
            cal.read_pair_file(f)
        assert "pairs.jsonl:1 image_b" in str(e.value)
    # the CLI says so in one line and exits 2, before any model loads
    f.write_text(json.dumps({"image_a": "a.png", "image_b": "../outside.png", "label": "same"}) + "\n")
    rc = cal.main(["fit", "--pairs", str(f), "--config", str(REPO / "pipelines.yaml")])
    assert rc == 2


def test_pair_file_csv_labels_and_clip_folders(tmp_path):
    _write_img(tmp_path / "a.png", 0)
    _write_img(tmp_path / "b.png", 1)
    for k in range(3):
        _write_img(tmp_path / "clip" / f"f{k}.png", 10 + k)
    (tmp_path / "pairs.csv").write_text(
        "image_a,image_b,label\na.png,b.png,different\na.png,clip,same\nb.png,clip,Copy\n"
    )
    ps = cal.read_pair_file(tmp_path / "pairs.csv")
    assert ps.counts() == {"same": 1, "different": 1, "copy": 1}
    assert len(ps.items) == 3 and len(ps.items[2].paths) == 3  # a folder is one subject of three crops
    (tmp_path / "bad.csv").write_text("image_a,image_b,label\na.png,b.png,similar\n")
    with pytest.raises(cal.CalibrationError, match=r"bad.csv:2: label 'similar'"):
        cal.read_pair_file(tmp_path / "bad.csv")


def test_groups_pair_within_identity_and_category(tmp_path):
    # human: ann (2 photos + a clip folder), bob (1 photo); animal: cat (2 photos)
    for rel, seed in [("human/ann/1.png", 0), ("human/ann/2.png", 1), ("human/ann/clip/f0.png", 2),
                      ("human/ann/clip/f1.png", 3), ("human/bob/1.png", 4), ("animal/cat/1.png", 5),
                      ("animal/cat/2.png", 6)]:  # fmt: skip
        _write_img(tmp_path / rel, seed)
    ps = cal.read_groups(tmp_path, categories=True, copies_per_item=2)
    # same: ann C(3,2)=3 + cat 1; different: ann x bob = 3 (never across categories); copies: 6 items x 2
    assert ps.counts() == {"same": 4, "different": 3, "copy": 12}
    names = {it.identity for it in ps.items}
    assert names == {"human/ann", "human/bob", "animal/cat"}
    flat = cal.read_groups(tmp_path / "human", copies_per_item=0)
    assert flat.counts() == {"same": 3, "different": 3, "copy": 0}


def test_near_copy_is_close_but_not_identical():
    import skimage.data

    img = skimage.data.coffee()
    a, b = cal.near_copy(img, 1), cal.near_copy(img, 1)
    assert np.array_equal(a, b)  # seeded
    assert a.shape != img.shape and 0.8 * img.shape[0] * 0.94 <= a.shape[0] <= img.shape[0]


# --- the bundled calibration set ---------------------------------------------------------------------------


def test_calibration_set_uses_no_asset_of_the_bundled_sample():
    from curation.demo.footage import BACKGROUNDS, SUBJECTS

    sample = {s.asset for s in SUBJECTS.values()} | {
        v.get("photo") or v.get("video") for v in BACKGROUNDS.values()
    }
    sample |= {"astronaut", "grace_hopper", "t1", "lfw_subset", "carphone_pristine", "bigbuckbunny"}
    ours = [name for views in cal.CALIBRATION_SUBJECTS.values() for v in views.values() for name, _ in v]
    ours += cal.CALIBRATION_BACKGROUNDS
    stems = {Path(n.partition(":")[2].split(",")[0]).stem.lower() for n in ours}
    kinds = {n.partition(":")[0] for n in ours}
    assert not stems & {s.lower() for s in sample}
    assert not kinds & {"bikes", "bunny", "carphone"}


def test_build_set_writes_groups_and_refuses_a_foreign_folder(tmp_path):
    out = tmp_path / "set"
    rec = cal.build_calibration_set(out, planted_clips=1)
    n_ids = sum(len(v) for v in cal.CALIBRATION_SUBJECTS.values())
    planted = [k for k in rec["items"] if k.endswith("/planted0")]
    assert len(planted) == n_ids
    for k in planted:  # a planted clip: one crop per reference point
        assert sorted(os.listdir(out / k)) == ["f0.jpg", "f1.jpg", "f2.jpg"]
    assert (out / "ip_character" / "roxanne" / "real2").is_dir()  # a real clip's crops
    ps = cal.read_groups(out, categories=True)
    assert ps.counts()["same"] > n_ids and ps.counts()["different"] > ps.counts()["same"]
    cal.build_calibration_set(out, planted_clips=1)  # its own earlier set is replaced
    foreign = tmp_path / "mine"
    _write_img(foreign / "keep.png", 0)
    with pytest.raises(cal.CalibrationError, match="holds no calibration set"):
        cal.build_calibration_set(foreign)
    assert (foreign / "keep.png").exists()


# --- the CLI end to end, with the real offline embedder ---------------------------------------------------


def test_cli_fits_a_tiny_planted_set_with_mobilenet(tmp_path):
    import skimage.data
    from PIL import Image

    rng = np.random.default_rng(0)
    groups = tmp_path / "groups"
    for name in ("coffee", "chelsea", "rocket"):
        photo = getattr(skimage.data, name)()
        d = groups / name
        d.mkdir(parents=True)
        for k in range(3):  # three views: a crop, maybe mirrored, relit
            h, w = photo.shape[:2]
            y0, x0 = int(rng.uniform(0, 0.1) * h), int(rng.uniform(0, 0.1) * w)
            v = photo[y0 : y0 + int(0.85 * h), x0 : x0 + int(0.85 * w)]
            v = v[:, ::-1] if k % 2 else v
            v = np.clip(v * rng.uniform(0.8, 1.2), 0, 255).astype(np.uint8)
            Image.fromarray(np.ascontiguousarray(v)).save(d / f"v{k}.jpg", quality=90)
    out = tmp_path / "fit"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "curation.calibrate", "fit", "--groups", str(groups), "--out", str(out)]
    cmd += ["--config", str(REPO / "pipelines.yaml"), "--precision", "0.9"]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode in (0, 1), p.stderr
    rec = json.loads((out / "calibration.json").read_text())
    assert rec["embedder"] == "mobilenet_v2" and rec["embedding_dim"] == 1280
    assert rec["n_pairs"] == {"same": 9, "different": 27, "copy": 9}
    fit = rec["fit"]
    assert -1 <= fit["low"] <= fit["high"] <= 1
    assert f"low: {cal.fmt_edge(fit['low'])}, high: {cal.fmt_edge(fit['high'])}" in p.stdout  # the YAML
    assert f"precision {fit['precision']:.3f}" in p.stdout and f"recall {fit['recall']:.3f}" in p.stdout
    # a near copy scores above every view of another photo
    assert rec["scores"]["copy"]["min"] > rec["scores"]["different"]["max"]
    assert "configured" in rec and rec["configured"]["low"] == pytest.approx(
        json.loads(json.dumps(cal.pipeline_steps(str(REPO / "pipelines.yaml"))[2]))["low"]
    )
    png = (out / "calibration.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image as PILImage

    with PILImage.open(out / "calibration.png") as im:
        assert im.size[0] > 400 and im.size[1] > 200
