"""Stage ``caption``: a VLM (or the source) describes the clip's subjects, their behaviour and the scene."""

from __future__ import annotations

import dataclasses
import os
from typing import Protocol

from curation.backends.openai_endpoint import OpenAIEndpoint, image_conversation
from curation.config import field
from curation.stage import Record, Stage, build_backend, register_backend, register_stage, reject

CAPTION_PROMPT = (
    "Describe this video clip in one paragraph for a video dataset. For every main subject (person, animal, "
    "object), describe its appearance (clothing, colours, hair, shape, material) and its behaviour and "
    "movements. When several subjects look alike, tell them apart by distinctive attributes (for example "
    '"the man in the blue jacket" and "the man in the grey coat"). Then describe the scene and setting. '
    "Only describe what is visible."
)


@dataclasses.dataclass
class CaptionInput:
    """What a captioner needs about one clip: the file (and span within it) and any source caption."""

    path: str
    start_s: float | None = None  # None: the whole file (an extracted clip)
    end_s: float | None = None
    source_caption: str | None = None


class Captioner(Protocol):
    """Capability ``captioner``: one caption (or None) per clip; ``origin`` names the caption's source."""

    origin: str

    def caption(self, clips: list[CaptionInput], prompt: str) -> list[str | None]: ...


@register_backend("captioner", "source_caption")
class SourceCaptioner:
    """Offline default: the caption that came with the source span (Panda-70M ships one per span)."""

    origin = "source_caption"

    def __init__(self, models_dir: str = "models"):
        del models_dir

    def caption(self, clips: list[CaptionInput], prompt: str) -> list[str | None]:
        return [c.source_caption for c in clips]


@register_backend("captioner", "openai_compatible")
class OpenAICaptioner:
    """The same prompt to an OpenAI-compatible VLM server (e.g. vLLM serving Qwen2.5-VL), the clip sent as
    ``n_frames`` evenly spaced JPEG frames (servers differ in video support; images work everywhere);
    ``endpoint``: the OpenAIEndpoint settings (base_url, model, api_key_env, timeout_s, retries...)."""

    origin = "openai_compatible"

    def __init__(
        self,
        n_frames: int = 8,
        frame_short_side_px: int = 448,
        max_new_tokens: int = 256,
        models_dir: str = "models",
        **endpoint,
    ):
        del models_dir
        self.client = OpenAIEndpoint(**endpoint)
        self.n_frames, self.short_side_px, self.max_new_tokens = n_frames, frame_short_side_px, max_new_tokens

    def _frames(self, clip: CaptionInput) -> list:
        import numpy as np

        from curation.frames import open_video

        vr = open_video(clip.path)
        fps = float(vr.get_avg_fps()) or 25.0
        first = int((clip.start_s or 0.0) * fps)
        last = min(len(vr), int(clip.end_s * fps)) if clip.end_s is not None else len(vr)
        idx = np.linspace(first, max(first, last - 1), self.n_frames).round().astype(int).tolist()
        frames = vr.get_batch(idx).asnumpy()  # (n_frames, H, W, 3) uint8 RGB
        h, w = frames.shape[1:3]
        scale = min(1.0, self.short_side_px / min(h, w))
        if scale < 1.0:
            import cv2

            frames = [
                cv2.resize(f, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
                for f in frames
            ]
        return list(frames)

    def caption(self, clips: list[CaptionInput], prompt: str) -> list[str | None]:
        convs = [image_conversation(self._frames(c), prompt) for c in clips]
        return self.client.chat_many(convs, self.max_new_tokens)


def caption_input(row: Record, out_dir: str) -> CaptionInput:
    """The extracted clip file when there is one, else the span of the source video."""
    src = row.get("source_caption")
    if row.get("clip_path"):
        p = row["clip_path"]
        return CaptionInput(p if os.path.isabs(p) else os.path.join(out_dir, p), source_caption=src)
    return CaptionInput(row["video_path"], row.get("start_s"), row.get("end_s"), source_caption=src)


@register_stage("caption")
class CaptionStage(Stage):
    """Adds ``caption`` and ``caption_origin``; rejects ``caption:missing`` (no caption) and
    ``caption:too_short`` (fewer than ``min_words`` words, e.g. a degenerate VLM reply)."""

    uses_model = True
    reads_clips = True

    @dataclasses.dataclass
    class Params:
        min_words: int = field(3, ge=0)
        max_chars: int = field(4000, ge=100)
        prompt: str = CAPTION_PROMPT

    def setup(self) -> None:
        from curation.backends import qwen_vl  # noqa: F401  (registers the qwen2_5_vl captioner)

        cfg = dict(self.backend_cfg)
        name = cfg.pop("name", "source_caption")
        self.backend: Captioner = build_backend("captioner", name, models_dir=self.ctx.models_dir, **cfg)

    def process(self, rows: list[Record]) -> list[Record]:
        caps = self.backend.caption([caption_input(r, self.ctx.out_dir) for r in rows], self.params.prompt)
        out = []
        for row, cap in zip(rows, caps):
            cap = " ".join((cap or "").split())[: self.params.max_chars]
            if not cap:
                out.append(reject(row, "caption:missing", caption=None, caption_origin=self.backend.origin))
            elif len(cap.split()) < self.params.min_words:
                out.append(reject(row, "caption:too_short", caption=cap, caption_origin=self.backend.origin))
            else:
                out.append({**row, "caption": cap, "caption_origin": self.backend.origin})
        return out
