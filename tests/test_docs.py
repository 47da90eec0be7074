"""The docs stay current: docs/cli.md and docs/api.md equal what experiments/make_docs.py generates now, every
CLI subcommand and option is documented, and every figure and page the docs link to exists.

Fast (a few seconds): it imports pdjax and reads files; nothing is compiled. When a test fails after a change
to the CLI, a docstring or a signature, run ``python experiments/make_docs.py`` and commit docs/.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
FIGURE_LIMIT = 100_000  # bytes: figures are committed, keep each small
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)|<img[^>]*\ssrc=\"([^\"]+)\"")


@pytest.fixture(scope="module")
def make_docs():
    spec = importlib.util.spec_from_file_location("make_docs", ROOT / "experiments" / "make_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def pages(make_docs):
    return make_docs.generated()


@pytest.mark.parametrize("name", ["cli.md", "api.md"])
def test_generated_page_is_current(pages, name):
    path = DOCS / name
    assert path.is_file(), f"{path} is missing; run `python experiments/make_docs.py`"
    assert path.read_text() == pages[name], f"docs/{name} is out of date; run `python experiments/make_docs.py`"


def test_every_subcommand_and_option_is_in_cli_md():
    from pdjax.cli import build_parser

    text = (DOCS / "cli.md").read_text()
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert sub.choices, "the parser has no subcommands"
    for name, parser in sub.choices.items():
        assert f"\n## pdjax {name}\n" in text, f"subcommand {name} is not documented in docs/cli.md"
        section = text.split(f"\n## pdjax {name}\n", 1)[1].split("\n## ", 1)[0]
        for action in parser._actions:
            for opt in action.option_strings:
                if opt not in ("-h", "--help"):
                    assert f"`{opt}`" in section, f"option {opt} of `pdjax {name}` missing from docs/cli.md"


def _local_links(md: Path) -> list[str]:
    links = []
    for m in LINK.finditer(md.read_text()):
        target = (m.group(1) or m.group(2)).split("#", 1)[0]
        if target and not re.match(r"^[a-z]+:", target):  # skip http:, mailto:, ...
            links.append(target)
    return links


def test_how_it_works_figures_exist_and_are_small():
    md = DOCS / "how-it-works.md"
    figures = [t for t in _local_links(md) if t.startswith("figures/")]
    assert len(figures) >= 4, "how-it-works.md should show the figures of experiments/make_doc_figures.py"
    for t in figures:
        path = DOCS / t
        assert path.is_file(), f"{md.name} shows {t}, which does not exist; run experiments/make_doc_figures.py"
        assert path.stat().st_size < FIGURE_LIMIT, f"{t} is {path.stat().st_size} bytes; keep figures small"


def test_local_links_of_every_page_resolve():
    for md in sorted(DOCS.glob("*.md")):
        for t in _local_links(md):
            assert (md.parent / t).exists(), f"{md.name} links to {t}, which does not exist"


def test_index_links_every_page():
    links = set(_local_links(DOCS / "index.md"))
    for md in sorted(DOCS.glob("*.md")):
        if md.name != "index.md":
            assert md.name in links, f"docs/index.md does not link to {md.name}"


def test_api_md_anchors_resolve():
    text = (DOCS / "api.md").read_text()
    ids = set(re.findall(r'<a id="([^"]+)"></a>', text))
    for target in re.findall(r"\]\(#([^)]+)\)", text):
        assert target in ids, f"docs/api.md links to #{target}, which no entry defines"
