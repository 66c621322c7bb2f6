"""One storage layer for every reader and writer: a local folder or any pyarrow filesystem URI
(``s3://bucket/prefix``, ``gs://bucket/prefix``), behind one small ``Store`` object.

Writes are atomic: a local file is written under a temporary name and renamed; an object-store PUT is
atomic by itself (readers see the old object or the whole new one). Code that needs a real local file
(decord, PyAV, ffmpeg) asks ``Store.local_path(rel)``: the file itself for a local store, a cached
download for a remote one, kept in a per-machine cache capped in bytes (least recently used files go first;
see ``cache_limit_bytes``). S3-compatible endpoints (MinIO, moto, R2) come from ``AWS_ENDPOINT_URL`` (the
AWS SDK's variable) or ``PHANTOM_S3_ENDPOINT``; credentials from the usual AWS variables.

Every ``Store`` call retries transient errors (connection refused or reset, timeouts, HTTP 5xx, throttling
such as S3's SlowDown) with exponential backoff and jitter, at most ``RETRY_ATTEMPTS`` tries and
``RETRY_TOTAL_S`` seconds (env ``PHANTOM_STORE_RETRY_ATTEMPTS`` / ``PHANTOM_STORE_RETRY_TOTAL_S``), then
raises the last error; a permanent one (missing key, access denied, a bad path) raises at once.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import fcntl
import functools
import glob
import hashlib
import heapq
import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from urllib.parse import urlparse

REMOTE_SCHEMES = ("s3", "gs", "gcs", "abfs", "hdfs")
log = logging.getLogger(__name__)

# Retries of transient store errors (the environment variables, read at each call, override these).
RETRY_ATTEMPTS = 8  # tries per call, the first included
RETRY_TOTAL_S = 120.0  # no new try starts after this long since the first
RETRY_BASE_S = 0.5  # first delay; doubles per try, capped at RETRY_MAX_DELAY_S, times a 0.5..1.0 jitter
RETRY_MAX_DELAY_S = 15.0
# lower-case fragments of the messages of transient errors (pyarrow's AWS/GCS clients, HTTP status texts)
TRANSIENT_FRAGMENTS = (
    "network_connection", "could not connect", "couldn't connect", "connection refused", "connection reset",
    "connection aborted", "connection was closed", "broken pipe", "timed out", "timeout", "request_timeout",
    "slow_down", "slowdown", "throttl", "too many requests", "reduce your request rate",
    "service_unavailable", "service unavailable", "internal_failure", "internalerror", "internal error",
    "bad gateway", "gateway timeout", "http response code: 5", "response code 5", "temporarily unavailable",
)
IO_THREADS = 16  # store requests one process keeps in flight at once (I/O-bound: threads, not CPUs)
# never retried: the answer will not change (a missing key, no permission, a path that is a folder)
PERMANENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                    FileExistsError, ValueError, TypeError)


def is_transient(err: BaseException) -> bool:
    """Whether a store error may pass if the call is tried again (a network fault, 5xx, throttling)."""
    if isinstance(err, PERMANENT_ERRORS):
        return False
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    if not isinstance(err, OSError):
        return False
    text = str(err).lower()
    if "access_denied" in text or "accessdenied" in text or "access denied" in text:
        return False
    return any(f in text for f in TRANSIENT_FRAGMENTS)


def retry_delay_s(attempt: int, base_s: float = RETRY_BASE_S, cap_s: float = RETRY_MAX_DELAY_S) -> float:
    """Delay after the ``attempt``-th failed try (1-based): base * 2^(attempt-1), capped, times 0.5..1.0."""
    return min(cap_s, base_s * 2 ** max(0, attempt - 1)) * (0.5 + 0.5 * random.random())


def call_with_retry(fn, *args, what: str = "store call", **kwargs):
    """``fn(*args, **kwargs)``, retried on transient errors within the attempt and time budget."""
    attempts = max(1, int(os.environ.get("PHANTOM_STORE_RETRY_ATTEMPTS") or RETRY_ATTEMPTS))
    total_s = float(os.environ.get("PHANTOM_STORE_RETRY_TOTAL_S") or RETRY_TOTAL_S)
    t0 = time.monotonic()
    for attempt in range(1, attempts + 1):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if not is_transient(e) or attempt >= attempts:
                raise
            delay = retry_delay_s(attempt)
            if time.monotonic() - t0 + delay > total_s:
                raise
            log.warning("%s failed (try %d of %d), retrying in %.1f s: %s", what, attempt, attempts, delay,
                        str(e)[:200])
            time.sleep(delay)
    raise AssertionError("unreachable")


def _retried(method):
    """A Store method whose whole call is retried on transient errors (each is idempotent)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        return call_with_retry(method, self, *args, what=f"{self!r}.{method.__name__}", **kwargs)

    return wrapper


def is_uri(path: str | os.PathLike) -> bool:
    return urlparse(str(path)).scheme in REMOTE_SCHEMES


def in_order(fn, items: Iterable, threads: int = IO_THREADS) -> Iterator:
    """``fn`` of each of ``items``, yielded in their order, ``threads`` calls in flight: a task that reads
    thousands of small objects waits one round trip per ``threads`` objects, not per object. Calls run ahead
    of the consumer by at most ``2 * threads`` items, so memory holds that many results whatever the length
    of ``items``; the first error is raised when its item's turn comes."""
    it = iter(items)
    if threads <= 1:
        yield from (fn(x) for x in it)
        return
    pool = cf.ThreadPoolExecutor(threads, thread_name_prefix="store-io")
    try:
        ahead: deque = deque(pool.submit(fn, x) for _, x in zip(range(2 * threads), it))
        while ahead:
            out = ahead.popleft().result()
            for x in it:  # one more in flight for the one taken
                ahead.append(pool.submit(fn, x))
                break
            yield out
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _s3_filesystem():
    from pyarrow import fs

    endpoint = os.environ.get("PHANTOM_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL") or ""
    kw: dict = {}
    if endpoint:
        u = urlparse(endpoint)
        kw["endpoint_override"] = u.netloc or u.path
        kw["scheme"] = u.scheme or "https"
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kw["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
        kw["secret_key"] = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
    kw["region"] = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
    # an object written whole before its stream closes goes up as one PUT, not a multipart upload of three
    # requests (most map-phase objects are packs, records and tables of a few MB or less)
    kw["allow_delayed_open"] = True
    return fs.S3FileSystem(**kw)


def filesystem_for(uri: str):
    """(pyarrow FileSystem, path inside it) for a local path or a remote URI."""
    from pyarrow import fs

    u = urlparse(str(uri))
    if u.scheme == "s3":
        return _s3_filesystem(), f"{u.netloc}{u.path}".rstrip("/")
    if u.scheme in REMOTE_SCHEMES:
        f, path = fs.FileSystem.from_uri(str(uri))
        return f, path.rstrip("/")
    return fs.LocalFileSystem(), os.path.abspath(str(uri))


def _cache_root() -> Path:
    return Path(os.environ.get("PHANTOM_CACHE_DIR") or Path(tempfile.gettempdir()) / "phantom-cache")


# The download cache: <root>/<2 hex>/<key>-<name>, and only those folders are evicted from: <root>/scratch/
# (stage outputs) and any other folder under the root (curation.download's) are not. Every process on a
# machine shares it. A hit only touches its file (no walk); a download walks the cache once, under an flock
# on the root folder, so one process evicts at a time and the cap holds for all of them together with no
# count or lock file left in the root. A walk stats each cached file (~20 us a file on a busy 2-core box:
# 0.1 s for 5,000), about the time a 10 MB download takes; the objects read this way are videos, CSVs,
# shards and model files. A per-process running estimate would skip walks but not see the others' downloads.
CACHE_MAX_GB_ENV = "PHANTOM_CACHE_MAX_GB"
STALE_TMP_S = 3600.0  # a download's temp file untouched this long belongs to a killed process


def set_cache_limit_gb(max_gb: float) -> None:
    """Cap this machine's download cache at ``max_gb`` (10^9 bytes; 0: nothing beyond the file in use).
    Set through PHANTOM_CACHE_MAX_GB so that processes started from here (local Ray workers) inherit it."""
    gb = float(max_gb)
    if not gb >= 0:
        raise ValueError(f"cache_max_gb must be >= 0, not {max_gb!r}")
    os.environ[CACHE_MAX_GB_ENV] = repr(gb)


def cache_limit_bytes() -> int:
    """The download cache's cap in bytes: PHANTOM_CACHE_MAX_GB, else the default of ``run.cache_max_gb``."""
    raw = os.environ.get(CACHE_MAX_GB_ENV, "").strip()
    if not raw:
        from curation.config import RunConfig

        return round(RunConfig().cache_max_gb * 1e9)
    gb = float(raw)
    if not gb >= 0:
        raise ValueError(f"{CACHE_MAX_GB_ENV}={raw!r}: must be a number of GB >= 0")
    return round(gb * 1e9)


@contextlib.contextmanager
def _cache_lock(root: Path):
    """An exclusive flock on the cache's root folder (no lock file: the folder itself)."""
    fd = os.open(root, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _after_download(root: Path, dest: Path, limit: int) -> int:
    """Evict down to the cap after a download landed at ``dest`` (kept); the bytes the cache then holds."""
    with _cache_lock(root):
        return evict_cache(root, limit, keep=str(dest))


def _unlink_unpinned(path: str) -> bool:
    """Remove a cache file unless a reader holds it (``Store.local_path_ctx``'s shared flock); True when it
    is gone. Another process's unlink or a reader with the file open is no error."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return True
    finally:
        os.close(fd)


def evict_cache(root: str | os.PathLike, limit: int, keep: str = "") -> int:
    """Remove the least recently used files of the download cache under ``root`` (its <2 hex> folders only:
    never scratch/ or another tool's folder; not ``keep``, not a pinned one) until it holds at most ``limit``
    bytes; returns the bytes it still holds. One walk and a heap: O(files + evicted * log files)."""
    root = str(root)
    now = time.time()
    files: list[tuple[float, str, int]] = []
    total = 0
    for folder, dirs, names in os.walk(root):
        if folder == root:  # the top holds other tools' folders, no cached object
            dirs[:] = [d for d in dirs if len(d) == 2 and all(c in "0123456789abcdef" for c in d)]
            continue
        for name in names:
            p = os.path.join(folder, name)
            try:
                st = os.stat(p)
            except FileNotFoundError:
                continue
            if name.endswith(".tmp"):  # a download in flight (not counted), or a killed one's leftover
                if now - st.st_mtime > STALE_TMP_S:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(p)
                continue
            files.append((st.st_mtime, p, st.st_size))
            total += st.st_size
    heapq.heapify(files)
    while total > limit and files:
        _, p, size = heapq.heappop(files)
        if p != keep and _unlink_unpinned(p):
            total -= size
    return total


DOWNLOAD_CHUNK = 16 << 20  # bytes per read of a download: on S3 each read is one ranged GET


class Store:
    """A root (local folder or URI) and relative paths under it. Picklable: Ray tasks receive the URI and
    rebuild the filesystem in the worker."""

    ray_plain = True  # curation.execute passes a Store to Ray workers as it is (it pickles to its URI)

    def __init__(self, root: str | os.PathLike):
        root = str(root)
        self.uri = root.rstrip("/") if is_uri(root) else os.path.abspath(root)
        self.is_local = not is_uri(root)
        self._fs = None
        self._base = None

    def __reduce__(self):
        return (Store, (self.uri,))

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Store) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    # -- paths ------------------------------------------------------------------------------------------
    @property
    def fs(self):
        if self._fs is None:
            self._fs, self._base = filesystem_for(self.uri)
        return self._fs

    @property
    def base(self) -> str:
        """The root as a path inside ``fs`` (``bucket/prefix`` for S3, an absolute path locally)."""
        self.fs  # noqa: B018 (resolves _base)
        return self._base

    def path(self, rel: str = "") -> str:
        """``rel`` as a path inside ``fs``; refuses paths that climb out of the root."""
        rel = str(rel).replace("\\", "/").lstrip("/")
        parts = [p for p in rel.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise ValueError(f"path {rel!r} escapes {self.uri}")
        return "/".join([self.base, *parts]) if parts else self.base

    def uri_of(self, rel: str = "") -> str:
        if self.is_local:
            return self.path(rel)
        scheme = urlparse(self.uri).scheme
        return f"{scheme}://{self.path(rel)}"

    def sub(self, rel: str) -> Store:
        return Store(self.uri_of(rel))

    # -- reads ------------------------------------------------------------------------------------------
    @_retried
    def exists(self, rel: str) -> bool:
        from pyarrow import fs

        return self.fs.get_file_info(self.path(rel)).type != fs.FileType.NotFound

    @_retried
    def is_file(self, rel: str) -> bool:
        from pyarrow import fs

        return self.fs.get_file_info(self.path(rel)).type == fs.FileType.File

    @_retried
    def size(self, rel: str) -> int:
        return int(self.fs.get_file_info(self.path(rel)).size)

    @_retried
    def read_bytes(self, rel: str) -> bytes:
        # a random-access file reads the rest in one GET; pyarrow's S3 input stream reads 256 KB per GET
        # (160 GETs for a 40 MB table, counted at moto's server)
        with self.fs.open_input_file(self.path(rel)) as f:
            return f.read()

    def read_each(self, rels: Iterable[str], threads: int = IO_THREADS) -> Iterator[bytes]:
        """The bytes of each of ``rels``, in their order, ``threads`` GETs in flight (``in_order``)."""
        return in_order(self.read_bytes, rels, threads)

    def read_json(self, rel: str, default=None):
        """The JSON at ``rel``; ``default`` when it is missing or unreadable (a torn local write)."""
        try:
            return json.loads(self.read_bytes(rel))
        except (FileNotFoundError, OSError, ValueError) as e:
            if is_transient(e):  # the store is down past the retries: not the same as a missing file
                raise
            return default

    @_retried
    def open_input(self, rel: str):
        return self.fs.open_input_file(self.path(rel))

    def list(self, prefix: str = "", suffix: str = "") -> Iterator[str]:
        """Relative paths of the files under ``prefix`` (recursive), sorted; temporary files skipped."""
        from pyarrow import fs

        root = self.path(prefix)
        try:
            infos = call_with_retry(self.fs.get_file_info,
                                    fs.FileSelector(root, recursive=True, allow_not_found=True),
                                    what=f"{self!r}.list({prefix!r})")
        except FileNotFoundError:
            return
        base = self.base.rstrip("/") + "/"
        out = []
        for info in infos:
            if info.type != fs.FileType.File:
                continue
            name = info.path.rsplit("/", 1)[-1]
            if ".tmp" in name or (suffix and not name.endswith(suffix)):
                continue
            out.append(info.path[len(base):] if info.path.startswith(base) else info.path)
        yield from sorted(out)

    def subdirs(self, prefix: str = "") -> list[str]:
        """Names of the folders directly under ``prefix`` (one listing level: on an object store one LIST
        with a delimiter, whatever lies below them), sorted."""
        from pyarrow import fs

        sel = fs.FileSelector(self.path(prefix), recursive=False, allow_not_found=True)
        infos = call_with_retry(self.fs.get_file_info, sel, what=f"{self!r}.subdirs({prefix!r})")
        return sorted(i.path.rstrip("/").rsplit("/", 1)[-1] for i in infos if i.type == fs.FileType.Directory)

    @contextlib.contextmanager
    def local_path_ctx(self, rel: str):
        """``local_path(rel)``, pinned for the block: no process's cache eviction removes it meanwhile (a
        shared flock, which eviction tests before it unlinks)."""
        if self.is_local:
            yield self.path(rel)
            return
        for _ in range(3):
            path = self.local_path(rel)
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:  # evicted between the download and the open: fetch again
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)
                try:  # still the file at that path (an eviction may have unlinked it before the lock)?
                    same = os.stat(path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    yield path
                    return
            finally:
                os.close(fd)
        raise OSError(f"{self!r}: {rel!r} was evicted from the cache three times while being pinned")

    @_retried
    def local_path(self, rel: str) -> str:
        """A local file with the content of ``rel``: the file itself for a local store, else a download
        into the cache (re-fetched when its size differs), written atomically. A hit marks the file used
        (its mtime); a download may evict the least recently used others (``run.cache_max_gb``), never the
        file returned. Another process's download may evict it later: hold ``local_path_ctx`` to pin it."""
        if self.is_local:
            return self.path(rel)
        key = hashlib.sha1(self.uri_of(rel).encode()).hexdigest()[:20]
        root = _cache_root()
        dest = root / key[:2] / f"{key}-{os.path.basename(rel)}"
        limit = cache_limit_bytes()  # a bad PHANTOM_CACHE_MAX_GB fails before any download
        remote_size = self.size(rel)
        with contextlib.suppress(FileNotFoundError):  # gone: evicted, or never fetched
            if dest.stat().st_size == remote_size:
                os.utime(dest)  # used now: the last to be evicted
                return str(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out, self.fs.open_input_stream(self.path(rel)) as src:
                shutil.copyfileobj(src, out, DOWNLOAD_CHUNK)
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        try:
            _after_download(root, dest, limit)
        except OSError as e:  # a cache that cannot be trimmed still served this read
            log.warning("download cache %s: could not apply its size cap: %s", root, e)
        return str(dest)

    # -- writes -----------------------------------------------------------------------------------------
    @_retried
    def write_bytes(self, rel: str, data: bytes) -> None:
        if self.is_local:
            atomic_local(self.path(rel), lambda f: f.write(data))
            return
        with self.fs.open_output_stream(self.path(rel)) as f:
            f.write(data)

    def write_json(self, rel: str, obj, indent: int | None = None) -> None:
        self.write_bytes(rel, json.dumps(obj, sort_keys=True, indent=indent).encode())

    @_retried
    def put_file(self, rel: str, local: str | os.PathLike) -> None:
        """Copy a local file to ``rel`` (atomic); a no-op when it is already that file."""
        local = os.path.abspath(local)
        if self.is_local:
            dest = self.path(rel)
            if os.path.abspath(dest) == local:
                return
            atomic_local(dest, lambda f: _copy_into(local, f))
            return
        with open(local, "rb") as src, self.fs.open_output_stream(self.path(rel)) as f:
            _upload(src, f)

    @contextlib.contextmanager
    def writer(self, rel: str):
        """A binary file object whose content appears at ``rel`` only when the block ends without error."""
        if self.is_local:
            dest = self.path(rel)
            os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), prefix=f".{os.path.basename(dest)}.",
                                       suffix=".tmp")
            try:
                os.fchmod(fd, file_mode())
                with os.fdopen(fd, "wb") as f:
                    yield f
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, dest)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            return
        # Object stores: spool locally, then one PUT, so a failure never leaves a partial object.
        with tempfile.TemporaryFile() as f:
            yield f

            def upload():
                f.seek(0)
                with self.fs.open_output_stream(self.path(rel)) as out:
                    _upload(f, out)

            call_with_retry(upload, what=f"{self!r}.writer({rel!r})")

    @_retried
    def delete(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_file(self.path(rel))

    def delete_dir(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError, OSError):
            self.fs.delete_dir(self.path(rel))


UPLOAD_WINDOW = 64 << 20  # bytes of an upload that may wait in memory for their part's PUT


def _upload(src, out) -> None:
    """Copy ``src`` into an object-store output stream, waiting for the queued parts every ``UPLOAD_WINDOW``
    bytes: pyarrow's S3 stream uploads parts in the background and queues every part handed to it, so a
    file read from disk faster than the link takes it sat in memory whole (a 300 MB file: ~350 MB RSS,
    measured against moto). An object under the window still goes up as one PUT."""
    sent = 0
    while chunk := src.read(1 << 20):
        out.write(chunk)
        sent += len(chunk)
        if sent >= UPLOAD_WINDOW:
            out.flush()  # returns once every part handed over so far is uploaded
            sent = 0


_FILE_MODE: int | None = None


def file_mode() -> int:
    """0o666 less the process umask: the mode ``open()`` would give a new file (mkstemp gives 0o600, which
    shared storage cannot read). Read from /proc (the os.umask round trip would briefly change it for
    every thread); cached."""
    global _FILE_MODE
    if _FILE_MODE is None:
        umask = None
        with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as f:
            umask = next((int(ln.split()[1], 8) for ln in f if ln.startswith("Umask:")), None)
        if umask is None:
            umask = os.umask(0o022)
            os.umask(umask)
        _FILE_MODE = 0o666 & ~umask
    return _FILE_MODE


def _copy_into(src: str, f) -> None:
    with open(src, "rb") as s:
        shutil.copyfileobj(s, f, 1 << 20)


def atomic_local(path: str, write) -> None:
    folder, name = os.path.dirname(path) or ".", os.path.basename(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    # a writer of this path killed mid-write (SIGKILL skips `finally`) left its temp file: one writer per
    # path by design, so any other temp of this name is stale
    for stale in glob.glob(os.path.join(glob.escape(folder), glob.escape(f".{name}.") + "*.tmp")):
        with contextlib.suppress(OSError):
            os.unlink(stale)


def scratch_dir(store: Store) -> str:
    """The local working folder for a store: the store itself when local, else a per-store cache folder
    (stages write there; the runner uploads what they made)."""
    if store.is_local:
        return store.path()
    key = hashlib.sha1(store.uri.encode()).hexdigest()[:16]
    d = _cache_root() / "scratch" / key
    d.mkdir(parents=True, exist_ok=True)
    return str(d)
