"""Write the diffusers reference outputs that tests/test_unet.py checks the JAX UNet against.

Command (needs the optional extra ``pip install -e '.[torch]'``; about 35 s on a 2-core CPU)::

    python experiments/make_reference_fixtures.py            # writes tests/fixtures/unet_<name>.npz

For each config below it builds ``diffusers.UNet2DModel.from_config(cfg.to_diffusers())``, loads
``pdjax.testing.random_state_dict(cfg, seed)`` with ``load_state_dict(strict=True)`` (which also checks
that pdjax's key set and shapes equal diffusers'), and runs it in float32 on seeded random inputs.
Each ``.npz`` holds:

- ``config``: the diffusers config dict as a JSON string (``UNetConfig.from_diffusers`` reads it back);
- ``seed``: the weight seed. No weights are stored: tests regenerate them with
  ``pdjax.testing.random_state_dict(cfg, seed)``, so changing that rule means rerunning this script;
- ``x``: [B, H, W, C_in] float32 inputs (standard normal; NHWC, transposed from torch's NCHW);
- ``t``: [B] int32 timesteps, always including 0 and 999 plus random ones;
- ``eps``: [B, H, W, C_out] float32 diffusers output (NHWC).

Expected: 4 files, ~100 kB in total; the last column (pdjax vs diffusers) ~1e-5 (tests require <= 1e-4).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from pdjax.models.config import PRESETS, UNetConfig
from pdjax.testing import random_state_dict

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"

# name -> (config, weight seed, batch size)
CONFIGS: dict[str, tuple[UNetConfig, int, int]] = {
    "tiny": (PRESETS["tiny"], 0, 3),
    # diffusers' own defaults (flip_sin_to_cos, freq_shift 0, downsample_padding 1, head dim 8 -> multi-head
    # attention, norm_eps 1e-5, two layers per block) with attention in both a down and an up block.
    "multihead-16": (
        UNetConfig.from_diffusers({
            "sample_size": 16, "block_out_channels": [32, 64], "norm_num_groups": 8,
            "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
            "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
        }),
        1, 3,
    ),
    "digits-16": (PRESETS["digits-16"], 2, 3),
    "ddpm-cifar10-32": (PRESETS["ddpm-cifar10-32"], 3, 3),
}


def reference(cfg: UNetConfig, seed: int, batch: int, input_seed: int) -> dict[str, np.ndarray]:
    """Runs diffusers' UNet2DModel with random_state_dict(cfg, seed) on seeded inputs."""
    import torch
    from diffusers import UNet2DModel

    model = UNet2DModel.from_config(cfg.to_diffusers())
    model.load_state_dict({k: torch.from_numpy(v) for k, v in random_state_dict(cfg, seed).items()}, strict=True)
    model.eval()
    rng = np.random.default_rng(input_seed)
    x = rng.standard_normal((batch, cfg.in_channels, cfg.sample_size, cfg.sample_size), dtype=np.float32)
    t = np.concatenate([[0, 999], rng.integers(1, 999, size=max(0, batch - 2))]).astype(np.int32)
    with torch.no_grad():
        eps = model(torch.from_numpy(x), torch.from_numpy(t.astype(np.int64))).sample.numpy()
    return {
        "config": np.array(json.dumps(cfg.to_diffusers(), sort_keys=True)),
        "seed": np.array(seed, np.int64),
        "x": np.ascontiguousarray(x.transpose(0, 2, 3, 1)),
        "t": t,
        "eps": np.ascontiguousarray(eps.transpose(0, 2, 3, 1).astype(np.float32)),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=FIXTURES, help="output folder (default tests/fixtures)")
    args = parser.parse_args(argv)
    import torch

    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    for i, (name, (cfg, seed, batch)) in enumerate(CONFIGS.items()):
        data = reference(cfg, seed, batch, input_seed=100 + i)
        path = args.out / f"unet_{name}.npz"
        np.savez_compressed(path, **data)
        err = _pdjax_error(cfg, seed, data)
        print(f"{path}: t={data['t'].tolist()} |eps| max {np.abs(data['eps']).max():.3f} "
              f"std {data['eps'].std():.3f} ({path.stat().st_size / 1024:.0f} kB); "
              f"pdjax vs diffusers max abs err {err:.2e}")


def _pdjax_error(cfg: UNetConfig, seed: int, data) -> float:
    """Max abs difference of the jitted pdjax UNet (float32, CPU) from the stored diffusers output."""
    import jax

    from pdjax.models.convert import state_dict_to_params
    from pdjax.models.unet import make_eps_fn
    from pdjax.testing import random_state_dict

    params = state_dict_to_params(random_state_dict(cfg, seed), cfg)
    out = jax.jit(make_eps_fn(cfg))(params, data["x"], data["t"])
    return float(np.abs(np.asarray(out) - data["eps"]).max())


if __name__ == "__main__":
    main()
