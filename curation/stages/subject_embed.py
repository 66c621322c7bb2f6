"""The subject_embed stage: crops of grounded subject boxes saved as JPEG, their embeddings as .npy."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from curation.config import field
from curation.frames import ref_frames
from curation.shards import atomic_write_bytes, atomic_write_npy, safe_component
from curation.stage import Record, Stage, build_backend, register_stage


def pad_box(box, pad_frac: float, width: int, height: int) -> list[int]:
    """``box`` [x0, y0, x1, y1] grown by ``pad_frac`` of its size on each side, clipped to the frame,
    integer."""
    x0, y0, x1, y1 = (float(v) for v in box)
    px, py = (x1 - x0) * pad_frac, (y1 - y0) * pad_frac
    return [
        max(0, int(np.floor(x0 - px))),
        max(0, int(np.floor(y0 - py))),
        min(width, int(np.ceil(x1 + px))),
        min(height, int(np.ceil(y1 + py))),
    ]


def encode_jpeg(img_rgb: np.ndarray, quality: int) -> bytes:
    import cv2

    ok, buf = cv2.imencode(
        ".jpg", cv2.cvtColor(img_rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]
    )
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


_PHASHER = None


def phash(img_rgb: np.ndarray) -> str:
    """imagededup's perceptual hash (64 bits as 16 hex digits) of an RGB crop."""
    global _PHASHER
    if _PHASHER is None:
        from imagededup.methods import PHash

        _PHASHER = PHash(verbose=False)
    return _PHASHER.encode_image(image_array=img_rgb)


def hamming(a: str, b: str) -> int:
    return bin(int(a, 16) ^ int(b, 16)).count("1")


def mark_duplicates(items: list[dict], max_distance: int) -> None:
    """Set ``duplicate_of`` (index of the earlier kept item) on items whose ``phash`` lies within
    ``max_distance`` bits of a kept one: near-identical reference crops (a static shot) add nothing as
    references."""
    kept: list[int] = []
    for i, it in enumerate(items):
        it["duplicate_of"] = None
        for j in kept:
            if hamming(it["phash"], items[j]["phash"]) <= max_distance:
                it["duplicate_of"] = j
                break
        else:
            kept.append(i)


def clip_dir(row: Record, what: str) -> str:
    """``<what>/<video_id>/<clip_id>`` with both ids made safe as path components (ids come from CSVs)."""
    return os.path.join(what, safe_component(row["video_id"]), safe_component(row.get("clip_id") or "clip"))


@register_stage("subject_embed")
class SubjectEmbed(Stage):
    """Crops each grounded box (padding ``pad_frac``) from the clip's reference frames, writes it as JPEG
    under ``refs/<video_id>/<clip_id>/``, embeds all crops of the clip in one backend call and saves the
    (n_crops, D) float32 matrix to ``embeddings/<video_id>/<clip_id>.npy``. The row keeps only metadata: per
    subject ``crops`` [{ref, box, path, emb_row, phash, duplicate_of, size_px}]."""

    uses_model = True
    reads_clips = True

    @dataclasses.dataclass
    class Params:
        pad_frac: float = field(0.05, ge=0.0, le=1.0)
        min_crop_px: int = field(16, ge=1)  # shorter side; smaller crops say nothing about the subject
        jpeg_quality: int = field(92, ge=50, le=100)
        phash_max_distance: int = field(4, ge=0, le=64)  # within-subject near-duplicate crops
        # one embedder call over every clip of the stage batch (GPU speed) or one per clip (the output then
        # does not depend on how a runner grouped the clips: CPU kernels move by ~1e-7 with the batch);
        # auto: across clips on a GPU only
        batch_across_clips: str = field("auto", choices=["auto", "yes", "no"])

    def setup(self) -> None:
        from curation.backends import embedders  # noqa: F401  (registers the image embedders)

        cfg = dict(self.backend_cfg)
        name = cfg.pop("name", "mobilenet_v2")
        self.embedder = build_backend("image_embedder", name, models_dir=self.ctx.models_dir, **cfg)

    def process(self, rows: list[Record]) -> list[Record]:
        """Crops of every row first, then ONE embedder call over all of them (the whole stage batch, many
        clips: a GPU sees full batches), then each row's rows of the matrix go to its .npy."""
        cropped = [self.crop_row(r) for r in rows]
        images = [img for _, imgs in cropped for img in imgs]
        across = self.params.batch_across_clips
        on_gpu = str(getattr(self.embedder, "device", "")).startswith("cuda")
        if across == "yes" or (across == "auto" and on_gpu):
            emb = self.embedder.embed(images) if images else None  # (sum n_crops, D) float32, unit rows
            self.n_embed_calls = getattr(self, "n_embed_calls", 0) + bool(images)
        else:
            parts = [self.embedder.embed(imgs) for _, imgs in cropped if imgs]
            emb = np.concatenate(parts) if parts else None
            self.n_embed_calls = getattr(self, "n_embed_calls", 0) + len(parts)
        out, k = [], 0
        for row, imgs in cropped:
            if imgs:
                mine = emb[k : k + len(imgs)]
                k += len(imgs)
                rel = clip_dir(row, "embeddings") + ".npy"
                atomic_write_npy(os.path.join(self.ctx.out_dir, rel), mine.astype(np.float32))
                row.update(embedding_file=rel, embedding_dim=int(mine.shape[1]), embedder=self.embedder.name)
            out.append(row)
        return out

    def crop_row(self, row: Record) -> tuple[Record, list[np.ndarray]]:
        """(the row with per-subject ``crops`` metadata, the crops (H_i, W_i, 3) in ``emb_row`` order)."""
        p = self.params
        subjects = row.get("subjects") or []
        if not any(s.get("boxes") for s in subjects):
            return {**row, "subject_embed_n_crops": 0}, []
        frames = ref_frames(row, self.ctx.out_dir)
        rel_dir = clip_dir(row, "refs")
        images = []
        new_subjects = []
        for si, s in enumerate(subjects):
            s = dict(s)
            s_crops = []
            for b in s.get("boxes") or []:
                frame = frames[b["ref"]]
                h, w = frame.shape[:2]
                cb = pad_box(b["box"], p.pad_frac, w, h)
                img = frame[cb[1] : cb[3], cb[0] : cb[2]]
                if min(img.shape[:2]) < p.min_crop_px:
                    continue
                path = os.path.join(rel_dir, f"s{si:02d}_r{b['ref']}.jpg")
                atomic_write_bytes(os.path.join(self.ctx.out_dir, path), encode_jpeg(img, p.jpeg_quality))
                c = {
                    "ref": int(b["ref"]),
                    "box": cb,
                    "path": path,
                    "emb_row": len(images),
                    "phash": phash(img),
                    "size_px": [int(img.shape[1]), int(img.shape[0])],
                }
                s_crops.append(c)
                images.append(img)
            mark_duplicates(s_crops, p.phash_max_distance)
            s["crops"] = s_crops
            new_subjects.append(s)
        return {**row, "subjects": new_subjects, "subject_embed_n_crops": len(images)}, images
