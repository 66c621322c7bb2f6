"""OpenS2V-Eval's Aesthetics and motion terms (training/eval_bench.py): worked out by hand on known cases, the
Aesthetics path on a tiny random-init CLIP of the real class, the models reported off with what to set, and
pipelines.yaml's evaluation block (its commented examples included) read by training.evaluate's loader."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import yaml

from curation.config import ConfigError
from curation.metrics import metrics_config, sample_indices
from training import eval_bench as eb
from training.eval_bench import (
    BenchConfig,
    BenchMetrics,
    amplitude_from_flows,
    bench_indices,
    load_eval_config,
    motion_amplitude,
    smoothness_from_scores,
    smoothness_windows,
)

REPO = Path(__file__).resolve().parents[2]


def test_motion_amplitude_by_hand_on_flow_maps():
    """Two flow maps of a 32x64 video: uniform (1, 0) then (3, -1). Each is resized to 16x8 unchanged, the
    time average is (2, -0.5) everywhere, the mean of both components 0.75, its absolute value 0.75."""
    f1 = np.zeros((32, 64, 2), np.float32)
    f1[..., 0] = 1.0
    f2 = np.zeros((32, 64, 2), np.float32)
    f2[..., 0], f2[..., 1] = 3.0, -1.0
    assert amplitude_from_flows([f1, f2]) == pytest.approx(0.75, abs=1e-6)
    # left half moving 4 px right, right half still: 64 -> 16 columns by 4-px areas keeps the halves, so
    # the mean is (4 * 8 + 0 * 8) / 16 / 2 components = 1.0
    half = np.zeros((32, 64, 2), np.float32)
    half[:, :32, 0] = 4.0
    assert amplitude_from_flows([half]) == pytest.approx(1.0, abs=1e-6)
    # signed: a motion and its reverse average to nothing (the script's abs comes after the mean)
    assert amplitude_from_flows([f1, -f1]) == pytest.approx(0.0, abs=1e-7)


def test_motion_amplitude_of_a_known_video():
    """A textured frame shifted 2 px right per frame: Farneback finds (2, 0) inside the frame, so the value
    is about (2 + 0) / 2 = 1.0; the same frame still gives about 0; back and forth gives about 0."""
    base = skimage.data.astronaut()[::4, ::4].copy()  # (128, 128, 3), smooth enough for Farneback
    right = np.stack([np.roll(base, 2 * t, axis=1) for t in range(6)])
    assert motion_amplitude(right) == pytest.approx(1.0, abs=0.12)
    down = np.stack([np.roll(base, -2 * t, axis=0) for t in range(6)])  # (0, -2): |mean| = 1.0
    assert motion_amplitude(down) == pytest.approx(1.0, abs=0.12)
    assert motion_amplitude(np.stack([base] * 4)) < 1e-3  # Farneback's residue on equal frames
    wobble = np.stack([np.roll(base, 2 * (t % 2), axis=1) for t in range(5)])
    assert motion_amplitude(wobble) < 0.1
    m = eb.MotionAmplitude(eb.AmplitudeConfig())
    assert m(right)["value"] == pytest.approx(motion_amplitude(right)) and m(right)["frames"] == 6
    assert m(base[None])["value"] is None


def test_motion_smoothness_windows_and_rule_by_hand():
    # window 3: one frame either side, the first frame's window is that frame three times, the last repeats
    assert smoothness_windows(5, 3) == [[0, 0, 0], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 3, 4]]
    assert smoothness_windows(2, 1) == [[0], [1]]
    # jumps of .01, .09, 0, .04: over 0.025 at 1->2 and 3->4, so frames 1, 2, 3, 4 are artifacts: 1 - 4/5
    assert smoothness_from_scores([0.80, 0.81, 0.90, 0.90, 0.86]) == pytest.approx(0.2)
    assert smoothness_from_scores([0.5, 0.51, 0.52]) == 1.0


def test_frame_sampling_is_the_benchmarks():
    # np.linspace(0, 80, 32, dtype=int): floored, not rounded as the suite's sample_indices
    idx = bench_indices(81, 32)
    assert len(idx) == 32 and idx[:4] == [0, 2, 5, 7] and idx[-1] == 80
    assert sample_indices(81, 32)[:4] == [0, 3, 5, 8]
    assert bench_indices(10, 32).count(0) == 4 and len(bench_indices(10, 32)) == 32  # repeats, as the script
    assert bench_indices(7, 0) == list(range(7))


def test_missing_models_are_off_with_what_to_set(tmp_path):
    bm = BenchMetrics(BenchConfig(), models_dir=str(tmp_path))
    d = bm.describe()
    assert d["MotionAmplitude"]["status"] == "on" and "Farneback" in d["MotionAmplitude"]["model"]
    assert d["Aesthetics"]["status"] == "off" and "aesthetic-model.pth" in d["Aesthetics"]["reason"]
    assert "evaluation.opens2v.aesthetics.clip_path" in d["Aesthetics"]["reason"]
    assert d["MotionSmoothness"]["status"] == "off" and "one-align" in d["MotionSmoothness"]["reason"]
    cfg = eb.bench_config(
        {
            "aesthetics": {"clip_path": "clip-vit-large-patch14", "mlp_path": "aesthetic-model.pth"},
            "motion_smoothness": {"model_path": "one-align"},
            "motion_amplitude": {"enabled": False},
        }
    )
    d = BenchMetrics(cfg, models_dir=str(tmp_path)).describe()
    assert (
        "clip-vit-large-patch14" in d["Aesthetics"]["reason"] and str(tmp_path) in d["Aesthetics"]["reason"]
    )
    assert "trust_remote_code: true" in d["MotionSmoothness"]["reason"]
    assert d["MotionAmplitude"]["status"] == "off"
    cfg.motion_smoothness.trust_remote_code = True
    d = BenchMetrics(cfg, models_dir=str(tmp_path)).describe()
    assert "not found" in d["MotionSmoothness"]["reason"] and "one-align" in d["MotionSmoothness"]["reason"]
    assert BenchMetrics(cfg, models_dir=str(tmp_path)).score(np.zeros((3, 8, 8, 3), np.uint8)) == {}


@pytest.fixture(scope="module")
def tiny_aesthetics(tmp_path_factory):
    """A random-init CLIPVisionModelWithProjection (the class get_aesscore.py loads, 768-d projection) and
    an MLP of the benchmark's shape, pinned like production models."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from curation.models import folder_sha256, sha256_file

    root = tmp_path_factory.mktemp("aes")
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=768,
    )
    CLIPVisionModelWithProjection(cfg).save_pretrained(root / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        root / "clip"
    )
    mlp = torch.nn.Sequential(
        torch.nn.Linear(768, 1024),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(1024, 128),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(64, 16),
        torch.nn.Linear(16, 1),
    ).eval()
    torch.save({f"layers.{k}": v for k, v in mlp.state_dict().items()}, root / "aesthetic-model.pth")
    spec = {
        "clip_path": str(root / "clip"),
        "clip_sha256": folder_sha256(root / "clip"),
        "mlp_path": str(root / "aesthetic-model.pth"),
        "mlp_sha256": sha256_file(root / "aesthetic-model.pth"),
    }
    return root, spec, mlp


def test_aesthetics_is_the_mlp_of_unit_clip_embeddings_over_32_frames(tiny_aesthetics):
    import torch
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    root, spec, mlp = tiny_aesthetics
    bm = BenchMetrics(eb.bench_config({"aesthetics": spec}), models_dir=str(root), device="cpu")
    assert bm.describe()["Aesthetics"]["status"] == "on"
    video = np.stack([np.roll(skimage.data.chelsea()[::6, ::6], 3 * t, axis=1) for t in range(40)])
    got = bm.score(video)
    assert got["Aesthetics"]["frames"] == 32
    # by the script's steps: frames at linspace(0, 39, 32) floored, CLIP image_embeds made unit, MLP, mean
    clip = CLIPVisionModelWithProjection.from_pretrained(str(root / "clip")).eval()
    proc = CLIPImageProcessor.from_pretrained(str(root / "clip"))
    idx = np.linspace(0, 39, 32, dtype=int)
    with torch.no_grad():
        x = proc(images=[Image.fromarray(video[i]) for i in idx], return_tensors="pt")["pixel_values"]
        e = clip(pixel_values=x).image_embeds
        want = mlp(e / e.norm(dim=-1, keepdim=True)).mean().item()
    assert got["Aesthetics"]["value"] == pytest.approx(want, abs=1e-5)
    # a changed MLP file is refused, not loaded
    bad = dict(spec, mlp_sha256="0" * 64)
    with pytest.raises(Exception, match="sha256|match"):
        BenchMetrics(eb.bench_config({"aesthetics": bad}), models_dir=str(root), device="cpu")


def _evaluation_block(text: str) -> str:
    lines = text.splitlines()
    start = lines.index("evaluation:")
    end = next(
        (i for i in range(start + 1, len(lines)) if lines[i] and not lines[i][0].isspace()), len(lines)
    )
    return "\n".join(lines[start:end]) + "\n"


def test_pipelines_evaluation_block_and_its_examples_are_read(tmp_path):
    text = (REPO / "pipelines.yaml").read_text()
    cfg, bench = load_eval_config(REPO / "pipelines.yaml")
    assert cfg.n_frames == 10 and cfg.face.embedder == "sface"
    assert bench.frames == 32 and bench.aesthetics.frames == 32 and bench.cases == ""
    assert bench.motion_amplitude.frames == 0 and bench.motion_amplitude.downscale == 16
    assert bench.motion_smoothness.window == 3 and bench.motion_smoothness.threshold == 0.025
    # the commented example, uncommented, is a valid config with the benchmark's models and endpoint
    block = _evaluation_block(text)
    m = re.search(r"\n(\s*)# \[example[^\n]*\n(.*?)\n\s*# \[end example\]", block, re.S)
    assert m, "the evaluation block has an [example] ... [end example] region"
    indent = m.group(1)
    example = "\n".join(
        indent + ln.strip()[2:] if ln.strip().startswith("# ") else ln for ln in m.group(2).splitlines()
    )
    example = "\n".join(ln[len(indent) :] for ln in example.splitlines())
    data = yaml.safe_load(example)
    assert {"facesim_cur", "gme", "natural", "opens2v"} <= set(data)
    (tmp_path / "e.yaml").write_text(
        block.replace(m.group(0), "\n" + "\n".join(indent + ln for ln in example.splitlines()))
    )
    cfg, bench = load_eval_config(tmp_path / "e.yaml")
    assert bench.cases.endswith("Open-Domain_Eval.json") and bench.motion_smoothness.trust_remote_code
    assert bench.aesthetics.mlp_path.endswith("aesthetic-model.pth") and bench.frames == 32
    assert cfg.natural["base_url"].startswith("http://") and cfg.natural["n_frames"] == 16
    assert cfg.gme["model_path"] and cfg.facesim_cur["embedder"]["name"] == "arcface"
    # unknown keys are named
    (tmp_path / "bad.yaml").write_text("evaluation:\n  opens2v: {aesthetic: {}}\n")
    with pytest.raises(ConfigError, match="evaluation.opens2v.aesthetic"):
        load_eval_config(tmp_path / "bad.yaml")
    assert metrics_config({}).n_frames == 10  # the suite's own block is unchanged
