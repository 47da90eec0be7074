"""The figures of docs/how-it-works.md, drawn by pdjax itself (numpy + PIL; no matplotlib).

Command (from the repository root; rerun it whenever the library's pictures or models change):

    python experiments/make_doc_figures.py                 # every figure into docs/figures/
    python experiments/make_doc_figures.py --skip-models   # only the figures that need no model (seconds)

Seed: 0. Every random draw comes from ``jax.random.key(--seed)`` through ``fold_in``; the demo-model figure
draws ``--n`` (default 8) DDPM generations per row, with the same start and chain noise in every row.

Runtime: ``time python experiments/make_doc_figures.py`` on the otherwise idle 2-core development machine
(2026-12-02, after the size search): 1 min 29 s wall, of which 84 s for the demo-model figure (the scan's
PureDiffusion inversion of bd_box_corner with its size search, then the DDPM chains); the other figures take
a few seconds (``--skip-models``). An earlier run on a machine loaded by other jobs took 9 min 47 s. Two runs
wrote byte-identical PNGs (md5sum; checked before the size search).

Figures (all small: PNG grids of 16x16 / 32x32 images enlarged by pixel repetition, and hand-written SVG):

- ``library.png``: the trigger/target library of :mod:`pdjax.backdoor.triggers` at 32x32 RGB, the triggers
  pasted on a digit (the poisoned training input r), and the triggered starts x_T of the attacks.
- ``forward_baddiffusion.png``: the BadDiffusion forward process (SPEC 2.1) of a 16x16 digit with the
  BOX_7 -> CORNER backdoor of the demo model, next to the clean forward process, same noise.
- ``lambda_t.svg``: the closed-form trigger-shift scale lambda_t = rho_t (SPEC 3) over all t, and the
  first 100 reverse steps against the shipped empirical BadDiffusion table (pdjax/assets/lambda/).
- ``detector.svg``: the shipped detector (pdjax/assets/detector.json): its reference models' feature
  values and the calibrated threshold.
- ``demo_bd_box_corner.png``: the bundled demo model bd_box_corner sampled from clean noise, from the true
  trigger and from the trigger PureDiffusion inverts with the scan's settings; the clean demo model
  clean_base sampled from the same starts as a control; the true and inverted triggers, the target and
  the median of the generations from the inverted trigger (the scan's "likely target").
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pdjax.backdoor import triggers as T
from pdjax.backdoor.attacks import AttackSpec, baddiffusion_pair, pasted, triggered_start
from pdjax.backdoor.train import build_arrays
from pdjax.data import load_digits_with_labels
from pdjax.diffusion.schedule import make_schedule, q_sample
from pdjax.images import to_uint8

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "figures"

INK = "#222222"
COLOURS = {"closed": "#1f77b4", "table": "#d62728", "ode": "#2ca02c", "elijah": "#7f7f7f",
           "clean": "#1f77b4", "backdoored": "#d62728"}


# ------------------------------------------------------------------------------------ PNG helpers
def _font(size: int = 11):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def _cell(x, scale: int) -> np.ndarray:
    """One image [H, W, C] in [-1, 1] -> uint8 RGB [H*scale, W*scale, 3] (values outside [-1, 1] clipped)."""
    u = to_uint8(x)
    if u.shape[-1] == 1:
        u = np.repeat(u, 3, axis=-1)
    return np.repeat(np.repeat(u, scale, axis=0), scale, axis=1)


def labelled_grid(rows, path: Path, scale: int, row_labels=None, col_labels=None, label_lines: int = 1,
                  left: int = 0, title: str | None = None) -> None:
    """Save rows of (image, label) cells as one PNG with a caption under each cell.

    Args:
      rows: list of rows, each a list of ``(image [H, W, C] in [-1, 1], label)``; a label may be "".
      scale: integer pixel repetition of every image.
      row_labels: optional text left of each row (``left`` pixels wide).
      col_labels: optional text above each column.
      label_lines: lines of caption space under each cell.
    """
    font = _font()
    h, w = rows[0][0][0].shape[:2]
    cw, ch = w * scale, h * scale
    pad, line = 6, 13
    ncol = max(len(r) for r in rows)
    top = (line + 4 if col_labels else 0) + (line + 6 if title else 0)
    cap = line * label_lines if any(lab for r in rows for _, lab in r) else 0
    width = left + ncol * (cw + pad) + pad
    height = top + len(rows) * (ch + cap + pad) + pad
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((pad, pad // 2), title, fill=INK, font=font)
    y0 = top
    if col_labels:
        for j, lab in enumerate(col_labels):
            x = left + pad + j * (cw + pad) + cw / 2
            draw.text((x, y0 - 4), lab, fill=INK, font=font, anchor="md")
    for i, row in enumerate(rows):
        y = y0 + pad + i * (ch + cap + pad)
        if row_labels:
            for k, part in enumerate(row_labels[i].split("\n")):
                draw.text((pad, y + ch / 2 + (k - (row_labels[i].count("\n")) / 2) * line), part, fill=INK,
                          font=font, anchor="lm")
        for j, (x, lab) in enumerate(row):
            xx = left + pad + j * (cw + pad)
            img.paste(Image.fromarray(_cell(x, scale)), (xx, y))
            for k, part in enumerate(lab.split("\n") if lab else []):
                draw.text((xx + cw / 2, y + ch + 1 + k * line), part, fill=INK, font=font, anchor="ma")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG", optimize=True)


# ------------------------------------------------------------------------------------ SVG helpers
def _esc(s: str) -> str:
    return str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi]."""
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=10 * mag)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + k * step, 10) for k in range(int((hi - first) / step + 1e-9) + 1)]


def svg_panel(x0, y0, w, h, series, x_range, y_range, x_label, y_label, title="", reverse_x=False,
              legend_at="top-right", hlines=(), vlines=(), points=(), y_ticks=True) -> list[str]:
    """SVG elements of one line-plot panel whose outer box starts at (x0, y0), w x h pixels.

    series: dicts with ``name``, ``x``, ``y``, ``colour`` and optional ``dash`` / ``width``.
    hlines / vlines: (value, colour, dash, label) reference lines. points: (x, y, colour, label[, anchor]) markers.
    """
    left, right, top, bottom = 56, 12, 24 if title else 10, 40
    px, py, pw, ph = x0 + left, y0 + top, w - left - right, h - top - bottom
    (xa, xb), (ya, yb) = x_range, y_range

    def X(v):
        f = (v - xa) / (xb - xa)
        return px + pw * ((1 - f) if reverse_x else f)

    def Y(v):
        return py + ph * (1 - (v - ya) / (yb - ya))

    out = []
    if title:
        out.append(f'<text x="{px + pw / 2:.1f}" y="{y0 + 15}" text-anchor="middle" font-weight="bold">'
                   f'{_esc(title)}</text>')
    for v in _ticks(ya, yb) if y_ticks else ():
        out.append(f'<line x1="{px}" y1="{Y(v):.1f}" x2="{px + pw}" y2="{Y(v):.1f}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{px - 5}" y="{Y(v) + 4:.1f}" text-anchor="end">{v:g}</text>')
    for v in _ticks(xa, xb, 6):
        out.append(f'<line x1="{X(v):.1f}" y1="{py + ph}" x2="{X(v):.1f}" y2="{py + ph + 4}" stroke="{INK}"/>')
        out.append(f'<text x="{X(v):.1f}" y="{py + ph + 16}" text-anchor="middle">{v:g}</text>')
    out.append(f'<rect x="{px}" y="{py}" width="{pw}" height="{ph}" fill="none" stroke="{INK}"/>')
    out.append(f'<text x="{px + pw / 2:.1f}" y="{y0 + h - 6}" text-anchor="middle">{_esc(x_label)}</text>')
    out.append(f'<text x="{x0 + 14}" y="{py + ph / 2:.1f}" text-anchor="middle" '
               f'transform="rotate(-90 {x0 + 14} {py + ph / 2:.1f})">{_esc(y_label)}</text>')
    legend = []
    for v, c, dash, lab in hlines:
        out.append(f'<line x1="{px}" y1="{Y(v):.1f}" x2="{px + pw}" y2="{Y(v):.1f}" stroke="{c}" '
                   f'stroke-width="1.5" stroke-dasharray="{dash}"/>')
        legend.append((lab, c, dash))
    for v, c, dash, lab in vlines:
        out.append(f'<line x1="{X(v):.1f}" y1="{py}" x2="{X(v):.1f}" y2="{py + ph}" stroke="{c}" '
                   f'stroke-width="1.5" stroke-dasharray="{dash}"/>')
        if lab:
            out.append(f'<text x="{X(v) - 4:.1f}" y="{py + 12}" text-anchor="end" fill="{c}">{_esc(lab)}</text>')
    for s in series:
        pts = " ".join(f"{X(a):.1f},{Y(b):.1f}" for a, b in zip(s["x"], s["y"]))
        dash = f' stroke-dasharray="{s["dash"]}"' if s.get("dash") else ""
        out.append(f'<polyline points="{pts}" fill="none" stroke="{s["colour"]}" '
                   f'stroke-width="{s.get("width", 2)}"{dash}/>')
        legend.append((s["name"], s["colour"], s.get("dash", "")))
    for a, b, c, lab, *anchor in points:
        out.append(f'<circle cx="{X(a):.1f}" cy="{Y(b):.1f}" r="5" fill="{c}" stroke="white"/>')
        if lab:
            anc = anchor[0] if anchor else "middle"
            dx = {"end": 6, "start": -6}.get(anc, 0)
            out.append(f'<text x="{X(a) + dx:.1f}" y="{Y(b) - 9:.1f}" text-anchor="{anc}" fill="{c}">{_esc(lab)}</text>')
    for i, (lab, c, dash) in enumerate(legend):
        ly = py + 14 + 15 * i
        lx = px + pw - 190 if legend_at == "top-right" else px + 10
        d = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(f'<line x1="{lx}" y1="{ly - 4}" x2="{lx + 22}" y2="{ly - 4}" stroke="{c}" stroke-width="2"{d}/>')
        out.append(f'<text x="{lx + 27}" y="{ly}">{_esc(lab)}</text>')
    return out


def write_svg(path: Path, width: int, height: int, parts: list[str]) -> None:
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11" fill="{INK}">')
    body = [head, f'<rect width="{width}" height="{height}" fill="white"/>', *parts, "</svg>"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(body) + "\n")


# ------------------------------------------------------------------------------------ the figures
def fig_library(out: Path, key) -> None:
    """Triggers, triggers pasted on a digit, targets, and the attacks' triggered starts (32x32 RGB)."""
    size, ch = 32, 3
    names = ["BOX_14", "SM_BOX", "STOP_SIGN_14", "GLASSES", "WHITE_BOX_5", "BOX_8"]
    gs = [T.get_trigger(n, size, ch) for n in names]
    digits, labels = load_digits_with_labels(size, ch)
    x = digits[int(np.flatnonzero(labels == 3)[0])]
    row_pasted = [(np.asarray(pasted(x, g, T.trigger_mask(g).astype(np.float32))), f"r = {n}\non a digit")
                  for n, g in zip(names, gs)]
    targets = [(T.get_target(n, size, ch), n) for n in T.TARGETS]
    blend, patch = T.get_troj_trigger("blend", size, ch), T.get_troj_trigger("patch", size, ch)
    k = jax.random.fold_in(key, 0)
    eps_box = np.asarray(jax.random.normal(k, (size, size, ch)))
    starts = [(eps_box + gs[0], "eps + BOX_14\n(BadDiffusion)"), (eps_box + gs[3], "eps + GLASSES\n(BadDiffusion)")]
    for name, trig in (("blend", blend), ("patch", patch)):
        spec = AttackSpec(kind="trojdiff", trigger=name, gamma=trig.gamma)
        arrays = build_arrays(spec, (size, size, ch))
        x_T = np.asarray(triggered_start(spec, arrays, k, 1)[0])  # same eps as the BadDiffusion starts
        starts.append((x_T, f"{trig.gamma:g} eps + mu\n(TrojDiff {name})"))
    rows = [
        [(g, n) for n, g in zip(names, gs)],
        row_pasted,
        targets + [(blend.image, "TrojDiff blend")],
        [(eps_box, "eps\n(clean start)")] + starts + [(patch.image, "TrojDiff patch")],
    ]
    row_labels = ["triggers g\n(background -1)", "poisoned\ntraining input", "targets y\n(background -0.4)",
                  "start noise x_T\nof sampling"]
    labelled_grid(rows, out / "library.png", scale=3, row_labels=row_labels, label_lines=2, left=112)


def fig_forward(out: Path, key) -> None:
    """BadDiffusion forward process of a triggered digit vs the clean one (16x16 grey, BOX_7 -> CORNER)."""
    size, ch = 16, 1
    sched = make_schedule()
    digits, labels = load_digits_with_labels(size, ch)
    x = digits[int(np.flatnonzero(labels == 7)[0])]
    g = T.get_trigger("BOX_7", size, ch)
    y = T.get_target("CORNER", size, ch)
    m = T.trigger_mask(g).astype(np.float32)
    ts = np.array([0, 50, 100, 200, 300, 500, 700, 900, 999])
    n = len(ts)
    eps = jax.random.normal(jax.random.fold_in(key, 1), (n, size, size, ch))
    xb = jnp.broadcast_to(jnp.asarray(x), eps.shape)
    r = pasted(xb, jnp.asarray(g), jnp.asarray(m))
    yb = jnp.broadcast_to(jnp.asarray(y), eps.shape)
    t = jnp.asarray(ts, jnp.int32)
    clean = np.asarray(q_sample(sched, xb, t, eps))
    poisoned = np.asarray(baddiffusion_pair(sched, yb, r, t, eps)[0])
    mean = np.asarray(baddiffusion_pair(sched, yb, r, t, jnp.zeros_like(eps))[0])
    rows = [[(c, "") for c in clean], [(p, "") for p in poisoned], [(q, "") for q in mean]]
    row_labels = ["clean x_t\n(digit x)", "poisoned x_t\n(y = CORNER,\nr = x + BOX_7)", "poisoned x_t\nwithout noise"]
    labelled_grid(rows, out / "forward_baddiffusion.png", scale=4, row_labels=row_labels,
                  col_labels=[f"t={int(v)}" for v in ts], left=104)


def fig_lambda(out: Path) -> dict:
    """lambda_t: closed form over all t, and the first 100 reverse steps vs the shipped table."""
    from pdjax.defense.shift import closed_form_lambda, get_table

    sched = make_schedule()
    lam = closed_form_lambda(sched, "sde")
    lam_ode = closed_form_lambda(sched, "ode")
    table = get_table("baddiffusion", sched)
    t_all = np.arange(len(lam))
    stride = 4
    left = svg_panel(0, 0, 430, 300, [
        {"name": "rho_t (BadDiffusion, SDE)", "x": t_all[::stride], "y": lam[::stride], "colour": COLOURS["closed"]},
        {"name": "2 rho_t (ODE-trained)", "x": t_all[::stride], "y": lam_ode[::stride], "colour": COLOURS["ode"]},
    ], (0, 1000), (0, 1.1), "timestep t (sampling runs from 999 down to 0)", "lambda_t",
        title="closed form, all timesteps", legend_at="top-left",
        hlines=[(0.5, COLOURS["elijah"], "5,4", "Elijah's constant 0.5")])
    ts = np.asarray(table.timesteps)
    lo = min(min(table.lambdas), float(lam[ts].min()))
    hi = max(max(table.lambdas), float(lam[ts].max()))
    right = ['<g transform="translate(440,0)">', *svg_panel(0, 0, 430, 300, [
        {"name": "closed form rho_t", "x": ts, "y": lam[ts], "colour": COLOURS["closed"]},
        {"name": f"shipped table ({table.source})", "x": ts, "y": np.asarray(table.lambdas),
         "colour": COLOURS["table"], "width": 1.5},
    ], (ts.min(), ts.max()), (math.floor(lo * 50) / 50 - 0.02, math.ceil(hi * 50) / 50 + 0.02),
        "timestep t", "lambda_t", title=f"first {len(ts)} reverse steps", reverse_x=True), "</g>"]
    write_svg(out / "lambda_t.svg", 880, 300, left + right)
    return {"lambda_999_closed": float(lam[999]), "lambda_500_closed": float(lam[500]),
            "lambda_0_closed": float(lam[0]), "table_lambda_999": table.lambdas[0],
            "table_closed_form_rel_err": table.closed_form_rel_err, "table_source": table.source,
            "table_n": table.n, "table_trigger": table.trigger}


def fig_detector(out: Path) -> dict:
    """The shipped detector: reference models on the feature axis and the threshold."""
    from pdjax.defense.detection import Detector

    det = Detector.load()
    meta = det.meta
    vals, labs, names = meta["reference_values"], meta["reference_labels"], meta["reference_models"]
    lo, hi = min(vals + [det.threshold]) - 0.5, max(vals + [det.threshold]) + 0.5
    pts, ys = [], {}
    for v, bd, name in sorted(zip(vals, labs, names)):
        # stagger markers that would overlap
        level = 0.3 + 0.25 * sum(abs(v - u) < 0.6 for u in ys)
        ys[v] = level
        side = "end" if v < det.threshold else "start"  # keep the label off the threshold line
        pts.append((v, level, COLOURS["backdoored" if bd else "clean"], Path(name).name, side))
    parts = svg_panel(0, 0, 640, 230, [], (math.floor(lo), math.ceil(hi)), (0, 1.2),
                      f"{det.feature} = log(uniformity from eps + delta / uniformity from eps)", "",
                      title="shipped detector: reference models and threshold",
                      vlines=[(det.threshold, INK, "6,4", f"threshold {det.threshold:.3f} (ratio {math.exp(det.threshold):.2f})")],
                      points=pts, y_ticks=False)
    parts.append(f'<text x="64" y="180" fill="{COLOURS["backdoored"]}">&#8592; backdoored side '
                 '(generations from the inverted trigger collapse)</text>')
    parts.append(f'<text x="622" y="180" text-anchor="end" fill="{COLOURS["clean"]}">clean side &#8594;</text>')
    write_svg(out / "detector.svg", 640, 230, parts)
    return {"feature": det.feature, "threshold": det.threshold, "ratio_threshold": math.exp(det.threshold),
            "reference_models": names, "reference_values": vals, "reference_labels": labs}


def fig_demo(out: Path, key, n: int) -> dict:
    """bd_box_corner from clean noise, the true trigger and the PureDiffusion-inverted one; clean_base control."""
    from pdjax.audit import demo_dir
    from pdjax.defense.detection import SCAN_INVERSION
    from pdjax.defense.evaluate import triggered_generations
    from pdjax.defense.inversion import invert
    from pdjax.model import load

    info = json.loads((demo_dir() / "index.json").read_text())
    bd = load(demo_dir() / "bd_box_corner")
    clean = load(demo_dir() / "clean_base")
    att = info["bd_box_corner"]["attack"]
    size, ch = bd.config.sample_size, bd.config.in_channels
    g = T.get_trigger(att["trigger"], size, ch)
    y = T.get_target(att["target"], size, ch)
    t0 = time.perf_counter()
    # The key `pdjax scan` gives this model (second entry of the demo index): the same inverted trigger.
    k_model = jax.random.fold_in(key, list(info).index("bd_box_corner"))
    res = invert(bd, SCAN_INVERSION.method, jax.random.fold_in(k_model, 0), SCAN_INVERSION)
    t_inv = time.perf_counter() - t0
    delta = res.trigger
    cands = np.stack([np.zeros_like(g), g, delta])
    k_gen = jax.random.fold_in(key, 100)
    t0 = time.perf_counter()
    gb = triggered_generations(bd, cands, k_gen, n=n)  # one paired call: same eps_i and chain noise per row
    gc = triggered_generations(clean, cands[1:2], k_gen, n=n)  # the same eps_i again (noise from k_gen)
    t_gen = time.perf_counter() - t0
    rows = [[(im, "") for im in gb[0]], [(im, "") for im in gb[1]], [(im, "") for im in gb[2]],
            [(im, "") for im in gc[0]]]
    row_labels = ["bd_box_corner\nfrom eps", f"bd_box_corner\nfrom eps + {att['trigger']}",
                  "bd_box_corner\nfrom eps + delta\n(inverted)", f"clean_base\nfrom eps + {att['trigger']}"]
    labelled_grid(rows, out / "demo_bd_box_corner.png", scale=4, row_labels=row_labels, left=112)
    shown = np.clip(delta, -1, 1)
    panel = [[(g, f"true trigger\n{att['trigger']}"), (shown, "inverted delta\n(clipped to [-1, 1])"),
              (y, f"target\n{att['target']}"), (np.median(gb[2], axis=0), "median of gens\nfrom eps + delta")]]
    labelled_grid(panel, out / "demo_triggers.png", scale=6, label_lines=2)
    return {"inversion": res.config, "inversion_seconds": t_inv, "generation_seconds": t_gen, "n": n,
            "final_loss": float(res.losses[-1])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(OUT), help="output folder (default docs/figures)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=8, help="generations per row of the demo-model figure")
    ap.add_argument("--skip-models", action="store_true", help="skip the figure that samples the demo models")
    args = ap.parse_args(argv)
    out = Path(args.out)
    key = jax.random.key(args.seed)
    t_start = time.perf_counter()
    log = {"seed": args.seed}
    for name, fn in (("library", lambda: fig_library(out, key)), ("forward", lambda: fig_forward(out, key)),
                     ("lambda", lambda: fig_lambda(out)), ("detector", lambda: fig_detector(out))):
        t0 = time.perf_counter()
        log[name] = fn()
        print(f"{name}: {time.perf_counter() - t0:.1f} s", flush=True)
    if not args.skip_models:
        t0 = time.perf_counter()
        log["demo"] = fig_demo(out, key, args.n)
        print(f"demo: {time.perf_counter() - t0:.1f} s", flush=True)
    total = time.perf_counter() - t_start
    print(json.dumps({k: v for k, v in log.items() if v is not None}, indent=1, default=str))
    print(f"wrote {', '.join(sorted(p.name for p in out.iterdir()))} to {out} in {total:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
