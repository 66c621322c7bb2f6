"""Synthetic committed videos (tables, embeddings, media) for the global phase's scale tests and benchmark."""

# Rows as the map phase commits them (subjects with crops and faces, generated embeddings in .npy files), a
# few small real H.264 clips and JPEG crops reused by reference, exported with ``global_phase.export_video``
# like real videos.

from __future__ import annotations

import os

import numpy as np

from curation.global_phase import export_video
from curation.storage import Store

CATEGORIES = ("human", "animal", "product", "landmark")


def _real_media(root: str, n: int = 4) -> tuple[list[str], list[str]]:
    """``n`` small real H.264 clips (64x48, 8 frames) and JPEG crops, written once under ``root/media``."""
    import av
    import cv2

    clips, crops = [], []
    os.makedirs(os.path.join(root, "media"), exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        rel = f"media/clip{i}.mp4"
        path = os.path.join(root, rel)
        frames = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(8)]
        if not os.path.exists(path):
            with av.open(path, "w", format="mp4") as c:
                s = c.add_stream("libx264", rate=8)
                s.height, s.width, s.pix_fmt = 48, 64, "yuv420p"
                s.options = {"preset": "ultrafast", "crf": "35"}
                for f in frames:
                    for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                        c.mux(p)
                for p in s.encode():
                    c.mux(p)
        clips.append(rel)
        crel = f"media/crop{i}.jpg"
        ok, buf = cv2.imencode(".jpg", frames[4][8:40, 8:40], [cv2.IMWRITE_JPEG_QUALITY, 80])
        with open(os.path.join(root, crel), "wb") as f:
            f.write(buf.tobytes())
        crops.append(crel)
    return clips, crops


def make_videos(
    root: str,
    n_clips: int,
    dim: int = 64,
    clips_per_video: int = 10,
    seed: int = 0,
    map_hash: str = "synth",
    store: Store | None = None,
) -> int:
    """Write ``n_clips`` clips in videos of ``clips_per_video`` under ``root`` and export their tables into
    ``store`` (default: the same folder). Each clip has one subject (every third a second one), an identity
    drawn from a pool of n_clips / 4 (same identity: cosine about 0.85; others near 0); humans carry a face
    with its own 32-d identity embedding. Returns the number of videos."""
    store = store or Store(root)
    clips, crops = _real_media(root)
    rng = np.random.default_rng(seed)
    n_ids = max(2, n_clips // 4)
    base = rng.standard_normal((n_ids, dim)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    fbase = rng.standard_normal((n_ids, 32)).astype(np.float32)
    fbase /= np.linalg.norm(fbase, axis=1, keepdims=True)
    id_cat = rng.integers(0, len(CATEGORIES), n_ids)
    n_videos = -(-n_clips // clips_per_video)
    os.makedirs(os.path.join(root, "embeddings"), exist_ok=True)
    k = 0
    for v in range(n_videos):
        vid = f"syn{v:07d}"
        rows, embs, fembs = [], [], []
        for c in range(min(clips_per_video, n_clips - v * clips_per_video)):
            k += 1
            clip_id = f"{vid}-{c:04d}"
            subjects = []
            for _ in range(1 if k % 3 else 2):
                ident = int(rng.integers(0, n_ids))
                cat = CATEGORIES[id_cat[ident]]
                crop_list = []
                for ref in range(3):
                    e = base[ident] + 0.5 * rng.standard_normal(dim).astype(np.float32) / np.sqrt(dim)
                    crop_list.append(
                        {
                            "ref": ref,
                            "box": [8, 8, 40, 40],
                            "path": crops[(k + ref) % len(crops)],
                            "emb_row": len(embs),
                            "phash": f"{int(rng.integers(0, 2**63)):016x}",
                            "duplicate_of": None,
                            "size_px": [32, 32],
                        }
                    )
                    embs.append(e / np.linalg.norm(e))
                s = {
                    "name": f"id{ident}",
                    "description": f"subject {ident}",
                    "category": cat,
                    "boxes": [{"ref": r, "box": [8, 8, 40, 40], "score": 0.9} for r in range(3)],
                    "crops": crop_list,
                }
                if cat == "human":
                    f = fbase[ident] + 0.5 * rng.standard_normal(32).astype(np.float32) / np.sqrt(32)
                    s["faces"] = [
                        {
                            "ref": 1,
                            "box": [12, 10, 24, 24],
                            "det_score": 0.9,
                            "emb_row": len(fembs),
                            "path": crops[k % len(crops)],
                            "phash": f"{int(rng.integers(0, 2**63)):016x}",
                            "duplicate_of": None,
                        }
                    ]
                    s["face_status"] = "ok"
                    fembs.append(f / np.linalg.norm(f))
                subjects.append(s)
            rows.append(
                {
                    "video_id": vid,
                    "clip_id": clip_id,
                    "status": "ok",
                    "source": "synthetic",
                    "clip_path": clips[k % len(clips)],
                    "start_s": float(c),
                    "end_s": float(c) + 1.0,
                    "fps": 8.0,
                    "clip_width": 64,
                    "clip_height": 48,
                    "clip_n_frames": 8,
                    "caption": ("A subject in a field." if k % 5 == 0 else "A subject moves."),
                    "quality_score": 0.5,
                    "subjects": subjects,
                    "ref_frames": [
                        {"t_frac": f, "frame_index": i, "t_s": i / 8}
                        for f, i in ((0.05, 0), (0.5, 4), (0.95, 7))
                    ],
                }
            )
        erel = f"embeddings/{vid}.npy"
        np.save(os.path.join(root, erel), np.stack(embs).astype(np.float32))
        frel = None
        if fembs:
            frel = f"embeddings/{vid}.faces.npy"
            np.save(os.path.join(root, frel), np.stack(fembs).astype(np.float32))
        for r in rows:
            r["embedding_file"] = erel
            if frel and any(s.get("faces") for s in r["subjects"]):
                r["face_embedding_file"] = frel
        export_video(rows, store, root, map_hash)
    return n_videos
