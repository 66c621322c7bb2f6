"""The download step: each Panda-70M CSV row's video fetched with yt-dlp into a Store, resumable and polite.

``python -m curation.download --config pipelines.yaml --source panda70m [--csv ... --videos ...]`` or,
from ``curation.run``, ``download_source(spec, store)``. ``store`` is the videos folder (local or s3://):
videos land at ``{videoID}.{mp4|mkv|webm}``, the names ``read_panda_csv`` looks for.

Decisions:
- One call per video on a pool of long-lived workers (Ray actors pinned to their node; ``runner="threads"``
  runs the same function in a thread pool, one node ``local``). The limits hold per node, since sites
  rate-limit per egress address: at most ``per_node_concurrency`` (8) downloads in flight on a node, at most
  ``per_host_concurrency`` (4) per (node, host), starts per (node, host) spaced by ``1 /
  per_host_rate_per_s`` (2/s); ``concurrency`` (0) caps the whole cluster when > 0, else it is
  ``per_node_concurrency`` x the nodes (alive Ray nodes with ``num_cpus`` CPUs, read at start, every
  ``nodes_every_s`` and after a call whose worker died: a node that joins gets downloads, one that leaves
  gets no more and its calls in flight are retried elsewhere, each losing one try). A row goes
  to the least-loaded node with room in both windows whose rate allows a start now; a ``rate_limited``
  answer backs off only that (node, host). The driver streams the CSV in chunks of ``chunk_rows``; rows
  waiting on busy hosts are buffered (at most two chunks), never the whole CSV. The summary names the nodes
  and, per node, its download calls, videos downloaded and most downloads in flight at once.
- Each video is fetched into a local temporary folder, probed with PyAV (a decodable video stream, its
  duration and size under the caps), then copied into the store under a temporary name and renamed
  (``Store.put_file``); a killed run leaves at most a temporary folder outside the store, named with its
  process id and removed (with yt-dlp's ``.part`` file) by the next run or worker that starts on the node
  once that process is gone. Files are written with the umask's modes (shared storage can read them).
- The log is one small JSON object per video at ``_download/log/<xx>/<videoID>.json`` (status
  ``done`` | ``failed``, reason, retryable, attempts, bytes, mode): a rerun skips done videos whose file
  is still there, and permanent failures; it retries retryable ones, up to ``max_total_attempts`` over all
  runs (then ``gave_up:<reason>``). A failure the user's config decided (``bad_url``: allowed_hosts,
  ``too_large``: max_filesize_mb, ``too_long``: max_duration_s, ``no_format``: max_height) logs those
  values as ``decided_by``; a run whose value differs tries the video again. The Panda reader reads the
  log of a missing video and rejects its row with ``download:<reason>``. Nothing is rewritten in full.
- Transient errors (HTTP 5xx / 429 / 403, timeouts, truncated bodies, dropped connections) are retried with
  exponential backoff (``backoff_s`` doubling, capped, jittered) up to ``max_attempts`` per run; permanent
  ones (unavailable, private, geo_blocked, age_restricted, not_found, not_a_video, too_long, too_large,
  live, no_format, bad_url) are recorded at once.
- The URL comes from the CSV's ``url`` column only when its host is in ``allowed_hosts`` (YouTube by
  default; an entry is a host, on any port, or ``host:port``), else the row fails as ``bad_url``; an empty
  url becomes ``https://www.youtube.com/watch?v=<id>``.
- Format: an H.264 MP4 at most ``max_height`` (video+audio merged by ffmpeg when present, else a
  progressive file). Sections (``sections: true``): when the site reports the duration and the CSV spans,
  padded and merged into one range, cover at most ``sections_max_fraction`` of it, only that range is
  fetched (yt-dlp ``download_ranges``, needs ffmpeg); the log says ``mode: section`` and
  ``time_offset_s`` (the file's 0 is that time in the source: subtract it from the CSV spans).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import csv
import dataclasses
import heapq
import importlib
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlparse

from curation.config import ConfigError, DownloadParams, from_dict, load_yaml, parse_download_params
from curation.execute import worker_pool
from curation.sources.panda70m import DOWNLOAD_LOG_PREFIX, download_log_rel, section_offset
from curation.video_io import FFMPEG

LOG_PREFIX = DOWNLOAD_LOG_PREFIX
VIDEO_EXTS = ("mp4", "mkv", "webm")
PERMANENT = ("unavailable", "private", "geo_blocked", "age_restricted", "not_found", "not_a_video",
             "too_long", "too_large", "live", "no_format", "bad_url", "bad_video_id")
# Failures the user's own config decided: the log keeps those params' values (``decided_by``) and a later run
# whose value differs tries the video again.
DECIDED_BY = {"bad_url": ("allowed_hosts",), "too_large": ("max_filesize_mb",),
              "too_long": ("max_duration_s",), "no_format": ("max_height",)}


# ---------------------------------------------------------------------------------------------------------
# The log: one small object per video.


def log_rel(video_id: str) -> str:
    return download_log_rel(video_id)  # the Panda reader reads it too (to name a failed download's reason)


def read_log(store, video_id: str) -> dict | None:
    return store.read_json(log_rel(video_id))


def existing_video(store, video_id: str) -> str | None:
    """The store-relative name of ``{video_id}.mp4|mkv|webm`` when one is there."""
    for ext in VIDEO_EXTS:
        if store.is_file(f"{video_id}.{ext}"):
            return f"{video_id}.{ext}"
    return None


def section_offset_s(store, video_id: str) -> float:
    """Seconds to subtract from the CSV spans for this video's file (non-zero in section mode)."""
    return section_offset(read_log(store, video_id))


# ---------------------------------------------------------------------------------------------------------
# Pure logic: URL policy, error classes, sections, format selection.


def host_key(url: str) -> str:
    """The politeness key of a URL: its host without ``www.`` / ``m.``, youtu.be counted as youtube.com."""
    host = (urlparse(url).hostname or "").lower()
    host = re.sub(r"^(www|m)\.", "", host)
    return "youtube.com" if host == "youtu.be" else host


def resolve_url(video_id: str, url: str | None, allowed_hosts: list[str]) -> tuple[str | None, str | None]:
    """(url, None) or (None, reason). An empty url is YouTube's watch page for the id."""
    from curation.sources.panda70m import VIDEO_ID_RE

    if not VIDEO_ID_RE.match(video_id or ""):
        return None, "bad_video_id"
    url = (url or "").strip()
    if not url:
        return f"https://www.youtube.com/watch?v={video_id}", None
    u = urlparse(url)
    allowed = {h.lower() for h in allowed_hosts}
    host = (u.hostname or "").lower()
    try:
        port = u.port
    except ValueError:  # a port that is not a number
        return None, "bad_url"
    # an entry `host` allows the host on any port, `host:port` only that port
    ok = host in allowed or (port is not None and f"{host}:{port}" in allowed)
    if u.scheme not in ("http", "https") or not host or not ok:
        return None, "bad_url"
    return url, None


_ERROR_CLASSES: list[tuple[str, bool, tuple[str, ...]]] = [
    # (reason, transient, lower-case fragments of yt-dlp's message); the first match wins
    ("private", False, ("private video", "this video is private")),
    ("geo_blocked", False, ("not available in your country", "geo restrict", "geo-restrict",
                            "blocked it in your country", "not made this video available in your country")),
    ("age_restricted", False, ("confirm your age", "age-restricted", "age restricted",
                               "inappropriate for some users")),
    ("rate_limited", True, ("http error 429", "too many requests", "not a bot", "rate-limit", "rate limit")),
    ("live", False, ("live event will begin", "premieres in", "this live event")),
    ("unavailable", False, ("video unavailable", "this video is unavailable", "has been removed",
                            "account associated with this video has been terminated", "no longer available",
                            "video is not available", "copyright claim", "violating youtube's")),
    ("not_a_video", False, ("unsupported url", "no video formats found", "not a video")),
    ("no_format", False, ("requested format is not available",)),
    ("not_found", False, ("http error 404", "http error 410", "404: not found")),
    ("http_5xx", True, tuple(f"http error {c}" for c in range(500, 600))),
    ("forbidden", True, ("http error 403",)),
    ("timeout", True, ("timed out", "timeout")),
    ("truncated", True, ("more expected", "content too short", "incompleteread", "incomplete read",
                         "did not get any data blocks")),
    ("connection", True, ("connection reset", "connection refused", "connection aborted",
                          "remote end closed", "broken pipe", "name or service not known",
                          "temporary failure in name resolution", "network is unreachable")),
]


def classify_error(text: str) -> tuple[str, bool]:
    """(reason, transient) for a yt-dlp error message; unknown errors count as transient."""
    low = text.lower()
    for reason, transient, needles in _ERROR_CLASSES:
        if any(n in low for n in needles):
            return reason, transient
    return "download_error", True


def plan_section(spans: list[list[float]] | None, duration_s: float | None, pad_s: float,
                 max_fraction: float) -> tuple[float, float] | None:
    """The one range [start, end] to fetch instead of the whole video, or None for the whole video:
    the CSV spans padded and merged into one range, used only when it is at most ``max_fraction`` of a
    known duration (one file keeps the pipeline's one-video-one-file contract)."""
    if not spans or not duration_s or duration_s <= 0:
        return None
    start = max(0.0, min(s for s, _ in spans) - pad_s)
    end = min(float(duration_s), max(e for _, e in spans) + pad_s)
    if end <= start or (end - start) > max_fraction * duration_s:
        return None
    return round(start, 3), round(end, 3)


def format_selector(max_height: int, can_merge: bool) -> str:
    """H.264 MP4 at most ``max_height``: merged DASH streams when ffmpeg can merge, else progressive;
    ``?`` lets a direct link with unknown codec/height through (the probe checks the file)."""
    h = int(max_height)
    progressive = (f"b[ext=mp4][vcodec^=avc1][height<=?{h}]/b[ext=mp4][height<=?{h}]/"
                   f"b[ext=mp4][vcodec^=?avc1][height<=?{h}]/b[height<=?{h}]")
    if can_merge:
        return f"bv*[ext=mp4][vcodec^=avc1][height<={h}]+ba[ext=m4a]/{progressive}"
    return progressive


def backoff_delay_s(attempt: int, base_s: float, cap_s: float) -> float:
    """Delay before try ``attempt + 1`` after ``attempt`` failures: base * 2^(attempt-1), capped, +0..25%."""
    d = min(cap_s, base_s * (2 ** max(0, attempt - 1)))
    return d * (1.0 + 0.25 * random.random())


# ---------------------------------------------------------------------------------------------------------
# One video: fetch into a temp folder, probe, commit, log. Runs in a Ray task or a thread.


class _Log:
    """yt-dlp logger that keeps the messages (for error reasons) instead of printing them."""

    def __init__(self):
        self.lines: deque[str] = deque(maxlen=50)

    def debug(self, msg):
        self.lines.append(str(msg))

    info = warning = error = debug


def probe_video(path: str) -> dict:
    """PyAV facts about a file, raising ValueError when it holds no decodable video stream."""
    import av

    try:
        with av.open(path) as c:
            vs = next((s for s in c.streams if s.type == "video"), None)
            if vs is None:
                raise ValueError("no video stream")
            frame = next(c.decode(vs), None)
            if frame is None:
                raise ValueError("no decodable video frame")
            if vs.duration is not None and vs.time_base is not None:
                duration = float(vs.duration * vs.time_base)
            elif c.duration is not None:
                duration = c.duration / 1_000_000
            else:
                duration = 0.0
            return {"codec": vs.codec_context.name, "width": frame.width, "height": frame.height,
                    "duration_s": round(duration, 3), "container": c.format.name}
    except (av.error.FFmpegError, StopIteration, UnicodeDecodeError) as e:
        raise ValueError(f"{type(e).__name__}: {e}") from None


def _tmp_root() -> str:
    root = os.path.join(os.environ.get("PHANTOM_CACHE_DIR") or tempfile.gettempdir(), "phantom-download")
    os.makedirs(root, exist_ok=True)
    return root


_TMP_PID_RE = re.compile(r"-pid(\d+)-")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def sweep_stale_tmp(max_age_s: float = 6 * 3600) -> int:
    """Remove temporary download folders (and the ``.part`` files in them) that a killed download left:
    at once when the process named in the folder (``<id>-pid<N>-``) is gone, else after ``max_age_s``
    (folders of older versions, or a reused pid). Runs when a download run starts and when a worker
    starts (each node has its own temporary folder)."""
    root, n = _tmp_root(), 0
    for name in os.listdir(root):
        p = os.path.join(root, name)
        m = _TMP_PID_RE.search(name)
        with contextlib.suppress(OSError):
            dead = m is not None and not _pid_alive(int(m.group(1)))
            if dead or time.time() - os.path.getmtime(p) > max_age_s:
                shutil.rmtree(p, ignore_errors=True)
                n += 1
    return n


def _ffmpeg_ok() -> bool:
    return shutil.which(FFMPEG) is not None


def _fetch(url: str, video_id: str, spans, p: DownloadParams, tmp: str, sections: bool) -> dict:
    """Run yt-dlp once; returns {ok, path, reason, transient, detail, mode, section_s, info facts}."""
    import yt_dlp

    log = _Log()
    chosen: dict[str, Any] = {"mode": "full", "section_s": None}
    refused: list[tuple[str, str]] = []  # (reason, detail) from the filter: yt-dlp skips, it does not raise

    def match_filter(info, *, incomplete=False):
        d = info.get("duration")
        if info.get("is_live") or info.get("live_status") in ("is_live", "is_upcoming"):
            refused.append(("live", f"live_status {info.get('live_status')!r}"))
        elif d and d > p.max_duration_s:
            refused.append(("too_long", f"{d:.0f} s > max_duration_s {p.max_duration_s:.0f} (site)"))
        return refused[-1][0] if refused else None

    def ranges(info, ydl):
        sec = plan_section(spans, info.get("duration"), p.section_pad_s, p.sections_max_fraction) \
            if sections and _ffmpeg_ok() else None
        if sec is None:
            yield {}
            return
        chosen.update(mode="section", section_s=list(sec))
        yield {"start_time": sec[0], "end_time": sec[1]}

    opts = {
        "outtmpl": os.path.join(tmp, f"{video_id}.%(ext)s"),
        "format": format_selector(p.max_height, _ffmpeg_ok()),
        "merge_output_format": "mp4",
        "noplaylist": True,
        "playlist_items": "1",
        "quiet": True,
        "no_warnings": True,
        "noprogress": True,
        "logger": log,
        "retries": 0,  # retries are ours (with backoff and a recorded attempt count)
        "fragment_retries": 0,
        "extractor_retries": 0,
        "socket_timeout": p.socket_timeout_s,
        "max_filesize": int(p.max_filesize_mb * 1024 * 1024),
        "match_filter": match_filter,
        "download_ranges": ranges,
        "overwrites": True,
        "cachedir": False,
        "color": "no_color",
    }
    if p.rate_limit_bytes_per_s:
        opts["ratelimit"] = p.rate_limit_bytes_per_s
    def fail(reason: str, transient: bool, detail: str) -> dict:
        return {"ok": False, "reason": reason, "transient": transient, "detail": _clean(detail), **chosen}

    try:
        with yt_dlp.YoutubeDL(opts) as ydl:
            info = ydl.extract_info(url, download=True)
    except yt_dlp.utils.DownloadError as e:
        return fail(*classify_error(str(e)), str(e))
    except Exception as e:  # an extractor bug or an OS error: this video fails, the run goes on
        return fail(*classify_error(f"{type(e).__name__}: {e}"), f"{type(e).__name__}: {e}")
    text = "\n".join(log.lines)
    if refused:
        return fail(refused[0][0], False, refused[0][1])
    if "larger than max-filesize" in text:
        return fail("too_large", False, next(ln for ln in log.lines if "max-filesize" in ln))
    media = (*VIDEO_EXTS, "mov", "m4v", "unknown_video")
    files = [f for f in os.listdir(tmp) if f.rsplit(".", 1)[-1] in media and not f.endswith(".part")]
    if not files:
        reason, transient = classify_error(text) if text else ("download_error", True)
        return fail(reason, transient, log.lines[-1] if log.lines else "yt-dlp produced no file")
    info = info or {}
    biggest = max(files, key=lambda f: os.path.getsize(os.path.join(tmp, f)))
    return {"ok": True, "path": os.path.join(tmp, biggest),
            "site_duration_s": info.get("duration"), "extractor": info.get("extractor_key"),
            "format_id": info.get("format_id"), **chosen}


def _clean(text: str) -> str:
    return " ".join(text.replace("\r", " ").split())[:300]


def download_one(row: dict, params: DownloadParams | dict, store, attempt: int = 1,
                 final: bool = True) -> dict:
    """Fetch one CSV row's video into ``store`` and log it. ``row``: ``video_id``, ``url``, ``spans``.
    ``attempt``: this try's number (cumulative over runs); ``final``: no retry follows (a transient error
    is then logged as failed, retryable by a later run). Returns the result (the log record plus
    ``transient``); never raises for a bad video."""
    from curation.storage import Store

    p = parse_download_params(params) if not isinstance(params, DownloadParams) else params
    store = store if isinstance(store, Store) else Store(store)
    vid = row["video_id"]
    t0 = time.time()
    res: dict[str, Any] = {"video_id": vid, "url": row.get("url"), "attempts": attempt}
    url, why = resolve_url(vid, row.get("url"), p.allowed_hosts)
    if url is None:
        res.update(status="failed", reason=why, retryable=False, transient=False,
                   detail=f"url {str(row.get('url'))[:120]!r} is not on an allowed host {p.allowed_hosts} "
                   "(an entry is a host, any port, or host:port)"
                   if why == "bad_url" else f"videoID {vid[:80]!r}")
        _write_log(store, vid, res, t0, p)
        return res
    tmp = tempfile.mkdtemp(prefix=f"{vid}-pid{os.getpid()}-", dir=_tmp_root())
    try:
        got = _fetch(url, vid, row.get("spans"), p, tmp, sections=p.sections)
        if got["ok"]:
            got = _validate(got, p)
        if not got["ok"] and got.get("mode") == "section" and got["reason"] not in ("too_long", "live"):
            # the site did not serve the section (no byte ranges, or ffmpeg could not cut it): whole video
            first = got
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            got = _fetch(url, vid, None, p, tmp, sections=False)
            if got["ok"]:
                got = _validate(got, p)
            res["section_fallback"] = f"{first['reason']}: {first['detail']}"[:300]
        if got["ok"]:
            ext = _ext_for(got["path"], got.get("container") or "")
            rel = f"{vid}.{ext}"
            for other in VIDEO_EXTS:  # one file per video: a refetch in another container replaces it
                if other != ext:
                    store.delete(f"{vid}.{other}")
            store.put_file(rel, got["path"])  # temporary name + rename (or one PUT): never partial
            res.update(status="done", reason=None, retryable=False, transient=False, file=rel,
                       bytes=os.path.getsize(got["path"]), mode=got["mode"], section_s=got["section_s"],
                       time_offset_s=got["section_s"][0] if got["section_s"] else 0.0,
                       **{k: got[k] for k in ("codec", "width", "height", "duration_s", "site_duration_s",
                                              "extractor", "format_id")})
        else:
            transient = bool(got["transient"])
            res.update(status="failed", reason=got["reason"], detail=got["detail"], transient=transient,
                       retryable=transient)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if res["status"] == "done" or final or not res["transient"]:
        _write_log(store, vid, res, t0, p)
    res["elapsed_s"] = round(time.time() - t0, 3)
    return res


def _ext_for(path: str, container: str) -> str:
    """mp4 | mkv | webm for the committed name: the file's own extension when it is one of those, else
    from the container PyAV found (a direct link without an extension is ``unknown_video``)."""
    ext = path.rsplit(".", 1)[-1].lower()
    if ext in VIDEO_EXTS:
        return ext
    return "mkv" if "matroska" in container else "mp4"


def _validate(got: dict, p: DownloadParams) -> dict:
    """The fetched file's size and PyAV facts checked against the caps; a failure keeps ``mode``."""
    def fail(reason: str, detail: str) -> dict:
        return {**got, "ok": False, "reason": reason, "transient": False, "detail": _clean(detail)}

    size = os.path.getsize(got["path"])
    if size > p.max_filesize_mb * 1024 * 1024:
        return fail("too_large", f"{size} bytes > max_filesize_mb {p.max_filesize_mb}")
    try:
        facts = probe_video(got["path"])
    except ValueError as e:
        return fail("not_a_video", str(e))
    if facts["duration_s"] > p.max_duration_s:
        return fail("too_long", f"{facts['duration_s']:.0f} s > max_duration_s {p.max_duration_s:.0f}")
    return {**got, **facts}


def _write_log(store, vid: str, res: dict, t0: float, p: DownloadParams | None = None) -> None:
    rec = {k: v for k, v in res.items() if k != "transient"}
    if p is not None and rec.get("status") == "failed" and rec.get("reason") in DECIDED_BY:
        rec["decided_by"] = {k: getattr(p, k) for k in DECIDED_BY[rec["reason"]]}
    rec["finished_at"] = round(time.time(), 3)
    rec["elapsed_s"] = round(time.time() - t0, 3)
    store.write_json(log_rel(vid), rec)


# ---------------------------------------------------------------------------------------------------------
# The CSV, streamed.


def iter_csv_rows(csv_path: str, keep_labels=None) -> Iterator[dict]:
    """``{video_id, url, spans, line}`` per CSV row, streamed (one row in memory at a time). A row whose
    id or timestamps do not parse still comes out, with ``error`` set (the parser's reason). ``keep_labels``
    (the source's option): spans whose ``desirable_filtering`` label is not in the set are dropped before
    the section plan; a row left with none has ``skip`` set to ``panda:<label>`` and is never fetched."""
    from curation.sources.panda70m import (
        REQUIRED_COLUMNS,
        VIDEO_ID_RE,
        filter_spans_by_label,
        parse_labels,
        parse_spans,
    )

    if not os.path.isfile(csv_path):
        raise FileNotFoundError(f"Panda-70M CSV {csv_path} does not exist")
    # a video with many clips has long caption lists; the default 128 kB field limit would lose its row
    csv.field_size_limit(max(csv.field_size_limit(), 16 << 20))
    with open(csv_path, encoding="utf-8-sig", errors="replace", newline="") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        missing = [c for c in ("videoID", "url") if c not in header]
        if missing:
            raise ValueError(f"{csv_path}: missing column(s) {missing}; a Panda-70M CSV has "
                             f"{','.join(REQUIRED_COLUMNS)}")
        col = {h: i for i, h in enumerate(header)}
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                yield {"video_id": None, "line": reader.line_num, "error": f"malformed_row: {e}"}
                continue
            if not cells or all(not c.strip() for c in cells):
                continue
            if len(cells) != len(header):
                yield {"video_id": None, "line": reader.line_num, "error": "malformed_row"}
                continue
            vid = cells[col["videoID"]].strip()
            row = {"video_id": vid, "url": cells[col["url"]].strip() or None, "line": reader.line_num,
                   "spans": None}
            if not VIDEO_ID_RE.match(vid):
                row["error"] = "bad_video_id"
            elif "timestamp" in col:
                with contextlib.suppress(ValueError):  # bad spans only cost the section plan
                    row["spans"] = parse_spans(cells[col["timestamp"]])
            if keep_labels and row["spans"] and "desirable_filtering" in col:
                with contextlib.suppress(ValueError):  # a bad label list filters nothing
                    rec = {"spans": row["spans"],
                           "span_labels": parse_labels(cells[col["desirable_filtering"]], len(row["spans"]))}
                    filter_spans_by_label(rec, keep_labels)
                    row["spans"] = rec["spans"]
                    if rec.get("status") == "rejected":
                        row["skip"] = rec["reason"]
            yield row


def count_rows_fast(csv_path: str) -> int:
    """Data lines in the CSV (newlines minus the header), counted in 1 MB blocks: the ETA's total."""
    n = 0
    with open(csv_path, "rb") as f:
        while block := f.read(1 << 20):
            n += block.count(b"\n")
    return max(0, n - 1)


# ---------------------------------------------------------------------------------------------------------
# The worker: one per Ray actor (or one shared by the threads of the in-process pool).


def warm_up() -> None:
    """Pay yt-dlp's first-use costs (importing its extractors, compiling their URL patterns) and PyAV's
    import once per worker, before the clock of the rates starts."""
    import av  # noqa: F401
    import yt_dlp

    for mod in ("yt_dlp.extractor.generic", "yt_dlp.extractor.youtube", "yt_dlp.downloader.http",
                "yt_dlp.downloader.external", "yt_dlp.postprocessor.ffmpeg"):
        with contextlib.suppress(ImportError):
            importlib.import_module(mod)
    with yt_dlp.YoutubeDL({"quiet": True, "logger": _Log()}) as ydl:
        for ie in ydl._ies.values():
            ie.suitable("https://www.youtube.com/watch?v=x")


class _DownloadWorker:
    """A Ray actor that runs ``download_one``: long-lived, so yt-dlp and PyAV are imported once per worker
    (plain tasks at fractional CPUs lose their idle worker processes between waves and pay that again)."""

    def __init__(self):
        sweep_stale_tmp()  # this node's leftovers of killed downloads
        warm_up()

    def ready(self) -> bool:
        return True

    def call(self, *args) -> dict:
        return download_one(*args)


# ---------------------------------------------------------------------------------------------------------
# The driver loop.


@dataclasses.dataclass
class _Pending:
    row: dict
    attempt: int  # the next try's number (cumulative over runs)
    tries_now: int = 0  # tries in this run


class Stats:
    """Counters for the progress line and the summary."""

    def __init__(self, total_rows: int):
        self.t0 = time.time()
        self.total_rows = total_rows
        self.rows_seen = 0
        self.done = 0
        self.failed: Counter = Counter()
        self.skipped: Counter = Counter()
        self.retried = 0
        self.bytes = 0
        self.modes: Counter = Counter()

    def rate(self) -> tuple[float, float]:
        dt = max(1e-6, time.time() - self.t0)
        return self.done / dt, self.bytes / dt

    def line(self, in_flight: int, queued: int) -> str:
        vps, bps = self.rate()
        finished = self.done + sum(self.failed.values())
        todo = max(0, self.total_rows - self.rows_seen) + queued + in_flight
        fps = finished / max(1e-6, time.time() - self.t0)
        eta = _hms(todo / fps) if fps > 0 and self.total_rows else "?"
        top = self.failed.most_common(6)
        fails = ", ".join(f"{k} {v}" for k, v in top)
        if len(self.failed) > len(top):  # never hide a reason silently
            fails += f", {len(self.failed) - len(top)} more reason(s) in the summary"
        n_failed, n_skipped = sum(self.failed.values()), sum(self.skipped.values())
        return (f"[download] {self.rows_seen}/{self.total_rows or '?'} rows | done {self.done}, failed "
                f"{n_failed}{f' ({fails})' if fails else ''}, skipped {n_skipped} | {vps:.2f} videos/s, "
                f"{bps / 1e6:.2f} MB/s | in flight {in_flight}, queued {queued} | ETA {eta}")

    def summary(self) -> dict:
        vps, bps = self.rate()
        return {"rows_seen": self.rows_seen, "downloaded": self.done,
                "failed": sum(self.failed.values()),
                "failures_by_reason": dict(self.failed.most_common()),
                "skipped": dict(self.skipped.most_common()), "retries": self.retried,
                "bytes": self.bytes, "modes": dict(self.modes), "wall_s": round(time.time() - self.t0, 2),
                "videos_per_s": round(vps, 3), "bytes_per_s": round(bps, 1)}


def print_line(line: str) -> None:
    print(line, flush=True)  # flushed: a log file keeps the lines of a run that is killed


def _hms(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _triage(store, row: dict, p: DownloadParams | None = None) -> tuple[str, Any]:
    """What a row needs: ("skip", reason) or ("fetch", prior attempts). Reads its log (O(1)). A failure
    the config decided is fetched again when one of those params changed (``p``: this run's)."""
    if row.get("error"):
        return "bad", row["error"].split(":")[0]
    if row.get("skip"):  # every span outside the source's keep_labels: nothing to fetch
        return "skip", row["skip"]
    vid = row["video_id"]
    log = read_log(store, vid)
    if log and log.get("status") == "done":
        if log.get("file") and store.is_file(log["file"]):
            return "skip", "already_done"
        return "fetch", int(log.get("attempts") or 0)  # its file vanished: fetch again
    if log and log.get("status") == "failed":
        attempts = int(log.get("attempts") or 0)
        reason = log.get("reason")
        if not log.get("retryable"):
            decided = log.get("decided_by") or {}
            if p is not None and reason in DECIDED_BY and any(
                    decided.get(k) != getattr(p, k) for k in DECIDED_BY[reason]):
                return "fetch", attempts  # the param that refused it changed: try again
            return "skip", f"failed_before:{reason}"
        if p is not None and attempts >= p.max_total_attempts:
            return "skip", f"gave_up:{reason}"  # bounded over runs; a higher max_total_attempts retries
        return "fetch", attempts
    if existing_video(store, vid):
        return "skip", "present"  # put there by hand or by a run killed between the file and its log
    return "fetch", 0


def download_source(spec, store, *, params: DownloadParams | dict | None = None, cfg=None,
                    runner: str = "ray", csv_path: str | None = None,
                    progress: Callable[[str], None] | None = print_line) -> dict:
    """Download every row of ``spec``'s Panda-70M CSV (``spec``: a ``curation.config.SourceSpec``) into
    ``store`` (a ``curation.storage.Store`` or a path/URI: the videos folder). ``params``: DownloadParams
    or a ``download:`` mapping (default: ``spec.download`` when it is a mapping, else the defaults).
    ``cfg``: the Config, for its ``ray:`` section. Returns the summary (also written to
    ``_download/summary.json`` in the store)."""
    from curation.storage import Store

    if getattr(spec, "kind", "panda70m") != "panda70m":
        raise ValueError(f"download: source kind {spec.kind!r} has no URLs; only panda70m does")
    if params is None:
        raw = getattr(spec, "download", None)
        params = raw if isinstance(raw, (dict, DownloadParams)) else getattr(spec, "download_params", None)
    p = parse_download_params(params)
    if spec is not None and getattr(spec, "limit", 0) and not p.limit:
        p = dataclasses.replace(p, limit=spec.limit)
    store = store if isinstance(store, Store) else Store(store)
    csv_path = csv_path or spec.csv
    if not csv_path:
        raise ValueError("download: `csv:` (the Panda-70M metadata CSV) is required")
    if not os.path.isfile(csv_path):
        raise FileNotFoundError(f"download: the Panda-70M CSV {csv_path} does not exist")
    try:
        import yt_dlp  # noqa: F401
    except ImportError:
        raise RuntimeError("download: yt-dlp is not installed (pip install yt-dlp)") from None
    sweep_stale_tmp()
    total = count_rows_fast(csv_path)
    if p.limit:
        total = min(total, p.limit)
    say = progress or (lambda _line: None)
    if runner not in ("ray", "threads"):
        raise ValueError(f"runner must be 'ray' or 'threads', not {runner!r}")
    stats = Stats(total)
    run = None  # started at the first video to fetch: a rerun with nothing left starts no Ray
    rows = iter_csv_rows(csv_path, getattr(spec, "keep_labels", None))
    exhausted = False
    queues: dict[str, deque[_Pending]] = {}
    retry_heap: list[tuple[float, int, str, _Pending]] = []
    in_flight: dict[Any, tuple[Any, str, _Pending]] = {}  # handle -> (node, host, row)
    nodes: list = []  # the pool's nodes now (Ray node ids, or "local" for threads), read every nodes_every_s
    seen_nodes: list = []  # every node the pool had during the run
    nodes_at = 0.0
    window = 0  # downloads in flight over all nodes: concurrency, or per_node_concurrency x nodes
    per_node: Counter = Counter()  # in flight per node
    per_node_host: Counter = Counter()  # in flight per (node, host)
    next_start: dict[tuple[Any, str], float] = {}  # the next start allowed per (node, host)
    node_tasks: Counter = Counter()  # download calls run per node (tries, retries included)
    node_done: Counter = Counter()  # videos downloaded per node
    node_peak: Counter = Counter()  # the most downloads in flight at once per node
    active: dict[str, _Pending] = {}  # queued, waiting on a retry or in flight: dedup of repeated ids
    seq = 0
    last_line = time.time()
    triage_pool = cf.ThreadPoolExecutor(max_workers=16, thread_name_prefix="triage")

    def queued() -> int:
        return sum(len(q) for q in queues.values()) + len(retry_heap)

    try:
        while True:
            # 1. refill: read the next chunk while fewer than two chunks wait
            if not exhausted and queued() < p.chunk_rows:
                chunk = []
                for row in rows:
                    if p.limit and stats.rows_seen >= p.limit:
                        break
                    stats.rows_seen += 1
                    chunk.append(row)
                    if len(chunk) >= p.chunk_rows:
                        break
                else:
                    exhausted = True
                if p.limit and stats.rows_seen >= p.limit:
                    exhausted = True
                for row, (what, val) in zip(chunk, triage_pool.map(lambda r: _triage(store, r, p), chunk)):
                    vid = row.get("video_id")
                    if what == "bad":
                        stats.failed[val] += 1
                    elif what == "skip":
                        stats.skipped[val] += 1
                    elif vid in active:  # a repeated id: its spans join the queued row's
                        if active[vid].tries_now == 0 and row.get("spans"):
                            active[vid].row["spans"] = (active[vid].row.get("spans") or []) + row["spans"]
                        stats.skipped["duplicate_row"] += 1
                    else:
                        pend = _Pending(row, attempt=val + 1)
                        active[vid] = pend
                        host = host_key(row.get("url") or "https://youtube.com")
                        queues.setdefault(host, deque()).append(pend)
            # 2. retries whose backoff is over go back to their host's queue (front: they are oldest)
            now = time.time()
            while retry_heap and retry_heap[0][0] <= now:
                _, _, host, pend = heapq.heappop(retry_heap)
                queues.setdefault(host, deque()).appendleft(pend)
            # 3. start downloads: each on the least-loaded node with room in its node window and its
            # (node, host) window whose (node, host) rate allows a start now; at most `window` in all
            wake = now + 1.0
            if run is None and queued():
                n_start = min(p.per_node_concurrency, sum(len(q) for q in queues.values()))  # per node
                n_start = min(n_start, p.concurrency) if p.concurrency else n_start
                ray_cfg = cfg.ray if cfg else None
                run = worker_pool(runner, _DownloadWorker, p.per_node_concurrency, p.num_cpus, ray_cfg,
                                  n_start, per_node=True)
                nodes = list(run.nodes)
                seen_nodes = list(nodes)
                window = p.per_node_concurrency * len(nodes)
                window = min(window, p.concurrency) if p.concurrency else window
                stats.t0 = now = time.time()  # rates count from here: the workers are up
                nodes_at = now
            elif run is not None and now - nodes_at >= p.nodes_every_s:  # nodes that joined or left
                nodes = list(run.refresh_nodes())
                seen_nodes += [n for n in nodes if n not in seen_nodes]
                window = p.per_node_concurrency * len(nodes)
                window = min(window, p.concurrency) if p.concurrency else window
                nodes_at = now
            for host, q in queues.items():
                while q and len(in_flight) < window:
                    best, best_key = None, None
                    for i, node in enumerate(nodes):
                        if per_node[node] >= p.per_node_concurrency or \
                                per_node_host[node, host] >= p.per_host_concurrency:
                            continue
                        t = next_start.get((node, host), 0.0)
                        if t > now:  # room, but the rate says not yet
                            wake = min(wake, t)
                            continue
                        key = (per_node[node], per_node_host[node, host], i)
                        if best_key is None or key < best_key:
                            best, best_key = node, key
                    if best_key is None:
                        break
                    pend = q.popleft()
                    pend.tries_now += 1
                    final = pend.tries_now >= p.max_attempts or pend.attempt >= p.max_total_attempts
                    h = run.submit(pend.row, p, store.uri, pend.attempt, final, node=best)
                    in_flight[h] = (best, host, pend)
                    per_node[best] += 1
                    per_node_host[best, host] += 1
                    node_tasks[best] += 1
                    node_peak[best] = max(node_peak[best], per_node[best])
                    t = next_start.get((best, host), 0.0)
                    next_start[best, host] = max(now, t) + 1.0 / p.per_host_rate_per_s
            if retry_heap:
                wake = min(wake, retry_heap[0][0])
            if exhausted and not in_flight and not queued():
                break
            # 4. collect what finished
            done = run.wait(list(in_flight), timeout=max(0.01, wake - time.time())) if in_flight else []
            if not in_flight:
                time.sleep(max(0.0, min(1.0, wake - time.time())))
            for h in done:
                node, host, pend = in_flight.pop(h)
                per_node[node] -= 1
                per_node_host[node, host] -= 1
                try:
                    res = run.result(h)
                except Exception as e:  # the task itself died (worker lost): a transient failure
                    res = {"status": "failed", "reason": "task_error", "transient": True,
                           "detail": _clean(f"{type(e).__name__}: {e}")}
                    # its node may have left: read the nodes before the next start, else the room it frees
                    # there draws the next rows to actors that fail at once, each failure costing a row a try
                    nodes_at = 0.0
                vid = pend.row["video_id"]
                if res["status"] == "done":
                    stats.done += 1
                    stats.bytes += int(res.get("bytes") or 0)
                    stats.modes[res.get("mode") or "full"] += 1
                    node_done[node] += 1
                    active.pop(vid, None)
                elif res.get("transient") and pend.tries_now < p.max_attempts \
                        and pend.attempt < p.max_total_attempts:
                    stats.retried += 1
                    delay = backoff_delay_s(pend.tries_now, p.backoff_s, p.max_backoff_s)
                    if res.get("reason") == "rate_limited":  # the host asked this node to slow down
                        key = (node, host)
                        next_start[key] = max(next_start.get(key, 0.0), time.time() + delay)
                    pend.attempt += 1
                    seq += 1
                    heapq.heappush(retry_heap, (time.time() + delay, seq, host, pend))
                else:
                    stats.failed[res.get("reason") or "unknown"] += 1
                    active.pop(vid, None)
                    if res.get("reason") == "task_error":  # its worker died before logging: log it here,
                        # retryable, so the reader says why the video is missing and a later run tries it
                        _write_log(store, vid, {"video_id": vid, "url": pend.row.get("url"),
                                                "attempts": pend.attempt, "status": "failed",
                                                "reason": "task_error", "retryable": True,
                                                "detail": res.get("detail")}, time.time())
            if time.time() - last_line >= p.progress_every_s:
                say(stats.line(len(in_flight), queued()))
                last_line = time.time()
    finally:
        triage_pool.shutdown(wait=False)
        if run is not None:
            run.close()
    summary = {"store": store.uri, "csv": csv_path, **stats.summary(), "nodes": [str(n) for n in seen_nodes],
               "per_node": {str(n): {"downloads": node_tasks[n], "downloaded": node_done[n],
                                     "max_in_flight": node_peak[n]} for n in seen_nodes}}
    say(stats.line(0, 0))
    store.write_json(f"{LOG_PREFIX}/summary.json", summary, indent=2)
    return summary


# ---------------------------------------------------------------------------------------------------------
# CLI


def _load(config: str, source: str):
    """(Config, SourceSpec, DownloadParams) from pipelines.yaml. A ``download:`` mapping under the source
    (or at the top level) holds the DownloadParams; it is taken out before the rest is validated, so the
    file works whether or not SourceSpec knows the key yet."""
    from curation.config import Config

    raw = load_yaml(config)
    if not isinstance(raw, dict):
        raise ConfigError(f"{config}: expected a mapping at the top level")
    top = raw.pop("download", None)
    src_raw = (raw.get("sources") or {}).get(source)
    where = "download"
    if isinstance(src_raw, dict) and isinstance(src_raw.get("download"), dict):
        top, where = src_raw.pop("download"), f"sources.{source}.download"
        src_raw["download"] = True
    params = parse_download_params(top, where)
    cfg = from_dict(Config, raw)
    if source not in cfg.sources:
        raise ConfigError(f"--source: {source!r} is not one of {sorted(cfg.sources)}")
    return cfg, cfg.sources[source], params


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="pipelines.yaml")
    ap.add_argument("--source", default="panda70m")
    ap.add_argument("--csv", default=None, help="the Panda-70M CSV (default: the source's csv)")
    ap.add_argument("--videos", default=None,
                    help="where videos go, a folder or s3://... (default: the source's videos_dir)")
    ap.add_argument("--runner", choices=["ray", "threads"], default="ray")
    ap.add_argument("--limit", type=int, default=None, help="only the first N rows")
    ap.add_argument("--concurrency", type=int, default=None,
                    help="downloads in flight over the whole cluster (0: per-node-concurrency x nodes)")
    ap.add_argument("--per-node-concurrency", type=int, default=None, help="downloads in flight per node")
    args = ap.parse_args(argv)
    try:
        cfg, spec, params = _load(args.config, args.source)
        if spec.kind != "panda70m":
            raise ConfigError(f"--source {args.source}: kind {spec.kind!r} has no URLs to download")
        over = {k: v for k, v in (("limit", args.limit), ("concurrency", args.concurrency),
                                  ("per_node_concurrency", args.per_node_concurrency)) if v is not None}
        params = from_dict(DownloadParams, {**dataclasses.asdict(params), **over}, "download")
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    videos = args.videos or spec.videos_dir or os.path.join(cfg.output_dir, args.source, "videos")
    try:
        summary = download_source(spec, videos, params=params, cfg=cfg, runner=args.runner,
                                  csv_path=args.csv or spec.csv)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"download error: {str(e).removeprefix('download: ')}", file=sys.stderr)
        return 2
    print("\n== download summary ==")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
