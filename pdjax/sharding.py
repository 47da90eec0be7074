"""Batch sharding over the local devices: one program, the batch axis split across devices.

With several devices (GPUs, TPU cores, or one XLA:CPU device per core, see :mod:`pdjax.cpu_runtime`) a
single model's inversion or sampling run is data-parallel: its noise batch is placed with the batch axis
split over a 1-D mesh and ``jax.jit`` partitions the program (params stay replicated). Each sample's
computation is the one it would get unsharded; sums over the batch (the inversion loss) change order, so
results match the one-device run to float rounding, and the same device count gives the same bits.
Stacked audits split models instead (:func:`pdjax.defense.inversion.shard_models`).
"""

from __future__ import annotations

import jax

AXIS = "batch"


def batch_mesh(size: int, devices=None):
    """A 1-D mesh named "batch" over the most local devices (> 1) whose count divides ``size``, or None."""
    devices = list(devices if devices is not None else jax.local_devices())
    for d in range(min(len(devices), size), 1, -1):
        if size % d == 0:
            return jax.sharding.Mesh(devices[:d], (AXIS,))
    return None


def shard_batch(tree, size: int, axis: int = 0):
    """Place every array of ``tree`` (all with ``size`` entries on ``axis``) split over :func:`batch_mesh`.

    Returns ``tree`` unchanged when no mesh applies (one device, or no device count divides ``size``).
    """
    mesh = batch_mesh(size)
    if mesh is None:
        return tree
    from jax.sharding import NamedSharding, PartitionSpec as P

    spec = P(*([None] * axis), AXIS)
    return jax.device_put(tree, NamedSharding(mesh, spec))


__all__ = ["AXIS", "batch_mesh", "shard_batch"]
