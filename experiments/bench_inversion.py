"""Benchmark one trigger inversion, pdjax vs a PyTorch eager reference, measured in the same run.

Commands (the numbers in docs/performance.md; on the shared 2-core CPU machine ~14 min for digits-16,
two torch thread settings included, and ~13 min for the cifar10 size, 5 min of it one XLA compile):

    python experiments/bench_inversion.py --sizes digits-16 --steps 10 --batch 32 --K 10 --torch-threads 1,2 \
        --json experiments/results/bench_inversion_digits16.json
    python experiments/bench_inversion.py --sizes ddpm-cifar10-32 --steps 2 --batch 4 --K 10 --torch-threads 1 \
        --json experiments/results/bench_inversion_cifar10.json

pdjax runs with the ``pdjax`` command's XLA:CPU settings (``--runtime pdjax``, the default:
``pdjax.cpu_runtime``, YNNPACK kernels and one device per core with the noise batch split over them);
``--runtime xla`` measures XLA's own kernels on one device, the setting of the JSON files written before
2026-12-03 (they have no ``runtime`` in their args).

For each size (a ``pdjax.models.config.PRESETS`` name; random weights from ``pdjax.testing.random_params``,
nothing downloaded) and each method (Elijah; PureDiffusion with K reverse steps, L1 shift loss) it

1. exports the pdjax model with ``Model.export_diffusers`` and has ``experiments/torch_reference.py`` load
   it with ``diffusers.UNet2DModel.from_pretrained`` in a worker subprocess (torch eager, no torch.compile);
2. draws the noise batch [B, H, W, C] and delta_0 = -U[0, 1) in numpy and feeds both implementations; the
   DDPM chain noise of the K steps is pdjax's (``normal(fold_in(chain_key, t))``), exported to torch;
3. runs pdjax's own jitted inversion step (``pdjax.defense.inversion._program``, the program ``invert``
   runs; one optimiser step per call on CPU, all steps in one ``lax.scan`` elsewhere), compiled ahead of
   time so that compile time is measured apart, then one discarded warm-up call, then ``steps`` timed
   steps; torch: one discarded warm-up step, then ``steps`` timed steps; both Adam lr 0.1 from delta_0;
4. prints s/step (mean over the timed steps, compile excluded), compile seconds, the torch/pdjax ratio,
   max |delta_pdjax - delta_torch| after the timed steps (same trigger to float32 tolerance: the
   comparison is apples to apples) and peak memory (GPU: ``peak_bytes_in_use``; CPU: the compiled
   step's ``memory_analysis()`` and each process's max RSS).

Prints one progress line per (size, method) and then a markdown table: size, method, B, K, steps, pdjax
s/step, pdjax trace + compile s, torch s/step, torch/pdjax (> 1: pdjax faster), max abs delta diff, pdjax
step temp MiB, pdjax and torch peak MiB.
Flags: --sizes (comma list); --steps and --batch take one value or one per size (comma separated);
--methods elijah,purediffusion; --K; --steps-per-call (pdjax; 0 = library default); --torch-threads
(comma list, 0 = torch's default; the fastest is the reference); --no-torch (pdjax only); --json OUT;
--precision highest (full float32 on both sides, no TF32 on a GPU).
Runs unchanged on a GPU (JAX picks the default backend; torch uses CUDA when its build has it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch_reference  # noqa: E402  (experiments/torch_reference.py; imports torch only in its worker)

from pdjax.defense import inversion as inv  # noqa: E402
from pdjax.defense.shift import get_lambda  # noqa: E402
from pdjax.diffusion.schedule import ScheduleConfig  # noqa: E402
from pdjax.model import Model  # noqa: E402
from pdjax.models.config import PRESETS  # noqa: E402
from pdjax.testing import random_params  # noqa: E402


def per_size(value: str, sizes: list[str], cast=int) -> dict:
    vals = [cast(v) for v in str(value).split(",")]
    if len(vals) == 1:
        vals = vals * len(sizes)
    if len(vals) != len(sizes):
        raise SystemExit(f"error: {value!r} gives {len(vals)} values for {len(sizes)} sizes")
    return dict(zip(sizes, vals))


def rss_mb() -> float:
    return torch_reference.peak_rss_mb()


def device_peak_bytes() -> int | None:
    """Peak bytes in use on the default device (GPU/TPU); None where the backend keeps no stats (CPU)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:
        return None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def memory_analysis(compiled) -> dict:
    try:
        m = compiled.memory_analysis()
    except Exception:
        return {}
    if m is None:
        return {}
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
            "generated_code_size_in_bytes")
    return {k: int(getattr(m, k)) for k in keys if hasattr(m, k)}


def compile_step(model: Model, cfg: inv.InversionConfig, params, fixed: dict, key, delta0, n_per_call: int = 1):
    """pdjax's own inversion step program (``inversion._program``, what ``invert`` runs), compiled ahead of time.

    Returns (compiled, (state0, params, fixed, key) placed as the library places them, trace + lower s,
    compile s); the state starts at ``delta0`` with a fresh optimiser state."""
    run, _, phase = inv._program(inv.problem_of(model), cfg, 0, n_per_call, stacked=False)
    d0 = jnp.asarray(delta0)
    args = (inv.InvState(jnp.zeros((), jnp.int32), d0, phase.optimizer.init(d0)), params, fixed, key)
    # the noise batch split over several devices: arguments placed as the library does; else params on the device
    args = run.place(*args) if hasattr(run, "place") else (args[0], jax.device_put(params), *args[2:])
    t0 = time.perf_counter()
    lowered = run.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    return compiled, args, t1 - t0, time.perf_counter() - t1


def bench_pdjax(model: Model, cfg: inv.InversionConfig, noise: np.ndarray, delta0: np.ndarray, chain_key,
                n_per_call: int) -> dict:
    """pdjax's own inversion program, compiled AOT; returns timings, final delta, losses, memory."""
    fixed = {"noise": jnp.asarray(noise), "chain_key": chain_key}
    key = jax.random.key(0)  # per-step randomness (unused by elijah / purediffusion)
    compiled, (state0, params, fixed, key), trace_s, compile_s = compile_step(model, cfg, model.params, fixed, key,
                                                                              delta0, n_per_call)
    t2 = time.perf_counter()
    s, losses = compiled(state0, params, fixed, key)  # warm-up call, discarded
    losses.block_until_ready()
    t3 = time.perf_counter()
    calls = cfg.steps // n_per_call
    state, times, all_losses = state0, [], []
    for _ in range(calls):
        tc = time.perf_counter()
        state, losses = compiled(state, params, fixed, key)
        losses.block_until_ready()
        times.append(time.perf_counter() - tc)
        all_losses.append(np.asarray(losses))
    out = {"backend": jax.default_backend(), "trace_lower_s": trace_s, "compile_s": compile_s,
           "warmup_call_s": t3 - t2, "call_times": times, "steps_per_call": n_per_call,
           "s_per_step": float(np.sum(times) / cfg.steps), "memory": memory_analysis(compiled),
           "max_rss_mb_so_far": rss_mb(), "peak_bytes": device_peak_bytes()}
    try:
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        out["flops_per_call"] = float(ca.get("flops", float("nan")))
    except Exception:
        pass
    return out, np.asarray(state.delta), np.concatenate(all_losses)


def chain_noise(chain_key, K: int, T: int, shape) -> np.ndarray:
    """The ancestral noise pdjax's DDPM step draws at t = T-1 .. T-K: normal(fold_in(chain_key, t)), [K, ...]."""
    return np.stack([np.asarray(jax.random.normal(jax.random.fold_in(chain_key, jnp.int32(T - 1 - i)), shape))
                     for i in range(K)])


def bench_one(size: str, method: str, steps: int, batch: int, K: int, spc: int, torch_threads: list[int],
              workdir: Path, model: Model, export_dir: Path, precision: str = "default") -> dict:
    # One fixed noise batch, fed to both (the torch reference has no per-step fresh noise; drawing it costs
    # pdjax one normal() per step).
    cfg = inv.InversionConfig(method=method, steps=steps, batch=batch, K=K, steps_per_call=spc,
                              fresh_noise=False if method == "purediffusion" else None).resolved()
    n = cfg.steps_per_call or (1 if jax.default_backend() == "cpu" else cfg.steps)
    shape = tuple(model.image_shape)
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((batch, *shape), dtype=np.float32)
    delta0 = -rng.random(shape, dtype=np.float32)  # Elijah's init, -U[0, 1)
    chain_key = jax.random.key(1)
    pj, delta_pj, losses_pj = bench_pdjax(model, cfg, noise, delta0, chain_key, n)
    row = {"size": size, "method": method, "steps": steps, "batch": batch,
           "K": K if method == "purediffusion" else None, "pdjax": pj}
    if torch_threads:
        sched = model.schedule
        arrays = {"noise": noise, "delta0": delta0}
        spec = {"method": method, "steps": steps, "lr": cfg.lr, "T": sched.num_timesteps,
                "elijah_lambda": cfg.elijah_lambda, "K": K, "norm": cfg.norm, "shift_weight": cfg.shift_weight,
                "cons_weight": cfg.cons_weight, "cons_batch": cfg.cons_batch,
                "variance_type": model.schedule_config.variance_type,
                "clip_sample": bool(model.schedule_config.clip_sample)}
        if cfg.per_sample:
            raise SystemExit("error: the torch reference implements the batch-mean shift loss only")
        if method == "purediffusion":
            arrays["zs"] = chain_noise(chain_key, K, sched.num_timesteps, (batch, *shape))
            arrays["lambdas"] = np.asarray(get_lambda(cfg.lambda_source, sched, K), np.float32)
            for f in ("betas", "alphas", "sqrt_abar", "sqrt_one_minus_abar", "posterior_variance",
                      "posterior_mean_coef1", "posterior_mean_coef2"):
                arrays["sched_" + f] = np.asarray(getattr(sched, f), np.float32)
        runs = []
        for th in torch_threads:  # one worker per thread count; the reference is the fastest of them
            tr, tarr = torch_reference.call_worker("inversion", export_dir,
                                                   {**spec, "threads": th, "precision": precision}, arrays,
                                                   workdir / f"{size}-{method}-t{th}")
            tr["threads_requested"] = th
            runs.append((tr, tarr))
            print(f"    torch threads={tr['threads']}: {tr['s_per_step']:.3f} s/step", flush=True)
        tr, tarr = min(runs, key=lambda r: r[0]["s_per_step"])
        row["torch"] = tr
        row["torch_runs"] = [r[0] for r in runs]
        row["ratio_torch_over_pdjax"] = tr["s_per_step"] / pj["s_per_step"]
        row["max_abs_delta_diff"] = float(np.max(np.abs(delta_pj - tarr["delta"])))
        row["max_abs_delta"] = float(np.max(np.abs(delta_pj)))
        row["max_rel_loss_diff"] = float(np.max(np.abs(losses_pj - tarr["losses"]) / np.abs(tarr["losses"])))
        row["final_loss"] = {"pdjax": float(losses_pj[-1]), "torch": float(tarr["losses"][-1])}
    else:
        row["final_loss"] = {"pdjax": float(losses_pj[-1])}
    return row


def write_json(path, payload: dict) -> None:
    """Write a benchmark's results (``{"environment": ..., "rows": ...}``) to ``path`` and say so."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2))
    print(f"wrote {path}")


# CPU features that decide which kernels a framework can use (AVX-512, bf16 dot products, AMX tiles).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def host_cpu() -> dict:
    """The host CPU as /proc/cpuinfo gives it: model name, the :data:`ISA_FLAGS` it has, the highest ``cpu MHz``
    and the cores this process may use. The machines behind these benchmarks changed between sessions (an AVX2
    AMD EPYC, an AVX-512 + AMX Intel Xeon), so every result file records which one it ran on."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return {"model": platform.processor() or None, "isa": None, "mhz": None, "cores": cores}
    field = lambda name: [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith(name)]  # noqa: E731
    flags = set((field("flags") or [""])[0].split())
    mhz = [float(v) for v in field("cpu MHz")]
    return {"model": (field("model name") or [None])[0], "isa": [f for f in ISA_FLAGS if f in flags],
            "mhz": max(mhz) if mhz else None, "cores": cores}


def environment() -> dict:
    env = {"python": platform.python_version(), "jax": jax.__version__, "backend": jax.default_backend(),
           "devices": [d.device_kind for d in jax.devices()], "xla_flags": os.environ.get("XLA_FLAGS", ""),
           "host_cpu": host_cpu()}
    try:
        import jaxlib

        env["jaxlib"] = jaxlib.__version__
    except Exception:
        pass
    try:
        from importlib.metadata import version

        for pkg in ("torch", "diffusers", "flax", "optax"):
            try:
                env[pkg] = version(pkg)
            except Exception:
                env[pkg] = None
    except Exception:
        pass
    return env


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="digits-16", help="comma-separated PRESETS names")
    ap.add_argument("--methods", default="elijah,purediffusion")
    ap.add_argument("--steps", default="10", help="timed optimiser steps (one value, or one per size)")
    ap.add_argument("--batch", default="32", help="noise batch B (one value, or one per size)")
    ap.add_argument("--K", type=int, default=10, help="PureDiffusion reverse steps")
    ap.add_argument("--steps-per-call", type=int, default=0, help="pdjax steps per jitted call (0 = default)")
    ap.add_argument("--no-torch", action="store_true", help="skip the torch reference")
    ap.add_argument("--torch-threads", default="0",
                    help="torch intra-op threads, comma list (0 = torch's default); the fastest is the reference")
    ap.add_argument("--runtime", choices=("pdjax", "xla"), default="pdjax",
                    help="pdjax: the pdjax command's XLA:CPU settings (pdjax.cpu_runtime: YNNPACK kernels, one "
                         "device per core, the noise batch split over them); xla: XLA's own kernels, one device")
    ap.add_argument("--precision", choices=("default", "highest"), default="default",
                    help="float32 matmul/convolution precision on both sides; default lets GPUs use TF32 (JAX's "
                         "default precision, torch's cudnn.allow_tf32), highest forces full float32 (a check that "
                         "trigger differences between the two sides are TF32 rounding)")
    ap.add_argument("--json", default=None, help="write all results to this JSON file")
    args = ap.parse_args(argv)
    if args.precision == "highest":
        jax.config.update("jax_default_matmul_precision", "highest")
    if args.runtime == "pdjax":
        from pdjax import cpu_runtime

        cpu_runtime.enable()  # before JAX starts its backend, as the pdjax command does
    sizes = [s for s in args.sizes.split(",") if s]
    for s in sizes:
        if s not in PRESETS:
            raise SystemExit(f"error: unknown size {s!r}; choose from {', '.join(PRESETS)}")
    steps, batch = per_size(args.steps, sizes), per_size(args.batch, sizes)
    methods = [m for m in args.methods.split(",") if m]
    use_torch = not args.no_torch
    torch_threads = [int(v) for v in args.torch_threads.split(",")] if use_torch else []
    if use_torch and not torch_reference.have_torch():
        raise SystemExit("error: torch/diffusers missing: pip install torch==2.13.0 diffusers, or pass --no-torch")
    env = environment()
    print(f"backend={env['backend']} devices={env['devices']} jax={env['jax']} torch={env.get('torch')}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="pdjax-bench-") as tmp:
        tmp = Path(tmp)
        for size in sizes:
            cfg = PRESETS[size]
            model = Model(cfg, random_params(cfg, 0), ScheduleConfig())
            export_dir = model.export_diffusers(tmp / f"export-{size}")
            for method in methods:
                print(f"[{size}] {method}: B={batch[size]} steps={steps[size]}"
                      + (f" K={args.K}" if method == "purediffusion" else ""), flush=True)
                row = bench_one(size, method, steps[size], batch[size], args.K, args.steps_per_call, torch_threads,
                                tmp, model, export_dir, args.precision)
                row["params"] = int(sum(np.size(p) for p in jax.tree_util.tree_leaves(model.params)))
                rows.append(row)
                p = row["pdjax"]
                msg = (f"  pdjax {p['s_per_step']:.3f} s/step, compile {p['compile_s']:.1f} s "
                       f"(+trace {p['trace_lower_s']:.1f} s)")
                if use_torch:
                    msg += (f"; torch {row['torch']['s_per_step']:.3f} s/step; ratio torch/pdjax "
                            f"{row['ratio_torch_over_pdjax']:.2f}; max|d_pdjax-d_torch| {row['max_abs_delta_diff']:.2e}")
                print(msg, flush=True)
    print()
    hdr = ("| size | method | B | K | steps | pdjax s/step | pdjax compile s | torch s/step | torch/pdjax | "
           "max abs delta diff | pdjax temp MiB | pdjax peak MiB | torch peak MiB |")
    print(hdr)
    print("|" + "|".join("---" for _ in range(hdr.count("|") - 1)) + "|")
    for r in rows:
        p, t = r["pdjax"], r.get("torch", {})
        temp = p["memory"].get("temp_size_in_bytes")
        pj_peak = p["peak_bytes"] / 2**20 if p["peak_bytes"] else p["max_rss_mb_so_far"]
        t_peak = (t["peak_bytes"] / 2**20 if t.get("peak_bytes") else t.get("max_rss_mb")) if t else None
        fmt = lambda v, f: ("-" if v is None else format(v, f))  # noqa: E731
        print(f"| {r['size']} | {r['method']} | {r['batch']} | {r['K'] or '-'} | {r['steps']} | {p['s_per_step']:.3f} "
              f"| {p['compile_s'] + p['trace_lower_s']:.1f} | {fmt(t.get('s_per_step'), '.3f')} "
              f"| {fmt(r.get('ratio_torch_over_pdjax'), '.2f')} | {fmt(r.get('max_abs_delta_diff'), '.1e')} "
              f"| {fmt(temp / 2**20 if temp is not None else None, '.0f')} | {pj_peak:.0f} | {fmt(t_peak, '.0f')} |")
    kind = "device peak_bytes_in_use" if rows and rows[0]["pdjax"]["peak_bytes"] else "process max RSS (so far)"
    print("torch s/step = the fastest --torch-threads setting (per-setting times are printed above and in the JSON).")
    print(f"peak memory: {kind}; pdjax temp = XLA memory_analysis temp_size of the compiled step program;"
          " ratio > 1 means pdjax is faster.")
    if args.json:
        write_json(args.json, {"environment": env, "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
