"""Time the README's main job (`pdjax train` with its defaults) and its sample grid, separately.

Command: python experiments/time_main_job.py [--out runs/main-job-timing]
Defaults as the CLI: digits-16 preset (649k parameters), 1000 steps, batch 32, seed 0, 36 DDPM samples.
Expected on a 2-core CPU: training about 250 s (+ ~25 s compile), sampling about 80 s; final loss ~0.04.
"""

from __future__ import annotations

import argparse
import time

import jax

from pdjax.cli import DEFAULT_TRAIN_OUT, build_parser
from pdjax.data import load_dataset
from pdjax.generate import generate
from pdjax.images import display_scale, save_grid
from pdjax.model import new_model
from pdjax.models.config import PRESETS
from pdjax.train import TrainConfig, train


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=DEFAULT_TRAIN_OUT.replace("digits-ddpm", "main-job-timing"))
    args = ap.parse_args()
    d = build_parser().parse_args(["train"])  # the CLI's own defaults
    model = new_model(PRESETS[d.preset], jax.random.fold_in(jax.random.key(d.seed), 1))
    data = load_dataset(d.data, d.size, d.channels)
    cfg = TrainConfig(steps=d.steps, batch_size=d.batch, lr=d.lr, warmup_steps=d.warmup, seed=d.seed,
                      checkpoint_every=d.checkpoint_every)
    t0 = time.perf_counter()
    res = train(model, data, cfg, out=args.out, progress=False)
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    images = generate(res.model, jax.random.fold_in(jax.random.key(d.seed), 2), d.samples, sampler=d.sampler)
    save_grid(images, f"{args.out}/samples.png", scale=display_scale(images.shape[1]))
    t_sample = time.perf_counter() - t0
    print(f"params={res.model.num_params} steps={res.steps} batch={cfg.batch_size} seed={cfg.seed} "
          f"loss(last 100)={res.losses[-100:].mean():.4f}")
    print(f"training {t_train:.0f} s (loop {res.seconds:.0f} s), sampling {d.samples} x {d.sampler}: {t_sample:.0f} s")


if __name__ == "__main__":
    main()
