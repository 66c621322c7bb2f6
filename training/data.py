"""WebDataset loader of triplet shards: deterministic, resumable streams of bucketed triplet batches.

Shards are local paths or store URIs (``s3://bucket/run/shards/shard-000000.tar``), read by curation.shards
(a remote shard is streamed, never copied to disk)."""

from __future__ import annotations

import io
import itertools
import json
import logging
import math
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image

from curation.shards import iter_tar_samples

log = logging.getLogger(__name__)

REQUIRED_KEYS = ("mp4", "txt", "json")
# Paired image data (curation.sources.image_pairs, paper §3.1: Subject200k, OmniGen): a one-frame clip whose
# target is a photo; it trains as a one-frame video (one latent frame) in batches of its own.
IMAGE_PAIR = "image_pair"
# The image-pair shard order is shuffled with its own seed, apart from the video shards'.
IMAGE_SEED_OFFSET = 104729
# Consecutive epochs without one readable sample before a stream gives up (all its shards are bad).
MAX_EMPTY_EPOCHS = 3


# ----------------------------------------------------------------------------- shard lists


def epoch_shards(
    urls: list[str], seed: int, epoch: int, rank: int, world_size: int, stream: int, num_streams: int
) -> list[str]:
    """The shards one (rank, stream) reads in one epoch: a seeded shuffle, split across all streams.

    With fewer shards than streams, a stream gets one shard anyway (resampled, rotating by epoch), so
    every stream always yields and DDP ranks never starve.
    """
    order = list(urls)
    random.Random(f"shards-{seed}-{epoch}").shuffle(order)
    slot = rank * num_streams + stream
    mine = order[slot :: world_size * num_streams]
    return mine or [order[(slot + epoch) % len(order)]]


# ----------------------------------------------------------------------------- pure transforms


def choose_bucket(width: int, height: int, buckets: list[list[int]]) -> int:
    """Index of the [h, w] bucket whose aspect ratio is closest (in log space) to width/height."""
    aspect = math.log(width / height)
    return min(range(len(buckets)), key=lambda i: abs(aspect - math.log(buckets[i][1] / buckets[i][0])))


def frame_indices(
    num_src: int,
    src_fps: float,
    num_frames: int,
    target_fps: float,
    rng: random.Random,
    keyframes: list[int] | None = None,
) -> list[int]:
    """`num_frames` indices at `target_fps` from a clip of `num_src` frames at `src_fps`.

    A clip too short for the span is sampled evenly over its whole length instead (a lower fps). Given
    the clip's `keyframes`, the window starts on a random keyframe that leaves room for it: the decoder
    then never decodes frames before the window, which was most of the loader's cost (the curation
    pipeline writes a keyframe every second).
    """
    step = src_fps / target_fps if src_fps > 0 else 1.0
    span = (num_frames - 1) * step
    if span > num_src - 1:
        step = (num_src - 1) / max(num_frames - 1, 1)
        start = 0.0
    elif keyframes and (starts := [k for k in keyframes if 0 <= k <= num_src - 1 - span]):
        start = float(rng.choice(starts))
    else:
        start = rng.uniform(0.0, num_src - 1 - span)
    return [min(num_src - 1, round(start + i * step)) for i in range(num_frames)]


def resize_center_crop(frames: np.ndarray, out_hw: tuple[int, int]) -> torch.Tensor:
    """(T, H, W, 3) uint8 frames -> (3, T, h, w) uint8, scaled to cover (h, w) then center-cropped."""
    out_h, out_w = out_hw
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # (T, 3, H, W)
    src_h, src_w = x.shape[-2:]
    scale = max(out_h / src_h, out_w / src_w)
    new_h, new_w = max(out_h, math.ceil(src_h * scale - 1e-6)), max(out_w, math.ceil(src_w * scale - 1e-6))
    x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (new_h - out_h) // 2, (new_w - out_w) // 2
    x = x[:, :, top : top + out_h, left : left + out_w]
    return x.round().clamp(0, 255).to(torch.uint8).permute(1, 0, 2, 3).contiguous()  # (3, T, h, w)


def letterbox(image: np.ndarray, out_hw: tuple[int, int], fill: int = 255) -> torch.Tensor:
    """(H, W, 3) uint8 reference -> (3, h, w) uint8: whole subject kept, padded with `fill` (white)."""
    out_h, out_w = out_hw
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()  # (1, 3, H, W)
    src_h, src_w = x.shape[-2:]
    scale = min(out_h / src_h, out_w / src_w)
    new_h, new_w = max(1, round(src_h * scale)), max(1, round(src_w * scale))
    x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    canvas = torch.full((3, out_h, out_w), float(fill))
    top, left = (out_h - new_h) // 2, (out_w - new_w) // 2
    canvas[:, top : top + new_h, left : left + new_w] = x[0]
    return canvas.round().clamp(0, 255).to(torch.uint8)


def decode_clip(
    mp4_bytes: bytes, num_frames: int, target_fps: float, rng: random.Random
) -> tuple[np.ndarray, list[int]]:
    """H.264 bytes -> ((num_frames, H, W, 3) uint8 at target_fps, source frame indices); decord, in memory."""
    import decord  # imported here: decord starts threads, keep it out of processes that never decode

    vr = decord.VideoReader(io.BytesIO(mp4_bytes), num_threads=1)
    num_src = len(vr)
    if num_src == 0:
        raise ValueError("clip has no frames")
    keyframes = [int(k) for k in vr.get_key_indices()]
    idx = frame_indices(num_src, float(vr.get_avg_fps()), num_frames, target_fps, rng, keyframes)
    return vr.get_batch(idx).asnumpy(), idx


def video_size(mp4_bytes: bytes) -> tuple[int, int]:
    """(width, height) of a clip from its container header, without decoding frames."""
    import av

    with av.open(io.BytesIO(mp4_bytes)) as container:
        ctx = container.streams.video[0].codec_context
        return int(ctx.width), int(ctx.height)


def decode_image(jpg_bytes: bytes) -> np.ndarray:
    """JPEG/PNG bytes -> (H, W, 3) uint8; a truncated or bogus file raises."""
    with Image.open(io.BytesIO(jpg_bytes)) as img:
        img.load()
        return np.array(img.convert("RGB"))


def is_one_frame(meta: dict[str, Any]) -> bool:
    """A sample that trains as one frame: an image pair, or a clip of one frame."""
    return meta.get("pair_type") == IMAGE_PAIR or meta.get("n_frames") == 1


def ref_keys(sample: dict[str, Any]) -> list[str]:
    """The sample's reference entries in order: ref_0.jpg, ref_1.jpg, ... (png accepted)."""
    keys = [k for k in sample if k.startswith("ref_") and k.rsplit(".", 1)[-1] in ("jpg", "jpeg", "png")]
    return sorted(keys, key=lambda k: int(k[4:].split(".")[0]) if k[4:].split(".")[0].isdigit() else 99)


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack decoded samples of one bucket; pad references to the batch's max count with a mask."""
    video = torch.stack([s["video"] for s in samples])  # (B, 3, T, H, W) uint8
    n_max = max(len(s["refs"]) for s in samples)
    _, h, w = samples[0]["refs"][0].shape
    refs = torch.zeros(len(samples), n_max, 3, h, w, dtype=torch.uint8)  # (B, n, 3, H, W)
    ref_mask = torch.zeros(len(samples), n_max, dtype=torch.bool)  # (B, n)
    for i, s in enumerate(samples):
        n = len(s["refs"])
        refs[i, :n] = torch.stack(s["refs"])
        ref_mask[i, :n] = True
    return {
        "video": video,
        "refs": refs,
        "ref_mask": ref_mask,
        "captions": [s["caption"] for s in samples],
        "keys": [s["key"] for s in samples],
        "meta": [s["meta"] for s in samples],
    }


def collate_latents(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch of latent-shard samples: per-sample encodings (padded later by encode_batch)."""
    n_max = max(s["n_refs"] for s in samples)
    ref_mask = torch.zeros(len(samples), n_max, dtype=torch.bool)
    for i, s in enumerate(samples):
        ref_mask[i, : s["n_refs"]] = True
    return {
        "encoded": [s["encoded"] for s in samples],
        "ref_mask": ref_mask,
        "ref_images": [s["ref_images"] for s in samples],
        "captions": [s["caption"] for s in samples],
        "keys": [s["key"] for s in samples],
        "meta": [s["meta"] for s in samples],
    }


def to_unit_range(x_u8: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float in [-1, 1] (what the VAE takes)."""
    return x_u8.float() / 127.5 - 1.0


# ----------------------------------------------------------------------------- the stream


class CorruptCounter:
    """Counts skipped samples by reason; also a webdataset handler (a bad tar member is skipped, counted)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def add(self, reason: str) -> None:
        self.counts[reason] += 1

    def handler(self, exn: Exception) -> bool:
        self.add(f"tar:{type(exn).__name__}")
        log.warning("skipping unreadable shard data: %r", exn)
        return True


@dataclass
class StreamSpec:
    """Everything one rank's loader needs; picklable so spawn-started workers get it too."""

    urls: list[str]  # shard paths or store URIs (curation.shards.list_shards)
    buckets: list[list[int]]
    num_frames: int
    fps: float
    batch_size: int
    seed: int
    rank: int = 0
    world_size: int = 1
    num_streams: int = 1
    # Data position: batches this rank consumed (fixes the worker rotation) and, per stream, how many
    # groups it has used up (a group of only corrupt samples is used up without yielding a batch).
    start_batch: int = 0
    stream_skip: list[int] | None = None
    shuffle_buffer: int = 64
    shuffle_initial: int = 16
    max_refs: int = 4
    # Unusable samples in a row before the stream stops: then the data is broken, not a few samples in it.
    max_consecutive_bad: int = 2000
    # Set when reading latent shards (training/precompute.py): the member holding this phase's encodings.
    latent_tag: str | None = None
    # Image-pair shards mixed in: each raw sample comes from them with probability image_ratio (a seeded
    # draw per sample, so the mixed order is as deterministic and resumable as the video stream alone).
    # With latent_tag set they are image-pair latent shards, read under the same tag as the videos.
    image_urls: list[str] | None = None
    image_ratio: float = 0.0


class TripletStream(torch.utils.data.IterableDataset):
    """Infinite, deterministic stream of batches for one rank.

    The rank's global batch b comes from stream b % num_streams (DataLoader worker w serves one stream,
    and DataLoader returns batches in worker order). A stream is a pure function of (seed, rank, stream),
    so a resumed run rebuilds it and skips the groups already used without decoding them: the data
    position is `DataPosition` (batches consumed + groups used per stream).
    """

    def __init__(self, spec: StreamSpec) -> None:
        super().__init__()
        self.spec = spec

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        if n_workers != self.spec.num_streams:
            raise ValueError(f"{n_workers} loader workers but num_streams={self.spec.num_streams}")
        first = self.spec.start_batch + worker
        stream = first % n_workers
        skip = self.spec.stream_skip[stream] if self.spec.stream_skip else first // n_workers
        yield from self.stream(stream, skip=skip)

    # -- stages, each a generator over the previous one

    def _raw(self, stream: int, counter: CorruptCounter) -> Iterator[dict[str, Any]]:
        s = self.spec
        videos = self._raw_from(s.urls, s.seed, stream, counter)
        if not s.image_urls or s.image_ratio <= 0:
            yield from videos
            return
        images = self._raw_from(s.image_urls, s.seed + IMAGE_SEED_OFFSET, stream, counter)
        rng = random.Random(f"mix-{s.seed}-{s.rank}-{stream}")
        while True:  # both sources are endless (epochs); a source drawn with probability 0 is never opened
            yield next(images) if rng.random() < s.image_ratio else next(videos)

    def _raw_from(
        self, urls: list[str], seed: int, stream: int, counter: CorruptCounter
    ) -> Iterator[dict[str, Any]]:
        s = self.spec
        empty_epochs = 0
        for epoch in itertools.count():
            mine = epoch_shards(urls, seed, epoch, s.rank, s.world_size, stream, s.num_streams)
            # Shard order is already a seeded per-epoch shuffle split by rank and stream: read as listed.
            n = 0
            for url in mine:
                try:
                    for key, members in iter_tar_samples(url):
                        n += 1
                        yield {"__key__": key, "__url__": url, **members}
                except Exception as exn:  # noqa: BLE001 - a bad shard is counted; samples before the break stay
                    exn.args = (*exn.args, url)
                    counter.handler(exn)
            empty_epochs = 0 if n else empty_epochs + 1
            if empty_epochs >= MAX_EMPTY_EPOCHS:
                raise RuntimeError(f"stream {stream} of rank {s.rank}: no readable samples in {mine}")

    def with_meta(self, samples: Iterator[dict[str, Any]], counter: CorruptCounter):
        """Attach the parsed json and the bucket; samples with missing keys or bad json are counted."""
        bad_run = 0  # unusable samples in a row
        for sample in samples:
            if bad_run >= self.spec.max_consecutive_bad:
                raise RuntimeError(f"{bad_run} unusable samples in a row: {dict(counter.counts)}")
            bad_run += 1
            if self.spec.latent_tag is not None:
                # A latent shard keeps every raw sample in order (the shuffle stays the same); the ones the
                # raw stream drops here carry the reason it drops them for.
                if "skip.txt" in sample:
                    counter.add(sample["skip.txt"].decode())
                    continue
                meta = json.loads(sample["json"])
                sample["_meta"] = meta
                sample["_bucket"] = choose_bucket(int(meta["width"]), int(meta["height"]), self.spec.buckets)
                bad_run = 0
                yield sample
                continue
            missing = [k for k in REQUIRED_KEYS if k not in sample]
            if missing:
                counter.add("missing:" + ",".join(missing))
                continue
            if not ref_keys(sample):
                counter.add("missing:ref")
                continue
            try:
                meta = json.loads(sample["json"])
                if not isinstance(meta, dict):
                    raise ValueError("json is not an object")
            except Exception:  # noqa: BLE001 - any malformed json is one counted reason
                counter.add("bad_json")
                continue
            try:
                width, height = int(meta["width"]), int(meta["height"])
            except (KeyError, TypeError, ValueError):
                # No size recorded: read it from the mp4 header (no decoding).
                try:
                    width, height = video_size(sample["mp4"])
                except Exception:  # noqa: BLE001
                    counter.add("bad_mp4")
                    continue
            if width <= 0 or height <= 0:
                counter.add("bad_json")
                continue
            sample["_meta"] = meta
            sample["_bucket"] = choose_bucket(width, height, self.spec.buckets)
            bad_run = 0
            yield sample

    def _bucketed(self, samples: Iterator[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
        """Group samples into full batches of one bucket and one frame count (videos and one-frame image
        pairs never share a batch); deterministic given the sample order."""
        pending: dict[tuple[int, bool], list[dict[str, Any]]] = {}
        for sample in samples:
            slot = (sample["_bucket"], is_one_frame(sample["_meta"]))
            group = pending.setdefault(slot, [])
            group.append(sample)
            if len(group) == self.spec.batch_size:
                yield pending.pop(slot)

    def _load_latents(self, sample: dict[str, Any], counter: CorruptCounter) -> dict[str, Any] | None:
        """A latent-shard sample: the precomputed encodings of this phase, nothing decoded or encoded."""
        from safetensors.torch import load as load_safetensors

        tag = self.spec.latent_tag
        if f"{tag}.err" in sample:  # the raw stream fails this sample's decode in this phase too
            counter.add(sample[f"{tag}.err"].decode())
            return None
        if f"{tag}.safetensors" not in sample:
            raise ValueError(
                f"latent shard sample {sample['__key__']} has no encodings for {tag}: "
                "precompute the shards with this config (training/precompute.py)"
            )
        encoded = load_safetensors(sample[f"{tag}.safetensors"])
        meta = {k: sample["_meta"].get(k) for k in ("clip_id", "source_id", "pair_type")}
        meta["frame_indices"] = sample["_meta"]["frame_indices"][tag]
        return {
            "encoded": encoded,
            "n_refs": int(encoded["ref_latents"].shape[0]),
            "ref_images": [sample[k] for k in ref_keys(sample)],
            "caption": sample["txt"].decode("utf-8").strip(),
            "key": sample["__key__"],
            "meta": meta,
        }

    def decode(self, sample: dict[str, Any], counter: CorruptCounter) -> dict[str, Any] | None:
        s = self.spec
        if s.latent_tag is not None:
            return self._load_latents(sample, counter)
        out_hw = tuple(s.buckets[sample["_bucket"]])
        key = sample["__key__"]
        # Frame offset seeded by the sample key: the same clip always yields the same frames, which
        # keeps resume exact and lets encoder outputs be cached.
        rng = random.Random(f"frames-{s.seed}-{key}")
        try:
            num_frames = 1 if is_one_frame(sample["_meta"]) else s.num_frames
            frames, idx = decode_clip(sample["mp4"], num_frames, s.fps, rng)
            video = resize_center_crop(frames, out_hw)
        except Exception as exn:  # noqa: BLE001 - any decoder failure is one counted reason
            counter.add("bad_mp4")
            log.warning("skipping %s: bad mp4 (%r)", key, exn)
            return None
        refs = []
        for rk in ref_keys(sample)[: s.max_refs]:
            try:
                refs.append(letterbox(decode_image(sample[rk]), out_hw))
            except Exception as exn:  # noqa: BLE001
                counter.add("bad_ref")
                log.warning("skipping %s: bad reference %s (%r)", key, rk, exn)
                return None
        try:
            caption = sample["txt"].decode("utf-8").strip()
        except UnicodeDecodeError:
            counter.add("bad_txt")
            return None
        meta = {k: sample["_meta"].get(k) for k in ("clip_id", "source_id", "pair_type")}
        meta["frame_indices"] = idx
        return {"video": video, "refs": refs, "caption": caption, "key": key, "meta": meta}

    def stream(self, stream: int, skip: int = 0) -> Iterator[dict[str, Any]]:
        """Batches of one stream, after skipping its first `skip` batches (read, never decoded)."""
        s = self.spec
        counter = CorruptCounter()
        raw = self._raw(stream, counter)
        rng = random.Random(f"shuffle-{s.seed}-{s.rank}-{stream}")
        shuffled = wds.shuffle(s.shuffle_buffer, s.shuffle_initial, rng=rng)(raw)
        groups = self._bucketed(self.with_meta(shuffled, counter))
        for _ in range(skip):
            next(groups)
        # Problems met while skipping were counted by the run that consumed those batches.
        counter.counts.clear()
        bad_groups = 0
        for index in itertools.count(skip):
            group = next(groups)
            decoded = [d for d in (self.decode(x, counter) for x in group) if d is not None]
            if not decoded:
                # A whole batch of corrupt samples: counted, and the next one is used.
                bad_groups += 1
                if bad_groups * s.batch_size >= s.max_consecutive_bad:
                    raise RuntimeError(f"{bad_groups} undecodable batches in a row: {dict(counter.counts)}")
                continue
            bad_groups = 0
            batch = collate_latents(decoded) if s.latent_tag is not None else collate(decoded)
            batch.update(
                stream=stream,
                stream_batch=index,
                bucket=list(s.buckets[group[0]["_bucket"]]),
                corrupt=dict(counter.counts),
            )
            yield batch


class DataPosition:
    """Where a rank is in its data: checkpointed, and turned back into StreamSpec fields on resume."""

    def __init__(self, num_streams: int) -> None:
        self.consumed = 0
        self.next_group = [0] * num_streams

    def update(self, batch: dict[str, Any]) -> None:
        stream, index = int(batch["stream"]), int(batch["stream_batch"])
        expected = self.consumed % len(self.next_group)
        if stream != expected:
            raise RuntimeError(f"batch from stream {stream}, expected {expected}: loader order broke")
        self.next_group[stream] = index + 1
        self.consumed += 1

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed, "next_group": list(self.next_group)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["next_group"]) != len(self.next_group):
            raise ValueError(
                f"checkpoint has {len(state['next_group'])} data streams, config has {len(self.next_group)}"
                " (data.num_workers must not change across a resume)"
            )
        self.consumed = int(state["consumed"])
        self.next_group = [int(x) for x in state["next_group"]]


class CorruptTally:
    """Main-process view of the skipped-sample counters: checkpointed totals + per-stream counts."""

    def __init__(self) -> None:
        self.base: Counter[str] = Counter()
        self.latest: dict[int, dict[str, int]] = {}

    def update(self, batch: dict[str, Any]) -> None:
        self.latest[int(batch["stream"])] = dict(batch["corrupt"])

    def totals(self) -> dict[str, int]:
        total = Counter(self.base)
        for counts in self.latest.values():
            total.update(counts)
        return dict(total)

    def total(self) -> int:
        return sum(self.totals().values())

    def new_phase(self) -> None:
        """Fold the finished phase's counts into the base before its loader is replaced."""
        self.base = Counter(self.totals())
        self.latest = {}

    def state_dict(self) -> dict[str, int]:
        return self.totals()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.base = Counter({k: int(v) for k, v in state.items()})
        self.latest = {}


def build_loader(spec: StreamSpec, num_workers: int, prefetch_factor: int = 2, mp_context: str = "fork"):
    """A DataLoader over a TripletStream; num_workers == spec.num_streams (0: one stream, inline)."""
    dataset = TripletStream(spec)
    if num_workers == 0:
        return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=0)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        prefetch_factor=prefetch_factor,
        multiprocessing_context=mp_context,
        persistent_workers=False,
        # DataLoader hands batches back in worker order (in_order=True), which the stream layout needs.
        in_order=True,
    )
