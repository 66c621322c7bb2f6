"""Sample a video from a checkpoint: 1-4 reference images + a prompt -> mp4 (the family's two-weight guided
sampler: Euler for the MMDiT, the release's UniPC for Phantom-Wan; then the VAE decode)."""

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
from training.models import encoder_cfg, family  # noqa: E402

MAX_REFS = 4


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
    cfg=None,
) -> np.ndarray:
    """refs: (n, 3, H, W) uint8, n in 1..4, at the output size -> (num_frames, H, W, 3) uint8 video.

    cfg (a TrainConfig) picks the family's sampler; None = the MMDiT one. When the family has a negative
    prompt (Phantom-Wan: the release's by default), its encoded states are the null text of guidance.
    """
    device = torch.device(device)
    if not 1 <= refs.shape[0] <= MAX_REFS:
        raise ValueError(f"Phantom takes 1 to {MAX_REFS} reference images, got {refs.shape[0]}")
    vae = enc.vae
    if (num_frames - 1) % vae.temporal_factor:
        raise ValueError(
            f"num_frames={num_frames}: this VAE needs 1 + {vae.temporal_factor}k frames "
            f"(e.g. {1 + vae.temporal_factor * max(1, (num_frames - 1) // vae.temporal_factor)})"
        )
    ref_px = to_unit_range(refs.to(device))  # (n, 3, H, W) in [-1, 1]
    # Each reference is encoded on its own as a one-frame video (Phantom-Wan get_vae_latents).
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
    fam = None if cfg is None else family(cfg)
    sample = euler_sample if fam is None else fam.sample
    extra = {}
    if fam is not None and fam.negative_prompt is not None:
        null_text, _ = enc.text.encode([fam.negative_prompt])  # (1, L, D), zero past its real tokens
        extra["null_text"] = null_text.float().to(device)
    latents = sample(model, cond, shape, steps=steps, w_img=w_img, w_txt=w_txt, generator=generator, **extra)
    video = vae.decode(latents).float()[0]  # (3, T, H, W) in about [-1, 1]
    video = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return video.permute(1, 2, 3, 0).cpu().numpy()  # (T, H, W, 3)


class Sampler:
    """A trained model + its encoders, ready to turn reference images and a prompt into a video.

    The interface evaluation codes against: `load_sampler(ckpt)` then `generate(refs, prompt, ...)`.
    """

    def __init__(self, cfg, model, enc, device: str | torch.device = "cpu") -> None:
        self.cfg, self.model, self.enc = cfg, model, enc
        self.device = torch.device(device)
        last = cfg.phases[-1]
        self.height, self.width = last.buckets[0]
        self.num_frames, self.fps = last.num_frames, last.fps
        self.steps = cfg.log.sample_steps

    @property
    def family(self) -> str:
        return self.cfg.model.family

    def generate(
        self,
        refs: list[np.ndarray],
        prompt: str,
        seed: int = 0,
        steps: int | None = None,
        w_img: float = 3.0,
        w_txt: float = 7.5,
        num_frames: int | None = None,
    ) -> np.ndarray:
        """refs: 1-4 (H, W, 3) uint8 images, any size (letterboxed with white to the output size, as the
        release does) -> (T, H, W, 3) uint8 frames at (self.height, self.width)."""
        if not 1 <= len(refs) <= MAX_REFS:
            raise ValueError(f"Phantom takes 1 to {MAX_REFS} reference images, got {len(refs)}")
        for i, r in enumerate(refs):
            r = np.asarray(r)
            if r.dtype != np.uint8 or r.ndim != 3 or r.shape[2] != 3:
                raise ValueError(f"reference {i}: expected an (H, W, 3) uint8 array, got {r.dtype} {r.shape}")
        size = (self.height, self.width)
        ref_px = torch.stack([letterbox(np.asarray(r), size) for r in refs])  # (n, 3, H, W) uint8
        self.model.eval()
        return generate(
            self.model,
            self.enc,
            ref_px,
            prompt,
            num_frames=num_frames or self.num_frames,
            steps=steps or self.steps,
            w_img=w_img,
            w_txt=w_txt,
            seed=seed,
            device=self.device,
            cfg=self.cfg,
        )


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


def load_for_sampling(
    checkpoint: str | os.PathLike,
    use_ema: bool = True,
    device: str = "cpu",
    config: str | None = None,
):
    """(config, model, encoders) from a training checkpoint (.pt file or DCP folder); EMA weights unless
    use_ema is False. `config`: a YAML to use instead of the one stored in the checkpoint (same model)."""
    from training.checkpoint import load_weights_for_inference
    from training.config import config_from_dict, load_config
    from training.encoders import build_encoders

    stored, weights = load_weights_for_inference(checkpoint, use_ema=use_ema)
    cfg = load_config(config) if config else config_from_dict(stored)
    fam = family(cfg)
    # The trainer seeds before building: a randomly initialised LoRA base is then rebuilt identically.
    torch.manual_seed(cfg.seed)
    model = fam.build()
    missing, unexpected = model.load_state_dict(weights, strict=not fam.adapters_only)
    if unexpected:
        raise ValueError(f"{checkpoint}: weights for another model ({unexpected[:3]})")
    model.to(device).eval()
    enc = build_encoders(encoder_cfg(cfg.encoders, torch.device(device)))
    return cfg, model, enc


def load_sampler(
    ckpt: str | os.PathLike, model: str = "mmdit", device: str = "cpu", config: str | None = None
) -> Sampler:
    """A Sampler from a checkpoint the trainer wrote; `model` must name the checkpoint's family."""
    cfg, net, enc = load_for_sampling(ckpt, use_ema=True, device=device, config=config)
    if cfg.model.family != model:
        raise ValueError(f"{ckpt} holds a {cfg.model.family!r} model, not {model!r} (pass --model/model=)")
    return Sampler(cfg, net, enc, device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--model",
        choices=["mmdit", "phantom_wan"],
        default=None,
        help="model family (default: the checkpoint's)",
    )
    parser.add_argument(
        "--ckpt",
        "--checkpoint",
        dest="ckpt",
        required=True,
        help="training checkpoint: step_*.pt or a DCP step_* folder",
    )
    parser.add_argument("--config", help="YAML to use instead of the checkpoint's stored config")
    parser.add_argument("--ref", action="append", default=[], help="a reference image (repeat: 1 to 4)")
    parser.add_argument("--refs", nargs="+", default=[], help="reference images (same as repeated --ref)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument(
        "--rephrase",
        action="store_true",
        help="rewrite the prompt so it names each reference with its appearance (training/rephrase.py); "
        "the prompt used is printed and stored in <out>.prompt.json",
    )
    parser.add_argument(
        "--ref-desc",
        action="append",
        default=[],
        help="with --rephrase: a description of a reference image (repeat, one per reference, in order); "
        "without it the rephraser's describer captions the references",
    )
    parser.add_argument(
        "--rephrase-config",
        help="YAML with the rephraser's llm / describer backends (default: offline SmolLM2, no describer)",
    )
    parser.add_argument(
        "--rephrase-url", help="OpenAI-compatible endpoint for the rephraser LLM (e.g. http://host:8000/v1)"
    )
    parser.add_argument("--rephrase-model", default="", help="model name at --rephrase-url")
    parser.add_argument("--out", required=True, help="output .mp4")
    parser.add_argument("--height", type=int, help="default: first bucket of the last phase")
    parser.add_argument("--width", type=int)
    parser.add_argument("--num-frames", type=int)
    parser.add_argument("--fps", type=float)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--w-img", type=float, default=3.0, help="reference-image guidance weight")
    parser.add_argument("--w-txt", type=float, default=7.5, help="text guidance weight")
    parser.add_argument(
        "--negative-prompt",
        help="phantom_wan: the prompt encoded as the null text of guidance (default: the config's "
        "model.wan.negative_prompt, the release's negative prompt); '' = the all-zero null text",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-ema", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    paths = args.ref + args.refs
    if not 1 <= len(paths) <= MAX_REFS:
        parser.error(f"give 1 to {MAX_REFS} reference images (--ref a.png --ref b.png)")
    refs = []
    for p in paths:
        try:
            refs.append(decode_image(Path(p).read_bytes()))
        except Exception as e:  # noqa: BLE001 - a bad image is a clear CLI error
            parser.error(f"cannot read reference image {p}: {e}")

    rephrased = None
    if args.ref_desc and not args.rephrase:
        parser.error("--ref-desc describes the references for --rephrase")
    if args.rephrase:
        rephrased = _rephrase(parser, args, refs)
        print(f"prompt: {rephrased.prompt}")
        if not rephrased.rephrased:
            print(f"rephrase: kept the original prompt ({rephrased.reason})")

    cfg, model, enc = load_for_sampling(
        args.ckpt, use_ema=not args.no_ema, device=args.device, config=args.config
    )
    if args.model and args.model != cfg.model.family:
        parser.error(f"{args.ckpt} holds a {cfg.model.family!r} model, not {args.model!r}")
    if args.negative_prompt is not None:
        cfg.model.wan.negative_prompt = args.negative_prompt or None
        if family(cfg).negative_prompt != cfg.model.wan.negative_prompt:
            parser.error(f"--negative-prompt: the {cfg.model.family} sampler takes no negative prompt")
    sampler = Sampler(cfg, model, enc, args.device)
    sampler.height = args.height or sampler.height
    sampler.width = args.width or sampler.width
    video = sampler.generate(
        refs,
        rephrased.prompt if rephrased else args.prompt,
        seed=args.seed,
        steps=args.steps,
        w_img=args.w_img,
        w_txt=args.w_txt,
        num_frames=args.num_frames,
    )
    out = write_mp4(video, args.out, fps=args.fps or sampler.fps)
    print(f"wrote {out} ({video.shape[0]} frames, {sampler.width}x{sampler.height})")
    if rephrased is not None:
        from training.rephrase import write_prompt_record

        print(f"wrote {write_prompt_record(out, rephrased)}")
    return 0


def _rephrase(parser, args, refs):
    """The rephrased prompt for the CLI (configuration problems are CLI errors; bad replies fall back)."""
    from curation.config import ConfigError
    from training.rephrase import Rephraser, load_rephrase_config

    try:
        rcfg = load_rephrase_config(args.rephrase_config)
    except (ConfigError, OSError) as e:
        parser.error(f"--rephrase-config: {e}")
    if args.rephrase_url:
        rcfg.llm = {"name": "openai_compatible", "base_url": args.rephrase_url, "model": args.rephrase_model}
    if args.ref_desc and len(args.ref_desc) != len(refs):
        parser.error(f"give one --ref-desc per reference image ({len(args.ref_desc)} for {len(refs)})")
    try:
        return Rephraser(rcfg).rephrase(args.prompt, descriptions=args.ref_desc or None, images=refs)
    except ValueError as e:
        parser.error(str(e))


if __name__ == "__main__":
    raise SystemExit(main())
