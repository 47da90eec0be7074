"""Persistent compilation cache: the same ``pdjax invert`` twice in fresh processes, cold vs warm cache.

Command:

    python experiments/bench_compile_cache.py [--preset tiny] [--steps 3] [--K 2] [--batch 4]

Saves a random model of ``--preset`` (seed 0, 50-step schedule), then runs ``pdjax invert`` (purediffusion)
twice as separate processes with ``PDJAX_CACHE_DIR`` pointing at a new empty folder: the first run compiles
and fills the cache, the second loads from it. Prints both wall times, their ratio and whether the two
triggers are byte-identical. Runtime: about a minute for the tiny preset on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--K", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()
    from pdjax.testing import random_model

    work = Path(tempfile.mkdtemp(prefix="pdjax-cc-"))
    random_model(args.preset, seed=0, timesteps=50).save(work / "model")
    env = {**os.environ, "PDJAX_CACHE_DIR": str(work / "xla")}
    times = []
    for run in (1, 2):
        cmd = [sys.executable, "-m", "pdjax.cli", "invert", str(work / "model"), "--method", "purediffusion",
               "--steps", str(args.steps), "--K", str(args.K), "--batch", str(args.batch),
               "--out", str(work / f"inv{run}"), "--quiet"]
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    same = filecmp.cmp(work / "inv1" / "trigger.npy", work / "inv2" / "trigger.npy", shallow=False)
    entries = len(list((work / "xla").iterdir()))
    print(f"preset {args.preset}, purediffusion steps {args.steps}, K {args.K}, batch {args.batch}")
    print(f"cold cache: {times[0]:.1f} s   warm cache: {times[1]:.1f} s   cold/warm: {times[0] / times[1]:.2f}x   "
          f"cache entries: {entries}   same trigger: {same}")


if __name__ == "__main__":
    main()
