"""experiments/inversion_count.py: issue 4's within-5-points counts over inversion_table.py work folders."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from pdjax.testing import random_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
spec = importlib.util.spec_from_file_location("inversion_count", ROOT / "experiments" / "inversion_count.py")
ic = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ic)

ATTACKS = {
    "bd": {"kind": "baddiffusion", "trigger": "BOX_4", "target": "CAT"},
    "ode": {"kind": "villan", "solver": "ode", "trigger": "BOX_8", "target": "SHOE"},
    "troj": {"kind": "trojdiff", "trigger": "patch", "target": "X", "mode": "d2i"},
}


def row(model, variant, asr, start="ddpm", n=32, uni=1.0, l2=2.0):
    r = {"model": model, "variant": variant, "n": n, "eval_key": 7, "start": start, "uniformity": uni}
    if asr is not None:
        r["asr"] = asr
    if variant not in ("true", "none"):
        r.update(l2_in_mask=l2, l2_overall=2 * l2)
    return r


def write(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "evals.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture
def zoo(tmp_path):
    z = tmp_path / "zoo"
    for i, (name, attack) in enumerate(ATTACKS.items()):
        random_model("tiny", seed=i, timesteps=8, meta={"attack": attack}).save(z / name)
    random_model("tiny", seed=9, timesteps=8).save(z / "clean")
    return z


def test_counts_literal_and_firing(tmp_path, zoo):
    a = write(tmp_path / "a", [
        # BadDiffusion: pd fires like the true trigger, Elijah's raw trigger falls short, sized Elijah is within.
        row("bd", "true", 1.0), row("bd", "pd", 0.97, l2=3.0), row("bd", "elijah", 0.5, l2=1.0),
        row("bd", "elijah_sized", 0.96, l2=4.0),
        # ODE model (DDIM start): pd misses, final_ode (the by-sampler pick) is within.
        row("ode", "true", 1.0, "ddim"), row("ode", "pd", 0.0, "ddim"), row("ode", "elijah", 0.0, "ddim"),
        row("ode", "final_ode", 1.0, "ddim", l2=5.0),
        # TrojDiff patch whose true trigger does not fire additively: a success for every method, literally.
        row("troj", "true", 0.0), row("troj", "pd", 0.0), row("troj", "elijah", 0.0), row("troj", "spread_only", 0.1),
        row("clean", "none", None, uni=10.0), row("clean", "pd", None, uni=9.0),
    ])
    b = write(tmp_path / "b", [row("bd", "true", 0.0), row("bd", "pd", 0.0)])  # a duplicate model: ignored
    models, notes = ic.collect([a, b])
    assert len(notes) == 2 and all("ignored" in n for n in notes)
    s = ic.summarise(models, zoo, "final_ode", 0.9)
    fam = {ln["model"]: ln["family"] for ln in s["models"]}
    assert fam == {"bd": "baddiffusion", "ode": "villan ode", "troj": "trojdiff patch d2i"}
    assert (s["all"]["pd"]["within"], s["all"]["pd"]["n"]) == (2, 3)
    assert (s["firing"]["pd"]["within"], s["firing"]["pd"]["n"]) == (1, 2)
    assert (s["firing"]["elijah"]["within"], s["firing"]["elijah"]["n"]) == (0, 2)
    assert (s["firing"]["by_sampler"]["within"], s["firing"]["by_sampler"]["n"]) == (2, 2)
    assert s["firing"]["by_sampler"]["mean_l2_in_mask"] == pytest.approx(4.0)   # pd's 3.0 and final_ode's 5.0
    assert s["firing"]["elijah_sized"]["n"] == 1                               # only where it was run
    assert s["firing"]["by_sampler"]["lower95"] == pytest.approx(0.05 ** 0.5)  # k = n = 2
    assert s["clean"] == [{"model": "clean", "none_uniformity": 10.0, "pd_uniformity_ratio": 0.9}]
    fams = s["firing_by_family"]
    assert set(fams) == {"baddiffusion / villan sde", "villan ode"}          # the TrojDiff model does not fire
    assert (fams["villan ode"]["pd"]["within"], fams["villan ode"]["by_sampler"]["within"]) == (0, 1)
    text = ic.table(s)
    extra = ic.summarise(models, zoo, "final_ode", 0.9, (*ic.METHODS, "spread_only"))
    assert (extra["all"]["spread_only"]["within"], extra["all"]["spread_only"]["n"]) == (1, 1)
    assert extra["firing"]["spread_only"]["n"] == 0 and "spread_only ASR" in ic.table(extra)
    assert "| by_sampler | 3/3 |" in text and "(final_ode)" in text and "| villan ode | 0/1 | 0/1 | - " not in text


def test_skip_leaves_models_out_and_names_unknown_ones(tmp_path, zoo):
    models, _ = ic.collect([write(tmp_path / "a", [row("bd", "true", 1.0), row("bd", "audit", 1.0),
                                                   row("ode", "true", 1.0, "ddim"), row("ode", "audit", 0.0, "ddim")])])
    s = ic.summarise(ic.skip(models, ["ode"]), zoo, "final_ode", 0.9, (*ic.METHODS, "audit"))
    assert [ln["model"] for ln in s["models"]] == ["bd"]
    assert (s["firing"]["audit"]["within"], s["firing"]["audit"]["n"]) == (1, 1)
    with pytest.raises(SystemExit, match="no evaluated model: nope"):
        ic.skip(models, ["nope"])


def test_refuses_mixed_settings(tmp_path):
    a = write(tmp_path / "a", [row("bd", "true", 1.0)])
    b = write(tmp_path / "b", [row("x", "true", 1.0, n=64)])
    with pytest.raises(SystemExit, match="different"):
        ic.collect([a, b])
    with pytest.raises(SystemExit, match="no evals"):
        ic.collect([tmp_path / "empty"])
