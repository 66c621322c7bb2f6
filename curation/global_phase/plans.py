"""Step 5 of the global phase: sample plans, one partition (a range of buckets) per item: pairs joined to
clips, identity rules, partner draw, composition, ratios, weights, quotas and the held-out split.

A partition's rows stay columnar: its candidates are one Arrow table per kind (read with the bucket filter,
sorted by query), its near-duplicate groups the rows of ``groups.parquet`` of its own videos, its clips read a
row group at a time, its plans Arrow batches (one per bucket) sorted and capped in Arrow. Python dicts exist
for one clip at a time: the clip's row and its own candidates, which the composition rules take. The number
of partitions comes from the data (clips and candidate bytes per partition), never from the cluster: a
partition's number names its shards, so it must not change with the machine."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter

from curation import scenarios
from curation.composition import best_crop, category_keep, compose_clip, eligible_partners, keep_fraction
from curation.global_phase.tables import BUCKETS, KINDS, subject_tight_box, write_parquet
from curation.scenarios import unit_draw
from curation.shards import safe_component
from curation.storage import Store


def split_of(group: str, eval_frac: float, seed: int) -> str:
    """``eval`` for a deterministic ``eval_frac`` of sources (by hash of the near-duplicate group id, so a
    re-upload never lands on the other side), else ``train``."""
    return "eval" if eval_frac > 0 and unit_draw("eval", seed, group) < eval_frac else "train"


_PAIR_COLS = [
    "q_clip",
    "q_subject",
    "c_video",
    "c_clip",
    "c_subject",
    "score",
    "verdict",
    "c_group",
    "rank",
    "c_crop_path",
    "c_crop_box",
    "c_crop_box_tight",
    "c_crop_ref",
    "c_ref_t_s",
    "c_ref_frame_index",
]


PAIR_BYTES_PER_PARTITION = 256 << 20  # candidate Parquet bytes per plan partition (with clips_per_partition)


def n_partitions(n_clips: int, pair_bytes: int, wp: dict) -> int:
    """Partitions (ranges of the 256 buckets) for the plans and writers: ``partitions`` when set, else enough
    for about ``clips_per_partition`` clips and PAIR_BYTES_PER_PARTITION of candidate files each, a power of
    two at most 256."""
    want = wp["partitions"] or max(
        1, math.ceil(n_clips / wp["clips_per_partition"]), math.ceil(pair_bytes / PAIR_BYTES_PER_PARTITION)
    )
    p = 1
    while p < want and p < BUCKETS:
        p *= 2
    return p


def partitions_for(store: Store, n_clips: int, pair_files: dict, wp: dict) -> int:
    """The partition count of the plans and shards of ``n_clips`` clips whose candidate files (per kind) are
    ``pair_files``: from their sizes in the store."""
    pair_bytes = sum(store.size(f) for files in pair_files.values() for f in files)
    return n_partitions(n_clips, pair_bytes, wp)


def plan_items(n: int, pair_files: dict, gdir: str, groups: str, sdir: str) -> list[dict]:
    """One item per partition of ``n``: its bucket range, the gathered clips folder, the candidate files per
    kind, the near-duplicate groups file (each partition reads its own videos' rows) and its output."""
    span = BUCKETS // n
    return [
        {
            "lo": p * span,
            "hi": (p + 1) * span,
            "partition": p,
            "n_partitions": n,
            "gather": gdir,
            "pairs": pair_files,
            "groups": groups,
            "out": f"{sdir}/part-{p:05d}.parquet",
        }
        for p in range(n)
    ]


def _read_pairs(store: Store, files: list[str], lo: int, hi: int, kind: str):
    """The pair records of queries in buckets [lo, hi) that the composition rules can use, as one Arrow table
    sorted by query (clip, subject) and rank: for subject embeddings the pairs and the copies (a copy vetoes a
    face-only pair), for faces every verdict (a face rejection vetoes an embedding pair). The candidate files
    are in bucket order with small row groups, so the filter reads only this partition's row groups."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as pds

    if not files:
        return None
    ds = pds.dataset([store.path(f) for f in files], format="parquet", filesystem=store.fs)
    flt = (pc.field("bucket") >= lo) & (pc.field("bucket") < hi)
    if kind == "subject":
        flt = flt & pc.field("verdict").isin(["pair", "copy_paste", "near_duplicate_source"])
    t = ds.to_table(filter=flt, columns=_PAIR_COLS)
    order = pc.sort_indices(t, [("q_clip", "ascending"), ("q_subject", "ascending"), ("rank", "ascending")])
    return t.take(order).combine_chunks() if t.num_rows else pa.Table.from_batches([], t.schema)


class _Candidates:
    """One kind's candidate table of a partition (sorted by query) and the row span of each query clip; the
    records of one clip come out as dicts on demand, by subject, in rank order."""

    def __init__(self, t):
        import numpy as np
        import pyarrow.compute as pc

        self.t, self.span = t, {}
        n = 0 if t is None else t.num_rows
        if not n:
            return
        qc = t.column("q_clip")
        diff = pc.not_equal(qc.slice(1), qc.slice(0, n - 1)).to_numpy(zero_copy_only=False)
        starts = np.r_[0, np.nonzero(diff)[0] + 1]
        ends = np.r_[starts[1:], n]
        clips = qc.take(starts).to_pylist()
        self.span = {c: (int(a), int(e)) for c, a, e in zip(clips, starts, ends)}

    def of_clip(self, clip_id: str) -> dict[int, list[dict]]:
        a_e = self.span.get(clip_id)
        if a_e is None:
            return {}
        out: dict[int, list[dict]] = {}
        for rec in self.t.slice(a_e[0], a_e[1] - a_e[0]).to_pylist():
            out.setdefault(rec["q_subject"], []).append(rec)
        return out


def _clip_files(store: Store, item: dict) -> list[str]:
    rels = [f"{item['gather']}/clips-{b:02x}.parquet" for b in range(item["lo"], item["hi"])]
    return [rel for rel in rels if store.exists(rel)]


def _groups_of(store: Store, rel: str, clip_files: list[str]) -> dict[str, str]:
    """The near-duplicate group of each video of this partition that is in one: the rows of ``rel`` (video_id,
    group) of the partition's own videos, read with a filter (a scan a batch at a time, not the whole map)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as pds
    import pyarrow.parquet as pq

    if not clip_files or not store.exists(rel):
        return {}
    vids = pa.chunked_array(
        [pq.read_table(store.open_input(f), columns=["video_id"]).column("video_id") for f in clip_files]
    )
    vids = pc.unique(vids)
    ds = pds.dataset(store.path(rel), format="parquet", filesystem=store.fs)
    t = ds.to_table(filter=pc.field("video_id").isin(vids), columns=["video_id", "group"])
    return dict(zip(t.column("video_id").to_pylist(), t.column("group").to_pylist()))


def _clip_rows(store: Store, rel: str):
    """The clip rows (JSON text) of one gathered clips file, a row group at a time."""
    import pyarrow.parquet as pq

    f = pq.ParquetFile(store.open_input(rel))
    for i in range(f.num_row_groups):
        yield from f.read_row_group(i, columns=["row"]).column("row").to_pylist()


def _filter_scores(row: dict) -> dict:
    return {k: v for k, v in sorted(row.items()) if k.endswith("_score") and isinstance(v, (int, float))}


def sample_meta(
    row: dict,
    plan: dict,
    key: str,
    labels: list[str],
    split: str,
    group: str,
    config_hash: str,
    global_hash: str,
) -> dict:
    """The sample's JSON: the clip, its caption, and per reference its subject, source, crop, both scores
    and the identity verdict; scenario labels; the split; ``unpinned_models`` only when a model file ran
    unpinned on the clip's row (so shards of fully pinned runs keep their bytes)."""
    subjects = row.get("subjects") or []
    subj_meta = []
    for k, ref in enumerate(plan["refs"]):
        s = subjects[ref["subject"]]
        crop = ref["crop"]
        subj_meta.append(
            {
                "subject": ref["subject"],
                "name": s.get("name"),
                "description": s.get("description"),
                "category": s.get("category"),
                "category_source": s.get("category_source"),  # llm, or rule (curation.parsing.categorize)
                "boxes": list(s.get("boxes") or []),
                "ref": {
                    "file": f"ref_{k}.jpg",
                    "kind": ref["ref_kind"],
                    "clip_id": ref["clip_id"],
                    "video_id": ref["video_id"],
                    "subject": ref["src_subject"],
                    "ref_index": crop.get("ref"),
                    "t_s": crop.get("t_s"),
                    "frame_index": crop.get("frame_index"),
                    "crop_box": crop.get("box"),
                    "crop_box_tight": crop.get("box_tight"),
                },
                "similarity": ref["similarity"],
                "face_similarity": ref["face_similarity"],
                "identity": ref["identity"],
                "face_det_scores": [f.get("det_score") for f in s.get("faces") or []],
            }
        )
    meta = {
        "key": key,
        "pair_type": plan["pair_type"],
        "clip_id": row.get("clip_id"),
        "video_id": row.get("video_id"),
        "source": row.get("source"),
        "source_group": group,
        "split": split,
        "span": [row.get("start_s"), row.get("end_s")],
        "fps": row.get("fps"),
        "width": row.get("clip_width") or row.get("width"),
        "height": row.get("clip_height") or row.get("height"),
        "n_frames": row.get("clip_n_frames") or row.get("n_frames"),
        "caption": row.get("caption"),
        "caption_origin": row.get("caption_origin"),
        "ref_frames": row.get("ref_frames"),
        "subjects": subj_meta,
        "n_subjects": len(subjects),
        "refs_truncated": len(subjects) > len(plan["refs"]),
        "scenarios": labels,
        "primary_scenario": scenarios.primary(labels),
        "scores": _filter_scores(row),
        "config_hash": config_hash,
        "global_hash": global_hash,
    }
    if row.get("unpinned_models"):  # model files loaded under `sha256: unpinned` (unchecked)
        meta["unpinned_models"] = sorted(row["unpinned_models"])
    return meta


def _plan_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("key", pa.string()),
            ("split", pa.string()),
            ("pair_type", pa.string()),
            ("clip_id", pa.string()),
            ("video_id", pa.string()),
            ("scenario", pa.string()),
            ("clip_path", pa.string()),
            ("refs", pa.list_(pa.string())),
            ("caption", pa.string()),
            ("meta", pa.string()),
            ("draw", pa.float64()),
        ]
    )


def plan_partition(item: dict, store: Store, params: dict, groups: dict | None = None) -> dict:
    """Sample plans of the clips of buckets [lo, hi): pairs joined to clips, identity rules, partner draw,
    composition, ratios, category balance, scenario labels, weights and quotas, the held-out split. The
    near-duplicate groups come from ``item["groups"]`` (the partition's own rows of the groups file), or from
    ``groups`` when a caller passes the whole map."""
    import pyarrow as pa
    import pyarrow.compute as pc

    lo, hi, wp = item["lo"], item["hi"], params["write"]
    seed = wp["seed"]
    cands = {kind: _Candidates(_read_pairs(store, item["pairs"][kind], lo, hi, kind)) for kind in KINDS}
    clip_files = _clip_files(store, item)
    if groups is None:
        groups = _groups_of(store, item["groups"], clip_files)
    rejections: Counter = Counter()
    schema = _plan_schema()
    batches = []  # one Arrow batch of plans per clips file (bucket)
    for rel in clip_files:
        plans = []
        for row_json in _clip_rows(store, rel):
            row = json.loads(row_json)
            group = groups.get(row["video_id"], row["video_id"])
            split = split_of(group, wp["eval_frac"], seed)
            by_kind = {kind: cands[kind].of_clip(row["clip_id"]) for kind in KINDS}
            partners = {}
            for si, s in enumerate(row.get("subjects") or []):
                emb = by_kind["subject"].get(si, [])
                face = by_kind["face"].get(si, [])
                # a partner on the other side of the held-out split would leak the eval subject into training
                for lst in (emb, face):
                    for c in lst:
                        if c["verdict"] == "pair" and split_of(c["c_group"], wp["eval_frac"], seed) != split:
                            c["verdict"] = "split"
                            rejections["pair:other_split"] += 1
                got, vetoes = eligible_partners(s, emb, face, tuple(wp["face_categories"]))
                for vt in vetoes:
                    rejections[f"pair:{vt['reason']}"] += 1
                partners[si] = [
                    dataclasses.replace(p, crop={**p.crop, "box_tight": _c_tight(p, emb, face)}) for p in got
                ]
            for plan in compose_clip(
                row,
                partners,
                in_pair=wp["in_pair"],
                cross_pair=wp["cross_pair"],
                cross_per_clip=wp["cross_per_clip"],
                seed=seed,
            ):
                key = safe_component(f"{row['clip_id']}_{plan['pair_type']}{plan['j']}")
                ratio = wp["in_pair_keep"] if plan["pair_type"] == "in_pair" else wp["cross_pair_keep"]
                if not keep_fraction(ratio, "ratio", seed, key):
                    rejections[f"write_shards:{plan['pair_type']}_ratio"] += 1
                    continue
                subjects = row.get("subjects") or []
                cats = [str(subjects[r["subject"]].get("category")) for r in plan["refs"]]
                if not category_keep(wp["category_weights"], cats, key, seed):
                    rejections["write_shards:category_balance"] += 1
                    continue
                labels = scenarios.labels([s.get("category") for s in subjects], row.get("caption"))
                if not scenarios.keep_by_weight(wp["scenario_weights"], labels, key, seed):
                    rejections["write_shards:scenario_weight"] += 1
                    continue
                for r in plan["refs"]:
                    if r["ref_kind"] == "in_video":
                        s = subjects[r["subject"]]
                        r["crop"] = {**r["crop"], "box_tight": subject_tight_box(row, s, best_crop(s))}
                meta = sample_meta(
                    row, plan, key, labels, split, group, params["config_hash"], params["global_hash"]
                )
                plans.append(
                    {
                        "key": key,
                        "split": split,
                        "pair_type": plan["pair_type"],
                        "clip_id": str(row["clip_id"]),
                        "video_id": str(row["video_id"]),
                        "scenario": meta["primary_scenario"],
                        "clip_path": row.get("clip_path") or "",
                        "refs": [r["crop"]["path"] for r in plan["refs"]],
                        "caption": row.get("caption") or "",
                        "meta": json.dumps(meta, sort_keys=True),
                        "draw": unit_draw("quota", seed, key),
                    }
                )
        batches.append(pa.RecordBatch.from_pylist(plans, schema=schema))
    t = pa.Table.from_batches(batches, schema=schema)
    # per-scenario quotas, spread over the partitions (each keeps its share, lowest draws first)
    for scen, quota in wp["scenario_quotas"].items():
        share = math.ceil(int(quota) / item["n_partitions"])
        mine = t.filter(pc.equal(t["scenario"], scen))
        mine = mine.take(pc.sort_indices(mine, [("draw", "ascending"), ("key", "ascending")]))
        drop = pc.unique(mine["key"].slice(share))
        if len(drop):
            rejections["write_shards:scenario_quota"] += len(drop)
            t = t.filter(pc.invert(pc.is_in(t["key"], value_set=drop)))
    t = t.take(pc.sort_indices(t, [("key", "ascending")])).combine_chunks()
    if len(pc.unique(t["key"])) != t.num_rows:
        raise ValueError("duplicate sample keys in one partition")
    write_parquet(store, item["out"], t)
    return {"samples": t.num_rows, "rejections": dict(rejections)}


def _c_tight(p, emb: list[dict], face: list[dict]):
    for c in emb + face:
        if str(c["c_clip"]) == p.clip_id and int(c["c_subject"]) == p.subject and c.get("c_crop_box_tight"):
            return list(c["c_crop_box_tight"])
    return None
