"""Evaluate a checkpoint: generate a video per evaluation case (fixed seeds) and score it with
curation.metrics; writes eval.json, eval.md and an HTML page of references, prompt and video per case.

    python -m training.evaluate --ckpt runs/train_tiny/checkpoints/step_00000100.pt \
        --eval-set output/sample/shards_eval [--metrics evaluation.yaml] [--out runs/eval/step_100]

The evaluation set is a folder of triplet shards (the curation's held-out split, ``shards_eval/``, local or
a store URI such as ``s3://bucket/run/shards_eval``) or a JSONL of cases, one ``{"refs": ["a.png", ...],
"prompt": "...", "seed": 0, "key"?: ..., "subjects"?: [{"name": ..., "category": ...}, ...]}`` per line,
paths relative to the JSONL file.
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import json
import logging
import os
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

if __package__ in (None, ""):  # run as `python training/evaluate.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from curation.metrics import (  # noqa: E402
    Case,
    MetricsConfig,
    MetricSuite,
    Summary,
    sample_indices,
    suite_ranges,
)
from curation.models import unpinned_files  # noqa: E402
from training.eval_bench import BenchConfig, BenchMetrics, bench_indices, load_eval_config  # noqa: E402

log = logging.getLogger(__name__)

MAX_REFS = 4


@dataclasses.dataclass
class EvalCase:
    """One evaluation case: references (RGB uint8), prompt, seed; ``error`` when it could not be read."""

    key: str
    refs: list[np.ndarray]
    prompt: str
    seed: int
    subjects: list[dict] = dataclasses.field(default_factory=list)
    error: str | None = None


def case_seed(key: str, base_seed: int) -> int:
    """A fixed seed per case that does not depend on the case's position in the set."""
    return (base_seed + zlib.crc32(key.encode("utf-8"))) % (2**31)


def _decode_image(data: bytes) -> np.ndarray:
    from training.data import decode_image

    return decode_image(data)


def _safe_key(s: str) -> str:
    from curation.shards import safe_component

    return safe_component(s)


def iter_shard_cases(shards_dir: str | os.PathLike, base_seed: int = 0) -> Iterator[EvalCase]:
    """Cases from triplet shards: references ``ref_*.jpg``, prompt ``txt``, subjects from ``json``."""
    from curation.shards import TAR_ERRORS, iter_tar_samples, list_shards
    from training.data import ref_keys

    for path in list_shards(shards_dir):
        try:
            for key, s in iter_tar_samples(path):
                yield _shard_case(key, s, base_seed, ref_keys)
        except TAR_ERRORS as e:
            name = Path(path).name
            yield EvalCase(
                _safe_key(name), [], "", 0, error=f"unreadable shard {name}: {type(e).__name__}: {e}"
            )


def _shard_case(key: str, s: dict, base_seed: int, ref_keys) -> EvalCase:
    seed = case_seed(key, base_seed)
    try:
        meta = json.loads(s["json"]) if "json" in s else {}
        subjects = [
            {k: x.get(k) for k in ("name", "category", "description")} for x in meta.get("subjects") or []
        ]
        refs = [_decode_image(s[k]) for k in ref_keys(s)][:MAX_REFS]
        if not refs:
            raise ValueError("no reference images")
        prompt = s["txt"].decode("utf-8") if "txt" in s else str(meta.get("caption") or "")
        if not prompt.strip():
            raise ValueError("no prompt")
        return EvalCase(key, refs, prompt, seed, subjects[: len(refs)])
    except Exception as e:  # a bad sample is one failed case
        return EvalCase(key, [], "", seed, error=f"{type(e).__name__}: {e}")


def iter_jsonl_cases(path: str | os.PathLike, base_seed: int = 0) -> Iterator[EvalCase]:
    path = Path(path)
    root = path.resolve().parent
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            key = f"line{n:05d}"
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("a case must be a JSON object")
                key = _safe_key(str(row.get("key") or key))
                refs = row.get("refs")
                if not isinstance(refs, list) or not 1 <= len(refs) <= MAX_REFS:
                    raise ValueError(f"refs must list 1 to {MAX_REFS} image paths, got {refs!r}")
                prompt = row.get("prompt")
                if not isinstance(prompt, str) or not prompt.strip():
                    raise ValueError("prompt must be a non-empty string")
                images = [_decode_image((root / str(p)).read_bytes()) for p in refs]
                seed = row.get("seed")
                seed = case_seed(key, base_seed) if seed is None else int(seed)
                subjects = row.get("subjects") or []
                if not isinstance(subjects, list) or not all(isinstance(x, dict) for x in subjects):
                    raise ValueError("subjects must be a list of objects")
                yield EvalCase(key, images, prompt, seed, subjects[: len(images)])
            except Exception as e:  # a bad line is one failed case
                yield EvalCase(key, [], "", 0, error=f"{path.name}:{n}: {type(e).__name__}: {e}")


def iter_cases(eval_set: str | os.PathLike, base_seed: int = 0) -> Iterator[EvalCase]:
    from curation.storage import is_uri

    if is_uri(eval_set):  # shards in a store (s3://bucket/run/shards_eval): read where they are
        return iter_shard_cases(str(eval_set), base_seed)
    p = Path(eval_set)
    from training import opens2v

    if opens2v.is_case_file(p):  # OpenS2V-Eval's case JSON (training/opens2v.py)
        return (
            EvalCase(c.key, c.refs, c.prompt, case_seed(c.key, base_seed), c.subjects, c.error)
            for c in opens2v.iter_cases(p)
        )
    if p.is_file() and p.suffix in (".jsonl", ".json"):
        return iter_jsonl_cases(p, base_seed)
    if p.is_dir() or p.suffix == ".tar":
        return iter_shard_cases(p, base_seed)
    raise FileNotFoundError(f"evaluation set {p} is neither a shard folder nor a .jsonl file")


# ---------------------------------------------------------------------------------------------------------
# generation


def load_generator(ckpt: str, model: str | None = None, device: str = "cpu", config: str | None = None):
    """(sampler, how it was loaded) through training/sample.py, the one generation path of both model
    families: ``load_sampler`` when the family is named, else the checkpoint's own family."""
    import training.sample as sample

    if model:
        return sample.load_sampler(
            ckpt, model=model, device=device, config=config
        ), f"training.sample.load_sampler ({model})"
    cfg, net, enc = sample.load_for_sampling(ckpt, use_ema=True, device=device, config=config)
    return sample.Sampler(cfg, net, enc, device), f"training.sample.Sampler ({cfg.model.family})"


# ---------------------------------------------------------------------------------------------------------
# evaluation


def build_case(
    key: str,
    refs: list[np.ndarray],
    prompt: str,
    video: np.ndarray,
    fps: float,
    n_frames: int,
    subjects: list[dict] | None = None,
    benchmark_sampling: bool = False,
) -> Case:
    """A metric case from a generated video (T, H, W, 3): ``n_frames`` evenly spaced frames for the image
    metrics and, for the motion metric, each sampled frame with the frame that follows it.
    ``benchmark_sampling``: the frames at OpenS2V-Eval's ``linspace(0, T-1, n_frames)`` floored (its get_*.py
    scripts), not rounded."""
    idx = bench_indices(len(video), n_frames) if benchmark_sampling else sample_indices(len(video), n_frames)
    pairs = sample_indices(len(video) - 1, n_frames)
    flow = (video[pairs], video[[i + 1 for i in pairs]], fps) if pairs else None
    return Case(key, refs, video[idx], prompt, list(subjects or []), None, fps, flow)


_BENCH_KEYS = {
    "Aesthetics": "aesthetics",
    "MotionAmplitude": "motion_amplitude",
    "MotionSmoothness": "motion_smoothness",
}


def case_group(ec: EvalCase, is_bench: bool) -> str:
    """The category a case is reported under: OpenS2V-Eval's by case id, else its subjects' categories."""
    if is_bench:
        from training.opens2v import case_category

        return case_category(ec.key)
    cats = sorted({str(s.get("category") or "unknown") for s in ec.subjects})
    return "+".join(cats) if cats else "unknown"


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


class _Outputs:
    """Per-case outputs written as the run goes: cases.jsonl, videos, reference images, HTML cards."""

    def __init__(self, out_dir: Path):
        self.dir = out_dir
        for sub in ("videos", "refs", "frames"):
            (out_dir / sub).mkdir(parents=True, exist_ok=True)
        self.cases = open(out_dir / "cases.jsonl", "w", encoding="utf-8")
        self.cards = open(out_dir / ".cards.html", "w", encoding="utf-8")

    def write(self, rec: dict, refs: list[np.ndarray], frames: np.ndarray | None) -> None:
        from PIL import Image

        key = rec["key"]
        ref_files = []
        for i, r in enumerate(refs):
            name = f"refs/{key}.ref{i}.jpg"
            Image.fromarray(r).save(self.dir / name, quality=90)
            ref_files.append(name)
        rec["ref_files"] = ref_files
        if frames is not None and len(frames):
            strip = np.concatenate(list(frames[: min(len(frames), 6)]), axis=1)  # (H, k*W, 3)
            rec["frames_file"] = f"frames/{key}.jpg"
            Image.fromarray(strip).save(self.dir / rec["frames_file"], quality=90)
        self.cases.write(json.dumps(rec, sort_keys=True) + "\n")
        self.cases.flush()
        self.cards.write(_card(rec) + "\n")

    def close(self) -> None:
        self.cases.close()
        self.cards.close()


def _card(rec: dict) -> str:
    e = html.escape
    refs = "".join(f'<img class="ref" src="{e(p)}">' for p in rec.get("ref_files", []))
    if rec.get("status") != "ok":
        body = f"<p class='err'>failed: {e(str(rec.get('error')))}</p>"
    else:
        rows = "".join(
            f"<tr><td>{e(n)}</td><td>{_fmt(s.get('value'))}</td><td>{e(str(s.get('reason', '')))}</td></tr>"
            for n, s in rec["metrics"].items()
        )
        body = (
            f'<video src="{e(rec["video"])}" controls loop muted autoplay playsinline></video>'
            + (f'<br><img class="frames" src="{e(rec["frames_file"])}">' if rec.get("frames_file") else "")
            + f"<table><tr><th>metric</th><th>value</th><th>note</th></tr>{rows}</table>"
        )
    return (
        f'<div class="card"><h3>{e(rec["key"])} <small>seed {rec.get("seed")}</small></h3>'
        f'<p class="prompt">{e(rec.get("prompt", ""))}</p><div class="row"><div>{refs}</div>'
        f"<div>{body}</div></div></div>"
    )


def _markdown(report: dict, case_rows: Iterator[dict]) -> str:
    metrics = report["metrics"]
    on = [n for n, m in metrics.items() if m["status"] == "on"]
    lines = [
        f"# Evaluation of `{report['checkpoint']}`",
        "",
        f"{report['n_ok']} of {report['n_cases']} cases generated from `{report['eval_set']}` "
        f"({report['generator']}; {report['sampling']['steps']} steps, w_img {report['sampling']['w_img']}, "
        f"w_txt {report['sampling']['w_txt']}); subject regions: {report['regions']}.",
        "",
        "| metric | model | mean | std | n | missing |",
        "|---|---|---|---|---|---|",
    ]
    for n, m in metrics.items():
        if m["status"] == "off":
            lines.append(f"| {n} | off: {m['reason']} | — | — | 0 | — |")
            continue
        t = report["summary"].get(n, {})
        miss = ", ".join(f"{k}: {v}" for k, v in t.get("missing", {}).items()) or "—"
        extra = f" ({t['flagged']} flagged)" if "flagged" in t else ""
        lines.append(
            f"| {n} | {m['model']} | {_fmt(t.get('mean'))}{extra} | {_fmt(t.get('std'))} | "
            f"{t.get('n', 0)} | {miss} |"
        )
    lines += ["", "## Cases", "", "| case | " + " | ".join(on) + " |", "|---" * (len(on) + 1) + "|"]
    for rec in case_rows:
        if rec.get("status") != "ok":
            lines.append(f"| {rec['key']} | failed: {rec.get('error', '')[:80]} |" + " |" * (len(on) - 1))
            continue
        vals = [_fmt(rec["metrics"].get(n, {}).get("value")) for n in on]
        lines.append(f"| {rec['key']} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def _read_cases(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def evaluate(
    ckpt: str,
    eval_set: str,
    out_dir: str,
    metrics: MetricsConfig | None = None,
    steps: int = 50,
    w_img: float = 3.0,
    w_txt: float = 7.5,
    num_frames: int | None = None,
    fps: float | None = None,
    base_seed: int = 0,
    limit: int = 0,
    batch_cases: int = 8,
    device: str = "cpu",
    model: str | None = None,
    config: str | None = None,
    suite: MetricSuite | None = None,
    sampler=None,
    rephraser=None,
    videos: str | None = None,
    bench: BenchConfig | None = None,
    bench_metrics: BenchMetrics | None = None,
    generator: str | None = None,
) -> dict:
    """Generate and score every case; returns the report written to ``<out_dir>/eval.json``.

    ``bench`` (``evaluation.opens2v``, training/eval_bench.py): OpenS2V-Eval's Aesthetics and motion terms,
    scored on each whole video, and, for an OpenS2V case file, its frame count for the suite's metrics.

    ``rephraser`` (a training.rephrase.Rephraser): each case's prompt is rewritten from its subjects'
    descriptions before generation (``prompt_used`` and ``rephrase`` in the case record); the metrics still
    score against the case's own prompt."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    suite = (suite or MetricSuite(metrics or MetricsConfig())).load()
    from curation.storage import is_uri
    from training import opens2v

    bench_metrics = bench_metrics or BenchMetrics(bench, suite.cfg.models_dir, suite.cfg.device)
    is_bench = not is_uri(eval_set) and opens2v.is_case_file(eval_set)
    n_frames = bench_metrics.cfg.frames if is_bench else suite.cfg.n_frames
    how = generator or "given"
    folder = None
    if videos:  # another model's videos, one per case id (training/opens2v.py VideoFolder)
        from training.opens2v import VideoFolder

        folder, how = VideoFolder(videos), f"videos in {videos}"
    elif sampler is None:
        sampler, how = load_generator(ckpt, model=model, device=device, config=config)
    fps = float(fps or getattr(sampler, "fps", None) or 8.0)
    run_fps = fps
    summary = Summary({**suite_ranges(suite), **bench_metrics.ranges()})
    outputs = _Outputs(out)
    n_cases = n_ok = 0
    t_gen = t_metrics = 0.0
    t0 = time.perf_counter()
    pending: list[tuple[dict, EvalCase, Case, dict]] = []

    def flush():
        nonlocal t_metrics
        t = time.perf_counter()
        scores = suite.score([c for _, _, c, _ in pending])
        t_metrics += time.perf_counter() - t
        for (rec, ec, c, whole), sc in zip(pending, scores):
            rec["metrics"] = {**sc["metrics"], **whole}
            summary.add({"metrics": rec["metrics"]})
            outputs.write(rec, ec.refs, c.frames)
        pending.clear()

    try:
        for ec in iter_cases(eval_set, base_seed):
            if limit and n_cases >= limit:
                break
            n_cases += 1
            rec = {
                "key": ec.key,
                "prompt": ec.prompt,
                "seed": ec.seed,
                "n_refs": len(ec.refs),
                "category": case_group(ec, is_bench),
            }
            if ec.error:
                outputs.write({**rec, "status": "failed", "error": ec.error}, [], None)
                continue
            prompt = ec.prompt
            if rephraser is not None:
                from training.rephrase import rephrase_case

                rp = rephrase_case(rephraser, ec.prompt, ec.refs, ec.subjects)
                prompt = rp.prompt
                rec.update(prompt_used=prompt, rephrase={"rephrased": rp.rephrased, "reason": rp.reason})
            t = time.perf_counter()
            fps = run_fps
            try:
                if folder is not None:
                    video, fps = folder.read(ec.key)
                    fps = float(fps or run_fps)
                else:
                    video = sampler.generate(
                        ec.refs,
                        prompt,
                        seed=ec.seed,
                        steps=steps,
                        w_img=w_img,
                        w_txt=w_txt,
                        num_frames=num_frames,
                    )
                video = np.asarray(video, np.uint8)
                if video.ndim != 4 or video.shape[-1] != 3 or len(video) == 0:
                    raise ValueError(f"generator returned shape {video.shape}, expected (T, H, W, 3)")
                from training.sample import write_mp4

                rec["video"] = f"videos/{ec.key}.mp4"
                write_mp4(video, out / rec["video"], fps=fps)
            except Exception as e:  # one failed generation is one failed case
                log.warning("case %s: generation failed: %s", ec.key, e)
                outputs.write({**rec, "status": "failed", "error": f"{type(e).__name__}: {e}"}, ec.refs, None)
                continue
            finally:
                t_gen += time.perf_counter() - t
            rec.update(status="ok", frames=int(len(video)), size=[int(video.shape[2]), int(video.shape[1])])
            n_ok += 1
            t = time.perf_counter()
            whole = bench_metrics.score(video)  # on the whole video, before it is let go
            t_metrics += time.perf_counter() - t
            case = build_case(ec.key, ec.refs, ec.prompt, video, fps, n_frames, ec.subjects, is_bench)
            pending.append((rec, ec, case, whole))
            if len(pending) >= batch_cases:
                flush()
        if pending:
            flush()
    finally:
        outputs.close()
    wall = time.perf_counter() - t0
    report = {
        "checkpoint": str(ckpt or videos),
        "eval_set": str(eval_set),
        "generator": how,
        "sampling": {
            "steps": steps,
            "w_img": w_img,
            "w_txt": w_txt,
            "num_frames": num_frames,
            "fps": run_fps,
            "base_seed": base_seed,
        },
        "regions": f"grounded by {suite.grounder_name}" if suite.grounder is not None else "whole frames",
        "n_cases": n_cases,
        "n_ok": n_ok,
        "n_failed": n_cases - n_ok,
        "metrics": {**suite.describe(), **bench_metrics.describe()},
        "frames_per_video": {
            "suite": n_frames,
            "sampling": "linspace floored (OpenS2V-Eval)" if is_bench else "linspace rounded",
            **{m: getattr(bench_metrics.cfg, k).frames or "all" for m, k in _BENCH_KEYS.items()},
        },
        "summary": summary.result(hist=False),
        "timing": {
            "wall_s": round(wall, 3),
            "generate_s": round(t_gen, 3),
            "metrics_s": round(t_metrics, 3),
            "cases_per_s": round(n_ok / wall, 4) if wall > 0 else None,
        },
        "cases_file": "cases.jsonl",
        # model files (metrics, generator) loaded under `sha256: unpinned`, i.e. unchecked
        "unpinned_model_files": unpinned_files(),
    }
    if is_bench:  # the benchmark's normalised scores and total, per category
        report["opens2v"] = opens2v.summarise(_read_cases(out / "cases.jsonl"), opens2v.domain_of(eval_set))
    _write_report(out, report)
    md = _markdown(report, _read_cases(out / "cases.jsonl"))
    if "opens2v" in report:
        md = md.replace("\n## Cases\n", opens2v.markdown(report["opens2v"]) + "\n## Cases\n", 1)
    (out / "eval.md").write_text(md, encoding="utf-8")
    _write_html(out, report)
    return report


def _write_report(out: Path, report: dict) -> None:
    """eval.json: the report with every case in it, streamed from cases.jsonl (never all in memory)."""
    tmp = out / f".eval.json.tmp{os.getpid()}"
    head = json.dumps(report, indent=1, sort_keys=True)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(head[:-1].rstrip() + ',\n "cases": [\n')
        for i, rec in enumerate(_read_cases(out / "cases.jsonl")):
            f.write((",\n" if i else "") + "  " + json.dumps(rec, sort_keys=True))
        f.write("\n ]\n}\n")
    os.replace(tmp, out / "eval.json")


def _write_html(out: Path, report: dict) -> None:
    e = html.escape
    rows = []
    for n, m in report["metrics"].items():
        if m["status"] == "off":
            rows.append(f"<tr class='off'><td>{e(n)}</td><td colspan=3>off: {e(m['reason'])}</td></tr>")
        else:
            t = report["summary"].get(n, {})
            rows.append(
                f"<tr><td>{e(n)}</td><td>{e(m['model'])}</td><td>{_fmt(t.get('mean'))}</td>"
                f"<td>{t.get('n', 0)}</td></tr>"
            )
    page = (
        "<!doctype html><meta charset='utf-8'><title>Evaluation</title><style>"
        "body{font-family:sans-serif;margin:1em} .card{border:1px solid #ccc;margin:1em 0;padding:.5em}"
        ".row{display:flex;gap:1em;align-items:flex-start}"
        "img.ref{height:128px;margin:2px;border:3px solid #36c}"
        "video{height:192px;background:#000} img.frames{height:64px} td,th{padding:1px 8px;text-align:left}"
        ".off{color:#888} .err{color:#b00} small{color:#666}</style>"
        f"<h1>{e(report['checkpoint'])}</h1><p>{report['n_ok']} of {report['n_cases']} cases from "
        f"{e(report['eval_set'])}; subject regions: {e(report['regions'])}</p>"
        f"<table><tr><th>metric</th><th>model</th><th>mean</th><th>n</th></tr>{''.join(rows)}</table>"
    )
    with open(out / "index.html", "w", encoding="utf-8") as f:
        f.write(page)
        with open(out / ".cards.html", encoding="utf-8") as cards:
            for line in cards:
                f.write(line)
    (out / ".cards.html").unlink()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", default=None, help="training checkpoint (.pt); or --videos")
    ap.add_argument("--videos", default=None, help="score another model's videos: a folder of <case id>.mp4")
    ap.add_argument(
        "--eval-set",
        default=None,
        help="shard folder or store URI (output/sample/shards_eval, s3://b/run/shards_eval), .jsonl, or "
        "OpenS2V-Eval's case JSON; default: the config's evaluation.opens2v.cases",
    )
    ap.add_argument(
        "--metrics",
        default=None,
        help="metric config YAML (its own block or a file with an `evaluation:` block); "
        "default: the offline metrics",
    )
    ap.add_argument("--out", default=None, help="output folder (default: runs/eval/<checkpoint stem>)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--w-img", type=float, default=3.0)
    ap.add_argument("--w-txt", type=float, default=7.5)
    ap.add_argument("--num-frames", type=int, default=None)
    ap.add_argument("--fps", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0, help="base seed (each case's seed is fixed from its key)")
    ap.add_argument("--limit", type=int, default=0, help="at most this many cases (0: all)")
    ap.add_argument("--batch-cases", type=int, default=8, help="cases scored per metric batch")
    ap.add_argument(
        "--model",
        choices=["mmdit", "phantom_wan"],
        default=None,
        help="model family (default: the checkpoint's)",
    )
    ap.add_argument("--config", default=None, help="training config passed to training.sample.load_sampler")
    ap.add_argument("--device", default=None)
    ap.add_argument(
        "--rephrase",
        action="store_true",
        help="rewrite each case's prompt from its subjects' descriptions (training/rephrase.py)",
    )
    ap.add_argument("--rephrase-config", default=None, help="YAML with the rephraser's llm / describer")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    from curation.config import ConfigError
    from curation.models import ModelHashMismatch, ModelNotFound

    if not a.ckpt and not a.videos:
        ap.error("one of --ckpt or --videos is required")
    a.ckpt = a.ckpt or a.videos
    out = a.out or os.path.join("runs", "eval", Path(a.ckpt).stem)
    try:
        cfg, bench = load_eval_config(a.metrics)
        if a.device and cfg.device == "auto":
            cfg.device = a.device
        if not Path(a.ckpt).exists():
            raise FileNotFoundError(f"checkpoint {a.ckpt} does not exist")
        a.eval_set = a.eval_set or bench.cases
        if not a.eval_set:
            raise ConfigError("no evaluation set: pass --eval-set or set evaluation.opens2v.cases")
        iter_cases(a.eval_set)  # fails now, with one line, on a missing or unknown evaluation set
        rephraser = None
        if a.rephrase or a.rephrase_config:
            from training.rephrase import Rephraser, load_rephrase_config

            rephraser = Rephraser(load_rephrase_config(a.rephrase_config))
        report = evaluate(
            a.ckpt,
            a.eval_set,
            out,
            cfg,
            steps=a.steps,
            w_img=a.w_img,
            w_txt=a.w_txt,
            num_frames=a.num_frames,
            fps=a.fps,
            base_seed=a.seed,
            limit=a.limit,
            batch_cases=a.batch_cases,
            device=device,
            model=a.model,
            config=a.config,
            rephraser=rephraser,
            videos=a.videos,
            bench=bench,
        )
    except (ConfigError, ModelNotFound, ModelHashMismatch, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(Path(out, "eval.md").read_text(encoding="utf-8").split("## Cases")[0].rstrip())
    print(f"\nwrote {out}/eval.json, {out}/eval.md, {out}/index.html")
    return 0 if report["n_ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
