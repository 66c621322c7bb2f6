"""Sources: where the long videos come from (Panda-70M CSV, a folder, the bundled sample).

Each source yields one record per input video (or per bad CSV row) with the fields the pipeline expects:
``video_id``, ``source``, ``video_path`` (absolute, or None when rejected), ``status`` ("ok"|"rejected"),
``reason`` (a short code such as ``missing_video``), ``spans`` ([[start_s, end_s], ...] or None = whole
video), ``span_captions`` (parallel to spans, or None), ``url``, ``matching_score`` (parallel to spans, or
None), plus ``warnings`` (list of codes that did not reject the row) and ``detail`` (free text). A Panda-70M
record may add ``span_labels`` / ``span_shot_boundaries`` (parallel to spans) and ``skipped_spans`` (spans
taken out by ``keep_labels`` before any download or decode, each with its ``panda:<label>`` reason).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
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


def load_source(spec, out_dir: str) -> Iterator[dict[str, Any]]:
    """Records for every input video named by ``spec`` (a ``curation.config.SourceSpec``), as an iterator
    consumed once (a 3.8M-row CSV or a million-file folder is never held in a list). A Panda-70M CSV's
    iterator (``panda70m.PandaRecords``) also says what to read (``.ingest``), so the Ray runner converts
    the CSV with Ray tasks (``curation.ingest``) instead of iterating it in the driver.

    Configuration errors (missing CSV, missing required column, missing folder) raise at once, before the
    first record; problems with single rows or files become ``rejected`` records with a ``reason``.
    """
    kind = spec.kind
    if kind == "panda70m":
        from curation.sources.panda70m import iter_panda_csv

        if not spec.csv:
            raise ValueError("source panda70m: `csv:` (the Panda-70M metadata CSV) is required")
        videos_dir = spec.videos_dir or os.path.join(out_dir, "videos")
        return iter_panda_csv(spec.csv, videos_dir, source="panda70m", limit=spec.limit,
                              keep_labels=getattr(spec, "keep_labels", None))
    if kind == "dir":
        from curation.sources.folder import iter_videos

        if not spec.videos_dir:
            raise ValueError("source dir: `videos_dir:` (the folder to scan) is required")
        return iter_videos(spec.videos_dir, limit=spec.limit, captions=spec.csv)
    if kind == "sample":
        from curation.sources.sample import iter_sample

        return iter_sample(spec.sample_dir, limit=spec.limit)
    raise ValueError(f"unknown source kind {kind!r}; allowed values: ['panda70m', 'dir', 'sample']")


# Captioners that only pass on the caption the source brought (no model): a source without captions gives
# them nothing to pass on.
OFFLINE_CAPTIONERS = ("source_caption",)


def _get(obj, key: str, default=None):
    return obj.get(key, default) if isinstance(obj, dict) else getattr(obj, key, default)


def check_source_for_pipeline(source_spec, stage_specs) -> str | None:
    """One line saying what to configure when this source cannot work with this pipeline, else None.
    Cheap (names and headers only), so a run can call it before starting Ray.

    Checked: the source's folder / CSV exist; and a ``dir`` source whose videos have no captions at all
    (no ``<name>.txt`` sidecar, no captions CSV/JSONL) under a pipeline whose caption stage only passes
    the source's captions on (``source_caption``), where every clip would end ``caption:missing``."""
    kind = _get(source_spec, "kind")
    videos_dir, csv_path = _get(source_spec, "videos_dir") or "", _get(source_spec, "csv") or ""
    if kind == "panda70m":
        if not csv_path:
            return "source panda70m: set `csv:` (or CSV=...) to the Panda-70M metadata CSV"
        from curation.storage import Store, is_uri

        if is_uri(csv_path):
            parent, name = csv_path.rsplit("/", 1)
            if not Store(parent).is_file(name):
                return f"source panda70m: the CSV {csv_path} does not exist"
        elif not os.path.isfile(csv_path):
            return f"source panda70m: the CSV {csv_path} does not exist"
        if videos_dir and not is_uri(videos_dir) and not os.path.isdir(videos_dir) \
                and not _get(source_spec, "download"):
            return f"source panda70m: the videos folder {videos_dir} does not exist (or set download: true)"
        return None
    if kind != "dir":
        return None
    from curation.sources.folder import CAPTION_FILES, has_any_caption

    if not videos_dir:
        return "source dir: set `videos_dir:` (or VIDEOS=...) to the folder of videos"
    if not os.path.isdir(videos_dir):
        return f"source dir: the videos folder {videos_dir} does not exist"
    if csv_path and not os.path.isfile(
        csv_path if os.path.isabs(csv_path) else os.path.join(videos_dir, csv_path)
    ):
        return f"source dir: the captions file {csv_path} (csv:) does not exist"
    caption = next((s for s in stage_specs or [] if _get(s, "stage") == "caption"), None)
    if caption is None:
        return None
    backend = _get(caption, "backend") or {}
    name = backend.get("name", "source_caption") if isinstance(backend, dict) else str(backend)
    if name not in OFFLINE_CAPTIONERS or has_any_caption(videos_dir, csv_path):
        return None
    return (
        f"source dir {videos_dir}: no captions (no <video name>.txt beside the videos, no "
        f"{' / '.join(CAPTION_FILES)} with columns video,caption) and the caption stage's backend "
        f"{name!r} only passes source captions on: add captions, or set the caption stage's backend to a "
        "captioner (e.g. {name: qwen2_5_vl, model_path: ...} or {name: openai_compatible, base_url: ...})"
    )
