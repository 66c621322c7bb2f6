"""Image-pair sources (Phantom §3: "a portion of paired image data ... Subject200k and OmniGen"): read
subject-pair image datasets in the layouts they ship and write them as one-frame triplet shards.

Layouts read:
  * ``subjects200k``: Parquet as on the Hub (Yuanshi/Subjects200K): ``image`` (struct ``bytes``/``path``, a
    composite of two views of one subject, ``pad_px`` of white around each view: [p | view | 2p | view | p]
    across, [p | view | p] down), ``description`` (struct ``item``, ``description_0``, ``description_1``,
    ``category``, ``description_valid``), ``quality_assessment`` (struct ``compositeStructure``,
    ``objectConsistency``, ``imageQuality``, 0-5), ``collection``. One view is the reference, the other the
    target (with its own description as the caption); both directions by default.
  * ``omnigen``: OmniGen's fine-tuning layout, a JSONL of ``{"task_type", "instruction", "input_images": [..],
    "output_image"}`` (paths relative to ``images_dir``, OmniGen's ``--image_path``), or the same columns in
    Parquet with image structs (``bytes``/``path``) or raw bytes. The ``<img><|image_k|></img>`` placeholders
    of the instruction become "reference image k" in the caption; rows without 1-4 input images are rejected.

Each pair becomes a sample of the curation's triplet format, so every shard reader (the trainer, inspect,
Ray Data, HF datasets, webdataset) takes it as it is: ``mp4`` = the target as a ONE-frame H.264 clip,
``ref_k.jpg`` = the reference images, ``txt`` = the caption, ``json`` with ``pair_type: image_pair``,
``n_frames: 1``, subjects, scenario labels and the dataset's scores.

Scale: the work is cut into partitions (one Parquet row group, or one byte range of a JSONL), each read as a
stream and written to its own shards (``shard-<partition>-<seq>.tar``, closed at maxcount / maxsize like
curation.shards.plan_shards) plus one record; no process holds more than one shard's samples. A re-run keeps
every partition whose record matches its plan and parameters; ``.index.json`` is written last."""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from curation import scenarios
from curation.parsing import categorize
from curation.shards import (
    confined,
    safe_component,
)

log = logging.getLogger(__name__)

PAIR_TYPE = "image_pair"
KINDS = ("subjects200k", "omnigen")
QUALITY_KEYS = ("compositeStructure", "objectConsistency", "imageQuality")
MAX_REFS = 4
_PLACEHOLDER = re.compile(r"<img>\s*<\|image_(\d+)\|>\s*</img>")
SHARD_RE = re.compile(r"shard-(\d{5})-\d{6}\.tar")


@dataclass
class ImagePairParams:
    """How pairs are filtered and written (all of it goes into the config hash)."""

    # Subjects200K: keep a pair when every quality_assessment score is >= this (the dataset card's filter
    # uses 5); 0 keeps unrated pairs too.
    min_quality: int = 5
    collections: list[str] | None = None  # Subjects200K collections to keep (None: all)
    pad_px: int = 8  # Subjects200K: white border around each view (16 px between the two views)
    both_directions: bool = True  # Subjects200K: left->right and right->left are two samples
    task_types: list[str] | None = None  # OmniGen: task_type values to keep (None: every row with refs)
    max_side_px: int = 1024  # targets and references larger than this are scaled down (aspect kept)
    min_side_px: int = 64  # smaller images are rejected (image_too_small)
    crf: int = 12  # x264 quality of the one-frame target (intra frame; 12 is visually lossless)
    jpeg_quality: int = 95
    fps: float = 8.0  # nominal rate written into the one-frame clip and its json
    maxcount: int = 1000
    maxsize_mb: float = 512.0
    rows_per_batch: int = 64  # Parquet rows decoded at a time
    jsonl_chunk_mb: float = 64.0  # a JSONL is cut into partitions of about this many bytes
    # At most this many source rows, for trials (0: all): Parquet rows counted across row groups in plan
    # order; a JSONL's lines counted per partition (its row count is not known before it is read).
    limit: int = 0

    def hash(self, source: dict) -> str:
        ident = json.dumps([asdict(self), source], sort_keys=True)
        return hashlib.sha256(ident.encode()).hexdigest()[:16]


@dataclass
class Pair:
    """One sample before encoding: RGB uint8 arrays and everything its json records."""

    key: str
    item_id: str
    target: np.ndarray  # (H, W, 3)
    refs: list[np.ndarray]  # 1-4 x (h, w, 3)
    caption: str
    subjects: list[dict]
    caption_origin: str
    scores: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


class Rejected(Exception):
    """A row (or one image of it) that cannot become a sample; ``reason`` is the counted code."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# ----------------------------------------------------------------------------- images


def decode_rgb(data: bytes, what: str = "image") -> np.ndarray:
    """Encoded image bytes -> (H, W, 3) uint8; an unreadable file is Rejected(bad_image)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return np.array(img.convert("RGB"))
    except Exception as e:  # noqa: BLE001 - any decoder failure is the row's reason
        raise Rejected("bad_image", f"{what}: {type(e).__name__}: {str(e)[:80]}") from None


def fit_image(img: np.ndarray, max_side: int, min_side: int, even: bool = False) -> np.ndarray:
    """Scale down to at most ``max_side`` on the long side; ``even`` crops to even sizes (yuv420p)."""
    from PIL import Image

    h, w = img.shape[:2]
    if min(h, w) < min_side:
        raise Rejected("image_too_small", f"{w}x{h} < {min_side} px")
    if max(h, w) > max_side:
        s = max_side / max(h, w)
        size = (max(1, round(w * s)), max(1, round(h * s)))
        img = np.array(Image.fromarray(img).resize(size, Image.Resampling.LANCZOS))
    if even:
        img = img[: img.shape[0] // 2 * 2, : img.shape[1] // 2 * 2]
    return np.ascontiguousarray(img)


def split_composite(img: np.ndarray, pad_px: int) -> tuple[np.ndarray, np.ndarray]:
    """A Subjects200K composite -> (left view, right view): [p | s | 2p | s | p] across, [p | s | p] down."""
    h, w = img.shape[:2]
    s = h - 2 * pad_px
    if s <= 0 or w != 2 * s + 4 * pad_px:
        raise Rejected("composite_size", f"{w}x{h} is not two {s}px views with {pad_px}px padding")
    left = img[pad_px : pad_px + s, pad_px : pad_px + s]
    x1 = s + 3 * pad_px
    right = img[pad_px : pad_px + s, x1 : x1 + s]
    return left, right


def encode_one_frame_mp4(img: np.ndarray, fps: float, crf: int) -> bytes:
    """(H, W, 3) uint8 with even H, W -> a one-frame H.264 mp4 (yuv420p), in memory."""
    from fractions import Fraction

    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(round(fps * 1000), 1000))
        stream.width, stream.height = img.shape[1], img.shape[0]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "medium"}
        for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def encode_jpeg(img: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _image_bytes(value: Any, images_dir: str | None, what: str) -> bytes:
    """An image cell as bytes: HF's struct {bytes, path}, raw bytes, or a path (under ``images_dir``)."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str) and value:
        if not images_dir:
            raise Rejected("missing_image", f"{what}: path {value!r} but no images_dir")
        try:
            return confined(images_dir, value).read_bytes()
        except ValueError as e:
            raise Rejected("bad_path", f"{what}: {e}") from None
        except OSError as e:
            raise Rejected("missing_image", f"{what}: {e}") from None
    raise Rejected("missing_image", what)


# ----------------------------------------------------------------------------- rows -> pairs


def subject_category(name: str, dataset_category: str | None = None) -> tuple[str, str]:
    """(category, source) of a subject: the dataset's label (source "dataset"), unless the category rule of
    curation.parsing fires (source "rule")."""
    category, source = categorize(name or "", dataset_category)
    return category, ("rule" if source == "rule" else "dataset")


def subjects200k_pairs(row: dict, row_id: str, params: ImagePairParams) -> list[Pair]:
    """The pairs of one Subjects200K row (Rejected when the row is filtered out or unreadable)."""
    if params.collections is not None and row.get("collection") not in params.collections:
        raise Rejected("collection")
    desc = row.get("description") or {}
    if isinstance(desc, str):  # some exports keep the struct as a JSON string
        try:
            desc = json.loads(desc)
        except ValueError:
            raise Rejected("bad_description") from None
    if desc.get("description_valid") is False:
        raise Rejected("description_invalid")
    qa = row.get("quality_assessment") or {}
    scores = {k: qa.get(k) for k in QUALITY_KEYS if qa.get(k) is not None}
    if params.min_quality > 0:
        if len(scores) < len(QUALITY_KEYS):
            raise Rejected("no_quality_assessment")
        if min(int(v) for v in scores.values()) < params.min_quality:
            raise Rejected("low_quality", json.dumps(scores, sort_keys=True))
    item = str(desc.get("item") or "").strip()
    texts = [str(desc.get("description_0") or "").strip(), str(desc.get("description_1") or "").strip()]
    if not item or not all(texts):
        raise Rejected("no_description")
    img = decode_rgb(_image_bytes(row.get("image"), None, "image"), "image")
    views = split_composite(img, params.pad_px)
    category, category_source = subject_category(item, desc.get("category"))
    directions = [(0, 1), (1, 0)] if params.both_directions else [(0, 1)]
    out = []
    for ref_i, tgt_i in directions:
        subject = {
            "name": item,
            "description": texts[ref_i],
            "category": category,
            "category_source": category_source,
        }
        out.append(
            Pair(
                key=safe_component(f"s200k_{row_id}_{ref_i}{tgt_i}"),
                item_id=row_id,
                target=views[tgt_i],
                refs=[views[ref_i]],
                caption=texts[tgt_i],
                subjects=[subject],
                caption_origin=f"subjects200k:description_{tgt_i}",
                scores={f"quality_{k}": int(v) for k, v in scores.items()},
                extra={
                    "collection": row.get("collection"),
                    "dataset_category": desc.get("category"),
                    "views": {"ref": ref_i, "target": tgt_i},
                },
            )
        )
    return out


def omnigen_caption(instruction: str) -> str:
    """OmniGen's instruction with each ``<img><|image_k|></img>`` named "reference image k"."""
    text = _PLACEHOLDER.sub(lambda m: f"reference image {int(m.group(1))}", instruction)
    return re.sub(r"\s+", " ", text).strip()


def omnigen_pairs(row: dict, row_id: str, params: ImagePairParams, images_dir: str | None) -> list[Pair]:
    task = row.get("task_type")
    if params.task_types is not None and task not in params.task_types:
        raise Rejected("task_type", str(task))
    instruction = row.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise Rejected("no_instruction")
    inputs = row.get("input_images") or []
    if isinstance(inputs, (str, bytes, dict)):
        inputs = [inputs]
    if not 1 <= len(inputs) <= MAX_REFS:
        raise Rejected("no_reference" if not inputs else "too_many_references", f"{len(inputs)} inputs")
    output = row.get("output_image", row.get("output_images"))
    if isinstance(output, list):
        output = output[0] if len(output) == 1 else None
    target = decode_rgb(_image_bytes(output, images_dir, "output_image"), "output_image")
    refs = [
        decode_rgb(_image_bytes(v, images_dir, f"input_images[{k}]"), f"input_images[{k}]")
        for k, v in enumerate(inputs)
    ]
    caption = omnigen_caption(instruction)
    subjects = [
        {"name": f"reference image {k + 1}", "description": None, "category": "other"}
        for k in range(len(refs))
    ]
    return [
        Pair(
            key=safe_component(f"omnigen_{row_id}"),
            item_id=row_id,
            target=target,
            refs=refs,
            caption=caption,
            subjects=subjects,
            caption_origin="omnigen:instruction",
            extra={"task_type": task, "instruction": instruction},
        )
    ]


def pair_sample(pair: Pair, params: ImagePairParams, source: str, config_hash: str) -> dict:
    """A shard sample ({__key__, mp4, ref_k.jpg, txt, json}) of one pair."""
    target = fit_image(pair.target, params.max_side_px, params.min_side_px, even=True)
    refs = [fit_image(r, params.max_side_px, params.min_side_px) for r in pair.refs[:MAX_REFS]]
    labels = scenarios.labels([s.get("category") for s in pair.subjects], pair.caption)
    h, w = target.shape[:2]
    meta = {
        "key": pair.key,
        "pair_type": PAIR_TYPE,
        "clip_id": pair.key,
        "video_id": pair.item_id,
        "source": source,
        "source_group": f"{source}:{pair.item_id}",
        "split": "train",
        "span": [0.0, 0.0],
        "fps": params.fps,
        "width": int(w),
        "height": int(h),
        "n_frames": 1,
        "caption": pair.caption,
        "caption_origin": pair.caption_origin,
        "subjects": [
            {
                **s,
                "ref": {
                    "file": f"ref_{k}.jpg",
                    "kind": PAIR_TYPE,
                    "width": int(r.shape[1]),
                    "height": int(r.shape[0]),
                },
            }
            for k, (s, r) in enumerate(zip(pair.subjects, refs))
        ],
        "n_subjects": len(pair.subjects),
        "refs_truncated": len(pair.refs) > MAX_REFS,
        "scenarios": labels,
        "primary_scenario": scenarios.primary(labels),
        "scores": pair.scores,
        "image_pair": pair.extra,
        "config_hash": config_hash,
    }
    sample = {
        "__key__": pair.key,
        "mp4": encode_one_frame_mp4(target, params.fps, params.crf),
        "txt": pair.caption.encode("utf-8"),
        "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
    }
    for k, r in enumerate(refs):
        sample[f"ref_{k}.jpg"] = encode_jpeg(r, params.jpeg_quality)
    return sample


# ----------------------------------------------------------------------------- partitions


def _expand(data: str | list[str]) -> list[str]:
    """Files named by paths, folders (their *.parquet / *.jsonl) or globs, sorted, each once."""
    items = [data] if isinstance(data, str) else list(data)
    out: list[str] = []
    for d in items:
        if os.path.isdir(d):
            found = sorted(glob.glob(os.path.join(d, "**", "*.parquet"), recursive=True))
            found += sorted(glob.glob(os.path.join(d, "**", "*.jsonl"), recursive=True))
        else:
            found = sorted(glob.glob(d)) or [d]
        for f in found:
            if not os.path.isfile(f):
                raise FileNotFoundError(f"image-pair source: {f} does not exist")
            out.append(os.path.abspath(f))
    if not out:
        raise FileNotFoundError(f"image-pair source: no Parquet or JSONL files in {data}")
    return list(dict.fromkeys(out))


def plan_partitions(kind: str, data: str | list[str], params: ImagePairParams) -> list[dict]:
    """One item per Parquet row group or JSONL byte range (only file metadata is read)."""
    import pyarrow.parquet as pq

    if kind not in KINDS:
        raise ValueError(f"unknown image-pair source {kind!r}; allowed: {list(KINDS)}")
    parts: list[dict] = []
    for f in _expand(data):
        if f.endswith(".jsonl"):
            if kind != "omnigen":
                raise ValueError(f"{f}: a JSONL is the omnigen layout, not {kind}")
            size, step = os.path.getsize(f), max(1, int(params.jsonl_chunk_mb * (1 << 20)))
            parts += [{"file": f, "start": a, "end": min(size, a + step)} for a in range(0, size, step)]
        else:
            md = pq.ParquetFile(f).metadata
            parts += [
                {"file": f, "row_group": g, "rows": md.row_group(g).num_rows}
                for g in range(md.num_row_groups)
            ]
    return [{**p, "partition": i} for i, p in enumerate(parts)]


def jsonl_rows(path: str, start: int, end: int) -> Iterator[tuple[int, dict | None]]:
    """(byte offset, row or None when the line is not a JSON object) of the lines that START in [start,
    end): a partition owns the line it cuts into, the next one skips it."""
    with open(path, "rb") as f:
        f.seek(start)
        if start > 0:
            f.seek(start - 1)
            if f.read(1) != b"\n":
                f.readline()  # the line that began before start belongs to the previous partition
        while f.tell() < end:
            pos = f.tell()
            line = f.readline()
            if not line:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            yield pos, row if isinstance(row, dict) else None


def partition_rows(part: dict) -> Iterator[tuple[str, dict | None]]:
    """(row id, row) of one partition, streamed (Parquet in batches of rows_per_batch)."""
    stem = safe_component(Path(part["file"]).stem)
    if "row_group" in part:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(part["file"])
        n = 0
        for batch in pf.iter_batches(batch_size=part["rows_per_batch"], row_groups=[part["row_group"]]):
            for row in batch.to_pylist():
                yield f"{stem}_g{part['row_group']}_{n}", row
                n += 1
    else:
        for pos, row in jsonl_rows(part["file"], part["start"], part["end"]):
            yield f"{stem}_b{pos}", row


def pairs_of(kind: str, row: dict | None, row_id: str, params: ImagePairParams, images_dir) -> list[Pair]:
    if row is None:
        raise Rejected("bad_row")
    if kind == "subjects200k":
        return subjects200k_pairs(row, row_id, params)
    return omnigen_pairs(row, row_id, params, images_dir)
