"""Persistent XLA compilation cache for the ``pdjax`` command (issue 7 fast path).

On a 2-core CPU a UNet program takes 10-150 s to compile and every CLI run is a new process, so without a
cache every ``pdjax scan`` / ``invert`` / ``audit`` pays every compile again. :func:`enable` points JAX's
persistent compilation cache at a folder (``$PDJAX_CACHE_DIR``, default ``~/.cache/pdjax/xla``); programs
that took more than ``min_compile_seconds`` to compile are stored there and loaded by later runs of the same
program on the same backend, jax version and flags. Results are unchanged: the cached executable is the one
XLA compiled. ``PDJAX_CACHE_DIR=off`` (or an empty value) disables it; the tests do that.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "PDJAX_CACHE_DIR"
DEFAULT = Path("~/.cache/pdjax/xla")


def cache_dir() -> Path | None:
    """The folder the CLI caches compiled programs in, or None when disabled by ``$PDJAX_CACHE_DIR``."""
    value = os.environ.get(ENV)
    if value is None:
        return DEFAULT.expanduser()
    if value.strip().lower() in ("", "0", "off", "none", "false"):
        return None
    return Path(value).expanduser()


def enable(path: str | os.PathLike | None = None, min_compile_seconds: float = 1.0) -> Path | None:
    """Turn on JAX's persistent compilation cache in ``path`` (default :func:`cache_dir`).

    Call before the first compile of the process. Returns the folder, or None when disabled or when the
    folder cannot be created (the cache is an optimisation: a read-only home must not stop an audit).
    A folder the user set through ``jax.config`` already is left as it is.
    """
    import jax

    if jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    folder = Path(path).expanduser() if path is not None else cache_dir()
    if folder is None:
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
    return folder


__all__ = ["cache_dir", "enable"]
