"""The bad-input matrix: every user mistake a new user meets, driven through ``pdjax.cli.main``.

Each row builds one bad input (a damaged checkpoint or diffusers folder, a wrong image, an unknown
name, an output path under a regular file, a crafted pickle) and runs one command on it. Every row
asserts the house contract (DESIGN habit 9, README "Command line"):

- exit status 2;
- exactly one stderr line, starting with ``error: ``, that names the problem (``match``) and the fix
  (``fix``); no traceback anywhere;
- nothing on disk changed: every file under the test's folder and the shared models keeps its bytes and
  mtime, and no file or folder appears (so an earlier result in ``--out`` is left intact, and a crafted
  pickle's ``touch`` never ran);
- the error came before any real compute: the XLA compile time spent during the row stays under
  ``MAX_COMPILE_S`` (tiny PRNG programs only; a UNet compile takes 10-40 s on 2 cores).

The lower-level tests (test_checkpoint, test_convert, test_data, test_images, test_triggers, test_cli)
check the library functions; this file is the user-facing table, mirrored in docs/reliability.md. The
crafted ``.bin`` with torch installed is tests/test_convert.py::test_malicious_bin_is_refused_without_running
(marked ``torch``); here torch is hidden, as on an install without the extra.
Models: the tiny preset (8x8x1, 50 timesteps) as a pdjax checkpoint and as a diffusers folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np
import pytest
from PIL import Image

from pdjax.cli import main
from pdjax.models.config import PRESETS
from pdjax.models.convert import WEIGHT_FILES
from pdjax.testing import random_model, random_state_dict

MAX_COMPILE_S = 2.0
_COMPILE_S = [0.0]


def _on_duration(event: str, duration: float, **_):
    if event == "/jax/core/compile/backend_compile_duration":
        _COMPILE_S[0] += duration


jax.monitoring.register_event_duration_secs_listener(_on_duration)


def _plain_detector(path: Path) -> Path:
    """A detector file with only the main rule (no probe or ball threshold)."""
    from pdjax.defense.detection import Detector

    return Detector().save(path)


# ----------------------------------------------------------------------------------------- fixtures
@dataclasses.dataclass
class Zoo:
    root: Path
    ckpt: Path        # pdjax checkpoint of the tiny preset
    diff: Path        # the same model as a diffusers folder
    file: Path        # a regular file (outputs "under" it cannot be created, even by root)
    trigger: Path     # a valid [8, 8, 1] trigger .npy
    nan_ckpt: Path    # a pdjax checkpoint with one NaN weight
    run: Path         # a checkpoint holding a resumable training state of other settings (steps=7)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Zoo:
    root = tmp_path_factory.mktemp("bad-inputs")
    model = random_model("tiny", seed=0, timesteps=50)
    ckpt = model.save(root / "ckpt")
    diff = model.export_diffusers(root / "diff")
    (root / "file").write_text("a regular file, not a folder\n")
    np.save(root / "trigger.npy", np.full((8, 8, 1), -1.0, np.float32))
    model.params["mid_block"]["resnets_0"]["conv1"]["kernel"][0, 0, 0, 0] = np.nan
    nan_ckpt = model.save(root / "nan-ckpt")
    run = random_model("tiny", seed=0, timesteps=50, meta={"train": {"steps": 7}, "steps": 3}).save(
        root / "run", state={"step": np.int32(3)})
    return Zoo(root, ckpt, diff, root / "file", root / "trigger.npy", nan_ckpt, run)


class Evil:
    """Unpickling this runs ``touch SENTINEL``: a crafted payload that must never execute."""

    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


# ----------------------------------------------------------------------------------------- builders
def ckpt_copy(z: Zoo, tmp: Path, edit: Callable[[Path], None]) -> Path:
    path = tmp / "ckpt"
    shutil.copytree(z.ckpt, path)
    edit(path)
    return path


def edit_pointer(change: Callable[[dict], None]):
    def edit(path: Path):
        d = json.loads((path / "pdjax.json").read_text())
        change(d)
        (path / "pdjax.json").write_text(json.dumps(d))
    return edit


def truncate_largest(path: Path):
    f = max((p for p in path.rglob("*") if p.is_file() and p.name != "pdjax.json"), key=lambda p: p.stat().st_size)
    f.write_bytes(f.read_bytes()[:64])


def delete_versions(path: Path):
    for v in path.glob("v[0-9]*"):
        shutil.rmtree(v)


def diff_copy(z: Zoo, tmp: Path, edit: Callable[[Path], None]) -> Path:
    path = tmp / "diffusers"
    shutil.copytree(z.diff, path)
    edit(path)
    return path


def edit_config(change: Callable[[dict], None]):
    def edit(path: Path):
        c = json.loads((path / "config.json").read_text())
        change(c)
        (path / "config.json").write_text(json.dumps(c))
    return edit


def write_state(value: float | None = None):
    def edit(path: Path):
        from safetensors.numpy import save_file

        state = random_state_dict(PRESETS["tiny"], 0)
        state["conv_in.weight"][0, 0, 0, 0] = value
        save_file(state, str(path / WEIGHT_FILES[0]))
    return edit


def evil_bin(tmp: Path):
    def edit(path: Path):
        (path / WEIGHT_FILES[0]).unlink()
        with open(path / WEIGHT_FILES[1], "wb") as f:
            pickle.dump({"conv_in.weight": Evil(tmp / "pwned")}, f)
    return edit


def png16(path: Path) -> Path:
    a = np.zeros((8, 8), np.uint16)
    a[2:6, 2:6] = 60000
    Image.fromarray(a).save(path)
    assert Image.open(path).mode.startswith("I;16")
    return path


def fake_png(path: Path) -> Path:
    path.write_text("this is not a PNG\n")
    return path


def npy(path: Path, x) -> Path:
    np.save(path, x, allow_pickle=True)
    return path


def folder_with(tmp: Path, make: Callable[[Path], Path]) -> Path:
    d = tmp / "images"
    d.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(d / "a_ok.png")
    make(d / "b_bad.png")
    return d


def cifar_dir(tmp: Path, payload: Callable[[Path], object] | bytes) -> str:
    d = tmp / "cifar"
    d.mkdir()
    for i in range(1, 6):
        with open(d / f"data_batch_{i}", "wb") as f:
            if isinstance(payload, bytes):
                f.write(payload)
            else:
                pickle.dump(payload(tmp), f, protocol=2)
    return f"cifar10:{d}"


def resumable_run(z: Zoo, tmp: Path) -> Path:
    """A copy of the zoo's resumable run of other settings: the earlier result that must stay intact."""
    shutil.copytree(z.run, tmp / "run")
    return tmp / "run"


def earlier(tmp: Path, name: str, files: dict[str, str]) -> Path:
    """An output folder holding the results of an earlier (good) run."""
    d = tmp / name
    d.mkdir()
    for k, v in files.items():
        (d / k).write_text(v)
    return d


FAST = ["--steps", "1", "--quiet"]
SCAN = ["--steps", "1", "--samples", "2", "--quiet"]
SAMPLE = ["--n", "2", "--sampler", "ddim", "--steps", "2"]


@dataclasses.dataclass(frozen=True)
class Row:
    id: str
    argv: Callable  # (zoo, tmp, monkeypatch) -> list of CLI arguments
    match: str      # names the problem
    fix: str        # names the fix


ROWS = [
    # --- pdjax checkpoints ------------------------------------------------------------------------------
    Row("ckpt-missing", lambda z, t, mp: ["sample", t / "nope", "--out", t / "g.png"],
        "nope does not exist", "pass a pdjax checkpoint folder or a diffusers model folder"),
    Row("ckpt-empty-folder", lambda z, t, mp: (t / "empty").mkdir() or ["export", t / "empty", t / "dst"],
        "has no config.json", "expected a diffusers UNet2DModel folder or a pdjax checkpoint"),
    Row("ckpt-empty-pointer", lambda z, t, mp: ["invert", ckpt_copy(z, t, lambda p: (p / "pdjax.json").write_text("")),
                                                "--out", t / "inv"],
        "pdjax.json is not valid JSON", "re-save it"),
    Row("ckpt-pointer-other-format",
        lambda z, t, mp: ["sample", ckpt_copy(z, t, lambda p: (p / "pdjax.json").write_text('{"format": "x"}')),
                          "--out", t / "g.png"],
        "is not a pdjax checkpoint pointer", "re-save it"),
    Row("ckpt-truncated-data", lambda z, t, mp: ["scan", ckpt_copy(z, t, truncate_largest), "--out", t / "s", *SCAN],
        "truncated or damaged", "re-save it"),
    Row("ckpt-missing-version", lambda z, t, mp: ["export", ckpt_copy(z, t, delete_versions), t / "dst"],
        "params is missing", "re-save it"),
    Row("ckpt-config-mismatch-missing-key",
        lambda z, t, mp: ["sample", ckpt_copy(z, t, edit_pointer(lambda d: d["meta"]["model"].update(layers_per_block=2))),
                          "--out", t / "g.png"],
        "missing parameter ['down_blocks_0']['resnets_1']", "re-save it"),
    Row("ckpt-config-mismatch-shape",
        lambda z, t, mp: ["invert", ckpt_copy(z, t, edit_pointer(
            lambda d: d["meta"]["model"].update(block_out_channels=[16, 64]))), "--out", t / "inv"],
        "has shape (32,), expected (64,)", "re-save it"),
    Row("ckpt-unknown-block-type",
        lambda z, t, mp: ["sample", ckpt_copy(z, t, edit_pointer(lambda d: d["meta"]["model"].update(
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"]))), "--out", t / "g.png"],
        "unsupported down block type 'CrossAttnDownBlock2D'", "supported: DownBlock2D, AttnDownBlock2D"),
    Row("ckpt-nan-weights", lambda z, t, mp: ["evaluate", z.nan_ckpt, "--trigger", "BOX_3",
                                              "--target", "CORNER", "--out", t / "ev"],
        "['mid_block']['resnets_0']['conv1']['kernel'] contains NaN or Inf", "use an earlier checkpoint"),
    Row("ckpt-nan-weights-shift", lambda z, t, mp: ["shift", z.nan_ckpt, "--trigger", "BOX_3",
                                              "--out", t / "lam.json"],
        "contains NaN or Inf", "use an earlier checkpoint"),
    # --- diffusers folders (config.json + diffusion_pytorch_model.safetensors) ------------------------------
    Row("diffusers-no-weights", lambda z, t, mp: ["convert", diff_copy(z, t, lambda p: (p / WEIGHT_FILES[0]).unlink()),
                                                  t / "c"],
        "has no weights", "expected diffusion_pytorch_model.safetensors"),
    Row("diffusers-empty-config", lambda z, t, mp: ["convert", diff_copy(z, t, lambda p: (p / "config.json").write_text("")),
                                                    t / "c"],
        "config.json is not valid JSON", "re-export or repair it"),
    Row("diffusers-empty-weights",
        lambda z, t, mp: ["sample", diff_copy(z, t, lambda p: (p / WEIGHT_FILES[0]).write_bytes(b"")), "--out", t / "g.png"],
        "safetensors is truncated or corrupt", "download it again"),
    Row("diffusers-truncated-weights",
        lambda z, t, mp: ["convert", diff_copy(z, t, lambda p: (p / WEIGHT_FILES[0]).write_bytes(
            (p / WEIGHT_FILES[0]).read_bytes()[:5000])), t / "c"],
        "safetensors is truncated or corrupt", "download it again"),
    Row("diffusers-config-mismatch-shape",
        lambda z, t, mp: ["convert", diff_copy(z, t, edit_config(lambda c: c.update(block_out_channels=[16, 64]))), t / "c"],
        "has shape (32,), expected (64,)", "use the config.json saved with these weights"),
    Row("diffusers-config-mismatch-missing-key",
        lambda z, t, mp: ["attack", diff_copy(z, t, edit_config(lambda c: c.update(layers_per_block=2))),
                          "--out", t / "a", *FAST],
        "missing key 'down_blocks.0.resnets.1.", "use the config.json saved with these weights"),
    Row("diffusers-unknown-down-block",
        lambda z, t, mp: ["convert", diff_copy(z, t, edit_config(lambda c: c.update(
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"]))), t / "c"],
        "unsupported down block type 'CrossAttnDownBlock2D'", "supported: DownBlock2D, AttnDownBlock2D"),
    Row("diffusers-unknown-up-block",
        lambda z, t, mp: ["scan", diff_copy(z, t, edit_config(lambda c: c.update(up_block_types=["AttnUpBlock2D", "Foo"]))),
                          "--out", t / "s", *SCAN],
        "unsupported up block type 'Foo'", "supported: UpBlock2D, AttnUpBlock2D"),
    Row("diffusers-conditional-model",
        lambda z, t, mp: ["convert", diff_copy(z, t, edit_config(lambda c: c.update(_class_name="UNet2DConditionModel"))),
                          t / "c"],
        "model class 'UNet2DConditionModel' is not supported", "pdjax reads diffusers UNet2DModel folders"),
    Row("diffusers-nan-weights", lambda z, t, mp: ["convert", diff_copy(z, t, write_state(np.nan)), t / "c"],
        "['conv_in']['kernel'] contains NaN or Inf", "use an earlier checkpoint"),
    Row("diffusers-inf-weights", lambda z, t, mp: ["audit", diff_copy(z, t, write_state(np.inf)), "--out", t / "au", *SCAN],
        "contains NaN or Inf", "use an earlier checkpoint"),
    Row("diffusers-bin-pickle-without-torch",
        lambda z, t, mp: mp.setitem(sys.modules, "torch", None) or ["convert", diff_copy(z, t, evil_bin(t)), t / "c"],
        "diffusion_pytorch_model.bin is a PyTorch pickle and torch is not installed", "pip install pdjax[torch]"),
    # --- images: triggers, targets, data folders ---------------------------------------------------------
    Row("trigger-16-bit-png", lambda z, t, mp: ["sample", z.diff, "--trigger", png16(t / "g.png"), "--out", t / "o.png"],
        "g.png is a I;16-mode (high bit depth) image", "save it as 8-bit PNG/JPEG or .npy"),
    Row("trigger-not-an-image", lambda z, t, mp: ["sample", z.diff, "--trigger", fake_png(t / "g.png"), "--out", t / "o.png"],
        "cannot read image", "use a valid PNG/JPEG or .npy file"),
    Row("trigger-npy-wrong-channels",
        lambda z, t, mp: ["sample", z.diff, "--trigger", npy(t / "g.npy", np.zeros((8, 8, 3), np.float32)),
                          "--out", t / "o.png"],
        "has shape (8, 8, 3), the model needs (8, 8, 1)", "save the tensor at the model's size"),
    Row("trigger-npy-nan", lambda z, t, mp: ["sample", z.diff, "--trigger", npy(t / "g.npy", np.full((8, 8, 1), np.nan)),
                                             "--out", t / "o.png"],
        "g.npy contains NaN or Inf values", "save a finite array in [-1, 1]"),
    Row("trigger-npy-0-255", lambda z, t, mp: ["sample", z.diff, "--trigger", npy(t / "g.npy", np.full((8, 8, 1), 255.0)),
                                               "--out", t / "o.png"],
        "has values in [255, 255]; expected [-1, 1]", "x / 127.5 - 1"),
    Row("trigger-npy-pickle", lambda z, t, mp: ["sample", z.diff, "--trigger",
                                                npy(t / "g.npy", np.array([Evil(t / "pwned")], dtype=object)),
                                                "--out", t / "o.png"],
        "holds pickled Python objects (refused, nothing was executed)", "save a numeric array with numpy.save"),
    Row("attack-trigger-npy-2-channels",
        lambda z, t, mp: ["attack", z.diff, "--trigger", npy(t / "g.npy", np.zeros((8, 8, 2), np.float32)),
                          "--out", t / "a", *FAST],
        "holds a float32 array of shape (8, 8, 2)", "expected [H, W] or [H, W, C] with C = 1 or 3"),
    Row("attack-target-not-an-image",
        lambda z, t, mp: ["attack", z.diff, "--target", fake_png(t / "y.png"), "--out", t / "a", *FAST],
        "cannot read image", "use a valid PNG/JPEG or .npy file"),
    Row("evaluate-target-npy-pickle",
        lambda z, t, mp: ["evaluate", z.diff, "--trigger", "BOX_3", "--target",
                          npy(t / "y.npy", np.array([Evil(t / "pwned")], dtype=object)), "--out", t / "ev"],
        "holds pickled Python objects", "save a numeric array with numpy.save"),
    Row("shift-trigger-16-bit-png",
        lambda z, t, mp: ["shift", z.diff, "--trigger", png16(t / "g.png"), "--out", t / "lam.json"],
        "high bit depth", "save it as 8-bit"),
    Row("clean-trigger-npy-nan",
        lambda z, t, mp: ["clean", z.diff, "--trigger", npy(t / "g.npy", np.full((8, 8, 1), np.nan, np.float32)),
                          "--out", t / "c", *FAST],
        "g.npy contains NaN or Inf values", "pdjax invert"),
    Row("data-folder-16-bit-png",
        lambda z, t, mp: ["train", "--init", z.diff, "--data", folder_with(t, png16), "--out", t / "r", "--samples", "0", *FAST],
        "b_bad.png is a I;16-mode (high bit depth) image", "save it as 8-bit"),
    Row("data-folder-not-an-image",
        lambda z, t, mp: ["train", "--init", z.diff, "--data", folder_with(t, fake_png), "--out", t / "r", "--samples", "0",
                          *FAST],
        "b_bad.png (UnidentifiedImageError)", "use a valid PNG/JPEG or .npy file"),
    Row("data-folder-empty",
        lambda z, t, mp: (t / "none").mkdir() or ["attack", z.diff, "--data", t / "none", "--out", t / "a", *FAST],
        "no .png/.jpg/.jpeg images found", "put training images there"),
    Row("data-is-a-file", lambda z, t, mp: ["train", "--init", z.diff, "--data", z.file, "--out", t / "r", *FAST],
        "unknown dataset", "use 'digits', 'cifar10:PATH'"),
    Row("cifar10-crafted-pickle",
        lambda z, t, mp: ["train", "--init", z.diff, "--data", cifar_dir(t, lambda d: {b"data": Evil(d / "pwned")}),
                          "--out", t / "r", "--samples", "0", *FAST],
        "refused to load", "use the official CIFAR-10 python batch files"),
    Row("cifar10-truncated-pickle",
        lambda z, t, mp: ["attack", z.diff, "--data", cifar_dir(t, b"\x80\x02}q\x00(X"), "--out", t / "a", *FAST],
        "is not a valid pickle (UnpicklingError", "re-extract cifar-10-python.tar.gz"),
    Row("cifar10-wrong-structure",
        lambda z, t, mp: ["amplify", z.diff, "--trigger", "BOX_3", "--target", "CORNER",
                          "--data", cifar_dir(t, lambda d: [1, 2, 3]), "--out", t / "am", *FAST],
        "is not a CIFAR-10 python batch", "re-extract the python version"),
    # --- unknown names -------------------------------------------------------------------------------------
    Row("unknown-trigger", lambda z, t, mp: ["attack", z.diff, "--trigger", "NOPE", "--out", t / "a", *FAST],
        "unknown trigger 'NOPE'", "valid: <path to PNG/JPEG/.npy>, BOX_<n>"),
    Row("unknown-target", lambda z, t, mp: ["evaluate", z.diff, "--trigger", "BOX_3", "--target", "NOPE", "--out", t / "e"],
        "unknown target 'NOPE'", "valid: <path to PNG/JPEG/.npy>, CAT, CORNER"),
    Row("trigger-does-not-fit", lambda z, t, mp: ["evaluate", z.diff, "--trigger", "BOX_14", "--target", "CORNER",
                                                  "--out", t / "e"],
        "trigger BOX_14 does not fit a 8x8 image", "use n <= 6"),
    Row("unknown-attack", lambda z, t, mp: ["attack", "scratch", "--attack", "nope", "--out", t / "a", *FAST],
        "unknown attack 'nope'", "valid: baddiffusion, trojdiff, villan"),
    Row("unknown-preset", lambda z, t, mp: ["attack", "scratch", "--preset", "huge", "--out", t / "a", *FAST],
        "unknown model preset 'huge'", "valid: ddpm-cifar10-32, digits-16, tiny"),
    Row("unknown-method-invert", lambda z, t, mp: ["invert", z.diff, "--method", "nope", "--out", t / "i"],
        "unknown inversion method 'nope'", "valid: elijah, purediffusion, terd"),
    Row("unknown-lambda-source", lambda z, t, mp: ["invert", z.diff, "--lambda", "nope", "--out", t / "i", *FAST],
        "unknown lambda source 'nope'", "valid: <path to a table .json>, baddiffusion, closed-ode, closed-sde, trojdiff, villan-ode"),
    Row("unknown-start-invert", lambda z, t, mp: ["invert", z.diff, "--starts", "ddpm", "euler", "--out", t / "i",
                                                  *FAST],
        "unknown sampler 'euler'", "valid: ddim, ddpm"),
    Row("bad-start-scale-scan", lambda z, t, mp: ["scan", z.diff, "--starts", "ddim@2", "--out", t / "s", "--quiet"],
        "start noise scale must be in (0, 1], got 2.0", "write SAMPLER@SCALE with 0 < SCALE <= 1"),
    Row("unknown-method-scan", lambda z, t, mp: ["scan", z.diff, "--method", "nope", "--out", t / "s", "--quiet"],
        "unknown inversion method 'nope'", "valid: elijah"),
    Row("unknown-method-audit", lambda z, t, mp: ["audit", z.diff, "--method", "nope", "--out", t / "au", "--quiet"],
        "unknown inversion method 'nope'", "valid: elijah"),
    Row("unknown-feature-calibrate",
        lambda z, t, mp: ["calibrate", "--clean", z.diff, "--backdoored", z.ckpt, "--feature", "nope",
                          "--out", t / "det.json", *SCAN],
        "unknown detection feature 'nope'", "valid: final_loss, log_uni_ratio"),
    Row("unknown-trigger-amplify",
        lambda z, t, mp: ["amplify", z.diff, "--trigger", "NOPE", "--target", "CORNER", "--out", t / "am", *FAST],
        "unknown trigger 'NOPE'", "valid:"),
    Row("unknown-method-amplify",
        lambda z, t, mp: ["amplify", z.diff, "--trigger", "BOX_3", "--target", "CORNER", "--inv-method", "nope",
                          "--out", t / "am", *FAST],
        "unknown inversion method 'nope'", "valid:"),
    Row("unknown-target-clean",
        lambda z, t, mp: ["clean", z.diff, "--trigger", z.trigger, "--target", "NOPE", "--out", t / "c", *FAST],
        "unknown target 'NOPE'", "valid:"),
    Row("noise-patch-without-trojdiff-shift",
        lambda z, t, mp: ["clean", z.diff, "--trigger", z.trigger, "--noise-patch", "0", "0", "3", "--out", t / "c",
                          *FAST],
        "noise_patch says where the TrojDiff samples' noise scale applies", "use it with shift 'trojdiff'"),
    Row("noise-patch-outside-the-image",
        lambda z, t, mp: ["clean", z.diff, "--trigger", z.trigger, "--shift", "trojdiff", "--noise-scale-min", "0.1",
                          "--noise-patch", "7", "0", "3", "--out", t / "c", *FAST],
        "a 3x3 patch at (7, 0) does not fit a 8x8 image", "its row must be 0..5"),
    Row("unknown-sampler", lambda z, t, mp: ["sample", z.diff, "--sampler", "nope", "--out", t / "g.png"],
        "invalid choice: 'nope'", "see `pdjax sample --help`"),
    Row("unknown-command", lambda z, t, mp: ["scna", z.diff],
        "invalid choice: 'scna'", "see `pdjax --help`"),
    Row("detector-missing", lambda z, t, mp: ["scan", z.diff, "--detector", t / "det.json", "--out", t / "s", *SCAN],
        "detector file", "run `pdjax calibrate` or omit --detector"),
    Row("detector-not-json", lambda z, t, mp: ["audit", z.diff, "--detector", fake_png(t / "det.json"), "--out", t / "au",
                                               *SCAN],
        "det.json is not valid JSON", "recalibrate it with `pdjax calibrate`"),
    Row("detector-not-an-object", lambda z, t, mp: (t / "det.json").write_text("[1, 2]") and [
        "scan", z.diff, "--detector", t / "det.json", "--out", t / "s", *SCAN],
        "is not a pdjax detector of version 1 to 4", "recalibrate it"),
    Row("ball-without-threshold", lambda z, t, mp: [
        "scan", z.diff, "--ball", "--detector", _plain_detector(t / "det.json"), "--out", t / "s", *SCAN],
        "this detector has no ball threshold", "pdjax calibrate --ball"),
    Row("terd-without-threshold", lambda z, t, mp: [
        "scan", z.diff, "--terd", "--detector", _plain_detector(t / "det.json"), "--out", t / "s", *SCAN],
        "this detector has no terd threshold", "pdjax calibrate --terd"),
    Row("ball-too-few-clean",
        lambda z, t, mp: ["calibrate", "--clean", z.diff, "--backdoored", z.ckpt, "--ball", "--out", t / "det.json",
                          *SCAN],
        "the --ball threshold needs at least 3 clean reference models, got 1", "drop --ball"),
    Row("audit-source-binary-file", lambda z, t, mp: (t / "models.bin").write_bytes(b"\xff\xfe\x00\x81") and [
        "audit", t / "models.bin", "--out", t / "au", *SCAN],
        "is a file but not a text list of model paths", "a text file with one path per line"),
    Row("audit-source-missing", lambda z, t, mp: ["audit", t / "nothing", "--out", t / "au", *SCAN],
        "is neither a model folder, a folder of models nor a list file", "pass pdjax checkpoints"),
    # --- unwritable outputs: a path under a regular file (root ignores chmod) -----------------------------
    *[Row(f"out-under-file-{cmd}", build, "is a file, not a folder", f"choose another {flag}") for cmd, flag, build in [
        ("train", "--out", lambda z, t, mp: ["train", "--init", z.diff, "--out", z.file / "r", *FAST]),
        ("train-scratch", "--out", lambda z, t, mp: ["train", "--preset", "tiny", "--size", "8", "--out", z.file / "r",
                                                     *FAST]),
        ("attack", "--out", lambda z, t, mp: ["attack", z.diff, "--trigger", "BOX_3", "--out", z.file / "a", *FAST]),
        ("clean", "--out", lambda z, t, mp: ["clean", z.diff, "--trigger", z.trigger, "--out", z.file / "c", *FAST]),
        ("invert", "--out", lambda z, t, mp: ["invert", z.diff, "--out", z.file / "i", *FAST]),
        ("evaluate", "--out", lambda z, t, mp: ["evaluate", z.diff, "--trigger", "BOX_3", "--target", "CORNER",
                                                "--out", z.file / "e"]),
        ("shift", "--out", lambda z, t, mp: ["shift", z.diff, "--trigger", "BOX_3", "--out", z.file / "lam.json"]),
        ("sample", "--out", lambda z, t, mp: ["sample", z.diff, "--out", z.file / "g.png", *SAMPLE]),
        ("sample-npy", "--npy", lambda z, t, mp: ["sample", z.diff, "--out", t / "g.png", "--npy", z.file / "x.npy",
                                                  *SAMPLE]),
        ("calibrate", "--out", lambda z, t, mp: ["calibrate", "--clean", z.diff, "--backdoored", z.ckpt,
                                                 "--out", z.file / "det.json", *SCAN]),
    ]],
    Row("out-under-file-scan", lambda z, t, mp: ["scan", z.diff, "--out", z.file / "s", *SCAN],
        "cannot write to", "choose a writable --out"),
    Row("out-under-file-audit", lambda z, t, mp: ["audit", z.diff, "--out", z.file / "au", *SCAN],
        "cannot write to", "choose a writable --out"),
    Row("out-under-file-amplify",
        lambda z, t, mp: ["amplify", z.diff, "--trigger", "BOX_3", "--target", "CORNER", "--out", z.file / "am", *FAST],
        "cannot create output folder", "choose a writable --out"),
    Row("out-under-file-convert", lambda z, t, mp: ["convert", z.diff, z.file / "c"],
        "cannot create checkpoint folder", "choose a writable path"),
    Row("out-under-file-export", lambda z, t, mp: ["export", z.ckpt, z.file / "d"],
        "cannot write diffusers folder", "choose a writable path"),
    # --- earlier results stay intact (the snapshot check does the asserting) -------------------------------
    Row("resume-other-settings-train",
        lambda z, t, mp: ["train", "--init", z.diff, "--out", resumable_run(z, t), "--samples", "0", *FAST],
        "holds a run with other settings", "use a new --out folder or the same settings"),
    Row("resume-other-settings-attack",
        lambda z, t, mp: ["attack", z.diff, "--trigger", "BOX_3", "--out", resumable_run(z, t), *FAST],
        "holds a run with other settings", "use a new --out folder"),
    Row("convert-force-bad-source-keeps-checkpoint",
        lambda z, t, mp: ["convert", diff_copy(z, t, write_state(np.nan)), resumable_run(z, t), "--force"],
        "contains NaN or Inf", "use an earlier checkpoint"),
    Row("invert-keeps-earlier-trigger",
        lambda z, t, mp: ["invert", z.diff, "--method", "nope",
                          "--out", earlier(t, "inv", {"trigger.npy": "old", "inversion.json": "{}"})],
        "unknown inversion method", "valid:"),
    Row("scan-bad-second-model-keeps-report",
        lambda z, t, mp: ["scan", z.diff, t / "missing",
                          "--out", earlier(t, "report", {"scan.json": "{}", "report.html": "<p>old</p>"}), *SCAN],
        "missing does not exist", "pass a pdjax checkpoint"),
    Row("audit-bad-list-entry-keeps-jsonl",
        lambda z, t, mp: (t / "list.txt").write_text(f"{z.diff}\n{t / 'missing'}\n") and [
            "audit", t / "list.txt", "--out", earlier(t, "au", {"audit.jsonl": '{"model": "old"}\n'}), *SCAN],
        "missing does not exist", "pass a pdjax checkpoint"),
    Row("calibrate-keeps-detector",
        lambda z, t, mp: earlier(t, "d", {"det.json": "{}"}) and [
            "calibrate", "--clean", z.diff, "--backdoored", t / "missing", "--out", t / "d" / "det.json", *SCAN],
        "missing does not exist", "pass a pdjax checkpoint"),
    Row("sample-keeps-grid",
        lambda z, t, mp: earlier(t, "s", {"g.png": "old"}) and [
            "sample", z.diff, "--trigger", fake_png(t / "t.png"), "--out", t / "s" / "g.png"],
        "cannot read image", "use a valid PNG/JPEG"),
    Row("shift-keeps-table",
        lambda z, t, mp: earlier(t, "l", {"lam.json": "{}"}) and [
            "shift", z.diff, "--trigger", "NOPE", "--out", t / "l" / "lam.json"],
        "unknown trigger 'NOPE'", "valid:"),
    Row("export-keeps-folder",
        lambda z, t, mp: ["export", t / "missing", earlier(t, "d", {"config.json": "{}"})],
        "missing does not exist", "pass a pdjax checkpoint"),
]


# ----------------------------------------------------------------------------------------- the test
def snapshot(*roots: Path) -> dict:
    """Every file (bytes hash, size, mtime) and folder under ``roots``."""
    state = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_dir():
                state[str(p)] = "dir"
            else:
                st = p.stat()
                state[str(p)] = (hashlib.sha1(p.read_bytes()).hexdigest(), st.st_size, st.st_mtime_ns)
    return state


def run_cli(argv) -> int:
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:  # argparse rejects its own choices through SystemExit
        return e.code


def test_rows_are_unique():
    assert len({r.id for r in ROWS}) == len(ROWS)


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row: Row, zoo: Zoo, tmp_path, capsys, monkeypatch):
    argv = row.argv(zoo, tmp_path, monkeypatch)
    capsys.readouterr()
    before = snapshot(tmp_path, zoo.root)
    compiled, t0 = _COMPILE_S[0], time.perf_counter()
    rc = run_cli(argv)
    seconds, compile_s = time.perf_counter() - t0, _COMPILE_S[0] - compiled
    if row.id == "ckpt-truncated-data":
        time.sleep(0.5)  # orbax's aborted reads report late, from other threads: give them time to show
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, f"exit status {rc}; stderr:\n{err}"
    assert "Traceback" not in err + out, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert row.match in lines[0], lines[0]
    assert row.fix in lines[0], lines[0]
    assert snapshot(tmp_path, zoo.root) == before, "a failed run changed files on disk"
    assert compile_s < MAX_COMPILE_S, f"{compile_s:.1f} s of XLA compiles before the error ({seconds:.1f} s)"
