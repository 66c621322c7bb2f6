"""Shard tests: triplet samples, WebDataset/tar readability, count/size limits, kill-and-resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest

from curation.shards import PROGRESS_FILE, iter_tar_samples, plan_shards, read_index, sha256_file
from curation.stage import StageContext
from curation.stages.subject_embed import encode_jpeg
from curation.stages.write_shards import WriteShards
from tests.curation.videos import write_video

CLIP_W, CLIP_H, CLIP_FRAMES = 96, 64, 12


def _photos() -> dict[str, np.ndarray]:
    import skimage.data

    return {"cat": skimage.data.chelsea(), "cup": skimage.data.coffee(), "man": skimage.data.astronaut()}


def make_rows(out_dir: str, n_videos: int = 6) -> list[dict]:
    """Rows as the pair stage leaves them: one clip per video (a photo panning across a small frame, real
    H.264), one subject per clip with three reference crops on disk, and cross-video partners for the clips
    that share a photo. Clip ``v02`` has two subjects (the man and a cup)."""
    photos = _photos()
    names = list(photos)
    rows = []
    for v in range(n_videos):
        vid, name = f"v{v:02d}", names[v % len(names)]
        clip_id = f"{vid}-0000"
        img = photos[name]
        frames = [
            np.ascontiguousarray(img[i * 4 : i * 4 + CLIP_H * 4 : 4, i * 4 : i * 4 + CLIP_W * 4 : 4])
            for i in range(CLIP_FRAMES)
        ]  # (64, 96, 3) each: a slow diagonal pan
        rel = f"clips/{vid}/{clip_id}.mp4"
        os.makedirs(os.path.join(out_dir, f"clips/{vid}"), exist_ok=True)
        write_video(os.path.join(out_dir, rel), frames, fps=12)
        subjects = []
        for si, sname in enumerate([name] + (["cup"] if vid == "v02" else [])):
            crops = []
            for ref in range(3):
                path = f"refs/{vid}/{clip_id}/s{si:02d}_r{ref}.jpg"
                os.makedirs(os.path.dirname(os.path.join(out_dir, path)), exist_ok=True)
                crop = frames[[1, 6, 11][ref]][8:56, 10 + si * 40 : 50 + si * 40]
                with open(os.path.join(out_dir, path), "wb") as f:
                    f.write(encode_jpeg(crop, 90))
                crops.append(
                    {
                        "ref": ref,
                        "box": [10 + si * 40, 8, 50 + si * 40, 56],
                        "path": path,
                        "emb_row": ref,
                        "phash": "0" * 16,
                        "duplicate_of": None,
                        "size_px": [40, 48],
                    }
                )
            subjects.append(
                {
                    "name": sname,
                    "description": f"a {sname}",
                    "category": "animal" if sname == "cat" else "product" if sname == "cup" else "human",
                    "boxes": [
                        {"ref": r, "box": [10 + si * 40, 8, 50 + si * 40, 56], "score": 0.9} for r in range(3)
                    ],
                    "crops": crops,
                    "pairs": [],
                }
            )
        rows.append(
            {
                "video_id": vid,
                "clip_id": clip_id,
                "status": "ok",
                "source": "sample",
                "clip_path": rel,
                "start_s": 1.0,
                "end_s": 2.0,
                "fps": 12.0,
                "clip_width": CLIP_W,
                "clip_height": CLIP_H,
                "clip_n_frames": CLIP_FRAMES,
                "caption": f"A {name} in clip {clip_id}.",
                "quality_score": 0.8,
                "motion_score": 0.1 * v,
                "subjects": subjects,
                "ref_frames": [
                    {"t_frac": f, "frame_index": i, "t_s": round(i / 12, 3)}
                    for f, i in ((0.05, 1), (0.5, 6), (0.95, 11))
                ],
            }
        )
    by_name: dict[str, list[tuple[int, int]]] = {}
    for ri, r in enumerate(rows):
        for si, s in enumerate(r["subjects"]):
            by_name.setdefault(s["name"], []).append((ri, si))
    for members in by_name.values():
        for ri, si in members:
            for rj, sj in members:
                if rj != ri:
                    rows[ri]["subjects"][si]["pairs"].append(
                        {
                            "clip_id": rows[rj]["clip_id"],
                            "video_id": rows[rj]["video_id"],
                            "subject": sj,
                            "score": round(0.9 - 0.01 * rj, 3),
                        }
                    )
    return rows


def write(out_dir, rows, **params) -> list[dict]:
    ctx = StageContext(out_dir=str(out_dir), config_hash="cafe0123")
    return WriteShards(params=WriteShards.Params(**params), ctx=ctx)(rows)


@pytest.fixture()
def written(tmp_path):
    rows = make_rows(str(tmp_path))
    return tmp_path, rows, write(tmp_path, rows, maxcount=4)


def test_samples_hold_clip_caption_refs_and_metadata(written):
    out_dir, rows, out = written
    ok = [o for o in out if o["status"] == "ok"]
    assert {o["pair_type"] for o in ok} == {"in_pair", "cross_pair"}
    assert len(ok) == 12  # six clips, each in-pair and cross-pair (every photo appears in two videos)
    index = read_index(out_dir / "shards")
    assert [e["samples"] for e in index["shards"]] == [4, 4, 4] and index["config_hash"] == "cafe0123"
    samples = {k: s for e in index["shards"] for k, s in iter_tar_samples(out_dir / "shards" / e["name"])}
    s = samples["v02-0000_cross_pair0"]
    assert set(s) == {"mp4", "txt", "json", "ref_0.jpg", "ref_1.jpg"}
    assert s["mp4"] == (out_dir / "clips/v02/v02-0000.mp4").read_bytes()
    meta = json.loads(s["json"])
    assert meta["pair_type"] == "cross_pair" and meta["config_hash"] == "cafe0123"
    assert meta["span"] == [1.0, 2.0] and (meta["width"], meta["height"], meta["fps"]) == (
        CLIP_W,
        CLIP_H,
        12.0,
    )
    assert meta["scores"] == {"motion_score": 0.2, "quality_score": 0.8}
    man, cup = meta["subjects"]
    assert (man["name"], man["category"], cup["category"]) == ("man", "human", "product")
    assert man["ref"]["video_id"] != "v02" and man["ref"]["t_s"] == 0.5 and man["similarity"] is not None
    assert man["boxes"][1]["box"] == [10, 8, 50, 56]
    inpair = json.loads(samples["v02-0000_in_pair0"]["json"])
    assert {x["ref"]["clip_id"] for x in inpair["subjects"]} == {"v02-0000"}
    assert samples["v02-0000_in_pair0"]["txt"] == b"A man in clip v02-0000."


def test_plain_webdataset_and_tar_read_the_shards(written):
    import webdataset as wds

    out_dir, _, out = written
    urls = [str(out_dir / "shards" / e["name"]) for e in read_index(out_dir / "shards")["shards"]]
    got = list(wds.WebDataset(urls, shardshuffle=False))
    assert sorted(g["__key__"] for g in got) == sorted(o["key"] for o in out if o["status"] == "ok")
    assert all(g["mp4"][4:8] == b"ftyp" and g["ref_0.jpg"][:2] == b"\xff\xd8" for g in got)
    with tarfile.open(urls[0]) as tf:
        names = tf.getnames()
    assert names[0].endswith(".json") and all("/" not in n and n.count(".") >= 1 for n in names)
    assert tf and sorted({n.split(".")[0] for n in names}) == sorted(
        read_index(out_dir / "shards")["shards"][0]["keys"]
    )


def test_size_limit_and_plan():
    assert plan_shards([10, 10, 10, 10], maxcount=3, maxsize=100) == [(0, 3), (3, 4)]
    assert plan_shards([60, 60, 200, 10], maxcount=10, maxsize=100) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert plan_shards([], 3, 100) == []


def test_bad_rows_are_recorded_not_fatal(tmp_path):
    rows = make_rows(str(tmp_path), n_videos=3)
    os.remove(tmp_path / rows[1]["clip_path"])
    rows[2]["clip_path"] = "../../etc/passwd"
    out = write(tmp_path, rows)
    bad = {o["clip_id"]: o for o in out if o["status"] != "ok"}
    assert set(bad) == {"v01-0000", "v02-0000"} and all(
        o["reason"].startswith("write_shards:") for o in bad.values()
    )
    assert {o["clip_id"] for o in out if o["status"] == "ok"} == {"v00-0000"}


def _state(shards):
    return {p.name: sha256_file(p) for p in sorted(shards.glob("shard-*.tar"))}


def test_resume_after_a_kill_rewrites_identical_shards(tmp_path):
    rows = make_rows(str(tmp_path))
    write(tmp_path, rows, maxcount=2)
    shards = tmp_path / "shards"
    want, index = _state(shards), (shards / "index.json").read_bytes()
    assert len(want) == 6
    # a run killed mid-way: no index, the last shard never renamed into place, a stale temp file, one shard
    # corrupted (the progress file's sha256 no longer matches it)
    (shards / "index.json").unlink()
    (shards / "shard-000005.tar").unlink()
    (shards / "shard-000005.tar.tmp999").write_bytes(b"partial")
    (shards / "shard-000002.tar").write_bytes(b"garbage")
    mtime_kept = (shards / "shard-000000.tar").stat().st_mtime_ns
    ctx = StageContext(out_dir=str(tmp_path), config_hash="cafe0123")
    stage = WriteShards(params=WriteShards.Params(maxcount=2), ctx=ctx)
    stage(rows)
    assert _state(shards) == want and (shards / "index.json").read_bytes() == index
    assert not list(shards.glob("*.tmp*"))
    assert (shards / "shard-000000.tar").stat().st_mtime_ns == mtime_kept  # verified, not rewritten


def test_a_real_sigkill_then_rerun_gives_identical_shards(tmp_path):
    """The writer runs in a child process that is killed as soon as its first shard is recorded; a re-run in
    this process must produce the very shards an uninterrupted run produces."""
    rows = make_rows(str(tmp_path))
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    json.dump(rows, open(tmp_path / "rows.json", "w"))
    write(tmp_path, rows, maxcount=1, shards_subdir="ref")
    want = _state(tmp_path / "ref")
    code = (
        "import json, sys; from curation.stage import StageContext; "
        "from curation.stages.write_shards import WriteShards; "
        f"rows = json.load(open({str(tmp_path / 'rows.json')!r})); "
        f"WriteShards(params=WriteShards.Params(maxcount=1), ctx=StageContext(out_dir={str(tmp_path)!r}, "
        "config_hash='cafe0123'))(rows)"
    )
    child = subprocess.Popen([sys.executable, "-c", code], cwd=os.getcwd())
    progress = tmp_path / "shards" / PROGRESS_FILE
    deadline = time.time() + 60
    while not progress.exists() and child.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert progress.exists() and not (tmp_path / "shards" / "index.json").exists()  # killed mid-way
    write(tmp_path, rows, maxcount=1)
    assert _state(tmp_path / "shards") == want
