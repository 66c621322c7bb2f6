"""Training entry point: Ray Train TorchTrainer (DDP or FSDP), local or on a cluster, or --no-ray."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python training/run.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# Before torch loads OpenMP: spinning OpenMP threads make torch many times slower on shared cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import yaml  # noqa: E402

from curation.config import ConfigError  # noqa: E402
from curation.storage import Store, is_uri  # noqa: E402
from training.config import TrainConfig, config_from_dict, load_config  # noqa: E402

log = logging.getLogger("training.run")
REPO_ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", required=True, help="training YAML (see configs/train_tiny.yaml)")
    p.add_argument("--shards", help="shard directory or store URI, e.g. s3://bucket/run/shards (data.shards)")
    p.add_argument("--out-dir", help="run directory or store URI, e.g. s3://bucket/train (log.out_dir)")
    p.add_argument("--num-workers", type=int, help="Ray Train workers (overrides scaling.num_workers)")
    p.add_argument("--use-gpu", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--strategy", choices=["ddp", "fsdp"], help="overrides scaling.strategy")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. optim.lr=3e-4")
    p.add_argument("--stop-at-step", type=int, help="checkpoint and leave after this step (like a kill)")
    p.add_argument("--no-ray", action="store_true", help="plain single process, same loop")
    p.add_argument(
        "--plan",
        action="store_true",
        help="print per-GPU memory and tokens per rank, allocate nothing; exit 3 if it does not fit in "
        "scaling.gpu_memory_gb (training/plan.py)",
    )
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> TrainConfig:
    overrides: dict[str, Any] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key] = yaml.safe_load(value)
    if args.shards:
        overrides["data.shards"] = args.shards
    if args.out_dir:
        overrides["log.out_dir"] = args.out_dir
    if args.num_workers is not None:
        overrides["scaling.num_workers"] = args.num_workers
    if args.use_gpu is not None:
        overrides["scaling.use_gpu"] = args.use_gpu
    if args.strategy:
        overrides["scaling.strategy"] = args.strategy
    cfg = load_config(args.config, overrides)
    # Workers may run elsewhere (another node, a job's working-dir copy): hand them absolute paths; a store
    # URI (s3://, gs://) is the same everywhere.
    cfg.data.shards = _absolute(cfg.data.shards)
    cfg.log.out_dir = _absolute(cfg.log.out_dir)
    for key in ("cache_dir", "latent_shards", "image_pairs", "image_pair_latents"):
        if getattr(cfg.data, key):
            setattr(cfg.data, key, _absolute(getattr(cfg.data, key)))
    return cfg


def _absolute(path: str) -> str:
    return path if is_uri(path) else str(Path(path).resolve())


def run_local(cfg: TrainConfig, stop_at_step: int | None = None) -> dict[str, Any]:
    """The --no-ray path: one process, the same loop the Ray workers run."""
    import torch

    from training.loop import Context, train

    device = torch.device("cuda" if cfg.scaling.use_gpu and torch.cuda.is_available() else "cpu")
    return train(cfg, Context(device=device), stop_at_step=stop_at_step)


def _worker_loop(config: dict[str, Any]) -> None:
    """Runs in every Ray Train worker: DDP/FSDP process group is already set up by TorchTrainer."""
    import ray.train
    import ray.train.torch

    from training.loop import Context, fully_shard_model, train

    cfg = config_from_dict(config["cfg"])
    tctx = ray.train.get_context()
    strategy = cfg.scaling.strategy

    def prepare(model):
        if strategy == "fsdp":  # Ray's own FSDP wrapper is GPU-only; FSDP2 also runs on CPU
            mp = None
            if cfg.scaling.use_gpu:  # bf16 all-gathers and compute, fp32 gradient reduction
                import torch
                from torch.distributed.fsdp import MixedPrecisionPolicy

                mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            return fully_shard_model(model, ray.train.torch.get_device(), mp_policy=mp)
        return ray.train.torch.prepare_model(model, parallel_strategy=strategy)

    ctx = Context(
        rank=tctx.get_world_rank(),
        world_size=tctx.get_world_size(),
        device=ray.train.torch.get_device(),
        prepare_model=prepare,
        report=lambda metrics: ray.train.report(metrics),
    )
    summary = train(cfg, ctx, stop_at_step=config.get("stop_at_step"))
    ray.train.report({"final_step": summary["step"], "corrupt": float(sum(summary["corrupt"].values()))})


def init_ray(cfg: TrainConfig) -> None:
    """Connect to RAY_ADDRESS when set (a cluster, or the job's own); else start a local one."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    need = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    ray.init(
        num_cpus=max(2, int(need + 0.999)),
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        # Local workers start in a temp dir: let them import this repo's packages.
        runtime_env={
            "env_vars": {"PYTHONPATH": str(REPO_ROOT), "OMP_WAIT_POLICY": os.environ["OMP_WAIT_POLICY"]}
        },
    )


def run_ray(cfg: TrainConfig, stop_at_step: int | None = None):
    """Fit a TorchTrainer with cfg.scaling; returns Ray's Result."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    init_ray(cfg)
    # Ray's own run state beside ours: a store URI goes through the one storage layer's filesystem.
    ray_dir = Store(cfg.log.out_dir).sub("ray")
    storage = (
        {"storage_path": ray_dir.uri}
        if ray_dir.is_local
        else {"storage_path": ray_dir.base, "storage_filesystem": ray_dir.fs}
    )
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"cfg": cfg.to_dict(), "stop_at_step": stop_at_step},
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}
            | ({"GPU": 1} if cfg.scaling.use_gpu else {}),
        ),
        run_config=ray.train.RunConfig(
            name="train",
            # Shared storage on a multi-node cluster: a store URI, or a folder every node mounts.
            **storage,
        ),
    )
    return trainer.fit()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    try:
        cfg = build_config(args)
    except ConfigError as e:  # a bad YAML or value: one line naming the file/key, no traceback
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.plan:
        from training.plan import check

        fits, text = check(cfg)
        print(text)
        if not fits:
            print(f"plan: over scaling.gpu_memory_gb={cfg.scaling.gpu_memory_gb:g}", file=sys.stderr)
        return 0 if fits else 3
    if args.no_ray:
        summary = run_local(cfg, stop_at_step=args.stop_at_step)
        losses = summary["losses"]
        if losses:
            log.info("done at step %d: loss %.4f -> %.4f", summary["step"], losses[0], losses[-1])
        log.info("skipped samples: %s", summary["corrupt"] or "none")
    else:
        result = run_ray(cfg, stop_at_step=args.stop_at_step)
        if result.error:
            raise result.error
        from training.loop import read_metrics

        rows = read_metrics(cfg.log.out_dir)
        if rows:
            log.info(
                "ray train done at step %d: loss %.4f -> %.4f, skipped samples %d; logs in %s",
                int(rows[-1]["step"]),
                rows[0]["loss"],
                rows[-1]["loss"],
                int(rows[-1]["corrupt"]),
                cfg.log.out_dir,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
