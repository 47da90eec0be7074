"""Noise schedules and samplers (SPEC section 1): plain JAX over params pytrees."""

from pdjax.diffusion.samplers import (
    Trajectory,
    ddim_sample,
    ddim_step,
    ddim_update,
    ddpm_sample,
    ddpm_step,
    ddpm_update,
    timesteps_ddim,
)
from pdjax.diffusion.schedule import (
    Schedule,
    ScheduleConfig,
    make_betas,
    make_schedule,
    q_sample,
)

__all__ = [
    "Schedule",
    "ScheduleConfig",
    "Trajectory",
    "ddim_sample",
    "ddim_step",
    "ddim_update",
    "ddpm_sample",
    "ddpm_step",
    "ddpm_update",
    "make_betas",
    "make_schedule",
    "q_sample",
    "timesteps_ddim",
]
