"""Subject-to-video metrics, one module for both uses: checkpoint evaluation (training.evaluate) and the
data-quality report of curated shards (``python -m curation.inspect quality``).

A *case* is one video (a few frames) with its reference images, prompt and subjects. Each metric is a small
object with ``name`` (what is reported, e.g. ``FaceSim-Arc``), ``model`` (what produced the number) and
``__call__(batch) -> one score per case``; a score is ``{"value": float | None, "reason"?: str, ...}``.
``MetricSuite`` builds the configured metrics once (every model loaded once), scores cases in batches
(each image model sees all crops of a batch in one ``embed`` call) and lists the metrics that are off.

Metrics (the paper's §4 and OpenS2V-Eval's):

- ``FaceSim-Arc`` (insightface ArcFace) or ``FaceSim-SFace`` (OpenCV Zoo SFace, the offline default): the
  face of each reference against the best-matching face detected in each frame, cosine, mean over frames;
- ``CLIP-I``, ``DINO-I``, ``MobileNetV2-I``: reference vs the subject in each frame (NexusScore-style: the
  region a grounder finds for that subject, or the data's own box; the whole frame when neither exists),
  cosine of image embeddings, mean over frames;
- ``CLIP-T``: prompt vs whole frames (CLIP text/image cosine, not x100);
- ``Motion``: optical-flow magnitude (curation.motion.motion_stats, frame short sides per second);
- ``TempCons-<embedder>``: cosine of consecutive sampled frames' embeddings;
- ``Aesthetic``: LAION predictor mean over frames, when configured;
- OpenS2V-Eval's own, as its eval/ scripts compute them (off until their models are configured):
  ``FaceSim-Cur`` (CurricularFace ONNX through the ArcFace loader), ``GmeScore`` (GME / Qwen2-VL, prompt vs
  frames), ``NexusScore`` (grounder boxes, GME crop vs reference), ``NaturalScore`` (a VLM judge, 1-5);
  their normalisation and total: training/opens2v.py;
- ``CopyPaste``: how close the frames come to a pixel copy of a reference: the best normalised
  cross-correlation of the reference, at several scales, anywhere in a frame (1.0 = a pasted copy), with
  ``flag`` set at or above ``copy_paste.threshold``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from curation.backends.embedders import ImageEmbedder, OpenClipEmbedder
from curation.config import ConfigError, field, from_dict
from curation.stage import build_backend

# ---------------------------------------------------------------------------------------------------------
# configuration


@dataclasses.dataclass
class FaceConfig:
    # detector / embedder: a registered backend name or {name: ..., model_path: ..., ...}; embedder "off"
    # turns FaceSim off. Production: {name: scrfd, model_path: buffalo_l} / {name: arcface, model_path:
    # buffalo_l}.
    detector: Any = "yunet"
    embedder: Any = "sface"
    min_det_score: float = field(0.6, ge=0.0, le=1.0)
    min_face_px: int = field(12, ge=1)  # shorter side of a face box
    ref_pad_frac: float = field(0.25, ge=0.0, le=2.0)  # border added around a reference before detection
    # References whose subject has another category are not searched for a face (a cat's face would be
    # scored against people); references of unknown category are.
    categories: list[str] = field(["human"])


@dataclasses.dataclass
class ClipConfig:
    arch: str = "ViT-H-14"
    model_path: str = ""  # an open_clip checkpoint; empty: CLIP-I and CLIP-T are off
    sha256: str = ""  # the checkpoint's, or "unpinned"; empty: the hash `make weights` recorded
    model_config: str = ""  # a JSON architecture to register with open_clip (custom archs)


@dataclasses.dataclass
class DinoConfig:
    model_path: str = ""  # a transformers Dinov2Model folder; empty: DINO-I is off
    sha256: str = ""  # the folder's digest (curation.models.folder_sha256), or "unpinned"


@dataclasses.dataclass
class MotionConfig:
    enabled: bool = True
    method: str = field("farneback", choices=["farneback", "dis"])
    flow_short_side: int = field(96, ge=16, le=720)


@dataclasses.dataclass
class CopyPasteConfig:
    enabled: bool = True
    threshold: float = field(0.9, gt=0.0, le=1.0)  # closeness at or above: flagged as a copy
    short_side_px: int = field(128, ge=32, le=1024)  # frames are matched at this short side
    min_template_px: int = field(16, ge=4)
    n_scales: int = field(8, ge=1, le=32)
    min_scale: float = field(0.2, gt=0.0, le=1.0)  # smallest reference size, as a fraction of the largest fit


@dataclasses.dataclass
class NexusConfig:
    det_conf: float = field(0.6, ge=0.0, le=1.0)  # a detection counts above this confidence (benchmark: 0.6)
    text_conf: float = field(0.30, ge=-1.0, le=1.0)  # ... and when its crop matches the label above this


@dataclasses.dataclass
class MetricsConfig:
    models_dir: str = "models"
    device: str = "auto"
    n_frames: int = field(10, ge=1, le=256)  # frames sampled evenly from each video (the paper: 10)
    face: FaceConfig = dataclasses.field(default_factory=FaceConfig)
    clip: ClipConfig = dataclasses.field(default_factory=ClipConfig)
    dino: DinoConfig = dataclasses.field(default_factory=DinoConfig)
    mobilenet: bool = True  # MobileNetV2-I from the offline ImageNet weights
    # {name: qwen2_5_vl, model_path: ...} or {name: human}; {} or {name: off}: whole frames
    grounder: dict[str, Any] = field({})
    # {name: laion_mlp, clip_arch: ..., clip_path: ..., mlp_path: ...}; {}: Aesthetic is off
    aesthetic: dict[str, Any] = field({})
    motion: MotionConfig = dataclasses.field(default_factory=MotionConfig)
    copy_paste: CopyPasteConfig = dataclasses.field(default_factory=CopyPasteConfig)
    batch_size: int = field(16, ge=1)  # images per model call
    # OpenS2V-Eval's metrics (off while empty; each names its model):
    # {detector: {name: scrfd, ...}, embedder: {name: arcface, model_path: <CurricularFace .onnx>, sha256}}
    facesim_cur: dict[str, Any] = field({})
    # {model_path: gme-Qwen2-VL-7B-Instruct, sha256: ..., min_pixels?, max_pixels?}: GmeScore, NexusScore
    gme: dict[str, Any] = field({})
    nexus: NexusConfig = dataclasses.field(default_factory=NexusConfig)  # NexusScore: gme + grounder
    # the VLM judge: {base_url: http://.../v1, model: ..., api_key_env?, repeats: 3, n_frames: 16}
    natural: dict[str, Any] = field({})


def metrics_config(data: dict | None, path: str = "evaluation") -> MetricsConfig:
    return from_dict(MetricsConfig, data or {}, path)


def load_metrics_config(path: str | os.PathLike | None) -> MetricsConfig:
    """The metric config from a YAML file (safe_load): either the block itself or a file with an
    ``evaluation:`` block (pipelines.yaml). No path: the offline defaults."""
    import yaml

    if not path:
        return MetricsConfig()
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"metric config {p} does not exist")
    with open(p) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping, got {type(data).__name__}")
    if "evaluation" in data or "pipelines" in data:
        block = dict(data.get("evaluation") or {})
        if "models_dir" in data:  # pipelines.yaml's models_dir unless the block names its own
            block.setdefault("models_dir", data["models_dir"])
        block.pop("opens2v", None)  # the benchmark's own terms: training.eval_bench reads that sub-block
        return metrics_config(block, "evaluation")
    return metrics_config(data, "<root>")


def _is_off(spec) -> bool:
    if spec in (None, "", "off", "none", False):
        return True
    return isinstance(spec, dict) and (not spec or spec.get("name") in ("off", "none"))


def _named(spec, what: str) -> tuple[str, dict]:
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, dict) and spec.get("name"):
        spec = dict(spec)
        return spec.pop("name"), spec
    raise ConfigError(f"{what}: expected a backend name or a mapping with 'name', got {spec!r}")


# ---------------------------------------------------------------------------------------------------------
# cases and subject regions


@dataclasses.dataclass
class Case:
    """One video to score. ``frames``: (T, H, W, 3) uint8 sampled evenly; ``refs``: reference images (RGB
    uint8, any sizes); ``subjects``: per reference {name, category, description} (used by a grounder);
    ``boxes``: per reference, per frame, the subject's box in that frame when the data knows it (curated
    shards), None otherwise; ``flow``: (frames (P, H, W, 3), next frames (P, H, W, 3), frame pairs per
    second) for the motion metric, None to use consecutive sampled frames at ``fps``."""

    key: str
    refs: list[np.ndarray]
    frames: np.ndarray
    prompt: str = ""
    subjects: list[dict] = dataclasses.field(default_factory=list)
    boxes: list[list[list[float] | None]] | None = None
    fps: float = 8.0
    flow: tuple[np.ndarray, np.ndarray, float] | None = None


@dataclasses.dataclass
class Region:
    """Where a subject is in one frame: ``box`` in frame pixels, or None for the whole frame."""

    frame: int
    box: list[float] | None
    source: str  # "data_box" | "grounded" | "whole_frame"


def crop(image: np.ndarray, box: Sequence[float] | None) -> np.ndarray:
    """The box of an image (clamped to it, at least 2x2 px); the image itself for None."""
    if box is None:
        return image
    h, w = image.shape[:2]
    x0, y0 = int(np.clip(np.floor(box[0]), 0, w - 2)), int(np.clip(np.floor(box[1]), 0, h - 2))
    x1, y1 = int(np.clip(np.ceil(box[2]), x0 + 2, w)), int(np.clip(np.ceil(box[3]), y0 + 2, h))
    return image[y0:y1, x0:x1]


def _valid_box(box, hw: tuple[int, int]) -> bool:
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        return False
    x0, y0, x1, y1 = (float(v) for v in box)
    h, w = hw
    return x1 - x0 >= 2 and y1 - y0 >= 2 and x1 > 0 and y1 > 0 and x0 < w and y0 < h


def sample_indices(n_total: int, n: int) -> list[int]:
    """``n`` evenly spaced frame indices of ``n_total`` (all of them when there are fewer)."""
    if n_total <= 0:
        return []
    if n_total <= n:
        return list(range(n_total))
    return np.linspace(0, n_total - 1, n).round().astype(int).tolist()


# ---------------------------------------------------------------------------------------------------------
# image models (each loaded once per suite): the pipeline's image_embedder backends, by name


def image_embedder(name: str, cfg: MetricsConfig, **kw) -> ImageEmbedder:
    """A registered image_embedder backend (curation.backends.embedders), on the suite's device and batch."""
    return build_backend(
        "image_embedder", name, models_dir=cfg.models_dir, device=cfg.device, batch_size=cfg.batch_size, **kw
    )


# ---------------------------------------------------------------------------------------------------------
# the batch: cases, their subject regions, and embeddings computed once per (model, what)


class Batch:
    def __init__(self, cases: list[Case], regions: list[list[list[Region]]]):
        self.cases = cases
        self.regions = regions  # [case][ref] -> regions (empty: the subject was not found)
        self._memo: dict = {}

    def _once(self, key, fn):
        if key not in self._memo:
            self._memo[key] = fn()
        return self._memo[key]

    def ref_embeddings(self, emb: ImageEmbedder) -> list[np.ndarray]:
        """Per case (n_refs, D)."""

        def run():
            flat = emb.embed([r for c in self.cases for r in c.refs])
            return np.split(flat, np.cumsum([len(c.refs) for c in self.cases])[:-1])

        return self._once((id(emb), "refs"), run)

    def frame_embeddings(self, emb: ImageEmbedder) -> list[np.ndarray]:
        """Per case (T, D), whole frames."""

        def run():
            flat = emb.embed([f for c in self.cases for f in c.frames])
            return np.split(flat, np.cumsum([len(c.frames) for c in self.cases])[:-1])

        return self._once((id(emb), "frames"), run)

    def region_embeddings(self, emb: ImageEmbedder) -> list[list[np.ndarray]]:
        """Per case, per reference (k, D) for its k regions; whole-frame regions reuse the frame rows."""

        def run():
            whole = any(g.box is None for per_ref in self.regions for regs in per_ref for g in regs)
            frames = self.frame_embeddings(emb) if whole else None
            crops, where = [], []
            for ci, (c, per_ref) in enumerate(zip(self.cases, self.regions)):
                for ri, regs in enumerate(per_ref):
                    for k, g in enumerate(regs):
                        if g.box is not None:
                            where.append((ci, ri, k))
                            crops.append(crop(c.frames[g.frame], g.box))
            rows = emb.embed(crops)
            out = [
                [
                    np.stack(
                        [
                            frames[ci][g.frame] if g.box is None else np.zeros(emb.dim, np.float32)
                            for g in regs
                        ]
                    )
                    if regs
                    else np.zeros((0, emb.dim), np.float32)
                    for regs in per_ref
                ]
                for ci, per_ref in enumerate(self.regions)
            ]
            for (ci, ri, k), row in zip(where, rows):
                out[ci][ri][k] = row
            return out

        return self._once((id(emb), "regions"), run)


# ---------------------------------------------------------------------------------------------------------
# the metrics


class Metric(Protocol):
    name: str  # the reported name
    model: str  # what produced the number
    value_range: tuple[float, float]  # for histograms

    def __call__(self, batch: Batch) -> list[dict]:
        """One score {"value": float | None, "reason"?: str, ...} per case of the batch."""


def _none(reason: str, **extra) -> dict:
    return {"value": None, "reason": reason, **extra}


class FaceSim:
    """Each reference's face (the largest detected in it) against the best-matching face in every frame;
    cosine of identity embeddings, mean over frames with a face, mean over references with a face."""

    value_range = (-1.0, 1.0)

    def __init__(self, cfg: FaceConfig, models_dir: str):
        from curation.backends import faces  # noqa: F401  (registers the face backends)

        det_name, det_kw = _named(cfg.detector, "evaluation.face.detector")
        emb_name, emb_kw = _named(cfg.embedder, "evaluation.face.embedder")
        self.detector = build_backend("face_detector", det_name, models_dir=models_dir, **det_kw)
        self.embedder = build_backend("face_embedder", emb_name, models_dir=models_dir, **emb_kw)
        self.cfg = cfg
        # The reported name says which recogniser produced the number (the paper's FaceSim-Arc is ArcFace).
        self.name = {"arcface": "FaceSim-Arc", "sface": "FaceSim-SFace"}.get(emb_name, f"FaceSim-{emb_name}")
        files = [
            Path(getattr(getattr(b, "model", None), "model_file", "") or "").name
            for b in (self.embedder, self.detector)
        ]  # insightface models know their ONNX file
        self.model = f"{emb_name} face embedder + {det_name} detector" + (
            f" ({', '.join(f for f in files if f)})" if any(files) else ""
        )

    def _faces(self, image: np.ndarray):
        return [
            f
            for f in self.detector.detect(image)
            if f.score >= self.cfg.min_det_score
            and min(f.box[2] - f.box[0], f.box[3] - f.box[1]) >= self.cfg.min_face_px
        ]

    def ref_face(self, ref: np.ndarray) -> np.ndarray | None:
        """(dim,) identity of the largest face in a reference, or None. The reference is padded first: a
        tight head crop leaves the detector no context."""
        p = int(round(self.cfg.ref_pad_frac * max(ref.shape[:2])))
        img = np.pad(ref, ((p, p), (p, p), (0, 0)), mode="constant", constant_values=127) if p else ref
        found = self._faces(img)
        if not found:
            return None
        big = max(found, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))
        return self.embedder.embed(img, [big])[0]

    def frame_faces(self, frame: np.ndarray) -> np.ndarray:
        """(n_faces, dim) identities of the faces in a frame."""
        found = self._faces(frame)
        return self.embedder.embed(frame, found) if found else np.zeros((0, self.embedder.dim), np.float32)

    def __call__(self, batch: Batch) -> list[dict]:
        out = []
        for c in batch.cases:
            cats = [
                (c.subjects[i] if i < len(c.subjects) else {}).get("category") for i in range(len(c.refs))
            ]
            refs = [
                self.ref_face(r) if cat is None or cat in self.cfg.categories else None
                for r, cat in zip(c.refs, cats)
            ]
            if all(r is None for r in refs):
                out.append(_none("no_reference_face"))
                continue
            frames = [self.frame_faces(f) for f in c.frames]
            with_face = [f for f in frames if len(f)]
            if not with_face:
                out.append(_none("no_face_in_video", face_frames=0, frames=len(frames)))
                continue
            per_ref = [
                None if r is None else float(np.mean([float((f @ r).max()) for f in with_face])) for r in refs
            ]
            vals = [v for v in per_ref if v is not None]
            out.append(
                {
                    "value": float(np.mean(vals)),
                    "per_ref": [None if v is None else round(v, 4) for v in per_ref],
                    "face_frames": len(with_face),
                    "frames": len(frames),
                }
            )
        return out


class SubjectSim:
    """Reference vs the subject's region in each frame (cosine of image embeddings), mean over the frames
    where the subject was found, mean over references."""

    value_range = (-1.0, 1.0)

    def __init__(self, name: str, embedder: ImageEmbedder, model: str):
        self.name, self.embedder, self.model = name, embedder, model

    def __call__(self, batch: Batch) -> list[dict]:
        refs, regions = batch.ref_embeddings(self.embedder), batch.region_embeddings(self.embedder)
        out = []
        for ci, c in enumerate(batch.cases):
            per_ref = [
                float((regions[ci][ri] @ refs[ci][ri]).mean()) if len(regions[ci][ri]) else None
                for ri in range(len(c.refs))
            ]
            vals = [v for v in per_ref if v is not None]
            sources = sorted({g.source for regs in batch.regions[ci] for g in regs})
            if not vals:
                out.append(_none("subject_not_found"))
            else:
                out.append(
                    {
                        "value": float(np.mean(vals)),
                        "per_ref": [None if v is None else round(v, 4) for v in per_ref],
                        "regions": sources,
                    }
                )
        return out


class ClipT:
    """Prompt vs whole frames: CLIP text/image cosine, mean over frames."""

    name = "CLIP-T"
    value_range = (-1.0, 1.0)

    def __init__(self, clip: OpenClipEmbedder):
        self.clip, self.model = clip, clip.describe

    def __call__(self, batch: Batch) -> list[dict]:
        frames = batch.frame_embeddings(self.clip)
        texts = self.clip.embed_texts([c.prompt for c in batch.cases])
        return [
            {"value": float((frames[i] @ texts[i]).mean())} if c.prompt else _none("no_prompt")
            for i, c in enumerate(batch.cases)
        ]


class TemporalConsistency:
    """Cosine of consecutive sampled frames' embeddings, mean over the pairs (1.0 = no change)."""

    value_range = (-1.0, 1.0)

    def __init__(self, name: str, embedder: ImageEmbedder, model: str):
        self.name, self.embedder, self.model = name, embedder, model

    def __call__(self, batch: Batch) -> list[dict]:
        out = []
        for e in batch.frame_embeddings(self.embedder):
            if len(e) < 2:
                out.append(_none("single_frame"))
            else:
                out.append({"value": float(np.mean(np.sum(e[1:] * e[:-1], axis=1)))})
        return out


class Motion:
    """Optical-flow motion amplitude with curation.motion.motion_stats: median over frame pairs of
    the mean flow magnitude, in frame short sides per second."""

    name = "Motion"
    value_range = (0.0, 2.0)

    def __init__(self, cfg: MotionConfig):
        self.cfg = cfg
        self.model = f"OpenCV {cfg.method} optical flow at {cfg.flow_short_side} px"

    def __call__(self, batch: Batch) -> list[dict]:
        from curation.motion import motion_stats

        out = []
        for c in batch.cases:
            if c.flow is not None:
                a, b, per_s = c.flow
            else:
                a, b, per_s = c.frames[:-1], c.frames[1:], c.fps
            if len(a) == 0:
                out.append(_none("single_frame"))
                continue
            st = motion_stats(a, b, float(per_s), 1, self.cfg.flow_short_side, self.cfg.method)
            out.append(
                {"value": st["mean"], "global": round(st["global"], 4), "residual": round(st["residual"], 4)}
            )
        return out


class Aesthetic:
    """LAION-style aesthetic predictor (curation.backends.aesthetic), mean over the sampled frames."""

    name = "Aesthetic"
    value_range = (0.0, 10.0)

    def __init__(self, spec: dict, models_dir: str, device: str):
        import curation.backends.aesthetic  # noqa: F401  (registers the aesthetic backends)

        name, kw = _named(spec, "evaluation.aesthetic")
        kw = {"models_dir": models_dir, "device": device, **kw}
        self.scorer = build_backend("aesthetic", name, **kw).load()
        self.model = f"{name} on open_clip {kw.get('clip_arch', '')}".strip()

    def __call__(self, batch: Batch) -> list[dict]:
        flat = self.scorer.score(np.concatenate([c.frames for c in batch.cases]))
        parts = np.split(flat, np.cumsum([len(c.frames) for c in batch.cases])[:-1])
        return [{"value": float(np.mean(p))} for p in parts]


def _resize(img: np.ndarray, w: int, h: int) -> np.ndarray:
    import cv2

    interp = cv2.INTER_AREA if w * h < img.shape[0] * img.shape[1] else cv2.INTER_LINEAR
    return cv2.resize(img, (max(1, w), max(1, h)), interpolation=interp)


def copy_closeness(
    ref: np.ndarray, frame: np.ndarray, cfg: CopyPasteConfig, box: Sequence[float] | None = None
) -> float | None:
    """How close ``frame`` comes to containing a pixel copy of ``ref``: the best normalised
    cross-correlation (cv2.TM_CCOEFF_NORMED on lightly blurred RGB) of the reference at any position and at
    the best of several sizes: ``n_scales`` from the largest that fits down to ``min_scale`` of it, the
    reference's own pixel size, the size of ``box`` when the subject's box is known, then a local search
    around the best. 1.0 is an exact copy; None when no template is large and textured enough."""
    import cv2

    s = min(1.0, cfg.short_side_px / min(frame.shape[:2]))  # frame pixels -> working pixels
    fr = _resize(frame, round(frame.shape[1] * s), round(frame.shape[0] * s)) if s < 1 else frame
    fr = cv2.GaussianBlur(fr.astype(np.float32), (0, 0), 0.8)
    fh, fw = fr.shape[:2]
    rh, rw = ref.shape[:2]
    fit = min(fh / rh, fw / rw)
    scales = list(fit * np.geomspace(1.0, cfg.min_scale, cfg.n_scales)) if cfg.n_scales > 1 else [fit]
    scales.append(s)  # the reference at the frame's own pixel scale (a crop of a frame of this video)
    if box is not None:
        bw, bh = (box[2] - box[0]) * s, (box[3] - box[1]) * s
        scales.append(float(np.sqrt(max(bw, 1.0) * max(bh, 1.0) / (rw * rh))))
    tried: dict[tuple[int, int], float] = {}

    def match(k: float) -> float | None:
        tw, th = round(rw * k), round(rh * k)
        if min(tw, th) < cfg.min_template_px or tw > fw or th > fh:
            return None
        if (tw, th) not in tried:
            t = cv2.GaussianBlur(_resize(ref, tw, th).astype(np.float32), (0, 0), 0.8)
            if t.reshape(-1, 3).std(0).max() < 2.0:
                tried[(tw, th)] = -1.0  # a flat template correlates with anything: no evidence
            else:
                r = cv2.matchTemplate(fr, t, cv2.TM_CCOEFF_NORMED)
                tried[(tw, th)] = float(np.nanmax(np.nan_to_num(r, nan=-1.0, posinf=-1.0, neginf=-1.0)))
        return tried[(tw, th)]

    best_k, best = None, None
    for k in scales:
        v = match(k)
        if v is not None and (best is None or v > best):
            best_k, best = k, v
    if best_k is None or best <= -1.0:
        return None
    for factors in ((0.92, 0.96, 1.04, 1.08), (0.98, 0.99, 1.01, 1.02)):  # refine around the best size
        centre = best_k
        for f in factors:
            v = match(centre * f)
            if v is not None and v > best:
                best_k, best = centre * f, v
    return float(np.clip(best, -1.0, 1.0))


class CopyPaste:
    """The failure Phantom trains against: per reference the closest frame (``copy_closeness``), per case
    the closest reference; ``flag`` when it reaches the threshold."""

    name = "CopyPaste"
    value_range = (-1.0, 1.0)

    def __init__(self, cfg: CopyPasteConfig):
        self.cfg = cfg
        self.model = f"pixel NCC (OpenCV matchTemplate, {cfg.short_side_px} px, {cfg.n_scales} scales)"

    def __call__(self, batch: Batch) -> list[dict]:
        out = []
        for c, per_ref in zip(batch.cases, batch.regions):
            per = []
            for ri, ref in enumerate(c.refs):
                boxes = {g.frame: g.box for g in per_ref[ri]} if ri < len(per_ref) else {}
                vals = [copy_closeness(ref, f, self.cfg, boxes.get(t)) for t, f in enumerate(c.frames)]
                vals = [v for v in vals if v is not None]
                per.append(max(vals) if vals else None)
            got = [v for v in per if v is not None]
            if not got:
                out.append(_none("reference_too_small_or_flat"))
                continue
            v = max(got)
            out.append(
                {
                    "value": v,
                    "flag": v >= self.cfg.threshold,
                    "per_ref": [None if x is None else round(x, 4) for x in per],
                }
            )
        return out


# ---------------------------------------------------------------------------------------------------------
# OpenS2V-Eval's metrics, computed as its eval/ scripts compute them (get_facesim.py, get_gmescore.py,
# get_nexusscore.py, get_naturalscore.py). Raw per-case values here; the benchmark's clamping,
# normalisation and weighted total are training/opens2v.py's.

GME_TEXT_INSTRUCTION = "Find an image that matches the given text."  # the benchmark's query instruction
GME_IMAGE_INSTRUCTION = "You are a helpful assistant."  # GME's default for corpus (image) inputs

# The benchmark's NaturalScore prompt (get_naturalscore.py), verbatim: 16 frames, a 1-5 realism score.
NATURAL_PROMPT = """
Your task is to determine how realistic the given video clip appears, based on 16 extracted frames. Consider the following aspects in your evaluation:

- **Common sense consistency**: Are the objects, people, and interactions logically coherent in the context of the video?
- **Physical plausibility**: Do lighting, shadows, motion, and reflections obey the laws of physics? Are the objects in motion consistent with real-world physics?
- **Naturalness**: Does the visual quality (textures, details, proportions, etc.) resemble what we would expect in real life? Is there any unnatural visual distortion?
- **AI generation artifacts**: Are there signs of unnatural blurring, morphing, glitches, distortions, or inconsistencies across frames? 

**If the video contains humans**, pay special attention to:
- Are the facial features realistic and anatomically correct (e.g., eyes, mouth, and nose proportions)?
- Do the body parts appear proportionate and natural in motion (e.g., arm and leg movements, hand gestures)?

If **no humans** are present in the video, you can focus on evaluating the realism of other visual aspects like object consistency, motion fluidity, and environmental plausibility without needing to specifically assess human-related elements.

Output a score from 1 to 5 based on the criteria below, followed by an explanation of the reasoning behind your score:

- **1 — Definitely AI-Generated**: Clear and frequent artifacts (e.g., blurry faces or objects, unnatural movements, inconsistent lighting), distorted shapes, implausible physics (e.g., impossible movements, lighting issues), and severe inconsistencies. Violates common sense or real-world logic. Faces and bodies may be unrealistic or distorted if humans are present.
- **2 — Likely AI-Generated**: Noticeable AI generation cues such as inconsistent anatomy, fluctuating object textures, or mild physical implausibility (e.g., unnatural hand positions or eye movements). Faces and bodies may appear unnatural or inconsistent if humans are present. Still clearly synthetic upon inspection.
- **3 — Uncertain / Borderline**: Mixed indicators — the video may appear mostly natural but contains subtle flaws or small anomalies that raise suspicion. Faces and bodies might show mild inconsistencies (e.g., slight distortion in facial features or body parts) if humans are present. Hard to determine definitively.
- **4 — Likely Real**: Mostly natural and physically plausible, with only minor and rare irregularities that might be explainable (e.g., slight compression, mild lighting inconsistencies). Faces and body parts are mostly natural, with only minor imperfections, if humans are present.
- **5 — Definitely Real**: Fully consistent with real-world physics, common sense, and appearance. No visible artifacts or signs of AI generation. Faces and body parts appear fully realistic, without any visible distortions or unnatural movements, if humans are present.

Please only return the score (1-5), no additional explanation.
"""  # noqa: E501, W291


class GmeEmbedder:
    """GME (gme-Qwen2-VL-*-Instruct): a Qwen2-VL whose last token's last hidden state (left padding), unit
    length, embeds a text or an image in one space. Inputs are formatted as GME's own inference code does:
    ``<|im_start|>system\\n{instruction}<|im_end|>\\n<|im_start|>user\\n{input}<|im_end|>\\n<|im_start|>
    assistant\\n<|endoftext|>``, an image's input being ``<|vision_start|><|image_pad|><|vision_end|>``."""

    def __init__(
        self,
        model_path: str,
        sha256: str = "",
        models_dir: str = "models",
        device: str = "auto",
        batch_size: int = 8,
        min_pixels: int = 256 * 28 * 28,  # GME's min_image_tokens=256
        max_pixels: int = 1280 * 28 * 28,  # GME's max_image_tokens=1280
    ):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from curation.models import ModelNotFound, locate_model_path, resolve_model_path

        key = "evaluation.gme.model_path"
        if not locate_model_path(model_path, models_dir, "GME model folder", key).is_dir():
            raise ModelNotFound(f"{key}: {model_path} must be a transformers Qwen2-VL model folder")
        path = resolve_model_path(model_path, models_dir, "GME model folder", key, sha256 or None)
        self.device = "cuda" if device == "auto" and torch.cuda.is_available() else device
        self.device = "cpu" if self.device == "auto" else self.device
        net = AutoModelForImageTextToText.from_pretrained(str(path), local_files_only=True)
        # Qwen2VLForConditionalGeneration wraps the Qwen2VLModel GME pools from; a bare Qwen2VLModel is it.
        self.net = getattr(net, "model", net).eval().to(self.device)
        self.processor = AutoProcessor.from_pretrained(
            str(path), local_files_only=True, size={"shortest_edge": min_pixels, "longest_edge": max_pixels}
        )
        self.processor.tokenizer.padding_side = "left"
        self.batch_size = max(1, int(batch_size))
        self.describe = f"GME {Path(path).name} (Qwen2-VL, last-token embedding)"

    @staticmethod
    def _format(instruction: str, body: str) -> str:
        return (
            f"<|im_start|>system\n{instruction}<|im_end|>\n<|im_start|>user\n{body}<|im_end|>\n"
            "<|im_start|>assistant\n<|endoftext|>"
        )

    def _run(self, texts: list[str], images: list | None) -> np.ndarray:
        import torch

        rows = []
        for i in range(0, len(texts), self.batch_size):
            kw = {"text": texts[i : i + self.batch_size], "padding": True, "return_tensors": "pt"}
            if images is not None:
                kw["images"] = images[i : i + self.batch_size]
            inputs = self.processor(**kw).to(self.device)
            with torch.no_grad():
                out = self.net(**inputs)
            h = out.last_hidden_state[:, -1].float()  # (B, D): left padding puts every last token at -1
            rows.append(torch.nn.functional.normalize(h, dim=-1).cpu().numpy())
        return np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)

    def embed_texts(self, texts: list[str], instruction: str = GME_TEXT_INSTRUCTION) -> np.ndarray:
        return self._run([self._format(instruction, t) for t in texts], None)

    def embed_images(self, images: list[np.ndarray]) -> np.ndarray:
        from PIL import Image

        body = "<|vision_start|><|image_pad|><|vision_end|>"
        pil = [Image.fromarray(np.ascontiguousarray(im)) for im in images]
        return self._run([self._format(GME_IMAGE_INSTRUCTION, body)] * len(pil), pil)


class GmeScore:
    """OpenS2V-Eval's text relevance: the prompt (GME query with the retrieval instruction) against every
    sampled frame (GME corpus image), dot product of unit embeddings, mean over frames."""

    name = "GmeScore"
    value_range = (-1.0, 1.0)

    def __init__(self, gme: GmeEmbedder):
        self.gme, self.model = gme, gme.describe

    def __call__(self, batch: Batch) -> list[dict]:
        cases = [c for c in batch.cases if c.prompt]
        q = self.gme.embed_texts([c.prompt for c in cases]) if cases else None
        frames = self.gme.embed_images([f for c in cases for f in c.frames]) if cases else None
        out, k, j = [], 0, 0
        for c in batch.cases:
            if not c.prompt:
                out.append(_none("no_prompt"))
                continue
            e = frames[k : k + len(c.frames)]
            out.append({"value": float((e @ q[j]).mean()), "frames": len(c.frames)})
            k, j = k + len(c.frames), j + 1
        return out


class NexusScore:
    """OpenS2V-Eval's subject consistency, detect-then-compare: in every sampled frame the grounder looks
    for each reference's subject (by its name); each detected crop is embedded by GME and kept when the
    detection's confidence > ``det_conf`` and the crop's GME similarity to the subject's name >
    ``text_conf``; the value is the mean GME similarity of the kept crops to their reference, divided by
    the number of frames with at least one detection (as get_nexusscore.py computes it; 0 when nothing is
    kept). Subjects marked ``nexus: false`` (the benchmark skips the face references of face cases) are
    not searched for. A detection without a confidence is counted as confident and reported
    (``unscored``)."""

    name = "NexusScore"
    value_range = (0.0, 1.0)

    def __init__(self, grounder, grounder_name: str, gme: GmeEmbedder, cfg: NexusConfig):
        self.grounder, self.gme, self.cfg = grounder, gme, cfg
        self.model = f"{grounder_name} grounder + {gme.describe}"

    def __call__(self, batch: Batch) -> list[dict]:
        out = []
        for c in batch.cases:
            subs = [dict(s) for s in c.subjects[: len(c.refs)]]
            use = [i for i, s in enumerate(subs) if s.get("name") and s.get("nexus", True) is not False]
            if not use:
                out.append(_none("no_subject_to_detect"))
                continue
            dets = self.grounder.ground(list(c.frames), [[subs[i] for i in use]] * len(c.frames))
            crops, ref_of, confs, frames_with, unscored = [], [], [], 0, 0
            for t, per_frame in enumerate(dets):
                found = False
                for d in per_frame:
                    si = d.get("subject")
                    if "box" not in d or not isinstance(si, int) or not 0 <= si < len(use):
                        continue
                    if not _valid_box(d["box"], c.frames[t].shape[:2]):
                        continue
                    found = True
                    crops.append(crop(c.frames[t], d["box"]))
                    ref_of.append(use[si])
                    if d.get("score") is None:
                        unscored += 1
                    confs.append(1.0 if d.get("score") is None else float(d["score"]))
                frames_with += int(found)
            extra = {"detections": len(crops), "frames_with_subject": frames_with, "frames": len(c.frames)}
            if unscored:
                extra["unscored"] = unscored
            if not crops:
                out.append({"value": 0.0, "kept": 0, **extra})
                continue
            e_crop = self.gme.embed_images(crops)
            e_ref = self.gme.embed_images([c.refs[i] for i in use])
            e_txt = self.gme.embed_texts([subs[i]["name"] for i in use])
            row = {i: k for k, i in enumerate(use)}
            img = np.array([float(e_crop[n] @ e_ref[row[i]]) for n, i in enumerate(ref_of)])
            txt = np.array([float(e_crop[n] @ e_txt[row[i]]) for n, i in enumerate(ref_of)])
            keep = (np.array(confs) > self.cfg.det_conf) & (txt > self.cfg.text_conf) & (img != 0)
            value = float(img[keep].mean()) / frames_with if keep.any() else 0.0
            out.append({"value": value, "kept": int(keep.sum()), **extra})
        return out


class FaceSimCur:
    """OpenS2V-Eval's FaceSim-Cur: the first human reference's face (the largest found; searched again on
    a grey-padded copy, 1.25x, when none is) embedded by CurricularFace, against the largest face of every
    sampled frame; cosine clamped at 0, frames with no face or a zero score left out, mean over the rest
    (0.0 when none is left). CurricularFace runs through the ArcFace ONNX loader (an insightface-style
    recogniser: 112x112 RGB, (px - 127.5) / 127.5, the same normalisation as the benchmark's)."""

    name = "FaceSim-Cur"
    value_range = (0.0, 1.0)

    def __init__(self, spec: dict, models_dir: str, categories: Sequence[str], min_det_score: float):
        from curation.backends import faces  # noqa: F401  (registers the face backends)

        spec = dict(spec)
        det_name, det_kw = _named(spec.pop("detector", "yunet"), "evaluation.facesim_cur.detector")
        emb_name, emb_kw = _named(spec.pop("embedder", None), "evaluation.facesim_cur.embedder")
        if spec:
            raise ConfigError(
                f"evaluation.facesim_cur: unknown keys {sorted(spec)}; allowed: detector, embedder"
            )
        self.detector = build_backend("face_detector", det_name, models_dir=models_dir, **det_kw)
        self.embedder = build_backend("face_embedder", emb_name, models_dir=models_dir, **emb_kw)
        self.categories, self.min_det_score = list(categories), min_det_score
        f = Path(getattr(getattr(self.embedder, "model", None), "model_file", "") or "").name
        self.model = f"CurricularFace via {emb_name} loader" + (f" ({f})" if f else "") + f" + {det_name}"

    def _largest(self, image: np.ndarray):
        found = [f for f in self.detector.detect(image) if f.score >= self.min_det_score]
        return max(found, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1])) if found else None

    def ref_face(self, ref: np.ndarray) -> np.ndarray | None:
        face, img = self._largest(ref), ref
        if face is None:  # the benchmark's pad_np_bgr_image(scale=1.25): a grey border, 0.25x per side
            p0, p1 = int(ref.shape[0] * 0.25), int(ref.shape[1] * 0.25)
            img = np.pad(ref, ((p0, p0), (p1, p1), (0, 0)), constant_values=128)
            face = self._largest(img)
        return None if face is None else self.embedder.embed(img, [face])[0]

    def __call__(self, batch: Batch) -> list[dict]:
        out = []
        for c in batch.cases:
            cats = [
                (c.subjects[i] if i < len(c.subjects) else {}).get("category") for i in range(len(c.refs))
            ]
            human = [i for i, cat in enumerate(cats) if cat in self.categories]
            if not human:
                out.append(_none("no_human_reference"))
                continue
            ref = self.ref_face(c.refs[human[0]])
            if ref is None:
                out.append(_none("no_reference_face"))
                continue
            scores, with_face = [], 0
            for f in c.frames:
                face = self._largest(f)
                if face is None:
                    continue
                with_face += 1
                s = max(0.0, float(self.embedder.embed(f, [face])[0] @ ref))
                if s != 0.0:
                    scores.append(s)
            value = float(np.mean(scores)) if scores else 0.0
            out.append({"value": value, "face_frames": with_face, "frames": len(c.frames)})
        return out


def parse_natural_reply(reply: str) -> float | None:
    """The judge's 1-5 score from its reply ("4", "4.0"); None for anything else."""
    import re

    m = re.fullmatch(r"\s*\**\s*([1-5](?:\.\d+)?)\s*\**\s*\.?\s*", reply or "")
    return float(m.group(1)) if m else None


class NaturalScore:
    """OpenS2V-Eval's NaturalScore: a VLM judge (through curation.backends.openai_endpoint) sees 16 frames
    sampled evenly, long side resized to 512 px, then the benchmark's prompt, and answers 1-5; asked
    ``repeats`` times (the benchmark averages three judgements), the value is the mean of the answers.
    A reply that is not a score in 1-5, or a request that fails, is a failure for that case (no value,
    the reply in ``reason``)."""

    name = "NaturalScore"
    value_range = (1.0, 5.0)

    def __init__(self, spec: dict):
        from curation.backends.openai_endpoint import OpenAIEndpoint

        spec = dict(spec)
        self.repeats = int(spec.pop("repeats", 3))
        self.n_frames = int(spec.pop("n_frames", 16))
        self.long_side_px = int(spec.pop("long_side_px", 512))
        self.endpoint = OpenAIEndpoint(**spec)
        self.model = f"VLM judge {self.endpoint.name} (OpenS2V-Eval prompt, 1-5, x{self.repeats})"

    def _frames(self, frames: np.ndarray) -> list[np.ndarray]:
        import cv2

        out = []
        for i in sample_indices(len(frames), self.n_frames):
            h, w = frames[i].shape[:2]
            k = self.long_side_px / max(h, w)
            size = (max(1, int(w * k)), max(1, int(h * k)))
            out.append(cv2.resize(frames[i], size, interpolation=cv2.INTER_AREA))
        return out

    def __call__(self, batch: Batch) -> list[dict]:
        from curation.backends.openai_endpoint import image_conversation

        convs = [image_conversation(self._frames(c.frames), NATURAL_PROMPT) for c in batch.cases]
        out = []
        for conv in convs:
            try:
                replies = self.endpoint.chat_many([conv] * self.repeats, max_tokens=16)
            except Exception as e:  # the judge could not be asked: this case's failure
                out.append(_none(f"judge_failed: {type(e).__name__}: {str(e)[:120]}"))
                continue
            scores = [parse_natural_reply(r) for r in replies]
            bad = [r for r, s in zip(replies, scores) if s is None]
            if bad:
                out.append(_none(f"malformed_reply: {bad[0][:80]!r}", replies=[r[:80] for r in replies]))
            else:
                out.append({"value": float(np.mean(scores)), "judgements": scores})
        return out


# ---------------------------------------------------------------------------------------------------------
# the suite

KINDS = ("identity", "subject", "text", "video", "copy")


class MetricSuite:
    """The configured metrics, every model loaded once (``load``), scored over batches of cases.

    ``kinds`` limits what is built: the data-quality report needs identity, subject and copy only."""

    def __init__(self, cfg: MetricsConfig, kinds: Sequence[str] = KINDS):
        bad = sorted(set(kinds) - set(KINDS))
        if bad:
            raise ValueError(f"unknown metric kinds {bad}; allowed: {list(KINDS)}")
        self.cfg, self.kinds = cfg, tuple(kinds)
        self.metrics: list[Metric] = []
        self.off: dict[str, str] = {}
        self.grounder = None
        self.grounder_name = "off"
        self._loaded = False

    def load(self) -> MetricSuite:
        if self._loaded:
            return self
        cfg, md, want = self.cfg, self.cfg.models_dir, set(self.kinds)
        add, off = self.metrics.append, self.off
        if "identity" in want:
            if _is_off(cfg.face.embedder) or _is_off(cfg.face.detector):
                off["FaceSim"] = "no face detector/embedder configured (evaluation.face)"
            else:
                add(FaceSim(cfg.face, md))
        if "identity" in want:
            if _is_off(cfg.facesim_cur) or _is_off(cfg.facesim_cur.get("embedder")):
                off["FaceSim-Cur"] = "no CurricularFace model configured (evaluation.facesim_cur.embedder)"
            else:
                add(FaceSimCur(cfg.facesim_cur, md, cfg.face.categories, cfg.face.min_det_score))
        if "copy" in want:  # reported beside the identity score: the failure it trades against
            if cfg.copy_paste.enabled:
                add(CopyPaste(cfg.copy_paste))
            else:
                off["CopyPaste"] = "turned off (evaluation.copy_paste.enabled: false)"
        clip = dino = mobilenet = None
        if want & {"subject", "text", "video"}:
            # ClipConfig's and DinoConfig's fields are their backends' arguments
            if cfg.clip.model_path:  # both towers (CLIP-T), fp32 on any device
                clip = image_embedder(
                    "open_clip",
                    cfg,
                    **dataclasses.asdict(cfg.clip),
                    text=True,
                    precision="fp32",
                    config_key="evaluation.clip",
                )
            if "subject" in want and cfg.dino.model_path:
                dino = image_embedder(
                    "dinov2", cfg, **dataclasses.asdict(cfg.dino), config_key="evaluation.dino"
                )
            if cfg.mobilenet and ("subject" in want or ("video" in want and clip is None)):
                mobilenet = image_embedder("mobilenet_v2", cfg)
        if "subject" in want:
            if clip is not None:
                add(SubjectSim("CLIP-I", clip, clip.describe))
            else:
                off["CLIP-I"] = "no CLIP checkpoint configured (evaluation.clip.model_path)"
            if dino is not None:
                add(SubjectSim("DINO-I", dino, dino.describe))
            else:
                off["DINO-I"] = "no DINOv2 folder configured (evaluation.dino.model_path)"
            if mobilenet is not None:
                add(SubjectSim("MobileNetV2-I", mobilenet, mobilenet.describe))
            else:
                off["MobileNetV2-I"] = "turned off (evaluation.mobilenet: false)"
            if not _is_off(cfg.grounder):
                from curation.backends import human_grounder, qwen_vl  # noqa: F401  (register the grounders)

                name, kw = _named(cfg.grounder, "evaluation.grounder")
                self.grounder = build_backend("grounder", name, models_dir=md, **kw)
                self.grounder_name = name
        if "text" in want:
            if clip is not None:
                add(ClipT(clip))
            else:
                off["CLIP-T"] = "no CLIP checkpoint configured (evaluation.clip.model_path)"
        gme = None
        if want & {"subject", "text"} and not _is_off(cfg.gme):
            kw = {"models_dir": md, "device": cfg.device, "batch_size": cfg.batch_size, **cfg.gme}
            gme = GmeEmbedder(**kw)
        if "text" in want:
            if gme is not None:
                add(GmeScore(gme))
            else:
                off["GmeScore"] = "no GME model configured (evaluation.gme.model_path)"
        if "subject" in want:
            if gme is not None and self.grounder is not None:
                add(NexusScore(self.grounder, self.grounder_name, gme, cfg.nexus))
            else:
                missing = [
                    w
                    for w, x in (("evaluation.gme", gme), ("evaluation.grounder", self.grounder))
                    if x is None
                ]
                off["NexusScore"] = f"needs a GME model and a grounder; not configured: {', '.join(missing)}"
        if "video" in want:
            if cfg.motion.enabled:
                add(Motion(cfg.motion))
            else:
                off["Motion"] = "turned off (evaluation.motion.enabled: false)"
            emb = clip or mobilenet
            if emb is not None:
                label = "CLIP" if emb is clip else "MobileNetV2"
                model = clip.describe if emb is clip else "torchvision MobileNetV2 ImageNet"
                add(TemporalConsistency(f"TempCons-{label}", emb, model))
            else:
                off["TempCons"] = "no image embedder configured (evaluation.clip or evaluation.mobilenet)"
            if _is_off(cfg.aesthetic):
                off["Aesthetic"] = "no aesthetic predictor configured (evaluation.aesthetic)"
            else:
                add(Aesthetic(cfg.aesthetic, md, cfg.device))
            if _is_off(cfg.natural) or not cfg.natural.get("base_url"):
                off["NaturalScore"] = "no VLM judge configured (evaluation.natural.base_url)"
            else:
                add(NaturalScore(cfg.natural))
        self._loaded = True
        return self

    def describe(self) -> dict[str, dict]:
        """Every metric by name: {status: on, model} or {status: off, reason}."""
        self.load()
        out = {m.name: {"status": "on", "model": m.model, "range": list(m.value_range)} for m in self.metrics}
        out.update({n: {"status": "off", "reason": r} for n, r in self.off.items()})
        return out

    def regions(self, cases: list[Case]) -> list[list[list[Region]]]:
        """Where each reference's subject is in each frame: the data's boxes when the case has them, else a
        grounder's detections (all frames of the batch in one ``ground`` call), else whole frames."""
        out: list[list[list[Region]] | None] = [None] * len(cases)
        to_ground = []
        for ci, c in enumerate(cases):
            if c.boxes is not None:
                out[ci] = [
                    [
                        Region(t, b, "data_box")
                        for t, b in enumerate(per_frame or [])
                        if b is not None and t < len(c.frames) and _valid_box(b, c.frames[t].shape[:2])
                    ]
                    for per_frame in (list(c.boxes) + [[]] * len(c.refs))[: len(c.refs)]
                ]
            elif self.grounder is not None and c.subjects and all(s.get("name") for s in c.subjects):
                to_ground.append(ci)
            else:
                out[ci] = [[Region(t, None, "whole_frame") for t in range(len(c.frames))] for _ in c.refs]
        if to_ground:
            frames, subjects, owner = [], [], []
            for ci in to_ground:
                c = cases[ci]
                subs = [dict(s) for s in c.subjects[: len(c.refs)]]
                for t, f in enumerate(c.frames):
                    frames.append(f)
                    subjects.append(subs)
                    owner.append((ci, t))
            dets = self.grounder.ground(frames, subjects)
            for ci in to_ground:
                out[ci] = [[] for _ in cases[ci].refs]
            for (ci, t), per_frame in zip(owner, dets):
                for d in per_frame:
                    si = d.get("subject")
                    if (
                        "box" in d
                        and isinstance(si, int)
                        and 0 <= si < len(out[ci])
                        and _valid_box(d["box"], cases[ci].frames[t].shape[:2])
                    ):
                        if all(g.frame != t for g in out[ci][si]):  # one region per subject and frame
                            out[ci][si].append(Region(t, [float(v) for v in d["box"]], "grounded"))
        return out

    def score(self, cases: list[Case]) -> list[dict]:
        """Per case {"key", "metrics": {name: score}}; a metric that raises on a batch is retried case by
        case, and a case it still fails on gets ``{"value": None, "reason": "error: ..."}``."""
        self.load()
        if not cases:
            return []
        batch = Batch(cases, self.regions(cases))
        results = [{"key": c.key, "metrics": {}} for c in cases]
        for m in self.metrics:
            try:
                scores = m(batch)
            except Exception:
                scores = []
                for ci in range(len(cases)):
                    one = Batch([cases[ci]], [batch.regions[ci]])
                    try:
                        scores.extend(m(one))
                    except Exception as e:  # one bad case costs its score, not the run
                        scores.append(_none(f"error: {type(e).__name__}: {str(e)[:120]}"))
            for r, s in zip(results, scores):
                if s.get("value") is not None:
                    s["value"] = round(float(s["value"]), 5)
                r["metrics"][m.name] = s
        return results


# ---------------------------------------------------------------------------------------------------------
# streaming summaries (nothing holds all values: fixed-bin histograms and running sums)


class Summary:
    """Per metric: count, mean, std, min, max, a fixed-bin histogram over the metric's range (values
    outside are clamped into the end bins), an approximate median from it, missing cases by reason, and
    the flagged count for metrics that flag (CopyPaste)."""

    def __init__(self, ranges: dict[str, tuple[float, float]], bins: int = 200):
        self.ranges, self.bins = ranges, bins
        self.stats: dict[str, dict] = {}

    def _st(self, name: str) -> dict:
        if name not in self.stats:
            self.stats[name] = {
                "n": 0,
                "sum": 0.0,
                "sumsq": 0.0,
                "min": None,
                "max": None,
                "missing": {},
                "flagged": None,
                "counts": np.zeros(self.bins, np.int64),
            }
        return self.stats[name]

    def add(self, result: dict) -> None:
        for name, s in result.get("metrics", {}).items():
            st = self._st(name)
            v = s.get("value")
            if v is None:
                reason = str(s.get("reason", "none"))
                st["missing"][reason] = st["missing"].get(reason, 0) + 1
                continue
            v = float(v)
            st["n"] += 1
            st["sum"] += v
            st["sumsq"] += v * v
            st["min"] = v if st["min"] is None else min(st["min"], v)
            st["max"] = v if st["max"] is None else max(st["max"], v)
            if "flag" in s:
                st["flagged"] = (st["flagged"] or 0) + int(bool(s["flag"]))
            lo, hi = self.ranges.get(name, (-1.0, 1.0))
            k = int(np.clip((v - lo) / (hi - lo) * self.bins, 0, self.bins - 1))
            st["counts"][k] += 1

    def edges(self, name: str) -> np.ndarray:
        lo, hi = self.ranges.get(name, (-1.0, 1.0))
        return np.linspace(lo, hi, self.bins + 1)

    def result(self, hist: bool = True) -> dict[str, dict]:
        out = {}
        for name, st in self.stats.items():
            n = st["n"]
            mean = st["sum"] / n if n else None
            std = float(np.sqrt(max(0.0, st["sumsq"] / n - mean * mean))) if n else None
            edges = self.edges(name)
            median = None
            if n:
                cum = np.cumsum(st["counts"])
                k = int(np.searchsorted(cum, n / 2))
                before = cum[k - 1] if k else 0
                frac = (n / 2 - before) / max(1, st["counts"][k])
                median = float(edges[k] + frac * (edges[k + 1] - edges[k]))
            r = {
                "n": n,
                "mean": None if mean is None else round(mean, 5),
                "std": None if std is None else round(std, 5),
                "min": st["min"],
                "max": st["max"],
                "median_approx": None if median is None else round(median, 4),
                "missing": dict(sorted(st["missing"].items())),
            }
            if hist:
                r["hist"] = {"lo": float(edges[0]), "hi": float(edges[-1]), "counts": st["counts"].tolist()}
            if st["flagged"] is not None:
                r["flagged"] = st["flagged"]
            out[name] = r
        return out


def suite_ranges(suite: MetricSuite) -> dict[str, tuple[float, float]]:
    return {m.name: tuple(m.value_range) for m in suite.metrics}
