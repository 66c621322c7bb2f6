"""Shard inspection CLI: ``python -m curation.inspect {stats,validate,show,html,quality} SHARDS_DIR``, where
SHARDS_DIR is a local folder or a store URI (``s3://bucket/run/shards``)."""

from __future__ import annotations

import argparse
import collections
import html
import io
import json
import os
import sys
from pathlib import Path

import numpy as np

from curation.scenarios import TAXONOMY
from curation.scenarios import labels as scenario_labels
from curation.scenarios import primary as primary_scenario
from curation.shards import (
    INDEX_NAMES,
    TAR_ERRORS,
    index_entries,
    index_file,
    iter_tar_samples,
    read_index,
    shard_sha256,
)
from curation.storage import Store

REF_NAMES = [f"ref_{i}.jpg" for i in range(4)]


def shard_files(shards_dir: str | os.PathLike) -> list[str]:
    """The shards named by the index (in order), else every shard-*.tar in the folder: paths, or URIs for a
    store URI."""
    store = Store(shards_dir)
    return [store.uri_of(e["name"]) for e in index_entries(shards_dir)[1]]


def iter_samples(shards_dir: str | os.PathLike, limit: int = 0):
    """(shard name, key, {ext: bytes}) over all shards; unreadable shards are skipped (``validate`` names
    them)."""
    n = 0
    for path in shard_files(shards_dir):
        name = os.path.basename(path)
        try:
            for key, sample in iter_tar_samples(path):
                yield name, key, sample
                n += 1
                if limit and n >= limit:
                    return
        except TAR_ERRORS as e:
            print(f"warning: {name}: {e}", file=sys.stderr)


def decode_video(data: bytes, n_frames: int = 0):
    """(frame count, (H, W), frames) of an mp4 held in memory, read with decord; ``n_frames`` evenly spaced
    frames are returned (RGB uint8)."""
    import decord

    vr = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1)
    n = len(vr)
    frames = None
    if n_frames:
        idx = np.linspace(0, n - 1, n_frames).round().astype(int).tolist()
        frames = vr.get_batch(idx).asnumpy()
    h, w = vr[0].shape[:2]
    return n, (h, w), frames


def decode_jpeg(data: bytes) -> np.ndarray:
    import cv2

    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError("not a decodable JPEG")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


# --- stats --------------------------------------------------------------------------------------------------


def hist_bars(counts, edges, width: int = 40, indent: str = "  ") -> list[str]:
    """A histogram as text bars, one line per bin: ``[lo, hi)  ████▌ count`` (the last bin is closed)."""
    counts = [int(c) for c in counts]
    top = max(counts, default=0) or 1
    lo_w = max(len(f"{e:.3g}") for e in edges)
    lines = []
    for i, c in enumerate(counts):
        units = c / top * width * 2  # half-block resolution
        bar = "\u2588" * int(units // 2) + ("\u258c" if int(units) % 2 else "")
        if c and not bar:
            bar = "\u258f"  # a non-empty bin always shows
        close = "]" if i == len(counts) - 1 else ")"
        lines.append(f"{indent}[{edges[i]:>{lo_w}.3g}, {edges[i + 1]:>{lo_w}.3g}{close} {bar:<{width}} {c}")
    return lines


def _hist_lines(values: list[float], bins: int = 10) -> list[str]:
    if not values:
        return ["  (none)"]
    counts, edges = np.histogram(values, bins=bins)
    return hist_bars(counts, edges)


def stats(shards_dir: str, as_json: bool = False) -> dict:
    by_type, by_cat, by_refs = collections.Counter(), collections.Counter(), collections.Counter()
    by_scen, by_primary = collections.Counter(), collections.Counter()
    scores: dict[str, list[float]] = collections.defaultdict(list)
    n = 0
    for _, _, s in iter_samples(shards_dir):
        meta = json.loads(s["json"])
        n += 1
        by_type[meta.get("pair_type")] += 1
        by_refs[sum(k in s for k in REF_NAMES)] += 1
        scen = meta.get("scenarios")
        if scen is None:  # shards written before scenario labels: derive them the same way
            scen = scenario_labels([sub.get("category") for sub in meta.get("subjects") or []],
                                   meta.get("caption") or "")
        by_scen.update(scen)
        by_primary[meta.get("primary_scenario") or primary_scenario(scen)] += 1
        for sub in meta.get("subjects") or []:
            by_cat[sub.get("category")] += 1
            for k in ("similarity", "face_similarity"):
                if isinstance(sub.get(k), (int, float)):
                    scores[k].append(float(sub[k]))
        for k, v in (meta.get("scores") or {}).items():
            scores[k].append(float(v))
    out = {
        "samples": n,
        "pair_type": dict(by_type),
        "category": dict(by_cat),
        "n_refs": {str(k): v for k, v in sorted(by_refs.items())},
        "scenario": dict(by_scen),
        "primary_scenario": dict(by_primary),
        "scenario_missing": [k for k in TAXONOMY if not by_scen.get(k)],
        "histograms": {
            k: dict(zip(("counts", "edges"), (c.tolist(), e.round(4).tolist())))
            for k, v in scores.items()
            for c, e in [np.histogram(v, bins=10)]
        },
    }
    if as_json:
        print(json.dumps(out, indent=1, sort_keys=True))
    else:
        print(f"samples: {n}")
        for title, c in (("pair type", by_type), ("category", by_cat), ("references", by_refs),
                         ("scenario", by_scen), ("primary scenario", by_primary)):
            print(
                f"{title}: " + ", ".join(f"{k}={v}" for k, v in sorted(c.items(), key=lambda kv: str(kv[0])))
            )
        if out["scenario_missing"]:
            print("scenarios with no sample (supplement these): " + ", ".join(out["scenario_missing"]))
        for k, v in sorted(scores.items()):
            print(f"{k} (n={len(v)}, min {min(v):.4g}, max {max(v):.4g}):")
            print("\n".join(_hist_lines(v)))
    return out


# --- validate -----------------------------------------------------------------------------------------------


def _box_ok(box, w: int, h: int, slack_px: float = 1.0) -> bool:
    if (
        not isinstance(box, (list, tuple))
        or len(box) != 4
        or not all(isinstance(v, (int, float)) for v in box)
    ):
        return False
    x0, y0, x1, y1 = box
    return -slack_px <= x0 < x1 <= w + slack_px and -slack_px <= y0 < y1 <= h + slack_px


def check_sample(key: str, s: dict) -> list[str]:
    """Problems of one sample (empty when it is sound)."""
    problems = []
    for ext in ("mp4", "txt", "json"):
        if ext not in s:
            problems.append(f"missing {ext}")
    refs = [k for k in REF_NAMES if k in s]
    extra = sorted(k for k in s if k.startswith("ref_") and k not in REF_NAMES)
    if not refs or refs != REF_NAMES[: len(refs)] or extra:
        problems.append(f"references must be ref_0.jpg..ref_3.jpg without gaps, found {sorted(refs + extra)}")
    meta = None
    if "json" in s:
        try:
            meta = json.loads(s["json"])
        except ValueError as e:
            problems.append(f"json does not parse: {e}")
    if meta is not None and meta.get("key") not in (None, key):
        problems.append(f"json key {meta.get('key')!r} differs from the sample key")
    size = None
    if "mp4" in s:
        try:
            n, (h, w), _ = decode_video(s["mp4"])
            size = (w, h)
            if n < 1:
                problems.append("mp4 has no frames")
        except Exception as e:  # decord raises its own error types
            problems.append(f"mp4 does not decode: {type(e).__name__}: {str(e)[:80]}")
    for k in refs:
        try:
            img = decode_jpeg(s[k])
            if min(img.shape[:2]) < 2:
                problems.append(f"{k} is empty")
        except ValueError as e:
            problems.append(f"{k}: {e}")
    if "txt" in s:
        try:
            s["txt"].decode("utf-8")
        except UnicodeDecodeError:
            problems.append("txt is not UTF-8")
    if meta is not None:
        subjects = meta.get("subjects") or []
        if len(subjects) != len(refs):
            problems.append(f"{len(subjects)} subjects in json but {len(refs)} reference images")
        if size and (meta.get("width"), meta.get("height")) != size:
            problems.append(
                f"json size {meta.get('width')}x{meta.get('height')} != video {size[0]}x{size[1]}"
            )
        for i, sub in enumerate(subjects):
            if (sub.get("ref") or {}).get("file") != f"ref_{i}.jpg":
                problems.append(f"subject {i} does not point at ref_{i}.jpg")
            if size:
                for b in sub.get("boxes") or []:
                    if not _box_ok(b.get("box"), *size):
                        problems.append(
                            f"subject {i}: box {b.get('box')} outside the {size[0]}x{size[1]} frame"
                        )
    return problems


def validate(shards_dir: str) -> int:
    """Check every shard against the index and every sample; print what is broken. 0 when all is sound.
    ``shards_dir`` is a local folder or a store URI (the same checks, objects streamed)."""
    store = Store(shards_dir)
    bad: dict[str, list[str]] = collections.defaultdict(list)
    index = None
    try:
        index = read_index(shards_dir)
    except (OSError, ValueError) as e:
        bad[INDEX_NAMES[0]].append(f"unreadable index: {e}")
    on_disk = [n for n in store.list() if "/" not in n and n.startswith("shard-") and n.endswith(".tar")]
    entries = index["shards"] if index else [{"name": n} for n in on_disk]
    listed = {e["name"] for e in entries}
    for name in on_disk:
        if name not in listed:
            bad[name].append("shard not in the index")
    n_samples = 0
    for e in entries:
        try:
            present = store.is_file(e["name"])
        except ValueError:  # a name from the index that climbs out of the folder
            bad[e["name"]].append("escapes the shards folder")
            continue
        if not present:
            bad[e["name"]].append("missing")
            continue
        path = store.uri_of(e["name"])
        size = store.size(e["name"])
        if "bytes" in e and size != e["bytes"]:
            bad[e["name"]].append(f"size {size} != index {e['bytes']}")
        if "sha256" in e and shard_sha256(path) != e["sha256"]:
            bad[e["name"]].append("sha256 differs from the index")
        keys = []
        try:
            for key, s in iter_tar_samples(path):
                keys.append(key)
                for problem in check_sample(key, s):
                    bad[e["name"]].append(f"{key}: {problem}")
        except TAR_ERRORS as err:
            bad[e["name"]].append(f"unreadable tar: {type(err).__name__}: {err}")
        n_samples += len(keys)
        if "keys" in e and keys != e["keys"]:
            bad[e["name"]].append(f"keys differ from the index ({len(keys)} read, {len(e['keys'])} listed)")
        elif "samples" in e and len(keys) != e["samples"]:
            bad[e["name"]].append(f"{len(keys)} samples, index says {e['samples']}")
    if index and index.get("total_samples") not in (None, n_samples):
        bad[os.path.basename(index_file(shards_dir))].append(
            f"total_samples {index['total_samples']} != {n_samples} read"
        )
    for name, problems in sorted(bad.items()):
        print(f"BROKEN {name}:")
        for pr in problems[:50]:
            print(f"  {pr}")
    print(f"{len(entries)} shards, {n_samples} samples, {len(bad)} broken")
    return 1 if bad else 0


# --- show / html --------------------------------------------------------------------------------------------


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


BOX_COLOUR = (0, 200, 0)  # the subject's box
CROP_COLOUR = (255, 140, 0)  # the reference crop's own box, when its source frame is in this clip


def read_frames_at(data: bytes, indices: list[int]) -> np.ndarray:
    """RGB uint8 frames (N, H, W, 3) of an in-memory mp4 at ``indices`` (clamped), one decord call."""
    import decord

    vr = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1)
    n = len(vr)
    return vr.get_batch([min(max(int(i), 0), n - 1) for i in indices]).asnumpy()


def subject_views(sample: dict, meta: dict) -> list[dict]:
    """Per subject with a box: its frame with the box drawn, the reference crop, and a label.

    In-pair references are cropped from this clip: the frame is the crop's source frame, with the crop box
    drawn too. A cross-pair reference comes from another clip, which the sample does not hold: the frame is
    the subject's frame in this clip (the target), with its box."""
    from PIL import Image, ImageDraw

    ref_frames = meta.get("ref_frames") or []
    plans = []
    for i, sub in enumerate(meta.get("subjects") or []):
        boxes = [b for b in sub.get("boxes") or [] if isinstance(b.get("box"), list) and len(b["box"]) == 4]
        ref = sub.get("ref") or {}
        if not boxes or f"ref_{i}.jpg" not in sample:
            continue
        own = ref.get("clip_id") is not None and ref.get("clip_id") == meta.get("clip_id")
        want = ref.get("ref_index") if own else 1  # the middle reference frame of the target by default
        b = next((b for b in boxes if b.get("ref") == want), boxes[0])
        r = b.get("ref") if isinstance(b.get("ref"), int) else 0
        fi = (ref_frames[r] or {}).get("frame_index") if 0 <= r < len(ref_frames) else None
        plans.append((i, sub, ref, own and r == ref.get("ref_index"), b["box"], fi if fi is not None else 0))
    if not plans:
        return []
    frames = read_frames_at(sample["mp4"], [p[-1] for p in plans])
    views = []
    for (i, sub, ref, source, box, fi), frame in zip(plans, frames):
        im = Image.fromarray(frame)
        draw = ImageDraw.Draw(im)
        lw = max(2, round(max(im.size) / 120))
        draw.rectangle([float(v) for v in box], outline=BOX_COLOUR, width=lw)
        crop_box = ref.get("crop_box")
        if source and isinstance(crop_box, list) and len(crop_box) == 4:
            draw.rectangle([float(v) for v in crop_box], outline=CROP_COLOUR, width=max(1, lw // 2))
        where = "source frame" if source else f"target frame (ref from {ref.get('clip_id')})"
        views.append(
            {
                "subject": i,
                "frame": im,
                "crop": Image.fromarray(decode_jpeg(sample[f"ref_{i}.jpg"])),
                "label": f"ref_{i} {sub.get('name')}: {where}, frame {fi}",
            }
        )
    return views


def contact_sheet(sample: dict, n_frames: int = 4, tile_px: int = 160) -> Image.Image:  # noqa: F821
    """References and evenly spaced video frames (top row); below, each subject's frame with its box drawn
    beside its reference crop; caption and ids under them."""
    import textwrap

    from PIL import Image, ImageDraw

    meta = json.loads(sample["json"])
    refs = [decode_jpeg(sample[k]) for k in REF_NAMES if k in sample]
    _, _, frames = decode_video(sample["mp4"], n_frames)
    tiles = [Image.fromarray(im) for im in refs] + [Image.fromarray(f) for f in frames]
    views = subject_views(sample, meta)
    pairs = [(v["frame"].copy(), v["crop"].copy()) for v in views]
    for t in tiles + [t for p in pairs for t in p]:
        t.thumbnail((tile_px, tile_px))
    gap = 8
    width = max(len(tiles) * (tile_px + gap) + 3 * gap, len(pairs) * (2 * tile_px + 3 * gap) + gap)
    caption = textwrap.wrap(sample.get("txt", b"").decode("utf-8", "replace"), width=max(40, width // 8))
    lines = [f"{meta.get('key')}  {meta.get('pair_type')}  refs={len(refs)}"] + caption
    for i, sub in enumerate(meta.get("subjects") or []):
        r = sub.get("ref") or {}
        sim = sub.get("similarity")
        lines.append(
            f"ref_{i}: {sub.get('name')} ({sub.get('category')}) from {r.get('clip_id')} "
            f"t={r.get('t_s')}s" + (f" sim={sim:.3f}" if isinstance(sim, float) else "")
        )
    lines += [v["label"] for v in views]
    row2 = tile_px + 2 * gap if pairs else 0
    sheet = Image.new("RGB", (width, tile_px + 2 * gap + row2 + 16 * len(lines) + gap), "white")
    draw = ImageDraw.Draw(sheet)
    x = gap
    for i, t in enumerate(tiles):
        if i == len(refs):
            x += gap  # a wider gap between references and video frames
        sheet.paste(t, (x, gap))
        x += tile_px + gap
    x, y = gap, tile_px + 2 * gap
    for frame, crop in pairs:
        sheet.paste(frame, (x, y))
        sheet.paste(crop, (x + frame.size[0] + gap // 2, y))
        x += 2 * tile_px + 3 * gap
    font = _font(13)
    for j, line in enumerate(lines):
        draw.text((gap, tile_px + 2 * gap + row2 + 16 * j), line, fill="black", font=font)
    return sheet


def show(shards_dir: str, out_dir: str, keys: list[str] | None = None, limit: int = 8) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for _, key, s in iter_samples(shards_dir):
        if keys and key not in keys:
            continue
        path = os.path.join(out_dir, f"{key}.png")
        contact_sheet(s).save(path)
        written.append(path)
        print(path)
        if len(written) >= limit:
            break
    return written


def gallery(shards_dir: str, out_dir: str, limit: int = 100, n_frames: int = 3) -> str:
    """A static page ``index.html`` with references, video frames, caption and metadata of up to ``limit``
    samples; the images are written beside it under ``img/``."""
    from PIL import Image

    img_dir = Path(out_dir) / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    cards = []
    for shard, key, s in iter_samples(shards_dir, limit):
        meta = json.loads(s["json"])
        cells = []
        for k in REF_NAMES:
            if k in s:
                (img_dir / f"{key}.{k}").write_bytes(s[k])
                cells.append(f'<img class="ref" src="img/{key}.{k}" title="{k}">')
        _, _, frames = decode_video(s["mp4"], n_frames)
        for i, f in enumerate(frames):
            im = Image.fromarray(f)
            im.thumbnail((240, 240))
            im.save(img_dir / f"{key}.frame{i}.jpg", quality=85)
            cells.append(f'<img class="frame" src="img/{key}.frame{i}.jpg">')
        boxes = []
        for v in subject_views(s, meta):
            im = v["frame"]
            im.thumbnail((320, 320))
            name = f"{key}.box{v['subject']}.jpg"
            im.save(img_dir / name, quality=85)
            boxes.append(
                f'<figure><img class="box" src="img/{name}">'
                f'<img class="ref" src="img/{key}.ref_{v["subject"]}.jpg">'
                f"<figcaption>{html.escape(v['label'])}</figcaption></figure>"
            )
        subj = "".join(
            f"<li>{html.escape(str(x.get('name')))} ({html.escape(str(x.get('category')))}), ref from "
            f"{html.escape(str((x.get('ref') or {}).get('clip_id')))}, sim {x.get('similarity')}</li>"
            for x in meta.get("subjects") or []
        )
        cards.append(
            f'<div class="card"><h3>{html.escape(key)} <small>{html.escape(str(meta.get("pair_type")))} · '
            f"{html.escape(shard)}</small></h3><div>{''.join(cells)}</div>"
            f'<div class="boxes">{"".join(boxes)}</div>'
            f"<p>{html.escape(s.get('txt', b'').decode('utf-8', 'replace'))}</p><ul>{subj}</ul></div>"
        )
    page = (
        "<!doctype html><meta charset='utf-8'><title>Phantom shards</title><style>"
        "body{font-family:sans-serif;margin:1em} .card{border:1px solid #ccc;margin:1em 0;padding:.5em}"
        "img{height:120px;margin:2px} img.ref{border:3px solid #36c} small{color:#666}"
        "figure{display:inline-block;margin:4px} figcaption{font-size:small;color:#444}</style>"
        f"<h1>{html.escape(str(shards_dir))}: {len(cards)} samples</h1>" + "".join(cards)
    )
    path = Path(out_dir) / "index.html"
    path.write_text(page, encoding="utf-8")
    print(path)
    return str(path)


# --- quality ------------------------------------------------------------------------------------------------


def quality_case(key: str, s: dict, meta: dict):
    """A metric case of one sample: its references against the clip's reference frames, with each
    subject's boxes there (the data's own detections, so the subject metrics compare the subject region)."""
    from curation.metrics import Case, sample_indices

    refs = [decode_jpeg(s[k]) for k in REF_NAMES if k in s]
    ref_frames = meta.get("ref_frames") or []
    idx = [int(f.get("frame_index") or 0) for f in ref_frames if isinstance(f, dict)]
    if idx:
        frames = read_frames_at(s["mp4"], idx)
    else:
        n, _, _ = decode_video(s["mp4"])
        idx = sample_indices(n, 3)
        frames = read_frames_at(s["mp4"], idx)
    subjects = meta.get("subjects") or []
    boxes = None
    if ref_frames and any(sub.get("boxes") for sub in subjects):
        boxes = []
        for sub in subjects[: len(refs)]:
            per_frame = [None] * len(frames)
            for b in sub.get("boxes") or []:
                r = b.get("ref")
                if isinstance(r, int) and 0 <= r < len(frames):
                    per_frame[r] = b.get("box")
            boxes.append(per_frame)
    subs = [{k: x.get(k) for k in ("name", "category", "description")} for x in subjects[: len(refs)]]
    return Case(key, refs, frames, s.get("txt", b"").decode("utf-8", "replace"), subs, boxes)


def _plot_histograms(path: Path, title: str, by_group: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    # The summaries' fine fixed bins, cut to the occupied span and merged to at most 40 bars.
    hists = {g: np.array(st["hist"]["counts"]) for g, st in by_group.items()}
    first = min(int(np.flatnonzero(c)[0]) for c in hists.values())
    last = max(int(np.flatnonzero(c)[-1]) for c in hists.values()) + 1
    merge = max(1, -(-(last - first) // 40))
    last = first + -(-(last - first) // merge) * merge
    for group, st in sorted(by_group.items()):
        lo, hi, counts = st["hist"]["lo"], st["hist"]["hi"], hists[group]
        edges = np.linspace(lo, hi, len(counts) + 1)[first : last + 1 : merge]
        c = np.pad(counts, (0, max(0, last - len(counts))))[first:last].reshape(-1, merge).sum(1)
        ax.stairs(c, edges, label=f"{group} (n={st['n']}, mean {st['mean']:.3f})", linewidth=1.5)
    ax.set_title(title)
    ax.set_xlabel("value")
    ax.set_ylabel("samples")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_categories(path: Path, by_group: dict[str, collections.Counter]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = sorted({c for cnt in by_group.values() for c in cnt}, key=str)
    groups = sorted(by_group)
    fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(cats) + 2), 3.2), dpi=100)
    w = 0.8 / max(1, len(groups))
    for gi, g in enumerate(groups):
        ax.bar(np.arange(len(cats)) + gi * w, [by_group[g][c] for c in cats], w, label=g)
    ax.set_xticks(np.arange(len(cats)) + 0.4 - w / 2, [str(c) for c in cats])
    ax.set_ylabel("subjects")
    ax.set_title("category balance")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def quality(
    shards_dir: str, out_dir: str, config: str | None = None, limit: int = 0, batch: int = 16
) -> dict:
    """Per pair type: reference-to-target identity (FaceSim) and subject similarity (each configured
    embedder) distributions, copy-paste closeness and category balance; a table on stdout, ``quality.json``,
    ``quality.md`` and one PNG histogram per metric under ``out_dir``. Streams: a batch of samples at a
    time, histograms with fixed bins."""
    from curation.metrics import MetricSuite, Summary, load_metrics_config, suite_ranges

    suite = MetricSuite(load_metrics_config(config), kinds=("identity", "subject", "copy")).load()
    ranges = suite_ranges(suite)
    summaries: dict[str, Summary] = {}
    cats: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    n_refs: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    samples: collections.Counter = collections.Counter()
    unreadable: collections.Counter = collections.Counter()
    pending: list[tuple[str, object]] = []

    def flush():
        for (group, _), res in zip(pending, suite.score([c for _, c in pending])):
            summaries.setdefault(group, Summary(ranges)).add(res)
        pending.clear()

    for _, key, s in iter_samples(shards_dir, limit):
        try:
            meta = json.loads(s["json"])
            group = str(meta.get("pair_type") or "unknown")
            case = quality_case(key, s, meta)
        except Exception as e:  # a broken sample is counted (``validate`` says what is wrong)
            unreadable[f"{type(e).__name__}"] += 1
            continue
        samples[group] += 1
        n_refs[group][len(case.refs)] += 1
        for sub in meta.get("subjects") or []:
            cats[group][str(sub.get("category"))] += 1
        pending.append((group, case))
        if len(pending) >= batch:
            flush()
    flush()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = {g: summaries[g].result() for g in sorted(summaries)}
    report = {
        "shards": str(shards_dir),
        "samples": dict(samples),
        "unreadable": dict(unreadable),
        "metrics": suite.describe(),
        "regions": "data boxes where the sample has them, else "
        + (f"grounded by {suite.grounder_name}" if suite.grounder is not None else "whole frames"),
        "by_pair_type": groups,
        "category": {g: dict(c) for g, c in sorted(cats.items())},
        "n_refs": {g: {str(k): v for k, v in sorted(c.items())} for g, c in sorted(n_refs.items())},
        "plots": {},
    }
    for m in suite.metrics:
        by_group = {g: r[m.name] for g, r in groups.items() if r.get(m.name, {}).get("n")}
        if by_group:
            name = f"hist_{m.name}.png"
            _plot_histograms(out / name, f"{m.name} ({m.model})", by_group)
            report["plots"][m.name] = name
    if cats:
        _plot_categories(out / "categories.png", cats)
        report["plots"]["category"] = "categories.png"
    with open(out / "quality.json", "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, sort_keys=True)
    text = quality_table(report)
    (out / "quality.md").write_text(text, encoding="utf-8")
    print(text)
    print(f"wrote {out / 'quality.json'}, {out / 'quality.md'} and {len(report['plots'])} PNG(s) in {out}")
    return report


def quality_table(report: dict) -> str:
    f = lambda v: "—" if v is None else f"{v:.4f}"  # noqa: E731
    lines = [
        f"# Data quality of {report['shards']}",
        "",
        f"samples: {', '.join(f'{k}={v}' for k, v in sorted(report['samples'].items())) or 'none'}"
        + (f"; unreadable: {report['unreadable']}" if report["unreadable"] else "")
        + f"; subject regions: {report['regions']}",
        "",
        "| pair type | metric | n | mean | std | median | min | max | flagged | missing |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g, res in report["by_pair_type"].items():
        for name, st in res.items():
            miss = ", ".join(f"{k}: {v}" for k, v in st["missing"].items()) or "—"
            lines.append(
                f"| {g} | {name} | {st['n']} | {f(st['mean'])} | {f(st['std'])} | {f(st['median_approx'])} | "
                f"{f(st['min'])} | {f(st['max'])} | {st.get('flagged', '—')} | {miss} |"
            )
    off = {n: m for n, m in report["metrics"].items() if m["status"] == "off"}
    if off:
        lines += ["", "off: " + "; ".join(f"{n} ({m['reason']})" for n, m in off.items())]
    on = {n: m for n, m in report["metrics"].items() if m["status"] == "on"}
    lines += ["", "models: " + "; ".join(f"{n}: {m['model']}" for n, m in on.items())]
    cats = sorted({c for cnt in report["category"].values() for c in cnt})
    if cats:
        head = "| pair type | " + " | ".join(cats) + " | refs per sample |"
        lines += ["", head, "|---" * (len(cats) + 2) + "|"]
        for g, cnt in report["category"].items():
            refs = ", ".join(f"{k}: {v}" for k, v in report["n_refs"].get(g, {}).items())
            lines.append(f"| {g} | " + " | ".join(str(cnt.get(c, 0)) for c in cats) + f" | {refs} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m curation.inspect", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("stats", help="counts by pair type, category, number of references; score histograms")
    p.add_argument("shards_dir")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser(
        "validate", help="every sample decodes, references and boxes are sane, the index matches"
    )
    p.add_argument("shards_dir")
    p = sub.add_parser("show", help="a PNG contact sheet per sample")
    p.add_argument("shards_dir")
    p.add_argument("--out", default="inspect/show")
    p.add_argument("--key", action="append", help="only these sample keys (repeatable)")
    p.add_argument("-n", type=int, default=8)
    p = sub.add_parser("html", help="a static gallery page")
    p.add_argument("shards_dir")
    p.add_argument("--out", default="inspect/html")
    p.add_argument("-n", type=int, default=100)
    p = sub.add_parser(
        "quality",
        help="identity and subject similarity, copy-paste closeness, category balance per pair type",
    )
    p.add_argument("shards_dir")
    p.add_argument("--out", default="inspect/quality")
    p.add_argument("--config", default=None, help="metric config YAML (an `evaluation:` block or the block)")
    p.add_argument("-n", type=int, default=0, help="at most this many samples (0: all)")
    a = ap.parse_args(argv)
    if a.cmd == "quality":
        quality(a.shards_dir, a.out, a.config, a.n)
        return 0
    if a.cmd == "stats":
        stats(a.shards_dir, a.json)
        return 0
    if a.cmd == "validate":
        return validate(a.shards_dir)
    if a.cmd == "show":
        return 0 if show(a.shards_dir, a.out, a.key, a.n) else 1
    gallery(a.shards_dir, a.out, a.n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
