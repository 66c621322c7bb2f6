"""The durable run manifest and the per-group cache, both in the output store (a local folder or s3://):

- ``manifest/videos/<xx>/<video>.json``: one record per input video once its last map group finished
  (status, every clip row, a small summary, the map-phase hash), written by the worker that finished it;
- ``cache/<group>-<hash>/<xx>/<video>.tar``: a video's pack after a map group (``curation.packs``): its rows
  and, on an object store, the files the group made (clips, crops, embeddings), keyed by the hash of the
  stages up to and including that group, so a changed later stage re-runs from there and reuses the
  earlier groups' work instead of redoing it.

Each file is written atomically, so a run killed at any moment leaves whole records or none."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from curation.packs import read_head, write_pack
from curation.storage import Store

_SAFE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,120}$")


def video_status(rows: list[dict]) -> tuple[str, str | None]:
    """A video is ``done`` when it produced at least one clip row; otherwise it carries its row's status."""
    if any(r.get("clip_id") for r in rows):
        return "done", None
    r = rows[0] if rows else {}
    return r.get("status", "failed"), r.get("reason") or r.get("error") or "no_rows"


def video_summary(rows: list[dict]) -> dict:
    """The counts the run summary needs from one video, so the driver never reloads its rows."""
    clips = [r for r in rows if r.get("clip_id")]
    return {
        "n_clips": len(clips),
        "n_ok": sum(r.get("status") == "ok" for r in clips),
        "reasons": dict(count_reasons(rows)),
        "filters_off": sorted({k[: -len("_off")] for r in clips for k, v in r.items()
                               if k.endswith("_off") and v}),
    }


def video_rel(prefix: str, video_id: str, suffix: str = ".json") -> str:
    """``<prefix>/<xx>/<name><suffix>``: a sharded path whose name never escapes ``prefix``."""
    digest = hashlib.sha1(video_id.encode()).hexdigest()
    name = video_id if _SAFE.match(video_id) else f"id-{digest}"
    return f"{prefix}/{digest[:2]}/{name}{suffix}"


class Manifest:
    """Final per-video records under ``<out>/manifest/videos``."""

    PREFIX = "manifest/videos"

    def __init__(self, out: str | os.PathLike | Store):
        self.store = out if isinstance(out, Store) else Store(out)

    @property
    def root(self) -> Path:  # local stores only (tests, inspection)
        return Path(self.store.path(self.PREFIX))

    def rel(self, video_id: str) -> str:
        return video_rel(self.PREFIX, video_id)

    def path(self, video_id: str) -> Path:
        return Path(self.store.path(self.rel(video_id)))

    def load(self, video_id: str) -> dict | None:
        # unreadable = not done; the video is redone and the file rewritten
        return self.store.read_json(self.rel(video_id), default=None)

    def is_done(self, video_id: str, config_hash: str) -> bool:
        rec = self.load(video_id)
        return rec is not None and rec.get("config_hash") == config_hash and rec.get("status") != "failed"

    def commit(self, video_id: str, rows: list[dict], config_hash: str, **extra) -> dict:
        rows = sorted(rows, key=lambda r: (r.get("clip_id") or ""))
        status, reason = video_status(rows)
        rec = {
            "video_id": video_id,
            "status": status,
            "reason": reason,
            "config_hash": config_hash,
            "committed_at": time.time(),
            "summary": video_summary(rows),
            **extra,
            "rows": rows,
        }
        self.store.write_json(self.rel(video_id), rec)
        return rec

    def records(self) -> Iterator[dict]:
        for rel in self.store.list(self.PREFIX, suffix=".json"):
            rec = self.store.read_json(rel)
            if rec is not None:
                yield rec

    def rows(self, config_hash: str | None = None) -> list[dict]:
        """Every committed row (optionally only those made under ``config_hash``), in a stable order. For
        tests and small inspections: it holds every row in memory, so the runner never calls it."""
        out = []
        for rec in self.records():
            if config_hash is None or rec.get("config_hash") == config_hash:
                out.extend(rec["rows"])
        return sorted(out, key=lambda r: (r.get("video_id") or "", r.get("clip_id") or ""))


class GroupCache:
    """A video after map group ``group`` under hash ``h``: one pack ``cache/<group>-<h>/<xx>/<video>.tar``
    whose head holds its rows, the source signature and the earlier groups' packs, and whose members are the
    files the group made (none on a local store, where they stay in place)."""

    def __init__(self, store: Store):
        self.store = store

    def rel(self, group: str, h: str, video_id: str) -> str:
        return video_rel(f"cache/{group}-{h}", video_id, ".tar")

    def load(self, group: str, h: str, video_id: str, source_sig: str) -> dict | None:
        """``{"rows", "packs"}`` (every pack that holds the video's files so far, this one included) when the
        pack exists for this source; else None."""
        rel = self.rel(group, h, video_id)
        head = read_head(self.store, rel)
        if not head or head.get("source_sig") != source_sig:
            return None
        packs = list(head.get("packs") or [])
        return {"rows": head["rows"], "packs": packs + [rel] if head.get("members") else packs}

    def save(self, group: str, h: str, video_id: str, rows: list[dict], source_sig: str,
             files: dict[str, str], packs: list[str], scratch: str) -> tuple[str, dict[str, str]]:
        """Write the video's pack: ``files`` (member -> local file) and a head with ``rows`` and ``packs``
        (the earlier groups'). Returns (its path, member -> packed reference)."""
        rel = self.rel(group, h, video_id)
        head = {"video_id": video_id, "group": group, "hash": h, "source_sig": source_sig, "rows": rows,
                "packs": packs, "members": sorted(files)}
        return rel, write_pack(self.store, rel, head, files, scratch)


def count_reasons(rows: list[dict]) -> Counter:
    return Counter(r.get("reason") or "?" for r in rows if r.get("status") in ("rejected", "failed"))


def source_signature(row: dict) -> str:
    """What in a source row decides a video's map-phase output: a changed CSV row re-runs the video."""
    keep = {k: row.get(k) for k in ("video_id", "spans", "span_captions", "status", "reason")}
    # the file's name, not its folder: the same videos seen from another checkout or mount are not redone
    keep["video_file"] = os.path.basename(str(row.get("video_path") or ""))
    return hashlib.sha1(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]
