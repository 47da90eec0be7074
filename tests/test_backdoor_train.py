"""Backdoor training and evaluation end to end on a tiny model (few steps: checks plumbing, not ASR)."""

import json

import jax
import numpy as np
import pytest

from pdjax import checkpoint, cli
from pdjax.backdoor.attacks import AttackSpec
from pdjax.backdoor.train import target_classifier, build_arrays
from pdjax.data import LETTERS, load_digits_with_labels, load_letters_with_labels
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


def test_out_d2d_targets_a_letter_class_of_another_set():
    data, labels = load_digits_with_labels(8)
    spec = AttackSpec(kind="trojdiff", mode="out-d2d", trigger="blend", target="letter:K")
    pool = build_arrays(spec, (8, 8, 1), data, labels).target
    letters, letter_labels = load_letters_with_labels(8)
    assert pool.ndim == 4 and len(pool) == int((letter_labels == LETTERS.index("K")).sum()) > 0
    np.testing.assert_array_equal(pool, letters[letter_labels == LETTERS.index("K")])
    assert not any(np.array_equal(p, d) for p in pool[:5] for d in data)  # not the training set
    # ASR of a d2d target: a classifier over the letters and the training digits
    classify, k, rule = target_classifier(spec, (8, 8, 1), data, labels)
    assert k == LETTERS.index("K") and "letter K" in rule
    assert np.mean(classify(pool) == k) > 0.9 and np.mean(classify(data[:100]) == k) < 0.05


def test_letters_are_deterministic_distinct_classes():
    a, la = load_letters_with_labels(16, 3, per_class=4)
    b, _ = load_letters_with_labels(16, 3, per_class=4)
    assert a.shape == (26 * 4, 16, 16, 3) and a.dtype == np.float32 and a.min() >= -1 and a.max() <= 1
    np.testing.assert_array_equal(a, b)
    means = np.stack([a[la == k].mean(0) for k in range(26)]).reshape(26, -1)
    d = ((means[:, None] - means[None]) ** 2).mean(-1)
    assert np.all(d[~np.eye(26, dtype=bool)] > 1e-3)  # no two letter classes look alike on average


def test_build_arrays_errors():
    with pytest.raises(ConfigError, match="trojdiff"):
        build_arrays(AttackSpec(trigger="BOX_3", target="class:3"), (8, 8, 1))
    with pytest.raises(ConfigError, match="letter:A"):
        build_arrays(AttackSpec(kind="trojdiff", mode="out-d2d", trigger="blend", target="class:3"), (8, 8, 1))
    with pytest.raises(ConfigError, match="out-d2d"):
        build_arrays(AttackSpec(kind="trojdiff", mode="in-d2d", trigger="blend", target="letter:A"), (8, 8, 1))
    with pytest.raises(ConfigError, match="letter:A .. letter:Z"):
        build_arrays(AttackSpec(kind="trojdiff", mode="out-d2d", trigger="blend", target="letter:7"), (8, 8, 1))
    with pytest.raises(UnknownNameError, match="CORNER"):
        build_arrays(AttackSpec(trigger="BOX_3", target="NOPE"), (8, 8, 1))


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


def test_cli_attack_with_user_trigger_and_target_pictures_then_evaluate(tmp_path, capsys):
    """A trigger picture and a target picture outside the library, end to end through `pdjax attack` and
    `pdjax evaluate` (one tiny scratch attack: the metadata, the arrays rebuilt from it, the metrics files)."""
    from PIL import Image

    from pdjax.backdoor.triggers import get_target, get_trigger
    from pdjax.model import load

    trig = np.zeros((12, 12), np.uint8)
    trig[1:4, 8:11] = 255  # a top-right square: not a library trigger
    tgt = np.zeros((12, 12), np.uint8)
    tgt[5:7, :] = 200  # a horizontal bar: not a library target
    Image.fromarray(trig).save(tmp_path / "trig.png")
    Image.fromarray(tgt).save(tmp_path / "tgt.png")
    out = tmp_path / "bd"
    assert cli.main(["attack", "scratch", "--preset", "tiny", "--size", "8", "--trigger", str(tmp_path / "trig.png"),
                     "--target", str(tmp_path / "tgt.png"), "--steps", "3", "--batch", "4", "--poison-rate", "0.25",
                     "--quiet", "--out", str(out)]) == 0
    meta = checkpoint.read_meta(out)["provenance"]
    assert meta["attack"]["kind"] == "baddiffusion" and meta["attack"]["poison_rate"] == 0.25
    assert meta["steps"] == 3 and meta["seed"] == 0
    model = load(out)
    spec = model.meta["attack"]
    assert spec["trigger"] == str(tmp_path / "trig.png") and spec["target"] == str(tmp_path / "tgt.png")
    arr = build_arrays(AttackSpec(**spec), model.image_shape)
    np.testing.assert_array_equal(arr.trigger, get_trigger(tmp_path / "trig.png", 8, 1))
    np.testing.assert_array_equal(arr.target, get_target(tmp_path / "tgt.png", 8, 1))
    assert arr.mask[0, 6, 0] == 1 and arr.mask[6, 0, 0] == 0 and arr.target[3, 0, 0] > arr.target[0, 0, 0]
    ev = tmp_path / "ev"
    capsys.readouterr()
    assert cli.main(["evaluate", str(out), "--n", "4", "--out", str(ev)]) == 0
    res = json.loads((ev / "metrics.json").read_text())
    assert res["attack"]["target"] == str(tmp_path / "tgt.png")
    for part in ("clean", "triggered"):
        assert set(res[part]) >= {"mse", "asr", "ssim", "n", "threshold"} and res[part]["n"] == 4
        assert 0.0 <= res[part]["asr"] <= 1.0
    assert (ev / "clean.png").is_file() and (ev / "triggered.png").is_file()
    text = capsys.readouterr().out
    assert "triggered" in text and "ASR" in text


def test_evaluate_reuses_given_clean_generations():
    from pdjax.backdoor.train import evaluate
    from pdjax.testing import random_model

    model = random_model("tiny", timesteps=20)
    spec = AttackSpec(trigger="BOX_3", target="CORNER")
    first, clean, _ = evaluate(model, spec, jax.random.key(3), n=2)
    again, clean2, _ = evaluate(model, spec, jax.random.key(3), n=2, clean=clean)
    assert again.to_dict() == first.to_dict() and clean2 is clean
    with pytest.raises(ConfigError, match="do not match"):
        evaluate(model, spec, jax.random.key(3), n=3, clean=clean)
