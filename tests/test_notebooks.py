"""Every notebook in notebooks/ runs end to end at the smoke size and produces what it promises.

Each notebook is executed with nbclient in a fresh ``python3`` kernel (this interpreter: jupyter_client
replaces the kernelspec's ``python`` with ``sys.executable``, checked below) with ``PDJAX_NOTEBOOK_SMOKE=1``
(tiny models, 2-step inversions, n = 4 generations), ``JAX_PLATFORMS=cpu``, one CPU device (the suite's
8-fake-device flag is removed), ``--xla_backend_optimization_level=0`` (smoke programs run a few tiny steps,
so LLVM optimisation would only add compile time) and ``PDJAX_NOTEBOOK_OUT`` in a temporary folder. The
kernels share one JAX persistent compilation cache in a temporary folder, so a program that several notebooks
compile (the tiny PureDiffusion step is in all three) is compiled once per test session. Compilation dominates:
about 100 s of kernel CPU time for the three on the 2-core machine (printed with ``-s``).

After the notebook's own cells, the test appends a probe cell (never stored in the notebook) that prints a
JSON summary of the notebook's variables; the checks below are on that summary, on the displayed outputs
and on the files the notebook wrote. Stored notebooks must have no outputs (checked without a kernel). The
amplification stages the smoke run skips (brief backdoor, removal) run in a test marked slow.
"""

import json
import math
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NB_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(p.name for p in NB_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 600
DEMO_NAMES = ["bd_box_corner", "bd_glasses_cat", "clean_base"]

_PREFIX = ("import json as _json, resource as _resource, sys as _sys\n"
           "_usage = _resource.getrusage(_resource.RUSAGE_SELF)\n"
           "_probe = {'executable': _sys.executable, 'smoke': SMOKE, 'cpu_s': _usage.ru_utime + _usage.ru_stime}\n")
_SUFFIX = "\nprint('PDJAX_PROBE ' + _json.dumps(_probe))\n"

# Per notebook: code run in the kernel after the notebook, filling the dict ``_probe`` (JSON-serialisable).
PROBES = {
    "quickstart_audit.ipynb": """
_probe.update(
    backend=jax.default_backend(),
    models=sorted(verdicts),
    verdicts={n: {"backdoored": bool(v.backdoored), "score": float(v.score), "trigger": list(v.trigger.shape),
                  "triggered": list(v.triggered.shape), "clean": list(v.clean.shape), "losses": len(v.losses),
                  "log_uni_ratio": float(v.features["log_uni_ratio"]),
                  "consistent": bool(v.backdoored == detector.decide(v.features))} for n, v in verdicts.items()},
    report=str(report.absolute()), out=str(OUT.absolute()))
""",
    "inversion_research.ipynb": """
_probe.update(
    lambda_err=float(lambda_err), recorded_err=table.closed_form_rel_err, table_len=len(table),
    closed_999=float(closed_sde[999]),
    ode_ratio=float(np.max(np.abs(closed_ode / closed_sde - 2.0))),
    variants={n: {"method": r.method, "losses": [float(v) for v in r.losses], "trigger": list(r.trigger.shape)}
              for n, r in results.items()},
    ablation={f"{w:g}": [float(v) for v in r.losses] for w, r in ablation.items()},
    same_as_shift=bool(np.array_equal(ablation[0.0].trigger, results["pd shift"].trigger)),
    elijah_differs=bool(not np.allclose(results["elijah"].trigger, results["pd shift"].trigger)),
    candidates=list(candidates), gens=list(gens.shape), stats=stats)
""",
    "amplification.ipynb": """
from pdjax.amplify import FULL_FRAME_FLOOR
_probe.update(
    run_all=RUN_ALL, steps=res.steps, asr_amplified=res.asr_amplified, asr_plain=res.asr_plain,
    star_range=[float(res.trigger_star.min()), float(res.trigger_star.max())],
    star_is_clipped_inv=bool(np.allclose(res.trigger_star, np.clip(res.trigger_inv, FULL_FRAME_FLOOR, 1), atol=1e-6)),
    amplified_steps=int(amplified.meta["steps"]), plain_trigger=plain.meta["attack"]["trigger"],
    out=str(OUT.absolute()))
if RUN_ALL:
    _probe.update(brief_steps=int(trained.steps), removal={"steps": rem.steps, "asr_before": rem.asr_before,
                                                           "asr_after": rem.asr_after, "clean_mse": rem.clean_mse})
""",
}


def _kernel_env(tmp: Path, cache: Path, extra: dict | None = None) -> dict:
    env = dict(os.environ)
    flags = re.sub(r"--xla_(force_host_platform_device_count|backend_optimization_level)=\d+", "",
                   env.get("XLA_FLAGS", "")).split()
    # Smoke programs are tiny and run a few steps: LLVM optimisation would only add compile time (~30%).
    env["XLA_FLAGS"] = " ".join([*flags, "--xla_backend_optimization_level=0"])
    env.update(PDJAX_NOTEBOOK_SMOKE="1", PDJAX_NOTEBOOK_OUT=str(tmp / "out"), JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               PYTHONUNBUFFERED="1", **(extra or {}))
    env.pop("MPLBACKEND", None)  # the kernel's inline backend must show the figures
    return env


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("jax-compile-cache")


def _run(name: str, tmp: Path, cache: Path, extra_env: dict | None = None):
    """Execute notebook ``name`` plus its probe cell; returns (executed notebook, probe dict, seconds)."""
    nb = nbformat.read(NB_DIR / name, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(_PREFIX + PROBES[name].strip() + _SUFFIX))
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp)}})
    t0 = time.perf_counter()
    client.execute(env=_kernel_env(tmp, cache, extra_env))
    seconds = time.perf_counter() - t0
    text = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream")
    line = next((ln for ln in text.splitlines() if ln.startswith("PDJAX_PROBE ")), None)
    assert line is not None, f"{name}: the probe printed nothing: {text!r}"
    return nb, json.loads(line[len("PDJAX_PROBE "):]), seconds


def _outputs(nb, kind: str) -> int:
    """How many outputs of MIME type ``kind`` the notebook's own cells displayed (the probe excluded)."""
    return sum(kind in o.get("data", {}) for c in nb.cells[:-1] if c.cell_type == "code" for o in c.outputs)


def _check_common(nb, probe):
    assert probe["smoke"] is True
    assert Path(probe["executable"]).resolve() == Path(sys.executable).resolve()  # the kernel is this interpreter
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors


def _finite(xs) -> bool:
    return all(math.isfinite(float(x)) for x in xs)


def check_quickstart(nb, probe):
    assert probe["backend"] == "cpu"
    assert probe["models"] == DEMO_NAMES  # the demo names, from the bundled index
    for name, v in probe["verdicts"].items():
        assert v["trigger"] == [8, 8, 1] and v["triggered"] == v["clean"] == [4, 8, 8, 1], name
        assert v["losses"] == 2 and math.isfinite(v["score"]) and math.isfinite(v["log_uni_ratio"]), name
        assert v["consistent"], name  # the verdict is the shipped detector's decision on the features
    # inline evidence: per model the trigger/target pair and two generation grids, plus the report iframe
    assert _outputs(nb, "image/png") == 3 * len(DEMO_NAMES)
    assert _outputs(nb, "text/html") >= 1
    report = Path(probe["report"])
    html = report.read_text()
    assert all(n in html for n in DEMO_NAMES) and "<img" in html
    out = Path(probe["out"])
    for n in DEMO_NAMES:
        for f in ("trigger.npy", "trigger.png", "triggered.png", "clean.png"):
            assert (out / n / f).is_file(), (n, f)
        assert np.load(out / n / "trigger.npy").shape == (8, 8, 1)


def check_inversion(nb, probe):
    # the notebook's comparison of the shipped BadDiffusion table with rho_t reproduces the table's own
    # self-check (within the band tests/test_shift.py allows); rho_999 ~ 0.5025 and the ODE form is 2 rho_t
    assert probe["table_len"] >= 50 and probe["lambda_err"] < 0.11
    assert abs(probe["lambda_err"] - probe["recorded_err"]) < 1e-5
    assert abs(probe["closed_999"] - 0.5025) < 1e-3 and probe["ode_ratio"] < 1e-9
    variants = probe["variants"]
    assert list(variants) == ["elijah", "pd shift", "pd shift + 1 cons"]
    assert variants["elijah"]["method"] == "elijah" and variants["pd shift"]["method"] == "purediffusion"
    for name, v in variants.items():
        assert len(v["losses"]) == 2 and _finite(v["losses"]) and v["trigger"] == [8, 8, 1], name
    assert probe["elijah_differs"]
    # ablation: w = 0 is the shift-only config with the same key, so the same trigger (determinism)
    assert set(probe["ablation"]) == {"0", "1"} and probe["same_as_shift"]
    assert probe["ablation"]["0"] == variants["pd shift"]["losses"]
    assert probe["ablation"]["1"] == variants["pd shift + 1 cons"]["losses"]
    # paired generations: true trigger, no trigger, the three variants (ablation duplicates left out)
    assert probe["candidates"] == ["true trigger g", "no trigger", *variants]
    assert probe["gens"] == [5, 4, 8, 8, 1]
    for name, s in probe["stats"].items():
        assert 0.0 <= s["asr"] <= 1.0 and s["uniformity"] >= 0 and _finite(s.values()), name
    assert probe["stats"]["true trigger g"]["l2_overall"] == 0.0
    assert _outputs(nb, "image/png") >= 6  # lambda plots, loss curves, triggers x2, ablation curves, generations


def check_amplification(nb, probe):
    assert probe["steps"] == [0, 1, 2]
    for curve in (probe["asr_amplified"], probe["asr_plain"]):
        assert len(curve) == 3 and all(0.0 <= a <= 1.0 for a in curve)
    lo, hi = probe["star_range"]
    assert np.float32(-0.99) <= lo <= hi <= 1.0 and probe["star_is_clipped_inv"]  # alpha 1: g* = clip(g_inv, -0.99, 1)
    assert probe["amplified_steps"] == 2 and probe["plain_trigger"] == "BOX_3"
    out = Path(probe["out"])
    for f in ("amplify/amplify.json", "amplify/asr.svg", "amplify/trigger_star.npy", "amplify/amplified/pdjax.json",
              "amplify/plain/pdjax.json"):
        assert (out / f).is_file(), f
    saved = json.loads((out / "amplify" / "amplify.json").read_text())
    assert saved["asr_amplified"] == probe["asr_amplified"] and saved["asr_plain"] == probe["asr_plain"]
    assert _outputs(nb, "image/svg+xml") == 1  # the ASR curves
    # triggers and both arms' generations; with the removal also its triggers and the cleaned model's generations
    assert _outputs(nb, "image/png") == (5 if probe["run_all"] else 3)
    if not probe["run_all"]:
        return
    assert probe["brief_steps"] == 2 and (out / "brief" / "pdjax.json").is_file()
    rem = probe["removal"]
    assert rem["steps"] == 2 and 0.0 <= rem["asr_before"] <= 1.0 and 0.0 <= rem["asr_after"] <= 1.0
    assert math.isfinite(rem["clean_mse"]) and rem["clean_mse"] >= 0.0
    assert (out / "removal" / "removal.json").is_file() and (out / "removal" / "model" / "pdjax.json").is_file()


CHECKS = {"quickstart_audit.ipynb": check_quickstart, "inversion_research.ipynb": check_inversion,
          "amplification.ipynb": check_amplification}


def test_every_notebook_has_checks():
    assert NOTEBOOKS, f"no notebooks in {NB_DIR}"
    assert set(NOTEBOOKS) == set(PROBES) == set(CHECKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_stored_without_outputs_and_smoke_switch_first(name):
    nb = nbformat.read(NB_DIR / name, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    for c in code:
        assert c.outputs == [] and c.execution_count is None, f"{name}: stored with outputs; clear them"
    assert 'os.environ.get("PDJAX_NOTEBOOK_SMOKE"' in code[0].source


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_at_smoke_size(name, tmp_path, compile_cache):
    nb, probe, seconds = _run(name, tmp_path, compile_cache)
    print(f"{name}: {seconds:.1f} s wall, kernel CPU {probe['cpu_s']:.1f} s")
    _check_common(nb, probe)
    CHECKS[name](nb, probe)


@pytest.mark.slow
def test_amplification_with_brief_backdoor_and_removal(tmp_path, compile_cache):
    """The stages the default smoke run skips (two more train-step compiles): PDJAX_NOTEBOOK_SMOKE_ALL=1."""
    nb, probe, _ = _run("amplification.ipynb", tmp_path, compile_cache, {"PDJAX_NOTEBOOK_SMOKE_ALL": "1"})
    _check_common(nb, probe)
    assert probe["run_all"]
    check_amplification(nb, probe)
