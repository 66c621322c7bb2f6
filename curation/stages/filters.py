"""The clip filters `quality`, `aesthetic` and `motion`, scoring the scenes stage's cached analysis frames."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from curation.config import ConfigError, field
from curation.motion import motion_stats, resize_short
from curation.stage import Record, Stage, build_backend, register_stage, reject
from curation.video_io import read_clip_frames, read_frames_at


def clip_frames(row: Record, n: int = 8, short_side: int = 144) -> tuple[np.ndarray, np.ndarray, int]:
    """(frames (N, h, w, 3), next_frames (N, h, w, 3), pair gap) of a clip: the scenes stage's cache when
    the filter runs in its group, else a decord read of ``n`` spread frames (a filter run on its own)."""
    if row.get("_frames") is not None:
        return row["_frames"], row["_next_frames"], int(row.get("_pair_gap_frames", 1))
    idx, frames, nxt = read_clip_frames(
        row["video_path"], row["start_frame"], row["end_frame"], n, short_side
    )
    row["_frames"], row["_next_frames"], row["_frame_indices"], row["_pair_gap_frames"] = frames, nxt, idx, 1
    return frames, nxt, 1


# ---------------------------------------------------------------------------------------------------------
# quality


def frame_quality(rgb: np.ndarray, sharpness_short_side: int) -> tuple[float, float, float]:
    """(mean luma 0-255, luma std, sharpness) of one frame. Sharpness is the variance of the Laplacian of
    the grey frame resized to a fixed short side, so it does not depend on the source resolution."""
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    small = resize_short(gray, sharpness_short_side)
    return float(gray.mean()), float(gray.std()), float(cv2.Laplacian(small, cv2.CV_64F).var())


@register_stage("quality")
class Quality(Stage):
    """Resolution, exposure, blank frames and sharpness (optionally BRISQUE). ``quality_score`` is the
    median sharpness over the clip's non-blank frames."""

    @dataclasses.dataclass
    class Params:
        min_short_side_px: int = field(240, ge=0)  # of the source video
        min_luma: float = field(25.0, ge=0, le=255)  # median frame mean luma below: too_dark
        max_luma: float = field(235.0, ge=0, le=255)  # above: too_bright
        blank_luma_std: float = field(6.0, ge=0)  # a frame whose luma std is below this is blank
        max_blank_frac: float = field(0.5, ge=0, le=1)
        min_sharpness: float = field(40.0, ge=0)  # variance of Laplacian at sharpness_short_side
        sharpness_short_side: int = field(144, ge=16)
        brisque: bool = False  # also score BRISQUE (slower; lower is better)
        max_brisque: float = field(60.0, ge=0)
        brisque_frames: int = field(3, ge=1)

        def validate(self, path: str = "") -> None:
            if self.min_luma >= self.max_luma:
                raise ConfigError(f"{path}.min_luma: {self.min_luma} must be < max_luma {self.max_luma}")

    def setup(self) -> None:
        self.brisque = None
        if self.params.brisque:
            from curation.backends.brisque_iqa import Brisque

            self.brisque = Brisque()

    def process(self, rows: list[Record]) -> list[Record]:
        return [self.score_row(r) for r in rows]

    def score_row(self, row: Record) -> Record:
        p = self.params
        frames, _, _ = clip_frames(row)
        if len(frames) == 0:
            return reject(row, "quality:no_frames", quality_score=None, quality_pass=False)
        stats = np.array([frame_quality(f, p.sharpness_short_side) for f in frames])  # (N, 3)
        luma, std, sharp = stats[:, 0], stats[:, 1], stats[:, 2]
        blank = std < p.blank_luma_std
        sharpness = float(np.median(sharp[~blank])) if (~blank).any() else 0.0
        cols = {
            "quality_score": round(sharpness, 3),
            "quality_luma": round(float(np.median(luma)), 2),
            "quality_blank_frac": round(float(blank.mean()), 3),
            "quality_brisque": None,
        }
        if self.brisque is not None:
            pick = np.linspace(0, len(frames) - 1, min(p.brisque_frames, len(frames))).round().astype(int)
            cols["quality_brisque"] = round(
                float(np.median([self.brisque.score(frames[i]) for i in pick])), 3
            )
        short = min(int(row.get("width") or 0), int(row.get("height") or 0))
        reason = None
        if short < p.min_short_side_px:
            reason = "quality:low_resolution"
        elif cols["quality_luma"] < p.min_luma:
            reason = "quality:too_dark"
        elif cols["quality_luma"] > p.max_luma:
            reason = "quality:too_bright"
        elif cols["quality_blank_frac"] > p.max_blank_frac:
            reason = "quality:blank"
        elif sharpness < p.min_sharpness:
            reason = "quality:blurry"
        elif cols["quality_brisque"] is not None and cols["quality_brisque"] > p.max_brisque:
            reason = "quality:brisque"
        if reason:
            return reject(row, reason, **cols, quality_pass=False)
        return {**row, **cols, "quality_pass": True}


# ---------------------------------------------------------------------------------------------------------
# aesthetic


@register_stage("aesthetic")
class Aesthetic(Stage):
    """LAION-style aesthetic score (mean over a few frames, decoded at the source's full resolution, all
    rows of a batch in one scorer call). With no backend weights configured the stage is OFF: every row
    gets ``aesthetic_score: None, aesthetic_pass: True, aesthetic_off: True``."""

    @dataclasses.dataclass
    class Params:
        min_score: float = field(4.5, ge=0, le=10)
        n_frames: int = field(3, ge=1, le=32)

    def __init__(self, params=None, backend=None, ctx=None):
        super().__init__(params, backend, ctx)
        cfg = dict(self.backend_cfg)
        name = cfg.pop("name", "off")
        # "configured" means weights named; a name alone (or name: off) keeps the filter off, visibly.
        self.off = name in ("off", "none") or not (cfg.get("clip_path") and cfg.get("mlp_path"))
        self.backend_name, self.backend_kwargs = name, cfg
        self.uses_model = not self.off
        self.scorer = None

    def setup(self) -> None:
        if not self.off:
            import curation.backends.aesthetic  # noqa: F401  (registers the aesthetic backends)

            kw = {"models_dir": self.ctx.models_dir, **self.backend_kwargs}
            self.scorer = build_backend("aesthetic", self.backend_name, **kw).load()

    def process(self, rows: list[Record]) -> list[Record]:
        if self.off:
            return [
                {**r, "aesthetic_score": None, "aesthetic_pass": True, "aesthetic_off": True} for r in rows
            ]
        out, todo, frames = [], [], []
        for i, row in enumerate(rows):
            full = self.full_res_frames(row)
            if len(full) == 0:
                out.append(
                    reject(
                        row,
                        "aesthetic:no_frames",
                        aesthetic_score=None,
                        aesthetic_pass=False,
                        aesthetic_off=False,
                    )
                )
                continue
            out.append(None)
            todo.append((i, len(full), [int(full[0].shape[1]), int(full[0].shape[0])]))
            frames.extend(full)
        scores = self.scorer.score(frames) if frames else []  # one batched call over the stage's rows
        k = 0
        for i, n, size in todo:
            row, score = rows[i], round(float(np.mean(scores[k : k + n])), 4)
            k += n
            cols = {"aesthetic_score": score, "aesthetic_off": False, "aesthetic_frame_px": size}
            if score < self.params.min_score:
                out[i] = reject(row, "aesthetic:low_score", **cols, aesthetic_pass=False)
            else:
                out[i] = {**row, **cols, "aesthetic_pass": True}
        return out

    def full_res_frames(self, row: Record) -> list[np.ndarray]:
        """``n_frames`` of the clip's analysis sample points, decoded again at the source's full resolution
        (the predictor judges composition and detail: a 144p analysis frame upscaled is not the video)."""
        frames, _, _ = clip_frames(row)
        if len(frames) == 0:
            return []
        idx = list(row.get("_frame_indices") or [])
        pick = np.linspace(0, len(frames) - 1, min(self.params.n_frames, len(frames))).round().astype(int)
        if len(idx) != len(frames) or not row.get("video_path"):
            return list(frames[pick])  # no source to go back to: the cached frames are all there is
        rotation = int(row.get("rotation") or 0)
        return list(read_frames_at(row["video_path"], [idx[j] for j in pick], rotation=rotation))


def aesthetic_summary(rows: list[Record]) -> dict:
    """For the run summary: how many rows the aesthetic filter scored, and whether it was off."""
    seen = [r for r in rows if "aesthetic_pass" in r]
    off = sum(1 for r in seen if r.get("aesthetic_off"))
    return {
        "aesthetic_rows": len(seen),
        "aesthetic_off_rows": off,
        "aesthetic_off": bool(seen) and off == len(seen),
    }


# ---------------------------------------------------------------------------------------------------------
# motion


@register_stage("motion")
class Motion(Stage):
    """Optical flow on sampled frame pairs at low resolution: static clips (flow below ``min_motion``),
    too fast ones (above ``max_motion``) and shaking cameras (``max_shake``) are rejected.
    ``motion_score`` is the mean flow magnitude in frame short-sides per second."""

    @dataclasses.dataclass
    class Params:
        method: str = field("farneback", choices=["farneback", "dis"])
        flow_short_side: int = field(96, ge=16, le=720)
        max_pairs: int = field(12, ge=1)
        min_motion: float = field(0.015, ge=0)
        max_motion: float = field(1.0, gt=0)
        max_shake: float = field(0.5, gt=0)

    def process(self, rows: list[Record]) -> list[Record]:
        return [self.score_row(r) for r in rows]

    def score_row(self, row: Record) -> Record:
        p = self.params
        frames, nxt, gap = clip_frames(row)
        if len(frames) == 0:
            return reject(row, "motion:no_frames", motion_score=None, motion_pass=False)
        pick = np.linspace(0, len(frames) - 1, min(p.max_pairs, len(frames))).round().astype(int)
        st = motion_stats(
            frames[pick], nxt[pick], float(row.get("fps") or 25.0), gap, p.flow_short_side, p.method
        )
        cols = {
            "motion_score": round(st["mean"], 4),
            "motion_global": round(st["global"], 4),
            "motion_residual": round(st["residual"], 4),
            "motion_shake": round(st["shake"], 4),
        }
        reason = None
        if st["mean"] < p.min_motion:
            reason = "motion:static"
        elif st["shake"] > p.max_shake:
            reason = "motion:shaky"
        elif st["mean"] > p.max_motion:
            reason = "motion:too_fast"
        if reason:
            return reject(row, reason, **cols, motion_pass=False)
        return {**row, **cols, "motion_pass": True}
