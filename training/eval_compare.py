"""Did this fine-tune help? A checkpoint and the weights its training started from, scored on the same cases
(same seeds) through the same metric models, then side by side (``make eval``).

    python -m training.eval_compare --ckpt runs/train_tiny/checkpoints/step_00000200.pt \\
        --eval-set output/sample/shards_eval --metrics pipelines.yaml --out runs/eval/step_00000200

writes ``<out>/start/`` (the starting weights), ``<out>/<checkpoint stem>/`` (the checkpoint), each a full
training.evaluate run (eval.json, eval.md, index.html, videos), and the comparison ``<out>/eval.md`` and
``<out>/index.html``: metric means side by side with the change, per case category, the OpenS2V-Eval total
when the set is its case file, and every case's references, prompt and both videos.

The starting weights are the model the trainer built before its first step: the checkpoint's own config,
seeded with its seed, through the family's ``build()`` (the pretrained Wan / Phantom weights it names, or the
seeded random init of a from-scratch model). ``--baseline PATH`` compares with another checkpoint instead;
``--baseline none`` scores the checkpoint alone (the old ``make eval``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python training/eval_compare.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def stored_config(ckpt: str | os.PathLike) -> dict:
    """The training config a checkpoint carries (a .pt file is memory-mapped: its weights are not read)."""
    import torch

    from training.checkpoint import load_checkpoint

    p = Path(ckpt)
    if p.is_dir():
        return load_checkpoint(p / "meta.pt")["config"]
    return torch.load(p, map_location="cpu", weights_only=True, mmap=True)["config"]


def start_sampler(ckpt: str | os.PathLike, device: str = "cpu", config: str | None = None):
    """A training.sample.Sampler of the weights the checkpoint's training started from."""
    import random

    import numpy as np
    import torch

    from training.config import config_from_dict, load_config
    from training.encoders import build_encoders
    from training.models import encoder_cfg, family
    from training.sample import Sampler

    cfg = load_config(config) if config else config_from_dict(stored_config(ckpt))
    # training.loop.train seeds these (seed_everything) right before it builds the model
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    torch.manual_seed(cfg.seed)
    model = family(cfg).build().to(device).eval()

    enc = build_encoders(encoder_cfg(cfg.encoders, torch.device(device)))
    return Sampler(cfg, model, enc, device)


def run(
    ckpt: str,
    eval_set: str,
    out_dir: str,
    metrics_yaml: str | None = None,
    baseline: str = "start",
    device: str = "cpu",
    config: str | None = None,
    **eval_kw,
) -> dict:
    """Evaluate the baseline and the checkpoint with one metric suite; returns {runs, reports, comparison}."""
    from curation.metrics import MetricSuite
    from training.eval_bench import BenchMetrics, load_eval_config
    from training.evaluate import evaluate, load_generator
    from training.opens2v import compare

    if not Path(ckpt).exists():
        raise FileNotFoundError(f"checkpoint {ckpt} does not exist (run `make train` or pass CKPT=...)")
    cfg, bench = load_eval_config(metrics_yaml)
    if cfg.device == "auto":
        cfg.device = device
    suite = MetricSuite(cfg).load()  # one suite, one set of models, for every run
    whole = BenchMetrics(bench, cfg.models_dir, cfg.device)
    out = Path(out_dir)
    stem = Path(ckpt).stem if Path(ckpt).is_file() else Path(ckpt).name
    runs: list[tuple[str, Path, object, str]] = []
    if baseline == "start":
        runs.append(
            ("start", out / "start", start_sampler(ckpt, device, config), f"{ckpt} (starting weights)")
        )
    elif baseline != "none":
        if not Path(baseline).exists():
            raise FileNotFoundError(f"baseline checkpoint {baseline} does not exist")
        b_stem = Path(baseline).stem if Path(baseline).is_file() else Path(baseline).name
        name = b_stem if b_stem != stem else f"baseline_{b_stem}"
        runs.append((name, out / name, load_generator(baseline, device=device, config=config)[0], baseline))
    runs.append((stem, out / stem, load_generator(ckpt, device=device, config=config)[0], ckpt))
    reports = {}
    for name, folder, sampler, source in runs:
        logging.getLogger(__name__).info("evaluating %s into %s", name, folder)
        reports[name] = evaluate(
            source,
            eval_set,
            str(folder),
            suite=suite,
            sampler=sampler,
            bench_metrics=whole,
            generator=f"training.sample.Sampler ({name})",
            **eval_kw,
        )
    result = {"runs": [n for n, *_ in runs], "reports": reports, "comparison": None}
    if len(runs) > 1:
        result["comparison"] = compare(
            [str(f) for _, f, _, _ in runs], out, md_name="eval.md", names=[n for n, *_ in runs]
        )
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.eval_compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", default=None, help="training checkpoint (.pt file or DCP folder)")
    ap.add_argument(
        "--eval-set",
        default=None,
        help="shard folder, store URI, .jsonl or OpenS2V case JSON (default: evaluation.opens2v.cases)",
    )
    ap.add_argument("--metrics", default=None, help="YAML with an `evaluation:` block (pipelines.yaml)")
    ap.add_argument("--out", default=None, help="output folder (default: runs/eval/<checkpoint stem>)")
    ap.add_argument(
        "--baseline",
        default="start",
        help="start (the weights training started from, default), another checkpoint, or none",
    )
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--w-img", type=float, default=3.0)
    ap.add_argument("--w-txt", type=float, default=7.5)
    ap.add_argument("--num-frames", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=0, help="at most this many cases (0: all)")
    ap.add_argument("--config", default=None, help="training config instead of the checkpoint's")
    ap.add_argument("--device", default=None)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from curation.config import ConfigError
    from curation.models import ModelHashMismatch, ModelNotFound

    if not a.ckpt:
        print(
            "error: no checkpoint: run `make train` (writes runs/train_tiny/checkpoints/step_*.pt) or pass "
            "--ckpt / CKPT=...",
            file=sys.stderr,
        )
        return 2
    import torch

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    stem = Path(a.ckpt).stem
    out = a.out or os.path.join("runs", "eval", stem)
    try:
        from training.eval_bench import load_eval_config
        from training.evaluate import iter_cases

        a.eval_set = a.eval_set or load_eval_config(a.metrics)[1].cases
        if not a.eval_set:
            raise ConfigError("no evaluation set: pass --eval-set or set evaluation.opens2v.cases")
        iter_cases(a.eval_set)  # one clear line for a missing or unknown set
        res = run(
            a.ckpt,
            a.eval_set,
            out,
            a.metrics,
            baseline=a.baseline,
            device=device,
            config=a.config,
            steps=a.steps,
            w_img=a.w_img,
            w_txt=a.w_txt,
            num_frames=a.num_frames,
            base_seed=a.seed,
            limit=a.limit,
        )
    except (ConfigError, ModelNotFound, ModelHashMismatch, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if res["comparison"] is not None:
        print(Path(out, "eval.md").read_text(encoding="utf-8").split("\n## Metric means per category")[0])
        print(f"wrote {out}/eval.md, {out}/index.html and one folder per run: {', '.join(res['runs'])}")
    else:
        name = res["runs"][0]
        print(Path(out, name, "eval.md").read_text(encoding="utf-8").split("## Cases")[0].rstrip())
        print(f"wrote {out}/{name}/eval.json, eval.md, index.html")
    return 0 if all(r["n_ok"] for r in res["reports"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
