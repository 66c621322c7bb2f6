"""Benchmark of the evaluation: cases per second (generation + every metric) for the tiny model on CPU;
with CUDA, the same for Phantom-Wan 1.3B (random init, bf16) with the production metric models at tiny sizes
(SCRFD + ArcFace ONNX, open_clip CLIP, DINOv2, LAION aesthetic head, Qwen2.5-VL grounder).

`eval_cases_per_s` counts from the first generation to the last score (model loading excluded), at the
default 50 sampling steps on CPU.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

CPU_CASES, CPU_STEPS = 8, 50
GPU_CASES, GPU_STEPS, GPU_HW, GPU_FRAMES = 4, 20, (256, 448), 33


def _tiny_checkpoint(tmp: Path) -> Path:
    """The tiny MMDiT config trained for 3 steps (the real checkpoint format and loading path)."""
    import yaml

    from tests.training.conftest import TINY, write_triplet_shards
    from training import checkpoint as ckpt
    from training.config import load_config
    from training.loop import train

    shards = write_triplet_shards(tmp / "train_shards", num_samples=8, per_shard=4)
    cfg = copy.deepcopy(TINY)
    cfg["phases"][0]["steps"], cfg["phases"][1]["steps"] = 2, 1
    (tmp / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    train(load_config(tmp / "tiny.yaml", {"data.shards": str(shards), "log.out_dir": str(tmp / "run")}))
    return ckpt.latest_checkpoint(tmp / "run" / "checkpoints")


def bench_cpu() -> dict[str, float]:
    from tests.curation.test_inspect import write_triplets
    from training.evaluate import evaluate

    with tempfile.TemporaryDirectory(prefix="bench_eval") as tmp:
        tmp = Path(tmp)
        ckpt = _tiny_checkpoint(tmp)
        eval_set = write_triplets(tmp, n_videos=4, subdir="shards_eval")  # 8 held-out triplets
        rep = evaluate(
            str(ckpt), str(eval_set), str(tmp / "eval"), steps=CPU_STEPS, limit=CPU_CASES, device="cpu"
        )
        t = rep["timing"]
        return {
            "eval_cases_per_s": t["cases_per_s"],
            "eval_cases": float(rep["n_ok"]),
            "eval_generate_s_per_case": round(t["generate_s"] / max(1, rep["n_ok"]), 3),
            "eval_metrics_s_per_case": round(t["metrics_s"] / max(1, rep["n_ok"]), 3),
        }


def bench_opens2v_motion(frames: int = 81, hw: tuple[int, int] = (480, 832)) -> dict[str, float]:
    """OpenS2V-Eval's MotionAmplitude over every frame of a Wan-sized video (81 frames, 480x832, a real
    texture panning 3 px per frame): seconds per video on CPU, and the value (under (3 + 0) / 2 = 1.5: the
    flow is ~3 px on texture but ~0 on the photo's flat areas, and the benchmark averages every pixel)."""
    import time

    import cv2
    import numpy as np
    import skimage.data

    from training.eval_bench import motion_amplitude

    h, w = hw
    base = cv2.resize(skimage.data.astronaut(), (w + 3 * frames, h), interpolation=cv2.INTER_AREA)
    video = np.stack([base[:, 3 * (frames - t) : 3 * (frames - t) + w] for t in range(frames)])
    t0 = time.perf_counter()
    v = motion_amplitude(video)
    return {
        "eval_opens2v_motion_amplitude_s_per_video": round(time.perf_counter() - t0, 3),
        "eval_opens2v_motion_amplitude_value": round(v, 4),
    }


def _production_metrics_tiny(tmp: Path, device: str):
    """The production metric config pointed at tiny random-init models of the real classes."""
    import torch

    from curation.metrics import metrics_config
    from curation.models import folder_sha256, sha256_file
    from tests.curation.test_faces import DET_INPUT_PX, _export_tiny_insightface
    from tests.curation.test_metrics import _tiny_clip, _tiny_dino
    from tests.curation.tiny_models import tiny_qwen2_5_vl_dir

    (tmp / "insightface").mkdir()
    _export_tiny_insightface(str(tmp / "insightface"))
    _tiny_clip(tmp)
    dino = _tiny_dino(tmp)
    head = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.Linear(16, 1))
    torch.save({f"layers.{k}": v for k, v in head.state_dict().items()}, tmp / "mlp.pth")
    return metrics_config(
        {
            "device": device,
            "face": {
                "detector": {
                    "name": "scrfd",
                    "model_path": str(tmp / "insightface"),
                    "file_name": "det.onnx",
                    "input_size_px": DET_INPUT_PX,
                    "sha256": sha256_file(tmp / "insightface" / "det.onnx"),
                },
                "embedder": {
                    "name": "arcface",
                    "model_path": str(tmp / "insightface"),
                    "file_name": "rec.onnx",
                    "sha256": sha256_file(tmp / "insightface" / "rec.onnx"),
                },
            },
            "clip": {
                "arch": "tiny-eval-clip",
                "model_path": str(tmp / "clip.pt"),
                "model_config": str(tmp / "tiny-eval-clip.json"),
                "sha256": sha256_file(tmp / "clip.pt"),
            },
            "dino": {"model_path": str(dino), "sha256": folder_sha256(dino)},
            "aesthetic": {
                "name": "laion_mlp",
                "clip_arch": "tiny-eval-clip",
                "clip_path": str(tmp / "clip.pt"),
                "clip_config": str(tmp / "tiny-eval-clip.json"),
                "mlp_path": str(tmp / "mlp.pth"),
                "clip_sha256": sha256_file(tmp / "clip.pt"),
                "mlp_sha256": sha256_file(tmp / "mlp.pth"),
            },
            "grounder": {
                "name": "qwen2_5_vl",
                "model_path": str(tiny_qwen2_5_vl_dir()),
                "max_new_tokens": 16,
                "sha256": folder_sha256(tiny_qwen2_5_vl_dir()),
            },
        }
    )


def bench_wan(
    device: str = "cuda",
    preset: str = "1.3B",
    steps: int = GPU_STEPS,
    cases: int = GPU_CASES,
    hw: tuple[int, int] = GPU_HW,
    frames: int = GPU_FRAMES,
) -> dict[str, float]:
    """Phantom-Wan at ``preset`` (random init; the tiny VAE / UMT5 of the real classes feed it), bf16 on
    CUDA, generating through training.sample.Sampler and scored by the production metrics at tiny sizes."""
    import contextlib

    import torch
    import yaml

    from curation.metrics import MetricSuite
    from tests.curation.test_inspect import write_triplets
    from tests.training.wan_assets import tiny_wan_config, write_tiny_wan_assets
    from training.config import load_config
    from training.encoders import build_encoders
    from training.evaluate import evaluate
    from training.models import build_model, encoder_cfg
    from training.sample import Sampler

    dev = torch.device(device)
    with tempfile.TemporaryDirectory(prefix="bench_eval_wan") as tmp:
        tmp = Path(tmp)
        data = tiny_wan_config(write_tiny_wan_assets(tmp / "assets"), tmp / "unused", tmp / "run")
        data["model"]["preset"] = preset  # 1.3B: dim 1536, 30 layers, with the tiny encoders' channels
        data["phases"][-1].update(buckets=[list(hw)], num_frames=frames, fps=16.0)
        (tmp / "c.yaml").write_text(yaml.safe_dump(data))
        cfg = load_config(tmp / "c.yaml")
        torch.manual_seed(0)
        model = build_model(cfg).to(dev).eval()
        if dev.type == "cuda":
            model = model.to(torch.bfloat16)
        enc = build_encoders(encoder_cfg(cfg.encoders, dev))
        sampler = Sampler(cfg, model, enc, dev)
        suite = MetricSuite(_production_metrics_tiny(tmp, device)).load()
        eval_set = write_triplets(tmp, n_videos=4, subdir="shards_eval")
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()
        with amp:
            rep = evaluate(
                f"wan-{preset}-random",
                str(eval_set),
                str(tmp / "eval"),
                steps=steps,
                limit=cases,
                suite=suite,
                sampler=sampler,
            )
        t = rep["timing"]
        n = max(1, rep["n_ok"])
        return {
            "eval_cases_per_s_wan1p3b_gpu": t["cases_per_s"],
            "eval_wan1p3b_ok_cases": float(rep["n_ok"]),
            "eval_wan1p3b_generate_s_per_case": round(t["generate_s"] / n, 3),
            "eval_wan1p3b_metrics_s_per_case": round(t["metrics_s"] / n, 3),
            "eval_wan1p3b_steps": float(steps),
            "eval_wan1p3b_frames": float(frames),
            "eval_wan1p3b_metrics_on": float(sum(m["status"] == "on" for m in rep["metrics"].values())),
        }


def run() -> dict[str, float]:
    import torch

    out = bench_cpu()
    out.update(bench_opens2v_motion())
    if torch.cuda.is_available():
        out.update(bench_wan("cuda", "1.3B"))
    return out


if __name__ == "__main__":
    print(json.dumps(run()))
