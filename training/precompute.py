"""Latent precompute: a Ray Data job that encodes every triplet once into latent shards the trainer reads.

`python training/precompute.py --config configs/phantom_wan_1.3b.yaml --shards output/full/shards --out
output/full/latents` writes one latent shard per raw shard (same name, same samples in the same order) and
an index.json. Each sample keeps its caption, json and reference JPEGs (for sample videos) and gains, per
training phase, `<tag>.safetensors` with exactly what the trainer's encoders would produce on the fly for
that phase (the same frames, bucket and letterboxed references: the decode code is the trainer's own):
latents (C, T', h, w), text (L, D) real tokens only, ref_latents (n, C, h, w), ref_clip (n, clip_dim).
A sample the trainer would skip keeps its place with the reason (skip.txt, or <tag>.err), so the shuffle
and batching over latent shards equal those over raw shards and a run gives the same losses.

Either folder may be a store URI (``s3://bucket/run/shards``): raw shards are streamed from the store; a
latent shard is written in a local scratch folder, then uploaded whole (one object), the index last.

Then train with `--set data.latent_shards=<out>`: the loop never runs the VAE or the text encoder.
Image-pair shards (python -m curation.image_pairs) are precomputed the same way, `--shards <image_pairs> --out
<pair_latents>`: a one-frame sample encodes to one latent frame in its own bucket, under the same phase tags;
train with `--set data.image_pair_latents=<pair_latents>` beside data.latent_shards, at data.image_pair_ratio.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python training/precompute.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

log = logging.getLogger("training.precompute")
REPO_ROOT = Path(__file__).resolve().parents[1]


def phase_tag(cfg, phase_idx: int) -> str:
    """Names one phase's encodings by everything they depend on (encoders, frames, sizes, seed)."""
    from training.encode import encoder_signature, latent_tag

    p = cfg.phases[phase_idx]
    return latent_tag(encoder_signature(cfg.encoders), phase_idx, p.buckets, p.num_frames, p.fps,
                      cfg.seed + 7919 * phase_idx, cfg.data.max_refs)  # fmt: skip


def _phase_streams(cfg) -> list:
    from training.data import StreamSpec, TripletStream

    streams = []
    for i, p in enumerate(cfg.phases):
        spec = StreamSpec(
            urls=[],
            buckets=p.buckets,
            num_frames=p.num_frames,
            fps=p.fps,
            batch_size=1,
            seed=cfg.seed + 7919 * i,
            max_refs=cfg.data.max_refs,
        )
        streams.append((phase_tag(cfg, i), TripletStream(spec)))
    return streams


class ShardEncoder:
    """Ray Data actor: encoders loaded once in the worker; one call turns a raw shard into a latent one."""

    def __init__(
        self, cfg_dict: dict[str, Any], out_dir: str, device: str = "cpu", batch_size: int = 4
    ) -> None:
        from training.config import config_from_dict

        self.cfg = config_from_dict(cfg_dict)
        self.out_dir = out_dir  # a local folder or a store URI
        self.device = device
        self.batch_size = batch_size
        self.enc = None

    def setup(self) -> None:
        import torch

        from training.encoders import build_encoders
        from training.models import encoder_cfg

        if self.enc is None:
            torch.set_num_threads(max(1, int(os.environ.get("PRECOMPUTE_THREADS", "1"))))
            self.enc = build_encoders(encoder_cfg(self.cfg.encoders, torch.device(self.device)))

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        self.setup()
        return encode_shard(row["url"], self.out_dir, self.cfg, self.enc, self.device, self.batch_size)


def _tensors_bytes(tensors) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def encode_shard(
    url: str, out_dir: str | Path, cfg, enc, device: str = "cpu", batch_size: int = 4
) -> dict[str, Any]:
    """Raw shard (a path or a store URI) -> latent shard of the same name in ``out_dir`` (a folder or a store
    URI), written atomically; returns its index entry and counts.

    Samples are decoded in order, encoded in batches of up to `batch_size` of one bucket (a chunk of
    4 * batch_size samples is in memory at a time), and written back in their original order.
    """
    import torch

    from curation.models import sha256_file
    from curation.shards import iter_tar_samples
    from curation.storage import Store, scratch_dir
    from training.data import CorruptCounter, collate, video_size
    from training.encode import encode_fresh  # the trainer's own encoding: the same tensors as on the fly

    t0 = time.perf_counter()
    streams = _phase_streams(cfg)
    counter = CorruptCounter()

    def samples():  # the one shard reader; a broken tar is counted, the samples before the break kept
        try:
            for key, members in iter_tar_samples(url):
                yield {"__key__": key, "__url__": url, **members}
        except Exception as exn:  # noqa: BLE001
            exn.args = (*exn.args, url)
            counter.handler(exn)

    ds = samples()
    store = Store(out_dir)
    out_dir = Path(scratch_dir(store))  # the folder itself when local
    out_dir.mkdir(parents=True, exist_ok=True)
    name = Path(url).name
    tmp = out_dir / f".{name}.tmp{os.getpid()}"
    stats = {"n": 0, "skipped": 0, "errors": 0}
    chunk: list[tuple[str, dict[str, bytes], dict[str, Any]]] = []  # (key, members, {tag: decoded})

    def flush(tar) -> None:
        for tag, _ in streams:
            by_bucket: dict[tuple, list[tuple[int, dict]]] = {}
            for i, (_, _, decoded) in enumerate(chunk):
                if tag in decoded:
                    d = decoded[tag]
                    by_bucket.setdefault(tuple(d["video"].shape), []).append((i, d))
            for group in by_bucket.values():
                for start in range(0, len(group), batch_size):
                    part = group[start : start + batch_size]
                    with torch.no_grad():
                        encoded = encode_fresh(collate([d for _, d in part]), enc, torch.device(device))
                    for (i, _), e in zip(part, encoded):
                        chunk[i][1][f"{tag}.safetensors"] = _tensors_bytes(e)
        for key, members, _ in chunk:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        chunk.clear()

    with tarfile.open(tmp, "w") as tar:
        for sample in ds:
            stats["n"] += 1
            members: dict[str, bytes] = {}
            decoded_by_tag: dict[str, Any] = {}
            counter.counts.clear()
            # The trainer's own checks (missing keys, bad json, size): dropped before bucketing.
            kept = list(streams[0][1].with_meta(iter([sample]), counter))
            if not kept:
                members["skip.txt"] = next(iter(counter.counts)).encode()
                stats["skipped"] += 1
            else:
                meta = dict(sample["_meta"])
                if "width" not in meta or "height" not in meta:
                    meta["width"], meta["height"] = video_size(sample["mp4"])
                meta["frame_indices"] = {}
                for tag, stream in streams:
                    counter.counts.clear()
                    sample["_bucket"] = next(stream.with_meta(iter([dict(sample)]), counter))["_bucket"]
                    decoded = stream.decode(sample, counter)
                    if decoded is None:
                        members[f"{tag}.err"] = next(iter(counter.counts)).encode()
                        stats["errors"] += 1
                        continue
                    decoded_by_tag[tag] = decoded
                    meta["frame_indices"][tag] = decoded["meta"]["frame_indices"]
                members["json"] = json.dumps(meta).encode()
                for k in sample:
                    if k == "txt" or k.startswith("ref_"):
                        members[k] = sample[k]
            chunk.append((sample["__key__"], members, decoded_by_tag))
            if len(chunk) >= 4 * batch_size:
                flush(tar)
        flush(tar)
    out = out_dir / name
    os.replace(tmp, out)
    digest = sha256_file(out)  # streamed: a shard can be gigabytes
    size = out.stat().st_size
    if not store.is_local:
        store.put_file(name, out)
        out.unlink()
    return {
        "name": name,
        "num_samples": stats["n"],
        "bytes": size,
        "sha256": digest,
        "skipped": stats["skipped"],
        "errors": stats["errors"],
        "seconds": time.perf_counter() - t0,
    }


def precompute(
    cfg,
    shards: str,
    out: str,
    num_actors: int = 1,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
    use_ray: bool = True,
    batch_size: int = 4,
) -> dict[str, Any]:
    """Encode every shard listed by `shards` into `out` (each a folder or a store URI); writes
    out/index.json (raw shard order kept)."""
    from curation.shards import list_shards
    from curation.storage import Store, is_uri

    urls = list_shards(shards)
    store = Store(out)  # an absolute path when local: Ray workers may start elsewhere
    if store.is_local:
        Path(store.uri).mkdir(parents=True, exist_ok=True)
    device = "cuda" if gpus_per_actor > 0 else "cpu"
    if use_ray:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        import ray
        from ray.data import ActorPoolStrategy

        if not ray.is_initialized():
            if os.environ.get("RAY_ADDRESS"):
                ray.init(log_to_driver=True)
            else:
                ray.init(
                    num_cpus=max(2, int(num_actors * cpus_per_actor + 0.999)),
                    include_dashboard=False,
                    runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT), "OMP_WAIT_POLICY": "PASSIVE"}},
                )
        ds = ray.data.from_items([{"url": u} for u in urls], override_num_blocks=len(urls))
        rows = ds.map(
            ShardEncoder,
            fn_constructor_kwargs={
                "cfg_dict": cfg.to_dict(),
                "out_dir": store.uri,
                "device": device,
                "batch_size": batch_size,
            },
            compute=ActorPoolStrategy(size=num_actors),
            num_cpus=cpus_per_actor,
            num_gpus=gpus_per_actor,
        ).take_all()  # one small row per shard, never per sample
    else:  # the same stage in this process (tests, debugging)
        worker = ShardEncoder(cfg.to_dict(), store.uri, device, batch_size)
        rows = [worker({"url": u}) for u in urls]
    by_name = {r["name"]: r for r in rows}
    entries = [by_name[Path(u).name] for u in urls]
    index = {
        "shards": [{k: e[k] for k in ("name", "num_samples", "bytes", "sha256")} for e in entries],
        "source": str(shards) if is_uri(shards) else str(Path(shards).resolve()),
        "tags": [phase_tag(cfg, i) for i in range(len(cfg.phases))],
    }
    store.write_bytes("index.json", json.dumps(index, indent=1).encode())  # atomic; written last
    return {
        "shards": len(entries),
        "samples": sum(e["num_samples"] for e in entries),
        "skipped": sum(e["skipped"] for e in entries),
        "errors": sum(e["errors"] for e in entries),
    }


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the training YAML the latents are for")
    p.add_argument("--shards", required=True, help="raw triplet or image-pair shard directory (or s3://...)")
    p.add_argument("--out", required=True, help="latent shard directory to write (or s3://..., gs://...)")
    p.add_argument("--num-actors", type=int, default=1, help="encoder actors (one model copy each)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--gpus-per-actor", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=4, help="samples of one bucket per encoder call")
    p.add_argument("--no-ray", action="store_true", help="same stage, one process")
    args = p.parse_args(argv)
    from training.config import load_config

    cfg = load_config(args.config)
    stats = precompute(
        cfg,
        args.shards,
        args.out,
        args.num_actors,
        args.cpus_per_actor,
        args.gpus_per_actor,
        use_ray=not args.no_ray,
        batch_size=args.batch_size,
    )
    log.info("wrote %s: %s", args.out, stats)
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
