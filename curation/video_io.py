"""Video probing, the one analysis-resolution decode per video, and frame-accurate clip encoding."""

from __future__ import annotations

import dataclasses
import fractions
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

MAX_PIXELS_8K = 7680 * 4320


class BadVideo(Exception):
    """An input video that cannot be used; ``reason`` is the record's reason code (``video:...``)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass
class VideoInfo:
    """What the container header says (PyAV), before anything is decoded."""

    path: str
    width: int
    height: int
    fps: float
    n_frames_header: int  # 0 when the container does not say (mkv, webm)
    duration_s: float
    codec: str
    size_bytes: int


def probe(path: str | os.PathLike, max_pixels: int = MAX_PIXELS_8K) -> VideoInfo:
    """Read the header with PyAV; raise BadVideo for missing, empty, unreadable, audio-only or oversized
    files, so nothing is decoded from them."""
    import av

    path = str(path)
    if not os.path.isfile(path):
        raise BadVideo("video:missing", path)
    size = os.path.getsize(path)
    if size == 0:
        raise BadVideo("video:zero_bytes", path)
    try:
        with av.open(path, metadata_errors="ignore") as container:
            if not container.streams.video:
                raise BadVideo("video:no_video_stream", path)
            stream = container.streams.video[0]
            width, height = int(stream.width or 0), int(stream.height or 0)
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            fps = float(rate) if rate else 0.0
            if stream.duration is not None and stream.time_base is not None:
                duration_s = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration_s = container.duration / 1e6  # av.time_base is microseconds
            else:
                duration_s = 0.0
            info = VideoInfo(
                path, width, height, fps, int(stream.frames or 0), duration_s, stream.codec_context.name, size
            )
    except BadVideo:
        raise
    except Exception as e:  # PyAV raises InvalidDataError, OSError, ValueError... for non-videos
        raise BadVideo("video:unreadable", f"{type(e).__name__}: {e}") from None
    if width <= 0 or height <= 0:
        raise BadVideo("video:unreadable", f"no frame size in header ({width}x{height})")
    if width * height > max_pixels:
        raise BadVideo("video:too_large", f"{width}x{height} exceeds {max_pixels} pixels")
    if not (0 < fps < 1000):
        raise BadVideo("video:bad_frame_rate", f"fps={fps}")
    return info


def count_packets(path: str) -> int:
    """Video packets the file really holds (demux only, no decode); stops quietly at a cut-off tail."""
    import av

    n = 0
    try:
        with av.open(path) as container:
            for pkt in container.demux(container.streams.video[0]):
                n += pkt.size > 0  # the demuxer ends with an empty flush packet
    except Exception:
        pass
    return n


def analysis_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(w, h) with the short side scaled to ``short_side`` (never upscaled), both even, aspect kept."""
    scale = min(1.0, short_side / min(width, height))
    w = max(2, int(round(width * scale / 2)) * 2)
    h = max(2, int(round(height * scale / 2)) * 2)
    return w, h


def is_variable_frame_rate(ts_s: np.ndarray, tol: float = 0.25, max_frac: float = 0.05) -> bool:
    """True when more than ``max_frac`` of frame intervals differ from the median interval by more than
    ``tol`` of it (a CFR stream with a few timestamp glitches stays CFR)."""
    if len(ts_s) < 3:
        return False
    dt = np.diff(np.asarray(ts_s, dtype=np.float64))
    med = float(np.median(dt))
    if med <= 0:
        return True
    return float(np.mean(np.abs(dt - med) > tol * med)) > max_frac


class AnalysisReader:
    """The one decode of a video at analysis resolution (decord, which resizes inside its ffmpeg filter
    graph: about 2x faster than PyAV + reformat here). Frames are RGB uint8 (n, h, w, 3)."""

    def __init__(self, path: str, width: int, height: int, num_threads: int = 1):
        import decord

        try:
            self.vr = decord.VideoReader(
                path, ctx=decord.cpu(0), width=width, height=height, num_threads=num_threads
            )
        except Exception as e:
            raise BadVideo("video:unreadable", f"decord: {str(e).splitlines()[0][:200]}") from None
        self.n_frames = len(self.vr)
        self.fps = float(self.vr.get_avg_fps() or 0.0)

    def timestamps_s(self) -> np.ndarray:
        """Presentation time of each frame's start, seconds, (n,) from the container index (no decode)."""
        if self.n_frames == 0:
            return np.zeros(0)
        return self.vr.get_frame_timestamp(list(range(self.n_frames)))[:, 0].astype(np.float64)

    def chunks(self, chunk_frames: int = 64) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (first_index, frames (n, h, w, 3)) in order; a decode error becomes BadVideo."""
        for start in range(0, self.n_frames, chunk_frames):
            idx = list(range(start, min(self.n_frames, start + chunk_frames)))
            try:
                frames = self.vr.get_batch(idx).asnumpy()
            except Exception as e:
                msg = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
                raise BadVideo(
                    "video:corrupt", f"decode failed in frames {idx[0]}-{idx[-1]}: {msg}"
                ) from None
            yield start, frames


def read_clip_frames(
    path: str, start_frame: int, end_frame: int, n: int, short_side: int, gap: int = 1
) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Fallback for filters run without the scenes stage's cached frames: ``n`` evenly spread frames of
    [start_frame, end_frame) and the frame ``gap`` after each, at analysis resolution.
    Returns (indices, frames (n, h, w, 3), next_frames (n, h, w, 3))."""
    import decord

    info = probe(path)
    w, h = analysis_size(info.width, info.height, short_side)
    vr = decord.VideoReader(path, ctx=decord.cpu(0), width=w, height=h, num_threads=1)
    last = min(end_frame, len(vr)) - 1 - gap
    idx = sorted({int(round(x)) for x in np.linspace(start_frame, max(start_frame, last), n)})
    both = sorted(set(idx) | {i + gap for i in idx})
    batch = vr.get_batch(both).asnumpy()
    pos = {i: k for k, i in enumerate(both)}
    return idx, batch[[pos[i] for i in idx]], batch[[pos[i + gap] for i in idx]]


def even_size(width: int, height: int, short_side: int = 0) -> tuple[int, int]:
    """Output size for H.264/yuv420p: both even; optionally the short side scaled to ``short_side``
    (downscale only)."""
    if short_side and short_side < min(width, height):
        s = short_side / min(width, height)
        width, height = width * s, height * s
    return max(2, int(round(width / 2)) * 2), max(2, int(round(height / 2)) * 2)


@dataclasses.dataclass
class ClipJob:
    """One clip to write: source frames [start_frame, end_frame) to ``out_path``."""

    start_frame: int
    end_frame: int
    out_path: str
    n_written: int = 0
    width: int = 0
    height: int = 0
    error: str = ""


def encode_clips(
    src_path: str,
    jobs: Sequence[ClipJob],
    short_side: int = 0,
    crf: int = 18,
    preset: str = "veryfast",
    fps: float | None = None,
    keyframe_interval_s: float = 1.0,
) -> list[ClipJob]:
    """Decode ``src_path`` once at full resolution (PyAV, frames counted in presentation order, the same
    order decord indexes) and encode each job's frames to H.264 mp4 (libx264, yuv420p, even size, the
    source frame rate). Each file is written to a temp name and os.replace'd, so a reader never sees half
    a clip. Decoding stops after the last frame any job needs. A keyframe every ``keyframe_interval_s``
    bounds what a training loader must decode to reach a random frame (0 leaves it to x264)."""
    import av

    jobs = sorted(jobs, key=lambda j: j.start_frame)
    if not jobs:
        return []
    last_needed = max(j.end_frame for j in jobs)
    open_enc: dict[int, tuple] = {}  # job index -> (container, stream, tmp_path)
    with av.open(src_path) as src:
        vstream = src.streams.video[0]
        vstream.thread_type = "AUTO"
        rate = vstream.average_rate or vstream.guessed_rate
        rate = (
            fractions.Fraction(rate).limit_denominator(100000)
            if fps is None
            else fractions.Fraction(fps).limit_denominator(100000)
        )
        w, h = even_size(vstream.width, vstream.height, short_side)
        idx = -1
        try:
            for frame in src.decode(vstream):
                idx += 1
                if idx >= last_needed:
                    break
                for k, job in enumerate(jobs):
                    if not (job.start_frame <= idx < job.end_frame):
                        continue
                    if k not in open_enc:
                        gop = max(1, round(float(rate) * keyframe_interval_s)) if keyframe_interval_s else 0
                        open_enc[k] = _open_encoder(job, w, h, rate, crf, preset, gop)
                    out, ost, _ = open_enc[k]
                    # reformat scales (when asked) and converts to yuv420p in one swscale call.
                    vf = frame.reformat(width=w, height=h, format="yuv420p")
                    vf.pts = job.n_written  # time_base is 1/rate: one tick per frame, constant rate
                    vf.time_base = ost.codec_context.time_base
                    for pkt in ost.encode(vf):
                        out.mux(pkt)
                    job.n_written += 1
                    if idx == job.end_frame - 1:
                        _close_encoder(open_enc.pop(k), job)
        except av.error.FFmpegError as e:
            for k in list(open_enc):
                jobs[k].error = f"source decode failed at frame {idx + 1}: {e}"
        finally:
            for k in list(open_enc):
                _close_encoder(open_enc.pop(k), jobs[k])
    for job in jobs:
        job.width, job.height = w, h
        if not job.error and job.n_written < job.end_frame - job.start_frame:
            job.error = f"source ended after {job.n_written} of {job.end_frame - job.start_frame} frames"
    return jobs


def _open_encoder(job: ClipJob, w: int, h: int, rate: fractions.Fraction, crf: int, preset: str,
                  gop: int = 0):
    import av

    Path(job.out_path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{job.out_path}.tmp{os.getpid()}"
    out = av.open(tmp, "w", format="mp4", options={"movflags": "+faststart"})
    ost = out.add_stream("libx264", rate=rate)
    ost.width, ost.height, ost.pix_fmt = w, h, "yuv420p"
    ost.codec_context.time_base = 1 / rate
    ost.options = {"crf": str(crf), "preset": preset, **({"g": str(gop)} if gop else {})}
    return out, ost, tmp


def _close_encoder(enc: tuple, job: ClipJob) -> None:
    out, ost, tmp = enc
    try:
        for pkt in ost.encode():
            out.mux(pkt)
        out.close()
        if job.error or job.n_written < job.end_frame - job.start_frame:
            job.error = (
                job.error or f"source ended after {job.n_written} of {job.end_frame - job.start_frame} frames"
            )
            os.remove(tmp)
        else:
            os.replace(tmp, job.out_path)
    except Exception as e:
        job.error = job.error or f"encode failed: {e}"
        if os.path.exists(tmp):
            os.remove(tmp)
