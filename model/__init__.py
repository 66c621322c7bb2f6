"""Phantom's generator: the MMDiT network and the rectified-flow math (no I/O)."""

from model.flow import (
    Conditioning,
    add_noise,
    apply_condition_dropout,
    euler_sample,
    euler_sample_cond,
    rf_loss,
    sample_timesteps,
    shift_time,
    timestep_schedule,
    velocity_target,
    video_mse,
)
from model.mmdit import (
    MMDIT_CONFIGS,
    MMDiT,
    MMDiTConfig,
    ModelOutput,
    count_params,
    mmdit_config,
)

__all__ = [
    "MMDIT_CONFIGS",
    "Conditioning",
    "MMDiT",
    "MMDiTConfig",
    "ModelOutput",
    "add_noise",
    "apply_condition_dropout",
    "count_params",
    "euler_sample",
    "euler_sample_cond",
    "mmdit_config",
    "rf_loss",
    "sample_timesteps",
    "shift_time",
    "timestep_schedule",
    "velocity_target",
    "video_mse",
]
