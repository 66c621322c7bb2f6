"""Pairing-band calibration CLI: fit the pair step's [low, high] for an image embedder on labelled pairs.

    python -m curation.calibrate fit --groups DIR [--categories]
        planted groups: DIR/<identity>/ (or DIR/<category>/<identity>/) holds one subject's images; a
        sub-folder there is one clip's crops of it. Same, different and near-copy pairs are formed from them.
    python -m curation.calibrate fit --pairs FILE
        labelled pairs: JSONL or CSV of image_a, image_b, label (same | different | copy), paths relative
        to the file's folder (a folder path: one subject's crops)
    python -m curation.calibrate build-set DIR
        the bundled calibration set: package photos and footage the bundled sample does not use

Cross-video subject pairs are kept when the cosine of their embeddings lies in [low, high]: above ``high``
is copy-paste, below ``low`` another subject. The band belongs to one embedder, so it is fitted here, on
pairs the curated data is not then scored on: ``high`` rejects ``copy_target`` of the copies and keeps as
many same-subject pairs as it can; ``low`` then keeps the most same-subject pairs (recall) at a band
precision (same vs different) of at least ``precision_target``. Each edge sits mid-gap next to the
same-subject score that decides it. Crops are embedded as the subject_embed stage embeds them (RGB uint8,
the configured backend) and a subject's crops are averaged as the global phase averages them. ``fit``
writes calibration.json and calibration.png and prints the YAML to paste; it exits 1 when no band reaches
the precision target, 2 on a bad set or config.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import os
import shutil
import sys
import zlib
from pathlib import Path

import numpy as np

from curation.config import ConfigError, load_config
from curation.stage import build_backend

LABELS = ("same", "different", "copy")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SET_MARKER = "CALIBRATION_SET.json"  # written by build-set; lets a rebuild clear its own folder only
SET_VERSION = "1"  # bump when the bundled set's images change


class CalibrationError(ValueError):
    """A labelled set that cannot be used as given; the message names the file, line and what is wrong."""


# ---------------------------------------------------------------------------------------------------------
# The fit: pure functions of three score arrays.


def band_metrics(same, different, copy, low: float, high: float) -> dict[str, float]:
    """Figures of the band [low, high] (edges inclusive, as ``pairing.classify``) on labelled pair scores.
    ``precision``: the same-subject share of the same and different pairs the band keeps (copies are the
    upper edge's business: ``copy_rejected``); ``precision_with_copies`` counts kept copies as wrong too;
    ``recall``: the share of same-subject pairs kept."""
    same, different, copy = (np.asarray(a, np.float64) for a in (same, different, copy))

    def kept(s):
        return int(((s >= low) & (s <= high)).sum())

    tp, fd, fc = kept(same), kept(different), kept(copy)
    return {
        "low": float(low),
        "high": float(high),
        "precision": tp / (tp + fd) if tp + fd else 0.0,
        "recall": tp / len(same) if len(same) else 0.0,
        "precision_with_copies": tp / (tp + fd + fc) if tp + fd + fc else 0.0,
        "same_kept": tp,
        "different_kept": fd,
        "copy_kept": fc,
        "same_above_high": float((same > high).mean()) if len(same) else 0.0,
        "copy_rejected": float((copy > high).mean()) if len(copy) else 0.0,
        "different_rejected": float((different < low).mean()) if len(different) else 0.0,
    }


def _round_inside(x: float, lo: float, hi: float, decimals: int) -> float:
    """``x`` rounded to the fewest places (``decimals`` or more, up to 8) that keep it in [lo, hi], so the
    printed edge classifies every score as the fitted one does."""
    for d in range(decimals, 9):
        step = 10.0**-d
        for r in (round(x, d), math.floor(x / step) * step, math.ceil(x / step) * step):
            r = round(r, d)
            if lo <= r <= hi:
                return r
    return x


def fmt_edge(x: float) -> str:
    """A band edge as the fit rounded it (at least three places: 0.8 -> 0.800, 0.8191 -> 0.8191)."""
    s = f"{x:.8f}".rstrip("0")
    return s if len(s.split(".")[1]) >= 3 else f"{x:.3f}"


def _count_le(s_sorted: np.ndarray, t) -> np.ndarray:
    return np.searchsorted(s_sorted, t, side="right")


def _count_lt(s_sorted: np.ndarray, t) -> np.ndarray:
    return np.searchsorted(s_sorted, t, side="left")


def fit_high(same, copy, copy_target: float = 0.95, decimals: int = 3) -> float | None:
    """The upper edge (scores above it are copies): it keeps as many same-subject pairs as an edge that
    rejects at least ``copy_target`` of the copies can, and of those edges the one that rejects the most
    copies: mid-gap between the highest same-subject score it keeps and the next score above. None without
    copy pairs (nothing to fit it on)."""
    same, copy = np.sort(np.asarray(same, np.float64)), np.sort(np.asarray(copy, np.float64))
    if not len(copy):
        return None
    u = np.unique(np.concatenate([same, copy]))  # a threshold t in [u_i, u_i+1) classifies as t = u_i
    rejected = 1.0 - _count_le(copy, u) / len(copy)
    feasible = np.nonzero(rejected >= copy_target - 1e-12)[0]
    if not len(feasible):  # the lowest score is a copy: only an edge below everything rejects them all
        return _round_inside(float(copy[0]) - 0.005, -1.0, np.nextafter(copy[0], -np.inf), decimals)
    kept_same = same[same <= u[feasible[-1]]]
    lo = float(kept_same[-1]) if len(kept_same) else float(u[0]) - 0.01
    above = u[u > lo]
    hi = float(above[0]) if len(above) else min(1.0, lo + 0.01)
    # the rounded edge must keep lo and reject hi (score <= high is kept)
    return _round_inside((lo + hi) / 2, lo, np.nextafter(hi, -np.inf), decimals)


def fit_low(
    same, different, high: float, precision_target: float = 0.95, decimals: int = 3
) -> tuple[float, bool]:
    """The lower edge under a fixed ``high``: it keeps as many same-subject pairs (recall) as an edge whose
    band precision (same vs different) reaches ``precision_target`` can, and of those edges the most
    precise one: mid-gap between the lowest same-subject score it keeps and the next score below. (low,
    target met); when no edge reaches the target, the one of best precision (then recall) with False."""
    same, different = (np.sort(np.asarray(a, np.float64)) for a in (same, different))
    u = np.unique(np.concatenate([same, different]))
    u = u[u <= high]
    if not len(u) or not (same <= high).any():
        return float(high), False
    # kept counts for the band [t, high] at every t = u_i (a threshold in (u_i-1, u_i] classifies the same)
    tp = _count_le(same, high) - _count_lt(same, u)
    fp = _count_le(different, high) - _count_lt(different, u)
    prec = np.where(tp > 0, tp / np.maximum(tp + fp, 1), 0.0)
    feasible = np.nonzero(prec >= precision_target - 1e-12)[0]
    met = bool(len(feasible))
    # recall only falls as the edge rises: the lowest feasible edge keeps the most; else best precision
    a = int(feasible[0]) if met else int(np.lexsort((-tp, -prec))[0])
    # raising the edge up to the lowest same score it keeps drops different pairs only
    kept_same = same[(same >= u[a]) & (same <= high)]
    hi = float(kept_same[0]) if len(kept_same) else float(u[a])
    below = u[u < hi]
    lo = float(below[-1]) if len(below) else max(-1.0, hi - 0.02)
    return _round_inside((lo + hi) / 2, np.nextafter(lo, np.inf), hi, decimals), met


def fit_band(
    same,
    different,
    copy,
    precision_target: float = 0.95,
    copy_target: float = 0.95,
    default_high: float = 0.99,
    decimals: int = 3,
) -> dict:
    """The band for three score arrays: ``high`` from same vs copy (``default_high`` when there are no copy
    pairs), then ``low`` from same vs different under it. Returns the band's figures (``band_metrics``)
    plus ``precision_target``, ``copy_target``, ``target_met`` and ``high_fitted``."""
    high = fit_high(same, copy, copy_target, decimals)
    high_fitted = high is not None
    if high is None:
        high = float(default_high)
    low, met = fit_low(same, different, high, precision_target, decimals)
    return {
        **band_metrics(same, different, copy, low, high),
        "precision_target": float(precision_target),
        "copy_target": float(copy_target),
        "target_met": met,
        "high_fitted": high_fitted,
    }


def score_summary(s) -> dict[str, float]:
    s = np.asarray(s, np.float64)
    if not len(s):
        return {"n": 0}
    q = np.percentile(s, [1, 5, 50, 95, 99])
    return {
        "n": int(len(s)),
        "min": float(s.min()),
        "p01": float(q[0]),
        "p05": float(q[1]),
        "median": float(q[2]),
        "p95": float(q[3]),
        "p99": float(q[4]),
        "max": float(s.max()),
    }


# ---------------------------------------------------------------------------------------------------------
# Labelled sets: items (images, or near-copies made of them in memory) and pairs of item indices.


@dataclasses.dataclass(frozen=True)
class Item:
    """One subject: its crops (one image, or the images of a clip folder: the global phase's subject vector
    is the unit mean of a subject's crop embeddings, taken at several reference frames of its clip)."""

    paths: tuple[str, ...]  # absolute, inside the set's folder
    copy_seed: int = -1  # >= 0: a near-identical copy of the crops (near_copy with this seed)
    identity: str = ""
    category: str = ""


@dataclasses.dataclass
class PairSet:
    root: str
    items: list[Item]
    pairs: np.ndarray  # (P, 2) int64 item indices
    labels: np.ndarray  # (P,) str, one of LABELS

    def counts(self) -> dict[str, int]:
        return {lab: int((self.labels == lab).sum()) for lab in LABELS}


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def _inside(base: str, path: str | os.PathLike) -> str | None:
    full = os.path.realpath(path)
    return full if os.path.commonpath([base, full]) == base else None


def confined(root: str | os.PathLike, rel: str, where: str) -> tuple[str, ...]:
    """The crops ``rel`` names inside the folder ``root`` (an image, or a folder of images: one subject's
    crops), symlinks followed; CalibrationError when it is absolute, leads outside ``root``, or is missing."""
    base = os.path.realpath(root)
    if not rel or os.path.isabs(rel) or (len(rel) > 1 and rel[1] == ":"):
        raise CalibrationError(f"{where}: image path {rel!r} must be relative to the set's folder {base}")
    full = _inside(base, os.path.join(base, rel))
    if full is None:
        raise CalibrationError(
            f"{where}: image path {rel!r} resolves outside the set's folder {base}; paths must stay inside it"
        )
    if os.path.isdir(full):
        crops = tuple(_inside(base, p) for p in _images_in(Path(full)))
        if not crops or None in crops:
            raise CalibrationError(f"{where}: folder {rel!r} holds no images inside {base}")
        return crops
    if not os.path.isfile(full):
        raise CalibrationError(f"{where}: image {rel!r} does not exist in {base}")
    return (full,)


def read_pair_file(path: str | os.PathLike) -> PairSet:
    """A labelled pair file: ``.jsonl`` (one object per line) or ``.csv`` (a header row), each record with
    ``image_a``, ``image_b`` and ``label`` (same | different | copy). An image path is relative to the file's
    folder and may not leave it; a path to a folder names one subject by all the images in it."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"pair file {path} does not exist")
    root = str(path.parent)
    records: list[tuple[str, dict]] = []
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            for i, rec in enumerate(csv.DictReader(f), start=2):
                records.append((f"{path}:{i}", rec))
    elif path.suffix.lower() in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError as e:
                    raise CalibrationError(f"{path}:{i}: not a JSON object ({e})") from None
                records.append((f"{path}:{i}", rec))
    else:
        raise CalibrationError(f"{path}: a pair file is .jsonl or .csv")
    index: dict[tuple[str, ...], int] = {}
    items: list[Item] = []
    pairs, labels = [], []
    for where, rec in records:
        if not isinstance(rec, dict) or not all(rec.get(k) for k in ("image_a", "image_b", "label")):
            raise CalibrationError(f"{where}: a record needs image_a, image_b and label")
        label = str(rec["label"]).strip().lower()
        if label not in LABELS:
            raise CalibrationError(f"{where}: label {rec['label']!r}; allowed: {list(LABELS)}")
        ends = []
        for key in ("image_a", "image_b"):
            crops = confined(root, str(rec[key]).strip(), f"{where} {key}")
            if crops not in index:
                index[crops] = len(items)
                items.append(Item(crops))
            ends.append(index[crops])
        pairs.append(ends)
        labels.append(label)
    if not pairs:
        raise CalibrationError(f"{path}: no pairs")
    return PairSet(os.path.realpath(root), items, np.array(pairs, np.int64).reshape(-1, 2), np.array(labels))


def read_groups(
    root: str | os.PathLike, categories: bool = False, copies_per_item: int = 1, seed: int = 0
) -> PairSet:
    """Planted groups: ``root/<identity>/`` holds one subject's images, each one crop, and sub-folders, each
    one clip's crops of it (averaged as the global phase averages a subject's reference crops). With
    ``categories`` the layout is ``root/<category>/<identity>/`` and different-subject pairs are formed
    within a category only, as the pair step compares subjects of one category. Same: every two items of an
    identity; different: every two items of different identities; copy: ``copies_per_item`` near-identical
    copies of each item (``near_copy``)."""
    base = os.path.realpath(root)
    if not os.path.isdir(base):
        raise CalibrationError(f"groups folder {root} does not exist")

    def subdirs(d: Path) -> list[Path]:
        return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))

    top = subdirs(Path(base))
    layout = [(c.name, d) for c in top for d in subdirs(c)] if categories else [("", d) for d in top]
    items: list[Item] = []
    for category, d in layout:
        identity = f"{category}/{d.name}" if category else d.name
        units = [(p,) for p in _images_in(d)] + [tuple(_images_in(c)) for c in subdirs(d)]
        for unit in units:
            crops = tuple(_inside(base, p) for p in unit)
            if None in crops:
                raise CalibrationError(f"{d}: an image resolves outside the groups folder {base}")
            if crops:
                items.append(Item(crops, identity=identity, category=category))
    if not items:
        hint = (
            "<category>/<identity>/"
            if categories
            else "<identity>/ (or <category>/<identity>/ with --categories)"
        )
        raise CalibrationError(f"{base}: no images ({', '.join(IMAGE_EXTS)}) in {hint} folders")
    n = len(items)
    ident = np.array([it.identity for it in items])
    cat = np.array([it.category for it in items])
    i, j = np.triu_indices(n, k=1)
    same = ident[i] == ident[j]
    diff = ~same & (cat[i] == cat[j])
    pairs = [np.stack([i[same], j[same]], 1), np.stack([i[diff], j[diff]], 1)]
    labels = [np.full(int(same.sum()), "same"), np.full(int(diff.sum()), "different")]
    copies = []
    for k in range(n):
        for c in range(copies_per_item):
            copies.append((k, n + len(copies)))
            # seeded by the path inside the set, so a copy does not depend on where the set lies
            rel = os.path.relpath(items[k].paths[0], base)
            seed_k = zlib.crc32(f"{rel}:{c}:{seed}".encode()) & 0x7FFFFFFF
            items.append(dataclasses.replace(items[k], copy_seed=seed_k))
    if copies:
        pairs.append(np.array(copies, np.int64))
        labels.append(np.full(len(copies), "copy"))
    return PairSet(base, items, np.concatenate(pairs).astype(np.int64), np.concatenate(labels))


def load_rgb(path: str) -> np.ndarray:
    """An image file as RGB uint8 (H, W, 3); transparency is flattened onto white."""
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in ("RGBA", "LA", "P"):
            im = im.convert("RGBA")
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, im)
        return np.asarray(im.convert("RGB"))


def jpeg_roundtrip(img: np.ndarray, quality: int) -> np.ndarray:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"))


def near_copy(img: np.ndarray, seed: int) -> np.ndarray:
    """A near-identical copy, as a re-upload or a reference cut from the clip itself would be: up to 3% cut
    off each side, resized by 0.8-1.0, JPEG re-encoded at quality 75-92."""
    import cv2

    rng = np.random.default_rng(seed)
    h, w = img.shape[:2]
    t, b, left, r = (int(rng.uniform(0, 0.03) * s) for s in (h, h, w, w))
    out = img[t : h - b, left : w - r]
    f = rng.uniform(0.8, 1.0)
    out = cv2.resize(out, (max(1, round(out.shape[1] * f)), max(1, round(out.shape[0] * f))), cv2.INTER_AREA)
    return jpeg_roundtrip(np.ascontiguousarray(out), int(rng.integers(75, 93)))


def load_item(item: Item) -> list[np.ndarray]:
    """The item's crops as RGB uint8, near-copied when the item is a copy."""
    crops = [load_rgb(p) for p in item.paths]
    if item.copy_seed < 0:
        return crops
    return [near_copy(c, item.copy_seed + k) for k, c in enumerate(crops)]


# ---------------------------------------------------------------------------------------------------------
# The embedder, from pipelines.yaml as the subject_embed stage builds it, or by name.


def pipeline_steps(config_path: str, pipeline: str = "") -> tuple[str, dict, dict, str]:
    """(pipeline name, the subject_embed step's backend mapping, the pair step's params, models_dir)."""
    cfg = load_config(config_path)
    name = pipeline or cfg.default_pipeline
    if name not in cfg.pipelines:
        raise ConfigError(f"pipelines: {name!r} is not one of {sorted(cfg.pipelines)}")
    steps = {s.stage: s for s in cfg.pipelines[name]}
    if "subject_embed" not in steps:
        raise ConfigError(f"pipelines.{name}: has no subject_embed step, so no image embedder to calibrate")
    pair = steps["pair"].params if "pair" in steps else {}
    return name, dict(steps["subject_embed"].backend), dict(pair), cfg.models_dir


def build_embedder(backend: dict, models_dir: str = "models"):
    """The image embedder the subject_embed stage would build from this backend mapping."""
    from curation.backends import embedders  # noqa: F401  (registers the image embedders)

    cfg = dict(backend)
    name = cfg.pop("name", "mobilenet_v2")
    return build_backend("image_embedder", name, models_dir=models_dir, **cfg)


def unit_mean(x: np.ndarray) -> np.ndarray:
    m = np.asarray(x, np.float64).mean(0)
    return (m / max(float(np.linalg.norm(m)), 1e-12)).astype(np.float32)


def embed_items(embedder, items: list[Item], batch: int = 32) -> np.ndarray:
    """(N, D) float32 unit rows, one per item: its crops embedded by the backend (``batch`` crops a call,
    as subject_embed embeds its crops), then their unit mean (as the global phase forms a subject's
    vector)."""
    rows, pending, owners = [], [], []

    def flush():
        if pending:
            rows.append(np.asarray(embedder.embed(pending), np.float32))  # (b, D)
            pending.clear()

    for k, it in enumerate(items):
        for crop in load_item(it):
            pending.append(crop)
            owners.append(k)
            if len(pending) >= batch:
                flush()
    flush()
    crops = np.concatenate(rows)  # (sum of crops, D)
    owners = np.array(owners)
    return np.stack([unit_mean(crops[owners == k]) for k in range(len(items))])


def pair_scores(x: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Cosine per pair: (P,) float64 from unit rows ``x`` (N, D) and item pairs (P, 2)."""
    return np.einsum("pd,pd->p", x[pairs[:, 0]], x[pairs[:, 1]]).astype(np.float64)


# ---------------------------------------------------------------------------------------------------------
# Outputs: the JSON of the fit, the plot, the YAML lines.


def plot_scores(by_label: dict[str, np.ndarray], low: float, high: float, path: str, title: str) -> None:
    """Histograms (densities) of the three score distributions with the band shaded, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    lo = min([low] + [float(s.min()) for s in by_label.values() if len(s)])
    bins = np.linspace(max(-1.0, lo - 0.05), 1.0, 61)
    colours = {"same": "tab:green", "different": "tab:red", "copy": "tab:purple"}
    for lab in LABELS:
        s = by_label.get(lab, np.zeros(0))
        if len(s):
            ax.hist(s, bins=bins, density=True, alpha=0.5, color=colours[lab], label=f"{lab} (n={len(s)})")
    ax.axvspan(low, high, color="tab:blue", alpha=0.08)
    for v, name in ((low, "low"), (high, "high")):
        ax.axvline(v, color="tab:blue", lw=1.5, ls="--")
        ax.text(v, ax.get_ylim()[1] * 0.95, f" {name} {fmt_edge(v)}", color="tab:blue", va="top", fontsize=8)
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def yaml_lines(fit: dict, embedder: str, pipeline: str, set_desc: str) -> str:
    return (
        f"# pipelines.yaml, pipelines.{pipeline}, the pair step's params (subject band for {embedder}):\n"
        f"      # band fitted by `python -m curation.calibrate` on {set_desc}: precision "
        f"{fit['precision']:.3f}, recall {fit['recall']:.3f}\n"
        f"      low: {fmt_edge(fit['low'])}, high: {fmt_edge(fit['high'])}"
    )


def item_name(item: Item, root: str) -> str:
    """The item as the set names it: its image, or its clip folder, relative to the set's folder."""
    p = item.paths[0] if len(item.paths) == 1 else os.path.dirname(item.paths[0])
    return os.path.relpath(p, root) + (" (near copy)" if item.copy_seed >= 0 else "")


def hardest_pairs(pairset: PairSet, scores: np.ndarray, n: int = 10) -> dict[str, list]:
    """Per label the ``n`` pairs nearest the wrong side of a band: the lowest same and copy scores, the
    highest different ones, as [score, item a, item b]."""
    out = {}
    for lab in LABELS:
        idx = np.nonzero(pairset.labels == lab)[0]
        order = idx[np.argsort(scores[idx])]
        pick = order[::-1][:n] if lab == "different" else order[:n]
        out[lab] = [
            [
                round(float(scores[k]), 4),
                *(item_name(pairset.items[i], pairset.root) for i in pairset.pairs[k]),
            ]
            for k in pick
        ]
    return out


def calibrate(
    pairset: PairSet,
    embedder,
    precision_target: float = 0.95,
    copy_target: float = 0.95,
    default_high: float = 0.99,
    band: tuple[float, float] | None = None,
) -> tuple[dict, dict[str, np.ndarray]]:
    """Embed the set, score its pairs, fit the band; also the figures at ``band`` (e.g. the configured one)
    when given. Returns the fit record (JSON-able) and the scores per label."""
    x = embed_items(embedder, pairset.items)
    s = pair_scores(x, pairset.pairs)
    by_label = {lab: s[pairset.labels == lab] for lab in LABELS}
    fit = fit_band(*(by_label[lab] for lab in LABELS), precision_target, copy_target, default_high)
    rec = {
        "embedder": getattr(embedder, "name", type(embedder).__name__),
        "embedder_describe": getattr(embedder, "describe", ""),
        "embedding_dim": int(x.shape[1]),
        "set": pairset.root,
        "n_items": len({it.paths for it in pairset.items}),
        "n_images": len({p for it in pairset.items for p in it.paths}),
        "n_pairs": pairset.counts(),
        "fit": fit,
        "scores": {lab: score_summary(v) for lab, v in by_label.items()},
    }
    if band is not None:
        rec["configured"] = band_metrics(*(by_label[lab] for lab in LABELS), band[0], band[1])
    rec["hardest"] = hardest_pairs(pairset, s)
    return rec, by_label


# ---------------------------------------------------------------------------------------------------------
# The bundled calibration set: real photos and footage from installed packages that the bundled sample
# (curation/demo/footage.py) does not use.

OPENCV_DATA = "/usr/share/doc/opencv-doc/examples/data"  # Debian opencv-doc (`make setup` installs it)
FRAME_W, FRAME_H = 448, 336  # the planted views' frame, as the sample's footage

# category -> identity -> its real views: (asset, crop box x0, y0, x1, y1 or None for the whole image). An
# asset with several frames ("megamind:12,20,28") is a clip: its crops are one subject's reference crops.
# Several real views of one subject where the packages have them (clips of other shots of the same
# character, another viewpoint or lighting, the same box in a cluttered scene).
# fmt: off
CALIBRATION_SUBJECTS: dict[str, dict[str, list[tuple[str, tuple[int, int, int, int] | None]]]] = {
    "human": {
        "cameraman": [("skimage:camera", (0, 60, 340, 512))],
        "footballer": [("opencv:messi5.jpg", (60, 55, 460, 342))],
        "tom_hanks": [("insightface:Tom_Hanks_54745.png", None)],
        "thrower": [("opencv:basketball1.png", (30, 70, 165, 480))],
        "shirt_man": [("opencv:basketball1.png", (430, 20, 640, 480))],
    },
    "ip_character": {  # Megamind.avi: two characters, each in two shots
        "roxanne": [("megamind:12,20,28", (120, 30, 400, 528)),
                    ("megamind:72,80,88", (60, 20, 420, 528)),
                    ("megamind:162,170,178", (80, 0, 470, 528))],
        "bernard": [("megamind:112,120,128", (330, 0, 640, 528)),
                    ("megamind:210,215,223", (100, 0, 620, 528)),
                    ("megamind:247,255,263", (200, 0, 640, 528))],
        "happy_fish": [("opencv:HappyFish.jpg", None)],
    },
    "animal": {
        "squirrel": [("opencv:squirrel_cls.jpg", (120, 90, 360, 360))],
        "baboon": [("opencv:baboon.jpg", None)],
        "butterfly": [("opencv:butterfly.jpg", None)],
        "dog": [("opencv:chicky_512.png", None)],
    },
    "product": {
        "apple": [("opencv:apple.jpg", None)],
        "orange": [("opencv:orange.jpg", None)],
        "present": [("matplotlib:Minduka_Present_Blue_Pack.png", None)],
        "motorcycle": [("skimage:motorcycle_left", (90, 100, 690, 460))],
        "cookie_box": [("opencv:box.png", None), ("opencv:box_in_scene.png", (95, 150, 265, 390))],
    },
    "landmark": {
        "graffiti": [("opencv:graf1.png", None), ("opencv:graf3.png", None)],
        "leuven_street": [("opencv:leuvenA.jpg", None), ("opencv:leuvenB.jpg", None)],
        "aerial_city": [("opencv:aero1.jpg", None)],  # (aero3 overlaps it only in part: not the same view)
        "home": [("opencv:home.jpg", None)],
        "building": [("opencv:building.jpg", None)],
    },
    "other": {
        "starry_night": [("opencv:starry_night.jpg", None)],
        "smarties": [("opencv:smarties.png", None)],
        "fruits": [("opencv:fruits.jpg", None)],
        "coins": [("skimage:coins", None)],
    },
}
# backgrounds of the planted clips: frames of real footage with no subject of the set
CALIBRATION_BACKGROUNDS = ["vtest:0", "vtest:300", "vtest:700", "tree:20", "tree:60"]
VIDEOS = {"megamind": "Megamind.avi", "vtest": "vtest.avi", "tree": "tree.avi"}  # opencv-doc's real AVIs
REF_FRACTIONS = (0.05, 0.5, 0.95)  # where along a planted clip its reference crops are taken
# fmt: on


def _opencv_data(what: str) -> str:
    if not os.path.isdir(OPENCV_DATA):
        raise CalibrationError(
            f"{OPENCV_DATA} is missing: the calibration set uses the photos and AVIs of Debian's opencv-doc; "
            "`make setup` installs it (or `apt-get install opencv-doc`)"
        )
    return os.path.join(OPENCV_DATA, what)


def video_frames(video: str, indices: set[int]) -> dict[int, np.ndarray]:
    """Frames of one of opencv-doc's AVIs by index, RGB uint8, in one decode (PyAV)."""
    import av

    path, got = _opencv_data(VIDEOS[video]), {}
    with av.open(path) as c:
        for i, frame in enumerate(c.decode(video=0)):
            if i in indices:
                got[i] = frame.to_ndarray(format="rgb24")
            if len(got) == len(indices):
                return got
    raise CalibrationError(f"{path}: has no frames {sorted(indices - set(got))}")


def load_asset(name: str) -> np.ndarray:
    """A photo of the calibration set as RGB uint8: ``skimage:<name>``, ``opencv:<file>`` (opencv-doc),
    ``insightface:<file>``, ``matplotlib:<file>``."""
    import importlib.util

    kind, _, what = name.partition(":")
    if kind == "skimage":
        import skimage.data as sd

        img = sd.stereo_motorcycle()[0] if what == "motorcycle_left" else getattr(sd, what)()
        return np.ascontiguousarray(np.repeat(img[..., None], 3, 2) if img.ndim == 2 else img[..., :3])
    if kind == "matplotlib":
        import matplotlib.cbook

        return load_rgb(str(matplotlib.cbook.get_sample_data(what, asfileobj=False)))
    if kind == "insightface":
        spec = importlib.util.find_spec("insightface")
        if spec is None or not spec.submodule_search_locations:
            raise CalibrationError(
                "package insightface is not installed (it carries a photo); run `make setup`"
            )
        return load_rgb(os.path.join(list(spec.submodule_search_locations)[0], "data", "images", what))
    if kind == "opencv":
        return load_rgb(_opencv_data(what))
    raise KeyError(name)


def load_view(name: str, frame_cache: dict) -> list[np.ndarray]:
    """A view's frames: one photo, or the listed frames of a video (``megamind:12,20,28``)."""
    kind, _, what = name.partition(":")
    if kind not in VIDEOS:
        return [load_asset(name)]
    idx = [int(i) for i in what.split(",")]
    missing = {i for i in idx if (kind, i) not in frame_cache}
    if missing:
        frame_cache.update({(kind, i): f for i, f in video_frames(kind, missing).items()})
    return [frame_cache[(kind, i)] for i in idx]


def recolour(
    img: np.ndarray, gamma: float, brightness: float, hue_deg: float, saturation: float
) -> np.ndarray:
    import cv2

    f = np.power(img.astype(np.float32) / 255.0, gamma) * brightness
    out = np.clip(f * 255.0 + 0.5, 0, 255).astype(np.uint8)
    hsv = cv2.cvtColor(out, cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 0] = (hsv[..., 0] + hue_deg / 2.0) % 180.0  # OpenCV's uint8 hue is degrees / 2
    hsv[..., 1] = np.clip(hsv[..., 1] * saturation, 0, 255)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)


def planted_clip(subject: np.ndarray, background: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """The subject seen again in another clip: resized to 45-85% of a 448x336 frame's height, maybe
    mirrored, turned by up to 10 degrees, relit and recoloured, pasted with a soft edge onto a crop of
    ``background`` and moved along a straight path; at each of REF_FRACTIONS of the path it is cut out by its
    box grown 5% per side (as subject_embed pads its boxes). Returns those crops."""
    import cv2

    bh, bw = background.shape[:2]
    s = min(bw / FRAME_W, bh / FRAME_H) * rng.uniform(0.6, 1.0)  # a random crop of the background
    cw, ch = int(FRAME_W * s), int(FRAME_H * s)
    x0, y0 = int(rng.integers(0, bw - cw + 1)), int(rng.integers(0, bh - ch + 1))
    bg = cv2.resize(background[y0 : y0 + ch, x0 : x0 + cw], (FRAME_W, FRAME_H), interpolation=cv2.INTER_AREA)
    img = subject[:, ::-1] if rng.random() < 0.5 else subject
    img = recolour(
        np.ascontiguousarray(img),
        gamma=rng.uniform(0.8, 1.25),
        brightness=rng.uniform(0.85, 1.15),
        hue_deg=rng.uniform(-15, 15),
        saturation=rng.uniform(0.6, 1.3),
    )
    h, w = img.shape[:2]
    scale = min(FRAME_H * rng.uniform(0.45, 0.85) / h, FRAME_W * 0.9 / w)
    rot = math.radians(rng.uniform(-10, 10))
    # the turned, scaled subject's canvas (ow, oh), with a feathered-rectangle alpha
    sw, sh = w * scale, h * scale
    ow = min(FRAME_W, int(abs(sw * math.cos(rot)) + abs(sh * math.sin(rot))) + 1)
    oh = min(FRAME_H, int(abs(sw * math.sin(rot)) + abs(sh * math.cos(rot))) + 1)
    m = cv2.getRotationMatrix2D((w / 2, h / 2), math.degrees(rot), scale)
    m[:, 2] += (ow / 2 - w / 2, oh / 2 - h / 2)
    yy, xx = (np.mgrid[0:h, 0:w] + 0.5) / np.array([h, w])[:, None, None]
    alpha = np.clip(np.minimum.reduce([xx, 1 - xx, yy, 1 - yy]) / 0.06, 0, 1).astype(np.float32)
    sub = cv2.warpAffine(img, m, (ow, oh), flags=cv2.INTER_AREA).astype(np.float32)
    a = cv2.warpAffine(alpha, m, (ow, oh), flags=cv2.INTER_LINEAR)[..., None]  # (oh, ow, 1)
    ys, xs = np.nonzero(a[..., 0] > 0.5)
    p0, p1 = rng.uniform(0, 1, 2), rng.uniform(0, 1, 2)  # path ends as fractions of the free room
    crops = []
    for t in REF_FRACTIONS:
        fx, fy = p0 + t * (p1 - p0)
        px, py = int(fx * (FRAME_W - ow)), int(fy * (FRAME_H - oh))
        frame = bg.copy()
        region = frame[py : py + oh, px : px + ow].astype(np.float32)
        frame[py : py + oh, px : px + ow] = (a * sub + (1 - a) * region + 0.5).astype(np.uint8)
        bx0, by0, bx1, by1 = xs.min() + px, ys.min() + py, xs.max() + px + 1, ys.max() + py + 1
        gx, gy = (bx1 - bx0) * 0.05, (by1 - by0) * 0.05
        cx0, cy0 = max(0, int(bx0 - gx)), max(0, int(by0 - gy))
        cx1, cy1 = min(FRAME_W, math.ceil(bx1 + gx)), min(FRAME_H, math.ceil(by1 + gy))
        crops.append(np.ascontiguousarray(frame[cy0:cy1, cx0:cx1]))
    return crops


def _save_jpeg(img: np.ndarray, path: Path, quality: int = 90, max_side: int = 0) -> None:
    from PIL import Image

    im = Image.fromarray(img)
    if max_side and max(im.size) > max_side:
        f = max_side / max(im.size)
        im = im.resize((max(1, round(im.width * f)), max(1, round(im.height * f))), Image.Resampling.LANCZOS)
    im.save(path, format="JPEG", quality=quality)


def _save_item(crops: list[np.ndarray], d: Path, name: str, max_side: int = 0) -> list[str]:
    """One crop as ``d/<name>.jpg``, several as ``d/<name>/f<k>.jpg`` (a clip). Returns the relative paths."""
    if len(crops) == 1:
        _save_jpeg(crops[0], d / f"{name}.jpg", max_side=max_side)
        return [f"{name}.jpg"]
    (d / name).mkdir()
    for k, c in enumerate(crops):
        _save_jpeg(c, d / name / f"f{k}.jpg", max_side=max_side)
    return [f"{name}/f{k}.jpg" for k in range(len(crops))]


def build_calibration_set(out: str | os.PathLike, planted_clips: int = 5, seed: int = 0) -> dict:
    """Write the bundled calibration set as planted groups, ``out/<category>/<identity>/``: each subject's
    real views (a photo's crop, long side at most 448 px, or a folder of a video clip's crops) and
    ``planted_clips`` planted clips (folders of ``planted_clip`` crops on footage backgrounds). Images only
    from installed packages, none of which the bundled sample uses. A folder that holds anything but an
    earlier set is refused. Returns the set's record (also written to ``out/CALIBRATION_SET.json``)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not (out / SET_MARKER).is_file():
            raise CalibrationError(f"{out} is not empty and holds no calibration set; choose another folder")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    frames: dict = {}
    backgrounds = [load_view(b, frames)[0] for b in CALIBRATION_BACKGROUNDS]
    record: dict = {"version": SET_VERSION, "seed": seed, "planted_clips": planted_clips, "items": {}}
    for category, subjects in CALIBRATION_SUBJECTS.items():
        for identity, views in subjects.items():
            d = out / category / identity
            d.mkdir(parents=True)
            rng = np.random.default_rng([seed, zlib.crc32(identity.encode())])
            firsts = []
            for k, (name, box) in enumerate(views):
                crops = [
                    np.ascontiguousarray(f[box[1] : box[3], box[0] : box[2]] if box else f)
                    for f in load_view(name, frames)
                ]
                firsts.append(crops[len(crops) // 2])
                files = _save_item(crops, d, f"real{k}", max_side=FRAME_W)
                record["items"][f"{category}/{identity}/real{k}"] = {
                    "asset": name,
                    "box": box,
                    "files": files,
                }
            for k in range(planted_clips):
                v, b = int(rng.integers(len(firsts))), int(rng.integers(len(backgrounds)))
                files = _save_item(planted_clip(firsts[v], backgrounds[b], rng), d, f"planted{k}")
                record["items"][f"{category}/{identity}/planted{k}"] = {
                    "asset": views[v][0],
                    "box": views[v][1],
                    "planted_on": CALIBRATION_BACKGROUNDS[b],
                    "files": files,
                }
    (out / SET_MARKER).write_text(json.dumps(record, indent=1))
    return record


# ---------------------------------------------------------------------------------------------------------
# The CLI.


def _opt(kv: str) -> tuple[str, object]:
    import yaml

    k, sep, v = kv.partition("=")
    if not sep or not k:
        raise argparse.ArgumentTypeError(f"--embedder-opt {kv!r}: expected KEY=VALUE")
    return k, yaml.safe_load(v)


def cmd_fit(args) -> int:
    pipeline, backend, pair, models_dir = pipeline_steps(args.config, args.pipeline)
    if args.embedder:  # by name: the configured settings only when they are for the same backend
        backend = {
            **(backend if backend.get("name", "mobilenet_v2") == args.embedder else {}),
            "name": args.embedder,
        }
    backend.update(dict(args.embedder_opt or []))
    band = (float(pair.get("low", 0.78)), float(pair.get("high", 0.99))) if pair else None
    if args.pairs:
        pairset = read_pair_file(args.pairs)
        set_desc = f"the labelled pairs {args.pairs}"
    else:
        pairset = read_groups(args.groups, args.categories, args.copies_per_item, args.seed)
        set_desc = f"the planted groups {args.groups}"
    counts = pairset.counts()
    if not counts["same"]:
        raise CalibrationError(f"{set_desc}: no same-subject pairs; the band cannot be fitted")
    try:
        embedder = build_embedder(backend, models_dir)
    except (ValueError, FileNotFoundError, TypeError) as e:  # unknown name or setting, missing weights
        raise CalibrationError(f"image embedder {backend}: {e}") from None
    rec, by_label = calibrate(
        pairset, embedder, args.precision, args.copy_recall, band[1] if band else 0.99, band
    )
    fit = rec["fit"]
    rec.update(pipeline=pipeline, config=str(args.config), backend=backend)
    out = Path(args.out or os.path.join("output", "calibration", rec["embedder"]))
    out.mkdir(parents=True, exist_ok=True)
    title = (
        f"{rec['embedder']} on {pairset.root}\n{counts['same']} same, {counts['different']} different, "
        f"{counts['copy']} copy pairs; band [{fmt_edge(fit['low'])}, {fmt_edge(fit['high'])}]: "
        f"precision {fit['precision']:.3f}, recall {fit['recall']:.3f}"
    )
    plot_scores(by_label, fit["low"], fit["high"], str(out / "calibration.png"), title)
    with open(out / "calibration.json", "w") as f:
        json.dump(rec, f, indent=1)
    print(f"embedder: {rec['embedder']} ({rec['embedder_describe']}), dim {rec['embedding_dim']}")
    print(
        f"set: {pairset.root}: {rec['n_items']} subjects ({rec['n_images']} images); pairs: "
        + ", ".join(f"{k} {v}" for k, v in counts.items())
    )
    for lab in LABELS:
        s = rec["scores"][lab]
        if s["n"]:
            print(
                f"  {lab:9s} scores: min {s['min']:.3f}  p05 {s['p05']:.3f}  median {s['median']:.3f}  "
                f"p95 {s['p95']:.3f}  max {s['max']:.3f}"
            )
    print(
        f"fitted band: low {fmt_edge(fit['low'])}, high {fmt_edge(fit['high'])}"
        + ("" if fit["high_fitted"] else " (high as configured: no copy pairs to fit it on)")
    )
    print(
        f"  precision {fit['precision']:.3f} (target {fit['precision_target']}), recall {fit['recall']:.3f}, "
        f"copies rejected {fit['copy_rejected']:.3f} (target {fit['copy_target']}), "
        f"different rejected {fit['different_rejected']:.3f}"
    )
    if "configured" in rec:
        c = rec["configured"]
        print(
            f"configured band (pipelines.{pipeline}): low {c['low']}, high {c['high']}: "
            f"precision {c['precision']:.3f}, recall {c['recall']:.3f}, "
            f"copies rejected {c['copy_rejected']:.3f}"
        )
    print(f"wrote {out / 'calibration.json'} and {out / 'calibration.png'}")
    print(yaml_lines(fit, rec["embedder"], pipeline, set_desc))
    if not fit["target_met"]:
        print(
            f"warning: no band reaches precision {fit['precision_target']} on this set; the band above has "
            "the best precision found",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_build_set(args) -> int:
    rec = build_calibration_set(args.dir, args.planted_clips, args.seed)
    n_id = sum(len(v) for v in CALIBRATION_SUBJECTS.values())
    n_files = sum(len(v["files"]) for v in rec["items"].values())
    print(
        f"wrote {len(rec['items'])} items ({n_files} images) of {n_id} identities "
        f"in {len(CALIBRATION_SUBJECTS)} categories to {args.dir}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m curation.calibrate", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    fit = sub.add_parser("fit", help="fit low/high for the configured (or named) embedder on labelled pairs")
    src = fit.add_mutually_exclusive_group(required=True)
    src.add_argument("--groups", help="planted groups: DIR/<identity>/ (images, clip folders of crops)")
    src.add_argument("--pairs", help="labelled pairs: .jsonl or .csv of image_a, image_b, label")
    fit.add_argument("--config", default="pipelines.yaml")
    fit.add_argument(
        "--pipeline", default="", help="whose subject_embed backend and pair band (default: the config's)"
    )
    fit.add_argument(
        "--embedder", default="", help="an image_embedder backend by name instead of the configured one"
    )
    fit.add_argument(
        "--embedder-opt",
        type=_opt,
        action="append",
        metavar="KEY=VALUE",
        help="a backend setting (e.g. arch=ViT-H-14, model_path=...); repeatable",
    )
    fit.add_argument(
        "--precision", type=float, default=0.95, help="band precision target for low (default 0.95)"
    )
    fit.add_argument(
        "--copy-recall", type=float, default=0.95, help="share of copy pairs high must reject (default 0.95)"
    )
    fit.add_argument(
        "--categories", action="store_true", help="--groups: the layout is DIR/<category>/<identity>/"
    )
    fit.add_argument("--copies-per-item", type=int, default=1, help="--groups: near-copies made per item")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument(
        "--out",
        default="",
        help="folder for calibration.json and calibration.png (default output/calibration/<embedder>)",
    )
    fit.set_defaults(run=cmd_fit)
    build = sub.add_parser(
        "build-set", help="write the bundled calibration set (package photos, not the sample's)"
    )
    build.add_argument("dir")
    build.add_argument("--planted-clips", type=int, default=5)
    build.add_argument("--seed", type=int, default=0)
    build.set_defaults(run=cmd_build_set)
    args = ap.parse_args(argv)
    try:
        return args.run(args)
    except (CalibrationError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
