"""Qwen2.5-VL backends: the clip captioner and the reference-frame subject grounder (bbox_2d replies)."""

from __future__ import annotations

import functools
import logging
import re

import numpy as np

from curation.backends.llm import inference_mode, pick_device
from curation.models import resolve_model_path
from curation.parsing import extract_json, parse_bbox_reply, to_frame_box
from curation.stage import register_backend

log = logging.getLogger(__name__)

GROUND_PROMPT = (
    "Locate each of these subjects in the image:\n{subjects}\n"
    "Output their bbox coordinates in JSON format, one entry per subject that is visible: "
    '[{{"bbox_2d": [x1, y1, x2, y2], "label": "<subject name as listed>", "complete": true}}, ...]. Set '
    '"complete" to false when part of a subject is cut off by the image border. Leave out subjects that '
    "are not visible; reply [] if none is."
)


def ground_prompt(subjects: list[dict]) -> str:
    """One prompt naming every subject of a frame (name and description), so the image is encoded once."""
    lines = [f"{k + 1}. {s['name']} ({s.get('description') or s['name']})" for k, s in enumerate(subjects)]
    return GROUND_PROMPT.format(subjects="\n".join(lines))


class _GreedyLogProbs:
    """A logits processor that records, at every generation step, the log-probability of the token greedy
    decoding picks (the arg-max of the final scores): (B,) per step, not the (B, vocab) scores."""

    def __init__(self):
        self.steps: list = []  # (B,) float tensors

    def __call__(self, input_ids, scores):
        import torch

        self.steps.append(torch.log_softmax(scores.float(), dim=-1).max(dim=-1).values.cpu())
        return scores


def _label_key(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", str(text).lower()))


def assign_boxes(boxes: list[dict], subjects: list[dict]) -> dict[int, int]:
    """{subject index: box index}: each box goes to the subject its label names (exact, then one name
    inside the other, then a list number "2" / "2. man"), first box per subject; unassigned boxes dropped."""
    names = [_label_key(s["name"]) for s in subjects]
    out: dict[int, int] = {}
    for bi, b in enumerate(boxes):
        label = _label_key(b.get("label", ""))
        m = re.match(r"^(\d+)\b", label)
        cands = [si for si, n in enumerate(names) if n and n == label]
        if not cands:
            cands = [si for si, n in enumerate(names) if n and label and (n in label or label in n)]
            cands.sort(key=lambda si: -len(names[si]))  # "man in red" before "man"
        if not cands and m and 1 <= int(m.group(1)) <= len(subjects):
            cands = [int(m.group(1)) - 1]
        for si in cands:
            if si not in out:
                out[si] = bi
                break
    return out


_BOX_TEXT = re.compile(
    r"\[\s*-?\d+(?:\.\d+)?\s*(?:,\s*-?\d+(?:\.\d+)?\s*){3}\]"  # [x0, y0, x1, y1]
    r"|\(\s*-?\d+(?:\.\d+)?\s*,\s*-?\d+(?:\.\d+)?\s*\)\s*,\s*\(\s*-?\d+(?:\.\d+)?\s*,\s*-?\d+(?:\.\d+)?\s*\)"
)


def box_confidences(reply: str, char_ends: list[int], logprobs: list[float], n_boxes: int) -> list[float]:
    """A confidence per box of a reply: exp(mean log-prob) of the generated tokens that spell the box's
    four numbers (``char_ends[t]``: the reply's length after token t). Where the reply's box texts do not
    line up with the parsed boxes, every box gets the whole reply's exp(mean log-prob)."""
    lp = np.asarray(logprobs, np.float64)
    whole = float(np.exp(lp.mean())) if len(lp) else 0.0
    spans = [m.span() for m in _BOX_TEXT.finditer(reply)]
    if len(spans) != n_boxes or not len(lp):
        return [round(whole, 4)] * n_boxes
    ends = np.asarray(char_ends)
    starts = np.concatenate([[0], ends[:-1]])
    out = []
    for a, b in spans:
        toks = (ends > a) & (starts < b)  # tokens overlapping the box text
        out.append(round(float(np.exp(lp[toks].mean())) if toks.any() else whole, 4))
    return out


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
        sha256: str = "",
    ):
        del hub_id  # used by `make weights` only
        # sha256: the folder digest (curation.models.folder_sha256) or "unpinned"; by default every file
        # must have the hash `make weights` recorded
        path = resolve_model_path(
            model_path,
            models_dir,
            what=self.what,
            yaml_key="the stage's backend.model_path",
            sha256=sha256 or None,
            sha256_key="the stage's backend.sha256",
        )
        self.processor, self.model, self.device = _load_qwen_vl(str(path), device)
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.patch_size = int(getattr(self.processor.image_processor, "patch_size", 14))

    @inference_mode
    def generate(self, conversations: list[list[dict]], scores: bool = False):
        """Greedy replies for one batch of conversations, and the processor inputs (for grid sizes). With
        ``scores``, replies are not stripped and a third list holds per reply ``{char_ends, logprobs,
        token_ids}``: the reply's length after each generated token, that token's log-probability, and
        the token ids (up to the first end-of-sequence token)."""
        import torch
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
        extra = {}
        if scores:
            from transformers import LogitsProcessorList

            rec = _GreedyLogProbs()
            extra["logits_processor"] = LogitsProcessorList([rec])
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False, **extra)
        new_tokens = out[:, inputs["input_ids"].shape[1] :]  # (B, T_new): prompts are left-padded
        replies = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
        if not scores:
            return [r.strip() for r in replies], inputs
        lp = torch.stack(rec.steps, dim=1) if rec.steps else torch.zeros(len(replies), 0)  # (B, T_new)
        eos = set(_as_list(self.model.generation_config.eos_token_id)) | {
            self.processor.tokenizer.pad_token_id
        }
        info = []
        for b in range(len(replies)):
            ids = new_tokens[b].tolist()
            n = next((t for t, i in enumerate(ids) if i in eos), len(ids))
            tok = self.processor.tokenizer
            ends = [len(tok.decode(ids[: t + 1], skip_special_tokens=True)) for t in range(n)]
            info.append({"char_ends": ends, "logprobs": lp[b, :n].tolist(), "token_ids": ids[:n]})
        return replies, inputs, info


def _as_list(x) -> list:
    return [] if x is None else (list(x) if isinstance(x, (list, tuple)) else [x])


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
    """ONE prompt per reference frame listing all its subjects (the image is encoded once, not once per
    subject); the ``bbox_2d`` reply, in pixels of the resized model input (Qwen2.5-VL uses absolute
    coordinates), is mapped back to the frame, each box to the subject its label names. A box's ``score``
    is the model's own confidence: exp(mean log-prob) of the tokens that spell its coordinates."""

    def __init__(
        self,
        model_path: str,
        max_pixels: int = 1280 * 28 * 28,
        min_pixels: int = 4 * 28 * 28,
        coords: str = "absolute",
        max_new_tokens: int = 384,
        **kw,
    ):
        super().__init__(model_path, max_new_tokens=max_new_tokens, **kw)
        if coords not in ("absolute", "norm1000", "auto"):
            raise ValueError(f"coords must be absolute, norm1000 or auto, got {coords!r}")
        self.max_pixels, self.min_pixels, self.coords = max_pixels, min_pixels, coords
        self.n_prompts = 0  # prompts sent so far (one per frame with subjects)
        self.n_frames = 0

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

        jobs = [fi for fi, subs in enumerate(subjects) if subs]
        results: list[list[dict]] = [[] for _ in frames]
        self.n_frames += len(frames)
        for b in range(0, len(jobs), self.batch_size):
            chunk = jobs[b : b + self.batch_size]
            convs = []
            for fi in chunk:
                img = {
                    "type": "image",
                    "image": Image.fromarray(frames[fi]),
                    "max_pixels": self.max_pixels,
                    "min_pixels": self.min_pixels,
                }
                text = ground_prompt(subjects[fi])
                convs.append([{"role": "user", "content": [img, {"type": "text", "text": text}]}])
            self.n_prompts += len(convs)
            replies, inputs, info = self.generate(convs, scores=True)
            grids = inputs["image_grid_thw"].tolist()  # per image (t, h/patch, w/patch)
            for fi, reply, (_, gh, gw), tok in zip(chunk, replies, grids, info):
                frame_hw = frames[fi].shape[:2]
                input_hw = (gh * self.patch_size, gw * self.patch_size)
                results[fi] = self._to_detections(
                    subjects[fi], reply, frame_hw, input_hw, tok["char_ends"], tok["logprobs"]
                )
        return results

    def _to_detections(
        self, subjects, reply: str, frame_hw, input_hw, char_ends=(), logprobs=()
    ) -> list[dict]:
        """One entry per subject: a detection ``{subject, box, score, complete}`` or ``{subject, reason,
        raw}`` (``not_found`` when the reply is a list without it, ``parse_failed`` when it is no JSON)."""
        boxes = parse_bbox_reply(reply)
        confs = box_confidences(reply, list(char_ends), list(logprobs), len(boxes))
        text = reply.strip()
        if not boxes:
            reason = "not_found" if isinstance(extract_json(text), list) else "parse_failed"
            return [{"subject": si, "reason": reason, "raw": text[:200]} for si in range(len(subjects))]
        if len(subjects) == 1 and not assign_boxes(boxes, subjects):
            picked = {0: 0}  # one subject asked for: an unlabelled box is its box
        else:
            picked = assign_boxes(boxes, subjects)
        out = []
        for si in range(len(subjects)):
            if si not in picked:
                out.append({"subject": si, "reason": "not_found", "raw": text[:200]})
                continue
            b = boxes[picked[si]]
            coords = "norm1000" if b["raw_mode"] == "qwen2_norm1000" else self.coords
            box, note = to_frame_box(b["box"], frame_hw, input_hw, coords)
            if box is None:
                out.append({"subject": si, "reason": note, "raw": text[:200]})
                continue
            det = {"subject": si, "box": box, "score": confs[picked[si]], "complete": b["complete"]}
            if note == "clamped":
                det["complete"] = (
                    False  # the model's box ran past the frame: the subject is cut by the border
                )
            out.append(det)
        return out

    def _to_detection(self, si: int, reply: str, frame_hw, input_hw) -> dict:
        """The first box of a reply as subject ``si``'s detection (a one-subject reply)."""
        (det,) = self._to_detections([{"name": f"subject {si}"}], reply, frame_hw, input_hw)
        return {**det, "subject": si}
