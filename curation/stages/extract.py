"""The `extract` stage: each passing clip as a frame-accurate H.264 mp4, one full decode per source video."""

from __future__ import annotations

import dataclasses
import os

from curation.config import field
from curation.stage import Record, Stage, mark_failed, register_stage, reject
from curation.video_io import ClipJob, encode_clips


def clip_relpath(row: Record) -> str:
    """``clips/<video_id>/<clip_id>.mp4``; ids are used as file names, so path separators are refused."""
    vid, cid = str(row["video_id"]), str(row["clip_id"])
    for part in (vid, cid):
        if not part or part in (".", "..") or "/" in part or "\\" in part or "\0" in part:
            raise ValueError(f"unsafe id for a file name: {part!r}")
    return os.path.join("clips", vid, f"{cid}.mp4")


@register_stage("extract")
class Extract(Stage):
    """Rows are grouped by source video within the batch; each source is decoded once at full resolution
    with PyAV and every clip of it is encoded as its frames go by (frame indices are the scenes stage's)."""

    @dataclasses.dataclass
    class Params:
        resize_short_side: int = field(0, ge=0)  # 0 keeps the source size (made even)
        crf: int = field(18, ge=0, le=51)
        preset: str = field(
            "veryfast",
            choices=["ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower"],
        )
        # Short GOPs: the trainer samples a few frames at a random offset, and decoding from the previous
        # keyframe is most of its loader's cost (1 s: 35 -> 23 ms per clip on the sample, same size).
        keyframe_interval_s: float = field(1.0, ge=0.0)

    def process(self, rows: list[Record]) -> list[Record]:
        by_video: dict[str, list[Record]] = {}
        for r in rows:
            by_video.setdefault(r["video_path"], []).append(r)
        out = []
        for path, group in by_video.items():
            try:
                out.extend(self.extract_video(path, group))
            except Exception:
                out.extend(mark_failed(r, self.name) for r in group)
        return out

    def extract_video(self, path: str, rows: list[Record]) -> list[Record]:
        p = self.params
        jobs, todo, done = {}, [], []
        for r in rows:
            rel = clip_relpath(r)
            # a rerun rewrites the file: the same clip_id may stand for another span under new params
            jobs[r["clip_id"]] = ClipJob(
                int(r["start_frame"]), int(r["end_frame"]), os.path.join(self.ctx.out_dir, rel)
            )
            todo.append((r, rel))
        encode_clips(path, list(jobs.values()), p.resize_short_side, p.crf, p.preset,
                     keyframe_interval_s=p.keyframe_interval_s)
        for r, rel in todo:
            job = jobs[r["clip_id"]]
            if job.error:
                done.append(reject(r, "extract:incomplete", reason_detail=job.error))
                continue
            done.append(
                {
                    **r,
                    "clip_path": rel,
                    "clip_width": job.width,
                    "clip_height": job.height,
                    "clip_n_frames": job.n_written,
                }
            )
        return done
