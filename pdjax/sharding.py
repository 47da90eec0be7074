"""Batch sharding over the local devices: one program, the batch axis split across devices.

With several devices (GPUs, TPU cores, or one XLA:CPU device per core, see :mod:`pdjax.cpu_runtime`) a
single model's sampling run is data-parallel (:func:`batch_parallel`): the program runs under
``jax.shard_map`` over a 1-D ``"batch"`` mesh, each device taking its slice of the batch, params
replicated. The chain noise is drawn for the whole batch on every device and sliced
(:func:`batch_noise`), so every sample gets the noise it gets unsharded and the generations agree with the
one-device run to float rounding (the kernels round differently at a smaller batch; tests/test_cpu_runtime.py).
Trigger inversion and training split their batch the same way (:func:`batch_slice`, :func:`batch_mean`,
:func:`batch_gather`). On the 2-core CPU a 100-step DDPM chain of 2 x 16 samples took 4.31 s on one device
and 2.22 s on two, where XLA's own partitioning of the same program (the batch placed sharded, ``jax.jit``
propagating it) gained nothing (``experiments/bench_cpu_runtime.py``, docs/performance.md).
Stacked audits split models instead (:func:`pdjax.defense.inversion.shard_models`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

AXIS = "batch"


def batch_mesh(size: int, devices=None):
    """A 1-D mesh named "batch" over the most local devices (> 1) whose count divides ``size``, or None."""
    devices = list(devices if devices is not None else jax.local_devices())
    for d in range(min(len(devices), size), 1, -1):
        if size % d == 0:
            return jax.sharding.Mesh(devices[:d], (AXIS,))
    return None


def _shard():
    """(device count, this device's index) inside a :func:`batch_parallel` program, else None."""
    try:
        return jax.lax.axis_size(AXIS), jax.lax.axis_index(AXIS)
    except NameError:  # not inside a batch-sharded program
        return None


def batch_mean(x: jax.Array, all_axes: bool = False) -> jax.Array:
    """Mean over the batch axis 0 of ``x`` [B, ...] -> [...] (``all_axes``: over every axis -> scalar),
    across devices inside :func:`batch_parallel` (equal slices, so the mean of the slice means)."""
    m = jnp.mean(x) if all_axes else jnp.mean(x, axis=0)
    return m if _shard() is None else jax.lax.pmean(m, AXIS)


def batch_gather(x: jax.Array) -> jax.Array:
    """The whole batch [B, ...] of ``x`` (this device's slice inside :func:`batch_parallel`), in order."""
    return x if _shard() is None else jax.lax.all_gather(x, AXIS, axis=0, tiled=True)


def batch_agree(x: jax.Array) -> jax.Array:
    """``x``, computed identically on every device from :func:`batch_gather`'s output, marked as one value
    for all of them (a mean of equal numbers: exact), so it may be returned replicated."""
    return x if _shard() is None else jax.lax.pmean(x, AXIS)


def batch_slice(tree):
    """This device's rows of every array in ``tree`` (all [B, ...], drawn whole on every device) inside
    :func:`batch_parallel`; ``tree`` itself outside. Losses draw their batch whole (indices, t, noise:
    cheap) and run the model on their slice, so a split run sees the samples an unsplit one does."""
    shard = _shard()
    if shard is None:
        return tree
    n, i = shard

    def take(x):
        if x.shape[0] % n:
            raise ValueError(f"batch_slice: {x.shape[0]} rows do not split over {n} devices")
        rows = x.shape[0] // n
        return jax.lax.dynamic_slice_in_dim(x, i * rows, rows, axis=0)

    return jax.tree.map(take, tree)


def batch_noise(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """``jax.random.normal(key, shape)`` for a batch whose axis 0 may be split by :func:`batch_parallel`.

    Outside such a program this is exactly ``normal(key, shape)``. Inside it, ``shape[0]`` is this device's
    slice: the noise of the whole batch is drawn (the same numbers on every device) and this device's rows
    are returned, so a sharded run draws what the unsharded one does.
    """
    shard = _shard()
    if shard is None:
        return jax.random.normal(key, shape, dtype)
    return batch_slice(jax.random.normal(key, (shape[0] * shard[0], *shape[1:]), dtype))


class Pinned:
    """``fn`` (jitted) called with its arguments first placed as ``specs`` (a tuple of PartitionSpec
    prefixes, one per argument) on ``mesh``. A loop that feeds a program's output back as its input would
    otherwise compile the program twice (once for the first call's one-device arguments, once for the mesh
    shardings its outputs come back with). ``place`` and ``lower`` serve ahead-of-time compilation
    (benchmarks: ``run.lower(*run.place(*args)).compile()`` then called with the placed arguments)."""

    def __init__(self, fn, mesh, specs):
        from jax.sharding import NamedSharding

        self.fn = fn
        self.shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                                      is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
        self._flat: dict = {}  # argument treedef -> one sharding per leaf

    def place(self, *args) -> tuple:
        """``args`` with every array on its sharding; arrays already there (a loop's own outputs, params placed
        once) are passed through without a ``device_put`` call, which costs Python time per leaf on every
        step of a host loop (a UNet's params are some 200 leaves)."""
        leaves, tree = jax.tree.flatten(args)
        if tree not in self._flat:
            self._flat[tree] = jax.tree.leaves(_broadcast_prefix(self.shardings, args))
        targets = self._flat[tree]
        todo = [i for i, (x, s) in enumerate(zip(leaves, targets))
                if not (isinstance(x, jax.Array) and x.sharding == s)]
        if todo:
            placed = jax.device_put([leaves[i] for i in todo], [targets[i] for i in todo])
            for i, x in zip(todo, placed):
                leaves[i] = x
        return jax.tree.unflatten(tree, leaves)

    def lower(self, *args):
        return self.fn.lower(*self.place(*args))

    def __call__(self, *args):
        return self.fn(*self.place(*args))


pinned = Pinned


def _broadcast_prefix(prefix, tree):
    """``prefix`` (a pytree whose leaves are shardings) broadcast to the structure of ``tree``."""
    return jax.tree.map(lambda s, sub: jax.tree.map(lambda _: s, sub), prefix, tree,
                        is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))


_PARALLEL: dict = {}


def batch_parallel(fn, *args, batch_axes: tuple[int | None, ...], size: int, out_axis: int = 0,
                   lead: tuple = (), **static):
    """``fn(*lead, *args, **static)`` run under ``shard_map`` with each arg's batch axis split over the devices.

    Args:
      fn: a (jitted) function of ``args`` whose only cross-sample coupling is :func:`batch_noise`; its
        output is one array or a pytree of arrays, all with the batch on ``out_axis``.
      args: positional arrays or pytrees; ``batch_axes[i]`` is arg i's batch axis, or None (replicated:
        params, schedule, keys).
      size: the batch size; the mesh is :func:`batch_mesh` ``(size)``.
      lead, static: positional and keyword arguments passed through unchanged (an eps function, options;
        hashable: they key the compiled-program cache).

    Falls back to the plain call when no mesh applies or when called while tracing (inside another jit or
    vmap, whose caller decides the sharding).
    """
    mesh = batch_mesh(size)
    if mesh is None or any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(args)):
        return fn(*lead, *args, **static)
    ck = (fn, lead, tuple(batch_axes), out_axis, tuple(sorted(static.items())), mesh)
    if ck not in _PARALLEL:
        from jax.sharding import PartitionSpec as P

        def spec(axis):
            return P() if axis is None else P(*([None] * axis), AXIS)

        specs = tuple(spec(a) for a in batch_axes)
        # pinned: arguments committed to other devices (e.g. params trained data-parallel over more devices
        # than this batch's mesh holds) are moved onto the mesh instead of failing.
        _PARALLEL[ck] = pinned(jax.jit(jax.shard_map(lambda *a: fn(*lead, *a, **static), mesh=mesh,
                                                     in_specs=specs, out_specs=spec(out_axis))), mesh, specs)
    return _PARALLEL[ck](*args)


__all__ = ["AXIS", "batch_agree", "batch_gather", "batch_mean", "batch_mesh", "batch_noise", "batch_parallel", "batch_slice", "pinned"]
