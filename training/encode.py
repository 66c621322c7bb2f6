"""Batch -> encoder outputs (x0 latents and the Conditioning): fresh from the frozen encoders, or cached."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from model.flow import Conditioning
from training.data import to_unit_range
from training.encoders import build_encoders
from training.models import encoder_cfg

log = logging.getLogger(__name__)


class LazyEncoders:
    """The frozen encoders, built on first use: a run on latent shards never loads the VAE or text encoder
    unless it writes a sample video."""

    def __init__(self, cfg: dict[str, Any], device: torch.device) -> None:
        self.cfg, self.device, self._enc = cfg, device, None

    def __call__(self):
        if self._enc is None:
            self._enc = build_encoders(encoder_cfg(self.cfg, self.device))
        return self._enc

    @property
    def built(self) -> bool:
        return self._enc is not None


@torch.no_grad()
def encode_fresh(batch: dict[str, Any], enc, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Run the frozen encoders on a batch; per-sample tensors (text and refs unpadded)."""
    video = to_unit_range(batch["video"].to(device))  # (B, 3, T, H, W) in [-1, 1]
    latents = enc.vae.encode(video).float()  # (B, C, T', h, w)
    text, text_mask = enc.text.encode(batch["captions"])  # (B, L, D), (B, L)
    ref_mask = batch["ref_mask"].to(device)  # (B, n)
    refs = to_unit_range(batch["refs"].to(device)[ref_mask])  # (N_valid, 3, H, W), only real refs
    ref_lat = enc.vae.encode_image(refs).float()  # (N_valid, C, h, w)
    ref_clip = enc.image.encode((refs + 1) / 2).float()  # (N_valid, clip_dim)
    out, j = [], 0
    for i in range(latents.shape[0]):
        n = int(ref_mask[i].sum())
        out.append(
            {
                "latents": latents[i],
                "text": text[i][text_mask[i].bool()],
                "ref_latents": ref_lat[j : j + n],
                "ref_clip": ref_clip[j : j + n],
            }
        )
        j += n
    return out


def _pad_stack(rows: list[torch.Tensor], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of (l_i, ...) -> ((B, length, ...) zero-padded, (B, length) bool mask)."""
    shape = (len(rows), length, *rows[0].shape[1:])
    out = rows[0].new_zeros(shape)
    mask = torch.zeros(len(rows), length, dtype=torch.bool, device=rows[0].device)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
        mask[i, : r.shape[0]] = True
    return out, mask


def encode_batch(
    batch: dict[str, Any], enc, device: torch.device, cache: EncodingCache | None = None
) -> tuple[torch.Tensor, Conditioning]:
    """Batch from the loader -> (x0 latents (B, C, T', h, w), Conditioning), reading/writing the cache."""
    B = len(batch["keys"])
    per_sample: list[dict[str, torch.Tensor] | None] = [None] * B
    paths = []
    if "encoded" in batch:  # from latent shards (training/precompute.py): nothing to encode
        per_sample = [{k: v.to(device) for k, v in e.items()} for e in batch["encoded"]]
    elif cache is not None:
        for i, key in enumerate(batch["keys"]):
            n_refs = int(batch["ref_mask"][i].sum())
            paths.append(cache.path(key, batch["bucket"], batch["meta"][i]["frame_indices"], n_refs))
            hit = cache.load(paths[i])
            if hit is not None:
                per_sample[i] = {k: v.to(device) for k, v in hit.items()}
    missing = [i for i in range(B) if per_sample[i] is None]
    if missing:
        enc = enc() if callable(enc) else enc
        sub = {
            "video": batch["video"][missing],
            "captions": [batch["captions"][i] for i in missing],
            "refs": batch["refs"][missing],
            "ref_mask": batch["ref_mask"][missing],
        }
        for i, enc_out in zip(missing, encode_fresh(sub, enc, device)):
            per_sample[i] = enc_out
            if cache is not None:
                cache.save(paths[i], enc_out)
    x0 = torch.stack([s["latents"] for s in per_sample])  # (B, C, T', h, w)
    text, text_mask = _pad_stack([s["text"] for s in per_sample], max(s["text"].shape[0] for s in per_sample))
    n_max = batch["ref_mask"].shape[1]
    ref_latents, ref_mask = _pad_stack([s["ref_latents"] for s in per_sample], n_max)
    ref_clip, _ = _pad_stack([s["ref_clip"] for s in per_sample], n_max)
    cond = Conditioning(
        text=text, text_mask=text_mask, ref_latents=ref_latents, ref_clip=ref_clip, ref_mask=ref_mask
    )
    return x0, cond


# ----------------------------------------------------------------------------- stored encoder outputs


def encoder_signature(cfg: dict[str, Any]) -> str:
    """Names the encoder setup, so cached or precomputed outputs of another setup are never reused."""
    return repr(sorted((k, sorted((v or {}).items())) for k, v in (cfg or {}).items()))


def latent_tag(
    encoder_sig: str, phase_idx: int, buckets, num_frames: int, fps: float, seed: int, max_refs: int
) -> str:
    """The latent-shard member name of one phase's encodings: a digest of everything they depend on."""
    ident = json.dumps([encoder_sig, buckets, num_frames, fps, seed, max_refs])
    return f"p{phase_idx}_{hashlib.sha256(ident.encode()).hexdigest()[:12]}"


class EncodingCache:
    """Encoder outputs per sample in safetensors files (never pickle), keyed by sample and transform."""

    def __init__(self, root: str | os.PathLike, signature: str) -> None:
        self.root = Path(root)
        self.signature = signature
        self.hits = 0
        self.misses = 0

    def path(self, key: str, bucket: list[int], frame_indices: list[int], num_refs: int) -> Path:
        """Keyed by everything the encodings depend on: encoders, sample, output size, the exact frames."""
        ident = json.dumps([self.signature, key, list(bucket), list(frame_indices), num_refs])
        digest = hashlib.sha256(ident.encode()).hexdigest()
        return self.root / digest[:2] / f"{digest}.safetensors"

    def load(self, path: Path) -> dict[str, torch.Tensor] | None:
        from safetensors.torch import load_file

        if not path.exists():
            self.misses += 1
            return None
        try:
            out = load_file(str(path))
        except Exception as exn:  # noqa: BLE001 - a torn cache file is recomputed, not fatal
            log.warning("ignoring unreadable cache file %s (%r)", path, exn)
            self.misses += 1
            return None
        self.hits += 1
        return out

    def save(self, path: Path, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, path)
