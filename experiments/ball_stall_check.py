"""One-off diagnostics behind detection_table.md, last section ("The init"): the ball loss of each held-out model's true
trigger (fixed noise batch of 64, key 0), and BALL_PROBE from a positive start on the in-d2d model.

Command (the numbers quoted there: true trigger -0.165 on zoo/ho2_troj_ind2d_3, +U[0, 1) start -0.207):

    python experiments/ball_stall_check.py      # needs the zoo/ho2_* models (commands in detection_table.md)
"""
import dataclasses

import jax
import numpy as np

from pdjax.defense.detection import BALL_PROBE
from pdjax.defense.inversion import invert
from pdjax.model import load
from pdjax.defense.inversion import problem_of, spread_log_ratio
from pdjax.data import load_digits_with_labels
from pdjax.backdoor.train import build_arrays, spec_from_model
for name in ["ho2_troj_glasses_shoe", "ho2_troj_outd2d_B", "ho2_troj_ind2d_3", "ho2_troj_stop_cat", "ho2_clean_s18"]:
    m = load(f"zoo/{name}")
    prob = problem_of(m, "float32")
    f = jax.jit(spread_log_ratio(prob))
    noise = jax.random.normal(jax.random.key(0), (64, *m.image_shape))
    out = [name]
    if m.meta.get("attack"):
        data, labels = load_digits_with_labels(m.image_shape[0], m.image_shape[2])
        g = np.asarray(build_arrays(spec_from_model(m), m.image_shape, data, labels).trigger)
        n = np.linalg.norm(g)
        out += [f"true |g|={n:.1f} loss={-float(f(m.params, noise, g)):.3f}",
                f"g*10/|g| loss={-float(f(m.params, noise, g * min(1, 10 / n))):.3f}"]
    d = np.array(jax.random.normal(jax.random.key(1), m.image_shape)); d *= 10 / np.linalg.norm(d)
    out.append(f"random norm10 loss={-float(f(m.params, noise, d)):.3f}")
    print(" | ".join(out), flush=True)

# --- a positive start on the in-d2d model (restarts = 1)
m = load("zoo/ho2_troj_ind2d_3")
data, labels = load_digits_with_labels(16, 1)
g = np.asarray(build_arrays(spec_from_model(m), m.image_shape, data, labels).trigger)
print("true g mean", g.mean(), "min", g.min(), "max", g.max(), "frac>0", (g > 0).mean())
cfg = dataclasses.replace(BALL_PROBE, restarts=1)
rng = np.random.default_rng(0)
for name, s in [("pos-uniform", rng.random(m.image_shape).astype(np.float32)),
                ("const+0.6", np.full(m.image_shape, 0.6, np.float32)),
                ("true g", g)]:
    r = invert(m, "purediffusion", jax.random.key(0), cfg, start=s)
    print(name, "final", round(float(r.losses[-1]), 4), "norm", round(float(np.linalg.norm(r.trigger)), 2), "mean", round(float(r.trigger.mean()), 3), flush=True)
