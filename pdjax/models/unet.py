"""Flax Linen UNet reproducing diffusers' ``UNet2DModel`` (unconditional DDPM family), NHWC.

Submodule names mirror diffusers' state-dict names with ``.N`` written ``_N``
(``down_blocks.1.attentions.0.to_q`` -> ``down_blocks_1/attentions_0/to_q``), so conversion
(:mod:`pdjax.models.convert`) is a renaming plus a kernel transpose. This is the only module of pdjax
that uses ``flax.linen``; everything else calls the pure ``eps(params, x_t, t)`` from :func:`make_eps_fn`.

Details that matter for numerical equivalence with diffusers (DESIGN.md habit 7):
- time embedding: ``exp(-log(10000) * i / (half - freq_shift))``, ``[sin, cos]`` (``[cos, sin]`` if flipped);
- downsampling with ``downsample_padding=0`` pads (0, 1, 0, 1) before a VALID stride-2 conv;
- GroupNorm (:class:`GroupNorm`) uses the two-pass variance and the config's eps, as ``flax.linen.GroupNorm``
  with ``use_fast_variance=False`` (same params, same result to float32 rounding);
- attention: GroupNorm, q/k/v projections with bias, softmax in float32, output projection, residual,
  divided by the rescale factor.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from pdjax.models.config import UNetConfig


def timestep_embedding(t: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> jax.Array:
    """Sinusoidal embedding as diffusers' ``get_timestep_embedding``. t: [B] -> [B, dim] float32."""
    half = dim // 2
    exponent = -math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    emb = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(emb), jnp.cos(emb)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class GroupNorm(nn.Module):
    """Group normalisation over every axis but the first (batch) and last (channels), two-pass variance.

    x: [B, ..., C] -> same shape, in ``dtype``; statistics in at least float32. Params ``scale`` and ``bias``
    [C], as ``flax.linen.GroupNorm`` (which this matches to float32 rounding). The statistics are column sums
    over the positions ([B, P, C] -> [B, C], contiguous in C), then sums over each group's channels: XLA:CPU
    compiles flax's single reduction over (positions, channels of a group) into strided loops, 50 of the
    296 ms of compute of a digits-16 PureDiffusion step (docs/performance.md section 1). An optimisation
    barrier keeps the two sums apart (XLA merges a reduction of a reduction into one). A first version did
    the group sums as [C, G] one-hot products; XLA:CPU's compiler crashed (segfault) on one program of the
    full test suite with it, twice at the same test, which passed when run alone or with its own file.
    """

    num_groups: int
    epsilon: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, g = x.shape[-1], self.num_groups
        if c % g:
            raise ValueError(f"GroupNorm: {c} channels do not split into {g} groups")
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        xf = x.reshape(x.shape[0], -1, c)
        xf = xf.astype(jnp.promote_types(x.dtype, jnp.float32))  # [B, P, C]
        count = xf.shape[1] * (c // g)

        def group_sum(a):  # [B, P, C] -> [B, C]: the sum over each channel's group, broadcast to its channels
            per_channel = jax.lax.optimization_barrier(a.sum(1))  # [B, C]; the barrier keeps XLA from merging
            per_group = per_channel.reshape(a.shape[0], g, c // g).sum(-1)  # the two sums back into one
            return jnp.repeat(per_group, c // g, axis=-1)

        xc = xf - (group_sum(xf) / count)[:, None, :]
        inv = jax.lax.rsqrt(group_sum(xc * xc) / count + self.epsilon)  # [B, C]
        y = xc * (inv * scale)[:, None, :] + bias
        return y.reshape(x.shape).astype(self.dtype)


class _Common(nn.Module):
    cfg: UNetConfig
    dtype: jnp.dtype = jnp.float32

    def norm(self, name: str, groups: int | None = None) -> GroupNorm:
        return GroupNorm(groups or self.cfg.norm_num_groups, self.cfg.norm_eps, self.dtype, name=name)

    def conv(self, features: int, name: str, kernel: int = 3, stride: int = 1, padding=1) -> nn.Conv:
        if isinstance(padding, int):
            padding = ((padding, padding), (padding, padding))
        return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding, dtype=self.dtype, name=name)


class ResnetBlock(_Common):
    out_channels: int = 0
    output_scale_factor: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        h = nn.silu(self.norm("norm1")(x))
        h = self.conv(self.out_channels, "conv1")(h)
        t = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
        h = h + t[:, None, None, :]
        h = nn.silu(self.norm("norm2")(h))
        h = self.conv(self.out_channels, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = self.conv(self.out_channels, "conv_shortcut", kernel=1, padding=0)(x)
        return (x + h) / self.output_scale_factor


class AttentionBlock(_Common):
    groups: int | None = None
    rescale_output_factor: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        heads, head_dim = self.cfg.heads(c)
        h = self.norm("group_norm", self.groups)(x.reshape(b, hgt * wid, c))
        dense = lambda name: nn.Dense(c, dtype=self.dtype, name=name)  # noqa: E731
        split = lambda a: a.reshape(b, hgt * wid, heads, head_dim)  # noqa: E731
        q, k, v = split(dense("to_q")(h)), split(dense("to_k")(h)), split(dense("to_v")(h))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(head_dim)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, hgt * wid, c)
        out = dense("to_out_0")(out).reshape(b, hgt, wid, c)
        return (out + x) / self.rescale_output_factor


class Downsample(_Common):
    out_channels: int = 0

    @nn.compact
    def __call__(self, x):
        if self.cfg.downsample_padding == 0:  # diffusers pads right/bottom only, then a VALID conv
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(self.out_channels, "conv", stride=2, padding=self.cfg.downsample_padding)(x)


class Upsample(_Common):
    out_channels: int = 0

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest-neighbour x2
        return self.conv(self.out_channels, "conv")(x)


class DownBlock(_Common):
    """DownBlock2D / AttnDownBlock2D. Returns (x, skips) with one skip per resnet and one after downsampling."""

    out_channels: int = 0
    attention: bool = False
    add_downsample: bool = True

    @nn.compact
    def __call__(self, x, temb):
        outputs = []
        for i in range(self.cfg.layers_per_block):
            x = ResnetBlock(self.cfg, self.dtype, out_channels=self.out_channels, name=f"resnets_{i}")(x, temb)
            if self.attention:
                x = AttentionBlock(self.cfg, self.dtype, name=f"attentions_{i}")(x)
            outputs.append(x)
        if self.add_downsample:
            x = Downsample(self.cfg, self.dtype, out_channels=self.out_channels, name="downsamplers_0")(x)
            outputs.append(x)
        return x, outputs


class UpBlock(_Common):
    """UpBlock2D / AttnUpBlock2D. ``skips`` holds layers_per_block + 1 tensors, consumed last first."""

    out_channels: int = 0
    attention: bool = False
    add_upsample: bool = True

    @nn.compact
    def __call__(self, x, skips, temb):
        for i in range(self.cfg.layers_per_block + 1):
            x = jnp.concatenate([x, skips[-1 - i]], axis=-1)
            x = ResnetBlock(self.cfg, self.dtype, out_channels=self.out_channels, name=f"resnets_{i}")(x, temb)
            if self.attention:
                x = AttentionBlock(self.cfg, self.dtype, name=f"attentions_{i}")(x)
        if self.add_upsample:
            x = Upsample(self.cfg, self.dtype, out_channels=self.out_channels, name="upsamplers_0")(x)
        return x


class TimestepEmbedding(_Common):
    @nn.compact
    def __call__(self, emb):
        emb = nn.Dense(self.cfg.time_embed_dim, dtype=self.dtype, name="linear_1")(emb)
        return nn.Dense(self.cfg.time_embed_dim, dtype=self.dtype, name="linear_2")(nn.silu(emb))


class MidBlock(_Common):
    @nn.compact
    def __call__(self, x, temb):
        cfg, ch, scale = self.cfg, self.cfg.block_out_channels[-1], self.cfg.mid_block_scale_factor
        x = ResnetBlock(cfg, self.dtype, out_channels=ch, output_scale_factor=scale, name="resnets_0")(x, temb)
        if cfg.add_attention:
            x = AttentionBlock(cfg, self.dtype, groups=cfg.attn_norm_num_groups, rescale_output_factor=scale,
                               name="attentions_0")(x)
        return ResnetBlock(cfg, self.dtype, out_channels=ch, output_scale_factor=scale, name="resnets_1")(x, temb)


class UNet2D(_Common):
    """``UNet2D(cfg)(x_t, t) -> eps_hat``; x_t: [B, H, W, C_in] in [-1, 1], t: [B] int -> [B, H, W, C_out] float32."""

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array) -> jax.Array:
        cfg = self.cfg
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
        emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        emb = TimestepEmbedding(cfg, self.dtype, name="time_embedding")(emb.astype(self.dtype))

        x = self.conv(cfg.block_out_channels[0], "conv_in")(x.astype(self.dtype))
        skips = [x]
        n = len(cfg.block_out_channels)
        for i, (kind, ch) in enumerate(zip(cfg.down_block_types, cfg.block_out_channels)):
            x, outs = DownBlock(cfg, self.dtype, out_channels=ch, attention=kind == "AttnDownBlock2D",
                                add_downsample=i < n - 1, name=f"down_blocks_{i}")(x, emb)
            skips.extend(outs)

        x = MidBlock(cfg, self.dtype, name="mid_block")(x, emb)

        per_block = cfg.layers_per_block + 1
        for i, (kind, ch) in enumerate(zip(cfg.up_block_types, reversed(cfg.block_out_channels))):
            block_skips, skips = skips[-per_block:], skips[:-per_block]
            x = UpBlock(cfg, self.dtype, out_channels=ch, attention=kind == "AttnUpBlock2D",
                        add_upsample=i < n - 1, name=f"up_blocks_{i}")(x, block_skips, emb)

        x = nn.silu(self.norm("conv_norm_out")(x))
        x = self.conv(cfg.out_channels, "conv_out")(x)
        return x.astype(jnp.float32)


EpsFn = Callable[[dict, jax.Array, jax.Array], jax.Array]


def make_eps_fn(cfg: UNetConfig, dtype=jnp.float32) -> EpsFn:
    """The pure eps-model ``eps(params, x_t, t)``: x_t [B, H, W, C] in [-1, 1], t [B] int -> [B, H, W, C].

    ``params`` is the Flax params dict (without the ``{"params": ...}`` wrapper). The returned function
    is cached per (config, dtype) so that it can be used as a static jit argument without recompiling.
    """
    return _eps_fn_cached(cfg, jnp.dtype(dtype).name)


_EPS_CACHE: dict = {}


def _eps_fn_cached(cfg: UNetConfig, dtype_name: str) -> EpsFn:
    key = (cfg, dtype_name)
    if key not in _EPS_CACHE:
        module = UNet2D(cfg, jnp.dtype(dtype_name))

        def eps(params, x_t, t):
            return module.apply({"params": params}, x_t, t)

        eps.__name__ = eps.__qualname__ = f"eps_{dtype_name}"
        # jitted: a program that calls eps K times (an unrolled chain) traces the UNet once, not K times.
        _EPS_CACHE[key] = jax.jit(eps)
    return _EPS_CACHE[key]


def init_params(cfg: UNetConfig, key: jax.Array) -> dict:
    """Fresh params for ``cfg`` (jitted init: an eager Linen init is slow on CPU)."""
    x = jnp.zeros((1, cfg.sample_size, cfg.sample_size, cfg.in_channels), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    return _jit_init(cfg)(key, x, t)["params"]


@functools.lru_cache(maxsize=None)
def _jit_init(cfg: UNetConfig):
    """One compiled init per config (compiling a UNet init takes tens of seconds on 2 CPU cores)."""
    return jax.jit(UNet2D(cfg).init)


def param_shapes(cfg: UNetConfig) -> dict:
    """The params pytree of ``cfg`` as ``jax.ShapeDtypeStruct`` leaves (no compute)."""
    # Traced once per config (tracing the UNet takes ~0.3 s and every model load checks its weights against
    # these shapes); each call returns fresh dicts around the shared, immutable leaves.
    return jax.tree_util.tree_map(lambda s: s, _param_shapes(cfg))


@functools.lru_cache(maxsize=None)
def _param_shapes(cfg: UNetConfig) -> dict:
    module = UNet2D(cfg)
    x = jax.ShapeDtypeStruct((1, cfg.sample_size, cfg.sample_size, cfg.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    return jax.eval_shape(module.init, jax.random.key(0), x, t)["params"]


def count_params(params) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
