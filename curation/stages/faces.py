"""The faces stage: faces on the reference frames, matched to person boxes by IoU, identity embeddings."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from curation.boxes import box_iou, containment
from curation.config import field
from curation.frames import ref_frames
from curation.shards import atomic_write_bytes, atomic_write_npy
from curation.stage import Record, Stage, build_backend, register_stage
from curation.stages.subject_embed import clip_dir, encode_jpeg, mark_duplicates, pad_box, phash

FACE_CATEGORIES = ("human",)


def match_faces(face_boxes: list, person_boxes: list, min_containment: float) -> list[tuple[int, int, float]]:
    """One-to-one (face, person, iou) matches. A face is a candidate for a person box only when at least
    ``min_containment`` of it lies inside that box (a person box is far larger than the face, so IoU alone is
    tiny and says nothing); candidates are then taken greedily by IoU, which prefers the tightest box: the
    VLM's face box when it drew one, else the smaller of two overlapping people."""
    cands = []
    for fi, fb in enumerate(face_boxes):
        for pi, pb in enumerate(person_boxes):
            if containment(fb, pb) >= min_containment:
                cands.append((box_iou(fb, pb), fi, pi))
    used_f, used_p, out = set(), set(), []
    for iou, fi, pi in sorted(cands, key=lambda c: (-c[0], c[1], c[2])):
        if fi not in used_f and pi not in used_p:
            used_f.add(fi)
            used_p.add(pi)
            out.append((fi, pi, iou))
    return sorted(out)


def _backend(cfg, default: str) -> tuple[str, dict]:
    if isinstance(cfg, dict):
        cfg = dict(cfg)
        return cfg.pop("name", default), cfg
    return (cfg or default), {}


@register_stage("faces")
class Faces(Stage):
    """For every subject of a face category, faces detected on each reference frame are matched to its box
    there; each matched face gets an identity embedding (rows of
    ``embeddings/<video_id>/<clip_id>.faces.npy``), a JPEG crop and a PHash (near-duplicates within the
    subject marked). Backend config: ``{detector: yunet | {name: scrfd, model_path: ...}, embedder: sface |
    {name: arcface, model_path: ...}}``."""

    uses_model = True
    reads_clips = True

    @dataclasses.dataclass
    class Params:
        min_containment: float = field(0.8, gt=0.0, le=1.0)
        min_face_px: int = field(20, ge=1)  # shorter side of the face box
        min_det_score: float = field(0.6, ge=0.0, le=1.0)
        pad_frac: float = field(0.15, ge=0.0, le=1.0)
        jpeg_quality: int = field(92, ge=50, le=100)
        phash_max_distance: int = field(4, ge=0, le=64)
        categories: list[str] = field(list(FACE_CATEGORIES))

    def setup(self) -> None:
        from curation.backends import faces  # noqa: F401  (registers the face detectors and embedders)

        det_name, det_cfg = _backend(self.backend_cfg.get("detector"), "yunet")
        emb_name, emb_cfg = _backend(self.backend_cfg.get("embedder"), "sface")
        md = self.ctx.models_dir
        self.detector = build_backend("face_detector", det_name, models_dir=md, **det_cfg)
        self.embedder = build_backend("face_embedder", emb_name, models_dir=md, **emb_cfg)

    def process(self, rows: list[Record]) -> list[Record]:
        """Detect and match per row, then ONE embedder call for the matched faces of the whole batch (a
        GPU sees full batches), then each row's faces, crops and embeddings are written."""
        plans = [self.match_row(r) for r in rows]
        jobs = [(frame, [f for f, _, _, _ in found]) for plan in plans for frame, found in plan["per_ref"]]
        vecs = self.embedder.embed_many(jobs) if jobs else []
        self.n_embed_calls = getattr(self, "n_embed_calls", 0) + bool(jobs)
        k, out = 0, []
        for row, plan in zip(rows, plans):
            n = len(plan["per_ref"])
            out.append(self.write_row(row, plan, vecs[k : k + n]))
            k += n
        return out

    def match_row(self, row: Record) -> dict:
        """Faces detected on each reference frame and matched to the face-category subjects' boxes there:
        ``per_ref`` [(frame, [(face, subject index, ref, iou)])] for frames with a match."""
        p = self.params
        subjects = [dict(s) for s in row.get("subjects") or []]
        wanted = [si for si, s in enumerate(subjects) if s.get("category") in p.categories and s.get("boxes")]
        plan = {"subjects": subjects, "wanted": wanted, "per_ref": [], "n_detected": 0}
        if not wanted:
            return plan
        for ref, frame in enumerate(ref_frames(row, self.ctx.out_dir)):
            persons = [(si, b["box"]) for si in wanted for b in subjects[si]["boxes"] if b["ref"] == ref]
            if not persons:
                continue
            faces = [
                f
                for f in self.detector.detect(frame)
                if f.score >= p.min_det_score
                and min(f.box[2] - f.box[0], f.box[3] - f.box[1]) >= p.min_face_px
            ]
            plan["n_detected"] += len(faces)
            matches = match_faces([f.box for f in faces], [b for _, b in persons], p.min_containment)
            if matches:
                plan["per_ref"].append(
                    (frame, [(faces[fi], persons[pi][0], ref, iou) for fi, pi, iou in matches])
                )
        return plan

    def write_row(self, row: Record, plan: dict, vecs: list[np.ndarray]) -> Record:
        p = self.params
        subjects, wanted = plan["subjects"], plan["wanted"]
        if not wanted:
            return {**row, "subjects": subjects, "faces_n": 0}
        for si in wanted:
            subjects[si]["faces"] = []
        embs = []
        rel_dir = clip_dir(row, "refs")
        for (frame, found), frame_vecs in zip(plan["per_ref"], vecs):  # frame_vecs (n_matched, dim)
            h, w = frame.shape[:2]
            for (f, si, ref, iou), vec in zip(found, frame_vecs):
                cb = pad_box(f.box, p.pad_frac, w, h)
                img = frame[cb[1] : cb[3], cb[0] : cb[2]]
                path = os.path.join(rel_dir, f"s{si:02d}_r{ref}_face.jpg")
                atomic_write_bytes(os.path.join(self.ctx.out_dir, path), encode_jpeg(img, p.jpeg_quality))
                subjects[si]["faces"].append(
                    {
                        "ref": ref,
                        "box": [round(float(v), 1) for v in f.box],
                        "det_score": round(f.score, 4),
                        "iou": round(float(iou), 4),
                        "emb_row": len(embs),
                        "path": path,
                        "phash": phash(img),
                    }
                )
                embs.append(vec)
        for si in wanted:
            mark_duplicates(subjects[si]["faces"], p.phash_max_distance)
            subjects[si]["face_status"] = "ok" if subjects[si]["faces"] else "no_face"
        out = {**row, "subjects": subjects, "faces_n": len(embs), "faces_detected": plan["n_detected"]}
        if embs:
            rel = clip_dir(row, "embeddings") + ".faces.npy"
            atomic_write_npy(os.path.join(self.ctx.out_dir, rel), np.stack(embs).astype(np.float32))
            out.update(face_embedding_file=rel, face_embedder=self.embedder.name)
        return out
