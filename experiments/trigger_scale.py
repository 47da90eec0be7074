"""ASR of inverted triggers at several scales: is an inverted trigger's direction right but its size not?

Command (the probe quoted in experiments/results/inversion_table.md):

    python experiments/trigger_scale.py zoo/bd_box_x runs/inversion/triggers/pd/bd_box_x.npy \\
        runs/inv_pd_zeros/trigger.npy --scales 1 1.25 1.5 2

For each trigger file (an [H, W, C] .npy from ``pdjax invert`` or experiments/inversion_table.py) and each
scale s, it draws ``--n`` generations (default 32) from eps + s * trigger (DDPM; ``--start ddim`` for the
DDIM-100 sampler of ODE-trained models). All candidates are drawn in
one paired call, with the same start and chain noise for every candidate (key ``jax.random.key(7)``, as
inversion_table.py uses). It prints the ASR against the model's recorded target (SPEC 7), the
trigger's L2 norm, and where the trigger lies: its L2 norm and mean inside the true trigger's mask and its
largest absolute value outside it, with the true trigger's row first for reference.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("triggers", nargs="+", help=".npy trigger files")
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.25, 1.5, 2.0])
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--start", default="ddpm", help="start of the generations, SAMPLER[@NOISE_SCALE] (default ddpm; "
                    "ddim for ODE-trained models)")
    args = ap.parse_args(argv)

    from pdjax import cpu_runtime

    cpu_runtime.enable()
    from inversion_table import _scorer
    from pdjax.backdoor.train import build_arrays, spec_from_model
    from pdjax.data import load_digits_with_labels
    from pdjax.defense.evaluate import Start, triggered_generations
    from pdjax.model import load

    model = load(args.model)
    spec = spec_from_model(model)
    data, labels = load_digits_with_labels(model.image_shape[0], model.image_shape[2])
    arrays = build_arrays(spec, model.image_shape, data, labels)
    names, trigs = ["true trigger"], [np.asarray(arrays.trigger, np.float32)]
    for path in args.triggers:
        t = np.load(path).astype(np.float32)
        for s in args.scales:
            names.append(f"{path} x {s:g}")
            trigs.append(s * t)
    gens = triggered_generations(model, np.stack(trigs), jax.random.key(7), n=args.n, start=Start.parse(args.start))
    print(f"{args.model} ({spec.trigger} -> {spec.target}), n = {args.n}, key 7, start {args.start}")
    score = _scorer(model, arrays, data, labels)
    inside = np.broadcast_to(np.asarray(arrays.mask) > 0, trigs[0].shape)
    for name, t, g in zip(names, trigs, gens):
        print(f"  {name:<60} ASR {score(g)['asr']:.2f}   |trigger| {np.linalg.norm(t):6.2f}   "
              f"in the true mask: |.| {np.linalg.norm(t[inside]):5.2f}, mean {t[inside].mean():+.2f}; "
              f"max |value| outside {np.abs(t[~inside]).max() if (~inside).any() else 0.0:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
