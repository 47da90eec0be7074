"""UNet forward and forward+backward throughput, FLOP utilisation and memory: pdjax vs torch eager, one run.

Command (the numbers in docs/performance.md; ~9 min on the shared 2-core CPU machine, half of it compiles):

    python experiments/bench_unet.py --size ddpm-cifar10-32 --batch 8 --iters 3 --torch-threads 1 \
        --json experiments/results/bench_unet.json

On a GPU the defaults (batch 128, 20 iterations) are meant: ``python experiments/bench_unet.py``.
``--recount JSON`` recounts the FLOPs and MFU of a saved run's JSON on this machine (timings unchanged).

For the google/ddpm-cifar10-32 architecture (35.7M parameters; random weights from
``pdjax.testing.random_params``, nothing downloaded) and each compute dtype (float32 and bfloat16 via
``make_eps_fn(cfg, dtype)``; params stay float32) it compiles, ahead of time, ``eps(params, x, t)`` and
``value_and_grad`` of mean(eps^2) w.r.t. every weight (the training-step shape of work), then prints per
program: images/s after one warm-up call, compile seconds, GFLOP per call from XLA's cost analysis of
the lowered program (before backend passes: on a GPU the compiled program's convolutions are cuDNN calls
that its own cost analysis leaves out; see :func:`flops_of`), achieved TFLOP/s, MFU = achieved / peak, and memory (GPU:
``peak_bytes_in_use``; everywhere: the program's ``memory_analysis()`` temp bytes; process peak RSS).

Peak: --peak-tflops, else a small table for known GPUs (dense tensor-core peaks: H100/H200 bf16 989,
tf32 495; A100 bf16 312, tf32 156; float32 is measured against tf32, XLA's default f32 precision on those
GPUs), else on CPU an estimate from /proc/cpuinfo (cores x MHz x 32 float32 FLOP/cycle with AVX2+FMA,
64 with AVX-512; the bfloat16 row is compared with the same float32 peak: XLA:CPU's kernels gained nothing
from bf16 even on a CPU with AVX512-BF16 and AMX, docs/performance.md section 5).

The reference, measured in the same run: diffusers' UNet2DModel with the same weights in torch eager
float32 (``experiments/torch_reference.py`` worker; --torch-threads picks its thread counts); ratio =
pdjax images/s / torch images/s (> 1: pdjax faster). Without torch the bfloat16 row is stated as a
ratio against pdjax float32. Also prints max |eps_pdjax - eps_torch| (float32) and bf16 vs f32.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch_reference  # noqa: E402
from bench_inversion import device_peak_bytes, environment, host_cpu, memory_analysis, write_json  # noqa: E402

from pdjax.diffusion.schedule import ScheduleConfig  # noqa: E402
from pdjax.model import Model  # noqa: E402
from pdjax.models.config import PRESETS  # noqa: E402
from pdjax.models.unet import make_eps_fn  # noqa: E402
from pdjax.testing import random_params  # noqa: E402

# Dense peak TFLOP/s by device_kind substring: {dtype: peak}. float32 = TF32 tensor cores (XLA's default).
GPU_PEAKS = {
    "H200": {"bfloat16": 989.0, "float32": 494.5},
    "H100": {"bfloat16": 989.0, "float32": 494.5},
    "A100": {"bfloat16": 312.0, "float32": 156.0},
}


def cpu_peak_tflops() -> tuple[float | None, str]:
    """(estimated float32 peak TFLOP/s of this CPU, how it was estimated) from :func:`bench_inversion.host_cpu`:
    cores x MHz x FLOP/cycle, 64 with AVX-512 (two 16-lane FMA pipes), 32 with AVX2 + FMA, else 16."""
    cpu = host_cpu()
    if cpu["isa"] is None or not cpu["mhz"]:
        return None, "no cpu MHz or flags in /proc/cpuinfo"
    per_cycle = 64 if "avx512f" in cpu["isa"] else 32 if {"avx2", "fma"} <= set(cpu["isa"]) else 16
    peak = cpu["cores"] * cpu["mhz"] * 1e6 * per_cycle / 1e12
    return peak, f"{cpu['cores']} cores x {cpu['mhz']:.0f} MHz x {per_cycle} fp32 FLOP/cycle (estimate)"


def peak_for(dtype: str, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "--peak-tflops"
    kind = jax.devices()[0].device_kind
    for name, peaks in GPU_PEAKS.items():
        if name in kind:
            return peaks[dtype], f"{name} dense {'bf16' if dtype == 'bfloat16' else 'tf32'} peak"
    if jax.default_backend() == "cpu":
        return cpu_peak_tflops()
    return None, f"unknown device {kind!r}: pass --peak-tflops"


def flops_of(stage) -> float | None:
    """FLOPs of one call from XLA's cost analysis of ``stage`` (a ``Lowered`` or ``Compiled``), or None.

    Count them on the ``Lowered`` program (the HLO before backend passes): after GPU compilation the
    convolutions are cuDNN custom calls, which the cost analysis of the ``Compiled`` program does not count
    (on the H200 it reported 70.6 GFLOP for a batch-128 forward that has 1495 GFLOP of convolutions and
    matmuls). The lowered count does not depend on the backend, so MFU is comparable across machines.
    """
    try:
        ca = stage.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        return float(ca["flops"])
    except Exception:
        return None


def programs(cfg, dtype: str) -> dict:
    """{"forward": f, "forward_backward": g} for params, x [B, H, W, C] float32 and t [B] int32."""
    eps = make_eps_fn(cfg, jnp.dtype(dtype))
    return {"forward": lambda p, x, t: eps(p, x, t),
            "forward_backward": jax.value_and_grad(lambda p, x, t: jnp.mean(jnp.square(eps(p, x, t))))}


def recount(path: str) -> None:
    """Recount the FLOPs of a saved run's programs (``--recount JSON``) from the lowered HLO and rewrite
    its TFLOP/s and MFU columns; the timings stay those measured. For JSON files written before FLOPs were
    counted on the lowered program (the GPU run of 2026-12-04)."""
    data = json.loads(Path(path).read_text())
    args = data["args"]
    cfg = PRESETS[args["size"]]
    params = random_params(cfg, 0)
    x = jnp.zeros((args["batch"], cfg.sample_size, cfg.sample_size, cfg.in_channels), jnp.float32)
    t = jnp.zeros((args["batch"],), jnp.int32)
    for r in data["rows"]:
        flops = flops_of(jax.jit(programs(cfg, r["dtype"])[r["program"]]).lower(params, x, t))
        r["flops_compiled"], r["flops"] = r["flops"], flops
        r["tflops_achieved"] = flops / r["s_per_iter"] / 1e12
        r["mfu"] = r["tflops_achieved"] / r["peak_tflops"] if r["peak_tflops"] else None
        print(f"| {r['dtype']} | {r['program']} | {r['images_per_s']:.4g} | {flops / 1e9:.1f} "
              f"| {(r['flops_compiled'] or 0) / 1e9:.1f} | {r['tflops_achieved']:.1f} "
              f"| {'-' if r['mfu'] is None else format(100 * r['mfu'], '.1f') + '%'} |")
    data["flops_recounted"] = "FLOPs from the lowered HLO (bench_unet.py --recount)"
    Path(path).write_text(json.dumps(data, indent=1, default=str))


def time_program(fn, args, iters: int) -> dict:
    t0 = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    flops = flops_of(lowered)
    jax.block_until_ready(compiled(*args))  # warm-up
    t3 = time.perf_counter()
    times = []
    for _ in range(iters):
        tc = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - tc)
    return {"trace_lower_s": t1 - t0, "compile_s": t2 - t1, "warmup_s": t3 - t2, "times": times,
            "s_per_iter": float(np.mean(times)), "flops": flops, "flops_compiled": flops_of(compiled), "memory": memory_analysis(compiled),
            "peak_bytes": device_peak_bytes(), "peak_rss_mb": torch_reference.peak_rss_mb(), "compiled": compiled}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    accel = jax.default_backend() != "cpu"
    ap.add_argument("--size", default="ddpm-cifar10-32", help="PRESETS name")
    ap.add_argument("--batch", type=int, default=128 if accel else 8)
    ap.add_argument("--iters", type=int, default=20 if accel else 3)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s for the MFU column")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--torch-threads", default="0", help="comma list (0 = torch default); fastest is the reference")
    ap.add_argument("--json", default=None)
    ap.add_argument("--recount", metavar="JSON", help="only recount the FLOPs and MFU of a saved run's JSON")
    args = ap.parse_args(argv)
    if args.recount:
        return recount(args.recount)
    if args.size not in PRESETS:
        raise SystemExit(f"error: unknown size {args.size!r}; choose from {', '.join(PRESETS)}")
    use_torch = not args.no_torch and torch_reference.have_torch()
    env = environment()
    cfg = PRESETS[args.size]
    model = Model(cfg, random_params(cfg, 0), ScheduleConfig())
    params = jax.device_put(model.params)
    nparams = int(sum(np.size(p) for p in jax.tree_util.tree_leaves(model.params)))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, *model.image_shape), dtype=np.float32)
    t = rng.integers(0, 1000, size=(args.batch,)).astype(np.int32)
    xj, tj = jnp.asarray(x), jnp.asarray(t)
    print(f"backend={env['backend']} devices={env['devices']} size={args.size} params={nparams} batch={args.batch}",
          flush=True)
    rows, outs = [], {}
    for dt in [d for d in args.dtypes.split(",") if d]:
        peak, peak_src = peak_for(dt, args.peak_tflops)
        for name, fn in programs(cfg, dt).items():
            print(f"[{dt}] {name} ...", flush=True)
            r = time_program(fn, (params, xj, tj), args.iters)
            compiled = r.pop("compiled")
            if name == "forward":
                outs[dt] = np.asarray(compiled(params, xj, tj))
            r.update(dtype=dt, program=name, images_per_s=args.batch / r["s_per_iter"], peak_tflops=peak,
                     peak_source=peak_src)
            r["tflops_achieved"] = r["flops"] / r["s_per_iter"] / 1e12 if r["flops"] else None
            r["mfu"] = r["tflops_achieved"] / peak if (peak and r["tflops_achieved"]) else None
            rows.append(r)
            print(f"  {r['images_per_s']:.3g} images/s, compile {r['compile_s']:.1f} s, "
                  f"{(r['flops'] or 0) / 1e9:.1f} GFLOP/call", flush=True)
    checks = {}
    if "float32" in outs and "bfloat16" in outs:
        checks["max_abs_bf16_vs_f32"] = float(np.max(np.abs(outs["bfloat16"] - outs["float32"])))
    torch_res = None
    if use_torch:
        with tempfile.TemporaryDirectory(prefix="pdjax-bench-unet-") as tmp:
            folder = model.export_diffusers(Path(tmp) / "export")
            runs = []
            for th in [int(v) for v in args.torch_threads.split(",")]:
                print(f"[torch float32, threads={th or 'default'}] ...", flush=True)
                res, arr = torch_reference.call_worker("unet", folder, {"iters": args.iters, "threads": th},
                                                       {"x": x, "t": t}, Path(tmp) / f"w{th}")
                runs.append(res)
                if "float32" in outs:
                    checks["max_abs_pdjax_vs_torch_f32"] = float(np.max(np.abs(outs["float32"] - arr["eps"])))
            torch_res = {"runs": runs}
            for prog in ("forward", "forward_backward"):
                torch_res[prog] = max((r[prog] for r in runs), key=lambda v: v["images_per_s"])
    f32 = {r["program"]: r for r in rows if r["dtype"] == "float32"}
    print()
    print("| dtype | program | images/s | compile s | GFLOP/call | TFLOP/s | MFU | pdjax temp MiB | peak MiB "
          "| torch f32 images/s | pdjax/torch | vs pdjax f32 |")
    print("|" + "|".join("---" for _ in range(12)) + "|")
    for r in rows:
        tr = torch_res[r["program"]] if torch_res else None
        ratio = r["images_per_s"] / tr["images_per_s"] if tr else None
        vs32 = r["images_per_s"] / f32[r["program"]]["images_per_s"] if r["program"] in f32 else None
        r["ratio_vs_torch"], r["ratio_vs_pdjax_f32"] = ratio, vs32
        temp = r["memory"].get("temp_size_in_bytes")
        peak_mib = r["peak_bytes"] / 2**20 if r["peak_bytes"] else r["peak_rss_mb"]
        f = lambda v, s: "-" if v is None else format(v, s)  # noqa: E731
        print(f"| {r['dtype']} | {r['program']} | {r['images_per_s']:.3g} | {r['compile_s'] + r['trace_lower_s']:.1f} "
              f"| {f((r['flops'] or None) and r['flops'] / 1e9, '.2f')} | {f(r['tflops_achieved'], '.3f')} "
              f"| {f(r['mfu'] and 100 * r['mfu'], '.1f')}{'%' if r['mfu'] else ''} "
              f"| {f(temp and temp / 2**20, '.0f')} | {peak_mib:.0f} | {f(tr and tr['images_per_s'], '.3g')} "
              f"| {f(ratio, '.2f')} | {f(vs32, '.2f')} |")
    print(f"\npeak used for MFU: {rows[0]['peak_source'] if rows else '-'}; peak MiB: "
          f"{'device peak_bytes_in_use' if rows and rows[0]['peak_bytes'] else 'process peak RSS so far (VmHWM)'}")
    if torch_res:
        print("torch: " + "; ".join(f"threads={r['threads']}: fwd {r['forward']['images_per_s']:.1f}, "
                                    f"fwd+bwd {r['forward_backward']['images_per_s']:.1f} images/s, "
                                    f"peak RSS {r['max_rss_mb']:.0f} MiB" for r in torch_res["runs"]))
    for k, v in checks.items():
        print(f"{k} = {v:.2e}")
    if args.json:
        write_json(args.json, {"environment": env, "args": vars(args), "params": nparams, "rows": rows,
                               "torch": torch_res, "checks": checks})


if __name__ == "__main__":
    main()
