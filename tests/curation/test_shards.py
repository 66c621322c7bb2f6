"""Shard tests through the global phase: triplet samples, WebDataset/tar readability, count/size limits,
bad inputs recorded, per-shard records, kill-and-resume."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from curation.config import StageSpec
from curation.global_phase import export_video, run_global
from curation.shards import (
    INDEX_FILE,
    RECORDS_DIR,
    ShardSetWriter,
    iter_tar_samples,
    list_shards,
    plan_shards,
    read_index,
    sha256_file,
)
from curation.stage import StageContext
from curation.stages.subject_embed import encode_jpeg
from curation.storage import Store
from tests.curation.videos import write_video

CLIP_W, CLIP_H, CLIP_FRAMES = 96, 64, 12
DIM = 64
PAIR = {"low": 0.78, "high": 0.99, "face_low": 0.5, "face_high": 0.99}


def _photos() -> dict[str, np.ndarray]:
    import skimage.data

    return {"cat": skimage.data.chelsea(), "cup": skimage.data.coffee(), "man": skimage.data.astronaut()}


def _unit(rng, v: np.ndarray, noise: float) -> np.ndarray:
    e = v + noise * rng.standard_normal(v.shape).astype(np.float32) / np.sqrt(v.size)
    return (e / np.linalg.norm(e)).astype(np.float32)


def make_rows(
    out_dir: str,
    n_videos: int = 6,
    photos: list[str] | None = None,
    faces: dict | None = None,
    seed: int = 0,
    two_subjects: bool = True,
) -> list[dict]:
    """Committed rows as the map phase leaves them: one clip per video (a photo panning across a small frame,
    real H.264), one subject per clip with three JPEG reference crops and their embeddings on disk (same
    photo: cosine ~0.97, in the band; other photos ~0). Clip ``v02`` has two subjects (the man and a cup)
    unless ``two_subjects`` is off. ``faces`` {video_id: identity} gives that video's man a face with an
    SFace-sized embedding per identity."""
    all_photos = _photos()
    names = photos or list(all_photos)
    rng = np.random.default_rng(seed)
    base = {
        n: _unit(np.random.default_rng(zlib.crc32(n.encode())), np.zeros(DIM, np.float32) + 1e-3, 1e3)
        for n in all_photos
    }
    face_ids = {}
    rows = []
    for v in range(n_videos):
        vid, name = f"v{v:02d}", names[v % len(names)]
        clip_id = f"{vid}-0000"
        img = all_photos[name]
        frames = [
            np.ascontiguousarray(img[i * 4 : i * 4 + CLIP_H * 4 : 4, i * 4 : i * 4 + CLIP_W * 4 : 4])
            for i in range(CLIP_FRAMES)
        ]  # (64, 96, 3) each: a slow diagonal pan
        rel = f"clips/{vid}/{clip_id}.mp4"
        os.makedirs(os.path.join(out_dir, f"clips/{vid}"), exist_ok=True)
        write_video(os.path.join(out_dir, rel), frames, fps=12)
        subjects, embs, fembs = [], [], []
        for si, sname in enumerate([name] + (["cup"] if vid == "v02" and two_subjects else [])):
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
                        "emb_row": len(embs),
                        "phash": f"{int(rng.integers(0, 2**63)):016x}",
                        "duplicate_of": None,
                        "size_px": [40, 48],
                    }
                )
                embs.append(_unit(rng, base[sname], 0.3))
            s = {
                "name": sname,
                "description": f"a {sname}",
                "category": "animal" if sname == "cat" else "product" if sname == "cup" else "human",
                "boxes": [
                    {"ref": r, "box": [10 + si * 40, 8, 50 + si * 40, 56], "score": 0.9} for r in range(3)
                ],
                "crops": crops,
            }
            if sname == "man" and faces and vid in faces:
                ident = faces[vid]
                if ident not in face_ids:
                    face_ids[ident] = _unit(
                        np.random.default_rng(len(face_ids) + 100), np.zeros(128) + 1e-3, 1e3
                    )
                s["faces"] = [
                    {
                        "ref": 1,
                        "box": [20, 10, 40, 34],
                        "det_score": 0.9,
                        "iou": 0.2,
                        "emb_row": 0,
                        "path": crops[1]["path"],
                        "phash": f"{int(rng.integers(0, 2**63)):016x}",
                        "duplicate_of": None,
                    }
                ]
                s["face_status"] = "ok"
                fembs.append(_unit(rng, face_ids[ident], 0.2))
            subjects.append(s)
        erel = f"embeddings/{vid}/{clip_id}.npy"
        os.makedirs(os.path.join(out_dir, f"embeddings/{vid}"), exist_ok=True)
        np.save(os.path.join(out_dir, erel), np.stack(embs))
        row = {
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
            "embedding_file": erel,
            "ref_frames": [
                {"t_frac": f, "frame_index": i, "t_s": round(i / 12, 3)}
                for f, i in ((0.05, 1), (0.5, 6), (0.95, 11))
            ],
        }
        if fembs:
            frel = f"embeddings/{vid}/{clip_id}.faces.npy"
            np.save(os.path.join(out_dir, frel), np.stack(fembs))
            row["face_embedding_file"] = frel
        rows.append(row)
    return rows


def specs(pair: dict | None = None, **write) -> list[StageSpec]:
    return [
        StageSpec(stage="pair", params={**PAIR, **(pair or {})}),
        StageSpec(stage="write_shards", params=write),
    ]


def export(out_dir, rows, map_hash: str = "m1", store: Store | None = None) -> Store:
    store = store or Store(str(out_dir))
    by_video: dict[str, list[dict]] = {}
    for r in rows:
        by_video.setdefault(r["video_id"], []).append(r)
    for vrows in by_video.values():
        export_video(vrows, store, str(out_dir), map_hash)
    return store


def write(
    out_dir, rows, pair: dict | None = None, runner: str = "sequential", store: Store | None = None, **params
) -> dict:
    store = export(out_dir, rows, store=store)
    ctx = StageContext(out_dir=str(out_dir), config_hash="cafe0123")
    return run_global(specs(pair, **params), store, ctx, "m1", runner=runner)


def samples_of(shards) -> dict[str, dict]:
    return {k: s for e in read_index(shards)["shards"] for k, s in iter_tar_samples(shards / e["name"])}


@pytest.fixture()
def written(tmp_path):
    rows = make_rows(str(tmp_path))
    return tmp_path, rows, write(tmp_path, rows, maxcount=4)


def test_samples_hold_clip_caption_refs_and_metadata(written):
    out_dir, rows, summary = written
    assert summary["triplets_by_pair_type"] == {"in_pair": 6, "cross_pair": 6}  # every photo is in two videos
    assert summary["triplets_out"] == 12 and summary["shards"] == 3
    index = read_index(out_dir / "shards")
    assert [e["samples"] for e in index["shards"]] == [4, 4, 4] and index["config_hash"] == "cafe0123"
    assert [e["name"] for e in index["shards"]] == [f"shard-00000-{i:06d}.tar" for i in range(3)]
    samples = samples_of(out_dir / "shards")
    s = samples["v02-0000_cross_pair0"]
    assert set(s) == {"mp4", "txt", "json", "ref_0.jpg", "ref_1.jpg"}
    assert s["mp4"] == (out_dir / "clips/v02/v02-0000.mp4").read_bytes()
    meta = json.loads(s["json"])
    assert (
        meta["pair_type"] == "cross_pair" and meta["config_hash"] == "cafe0123" and meta["split"] == "train"
    )
    assert meta["span"] == [1.0, 2.0] and (meta["width"], meta["height"], meta["fps"]) == (
        CLIP_W,
        CLIP_H,
        12.0,
    )
    assert meta["scores"] == {"motion_score": 0.2, "quality_score": 0.8}
    man, cup = meta["subjects"]
    assert (man["name"], man["category"], cup["category"]) == ("man", "human", "product")
    assert man["ref"]["video_id"] == "v05" and man["ref"]["t_s"] == 0.5 and 0.78 <= man["similarity"] <= 0.99
    assert man["ref"]["kind"] == "cross" and man["identity"] == "embedding_only"  # no face found on this man
    assert cup["ref"]["video_id"] in {"v01", "v04"} and cup["ref"]["kind"] == "cross"
    assert s["ref_0.jpg"] == (out_dir / "refs/v05/v05-0000/s00_r1.jpg").read_bytes()
    assert man["boxes"][1]["box"] == [10, 8, 50, 56]
    assert set(meta["scenarios"]) == {"people", "objects", "human_object"}
    assert meta["primary_scenario"] == "human_object"
    inpair = json.loads(samples["v02-0000_in_pair0"]["json"])
    assert {x["ref"]["clip_id"] for x in inpair["subjects"]} == {"v02-0000"}
    assert samples["v02-0000_in_pair0"]["txt"] == b"A man in clip v02-0000."
    assert summary["scenarios"]["human_object"] == 2 and summary["scenarios"]["backgrounds"] == 0


def test_plain_webdataset_and_tar_read_the_shards(written):
    import webdataset as wds

    out_dir, _, summary = written
    urls = [str(out_dir / "shards" / e["name"]) for e in read_index(out_dir / "shards")["shards"]]
    got = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(got) == summary["triplets_out"]
    assert all(g["mp4"][4:8] == b"ftyp" and g["ref_0.jpg"][:2] == b"\xff\xd8" for g in got)
    with tarfile.open(urls[0]) as tf:
        names = tf.getnames()
    assert names[0].endswith(".json") and all("/" not in n and n.count(".") >= 1 for n in names)


def test_size_limit_and_plan():
    assert plan_shards([10, 10, 10, 10], maxcount=3, maxsize=100) == [(0, 3), (3, 4)]
    assert plan_shards([60, 60, 200, 10], maxcount=10, maxsize=100) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert plan_shards([], 3, 100) == []


def test_list_shards_follows_the_index_confined_and_checked(tmp_path):
    samples = [{"__key__": f"k{i}", "txt": f"caption {i}".encode(), "json": b"{}"} for i in range(6)]
    index = ShardSetWriter(tmp_path / "set", maxcount=2).write(samples)
    names = [e["name"] for e in index["shards"]]

    def listed(d, **kw):
        return [Path(p).name for p in list_shards(d, **kw)]

    assert listed(tmp_path / "set", verify_sha256=True) == names
    one = tmp_path / "set" / names[1]
    assert list_shards(one) == [str(one.resolve())]  # a tar is itself
    # earlier writers' indexes: a list of names, or entries naming the shard under "path"
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for n in names:
        (legacy / n).write_bytes((tmp_path / "set" / n).read_bytes())
    (legacy / "index.json").write_text(json.dumps([names[2], {"path": names[0]}]))
    assert listed(legacy) == [names[2], names[0]]
    (legacy / "index.json").unlink()
    assert listed(legacy) == names  # no index: every shard-*.tar in name order

    bad = json.loads((tmp_path / "set" / INDEX_FILE).read_text())
    bad["shards"][0]["sha256"] = "0" * 64
    (legacy / INDEX_FILE).write_text(json.dumps(bad))
    assert listed(legacy) == names  # the hashes are checked only when asked
    with pytest.raises(ValueError, match="sha256"):
        list_shards(legacy, verify_sha256=True)
    for entry, error, match in (
        ({"name": "../set/" + names[0]}, ValueError, "escapes"),
        ({"name": "shard-000009.tar"}, FileNotFoundError, "missing"),
        ({"size": 1}, ValueError, "without a name"),
    ):
        (legacy / INDEX_FILE).write_text(json.dumps({"shards": [entry]}))
        with pytest.raises(error, match=match):
            list_shards(legacy)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no shards"):
        list_shards(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_shards(tmp_path / "nowhere")


def test_list_shards_on_a_store_uri_with_the_same_checks(tmp_path, s3_bucket):
    """A shards folder in a real S3 API (moto on loopback): listed through its index object, read by
    streaming, sha256-checked; a bad index, a missing or escaping shard and a truncated object are refused as
    on disk."""
    from curation.shards import TAR_ERRORS, index_entries, shard_sha256

    samples = [{"__key__": f"k{i}", "txt": os.urandom(3000), "json": b"{}"} for i in range(6)]
    local = tmp_path / "set"
    index = ShardSetWriter(local, maxcount=2).write(samples)
    names = [e["name"] for e in index["shards"]]
    store = Store(f"{s3_bucket}/run/shards")
    for p in sorted(local.rglob("*")):
        if p.is_file():
            store.put_file(p.relative_to(local).as_posix(), p)
    urls = list_shards(store.uri, verify_sha256=True)
    assert urls == [f"{s3_bucket}/run/shards/{n}" for n in names]
    for url, name in zip(urls, names):
        assert list(iter_tar_samples(url)) == list(iter_tar_samples(local / name))
        assert shard_sha256(url) == sha256_file(local / name)
    assert list_shards(urls[1]) == [urls[1]]  # a .tar URI is itself
    assert index_entries(store.uri)[0] == f"{store.uri}/{INDEX_FILE}"

    store.delete(INDEX_FILE)
    assert [e["name"] for e in index_entries(store.uri)[1]] == names  # no index: the listing, in name order
    for entry, error, match in (
        (dict(index["shards"][0], sha256="0" * 64), ValueError, "sha256"),
        ({"name": "shard-000009.tar"}, FileNotFoundError, "missing"),
        ({"name": "../" + names[0]}, ValueError, "escapes"),
        ({"size": 1}, ValueError, "without a name"),
    ):
        store.write_json(INDEX_FILE, {"shards": [entry]})
        with pytest.raises(error, match=match):
            list_shards(store.uri, verify_sha256=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_shards(f"{s3_bucket}/nowhere")
    data = (local / names[0]).read_bytes()
    with tarfile.open(local / names[0]) as tf:
        last = tf.getmembers()[-1]  # of the second sample
    for cut in (last.offset_data + 100, last.offset + 100):  # in a member's data; in a header
        store.write_bytes(names[0], data[:cut])
        read = []
        with pytest.raises(TAR_ERRORS, match="truncated|unexpected end"):  # after the whole samples before
            for key, _ in iter_tar_samples(urls[0]):
                read.append(key)
        assert read == ["k0"]


def test_bad_rows_are_recorded_not_fatal(tmp_path):
    rows = make_rows(str(tmp_path), n_videos=3)
    os.remove(tmp_path / rows[1]["clip_path"])
    rows[2]["clip_path"] = "../../etc/passwd"
    summary = write(tmp_path, rows)
    # v01 (file gone) and v02 (path escapes the store) lose their samples, each counted with a reason
    assert (
        summary["rejections_by_reason"]["write_shards:FileNotFoundError"] == 2
    )  # its in-pair and cross-pair
    assert summary["rejections_by_reason"]["write_shards:ValueError"] == 2
    assert {k.split("_")[0] for k in samples_of(tmp_path / "shards")} == {"v00-0000"}


def _state(shards):
    return {p.name: sha256_file(p) for p in sorted(shards.glob("shard-*.tar"))}


def test_one_record_per_shard_written_once(tmp_path):
    rows = make_rows(str(tmp_path))
    write(tmp_path, rows, maxcount=1)
    shards = tmp_path / "shards"
    recs = sorted((shards / RECORDS_DIR).glob("*.json"))
    assert [r.name[: -len(".json")] for r in recs] == sorted(_state(shards)) and len(recs) == 12
    assert not (shards / ".progress.json").exists() and not (shards / "index.json").exists()
    assert (shards / INDEX_FILE).exists()
    # O(1) bookkeeping: the first shard's record is never rewritten while the later shards are written
    first = recs[0].stat().st_mtime_ns
    assert (
        all(r.stat().st_mtime_ns >= first for r in recs) and json.loads(recs[0].read_text())["samples"] == 1
    )


def test_resume_after_a_kill_rewrites_identical_shards(tmp_path):
    rows = make_rows(str(tmp_path))
    write(tmp_path, rows, maxcount=2)
    shards = tmp_path / "shards"
    want, index = _state(shards), (shards / INDEX_FILE).read_bytes()
    assert len(want) == 6
    # a run killed mid-way: no index and no done marker, the last shard never moved into place, a stale temp
    # file, one shard corrupted (its record's size and sha256 no longer match it)
    (shards / INDEX_FILE).unlink()
    for done in tmp_path.glob("global/plans-*/_done.json"):
        done.unlink()
    (shards / "shard-00000-000005.tar").unlink()
    (shards / ".shard-00000-000005.tar.x1.tmp").write_bytes(b"partial")
    (shards / "shard-00000-000002.tar").write_bytes(b"garbage")
    mtime_kept = (shards / "shard-00000-000000.tar").stat().st_mtime_ns
    summary = write(tmp_path, rows, maxcount=2)
    assert _state(shards) == want and (shards / INDEX_FILE).read_bytes() == index
    assert not list(shards.glob("*.tmp*"))
    assert (shards / "shard-00000-000000.tar").stat().st_mtime_ns == mtime_kept  # verified, not rewritten
    assert (summary["shards_kept"], summary["shards_written"]) == (4, 2)


def test_a_real_sigkill_then_rerun_gives_identical_shards(tmp_path):
    """The global phase runs in a child process that is killed as soon as its first shard record exists; a
    re-run in this process must produce the very shards an uninterrupted run produces."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    ref.mkdir()
    run.mkdir()
    write(ref, make_rows(str(ref)), maxcount=1)
    want = _state(ref / "shards")
    rows = make_rows(str(run))
    export(run, rows)
    code = (
        "from curation.config import StageSpec; from curation.global_phase import run_global; "
        "from curation.stage import StageContext; from curation.storage import Store; "
        f"specs = [StageSpec(stage='pair', params={PAIR!r}), StageSpec(stage='write_shards', "
        "params={'maxcount': 1})]; "
        f"run_global(specs, Store({str(run)!r}), StageContext(out_dir={str(run)!r}, config_hash='cafe0123'), "
        "'m1', runner='sequential')"
    )
    child = subprocess.Popen([sys.executable, "-c", code], cwd=os.getcwd())
    # a result is written under its global hash and published last (curation.global_phase.publish)
    records_glob = str(run / "global" / "results" / "*" / "shards" / RECORDS_DIR / "*")
    deadline = time.time() + 120
    while not glob.glob(records_glob) and child.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert glob.glob(records_glob) and not (run / "shards").exists()  # killed mid-way, nothing published
    write(run, rows, maxcount=1)
    assert _state(run / "shards") == want
