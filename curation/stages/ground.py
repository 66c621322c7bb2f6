"""Stage ``ground``: subject boxes on the reference frames, filtered by the small/overlap/cut rules."""

from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np

from curation.config import field
from curation.frames import ref_frames
from curation.parsing import apply_box_rules
from curation.stage import Record, Stage, build_backend, register_stage, reject


class Grounder(Protocol):
    """Capability ``grounder``: for each frame, one entry per subject of that frame's subject list: a
    detection ``{subject, box [x0, y0, x1, y1] in frame pixels, score, complete?, face_box?, border_box?}``
    or a failure ``{subject, reason, raw?}``."""

    def ground(self, frames: list[np.ndarray], subjects: list[list[dict]]) -> list[list[dict]]: ...


@register_stage("ground")
class GroundStage(Stage):
    """Adds ``ref_frames`` and, per subject, ``boxes`` [{ref, box, score, ...}] and ``box_rejections``
    [{ref, box, reason}]; subjects with no kept box get ``grounding: "ungrounded"`` and ``grounding_reason``.
    A clip where no subject kept a box is rejected ``ground:no_subject_box`` (a triplet needs a reference)."""

    uses_model = True
    reads_clips = True

    @dataclasses.dataclass
    class Params:
        min_area_frac: float = field(0.01, ge=0.0, lt=1.0)  # drop boxes below this fraction of the frame
        max_iou: float = field(0.7, gt=0.0, le=1.0)  # drop the weaker of two subjects' boxes above this IoU
        border_margin_px: float = field(2.0, ge=0.0)
        # Sides where touching the frame border means the subject is cut off. The bottom is left out by
        # default: upper-body framing (talking heads, presenters) is the norm and still a usable reference.
        incomplete_sides: list[str] = field(["left", "top", "right"], choices=None)
        max_subjects: int = field(6, ge=1)

        def validate(self, path: str = "") -> None:
            from curation.config import ConfigError

            bad = [s for s in self.incomplete_sides if s not in ("left", "top", "right", "bottom")]
            if bad:
                raise ConfigError(
                    f"{path}.incomplete_sides: {bad[0]!r} is not one of left, top, right, bottom"
                )

    def setup(self) -> None:
        from curation.backends import human_grounder, qwen_vl  # noqa: F401  (register the grounders)

        cfg = dict(self.backend_cfg)
        name = cfg.pop("name", "human")
        self.backend: Grounder = build_backend("grounder", name, models_dir=self.ctx.models_dir, **cfg)
        self.backend_name = name

    def process(self, rows: list[Record]) -> list[Record]:
        todo, frames, subjects, out = [], [], [], {}
        for i, row in enumerate(rows):
            subs = (row.get("subjects") or [])[: self.params.max_subjects]
            if not row.get("clip_path"):
                out[i] = reject(row, "ground:no_clip")
            elif not subs:
                out[i] = reject(row, "ground:no_subjects")
            else:
                refs = ref_frames(
                    row, self.ctx.out_dir
                )  # decoded once per group, cached in row["_ref_frames"]
                todo.append(i)
                frames.extend(refs)
                subjects.extend([subs] * len(refs))
        dets = self.backend.ground(frames, subjects) if frames else []
        k = 0
        for i in todo:
            n_refs = len(rows[i]["_ref_frames"])
            out[i] = self._assemble(rows[i], frames[k : k + n_refs], dets[k : k + n_refs])
            k += n_refs
        return [out[i] for i in range(len(rows))]

    def _assemble(self, row: Record, frames: list[np.ndarray], dets: list[list[dict]]) -> Record:
        p = self.params
        subs = [dict(s, boxes=[], box_rejections=[]) for s in row["subjects"][: p.max_subjects]]
        failures: dict[int, list[str]] = {}
        for ref, (frame, frame_dets) in enumerate(zip(frames, dets)):
            found = [d for d in frame_dets if "box" in d]
            for d in frame_dets:
                if "box" not in d:
                    failures.setdefault(d["subject"], []).append(d["reason"])
                    if d["reason"] not in ("not_found",) and not d["reason"].startswith("category_"):
                        subs[d["subject"]]["box_rejections"].append(
                            {"ref": ref, "box": None, "reason": d["reason"], "raw": d.get("raw")}
                        )
            kept, rejected = apply_box_rules(
                found,
                frame.shape[:2],
                p.min_area_frac,
                p.max_iou,
                p.border_margin_px,
                tuple(p.incomplete_sides),
            )
            for d in kept:
                subs[d["subject"]]["boxes"].append(_entry(ref, d))
            for d in rejected:
                subs[d["subject"]]["box_rejections"].append({**_entry(ref, d), "reason": d["reason"]})
        for si, s in enumerate(subs):
            if not s["boxes"]:
                s["grounding"] = "ungrounded"
                reasons = [r["reason"] for r in s["box_rejections"]] or failures.get(si) or ["not_found"]
                s["grounding_reason"] = max(set(reasons), key=reasons.count)  # the most frequent reason
            else:
                s["grounding"] = "grounded"
        new = {
            **row,
            "subjects": subs,
            "ground_backend": self.backend_name,
            "n_grounded_subjects": sum(1 for s in subs if s["boxes"]),
        }
        if new["n_grounded_subjects"] == 0:
            return reject(new, "ground:no_subject_box")
        return new


def _entry(ref: int, d: dict) -> dict:
    e = {"ref": ref, "box": d["box"], "score": round(float(d.get("score") or 0.0), 4)}
    for key in ("face_box", "box_source", "complete"):
        if d.get(key) is not None:
            e[key] = d[key]
    return e
