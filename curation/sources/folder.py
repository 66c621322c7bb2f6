"""Folder source: every video file under a folder (recursively, in sorted order), one record each, spans
None, with its caption from a sidecar file when there is one.

Captions, first found wins: ``<name>.txt`` beside the video (``clip.mp4`` -> ``clip.txt``), else a row of a
captions file with columns ``video,caption`` (CSV with a header, or JSONL objects): the one named by the
source's ``csv:``, else ``captions.csv`` / ``captions.jsonl`` at the folder's top. ``video`` may be the
path relative to the folder, the file name, or the name without extension. The captions file is indexed by
64-bit key hash -> byte offset (16 bytes a row), and a caption is read from the file when its video comes
up, so a million-row captions file does not sit in memory.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np

from curation.sources import VIDEO_EXTENSIONS, rejected_record, source_record

CAPTION_FILES = ("captions.csv", "captions.jsonl")
MAX_CAPTION_CHARS = 20_000  # a sidecar bigger than this is not a caption


def video_id_for(rel_path: str) -> str:
    """A stable, unique id for a relative path: a readable slug plus 6 hex of the path's sha1, so that
    ``a b.mp4`` and ``a_b.mp4`` (same slug) or ``x.mp4`` and ``x.mkv`` still get different ids."""
    rel = rel_path.replace(os.sep, "/")
    stem, _ = os.path.splitext(rel)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", stem).strip("-").lower()[:60] or "video"
    return f"{slug}-{hashlib.sha1(rel.encode('utf-8', 'surrogatepass')).hexdigest()[:6]}"


def _key_hash(key: str) -> int:
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def _norm_key(key: str) -> str:
    return str(key).strip().replace("\\", "/").lstrip("./") if key is not None else ""


def _lookup_keys(rel: str) -> list[str]:
    """What a captions file may call the video at ``rel``: the relative path, the file name, either
    without its extension."""
    rel = rel.replace(os.sep, "/")
    name = rel.rsplit("/", 1)[-1]
    keys = [rel, name, os.path.splitext(rel)[0], os.path.splitext(name)[0]]
    return list(dict.fromkeys(keys))


class CaptionIndex:
    """``video,caption`` rows of a CSV (header required) or JSONL file, found by video key."""

    def __init__(self, path: str):
        self.path = path
        self.jsonl = path.lower().endswith((".jsonl", ".ndjson"))
        keys, offsets = [], []
        with open(path, "rb") as f:
            for key, off in self._scan(f):
                keys.append(_key_hash(key))
                offsets.append(off)
        order = np.argsort(np.asarray(keys, np.int64), kind="stable")
        self.keys = np.asarray(keys, np.int64)[order]  # (n,) sorted key hashes
        self.offsets = np.asarray(offsets, np.int64)[order]  # (n,) byte offset of each row
        self._f = None

    def __len__(self) -> int:
        return len(self.keys)

    def _scan(self, f) -> Iterator[tuple[str, int]]:
        """(normalised video key, byte offset of its row) for every row."""
        if self.jsonl:
            while True:
                off, line = f.tell(), f.readline()
                if not line:
                    return
                rec = self._parse_jsonl(line)
                if rec is not None:
                    yield _norm_key(rec[0]), off
            return
        state = {"n": 0, "want": 0, "start": 0}

        def lines():  # csv.reader reads exactly the lines of one record: note where each record starts
            while True:
                off, line = f.tell(), f.readline()
                if not line:
                    return
                if state["n"] == state["want"]:
                    state["start"] = off
                state["n"] += 1
                yield line.decode("utf-8-sig" if off == 0 else "utf-8", "replace")

        reader = csv.reader(lines())
        try:
            header = [h.strip().lower() for h in next(reader)]
        except (StopIteration, csv.Error):
            raise ValueError(f"captions file {self.path}: no header (expected video,caption)") from None
        if "video" not in header or "caption" not in header:
            raise ValueError(f"captions file {self.path}: header {header} lacks the columns video,caption")
        self.vcol, self.ccol = header.index("video"), header.index("caption")
        while True:
            state["want"] = state["n"]
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error:
                continue  # a malformed row: that video simply has no caption from this file
            if len(cells) > max(self.vcol, self.ccol):
                yield _norm_key(cells[self.vcol]), state["start"]

    @staticmethod
    def _parse_jsonl(line: bytes) -> tuple[str, str] | None:
        try:
            rec = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(rec, dict) or not isinstance(rec.get("video"), str):
            return None
        cap = rec.get("caption")
        return rec["video"], cap if isinstance(cap, str) else None

    def _row_at(self, off: int) -> tuple[str, str | None] | None:
        if self._f is None:
            self._f = open(self.path, "rb")
        self._f.seek(off)
        if self.jsonl:
            return self._parse_jsonl(self._f.readline())

        def lines():
            while True:
                line = self._f.readline()
                if not line:
                    return
                yield line.decode("utf-8-sig" if off == 0 else "utf-8", "replace")

        try:
            cells = next(csv.reader(lines()))
        except (StopIteration, csv.Error):
            return None
        if len(cells) <= max(self.vcol, self.ccol):
            return None
        return cells[self.vcol], cells[self.ccol]

    def get(self, keys: list[str]) -> str | None:
        """The caption of the first of ``keys`` that has a row (hash hits are checked against the row)."""
        for key in keys:
            key = _norm_key(key)
            h = _key_hash(key)
            i = int(np.searchsorted(self.keys, h))
            while i < len(self.keys) and self.keys[i] == h:
                row = self._row_at(int(self.offsets[i]))
                if row is not None and _norm_key(row[0]) == key:
                    return row[1]
                i += 1
        return None

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def captions_file(root: str, named: str = "") -> str | None:
    """The captions file for folder ``root``: ``named`` (relative to the folder, or absolute), else
    ``captions.csv`` / ``captions.jsonl`` at its top, else None. A named file that is missing raises."""
    if named:
        path = named if os.path.isabs(named) else os.path.join(root, named)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"captions file {named} does not exist")
        return path
    for name in CAPTION_FILES:
        path = os.path.join(root, name)
        if os.path.isfile(path):
            return path
    return None


def sidecar_caption(video_path: str) -> str | None:
    """The text of ``<name>.txt`` beside the video (whitespace folded), or None."""
    txt = os.path.splitext(video_path)[0] + ".txt"
    try:
        if os.path.getsize(txt) > MAX_CAPTION_CHARS * 4:
            return None
        with open(txt, encoding="utf-8", errors="replace") as f:
            text = " ".join(f.read(MAX_CAPTION_CHARS).split())
    except OSError:
        return None
    return text or None


def walk_videos(root: str) -> Iterator[str]:
    """Relative paths of the video files under ``root`` in sorted order of the whole path (a folder's
    entries sorted with each sub-folder keyed ``name/``, which is the same order), hidden files and folders
    skipped, symlinked folders not followed. One listing per folder level is in memory, not the tree."""
    real_root = os.path.realpath(root)

    def walk(rel_dir: str) -> Iterator[str]:
        try:
            with os.scandir(os.path.join(real_root, rel_dir)) as it:
                entries = [(e.name + ("/" if e.is_dir(follow_symlinks=False) else ""), e.name) for e in it]
        except OSError:
            return  # an unreadable folder: nothing from it
        for key, name in sorted(entries):
            if name.startswith("."):
                continue
            rel = os.path.join(rel_dir, name) if rel_dir else name
            if key.endswith("/"):
                yield from walk(rel)
            elif name.lower().endswith(VIDEO_EXTENSIONS):
                yield rel

    return walk("")


def has_any_caption(root: str, named: str = "") -> bool:
    """True when the folder has a captions file or at least one video with a sidecar ``.txt`` (stops at the
    first one found: a scan of names only)."""
    if captions_file(root, named):
        return True
    real_root = os.path.realpath(root)
    return any(
        os.path.isfile(os.path.splitext(os.path.join(real_root, rel))[0] + ".txt")
        for rel in walk_videos(root)
    )


def iter_videos(root: str, limit: int = 0, captions: str = "") -> Iterator[dict[str, Any]]:
    """Records for every video under ``root`` (extensions in ``VIDEO_EXTENSIONS``, case-insensitive,
    hidden files skipped), yielded as the folder is walked. Symlinks are not followed into folders; a
    symlinked file whose target lies outside ``root`` is ``rejected`` (``outside_root``), an empty file is
    ``rejected`` (``empty_file``). A video's caption (see the module docstring) is its ``span_captions``
    ``[caption]`` (``caption_source`` says where it came from); without one it is None and the record
    warns ``no_caption``. A missing folder or named captions file raises at once."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"videos folder {root} does not exist")
    index_path = captions_file(root, captions)
    index = CaptionIndex(index_path) if index_path else None
    return _iter_videos(root, limit, index)


def _iter_videos(root: str, limit: int, index: CaptionIndex | None) -> Iterator[dict[str, Any]]:
    real_root = os.path.realpath(root)
    seen: set[int] = set()  # 8-byte hashes of the ids given out, to lengthen a colliding one
    n = 0
    try:
        for rel in walk_videos(root):
            if limit and n >= limit:
                return
            n += 1
            vid = video_id_for(rel)
            if _key_hash(vid) in seen:  # a sha1 prefix collision: lengthen deterministically
                vid = f"{vid}-{hashlib.sha1(rel.encode('utf-8', 'surrogatepass')).hexdigest()[6:14]}"
            seen.add(_key_hash(vid))
            path = os.path.join(real_root, rel)
            real = os.path.realpath(path)
            if os.path.commonpath([real_root, real]) != real_root:
                yield rejected_record(vid, "dir", "outside_root", f"{rel} links outside {root}", rel_path=rel)
            elif not os.path.isfile(real) or os.path.getsize(real) == 0:
                yield rejected_record(vid, "dir", "empty_file", f"{rel} is empty or not a file", rel_path=rel)
            else:
                caption, origin = sidecar_caption(path), "sidecar_txt"
                if caption is None and index is not None:
                    text = index.get(_lookup_keys(rel)) or ""
                    caption = " ".join(text.split())[:MAX_CAPTION_CHARS] or None
                    origin = os.path.basename(index.path)
                fields = {"video_path": real, "rel_path": rel}
                if caption:
                    fields.update(span_captions=[caption], caption_source=origin)
                else:
                    fields["warnings"] = ["no_caption"]
                yield source_record(vid, "dir", **fields)
    finally:
        if index is not None:
            index.close()


def list_videos(root: str, limit: int = 0, captions: str = "") -> list[dict[str, Any]]:
    """``list(iter_videos(...))``: every record in memory (tests, small folders)."""
    return list(iter_videos(root, limit, captions))
