"""Self-contained HTML report of a backdoor scan (``pdjax scan``).

:func:`write_report` renders a list of :class:`pdjax.defense.detection.ModelVerdict` into one HTML
file with everything embedded: images are PNG ``data:`` URIs (Pillow, in memory), the inversion loss
curve is an inline SVG, the style is an inline ``<style>`` block. No JavaScript and no external
URL (CSS, fonts, images) is referenced, and a Content-Security-Policy ``<meta>`` forbids loading
any, so the file can be archived or mailed and opened offline.

Layout: a header with the scan settings, a summary table (model, verdict badge, score, reason,
seconds), then one section per model: verdict and reason, the inverted trigger (clipped to [-1, 1]
and min-max normalised), the likely target, grids of triggered and clean generations, the feature
table and the loss curve. Every user-provided string (model names, paths, settings) is HTML-escaped.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import math
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
from PIL import Image

from pdjax.errors import ConfigError
from pdjax.images import display_scale, grid, to_uint8

if TYPE_CHECKING:  # detection imports JAX; the report itself only needs numpy and Pillow
    from pdjax.defense.detection import ModelVerdict

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5em auto;max-width:1100px;
color:#222;padding:0 1em;line-height:1.4}
h1{margin-bottom:.2em}h2{margin-top:0}
table{border-collapse:collapse;margin:.5em 0}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}
td.num{text-align:right;font-variant-numeric:tabular-nums;font-family:ui-monospace,monospace}
tr.key td{background:#fff8d6}
.badge{display:inline-block;padding:.1em .6em;border-radius:.8em;color:#fff;font-weight:600;font-size:.9em}
.backdoored{background:#c62828}.clean{background:#2e7d32}
section.model{border:1px solid #ddd;border-radius:6px;padding:1em;margin:1.5em 0}
.figs{display:flex;flex-wrap:wrap;gap:1.2em;align-items:flex-start}
figure{margin:0}figcaption{font-size:.85em;color:#555;max-width:320px}
img{image-rendering:pixelated;image-rendering:crisp-edges;border:1px solid #ddd}
.muted{color:#666;font-size:.9em}
code{font-family:ui-monospace,monospace;font-size:.9em}
svg text{font-family:system-ui,sans-serif;font-size:11px;fill:#333}
"""

# default-src 'none': nothing may be fetched; only inline styles and data: images are allowed.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _esc(x) -> str:
    """HTML-escape ``str(x)`` (quotes too, so the result is safe inside attribute values)."""
    return html.escape(str(x), quote=True)


def _num(x, fmt: str = ".4g") -> str:
    """Format a number; non-numbers are shown as escaped text, non-finite values as ``nan`` / ``inf``."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return _esc(x)
    return format(v, fmt) if math.isfinite(v) else str(v)


def _png_data_uri(arr: np.ndarray) -> str:
    """Encode a uint8 image ``[H, W, C]`` (C = 1 or 3) as a ``data:image/png;base64,...`` URI."""
    arr = np.ascontiguousarray(arr, np.uint8)
    img = Image.fromarray(arr[..., 0], mode="L") if arr.shape[-1] == 1 else Image.fromarray(arr, mode="RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _upscale(arr: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour enlargement of ``[H, W, C]`` by an integer ``scale`` -> ``[H*s, W*s, C]``."""
    return np.repeat(np.repeat(arr, scale, axis=0), scale, axis=1) if scale > 1 else arr


def _as_hwc(x) -> np.ndarray | None:
    """``x`` as float32 ``[H, W, C]`` (``[H, W]`` -> grey ``[H, W, 1]``); None if missing or not an image."""
    if x is None:
        return None
    x = np.asarray(x, np.float32)
    if x.ndim == 2:
        x = x[..., None]
    if x.ndim != 3 or x.size == 0 or x.shape[-1] not in (1, 3):
        return None
    return x


def _minmax(x: np.ndarray) -> np.ndarray:
    """Rescale ``x`` linearly so its finite min/max become -1/+1 (constant or all-NaN input -> 0)."""
    finite = np.isfinite(x)
    if not finite.any():
        return np.zeros_like(x)
    lo, hi = float(x[finite].min()), float(x[finite].max())
    if hi - lo < 1e-12:
        return np.zeros_like(x)
    return np.where(finite, (x - lo) / (hi - lo) * 2.0 - 1.0, -1.0).astype(np.float32)


def _value_range(x: np.ndarray) -> str:
    finite = x[np.isfinite(x)]
    return f"[{_num(finite.min(), '.3g')}, {_num(finite.max(), '.3g')}]" if finite.size else "no finite values"


def _figure(uint8_img: np.ndarray, caption: str, alt: str) -> str:
    """An ``<figure>`` with an embedded PNG of a uint8 ``[H, W, C]`` image; ``caption`` is already HTML."""
    h, w = uint8_img.shape[:2]
    return (f'<figure><img src="{_png_data_uri(uint8_img)}" width="{w}" height="{h}" alt="{_esc(alt)}">'
            f"<figcaption>{caption}</figcaption></figure>")


def _placeholder(what: str) -> str:
    return f'<figure><p class="muted">{_esc(what)}: not available</p></figure>'


def _image_figure(x, caption: str, alt: str, normalise: bool = False) -> str:
    """Figure of one image ``[H, W, C]`` in [-1, 1] (clipped), or min-max normalised when ``normalise``."""
    img = _as_hwc(x)
    if img is None:
        return _placeholder(alt)
    shown = _minmax(img) if normalise else img
    return _figure(_upscale(to_uint8(shown), display_scale(max(img.shape[:2]))), caption, alt)


def _grid_figure(batch, caption: str, alt: str) -> str:
    """Figure of a batch ``[n, H, W, C]`` in [-1, 1] tiled by :func:`pdjax.images.grid` and upscaled."""
    if batch is None:
        return _placeholder(alt)
    b = np.asarray(batch, np.float32)
    if b.ndim == 3 and b.shape[0] > 0:  # [n, H, W] grey
        b = b[..., None]
    if b.ndim != 4 or b.shape[0] == 0 or b.shape[-1] not in (1, 3):
        return _placeholder(alt)
    g = _upscale(grid(b), display_scale(max(b.shape[1:3])))
    return _figure(g, f"{caption} ({b.shape[0]} images, clipped to [-1, 1])", alt)


def _loss_svg(losses, width: int = 520, height: int = 220) -> str:
    """Inline SVG line chart of a loss curve ``[S]`` (x: inversion step, y: loss).

    Non-finite values are left out (and counted in the caption); the y axis is logarithmic when all
    values are positive and span more than two decades. Returns a placeholder paragraph when there is
    no finite value to draw.
    """
    y = np.asarray(losses if losses is not None else [], np.float64).ravel()
    steps = np.arange(y.size)
    ok = np.isfinite(y)
    if not ok.any():
        return '<p class="muted">loss curve: no finite loss values recorded</p>'
    xs, ys = steps[ok], y[ok]
    log = bool(ys.min() > 0 and ys.max() / ys.min() > 100)
    ty = np.log10(ys) if log else ys
    lo, hi = float(ty.min()), float(ty.max())
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    ml, mr, mt, mb = 64, 16, 14, 40  # margins: left, right, top, bottom
    pw, ph = width - ml - mr, height - mt - mb
    xmax = max(int(steps[-1]), 1)

    def px(s):
        return ml + pw * s / xmax

    def py(v):
        return mt + ph * (1.0 - (v - lo) / (hi - lo))

    def ylabel(v):
        return _num(10.0 ** v if log else v, ".3g")

    pts = " ".join(f"{px(s):.1f},{py(v):.1f}" for s, v in zip(xs, ty))
    parts = [f'<svg width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img">',
             f"<title>inversion loss over {y.size} steps</title>",
             f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#999"/>']
    for frac in (0.0, 0.5, 1.0):  # y ticks + grid lines
        v = lo + frac * (hi - lo)
        yy = py(v)
        parts.append(f'<line x1="{ml}" y1="{yy:.1f}" x2="{ml + pw}" y2="{yy:.1f}" stroke="#e2e2e2"/>')
        parts.append(f'<text x="{ml - 6}" y="{yy + 4:.1f}" text-anchor="end">{ylabel(v)}</text>')
    for s in sorted({0, xmax // 2, xmax}):  # x ticks
        xx = px(s)
        parts.append(f'<line x1="{xx:.1f}" y1="{mt + ph}" x2="{xx:.1f}" y2="{mt + ph + 4}" stroke="#999"/>')
        parts.append(f'<text x="{xx:.1f}" y="{mt + ph + 16}" text-anchor="middle">{s}</text>')
    if xs.size == 1:
        parts.append(f'<circle cx="{px(xs[0]):.1f}" cy="{py(ty[0]):.1f}" r="3" fill="#1565c0"/>')
    parts.append(f'<polyline points="{pts}" fill="none" stroke="#1565c0" stroke-width="1.5"/>')
    parts.append(f'<text x="{ml + pw / 2:.1f}" y="{height - 6}" text-anchor="middle">inversion step</text>')
    parts.append(f'<text x="14" y="{mt + ph / 2:.1f}" text-anchor="middle" '
                 f'transform="rotate(-90 14 {mt + ph / 2:.1f})">loss{" (log scale)" if log else ""}</text>')
    parts.append("</svg>")
    note = f"final loss {_num(ys[-1])}"
    if (~ok).any():
        note += f"; {int((~ok).sum())} non-finite values left out"
    return f'<figure class="loss">{"".join(parts)}<figcaption>Inversion loss curve: {note}.</figcaption></figure>'


def _badge(backdoored: bool) -> str:
    word = "backdoored" if backdoored else "clean"
    return f'<span class="badge {word}">{word}</span>'


def _one_line(s) -> str:
    return " ".join(str(s).split())


def _setting_value(v) -> str:
    """A settings value as escaped HTML text (dataclasses and containers as compact JSON)."""
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        v = dataclasses.asdict(v)
    if isinstance(v, (dict, list, tuple)):
        return f"<code>{_esc(json.dumps(v, default=str, sort_keys=True))}</code>"
    if isinstance(v, float):
        return _num(v, ".6g")
    return _esc(v)


def _settings_table(settings: dict) -> str:
    if not settings:
        return '<p class="muted">no settings recorded</p>'
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_setting_value(v)}</td></tr>" for k, v in settings.items())
    return f'<table class="settings"><tbody>{rows}</tbody></table>'


def _summary_table(verdicts: Sequence["ModelVerdict"]) -> str:
    n_bd = sum(bool(v.backdoored) for v in verdicts)
    rows = []
    for i, v in enumerate(verdicts):
        rows.append(f'<tr><td><a href="#model-{i}">{_esc(v.model)}</a></td><td>{_badge(v.backdoored)}</td>'
                    f'<td class="num">{_num(v.score, "+.3f")}</td><td>{_esc(_one_line(v.reason))}</td>'
                    f'<td class="num">{_num(v.seconds, ".1f")}</td></tr>')
    return (f"<p>{len(verdicts)} model(s) scanned: <strong>{n_bd} backdoored</strong>, "
            f"{len(verdicts) - n_bd} clean.</p>"
            '<table class="summary"><thead><tr><th>model</th><th>verdict</th><th>score</th><th>reason</th>'
            f'<th>seconds</th></tr></thead><tbody>{"".join(rows)}</tbody></table>')


def _features_table(features: dict, detector: dict) -> str:
    key = (detector or {}).get("feature")
    from pdjax.defense.detection import CLEAN_RULES

    clean_fitted = {}  # feature -> (threshold, rule name, direction) of the clean-fitted rules that applied
    for rule, (_, direction) in CLEAN_RULES.items():
        thr, k = (detector or {}).get(f"{rule}_threshold"), (detector or {}).get(f"{rule}_feature")
        if thr is not None and k in (features or {}):
            clean_fitted[k] = (thr, rule, direction)
    rows = []
    for name, val in (features or {}).items():
        cls = ' class="key"' if name == key or name in clean_fitted else ""
        rows.append(f'<tr{cls}><td>{_esc(name)}</td><td class="num">{_num(val)}</td></tr>')
    det = ""
    if detector:
        either = "".join(f" or <code>{_esc(k)} {'&lt;' if d < 0 else '&gt;'} {_num(thr)}</code> (the {rule} "
                         "threshold, fitted on clean reference models)" for k, (thr, rule, d) in clean_fitted.items())
        det = ("<p class=\"muted\">Decision rule: backdoored when "
               f"<code>{_num(detector.get('sign', 1), '+.0f')} &#215; ({_esc(key)} &#8722; "
               f"{_num(detector.get('threshold'))}) &gt; 0</code>{either} (highlighted rows).</p>")
    return (f'<table class="features"><thead><tr><th>feature</th><th>value</th></tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>{det}')


def _model_section(i: int, v: "ModelVerdict") -> str:
    trig = _as_hwc(v.trigger)
    trig_range = _value_range(trig) if trig is not None else ""
    figs = [
        _image_figure(v.trigger, f"Inverted trigger, clipped to [-1, 1] (values {trig_range})", "trigger (clipped)"),
        _image_figure(v.trigger, "Inverted trigger, min-max normalised (shows faint triggers)",
                      "trigger (normalised)", normalise=True),
        _image_figure(v.likely_target, "Likely target: per-pixel median of the triggered generations",
                      "likely target"),
    ]
    start = getattr(v, "start", "ddpm")
    how = "" if start == "ddpm" else f" (start {start}: sampler[@noise scale])"
    grids = [_grid_figure(v.triggered, f"Generations from noise + trigger{how}", "triggered generations"),
             _grid_figure(v.clean, f"Generations from the same noise without trigger{how}", "clean generations")]
    return (f'<section class="model" id="model-{i}"><h2>{_esc(v.model)}</h2>'
            f"<p>{_badge(v.backdoored)} score <code>{_num(v.score, '+.3f')}</code> "
            f'<span class="muted">(&gt; 0 means backdoored; method {_esc(v.method)}{_candidate_note(v)}, '
            f"{_num(v.seconds, '.1f')} s)</span></p>"
            f"<p><strong>Why:</strong> {_esc(v.reason)}</p>"
            f'<h3>Trigger and target</h3><div class="figs">{"".join(figs)}</div>'
            f'<h3>Generations</h3><div class="figs">{"".join(grids)}</div>'
            f'<h3>Features</h3>{_features_table(v.features, v.detector)}'
            f"<h3>Inversion</h3>{_loss_svg(v.losses)}</section>")


def _candidate_note(v) -> str:
    """", trigger from the spread / probe / ball / terd inversion" when the evidence is not the scan's own inversion."""
    cand = getattr(v, "candidate", "main")
    return "" if cand == "main" else f", trigger from the {_esc(cand)} inversion"


def render_report(verdicts: Sequence["ModelVerdict"], settings: dict, title: str = "pdjax scan") -> str:
    """The report as one HTML string (see :func:`write_report`)."""
    verdicts = list(verdicts)
    body = "".join(_model_section(i, v) for i, v in enumerate(verdicts))
    return ("<!DOCTYPE html>\n"
            '<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{_esc(_CSP)}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>"
            f"<header><h1>{_esc(title)}</h1><h3>Settings</h3>{_settings_table(settings)}</header>"
            f"<main><h2>Summary</h2>{_summary_table(verdicts)}{body}</main></body></html>\n")


def write_report(verdicts: Sequence["ModelVerdict"], path: str | os.PathLike, settings: dict,
                 title: str = "pdjax scan") -> Path:
    """Write a self-contained HTML report of a scan and return its path.

    Args:
      verdicts: one :class:`~pdjax.defense.detection.ModelVerdict` per model; its images are float
        ``trigger`` / ``likely_target`` ``[H, W, C]`` and ``triggered`` / ``clean`` ``[n, H, W, C]``
        (about [-1, 1]; C = 1 or 3), ``losses`` ``[S]``.
      path: the HTML file to write; its parent folder is created if missing. Written atomically (a
        temporary file in the same folder, then :func:`os.replace`).
      settings: shown in the header (seed, inversion config, sample count, detector, version, device);
        values may be scalars, dicts, lists or dataclasses.
      title: the page title.

    Raises:
      ConfigError: the folder cannot be created or written, or ``path`` is a folder.
    """
    path = Path(path)
    text = render_report(verdicts, settings, title)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "x", encoding="utf-8") as f:  # "x": default permissions (0666 & ~umask)
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise ConfigError(f"cannot write report {path} ({e.strerror or type(e).__name__}); "
                          "choose a writable output folder") from None
    return path


__all__ = ["render_report", "write_report"]
