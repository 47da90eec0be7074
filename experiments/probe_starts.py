"""Which standard start and sampler makes a zoo backdoor fire with its true trigger? (issue 5 diagnosis)

Command:

    python experiments/probe_starts.py --zoo zoo --models villan_ode_stop_cat troj_blend_d2i_shoe ...

The scan's generations start from x_T = eps + s * delta and run the DDPM sampler. VillanDiffusion ODE
models are trained for DDIM, and TrojDiff models for x_T = gamma * eps + mu with their own sampler, so
that start may not express their backdoor even with the true trigger. For every model and every
start (sampler DDPM-1000 or DDIM-100, noise scale c: x_T = c * eps + g) this script draws ``--n``
generations from the true trigger g and from no trigger (same noise), and prints the ASR against the
true target (d2i attacks), the uniformity of the triggered generations and its ratio to the clean
ones' (the detector's statistic). For TrojDiff it also tries g = mu = (1 - gamma) * image, the trigger
mean of its trojan start. Seed: ``jax.random.key(--seed)`` (default 3), the same noise for every row.
Output: a markdown table on stdout and in ``--out`` (default runs/probe_starts.md).

``--final-chains 20:0 20:1 ...`` adds a table of the true trigger along short DDIM chains (STEPS:ETA, the
chains L_final can unroll: eta 0 deterministic, 1 stochastic with one chain key for both rows): the
uniformity of generations from eps + g and from eps, and the log of their ratio (L_final's sign).

``--scan-starts ddpm ddim`` then scans each model as ``pdjax scan --starts ddpm ddim`` does (the scan's
PureDiffusion inversion, its size search over those starts, n = 8; key as experiments/detection_eval.py)
and adds a second table: the start and factor the search chose, the uniformity ratio and the inverted
trigger's norm and cosine to the true trigger. ``--lambda`` sets the inversion's lambda source.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import numpy as np

from pdjax.backdoor.train import build_arrays, spec_from_model
from pdjax.defense.evaluate import Start, generation_stats, triggered_generations
from pdjax.model import load


def _digits():
    """(images, labels) of the bundled digits: TrojDiff d2d targets (class:K) are pools of training images."""
    from pdjax.data import load_digits_with_labels

    return load_digits_with_labels(16, 1)


def scan_rows(args) -> list[str]:
    """The scan of every model with the size search over ``--scan-starts``."""
    import dataclasses
    import zlib

    from pdjax.defense.detection import SCAN_INVERSION, Detector, scan_model

    cfg = dataclasses.replace(SCAN_INVERSION, starts=tuple(args.scan_starts), lambda_source=args.lambda_source)
    rows = ["", f"Scan (starts {' '.join(args.scan_starts)}, lambda {args.lambda_source}, n = 8, seed 0):", "",
            "| model | chosen start | factor | uniformity trig / clean | log ratio | trigger norm (true) | cos to true |",
            "|---|---|---|---|---|---|---|"]
    for name in args.models:
        path = str(args.zoo / name)
        model = load(path)
        g = build_arrays(spec_from_model(model), model.image_shape, *_digits()).trigger if "attack" in model.meta \
            else None  # a clean model: no true trigger
        v = scan_model(model, path, jax.random.fold_in(jax.random.key(0), zlib.crc32(path.encode())),
                       Detector.load(), cfg, n=8)
        f, d = v.features, v.trigger.ravel()
        true = "clean" if g is None else f"{np.linalg.norm(g):.2f}"
        cos = "-" if g is None else f"{float(d @ g.ravel() / (np.linalg.norm(d) * np.linalg.norm(g) + 1e-12)):.2f}"
        rows.append(f"| {name} | {v.start} | {f['trigger_scale']:g} | {f['uni_trig']:.3g} / {f['uni_clean']:.3g} | "
                    f"{f['log_uni_ratio']:.3f} | {f['trigger_norm']:.2f} ({true}) | {cos} |")
        print(rows[-1], flush=True)
    return rows


def chain_rows(args) -> list[str]:
    """The true trigger along each ``--final-chains`` STEPS:ETA chain (see the module docstring)."""
    from pdjax.diffusion.samplers import ddim_sample

    rows = ["", f"True trigger along short DDIM chains (n = {args.n}, seed {args.seed}):", "",
            "| model | steps | eta | uniformity trig / clean | log ratio |", "|---|---|---|---|---|"]
    for name in args.models:
        model = load(args.zoo / name)
        g = build_arrays(spec_from_model(model), model.image_shape, *_digits()).trigger
        eps = jax.random.normal(jax.random.key(args.seed), (args.n, *model.image_shape))
        for chain in args.final_chains:
            steps, eta = int(chain.split(":")[0]), float(chain.split(":")[1])
            run = jax.jit(lambda x: ddim_sample(model.eps, model.params, model.schedule, x,  # noqa: B023
                                                jax.random.key(args.seed + 1), num_steps=steps, eta=eta))
            ut, uc = (generation_stats(np.asarray(run(x)))["uniformity"] for x in (eps + g, eps))
            rows.append(f"| {name} | {steps} | {eta:g} | {ut:.3g} / {uc:.3g} | {np.log(ut / uc):+.2f} |")
            print(rows[-1], flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, default=Path("zoo"))
    ap.add_argument("--models", nargs="+", required=True)
    ap.add_argument("--samplers", nargs="*", default=["ddpm", "ddim"], help="none: skip the probe table")
    ap.add_argument("--noise-scales", nargs="+", type=float, default=[1.0, 0.6, 0.3, 0.1])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("runs/probe_starts.md"))
    ap.add_argument("--scan-starts", nargs="*", default=[])
    ap.add_argument("--final-chains", nargs="*", default=[], help="STEPS:ETA chains for the true-trigger table")
    ap.add_argument("--lambda", dest="lambda_source", default="closed-sde")
    args = ap.parse_args()
    from pdjax import cpu_runtime

    cpu_runtime.enable()
    key = jax.random.key(args.seed)
    rows = ["| model | trigger | sampler | noise scale | ASR | uniformity trig / clean | ratio |",
            "|---|---|---|---|---|---|---|"]
    for name in args.models if args.samplers else []:
        model = load(args.zoo / name)
        spec = spec_from_model(model)
        arrays = build_arrays(spec, model.image_shape, *_digits())
        cands = {"g": arrays.trigger}
        if spec.kind == "trojdiff":
            cands["mu"] = arrays.troj_mu_scale(spec)[0]
        target = arrays.target if spec.mode == "d2i" else None
        trigs = np.stack([np.zeros(model.image_shape, np.float32), *cands.values()])
        for sampler in args.samplers:
            for c in args.noise_scales:
                t0 = time.perf_counter()
                gens = triggered_generations(model, trigs, key, n=args.n, start=Start(sampler, c))
                clean = generation_stats(gens[0])
                for (cname, _), x in zip(cands.items(), gens[1:]):
                    st = generation_stats(x, target)
                    a = f"{st['asr']:.2f}" if "asr" in st else "-"
                    rows.append(f"| {name} | {cname} | {sampler} | {c:g} | {a} | {st['uniformity']:.3g} / "
                                f"{clean['uniformity']:.3g} | {st['uniformity'] / clean['uniformity']:.3f} |")
                    print(rows[-1], f"({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.final_chains:
        rows += chain_rows(args)
    if args.scan_starts:
        rows += scan_rows(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
