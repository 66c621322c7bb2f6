"""Typed training configuration: YAML (safe_load) into dataclasses; unknown keys and bad values raise."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# One validator for both YAML files: unknown keys and wrong types name their dotted path.
from curation.config import ConfigError, from_dict, load_yaml


@dataclass
class PhaseConfig:
    """One training phase (paper §3.3: low resolution first, then mixed higher resolution)."""

    name: str = "phase"
    steps: int = 100
    # Aspect-ratio buckets as [height_px, width_px]; each clip goes to the bucket closest in log aspect.
    buckets: list[list[int]] = field(default_factory=lambda: [[64, 64]])
    num_frames: int = 9
    fps: float = 8.0
    batch_size: int = 2


@dataclass
class DataConfig:
    shards: str = "output/sample/shards"
    shuffle_buffer: int = 64
    shuffle_initial: int = 16
    # DataLoader workers; each is one deterministic stream, so this also fixes the data order.
    num_workers: int = 1
    prefetch_factor: int = 2
    mp_context: str = "fork"
    max_refs: int = 4
    verify_sha256: bool = False
    # Directory for cached encoder outputs (safetensors); None disables caching.
    cache_dir: str | None = None
    # Latent shards written by training/precompute.py for this config; when set, the loop reads them
    # instead of data.shards and never runs the VAE or the text encoder on its hot path.
    latent_shards: str | None = None
    # Image-pair shards (python -m curation.image_pairs: one-frame `image_pair` samples from Subject200k /
    # OmniGen, paper §3.1) mixed with the videos: each sample comes from them with this probability.
    image_pairs: str | None = None
    image_pair_ratio: float = 0.0
    # The image pairs precomputed like latent_shards (training/precompute.py --shards <image_pairs>): read
    # in their place when data.latent_shards is set, mixed at image_pair_ratio by the same seeded draw.
    image_pair_latents: str | None = None


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 10
    # Cosine decay ends at lr * min_lr_ratio on the last step of the last phase.
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    grad_accum: int = 1


@dataclass
class ScalingConfig:
    num_workers: int = 1
    use_gpu: bool = False
    strategy: str = "ddp"
    cpus_per_worker: float = 1.0
    # Sequence (context) parallel degree: each group of sp_degree consecutive ranks trains ONE batch, every
    # rank holding 1/sp_degree of its tokens (Ulysses attention, training/parallel.py); data parallel over
    # num_workers / sp_degree groups. Must divide num_workers; > 1 trains under strategy fsdp.
    sp_degree: int = 1
    # GPU memory the planner (training/plan.py, run.py --plan) must fit each rank's plan in, in GiB.
    gpu_memory_gb: float = 80.0


@dataclass
class LoraConfig:
    rank: int = 32
    alpha: float = 32.0
    dropout: float = 0.0
    # Module names inside WanTransformer3DModel that get adapters (attention and FFN projections).
    target_modules: list[str] = field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]
    )


# The released Phantom-Wan's default negative prompt: sample_neg_prompt of the Wan2.1 shared config that its
# s2v configs take over (phantom_wan/configs/shared_config.py), used whenever generate() gets n_prompt="".
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，"
    "形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


@dataclass
class WanConfig:
    """Phantom-Wan specifics: where the pretrained weights are (local, sha256-pinned) and how to fine-tune."""

    # Base weights: a diffusers folder (Wan2.1-T2V-*-Diffusers/transformer), an original Wan folder, or one
    # .safetensors/.pth file, in either key layout (detected from the keys). None = random init.
    weights: str | None = None
    # sha256 of the file, or {relative file name: sha256} for a folder; required whenever weights is set.
    weights_sha256: str | dict[str, str] | None = None
    # The official Phantom-Wan checkpoint (Phantom-Wan-1.3B.pth, original layout) loaded over the base.
    phantom_ckpt: str | None = None
    phantom_sha256: str | None = None
    finetune: str = "full"  # "full" or "lora"
    lora: LoraConfig = field(default_factory=LoraConfig)
    text_len: int = 512  # Wan pads the UMT5 states to 512 tokens with zeros
    grad_checkpoint: bool = False  # activation checkpointing of every transformer block
    sample_shift: float = 5.0  # the release's default flow shift at sampling
    sample_solver: str = "unipc"  # "unipc" (the release's solver) or "euler", both on the release's grid
    # The null text of guidance at sampling: this prompt's UMT5 states (the release's negative prompt by
    # default); null = the all-zero context that text dropout trains. Training is not affected.
    negative_prompt: str | None = WAN_NEGATIVE_PROMPT
    dtype: str = "float32"  # parameter dtype; bf16 autocast runs on CUDA either way


@dataclass
class ModelConfig:
    family: str = "mmdit"  # "mmdit" (the paper's MMDiT, from scratch) or "phantom_wan" (Wan2.1 DiT)
    # A preset of the family: model.mmdit.MMDIT_CONFIGS or model.phantom_wan.WAN_PRESETS.
    preset: str = "tiny"
    # Field overrides for MMDiTConfig / WanTransformer3DModel kwargs, the preset's own sizes included
    # (num_layers, freq_dim, ...; unknown names raise).
    overrides: dict[str, Any] = field(default_factory=dict)
    wan: WanConfig = field(default_factory=WanConfig)


@dataclass
class FlowConfig:
    # Keyword arguments for model.flow.apply_condition_dropout (paper: VAE reference dropout 0.7).
    dropout: dict[str, Any] = field(default_factory=dict)
    # Keyword arguments for model.flow.rf_loss beyond (model, x0, cond, generator).
    loss: dict[str, Any] = field(default_factory=dict)


@dataclass
class LogConfig:
    out_dir: str = "runs/train_tiny"
    log_every: int = 1
    ckpt_every: int = 50
    keep_checkpoints: int = 3
    # "full": one weights_only .pt file gathered on rank 0; "dcp": a torch.distributed.checkpoint folder
    # written shard-by-shard by every rank (no full gather, no full load per rank).
    checkpoint_format: str = "full"
    sample_every: int = 0
    sample_steps: int = 10
    sample_w_img: float = 3.0
    sample_w_txt: float = 7.5
    tensorboard: bool = True


@dataclass
class TrainConfig:
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    # Passed to training.encoders.build_encoders, which validates its own keys.
    encoders: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    phases: list[PhaseConfig] = field(default_factory=lambda: [PhaseConfig()])
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def total_steps(self) -> int:
        return sum(p.steps for p in self.phases)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_ALLOWED = {
    "scaling.strategy": ("ddp", "fsdp"),
    "data.mp_context": ("fork", "spawn", "forkserver"),
    "model.family": ("mmdit", "phantom_wan"),
    "log.checkpoint_format": ("full", "dcp"),
}


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check value ranges that types alone do not catch."""
    for key, allowed in _ALLOWED.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {list(allowed)}")
    if cfg.model.wan.finetune not in ("full", "lora"):
        raise ConfigError(f"model.wan.finetune: {cfg.model.wan.finetune!r} is not one of ['full', 'lora']")
    if cfg.model.wan.sample_solver not in ("unipc", "euler"):
        raise ConfigError(
            f"model.wan.sample_solver: {cfg.model.wan.sample_solver!r} is not one of ['unipc', 'euler']"
        )
    if cfg.model.wan.weights and not cfg.model.wan.weights_sha256:
        raise ConfigError(
            "model.wan.weights_sha256: pin the base weights (the sha256 of the file, or {file: sha256} per "
            "file), or set it to `unpinned` to load them unchecked (the run then lists them)"
        )
    if cfg.model.wan.phantom_ckpt and not cfg.model.wan.phantom_sha256:
        raise ConfigError("model.wan.phantom_sha256: pin the Phantom-Wan checkpoint's sha256")
    if not cfg.phases:
        raise ConfigError("phases: at least one phase is required")
    for i, phase in enumerate(cfg.phases):
        where = f"phases[{i}]"
        if phase.steps <= 0 or phase.batch_size <= 0 or phase.num_frames <= 0 or phase.fps <= 0:
            raise ConfigError(f"{where}: steps, batch_size, num_frames and fps must be positive")
        if not phase.buckets or any(len(b) != 2 or min(b) <= 0 for b in phase.buckets):
            raise ConfigError(f"{where}.buckets: expected a list of [height_px, width_px] pairs")
    if not 0.0 <= cfg.data.image_pair_ratio <= 1.0:
        raise ConfigError("data.image_pair_ratio: must be in [0, 1]")
    # With latent shards the image pairs come precomputed too: the loop never runs an encoder.
    pairs, pairs_key = (
        (cfg.data.image_pair_latents, "image_pair_latents")
        if cfg.data.latent_shards
        else (cfg.data.image_pairs, "image_pairs")
    )
    if cfg.data.image_pair_latents and not cfg.data.latent_shards:
        raise ConfigError(
            "data.image_pair_latents: read only with data.latent_shards (the videos' latents); "
            "set data.image_pairs to train on the raw image-pair shards"
        )
    if cfg.data.image_pairs and cfg.data.latent_shards and not cfg.data.image_pair_latents:
        raise ConfigError(
            "data.image_pairs: not read with data.latent_shards; precompute them too (training/precompute.py "
            "--shards <image_pairs> --out <dir>) and set data.image_pair_latents=<dir>"
        )
    if cfg.data.image_pair_ratio > 0 and not pairs:
        raise ConfigError(f"data.image_pair_ratio: set data.{pairs_key} to the image-pair shards folder")
    if pairs and cfg.data.image_pair_ratio <= 0:
        raise ConfigError(f"data.{pairs_key}: set data.image_pair_ratio (the share of image-pair samples)")
    if cfg.data.num_workers < 0:
        raise ConfigError("data.num_workers: must be >= 0")
    if not 1 <= cfg.data.max_refs <= 4:
        raise ConfigError("data.max_refs: Phantom takes 1 to 4 references")
    if cfg.scaling.num_workers < 1:
        raise ConfigError("scaling.num_workers: must be >= 1")
    sp = cfg.scaling.sp_degree
    if sp < 1 or cfg.scaling.num_workers % sp:
        raise ConfigError(f"scaling.sp_degree: {sp} must be >= 1 and divide scaling.num_workers")
    if sp > 1 and cfg.scaling.strategy != "fsdp":
        raise ConfigError("scaling.sp_degree: sequence parallelism trains under scaling.strategy: fsdp")
    if cfg.optim.grad_accum < 1 or cfg.optim.warmup_steps < 0:
        raise ConfigError("optim: grad_accum must be >= 1 and warmup_steps >= 0")
    if not 0.0 <= cfg.optim.ema_decay < 1.0:
        raise ConfigError("optim.ema_decay: must be in [0, 1)")
    return cfg


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set data['a']['b'] for 'a.b', and data['phases'][0]['steps'] for 'phases[0].steps' (--set)."""
    path: list[str | int] = []
    for part in dotted.split("."):
        name, _, rest = part.partition("[")
        path.append(name)
        path += [int(i) for i in rest.rstrip("]").split("][")] if rest else []
    node: Any = data
    for key, nxt in zip(path[:-1], path[1:]):
        if isinstance(key, int):
            if not isinstance(node, list) or key >= len(node):
                raise ConfigError(f"--set {dotted}: no item {key} in the list")
            node = node[key]
        else:
            if not isinstance(node, dict):
                raise ConfigError(f"--set {dotted}: {key} is not inside a mapping")
            node = node.setdefault(key, [] if isinstance(nxt, int) else {})
    last = path[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or last >= len(node):
            raise ConfigError(f"--set {dotted}: no item {last} in the list")
    elif not isinstance(node, dict):
        raise ConfigError(f"--set {dotted}: {last} is not inside a mapping")
    node[last] = value


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML config (safe_load), apply dotted overrides, and validate it into a TrainConfig."""
    data: dict[str, Any] = {}
    if path is not None:
        data = load_yaml(path) or {}
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    return validate(from_dict(TrainConfig, data))


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Rebuild a TrainConfig from TrainConfig.to_dict() output (e.g. inside a Ray worker)."""
    return validate(from_dict(TrainConfig, data))
