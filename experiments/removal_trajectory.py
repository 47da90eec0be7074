"""How a removal unfolds: ASR and label-free clean-sample quality every few hundred fine-tuning steps.

`pdjax clean` reports the model before and after. This runs the same removal (:func:`pdjax.removal.removal_loss`,
:class:`pdjax.removal.RemovalConfig` defaults unless given) in segments of ``--every`` steps on one resumable
checkpoint (``pdjax.train.fit(..., stop_after=every)``, so the run is the one `pdjax clean` makes) and after each
segment scores the cleaned-so-far model: ASR with the attack's own trigger, target and sampler (SPEC 7, n =
``--n``, key fold_in(seed, 12)), and on the removal's clean generations (key fold_in(seed, 11), n = ``--n``) the
MSE to the original's and :func:`pdjax.removal.clean_quality` (uniformity; mean squared distance to the nearest
training image). Labels are used for the ASR only.

Commands (removal_table.md, "Label-free quality"; the last two vary one setting each):

    T=runs/ho11-audit-nofallback/evidence/ho11_villan_ode_stop9_corner-5e68f131/trigger.npy
    python experiments/removal_trajectory.py zoo/ho11_villan_ode_stop9_corner --trigger $T --out runs/removal-trajectory/stop9 --json experiments/results/removal_trajectory_stop9.json
    python experiments/removal_trajectory.py zoo/ho11_villan_ode_stop9_corner --trigger $T --warmup 100 --out runs/removal-trajectory/stop9_wu100 --json experiments/results/removal_trajectory_stop9_wu100.json
    python experiments/removal_trajectory.py zoo/ho11_villan_ode_stop9_corner --trigger $T --clean-weight 5 --out runs/removal-trajectory/stop9_cw5 --json experiments/results/removal_trajectory_stop9_cw5.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv=None) -> int:
    from pdjax.removal import RemovalConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, help="a backdoored model folder with its attack in the metadata")
    ap.add_argument("--trigger", type=Path, required=True, help="the removal trigger (.npy)")
    ap.add_argument("--out", type=Path, required=True, help="checkpoint folder (resumable)")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--lr", type=float, default=RemovalConfig.lr)
    ap.add_argument("--warmup", type=int, default=RemovalConfig.warmup_steps, help="linear warm-up steps")
    ap.add_argument("--clean-weight", type=float, default=RemovalConfig.clean_weight)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from pdjax import cpu_runtime

    cpu_runtime.enable()
    import numpy as np

    from pdjax.backdoor.train import spec_from_model
    from pdjax.data import load_digits_with_labels
    from pdjax.model import load
    from pdjax.removal import clean_quality, config_loss, load_delta, report_asr, report_generations
    from pdjax.train import fit

    model = load(args.model)
    spec = spec_from_model(model)
    data, labels = load_digits_with_labels(model.image_shape[0], model.image_shape[2])
    delta = load_delta(args.trigger, model.image_shape)
    cfg = RemovalConfig(steps=args.steps, lr=args.lr, warmup_steps=args.warmup, clean_weight=args.clean_weight,
                        seed=args.seed, n=args.n, checkpoint_every=args.every)
    loss = config_loss(model, delta, cfg)
    before = report_generations(model, cfg)

    def score(m, step: int, seconds: float) -> dict:
        x = report_generations(m, cfg)
        asr = report_asr(m, spec, cfg, data, labels)[0]
        row = {"step": step, "asr": asr, "clean_mse": float(np.mean((x - before) ** 2)), **clean_quality(x, data),
               "train_seconds": seconds}
        print(f"step {step}: ASR {asr:.2f}, clean MSE {row['clean_mse']:.4f}, uniformity {row['uniformity']:.2f}, "
              f"nearest {row['nearest']:.4f}", flush=True)
        return row

    rows = [score(model, 0, 0.0)]
    step = 0
    while step < cfg.steps:
        t0 = time.perf_counter()
        res = fit(model, loss, data, cfg.train_config(), out=args.out, progress=False, stop_after=args.every)
        step = res.steps
        rows.append(score(res.model, step, time.perf_counter() - t0))
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "trigger": str(args.trigger),
                                         "attack": spec.to_dict(), "config": cfg.to_dict(), "rows": rows}, indent=1)
                             + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
