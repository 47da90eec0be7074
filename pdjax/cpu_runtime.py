"""XLA:CPU settings for speed: YNNPACK kernels and one XLA device per core (issue 7 fast paths).

Two settings, both carried by ``XLA_FLAGS`` and so only effective before JAX starts its backend:

- **YNNPACK kernels.** XLA:CPU's own convolution emitter is slow for the small-channel convolutions of a
  DDPM UNet; jaxlib (>= 0.10) can hand individual convolutions and dot products to YNNPACK
  (``--xla_cpu_experimental_ynn_fusion_type``, :data:`YNN_FLAG`). Results agree with the default kernels
  to float32 rounding and are deterministic. ``$PDJAX_CPU_KERNELS=xla`` keeps XLA's own kernels.
- **One host device per core** (default). ``$PDJAX_CPU_DEVICES=N`` (default ``auto``: one per core the
  process may use, at most 8; ``1`` turns it off) sets ``--xla_force_host_platform_device_count``. pdjax
  then runs a sampling call's batch split over the devices (:func:`pdjax.sharding.batch_parallel`, same
  generations to float rounding) and an audit splits its stacked models over them. XLA:CPU's single
  device leaves the second core nearly idle on these small convolutions: split over two devices, a
  digits-16 DDPM chain ran 1.94x faster than on one (docs/performance.md, section 4).

Both are measured by ``experiments/bench_cpu_runtime.py`` (docs/performance.md): on the idle 2-core CPU,
YNNPACK made the digits-16 UNet forward 1.35x faster, and with two devices a DDPM chain ran 2.25x, the
scan's inversion 1.62x and training 1.25x faster than XLA's own kernels on one device.
The ``pdjax`` command calls :func:`enable` first thing; library users may call it before their first JAX
computation. Flags the user already put in ``XLA_FLAGS`` win. On a GPU or TPU machine the flags are
parsed and affect only the (unused) host platform.
"""

from __future__ import annotations

import os

from pdjax.errors import ConfigError

KERNELS_ENV = "PDJAX_CPU_KERNELS"
DEVICES_ENV = "PDJAX_CPU_DEVICES"
KERNELS = ("ynn", "xla")
YNN_FLAG = ("--xla_cpu_experimental_ynn_fusion_type="
            "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT")
DEVICE_FLAG = "--xla_force_host_platform_device_count"
MAX_DEVICES = 8
MIN_JAXLIB = (0, 10)


def kernels() -> str:
    """``$PDJAX_CPU_KERNELS`` (default "ynn")."""
    value = os.environ.get(KERNELS_ENV, "ynn").strip().lower() or "ynn"
    if value not in KERNELS:
        raise ConfigError(f"{KERNELS_ENV}={value!r} is not one of {', '.join(KERNELS)}; unset it for the default")
    return value


def device_count() -> int:
    """``$PDJAX_CPU_DEVICES``: a count >= 1, or "auto" (the cores this process may use, at most
    :data:`MAX_DEVICES`); default "auto"."""
    value = os.environ.get(DEVICES_ENV, "").strip().lower() or "auto"
    if value == "auto":
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cores = os.cpu_count() or 1
        return max(1, min(MAX_DEVICES, cores))
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"{DEVICES_ENV}={value!r} must be a whole number >= 1 or 'auto'; unset it for one device per core")
    return n


def _jaxlib_supports_ynn() -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return tuple(int(p) for p in version("jaxlib").split(".")[:2]) >= MIN_JAXLIB
    except (PackageNotFoundError, ValueError):
        return False


def enable(ynn: bool = True, devices: bool = True) -> list[str]:
    """Add the YNNPACK flag and/or the host device count to ``XLA_FLAGS``; returns the flags added.

    Nothing is added once JAX's backend is running (XLA_FLAGS are read only at its start), for a setting
    the user already chose in ``XLA_FLAGS``, or when switched off by the environment variables above.
    """
    from jax._src import xla_bridge

    ynn = ynn and kernels() == "ynn"
    n = device_count() if devices else 1
    if xla_bridge.backends_are_initialized():
        return []
    flags = os.environ.get("XLA_FLAGS", "")
    added = []
    if ynn and "ynn_fusion_type" not in flags and _jaxlib_supports_ynn():
        added.append(YNN_FLAG)
    if n > 1 and DEVICE_FLAG not in flags:
        added.append(f"{DEVICE_FLAG}={n}")
    if added:
        os.environ["XLA_FLAGS"] = " ".join([flags, *added]).strip()
    return added


__all__ = ["DEVICES_ENV", "KERNELS", "KERNELS_ENV", "YNN_FLAG", "device_count", "enable", "kernels"]
