"""PyTorch eager reference implementations for the pdjax benchmarks (needs the optional torch extra).

Straightforward diffusers + torch code, written from SPEC 4 and not from pdjax's source, against which
``experiments/bench_inversion.py`` and ``experiments/bench_unet.py`` measure pdjax in the same run:

- :func:`elijah_loss` / :func:`purediffusion_loss`: the inversion losses on a ``diffusers.UNet2DModel``
  (NCHW), with the DDPM chain noise passed in (so pdjax and torch see the same numbers);
- :func:`run_inversion`: Adam (lr 0.1 by default) over delta for a number of steps, timing each step;
- :func:`run_unet`: forward and forward+backward (w.r.t. the weights) throughput of the UNet.

Install: ``pip install torch==2.13.0 diffusers`` (the CPU build; the ``torch`` extra of pyproject.toml).
The benchmarks call this file as a worker subprocess, so torch never shares a process (threads, allocator,
max RSS) with JAX:

    python experiments/torch_reference.py inversion SPEC_DIR    # reads SPEC_DIR/spec.json + inputs.npz
    python experiments/torch_reference.py unet SPEC_DIR

and it writes ``SPEC_DIR/result.json`` (+ ``result.npz`` for arrays). Runtime: that of the benchmark
step counts it is given (seconds for the digits-16 size on 2 CPU cores, minutes for the cifar10 size).
It runs on CUDA when ``torch.cuda.is_available()`` (a CUDA build of torch), else on the CPU.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import numpy as np


def _torch():
    import importlib

    try:
        torch = importlib.import_module("torch")
        importlib.import_module("diffusers")
    except ImportError as e:  # pragma: no cover - depends on the optional extra
        raise SystemExit(f"error: {e.name} is not installed; pip install torch==2.13.0 diffusers") from None
    return torch


def device_name() -> str:
    torch = _torch()
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_unet(folder: str, device: str, dtype=None):
    """diffusers UNet2DModel from a folder written by ``Model.export_diffusers``, in eval mode."""
    _torch()  # a clear error when the optional extra is missing
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_pretrained(folder).to(device)
    if dtype is not None:
        unet = unet.to(dtype)
    unet.eval()
    return unet


def _sync(device: str) -> None:
    torch = _torch()
    if device == "cuda":
        torch.cuda.synchronize()


def _eps(unet, x, t: int):
    torch = _torch()
    tb = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
    return unet(x, tb).sample


def elijah_loss(unet, delta, noise, T: int, lam: float):
    """SPEC 4 Elijah: mean | mean_b eps(noise_b + delta, T-1) - lam * delta |. delta [1, C, H, W]."""
    e = _eps(unet, noise + delta, T - 1)
    return (e.mean(dim=0, keepdim=True) - lam * delta).abs().mean()


def purediffusion_loss(unet, delta, noise, zs, sched: dict, lambdas, K: int, norm: str = "l1",
                       shift_weight: float = 1.0, cons_weight: float = 0.0, cons_batch: int = 8,
                       variance_type: str = "fixed_large", clip_sample: bool = False):
    """SPEC 4 PureDiffusion: K DDPM steps from noise + delta with gradients through the chain.

    L_shift = mean_i norm(mean_b eps(x_{t_i}, t_i) - lambda_i delta); L_cons = mean_i of the mean pairwise
    squared distance of s = x_t - sqrt(1 - abar_t) eps_hat over the first ``cons_batch`` samples;
    L = (shift_weight * sum_i shift_i + cons_weight * sum_i cons_i) / K. ``zs`` [K, B, C, H, W] is the
    ancestral noise of step i; ``sched`` holds the schedule's float32 arrays (torch tensors).
    """
    T = sched["betas"].shape[0]
    x = noise + delta
    shift = cons = 0.0
    for i in range(K):
        t = T - 1 - i
        e = _eps(unet, x, t)
        beta, s1m = sched["betas"][t], sched["sqrt_one_minus_abar"][t]
        if clip_sample:
            x0 = ((x - s1m * e) / sched["sqrt_abar"][t]).clamp(-1.0, 1.0)
            mean = sched["posterior_mean_coef1"][t] * x0 + sched["posterior_mean_coef2"][t] * x
        else:
            mean = (x - (beta / s1m) * e) / sched["alphas"][t].sqrt()
        var = beta if variance_type == "fixed_large" else sched["posterior_variance"][t].clamp_min(1e-20)
        x_next = mean + (var.sqrt() * zs[i] if t > 0 else 0.0)
        if shift_weight:
            r = e.mean(dim=0, keepdim=True) - lambdas[i] * delta
            shift = shift + (r.abs().mean() if norm == "l1" else (r * r).mean())
        if cons_weight:
            s = x[:cons_batch] - s1m * e[:cons_batch]
            b = s.shape[0]
            cons = cons + 2.0 * b / (b - 1) * s.var(dim=0, unbiased=False).mean()
        x = x_next
    return (shift_weight * shift + cons_weight * cons) / K


def run_inversion(folder: str, spec: dict, arrays: dict, device: str | None = None) -> tuple[dict, dict]:
    """Adam over delta for ``spec['steps']`` steps after one discarded warm-up step.

    ``arrays`` (NHWC numpy, as pdjax uses): noise [B,H,W,C], delta0 [H,W,C], zs [K,B,H,W,C] (purediffusion),
    lambdas [K], and the schedule arrays. Returns (scalars, arrays): step times, losses, final delta (NHWC).
    """
    torch = _torch()
    device = device or device_name()
    torch.manual_seed(0)
    rss0 = _rss_mb()
    t_load = time.perf_counter()
    unet = load_unet(folder, device)
    unet.requires_grad_(False)  # pdjax differentiates w.r.t. delta only: so does the reference
    load_s = time.perf_counter() - t_load
    nchw = lambda a: torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, -3))).to(device)  # noqa: E731
    noise = nchw(arrays["noise"])
    delta0 = nchw(arrays["delta0"][None])
    method = spec["method"]
    if method == "elijah":
        T = int(spec["T"])
        loss_fn = lambda d: elijah_loss(unet, d, noise, T, float(spec["elijah_lambda"]))  # noqa: E731
    elif method == "purediffusion":
        zs = nchw(arrays["zs"])
        sched = {k[6:]: torch.from_numpy(arrays[k]).to(device) for k in arrays if k.startswith("sched_")}
        lambdas = torch.from_numpy(arrays["lambdas"]).to(device)
        loss_fn = lambda d: purediffusion_loss(  # noqa: E731
            unet, d, noise, zs, sched, lambdas, int(spec["K"]), spec["norm"], float(spec["shift_weight"]),
            float(spec["cons_weight"]), int(spec["cons_batch"]), spec["variance_type"], bool(spec["clip_sample"]))
    else:
        raise SystemExit(f"error: the torch reference has no method {method!r}")

    def fresh():
        delta = torch.nn.Parameter(delta0.clone())
        return delta, torch.optim.Adam([delta], lr=float(spec["lr"]))

    def step(delta, opt):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(delta)
        loss.backward()
        opt.step()
        return float(loss.item())  # .item() synchronises, like pdjax's block_until_ready per call

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    delta, opt = fresh()
    t0 = time.perf_counter()
    step(delta, opt)  # warm-up (allocator, oneDNN/cuDNN kernel selection); discarded
    _sync(device)
    warm_s = time.perf_counter() - t0
    delta, opt = fresh()
    times, losses = [], []
    for _ in range(int(spec["steps"])):
        t0 = time.perf_counter()
        losses.append(step(delta, opt))
        _sync(device)
        times.append(time.perf_counter() - t0)
    out = {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads(),
           "load_s": load_s, "warmup_s": warm_s, "step_times": times,
           "s_per_step": float(np.sum(times) / len(times)), "median_s_per_step": float(np.median(times)),
           "rss_before_mb": rss0, "max_rss_mb": _rss_mb()}
    if device == "cuda":
        out["peak_bytes"] = int(torch.cuda.max_memory_allocated())
    d = delta.detach().cpu().numpy()[0]
    return out, {"delta": np.moveaxis(d, 0, -1), "losses": np.asarray(losses, np.float32)}


def run_unet(folder: str, spec: dict, arrays: dict, device: str | None = None) -> tuple[dict, dict]:
    """Forward (no grad) and forward+backward (grad w.r.t. every weight of mean(eps^2)) timings."""
    torch = _torch()
    device = device or device_name()
    unet = load_unet(folder, device)
    x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(arrays["x"], -1, -3))).to(device)
    t = torch.from_numpy(arrays["t"].astype(np.int64)).to(device)
    iters = int(spec["iters"])
    out = {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads()}

    def fwd():
        with torch.no_grad():
            return unet(x, t).sample

    def fwdbwd():
        unet.zero_grad(set_to_none=True)
        loss = unet(x, t).sample.square().mean()
        loss.backward()
        return loss

    for name, fn in (("forward", fwd), ("forward_backward", fwdbwd)):
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        fn()
        _sync(device)
        warm = time.perf_counter() - t0
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
        out[name] = {"warmup_s": warm, "times": times, "s_per_iter": float(np.mean(times)),
                     "images_per_s": x.shape[0] / float(np.mean(times))}
        if device == "cuda":
            out[name]["peak_bytes"] = int(torch.cuda.max_memory_allocated())
    out["max_rss_mb"] = _rss_mb()
    with torch.no_grad():
        ref = unet(x, t).sample.cpu().numpy()
    return out, {"eps": np.moveaxis(ref, -3, -1)}


def _rss_mb() -> float:
    """This process's peak resident set size so far, MiB.

    Linux: ``VmHWM`` of /proc/self/status (per address space; ``getrusage``'s ru_maxrss would carry the
    parent's peak over fork + exec). Elsewhere ru_maxrss (KiB on Linux, bytes on macOS).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def call_worker(mode: str, folder: str, spec: dict, arrays: dict, workdir: str | Path) -> tuple[dict, dict]:
    """Run :func:`run_inversion` / :func:`run_unet` in a fresh Python process; returns its (scalars, arrays)."""
    import subprocess

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "spec.json").write_text(json.dumps({"folder": str(folder), **spec}))
    np.savez(workdir / "inputs.npz", **arrays)
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), mode, str(workdir)],
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"torch worker failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    res = json.loads((workdir / "result.json").read_text())
    with np.load(workdir / "result.npz") as z:
        arr = {k: z[k] for k in z.files}
    return res, arr


def have_torch() -> bool:
    try:
        import importlib.util

        return all(importlib.util.find_spec(m) is not None for m in ("torch", "diffusers"))
    except ValueError:
        return False


def peak_rss_mb() -> float:
    """Peak RSS of the calling process, MiB (see :func:`_rss_mb`)."""
    return _rss_mb()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in ("inversion", "unet"):
        raise SystemExit(__doc__)
    mode, workdir = argv[0], Path(argv[1])
    spec = json.loads((workdir / "spec.json").read_text())
    with np.load(workdir / "inputs.npz") as z:
        arrays = {k: z[k] for k in z.files}
    if int(spec.get("threads", 0)) > 0:
        _torch().set_num_threads(int(spec["threads"]))
    if spec.get("precision") == "highest":  # full float32 convolutions and matmuls on a GPU (no TF32)
        _torch().backends.cudnn.allow_tf32 = False
        _torch().backends.cuda.matmul.allow_tf32 = False
    fn = run_inversion if mode == "inversion" else run_unet
    res, arr = fn(spec["folder"], spec, arrays)
    np.savez(workdir / "result.npz", **arr)
    (workdir / "result.json").write_text(json.dumps(res))


if __name__ == "__main__":
    main()
