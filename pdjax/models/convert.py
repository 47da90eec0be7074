"""diffusers ``UNet2DModel`` state dicts <-> pdjax params pytrees, strictly.

A diffusers key such as ``down_blocks.1.attentions.0.to_q.weight`` maps to the params path
``down_blocks_1/attentions_0/to_q/kernel``. Conv kernels are OIHW in PyTorch and HWIO here; linear
weights are transposed; GroupNorm weights are Flax ``scale``. Both attention key styles are read:
the current ``to_q/to_k/to_v/to_out.0`` and the deprecated ``query/key/value/proj_attn``. Export always
writes the current style. A missing, extra or mis-shaped key is a CheckpointError naming the key.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from pdjax.errors import CheckpointError, ConfigError
from pdjax.models.config import UNetConfig, read_json

_INDEXED = re.compile(r"^(down_blocks|up_blocks|resnets|attentions|downsamplers|upsamplers|to_out)_(\d+)$")
_OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def torch_key(path: tuple[str, ...]) -> str:
    """Params path -> diffusers state-dict key, e.g. ('conv_in', 'kernel') -> 'conv_in.weight'."""
    parts = []
    for p in path[:-1]:
        m = _INDEXED.match(p)
        parts.extend([m.group(1), m.group(2)] if m else [p])
    parts.append("bias" if path[-1] == "bias" else "weight")
    return ".".join(parts)


def _normalise_key(key: str) -> str:
    """Rename the deprecated attention keys (query/key/value/proj_attn) to the current ones."""
    parts = key.split(".")
    if len(parts) >= 2 and parts[-2] in _OLD_ATTENTION and "attentions" in parts:
        parts[-2:-1] = _OLD_ATTENTION[parts[-2]].split(".")
    return ".".join(parts)


def _to_flax(value: np.ndarray, leaf: str, ndim: int) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 4:
        return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if leaf == "kernel" and value.ndim == 2:
        return value.T
    return value


def _to_torch(value: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 4:
        return value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    if leaf == "kernel" and value.ndim == 2:
        return value.T
    return value


def _flatten(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict) or hasattr(v, "items"):
            yield from _flatten(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _set(tree: dict, path, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def state_dict_to_params(state: dict[str, np.ndarray], cfg: UNetConfig, source: str = "state dict") -> dict:
    """Convert a diffusers UNet2DModel state dict (numpy arrays, PyTorch layout) to a params pytree.

    Raises CheckpointError naming the first missing, unexpected or mis-shaped key.
    """
    from pdjax.models.unet import param_shapes

    state = {_normalise_key(k): v for k, v in state.items()}
    expected = {torch_key(path): (path, leaf) for path, leaf in _flatten(param_shapes(cfg))}
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing:
        raise CheckpointError(f"{source}: missing key {missing[0]!r} ({len(missing)} missing); "
                              "the weights do not match config.json (use the config.json saved with these weights)")
    if extra:
        raise CheckpointError(f"{source}: unexpected key {extra[0]!r} ({len(extra)} unexpected); "
                              "the weights do not match config.json (use the config.json saved with these weights)")
    params: dict = {}
    for key, (path, spec) in expected.items():
        value = np.asarray(state[key])
        if not jnp.issubdtype(value.dtype, jnp.floating):
            raise CheckpointError(f"{source}: key {key!r} has dtype {value.dtype}, expected floating point; "
                                  "these are not model weights (re-export them from diffusers)")
        value = _to_flax(value.astype(np.float32), path[-1], len(spec.shape))
        if tuple(value.shape) != tuple(spec.shape):
            want = _to_torch(np.empty(spec.shape, np.float32), path[-1]).shape
            raise CheckpointError(f"{source}: key {key!r} has shape {tuple(state[key].shape)}, expected {tuple(want)}; "
                                  "the weights do not match config.json (use the config.json saved with these weights)")
        _set(params, path, value)
    return params


def params_to_state_dict(params) -> dict[str, np.ndarray]:
    """Params pytree -> diffusers state dict (float32 numpy, PyTorch layout, current attention names)."""
    return {
        torch_key(path): np.ascontiguousarray(_to_torch(np.asarray(v, np.float32), path[-1]))
        for path, v in _flatten(params)
    }


# --- diffusers folders ----------------------------------------------------------------------------------

def find_model_dir(path: str | Path) -> Path:
    """A diffusers model folder (config.json + weights); a pipeline folder resolves to its ``unet/``."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if path.is_dir() and not (path / "config.json").is_file() and (path / "unet" / "config.json").is_file():
        return path / "unet"
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json; expected a diffusers UNet2DModel folder or a pdjax checkpoint")
    return path


def read_weights(model_dir: Path) -> dict[str, np.ndarray]:
    """Read diffusion_pytorch_model.safetensors, or .bin through torch (weights_only, no pickled code)."""
    st, binf = (model_dir / f for f in WEIGHT_FILES)
    if st.is_file():
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            return load_file(str(st))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{st} is truncated or corrupt ({e}); download it again") from None
    if binf.is_file():
        try:
            import torch
        except (ImportError, OSError) as e:  # not installed, or a broken install (missing shared library)
            why = "torch is not installed" if isinstance(e, ImportError) else "torch could not be imported"
            raise CheckpointError(f"{binf} is a PyTorch pickle and {why}; install the extra "
                                  "`pip install pdjax[torch]` or convert the weights to safetensors") from None
        import pickle
        import warnings

        try:
            with warnings.catch_warnings():  # torch warns about the pickle protocol of non-torch pickles
                warnings.simplefilter("ignore")
                state = torch.load(str(binf), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:  # weights_only refused a global: never rerun it with weights_only=False
            raise CheckpointError(f"{binf} could not be loaded safely: its pickle asks for objects other than tensors "
                                  "(refused, nothing was executed); get the weights as safetensors from a trusted "
                                  "source") from None
        except Exception as e:  # noqa: BLE001 - torch raises many types for bad/unsafe files
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{binf} could not be loaded safely ({first}); the file is truncated or not a "
                                  "PyTorch state dict") from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{binf} does not hold a state dict")
        bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise CheckpointError(f"{binf}: key {bad[0]!r} holds a {type(state[bad[0]]).__name__}, not a tensor")
        return {k: v.detach().float().numpy() for k, v in state.items()}
    raise CheckpointError(f"{model_dir} has no weights: expected {WEIGHT_FILES[0]} (or {WEIGHT_FILES[1]})")


def find_scheduler_config(model_dir: Path) -> dict | None:
    """scheduler_config.json beside the model, in ``../scheduler/`` of a pipeline, or in the parent."""
    for cand in (model_dir / "scheduler_config.json", model_dir.parent / "scheduler" / "scheduler_config.json",
                 model_dir.parent / "scheduler_config.json"):
        if cand.is_file():
            return read_json(cand)
    return None


def load_diffusers(path: str | Path):
    """Read a diffusers UNet2DModel folder: returns (UNetConfig, params, scheduler config dict or None)."""
    model_dir = find_model_dir(path)
    try:
        cfg = UNetConfig.from_diffusers(read_json(model_dir / "config.json"))
    except ConfigError as e:
        raise ConfigError(f"{model_dir / 'config.json'}: {e}") from None
    params = state_dict_to_params(read_weights(model_dir), cfg, source=str(model_dir))
    return cfg, params, find_scheduler_config(model_dir)


def save_diffusers(path: str | Path, cfg: UNetConfig, params, scheduler_config: dict | None = None) -> Path:
    """Write a folder that ``diffusers.UNet2DModel.from_pretrained`` loads (config.json + safetensors)."""
    import json

    from safetensors.numpy import save_file

    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(cfg.to_diffusers(), indent=2))
        save_file(params_to_state_dict(params), str(path / WEIGHT_FILES[0]))
        if scheduler_config is not None:
            (path / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=2))
    except OSError as e:
        raise CheckpointError(f"cannot write diffusers folder {path} ({e.strerror or e}); choose a writable path") from None
    return path
