"""What pdjax's host loops cost on top of their step programs: ``invert`` and ``fit`` per step vs the bare program.

Command (docs/performance.md section 1; about 3 minutes on 2 cores):

    python experiments/bench_invert_overhead.py [--model pdjax/assets/demo/bd_box_corner] [--json OUT.json]

For Elijah (100 steps, B = 32) and PureDiffusion (20 steps, B = 32, K = 10, no size search) on one model:

1. ``invert(model, method, key, cfg)`` is run twice; the second run's wall time / steps is the library's
   per-step cost (programs compiled and cached by the first run; includes the progress-free host loop,
   argument placement, noise batch and result handling);
2. the reference, measured in the same run: the same step program (``inversion._program``) compiled ahead
   of time and called with arguments placed once, as ``experiments/bench_inversion.py`` times it.

Prints both and their ratio (invert / bare program; 1.00 = no overhead) and checks that the two give the
same trigger (max abs difference after the same steps from the same start).

Then the same for training: ``pdjax.train.fit`` (DDPM steps at batch 64 on the digits, one optimiser step per
call on CPU, no checkpoint folder; after a warm-up call, per step = (wall of 60 steps - wall of 30) / 30, which
cancels what every ``fit`` call does once) against its multi-step program called directly, 30 steps, with the
state and data placed once; the check is the largest difference of the final EMA params after 30 steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="pdjax/assets/demo/bd_box_corner")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from pdjax import cpu_runtime

    cpu_runtime.enable()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import jax
    import jax.numpy as jnp
    import numpy as np

    from bench_inversion import compile_step
    from pdjax.defense import inversion as inv
    from pdjax.model import load

    model = load(args.model)
    prob = inv.problem_of(model)
    rows = []
    for method, cfg in (("elijah", inv.InversionConfig(steps=100, batch=32)),
                        ("purediffusion", inv.InversionConfig(steps=20, batch=32, K=10, scales=()))):
        cfg = dataclasses.replace(cfg, method=method).resolved()
        key = jax.random.key(0)
        inv.invert(model, method, key, cfg, progress=False)  # compiles
        t0 = time.perf_counter()
        res = inv.invert(model, method, key, cfg, progress=False)
        lib = (time.perf_counter() - t0) / cfg.steps

        # The bare program, from invert's own start (same key: same delta_0, noise and chain key).
        _, prep, _ = inv._program(prob, cfg, 0, 1, stacked=False)
        delta = inv.initial_delta(cfg, inv._cell_shape(cfg, prob.shape), key)
        compiled, (state, params, fixed, key), _, _ = compile_step(model, cfg, model.params,
                                                                   prep(model.params, key), key, delta)
        times = []
        for _ in range(cfg.steps):
            tc = time.perf_counter()
            state, losses = compiled(state, params, fixed, key)
            losses.block_until_ready()
            times.append(time.perf_counter() - tc)
        bare = float(np.sum(times[1:]) / (cfg.steps - 1))  # the first call touches fresh buffers
        diff = float(np.max(np.abs(np.asarray(res.trigger) - inv.expand_cells(np.asarray(state.delta), cfg.cells))))
        rows.append({"method": method, "steps": cfg.steps, "batch": cfg.batch, "loop_ms_per_step": lib * 1e3,
                     "bare_ms_per_step": bare * 1e3, "ratio": lib / bare, "max_abs_trigger_diff": diff})
        print(f"{method:14} invert {lib * 1e3:7.1f} ms/step   bare program {bare * 1e3:7.1f} ms/step   "
              f"ratio {lib / bare:5.2f}   max |trigger diff| {diff:.1e}", flush=True)
    from pdjax.data import load_digits
    from pdjax.train import TrainConfig, ddpm_loss, fit, init_state, make_multi_step, make_optimizer

    tcfg = TrainConfig(steps=30, batch_size=64, seed=0)
    loss = ddpm_loss(model.eps, model.schedule, tcfg.batch_size)
    data = jnp.asarray(load_digits(model.image_shape[0], model.image_shape[2]))
    # Every fit call builds its program once (a first call compiles it; later ones find XLA's compiled executable
    # in memory): after a warm-up call, the per-step cost is the difference between a run of 2 x 30 steps and one of 30.
    fit(model, loss, data, tcfg, progress=False)
    walls, trained = {}, None
    for steps in (tcfg.steps, 2 * tcfg.steps):
        t0 = time.perf_counter()
        res = fit(model, loss, data, dataclasses.replace(tcfg, steps=steps), progress=False)
        walls[steps] = time.perf_counter() - t0
        trained = trained or res.model  # the 30-step run's
    lib = (walls[2 * tcfg.steps] - walls[tcfg.steps]) / tcfg.steps
    opt = make_optimizer(tcfg)
    multi = make_multi_step(loss, opt, tcfg.ema_decay, tcfg.steps_per_call, batch_size=tcfg.batch_size)
    state = init_state(model.params, opt, tcfg.seed)
    placed = multi.place(state, data) if hasattr(multi, "place") else (state, data)
    compiled = multi.lower(*placed).compile()
    state, data = placed
    times = []
    for _ in range(tcfg.steps // tcfg.steps_per_call):
        tc = time.perf_counter()
        state, losses = compiled(state, data)
        losses.block_until_ready()
        times.append(time.perf_counter() - tc)
    bare = float(np.sum(times[1:]) / (len(times) - 1) / tcfg.steps_per_call)
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(jax.tree.leaves(trained.params), jax.tree.leaves(state.ema_params)))
    rows.append({"method": "train", "steps": tcfg.steps, "batch": tcfg.batch_size, "loop_ms_per_step": lib * 1e3,
                 "bare_ms_per_step": bare * 1e3, "ratio": lib / bare, "max_abs_param_diff": diff})
    print(f"{'train (fit)':14} fit    {lib * 1e3:7.1f} ms/step   bare program {bare * 1e3:7.1f} ms/step   "
          f"ratio {lib / bare:5.2f}   max |param diff| {diff:.1e}", flush=True)
    if args.json:
        from bench_inversion import environment, write_json

        write_json(args.json, {"environment": environment(), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
