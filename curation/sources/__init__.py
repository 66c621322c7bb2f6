"""Sources: where the long videos come from (Panda-70M CSV, a folder, the bundled sample).

Each source yields one record per input video (or per bad CSV row) with the fields the pipeline expects:
``video_id``, ``source``, ``video_path`` (absolute, or None when rejected), ``status`` ("ok"|"rejected"),
``reason`` (a short code such as ``missing_video``), ``spans`` ([[start_s, end_s], ...] or None = whole
video), ``span_captions`` (parallel to spans, or None), ``url``, ``matching_score`` (parallel to spans, or
None), plus ``warnings`` (list of codes that did not reject the row) and ``detail`` (free text).
"""

from __future__ import annotations

import os
from typing import Any

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v")


def source_record(video_id: str, source: str, **fields: Any) -> dict[str, Any]:
    """A source record with every standard field present (JSON-serialisable)."""
    rec: dict[str, Any] = {
        "video_id": video_id,
        "clip_id": None,
        "source": source,
        "video_path": None,
        "status": "ok",
        "reason": None,
        "spans": None,
        "span_captions": None,
        "url": None,
        "matching_score": None,
        "warnings": [],
        "detail": None,
    }
    rec.update(fields)
    return rec


def rejected_record(video_id: str, source: str, reason: str, detail: str | None = None, **fields: Any):
    return source_record(video_id, source, status="rejected", reason=reason, detail=detail, **fields)


def load_source(spec, out_dir: str) -> list[dict[str, Any]]:
    """Records for every input video named by ``spec`` (a ``curation.config.SourceSpec``).

    Configuration errors (missing CSV, missing required column, missing folder) raise at once; problems
    with single rows or files become ``rejected`` records with a ``reason``.
    """
    kind = spec.kind
    if kind == "panda70m":
        from curation.sources.panda70m import read_panda_csv

        if not spec.csv:
            raise ValueError("source panda70m: `csv:` (the Panda-70M metadata CSV) is required")
        videos_dir = spec.videos_dir or os.path.join(out_dir, "videos")
        return read_panda_csv(
            spec.csv, videos_dir, source="panda70m", download=spec.download, limit=spec.limit
        )
    if kind == "dir":
        from curation.sources.folder import list_videos

        if not spec.videos_dir:
            raise ValueError("source dir: `videos_dir:` (the folder to scan) is required")
        return list_videos(spec.videos_dir, limit=spec.limit)
    if kind == "sample":
        from curation.sources.panda70m import read_panda_csv
        from curation.sources.sample import build_sample

        paths = build_sample(spec.sample_dir)
        return read_panda_csv(paths.csv, paths.videos_dir, source="sample", limit=spec.limit)
    raise ValueError(f"unknown source kind {kind!r}; allowed values: ['panda70m', 'dir', 'sample']")
