"""One place that decides how a repeated step runs: a ``lax.scan``, an unrolled scan, or a host loop.

On XLA:CPU a backward pass through convolutions inside a ``lax.scan`` body runs many times slower than
the same code outside a loop (DESIGN.md habit 2); forward-only scans are unaffected. So the strategy for
loops that differentiate through the UNet is chosen per backend here, and every caller goes through
:func:`repeat`. All strategies give the same result: a step gets its randomness from ``fold_in(key, i)``,
never from the loop layout. Override with the environment variable ``PDJAX_LOOP=scan|unroll``.
``experiments/bench_loops.py`` measures the choice.
"""

from __future__ import annotations

import os
from typing import Callable, TypeVar

import jax

from pdjax.errors import ConfigError

Carry = TypeVar("Carry")
STRATEGIES = ("scan", "unroll")


def override() -> str | None:
    """The layout ``$PDJAX_LOOP`` asks for (checked), or None when unset."""
    env = os.environ.get("PDJAX_LOOP")
    if env and env not in STRATEGIES:
        raise ConfigError(f"PDJAX_LOOP={env!r}; valid: {', '.join(STRATEGIES)}")
    return env or None


def default_strategy(backend: str | None = None) -> str:
    """``$PDJAX_LOOP`` if set, else ``unroll`` on CPU (fast path for conv backward passes), ``scan`` on GPU/TPU
    (fast compile)."""
    return override() or ("unroll" if (backend or jax.default_backend()) == "cpu" else "scan")


def default_steps_per_call(backend: str | None = None) -> int:
    """Optimiser steps per jitted call: 1 on CPU (an unrolled multi-step program compiles for minutes on
    2 cores: measured 90 s for 5 unrolled UNet steps vs 27 s for one, for a 20% faster step), 10 elsewhere."""
    env = os.environ.get("PDJAX_STEPS_PER_CALL")
    if env:
        return int(env)
    return 1 if (backend or jax.default_backend()) == "cpu" else 10


def repeat(step: Callable[[Carry, jax.Array], tuple[Carry, jax.Array]], carry: Carry, n: int,
           start: jax.Array | int = 0, strategy: str | None = None) -> tuple[Carry, jax.Array]:
    """Run ``carry, out_i = step(carry, i)`` for i = start .. start + n - 1 inside the current trace.

    Returns the final carry and the stacked outputs [n, ...]. ``strategy`` defaults to
    :func:`default_strategy`.
    """
    strategy = strategy or default_strategy()
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown loop strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    idx = jax.numpy.arange(n) + start
    if strategy == "unroll":
        # A Python loop traced once: straight-line code, no while loop for XLA:CPU to slow down.
        outs = []
        for j in range(n):
            carry, out = step(carry, idx[j])
            outs.append(out)
        return carry, jax.tree_util.tree_map(lambda *xs: jax.numpy.stack(xs), *outs)
    return jax.lax.scan(step, carry, idx)
