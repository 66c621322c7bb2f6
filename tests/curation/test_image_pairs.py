"""Image-pair sources: Subjects200K Parquet and OmniGen JSONL/Parquet (written here in the datasets' own
schemas, from real photos) -> one-frame ``image_pair`` triplet shards."""

from __future__ import annotations

import io
import json
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from curation.image_pairs import shard_name, write_image_pair_shards
from curation.shards import iter_tar_samples, read_index
from curation.sources import image_pairs as ip

VIEW = 96  # px per view in the test composites (the real ones are 512)
PAD = 8


def _png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _resize(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    return np.array(Image.fromarray(img).convert("RGB").resize(hw[::-1], Image.Resampling.LANCZOS))


@cache
def views() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Two views per real photo (the whole photo, and a crop of it): the same subject, another framing."""
    from skimage import data

    out = {}
    for name, img in (
        ("astronaut", data.astronaut()),
        ("chelsea", data.chelsea()),
        ("coffee", data.coffee()),
    ):
        h, w = img.shape[:2]
        a = _resize(img, (VIEW, VIEW))
        b = _resize(img[h // 8 : h, w // 8 : w - w // 8], (VIEW, VIEW))
        out[name] = (a, b)
    return out


def composite(left: np.ndarray, right: np.ndarray, pad: int = PAD) -> np.ndarray:
    """Subjects200K's layout: white, [p | view | 2p | view | p] across and [p | view | p] down."""
    s = left.shape[0]
    img = np.full((s + 2 * pad, 2 * s + 4 * pad, 3), 255, np.uint8)
    img[pad : pad + s, pad : pad + s] = left
    img[pad : pad + s, s + 3 * pad : 2 * s + 3 * pad] = right
    return img


def subjects200k_table(rows: list[dict]):
    """A pyarrow table with the Hub dataset's features (image struct, description, quality_assessment...)."""
    import pyarrow as pa

    schema = pa.schema(
        [
            ("quality_assessment", pa.struct([(k, pa.int64()) for k in ip.QUALITY_KEYS])),
            (
                "description",
                pa.struct(
                    [
                        ("item", pa.string()),
                        ("description_0", pa.string()),
                        ("description_1", pa.string()),
                        ("category", pa.string()),
                        ("description_valid", pa.bool_()),
                    ]
                ),
            ),
            ("raw_json", pa.string()),
            ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            ("collection", pa.string()),
        ]
    )
    return pa.Table.from_pylist(rows, schema=schema)


def s200k_row(name, item, category, d0, d1, q=5, valid=True, image=None, collection="collection_2"):
    a, b = views()[name]
    return {
        "quality_assessment": {k: q for k in ip.QUALITY_KEYS},
        "description": {
            "item": item,
            "description_0": d0,
            "description_1": d1,
            "category": category,
            "description_valid": valid,
        },
        "raw_json": "{}",
        "image": {"bytes": image if image is not None else _png(composite(a, b)), "path": None},
        "collection": collection,
    }


def good_rows() -> list[dict]:
    return [
        s200k_row(
            "astronaut",
            "woman astronaut",
            "Person",
            "A woman astronaut in a white suit poses by a flag.",
            "A close view of the woman astronaut in her white suit, smiling.",
        ),
        s200k_row(
            "chelsea",
            "tabby cat",
            "Animal",
            "An orange tabby cat looks up from a wooden floor.",
            "The orange tabby cat sits still, staring into the camera.",
        ),
    ]


def write_s200k(path: Path, rows: list[dict], row_group_size: int | None = None) -> Path:
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(subjects200k_table(rows), path, row_group_size=row_group_size)
    return path


def read_samples(shards: Path) -> dict[str, dict]:
    out = {}
    for e in read_index(shards)["shards"]:
        for key, s in iter_tar_samples(shards / e["name"]):
            out[key] = s
    return out


def one_frame(mp4: bytes) -> np.ndarray:
    import decord

    vr = decord.VideoReader(io.BytesIO(mp4))
    assert len(vr) == 1
    return vr[0].asnumpy()


def test_split_composite_recovers_both_views():
    a, b = views()["coffee"]
    left, right = ip.split_composite(composite(a, b), PAD)
    assert np.array_equal(left, a) and np.array_equal(right, b)
    with pytest.raises(ip.Rejected) as e:
        ip.split_composite(np.zeros((100, 150, 3), np.uint8), PAD)
    assert e.value.reason == "composite_size"


def test_subjects200k_parquet_to_one_frame_shards(tmp_path):
    rows = good_rows() + [
        s200k_row("coffee", "coffee cup", "Product", "a cup", "the cup", q=3),  # below the card's filter
        s200k_row("coffee", "coffee cup", "Product", "a cup", "the cup", valid=False),
        s200k_row("coffee", "coffee cup", "Product", "a cup", "the cup", image=b"\x89PNG not really"),
    ]
    src = write_s200k(tmp_path / "s200k" / "train-00000.parquet", rows)
    out = tmp_path / "shards"
    index = write_image_pair_shards("subjects200k", str(src.parent), out)
    assert index["rows"] == 5 and index["total_samples"] == 4  # two good rows, both directions
    assert index["rejections"] == {
        "image_pairs:bad_image": 1,
        "image_pairs:description_invalid": 1,
        "image_pairs:low_quality": 1,
    }
    assert index["scenarios"]["people"] == 2 and index["scenarios"]["animals"] == 2
    samples = read_samples(out)
    s = samples["s200k_train-00000_g0_0_01"]  # astronaut: view 0 is the reference, view 1 the target
    meta = json.loads(s["json"])
    assert meta["pair_type"] == "image_pair" and meta["n_frames"] == 1
    assert s["txt"].decode() == rows[0]["description"]["description_1"]
    assert meta["subjects"][0]["name"] == "woman astronaut" and meta["subjects"][0]["category"] == "human"
    assert meta["subjects"][0]["category_source"] == "dataset"  # "Person": the dataset's label stands
    assert meta["scores"] == {f"quality_{k}": 5 for k in ip.QUALITY_KEYS}
    a, b = views()["astronaut"]
    frame = one_frame(s["mp4"])
    assert frame.shape == (VIEW, VIEW, 3) and (meta["width"], meta["height"]) == (VIEW, VIEW)
    err = np.abs(frame.astype(float) - b).mean()
    assert err < 6, err  # the target view, through one H.264 intra frame
    assert np.abs(frame.astype(float) - a).mean() > 4 * err  # ... and not the reference view
    ref = np.array(__import__("PIL.Image").Image.open(io.BytesIO(s["ref_0.jpg"])).convert("RGB"))
    assert np.abs(ref.astype(float) - a).mean() < 4
    back = json.loads(samples["s200k_train-00000_g0_0_10"]["json"])
    assert back["caption"] == rows[0]["description"]["description_0"]
    assert json.loads(samples["s200k_train-00000_g0_1_01"]["json"])["primary_scenario"] == "animals"

    from curation.inspect import validate

    assert validate(str(out)) == 0  # the curation's own shard checker finds nothing wrong


def test_subjects200k_quality_threshold_and_category_source():
    """Every quality score must reach min_quality: a row whose lowest score is one below is rejected, one at
    the threshold is kept. The dataset's category stands unless curation.parsing's category rule fires."""
    rows = {q: s200k_row("coffee", "red bus", "Animal", "a red bus", "the red bus", q=q) for q in (3, 4, 5)}
    params = ip.ImagePairParams()
    assert params.min_quality == 5  # the dataset card's filter
    for q in (3, 4):
        with pytest.raises(ip.Rejected) as e:
            ip.subjects200k_pairs(rows[q], f"r{q}", params)
        assert e.value.reason == "low_quality", q
    pairs = ip.subjects200k_pairs(rows[5], "r5", params)
    assert len(pairs) == 2
    assert len(ip.subjects200k_pairs(rows[4], "r4", ip.ImagePairParams(min_quality=4))) == 2
    # "bus" is a rule noun (a product); the dataset said Animal: the rule fires and says so
    assert pairs[0].subjects[0]["category"] == "product" and pairs[0].subjects[0]["category_source"] == "rule"
    assert ip.subject_category("tabby cat", "Animal") == ("animal", "dataset")  # "cat" is no rule noun


def test_a_truncated_shard_makes_its_partition_rewritten(tmp_path):
    """The resume check compares each shard's size with its record: a shard cut short (a copy interrupted,
    a full disk) is not kept, its partition is written again, whole."""
    from curation.shards import sha256_file

    src = write_s200k(tmp_path / "a.parquet", good_rows() * 3, row_group_size=2)  # 3 partitions
    out = tmp_path / "shards"
    first = write_image_pair_shards("subjects200k", str(src), out, {"maxcount": 3})
    victim = out / first["shards"][2]["name"]  # partition 1's first shard
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    again = write_image_pair_shards("subjects200k", str(src), out, {"maxcount": 3})
    assert again["partitions_kept"] == 2 and again["shards"] == first["shards"]
    assert victim.read_bytes() == data and sha256_file(victim) == first["shards"][2]["sha256"]
    assert len(read_samples(out)) == first["total_samples"] == 12


def test_partitions_resume_and_stale_shards(tmp_path):
    rows = good_rows() * 3  # 6 rows in 3 row groups of 2 -> 3 partitions
    src = write_s200k(tmp_path / "a.parquet", rows, row_group_size=2)
    out = tmp_path / "shards"
    first = write_image_pair_shards("subjects200k", str(src), out, {"maxcount": 3})
    names = [s["name"] for s in first["shards"]]
    # 4 samples per partition, at most 3 per shard: two shards per partition, named by partition
    assert names == [shard_name(p, q) for p in range(3) for q in range(2)]
    assert first["partitions_kept"] == 0 and first["total_samples"] == 12
    again = write_image_pair_shards("subjects200k", str(src), out, {"maxcount": 3})
    assert again["partitions_kept"] == 3 and again["shards"] == first["shards"]
    # other params: every partition is rewritten; the shards the new plan does not have are gone
    other = write_image_pair_shards(
        "subjects200k", str(src), out, {"maxcount": 3, "both_directions": False}
    )
    assert other["partitions_kept"] == 0 and other["total_samples"] == 6
    assert sorted(p.name for p in out.glob("shard-*.tar")) == [s["name"] for s in other["shards"]]


def test_omnigen_jsonl_folder(tmp_path):
    imgs = tmp_path / "images"
    imgs.mkdir()
    (a, b), (c, d) = views()["astronaut"], views()["chelsea"]
    for name, img in (("woman.png", a), ("woman2.png", b), ("cat.png", c), ("both.png", d)):
        (imgs / name).write_bytes(_png(img))
    rows = [
        {
            "task_type": "subject",
            "instruction": "<img><|image_1|></img> waves at the camera.",
            "input_images": ["woman.png"],
            "output_image": "woman2.png",
        },
        {
            "task_type": "subject",
            "instruction": "<img><|image_1|></img> sits beside <img><|image_2|></img>.",
            "input_images": ["woman.png", "cat.png"],
            "output_image": "both.png",
        },
        {
            "task_type": "text_to_image",
            "instruction": "A white cat.",
            "input_images": [],
            "output_image": "cat.png",
        },
        {
            "task_type": "subject",
            "instruction": "<img><|image_1|></img> escapes.",
            "input_images": ["../outside.png"],
            "output_image": "cat.png",
        },
        {
            "task_type": "subject",
            "instruction": "a missing file <img><|image_1|></img>",
            "input_images": ["nope.png"],
            "output_image": "cat.png",
        },
    ]
    jl = tmp_path / "omnigen.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    out = tmp_path / "shards"
    index = write_image_pair_shards("omnigen", str(jl), out, images_dir=str(imgs))
    assert index["total_samples"] == 2
    assert index["rejections"] == {
        "image_pairs:bad_path": 1,
        "image_pairs:bad_row": 1,
        "image_pairs:missing_image": 1,
        "image_pairs:no_reference": 1,
    }
    by_caption = {s["txt"].decode(): s for s in read_samples(out).values()}
    two = by_caption["reference image 1 sits beside reference image 2."]
    meta = json.loads(two["json"])
    assert [k for k in two if k.startswith("ref_")] == ["ref_0.jpg", "ref_1.jpg"]
    assert meta["image_pair"]["instruction"] == rows[1]["instruction"] and meta["n_subjects"] == 2
    assert np.abs(one_frame(two["mp4"]).astype(float) - d).mean() < 6


def test_omnigen_jsonl_partitions_split_lines_exactly_once(tmp_path):
    """Byte-range partitions of a JSONL: every line is read by exactly one partition."""
    jl = tmp_path / "x.jsonl"
    lines = [json.dumps({"i": i, "pad": "x" * (i % 7) * 10}) for i in range(200)]
    jl.write_text("\n".join(lines) + "\n")
    size = jl.stat().st_size
    for step in (1, 37, 100, 1000, size):
        got = []
        for a in range(0, size, step):
            got += [row["i"] for _, row in ip.jsonl_rows(str(jl), a, min(size, a + step))]
        assert got == list(range(200)), step


def test_omnigen_parquet_with_image_structs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    a, b = views()["coffee"]
    img = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema(
        [
            ("task_type", pa.string()),
            ("instruction", pa.string()),
            ("input_images", pa.list_(img)),
            ("output_image", img),
        ]
    )
    rows = [
        {
            "task_type": "subject",
            "instruction": "A latte like <img><|image_1|></img> on a table.",
            "input_images": [{"bytes": _png(a), "path": None}],
            "output_image": {"bytes": _png(b), "path": None},
        }
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "x.parquet")
    index = write_image_pair_shards("omnigen", str(tmp_path / "x.parquet"), tmp_path / "shards")
    (s,) = read_samples(tmp_path / "shards").values()
    assert index["total_samples"] == 1 and s["txt"].decode() == "A latte like reference image 1 on a table."
    assert json.loads(s["json"])["scenarios"] == ["objects"]


def test_cli_reports_a_missing_source(tmp_path, capsys):
    from curation.image_pairs import main

    assert (
        main(["--source", "subjects200k", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
        == 2
    )
    assert "does not exist" in capsys.readouterr().err


@pytest.fixture(scope="module")
def ray_local():
    import os

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # a local cluster on 127.0.0.1 only
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_runner_writes_the_same_shards(tmp_path, ray_local):
    src = write_s200k(tmp_path / "a.parquet", good_rows() * 2, row_group_size=2)
    seq = write_image_pair_shards("subjects200k", str(src), tmp_path / "seq", {"limit": 3})
    dist = write_image_pair_shards("subjects200k", str(src), tmp_path / "ray", {"limit": 3}, runner="ray")
    assert seq["rows"] == dist["rows"] == 3 and seq["total_samples"] == 6  # the limit spans row groups
    assert seq["shards"] == dist["shards"]  # same names, sizes and sha256
