"""The `scenes` stage: one analysis decode per video, shot detection, clip spans; fans a video into clips."""

from __future__ import annotations

import dataclasses
import logging
import math
import os

import numpy as np

from curation.config import ConfigError, field
from curation.stage import Record, Stage, build_backend, register_stage, reject
from curation.video_io import (
    MAX_PIXELS_8K,
    AnalysisReader,
    BadVideo,
    analysis_size,
    count_packets,
    frame_timestamps,
    is_variable_frame_rate,
    probe,
)

# Columns of the source row that describe the whole video and do not belong on each clip row.
log = logging.getLogger(__name__)

# Panda-70M's per-span columns (lists parallel to spans): each clip row gets its own span's entry instead.
_VIDEO_ONLY_KEYS = ("spans", "span_captions", "span_labels", "span_shot_boundaries", "skipped_spans")


def trusted_shots(spans_s: list | None, span_shots: list | None, fps: float, n_frames: int
                  ) -> list[tuple[int, int]] | None:
    """The CSV's shot boundaries (per span, [start_s, end_s] relative to the span) as absolute [start, end)
    frame ranges, or None when a span has none (then shot detection runs for the whole video)."""
    if not isinstance(spans_s, list) or not isinstance(span_shots, list) or len(span_shots) != len(spans_s):
        return None
    if not spans_s or any(not shots for shots in span_shots):
        return None
    out = []
    for span, shots in zip(spans_s, span_shots):
        t0 = float(span[0])
        for a, b in shots:
            fa = min(max(int(round((t0 + float(a)) * fps)), 0), n_frames)
            fb = min(max(int(round((t0 + float(b)) * fps)), fa), n_frames)
            if fb > fa:
                out.append((fa, fb))
    return sorted(out) or None


def span_frames(spans_s: list | None, fps: float, n_frames: int) -> list[tuple[int, int]]:
    """Source spans in seconds -> [start, end) frame ranges clipped to the video (None = whole video).
    Empty or inverted spans stay in the list as (k, k) so span indices keep matching the captions."""
    if spans_s is None:
        return [(0, n_frames)]
    out = []
    for span in spans_s:
        a = min(max(int(round(float(span[0]) * fps)), 0), n_frames)
        b = min(max(int(round(float(span[1]) * fps)), a), n_frames)
        out.append((a, b))
    return out


def cut_segments(shots: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """Intersect shots with source spans: a span boundary is a cut too. Returns (start, end, span_index)
    in time order; frames outside every span are dropped."""
    segs = []
    for k, (sa, sb) in enumerate(spans):
        for a, b in shots:
            lo, hi = max(a, sa), min(b, sb)
            if hi > lo:
                segs.append((lo, hi, k))
    return sorted(segs)


def plan_clips(
    segments: list[tuple[int, int, int]],
    fps: float,
    n_frames: int,
    min_len_s: float,
    max_len_s: float,
    trim_frames: int,
) -> list[dict]:
    """Clip spans from cut segments: ``trim_frames`` dropped at each cut (not at the video's own start or
    end) so no transition frame leaks; segments longer than ``max_len_s`` split into equal parts; shorter
    than ``min_len_s`` kept as rejected ``scenes:too_short``. Returns dicts with start_frame, end_frame
    (exclusive), span_index, reason (None = ok)."""
    max_frames = max(1, int(math.floor(max_len_s * fps + 1e-6)))
    out = []
    for a, b, k in segments:
        if a > 0:
            a += trim_frames
        if b < n_frames:
            b -= trim_frames
        if b <= a:
            continue  # nothing but transition frames
        if (b - a) / fps < min_len_s - 1e-6:
            out.append({"start_frame": a, "end_frame": b, "span_index": k, "reason": "scenes:too_short"})
            continue
        parts = max(1, math.ceil((b - a) / max_frames))
        edges = [a + round(j * (b - a) / parts) for j in range(parts + 1)]
        for p0, p1 in zip(edges[:-1], edges[1:]):
            out.append({"start_frame": p0, "end_frame": p1, "span_index": k, "reason": None})
    return out


def sample_positions(n_frames: int, stride: int, gap: int) -> list[int]:
    """Analysis sample points: every ``stride``-th frame that has a partner ``gap`` frames later."""
    return [i for i in range(0, n_frames - gap, stride)]


@register_stage("scenes")
class Scenes(Stage):
    """Video row -> clip rows. Decodes the video ONCE at analysis resolution; shot detection sees every
    frame; a subsample (with motion-pair partners) is kept on each clip row as transient ``_frames``."""

    @dataclasses.dataclass
    class Params:
        min_clip_len_s: float = field(2.0, gt=0)
        max_clip_len_s: float = field(15.0, gt=0)
        trim_frames: int = field(2, ge=0, le=100)
        analysis_short_side: int = field(144, ge=32, le=1080)
        sample_fps: float = field(2.0, gt=0, le=60)  # analysis frames kept per second of video
        # motion pairs: each kept frame is stored with the frame this many later
        pair_gap_frames: int = field(1, ge=1, le=30)
        max_samples_per_video: int = field(1800, ge=16)  # memory guard for long videos (lowers sample_fps)
        max_pixels: int = field(MAX_PIXELS_8K, ge=1)  # bigger videos are refused (video:too_large)
        min_video_frames: int = field(2, ge=2)
        # a smaller video (short side, pixels) is video:too_small: nothing to learn a subject from
        min_short_side_px: int = field(32, ge=2)
        allow_vfr: bool = False  # variable-frame-rate videos are rejected unless this is set
        chunk_frames: int = field(64, ge=1, le=1024)
        # Panda-70M rows carry shot boundaries per span (shot_boundary_detection): take them instead of
        # running the shot detector when every span has them
        trust_shot_boundaries: bool = False

        def validate(self, path: str = "") -> None:
            if self.min_clip_len_s > self.max_clip_len_s:
                raise ConfigError(
                    f"{path}.min_clip_len_s: {self.min_clip_len_s} > max_clip_len_s {self.max_clip_len_s}"
                )

    def __init__(self, params=None, backend=None, ctx=None):
        super().__init__(params, backend, ctx)
        cfg = dict(self.backend_cfg)
        self.detector_name = cfg.pop("name", "adaptive")
        self.detector_kwargs = cfg
        # TransNetV2 holds weights: a runner that asks the built stage (not the class) can give it an
        # actor pool so they load once per worker; the PySceneDetect detectors are plain functions.
        self.uses_model = self.detector_name == "transnetv2"
        self.detector = None

    def setup(self) -> None:
        import curation.backends.shots  # noqa: F401  (registers the shot_detector backends)

        self.detector = build_backend("shot_detector", self.detector_name, **self.detector_kwargs)
        load = getattr(self.detector, "load", None)
        if load is not None:
            load()

    def process(self, rows: list[Record]) -> list[Record]:
        out = []
        for row in rows:
            try:
                clips = self.cut_video(row)
            except BadVideo as e:
                clips = [reject(row, e.reason, clip_id=None, video_n_rows=1, reason_detail=e.detail)]
            out.extend(clips)
        return out

    def cut_video(self, row: Record) -> list[Record]:
        p = self.params
        path = row.get("video_path") or ""
        if path and not os.path.isabs(path):
            raise BadVideo("video:bad_path", f"video_path must be absolute: {path!r}")
        info = probe(path, p.max_pixels)
        if min(info.width, info.height) < p.min_short_side_px:
            raise BadVideo(
                "video:too_small",
                f"{info.width}x{info.height} is below the {p.min_short_side_px} px short side",
            )
        w, h = analysis_size(info.width, info.height, p.analysis_short_side)
        try:
            reader = AnalysisReader(path, w, h, rotation=info.rotation)
        except BadVideo:
            n_packets = count_packets(path)
            if info.n_frames_header and n_packets < info.n_frames_header:
                raise BadVideo(
                    "video:truncated", f"{n_packets} of {info.n_frames_header} frames present"
                ) from None
            raise
        n = reader.n_frames
        if n < p.min_video_frames:
            raise BadVideo("video:too_few_frames", f"{n} frame(s)")
        truncated = None  # the container promises more frames than the file holds: keep what is there
        if info.n_frames_header and n < info.n_frames_header - 1:
            truncated = (n, info.n_frames_header)
        fps = info.fps
        # decord's timestamps are checked, and PyAV's packet times taken where they are garbage (AVI).
        ts_s, ts_source = frame_timestamps(path, reader.timestamps_s(), n, fps)
        if not p.allow_vfr and is_variable_frame_rate(ts_s):
            raise BadVideo(
                "video:variable_frame_rate", f"frame intervals vary (median {np.median(np.diff(ts_s)):.4f} s)"
            )

        stride = max(1, int(round(fps / p.sample_fps)), math.ceil(n / p.max_samples_per_video))
        gap = p.pair_gap_frames
        samples = sample_positions(n, stride, gap)
        keep = set(samples) | {i + gap for i in samples}
        store: dict[int, np.ndarray] = {}
        trusted = trusted_shots(row.get("spans"), row.get("span_shot_boundaries"), fps, n) \
            if p.trust_shot_boundaries else None
        if trusted is None:
            self.detector.start(fps, n)
        n_seen = 0
        for first, frames in reader.chunks(p.chunk_frames):
            if trusted is None:
                self.detector.push(first, frames)
            n_seen = first + len(frames)
            for i in range(first, first + len(frames)):
                if i in keep:
                    store[i] = frames[i - first].copy()  # copy: a view would pin the whole chunk
        shots = trusted if trusted is not None else self.detector.shots()
        detector_name = "panda_csv" if trusted is not None else self.detector.name
        if n_seen < n:  # decoding stopped early: the frames before the break are kept
            if n_seen < p.min_video_frames:
                raise BadVideo("video:truncated", f"{n_seen} of {n} frames decoded")
            truncated = (n_seen, truncated[1] if truncated else n)
            n, ts_s = n_seen, ts_s[:n_seen]
            samples = [i for i in samples if i + gap < n]
            shots = [(a, min(b, n)) for a, b in shots if a < n]
        if truncated:
            log.warning("%s: %d of %d frames decodable; keeping them", path, *truncated)

        spans = span_frames(row.get("spans"), fps, n)
        segments = cut_segments(shots, spans)
        plan = plan_clips(segments, fps, n, p.min_clip_len_s, p.max_clip_len_s, p.trim_frames)
        if not plan:
            raise BadVideo(
                "scenes:no_clips", f"{len(shots)} shot(s), {len(spans)} span(s), nothing left after trimming"
            )

        base = {k: v for k, v in row.items() if k not in _VIDEO_ONLY_KEYS}
        captions = row.get("span_captions")
        scores = row.get("matching_score")
        labels, span_shots = row.get("span_labels"), row.get("span_shot_boundaries")
        video_id = row.get("video_id")
        clips = []
        for k, c in enumerate(plan):
            a, b, si = c["start_frame"], c["end_frame"], c["span_index"]
            clip = {
                **base,
                "clip_id": f"{video_id}-{k:04d}",
                "video_n_rows": len(plan),
                "status": "ok",
                "reason": None,
                "start_frame": a,
                "end_frame": b,
                "start_s": round(float(ts_s[a]) - float(ts_s[0]), 4),
                "end_s": round(float(ts_s[b - 1]) - float(ts_s[0]) + 1.0 / fps, 4),
                "fps": round(fps, 4),
                "width": info.display_size[0],
                "height": info.display_size[1],
                "rotation": info.rotation,
                "decoder": reader.backend,
                "timestamps_source": ts_source,
                "n_frames": b - a,
                "span_index": si if row.get("spans") is not None else None,
                "source_caption": captions[si] if isinstance(captions, list) and si < len(captions) else None,
                "shot_detector": detector_name,
                "video_n_frames": n,
                "video_duration_s": round(n / fps, 3),
            }
            if isinstance(scores, list):
                clip["matching_score"] = scores[si] if si < len(scores) else None
            if isinstance(labels, list):  # Panda-70M's own label and shots of this clip's span
                clip["desirable_filtering"] = labels[si] if si < len(labels) else None
            if isinstance(span_shots, list):
                clip["shot_boundary_detection"] = span_shots[si] if si < len(span_shots) else None
            if truncated:  # recorded on every clip of the video, with the counts
                clip["video_n_frames_promised"] = truncated[1]
                clip["warnings"] = [
                    *(row.get("warnings") or []),
                    f"video:truncated:{truncated[0]}_of_{truncated[1]}",
                ]
            if c["reason"]:
                clips.append(reject(clip, c["reason"]))
                continue
            idx = [i for i in samples if a <= i and i + gap < b]
            empty = np.zeros((0, h, w, 3), np.uint8)
            # (N, h, w, 3) uint8 analysis frames and their motion-pair partners (N, h, w, 3).
            clip["_frames"] = np.stack([store[i] for i in idx]) if idx else empty
            clip["_next_frames"] = np.stack([store[i + gap] for i in idx]) if idx else empty
            clip["_frame_indices"] = idx
            clip["_pair_gap_frames"] = gap
            clips.append(clip)
        return clips
