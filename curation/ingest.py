"""The source, read by Ray: a source never sits in the driver, which holds counts and part names only.

- A Panda-70M CSV (a local path or a URI) is cut into byte ranges at record ends by one Ray task (one
  ``csv.reader`` pass, ``panda70m.index_csv``), then each range is parsed by its own Ray task
  (``panda70m.parse_csv_range``) into ``source/csv-<digest>/part-NNNNN.parquet`` with a done marker
  ``part-NNNNN.done.json`` beside it. ``<digest>`` covers the CSV's URI, size and mtime, the source name and
  the parse version: a restart (also after a SIGKILLed driver) reuses every finished part, and a changed CSV
  gets a new folder. The videoIDs on more than one row are found by a Ray ``groupby`` (count > 1) and kept
  in ``dups/``; at run time their rows are merged by a ``groupby`` in Ray (Panda's merge rule,
  ``panda70m.merge_records``) and every record is made final in ``map_batches``
  (``panda70m.finish_record``: the ``keep_labels`` prefilter, then the video's existence, checked per row
  by the worker; the videos folder is never listed).
- Any other source (a folder, the sample, an iterable of records) is written in streaming chunks to
  content-keyed parts ``source/rows/<sha>.parquet`` (a rerun after a kill rewrites nothing it already
  wrote, and deletes them once its map phase is over); its duplicate ids are found by the same ``groupby``
  and refused.

Either way the map phase (``curation.runner.run_ray``) reads a Ray Dataset with columns ``video_id`` and
``rec`` (the record as JSON): each part read whole by its own task (``read_parts``), then streamed on in
blocks of ``run.videos_per_block`` videos (``block_rows``), the unit a map group hands to the next."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from curation.execute import storage_runtime_env
from curation.sources.panda70m import (
    PandaCsvSource,
    csv_store,
    finish_record,
    index_csv,
    merge_records,
    parse_csv_range,
)
from curation.storage import Store

log = logging.getLogger(__name__)

INGEST_VERSION = "1"  # bump when parse_cells / the part layout changes: old parts are then not reused
SMALL_SOURCE_ROWS = 256  # a source of fewer rows gets one row per part (each video its own Ray task)


@dataclass
class SourceParts:
    """Where a source's parts are and what the ingest did: the counts a run reports."""

    paths: list[str]  # parts relative to the store
    rows: int = 0  # CSV records (or source rows) in the parts
    written: int = 0  # parts this call wrote
    reused: int = 0  # parts a previous call had finished
    dup_ids: int = 0  # videoIDs on more than one row (merged for Panda-70M, refused otherwise)
    prefix: str = ""
    temporary: bool = False  # deleted once the map phase is over
    stats: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"parts": len(self.paths), "rows": self.rows, "parts_written": self.written,
                "parts_reused": self.reused, "dup_ids": self.dup_ids, "prefix": self.prefix}


# ---------------------------------------------------------------------------------------------------------
# Panda-70M CSV -> Parquet parts keyed by the CSV's digest.


def csv_digest(src: PandaCsvSource) -> str:
    store, name = csv_store(src.csv)
    info = store.fs.get_file_info(store.path(name))
    key = [INGEST_VERSION, src.source, store.uri_of(name), int(info.size or 0), int(info.mtime_ns or 0)]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:20]


def _index_task(csv_uri: str, rows_per_part: int) -> dict:
    store, name = csv_store(csv_uri)
    with store.open_input(name) as f:
        return index_csv(f, store.size(name), rows_per_part, SMALL_SOURCE_ROWS)


def _part_task(csv_uri: str, header: list[str], rng: list[int], source: str, out_uri: str, rel: str) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    store, name = csv_store(csv_uri)
    ids, lines, recs = [], [], []
    with store.open_input(name) as f:
        for rec in parse_csv_range(f, header, rng[0], rng[1], rng[2], source):
            ids.append(rec["video_id"])
            lines.append(int(rec.get("row") or 0))
            recs.append(json.dumps(rec, sort_keys=True))
    out = Store(out_uri)
    table = pa.table({"video_id": pa.array(ids, pa.string()), "line": pa.array(lines, pa.int64()),
                      "rec": pa.array(recs, pa.large_string())})
    with out.writer(f"{rel}.parquet") as fh:
        pq.write_table(table, fh, row_group_size=2048)
    done = {"rows": len(ids), "range": rng}
    out.write_json(f"{rel}.done.json", done)  # last: a part without its marker is redone
    return done


def _partitions(n: int) -> int:
    """Shuffle partitions of a groupby over ``n`` parts (Ray's default, 200, is slow on a small source)."""
    return max(1, min(64, n))


def _remote(fn, **options):
    import ray

    return ray.remote(fn).options(**storage_runtime_env(), **options)


def ensure_csv_parts(src: PandaCsvSource, store: Store, rows_per_part: int) -> SourceParts:
    """The CSV's parts under ``source/csv-<digest>/``, converting (with Ray tasks) those not done yet;
    then its duplicate ids, found once by a Ray ``groupby``. Ray must be up."""
    import ray

    prefix = f"source/csv-{csv_digest(src)}"
    index = store.read_json(f"{prefix}/index.json")
    if not isinstance(index, dict) or index.get("rows_per_part") != rows_per_part:
        index = ray.get(_remote(_index_task, num_cpus=1).remote(src.csv, rows_per_part))
        index["rows_per_part"] = rows_per_part
        store.write_json(f"{prefix}/index.json", index)
    parts = index["parts"]
    rels = [f"{prefix}/part-{i:05d}" for i in range(len(parts))]
    todo = [i for i, rel in enumerate(rels) if not store.exists(f"{rel}.done.json")]
    out = SourceParts([f"{rel}.parquet" for rel in rels], int(index["rows"]), len(todo),
                      len(parts) - len(todo), prefix=prefix)
    task = _remote(_part_task, num_cpus=1, max_retries=3)
    pending = [task.remote(src.csv, index["header"], parts[i], src.source, store.uri, rels[i]) for i in todo]
    while pending:  # the driver holds object refs and counts, never rows
        done, pending = ray.wait(pending, num_returns=1)
        ray.get(done)
    out.dup_ids = _duplicates(store, out.paths, f"{prefix}/dups")
    return out


def _duplicates(store: Store, paths: list[str], rel: str) -> int:
    """How many video ids are on more than one row of ``paths``, found by a Ray ``groupby``; Ray writes
    the ids into the folder ``<rel>`` (and ``<rel>.done.json`` marks it, so a restart does not count
    again)."""
    import ray

    done = store.read_json(f"{rel}.done.json")
    if isinstance(done, dict):
        return int(done["n"])
    if not paths:
        return 0
    ds = ray.data.read_parquet([store.path(p) for p in paths], filesystem=store.fs, columns=["video_id"])
    dups = ds.groupby("video_id", num_partitions=_partitions(len(paths))).count()
    dups = dups.filter(lambda r: r["count()"] > 1).materialize()
    n = dups.count()
    store.delete_dir(rel)  # what a killed count left
    if n:
        dups.select_columns(["video_id"]).write_parquet(store.path(rel), filesystem=store.fs)
    store.write_json(f"{rel}.done.json", {"n": n})
    return n


@functools.lru_cache(maxsize=4)
def _dup_set(store_uri: str, rel: str) -> frozenset[str]:
    import pyarrow.parquet as pq

    store = Store(store_uri)
    ids: set[str] = set()
    for part in store.list(rel, suffix=".parquet"):  # the run's own folder of duplicate ids
        with store.open_input(part) as f:
            ids.update(pq.read_table(f).column("video_id").to_pylist())
    return frozenset(ids)


def _select(batch, store_uri: str, rel: str, dup: bool):
    ids = _dup_set(store_uri, rel)
    mask = batch["video_id"].isin(ids)
    return batch[mask if dup else ~mask]


def _merge_group(group):
    import pandas as pd

    recs = merge_records([json.loads(s) for s in group["rec"]])
    return pd.DataFrame({"video_id": [r["video_id"] for r in recs],
                         "line": [int(r.get("row") or 0) for r in recs],
                         "rec": [json.dumps(r, sort_keys=True) for r in recs]})


def _finish(batch, videos_dir: str, keep_labels: tuple[str, ...]):
    import pandas as pd

    recs = [finish_record(json.loads(s), videos_dir, keep_labels) for s in batch["rec"]]
    return pd.DataFrame({"video_id": [r["video_id"] for r in recs],
                         "rec": [json.dumps(r, sort_keys=True) for r in recs]})


def panda_dataset(src: PandaCsvSource, parts: SourceParts, store: Store, rows_per_block: int = 0):
    """The final records of the CSV as a Ray Dataset (``video_id``, ``rec``) in blocks of ``rows_per_block``
    records (0: a part per block): duplicates merged in Ray, then ``finish_record`` per row (label
    prefilter, the video looked up by the worker)."""
    if not parts.paths:  # a header and nothing else
        return None
    ds = read_parts(parts.paths, store)
    one_block = {"batch_size": None, "batch_format": "pandas"}  # a task per block: blocks keep their size
    if parts.dup_ids:
        kw = {"store_uri": store.uri, "rel": f"{parts.prefix}/dups"}
        merged = (ds.map_batches(_select, fn_kwargs={**kw, "dup": True}, **one_block)
                  .groupby("video_id", num_partitions=_partitions(parts.dup_ids // 1000))
                  .map_groups(_merge_group, batch_format="pandas"))
        ds = ds.map_batches(_select, fn_kwargs={**kw, "dup": False}, **one_block).union(merged)
    ds = ds.map_batches(_finish, fn_kwargs={"videos_dir": src.videos_dir, "keep_labels": src.keep_labels},
                        num_cpus=0.5, **one_block)
    return _in_blocks(ds, rows_per_block)


def _in_blocks(ds, rows_per_block: int):
    """``ds`` cut into blocks of ``rows_per_block`` rows as it streams (0: as it is)."""
    return ds.repartition(target_num_rows_per_block=rows_per_block) if rows_per_block else ds


def _read_part(batch, store_uri: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    store = Store(store_uri)
    tables = []
    for rel in batch["part"].to_pylist():
        with store.open_input(rel) as f:
            tables.append(pq.read_table(f))
    return pa.concat_tables(tables)


def read_parts(paths: list[str], store: Store, rows_per_block: int = 0):
    """The Parquet parts ``paths`` as a Ray Dataset, each part read whole by its own task (through the
    store, with its retries), then (``rows_per_block`` > 0) cut into blocks of that many rows as they stream.
    Not ``ray.data.read_parquet``: Ray Data 2.60's reader packs small files into one read task whatever
    ``override_num_blocks`` says (9 parts came back as one block), so one task read many parts and one
    group task got a whole read's videos. Here a reader holds one part (``run.source_part_rows`` records);
    the driver holds the part names, as it already does."""
    import ray

    ds = ray.data.from_items([{"part": p} for p in paths], override_num_blocks=max(1, len(paths)))
    ds = ds.map_batches(_read_part, fn_kwargs={"store_uri": store.uri}, batch_size=1, batch_format="pyarrow")
    return _in_blocks(ds, rows_per_block)


def block_rows(parts: SourceParts, videos_per_block: int, max_blocks: int = 0) -> int:
    """Videos per block of the map phase: ``videos_per_block``, or one for a source of fewer than
    ``SMALL_SOURCE_ROWS`` rows (each video its own task, so a small run spreads over every worker); raised
    so the source makes at most ``max_blocks`` blocks (0: no cap). Ray Data keeps stats of every block each
    operator has made in the driver until the run ends (measured ~28 KB per source block over the ingest's
    operators), so the cap is what bounds the driver at any source size."""
    if parts.rows < SMALL_SOURCE_ROWS:
        return 1
    rows = max(1, videos_per_block)
    return max(rows, -(-parts.rows // max_blocks)) if max_blocks > 0 else rows


# ---------------------------------------------------------------------------------------------------------
# Any other source: streamed into content-keyed parts.


def write_row_parts(rows: Iterable[dict], store: Store, rows_per_part: int) -> SourceParts:
    """Stream ``rows`` into Parquet parts ``source/rows/<sha>.parquet`` (named by their content, so a rerun
    after a kill writes none it has already), a row per part for a source of fewer than
    ``SMALL_SOURCE_ROWS`` rows. The driver holds one chunk at a time. Duplicate ids are refused (a Ray
    ``groupby``) with a ValueError naming one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = SourceParts([], prefix="source/rows", temporary=True)
    head: list[dict] = []
    it = iter(rows)
    for row in it:  # look ahead: a source that ends early is split finely
        head.append(row)
        if len(head) >= SMALL_SOURCE_ROWS:
            break
    size = 1 if len(head) < SMALL_SOURCE_ROWS else rows_per_part

    def flush(chunk: list[dict]) -> None:
        recs = [json.dumps(r, sort_keys=True, default=str) for r in chunk]
        sha = hashlib.sha256("\n".join(recs).encode()).hexdigest()[:24]
        rel = f"{out.prefix}/{sha}.parquet"
        if store.exists(rel):
            out.reused += 1
        else:
            table = pa.table({"video_id": [r["video_id"] for r in chunk], "rec": recs})
            with store.writer(rel) as f:
                pq.write_table(table, f)
            out.written += 1
        out.paths.append(rel)

    def chained():
        yield from head
        head.clear()
        yield from it

    chunk: list[dict] = []
    for row in chained():
        chunk.append(row)
        out.rows += 1
        if len(chunk) >= size:
            flush(chunk)
            chunk = []
    if chunk:
        flush(chunk)
    if out.paths:
        n, example = _count_duplicates(store, out.paths)
        if n:
            remove_parts(store, out)
            raise ValueError(f"duplicate video_id {example!r} from the source ({n} id(s) on more than one "
                             "row); every source row must name a different video")
    return out


def _count_duplicates(store: Store, paths: list[str]) -> tuple[int, str | None]:
    import ray

    ds = ray.data.read_parquet(sorted(set(store.path(p) for p in paths)), filesystem=store.fs,
                               columns=["video_id"])
    if len(set(paths)) != len(paths):  # two chunks with one content: their ids are on two rows
        first = next(p for p in paths if paths.count(p) > 1)
        ids = ray.data.read_parquet(store.path(first), filesystem=store.fs).take(1)
        return 1, ids[0]["video_id"]
    dups = ds.groupby("video_id", num_partitions=_partitions(len(paths))).count()
    dups = dups.filter(lambda r: r["count()"] > 1).materialize()
    n = dups.count()
    return n, (dups.sort("video_id").take(1)[0]["video_id"] if n else None)


def remove_parts(store: Store, parts: SourceParts) -> None:
    """Delete a temporary source's parts (a Panda CSV's parts stay: a later run reuses them)."""
    if parts.temporary:
        for rel in sorted(set(parts.paths)):
            store.delete(rel)
