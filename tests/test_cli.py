"""The ``pdjax`` command, called in-process through ``pdjax.cli.main``: help, a tiny train -> sample ->
export -> convert round trip, and user mistakes (one ``error:`` line on stderr, exit status 2).

One module-scoped fixture runs ``pdjax train`` once (the only UNet compile here); the sampling calls
reuse its DDIM compile (4 samples, 2 steps).
"""

import contextlib
import io
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from pdjax import checkpoint
from pdjax.cli import main
from pdjax.images import grid
from pdjax.model import load
from pdjax.models.config import PRESETS

SUBCOMMANDS = ("convert", "export", "train", "sample")
GRID_4 = 19  # 2 x 2 cells of 8 px + 1 px white padding: 2 * 9 + 1 (before display enlargement)


def read_grid(path, samples=None):
    """The PNG at ``path`` as uint8 [H, W]: a 4-image grid, possibly enlarged by an integer factor k.

    With ``samples`` [4, 8, 8, 1], also checks the pixels are exactly ``images.grid(samples)`` enlarged k times.
    """
    with Image.open(path) as im:
        assert im.mode == "L"
        g = np.asarray(im)
    k = g.shape[0] // GRID_4
    assert k >= 1 and g.shape == (GRID_4 * k, GRID_4 * k)
    np.testing.assert_array_equal(g, np.repeat(np.repeat(g[::k, ::k], k, 0), k, 1))  # nearest-neighbour blocks
    if samples is not None:
        np.testing.assert_array_equal(g[::k, ::k], grid(samples)[..., 0])
    return g


def run_cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_user_error(capsys, *argv, match):
    rc, _, err = run_cli(capsys, *argv)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert match in lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``pdjax train`` on digits at 8x8 with the tiny preset: (checkpoint folder, rc, stdout)."""
    out = tmp_path_factory.mktemp("cli") / "run"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["train", "--preset", "tiny", "--size", "8", "--steps", "3", "--batch", "4", "--samples", "4",
                   "--sampler", "ddim", "--sample-steps", "2", "--quiet", "--out", str(out)])
    return out, rc, buf.getvalue()


@pytest.fixture(scope="module")
def trigger_file(tmp_path_factory):
    g = np.full((8, 8, 1), -1.0, np.float32)
    g[5:, 5:] = 1.0
    path = tmp_path_factory.mktemp("trigger") / "box.npy"
    np.save(path, g)
    return path


# ------------------------------------------------------------------- help
def test_entry_point_help_subprocess():
    p = subprocess.run([sys.executable, "-m", "pdjax.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("usage: pdjax")
    for sub in SUBCOMMANDS:
        assert sub in p.stdout


def test_no_command_prints_help(capsys):
    rc, out, _ = run_cli(capsys)
    assert rc == 0 and out.startswith("usage: pdjax")


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_subcommand_help(capsys, sub):
    with pytest.raises(SystemExit) as e:
        main([sub, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: pdjax {sub}")


# ------------------------------------------------------------------- train -> sample -> export -> convert
def test_train_writes_checkpoint_and_grid(trained):
    out, rc, stdout = trained
    assert rc == 0, stdout
    assert "for 3 steps" in stdout and "trained 3 steps" in stdout and "resumed from step 0" in stdout
    assert checkpoint.is_checkpoint(out)
    meta = checkpoint.read_meta(out)
    assert meta["model"] == PRESETS["tiny"].to_dict()
    prov = meta["provenance"]
    assert prov["data"] == "digits" and prov["seed"] == 0 and prov["steps"] == 3
    assert prov["train"]["steps"] == 3 and prov["train"]["batch_size"] == 4
    _, _, state = checkpoint.restore(out, with_state=True)
    assert state is not None and int(state["step"]) == 3  # resumable
    read_grid(out / "samples.png")
    model = load(out)
    assert model.image_shape == (8, 8, 1)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(model.params))


def test_sample_with_and_without_trigger(trained, trigger_file, tmp_path, capsys):
    out = trained[0]
    args = ["sample", out, "--n", "4", "--sampler", "ddim", "--steps", "2"]
    rc, stdout, _ = run_cli(capsys, *args, "--out", tmp_path / "clean.png", "--npy", tmp_path / "clean.npy")
    assert rc == 0 and "wrote 4 samples" in stdout
    clean = np.load(tmp_path / "clean.npy")
    assert clean.shape == (4, 8, 8, 1) and np.all(np.isfinite(clean))
    read_grid(tmp_path / "clean.png", clean)

    rc, stdout, _ = run_cli(capsys, *args, "--out", tmp_path / "again.png", "--npy", tmp_path / "again.npy")
    assert rc == 0
    np.testing.assert_array_equal(np.load(tmp_path / "again.npy"), clean)  # same --seed, same samples

    rc, stdout, _ = run_cli(capsys, *args, "--trigger", trigger_file, "--out", tmp_path / "trig" / "x.png",
                            "--npy", tmp_path / "trig.npy")
    assert rc == 0 and "trigger" in stdout
    triggered = np.load(tmp_path / "trig.npy")
    read_grid(tmp_path / "trig" / "x.png", triggered)  # parent folder created
    assert triggered.shape == clean.shape and np.abs(triggered - clean).mean() > 1e-2


def test_export_convert_round_trip(trained, tmp_path, capsys):
    out = trained[0]
    diff, dst = tmp_path / "diffusers", tmp_path / "converted"
    rc, stdout, _ = run_cli(capsys, "export", out, diff)
    assert rc == 0 and "exported" in stdout
    assert {p.name for p in diff.iterdir()} >= {"config.json", "diffusion_pytorch_model.safetensors",
                                                 "scheduler_config.json"}
    rc, stdout, _ = run_cli(capsys, "convert", diff, dst)
    assert rc == 0 and "converted" in stdout
    assert checkpoint.is_checkpoint(dst)
    a, b = load(out), load(dst)
    assert b.config == a.config and b.schedule_config == a.schedule_config
    ta, tb = jax.tree_util.tree_leaves_with_path(a.params), jax.tree_util.tree_leaves_with_path(b.params)
    assert [k for k, _ in ta] == [k for k, _ in tb]
    for (k, x), (_, y) in zip(ta, tb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(k))

    # converting into the now non-empty DST needs --force, which adds a new version
    assert_user_error(capsys, "convert", diff, dst, match="--force")
    rc, _, _ = run_cli(capsys, "convert", diff, dst, "--force")
    assert rc == 0 and load(dst).config == a.config
    # a pdjax checkpoint is not a convert source
    assert_user_error(capsys, "convert", out, tmp_path / "other", match="pdjax export")


# ------------------------------------------------------------------- user mistakes
def test_sample_missing_model(tmp_path, capsys):
    assert_user_error(capsys, "sample", tmp_path / "nope", "--out", tmp_path / "x.png", match="does not exist")
    assert not (tmp_path / "x.png").exists()


def test_convert_folder_without_config(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    assert_user_error(capsys, "convert", tmp_path / "src", tmp_path / "dst", match="no config.json")


def test_export_missing_source(tmp_path, capsys):
    assert_user_error(capsys, "export", tmp_path / "nope", tmp_path / "dst", match="does not exist")


def test_train_unknown_preset(tmp_path, capsys):
    line = assert_user_error(capsys, "train", "--preset", "huge", "--out", tmp_path / "o", match="unknown model preset 'huge'")
    assert "tiny" in line  # lists the valid names
    assert not (tmp_path / "o").exists()


def test_train_missing_data_folder(trained, tmp_path, capsys):
    # --init skips initialising a fresh UNet (a 10-40 s compile here); the data check is the same
    assert_user_error(capsys, "train", "--init", trained[0], "--data", tmp_path / "no-such-folder", "--steps", "1",
                      "--samples", "0", "--quiet", "--out", tmp_path / "o", match="no-such-folder")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("shape", [(8, 8, 2), (2, 8, 8, 1), (16, 16, 1)])
def test_sample_trigger_of_wrong_shape(trained, tmp_path, capsys, shape):
    np.save(tmp_path / "bad.npy", np.zeros(shape, np.float32))
    assert_user_error(capsys, "sample", trained[0], "--n", "4", "--sampler", "ddim", "--steps", "2",
                      "--trigger", tmp_path / "bad.npy", "--out", tmp_path / "x.png", match="bad.npy")
    assert not (tmp_path / "x.png").exists()


def test_sample_unwritable_out(trained, tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    assert_user_error(capsys, "sample", trained[0], "--n", "4", "--sampler", "ddim", "--steps", "2",
                      "--out", tmp_path / "file" / "x.png", match="is a file, not a folder")  # checked before sampling


def test_convert_into_a_file(trained, tmp_path, capsys):
    diff = tmp_path / "diffusers"
    assert run_cli(capsys, "export", trained[0], diff)[0] == 0
    (tmp_path / "file").write_text("x")
    assert_user_error(capsys, "convert", diff, tmp_path / "file", match="file")


def test_export_unwritable_dst(trained, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert_user_error(capsys, "export", trained[0], tmp_path / "file" / "sub", match="file")
