"""OpenS2V-Eval on our evaluation: its case files, its normalisation and weighted total, videos of any model
by case id, and a side-by-side report of several evaluation runs.

    python -m training.evaluate --ckpt step_100.pt --eval-set OpenS2V-Eval/Open-Domain_Eval.json
    python -m training.evaluate --videos Results/Phantom --eval-set OpenS2V-Eval/Open-Domain_Eval.json
    python -m training.opens2v compare runs/eval/phantom runs/eval/step_100 --out runs/eval/compare

A case file (``Open-Domain_Eval.json``, ``Human-Domain_Eval.json``, ``Single-Domain_Eval.json``) maps a case
id (``singleobj_1``, ``multihuman_3``, ...) to ``{"img_paths": [...], "prompt": ..., "class_label": [...],
"synthesis_flag": ...}``; image paths are relative to the folder holding the JSON (the dataset root). The
id's prefix is its category. Per-case values come from curation.metrics; ``summarise`` turns them into the
benchmark's numbers as its eval/merge_result.py does: each metric's mean over cases (clamped), min-max
normalised, and the weighted total.
"""

from __future__ import annotations

import dataclasses
import html
import json
import os
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

# The benchmark's categories, by case-id prefix (unknown prefixes are reported under their own name).
CATEGORIES = {
    "singleface": "single face",
    "singlehuman": "single body",
    "singleobj": "single entity",
    "multiface": "multi face",
    "multihuman": "multi body",
    "multiobject": "multi entity",
    "humanobj": "human-entity",
    "faceobj": "face-entity",
}
# get_facesim.py scores only cases whose id has one of these (a single human reference).
FACE_CATEGORIES = ("singlehuman", "singleface", "faceobj", "humanobj")
HUMAN_LABELS = ("Man", "Woman")
HUMAN_PATH_PARTS = ("/man/", "/woman/", "/crop_man/", "/crop_woman/")

# merge_result.py: (benchmark key, our metric name, clamp lo, clamp hi); normalised = (mean - lo) / (hi - lo).
# The motion scores are |value| clamped to [0, 1]; NexusScore's mean leaves out zeros. Aesthetics and the two
# motion terms are training/eval_bench.py's (the benchmark's models and frame counts); the suite's own
# ``Aesthetic`` (another CLIP, other frames) never stands in for Aesthetics.
SCALE = {
    "aes_score": ("Aesthetics", "Aesthetics", 4.0, 7.0),
    "motion_smoothness": ("MotionSmoothness", "MotionSmoothness", 0.0, 1.0),
    "motion_amplitude": ("MotionAmplitude", "MotionAmplitude", 0.0, 1.0),
    "facesim_cur": ("FaceSim", "FaceSim-Cur", 0.0, 1.0),
    "gme_score": ("GmeScore", "GmeScore", 0.0, 1.0),
    "nexus_score": ("NexusScore", "NexusScore", 0.0, 0.05),
    "natural_score": ("NaturalScore", "NaturalScore", 1.0, 5.0),
}
# The total's weights (merge_result.py, leaderboard v1.1); Human-Domain has no NexusScore.
WEIGHTS = {
    "default": {
        "aes_score": 0.16,
        "motion_smoothness": 0.06,
        "motion_amplitude": 0.02,
        "facesim_cur": 0.20,
        "gme_score": 0.12,
        "nexus_score": 0.20,
        "natural_score": 0.24,
    },
    "Human-Domain": {
        "aes_score": 0.18,
        "motion_smoothness": 0.09,
        "motion_amplitude": 0.03,
        "facesim_cur": 0.25,
        "gme_score": 0.15,
        "natural_score": 0.30,
    },
}


@dataclasses.dataclass
class OpenS2VCase:
    key: str
    category: str
    refs: list[np.ndarray]
    prompt: str
    subjects: list[dict]
    error: str | None = None


def case_category(key: str) -> str:
    """``singleobj_12`` -> ``singleobj``."""
    return re.sub(r"_\d+$", "", key)


def is_case_file(path: str | os.PathLike) -> bool:
    """A JSON object of cases with ``img_paths`` and ``prompt`` (not one of our JSONL files)."""
    p = Path(path)
    if p.suffix != ".json" or not p.is_file():
        return False
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return False
    return (
        isinstance(data, dict)
        and bool(data)
        and all(isinstance(v, dict) and "img_paths" in v and "prompt" in v for v in data.values())
    )


def domain_of(path: str | os.PathLike) -> str:
    """``Human-Domain_Eval.json`` -> ``Human-Domain`` (which weights the total uses)."""
    return Path(path).stem.removesuffix("_Eval")


def subjects_of(key: str, img_paths: list[str], labels: list[str]) -> list[dict]:
    """One subject per reference: its class label as the name (``human`` for Man/Woman in body cases, as
    get_nexusscore.py renames it), category ``human`` for a person's reference, and ``nexus: False`` for
    the face references of face cases (get_nexusscore.py does not detect those)."""
    out = []
    for i, p in enumerate(img_paths):
        label = str(labels[i]) if i < len(labels) else ""
        person = label in HUMAN_LABELS or any(s in "/" + p.replace("\\", "/") for s in HUMAN_PATH_PARTS)
        name = "human" if "human" in key and label in HUMAN_LABELS else label
        s = {"name": name, "category": "human" if person else "object", "label": label}
        if "face" in key and label in HUMAN_LABELS:
            s["nexus"] = False
        out.append(s)
    return out


def iter_cases(
    path: str | os.PathLike, images_root: str | os.PathLike | None = None
) -> Iterator[OpenS2VCase]:
    """The benchmark's cases in file order; a case whose images cannot be read is one failed case."""
    from training.data import decode_image

    p = Path(path)
    root = Path(images_root) if images_root else p.resolve().parent
    data = json.loads(p.read_text(encoding="utf-8"))
    for key, row in data.items():
        cat = case_category(key)
        try:
            paths, labels = list(row.get("img_paths") or []), list(row.get("class_label") or [])
            prompt = str(row.get("prompt") or "")
            if not paths:
                raise ValueError("no img_paths")
            if not prompt.strip():
                raise ValueError("no prompt")
            refs = [decode_image((root / q).read_bytes()) for q in paths]
            yield OpenS2VCase(key, cat, refs, prompt, subjects_of(key, paths, labels))
        except Exception as e:  # a bad case is one failed case
            yield OpenS2VCase(key, cat, [], "", [], error=f"{p.name}:{key}: {type(e).__name__}: {e}")


# ---------------------------------------------------------------------------------------------------------
# the benchmark's numbers


def _values(records: list[dict], key: str) -> list[float]:
    _, ours, lo, hi = SCALE[key]
    out = []
    for r in records:
        if r.get("status", "ok") != "ok":
            continue
        if key == "facesim_cur" and case_category(r["key"]) not in FACE_CATEGORIES:
            continue
        v = ((r.get("metrics") or {}).get(ours) or {}).get("value")
        if v is None:
            continue
        v = float(v)
        if key == "aes_score" or key == "natural_score":
            v = min(max(v, lo), hi)
        elif key in ("motion_smoothness", "motion_amplitude"):
            v = min(abs(v), hi)
        elif key == "nexus_score":
            if v == 0:
                continue  # merge_result.py leaves zero NexusScores out of the mean
            v = min(v, hi)
        else:
            v = min(v, hi)
        out.append(v)
    return out


def score(records: list[dict], domain: str = "Open-Domain") -> dict:
    """The benchmark's normalised metrics and total over case records ({key, status, metrics: {name:
    {value}}}). A metric with no value in any case counts 0 in the total (as merge_result.py's average of
    nothing does) and is listed in ``missing``; ``complete`` says whether the total has every part."""
    weights = WEIGHTS.get(domain, WEIGHTS["default"])
    out: dict = {"domain": domain, "metrics": {}, "missing": []}
    total = 0.0
    for key, w in weights.items():
        label, ours, lo, hi = SCALE[key]
        vals = _values(records, key)
        mean = float(np.mean(vals)) if vals else 0.0
        norm = (mean - lo) / (hi - lo) if vals else 0.0
        total += w * norm
        out["metrics"][label] = {
            "normalised": round(norm, 6),
            "mean": round(mean, 6) if vals else None,
            "n": len(vals),
            "weight": w,
            "from": ours,
        }
        if not vals:
            out["missing"].append(label)
    out["total"] = round(total, 6)
    out["complete"] = not out["missing"]
    return out


def summarise(records: Iterable[dict], domain: str = "Open-Domain") -> dict:
    """``score`` over all cases and per category."""
    records = list(records)
    cats: dict[str, list[dict]] = {}
    for r in records:
        cats.setdefault(case_category(r["key"]), []).append(r)
    return {
        **score(records, domain),
        "categories": {c: {"label": CATEGORIES.get(c, c), **score(rs, domain)} for c, rs in cats.items()},
    }


def markdown(summary: dict) -> str:
    """eval.md's OpenS2V-Eval section: the normalised metrics and total, overall and per category."""
    names = list(summary["metrics"])
    head = "| | Total | " + " | ".join(names) + " |"
    lines = [
        "",
        f"## OpenS2V-Eval ({summary['domain']}, the benchmark's normalisation and weights)",
        "",
        head,
        "|---" * (len(names) + 2) + "|",
    ]

    def row(label, s):
        return (
            f"| {label} | {_pct(s['total'])} | " + " | ".join(_pct_m(s["metrics"][n]) for n in names) + " |"
        )

    lines.append(row("all", summary))
    for c, s in summary.get("categories", {}).items():
        lines.append(row(f"{c} ({s['label']})", s))
    if summary["missing"]:
        lines += ["", f"Not computed (count 0 in the total): {', '.join(summary['missing'])}."]
    return "\n".join(lines) + "\n"


def _pct(v) -> str:
    return "—" if v is None else f"{100 * v:.2f}%"


def _pct_m(m: dict) -> str:
    return "—" if not m["n"] else _pct(m["normalised"])


# ---------------------------------------------------------------------------------------------------------
# another model's videos


class VideoFolder:
    """Videos another model produced for the cases, one file per case id (``singleobj_1.mp4``, as the
    benchmark's Results folders name them)."""

    EXTS = (".mp4", ".webm", ".mov", ".mkv", ".avi")

    def __init__(self, folder: str | os.PathLike):
        self.dir = Path(folder)
        if not self.dir.is_dir():
            raise FileNotFoundError(f"videos folder {self.dir} does not exist")
        self.files = {f.stem: f for f in sorted(self.dir.iterdir()) if f.suffix.lower() in self.EXTS}

    def read(self, key: str) -> tuple[np.ndarray, float]:
        """(T, H, W, 3) uint8 frames and frames per second of the case's video."""
        import av

        f = self.files.get(key)
        if f is None:
            raise FileNotFoundError(f"no video for case {key} in {self.dir}")
        with av.open(str(f)) as c:
            s = c.streams.video[0]
            fps = float(s.average_rate or 8.0)
            frames = np.stack([fr.to_ndarray(format="rgb24") for fr in c.decode(s)])
        return frames, fps


# ---------------------------------------------------------------------------------------------------------
# several runs side by side


def _load_run(run_dir: Path) -> dict:
    f = run_dir / "eval.json"
    if not f.is_file():
        raise FileNotFoundError(f"{f} does not exist (not an evaluation run folder)")
    return json.loads(f.read_text(encoding="utf-8"))


def compare(
    run_dirs: list[str | os.PathLike],
    out_dir: str | os.PathLike,
    md_name: str = "compare.md",
    names: list[str] | None = None,
) -> dict:
    """``md_name`` and index.html in ``out_dir``: the runs' metric means side by side (with the change from
    the first run to the second when there are two), the means per case category, the OpenS2V-Eval
    normalised scores and total per category when the runs have them, and every case with its references,
    prompt and each run's video. ``names``: the runs' labels (default: their folder names)."""
    if len(run_dirs) < 2:
        raise ValueError("compare needs two or more evaluation runs")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = [(Path(d), _load_run(Path(d))) for d in run_dirs]
    names = list(names) if names else [_run_name(d, r) for d, r in runs]
    if len(names) != len(runs):
        raise ValueError(f"{len(names)} names for {len(runs)} runs")
    metrics = list(dict.fromkeys(n for _, r in runs for n in r.get("metrics", {})))
    two = len(runs) == 2
    lines = ["# Comparison", "", "| run | source | cases ok |", "|---|---|---|"]
    for n, (_d, r) in zip(names, runs):
        lines.append(
            f"| {n} | `{r.get('checkpoint')}` ({r.get('generator')}) | {r.get('n_ok')}/{r.get('n_cases')} |"
        )
    lines += [
        "",
        "## Metric means",
        "",
        "| metric | " + " | ".join(names) + (f" | {names[1]} − {names[0]}" if two else "") + " |",
        "|---" * (len(names) + 1 + two) + "|",
    ]
    means: dict[str, list] = {}
    for m in metrics:
        cells, vals = [], []
        for _, r in runs:
            st = r.get("metrics", {}).get(m, {})
            t = r.get("summary", {}).get(m, {})
            vals.append(None if st.get("status") == "off" else t.get("mean"))
            cells.append("off" if st.get("status") == "off" else _num(t.get("mean")))
        means[m] = vals
        if two:
            cells.append(_num(vals[1] - vals[0]) if None not in vals else "—")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    by_cat = [_category_means(r) for _, r in runs]
    cats = sorted({c for b in by_cat for c in b})
    if cats:
        lines += ["", "## Metric means per category", ""]
        for cat in cats:
            n_cases = [str(b.get(cat, {}).get("_n", 0)) for b in by_cat]
            lines += [
                f"### {cat}"
                + (f" ({CATEGORIES[cat]})" if cat in CATEGORIES else "")
                + f" — cases: {' / '.join(n_cases)}",
                "",
                "| metric | " + " | ".join(names) + (" | change" if two else "") + " |",
                "|---" * (len(names) + 1 + two) + "|",
            ]
            for m in metrics:
                vals = [b.get(cat, {}).get(m) for b in by_cat]
                if all(v is None for v in vals):
                    continue
                cells = [_num(v) for v in vals]
                if two:
                    cells.append(_num(vals[1] - vals[0]) if None not in vals else "—")
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
            lines.append("")
    o = [r.get("opens2v") for _, r in runs]
    table = {}
    if any(o):
        cats = list(dict.fromkeys(c for s in o if s for c in s.get("categories", {})))
        cols = list(next(s for s in o if s)["metrics"])
        lines += ["", "## OpenS2V-Eval (normalised, the benchmark's total)", ""]
        for scope in ["all", *cats]:
            lines += [
                f"### {scope}" + (f" ({CATEGORIES.get(scope, scope)})" if scope != "all" else ""),
                "",
                "| run | Total | " + " | ".join(cols) + " |",
                "|---" * (len(cols) + 2) + "|",
            ]
            for n, s in zip(names, o):
                s = s if scope == "all" or not s else s.get("categories", {}).get(scope)
                if not s:
                    lines.append(f"| {n} | — |" + " — |" * len(cols))
                    continue
                table.setdefault(scope, {})[n] = s["total"]
                if scope == "all":
                    means.setdefault("OpenS2V total", [None] * len(runs))[names.index(n)] = s["total"]
                lines.append(
                    f"| {n} | {_pct(s['total'])} | "
                    + " | ".join(_pct_m(s["metrics"][c]) for c in cols)
                    + " |"
                )
            lines.append("")
    (out / md_name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    _compare_html(out, runs, names, "\n".join(lines))
    return {"runs": names, "metrics": metrics, "totals": table, "means": means}


def _category_means(run: dict) -> dict[str, dict]:
    """{category: {metric: mean over the category's ok cases with a value, "_n": cases}} from a run's
    case records (``category`` as training.evaluate records it; the case id's prefix otherwise)."""
    acc: dict[str, dict[str, list[float]]] = {}
    count: dict[str, int] = {}
    for c in run.get("cases", []):
        if c.get("status") != "ok":
            continue
        cat = c.get("category") or case_category(c["key"])
        count[cat] = count.get(cat, 0) + 1
        for m, s in (c.get("metrics") or {}).items():
            if s.get("value") is not None:
                acc.setdefault(cat, {}).setdefault(m, []).append(float(s["value"]))
    return {
        cat: {"_n": n, **{m: float(np.mean(v)) for m, v in acc.get(cat, {}).items()}}
        for cat, n in count.items()
    }


def _run_name(d: Path, r: dict) -> str:
    return d.name or str(d)


def _num(v) -> str:
    return "—" if v is None else f"{v:.4f}"


def _compare_html(out: Path, runs: list[tuple[Path, dict]], names: list[str], md: str) -> None:
    e = html.escape
    by_key: dict[str, list[dict | None]] = {}
    for i, (_, r) in enumerate(runs):
        for c in r.get("cases", []):
            by_key.setdefault(c["key"], [None] * len(runs))[i] = c
    cards = []
    for key, recs in by_key.items():
        first = next(c for c in recs if c)
        d0 = runs[recs.index(first)][0]
        refs = "".join(
            f'<img class="ref" src="{e(os.path.relpath(d0 / p, out))}">' for p in first.get("ref_files", [])
        )
        cols = []
        for n, (d, _), c in zip(names, runs, recs):
            if not c or c.get("status") != "ok":
                cols.append(
                    f"<td><b>{e(n)}</b><br><span class='err'>"
                    f"{e(str((c or {}).get('error', 'no case')))}</span></td>"
                )
                continue
            vals = "".join(
                f"<tr><td>{e(m)}</td><td>{_num(s.get('value'))}</td></tr>"
                for m, s in c.get("metrics", {}).items()
            )
            src = e(os.path.relpath(d / c["video"], out)) if c.get("video") else ""
            cols.append(
                f"<td><b>{e(n)}</b><br><video src='{src}' controls loop muted autoplay playsinline></video>"
                f"<table>{vals}</table></td>"
            )
        cards.append(
            f"<div class='card'><h3>{e(key)} <small>{e(CATEGORIES.get(case_category(key), ''))}</small></h3>"
            f"<p class='prompt'>{e(first.get('prompt', ''))}</p><div>{refs}</div>"
            f"<table><tr>{''.join(cols)}</tr></table></div>"
        )
    page = (
        "<!doctype html><meta charset='utf-8'><title>Comparison</title><style>"
        "body{font-family:sans-serif;margin:1em} .card{border:1px solid #ccc;margin:1em 0;padding:.5em}"
        "img.ref{height:112px;margin:2px;border:3px solid #36c} video{height:176px;background:#000}"
        "td{vertical-align:top;padding:1px 8px} .err{color:#b00} small{color:#666}</style>"
        f"<h1>Comparison of {e(', '.join(names))}</h1><pre>{e(md)}</pre>{''.join(cards)}"
    )
    (out / "index.html").write_text(page, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m training.opens2v", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compare", help="two or more evaluation runs side by side")
    c.add_argument("runs", nargs="+", help="evaluation run folders (each with eval.json)")
    c.add_argument("--out", required=True)
    c.add_argument("--names", nargs="+", default=None, help="the runs' labels (default: folder names)")
    a = ap.parse_args(argv)
    try:
        compare(a.runs, a.out, names=a.names)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print((Path(a.out) / "compare.md").read_text(encoding="utf-8"))
    print(f"wrote {a.out}/compare.md, {a.out}/index.html")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
