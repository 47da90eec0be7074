"""pdjax checkpoints: orbax-checkpoint arrays plus JSON metadata, saved atomically.

Layout of a checkpoint folder ``DST``::

    DST/pdjax.json        pointer + metadata: {"format": "pdjax", "version": 1, "current": "v000003", "meta": {...}}
    DST/v000003/params/   orbax StandardCheckpointer tree (model params)
    DST/v000003/state/    optional extra tree (optimiser state, EMA, step, PRNG key) for resuming training

A save writes a complete new ``vNNNNNN`` folder, then replaces ``pdjax.json`` with ``os.replace`` (atomic
on POSIX), then deletes older versions. An interrupted save leaves ``pdjax.json`` pointing at the previous
complete version, so the checkpoint stays usable. ``meta`` holds the model config, the schedule and the
provenance (data, steps, seed, and attack/trigger/target when known).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np

from pdjax.errors import CheckpointError

FORMAT, VERSION = "pdjax", 1
POINTER = "pdjax.json"
_RESAVE = "re-save it, or convert the source model again"  # the fix named by every damaged-checkpoint error


def is_checkpoint(path: str | Path) -> bool:
    """True if ``path`` is a pdjax checkpoint folder (has pdjax.json)."""
    return (Path(path) / POINTER).is_file()


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def _to_numpy(tree):
    return jax.tree_util.tree_map(lambda x: np.asarray(x), tree)


def read_pointer(path: str | Path) -> dict[str, Any]:
    """The parsed pdjax.json of a checkpoint; CheckpointError if missing, malformed or of another format."""
    path = Path(path)
    ptr = path / POINTER
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if not ptr.is_file():
        raise CheckpointError(f"{path} is not a pdjax checkpoint (no {POINTER}); "
                              "convert a diffusers folder with `pdjax convert SRC DST`")
    try:
        data = json.loads(ptr.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{ptr} is not valid JSON; the checkpoint is damaged: {_RESAVE}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or "current" not in data:
        raise CheckpointError(f"{ptr} is not a pdjax checkpoint pointer; the checkpoint is damaged: {_RESAVE}")
    if data.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} was written by a newer pdjax (format version {data['version']}); upgrade pdjax")
    return data


def save(path: str | Path, params, meta: dict[str, Any], state=None, keep: int = 1) -> Path:
    """Atomically save ``params`` (and an optional resumable ``state`` tree) with JSON ``meta``.

    Args:
      path: checkpoint folder (created if needed; relative paths are made absolute).
      params: params pytree (any arrays; saved as float32/int as given).
      meta: JSON-serialisable metadata (model config, schedule, provenance).
      state: optional pytree saved beside params (e.g. training state for resume).
      keep: how many complete versions to keep (older ones are deleted after the pointer moves).
    Returns the absolute checkpoint path.
    """
    path = Path(path).absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
        json.dumps(meta)
    except OSError as e:
        raise CheckpointError(f"cannot create checkpoint folder {path} ({e.strerror}); choose a writable path") from None
    except TypeError as e:
        raise CheckpointError(f"checkpoint metadata is not JSON-serialisable ({e})") from None
    versions = sorted(p.name for p in path.glob("v[0-9]*") if p.is_dir())
    number = int(versions[-1][1:]) + 1 if versions else 0
    name = f"v{number:06d}"
    tmp = path / f".{name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    with _checkpointer() as ckpt:
        ckpt.save(tmp / "params", _to_numpy(params))
        if state is not None:
            ckpt.save(tmp / "state", _to_numpy(state))
        ckpt.wait_until_finished()
    os.replace(tmp, path / name)
    pointer = {"format": FORMAT, "version": VERSION, "current": name, "meta": meta}
    ptr_tmp = path / f".{POINTER}.partial"
    ptr_tmp.write_text(json.dumps(pointer, indent=2))
    os.replace(ptr_tmp, path / POINTER)
    for old in sorted(p for p in path.glob("v[0-9]*") if p.is_dir() and p.name != name)[: max(0, len(versions) + 1 - keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def read_meta(path: str | Path) -> dict[str, Any]:
    """The metadata dict of a checkpoint (cheap: reads only pdjax.json)."""
    return read_pointer(path).get("meta", {})


def _is_closed_loop_noise(unraisable) -> bool:
    """True for the 'Event loop is closed' RuntimeError of a tensorstore read that finished after a failed restore."""
    exc = unraisable.exc_value
    return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


def _silence_aborted_reads() -> None:
    """After a failed orbax restore, drop the late 'Event loop is closed' noise of its other reads.

    orbax reads all arrays concurrently inside ``asyncio.run``; when one read fails (a truncated file) the
    loop is closed while tensorstore still completes the other reads, and each completion reports
    ``RuntimeError('Event loop is closed')`` through ``sys.unraisablehook``: dozens of tracebacks printed
    after the one-line error, at a random later moment. The error itself is already reported as a
    :class:`CheckpointError`; this wraps the current hook to drop exactly that message (nothing else).
    """
    import sys

    hook = sys.unraisablehook
    if getattr(hook, "_pdjax_drops_closed_loop", False):
        return

    def drop_closed_loop(unraisable):
        if not _is_closed_loop_noise(unraisable):
            hook(unraisable)

    drop_closed_loop._pdjax_drops_closed_loop = True
    sys.unraisablehook = drop_closed_loop


def _restore_tree(folder: Path, target=None):
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is missing; the checkpoint is incomplete: {_RESAVE}")
    try:
        with _checkpointer() as ckpt:
            return ckpt.restore(folder, target) if target is not None else ckpt.restore(folder)
    except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types for damaged files
        _silence_aborted_reads()
        msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{folder} could not be read ({msg}); the checkpoint is truncated or damaged: "
                              f"{_RESAVE}") from None


def restore(path: str | Path, target=None, with_state: bool = False):
    """Restore ``(params, meta)`` (or ``(params, meta, state)``).

    Args:
      path: checkpoint folder.
      target: optional pytree of ``jax.ShapeDtypeStruct`` (with ``sharding``) to restore onto: shapes are
        checked and arrays are placed on those shardings. Without it, numpy arrays are returned.
      with_state: also restore the resumable state tree (None if the checkpoint has none).
    """
    path = Path(path).absolute()
    ptr = read_pointer(path)
    folder = path / ptr["current"]
    if target is not None:
        check_tree_shapes(_saved_shapes(folder / "params"), target, str(path))
        params = _restore_tree(folder / "params", target)
    else:
        params = _restore_tree(folder / "params")
    meta = ptr.get("meta", {})
    if not with_state:
        return params, meta
    state = _restore_tree(folder / "state") if (folder / "state").is_dir() else None
    return params, meta, state


def _saved_shapes(folder: Path):
    """Shapes of a saved tree from orbax metadata (no array data is read)."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is missing; the checkpoint is incomplete: {_RESAVE}")
    try:
        with _checkpointer() as ckpt:
            meta = ckpt.metadata(folder)
    except Exception as e:  # noqa: BLE001
        _silence_aborted_reads()
        msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{folder} could not be read ({msg}); the checkpoint is truncated or damaged: "
                              f"{_RESAVE}") from None
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    return tree


def check_tree_shapes(tree, expected, source: str) -> None:
    """CheckpointError naming the first missing, extra or mis-shaped leaf of ``tree`` vs ``expected``."""
    got = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}
    want = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(expected)}
    for key in sorted(want):
        if key not in got:
            raise CheckpointError(f"{source}: missing parameter {key}; the weights do not match the model config "
                                  f"(pdjax.json was edited or the save is damaged: {_RESAVE})")
    for key in sorted(got):
        if key not in want:
            raise CheckpointError(f"{source}: unexpected parameter {key}; the weights do not match the model config "
                                  f"(pdjax.json was edited or the save is damaged: {_RESAVE})")
        if tuple(got[key].shape) != tuple(want[key].shape):
            raise CheckpointError(f"{source}: parameter {key} has shape {tuple(got[key].shape)}, "
                                  f"expected {tuple(want[key].shape)}; the weights do not match the model config "
                                  f"({_RESAVE})")
