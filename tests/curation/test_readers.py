"""Ecosystem clients read a shards folder as the global phase leaves it (index and records are dot names):
plain webdataset, Ray Data ``read_webdataset(folder)`` (local and s3:// with the store's filesystem), and HF
``datasets`` ``load_dataset("webdataset", data_dir=folder)`` with the mp4 decoded (torchcodec)."""

from __future__ import annotations

import json
import os

import pytest

from curation.shards import INDEX_FILE, RECORDS_DIR, read_index
from tests.curation.test_shards import make_rows, write


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("readers")
    # one subject per clip: every sample has the same members. Ray Data (decoding images into one tensor
    # column) and HF datasets (one schema from the first 5 samples) need that; samples with 1-4 references
    # read with webdataset, or with Ray Data's decoder=None.
    summary = write(d, make_rows(str(d), photos=["cat", "man", "cup"], two_subjects=False), maxcount=4)
    assert (d / "shards" / INDEX_FILE).exists() and (d / "shards" / RECORDS_DIR).is_dir()
    return d / "shards", summary


@pytest.fixture(scope="module")
def ray_local():
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_data_reads_the_shards_folder(shards, ray_local):
    d, summary = shards
    rows = ray_local.data.read_webdataset(str(d)).take_all()
    assert len(rows) == summary["triplets_out"] == 12
    r = next(x for x in rows if x["__key__"] == "v00-0000_cross_pair0")
    assert r["mp4"][4:8] == b"ftyp" and r["ref_0.jpg"].shape == (48, 40, 3)  # Ray decodes the JPEG
    meta = r["json"] if isinstance(r["json"], dict) else json.loads(r["json"])
    assert meta["pair_type"] == "cross_pair" and meta["subjects"][0]["ref"]["video_id"] == "v03"


def test_hf_datasets_reads_the_folder_and_decodes_the_mp4(shards):
    import datasets

    d, summary = shards
    ds = datasets.load_dataset("webdataset", data_dir=str(d), split="train")
    assert len(ds) == summary["triplets_out"]
    assert isinstance(ds.features["mp4"], datasets.Video) and isinstance(
        ds.features["ref_0.jpg"], datasets.Image
    )
    ex = ds[0]
    frame = ex["mp4"].get_frame_at(0)  # a torchcodec VideoDecoder
    assert tuple(frame.data.shape) == (3, 64, 96)
    assert ex["ref_0.jpg"].size == (40, 48) and ex["json"]["key"] == ex["__key__"]


def test_ray_data_and_webdataset_read_the_shards_from_s3(tmp_path, s3_public_bucket, ray_local):
    s3_bucket = s3_public_bucket  # its shards are read over plain http too
    import webdataset as wds

    from curation.storage import Store

    rows = make_rows(str(tmp_path))  # 1-2 references per sample
    store = Store(f"{s3_bucket}/run")
    for sub in ("clips", "refs"):
        for dirpath, _, files in os.walk(tmp_path / sub):
            for f in files:
                store.put_file(os.path.relpath(os.path.join(dirpath, f), tmp_path), os.path.join(dirpath, f))
    summary = write(tmp_path, rows, store=store, maxcount=4)
    got = ray_local.data.read_webdataset(store.path("shards"), filesystem=store.fs, decoder=None).take_all()
    assert len(got) == summary["triplets_out"] == 12
    two = next(r for r in got if r["__key__"] == "v02-0000_cross_pair0")
    assert two["ref_1.jpg"][:2] == b"\xff\xd8" and two["mp4"][4:8] == b"ftyp"
    urls = [
        f"{os.environ['AWS_ENDPOINT_URL']}/{store.path('shards/' + e['name'])}"
        for e in read_index(store.uri_of("shards"))["shards"]
    ]
    assert len(list(wds.WebDataset(urls, shardshuffle=False))) == 12
