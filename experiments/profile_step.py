"""Where one inversion step's time goes on XLA:CPU: a ``jax.profiler`` trace of pdjax's own step program, summed.

Command (docs/performance.md section 1; about 1 minute for PureDiffusion on 2 cores, compile included):

    python experiments/profile_step.py --method elijah --batch 32 --steps 5
    python experiments/profile_step.py --method purediffusion --batch 32 --K 10 --steps 5 --json OUT.json
    python experiments/profile_step.py --method elijah --flax-group-norm   # the UNet as it was before 2026-12-07

Runs the program :func:`pdjax.defense.inversion.invert` runs (``inversion._program``: on CPU one jitted
optimiser step per call, the noise batch split over the devices of ``pdjax.cpu_runtime``), on a digits-16 UNet
with random weights (``pdjax.testing.random_params``, the weights of ``experiments/bench_inversion.py``), calls
it 3 times untraced, then ``--steps`` times under ``jax.profiler.trace``. From the trace (Perfetto JSON) it
takes the operations one device's worker thread ran and prints per step:

- the wall time of a step and the thread's busy time, split into compute and waiting at the collectives of
  the batch split (``Rendezvous``, ``Wait``, ``psum``: the other device's lag shows up there);
- time by operation kind (the fused-computation name without its number: ``ynn_fusion`` = YNNPACK
  convolutions and dot products, ``convolution`` = XLA's own, ``*_reduce_fusion`` = reductions, ...);
- time by model operation (the jaxpr ``op_name`` of the fusion's root, block indices dropped), split into
  forward and backward (``transpose(...)`` in the name) and convolution-or-dot vs the rest.

Nothing is compared against a reference here: this is a diagnostic, not a benchmark.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import sys
import tempfile
import time
from pathlib import Path


# Trace events that are waits for the other devices at a collective (the batch split's psums), not compute.
SYNC = ("Rendezvous", "Wait", "psum", "all-reduce")


def trace_events(folder: Path) -> tuple[list, dict]:
    """The trace's complete events and {(pid, tid): thread name}."""
    path = sorted(glob.glob(str(folder / "plugins" / "profile" / "*" / "perfetto_trace.json.gz")))[-1]
    data = json.load(gzip.open(path))
    events = data["traceEvents"] if isinstance(data, dict) else data
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
    return [e for e in events if e.get("ph") == "X"], names


def op_names(hlo_text: str) -> dict:
    """{HLO instruction name: jaxpr op_name} from the compiled module's text."""
    return {m.group(1): m.group(2)
            for m in re.finditer(r"\n\s*%?([\w.\-]+) = [^\n]*?op_name=\"([^\"]*)\"", hlo_text)}


def model_op(op_name: str) -> tuple[str, str]:
    """(fwd or bwd, the op_name without the program's wrappers and block indices)."""
    direction = "bwd" if "transpose(" in op_name else "fwd"
    op = re.sub(r"^jit\(\w+\)/(shard_map/)?", "", op_name)
    op = re.sub(r"^(transpose\(|jvp\()*(jit\(eps_\w+\))?\)*/?", "", op)
    op = re.sub(r"UNet2D/|(down|up)_blocks_\d+/|resnets_\d+/|attentions_\d+/|mid_block/|_\d+\b", "", op)
    return direction, op


def summarise(events: list, threads: dict, meta: dict, steps: int) -> dict:
    """Per-step milliseconds of one device worker thread: busy total, by kind, by model operation."""
    workers = sorted({threads.get((e["pid"], e["tid"]), "") for e in events} - {""})
    worker = next((t for t in workers if t.startswith("tf_XLAEigen")), None)
    if worker is None:
        raise SystemExit(f"error: no XLA worker thread in the trace (threads: {', '.join(workers)})")
    kinds, ops = collections.Counter(), collections.Counter()
    for e in events:
        if threads.get((e["pid"], e["tid"])) != worker or e["name"].startswith("ThunkExecutor"):
            continue
        kind = re.sub(r"\.\d+$", "", e["name"])
        kinds[kind] += e["dur"]
        direction, op = model_op(meta.get(e["name"], "?" + kind))
        compute = "conv/dot" if ("ynn" in kind or "conv" in kind or kind.startswith("dot")) else "other"
        ops[f"{direction} {compute:8} {op}"] += e["dur"]
    per_step = lambda c: {k: v / 1e3 / steps for k, v in c.most_common()}  # noqa: E731  (us -> ms per step)
    busy = sum(kinds.values()) / 1e3 / steps
    sync = sum(v for k, v in kinds.items() if k.startswith(SYNC)) / 1e3 / steps
    return {"thread": worker, "busy_ms": busy, "sync_ms": sync, "compute_ms": busy - sync,
            "by_kind_ms": per_step(kinds), "by_op_ms": per_step(ops)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=("elijah", "purediffusion"), default="purediffusion")
    ap.add_argument("--size", default="digits-16", help="a pdjax.models.config.PRESETS name")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--K", type=int, default=10, help="PureDiffusion reverse steps")
    ap.add_argument("--steps", type=int, default=5, help="traced steps")
    ap.add_argument("--top", type=int, default=20, help="rows printed per table")
    ap.add_argument("--flax-group-norm", action="store_true",
                    help="build the UNet with flax.linen.GroupNorm (pdjax's until 2026-12-07) instead of its own")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from pdjax import cpu_runtime

    flags = cpu_runtime.enable()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_cpu_runtime import use_flax_group_norm

    if args.flax_group_norm:
        use_flax_group_norm()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from bench_inversion import compile_step
    from pdjax.defense import inversion as inv
    from pdjax.diffusion.schedule import ScheduleConfig
    from pdjax.model import Model
    from pdjax.models.config import PRESETS
    from pdjax.testing import random_params

    if args.size not in PRESETS:
        raise SystemExit(f"error: unknown size {args.size!r}; choose from {', '.join(PRESETS)}")
    cfg = PRESETS[args.size]
    model = Model(cfg, random_params(cfg, 0), ScheduleConfig())
    icfg = inv.InversionConfig(method=args.method, steps=args.steps, batch=args.batch, K=args.K, steps_per_call=1,
                               fresh_noise=False if args.method == "purediffusion" else None).resolved()
    rng = np.random.default_rng(0)  # bench_inversion.py's noise batch and delta_0
    noise = jnp.asarray(rng.standard_normal((args.batch, *model.image_shape), dtype=np.float32))
    delta = -rng.random(model.image_shape, dtype=np.float32)
    fixed = {"noise": noise, "chain_key": jax.random.key(1)}
    compiled, (state, params, fixed, key), _, _ = compile_step(model, icfg, model.params, fixed, jax.random.key(0),
                                                              delta)
    for _ in range(3):
        state, losses = compiled(state, params, fixed, key)
    losses.block_until_ready()
    with tempfile.TemporaryDirectory(prefix="pdjax-profile-") as tmp:
        jax.profiler.start_trace(tmp, create_perfetto_trace=True)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, losses = compiled(state, params, fixed, key)
            losses.block_until_ready()
        wall = (time.perf_counter() - t0) / args.steps
        jax.profiler.stop_trace()
        events, threads = trace_events(Path(tmp))
    out = summarise(events, threads, op_names(compiled.as_text()), args.steps)
    out.update(method=args.method, size=args.size, batch=args.batch,
               K=args.K if args.method == "purediffusion" else None, devices=len(jax.devices()),
               xla_flags_added=flags, wall_ms_per_step=wall * 1e3,
               group_norm="flax" if args.flax_group_norm else "pdjax")
    print(f"{args.method} {args.size} B={args.batch} devices={out['devices']}: "
          f"wall {out['wall_ms_per_step']:.1f} ms/step; one device's worker busy {out['busy_ms']:.1f} ms/step: "
          f"compute {out['compute_ms']:.1f}, waiting at collectives {out['sync_ms']:.1f}")
    for title, table in (("by kind", out["by_kind_ms"]), ("by model operation", out["by_op_ms"])):
        print(f"\n{title} (ms per step, one device):")
        for name, ms in list(table.items())[: args.top]:
            print(f"  {ms:8.2f}  {name}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
