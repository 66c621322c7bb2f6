"""What a triplet is made of, as pure functions the global phase calls: the reference crop of a subject, the
identity rules that decide whether a paired subject may stand in for it, the seeded choice of a partner
inside the band, and the composition of in-pair / cross-pair samples that keeps the caption aligned with its
references. No I/O here; every rule has unit tests (tests/curation/test_composition.py)."""

from __future__ import annotations

import dataclasses

from curation.scenarios import unit_draw

MAX_REFS = 4
MIDDLE_REF = 1  # reference frames sit at 0.05 / 0.5 / 0.95 of the clip (curation.frames.REF_FRACTIONS)
FACE_CATEGORIES = ("human",)

# Identity verdicts recorded per reference in the sample JSON.
FACE_MATCH = "face_match"  # face-ID agrees (face pair in the face band)
FACE_ONLY = "face_only"  # face-ID pairs them though the image embedding did not (outfit changed)
EMBEDDING_ONLY = "embedding_only"  # no face to check: the image embedding alone decides
FACE_REJECTED = "face_rejected"  # face-ID says another person: vetoes the embedding pair
NO_FACE_MATCH = "no_face_match"  # the subject has a face but the partner has no face pair with it: veto
COPY_VETO = "copy_paste"  # face-ID pairs them but the image embedding says the crop is a copy


def best_crop(subject: dict) -> dict | None:
    """The reference crop of a subject: a non-duplicate crop, preferring the middle reference frame (0.5 of
    the clip), then the largest."""
    crops = [c for c in subject.get("crops") or [] if c.get("duplicate_of") is None]
    if not crops:
        return None

    def rank(c):
        w, h = c.get("size_px") or [0, 0]
        return (c["ref"] != MIDDLE_REF, -w * h, c["ref"])

    return min(crops, key=rank)


def has_face(subject: dict, face_categories=FACE_CATEGORIES) -> bool:
    """A human subject whose face was found on a reference frame: face-ID has the last word on it."""
    return subject.get("category") in face_categories and any(
        f.get("duplicate_of") is None for f in subject.get("faces") or []
    )


def tight_box(
    box,
    frame_w: int,
    frame_h: int,
    category: str | None = None,
    face_box=None,
    face_heights: float = 5.0,
    face_widths: float = 3.0,
) -> list[int]:
    """A tighter reference box for a subject. Grounders draw loose boxes around people (a 290x334 box for one
    seated person in a 480x360 frame): for a human with a face inside the box, the box is cut to the head and
    upper body, ``face_heights`` face heights down from the top of the face and ``face_widths`` face widths
    across, centred on the face, never beyond the original box. Other subjects keep their box (clipped to the
    frame). Integer [x0, y0, x1, y1]. Where subject_embed cuts crops it should call this on the grounded box
    before ``pad_box``; the global phase records it as ``crop_box_tight`` beside the crop it uses."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if category in FACE_CATEGORIES and face_box is not None:
        fx0, fy0, fx1, fy1 = (float(v) for v in face_box)
        fw, fh = max(1.0, fx1 - fx0), max(1.0, fy1 - fy0)
        inside = (
            fx0 >= x0 - 0.5 * fw and fx1 <= x1 + 0.5 * fw and fy0 >= y0 - 0.5 * fh and fy1 <= y1 + 0.5 * fh
        )
        if inside:
            cx = (fx0 + fx1) / 2
            x0, x1 = max(x0, cx - face_widths * fw / 2), min(x1, cx + face_widths * fw / 2)
            y0, y1 = max(y0, fy0 - 0.3 * fh), min(y1, fy0 + face_heights * fh)
    out = [
        max(0, int(x0)),
        max(0, int(y0)),
        min(int(frame_w), int(round(x1))),
        min(int(frame_h), int(round(y1))),
    ]
    if out[2] <= out[0] or out[3] <= out[1]:
        return [max(0, int(v)) for v in box]
    return out


@dataclasses.dataclass(frozen=True)
class Partner:
    """A paired subject that may stand in as the reference of a subject: where its crop is, both scores, and
    the identity verdict that let it through."""

    clip_id: str
    video_id: str
    subject: int
    crop: dict  # {path, box, ref, t_s, frame_index}
    score: float | None  # image-embedding cosine (None: not among the embedding candidates)
    face_score: float | None
    identity: str

    def key(self) -> str:
        return f"{self.clip_id}#{self.subject}"


def _partner(c: dict, identity: str, score, face_score) -> Partner | None:
    if not c.get("c_crop_path"):
        return None
    crop = {
        "path": c["c_crop_path"],
        "box": list(c.get("c_crop_box") or []),
        "ref": c.get("c_crop_ref"),
        "t_s": c.get("c_ref_t_s"),
        "frame_index": c.get("c_ref_frame_index"),
    }
    return Partner(
        str(c["c_clip"]),
        str(c["c_video"]),
        int(c["c_subject"]),
        crop,
        None if score is None else float(score),
        None if face_score is None else float(face_score),
        identity,
    )


def eligible_partners(
    subject: dict, emb_cands: list[dict], face_cands: list[dict], face_categories=FACE_CATEGORIES
) -> tuple[list[Partner], list[dict]]:
    """The partners a subject may take and the vetoed ones (with the reason and both scores).

    Candidates are pair records ({c_clip, c_subject, score, verdict, c_crop_*}); only verdict ``pair`` (in the
    band, within top_k, other source) counts. For a subject with a face, face-ID cannot be bypassed: an
    embedding pair is vetoed when face-ID rejected that partner (``face_rejected``) or never matched it
    (``no_face_match``); a face pair whose image embedding says copy-paste is vetoed too. A face pair the
    embedding band missed (new outfit, same person) is kept as ``face_only``. Subjects without a face are
    paired by the embedding alone."""

    def key(c):
        return (str(c["c_clip"]), int(c["c_subject"]))

    emb_by = {key(c): c for c in emb_cands}
    out, vetoes = [], []
    if not has_face(subject, face_categories):
        for c in emb_cands:
            if c["verdict"] == "pair":
                p = _partner(c, EMBEDDING_ONLY, c["score"], None)
                if p is not None:
                    out.append(p)
        return out, vetoes
    face_by = {key(c): c for c in face_cands}
    for c in emb_cands:
        if c["verdict"] != "pair":
            continue
        f = face_by.get(key(c))
        if f is None or f["verdict"] != "pair":
            reason = NO_FACE_MATCH if f is None else FACE_REJECTED
            vetoes.append(
                {
                    "c_clip": c["c_clip"],
                    "c_subject": c["c_subject"],
                    "reason": reason,
                    "score": c["score"],
                    "face_score": None if f is None else f["score"],
                    "face_verdict": None if f is None else f["verdict"],
                }
            )
            continue
        p = _partner(c, FACE_MATCH, c["score"], f["score"])
        if p is not None:
            out.append(p)
    taken = {(p.clip_id, p.subject) for p in out}
    for f in face_cands:
        if f["verdict"] != "pair" or key(f) in taken:
            continue
        e = emb_by.get(key(f))
        if e is not None and e["verdict"] in ("copy_paste", "near_duplicate_source"):
            vetoes.append(
                {
                    "c_clip": f["c_clip"],
                    "c_subject": f["c_subject"],
                    "reason": COPY_VETO,
                    "score": e["score"],
                    "face_score": f["score"],
                    "face_verdict": f["verdict"],
                }
            )
            continue
        if e is not None and e["verdict"] == "pair":
            continue  # already taken above
        p = _partner(f, FACE_ONLY, None if e is None else e["score"], f["score"])
        if p is not None:
            out.append(p)
            taken.add(key(f))
    return out, vetoes


def choose_partners(partners: list[Partner], n: int, key: str, seed: int = 0) -> list[Partner]:
    """``n`` distinct partners drawn from those in the band by a seeded shuffle (keyed by the subject), so
    the reference is not always the top score next to the copy-paste threshold, yet a re-run draws the
    same."""
    order = sorted(partners, key=lambda p: (unit_draw("partner", seed, key, p.key()), p.key()))
    return order[:n]


def own_ref(row: dict, si: int, subject: dict) -> dict | None:
    """The subject's own crop as a reference (in-pair samples, and subjects of a cross-pair sample that have
    no partner)."""
    crop = best_crop(subject)
    if crop is None:
        return None
    meta = row.get("ref_frames") or []
    t = meta[crop["ref"]] if 0 <= crop["ref"] < len(meta) else {}
    return {
        "path": crop["path"],
        "box": crop["box"],
        "ref": crop["ref"],
        "t_s": t.get("t_s"),
        "frame_index": t.get("frame_index"),
    }


def compose_clip(
    row: dict,
    partners: dict[int, list[Partner]],
    *,
    in_pair: bool = True,
    cross_pair: bool = True,
    cross_per_clip: int = 1,
    seed: int = 0,
    max_refs: int = MAX_REFS,
) -> list[dict]:
    """The samples of one clip: an in-pair sample (every subject's reference cut from the clip itself) and
    up to ``cross_per_clip`` cross-pair samples. The caption names all the clip's subjects, so a cross-pair
    sample gives every subject a reference: a drawn partner from another source where it has one, else its
    own crop, flagged ``ref_kind: in_video``; a sample with no cross reference at all is not a cross-pair.
    Returns plans {key_suffix, pair_type, refs: [{subject, ref_kind, clip_id, video_id, src_subject, crop,
    similarity, face_similarity, identity}]}."""
    subjects = row.get("subjects") or []
    own = {si: own_ref(row, si, s) for si, s in enumerate(subjects)}
    usable = [si for si in range(len(subjects)) if own[si] is not None][:max_refs]
    if not usable:
        return []
    plans = []

    def own_entry(si):
        return {
            "subject": si,
            "ref_kind": "in_video",
            "clip_id": row.get("clip_id"),
            "video_id": row.get("video_id"),
            "src_subject": si,
            "crop": own[si],
            "similarity": None,
            "face_similarity": None,
            "identity": None,
        }

    if in_pair:
        plans.append({"pair_type": "in_pair", "j": 0, "refs": [own_entry(si) for si in usable]})
    if cross_pair and cross_per_clip > 0:
        drawn = {
            si: choose_partners(partners.get(si) or [], cross_per_clip, f"{row.get('clip_id')}#{si}", seed)
            for si in usable
        }
        for j in range(cross_per_clip):
            refs = []
            for si in usable:
                ps = drawn[si]
                if j < len(ps):
                    p = ps[j]
                    refs.append(
                        {
                            "subject": si,
                            "ref_kind": "cross",
                            "clip_id": p.clip_id,
                            "video_id": p.video_id,
                            "src_subject": p.subject,
                            "crop": p.crop,
                            "similarity": p.score,
                            "face_similarity": p.face_score,
                            "identity": p.identity,
                        }
                    )
                else:
                    refs.append(own_entry(si))
            if any(r["ref_kind"] == "cross" for r in refs):
                plans.append({"pair_type": "cross_pair", "j": j, "refs": refs})
    return plans


def keep_fraction(frac: float, *key) -> bool:
    """A deterministic Bernoulli(frac) keyed draw (in-pair / cross-pair ratios, category balance)."""
    return frac >= 1.0 or (frac > 0.0 and unit_draw(*key) < frac)


def category_keep(weights: dict[str, float], categories: list[str], key: str, seed: int = 0) -> bool:
    """Per-category balance: a sample is kept with probability max(weight of its subjects' categories)
    (categories without a weight count 1.0), so down-weighting ``human`` keeps a human+animal sample."""
    w = max((float(weights.get(c, 1.0)) for c in categories), default=1.0)
    return keep_fraction(w, "category", seed, key)
