"""Folder source: every video file under a folder (recursively, sorted), one record each, spans None."""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any

from curation.sources import VIDEO_EXTENSIONS, rejected_record, source_record


def video_id_for(rel_path: str) -> str:
    """A stable, unique id for a relative path: a readable slug plus 6 hex of the path's sha1, so that
    ``a b.mp4`` and ``a_b.mp4`` (same slug) or ``x.mp4`` and ``x.mkv`` still get different ids."""
    rel = rel_path.replace(os.sep, "/")
    stem, _ = os.path.splitext(rel)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", stem).strip("-").lower()[:60] or "video"
    return f"{slug}-{hashlib.sha1(rel.encode('utf-8', 'surrogatepass')).hexdigest()[:6]}"


def list_videos(root: str, limit: int = 0) -> list[dict[str, Any]]:
    """Records for every video under ``root`` (extensions in ``VIDEO_EXTENSIONS``, case-insensitive,
    hidden files skipped). Symlinks are not followed into folders; a symlinked file whose target lies
    outside ``root`` is ``rejected`` (``outside_root``), an empty file is ``rejected`` (``empty_file``)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"videos folder {root} does not exist")
    real_root = os.path.realpath(root)
    rels = []
    for dirpath, dirnames, filenames in os.walk(real_root, followlinks=False):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith(".") or not name.lower().endswith(VIDEO_EXTENSIONS):
                continue
            rels.append(os.path.relpath(os.path.join(dirpath, name), real_root))
    rels.sort()
    if limit:
        rels = rels[:limit]
    records = []
    seen: dict[str, str] = {}
    for rel in rels:
        vid = video_id_for(rel)
        if vid in seen:  # a sha1 prefix collision: lengthen deterministically
            vid = f"{vid}-{hashlib.sha1(rel.encode('utf-8', 'surrogatepass')).hexdigest()[6:14]}"
        seen[vid] = rel
        path = os.path.join(real_root, rel)
        real = os.path.realpath(path)
        if os.path.commonpath([real_root, real]) != real_root:
            records.append(
                rejected_record(vid, "dir", "outside_root", f"{rel} links outside {root}", rel_path=rel)
            )
        elif not os.path.isfile(real) or os.path.getsize(real) == 0:
            records.append(
                rejected_record(vid, "dir", "empty_file", f"{rel} is empty or not a file", rel_path=rel)
            )
        else:
            records.append(source_record(vid, "dir", video_path=real, rel_path=rel))
    return records
