"""XLA:CPU runtime settings (pdjax/cpu_runtime.py): YNNPACK kernels and one device per core, vs XLA's defaults.

Command:

    python experiments/bench_cpu_runtime.py [--model pdjax/assets/demo/bd_box_corner] [--reps 3]
        [--json experiments/results/bench_cpu_runtime.json]
    python experiments/bench_cpu_runtime.py --configs flaxnorm-N,ynn-N --reference flaxnorm-N --reps 5 \
        --json experiments/results/bench_groupnorm.json

Each configuration runs in its own process (XLA_FLAGS are read once, at backend start):
``xla-1`` (XLA's kernels, 1 device: the reference), ``ynn-1`` (YNNPACK, 1 device) and ``ynn-N``
(YNNPACK, ``PDJAX_CPU_DEVICES=auto``: one device per core, the ``pdjax`` command's default); ``flaxnorm-N``
is ``ynn-N`` with ``flax.linen.GroupNorm`` (``use_fast_variance=False``, what pdjax's UNet used until
2026-12-07) in place of :class:`pdjax.models.unet.GroupNorm`, the reference of the second command. Each child
times, on the same model and inputs, after a warm-up call: the UNet forward at batch 32, the gradient of a
loss through it with respect to its input (what trigger inversion differentiates), a 100-step DDPM chain of
2 x 16 samples through :func:`pdjax.defense.evaluate.triggered_generations` (batch-split over the devices
by :func:`pdjax.sharding.batch_parallel`), 5 steps of the scan's PureDiffusion inversion (its noise batch
split likewise) and 5 DDPM training steps at batch 64 (:func:`pdjax.train.make_multi_step`, data-parallel).
It also saves its outputs, and the parent reports the largest difference from the reference (float
rounding expected) and the speed ratios ``reference time / time``.
Runtime: about 8 minutes on 2 idle cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# name -> (PDJAX_CPU_KERNELS, PDJAX_CPU_DEVICES, GroupNorm implementation)
CONFIGS = {"xla-1": ("xla", "1", "pdjax"), "ynn-1": ("ynn", "1", "pdjax"), "ynn-N": ("ynn", "auto", "pdjax"),
           "flaxnorm-N": ("ynn", "auto", "flax")}
NORM_ENV = "PDJAX_BENCH_NORM"


def use_flax_group_norm() -> None:
    """Build the UNet with ``flax.linen.GroupNorm`` (the reference of the GroupNorm comparison): same params."""
    import flax.linen as nn

    from pdjax.models import unet

    unet._Common.norm = lambda self, name, groups=None: nn.GroupNorm(
        num_groups=groups or self.cfg.norm_num_groups, epsilon=self.cfg.norm_eps, use_fast_variance=False,
        dtype=self.dtype, name=name)


def child(model_path: str, reps: int, out: Path) -> None:
    from pdjax import cpu_runtime

    flags = cpu_runtime.enable()
    if os.environ.get(NORM_ENV) == "flax":
        use_flax_group_norm()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pdjax.defense.detection import SCAN_INVERSION
    from pdjax.defense.evaluate import triggered_generations
    from pdjax.defense.inversion import invert
    from pdjax.model import load

    m = load(model_path)
    # The same weights on a 100-step schedule: a short chain, the same per-step cost as the real one.
    short = dataclasses.replace(m, schedule_config=dataclasses.replace(m.schedule_config, num_train_timesteps=100))
    x = jax.random.normal(jax.random.key(1), (32, *m.image_shape))
    t = jnp.full((32,), 500)
    fwd = jax.jit(m.eps)
    grad = jax.jit(jax.grad(lambda p, x, t: jnp.sum(m.eps(p, x, t) ** 2), argnums=1))
    trig = np.stack([np.full(m.image_shape, -0.5, np.float32), np.zeros(m.image_shape, np.float32)])
    inv_cfg = dataclasses.replace(SCAN_INVERSION, steps=5)
    from pdjax.data import load_digits
    from pdjax.train import TrainConfig, ddpm_loss, init_state, make_multi_step, make_optimizer

    tcfg = TrainConfig(steps=5, batch_size=64, seed=0)
    opt = make_optimizer(tcfg)
    train5 = make_multi_step(ddpm_loss(m.eps, m.schedule, 64), opt, tcfg.ema_decay, 1, batch_size=64)
    digits = jnp.asarray(load_digits(m.image_shape[0], m.image_shape[2]))

    def train_5_steps():
        st = init_state(m.params, opt, 0)
        for _ in range(5):
            st, _ = train5(st, digits)
        return jax.tree.leaves(st.params)[0]
    jobs = {
        "unet_forward_b32": lambda: fwd(m.params, x, t),
        "unet_input_grad_b32": lambda: grad(m.params, x, t),
        "ddpm_100_steps_2x16": lambda: triggered_generations(short, trig, jax.random.key(2), n=16),
        "purediffusion_5_steps": lambda: invert(m, "purediffusion", jax.random.key(3), inv_cfg).trigger,
        "train_5_steps_b64": train_5_steps,
    }
    rows, arrays = {}, {}
    for name, fn in jobs.items():
        t0 = time.perf_counter()
        arrays[name] = np.asarray(jax.block_until_ready(fn()))
        first = time.perf_counter() - t0
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times.append(time.perf_counter() - t0)
        rows[name] = {"first_call_s": first, "median_s": float(np.median(times)), "times": times}
    np.savez(out / "arrays.npz", **arrays)
    (out / "rows.json").write_text(json.dumps({"flags": flags, "devices": len(jax.devices()), "rows": rows}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="pdjax/assets/demo/bd_box_corner")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default="experiments/results/bench_cpu_runtime.json")
    ap.add_argument("--configs", default="xla-1,ynn-1,ynn-N", help=f"comma list of {', '.join(CONFIGS)}")
    ap.add_argument("--reference", default="xla-1", help="the config the ratios are against (one of --configs)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.model, args.reps, Path(args.child))
    import numpy as np

    names = args.configs.split(",")
    if any(n not in CONFIGS for n in names) or args.reference not in names:
        raise SystemExit(f"error: --configs must be names from {', '.join(CONFIGS)} and include --reference")
    work = Path(tempfile.mkdtemp(prefix="pdjax-cpurt-"))
    results = {}
    for name in names:
        kernels, devices, norm = CONFIGS[name]
        folder = work / name
        folder.mkdir()
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        env.update(PDJAX_CPU_KERNELS=kernels, PDJAX_CPU_DEVICES=devices, PDJAX_CACHE_DIR="off")
        env[NORM_ENV] = norm
        subprocess.run([sys.executable, __file__, "--child", str(folder), "--model", args.model,
                        "--reps", str(args.reps)], env=env, check=True)
        results[name] = json.loads((folder / "rows.json").read_text())
        results[name]["arrays"] = np.load(folder / "arrays.npz")
    ref = results[args.reference]
    table = []
    print(f"{'config':10} {'devices':>7} {'job':24} {'median s':>9} {'ratio':>6} {'max |diff|':>11}"
          f"  (ratio and diff against {args.reference})")
    for name, res in results.items():
        for job, row in res["rows"].items():
            ratio = ref["rows"][job]["median_s"] / row["median_s"]
            diff = float(np.abs(res["arrays"][job] - ref["arrays"][job]).max())
            table.append({"config": name, "devices": res["devices"], "flags": res["flags"], "job": job, **row,
                          "reference": args.reference, "speedup_vs_reference": ratio, "max_abs_diff_vs_reference": diff})
            print(f"{name:10} {res['devices']:7d} {job:24} {row['median_s']:9.3f} {ratio:6.2f} {diff:11.2e}")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_inversion import environment, write_json

    # The parent computes nothing itself, so starting its backend here cannot affect the children.
    write_json(args.json, {"environment": {**environment(), "cores": os.cpu_count()}, "args": vars(args),
                           "rows": table})


if __name__ == "__main__":
    main()
