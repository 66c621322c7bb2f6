"""Step 6 of the global phase: the shards, one writer per partition and split (byte-reproducible WebDataset
tars, a record per finished shard, kept on resume when the record matches the plan)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
from collections import Counter

from curation.global_phase.tables import sha
from curation.packs import read_ref, ref_size
from curation.shards import RECORDS_DIR, member_bytes, plan_shards
from curation.storage import Store, in_order

log = logging.getLogger(__name__)
MEMBER_THREADS = 8  # a shard's member reads in flight (clips of a few MB: at most 2 x 8 read ahead)


def shard_name(partition: int, seq: int) -> str:
    return f"shard-{partition:05d}-{seq:06d}.tar"


def _sha256_bytes_of(store: Store, rel: str) -> str:
    h = hashlib.sha256()
    with store.fs.open_input_stream(store.path(rel)) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _write_tar_local(path: str, samples: list[dict], store: Store) -> None:
    """A WebDataset tar, byte-reproducible: ustar headers with a fixed mtime, owner and mode; the members of
    a sample ``<key>.<ext>`` in sorted extension order."""
    import tarfile

    members = [(f"{s['__key__']}.{e}", s[e]) for s in samples for e in sorted(k for k in s if k != "__key__")]

    def data_of(v) -> bytes:
        return read_ref(store, v[1]) if isinstance(v, tuple) else v  # a packed clip or crop: one ranged GET

    with open(path, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        # the members' GETs overlap (MEMBER_THREADS in flight), the tar is written in order
        for (name, _), data in zip(members, in_order(data_of, (v for _, v in members), MEMBER_THREADS)):
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime, ti.mode = len(data), 0, 0o444
            ti.uname = ti.gname = "phantom"
            tf.addfile(ti, io.BytesIO(data))


def write_partition(item: dict, store: Store, params: dict) -> dict:
    """The shards of one partition: samples (sorted by key) in shards of at most maxcount samples / maxsize
    bytes named shard-<partition>-<seq>.tar, each written under a temporary name and moved into place, then
    one small record per finished shard. A re-run keeps every shard whose record matches its plan.

    The plans stay an Arrow table: a first pass takes each sample's size (file sizes and its JSON / caption
    lengths), then each shard's samples are built from its own rows only."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    p, wp, gh = item["partition"], params["write"], params["global_hash"]
    t = pq.read_table(store.open_input(item["plans"]))
    rejections: Counter = Counter()
    counts: Counter = Counter()
    eval_videos: set[str] = set()  # partitions hold disjoint videos: the driver adds the counts up
    entries, written, kept = [], 0, 0
    for split in sorted(set(pc.unique(t["split"]).to_pylist())):
        dirs = params["dirs"][split]  # this result's folders (publish.result_dirs), never the published ones
        recs = t.filter(pc.equal(t["split"], split))
        rows, sizes = [], []  # the row (in recs) and the tar bytes of each sample that has its files
        for i, rec in enumerate(_iter_rows(recs, ["key", "clip_path", "refs", "caption", "meta"])):
            try:
                if not rec["clip_path"]:
                    raise FileNotFoundError("no clip_path")
                size = 0
                for rel in [rec["clip_path"], *rec["refs"]]:
                    size += member_bytes(ref_size(store, rel))
            except (OSError, ValueError) as e:
                rejections[f"write_shards:{type(e).__name__}"] += 1
                log.warning("write_shards: %s: %s", rec["key"], e)
                continue
            size += member_bytes(len(rec["meta"].encode())) + member_bytes(len(rec["caption"].encode()))
            rows.append(i)
            sizes.append(size)
        for seq, (a, b) in enumerate(plan_shards(sizes, wp["maxcount"], int(wp["maxsize_mb"] * (1 << 20)))):
            shard = list(
                _iter_rows(
                    recs.take(rows[a:b]),
                    ["key", "video_id", "pair_type", "clip_path", "refs", "caption", "meta"],
                )
            )
            for rec in shard:
                counts["samples"] += 1
                counts[f"pair_type:{rec['pair_type']}"] += 1
                counts.update(f"scenario:{sc}" for sc in json.loads(rec["meta"])["scenarios"])
                if split == "eval":
                    counts["eval_samples"] += 1
                    eval_videos.add(rec["video_id"])
            name = shard_name(p, seq)
            keys = [r["key"] for r in shard]
            # what the shard holds: keys, sample JSON and member files (a changed partner changes it)
            digest = sha(
                "\n".join(f"{r['key']}\t{r['meta']}\t{r['clip_path']}\t{r['refs']}" for r in shard),
                64,
            )
            rec_rel, shard_rel = f"{dirs['meta']}/{RECORDS_DIR}/{name}.json", f"{dirs['tars']}/{name}"
            prev = store.read_json(rec_rel)
            if (
                prev
                and prev.get("global_hash") == gh
                and prev.get("plan_sha256") == digest
                and store.is_file(shard_rel)
                and store.size(shard_rel) == prev.get("bytes")
                and (not wp["verify_on_resume"] or _sha256_bytes_of(store, shard_rel) == prev.get("sha256"))
            ):
                entries.append({k: prev[k] for k in ("name", "split", "samples", "bytes", "sha256")})
                kept += 1
                continue
            fd, tmp = tempfile.mkstemp(suffix=".tar.tmp")
            os.close(fd)
            try:
                _write_tar_local(tmp, [_sample(r) for r in shard], store)
                h = hashlib.sha256()
                with open(tmp, "rb") as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
                store.put_file(shard_rel, tmp)
                entry = {
                    "name": name,
                    "split": split,
                    "samples": b - a,
                    "bytes": os.path.getsize(tmp),
                    "sha256": h.hexdigest(),
                }
            finally:
                os.unlink(tmp)
            store.write_json(
                rec_rel,
                {
                    **entry,
                    "global_hash": gh,
                    "plan_sha256": digest,
                    "partition": p,
                    "first_key": keys[0],
                    "last_key": keys[-1],
                },
            )
            entries.append(entry)
            written += 1
    counts["eval_videos"] = len(eval_videos)
    return {
        "entries": entries,
        "written": written,
        "kept": kept,
        "rejections": dict(rejections),
        "counts": dict(counts),
    }


ROWS_PER_BATCH = 1024  # plan rows turned into Python values at a time


def _iter_rows(t, columns: list[str]):
    """The rows of ``t`` (these columns) as dicts, a batch of ROWS_PER_BATCH at a time."""
    for batch in t.select(columns).to_batches(max_chunksize=ROWS_PER_BATCH):
        yield from batch.to_pylist()


def _sample(rec: dict) -> dict:
    """A sample's members: its JSON and caption, the clip and the references (read as the tar is written)."""
    files = [("mp4", rec["clip_path"])] + [(f"ref_{k}.jpg", r) for k, r in enumerate(rec["refs"])]
    sample = {"__key__": rec["key"], "json": rec["meta"].encode(), "txt": rec["caption"].encode()}
    sample.update({ext: ("file", rel) for ext, rel in files})
    return sample
