"""Benchmark of the production backends' batching (CPU, before/after in the same run): open_clip over one
clip's crops per call vs the crops of a whole stage batch; ArcFace one face per onnxruntime call (the old
insightface ``get`` loop) vs one call for many faces; the Qwen grounder's prompts per frame (tiny
Qwen2.5-VL, 4 subjects). On a GPU machine the same code runs bf16 / on the CUDA provider; these are CPU
figures."""

from __future__ import annotations

import json
import os
import tempfile
import time

import numpy as np

from curation.models import folder_sha256, sha256_file

ROUNDS = 3  # interleaved rounds, the best time of each side kept (the machine is shared)
N_CLIPS, CROPS_PER_CLIP = 16, 3  # a stage batch of 16 clips with 3 reference crops each
N_FACES = 48
FOUR = [
    {"name": "woman", "description": "woman in an orange spacesuit", "category": "human"},
    {"name": "flag", "description": "a US flag", "category": "product"},
    {"name": "helmet", "description": "a white helmet", "category": "clothes"},
    {"name": "rocket", "description": "a rocket", "category": "product"},
]


def _crops(n: int) -> list[np.ndarray]:
    from skimage import data

    img = data.astronaut()  # (512, 512, 3)
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        x0, y0 = rng.integers(0, 256, 2)
        w, h = rng.integers(96, 256, 2)
        out.append(np.ascontiguousarray(img[y0 : y0 + h, x0 : x0 + w]))
    return out


def _open_clip(tmp: str) -> dict[str, float]:
    """A ViT-S/32-sized open_clip tower (random init, local checkpoint), fp32 on the CPU."""
    import open_clip
    import torch

    from curation.backends import embedders  # noqa: F401
    from curation.stage import build_backend

    cfg = {
        "embed_dim": 256,
        "vision_cfg": {"image_size": 224, "layers": 6, "width": 384, "head_width": 64, "patch_size": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
    }
    cfg_path = os.path.join(tmp, "bench-vit-s32.json")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    open_clip.add_model_config(cfg_path)
    torch.manual_seed(0)
    ckpt = os.path.join(tmp, "bench-vit-s32.pt")
    torch.save(open_clip.create_model("bench-vit-s32", pretrained=None).state_dict(), ckpt)
    emb = build_backend(
        "image_embedder",
        "open_clip",
        arch="bench-vit-s32",
        model_path=ckpt,
        model_config=cfg_path,
        models_dir=tmp,
        device="cpu",
        sha256=sha256_file(ckpt),  # a random-init tower made here: pinned by its own hash
    )
    crops = _crops(N_CLIPS * CROPS_PER_CLIP)
    clips = [crops[i : i + CROPS_PER_CLIP] for i in range(0, len(crops), CROPS_PER_CLIP)]
    emb.embed(crops[:4])  # warm-up
    before = after = float("inf")
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        a = np.concatenate([emb.embed(c) for c in clips])  # old: one call per clip
        before = min(before, time.perf_counter() - t0)
        t0 = time.perf_counter()
        b = emb.embed(crops)  # new: the stage's whole batch, batch_size at a time
        after = min(after, time.perf_counter() - t0)
    assert np.allclose(a, b, atol=1e-4)
    n = len(crops)
    return {"open_clip_items_per_s_before": n / before, "open_clip_items_per_s_after": n / after}


def _arcface(tmp: str) -> dict[str, float]:
    """ArcFace I/O (N x 3 x 112 x 112 -> N x 512) on a ResNet-18 trunk (random init, exported to ONNX):
    about the compute of a small production recogniser."""
    import torch
    import torchvision
    from insightface.app.common import Face as InsightFace

    from curation.backends import faces  # noqa: F401
    from curation.backends.faces import ARCFACE_KPS_112, Face
    from curation.stage import build_backend

    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=512).eval()
    path = os.path.join(tmp, "rec.onnx")
    torch.onnx.export(
        net,
        torch.zeros(1, 3, 112, 112),
        path,
        input_names=["data"],
        output_names=["fc1"],
        dynamic_axes={"data": {0: "n"}, "fc1": {0: "n"}},
        dynamo=False,
        opset_version=17,
    )
    rec = build_backend(
        "face_embedder", "arcface", model_path=path, file_name="", models_dir=tmp, device="cpu",
        sha256=sha256_file(path),
    )
    rng = np.random.default_rng(0)
    jobs = []
    for img in _crops(N_FACES // 4):  # 4 faces per frame, placed by the template landmarks
        frame = np.ascontiguousarray(np.pad(img, ((0, 256 - img.shape[0]), (0, 256 - img.shape[1]), (0, 0))))
        fs = []
        for _ in range(4):
            x0, y0 = rng.integers(0, 140, 2)
            s = float(rng.integers(60, 110))
            fs.append(Face([x0, y0, x0 + s, y0 + s], 0.9, ARCFACE_KPS_112 / 112 * s + [x0, y0]))
        jobs.append((frame, fs))
    rec.embed_many(jobs[:1])  # warm-up
    before = after = float("inf")
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        old = []
        for frame, fs in jobs:  # old: insightface's get, one face per session.run
            bgr = frame[:, :, ::-1].copy()
            for f in fs:
                old.append(rec.model.get(bgr, InsightFace(bbox=np.asarray(f.box), kps=f.landmarks())))
        before = min(before, time.perf_counter() - t0)
        t0 = time.perf_counter()
        new = np.concatenate(rec.embed_many(jobs))  # new: align all, one call per batch_size faces
        after = min(after, time.perf_counter() - t0)
    old = np.stack(old) / np.linalg.norm(np.stack(old), axis=1, keepdims=True)
    assert np.allclose(old, new, atol=1e-4)
    n = len(new)
    return {"arcface_items_per_s_before": n / before, "arcface_items_per_s_after": n / after}


def _ground() -> dict[str, float]:
    from skimage import data

    from curation.backends.qwen_vl import QwenVLGrounder
    from tests.curation.tiny_models import tiny_qwen2_5_vl_dir

    qdir = str(tiny_qwen2_5_vl_dir())
    g = QwenVLGrounder(
        qdir, max_pixels=64 * 28 * 28, max_new_tokens=16, batch_size=3, sha256=folder_sha256(qdir)
    )
    frames = [data.astronaut(), data.coffee(), data.chelsea()]
    t0 = time.perf_counter()
    dets = g.ground(frames, [FOUR] * len(frames))
    dt = time.perf_counter() - t0
    assert all(len(d) == len(FOUR) for d in dets)
    return {
        "ground_prompts_per_frame": g.n_prompts / g.n_frames,
        "ground_frames_per_s_tiny_qwen": len(frames) / dt,
    }


def _gpu(tmp: str) -> dict[str, float]:
    """Where CUDA is available: open_clip bf16 items/s and peak memory over a large batch of crops, and
    ArcFace on onnxruntime's CUDA provider (when onnxruntime-gpu is installed)."""
    import onnxruntime
    import torch

    from curation.stage import build_backend

    out: dict[str, float] = {}
    emb = build_backend(
        "image_embedder",
        "open_clip",
        arch="bench-vit-s32",
        model_path=os.path.join(tmp, "bench-vit-s32.pt"),
        model_config=os.path.join(tmp, "bench-vit-s32.json"),
        models_dir=tmp,
        device="cuda",
        batch_size=256,
        sha256=sha256_file(os.path.join(tmp, "bench-vit-s32.pt")),
    )
    crops = _crops(512)
    emb.embed(crops[:256])  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    emb.embed(crops)
    torch.cuda.synchronize()
    out["gpu_open_clip_bf16_items_per_s"] = len(crops) / (time.perf_counter() - t0)
    out["gpu_open_clip_peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        rec = build_backend(
            "face_embedder",
            "arcface",
            model_path=os.path.join(tmp, "rec.onnx"),
            file_name="",
            models_dir=tmp,
            device="cuda",
            batch_size=256,
            sha256=sha256_file(os.path.join(tmp, "rec.onnx")),
        )
        aligned = [np.ascontiguousarray(c[:112, :112]) for c in _crops(512) if min(c.shape[:2]) >= 112]
        rec.embed_aligned(aligned[:64])
        t0 = time.perf_counter()
        rec.embed_aligned(aligned)
        out["gpu_arcface_items_per_s"] = len(aligned) / (time.perf_counter() - t0)
    return out


def run() -> dict[str, float]:
    import torch

    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench_backends_") as tmp:
        out.update(_open_clip(tmp))
        out.update(_arcface(tmp))
        if torch.cuda.is_available():
            out.update(_gpu(tmp))
    out.update(_ground())
    return out


if __name__ == "__main__":
    for k, v in run().items():
        print(f"{k:36s} {v:.3f}")
