"""Identity rules, partner draws and sample composition as pure functions (curation/composition.py)."""

from __future__ import annotations

from curation import composition as C


def _cand(clip, score, verdict="pair", subject=0, video=None):
    return {
        "c_clip": clip,
        "c_video": video or clip.split("-")[0],
        "c_subject": subject,
        "score": score,
        "verdict": verdict,
        "c_crop_path": f"refs/{clip}.jpg",
        "c_crop_box": [0, 0, 10, 10],
        "c_crop_ref": 1,
        "c_ref_t_s": 0.5,
        "c_ref_frame_index": 6,
    }


HUMAN_WITH_FACE = {"category": "human", "faces": [{"ref": 1, "box": [4, 4, 8, 8], "duplicate_of": None}]}


def test_face_rejection_vetoes_an_embedding_pair():
    """The case of issue 12: image similarity 0.79 in the band, face cosine 0.30 far below face_low."""
    emb = [_cand("b-0000", 0.79)]
    face = [_cand("b-0000", 0.30, "different_subject")]
    ok, vetoes = C.eligible_partners(HUMAN_WITH_FACE, emb, face)
    assert ok == [] and vetoes[0]["reason"] == C.FACE_REJECTED
    assert (vetoes[0]["score"], vetoes[0]["face_score"]) == (0.79, 0.30)


def test_no_face_match_vetoes_an_embedding_pair():
    ok, vetoes = C.eligible_partners(HUMAN_WITH_FACE, [_cand("b-0000", 0.85)], [])
    assert ok == [] and vetoes[0]["reason"] == C.NO_FACE_MATCH


def test_face_match_keeps_both_scores_and_face_only_pairs_are_kept():
    emb = [_cand("b-0000", 0.85), _cand("c-0000", 0.5, "different_subject")]
    face = [_cand("b-0000", 0.7), _cand("c-0000", 0.8)]
    ok, vetoes = C.eligible_partners(HUMAN_WITH_FACE, emb, face)
    got = {p.clip_id: (p.identity, p.score, p.face_score) for p in ok}
    assert got == {"b-0000": (C.FACE_MATCH, 0.85, 0.7), "c-0000": (C.FACE_ONLY, 0.5, 0.8)} and not vetoes


def test_a_face_pair_the_embedding_calls_a_copy_is_vetoed():
    ok, vetoes = C.eligible_partners(
        HUMAN_WITH_FACE, [_cand("b-0000", 0.999, "copy_paste")], [_cand("b-0000", 0.9)]
    )
    assert ok == [] and vetoes[0]["reason"] == C.COPY_VETO


def test_subjects_without_faces_pair_by_embedding_only():
    ok, _ = C.eligible_partners({"category": "human"}, [_cand("b-0000", 0.85)], [])
    assert [p.identity for p in ok] == [C.EMBEDDING_ONLY]
    ok, _ = C.eligible_partners(
        {"category": "animal"}, [_cand("b-0000", 0.85), _cand("c-0000", 0.4, "beyond_top_k")], []
    )
    assert [p.clip_id for p in ok] == ["b-0000"]


def test_partner_draw_is_seeded_spread_and_distinct():
    partners = [
        C.Partner(f"v{i}-0000", f"v{i}", 0, {"path": "x"}, 0.99 - 0.01 * i, None, C.EMBEDDING_ONLY)
        for i in range(8)
    ]
    a = C.choose_partners(partners, 3, "q-0000#0", seed=0)
    assert a == C.choose_partners(list(reversed(partners)), 3, "q-0000#0", seed=0)  # order-free, reproducible
    assert len({p.clip_id for p in a}) == 3
    firsts = {C.choose_partners(partners, 1, f"q{k}-0000#0")[0].clip_id for k in range(40)}
    assert len(firsts) >= 5  # not always the top score next to the copy-paste threshold


def _row():
    crop = {"ref": 1, "box": [0, 0, 10, 10], "path": "own.jpg", "duplicate_of": None, "size_px": [10, 10]}
    return {
        "clip_id": "a-0000",
        "video_id": "a",
        "ref_frames": [{}, {"t_s": 0.5, "frame_index": 6}, {}],
        "subjects": [
            {"category": "human", "crops": [crop]},
            {"category": "animal", "crops": [dict(crop, path="dog.jpg")]},
        ],
    }


def test_a_subject_without_partner_keeps_an_in_video_reference_flagged():
    p = C.Partner("b-0000", "b", 0, {"path": "b.jpg"}, 0.9, None, C.EMBEDDING_ONLY)
    plans = C.compose_clip(_row(), {0: [p]}, cross_per_clip=2)
    assert [x["pair_type"] for x in plans] == ["in_pair", "cross_pair"]  # j=1 would have no cross reference
    cross = plans[1]["refs"]
    assert [(r["ref_kind"], r["crop"]["path"]) for r in cross] == [
        ("cross", "b.jpg"),
        ("in_video", "dog.jpg"),
    ]
    assert all(r["ref_kind"] == "in_video" for r in plans[0]["refs"]) and len(plans[0]["refs"]) == 2


def test_ratios_and_category_balance_are_deterministic_fractions():
    keys = [f"k{i}" for i in range(2000)]
    kept = sum(C.keep_fraction(0.25, "ratio", 0, k) for k in keys)
    assert 400 < kept < 600 and C.keep_fraction(0.25, "ratio", 0, "k1") == C.keep_fraction(
        0.25, "ratio", 0, "k1"
    )
    humans = sum(C.category_keep({"human": 0.1}, ["human"], k) for k in keys)
    mixed = sum(C.category_keep({"human": 0.1}, ["human", "animal"], k) for k in keys)
    assert 120 < humans < 280 and mixed == len(keys)


def test_tight_box_cuts_a_loose_person_box_to_head_and_upper_body():
    loose = [95, 13, 385, 347]  # a 290x334 box in a 480x360 frame for one seated person
    face = [215, 40, 265, 100]  # 50x60 face
    t = C.tight_box(loose, 480, 360, "human", face)
    assert t == [165, 22, 315, 340] and (t[2] - t[0]) * (t[3] - t[1]) < 0.5 * 290 * 334
    assert C.tight_box(loose, 480, 360, "animal", face) == loose  # only people are tightened by a face
    assert C.tight_box([10, 10, 500, 400], 480, 360, "human") == [10, 10, 480, 360]  # clipped to the frame


def test_only_a_face_pair_verdict_makes_a_face_only_partner():
    """A face candidate the face band did not call ``pair`` (the other split, a re-upload of the same
    source, past top_k, too far, a copy) is never a partner, with or without an embedding candidate."""
    verdicts = ["split", "near_duplicate_source", "beyond_top_k", "different_subject", "copy_paste"]
    face = [_cand(f"{chr(98 + i)}-0000", 0.8, v) for i, v in enumerate(verdicts)]
    ok, vetoes = C.eligible_partners(HUMAN_WITH_FACE, [], face)
    assert ok == [] and vetoes == []
    emb = [_cand(f"{chr(98 + i)}-0000", 0.5, "different_subject") for i in range(len(verdicts))]
    ok, _ = C.eligible_partners(HUMAN_WITH_FACE, emb, face)
    assert ok == []
    # ... while the same candidate with verdict pair is taken, face only
    ok, _ = C.eligible_partners(HUMAN_WITH_FACE, [], [_cand("b-0000", 0.8)])
    assert [(p.clip_id, p.identity) for p in ok] == [("b-0000", C.FACE_ONLY)]
