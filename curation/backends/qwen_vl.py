"""Qwen2.5-VL backends: the clip captioner and the reference-frame subject grounder (bbox_2d replies)."""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch

from curation.backends.llm import pick_device
from curation.models import resolve_model_path
from curation.parsing import extract_json, parse_bbox_reply, to_frame_box
from curation.stage import register_backend

log = logging.getLogger(__name__)

GROUND_PROMPT = (
    "Locate the {name} ({description}) in the image and output its bbox coordinates in JSON format: "
    '[{{"bbox_2d": [x1, y1, x2, y2], "label": "{name}", "complete": true}}]. Set "complete" to false when '
    "part of it is cut off by the image border. Reply [] if it is not visible."
)


@functools.lru_cache(maxsize=2)
def _load_qwen_vl(path: str, device: str):
    """Model + processor, once per process (captioner and grounder may share one in the sequential runner)."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    dev, dtype = pick_device(device)
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    processor.tokenizer.padding_side = "left"  # batched generate needs prompts right-aligned
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype, local_files_only=True)
    return processor, model.to(dev).eval(), dev


class _QwenVL:
    """Shared loading and batched greedy generation over chat conversations with image/video parts."""

    what = "Qwen2.5-VL model"

    def __init__(
        self,
        model_path: str,
        models_dir: str = "models",
        device: str = "auto",
        batch_size: int = 8,
        max_new_tokens: int = 256,
        hub_id: str = "",
    ):
        del hub_id  # used by `make weights` only
        path = resolve_model_path(
            model_path, models_dir, what=self.what, yaml_key="the stage's backend.model_path"
        )
        self.processor, self.model, self.device = _load_qwen_vl(str(path), device)
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.patch_size = int(getattr(self.processor.image_processor, "patch_size", 14))

    @torch.inference_mode()
    def generate(self, conversations: list[list[dict]]) -> tuple[list[str], dict]:
        """Greedy replies for one batch of conversations, and the processor inputs (for grid sizes)."""
        from qwen_vl_utils import process_vision_info

        texts = [
            self.processor.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
            for c in conversations
        ]
        images, videos, video_kwargs = process_vision_info(conversations, return_video_kwargs=True)
        kw = {}
        if videos:
            # transformers 5.23 rejects the per-video fps list; clips are sampled at one configured fps, so
            # the first entry stands for all (it only sets the temporal position ids' seconds per grid).
            kw = {"fps": video_kwargs["fps"][0], "do_sample_frames": False}
        inputs = self.processor(
            text=texts, images=images, videos=videos, padding=True, return_tensors="pt", **kw
        )
        inputs = inputs.to(self.device)
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new_tokens = out[:, inputs["input_ids"].shape[1] :]  # (B, T_new): prompts are left-padded
        replies = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
        return [r.strip() for r in replies], inputs


@register_backend("captioner", "qwen2_5_vl")
class QwenVLCaptioner(_QwenVL):
    """Captions clips from their video file, sampled at ``fps`` with at most ``max_pixels`` per frame."""

    origin = "qwen2_5_vl"

    def __init__(
        self,
        model_path: str,
        fps: float = 2.0,
        max_pixels: int = 360 * 420,
        min_pixels: int = 128 * 28 * 28,
        max_frames: int = 64,
        **kw,
    ):
        super().__init__(model_path, **kw)
        self.fps, self.max_pixels, self.min_pixels, self.max_frames = fps, max_pixels, min_pixels, max_frames

    def _video_part(self, clip) -> dict:
        part = {
            "type": "video",
            "video": clip.path,
            "fps": self.fps,
            "max_pixels": self.max_pixels,
            "min_pixels": min(self.min_pixels, self.max_pixels),
            "max_frames": self.max_frames,
        }
        if clip.start_s is not None:
            part["video_start"] = float(clip.start_s)
        if clip.end_s is not None:
            part["video_end"] = float(clip.end_s)
        return part

    def caption(self, clips: list, prompt: str) -> list[str | None]:
        replies: list[str | None] = []
        for i in range(0, len(clips), self.batch_size):
            chunk = clips[i : i + self.batch_size]
            convs = [
                [{"role": "user", "content": [self._video_part(c), {"type": "text", "text": prompt}]}]
                for c in chunk
            ]
            replies.extend(self.generate(convs)[0])
        return replies


@register_backend("grounder", "qwen2_5_vl")
class QwenVLGrounder(_QwenVL):
    """One prompt per (reference frame, subject) with the subject's name and description; the ``bbox_2d``
    reply is in pixels of the resized model input (Qwen2.5-VL uses absolute coordinates), mapped back here."""

    def __init__(
        self,
        model_path: str,
        max_pixels: int = 1280 * 28 * 28,
        min_pixels: int = 4 * 28 * 28,
        coords: str = "absolute",
        max_new_tokens: int = 128,
        **kw,
    ):
        super().__init__(model_path, max_new_tokens=max_new_tokens, **kw)
        if coords not in ("absolute", "norm1000", "auto"):
            raise ValueError(f"coords must be absolute, norm1000 or auto, got {coords!r}")
        self.max_pixels, self.min_pixels, self.coords = max_pixels, min_pixels, coords

    def input_hw(self, frame_hw: tuple[int, int]) -> tuple[int, int]:
        """The model input size for a frame: qwen_vl_utils.smart_resize with this backend's pixel budget."""
        from qwen_vl_utils import smart_resize

        return smart_resize(
            frame_hw[0],
            frame_hw[1],
            factor=self.patch_size * 2,
            min_pixels=self.min_pixels,
            max_pixels=self.max_pixels,
        )

    def ground(self, frames: list[np.ndarray], subjects: list[list[dict]]) -> list[list[dict]]:
        from PIL import Image

        jobs = [(fi, si) for fi, subs in enumerate(subjects) for si in range(len(subs))]
        results: list[list[dict]] = [[] for _ in frames]
        for b in range(0, len(jobs), self.batch_size):
            chunk = jobs[b : b + self.batch_size]
            convs = []
            for fi, si in chunk:
                s = subjects[fi][si]
                text = GROUND_PROMPT.format(name=s["name"], description=s.get("description") or s["name"])
                img = {
                    "type": "image",
                    "image": Image.fromarray(frames[fi]),
                    "max_pixels": self.max_pixels,
                    "min_pixels": self.min_pixels,
                }
                convs.append([{"role": "user", "content": [img, {"type": "text", "text": text}]}])
            replies, inputs = self.generate(convs)
            grids = inputs["image_grid_thw"].tolist()  # per image (t, h/patch, w/patch)
            for (fi, si), reply, (_, gh, gw) in zip(chunk, replies, grids):
                frame_hw = frames[fi].shape[:2]
                input_hw = (gh * self.patch_size, gw * self.patch_size)
                results[fi].append(self._to_detection(si, reply, frame_hw, input_hw))
        return results

    def _to_detection(self, si: int, reply: str, frame_hw, input_hw) -> dict:
        boxes = parse_bbox_reply(reply)
        if not boxes:
            reason = "not_found" if extract_json(reply) == [] else "parse_failed"
            return {"subject": si, "reason": reason, "raw": reply[:200]}
        first = boxes[0]  # one instance per subject: the model lists the best match first
        coords = "norm1000" if first["raw_mode"] == "qwen2_norm1000" else self.coords
        box, note = to_frame_box(first["box"], frame_hw, input_hw, coords)
        if box is None:
            return {"subject": si, "reason": note, "raw": reply[:200]}
        det = {"subject": si, "box": box, "score": 1.0, "complete": first["complete"]}
        if note == "clamped":
            det["complete"] = False  # the model's box ran past the frame: the subject is cut by the border
        return det
