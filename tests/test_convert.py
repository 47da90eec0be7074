"""diffusers state dicts and folders <-> pdjax params: strict keys, both attention styles, bad files."""

import json
import os
import pickle
import re

import jax
import numpy as np
import pytest

from pdjax.diffusion.schedule import ScheduleConfig
from pdjax.errors import CheckpointError, ConfigError
from pdjax.models.config import PRESETS, UNetConfig
from pdjax.models.convert import (
    WEIGHT_FILES,
    load_diffusers,
    params_to_state_dict,
    save_diffusers,
    state_dict_to_params,
)
from pdjax.testing import random_state_dict

CFG = PRESETS["tiny"]
NEW_TO_OLD = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


@pytest.fixture(scope="module")
def state():
    return random_state_dict(CFG, 0)


@pytest.fixture(scope="module")
def params(state):
    return state_dict_to_params(state, CFG)


def assert_trees_equal(a, b):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def to_old_attention_names(state):
    out = {}
    for k, v in state.items():
        for new, old in NEW_TO_OLD.items():
            if ".attentions." in k and f".{new}." in k:
                k = k.replace(f".{new}.", f".{old}.")
        out[k] = v
    return out


# ------------------------------------------------------------------------------------- state dicts


def test_both_attention_key_styles_give_identical_params(state, params):
    old = to_old_attention_names(state)
    renamed = set(old) - set(state)
    assert any(".proj_attn." in k for k in renamed) and any("mid_block.attentions.0.query" in k for k in renamed)
    assert_trees_equal(state_dict_to_params(old, CFG), params)


def test_missing_key_is_named(state):
    bad = dict(state)
    del bad["mid_block.attentions.0.to_k.bias"]
    with pytest.raises(CheckpointError, match=re.escape("'mid_block.attentions.0.to_k.bias'")):
        state_dict_to_params(bad, CFG)


def test_extra_key_is_named(state):
    bad = dict(state, **{"down_blocks.0.resnets.0.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(CheckpointError, match=re.escape("'down_blocks.0.resnets.0.extra.weight'")):
        state_dict_to_params(bad, CFG)


@pytest.mark.parametrize("key,cut", [("conv_in.weight", 0), ("time_embedding.linear_1.weight", 1),
                                     ("conv_norm_out.bias", 0)])
def test_misshaped_key_is_named(state, key, cut):
    bad = dict(state)
    bad[key] = np.delete(state[key], 0, axis=cut)
    with pytest.raises(CheckpointError, match=re.escape(f"'{key}' has shape")):
        state_dict_to_params(bad, CFG)


def test_hwio_kernel_is_refused(state):
    bad = dict(state)
    bad["conv_out.weight"] = state["conv_out.weight"].transpose(2, 3, 1, 0)  # already-Flax layout
    with pytest.raises(CheckpointError, match="conv_out.weight"):
        state_dict_to_params(bad, CFG)


def test_round_trip_params_state_dict_params_exact(state, params):
    back = params_to_state_dict(params)
    assert set(back) == set(state)
    for k in state:
        assert back[k].dtype == np.float32 and back[k].flags.c_contiguous
        np.testing.assert_array_equal(back[k], state[k], err_msg=k)
    assert_trees_equal(state_dict_to_params(back, CFG), params)


# ---------------------------------------------------------------------------------- diffusers folders


def test_folder_round_trip_with_scheduler_beside(tmp_path, params):
    sched = ScheduleConfig(kind="scaled_linear", beta_end=0.012, num_train_timesteps=500).to_diffusers()
    folder = save_diffusers(tmp_path / "unet", CFG, params, scheduler_config=sched)
    assert (folder / WEIGHT_FILES[0]).is_file() and (folder / "scheduler_config.json").is_file()
    cfg, loaded, sched_back = load_diffusers(folder)
    assert cfg == CFG
    assert_trees_equal(loaded, params)
    assert ScheduleConfig.from_diffusers(sched_back) == ScheduleConfig.from_diffusers(sched)


def test_pipeline_folder_with_scheduler_subfolder(tmp_path, params):
    pipe = tmp_path / "pipe"
    save_diffusers(pipe / "unet", CFG, params)
    (pipe / "scheduler").mkdir()
    (pipe / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "DDPMScheduler", "beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 700,
        "variance_type": "fixed_large", "clip_sample": False,
    }))
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    cfg, loaded, sched = load_diffusers(pipe)
    assert cfg == CFG
    assert_trees_equal(loaded, params)
    sc = ScheduleConfig.from_diffusers(sched)
    assert (sc.kind, sc.num_train_timesteps, sc.variance_type, sc.clip_sample) == \
        ("squaredcos_cap_v2", 700, "fixed_large", False)
    assert sc != ScheduleConfig()


@pytest.mark.parametrize("keep", [0.5, 8, 0])
def test_truncated_safetensors(tmp_path, params, keep):
    folder = save_diffusers(tmp_path / "m", CFG, params)
    f = folder / WEIGHT_FILES[0]
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep) if keep < 1 else int(keep)])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_diffusers(folder)


def test_unknown_block_type_is_config_error(tmp_path, params):
    folder = save_diffusers(tmp_path / "m", CFG, params)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["down_block_types"] = ["DownBlock2D", "CrossAttnDownBlock2D"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="CrossAttnDownBlock2D"):
        load_diffusers(folder)


def test_folder_without_weights(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CFG.to_diffusers()))
    with pytest.raises(CheckpointError, match="has no weights"):
        load_diffusers(folder)


def test_missing_folder_and_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_diffusers(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_diffusers(tmp_path)


def test_weights_of_another_config_name_the_key(tmp_path, params):
    folder = save_diffusers(tmp_path / "m", CFG, params)
    other = UNetConfig(**{**CFG.to_dict(), "layers_per_block": 2})
    (folder / "config.json").write_text(json.dumps(other.to_diffusers()))
    with pytest.raises(CheckpointError, match=r"missing key 'down_blocks\.0\.resnets\.1\."):
        load_diffusers(folder)


def _rewrite_weights(folder, state, dtype):
    from safetensors.numpy import save_file

    save_file({k: v.astype(dtype) for k, v in state.items()}, str(folder / WEIGHT_FILES[0]))


def test_float16_safetensors_load_as_float32(tmp_path, state, params):
    folder = save_diffusers(tmp_path / "m", CFG, params)
    _rewrite_weights(folder, state, np.float16)
    _, loaded, _ = load_diffusers(folder)
    want = jax.tree_util.tree_map(lambda x: x.astype(np.float16).astype(np.float32), params)
    assert_trees_equal(loaded, want)


def test_bfloat16_safetensors_load_as_float32(tmp_path, state, params):
    import ml_dtypes

    folder = save_diffusers(tmp_path / "m", CFG, params)
    _rewrite_weights(folder, state, ml_dtypes.bfloat16)
    _, loaded, _ = load_diffusers(folder)
    want = jax.tree_util.tree_map(lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32), params)
    assert_trees_equal(loaded, want)


# ------------------------------------------------------------------------------------------- torch


@pytest.mark.torch
def test_bin_folder_loads_like_safetensors(tmp_path, state, params):
    torch = pytest.importorskip("torch")
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CFG.to_diffusers()))
    torch.save({k: torch.from_numpy(v) for k, v in to_old_attention_names(state).items()},
               folder / WEIGHT_FILES[1])
    cfg, loaded, _ = load_diffusers(folder)
    assert cfg == CFG
    assert_trees_equal(loaded, params)


@pytest.mark.torch
def test_bin_with_non_tensor_value_is_checkpoint_error(tmp_path, state):
    torch = pytest.importorskip("torch")
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CFG.to_diffusers()))
    torch.save({**{k: torch.from_numpy(v) for k, v in state.items()}, "conv_in.weight": 3}, folder / WEIGHT_FILES[1])
    with pytest.raises(CheckpointError, match="conv_in.weight"):
        load_diffusers(folder)


class _Evil:
    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


@pytest.mark.torch
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_bin_is_refused_without_running(tmp_path, writer):
    torch = pytest.importorskip("torch")
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CFG.to_diffusers()))
    sentinel = tmp_path / "pwned"
    weights = folder / WEIGHT_FILES[1]

    def write(target, path):
        payload = {"conv_in.weight": _Evil(target)}
        if writer == "torch.save":
            torch.save(payload, path)
        else:
            with open(path, "wb") as f:
                pickle.dump(payload, f)

    write(sentinel, weights)
    with pytest.raises(CheckpointError, match="could not be loaded safely"):
        load_diffusers(folder)
    assert not sentinel.exists()
    # Control: the same payload really runs under an unsafe load.
    control, control_file = tmp_path / "control", tmp_path / "control.bin"
    write(control, control_file)
    if writer == "torch.save":
        torch.load(control_file, weights_only=False)
    else:
        with open(control_file, "rb") as f:
            pickle.load(f)
    assert control.exists() and not sentinel.exists()
