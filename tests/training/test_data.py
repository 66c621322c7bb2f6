"""Tests for the shard loader: transforms, bucketing, corrupt-sample counting, resumable data position."""

from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest
import torch

from curation.shards import list_shards
from training.data import (
    CorruptTally,
    DataPosition,
    StreamSpec,
    TripletStream,
    build_loader,
    choose_bucket,
    epoch_shards,
    frame_indices,
    letterbox,
    resize_center_crop,
)
from training.encode import EncodingCache

BUCKETS = [[32, 64], [48, 48]]


def _spec(shards, **kw) -> StreamSpec:
    args = dict(
        urls=list_shards(shards),
        buckets=BUCKETS,
        num_frames=3,
        fps=8.0,
        batch_size=2,
        seed=0,
        shuffle_buffer=8,
        shuffle_initial=4,
    )
    args.update(kw)
    return StreamSpec(**args)


def test_epoch_shards_split_disjoint_and_resampled():
    urls = [f"s{i}" for i in range(8)]
    # 2 ranks x 2 streams: one epoch covers every shard exactly once
    got = [epoch_shards(urls, 0, 0, r, 2, s, 2) for r in range(2) for s in range(2)]
    assert sorted(itertools.chain(*got)) == sorted(urls)
    assert epoch_shards(urls, 0, 1, 0, 2, 0, 2) != got[0]  # reshuffled per epoch
    # more streams than shards: every stream still gets a shard
    few = ["a", "b"]
    assert all(len(epoch_shards(few, 0, 0, r, 3, 0, 1)) == 1 for r in range(3))


def test_choose_bucket_and_frame_indices():
    assert choose_bucket(640, 272, BUCKETS) == 0  # bikes, wide
    assert choose_bucket(176, 144, BUCKETS) == 1  # carphone, near square
    idx = frame_indices(100, 25.0, 4, 5.0, random.Random(0))
    assert np.all(np.diff(idx) == 5)  # 25 fps -> 5 fps: every 5th frame
    short = frame_indices(6, 25.0, 4, 5.0, random.Random(0))  # too short: spread over the clip
    assert short[0] == 0 and short[-1] == 5 and len(short) == 4


def test_resize_center_crop_and_letterbox():
    frames = np.zeros((2, 30, 100, 3), np.uint8)
    frames[:, :, 45:55] = 255  # a white vertical bar in the middle
    out = resize_center_crop(frames, (32, 32))
    assert out.shape == (3, 2, 32, 32) and out.dtype == torch.uint8
    assert out[:, :, :, 16].float().mean() > 200 and out[:, :, :, 0].float().mean() < 5  # centered crop
    ref = letterbox(np.zeros((20, 40, 3), np.uint8), (32, 32))
    assert ref.shape == (3, 32, 32)
    assert ref[:, 0].float().mean() == 255 and ref[:, 16].float().mean() == 0  # padded top, image middle


def test_loader_batches_from_real_shards(triplet_shards):
    loader = build_loader(_spec(triplet_shards, num_streams=2), num_workers=2)
    seen_buckets = set()
    for batch in itertools.islice(loader, 8):
        b, _, t, h, w = batch["video"].shape
        assert (b, t) == (2, 3) and [h, w] == batch["bucket"]
        assert batch["video"].dtype == torch.uint8 and batch["video"].float().std() > 5  # real pixels
        n = batch["refs"].shape[1]
        assert batch["refs"].shape == (2, n, 3, h, w) and batch["ref_mask"].shape == (2, n)
        assert batch["ref_mask"][:, 0].all() and batch["ref_mask"].sum(1).max() == n  # padded to max
        for key, caption in zip(batch["keys"], batch["captions"]):
            wide = key.startswith("bikes")
            assert [h, w] == BUCKETS[0 if wide else 1]  # each clip in its aspect bucket
            assert ("street" in caption) == wide
        seen_buckets.add((h, w))
    assert seen_buckets == {(32, 64), (48, 48)}


def test_corrupt_samples_skipped_and_counted(corrupt_shards):
    loader = build_loader(_spec(corrupt_shards, num_streams=1), num_workers=1)
    tally = CorruptTally()
    keys = []
    for batch in itertools.islice(loader, 30):  # 60 samples: every shard read at least twice
        tally.update(batch)
        keys += batch["keys"]
    totals = tally.totals()
    assert all(totals.get(reason, 0) >= 1 for reason in ("bad_mp4", "missing:txt", "bad_ref"))
    broken = {"00003", "00008", "00013"}  # conftest breaks samples 3, 8, 13
    assert not broken & {k.rsplit("-", 1)[1] for k in keys}
    assert len(set(keys)) == 21  # every good sample came through


def test_resume_continues_the_exact_stream(corrupt_shards):
    """Batches after a resume from DataPosition equal those of the uninterrupted stream (2 workers)."""
    spec = _spec(corrupt_shards, num_streams=2)
    full, pos, tally = [], DataPosition(2), CorruptTally()
    saved = None
    for i, batch in enumerate(itertools.islice(build_loader(spec, num_workers=2), 14)):
        full.append(batch["keys"])
        pos.update(batch)
        tally.update(batch)
        if i == 6:  # "checkpoint" after 7 batches: an odd count, so the worker rotation matters
            saved = (pos.state_dict(), tally.state_dict())
    resumed_pos, resumed_tally = DataPosition(2), CorruptTally()
    resumed_pos.load_state_dict(saved[0])
    resumed_tally.load_state_dict(saved[1])
    spec2 = _spec(
        corrupt_shards,
        num_streams=2,
        start_batch=resumed_pos.consumed,
        stream_skip=resumed_pos.next_group,
    )
    rest = []
    for batch in itertools.islice(build_loader(spec2, num_workers=2), 7):
        rest.append(batch["keys"])
        resumed_pos.update(batch)
        resumed_tally.update(batch)
    assert rest == full[7:]
    assert resumed_pos.state_dict() == pos.state_dict()
    assert resumed_tally.totals() == tally.totals()


def test_ranks_read_different_data(triplet_shards):
    keys = []
    for rank in range(2):
        spec = _spec(triplet_shards, rank=rank, world_size=2, num_streams=1)
        keys.append({k for b in itertools.islice(build_loader(spec, num_workers=0), 3) for k in b["keys"]})
    assert keys[0] and keys[1] and not keys[0] & keys[1]


def test_a_truncated_shard_is_counted_and_its_samples_before_the_break_kept(tmp_path, triplet_shards):
    import tarfile
    from pathlib import Path

    from curation.shards import iter_tar_samples
    from training.data import CorruptCounter

    urls = list_shards(triplet_shards)
    with tarfile.open(urls[0]) as tf:
        members = tf.getmembers()
    big = max(members[4:], key=lambda m: m.size)  # a clip past the first sample
    cut = tmp_path / "shard-000000.tar"
    cut.write_bytes(Path(urls[0]).read_bytes()[: big.offset_data + big.size // 2])
    kept = []
    with pytest.raises(tarfile.ReadError):
        kept.extend(k for k, _ in iter_tar_samples(cut))
    others = {k for u in urls[1:] for k, _ in iter_tar_samples(u)}
    assert kept and len(others) == 18
    counter = CorruptCounter()
    raw = TripletStream(_spec(triplet_shards))._raw_from([str(cut), *urls[1:]], 0, 0, counter)
    # one epoch (every shard once), and the first sample of the next, so the broken shard has been read past
    epoch = list(itertools.islice(raw, len(kept) + len(others) + 1))[:-1]
    assert {s["__key__"] for s in epoch} == set(kept) | others
    assert counter.counts == {"tar:ReadError": 1}
    assert all(s["__url__"] in (str(cut), *urls[1:]) and "mp4" in s for s in epoch)


def test_encoding_cache_roundtrip(tmp_path):
    cache = EncodingCache(tmp_path, "sig-a")
    path = cache.path("clip-1", [32, 64], [0, 3, 6], 2)
    assert cache.load(path) is None
    tensors = {"latents": torch.randn(12, 3, 16, 32), "text": torch.randn(7, 384)}
    cache.save(path, tensors)
    got = cache.load(path)
    assert torch.equal(got["latents"], tensors["latents"]) and (cache.hits, cache.misses) == (1, 1)
    assert EncodingCache(tmp_path, "sig-b").path("clip-1", [32, 64], [0, 3, 6], 2) != path
    assert cache.path("clip-1", [32, 64], [1, 4, 7], 2) != path  # other frames, other entry
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:  # a safetensors file, not a pickle
        assert sorted(f.keys()) == ["latents", "text"]


def test_bucket_from_mp4_header_when_json_has_no_size(triplet_shards):
    from tests.training.conftest import _clips
    from training.data import CorruptCounter, TripletStream

    clip = _clips()[0]  # bikes: wide
    meta = {k: v for k, v in clip["meta"].items() if k not in ("width", "height")}
    base = {"__key__": "k", "mp4": clip["mp4"], "txt": b"x", "ref_0.jpg": b""}
    samples = [
        dict(base, json=json.dumps(meta).encode()),
        dict(base, json=b"{not json"),
        dict(base, json=json.dumps(meta).encode(), mp4=b"garbage"),
    ]
    counter = CorruptCounter()
    out = list(TripletStream(_spec(triplet_shards)).with_meta(iter(samples), counter))
    assert [s["_bucket"] for s in out] == [0]
    assert counter.counts == {"bad_json": 1, "bad_mp4": 1}


def test_all_broken_data_fails_clearly_instead_of_hanging(tmp_path, corrupt_shards):
    import webdataset as wds

    good = next(iter(wds.WebDataset(list_shards(corrupt_shards), shardshuffle=False)))
    fields = {k: v for k, v in good.items() if not k.startswith("__")}
    broken = {
        "no_caption": {k: v for k, v in fields.items() if k != "txt"},  # fails on metadata
        "bad_video": dict(fields, mp4=b"not a video"),  # fails on decoding
    }
    for name, sample in broken.items():
        (tmp_path / name).mkdir()
        with wds.ShardWriter(str(tmp_path / name / "shard-%06d.tar"), maxcount=10, verbose=0) as sink:
            for i in range(3):
                sink.write(dict(sample, __key__=f"{name}{i}"))
        stream = TripletStream(_spec(tmp_path / name, max_consecutive_bad=20)).stream(0)
        with pytest.raises(RuntimeError, match="in a row"):
            next(stream)


def test_window_starts_on_a_keyframe():
    """With the clip's keyframes the sampled window starts on one, so nothing before it is decoded."""
    keys = [0, 25, 50, 75]
    starts = {frame_indices(100, 25.0, 5, 8.0, random.Random(seed), keys)[0] for seed in range(40)}
    assert starts <= set(keys) and len(starts) > 1
    free = {frame_indices(100, 25.0, 5, 8.0, random.Random(seed))[0] for seed in range(40)}
    assert not free <= set(keys)
    # a keyframe too late for the window is never chosen
    assert frame_indices(100, 25.0, 5, 8.0, random.Random(1), [0, 95])[0] == 0
