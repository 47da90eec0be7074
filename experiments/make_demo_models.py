"""Copy a small subset of the zoo into the package (float16) so the scanner runs with no download.

Command: python experiments/make_demo_models.py --zoo zoo [--names clean_base bd_box_x ...]
Writes pdjax/assets/demo/<name>/ (pdjax checkpoints, params stored as float16: ~1.3 MB per 649k-parameter
model; loading casts to float32) and pdjax/assets/demo/index.json with each model's label and attack.
Only models present in the zoo are copied; run experiments/build_zoo.py first.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from pdjax.model import load

DEMO = Path(__file__).resolve().parents[1] / "pdjax" / "assets" / "demo"
DEFAULT = ["clean_base", "bd_box_x", "villan_ode_stop_cat", "troj_blend_d2i_shoe"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, default=Path("zoo"))
    ap.add_argument("--names", nargs="*", default=DEFAULT)
    args = ap.parse_args()
    DEMO.mkdir(parents=True, exist_ok=True)
    index = {}
    for name in args.names:
        src = args.zoo / name
        if not (src / "pdjax.json").is_file():
            print(f"skip {name}: not in {args.zoo}")
            continue
        model = load(src)
        dst = DEMO / name
        shutil.rmtree(dst, ignore_errors=True)
        model.save(dst, dtype="float16")
        attack = model.meta.get("attack")
        index[name] = {"label": "backdoored" if attack else "clean", "attack": attack, "steps": model.meta.get("steps")}
        size = sum(f.stat().st_size for f in dst.rglob("*") if f.is_file())
        print(f"{name}: {index[name]['label']} ({size / 1e6:.1f} MB)")
    (DEMO / "index.json").write_text(json.dumps(index, indent=2))


if __name__ == "__main__":
    main()
