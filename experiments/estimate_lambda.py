"""Estimate a shipped lambda_t table (SPEC 3) on a backdoored surrogate and write pdjax/assets/lambda/<family>.json.

Command (the shipped BadDiffusion table):

    python experiments/estimate_lambda.py --family baddiffusion --surrogate zoo/bd_box_x --n 256 --steps 100 --seed 0

Other families, once a surrogate exists (the family must match the attack recorded in its metadata):

    python experiments/estimate_lambda.py --family villan-ode --surrogate PATH
    python experiments/estimate_lambda.py --family trojdiff --surrogate PATH

``--out`` writes elsewhere (to compare surrogates without touching the shipped file); ``--every 5`` prints
the per-step table (lambda, closed form, relative error, cos(d_t, g), and lambda over the trigger mask and
over the trigger's -1 background separately).

Runtime: ~130 s on a 2-core CPU for the 16x16 zoo models (n = 256, 100 steps: 200 UNet calls on 512 images).

Measured (zoo/bd_box_x, WHITE_BOX_5 -> X, ASR 0.75; n = 256, seed 0): lambda_999 = 0.551, mean over the
first 50 steps 0.535, against rho_t ~ 0.5025; max relative error vs the closed form over the first 50 steps
10.04% (the issue's target was 2%: NOT met). The deviation is systematic, not sampling noise: seed 1 gives
10.45%, its per-step values within 0.6% of seed 0's, wiggles included. It shrinks along the chain
(t = 949: 3.7%, t = 904: 1.2%). Other 16x16 surrogates (n = 128, first 50 steps): bd_box_x_s2 11.1%,
bd_box_corner (BOX_7, value 0) 14.0%, villan_sde_smbox_shoe after 250 of its 2000 training steps 7.8%.

Why, from the split of lambda over the trigger mask and over its -1 background (``--every``): on the
trigger's own pixels the backdoored models respond with ~0.65 at t = 999 (the clean base: ~1.15), i.e.
the backdoor has only partly replaced the clean response there (between the backdoor's 0.50 and the clean
~1). The -1 background carries 231 of the 256 units of <g, g>, and there even the clean base responds with
only ~0.56 (a near-uniform offset is mostly ignored by the UNet, presumably through its GroupNorms), so the
whole-image lambda is ~0.54 on the backdoored surrogates and ~0.62 on the clean base. The shipped table is
the honest estimate on these small, briefly trained surrogates; ``closed_form_rel_err`` in it records the
deviation. Closer agreement needs a better-trained surrogate (none exists yet).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from pdjax.backdoor.train import build_arrays, spec_from_model
from pdjax.defense.shift import ASSET_DIR, SELF_CHECK_STEPS, _closed_form_for, estimate_lambda, family_of
from pdjax.errors import PdjaxError
from pdjax.model import load

DEFAULT_SURROGATES = {"baddiffusion": "zoo/bd_box_x"}


def _scale(d: np.ndarray, g: np.ndarray, sel: np.ndarray) -> float:
    """<d, g>/<g, g> restricted to the values ``sel`` (nan where g vanishes there)."""
    gg = float(g[sel] @ g[sel])
    return float(d[sel] @ g[sel]) / gg if gg > 0 else float("nan")


def per_step_report(model, spec, table, profile, every: int) -> None:
    """Prints lambda_t, the closed form, the relative error, cos(d_t, g), and lambda over mask / background."""
    closed = _closed_form_for(spec, model.schedule)
    g = profile.g.reshape(-1)
    mask = build_arrays(spec, model.image_shape).mask.reshape(-1) > 0
    print(f"{'step':>4} {'t':>4} {'lambda':>7} {'closed':>7} {'rel.err':>7} {'cos':>6} {'mask':>7} {'backgr.':>7}")
    for i in range(0, len(table), every):
        t, lam = table.timesteps[i], table.lambdas[i]
        ref = np.nan if closed is None else closed[t]
        d = profile.mean_shift[i].reshape(-1)
        print(f"{i:>4} {t:>4} {lam:>7.4f} {ref:>7.4f} {abs(lam - ref) / ref:>7.2%} {table.alignment[i]:>6.3f} "
              f"{_scale(d, g, mask):>7.4f} {_scale(d, g, ~mask):>7.4f}")
    print(f"trigger mask: {mask.sum()} of {mask.size} values; <g, g> = {g[mask] @ g[mask]:.0f} over the mask, "
          f"{g[~mask] @ g[~mask]:.0f} over the background")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", default="baddiffusion", help="baddiffusion | villan-sde | villan-ode | trojdiff")
    p.add_argument("--surrogate", help="backdoored checkpoint of that family (default: zoo/bd_box_x for baddiffusion)")
    p.add_argument("--trigger", help="override the trigger recorded in the surrogate's metadata")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help=f"table to write (default {ASSET_DIR}/<family>.json)")
    p.add_argument("--every", type=int, default=0, help="print every k-th step of the table (0: summary only)")
    args = p.parse_args(argv)
    try:
        surrogate = args.surrogate or DEFAULT_SURROGATES.get(args.family)
        if surrogate is None:
            raise PdjaxError(f"no default surrogate for {args.family!r}; pass --surrogate PATH")
        model = load(surrogate)
        if "attack" not in model.meta and args.trigger is None:
            raise PdjaxError(f"{surrogate} records no attack; pass --trigger")
        spec = spec_from_model(model, trigger=args.trigger)
        if family_of(spec) != args.family:
            raise PdjaxError(f"{surrogate} is a {family_of(spec)!r} model, not {args.family!r}; pass a surrogate of "
                             "that family (a table is only valid for its own attack family)")
        t0 = time.time()
        table, profile = estimate_lambda(model, spec, args.seed, n=args.n, num_steps=args.steps,
                                         source=str(surrogate), return_profile=True)
        out = table.save(args.out or ASSET_DIR / f"{table.family}.json")
    except PdjaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"estimated in {time.time() - t0:.0f} s on {surrogate} (trigger {spec.trigger}, n={args.n}, "
          f"seed {args.seed})")
    if args.every:
        per_step_report(model, spec, table, profile, args.every)
    err = table.closed_form_rel_err
    verdict = "no closed form" if err is None else f"max relative error vs closed form over the first " \
        f"{SELF_CHECK_STEPS} steps: {err:.2%}"
    print(f"{table.summary()}\n{verdict}\nwrote {Path(out).absolute()} ({Path(out).stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
