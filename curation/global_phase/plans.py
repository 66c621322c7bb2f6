"""Step 5 of the global phase: sample plans, one partition (a range of buckets) per item: pairs joined to
clips, identity rules, partner draw, composition, ratios, weights, quotas and the held-out split."""

from __future__ import annotations

import dataclasses
import io
import json
import math
from collections import Counter, defaultdict

from curation import scenarios
from curation.composition import best_crop, category_keep, compose_clip, eligible_partners, keep_fraction
from curation.global_phase.tables import KINDS, subject_tight_box, write_parquet
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


def _read_pairs(store: Store, files: list[str], lo: int, hi: int, kind: str):
    """The pair records of queries in buckets [lo, hi) that the composition rules can use: for subject
    embeddings the pairs and the copies (a copy vetoes a face-only pair), for faces every verdict (a face
    rejection vetoes an embedding pair)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pds

    if not files:
        return []
    ds = pds.dataset([store.path(f) for f in files], format="parquet", filesystem=store.fs)
    flt = (pc.field("bucket") >= lo) & (pc.field("bucket") < hi)
    if kind == "subject":
        flt = flt & pc.field("verdict").isin(["pair", "copy_paste", "near_duplicate_source"])
    return ds.to_table(filter=flt, columns=_PAIR_COLS).to_pylist()


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


def plan_partition(item: dict, store: Store, groups: dict, params: dict) -> dict:
    """Sample plans of the clips of buckets [lo, hi): pairs joined to clips, identity rules, partner draw,
    composition, ratios, category balance, scenario labels, weights and quotas, the held-out split."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    lo, hi, wp = item["lo"], item["hi"], params["write"]
    seed = wp["seed"]
    by_q: dict[tuple[str, str, int], list[dict]] = defaultdict(list)
    for kind in KINDS:
        for rec in _read_pairs(store, item["pairs"][kind], lo, hi, kind):
            by_q[(kind, rec["q_clip"], rec["q_subject"])].append(rec)
    for v in by_q.values():
        v.sort(key=lambda r: r["rank"])
    rejections: Counter = Counter()
    plans = []
    for b in range(lo, hi):
        rel = f"{item['gather']}/clips-{b:02x}.parquet"
        if not store.exists(rel):
            continue
        t = pq.read_table(io.BytesIO(store.read_bytes(rel)))
        for row_json in t.column("row").to_pylist():
            row = json.loads(row_json)
            group = groups.get(row["video_id"], row["video_id"])
            split = split_of(group, wp["eval_frac"], seed)
            partners = {}
            for si, s in enumerate(row.get("subjects") or []):
                emb = [c for c in by_q.get(("subject", row["clip_id"], si), [])]
                face = [c for c in by_q.get(("face", row["clip_id"], si), [])]
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
    # per-scenario quotas, spread over the partitions (each keeps its share, lowest draws first)
    for scen, quota in wp["scenario_quotas"].items():
        share = math.ceil(int(quota) / item["n_partitions"])
        mine = sorted((p for p in plans if p["scenario"] == scen), key=lambda p: (p["draw"], p["key"]))
        drop = {p["key"] for p in mine[share:]}
        if drop:
            rejections["write_shards:scenario_quota"] += len(drop)
            plans = [p for p in plans if p["key"] not in drop]
    plans.sort(key=lambda p: p["key"])
    keys = [p["key"] for p in plans]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate sample keys in one partition")
    write_parquet(store, item["out"], pa.Table.from_pylist(plans, schema=_plan_schema()))
    return {"samples": len(plans), "rejections": dict(rejections)}


def _c_tight(p, emb: list[dict], face: list[dict]):
    for c in emb + face:
        if str(c["c_clip"]) == p.clip_id and int(c["c_subject"]) == p.subject and c.get("c_crop_box_tight"):
            return list(c["c_crop_box_tight"])
    return None
