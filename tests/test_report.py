"""The self-contained HTML scan report (pdjax.report): no models, no JAX compilation."""

import base64
import io
import os
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from pdjax.defense.detection import ModelVerdict
from pdjax.errors import ConfigError
from pdjax.images import display_scale
from pdjax.report import render_report, write_report

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class _Checker(HTMLParser):
    """Collects tags and checks that every non-void element is closed in order."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.errors, self.imgs, self.svgs, self.text = [], [], [], 0, []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs))
        if tag == "svg":
            self.svgs += 1
        if tag == "script":
            self.errors.append("script tag")
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs))

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}> with open {self.stack[-3:]}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def _verdict(name, backdoored, rng, size=16, channels=3, n=4, steps=30):
    trig = rng.uniform(-2, 2, (size, size, channels)).astype(np.float32)
    return ModelVerdict(
        model=name, backdoored=backdoored, score=1.25 if backdoored else -0.7,
        reason="generations from the inverted trigger collapse onto one image: ratio 0.1 <= threshold 0.3",
        features={"log_uni_ratio": -2.3, "uni_trig": 0.01, "uni_clean": 0.4, "final_loss": 0.05},
        trigger=trig, likely_target=rng.uniform(-1, 1, (size, size, channels)).astype(np.float32),
        triggered=rng.uniform(-1.2, 1.2, (n, size, size, channels)).astype(np.float32),
        clean=rng.uniform(-1.2, 1.2, (n, size, size, channels)).astype(np.float32),
        losses=np.exp(-np.linspace(0, 3, steps)).astype(np.float32), method="purediffusion", seconds=12.3,
        detector={"feature": "log_uni_ratio", "threshold": -1.2, "sign": -1})


SETTINGS = {"seed": 0, "inversion": {"method": "purediffusion", "steps": 40}, "samples": 4,
            "detector": "shipped <v1>", "pdjax": "0.1.0", "device": "cpu"}


def _parse(text):
    c = _Checker()
    c.feed(text)
    c.close()
    return c


def test_report_written_and_self_contained(tmp_path):
    rng = np.random.default_rng(0)
    evil = 'evil<script>alert("x")</script>&model'
    vs = [_verdict("models/badnet-box", True, rng), _verdict(evil, False, rng, channels=1, n=3, steps=1)]
    out = write_report(vs, tmp_path / "sub" / "report.html", SETTINGS, title="scan <test>")
    assert out == tmp_path / "sub" / "report.html" and out.is_file()
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]  # no temp file left behind
    text = out.read_text(encoding="utf-8")

    c = _parse(text)
    assert not c.errors, c.errors[:5]
    assert c.stack == [], c.stack
    assert len(c.imgs) == 5 * len(vs)  # trigger x2, likely target, triggered grid, clean grid
    assert all(i["src"].startswith("data:image/png;base64,") for i in c.imgs)
    assert c.svgs == len(vs)
    low = text.lower()
    for bad in ('src="http', "src='http", 'href="http', "href='http", "url(", "@import", "<script", "<link"):
        assert bad not in low, bad

    assert "models/badnet-box" in text
    assert "evil&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;model" in text
    assert "scan &lt;test&gt;" in text and "shipped &lt;v1&gt;" in text
    assert "backdoored" in text and "clean" in text
    assert "inversion step" in text and "loss" in text
    assert "1 backdoored" in "".join(c.text)

    # images decode, are upscaled for visibility, and keep their channel count
    first = Image.open(io.BytesIO(base64.b64decode(c.imgs[0]["src"].split(",", 1)[1])))
    s = 16 * display_scale(16)
    assert first.size == (s, s) and first.mode == "RGB"
    assert (int(c.imgs[0]["width"]), int(c.imgs[0]["height"])) == (s, s)
    grey = Image.open(io.BytesIO(base64.b64decode(c.imgs[5]["src"].split(",", 1)[1])))
    assert grey.mode == "L"


def test_report_states_the_probe_rule_when_it_applies():
    """With the probe's feature and a probe threshold, the rule line names both thresholds; otherwise one."""
    rng = np.random.default_rng(0)
    v = _verdict("m", True, rng)
    v.features["probe_log_uni_ratio"] = -0.9
    v.detector.update(probe_feature="probe_log_uni_ratio", probe_threshold=-0.416)
    text = render_report([v], SETTINGS)
    assert "or <code>probe_log_uni_ratio &lt; -0.416</code>" in text
    del v.features["probe_log_uni_ratio"]  # a scan without the probe: only the main rule applies
    assert "probe_log_uni_ratio &lt;" not in render_report([v], SETTINGS)
    v.features["terd_log_mr"] = -3.3  # the TERD rule fires above its threshold
    v.detector.update(terd_feature="terd_log_mr", terd_threshold=-4.1)
    assert "or <code>terd_log_mr &gt; -4.1</code>" in render_report([v], SETTINGS)


def test_report_names_the_inversion_the_evidence_comes_from():
    """A verdict decided on the spread (or probe) inversion's trigger says so; the main inversion's does not."""
    import dataclasses

    v = _verdict("m", True, np.random.default_rng(0))
    assert "trigger from the" not in render_report([v], SETTINGS)
    assert "trigger from the spread inversion" in render_report([dataclasses.replace(v, candidate="spread")], SETTINGS)


def test_report_tolerates_degenerate_inputs(tmp_path):
    rng = np.random.default_rng(1)
    v = _verdict("m", True, rng)
    v.trigger = np.zeros((16, 16, 3), np.float32)  # constant trigger: min-max view must not divide by 0
    v.losses = np.array([np.nan, np.inf, 2.0, 1.0], np.float32)
    w = _verdict("empty", False, rng)
    w.triggered = np.zeros((0, 16, 16, 3), np.float32)
    w.losses = np.array([], np.float32)
    text = render_report([v, w], {}, title="t")
    c = _parse(text)
    assert not c.errors and c.stack == []
    assert c.svgs == 1 and "non-finite" in text and "no finite loss" in text
    assert len(c.imgs) == 5 + 4


def test_unwritable_path_is_config_error(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    vs = [_verdict("m", False, np.random.default_rng(2))]
    with pytest.raises(ConfigError, match="file.txt"):
        write_report(vs, blocker / "report.html", SETTINGS)
    (tmp_path / "adir").mkdir()
    with pytest.raises(ConfigError, match="adir"):  # the target is a folder
        write_report(vs, tmp_path / "adir", SETTINGS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "file.txt"]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs a non-root POSIX user")
def test_read_only_folder_is_config_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match="writable"):
            write_report([_verdict("m", True, np.random.default_rng(3))], ro / "r.html", SETTINGS)
    finally:
        ro.chmod(0o700)
