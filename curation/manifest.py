"""The durable run manifest: one atomically written JSON file per input video holding its status and every
clip row it produced, so a killed run resumes without redoing finished videos."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

_SAFE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,120}$")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def video_status(rows: list[dict]) -> tuple[str, str | None]:
    """A video is ``done`` when it produced at least one clip row; otherwise it carries its row's status."""
    if any(r.get("clip_id") for r in rows):
        return "done", None
    r = rows[0] if rows else {}
    return r.get("status", "failed"), r.get("reason") or r.get("error") or "no_rows"


class Manifest:
    """``<out_dir>/manifest/videos/<xx>/<video>.json``, one file per input video."""

    def __init__(self, out_dir: str | Path):
        self.root = Path(out_dir) / "manifest" / "videos"

    def path(self, video_id: str) -> Path:
        digest = hashlib.sha1(video_id.encode()).hexdigest()
        name = video_id if _SAFE.match(video_id) else f"id-{digest}"
        return self.root / digest[:2] / f"{name}.json"

    def load(self, video_id: str) -> dict | None:
        p = self.path(video_id)
        if not p.exists():
            return None
        try:
            with open(p) as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError):
            return None  # unreadable = not done; the video is redone and the file rewritten

    def is_done(self, video_id: str, config_hash: str) -> bool:
        rec = self.load(video_id)
        return rec is not None and rec.get("config_hash") == config_hash

    def commit(self, video_id: str, rows: list[dict], config_hash: str) -> dict:
        rows = sorted(rows, key=lambda r: (r.get("clip_id") or ""))
        status, reason = video_status(rows)
        rec = {
            "video_id": video_id,
            "status": status,
            "reason": reason,
            "config_hash": config_hash,
            "committed_at": time.time(),
            "rows": rows,
        }
        atomic_write_text(self.path(video_id), json.dumps(rec, sort_keys=True))
        return rec

    def records(self) -> Iterator[dict]:
        if not self.root.exists():
            return
        for p in sorted(self.root.glob("*/*.json")):
            try:
                with open(p) as f:
                    yield json.load(f)
            except (OSError, json.JSONDecodeError):
                continue

    def rows(self, config_hash: str | None = None) -> list[dict]:
        """Every committed row (optionally only those made under ``config_hash``), in a stable order."""
        out = []
        for rec in self.records():
            if config_hash is None or rec.get("config_hash") == config_hash:
                out.extend(rec["rows"])
        return sorted(out, key=lambda r: (r.get("video_id") or "", r.get("clip_id") or ""))


def count_reasons(rows: list[dict]) -> Counter:
    return Counter(r.get("reason") or "?" for r in rows if r.get("status") in ("rejected", "failed"))
