"""Video probing, the one analysis-resolution decode per video, and frame-accurate clip encoding."""

from __future__ import annotations

import dataclasses
import fractions
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

MAX_PIXELS_8K = 7680 * 4320
X264_THREADS = 4  # encoder threads per clip, fixed so a clip's bytes do not depend on the machine
FFMPEG = "ffmpeg"  # the CLI that encodes clips (``make setup`` installs it with apt)


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
    rotation: int = 0  # display-matrix rotation, degrees counter-clockwise (0, 90, 180, 270)

    @property
    def display_size(self) -> tuple[int, int]:
        """(width, height) as a player shows the video (a 90/270 rotation swaps them)."""
        return (self.height, self.width) if self.rotation in (90, 270) else (self.width, self.height)


def _rotation_of(frame) -> int:
    """A decoded PyAV frame's display rotation, snapped to a multiple of 90 degrees (0 when unknown)."""
    try:
        r = float(getattr(frame, "rotation", 0) or 0)
    except (TypeError, ValueError):
        return 0
    return int(round(r / 90.0)) * 90 % 360


def rotate_frames(frames: np.ndarray, rotation: int) -> np.ndarray:
    """Frames (n, h, w, 3) or one frame (h, w, 3) turned upright for a display rotation (counter-clockwise
    degrees, ffmpeg's convention): what a player (and ffmpeg's autorotate) shows."""
    k = (rotation // 90) % 4
    if k == 0:
        return frames
    axes = (1, 2) if frames.ndim == 4 else (0, 1)
    return np.ascontiguousarray(np.rot90(frames, k, axes=axes))


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
            rotation = 0
            try:  # the display matrix comes with decoded frames; one frame is cheap
                rotation = _rotation_of(next(container.decode(stream)))
            except Exception:
                pass  # undecodable first frame: the decode below says so with a reason
            info = VideoInfo(
                path,
                width,
                height,
                fps,
                int(stream.frames or 0),
                duration_s,
                stream.codec_context.name,
                size,
                rotation,
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


def timestamps_problem(ts_s: np.ndarray, n_frames: int, fps: float) -> str | None:
    """Why a reader's frame timestamps cannot be used, or None when they can: one per frame, finite, of a
    sane size (decord returns AV_NOPTS_VALUE * time_base, about -3.8e17 s, for AVI frames without pts),
    non-decreasing but for rare glitches, and spanning about n / fps (a factor of 4 either way: VFR is fine,
    all-equal or absurd spacing is not)."""
    ts = np.asarray(ts_s, dtype=np.float64)
    if len(ts) != n_frames:
        return f"{len(ts)} timestamps for {n_frames} frames"
    if n_frames == 0:
        return None
    if not np.all(np.isfinite(ts)) or np.abs(ts).max() > 1e7:
        return f"timestamps out of range (min {ts.min():.4g} s, max {ts.max():.4g} s)"
    if n_frames < 2:
        return None
    dt = np.diff(ts)
    if np.mean(dt < 0) > 0.01:
        return f"{int(np.sum(dt < 0))} of {len(dt)} frame intervals run backwards"
    span, expected = float(ts[-1] - ts[0]), (n_frames - 1) / fps if fps > 0 else 0.0
    if span <= 0 or (expected > 0 and not (expected / 4 <= span <= expected * 4)):
        return f"timestamps span {span:.4g} s for {n_frames} frames at {fps:.3f} fps"
    return None


def packet_timestamps(path: str) -> np.ndarray:
    """Presentation times (s) of the video packets, from the demuxer alone (no decode), in presentation
    order: pts where the container has it, else dts (AVI), sorted (B-frames arrive out of order)."""
    import av

    ts = []
    with av.open(path) as container:
        stream = container.streams.video[0]
        tb = float(stream.time_base) if stream.time_base else 0.0
        for pkt in container.demux(stream):
            if pkt.size == 0:
                continue
            t = pkt.pts if pkt.pts is not None else pkt.dts
            if t is not None:
                ts.append(t * tb)
    return np.sort(np.asarray(ts, dtype=np.float64))


def frame_timestamps(path: str, reader_ts: np.ndarray, n_frames: int, fps: float) -> tuple[np.ndarray, str]:
    """(timestamps (n,) seconds, source): the reader's when valid, else PyAV's packet times, else frame
    index / fps. ``source`` is "reader", "pyav" or "fps" (kept on the clip rows)."""
    if timestamps_problem(reader_ts, n_frames, fps) is None:
        return np.asarray(reader_ts, dtype=np.float64), "reader"
    try:
        ts = packet_timestamps(path)
    except Exception:
        ts = np.zeros(0)
    if len(ts) > n_frames:  # a trailing packet the reader did not count as a frame
        ts = ts[:n_frames]
    if timestamps_problem(ts, n_frames, fps) is None:
        log.info(
            "%s: reader timestamps invalid (%s); using PyAV's",
            path,
            timestamps_problem(reader_ts, n_frames, fps),
        )
        return ts, "pyav"
    return np.arange(n_frames, dtype=np.float64) / fps, "fps"


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[-1][:200] if text else type(e).__name__


class AnalysisReader:
    """The one decode of a video at analysis resolution. decord first (it resizes inside its ffmpeg filter
    graph: about 2x faster than PyAV + reformat here); where decord cannot open or decode a valid file (it
    fails on some frame sizes, e.g. 48x36), PyAV takes over from the frame decord stopped at. Frames are RGB
    uint8 (n, h, w, 3), turned upright when the container carries a display rotation."""

    def __init__(self, path: str, width: int, height: int, num_threads: int = 1, rotation: int = 0):
        self.path, self.width, self.height, self.rotation = path, width, height, rotation
        self.backend = "decord"
        self.vr = None
        try:
            import decord

            # decord applies the display rotation itself, then scales to the size asked: ask it upright
            dw, dh = (height, width) if rotation in (90, 270) else (width, height)
            self.vr = decord.VideoReader(
                path, ctx=decord.cpu(0), width=dw, height=dh, num_threads=num_threads
            )
            self.n_frames = len(self.vr)
            self.fps = float(self.vr.get_avg_fps() or 0.0)
        except Exception as e:
            self.decord_error = _first_line(e)
            self.backend = "pyav"
            self.n_frames = count_packets(path)
            if self.n_frames == 0:
                raise BadVideo(
                    "video:unreadable", f"decord: {self.decord_error}; PyAV: no video packets"
                ) from None
            self.fps = 0.0

    def timestamps_s(self) -> np.ndarray:
        """The reader's presentation time of each frame's start, seconds, (n,) (no decode); may be garbage:
        check with ``timestamps_problem`` / use ``frame_timestamps``."""
        if self.n_frames == 0:
            return np.zeros(0)
        if self.vr is None:
            try:
                return packet_timestamps(self.path)
            except Exception:
                return np.zeros(0)
        return self.vr.get_frame_timestamp(list(range(self.n_frames)))[:, 0].astype(np.float64)

    def chunks(self, chunk_frames: int = 64) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (first_index, frames (n, h, w, 3)) in order; a decode error of both readers is BadVideo."""
        start = 0
        if self.vr is not None:
            for start in range(0, self.n_frames, chunk_frames):
                idx = list(range(start, min(self.n_frames, start + chunk_frames)))
                try:
                    frames = self.vr.get_batch(idx).asnumpy()
                except Exception as e:
                    self.decord_error = _first_line(e)
                    self.backend = "pyav"
                    log.info(
                        "%s: decord failed at frame %d (%s); decoding with PyAV",
                        self.path,
                        start,
                        self.decord_error,
                    )
                    break
                yield start, frames
            else:
                return
        yield from self._pyav_chunks(start, chunk_frames)

    def _pyav_chunks(self, skip: int, chunk_frames: int) -> Iterator[tuple[int, np.ndarray]]:
        import av

        buf, first, i = [], skip, -1
        try:
            with av.open(self.path) as container:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                for frame in container.decode(stream):
                    i += 1
                    if i >= self.n_frames:
                        break
                    if i < skip:
                        continue
                    buf.append(frame.to_ndarray(width=self.width, height=self.height, format="rgb24"))
                    if len(buf) == chunk_frames:
                        yield first, rotate_frames(np.stack(buf), self.rotation)
                        first, buf = first + len(buf), []
        except av.error.FFmpegError as e:
            raise BadVideo("video:corrupt", f"decode failed at frame {i + 1}: {_first_line(e)}") from None
        if buf:
            yield first, rotate_frames(np.stack(buf), self.rotation)
        if i + 1 < min(self.n_frames, skip + 1):
            detail = f"decord: {getattr(self, 'decord_error', '')}; PyAV decoded {i + 1} frame(s)"
            raise BadVideo("video:corrupt", detail)


def read_frames_at(
    path: str, indices: Sequence[int], width: int = -1, height: int = -1, rotation: int = 0
) -> np.ndarray:
    """RGB uint8 frames (N, H, W, 3) at ``indices`` (clamped to the video), upright (``width``/``height``
    are the coded size; ``rotation`` the display rotation from ``probe``): one batched decord call, or a
    PyAV pass up to the last index where decord cannot read the file."""
    import av

    try:
        import decord

        dw, dh = (height, width) if rotation in (90, 270) else (width, height)  # decord rotates itself
        vr = decord.VideoReader(path, ctx=decord.cpu(0), width=dw, height=dh, num_threads=1)
        idx = [min(max(int(i), 0), len(vr) - 1) for i in indices]
        return vr.get_batch(idx).asnumpy()
    except Exception as e:
        log.info("%s: decord failed (%s); reading frames with PyAV", path, _first_line(e))
    wanted = {max(int(i), 0) for i in indices}
    kw = {} if width <= 0 or height <= 0 else {"width": width, "height": height}
    got: dict[int, np.ndarray] = {}
    n, last = 0, None
    with av.open(path) as container:
        for i, frame in enumerate(container.decode(container.streams.video[0])):
            n, last = i + 1, frame
            if i in wanted:
                got[i] = frame.to_ndarray(format="rgb24", **kw)
            if i >= max(wanted):
                break
    if last is None:
        raise BadVideo("video:unreadable", f"no frame decoded from {path}")
    if n - 1 not in got:  # indices past the end read the last frame
        got[n - 1] = last.to_ndarray(format="rgb24", **kw)
    out = [got[min(max(int(i), 0), n - 1)] for i in indices]
    return rotate_frames(np.stack(out), rotation)


def read_clip_frames(
    path: str, start_frame: int, end_frame: int, n: int, short_side: int, gap: int = 1
) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Fallback for filters run without the scenes stage's cached frames: ``n`` evenly spread frames of
    [start_frame, end_frame) and the frame ``gap`` after each, at analysis resolution, upright.
    Returns (indices, frames (n, h, w, 3), next_frames (n, h, w, 3))."""
    info = probe(path)
    w, h = analysis_size(info.width, info.height, short_side)
    last = max(start_frame, end_frame - 1 - gap)
    idx = sorted({int(round(x)) for x in np.linspace(start_frame, last, n)})
    both = sorted(set(idx) | {i + gap for i in idx})
    batch = read_frames_at(path, both, w, h, info.rotation)
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
    order decord indexes; turned upright when the source carries a display rotation) and encode each
    job's frames to H.264 mp4 (libx264, yuv420p, even size, the source frame rate). Each file is written
    to a temp name and os.replace'd, so a reader never sees half a clip. Decoding stops after the last
    frame any job needs. A keyframe every ``keyframe_interval_s`` bounds what a training loader must
    decode to reach a random frame (0 leaves it to x264).

    Each clip is encoded by its own ffmpeg CLI process (libx264, bitexact), fed raw yuv420p frames on
    stdin: libx264 inside this process (PyAV) gave different bytes for the same frames depending on what
    the process had done before and on the load (decoder threads, earlier encodes), so a clip re-encoded
    after a killed run did not match; a fresh ffmpeg process given the same frames writes the same bytes."""
    import av

    jobs = sorted(jobs, key=lambda j: j.start_frame)
    if not jobs:
        return []
    ffmpeg = shutil.which(FFMPEG)
    if ffmpeg is None:
        raise RuntimeError(
            f"the {FFMPEG!r} binary is not on PATH; clips are encoded with it: run `make setup`"
        )
    last_needed = max(j.end_frame for j in jobs)
    open_enc: dict[int, tuple] = {}  # job index -> (ffmpeg process, tmp_path, stderr file)
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
        rotation = None  # from the first frame's display matrix: clips are written upright
        idx = -1
        try:
            for frame in src.decode(vstream):
                idx += 1
                if idx >= last_needed:
                    break
                if rotation is None:
                    rotation = _rotation_of(frame)
                    if rotation in (90, 270):
                        w, h = even_size(vstream.height, vstream.width, short_side)
                if rotation:
                    upright = rotate_frames(frame.to_ndarray(format="rgb24"), rotation)
                    frame = av.VideoFrame.from_ndarray(upright, format="rgb24")
                yuv = None
                for k, job in enumerate(jobs):
                    if job.error or not (job.start_frame <= idx < job.end_frame):
                        continue
                    if k not in open_enc:
                        gop = max(1, round(float(rate) * keyframe_interval_s)) if keyframe_interval_s else 0
                        open_enc[k] = _open_encoder(ffmpeg, job, w, h, rate, crf, preset, gop)
                    if yuv is None:  # once per frame, shared by overlapping jobs
                        # reformat scales (when asked) and converts to yuv420p in one swscale call;
                        # to_ndarray packs the planes without row padding: (h * 3 / 2, w), what
                        # rawvideo yuv420p expects.
                        yuv = np.ascontiguousarray(
                            frame.reformat(width=w, height=h, format="yuv420p").to_ndarray()
                        )
                    try:
                        open_enc[k][0].stdin.write(memoryview(yuv).cast("B"))
                    except OSError:  # ffmpeg exited early: say why, from its exit code and stderr
                        job.error = _ffmpeg_failure(open_enc[k])
                        _close_encoder(open_enc.pop(k), job)
                        continue
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


def _open_encoder(
    ffmpeg: str, job: ClipJob, w: int, h: int, rate: fractions.Fraction, crf: int, preset: str, gop: int = 0
) -> tuple[subprocess.Popen, str, object]:
    """An ffmpeg process that reads raw yuv420p frames on stdin and writes ``job``'s mp4 to a temp name;
    returns (process, temp path, its stderr file)."""
    Path(job.out_path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{job.out_path}.tmp{os.getpid()}"
    # A fixed thread count: x264's output depends on it, and "auto" follows the CPUs a worker sees, so
    # the same clip would come out differently from a Ray worker and the sequential runner. bitexact
    # keeps version strings out of the file; -map_metadata -1 keeps out any metadata (no creation_time).
    cmd = [
        ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
        "-f", "rawvideo", "-pix_fmt", "yuv420p", "-s", f"{w}x{h}",
        "-framerate", f"{rate.numerator}/{rate.denominator}", "-i", "pipe:0",
        "-map_metadata", "-1", "-c:v", "libx264", "-pix_fmt", "yuv420p",
        "-crf", str(crf), "-preset", preset, "-threads", str(X264_THREADS),
        *(["-g", str(gop)] if gop else []),
        "-flags:v", "+bitexact", "-fflags", "+bitexact",
        "-movflags", "+faststart", "-f", "mp4", tmp,
    ]  # fmt: skip
    err = tempfile.TemporaryFile()  # a file, not a pipe: a pipe nobody reads could fill and stall ffmpeg
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err)
    return proc, tmp, err


def _ffmpeg_failure(enc: tuple) -> str:
    """A job's error text for an ffmpeg that failed: its exit code and the last line it wrote to stderr."""
    proc, _, err = enc
    try:
        proc.stdin.close()
    except OSError:
        pass
    rc = proc.wait()
    err.seek(0)
    lines = err.read().decode(errors="replace").strip().splitlines()
    return f"encode failed: ffmpeg exit {rc}" + (f": {lines[-1][:200]}" if lines else "")


def _close_encoder(enc: tuple, job: ClipJob) -> None:
    """End ``job``'s ffmpeg: os.replace its file into place when every frame went in and it exited 0;
    otherwise stop it, remove the temp file and say why in ``job.error``."""
    proc, tmp, err = enc
    complete = not job.error and job.n_written >= job.end_frame - job.start_frame
    try:
        if not complete:
            proc.kill()  # a clip that will be discarded need not be finished
        try:
            proc.stdin.close()
        except OSError:
            pass  # ffmpeg already gone; its exit code says why
        rc = proc.wait()
        if not complete:
            job.error = (
                job.error or f"source ended after {job.n_written} of {job.end_frame - job.start_frame} frames"
            )
        elif rc != 0:
            job.error = _ffmpeg_failure(enc)
        else:
            os.replace(tmp, job.out_path)
    except Exception as e:
        job.error = job.error or f"encode failed: {e}"
    finally:
        err.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if os.path.exists(tmp):
            os.remove(tmp)
