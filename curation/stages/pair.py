"""The pair stage (global): cross-video subject pairs by embedding cosine in a band; face pairs likewise."""

from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np

from curation import pairing
from curation.config import field
from curation.shards import atomic_write_json, confined, load_npy
from curation.stage import Record, Stage, register_stage
from curation.stages.subject_embed import hamming

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Table:
    """One unit per pairable subject: where it lives, its group (source video or clip) and its vector."""

    rows: list[int]  # index into the batch
    subjects: list[int]  # subject index in the row
    groups: list[str]
    categories: list[str]
    vectors: list[np.ndarray]
    phashes: list[list[str]]


def _mean_unit(v: np.ndarray) -> np.ndarray:
    m = v.mean(0)
    return m / max(float(np.linalg.norm(m)), 1e-12)


@register_stage("pair")
class Pair(Stage):
    """Every committed ok row at once. Each subject's vector is the unit mean of its non-duplicate crop
    embeddings; per category the ``candidates`` nearest subjects of other groups are scored (exact blocked
    search, faiss, or either spread over Ray: ``method``), labelled by the band rule and kept as ``pairs``
    (top ``top_k`` in [low, high]) or ``pair_rejections`` (``copy_paste`` above high or with a near-identical
    crop by PHash, ``different_subject`` below low, ``beyond_top_k``). Subjects with faces get ``face_pairs``
    the same way with the face band. Score histograms go to the log and ``pairing/histogram.json``."""

    kind = "global"

    @dataclasses.dataclass
    class Params:
        low: float = field(0.78, ge=-1.0, le=1.0)  # MobileNetV2 features; set per embedder in the YAML
        high: float = field(0.99, ge=-1.0, le=1.0)
        top_k: int = field(4, ge=1)
        candidates: int = field(16, ge=1)  # neighbours scored per subject (every one recorded)
        same_source: bool = False  # also pair with other clips of the same source video
        method: str = field("auto", choices=["auto", "exact", "faiss", "ray"])
        exact_max: int = field(20000, ge=1)  # auto: exact search up to this many subjects per category
        nprobe: int = field(0, ge=0)  # faiss lists visited per query; 0: auto (a sixteenth, >= 16)
        phash_copy_distance: int = field(4, ge=-1, le=64)  # crops this close across videos are copies; -1 off
        face_low: float = field(0.5, ge=-1.0, le=1.0)
        face_high: float = field(0.99, ge=-1.0, le=1.0)
        face_top_k: int = field(4, ge=1)
        hist_bins: int = field(40, ge=2)

        def validate(self, path: str = "") -> None:
            from curation.config import ConfigError

            if self.low > self.high or self.face_low > self.face_high:
                raise ConfigError(
                    f"{path}: the band needs low <= high (low={self.low}, high={self.high}, "
                    f"face_low={self.face_low}, face_high={self.face_high})"
                )

    def process(self, rows: list[Record]) -> list[Record]:
        rows = [{**r, "subjects": [dict(s) for s in r.get("subjects") or []]} for r in rows]
        subj = self._table(rows, "embedding_file", "crops")
        face = self._table(rows, "face_embedding_file", "faces")
        p = self.params
        hist = {}
        hist["subjects"] = self._pair(rows, subj, p.low, p.high, p.top_k, "pairs", "pair_rejections")
        hist["faces"] = self._pair(
            rows, face, p.face_low, p.face_high, p.face_top_k, "face_pairs", "face_pair_rejections"
        )
        hist["band"] = {"low": p.low, "high": p.high, "face_low": p.face_low, "face_high": p.face_high}
        atomic_write_json(os.path.join(self.ctx.out_dir, "pairing", "histogram.json"), hist)
        return rows

    def _table(self, rows: list[Record], file_key: str, item_key: str) -> _Table:
        t = _Table([], [], [], [], [], [])
        for ri, r in enumerate(rows):
            items = [s.get(item_key) or [] for s in r["subjects"]]
            if not r.get(file_key) or not any(items):
                continue
            try:
                emb = load_npy(confined(self.ctx.out_dir, r[file_key]))  # (n_items, D)
            except (OSError, ValueError) as e:
                r[f"{item_key}_pair_error"] = f"unreadable {r[file_key]}: {type(e).__name__}"
                log.warning(
                    "pair: %s/%s: %s", r.get("video_id"), r.get("clip_id"), r[f"{item_key}_pair_error"]
                )
                continue
            group = r.get("clip_id") if self.params.same_source else r.get("video_id")
            for si, its in enumerate(items):
                keep = [it for it in its if it.get("duplicate_of") is None and 0 <= it["emb_row"] < len(emb)]
                if not keep:
                    continue
                t.rows.append(ri)
                t.subjects.append(si)
                t.groups.append(str(group))
                t.categories.append(str(r["subjects"][si].get("category")))
                t.vectors.append(_mean_unit(emb[[it["emb_row"] for it in keep]]))
                t.phashes.append([it["phash"] for it in its if it.get("phash")])
        return t

    def _pair(self, rows, t: _Table, low, high, top_k, pairs_key, rej_key) -> dict:
        p = self.params
        all_scores, counts = [], {v: 0 for v in pairing.VERDICTS}
        for ri, si in zip(t.rows, t.subjects):
            rows[ri]["subjects"][si][pairs_key] = []
            rows[ri]["subjects"][si][rej_key] = []
        _, gid = np.unique(np.array(t.groups, dtype=object).astype(str), return_inverse=True)
        cats = np.array(t.categories, dtype=object)
        for cat in sorted(set(t.categories)):
            members = np.nonzero(cats == cat)[0]
            if len(members) < 2:
                continue
            x = np.stack([t.vectors[i] for i in members]).astype(np.float32)
            nb = pairing.nearest(
                x,
                gid[members],
                min(p.candidates, len(members) - 1),
                method=p.method,
                exact_max=p.exact_max,
                nprobe=p.nprobe,
            )
            verdict = pairing.classify(nb, low, high, top_k)
            for qi, local in enumerate(members):
                q = rows[t.rows[local]]["subjects"][t.subjects[local]]
                for j in range(nb.m):
                    c, v = int(nb.idx[qi, j]), int(verdict[qi, j])
                    if c < 0 or not np.isfinite(nb.score[qi, j]):
                        continue
                    other = members[c]
                    score = round(float(nb.score[qi, j]), 5)
                    all_scores.append(score)
                    reason = pairing.VERDICTS[v]
                    extra = {}
                    if p.phash_copy_distance >= 0 and t.phashes[local] and t.phashes[other]:
                        d = min(hamming(a, b) for a in t.phashes[local] for b in t.phashes[other])
                        if d <= p.phash_copy_distance:
                            reason, extra = "copy_paste", {"phash_distance": d}
                    counts[reason] += 1
                    r_other = rows[t.rows[other]]
                    rec = {
                        "clip_id": r_other.get("clip_id"),
                        "video_id": r_other.get("video_id"),
                        "subject": t.subjects[other],
                        "score": score,
                        **extra,
                    }
                    (q[pairs_key] if reason == "pair" else q[rej_key]).append(
                        rec if reason == "pair" else {**rec, "reason": reason}
                    )
        h = pairing.histogram(np.array(all_scores), p.hist_bins)
        h["verdicts"] = counts
        h["units"] = len(t.rows)
        if all_scores:
            log.info(
                "pair %s: %d units, verdicts %s, score histogram:\n%s",
                pairs_key,
                len(t.rows),
                counts,
                pairing.ascii_histogram(h),
            )
        return h
