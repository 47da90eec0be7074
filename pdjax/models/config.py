"""UNet configuration: a frozen dataclass mirroring diffusers' ``UNet2DModel`` config.json.

Only the unconditional DDPM family is supported (positional time embedding, "default" time-scale shift,
conv up/down sampling, blocks DownBlock2D / AttnDownBlock2D / UpBlock2D / AttnUpBlock2D and the
attention mid block). Anything else is refused with a :class:`~pdjax.errors.ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from pdjax.configs import from_dict_strict
from pdjax.errors import CheckpointError, ConfigError

DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D")

# Keys of a diffusers config that we accept only with these values (anything else is a ConfigError).
_FIXED = {
    "time_embedding_type": ("positional",),
    "mid_block_type": ("UNetMidBlock2D",),
    "downsample_type": ("conv",),
    "upsample_type": ("conv",),
    "act_fn": ("silu", "swish"),
    "resnet_time_scale_shift": ("default",),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "time_embedding_dim": (None,),
}
# Keys diffusers writes that carry no architecture information.
_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "num_train_timesteps", "dropout"}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Architecture of a DDPM UNet (diffusers ``UNet2DModel`` names and defaults of the DDPM family).

    Hashable, so it can be a static argument of ``jax.jit``.
    """

    sample_size: int = 32
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 256, 256)
    down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D")
    up_block_types: tuple[str, ...] = ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    layers_per_block: int = 2
    attention_head_dim: int | None = None
    norm_num_groups: int = 32
    attn_norm_num_groups: int | None = None
    norm_eps: float = 1e-6
    flip_sin_to_cos: bool = False
    freq_shift: int = 1
    downsample_padding: int = 0
    mid_block_scale_factor: float = 1.0
    center_input_sample: bool = False
    add_attention: bool = True

    def __post_init__(self):
        for name in ("block_out_channels", "down_block_types", "up_block_types"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if isinstance(self.sample_size, (list, tuple)):
            sizes = tuple(self.sample_size)
            if len(set(sizes)) != 1:
                raise ConfigError(f"sample_size {sizes}: only square images are supported")
            object.__setattr__(self, "sample_size", int(sizes[0]))
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first inconsistent field."""
        n = len(self.block_out_channels)
        if n == 0:
            raise ConfigError("block_out_channels is empty")
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ConfigError(
                f"down_block_types ({len(self.down_block_types)}), up_block_types ({len(self.up_block_types)}) "
                f"and block_out_channels ({n}) must have the same length"
            )
        for b in self.down_block_types:
            if b not in DOWN_BLOCKS:
                raise ConfigError(f"unsupported down block type {b!r}; supported: {', '.join(DOWN_BLOCKS)}")
        for b in self.up_block_types:
            if b not in UP_BLOCKS:
                raise ConfigError(f"unsupported up block type {b!r}; supported: {', '.join(UP_BLOCKS)}")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ConfigError(f"block_out_channels {c} is not divisible by norm_num_groups {self.norm_num_groups}")
        if self.layers_per_block < 1:
            raise ConfigError("layers_per_block must be >= 1")
        if self.sample_size % (2 ** (n - 1)):
            raise ConfigError(f"sample_size {self.sample_size} is not divisible by 2**{n - 1} (one per downsample)")
        if self.downsample_padding not in (0, 1):
            raise ConfigError(f"downsample_padding must be 0 or 1, got {self.downsample_padding}")

    def heads(self, channels: int) -> tuple[int, int]:
        """(number of heads, head dim) of an attention block over ``channels`` channels (diffusers rule)."""
        head_dim = self.attention_head_dim or channels
        if channels % head_dim:
            raise ConfigError(f"attention_head_dim {head_dim} does not divide {channels} channels")
        return channels // head_dim, head_dim

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    # --- diffusers config.json -------------------------------------------------------------------
    @classmethod
    def from_diffusers(cls, cfg: dict[str, Any]) -> "UNetConfig":
        """Build from a diffusers ``UNet2DModel`` config dict; unknown or unsupported keys are errors."""
        cfg = dict(cfg)
        cls_name = cfg.get("_class_name", "UNet2DModel")
        if cls_name != "UNet2DModel":
            raise ConfigError(f"model class {cls_name!r} is not supported; pdjax reads diffusers UNet2DModel folders")
        for key, allowed in _FIXED.items():
            if key in cfg:
                value = cfg.pop(key)
                if value not in allowed:
                    raise ConfigError(f"config {key}={value!r} is not supported (supported: {allowed})")
        for key in _IGNORED:
            cfg.pop(key, None)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - fields)
        if unknown:
            raise ConfigError(f"unknown UNet2DModel config key(s): {', '.join(unknown)}")
        # diffusers' own defaults differ from the DDPM family defaults used by this dataclass.
        defaults = dict(
            in_channels=3, out_channels=3, freq_shift=0, flip_sin_to_cos=True, downsample_padding=1,
            attention_head_dim=8, norm_eps=1e-5, norm_num_groups=32, layers_per_block=2,
            block_out_channels=(224, 448, 672, 896), mid_block_scale_factor=1.0,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        )
        merged = {**defaults, **cfg}
        if merged.get("sample_size") is None:
            raise ConfigError("config.json has no sample_size; add the training resolution, e.g. \"sample_size\": 32")
        try:
            return cls(**merged)
        except TypeError as e:  # wrong value types
            raise ConfigError(f"invalid UNet2DModel config: {e}") from None

    def to_diffusers(self) -> dict[str, Any]:
        """A config.json dict that ``diffusers.UNet2DModel.from_config`` accepts."""
        d = dataclasses.asdict(self)
        d.update(
            _class_name="UNet2DModel",
            block_out_channels=list(self.block_out_channels),
            down_block_types=list(self.down_block_types),
            up_block_types=list(self.up_block_types),
            act_fn="silu",
            time_embedding_type="positional",
            resnet_time_scale_shift="default",
            downsample_type="conv",
            upsample_type="conv",
            mid_block_type="UNetMidBlock2D",
        )
        return d

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "UNetConfig":
        return from_dict_strict(cls, d, "pdjax UNet config")


def read_json(path: str | Path) -> dict[str, Any]:
    """Read a JSON object; a missing or malformed file is a CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); re-export or repair it") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


# Small configs used by tests, demos and the bundled digits models.
PRESETS: dict[str, UNetConfig] = {
    "ddpm-cifar10-32": UNetConfig(),
    "digits-16": UNetConfig(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1, norm_num_groups=8,
    ),
    "tiny": UNetConfig(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1, norm_num_groups=8,
    ),
}
