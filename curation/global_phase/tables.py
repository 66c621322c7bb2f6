"""Per-video tables: the pairable units and ok clips of one committed video (``export_video``, run by the
worker that commits it), their schemas, the bucket of a video id, and the Parquet writer every step uses."""

from __future__ import annotations

import hashlib
import json
import logging
import os

import numpy as np

from curation.composition import best_crop, tight_box
from curation.packs import member_rel
from curation.shards import safe_component
from curation.storage import Store

log = logging.getLogger(__name__)

BUCKETS = 256  # hash buckets of video ids: folder sharding of the tables and the unit of the gather step
KINDS = ("subject", "face")


# ---------------------------------------------------------------------------------------------------------
# keys and hashes


def sha(text: str, n: int = 16) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def bucket_of(video_id: str) -> int:
    return int(hashlib.sha1(str(video_id).encode()).hexdigest()[:2], 16)


def _video_file(video_id: str) -> str:
    b = bucket_of(video_id)
    digest = hashlib.sha1(str(video_id).encode()).hexdigest()[:10]
    return f"{b:02x}/{safe_component(video_id)[:80]}-{digest}.parquet"


def key_dir(kind: str, category: str) -> str:
    """The folder of one (kind, category) under a step's directory: a plain name plus a short hash, so two
    categories that sanitise alike never share files."""
    return f"{kind}/{safe_component(category)[:60]}-{sha(category, 8)}"


def _phash_int(h: str) -> int:
    return int(h, 16)


# ---------------------------------------------------------------------------------------------------------
# export: one video's columnar tables, written by the worker that commits the video


def unit_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("kind", pa.string()),
            ("bucket", pa.int16()),
            ("video_id", pa.string()),
            ("clip_id", pa.string()),
            ("subject", pa.int32()),
            ("category", pa.string()),
            ("vector", pa.list_(pa.float32())),
            ("phashes", pa.list_(pa.uint64())),
            ("crop_path", pa.string()),
            ("crop_box", pa.list_(pa.int32())),
            ("crop_box_tight", pa.list_(pa.int32())),
            ("crop_ref", pa.int32()),
            ("ref_t_s", pa.float64()),
            ("ref_frame_index", pa.int64()),
            ("v_n_clips", pa.int32()),
        ]
    )


def clip_schema():
    import pyarrow as pa

    return pa.schema(
        [("bucket", pa.int16()), ("video_id", pa.string()), ("clip_id", pa.string()), ("row", pa.string())]
    )


def _mean_unit(v: np.ndarray) -> np.ndarray:
    m = v.mean(0)
    return m / max(float(np.linalg.norm(m)), 1e-12)


def subject_tight_box(row: dict, subject: dict, crop: dict) -> list[int]:
    """The tight box of a subject's reference crop (composition.tight_box with the face found on the same
    reference frame, if any)."""
    face = next((f for f in subject.get("faces") or [] if f.get("ref") == crop.get("ref")), None)
    w = int(row.get("clip_width") or row.get("width") or 1 << 16)
    h = int(row.get("clip_height") or row.get("height") or 1 << 16)
    return tight_box(crop["box"], w, h, subject.get("category"), face["box"] if face else None)


def video_units(rows: list[dict], local_root: str) -> tuple[list[dict], dict[str, str]]:
    """The pairable units of one video's ok rows: per subject and kind (subject crops, faces) the unit mean of
    its non-duplicate item embeddings, its crop pHashes and its best crop. Returns (units, errors by clip)."""
    units, errors = [], {}
    ok = [r for r in rows if r.get("status", "ok") == "ok" and r.get("clip_id")]
    cache: dict[str, np.ndarray] = {}
    per_clip: list[list[dict]] = []
    for r in ok:
        clip_units = []
        for kind, file_key, item_key in (
            ("subject", "embedding_file", "crops"),
            ("face", "face_embedding_file", "faces"),
        ):
            subjects = r.get("subjects") or []
            items = [s.get(item_key) or [] for s in subjects]
            if not r.get(file_key) or not any(items):
                continue
            rel = member_rel(r[file_key])  # committed rows name packed files: the worker has the member
            try:
                if rel not in cache:
                    base = os.path.realpath(local_root)
                    path = os.path.realpath(os.path.join(base, rel))
                    if not path.startswith(base + os.sep):
                        raise ValueError(f"path {rel!r} escapes {base}")
                    cache[rel] = np.load(path, allow_pickle=False)
                emb = cache[rel]
                if emb.ndim != 2:
                    raise ValueError(f"expected (n, D), got shape {emb.shape}")
            except (OSError, ValueError) as e:
                errors[str(r["clip_id"])] = f"unreadable {rel}: {type(e).__name__}"
                log.warning(
                    "export: %s/%s: %s", r.get("video_id"), r.get("clip_id"), errors[str(r["clip_id"])]
                )
                continue
            for si, its in enumerate(items):
                keep = [
                    it for it in its if it.get("duplicate_of") is None and 0 <= int(it["emb_row"]) < len(emb)
                ]
                # the reference image is the subject's own crop; a face unit of a subject without one falls
                # back to its face crop
                crop = best_crop(subjects[si]) or (best_crop({"crops": its}) if kind == "face" else None)
                if not keep or crop is None:
                    continue
                meta = r.get("ref_frames") or []
                t = meta[crop["ref"]] if 0 <= crop["ref"] < len(meta) else {}
                clip_units.append(
                    {
                        "kind": kind,
                        "bucket": bucket_of(r["video_id"]),
                        "video_id": str(r["video_id"]),
                        "clip_id": str(r["clip_id"]),
                        "subject": si,
                        "category": str(subjects[si].get("category")),
                        "vector": _mean_unit(emb[[int(it["emb_row"]) for it in keep]].astype(np.float32)),
                        "phashes": [_phash_int(it["phash"]) for it in its if it.get("phash")],
                        "crop_path": crop["path"],
                        "crop_box": [int(v) for v in crop["box"]],
                        "crop_box_tight": subject_tight_box(r, subjects[si], crop),
                        "crop_ref": int(crop["ref"]),
                        "ref_t_s": t.get("t_s"),
                        "ref_frame_index": t.get("frame_index"),
                    }
                )
        per_clip.append(clip_units)
    n_clips = sum(1 for u in per_clip if u)
    for clip_units in per_clip:
        for u in clip_units:
            u["v_n_clips"] = n_clips
            units.append(u)
    return units, errors


def _units_table(units: list[dict]):
    import pyarrow as pa

    schema = unit_schema()
    cols = {f.name: [u[f.name] for u in units] for f in schema}
    cols["vector"] = [np.asarray(v, np.float32).tolist() for v in cols["vector"]]
    return pa.table(cols, schema=schema)


def write_parquet(store: Store, rel: str, table, row_group_size: int | None = None) -> None:
    import pyarrow.parquet as pq

    with store.writer(rel) as f:
        pq.write_table(table, f, compression="zstd", row_group_size=row_group_size)


def export_video(rows: list[dict], store: Store, local_root: str, map_hash: str) -> None:
    """Write one committed video's columnar tables into ``store`` under ``tables/<map_hash>/``: its pairable
    units and its ok clips (the row as JSON text). Idempotent (the same objects are overwritten atomically);
    embeddings are read from ``local_root`` (the worker's copy), never downloaded."""
    import pyarrow as pa

    if not rows:
        return
    vid = str(rows[0]["video_id"])
    units, errors = video_units(rows, local_root)
    write_parquet(store, f"tables/{map_hash}/units/{_video_file(vid)}", _units_table(units))
    ok = sorted(
        (r for r in rows if r.get("status", "ok") == "ok" and r.get("clip_id")),
        key=lambda r: str(r["clip_id"]),
    )
    recs = []
    for r in ok:
        r = {k: v for k, v in r.items() if not k.startswith("_")}
        if str(r["clip_id"]) in errors:
            r["pair_error"] = errors[str(r["clip_id"])]
        recs.append(r)
    table = pa.table(
        {
            "bucket": [bucket_of(vid)] * len(recs),
            "video_id": [vid] * len(recs),
            "clip_id": [str(r["clip_id"]) for r in recs],
            "row": [json.dumps(r, sort_keys=True) for r in recs],
        },
        schema=clip_schema(),
    )
    write_parquet(store, f"tables/{map_hash}/clips/{_video_file(vid)}", table)
