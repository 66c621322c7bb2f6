"""Write a subject-pair image dataset (Subjects200K Parquet, OmniGen JSONL/Parquet) as one-frame shards:
the rows are read by ``curation.sources.image_pairs``, one partition per task (in-process or on Ray).

    python -m curation.image_pairs --source subjects200k --data Subjects200K/data --out output/s200k/shards
    python -m curation.image_pairs --source omnigen --data x2i/subject.jsonl --images-dir x2i/images \
        --out output/omnigen/shards

Train on them beside the video shards with ``--set data.image_pairs=output/s200k/shards
--set data.image_pair_ratio=0.2`` (training/run.py)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from curation import scenarios
from curation.execute import run_items
from curation.shards import (
    INDEX_FILE,
    INDEX_NAMES,
    RECORDS_DIR,
    atomic_write_json,
    member_bytes,
    sha256_file,
    write_tar,
)
from curation.sources.image_pairs import (
    KINDS,
    PAIR_TYPE,
    SHARD_RE,
    ImagePairParams,
    Rejected,
    pair_sample,
    pairs_of,
    partition_rows,
    plan_partitions,
)

log = logging.getLogger(__name__)


def shard_name(partition: int, seq: int) -> str:
    return f"shard-{partition:05d}-{seq:06d}.tar"


def _record_path(out_dir: Path, partition: int) -> Path:
    return out_dir / RECORDS_DIR / f"part-{partition:05d}.json"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _partition_done(out_dir: Path, part: dict, config_hash: str) -> dict | None:
    """The partition's record when it is complete for this config: every shard there, size as recorded."""
    rec = _read_json(_record_path(out_dir, part["partition"]))
    if rec.get("config_hash") != config_hash or rec.get("file") != part["file"]:
        return None
    for e in rec.get("shards", []):
        p = out_dir / e["name"]
        if not p.is_file() or p.stat().st_size != e["bytes"]:
            return None
    return rec


def write_partition(
    part: dict, kind: str, params: dict, out_dir: str, source: str, config_hash: str, images_dir: str | None
) -> dict:
    """Read one partition and write its shards; returns its record (shards, counts, rejections)."""
    p = ImagePairParams(**params)
    out = Path(out_dir)
    done = _partition_done(out, part, config_hash)
    if done is not None:
        return {**done, "kept": True}
    part = {**part, "rows_per_batch": p.rows_per_batch}
    maxsize = int(p.maxsize_mb * (1 << 20))
    shards, pending, used = [], [], 0
    counts: Counter = Counter()
    rejections: Counter = Counter()

    def flush():
        nonlocal pending, used
        if not pending:
            return
        name = shard_name(part["partition"], len(shards))
        path = out / name
        write_tar(path, pending)
        shards.append(
            {"name": name, "samples": len(pending), "bytes": path.stat().st_size, "sha256": sha256_file(path)}
        )
        pending, used = [], 0

    keys_seen: set[str] = set()
    for row_id, row in partition_rows(part):
        if p.limit and part.get("row_offset", 0) + counts["rows"] >= p.limit:
            break
        counts["rows"] += 1
        try:
            pairs = pairs_of(kind, row, row_id, p, images_dir)
            samples = [pair_sample(pair, p, source, config_hash) for pair in pairs]
        except Rejected as e:
            rejections[f"image_pairs:{e.reason}"] += 1
            log.debug("image pairs: %s rejected: %s", row_id, e)
            continue
        for s in samples:
            if s["__key__"] in keys_seen:  # two rows whose ids collide after safe_component
                rejections["image_pairs:duplicate_key"] += 1
                continue
            keys_seen.add(s["__key__"])
            n = sum(member_bytes(len(v)) for k, v in s.items() if k != "__key__")
            # the rule of curation.shards.plan_shards, applied as the samples stream in
            if pending and (len(pending) >= p.maxcount or used + n > maxsize):
                flush()
            pending.append(s)
            used += n
            counts["samples"] += 1
            counts.update(f"scenario:{t}" for t in json.loads(s["json"])["scenarios"])
    flush()
    for stale in out.glob(f"shard-{part['partition']:05d}-*.tar"):  # left by an earlier, larger run
        if stale.name not in {s["name"] for s in shards}:
            stale.unlink()
    rec = {
        "partition": part["partition"],
        "file": part["file"],
        "config_hash": config_hash,
        "shards": shards,
        "counts": dict(counts),
        "rejections": dict(rejections),
    }
    atomic_write_json(_record_path(out, part["partition"]), rec)
    return {**rec, "kept": False}


def write_image_pair_shards(
    kind: str,
    data: str | list[str],
    out_dir: str | os.PathLike,
    params: ImagePairParams | dict | None = None,
    images_dir: str | None = None,
    runner: str = "sequential",
) -> dict:
    """Every pair of the dataset as one-frame ``image_pair`` triplet shards in ``out_dir``; returns the index
    (shards with samples, bytes, sha256; totals; per-reason rejections; scenario counts)."""
    params = params if isinstance(params, ImagePairParams) else ImagePairParams(**(params or {}))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = plan_partitions(kind, data, params)
    source = {"kind": kind, "files": sorted({p["file"] for p in parts}), "images_dir": images_dir}
    config_hash = params.hash(source)
    if params.limit:  # which rows the limit reaches is fixed by the plan, so a re-run gives the same set
        offset = 0
        for p in parts:
            p["row_offset"] = offset
            offset += p.get("rows", 0)
        parts = [p for p in parts if p.get("row_offset", 0) < params.limit or "rows" not in p]
    for stale in [out / n for n in INDEX_NAMES]:
        if stale.exists():
            stale.unlink()  # the set is being changed: no index until it is complete again
    for f in out.glob("shard-*.tar"):  # partitions beyond this plan
        m = SHARD_RE.fullmatch(f.name)
        if m and int(m.group(1)) >= len(parts):
            f.unlink()
            _record_path(out, int(m.group(1))).unlink(missing_ok=True)
    kw = dict(
        kind=kind,
        params=asdict(params),
        out_dir=str(out),
        source=kind,
        config_hash=config_hash,
        images_dir=images_dir,
    )
    if runner == "sequential":
        results = [write_partition(dict(p), **kw) for p in parts]
    elif runner == "ray":
        results = run_items(parts, write_partition, "ray", **kw)
    else:
        raise ValueError(f"runner must be 'sequential' or 'ray', got {runner!r}")
    counts: Counter = Counter()
    rejections: Counter = Counter()
    shards = []
    for r in sorted(results, key=lambda r: r["partition"]):
        counts.update(r["counts"])
        rejections.update(r["rejections"])
        shards += r["shards"]
    index = {
        "writer": "curation.image_pairs",
        "pair_type": PAIR_TYPE,
        "source": source,
        "config_hash": config_hash,
        "params": asdict(params),
        "shards": shards,
        "total_samples": sum(s["samples"] for s in shards),
        "total_bytes": sum(s["bytes"] for s in shards),
        "rows": counts.pop("rows", 0),
        "scenarios": {t: counts.get(f"scenario:{t}", 0) for t in scenarios.TAXONOMY},
        "rejections": dict(sorted(rejections.items())),
        "partitions_kept": sum(1 for r in results if r.get("kept")),
    }
    atomic_write_json(out / INDEX_FILE, index)
    log.info(
        "image pairs: %d rows -> %d samples in %d shards (%d partitions kept), rejected %s",
        index["rows"],
        index["total_samples"],
        len(shards),
        index["partitions_kept"],
        index["rejections"],
    )
    return index


def main(argv: list[str] | None = None) -> int:
    d = ImagePairParams()
    ap = argparse.ArgumentParser(prog="python -m curation.image_pairs", description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", required=True, choices=KINDS, help="the dataset's layout")
    ap.add_argument("--data", required=True, nargs="+", help="Parquet/JSONL files, folders or globs")
    ap.add_argument("--images-dir", help="omnigen JSONL: the folder its image paths are relative to")
    ap.add_argument("--out", required=True, help="output shards folder")
    ap.add_argument("--min-quality", type=int, default=d.min_quality, help="subjects200k: min of every score")
    ap.add_argument("--collection", action="append", dest="collections", help="subjects200k: keep (repeat)")
    ap.add_argument("--pad-px", type=int, default=d.pad_px)
    ap.add_argument("--one-direction", action="store_true", help="subjects200k: left->right only")
    ap.add_argument("--task-type", action="append", dest="task_types", help="omnigen: keep (repeat)")
    ap.add_argument("--max-side", type=int, default=d.max_side_px)
    ap.add_argument("--maxcount", type=int, default=d.maxcount)
    ap.add_argument("--maxsize-mb", type=float, default=d.maxsize_mb)
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--runner", choices=["sequential", "ray"], default="sequential")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    params = ImagePairParams(
        min_quality=args.min_quality,
        collections=args.collections,
        pad_px=args.pad_px,
        both_directions=not args.one_direction,
        task_types=args.task_types,
        max_side_px=args.max_side,
        maxcount=args.maxcount,
        maxsize_mb=args.maxsize_mb,
        limit=args.limit,
    )
    try:
        index = write_image_pair_shards(
            args.source, args.data, args.out, params, images_dir=args.images_dir, runner=args.runner
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = {k: index[k] for k in ("rows", "total_samples", "total_bytes", "rejections", "scenarios")}
    print(json.dumps({"out": str(args.out), "shards": len(index["shards"]), **summary}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
