"""OpenS2V-Eval's Aesthetics and Motion terms, computed the way its eval/ scripts compute them, on whole
videos (not on the metric suite's few sampled frames), and the ``evaluation.opens2v`` config that names their
models and frame counts.

- ``Aesthetics`` (get_aesscore.py): ``frames`` (32) frames at ``linspace(0, T-1, 32)`` floored; each through a
  transformers CLIP ViT-L/14 (``CLIPVisionModelWithProjection`` + ``CLIPProcessor``), the image embedding made
  unit length, then the LAION aesthetic MLP (768 -> 1024 -> 128 -> 64 -> 16 -> 1, OpenS2V-Weight's
  ``aesthetic-model.pth``); mean over frames.
- ``MotionAmplitude`` (get_motion_amplitude.py): every frame (``frames: 0``); Farneback flow of each
  consecutive pair (pyr_scale 0.5, levels 3, winsize 15, iterations 3, poly_n 5, poly_sigma 1.2; grey from
  ``COLOR_BGR2GRAY`` on the RGB frames, as the script does), each flow map resized to 16 px wide (INTER_AREA),
  the maps averaged over time, then the mean of that (both components, signed), absolute value.
- ``MotionSmoothness`` (get_motion_smoothness.py): every frame, in sliding windows of ``window`` (3) frames
  (edges repeated), each window scored by Q-Align (q-future/one-align, "How would you rate the quality of
  this video?", softmax over excellent/good/fair/poor/bad weighted 1, .75, .5, .25, 0); a frame is an artifact
  where the score jumps by more than ``threshold`` (0.025) to the next one (both frames counted); the value
  is ``1 - artifacts / frames``.

The other OpenS2V metrics (FaceSim-Cur, GmeScore, NexusScore: 32 frames; NaturalScore: 16) run in
curation.metrics on the case's frames; in an OpenS2V run those are ``frames`` (32) frames, floored the same
way.

A metric whose model is not configured, or not on disk, is reported off with the key to set and where the
model comes from; nothing else stands in for it.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np

from curation.config import ConfigError, field, from_dict
from curation.metrics import MetricsConfig, metrics_config

KEY = "evaluation.opens2v"


@dataclasses.dataclass
class AestheticsConfig:
    # a transformers CLIP ViT-L/14 folder (openai/clip-vit-large-patch14) and the MLP (aesthetic-model.pth)
    clip_path: str = ""
    clip_sha256: str = ""  # the folder's digest (curation.models.folder_sha256) or "unpinned"
    mlp_path: str = ""
    mlp_sha256: str = ""
    frames: int = field(32, ge=1, le=1024)  # get_aesscore.py --num_frames 32
    batch_size: int = field(32, ge=1)


@dataclasses.dataclass
class AmplitudeConfig:
    enabled: bool = True
    frames: int = field(0, ge=0, le=4096)  # 0: every frame (get_motion_amplitude.py num_frames=None)
    downscale: int = field(16, ge=1, le=1024)  # flow maps resized to this width


@dataclasses.dataclass
class SmoothnessConfig:
    model_path: str = ""  # a q-future/one-align folder (its modelling code runs: trust_remote_code)
    sha256: str = ""  # the folder's digest or "unpinned"
    trust_remote_code: bool = False  # must be true to run the folder's code
    frames: int = field(0, ge=0, le=4096)  # 0: every frame
    window: int = field(3, ge=1, le=64)  # get_motion_smoothness.py --window_size 3
    threshold: float = field(0.025, ge=0.0, le=1.0)
    batch_size: int = field(64, ge=1)


@dataclasses.dataclass
class BenchConfig:
    # the benchmark's case file (OpenS2V-Eval/Open-Domain_Eval.json): the evaluation set when none is given
    cases: str = ""
    # frames per video for the suite's metrics in an OpenS2V run (FaceSim-Cur, GmeScore, NexusScore: 32)
    frames: int = field(32, ge=1, le=256)
    aesthetics: AestheticsConfig = dataclasses.field(default_factory=AestheticsConfig)
    motion_amplitude: AmplitudeConfig = dataclasses.field(default_factory=AmplitudeConfig)
    motion_smoothness: SmoothnessConfig = dataclasses.field(default_factory=SmoothnessConfig)


def bench_config(data: dict | None) -> BenchConfig:
    return from_dict(BenchConfig, data or {}, KEY)


def load_eval_config(path: str | os.PathLike | None) -> tuple[MetricsConfig, BenchConfig]:
    """(metric suite config, OpenS2V config) from a YAML file (safe_load): a file with an ``evaluation:``
    block (pipelines.yaml; its ``models_dir`` carries in) or the block itself. ``opens2v:`` inside the block
    is this module's; the rest is curation.metrics'. No path: the offline defaults."""
    import yaml

    if not path:
        return MetricsConfig(), BenchConfig()
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"metric config {p} does not exist")
    with open(p, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping, got {type(data).__name__}")
    where = "<root>"
    if "evaluation" in data or "pipelines" in data:
        block = data.get("evaluation") or {}
        if not isinstance(block, dict):
            raise ConfigError(f"{p}: evaluation: expected a mapping, got {type(block).__name__}")
        block = dict(block)
        if "models_dir" in data:
            block.setdefault("models_dir", data["models_dir"])
        data, where = block, "evaluation"
    data = dict(data)
    bench = bench_config(data.pop("opens2v", None))
    return metrics_config(data, where), bench


# ---------------------------------------------------------------------------------------------------------
# the benchmark's computations (pure functions: the tests work them out by hand)


def bench_indices(n_total: int, n: int) -> list[int]:
    """The benchmark's sampling: ``np.linspace(0, T-1, n, dtype=int)`` (floored; repeats when T < n); every
    frame for ``n <= 0``."""
    if n_total <= 0:
        return []
    if n <= 0:
        return list(range(n_total))
    return np.linspace(0, n_total - 1, n, dtype=int).tolist()


def motion_amplitude(frames: np.ndarray, downscale: int = 16) -> float:
    """get_motion_amplitude.py's ``motion_fb`` for (T, H, W, 3) uint8 RGB frames (T >= 2)."""
    import cv2

    if len(frames) < 2:
        raise ValueError("motion amplitude needs two frames or more")
    # The script converts RGB frames with COLOR_BGR2GRAY (R and B weights swapped); so does this.
    grey = [cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_BGR2GRAY) for f in frames]
    flows = [
        cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0) for a, b in zip(grey, grey[1:])
    ]
    return amplitude_from_flows(flows, downscale)


def amplitude_from_flows(flows, downscale: int = 16) -> float:
    """The script's ``_motion_score(_downscale_maps(flows))``: each (H, W, 2) flow map resized to
    ``downscale`` px wide (INTER_AREA), the maps averaged over time, the mean of all values (x and y,
    signed), its absolute value."""
    import cv2

    maps = []
    for f in flows:
        h, w = f.shape[:2]
        size = (downscale, int(h * (downscale / w)))
        maps.append(cv2.resize(np.asarray(f, np.float32), size, interpolation=cv2.INTER_AREA))
    return abs(float(np.mean(np.mean(np.array(maps), axis=0))))


def smoothness_windows(n_frames: int, window: int = 3) -> list[list[int]]:
    """get_motion_smoothness.py's windows: one per frame, ``(window-1)//2`` before and the rest after,
    clipped to the video and padded by repeating its end; a frame before the first full left side gets
    its window's first frame ``window`` times."""
    left = (window - 1) // 2
    right = window - 1 - left
    out = []
    for t in range(n_frames):
        start, end = max(0, t - left), min(n_frames, t + right + 1)
        idx = list(range(start, end))
        while len(idx) < window:
            if start == 0:
                idx.append(idx[-1])
            else:
                idx.insert(0, idx[0])
        out.append([idx[0]] * window if t < left else idx)
    return out


def smoothness_from_scores(scores, threshold: float = 0.025) -> float:
    """``1 - artifacts / frames``: an artifact where |score[t+1] - score[t]| > threshold (t and t+1 count)."""
    s = np.asarray(scores, np.float64)
    if len(s) == 0:
        raise ValueError("no window scores")
    jumps = np.where(np.abs(np.diff(s)) > threshold)[0]
    bad = np.unique(np.concatenate([jumps, jumps + 1]))
    return 1.0 - len(bad) / len(s)


# ---------------------------------------------------------------------------------------------------------
# the metrics (each on one whole video)


class MotionAmplitude:
    name = "MotionAmplitude"
    value_range = (0.0, 1.0)

    def __init__(self, cfg: AmplitudeConfig):
        self.cfg = cfg
        n = "every frame" if cfg.frames <= 0 else f"{cfg.frames} frames"
        self.model = f"OpenCV Farneback flow, {n}, maps {cfg.downscale} px wide (get_motion_amplitude.py)"

    def __call__(self, video: np.ndarray) -> dict:
        idx = bench_indices(len(video), self.cfg.frames)
        if len(idx) < 2:
            return {"value": None, "reason": "single_frame"}
        return {"value": motion_amplitude(video[idx], self.cfg.downscale), "frames": len(idx)}


class Aesthetics:
    name = "Aesthetics"
    value_range = (0.0, 10.0)

    def __init__(self, cfg: AestheticsConfig, models_dir: str, device: str):
        import torch
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        from curation.backends.aesthetic import linear_stack_from_state_dict
        from curation.models import ModelNotFound, locate_model_path, resolve_model_path

        key = f"{KEY}.aesthetics"
        if not locate_model_path(
            cfg.clip_path, models_dir, "CLIP ViT-L/14 folder", f"{key}.clip_path"
        ).is_dir():
            raise ModelNotFound(f"{key}.clip_path: {cfg.clip_path} must be a transformers CLIP model folder")
        clip = resolve_model_path(
            cfg.clip_path, models_dir, "CLIP ViT-L/14 folder", f"{key}.clip_path", cfg.clip_sha256 or None
        )
        mlp = resolve_model_path(
            cfg.mlp_path, models_dir, "aesthetic MLP", f"{key}.mlp_path", cfg.mlp_sha256 or None
        )
        self.device = "cuda" if device == "auto" and torch.cuda.is_available() else device
        self.device = "cpu" if self.device == "auto" else self.device
        self.clip = CLIPVisionModelWithProjection.from_pretrained(str(clip), local_files_only=True)
        self.clip = self.clip.eval().to(self.device)
        self.processor = CLIPImageProcessor.from_pretrained(str(clip), local_files_only=True)
        if str(mlp).endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(str(mlp))
        else:
            state = torch.load(mlp, map_location="cpu", weights_only=True)
        self.head = linear_stack_from_state_dict(state.get("state_dict", state)).to(self.device)
        dim = self.clip.config.projection_dim
        if self.head[0].in_features != dim:
            raise ValueError(
                f"{key}: the MLP takes {self.head[0].in_features}-d input, the CLIP gives {dim}-d"
            )
        self.cfg = cfg
        self.model = (
            f"CLIP {Path(clip).name} + LAION MLP {Path(mlp).name}, {cfg.frames} frames (get_aesscore.py)"
        )

    def per_frame(self, frames: np.ndarray) -> np.ndarray:
        import torch
        from PIL import Image

        out = []
        for i in range(0, len(frames), self.cfg.batch_size):
            pil = [Image.fromarray(np.ascontiguousarray(f)) for f in frames[i : i + self.cfg.batch_size]]
            x = self.processor(images=pil, return_tensors="pt")["pixel_values"].to(self.device)
            with torch.inference_mode():
                e = self.clip(pixel_values=x).image_embeds.float()
                e = e / torch.linalg.vector_norm(e, dim=-1, keepdim=True)
                out.append(self.head(e).squeeze(1).cpu().numpy())
        return np.concatenate(out)

    def __call__(self, video: np.ndarray) -> dict:
        idx = bench_indices(len(video), self.cfg.frames)
        return {"value": float(self.per_frame(video[idx]).mean()), "frames": len(idx)}


class MotionSmoothness:
    name = "MotionSmoothness"
    value_range = (0.0, 1.0)

    def __init__(self, cfg: SmoothnessConfig, models_dir: str, device: str):
        import torch
        from transformers import AutoModelForCausalLM

        from curation.models import resolve_model_path

        key = f"{KEY}.motion_smoothness"
        path = resolve_model_path(
            cfg.model_path, models_dir, "Q-Align folder", f"{key}.model_path", cfg.sha256 or None
        )
        self.device = "cuda" if device == "auto" and torch.cuda.is_available() else device
        self.device = "cpu" if self.device == "auto" else self.device
        dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
        self.net = (
            AutoModelForCausalLM.from_pretrained(
                str(path), trust_remote_code=True, local_files_only=True, torch_dtype=dtype
            )
            .eval()
            .to(self.device)
        )
        if not hasattr(self.net, "score"):
            raise ValueError(f"{key}.model_path: {path} is not Q-Align (its model has no score())")
        self.cfg = cfg
        self.model = f"Q-Align {Path(path).name}, windows of {cfg.window}, jump > {cfg.threshold}"

    def window_scores(self, video: np.ndarray) -> np.ndarray:
        from PIL import Image

        wins = smoothness_windows(len(video), self.cfg.window)
        out = []
        for i in range(0, len(wins), self.cfg.batch_size):
            batch = [
                [Image.fromarray(np.ascontiguousarray(video[t])) for t in w]
                for w in wins[i : i + self.cfg.batch_size]
            ]
            s = self.net.score(batch, task_="quality", input_="video")  # one-align: 1..5
            out.append((s.float().cpu().numpy() - 1.0) / 4.0)  # q_align's weights 1, .75, .5, .25, 0
        return np.concatenate(out)

    def __call__(self, video: np.ndarray) -> dict:
        idx = bench_indices(len(video), self.cfg.frames)
        return {"value": smoothness_from_scores(self.window_scores(video[idx]), self.cfg.threshold)}


# ---------------------------------------------------------------------------------------------------------
# the set


AESTHETICS_HOW = (
    f"set {KEY}.aesthetics.clip_path to a transformers CLIP ViT-L/14 folder (openai/clip-vit-large-patch14) "
    "and mlp_path to OpenS2V-Weight's aesthetic-model.pth (under models_dir), pinned by `make weights` or "
    "clip_sha256 / mlp_sha256"
)
SMOOTHNESS_HOW = (
    f"set {KEY}.motion_smoothness.model_path to a q-future/one-align folder (under models_dir) with "
    "trust_remote_code: true (its modelling code runs), pinned by sha256 (curation.models.folder_sha256)"
)


class BenchMetrics:
    """The OpenS2V terms that need the whole video; ``off`` names each one that is off and why."""

    def __init__(self, cfg: BenchConfig | None = None, models_dir: str = "models", device: str = "auto"):
        from curation.models import ModelNotFound

        self.cfg = cfg = cfg or BenchConfig()
        self.metrics: list[Any] = []
        self.off: dict[str, str] = {}
        a = cfg.aesthetics
        if not (a.clip_path and a.mlp_path):
            self.off["Aesthetics"] = f"no aesthetic model configured: {AESTHETICS_HOW}"
        else:
            try:
                self.metrics.append(Aesthetics(a, models_dir, device))
            except ModelNotFound as e:
                self.off["Aesthetics"] = f"model not found ({e}); {AESTHETICS_HOW}"
        if cfg.motion_amplitude.enabled:
            self.metrics.append(MotionAmplitude(cfg.motion_amplitude))
        else:
            self.off["MotionAmplitude"] = f"turned off ({KEY}.motion_amplitude.enabled: false)"
        s = cfg.motion_smoothness
        if not s.model_path:
            self.off["MotionSmoothness"] = f"no Q-Align model configured: {SMOOTHNESS_HOW}"
        elif not s.trust_remote_code:
            self.off["MotionSmoothness"] = (
                f"{s.model_path} runs its own code: set {KEY}.motion_smoothness.trust_remote_code: true"
            )
        else:
            try:
                self.metrics.append(MotionSmoothness(s, models_dir, device))
            except ModelNotFound as e:
                self.off["MotionSmoothness"] = f"model not found ({e}); {SMOOTHNESS_HOW}"

    def describe(self) -> dict[str, dict]:
        out = {m.name: {"status": "on", "model": m.model, "range": list(m.value_range)} for m in self.metrics}
        out.update({n: {"status": "off", "reason": r} for n, r in self.off.items()})
        return out

    def ranges(self) -> dict[str, tuple[float, float]]:
        return {m.name: tuple(m.value_range) for m in self.metrics}

    def score(self, video: np.ndarray) -> dict[str, dict]:
        """{name: {"value", ...}} for one (T, H, W, 3) uint8 video; a metric that raises gives its reason."""
        out = {}
        for m in self.metrics:
            try:
                s = m(video)
            except Exception as e:  # one bad video costs this score, not the run
                s = {"value": None, "reason": f"error: {type(e).__name__}: {str(e)[:120]}"}
            if s.get("value") is not None:
                s["value"] = round(float(s["value"]), 5)
            out[m.name] = s
        return out
