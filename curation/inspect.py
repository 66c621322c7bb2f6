"""Shard inspection CLI: ``python -m curation.inspect {stats,validate,show,html} SHARDS_DIR``."""

from __future__ import annotations

import argparse
import collections
import html
import io
import json
import os
import sys
import tarfile
from pathlib import Path

import numpy as np

from curation.shards import INDEX_FILE, iter_tar_samples, read_index, sha256_file

REF_NAMES = [f"ref_{i}.jpg" for i in range(4)]


def shard_files(shards_dir: str | os.PathLike) -> list[Path]:
    """The shards named by the index (in order), else every shard-*.tar in the folder."""
    d = Path(shards_dir)
    if (d / INDEX_FILE).exists():
        return [d / e["name"] for e in read_index(d)["shards"]]
    return sorted(d.glob("shard-*.tar"))


def iter_samples(shards_dir: str | os.PathLike, limit: int = 0):
    """(shard name, key, {ext: bytes}) over all shards; unreadable shards are skipped (``validate`` names
    them)."""
    n = 0
    for path in shard_files(shards_dir):
        try:
            for key, sample in iter_tar_samples(path):
                yield path.name, key, sample
                n += 1
                if limit and n >= limit:
                    return
        except (OSError, tarfile.TarError) as e:
            print(f"warning: {path.name}: {e}", file=sys.stderr)


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


def _hist_line(values: list[float], bins: int = 10) -> str:
    if not values:
        return "(none)"
    counts, edges = np.histogram(values, bins=bins)
    return " ".join(f"{edges[i]:.2f}:{c}" for i, c in enumerate(counts))


def stats(shards_dir: str, as_json: bool = False) -> dict:
    by_type, by_cat, by_refs = collections.Counter(), collections.Counter(), collections.Counter()
    scores: dict[str, list[float]] = collections.defaultdict(list)
    n = 0
    for _, _, s in iter_samples(shards_dir):
        meta = json.loads(s["json"])
        n += 1
        by_type[meta.get("pair_type")] += 1
        by_refs[sum(k in s for k in REF_NAMES)] += 1
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
        for title, c in (("pair type", by_type), ("category", by_cat), ("references", by_refs)):
            print(
                f"{title}: " + ", ".join(f"{k}={v}" for k, v in sorted(c.items(), key=lambda kv: str(kv[0])))
            )
        for k, v in sorted(scores.items()):
            print(f"{k} (n={len(v)}): {_hist_line(v)}")
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
    """Check every shard against the index and every sample; print what is broken. 0 when all is sound."""
    d = Path(shards_dir)
    bad: dict[str, list[str]] = collections.defaultdict(list)
    index = None
    try:
        index = read_index(d)
    except (OSError, ValueError) as e:
        bad[INDEX_FILE].append(f"unreadable index: {e}")
    entries = index["shards"] if index else [{"name": p.name} for p in sorted(d.glob("shard-*.tar"))]
    listed = {e["name"] for e in entries}
    for p in sorted(d.glob("shard-*.tar")):
        if p.name not in listed:
            bad[p.name].append("shard not in the index")
    n_samples = 0
    for e in entries:
        path = d / e["name"]
        if not path.exists():
            bad[e["name"]].append("missing")
            continue
        if "bytes" in e and path.stat().st_size != e["bytes"]:
            bad[e["name"]].append(f"size {path.stat().st_size} != index {e['bytes']}")
        if "sha256" in e and sha256_file(path) != e["sha256"]:
            bad[e["name"]].append("sha256 differs from the index")
        keys = []
        try:
            for key, s in iter_tar_samples(path):
                keys.append(key)
                for problem in check_sample(key, s):
                    bad[e["name"]].append(f"{key}: {problem}")
        except (OSError, tarfile.TarError, EOFError) as err:
            bad[e["name"]].append(f"unreadable tar: {type(err).__name__}: {err}")
        n_samples += len(keys)
        if "keys" in e and keys != e["keys"]:
            bad[e["name"]].append(f"keys differ from the index ({len(keys)} read, {len(e['keys'])} listed)")
        elif "samples" in e and len(keys) != e["samples"]:
            bad[e["name"]].append(f"{len(keys)} samples, index says {e['samples']}")
    if index and index.get("total_samples") not in (None, n_samples):
        bad[INDEX_FILE].append(f"total_samples {index['total_samples']} != {n_samples} read")
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


def contact_sheet(sample: dict, n_frames: int = 4, tile_px: int = 160) -> Image.Image:  # noqa: F821
    """References (left) beside evenly spaced video frames (right), caption and ids under them."""
    import textwrap

    from PIL import Image, ImageDraw

    meta = json.loads(sample["json"])
    refs = [decode_jpeg(sample[k]) for k in REF_NAMES if k in sample]
    _, _, frames = decode_video(sample["mp4"], n_frames)
    tiles = [Image.fromarray(im) for im in refs] + [Image.fromarray(f) for f in frames]
    for t in tiles:
        t.thumbnail((tile_px, tile_px))
    gap = 8
    width = len(tiles) * (tile_px + gap) + 2 * gap
    caption = textwrap.wrap(sample.get("txt", b"").decode("utf-8", "replace"), width=max(40, width // 8))
    lines = [f"{meta.get('key')}  {meta.get('pair_type')}  refs={len(refs)}"] + caption
    for i, sub in enumerate(meta.get("subjects") or []):
        r = sub.get("ref") or {}
        sim = sub.get("similarity")
        lines.append(
            f"ref_{i}: {sub.get('name')} ({sub.get('category')}) from {r.get('clip_id')} "
            f"t={r.get('t_s')}s" + (f" sim={sim:.3f}" if isinstance(sim, float) else "")
        )
    sheet = Image.new("RGB", (width, tile_px + 2 * gap + 16 * len(lines) + gap), "white")
    draw = ImageDraw.Draw(sheet)
    x = gap
    for i, t in enumerate(tiles):
        if i == len(refs):
            x += gap  # a wider gap between references and video frames
        sheet.paste(t, (x, gap))
        x += tile_px + gap
    font = _font(13)
    for j, line in enumerate(lines):
        draw.text((gap, tile_px + 2 * gap + 16 * j), line, fill="black", font=font)
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
        subj = "".join(
            f"<li>{html.escape(str(x.get('name')))} ({html.escape(str(x.get('category')))}), ref from "
            f"{html.escape(str((x.get('ref') or {}).get('clip_id')))}, sim {x.get('similarity')}</li>"
            for x in meta.get("subjects") or []
        )
        cards.append(
            f'<div class="card"><h3>{html.escape(key)} <small>{html.escape(str(meta.get("pair_type")))} · '
            f"{html.escape(shard)}</small></h3><div>{''.join(cells)}</div>"
            f"<p>{html.escape(s.get('txt', b'').decode('utf-8', 'replace'))}</p><ul>{subj}</ul></div>"
        )
    page = (
        "<!doctype html><meta charset='utf-8'><title>Phantom shards</title><style>"
        "body{font-family:sans-serif;margin:1em} .card{border:1px solid #ccc;margin:1em 0;padding:.5em}"
        "img{height:120px;margin:2px} img.ref{border:3px solid #36c} small{color:#666}</style>"
        f"<h1>{html.escape(str(shards_dir))}: {len(cards)} samples</h1>" + "".join(cards)
    )
    path = Path(out_dir) / "index.html"
    path.write_text(page, encoding="utf-8")
    print(path)
    return str(path)


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
    a = ap.parse_args(argv)
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
