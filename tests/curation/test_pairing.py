"""Pairing tests: band rule, exact and faiss searches agree, cross-video pairs on the sample ground truth."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from curation import pairing
from curation.config import load_config
from curation.demo.footage import build_sample
from curation.demo.ground_truth import copy_pairs, load_ground_truth, true_cross_pairs
from curation.frames import read_frames
from curation.global_phase import PairParams, pair_rows
from curation.global_phase.run import params_of
from curation.stage import StageContext
from curation.stages.faces import Faces
from curation.stages.subject_embed import SubjectEmbed

# Floors for the sample (26 clean shots, 9 identities, 2 exact copies), offline MobileNetV2 + SFace, with the
# default pipeline's band, which `make calibrate` fitted on a set the sample is not part of: measured
# precision 1.0 for both, recall 0.92 (35 of 38 shot pairs) and 0.94 (17 of 18); floors leave room for drift.
SUBJECT_PRECISION_FLOOR, SUBJECT_RECALL_FLOOR = 0.95, 0.9
FACE_PRECISION_FLOOR, FACE_RECALL_FLOOR = 0.95, 0.9


def planted(n: int, d: int, n_pairs: int, seed: int = 0, clusters: int = 0):
    """Unit rows with ``n_pairs`` planted partners (rows 2i, 2i+1) at cosine in [0.6, 0.9]; other rows random
    (optionally around ``clusters`` centres). Returns x (n, d) and the (n_pairs, 2) planted index pairs."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    if clusters:
        mu = pairing.normalize(rng.standard_normal((clusters, d)))
        # same-cluster rows score 0.16 +- 0.07 (d=128): random pairs stay far below a 0.5 band floor
        x = 0.4 * mu[rng.integers(0, clusters, n)] + np.sqrt(0.84) * pairing.normalize(x)
    x = pairing.normalize(x)
    a = np.arange(0, 2 * n_pairs, 2)
    c = rng.uniform(0.6, 0.9, n_pairs).astype(np.float32)[:, None]
    noise = rng.standard_normal((n_pairs, d)).astype(np.float32)
    noise = pairing.normalize(noise - (noise * x[a]).sum(1, keepdims=True) * x[a])  # orthogonal to x[a]
    x[a + 1] = c * x[a] + np.sqrt(1 - c**2) * noise
    return x, np.stack([a, a + 1], 1)


def pair_set(nb: pairing.Neighbours, low: float, high: float, top_k: int) -> set[tuple[int, int]]:
    pairs, _ = pairing.unordered_pairs(nb, pairing.classify(nb, low, high, top_k))
    return {tuple(p) for p in pairs.tolist()}


def test_band_rule_edges_are_inclusive():
    assert pairing.band_reason(0.5, 0.5, 0.9) is None
    assert pairing.band_reason(0.9, 0.5, 0.9) is None
    assert pairing.band_reason(0.9001, 0.5, 0.9) == "copy_paste"
    assert pairing.band_reason(0.4999, 0.5, 0.9) == "different_subject"
    nb = pairing.Neighbours(
        idx=np.array([[1, 2, 3, 4, 5, -1]]),
        score=np.array([[0.95, 0.9, 0.7, 0.5, 0.49, -np.inf]], np.float32),
    )
    v = pairing.classify(nb, 0.5, 0.9, top_k=2)
    assert v.tolist() == [
        [pairing.COPY_PASTE, pairing.PAIR, pairing.PAIR, pairing.BEYOND_TOP_K, pairing.DIFFERENT_SUBJECT, -1]
    ]


def test_exact_blocked_search_matches_brute_force():
    rng = np.random.default_rng(1)
    x = pairing.normalize(rng.standard_normal((301, 12)))
    groups = rng.integers(0, 40, 301)
    nb = pairing.topk_exact(x, groups, m=5, block_rows=64)  # 5 strips: exercises the symmetric bookkeeping
    s = x @ x.T
    s[groups[:, None] == groups[None, :]] = -np.inf
    want = -np.sort(-s, axis=1)[:, :5]
    np.testing.assert_allclose(nb.score, want, atol=1e-5)
    assert (groups[nb.idx] != groups[:, None]).all()
    np.testing.assert_allclose(np.take_along_axis(s, nb.idx, 1), nb.score, atol=1e-5)


def test_rows_with_few_candidates_get_none_rather_than_same_group_ones():
    x = pairing.normalize(np.random.default_rng(2).standard_normal((5, 8)))
    groups = np.array([0, 0, 0, 0, 1])  # rows 0-3 have one candidate (row 4), row 4 has four
    for nb in (pairing.topk_exact(x, groups, m=3, block_rows=2), pairing.topk_faiss(x, groups, m=3)):
        assert nb.idx[:4, 0].tolist() == [4, 4, 4, 4] and (nb.idx[:4, 1:] == -1).all()
        assert np.isneginf(nb.score[:4, 1:]).all()
        assert len(set(nb.idx[4].tolist())) == 3 and set(nb.idx[4].tolist()) <= {0, 1, 2, 3}


def test_faiss_agrees_with_exact_on_planted_pairs():
    x, planted_pairs = planted(6000, 128, 600, clusters=40)
    groups = np.arange(len(x)) // 3  # three subjects per "video"
    groups[planted_pairs[:, 1]] = 10_000 + np.arange(len(planted_pairs))  # partners come from other videos
    exact = pairing.topk_exact(x, groups, m=8)
    approx = pairing.topk_faiss(x, groups, m=8, nprobe=16)
    want = {tuple(p) for p in planted_pairs.tolist()}
    got_exact, got_faiss = pair_set(exact, 0.5, 0.95, 4), pair_set(approx, 0.5, 0.95, 4)
    assert want <= got_exact and len(got_exact - want) <= 5
    assert len(got_faiss & got_exact) / len(got_exact) >= 0.98
    assert len(got_faiss - got_exact) <= 0.01 * len(got_faiss)
    # faiss re-ranks with the stored vectors: scores of the neighbours both found are the exact ones
    rows = planted_pairs.ravel()
    common = exact.idx[rows, :1] == approx.idx[rows, :1]  # the partner, for planted rows
    assert common.mean() > 0.98
    np.testing.assert_allclose(exact.score[rows, :1][common], approx.score[rows, :1][common], atol=1e-5)
    assert (groups[approx.idx[approx.idx >= 0]] != np.repeat(groups, 8)[approx.idx.ravel() >= 0]).all()


# --- the sample's ground truth
# -------------------------------------------------------------------------------


def gt_rows(sample_root: str, gt: dict) -> list[dict]:
    """Rows as the ground stage leaves them, one per clean shot of the sample, with the true boxes as
    grounding (so this measures pairing, not grounding) and the reference frames decoded into the transient
    cache."""
    rows = []
    for vid, v in gt["videos"].items():
        path = os.path.join(sample_root, v["file"])
        for s in v["shots"]:
            if s["bad"] or not s["subjects"]:
                continue
            points = s["subjects"][0]["boxes"]  # the 0.05 / 0.5 / 0.95 reference points of the shot
            frames = list(read_frames(path, [b["frame_index"] for b in points]))
            subjects = [
                {
                    "name": x["name"],
                    "description": x["description"],
                    "category": x["category"],
                    "boxes": [{"ref": i, "box": b["box"], "score": 1.0} for i, b in enumerate(x["boxes"])],
                }
                for x in s["subjects"]
            ]
            rows.append(
                {
                    "video_id": vid,
                    "clip_id": f"{vid}-{s['index']:04d}",
                    "status": "ok",
                    "subjects": subjects,
                    "fps": v["fps"],
                    "start_s": s["start_s"],
                    "end_s": s["end_s"],
                    "shot_key": f"{vid}:{s['index']}",
                    "_ref_frames": frames,
                    "ref_frames": [
                        {
                            "t_frac": b["t_frac"],
                            "frame_index": b["frame_index"] - s["start_frame"],
                            "t_s": round(b["t_s"] - s["start_s"], 3),
                        }
                        for b in points
                    ],
                }
            )
    return rows


@pytest.fixture(scope="module")
def sample_pairs(request, tmp_path_factory):
    # The sample is deterministic and idempotent: keep it in pytest's cache so re-runs skip the build.
    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    root = cache.mkdir("phantom_sample") if cache is not None else tmp_path_factory.mktemp("sample")
    paths = build_sample(root)
    gt = load_ground_truth(paths)
    out_dir = tmp_path_factory.mktemp("pairing")
    ctx = StageContext(out_dir=str(out_dir))
    rows = Faces(ctx=ctx)(SubjectEmbed(ctx=ctx)(gt_rows(paths.root, gt)))
    return gt, pair_rows(rows, configured_pair_params(), str(out_dir)), out_dir


def configured_pair_params() -> PairParams:
    """The pair step's params as the default pipeline of pipelines.yaml sets them."""
    cfg = load_config(Path(__file__).resolve().parents[2] / "pipelines.yaml")
    return params_of(cfg.pipelines["default"])[0]


def _found(rows: list[dict], key: str) -> set[frozenset]:
    shot = {r["clip_id"]: r["shot_key"] for r in rows}
    return {
        frozenset((r["shot_key"], shot[q["clip_id"]]))
        for r in rows
        for s in r["subjects"]
        for q in s.get(key) or []
    }


def test_sample_pairs_match_ground_truth(sample_pairs):
    gt, rows, out_dir = sample_pairs
    assert all(r["status"] == "ok" for r in rows), [r.get("error") for r in rows if r["status"] != "ok"]
    truth, found = true_cross_pairs(gt), _found(rows, "pairs")
    precision = len(found & truth) / max(1, len(found))
    recall = len(found & truth) / len(truth)
    assert precision >= SUBJECT_PRECISION_FLOOR and recall >= SUBJECT_RECALL_FLOOR, (precision, recall)
    # every pair crosses source videos and stays within a category
    by_clip = {r["clip_id"]: r for r in rows}
    for r in rows:
        for s in r["subjects"]:
            for q in s.get("pairs") or []:
                assert q["video_id"] != r["video_id"]
                assert by_clip[q["clip_id"]]["subjects"][q["subject"]]["category"] == s["category"]
                band = configured_pair_params()
                assert band.low <= q["score"] <= band.high
    hist = json.loads((out_dir / "pairing" / "histogram.json").read_text())
    assert hist["subjects"]["verdicts"]["pair"] == sum(
        len(s.get("pairs") or []) for r in rows for s in r["subjects"]
    )
    assert sum(hist["subjects"]["counts"]) == hist["subjects"]["n"] > 0


def test_exact_copies_are_rejected_as_copy_paste(sample_pairs):
    gt, rows, _ = sample_pairs
    copies = copy_pairs(gt)
    assert copies and not copies & _found(rows, "pairs")
    shot = {r["clip_id"]: r["shot_key"] for r in rows}
    rejected = {
        frozenset((r["shot_key"], shot[q["clip_id"]]))
        for r in rows
        for s in r["subjects"]
        for q in s.get("pair_rejections") or []
        if q["reason"] == "copy_paste"
    }
    assert copies <= rejected


def _identities(gt: dict, shot_key: str, category: str | None = None) -> set[str]:
    vid, idx = shot_key.split(":")
    return {
        x["identity"]
        for x in gt["videos"][vid]["shots"][int(idx)]["subjects"]
        if category is None or x["category"] == category
    }


def test_sample_faces_pair_same_person_only(sample_pairs):
    gt, rows, _ = sample_pairs
    human = {p for p in true_cross_pairs(gt) if set.intersection(*(_identities(gt, k, "human") for k in p))}
    found = _found(rows, "face_pairs")
    assert found, "no face pairs"
    precision = len(found & human) / len(found)
    recall = len(found & human) / len(human)
    assert precision >= FACE_PRECISION_FLOOR and recall >= FACE_RECALL_FLOOR, (precision, recall)
    # person_a and person_b are two different people who each appear once: never paired
    lonely = {r["shot_key"] for r in rows if _identities(gt, r["shot_key"]) & {"person_a", "person_b"}}
    assert lonely and not any(k & lonely for k in found)


def test_open_clip_backend_loads_a_local_checkpoint_of_a_tiny_architecture(tmp_path):
    """The production embedder's code path with a tiny random-init ViT (config registered from a JSON file,
    weights from a local checkpoint, sha256-checked)."""
    import open_clip
    import torch

    from curation.backends import embedders  # noqa: F401  (registers the backends)
    from curation.models import sha256_file
    from curation.stage import build_backend

    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (tmp_path / "tiny-vit-h6.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "tiny-vit-h6.json")
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-vit-h6", pretrained=None)
    torch.save(model.state_dict(), tmp_path / "tiny.pt")
    emb = build_backend(
        "image_embedder",
        "open_clip",
        arch="tiny-vit-h6",
        model_path=str(tmp_path / "tiny.pt"),
        sha256=sha256_file(tmp_path / "tiny.pt"),
        model_config=str(tmp_path / "tiny-vit-h6.json"),
        models_dir=str(tmp_path),
    )
    rng = np.random.default_rng(0)
    imgs = [
        rng.integers(0, 255, (50, 80, 3), dtype=np.uint8),
        rng.integers(0, 255, (90, 40, 3), dtype=np.uint8),
    ]
    a, b = emb.embed(imgs), emb.embed(imgs[:1])
    assert a.shape == (2, 32) == (2, emb.dim)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(a[0], b[0], atol=1e-5)
    assert float(a[0] @ a[1]) < 0.9999
    with pytest.raises(Exception, match="sha256"):
        build_backend(
            "image_embedder",
            "open_clip",
            arch="tiny-vit-h6",
            model_path=str(tmp_path / "tiny.pt"),
            sha256="0" * 64,
            models_dir=str(tmp_path),
        )
