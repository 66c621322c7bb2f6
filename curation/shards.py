"""WebDataset shards, the one reader and writer: deterministic plans, atomic tar files, one record per
finished shard, the shard index; listing a shards folder (``list_shards``) and the samples of one tar
(``iter_tar_samples``). The readers take a local folder or a store URI (``s3://bucket/run/shards``,
``gs://...``) through curation.storage: a remote shard is streamed front to back, never copied to disk.

The index is ``.index.json`` and the records live under ``.records/``: Ray Data's ``read_webdataset`` skips
names starting with "." or "_", HF ``datasets`` (``load_dataset("webdataset", data_dir=...)``) skips hidden
names but reads a ``_index.json`` as a tar, and plain ``webdataset`` takes the shard URLs, so with dot names
every client reads a shards folder as it is. ``read_index`` is the one reader (it also accepts the names
``_index.json`` and ``index.json`` of earlier writers)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SHARD_PATTERN = "shard-%06d.tar"
INDEX_FILE = ".index.json"
INDEX_NAMES = (INDEX_FILE, "_index.json", "index.json")  # this writer's, then earlier ones'
LEGACY_INDEX_FILE = "index.json"
RECORDS_DIR = ".records"
TAR_BLOCK = 512


def safe_component(s: str) -> str:
    """An id made safe as one path component / WebDataset key: no separators, dots or '..' (ids come from
    CSVs, and WebDataset splits a member name at its first dot)."""
    s = re.sub(r"[^A-Za-z0-9_-]+", "_", str(s)).strip("_")
    return s or "_"


def confined(root: str | os.PathLike, rel: str) -> Path:
    """``root/rel`` resolved, refusing paths that escape ``root``."""
    base = Path(root).resolve()
    p = (base / rel).resolve()
    if not p.is_relative_to(base):
        raise ValueError(f"path {rel!r} escapes {base}")
    return p


def _atomic(path: str | os.PathLike, write: Callable) -> None:
    # the one atomic local write (temp file + rename; stale temps of a killed writer removed)
    from curation.storage import atomic_local

    atomic_local(os.path.abspath(str(path)), write)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    _atomic(path, lambda f: f.write(data))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode())


def atomic_write_npy(path: str | os.PathLike, arr: np.ndarray) -> None:
    _atomic(path, lambda f: np.save(f, np.ascontiguousarray(arr), allow_pickle=False))


def load_npy(path: str | os.PathLike) -> np.ndarray:
    return np.load(path, allow_pickle=False)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# A sample is {"__key__": str, ext: bytes | Path}; Path values are read only when the shard is written.
Sample = dict


def member_bytes(n: int) -> int:
    """Bytes one tar member of ``n`` data bytes takes: a 512-byte header plus data padded to 512."""
    return TAR_BLOCK + -(-n // TAR_BLOCK) * TAR_BLOCK


def _value_len(v) -> int:
    return os.path.getsize(v) if isinstance(v, Path) else len(v)


def sample_bytes(sample: Sample) -> int:
    return sum(member_bytes(_value_len(v)) for k, v in sample.items() if k != "__key__")


def plan_shards(sizes: list[int], maxcount: int, maxsize: int) -> list[tuple[int, int]]:
    """Consecutive [start, end) ranges of samples per shard: a shard closes before a sample that would take
    it past ``maxcount`` samples or ``maxsize`` bytes (a lone oversize sample gets a shard of its own).
    Depends only on the sizes, so a re-run plans the same shards."""
    plans, start, used = [], 0, 0
    for i, n in enumerate(sizes):
        if i > start and (i - start >= maxcount or used + n > maxsize):
            plans.append((start, i))
            start, used = i, 0
        used += n
    if start < len(sizes):
        plans.append((start, len(sizes)))
    return plans


def write_tar(path: str | os.PathLike, samples: list[Sample]) -> None:
    """One shard, atomically (tmp file + os.replace), byte-reproducible: fixed mtime, owner and mode; members
    of a sample in sorted extension order (webdataset's TarWriter)."""
    from webdataset import TarWriter

    def write(f):
        w = TarWriter(f, encoder=False, mtime=0.0, user="phantom", group="phantom", mode=0o444)
        for s in samples:
            w.write({k: (v.read_bytes() if isinstance(v, Path) else v) for k, v in s.items()})
        w.close()

    _atomic(path, write)


def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


class ShardSetWriter:
    """Writes samples (sorted by key) as ``shard-%06d.tar`` under ``out_dir`` with count/size limits, in one
    process (the distributed writer is curation.global_phase; this one serves small tools and tests).

    Resumable with O(1) bookkeeping per shard: each finished shard gets one small record
    ``.records/<name>.json`` (keys, bytes, sha256), written once; on a re-run a shard whose file exists with
    the recorded sha256 and the same planned keys is kept, others are (re)written. Stale temp files and shards
    beyond the plan are removed; ``.index.json`` is written last, so its presence means the set is
    complete."""

    def __init__(
        self,
        out_dir: str | os.PathLike,
        maxcount: int = 1000,
        maxsize: int = 1 << 30,
        meta: dict | None = None,
    ):
        self.out_dir = Path(out_dir)
        self.maxcount, self.maxsize = maxcount, maxsize
        self.meta = meta or {}
        self.n_written = self.n_kept = 0

    def _clean(self, planned: set[str]) -> None:
        for p in self.out_dir.iterdir():
            if ".tmp" in p.name:
                p.unlink()
            elif re.fullmatch(r"shard-\d{6}\.tar", p.name) and p.name not in planned:
                p.unlink()  # left by an earlier, larger run
                (self.out_dir / RECORDS_DIR / f"{p.name}.json").unlink(missing_ok=True)

    def write(self, samples: list[Sample]) -> dict:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        samples = sorted(samples, key=lambda s: s["__key__"])
        keys = [s["__key__"] for s in samples]
        if len(set(keys)) != len(keys):
            raise ValueError("duplicate sample keys")
        plans = plan_shards([sample_bytes(s) for s in samples], self.maxcount, self.maxsize)
        names = [SHARD_PATTERN % i for i in range(len(plans))]
        index_path = self.out_dir / INDEX_FILE
        for stale in [self.out_dir / n for n in INDEX_NAMES]:
            if stale.exists():
                stale.unlink()  # the set is being changed: no index until it is complete again
        self._clean(set(names))
        entries = []
        for name, (a, b) in zip(names, plans):
            path = self.out_dir / name
            record = self.out_dir / RECORDS_DIR / f"{name}.json"
            want = keys[a:b]
            prev = _read_json(record)
            if prev.get("keys") == want and path.exists() and sha256_file(path) == prev.get("sha256"):
                entries.append(prev)
                self.n_kept += 1
                continue
            write_tar(path, samples[a:b])
            entry = {
                "name": name,
                "samples": b - a,
                "bytes": path.stat().st_size,
                "sha256": sha256_file(path),
                "keys": want,
            }
            atomic_write_json(record, entry)
            entries.append(entry)
            self.n_written += 1
        index = {
            **self.meta,
            "shards": [{k: e[k] for k in ("name", "samples", "bytes", "sha256")} for e in entries],
            "total_samples": len(samples),
            "total_bytes": sum(e["bytes"] for e in entries),
        }
        atomic_write_json(index_path, index)
        log.info(
            "shards: %d written, %d kept from an earlier run, %d samples",
            self.n_written,
            self.n_kept,
            len(samples),
        )
        return index


def index_path(shards_dir: str | os.PathLike) -> Path | None:
    """The index file of a local shards folder (INDEX_NAMES in order), or None."""
    d = Path(shards_dir)
    return next((d / n for n in INDEX_NAMES if (d / n).exists()), None)


def _index_object(store) -> str | None:
    """The index name in a store's root (INDEX_NAMES in order), or None."""
    return next((n for n in INDEX_NAMES if store.exists(n)), None)


def index_file(shards_dir: str | os.PathLike) -> str | None:
    """The index of a shards folder, local or a store URI, as a path or URI; None when it has none."""
    from curation.storage import Store, is_uri

    if is_uri(shards_dir):
        store = Store(str(shards_dir))
        name = _index_object(store)
        return store.uri_of(name) if name else None
    path = index_path(shards_dir)
    return str(path) if path else None


def read_index(shards_dir: str | os.PathLike) -> dict:
    """The index of a shards folder, local or a store URI such as ``s3://bucket/run/shards``
    (FileNotFoundError when it has none)."""
    from curation.storage import Store, is_uri

    if is_uri(shards_dir):
        store = Store(str(shards_dir))
        name = _index_object(store)
        if name is None:
            raise FileNotFoundError(f"no {INDEX_FILE} in {shards_dir}")
        return json.loads(store.read_bytes(name))
    path = index_path(shards_dir)
    if path is None:
        raise FileNotFoundError(f"no {INDEX_FILE} in {shards_dir}")
    with open(path) as f:
        return json.load(f)


def _entries(index, where) -> list[dict]:
    entries = []
    for item in index.get("shards", []) if isinstance(index, dict) else index:
        entry = {"name": item} if isinstance(item, str) else dict(item)
        name = entry.get("name") or entry.get("path") or entry.get("file") or entry.get("shard")
        if not isinstance(name, str):
            raise ValueError(f"{where}: shard entry without a name: {item!r}")
        entry["name"] = name
        entries.append(entry)
    return entries


def index_entries(shards_dir: str | os.PathLike) -> tuple[Path | str, list[dict]]:
    """(index file, its shard entries) of a shards folder, each entry with a "name" (entries of earlier
    writers may be plain names or name the shard under path/file/shard); without an index, one entry per
    shard-*.tar in name order (and the path the index would have). A store URI gives the index's URI."""
    from curation.storage import Store, is_uri

    if is_uri(shards_dir):
        store = Store(str(shards_dir))
        name = _index_object(store)
        if name is None:
            tars = [n for n in store.list() if re.fullmatch(r"shard-[^/]*\.tar", n)]
            return store.uri_of(INDEX_FILE), [{"name": n} for n in tars]
        return store.uri_of(name), _entries(json.loads(store.read_bytes(name)), store.uri_of(name))
    root = Path(shards_dir)
    path = index_path(root)
    if path is None:
        return root / INDEX_FILE, [{"name": p.name} for p in sorted(root.glob("shard-*.tar"))]
    with open(path, encoding="utf-8") as f:
        index = json.load(f)
    return path, _entries(index, path)


def list_shards(shards: str | os.PathLike, verify_sha256: bool = False) -> list[str]:
    """Shard paths of a folder in index order (``index_entries``), confined to that folder, each checked to
    exist and, with ``verify_sha256``, against the sha256 its entry records; a ``.tar`` path is itself.
    A store URI (``s3://bucket/run/shards``) gives the shards' URIs, with the same checks."""
    from curation.storage import is_uri

    if is_uri(shards):
        return _list_store_shards(str(shards), verify_sha256)
    root = Path(shards).resolve()
    if root.is_file() and root.suffix == ".tar":
        return [str(root)]
    if not root.is_dir():
        raise FileNotFoundError(f"shard directory {root} does not exist")
    index, entries = index_entries(root)
    paths = []
    for entry in entries:
        path = (root / entry["name"]).resolve()
        # Names come from a file we did not write: never follow them outside the shard directory.
        if not path.is_relative_to(root):
            raise ValueError(f"{index}: shard {entry['name']!r} escapes {root}")
        if not path.exists():
            raise FileNotFoundError(f"shard {path} listed in {index} is missing")
        if verify_sha256 and entry.get("sha256"):
            digest = sha256_file(path)
            if digest != entry["sha256"]:
                raise ValueError(f"shard {path}: sha256 {digest} != index {entry['sha256']}")
        paths.append(str(path))
    if not paths:
        raise FileNotFoundError(f"no shards in {root}")
    return paths


def _list_store_shards(uri: str, verify_sha256: bool) -> list[str]:
    """list_shards of a store URI: the index object, one listing for the existence checks, and each
    object's sha256 computed by streaming it (when asked)."""
    from curation.storage import Store

    store = Store(uri)
    if uri.endswith(".tar") and store.is_file(""):
        return [store.uri]
    index, entries = index_entries(store.uri)
    present = set(store.list())
    if not present:
        raise FileNotFoundError(f"shard directory {store.uri} does not exist")
    urls = []
    for entry in entries:
        try:
            rel = store.path(entry["name"])[len(store.base) + 1 :]
        except ValueError:  # a name climbing out of the folder, from a file we did not write
            raise ValueError(f"{index}: shard {entry['name']!r} escapes {store.uri}") from None
        url = store.uri_of(rel)
        if rel not in present:
            raise FileNotFoundError(f"shard {url} listed in {index} is missing")
        if verify_sha256 and entry.get("sha256"):
            digest = shard_sha256(url)
            if digest != entry["sha256"]:
                raise ValueError(f"shard {url}: sha256 {digest} != index {entry['sha256']}")
        urls.append(url)
    if not urls:
        raise FileNotFoundError(f"no shards in {store.uri}")
    return urls


# Remote shards are read through a buffer this size: a tar is read in 512-byte blocks, and each read of an
# unbuffered object-store file is one ranged GET.
STREAM_BUFFER = 8 << 20


def open_shard(url: str | os.PathLike):
    """A binary stream of one shard, a local path or a store URI, for reading front to back."""
    from curation.storage import filesystem_for, is_uri

    if is_uri(url):
        fs, path = filesystem_for(str(url))
        return fs.open_input_stream(path, compression=None, buffer_size=STREAM_BUFFER)
    return open(url, "rb")


def shard_sha256(url: str | os.PathLike) -> str:
    """sha256 of a shard, local or a store URI (streamed, never held in memory)."""
    h = hashlib.sha256()
    with open_shard(url) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# What reading a broken shard with iter_tar_samples raises (a missing file, a bad or truncated tar).
TAR_ERRORS = (OSError, tarfile.TarError, EOFError)


def iter_tar_samples(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample of one shard (a local path or a store URI), in file order, with plain
    tarfile: a member's base name up to its first dot is its sample's key, the rest its extension. A bad or
    truncated tar raises (one of TAR_ERRORS) after the samples read before the break."""
    from curation.storage import filesystem_for, is_uri

    if is_uri(path):
        fs, key = filesystem_for(str(path))
        size = fs.get_file_info(key).size
        if size is None:
            raise FileNotFoundError(f"shard {path} does not exist")
        # A store object is read as a stream (tar mode "r|"): sequential buffered reads, no seeks.
        with (
            fs.open_input_stream(key, compression=None, buffer_size=STREAM_BUFFER) as f,
            tarfile.open(fileobj=f, mode="r|") as tf,
        ):
            yield from _tar_samples(tf, size, path)
        return
    with tarfile.open(path, "r") as tf:
        yield from _tar_samples(tf, os.path.getsize(path), path)


def _tar_samples(tf: tarfile.TarFile, size: int, path) -> Iterator[tuple[str, dict[str, bytes]]]:
    cur_key, cur = None, {}
    for m in tf:
        if not m.isfile():
            continue
        base = os.path.basename(m.name)
        key, _, ext = base.partition(".")
        if key != cur_key and cur_key is not None:  # the previous sample is whole: out before reading on
            yield cur_key, cur
            cur = {}
        cur_key = key
        data = tf.extractfile(m).read()
        if len(data) != m.size:
            raise tarfile.ReadError(f"{m.name}: truncated ({len(data)} of {m.size} bytes)")
        cur[ext] = data
    # tarfile ends the member list without an error where a header after the first is cut short or missing:
    # a tar truncated there would read as a shorter, whole one (its last sample perhaps missing members). A
    # whole tar has its end-of-archive blocks.
    if size - tf.offset < tarfile.BLOCKSIZE:
        raise tarfile.ReadError(
            f"{path}: truncated ({size} bytes, no end-of-archive block after byte {tf.offset})"
        )
    if cur_key is not None:
        yield cur_key, cur
