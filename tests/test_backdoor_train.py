"""Backdoor training and evaluation end to end on a tiny model (few steps: checks plumbing, not ASR)."""

import json

import jax
import numpy as np
import pytest

from pdjax import checkpoint, cli
from pdjax.backdoor.attacks import AttackSpec
from pdjax.backdoor.train import build_arrays
from pdjax.data import load_digits_with_labels
from pdjax.errors import ConfigError, UnknownNameError


def test_build_arrays_image_and_class_targets():
    data, labels = load_digits_with_labels(8)
    arr = build_arrays(AttackSpec(trigger="BOX_3", target="CORNER"), (8, 8, 1))
    assert arr.trigger.shape == arr.mask.shape == arr.target.shape == (8, 8, 1)
    assert set(np.unique(arr.mask)) <= {0.0, 1.0} and arr.mask.sum() == 9
    spec = AttackSpec(kind="trojdiff", mode="in-d2d", trigger="blend", target="class:7")
    pool = build_arrays(spec, (8, 8, 1), data, labels).target
    assert pool.ndim == 4 and len(pool) == int((labels == 7).sum())
    patch = build_arrays(AttackSpec(kind="trojdiff", trigger="patch", gamma=0.1), (8, 8, 1))
    mu, scale = patch.troj_mu_scale(AttackSpec(kind="trojdiff", gamma=0.1))
    assert patch.patch and np.all(mu[patch.mask == 0] == 0) and np.allclose(scale[patch.mask == 1], 0.1)


def test_build_arrays_errors():
    with pytest.raises(ConfigError, match="trojdiff"):
        build_arrays(AttackSpec(trigger="BOX_3", target="class:3"), (8, 8, 1))
    with pytest.raises(UnknownNameError, match="CORNER"):
        build_arrays(AttackSpec(trigger="BOX_3", target="NOPE"), (8, 8, 1))


def test_cli_attack_then_evaluate(tmp_path, capsys):
    out = tmp_path / "bd"
    rc = cli.main(["attack", "scratch", "--preset", "tiny", "--size", "8", "--trigger", "BOX_3", "--target", "CORNER",
                   "--steps", "3", "--batch", "4", "--poison-rate", "0.25", "--quiet", "--out", str(out)])
    assert rc == 0
    meta = checkpoint.read_meta(out)["provenance"]
    assert meta["attack"]["kind"] == "baddiffusion" and meta["attack"]["trigger"] == "BOX_3"
    assert meta["attack"]["poison_rate"] == 0.25 and meta["steps"] == 3 and meta["seed"] == 0
    ev = tmp_path / "ev"
    assert cli.main(["evaluate", str(out), "--n", "4", "--out", str(ev)]) == 0
    res = json.loads((ev / "metrics.json").read_text())
    for part in ("clean", "triggered"):
        assert set(res[part]) >= {"mse", "asr", "ssim", "n", "threshold"} and res[part]["n"] == 4
        assert 0.0 <= res[part]["asr"] <= 1.0
    assert (ev / "clean.png").is_file() and (ev / "triggered.png").is_file()
    text = capsys.readouterr().out
    assert "triggered" in text and "ASR" in text


def test_cli_evaluate_without_attack_metadata_is_one_line_error(tmp_path, capsys):
    from pdjax.model import new_model
    from pdjax.models.config import PRESETS

    new_model(PRESETS["tiny"], jax.random.key(0)).save(tmp_path / "clean")
    assert cli.main(["evaluate", str(tmp_path / "clean")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--trigger" in err[0]


def test_class_classifier_recognises_held_out_digits():
    from pdjax.backdoor.train import class_classifier

    data, labels = load_digits_with_labels(8)
    classify = class_classifier(data[:1400], labels[:1400])
    assert np.mean(classify(data[1400:]) == labels[1400:]) > 0.85
