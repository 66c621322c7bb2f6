"""Panda-70M metadata CSV -> one source record per video, every malformed row kept as a reasoned rejection.

The official CSV has columns ``videoID,url,timestamp,caption,matching_score`` (optionally
``desirable_filtering`` and ``shot_boundary_detection``); the list-valued columns hold Python-style list
text such as ``[['0:00:00.000', '0:00:05.005'], ['0:00:05.005', '0:00:12.846']]``.

Decisions (stated, as the rows are untrusted):
- list text is parsed by ``parse_literal``: an ``ast`` check that it holds only list/tuple/str/number
  literals, then ``ast.literal_eval``; never ``eval``;
- ``videoID`` must be a YouTube-style id (``[A-Za-z0-9_-]``, 1..64 chars); anything else (``../x``,
  absolute paths, spaces) is ``bad_video_id`` and the record's ``video_id`` is ``row-<line>``; a file
  that resolves (through symlinks) outside ``videos_dir`` is also ``bad_video_id``;
- an empty caption KEEPS the row: that span's caption is None and ``empty_caption`` goes to ``warnings``
  (the caption stage then writes one); a caption list of the wrong length is ``bad_caption``;
- a bad ``matching_score`` only warns (``bad_matching_score``), it is informational;
- duplicate videoIDs are MERGED into the first record: spans (and their captions / scores) are appended
  unless the same span is already there, and ``merged_duplicate_row:<line>`` goes to ``warnings``; a bad
  duplicate row is a rejection of its own, with ``video_id`` ``<videoID>@row-<line>`` so ids stay unique;
- Panda's own per-span columns become lists parallel to the spans: ``span_labels`` (``desirable_filtering``:
  ``desirable``, ``1_still_foreground_image``, ...) and ``span_shot_boundaries`` (``shot_boundary_detection``:
  each span's shots as [start_s, end_s] relative to the span); a list of the wrong length only warns
  (``bad_<column>``) and is dropped. The scenes stage puts each clip's own span entry on the clip row;
- ``keep_labels`` (the source's option, ``[desirable]`` for Panda-70M): a span whose label is not in the set
  is taken out before anything downloads or decodes it and listed in ``skipped_spans`` with its reason
  ``panda:<label>``; a video left with no span is a rejected record with that reason (the commonest one).
  A span without a label (no column) is kept.
- a record is made final (``finish_record``) after any merge: the label prefilter, then the video looked up
  by name (a stat, or one HEAD per candidate on an object store); the videos folder is never listed;
- the CSV can be read by byte range (``index_csv`` cuts it at record ends, ``parse_csv_range`` reads a
  range) with the rows and line numbers of one pass: ``curation.ingest`` parses the ranges in Ray tasks.
"""

from __future__ import annotations

import ast
import codecs
import csv
import functools
import hashlib
import math
import os
import re
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from curation.sources import rejected_record, source_record
from curation.storage import Store, call_with_retry, is_uri

REQUIRED_COLUMNS = ("videoID", "url", "timestamp", "caption", "matching_score")
OPTIONAL_COLUMNS = ("desirable_filtering", "shot_boundary_detection")
PANDA_VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm")
VIDEO_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
TIMESTAMP_RE = re.compile(r"^\s*(?:(\d+):)?([0-5]?\d):([0-5]?\d(?:\.\d+)?)\s*$")
_TS = r"'\d+:\d{1,2}:\d{1,2}(?:\.\d+)?'"
_PAIR = rf"\[\s*{_TS}\s*,\s*{_TS}\s*\]"
# the usual shape of Panda's timestamp text, parsed without ast (ast.walk is most of the parse time)
SPANS_FAST_RE = re.compile(rf"^\s*\[\s*{_PAIR}(?:\s*,\s*{_PAIR})*\s*\]\s*$")
_SHOT_LIST = rf"\[\s*(?:{_PAIR}(?:\s*,\s*{_PAIR})*)?\s*\]"
# the usual shape of shot_boundary_detection (per span, a list of time pairs), parsed without ast too
SHOTS_FAST_RE = re.compile(rf"^\s*\[\s*{_SHOT_LIST}(?:\s*,\s*{_SHOT_LIST})*\s*\]\s*$")
_SHOT_LIST_RE = re.compile(_SHOT_LIST)
_PAIR_TEXT_RE = re.compile(r"'([^']*)'\s*,\s*'([^']*)'")
_NUM = r"-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?"
SCORES_FAST_RE = re.compile(rf"^\s*\[\s*{_NUM}(?:\s*,\s*{_NUM})*\s*\]\s*$")
MAX_LITERAL_CHARS = 1_000_000  # a Panda row's longest list is a few kB; bigger text is not metadata
_LITERAL_NODES = (
    ast.Expression,
    ast.List,
    ast.Tuple,
    ast.Constant,
    ast.UnaryOp,
    ast.USub,
    ast.UAdd,
    ast.Load,
)


class LiteralError(ValueError):
    """List text that is not a plain literal of lists, strings and numbers."""


def parse_literal(text: str) -> Any:
    """Parse Python-style list text holding only lists/tuples of str/int/float (no names, no calls)."""
    if not isinstance(text, str):
        raise LiteralError(f"expected text, got {type(text).__name__}")
    if len(text) > MAX_LITERAL_CHARS:
        raise LiteralError(f"text of {len(text)} chars is longer than {MAX_LITERAL_CHARS}")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise LiteralError(f"not a literal: {type(e).__name__}") from None
    for node in ast.walk(tree):
        if not isinstance(node, _LITERAL_NODES):
            raise LiteralError(f"not a plain literal: contains {type(node).__name__}")
        if isinstance(node, ast.Constant) and not isinstance(node.value, (str, int, float)):
            raise LiteralError(f"not a plain literal: constant {node.value!r}")
        if isinstance(node, ast.Constant) and isinstance(node.value, bool):
            raise LiteralError("not a plain literal: boolean")
    try:
        return ast.literal_eval(tree)
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError) as e:
        raise LiteralError(f"not a literal: {e}") from None


def parse_time_s(value: Any) -> float:
    """'H:MM:SS.mmm' (or 'MM:SS.mmm', or a number of seconds) -> seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        t = float(value)
    elif isinstance(value, str):
        m = TIMESTAMP_RE.match(value)
        if not m:
            raise ValueError(f"bad time {value!r} (expected H:MM:SS.mmm)")
        t = int(m.group(1) or 0) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
    else:
        raise ValueError(f"bad time {value!r}")
    if not math.isfinite(t) or t < 0:
        raise ValueError(f"bad time {value!r}")
    return t


def format_time(t_s: float) -> str:
    """Seconds -> Panda's 'H:MM:SS.mmm'."""
    ms = int(round(t_s * 1000))
    h, rem = divmod(ms, 3_600_000)
    m, rem = divmod(rem, 60_000)
    s, ms = divmod(rem, 1000)
    return f"{h}:{m:02d}:{s:02d}.{ms:03d}"


def parse_spans(text: str) -> list[list[float]]:
    """Panda ``timestamp`` text -> [[start_s, end_s], ...]; raises ValueError naming the bad span."""
    if len(text) <= MAX_LITERAL_CHARS and SPANS_FAST_RE.match(text):
        value = [list(p) for p in re.findall(r"'([^']*)'\s*,\s*'([^']*)'", text)]
    else:
        value = parse_literal(text)
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError("timestamp is not a non-empty list of [start, end] pairs")
    spans = []
    for i, pair in enumerate(value):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValueError(f"span {i} is not a [start, end] pair: {pair!r}")
        start_s, end_s = parse_time_s(pair[0]), parse_time_s(pair[1])
        if end_s <= start_s:
            raise ValueError(f"span {i} ends before it starts: {pair!r}")
        spans.append([round(start_s, 3), round(end_s, 3)])
    return spans


def parse_captions(text: str, n_spans: int) -> tuple[list[str | None], list[str]]:
    """Panda ``caption`` text -> (captions parallel to spans, warnings). Empty text or empty strings
    become None with an ``empty_caption`` warning; a single plain string is accepted for one span."""
    if text is None or not text.strip():
        return [None] * n_spans, ["empty_caption"]
    try:
        value = parse_literal(text)
    except LiteralError:
        stripped = text.strip()
        if stripped[0] in "[('\"":
            # list or string text that does not parse (e.g. cut off: "['A man walks', 'A dog"): never
            # caption text
            what = "list" if stripped[0] in "[(" else "string"
            raise ValueError(f"caption {what} is unterminated or not a literal: {stripped[:60]!r}") from None
        if n_spans != 1:
            raise
        value = stripped  # a bare caption string for a one-span row
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(c, str) for c in value):
        raise ValueError("caption is not a list of strings")
    if len(value) != n_spans:
        raise ValueError(f"{len(value)} captions for {n_spans} spans")
    caps = [c.strip() or None for c in value]
    warnings = [f"empty_caption:{i}" for i, c in enumerate(caps) if c is None]
    return caps, warnings


def parse_scores(text: str, n_spans: int) -> list[float] | None:
    """``matching_score`` text -> floats parallel to spans; raises ValueError when it does not fit."""
    if text is None or not text.strip():
        return None
    if len(text) <= MAX_LITERAL_CHARS and SCORES_FAST_RE.match(text):
        value = [float(x) for x in re.findall(_NUM, text)]
    else:
        value = parse_literal(text)
    if isinstance(value, (int, float)):
        value = [value]
    if not isinstance(value, (list, tuple)) or len(value) != n_spans:
        raise ValueError("matching_score is not a list parallel to the spans")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"matching_score {v!r} is not a number")
        out.append(float(v))
    return out


def parse_labels(text: str | None, n_spans: int) -> list[str | None] | None:
    """``desirable_filtering`` text -> labels parallel to the spans (None when the column is empty)."""
    if text is None or not text.strip():
        return None
    value = parse_literal(text)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or len(value) != n_spans:
        raise ValueError(f"desirable_filtering is not a list of {n_spans} labels")
    if not all(isinstance(v, str) for v in value):
        raise ValueError("desirable_filtering holds a non-string label")
    return [v.strip() or None for v in value]


def parse_shot_boundaries(text: str | None, n_spans: int) -> list[list[list[float]]] | None:
    """``shot_boundary_detection`` text -> per span, its shots [[start_s, end_s], ...] relative to the span
    (times as 'H:MM:SS.mmm' or seconds); None when the column is empty."""
    if text is None or not text.strip():
        return None
    if len(text) <= MAX_LITERAL_CHARS and SHOTS_FAST_RE.match(text):
        inner = text.strip()[1:-1]
        value = [_PAIR_TEXT_RE.findall(m.group(0)) for m in _SHOT_LIST_RE.finditer(inner)]
    else:
        value = parse_literal(text)
    if not isinstance(value, (list, tuple)) or len(value) != n_spans:
        raise ValueError(f"shot_boundary_detection is not a list of {n_spans} shot lists")
    out = []
    for i, shots in enumerate(value):
        if not isinstance(shots, (list, tuple)):
            raise ValueError(f"shot_boundary_detection of span {i} is not a list")
        spans = []
        for pair in shots:
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise ValueError(f"shot_boundary_detection of span {i}: {pair!r} is not a [start, end] pair")
            a, b = parse_time_s(pair[0]), parse_time_s(pair[1])
            if b > a:
                spans.append([round(a, 3), round(b, 3)])
        out.append(spans)
    return out


# the record fields that run parallel to ``spans``: a span taken out takes its entry in each with it
PER_SPAN_FIELDS = ("spans", "span_captions", "matching_score", "span_labels", "span_shot_boundaries")


def label_reason(label: str) -> str:
    return f"panda:{label}"


def filter_spans_by_label(rec: dict[str, Any], keep_labels) -> dict[str, Any]:
    """Take out of ``rec`` every span whose Panda label is not in ``keep_labels`` (empty/None: keep all),
    listing each in ``rec["skipped_spans"]`` as ``{"span", "label", "reason"}``. A record left with no span
    becomes a rejection with reason ``panda:<commonest label>`` (a missing video no longer matters: it would
    not be fetched or decoded). Changes and returns ``rec``."""
    labels, spans = rec.get("span_labels"), rec.get("spans")
    if not keep_labels or not isinstance(labels, list) or not isinstance(spans, list):
        return rec
    keep = set(keep_labels)
    kept = [i for i, lab in enumerate(labels) if lab is None or lab in keep]
    if len(kept) == len(spans):
        return rec
    kept_set = set(kept)
    skipped = [{"span": spans[i], "label": labels[i], "reason": label_reason(labels[i])}
               for i in range(len(spans)) if i not in kept_set]
    rec["skipped_spans"] = [*(rec.get("skipped_spans") or []), *skipped]
    for key in PER_SPAN_FIELDS:
        if isinstance(rec.get(key), list) and len(rec[key]) == len(spans):
            rec[key] = [rec[key][i] for i in kept]
    if not kept:
        counts: dict[str, int] = {}
        for s in skipped:
            counts[s["reason"]] = counts.get(s["reason"], 0) + 1
        reason = max(counts, key=counts.get)  # first-seen wins a tie
        rec.update(status="rejected", reason=reason, video_path=None,
                   detail=f"every span's Panda label is outside keep_labels {sorted(keep)}: {counts}")
    return rec


# The download step's per-video log, beside the videos (``curation.download`` writes it, this reader reads it
# to say why a video is not there): ``<videos_dir>/_download/log/<xx>/<videoID>.json`` with ``status``
# (done|failed), ``reason``, ``detail``, ``retryable``, ``attempts``.
DOWNLOAD_LOG_PREFIX = "_download"


def download_log_rel(video_id: str) -> str:
    h = hashlib.sha1(video_id.encode()).hexdigest()[:2]
    return f"{DOWNLOAD_LOG_PREFIX}/log/{h}/{video_id}.json"


@functools.lru_cache(maxsize=8)
def _videos_store(videos_dir: str) -> Store:
    return Store(videos_dir)  # one per folder: an object-store client is not built per row


def download_log(videos_dir: str, video_id: str) -> dict | None:
    """The download step's log of this video, or None (locally one stat when there is none)."""
    rel = download_log_rel(video_id)
    if not is_uri(videos_dir) and not os.path.isfile(os.path.join(videos_dir, rel)):
        return None  # the usual case locally: one stat, not a pyarrow open that raises
    log = _videos_store(videos_dir).read_json(rel)
    return log if isinstance(log, dict) else None


def download_failure(log: dict | None) -> tuple[str, str] | None:
    """(``download:<reason>``, detail) when the download log says the video failed, else None."""
    if not log or log.get("status") != "failed":
        return None
    return f"download:{log.get('reason') or 'error'}", str(log.get("detail") or "")[:200]


def section_offset(log: dict | None) -> float:
    """Seconds of the source before the video file's 0: non-zero when the download step fetched only a
    section (``mode: section``); the CSV spans minus this are times in the file."""
    if not log or log.get("status") != "done":
        return 0.0
    return float(log.get("time_offset_s") or 0.0)


def shift_spans(rec: dict[str, Any], offset_s: float) -> None:
    """Map the record's CSV spans (source times) onto a section file that starts ``offset_s`` into the
    source; the offset is kept on the record (``time_offset_s``) so clip times can be told in source time.
    Shot boundaries are relative to their span and need no change."""
    if offset_s <= 0 or not isinstance(rec.get("spans"), list):
        return
    rec["spans"] = [[round(max(0.0, a - offset_s), 3), round(max(0.0, b - offset_s), 3)]
                    for a, b in rec["spans"]]
    rec["time_offset_s"] = offset_s


def resolve_video(videos_dir: str, video_id: str) -> tuple[str | None, str | None]:
    """(absolute path or URI, None) of ``{video_id}.mp4|.mkv|.webm`` inside ``videos_dir``, or (None, reason)
    with reason ``bad_video_id`` (not an id, or a symlink leaving the folder) or ``missing_video``. One
    existence check per candidate name (a stat, or a HEAD on an object store): the folder is never listed,
    so a 7.6M-key bucket costs a 3.8M-row CSV no LIST page."""
    if not VIDEO_ID_RE.match(video_id or ""):
        return None, "bad_video_id"
    if is_uri(videos_dir):  # object store: the id matched VIDEO_ID_RE, so the key stays in the folder
        store = _videos_store(videos_dir)
        for ext in PANDA_VIDEO_EXTENSIONS:
            if _object_exists(store, video_id + ext):
                return f"{videos_dir.rstrip('/')}/{video_id + ext}", None
        return None, "missing_video"
    root = os.path.realpath(videos_dir)
    for ext in PANDA_VIDEO_EXTENSIONS:
        cand = os.path.join(root, video_id + ext)
        if not os.path.lexists(cand):
            continue
        real = os.path.realpath(cand)
        if os.path.commonpath([root, real]) != root:
            return None, "bad_video_id"
        if os.path.isfile(real):
            return real, None
    return None, "missing_video"


def _object_exists(store: Store, rel: str) -> bool:
    """One HEAD: opening the object (pyarrow's ``get_file_info`` would add a LIST of ``<rel>/`` for every
    missing key, to tell a missing file from a folder)."""
    try:
        with call_with_retry(store.fs.open_input_file, store.path(rel), what=f"HEAD {store.uri_of(rel)}"):
            return True
    except FileNotFoundError:
        return False


def finish_record(rec: dict[str, Any], videos_dir: str, keep_labels=None) -> dict[str, Any]:
    """A parsed (and merged) record made final: spans outside ``keep_labels`` taken out first (a record left
    with none needs no video), then the video looked up for a record still ``ok``: its path, or the
    rejection ``missing_video`` (or the download step's logged reason) / ``bad_video_id``. Changes and
    returns ``rec``. A video the download step fetched as a section gets its spans moved onto the file's own
    times (``shift_spans``). The sequential reader and the Ray ingest (``curation.ingest``) both end here."""
    if keep_labels:
        filter_spans_by_label(rec, keep_labels)
    if rec.get("status") != "ok" or rec.get("video_path"):
        return rec
    raw_id = rec["video_id"]
    path, why = resolve_video(videos_dir, raw_id)
    if path is not None:
        rec["video_path"] = path
        shift_spans(rec, section_offset(download_log(videos_dir, raw_id)))  # a section file: its own times
        return rec
    detail = f"no {raw_id}.mp4|.mkv|.webm in {videos_dir}"
    failed = download_failure(download_log(videos_dir, raw_id)) if why == "missing_video" else None
    if failed is not None:  # the download step tried and failed: its reason, not missing_video
        why, detail = failed
    rec.update(status="rejected", reason=why, detail=detail)
    return rec


def _merge(into: dict[str, Any], rec: dict[str, Any], line: int) -> None:
    """Append ``rec``'s spans (with captions and scores) to ``into`` unless the span is already there."""
    have = {tuple(s) for s in into["spans"]}
    scores_ok = into["matching_score"] is not None and rec["matching_score"] is not None
    # Panda's per-span columns survive a merge only when both rows have them (else they would not line up)
    extra = [k for k in ("span_labels", "span_shot_boundaries")
             if into.get(k) is not None and rec.get(k) is not None]
    for i, span in enumerate(rec["spans"]):
        if tuple(span) in have:
            continue
        into["spans"].append(span)
        into["span_captions"].append(rec["span_captions"][i])
        if scores_ok:
            into["matching_score"].append(rec["matching_score"][i])
        for k in extra:
            into[k].append(rec[k][i])
    if not scores_ok:
        into["matching_score"] = None
    for k in ("span_labels", "span_shot_boundaries"):
        if k in into and k not in extra:
            into[k] = None
    into["warnings"].append(f"merged_duplicate_row:{line}")


def parse_cells(row: dict[str, str], line: int, source: str) -> dict[str, Any]:
    """One CSV row's cells -> its record before the video is looked up (``finish_record`` does that): a
    rejection for a bad id / timestamp / caption, else an ``ok`` record whose ``video_path`` is None. Depends
    on the row alone, so the Ray ingest caches it per CSV part."""
    raw_id = (row.get("videoID") or "").strip()
    if not VIDEO_ID_RE.match(raw_id):
        return rejected_record(f"row-{line}", source, "bad_video_id", f"videoID {raw_id[:80]!r}", row=line)
    base = {"row": line, "url": (row.get("url") or "").strip() or None}
    try:
        spans = parse_spans(row.get("timestamp") or "")
    except ValueError as e:
        return rejected_record(raw_id, source, "bad_timestamp", str(e)[:200], **base)
    try:
        captions, warnings = parse_captions(row.get("caption"), len(spans))
    except ValueError as e:
        return rejected_record(raw_id, source, "bad_caption", str(e)[:200], **base)
    try:
        scores = parse_scores(row.get("matching_score"), len(spans))
    except ValueError:
        scores, warnings = None, warnings + ["bad_matching_score"]
    extra = {}
    for col, key, parse in (("desirable_filtering", "span_labels", parse_labels),
                            ("shot_boundary_detection", "span_shot_boundaries", parse_shot_boundaries)):
        try:
            value = parse(row.get(col), len(spans))
        except ValueError:  # LiteralError too: a bad list only costs this column, the row is kept
            value = None
            warnings.append(f"bad_{col}")
        if value is not None:
            extra[key] = value
    return source_record(
        raw_id,
        source,
        spans=spans,
        span_captions=captions,
        matching_score=scores,
        warnings=warnings,
        **base,
        **extra,
    )


def read_panda_csv(
    csv_path: str, videos_dir: str, source: str = "panda70m", limit: int = 0, keep_labels=None
) -> list[dict[str, Any]]:
    """``list(iter_panda_csv(...))``: every record in memory (tests, small CSVs)."""
    return list(iter_panda_csv(csv_path, videos_dir, source, limit, keep_labels))


@dataclass(frozen=True)
class PandaCsvSource:
    """What a Panda-70M read is, for a reader other than this module's own loop: the Ray runner converts the
    CSV into Parquet parts with Ray tasks (``curation.ingest``) instead of iterating here."""

    csv: str  # a local path or a URI, as configured
    videos_dir: str
    source: str
    keep_labels: tuple[str, ...] = ()


class PandaRecords(Iterator):
    """The records of a Panda-70M CSV as an iterator consumed once (read lazily on the first ``next``),
    carrying ``ingest`` (a ``PandaCsvSource``, or None with a ``limit``) for a runner that reads the CSV in
    parallel instead."""

    def __init__(self, make: Callable[[], Iterator[dict[str, Any]]], ingest: PandaCsvSource | None):
        self._make, self._it, self.ingest = make, None, ingest

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        if self._it is None:
            self._it = self._make()
        return next(self._it)


def iter_panda_csv(
    csv_path: str, videos_dir: str, source: str = "panda70m", limit: int = 0, keep_labels=None
) -> PandaRecords:
    """One record per videoID of a Panda-70M CSV, yielded as the file is read (``limit`` > 0: stop after
    that many records), so a 3.8M-row CSV never sits in memory.

    Raises at once (not at the first ``next``) when the CSV is missing, has no header, or lacks a required
    column, or when ``videos_dir`` does not exist. Videos are only read here: ``curation.download`` fetches
    them (``make download``, or the first step of ``make curate`` when the source sets ``download:``).
    Every other problem is a rejected record. Rows of a videoID seen more than once are held until its last
    row and merged (a first pass over the ids, 8 bytes each, finds them); other rows stream through. Each
    record is made final (``keep_labels``, then the video's existence) after any merge."""
    store, name = csv_store(csv_path)
    if not store.is_file(name):
        raise FileNotFoundError(f"Panda-70M CSV {csv_path} does not exist")
    if not is_uri(videos_dir) and not os.path.isdir(videos_dir):
        raise FileNotFoundError(
            f"videos folder {videos_dir} does not exist "
            "(put {videoID}.mp4 files there, or set download: true)"
        )
    header = read_header(store, name, csv_path)
    keep = tuple(keep_labels or ())

    def make() -> Iterator[dict[str, Any]]:
        local = store.local_path(name)  # an object-store CSV is read from a cached local copy
        records = (_iter_limited(local, header, source, limit) if limit
                   else _iter_streaming(local, header, source))
        return (finish_record(r, videos_dir, keep) for r in records)

    ingest = None if limit else PandaCsvSource(csv_path, videos_dir, source, keep)
    return PandaRecords(make, ingest)


def csv_store(csv_path: str) -> tuple[Store, str]:
    """(the store of the CSV's folder, the CSV's name in it): a local path or a URI."""
    if is_uri(csv_path):
        parent, name = csv_path.rsplit("/", 1)
        return Store(parent), name
    return Store(os.path.dirname(os.path.abspath(csv_path))), os.path.basename(csv_path)


# ---------------------------------------------------------------------------------------------------------
# Reading a CSV, whole or by byte range. A range reader sees the same lines as
# ``open(path, encoding="utf-8-sig", errors="replace", newline="")`` (lines end at \n, \r\n or \r), so a
# CSV cut into ranges at record ends gives the same rows, with the same line numbers, as one pass.

CSV_FIELD_LIMIT = 16 << 20  # as curation.download reads the CSV: a long caption list is a field, not an error


def csv_reader(lines):
    """``csv.reader`` with the field limit raised to ``CSV_FIELD_LIMIT`` in this process (a Ray worker as the
    driver: the same rows are malformed everywhere)."""
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    return csv.reader(lines)


_NEWLINE_PIECE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+")
BLOCK_BYTES = 1 << 22


def byte_lines(f, start: int, end: int) -> Iterator[tuple[int, bytes]]:
    """(offset just after the line, the line with its \\n) for the lines of ``f[start:end]``, in blocks."""
    f.seek(start)
    pos, tail = start, b""
    while pos < end:
        data = f.read(min(BLOCK_BYTES, end - pos))
        if not data:
            break
        pos += len(data)
        data = tail + data
        off = pos - len(data)
        lines = data.split(b"\n")
        tail = lines.pop()
        for ln in lines:
            off += len(ln) + 1
            yield off, ln + b"\n"
    if tail:
        yield pos, tail


class LineCursor:
    """Text lines of a byte range for ``csv.reader``, remembering where the last line given ends: ``offset``
    (bytes) and ``at_cut`` (it ended a byte line, so the file may be cut there)."""

    def __init__(self, f, start: int, end: int):
        self.f, self.start, self.end = f, start, end
        self.offset, self.at_cut = start, True

    def __iter__(self) -> Iterator[str]:
        first = self.start == 0
        for off, b in byte_lines(self.f, self.start, self.end):
            if first and b.startswith(codecs.BOM_UTF8):
                b = b[len(codecs.BOM_UTF8):]
            first = False
            text = b.decode("utf-8", "replace")
            pieces = _NEWLINE_PIECE.findall(text) if "\r" in text[:-2] or text.endswith("\r") else (text,)
            for i, piece in enumerate(pieces):
                self.offset, self.at_cut = off, i == len(pieces) - 1
                yield piece


def read_header(store: Store, name: str, what: str = "") -> list[str]:
    """The CSV's header cells, checked for the required columns (ValueError naming what is missing)."""
    what = what or name
    with store.open_input(name) as f:
        return _header_of(csv_reader(LineCursor(f, 0, store.size(name))), what)


def _header_of(reader, what: str) -> list[str]:
    try:
        header = next(reader)
    except StopIteration:
        raise ValueError(f"{what}: empty file, expected a header {','.join(REQUIRED_COLUMNS)}") from None
    except csv.Error as e:
        raise ValueError(f"{what}: unreadable header: {e}") from None
    header = [h.strip() for h in header]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise ValueError(
            f"{what}: missing required column(s) {missing}; found {header}; "
            f"a Panda-70M CSV has {','.join(REQUIRED_COLUMNS)}"
        )
    return header


def index_csv(f, size: int, rows_per_part: int, fine_rows: int = 256) -> dict[str, Any]:
    """One pass over the CSV (``csv.reader``, so quoted newlines stay inside their record) cutting it into
    byte ranges of about ``rows_per_part`` records, each starting at a record's first line. A CSV of at most
    ``fine_rows`` records is cut at every record (a video per part: each is its own Ray task).
    ``{"header", "rows", "parts": [[start, end, lines_before], ...]}``."""
    cur = LineCursor(f, 0, size)
    reader = csv_reader(cur)
    header = _header_of(reader, "CSV")
    # the first range starts after the header, or at 0 (its reader skips the header) when no byte line
    # ends with it (a file of bare-CR lines is one byte line: it stays one range)
    first = [cur.offset, reader.line_num] if cur.at_cut else [0, 0]
    fine: list[list[int]] = [first]
    coarse: list[list[int]] = [list(first)]
    n = since = 0
    while True:
        try:
            next(reader)
        except StopIteration:
            break
        except csv.Error:
            pass  # a malformed record is still a record: the range reader rejects it the same way
        n += 1
        since += 1
        if not cur.at_cut:
            continue
        if n <= fine_rows:
            fine.append([cur.offset, reader.line_num])
        if since >= rows_per_part:
            coarse.append([cur.offset, reader.line_num])
            since = 0
    cuts = fine if n <= fine_rows else coarse
    if cuts[-1][0] < size:
        cuts.append([size, reader.line_num])
    parts = [[a[0], b[0], a[1]] for a, b in zip(cuts, cuts[1:]) if b[0] > a[0]]
    return {"header": header, "rows": n, "parts": parts}


def parse_csv_range(f, header: list[str], start: int, end: int, lines_before: int,
                    source: str) -> Iterator[dict[str, Any]]:
    """The parsed records (``parse_cells``, before any merge or video lookup) of the CSV records in
    ``f[start:end]``, with the line numbers of a whole-file read (a range from 0 skips the header)."""
    reader = csv_reader(LineCursor(f, start, end))
    if start == 0:
        next(reader, None)
    for line, row, bad in _rows_of(reader, header, source, lines_before):
        yield bad if bad is not None else parse_cells(row, line, source)


def _rows(
    csv_path: str, header: list[str], source: str, as_dict: bool = True
) -> Iterator[tuple[int, Any, dict | None]]:
    with open(csv_path, encoding="utf-8-sig", errors="replace", newline="") as f:
        reader = csv_reader(f)
        next(reader)
        yield from _rows_of(reader, header, source, 0, as_dict)


def _rows_of(
    reader, header: list[str], source: str, lines_before: int, as_dict: bool = True
) -> Iterator[tuple[int, Any, dict | None]]:
    """(line, cells as a dict (or the list), None) for each well-formed row, (line, None, rejected record)
    for a malformed one; blank lines skipped."""
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as e:  # e.g. a field over the size limit: this line is lost, the file is not
            line = lines_before + reader.line_num
            yield line, None, rejected_record(f"row-{line}", source, "malformed_row", str(e), row=line)
            continue
        line = lines_before + reader.line_num
        if not cells or all(not c.strip() for c in cells):
            continue  # blank line
        if len(cells) != len(header):
            detail = f"{len(cells)} columns, expected {len(header)}"
            yield line, None, rejected_record(f"row-{line}", source, "malformed_row", detail, row=line)
            continue
        yield line, dict(zip(header, cells)) if as_dict else cells, None


def _id_hash(video_id: str) -> int:
    digest = hashlib.blake2b(video_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def _add(records: dict[str, dict[str, Any]], rec: dict[str, Any], line: int) -> None:
    """Put one parsed row into ``records`` (keyed by video_id): merge a duplicate of an ok record, rename a
    bad duplicate ``<id>@row-<line>`` so ids stay unique."""
    vid = rec["video_id"]
    if vid not in records:
        records[vid] = rec
    elif rec["status"] == "ok" and records[vid]["status"] == "ok":
        _merge(records[vid], rec, line)
    elif rec["status"] == "ok":
        # the first row of this id was bad: the good one takes the id, the bad one keeps its reason
        bad = records.pop(vid)
        bad["video_id"] = f"{vid}@row-{bad.get('row')}"
        records[bad["video_id"]] = bad
        records[vid] = rec
    else:
        rec["video_id"] = f"{vid}@row-{line}"
        records[rec["video_id"]] = rec


def merge_records(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The parsed records of one videoID's rows (any order) -> the records the sequential reader gives for
    them: merged in line order by ``_add``."""
    out: dict[str, dict[str, Any]] = {}
    for rec in sorted(recs, key=lambda r: r.get("row") or 0):
        _add(out, rec, rec.get("row") or 0)
    return list(out.values())


def _iter_limited(csv_path, header, source, limit) -> Iterator[dict[str, Any]]:
    records: dict[str, dict[str, Any]] = {}
    for line, row, bad in _rows(csv_path, header, source):
        if len(records) >= limit:
            break
        if bad is not None:
            records[bad["video_id"]] = bad
        else:
            _add(records, parse_cells(row, line, source), line)
    yield from records.values()


def _iter_streaming(csv_path, header, source) -> Iterator[dict[str, Any]]:
    # pass 1: the 64-bit hash of every row's videoID, and the last line of each id seen more than once
    hashes, lines = array("q"), array("q")
    col = header.index("videoID")
    for line, cells, _ in _rows(csv_path, header, source, as_dict=False):
        raw_id = cells[col].strip() if cells is not None else ""
        if VIDEO_ID_RE.match(raw_id):
            hashes.append(_id_hash(raw_id))
            lines.append(line)
    h, ln = np.frombuffer(hashes, np.int64), np.frombuffer(lines, np.int64)
    order = np.lexsort((ln, h))
    h, ln = h[order], ln[order]
    dup = np.zeros(len(h), bool)
    if len(h) > 1:
        same = h[1:] == h[:-1]
        dup[1:] |= same
        dup[:-1] |= same
    last_line = {int(x): int(y) for x, y in zip(h[dup], ln[dup])}  # sorted by line: the last one wins
    del hashes, lines, h, ln, order, dup

    # pass 2: parse and yield; rows of a duplicated id wait (in a small dict) for that id's last row
    held: dict[str, dict[str, dict[str, Any]]] = {}
    for line, row, bad in _rows(csv_path, header, source):
        if bad is not None:
            yield bad
            continue
        raw_id = row.get("videoID", "").strip()
        rec = parse_cells(row, line, source)
        key = _id_hash(raw_id) if VIDEO_ID_RE.match(raw_id) else None
        if key not in last_line:
            yield rec
            continue
        _add(held.setdefault(raw_id, {}), rec, line)
        if line == last_line[key]:
            yield from held.pop(raw_id).values()
    for group in held.values():  # a hash collision of two different ids: nothing is lost
        yield from group.values()
