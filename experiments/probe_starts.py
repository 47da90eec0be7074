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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, default=Path("zoo"))
    ap.add_argument("--models", nargs="+", required=True)
    ap.add_argument("--samplers", nargs="+", default=["ddpm", "ddim"])
    ap.add_argument("--noise-scales", nargs="+", type=float, default=[1.0, 0.6, 0.3, 0.1])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("runs/probe_starts.md"))
    args = ap.parse_args()
    from pdjax import cpu_runtime

    cpu_runtime.enable()
    key = jax.random.key(args.seed)
    rows = ["| model | trigger | sampler | noise scale | ASR | uniformity trig / clean | ratio |",
            "|---|---|---|---|---|---|---|"]
    for name in args.models:
        model = load(args.zoo / name)
        spec = spec_from_model(model)
        arrays = build_arrays(spec, model.image_shape)
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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
