"""The JAX UNet against diffusers' UNet2DModel.

Default run (no torch): stored reference outputs in tests/fixtures/unet_*.npz (written by
experiments/make_reference_fixtures.py; weights regenerated from the seed by pdjax.testing).
Torch-marked: a live comparison on random configs and inputs.
"""

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdjax.models.config import PRESETS, UNetConfig
from pdjax.models.unet import count_params, make_eps_fn, param_shapes
from pdjax.testing import random_params, random_state_dict

FIXTURES = Path(__file__).parent / "fixtures"
NAMES = ["tiny", "multihead-16", "digits-16", "ddpm-cifar10-32"]
TOL = 1e-4


def load_fixture(name: str):
    """(cfg, seed, x [B,H,W,C], t [B], eps [B,H,W,C]) of tests/fixtures/unet_<name>.npz."""
    with np.load(FIXTURES / f"unet_{name}.npz") as data:
        cfg = UNetConfig.from_diffusers(json.loads(str(data["config"])))
        return cfg, int(data["seed"]), data["x"], data["t"], data["eps"]


@pytest.fixture(scope="module")
def tiny():
    cfg = PRESETS["tiny"]
    return cfg, jax.jit(make_eps_fn(cfg))


def test_fixtures_present_and_small():
    files = sorted(FIXTURES.glob("unet_*.npz"))
    assert {f.name for f in files} >= {f"unet_{n}.npz" for n in NAMES}
    assert sum(f.stat().st_size for f in files) < 1_000_000


@pytest.mark.parametrize("name", NAMES)
def test_matches_diffusers_reference(name):
    cfg, seed, x, t, ref = load_fixture(name)
    if name in PRESETS:
        assert cfg == PRESETS[name]
    assert 0 in t and 999 in t
    params = random_params(cfg, seed)
    out = jax.jit(make_eps_fn(cfg))(params, jnp.asarray(x), jnp.asarray(t))
    assert out.shape == ref.shape == (x.shape[0], cfg.sample_size, cfg.sample_size, cfg.out_channels)
    assert out.dtype == jnp.float32
    err = float(np.max(np.abs(np.asarray(out) - ref)))
    assert err <= TOL, f"{name}: max abs error {err:.2e} vs diffusers"


def test_ddpm_cifar10_param_count():
    cfg = PRESETS["ddpm-cifar10-32"]
    assert count_params(param_shapes(cfg)) == 35_746_307
    assert cfg.norm_eps == 1e-6 and cfg.freq_shift == 1 and not cfg.flip_sin_to_cos and cfg.downsample_padding == 0


def test_random_state_dict_rule():
    cfg = PRESETS["tiny"]
    a, b, c = random_state_dict(cfg, 0), random_state_dict(cfg, 0), random_state_dict(cfg, 1)
    assert list(a) == sorted(a)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["conv_in.weight"], c["conv_in.weight"])
    assert all(v.dtype == np.float32 for v in a.values())
    w = a["down_blocks.0.resnets.0.conv1.weight"]  # OIHW, fan_in = I*3*3
    assert w.shape == (16, 16, 3, 3) and abs(w.std() * math.sqrt(16 * 9) - 1) < 0.1
    assert abs(a["conv_norm_out.weight"].mean() - 1) < 0.1 and a["conv_norm_out.bias"].std() > 0.02
    assert "down_blocks.1.attentions.0.to_out.0.weight" in a


def test_output_shape_and_dtype(tiny):
    cfg, eps = tiny
    params = random_params(cfg, 0)
    x = jnp.zeros((3, cfg.sample_size, cfg.sample_size, cfg.in_channels), jnp.float32)  # batch 3: reuses the compile
    out = eps(params, x, jnp.array([0, 5, 999], jnp.int32))
    assert out.shape == x.shape[:3] + (cfg.out_channels,) and out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out))) and float(jnp.std(out)) > 0.1


def test_vmap_over_stacked_params_equals_one_by_one(tiny):
    cfg, eps = tiny
    ps = [random_params(cfg, s) for s in (0, 1)]
    stacked = jax.tree_util.tree_map(lambda *a: np.stack(a), *ps)
    x = jax.random.normal(jax.random.key(0), (3, cfg.sample_size, cfg.sample_size, cfg.in_channels))
    t = jnp.array([0, 500, 999], jnp.int32)
    both = jax.jit(jax.vmap(make_eps_fn(cfg), in_axes=(0, None, None)))(stacked, x, t)
    assert both.shape == (2,) + x.shape[:3] + (cfg.out_channels,)
    for i, p in enumerate(ps):
        np.testing.assert_allclose(both[i], eps(p, x, t), atol=1e-5, rtol=0)
    assert float(jnp.max(jnp.abs(both[0] - both[1]))) > 1e-2  # different models, different outputs


# ------------------------------------------------------------------------------------ torch (live)


def _random_config(seed: int) -> UNetConfig:
    """A random small config exercising the non-default options (padding, flips, heads, scales)."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 4))
    base = int(rng.choice([8, 16]))
    channels = tuple(base * int(m) for m in np.maximum.accumulate(rng.choice([1, 2], size=n)))
    add_attention = bool(rng.integers(2))
    return UNetConfig(
        sample_size=2 ** (n - 1) * int(rng.choice([4, 8])),
        in_channels=int(rng.integers(1, 4)), out_channels=int(rng.integers(1, 4)),
        block_out_channels=channels,
        down_block_types=tuple(str(s) for s in rng.choice(["DownBlock2D", "AttnDownBlock2D"], size=n)),
        up_block_types=tuple(str(s) for s in rng.choice(["UpBlock2D", "AttnUpBlock2D"], size=n)),
        layers_per_block=int(rng.integers(1, 3)),
        attention_head_dim=[None, 4][int(rng.integers(2))],
        norm_num_groups=int(rng.choice([4, 8])),
        attn_norm_num_groups=[None, 2][int(rng.integers(2))] if add_attention else None,
        norm_eps=float(rng.choice([1e-6, 1e-5])),
        flip_sin_to_cos=bool(rng.integers(2)), freq_shift=int(rng.integers(2)),
        downsample_padding=int(rng.integers(2)),
        mid_block_scale_factor=float(rng.choice([1.0, math.sqrt(2)])),
        center_input_sample=bool(rng.integers(2)), add_attention=add_attention,
    )


@pytest.mark.torch
@pytest.mark.parametrize("seed", [10, 13])  # 3 blocks, attn_norm_num_groups, in != out; multi-head everywhere
def test_live_vs_diffusers_random_config(seed):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    cfg = _random_config(seed)
    sd = random_state_dict(cfg, seed)
    model = diffusers.UNet2DModel.from_config(cfg.to_diffusers())
    model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    model.eval()
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, cfg.in_channels, cfg.sample_size, cfg.sample_size), dtype=np.float32)
    t = rng.integers(0, 1000, size=3)
    with torch.no_grad():
        ref = model(torch.from_numpy(x), torch.from_numpy(t)).sample.numpy().transpose(0, 2, 3, 1)
    out = jax.jit(make_eps_fn(cfg))(random_params(cfg, seed), jnp.asarray(x.transpose(0, 2, 3, 1)),
                                    jnp.asarray(t, jnp.int32))
    err = float(np.max(np.abs(np.asarray(out) - ref)))
    assert err <= TOL, f"{cfg}: max abs error {err:.2e}"


@pytest.mark.parametrize("shape, groups, dtype", [((3, 5, 4, 32), 8, jnp.float32), ((2, 9, 16), 4, jnp.float32),
                                                  ((2, 4, 4, 8), 2, jnp.bfloat16)])
def test_group_norm_matches_flax(shape, groups, dtype):
    """pdjax's GroupNorm (column sums + one-hot group product) gives flax.linen.GroupNorm's output (two-pass
    variance) for the same params, on ResNet-shaped [B, H, W, C] and attention-shaped [B, P, C] inputs."""
    import flax.linen as nn

    from pdjax.models.unet import GroupNorm

    x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), shape)  # an offset mean: the two-pass variance matters
    ours = GroupNorm(groups, 1e-6, dtype)
    ref = nn.GroupNorm(num_groups=groups, epsilon=1e-6, use_fast_variance=False, dtype=dtype)
    params = ours.init(jax.random.key(1), x)
    assert jax.tree.structure(params) == jax.tree.structure(ref.init(jax.random.key(1), x))
    c = shape[-1]
    ramp = jnp.arange(c, dtype=jnp.float32)
    params = {"params": {"scale": 1 + 0.1 * ramp, "bias": 0.01 * ramp}}
    a, b = ours.apply(params, x), ref.apply(params, x)
    assert a.dtype == b.dtype == dtype and a.shape == shape
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=tol, rtol=tol)
    with pytest.raises(ValueError, match="do not split"):
        GroupNorm(3, 1e-6).init(jax.random.key(0), jnp.zeros((1, 2, 2, 8)))
