"""pdjax: audit diffusion models for backdoors, in JAX.

Top-level API: :func:`load` a model (pdjax checkpoint or diffusers folder), its pure ``model.eps``,
the samplers :func:`ddpm_sample` / :func:`ddim_sample`; ``pdjax.generate.generate`` and
``pdjax.train.train`` live in their modules (the names stay free for the submodules).
"""

from pdjax.diffusion.samplers import ddim_sample, ddpm_sample
from pdjax.diffusion.schedule import Schedule, ScheduleConfig, make_schedule
from pdjax.errors import PdjaxError
from pdjax.model import Model, load, new_model
from pdjax.models.config import PRESETS, UNetConfig
from pdjax.train import TrainConfig

__version__ = "0.1.0"

__all__ = [
    "Model", "PRESETS", "PdjaxError", "Schedule", "ScheduleConfig", "TrainConfig", "UNetConfig",
    "ddim_sample", "ddpm_sample", "load", "make_schedule", "new_model",
]
