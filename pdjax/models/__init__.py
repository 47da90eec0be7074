"""Models: the UNet config (plain dataclass), the Flax Linen UNet and diffusers conversion."""

from pdjax.models.config import PRESETS, UNetConfig
from pdjax.models.unet import UNet2D, init_params, make_eps_fn, param_shapes

__all__ = ["PRESETS", "UNet2D", "UNetConfig", "init_params", "make_eps_fn", "param_shapes"]
