"""Write a subject-pair image dataset (Subjects200K Parquet, OmniGen JSONL/Parquet) as one-frame shards.

    python -m curation.image_pairs --source subjects200k --data Subjects200K/data --out output/s200k/shards
    python -m curation.image_pairs --source omnigen --data x2i/subject.jsonl --images-dir x2i/images \
        --out output/omnigen/shards

Train on them beside the video shards with ``--set data.image_pairs=output/s200k/shards
--set data.image_pair_ratio=0.2`` (training/run.py)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from curation.sources.image_pairs import KINDS, ImagePairParams, write_image_pair_shards


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
