"""`python -m curation.run`: curate a source with a named pipeline from pipelines.yaml, print a summary."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from curation.config import ConfigError
from curation.models import ModelHashMismatch, ModelNotFound, ModelUnpinned
from curation.runner import ResourceError, StageFailureError, load_pipeline_config, run_pipeline
from curation.sources import check_source_for_pipeline, load_source
from curation.stage import StageContext
from curation.storage import Store, is_uri

EPILOG = """exit status:
  0  every video was curated or rejected (a rejection is a decision: bad video, filters)
  2  config or source error
  3  resource or model error (nothing was curated)
  4  run stopped: a stage failed on too many rows
  5  the run finished and published what succeeded, but some videos FAILED (a store error, a stage
     exception): the last line says how many; the same command again retries exactly those videos
"""

EXIT_VIDEOS_FAILED = 5


def summarize(result, source: str, pipeline: str, out_dir: str) -> dict:
    """The run summary from the streamed per-video counts and the global phase's counts (no rows)."""
    t, g = result.totals, result.global_summary
    summary = {
        "source": source,
        "pipeline": pipeline,
        "out_dir": out_dir,
        "map_hash": result.map_hash,
        "videos_in": result.videos_in,
        "videos_skipped_already_done": result.videos_skipped,
        "videos_processed_now": result.videos_committed,
        "videos_with_clips": t.get("videos_with_clips", 0),
        "videos_rejected": t.get("videos_rejected", 0),
        # videos that ended `failed` (an error, not a decision): a rerun retries them
        "videos_failed": t.get("videos_failed", 0),
        "failed_by_reason": t.get("failed_by_reason", {}),
        "failed_video_ids": t.get("failed_video_ids", []),
        "clips": t.get("clips", 0),
        "clips_ok": t.get("clips_ok", 0),
        "rejections_by_reason": t.get("reasons", {}),
        # spans the source skipped before download and decode (Panda-70M's keep_labels), by reason
        "spans_skipped": t.get("spans_skipped", 0),
        "spans_skipped_by_reason": t.get("spans_skipped_by_reason", {}),
        "triplets_out": g.get("triplets_out", 0),
        "triplets_by_pair_type": g.get("triplets_by_pair_type", {}),
        "global": {k: v for k, v in g.items() if k not in ("triplets_out", "triplets_by_pair_type")},
        "filters_off": t.get("filters_off", []),
        # model files loaded under `sha256: unpinned` (unchecked) for the videos of this output
        "unpinned_model_files": list(result.unpinned_model_files),
        "wall_s": round(result.wall_s, 1),
        "map_wall_s": round(result.map_wall_s, 1),
        "global_wall_s": round(result.global_wall_s, 1),
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
    ap = argparse.ArgumentParser(description=__doc__, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="pipelines.yaml")
    ap.add_argument("--source", default=None, help="a source from pipelines.yaml")
    ap.add_argument("--pipeline", default=None, help="a pipeline name (default: default_pipeline)")
    ap.add_argument("--out", default=None,
                    help="output folder or URI such as s3://bucket/run (default: <output_dir>/<source>)")
    ap.add_argument("--videos-dir", dest="videos_dir", default=None,
                    help="the source's video folder (dir: the folder to scan; panda70m: {videoID}.mp4 files)")
    ap.add_argument("--csv", default=None, help="panda70m: the metadata CSV")
    ap.add_argument("--runner", choices=["ray", "sequential"], default="ray")
    ap.add_argument("--limit", type=int, default=None, help="only the first N videos")
    ap.add_argument("--videos", default="", help="only these video ids (comma-separated)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    try:
        cfg = load_pipeline_config(args.config)
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
    if not is_uri(out_dir):
        out_dir = os.path.abspath(out_dir)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    spec = cfg.sources[source]
    if args.limit is not None:
        spec.limit = args.limit
    if args.videos_dir:
        spec.videos_dir = args.videos_dir
    if args.csv:
        spec.csv = args.csv
    if spec.kind == "panda70m" and spec.download:  # optional first stage: fetch what is missing
        from curation.download import download_source

        spec.videos_dir = spec.videos_dir or os.path.join(out_dir, "videos")
        download_source(spec, spec.videos_dir, cfg=cfg, runner="ray" if args.runner == "ray" else "threads")
        spec.download = False  # fetched by the step; the CSV reader then only finds the files
    problem = check_source_for_pipeline(spec, cfg.pipelines[pipeline])
    if problem:
        print(f"config error: {problem}", file=sys.stderr)
        return 2
    try:
        if spec.kind == "sample":  # the demo footage is generated here; the source only reads the folder
            from curation.demo.footage import build_sample

            build_sample(spec.sample_dir)  # idempotent: a current build is left as it is
        rows = load_source(spec, out_dir if not is_uri(out_dir) else os.path.join(cfg.output_dir, source))
    except (FileNotFoundError, ValueError) as e:
        print(f"source error: {e}", file=sys.stderr)
        return 2
    if args.videos:
        wanted = set(args.videos.split(","))
        rows = (r for r in rows if r["video_id"] in wanted)
    ctx = StageContext(out_dir=out_dir, models_dir=cfg.models_dir)
    done = [0]

    def progress(item: dict) -> None:
        done[0] += 1
        s = item.get("summary") or {}
        if s.get("n_clips"):
            note = f"{s['n_clips']} clips, {s.get('n_ok', 0)} ok"
        else:
            note = f"{item.get('status')}: {item.get('reason')}"
        print(f"[{done[0]}] {item['video_id']}: {note}", flush=True)

    try:
        result = run_pipeline(cfg, pipeline, rows, ctx, runner=args.runner, progress=progress)
    except ResourceError as e:
        print(f"resource error: {e}", file=sys.stderr)
        return 3
    except StageFailureError as e:
        print(f"run stopped: {e}", file=sys.stderr)
        return 4
    except Exception as e:  # a missing or tampered model stops the run with one clear line, no traceback
        text = str(e)
        for cls in (ModelNotFound, ModelHashMismatch, ModelUnpinned):
            if isinstance(e, cls) or cls.__name__ in text:
                line = next((ln for ln in text.splitlines() if cls.__name__ in ln), text)
                print(f"model error: {line.split(cls.__name__ + ': ')[-1]}", file=sys.stderr)
                return 3
        raise
    summary = summarize(result, source, pipeline, out_dir)
    Store(out_dir).write_json("summary.json", summary, indent=2)
    print_summary(summary)
    line = failed_line(summary)
    if line:
        print(line, flush=True)
        return EXIT_VIDEOS_FAILED
    return 0


def failed_line(summary: dict) -> str:
    """The run's last line when videos failed (empty when none did)."""
    n = summary.get("videos_failed", 0)
    if not n:
        return ""
    reasons = ", ".join(f"{k}: {v}" for k, v in summary.get("failed_by_reason", {}).items())
    ids = summary.get("failed_video_ids", [])
    shown = ", ".join(ids) + (", ..." if n > len(ids) else "")
    return (f"FAILED: {n} video{'s' if n != 1 else ''} failed ({reasons}; {shown}); the output holds the "
            f"others. Run the same command again to retry {'them' if n != 1 else 'it'} "
            f"(exit status {EXIT_VIDEOS_FAILED}).")


if __name__ == "__main__":
    sys.exit(main())
