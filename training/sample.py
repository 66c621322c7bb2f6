"""Sample a video from a checkpoint: 1-4 reference images + a prompt -> mp4 (dual-CFG Euler, VAE decode)."""

from __future__ import annotations

import argparse
import os
import sys
from fractions import Fraction
from pathlib import Path

if __package__ in (None, ""):  # run as `python training/sample.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from model.flow import Conditioning, euler_sample  # noqa: E402
from training.data import decode_image, letterbox, to_unit_range  # noqa: E402


@torch.no_grad()
def generate(
    model,
    enc,
    refs: torch.Tensor,
    prompt: str,
    num_frames: int,
    steps: int = 50,
    w_img: float = 3.0,
    w_txt: float = 7.5,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """refs: (n, 3, H, W) uint8, n in 1..4, at the output size -> (num_frames, H, W, 3) uint8 video."""
    device = torch.device(device)
    if not 1 <= refs.shape[0] <= 4:
        raise ValueError(f"Phantom takes 1 to 4 reference images, got {refs.shape[0]}")
    vae = enc.vae
    ref_px = to_unit_range(refs.to(device))  # (n, 3, H, W) in [-1, 1]
    ref_latents = vae.encode_image(ref_px).float()[None]  # (1, n, C, h, w)
    ref_clip = enc.image.encode((ref_px + 1) / 2).float()[None]  # (1, n, clip_dim)
    text, text_mask = enc.text.encode([prompt])  # (1, L, D), (1, L)
    cond = Conditioning(
        text=text.float().to(device),
        text_mask=text_mask.bool().to(device),
        ref_latents=ref_latents,
        ref_clip=ref_clip,
        ref_mask=torch.ones(1, refs.shape[0], dtype=torch.bool, device=device),
    )
    # Causal video VAEs keep the first frame and compress the rest by temporal_factor.
    latent_frames = 1 + (num_frames - 1) // vae.temporal_factor
    shape = (1, vae.latent_channels, latent_frames, *ref_latents.shape[-2:])
    generator = torch.Generator(device=device).manual_seed(seed)
    latents = euler_sample(model, cond, shape, steps=steps, w_img=w_img, w_txt=w_txt, generator=generator)
    video = vae.decode(latents).float()[0]  # (3, T, H, W) in about [-1, 1]
    video = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return video.permute(1, 2, 3, 0).cpu().numpy()  # (T, H, W, 3)


def write_mp4(frames: np.ndarray, path: str | os.PathLike, fps: float = 8.0) -> Path:
    """(T, H, W, 3) uint8 -> H.264 mp4 via PyAV, written atomically (odd sizes padded to even for yuv420p)."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t, h, w, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.mp4")
    with av.open(str(tmp), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(round(fps * 1000), 1000))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18"}
        for frame in frames:
            for packet in stream.encode(
                av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            ):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)
    return path


def load_for_sampling(checkpoint: str | os.PathLike, use_ema: bool = True, device: str = "cpu"):
    """(config, model, encoders) from a training checkpoint; EMA weights unless use_ema is False."""
    from training.checkpoint import load_checkpoint
    from training.config import config_from_dict
    from training.encoders import build_encoders
    from training.loop import _encoder_cfg, build_model

    state = load_checkpoint(checkpoint)
    cfg = config_from_dict(state["config"])
    model = build_model(cfg)
    weights = state["ema"] if use_ema and "ema" in state else state["model"]
    model.load_state_dict(weights)
    model.to(device).eval()
    enc = build_encoders(_encoder_cfg(cfg.encoders, torch.device(device)))
    return cfg, model, enc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--refs", nargs="+", required=True, help="1 to 4 reference images")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--out", required=True, help="output .mp4")
    parser.add_argument("--height", type=int, help="default: first bucket of the last phase")
    parser.add_argument("--width", type=int)
    parser.add_argument("--num-frames", type=int)
    parser.add_argument("--fps", type=float)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--w-img", type=float, default=3.0)
    parser.add_argument("--w-txt", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-ema", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if not 1 <= len(args.refs) <= 4:
        parser.error("--refs takes 1 to 4 images")

    cfg, model, enc = load_for_sampling(args.checkpoint, use_ema=not args.no_ema, device=args.device)
    last = cfg.phases[-1]
    height = args.height or last.buckets[0][0]
    width = args.width or last.buckets[0][1]
    refs = torch.stack([letterbox(decode_image(Path(p).read_bytes()), (height, width)) for p in args.refs])
    video = generate(
        model,
        enc,
        refs,
        args.prompt,
        num_frames=args.num_frames or last.num_frames,
        steps=args.steps,
        w_img=args.w_img,
        w_txt=args.w_txt,
        seed=args.seed,
        device=args.device,
    )
    out = write_mp4(video, args.out, fps=args.fps or last.fps)
    print(f"wrote {out} ({video.shape[0]} frames, {width}x{height})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
