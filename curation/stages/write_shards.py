"""The write_shards stage (global): in-pair and cross-pair triplets written as WebDataset shards."""

from __future__ import annotations

import dataclasses
import json
import logging
import os

from curation.config import field
from curation.frames import clip_abspath
from curation.shards import ShardSetWriter, confined, safe_component
from curation.stage import Record, Stage, register_stage

log = logging.getLogger(__name__)

MAX_REFS = 4


MIDDLE_REF = 1  # reference frames sit at 0.05 / 0.5 / 0.95 of the clip (curation.frames.REF_FRACTIONS)


def best_crop(subject: dict) -> dict | None:
    """The reference crop to use for a subject: a non-duplicate crop, preferring the middle reference frame
    (0.5 of the clip), then the largest."""
    crops = [c for c in subject.get("crops") or [] if c.get("duplicate_of") is None]
    if not crops:
        return None

    def rank(c):
        w, h = c.get("size_px") or [0, 0]
        return (c["ref"] != MIDDLE_REF, -w * h, c["ref"])

    return min(crops, key=rank)


def _ref_time(row: Record, ref: int) -> dict:
    meta = row.get("ref_frames") or []
    return meta[ref] if 0 <= ref < len(meta) else {}


def _filter_scores(row: Record) -> dict:
    return {k: v for k, v in sorted(row.items()) if k.endswith("_score") and isinstance(v, (int, float))}


@register_stage("write_shards")
class WriteShards(Stage):
    """Triplets per clip: ``in_pair`` (each subject's reference cropped from the clip itself) and up to
    ``cross_per_clip`` ``cross_pair`` samples (each subject's reference is the crop of a paired subject from
    another video, the j-th best partner in the j-th sample; human subjects prefer face-identity partners).
    1-4 references per sample. Returns one row per written sample (``pair_type``, ``n_refs``, ``categories``)
    plus a rejected row for each clip that could not be written."""

    kind = "global"

    @dataclasses.dataclass
    class Params:
        maxcount: int = field(1000, ge=1)  # samples per shard
        maxsize_mb: float = field(1024.0, gt=0)  # bytes per shard (a lone oversize sample still gets one)
        in_pair: bool = True
        cross_pair: bool = True
        cross_per_clip: int = field(1, ge=0, le=8)
        shards_subdir: str = "shards"

    def process(self, rows: list[Record]) -> list[Record]:
        p = self.params
        by_clip = {(r.get("clip_id"), s_i): s for r in rows for s_i, s in enumerate(r.get("subjects") or [])}
        row_by_clip = {r.get("clip_id"): r for r in rows}
        samples, out = [], []
        for r in sorted(rows, key=lambda r: str(r.get("clip_id"))):
            try:
                built = self.samples_for(r, by_clip, row_by_clip)
            except (OSError, ValueError, KeyError) as e:
                out.append(
                    {
                        "clip_id": r.get("clip_id"),
                        "video_id": r.get("video_id"),
                        "status": "rejected",
                        "reason": f"write_shards:{type(e).__name__}",
                        "error": str(e),
                    }
                )
                continue
            for sample, summary in built:
                samples.append(sample)
                out.append(summary)
        meta = {"config_hash": self.ctx.config_hash}
        writer = ShardSetWriter(
            os.path.join(self.ctx.out_dir, safe_component(p.shards_subdir)),
            p.maxcount,
            int(p.maxsize_mb * (1 << 20)),
            meta,
        )
        index = writer.write(samples)
        name_of = {k: e["name"] for e in index["shards"] for k in e["keys"]}
        for o in out:
            if "key" in o:
                o["shard"] = name_of[o["key"]]
        return out

    def samples_for(self, r: Record, by_clip: dict, row_by_clip: dict) -> list[tuple[dict, dict]]:
        p = self.params
        subjects = r.get("subjects") or []
        if not r.get("clip_path") or not any(best_crop(s) for s in subjects):
            return []
        clip = confined(
            self.ctx.out_dir, os.path.relpath(clip_abspath(r, self.ctx.out_dir), self.ctx.out_dir)
        )
        if not clip.is_file():
            raise FileNotFoundError(f"clip file missing: {r['clip_path']}")
        plans = []
        if p.in_pair:
            refs = [(si, s, r, si, best_crop(s), {}) for si, s in enumerate(subjects) if best_crop(s)]
            plans.append(("in_pair", 0, refs[:MAX_REFS]))
        if p.cross_pair:
            for j in range(p.cross_per_clip):
                refs = []
                for si, s in enumerate(subjects):
                    partner = self._partner(s, j)
                    if partner is None:
                        continue
                    other_row = row_by_clip.get(partner["clip_id"])
                    other = by_clip.get((partner["clip_id"], partner["subject"]))
                    crop = best_crop(other) if other else None
                    if crop is None or other_row is None:
                        continue
                    refs.append((si, s, other_row, partner["subject"], crop, partner))
                if refs:
                    plans.append(("cross_pair", j, refs[:MAX_REFS]))
        out = []
        for pair_type, j, refs in plans:
            key = safe_component(f"{r['clip_id']}_{pair_type}{j}")
            sample = {"__key__": key, "mp4": clip, "txt": (r.get("caption") or "").encode("utf-8")}
            subj_meta = []
            for k, (si, s, src_row, src_si, crop, partner) in enumerate(refs):
                sample[f"ref_{k}.jpg"] = confined(self.ctx.out_dir, crop["path"])
                if not sample[f"ref_{k}.jpg"].is_file():
                    raise FileNotFoundError(f"reference crop missing: {crop['path']}")
                t = _ref_time(src_row, crop["ref"])
                subj_meta.append(
                    {
                        "subject": si,
                        "name": s.get("name"),
                        "description": s.get("description"),
                        "category": s.get("category"),
                        "boxes": [b for b in s.get("boxes") or []],
                        "ref": {
                            "file": f"ref_{k}.jpg",
                            "clip_id": src_row.get("clip_id"),
                            "video_id": src_row.get("video_id"),
                            "subject": src_si,
                            "ref_index": crop["ref"],
                            "t_s": t.get("t_s"),
                            "frame_index": t.get("frame_index"),
                            "crop_box": crop["box"],
                        },
                        "similarity": partner.get("score"),
                        "face_similarity": partner.get("face_score"),
                        "face_det_scores": [f.get("det_score") for f in s.get("faces") or []],
                    }
                )
            meta = {
                "key": key,
                "pair_type": pair_type,
                "clip_id": r.get("clip_id"),
                "video_id": r.get("video_id"),
                "source": r.get("source"),
                "span": [r.get("start_s"), r.get("end_s")],
                "fps": r.get("fps"),
                "width": r.get("clip_width") or r.get("width"),
                "height": r.get("clip_height") or r.get("height"),
                "n_frames": r.get("clip_n_frames") or r.get("n_frames"),
                "caption": r.get("caption"),
                "caption_origin": r.get("caption_origin"),
                "ref_frames": r.get("ref_frames"),
                "subjects": subj_meta,
                "scores": _filter_scores(r),
                "config_hash": self.ctx.config_hash,
            }
            sample["json"] = json.dumps(meta, sort_keys=True).encode("utf-8")
            summary = {
                "key": key,
                "clip_id": r.get("clip_id"),
                "video_id": r.get("video_id"),
                "status": "ok",
                "pair_type": pair_type,
                "n_refs": len(refs),
                "categories": sorted({s.get("category") for _, s, *_ in refs}),
            }
            out.append((sample, summary))
        return out

    @staticmethod
    def _partner(s: dict, j: int) -> dict | None:
        """The j-th partner of a subject: face-identity partners first for subjects that have them."""
        faces = s.get("face_pairs") or []
        if faces and j < len(faces):
            f = faces[j]
            match = next(
                (
                    q
                    for q in s.get("pairs") or []
                    if q["clip_id"] == f["clip_id"] and q["subject"] == f["subject"]
                ),
                None,
            )
            return {**f, "face_score": f["score"], "score": match["score"] if match else None}
        pairs = s.get("pairs") or []
        return pairs[j] if j < len(pairs) else None
