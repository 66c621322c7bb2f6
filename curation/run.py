"""`python -m curation.run`: curate a source with a named pipeline from pipelines.yaml, print a summary."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections import Counter
from pathlib import Path

from curation.config import ConfigError, config_hash, load_config
from curation.manifest import atomic_write_text, count_reasons
from curation.models import ModelHashMismatch, ModelNotFound
from curation.runner import ResourceError, run_pipeline
from curation.sources import load_source
from curation.stage import StageContext


def summarize(result, source: str, pipeline: str, out_dir: str) -> dict:
    clips = [r for r in result.rows if r.get("clip_id")]
    videos = {r["video_id"] for r in result.rows}
    summary = {
        "source": source,
        "pipeline": pipeline,
        "out_dir": out_dir,
        "videos_in": result.videos_in,
        "videos_skipped_already_done": result.videos_skipped,
        "videos_processed_now": result.videos_committed,
        "videos_with_clips": len({r["video_id"] for r in clips}),
        "videos_rejected": len(videos - {r["video_id"] for r in clips}),
        "clips": len(clips),
        "clips_ok": sum(r.get("status") == "ok" for r in clips),
        "rejections_by_reason": dict(sorted(count_reasons(result.rows).items(), key=lambda kv: -kv[1])),
        "triplets_out": len(result.outputs),
        "triplets_by_pair_type": dict(Counter(r.get("pair_type", "?") for r in result.outputs)),
        "filters_off": sorted({k[: -len("_off")] for r in clips for k, v in r.items()
                               if k.endswith("_off") and v}),
        "wall_s": round(result.wall_s, 1),
    }
    return summary


def print_summary(s: dict) -> None:
    print("\n== curation summary ==")
    for k, v in s.items():
        if isinstance(v, dict):
            print(f"{k}:")
            for kk, vv in v.items():
                print(f"    {kk:40s} {vv}")
        else:
            print(f"{k:42s} {v}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="pipelines.yaml")
    ap.add_argument("--source", default=None, help="a source from pipelines.yaml")
    ap.add_argument("--pipeline", default=None, help="a pipeline name (default: default_pipeline)")
    ap.add_argument("--out", default=None, help="output folder (default: <output_dir>/<source>)")
    ap.add_argument("--runner", choices=["ray", "sequential"], default="ray")
    ap.add_argument("--limit", type=int, default=None, help="only the first N videos")
    ap.add_argument("--videos", default="", help="only these video ids (comma-separated)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    try:
        cfg = load_config(args.config)
        source = args.source or cfg.default_source
        pipeline = args.pipeline or cfg.default_pipeline
        if source not in cfg.sources:
            raise ConfigError(f"--source: {source!r} is not one of {sorted(cfg.sources)}")
        if pipeline not in cfg.pipelines:
            raise ConfigError(f"--pipeline: {pipeline!r} is not one of {sorted(cfg.pipelines)}")
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2

    out_dir = args.out or os.path.join(cfg.output_dir, source)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    spec = cfg.sources[source]
    if args.limit is not None:
        spec.limit = args.limit
    rows = load_source(spec, out_dir)
    if args.videos:
        wanted = set(args.videos.split(","))
        rows = [r for r in rows if r["video_id"] in wanted]
    ctx = StageContext(out_dir=out_dir, models_dir=cfg.models_dir, config_hash=config_hash(cfg, pipeline))
    total = len(rows)
    done = [0]

    def progress(rec: dict) -> None:
        done[0] += 1
        n_ok = sum(r.get("status") == "ok" and bool(r.get("clip_id")) for r in rec["rows"])
        n_clips = sum(bool(r.get("clip_id")) for r in rec["rows"])
        note = f"{n_clips} clips, {n_ok} ok" if n_clips else f"{rec['status']}: {rec['reason']}"
        print(f"[{done[0]}/{total}] {rec['video_id']}: {note}", flush=True)

    try:
        result = run_pipeline(cfg, pipeline, rows, ctx, runner=args.runner, progress=progress)
    except ResourceError as e:
        print(f"resource error: {e}", file=sys.stderr)
        return 3
    except Exception as e:  # a missing or tampered model stops the run with one clear line, no traceback
        text = str(e)
        for cls in (ModelNotFound, ModelHashMismatch):
            if isinstance(e, cls) or cls.__name__ in text:
                line = next((ln for ln in text.splitlines() if cls.__name__ in ln), text)
                print(f"model error: {line.split(cls.__name__ + ': ')[-1]}", file=sys.stderr)
                return 3
        raise
    summary = summarize(result, source, pipeline, out_dir)
    atomic_write_text(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=2))
    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
