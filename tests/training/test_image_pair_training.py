"""Image pairs in training: Subjects200K Parquet (real schema, real photos) -> image_pair shards -> the loader
mixes them with video shards at the configured ratio -> one training step of each model family."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from curation.image_pairs import write_image_pair_shards
from curation.shards import iter_tar_samples, list_shards, read_index
from tests.curation.test_image_pairs import good_rows, s200k_row, write_s200k
from training.config import ConfigError, load_config
from training.data import IMAGE_PAIR, StreamSpec, TripletStream, resize_center_crop

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pair_shards(tmp_path_factory) -> Path:
    """6 image-pair samples (astronaut, cat, coffee cup; both directions), 96x96 targets."""
    tmp = tmp_path_factory.mktemp("pairs")
    rows = good_rows() + [
        s200k_row("coffee", "coffee cup", "Product", "A cup of latte on a saucer.", "The latte from above.")
    ]
    src = write_s200k(tmp / "s200k" / "train-00000.parquet", rows)
    index = write_image_pair_shards("subjects200k", str(src), tmp / "shards", {"maxcount": 4})
    assert index["total_samples"] == 6 and len(index["shards"]) == 2
    return tmp / "shards"


def _spec(videos: Path, pairs: Path | None, ratio: float, **kw) -> StreamSpec:
    return StreamSpec(
        urls=list_shards(videos),
        buckets=[[32, 64], [48, 48]],
        num_frames=3,
        fps=8.0,
        batch_size=2,
        seed=0,
        shuffle_buffer=8,
        shuffle_initial=4,
        image_urls=list_shards(pairs) if pairs else None,
        image_ratio=ratio,
        **kw,
    )


def _kind(batch) -> str:
    kinds = {m["pair_type"] for m in batch["meta"]}
    assert len(kinds) == 1 or IMAGE_PAIR not in kinds, kinds  # never a mixed batch
    return "image" if IMAGE_PAIR in kinds else "video"


def test_loader_mixes_image_pairs_as_one_frame_batches(triplet_shards, pair_shards):
    stream = TripletStream(_spec(triplet_shards, pair_shards, 0.5))
    batches = list(itertools.islice(stream.stream(0), 16))
    kinds = [_kind(b) for b in batches]
    assert {"image", "video"} <= set(kinds)
    targets = {
        k: s for e in read_index(pair_shards)["shards"] for k, s in iter_tar_samples(pair_shards / e["name"])
    }
    for b, kind in zip(batches, kinds):
        frames = b["video"].shape[2]  # (B, 3, T, H, W)
        assert frames == (1 if kind == "image" else 3)
        if kind == "image":
            assert b["bucket"] == [48, 48]  # square photos
            for i, key in enumerate(b["keys"]):
                # the batch holds exactly the target photo, resized like any clip
                from curation.inspect import decode_video

                _, _, frame = decode_video(targets[key]["mp4"], 1)
                want = resize_center_crop(frame, (48, 48))[:, 0]
                assert torch.equal(b["video"][i, :, 0], want)
                assert b["ref_mask"][i].sum() == 1 and b["meta"][i]["frame_indices"] == [0]
    # deterministic, and a resumed stream (skip k groups) continues exactly where the first one was
    again = [b["keys"] for b in itertools.islice(TripletStream(stream.spec).stream(0), 16)]
    assert again == [b["keys"] for b in batches]
    resumed = [b["keys"] for b in itertools.islice(TripletStream(stream.spec).stream(0, skip=9), 7)]
    assert resumed == [b["keys"] for b in batches[9:]]


def test_ratio_sets_the_share_of_image_pair_samples(triplet_shards, pair_shards):
    def share(ratio: float, n: int = 30) -> float:
        bs = list(itertools.islice(TripletStream(_spec(triplet_shards, pair_shards, ratio)).stream(0), n))
        return sum(_kind(b) == "image" for b in bs) / n

    assert share(0.0) == 0.0
    assert share(1.0) == 1.0
    assert 0.1 <= share(0.25) <= 0.45  # a seeded draw per sample: close to the ratio, not exact


def test_config_checks_the_image_pair_settings(tmp_path):
    base = REPO / "configs" / "train_tiny.yaml"
    with pytest.raises(ConfigError, match="image_pairs"):
        load_config(base, {"data.image_pair_ratio": 0.2})
    with pytest.raises(ConfigError, match="image_pair_ratio"):
        load_config(base, {"data.image_pairs": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        load_config(base, {"data.image_pairs": str(tmp_path), "data.image_pair_ratio": 1.5})
    # latent shards read the image pairs precomputed too, never the raw ones beside them
    with pytest.raises(ConfigError, match="image_pair_latents"):
        load_config(
            base,
            {"data.image_pairs": str(tmp_path), "data.image_pair_ratio": 0.2, "data.latent_shards": "x"},
        )
    with pytest.raises(ConfigError, match="image_pair_latents"):
        load_config(base, {"data.image_pair_ratio": 0.2, "data.latent_shards": "x"})
    with pytest.raises(ConfigError, match="latent_shards"):
        load_config(base, {"data.image_pair_latents": "y", "data.image_pair_ratio": 0.2})
    with pytest.raises(ConfigError, match="image_pair_ratio"):
        load_config(base, {"data.image_pair_latents": "y", "data.latent_shards": "x"})
    cfg = load_config(
        base, {"data.image_pair_latents": "y", "data.latent_shards": "x", "data.image_pair_ratio": 0.2}
    )
    assert cfg.data.image_pair_latents == "y"


def test_phantom_wan_phases_put_image_pairs_in_their_square_buckets():
    """The 256p/480p/720p schedule: a square photo goes to each phase's square bucket, under its own tag."""
    from training.data import choose_bucket
    from training.precompute import phase_tag

    cfg = load_config(
        REPO / "configs" / "phantom_wan_14b.yaml",
        {"data.latent_shards": "v", "data.image_pair_latents": "p", "data.image_pair_ratio": 0.2},
    )
    squares = [p.buckets[choose_bucket(1024, 1024, p.buckets)] for p in cfg.phases]
    assert squares == [[336, 336], [624, 624], [960, 960]]
    assert len({phase_tag(cfg, i) for i in range(len(cfg.phases))}) == 3


def _one_step(cfg, ctx=None) -> dict:
    from training.loop import train

    out = train(cfg, ctx, stop_at_step=1)
    assert out["step"] == 1 and np.isfinite(out["losses"][0])
    # one optimizer step over 4 micro-batches: both kinds went through the same forward and backward
    assert 1 <= out["image_pair_batches"] <= 3, out["image_pair_batches"]
    return out


def _tiny_mix(tmp_path, triplet_shards, pair_shards):
    return load_config(
        REPO / "configs" / "train_tiny.yaml",
        {
            "data.shards": str(triplet_shards),
            "data.image_pairs": str(pair_shards),
            "data.image_pair_ratio": 0.5,
            "data.num_workers": 0,
            "optim.grad_accum": 4,
            "log.out_dir": str(tmp_path / "run"),
            "log.tensorboard": False,
            "log.sample_every": 0,
        },
    )


def test_one_step_of_train_tiny_on_videos_and_image_pairs(tmp_path, triplet_shards, pair_shards):
    from training import checkpoint as ckpt

    _one_step(_tiny_mix(tmp_path, triplet_shards, pair_shards))
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints"))
    assert state["step"] == 1 and state["config"]["data"]["image_pair_ratio"] == 0.5


@pytest.mark.gpu
def test_one_step_on_the_mix_on_gpu(tmp_path, triplet_shards, pair_shards):
    """The CUDA path (bf16 autocast) on one-frame and video batches in one step."""
    from training.loop import Context

    cfg = _tiny_mix(tmp_path, triplet_shards, pair_shards)
    cfg.scaling.use_gpu = True
    _one_step(cfg, Context(device=torch.device("cuda")))


@pytest.mark.slow
def test_one_step_of_phantom_wan_tiny_on_videos_and_image_pairs(tmp_path, triplet_shards, pair_shards):
    """The causal Wan VAE encodes a one-frame target to one latent frame; the references follow it."""
    from tests.training.wan_assets import tiny_wan_config, write_tiny_wan_assets

    assets = write_tiny_wan_assets(tmp_path / "assets")
    data = tiny_wan_config(assets, triplet_shards, tmp_path / "wan")
    path = tmp_path / "wan.yaml"
    path.write_text(yaml.safe_dump(data))
    cfg = load_config(
        path,
        {
            "data.image_pairs": str(pair_shards),
            "data.image_pair_ratio": 0.5,
            "data.num_workers": 0,
            "optim.grad_accum": 4,
        },
    )
    _one_step(cfg)


def test_precomputed_image_pairs_train_like_raw_ones(tmp_path, triplet_shards, pair_shards):
    """Videos and image pairs both precomputed: over two phases (bucket sets and frame counts change), the
    same batches at the same ratio and the same losses as the raw shards, and no encoder is ever built."""
    from training.loop import train
    from training.precompute import precompute

    def cfg(name: str, **over):
        c = _tiny_mix(tmp_path / name, triplet_shards, pair_shards)
        c.phases[0].steps, c.phases[0].batch_size = 2, 2
        c.phases[1].steps, c.phases[1].num_frames = 2, 3
        c.optim.grad_accum = 2
        for k, v in over.items():
            setattr(c.data, k, v)
        return c

    raw = train(cfg("raw"))
    for src, out in ((triplet_shards, "video_lat"), (pair_shards, "pair_lat")):
        stats = precompute(cfg("pre"), str(src), str(tmp_path / out), use_ray=False)
        assert stats["skipped"] + stats["errors"] == 0
    assert stats == {"shards": 2, "samples": 6, "skipped": 0, "errors": 0}
    lat = train(
        cfg("lat", latent_shards=str(tmp_path / "video_lat"), image_pair_latents=str(tmp_path / "pair_lat"))
    )
    assert not lat["encoders_built"] and raw["encoders_built"]
    assert 1 <= raw["image_pair_batches"] <= 7 and lat["image_pair_batches"] == raw["image_pair_batches"]
    assert len(raw["losses"]) == 4
    assert lat["losses"] == pytest.approx(raw["losses"], rel=1e-5)


@pytest.mark.slow
def test_precomputed_image_pairs_train_like_raw_ones_phantom_wan(tmp_path, triplet_shards, pair_shards):
    """The same on Phantom-Wan tiny: the causal Wan VAE's one-frame latents come from the precompute."""
    from tests.training.wan_assets import tiny_wan_config, write_tiny_wan_assets
    from training.loop import train
    from training.precompute import precompute

    assets = write_tiny_wan_assets(tmp_path / "assets")

    def cfg(name: str, **over):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(tiny_wan_config(assets, triplet_shards, tmp_path / name)))
        base = {"data.num_workers": 0, "data.image_pair_ratio": 0.5, "optim.grad_accum": 2}
        c = load_config(path, {**base, **over})
        c.phases[0].steps = 2
        return c

    raw = train(cfg("raw", **{"data.image_pairs": str(pair_shards)}))
    pre = cfg("pre", **{"data.image_pairs": str(pair_shards)})
    for src, out in ((triplet_shards, "video_lat"), (pair_shards, "pair_lat")):
        precompute(pre, str(src), str(tmp_path / out), use_ray=False)
    latents = {
        "data.latent_shards": str(tmp_path / "video_lat"),
        "data.image_pair_latents": str(tmp_path / "pair_lat"),
    }
    lat = train(cfg("lat", **latents))
    assert not lat["encoders_built"] and raw["image_pair_batches"] >= 1
    assert lat["image_pair_batches"] == raw["image_pair_batches"]
    assert lat["losses"] == pytest.approx(raw["losses"], rel=1e-5)
