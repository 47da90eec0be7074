"""Generate docs/cli.md (from the argparse parser) and docs/api.md (from the public modules' docstrings).

Command (from the repository root):

    python experiments/make_docs.py            # rewrite docs/cli.md and docs/api.md
    python experiments/make_docs.py --check    # exit 1 and name the stale file if either is out of date

tests/test_docs.py asserts that the committed files equal what this script produces, so after changing a
CLI option, a docstring or a public signature, rerun the first command and commit the result.
Runtime: a few seconds (it imports pdjax; nothing is compiled, no randomness).

What is documented:
- cli.md: every subcommand of ``pdjax.cli.build_parser()`` in parser order, with its help, a usage line
  (argparse's own, at a fixed width of 100 columns so the file does not depend on the terminal) and one
  table row per argument (value kind or choices, default, help).
- api.md: every module under ``pdjax`` (a curated reading order first, any other module after it). A module
  that defines ``__all__`` contributes exactly those names; one without it contributes its public
  (non-underscore) classes and functions defined in the module itself, and its UPPER_CASE constants.
  Names a package re-exports from a submodule are listed with a link to the submodule's entry.
  Docstrings come from ``inspect.getdoc``. Signatures, dataclass fields and constant values are taken
  from the source text (``ast``) rather than from ``repr`` of the live objects, so that defaults read as
  written (``TrainConfig()``, ``Image.BILINEAR``) and the file does not change with library versions,
  memory addresses or the install path; ``inspect.signature`` is the fallback where no source exists.
  A constant's description is its ``#:`` comment (the line(s) above it) or its trailing ``#`` comment.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import io
import pkgutil
import re
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
USAGE_WIDTH = 100
GENERATED_BY = "python experiments/make_docs.py"

# Reading order of api.md; modules not listed here follow in alphabetical order.
MODULE_ORDER = [
    "pdjax", "pdjax.model", "pdjax.models", "pdjax.models.config", "pdjax.models.unet", "pdjax.models.convert",
    "pdjax.checkpoint", "pdjax.diffusion", "pdjax.diffusion.schedule", "pdjax.diffusion.samplers",
    "pdjax.generate", "pdjax.train", "pdjax.data", "pdjax.images", "pdjax.backdoor", "pdjax.backdoor.triggers",
    "pdjax.backdoor.attacks", "pdjax.backdoor.train", "pdjax.defense", "pdjax.defense.shift",
    "pdjax.defense.inversion", "pdjax.defense.evaluate", "pdjax.defense.detection", "pdjax.audit",
    "pdjax.amplify", "pdjax.reinforce", "pdjax.removal", "pdjax.metrics", "pdjax.report", "pdjax.loops", "pdjax.errors",
    "pdjax.configs", "pdjax.testing", "pdjax.cli",
]
# Modules without ``__all__`` whose public surface is narrower than "every public name".
ONLY = {"pdjax.cli": ["build_parser", "main"]}

_CONST = re.compile(r"^[A-Z][A-Z0-9_]*$")
_SECTION = re.compile(r"^(Args|Arguments|Attributes|Returns|Yields|Raises|Example|Examples|Note|Notes):\s*$")
_ROLE = re.compile(r":(?:func|class|mod|meth|data|attr|exc|obj):`(~?)([^`]+)`")


# ================================================================================================ CLI
def _value_kind(a: argparse.Action) -> str:
    if a.nargs == 0:
        return "flag"
    if a.choices:
        kind = " \\| ".join(f"`{c}`" for c in a.choices)
    elif a.metavar:
        kind = f"`{a.metavar}`"
    else:
        kind = {int: "int", float: "float"}.get(a.type, "text")
    if a.nargs == "+":
        kind += " (one or more)"
    elif a.nargs == "*":
        kind += " (zero or more)"
    return kind


def _default(a: argparse.Action) -> str:
    if a.required:
        return "required"
    if a.nargs == 0:
        return "on" if a.default is True else "off"
    if a.default is None or a.default == [] or a.default is argparse.SUPPRESS:
        return "-"
    return f"`{a.default}`"


def _cell_text(s) -> str:
    """One table cell: whitespace collapsed, ``<`` escaped outside code spans, ``|`` escaped."""
    return _md_text(" ".join(str(s or "").split())).replace("|", "\\|")


def _usage(p: argparse.ArgumentParser) -> str:
    fmt = argparse.HelpFormatter(prog=p.prog, width=USAGE_WIDTH)
    fmt.add_usage(p.usage, p._actions, p._mutually_exclusive_groups)
    return fmt.format_help().strip()


def _subcommands(parser: argparse.ArgumentParser):
    """[(name, help, subparser)] in the parser's order."""
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            helps = {c.dest: c.help for c in a._choices_actions}
            return [(name, helps.get(name, ""), sp) for name, sp in a.choices.items()]
    return []


def cli_markdown() -> str:
    from pdjax.cli import build_parser

    parser = build_parser()
    subs = _subcommands(parser)
    out = ["# Command-line reference", "",
           f"Generated from `pdjax.cli.build_parser()` by `{GENERATED_BY}`; do not edit by hand "
           "(`tests/test_docs.py` fails when this file is out of date).", "",
           f"{parser.description} `pdjax COMMAND --help` prints the same information. A user mistake (missing "
           "file, mismatched weights, unknown name, wrong shape) prints one line `error: ...` naming the problem "
           "and the fix, and exits with status 2.", "",
           "```text", _usage(parser), "```", "",
           "| command | what it does |", "|---|---|"]
    for name, help_, _ in subs:
        out.append(f"| [`{name}`](#pdjax-{name}) | {_cell_text(help_)} |")
    for name, help_, sp in subs:
        out += ["", f"## pdjax {name}", "", _cell_text(help_).replace("\\|", "|")]
        if sp.description:
            out += ["", sp.description]
        out += ["", "```text", _usage(sp), "```", "",
                "| argument | value | default | description |", "|---|---|---|---|"]
        for a in sp._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            names = ", ".join(f"`{o}`" for o in a.option_strings) or f"`{a.metavar or a.dest}`"
            out.append(f"| {names} | {_value_kind(a)} | {_default(a)} | {_cell_text(a.help)} |")
    return "\n".join(out) + "\n"


# ================================================================================================ API
def _modules() -> list:
    import pdjax

    names = {m.name for m in pkgutil.walk_packages(pdjax.__path__, "pdjax.")} | {"pdjax"}
    ordered = [m for m in MODULE_ORDER if m in names] + sorted(names - set(MODULE_ORDER))
    return [importlib.import_module(m) for m in ordered]


def _anchor(qualname: str) -> str:
    return qualname.replace(".", "-").lower()


def _md_text(text: str) -> str:
    """A docstring paragraph as markdown: Sphinx roles -> code spans; ``<`` and loose ``_`` escaped outside code."""
    text = _ROLE.sub(lambda m: f"``{m.group(2).split('.')[-1] if m.group(1) else m.group(2)}``", text)
    parts = re.split(r"(`+[^`]*?`+)", text)
    return "".join(p if p.startswith("`") else _plain(p) for p in parts)


def _plain(s: str) -> str:
    """Escape text outside code: ``<`` (HTML), and ``_`` that could start or end emphasis (``abar_{t-1}``)."""
    s = s.replace("<", "&lt;")
    return re.sub(r"(?<![A-Za-z0-9\\])_|_(?![A-Za-z0-9])", r"\\_", s)


def _section_items(lines: list[str]) -> list[str]:
    """Items of a Google-style section (a line at the base indent starts an item; deeper lines continue it)."""
    base = min(len(l) - len(l.lstrip()) for l in lines if l.strip())
    items: list[str] = []
    for line in lines:
        if not line.strip():
            continue
        if len(line) - len(line.lstrip()) <= base or not items:
            items.append(line.strip())
        else:
            items[-1] += " " + line.strip()
    return items


_ITEM = re.compile(r"^([A-Za-z_*][\w*.]*(?:\s*,\s*[A-Za-z_*][\w*.]*)*)(\s*\([^)]*\))?:\s(.*)$")


def _item(s: str) -> str:
    m = _ITEM.match(s)
    if m:
        return f"- `{m.group(1)}`{m.group(2) or ''}: {_md_text(m.group(3))}"
    return f"- {_md_text(s)}"


def docstring_markdown(doc: str | None) -> str:
    """Render a (Google-style) docstring as markdown; sections become bold labels with bullet lists."""
    if not doc:
        return ""
    lines = doc.splitlines()
    out: list[str] = []
    i = 0
    para: list[str] = []

    def flush():
        if para:
            block = "\n".join(para)
            if all(l.startswith("    ") or not l.strip() for l in para):
                out.append(block)  # an indented block: markdown shows it preformatted
            else:
                out.append(_md_text(block))
            para.clear()

    while i < len(lines):
        line = lines[i]
        m = _SECTION.match(line.strip())
        if m and (not line.startswith(" ")):
            flush()
            j = i + 1
            body = []
            while j < len(lines) and (not lines[j].strip() or lines[j].startswith(" ")):
                body.append(lines[j])
                j += 1
            while body and not body[-1].strip():
                body.pop()
            if body:
                items = _section_items(body)
                if all(_ITEM.match(it) for it in items):  # "name: description" entries -> a bullet list
                    text = "\n".join(_item(it) for it in items)
                else:  # free text (e.g. a Returns paragraph)
                    text = _md_text(" ".join(" ".join(body).split()))
                out.append(f"**{m.group(1)}:**\n\n" + text)
            i = j
            continue
        if not line.strip():
            flush()
        else:
            para.append(line)
        i += 1
    flush()
    return "\n\n".join(b for b in out if b.strip())


def _first_line(doc: str | None) -> str:
    if not doc:
        return ""
    return _cell_text(doc.strip().split("\n\n")[0])


class _Source:
    """The parsed source of one module: top-level definitions, constants and their comments."""

    def __init__(self, mod):
        self.ok = False
        try:
            self.text = inspect.getsource(mod)
        except (OSError, TypeError):
            return
        self.ok = True
        self.tree = ast.parse(self.text)
        self.lines = self.text.splitlines()
        self.defs = {n.name: n for n in self.tree.body
                     if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
        self.consts: dict[str, tuple[int, str, str]] = {}  # name -> (line, value source, comment)
        for node in self.tree.body:
            targets, value = [], None
            if isinstance(node, ast.Assign):
                targets, value = node.targets, node.value
            elif isinstance(node, ast.AnnAssign) and node.value is not None:
                targets, value = [node.target], node.value
            for tgt in targets:
                if isinstance(tgt, ast.Name):
                    self.consts[tgt.id] = (node.lineno, ast.unparse(value), self._comment(node))
                elif isinstance(tgt, ast.Tuple) and isinstance(value, ast.Tuple) and len(tgt.elts) == len(value.elts):
                    for t, v in zip(tgt.elts, value.elts):
                        if isinstance(t, ast.Name):
                            self.consts[t.id] = (node.lineno, ast.unparse(v), self._comment(node))

    def _comment(self, node) -> str:
        above, k = [], node.lineno - 2
        while k >= 0 and self.lines[k].strip().startswith("#:"):
            above.insert(0, self.lines[k].strip()[2:].strip())
            k -= 1
        if above:
            return " ".join(above)
        return self._trailing(node.lineno)

    def _trailing(self, lineno: int) -> str:
        """The ``# comment`` at the end of source line ``lineno`` (tokenized, so a ``#`` in a string is not one)."""
        line = self.lines[lineno - 1]
        if "#" not in line:
            return ""
        try:
            for tok in tokenize.generate_tokens(io.StringIO(line + "\n").readline):
                if tok.type == tokenize.COMMENT:
                    return tok.string.lstrip("#").strip()
        except (tokenize.TokenError, IndentationError, SyntaxError):
            pass  # the first line of a multi-line statement: no trailing comment taken
        return ""


def _arg_pieces(args: ast.arguments) -> list[str]:
    """The parameters of a def as written (``name: annotation = default``), one string each."""

    def one(a: ast.arg, default=None, star=""):
        text = star + a.arg + (f": {ast.unparse(a.annotation)}" if a.annotation else "")
        if default is not None:
            text += (" = " if a.annotation else "=") + ast.unparse(default)
        return text

    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    out = [one(a, d) for a, d in zip(positional, defaults)]
    if args.posonlyargs:
        out.insert(len(args.posonlyargs), "/")
    if args.vararg:
        out.append(one(args.vararg, star="*"))
    elif args.kwonlyargs:
        out.append("*")
    out += [one(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults)]
    if args.kwarg:
        out.append(one(args.kwarg, star="**"))
    return out


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    """``def name(params) -> returns`` from the source; one parameter per line when longer than 100 columns."""
    pieces = _arg_pieces(node.args)
    ret = f" -> {ast.unparse(node.returns)}" if node.returns else ""
    head = f"{'async ' if isinstance(node, ast.AsyncFunctionDef) else ''}def {node.name}("
    one = f"{head}{', '.join(pieces)}){ret}"
    if len(one) <= 100:
        return one
    return head + "\n" + "".join(f"    {p},\n" for p in pieces) + f"){ret}"


def _decorators(node) -> list[str]:
    return [f"@{ast.unparse(d)}" for d in node.decorator_list]


def _class_block(node: ast.ClassDef) -> str:
    bases = [ast.unparse(b) for b in node.bases] + [ast.unparse(k) for k in node.keywords]
    lines = _decorators(node) + [f"class {node.name}" + (f"({', '.join(bases)})" if bases else "") + ":"]
    fields = [ast.unparse(s) for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)]
    init = next((s for s in node.body if isinstance(s, ast.FunctionDef) and s.name == "__init__"), None)
    if fields:
        lines += [f"    {f}" for f in fields]
    elif init is not None:
        lines += ["    " + _signature(init).replace("\n", "\n    ")]
    else:
        lines += ["    ..."]
    return "\n".join(lines)


def _clean_repr(s: str) -> str:
    return re.sub(r" at 0x[0-9a-f]+", "", s)


def _class_doc(cls) -> str | None:
    """The class's own docstring: not a base class's, nor the signature dataclasses write when there is none."""
    doc = cls.__dict__.get("__doc__")
    if not doc or doc.startswith(f"{cls.__name__}("):
        return None
    return inspect.cleandoc(doc)


def _fallback_signature(name: str, obj) -> str:
    try:
        return f"{name}{_clean_repr(str(inspect.signature(obj)))}"
    except (TypeError, ValueError):
        return name


def _public_names(mod, src: _Source) -> list[str]:
    """The documented names of a module, in source order."""
    if mod.__name__ in ONLY:
        names = ONLY[mod.__name__]
    elif hasattr(mod, "__all__"):
        names = list(mod.__all__)
    else:
        names = []
        for n, obj in vars(mod).items():
            if n.startswith("_"):
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj) or (callable(obj) and hasattr(obj, "__wrapped__")):
                if getattr(obj, "__module__", None) == mod.__name__:
                    names.append(n)
            elif src.ok and n in src.consts and _CONST.match(n) and not inspect.ismodule(obj):
                names.append(n)

    def line(n):
        if src.ok and n in src.defs:
            return src.defs[n].lineno
        if src.ok and n in src.consts:
            return src.consts[n][0]
        return 10 ** 9

    return sorted(names, key=line) if not hasattr(mod, "__all__") else names


def _defined_here(mod, name: str, src: _Source) -> bool:
    obj = getattr(mod, name)
    if inspect.isclass(obj) or inspect.isfunction(obj) or hasattr(obj, "__wrapped__"):
        return getattr(obj, "__module__", None) == mod.__name__
    return src.ok and name in src.consts


def _member_blocks(cls, node: ast.ClassDef, qual: str, module: str) -> list[str]:
    out = []
    for s in node.body:
        if not isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef)) or s.name.startswith("_"):
            continue
        raw = cls.__dict__.get(s.name)
        decos = [d for d in _decorators(s) if d in ("@classmethod", "@staticmethod", "@property")]
        is_prop = isinstance(raw, property)
        sig = "\n".join(decos + [_signature(s)])
        doc = inspect.getdoc(raw.__func__ if isinstance(raw, (classmethod, staticmethod)) else raw) if raw else None
        title = f"`{qual}.{s.name}`" + (" (property)" if is_prop else "")
        block = [f'<a id="{_anchor(f"{module}.{qual}.{s.name}")}"></a>', "", f"#### {title}", "", "```python", sig, "```"]
        md = docstring_markdown(doc)
        if md:
            block += ["", md]
        out.append("\n".join(block))
    return out


def api_markdown() -> str:
    mods = _modules()
    sources = {m.__name__: _Source(m) for m in mods}
    registry: dict[tuple[str, int], str] = {}  # (name, id(obj)) -> "module.name" of the documenting entry
    sections: list[tuple[str, list[str], list[tuple[str, str]]]] = []  # (module, blocks, re-exports)

    for mod in mods:
        src = sources[mod.__name__]
        blocks, reexports = [], []
        for name in _public_names(mod, src):
            if not hasattr(mod, name):
                continue
            obj = getattr(mod, name)
            if not _defined_here(mod, name, src):
                reexports.append((name, obj))
                continue
            qual = f"{mod.__name__}.{name}"
            registry[(name, id(obj))] = qual
            head = [f'<a id="{_anchor(qual)}"></a>', ""]
            if inspect.isclass(obj):
                node = src.defs.get(name) if src.ok else None
                code = _class_block(node) if isinstance(node, ast.ClassDef) else f"class {_fallback_signature(name, obj)}"
                block = head + [f"### class `{name}`", "", "```python", code, "```"]
                md = docstring_markdown(_class_doc(obj))
                if md:
                    block += ["", md]
                blocks.append("\n".join(block))
                if isinstance(node, ast.ClassDef):
                    blocks += _member_blocks(obj, node, name, mod.__name__)
            elif callable(obj) and (inspect.isfunction(obj) or hasattr(obj, "__wrapped__")):
                node = src.defs.get(name) if src.ok else None
                sig = ("\n".join(_decorators(node) + [_signature(node)])
                       if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                       else f"def {_fallback_signature(name, obj)}")
                block = head + [f"### `{name}`", "", "```python", sig, "```"]
                md = docstring_markdown(inspect.getdoc(obj))
                if md:
                    block += ["", md]
                blocks.append("\n".join(block))
            else:
                _, value, comment = src.consts.get(name, (0, "", ""))
                block = head + [f"### `{name}`", ""]
                if value and len(value) <= 90 and "\n" not in value:
                    block += ["```python", f"{name} = {value}", "```"]
                else:  # too long to show: its type and, for a container, its keys
                    what = f"A `{type(obj).__name__}`"
                    if isinstance(obj, (dict, list, tuple, set, frozenset)):
                        keys = [k for k in obj if isinstance(k, (str, int))]
                        what += f" of {len(obj)} entries" + (": " + ", ".join(f"`{k}`" for k in keys[:16]) +
                                                             (", ..." if len(keys) > 16 else "") if keys else "")
                    block.append(what + ".")
                if comment:
                    block += ["", _md_text(comment)]
                blocks.append("\n".join(block))
        sections.append((mod.__name__, blocks, reexports))

    out = ["# Python API reference", "",
           f"Generated from the docstrings and signatures of the public modules by `{GENERATED_BY}`; do not edit "
           "by hand (`tests/test_docs.py` fails when this file is out of date). Shapes are NHWC, images in "
           "[-1, 1] unless a docstring says otherwise; the maths is in the project's SPEC "
           "(`../shared/SPEC.md` in the workspace) and in [how-it-works.md](how-it-works.md).", "",
           "A module with `__all__` is documented by exactly those names; otherwise by its public classes, "
           "functions and UPPER_CASE constants.", "", "## Modules", "",
           "| module | summary |", "|---|---|"]
    for mod in mods:
        out.append(f"| [`{mod.__name__}`](#{_anchor(mod.__name__)}) | {_first_line(inspect.getdoc(mod))} |")
    for (name, blocks, reexports), mod in zip(sections, mods):
        out += ["", f'<a id="{_anchor(name)}"></a>', "", f"## `{name}`", ""]
        md = docstring_markdown(inspect.getdoc(mod))
        if md:
            out += [md, ""]
        if reexports:
            out += ["Re-exported here:", "", "| name | defined in | summary |", "|---|---|---|"]
            for n, obj in reexports:
                qual = registry.get((n, id(obj)))
                where = f"[`{qual.rsplit('.', 1)[0]}`](#{_anchor(qual)})" if qual else f"`{getattr(obj, '__module__', '?')}`"
                summary = (_first_line(_class_doc(obj)) if inspect.isclass(obj) else
                           _first_line(inspect.getdoc(obj)) if callable(obj) else "")
                if not summary and qual:
                    src = sources[qual.rsplit(".", 1)[0]]
                    summary = _cell_text(src.consts.get(n, (0, "", ""))[2]) if src.ok else ""
                out.append(f"| `{n}` | {where} | {summary} |")
            out.append("")
        for b in blocks:
            out += [b, ""]
    text = _clean_repr("\n".join(out).rstrip() + "\n")
    return re.sub(r"\n{3,}", "\n\n", text)


# ================================================================================================ main
def generated() -> dict[str, str]:
    """{file name in docs/: content} of every generated page."""
    return {"cli.md": cli_markdown(), "api.md": api_markdown()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Generate docs/cli.md and docs/api.md.")
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 if a file is out of date")
    ap.add_argument("--out", default=str(DOCS), help="docs folder (default docs/)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    stale = []
    for name, text in generated().items():
        path = out / name
        current = path.read_text() if path.is_file() else None
        if current == text:
            continue
        stale.append(name)
        if not args.check:
            out.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    if args.check and stale:
        print(f"out of date: {', '.join(stale)}; run `{GENERATED_BY}`", file=sys.stderr)
        return 1
    if not stale:
        print("docs/cli.md and docs/api.md are up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
