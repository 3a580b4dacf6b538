"""Writes docs/api.md, the API reference, from the package's own signatures and docstrings.

The reference is generated so it cannot drift from the code: every public name
(``__all__``) of the modules in :data:`MODULES` is listed with its signature and
docstring, classes with their public methods and properties. Docstrings are
turned into Markdown lightly: Google-style sections (``Args:``, ``Returns:``,
...) become bold headings with their entries as lists, doctest examples and
``::`` literal blocks become fenced code, Sphinx roles become code spans.

Run it from the repository root after changing a public docstring::

    python docs/gen_api.py            # rewrites docs/api.md
    python docs/gen_api.py --check    # exit 1 if docs/api.md is stale

``tests/test_examples.py`` fails when the committed file is stale.

Why not pdoc, Sphinx (autodoc + napoleon) or mkdocstrings: none is a
dependency of the package or of its tests, and each would be one more to pin
and install in CI only to write this page; the standard library's ``pydoc``
writes plain text or HTML, not Markdown. Those tools build a site (HTML) with
a theme; what this project wants is one Markdown file that reads as it is on
GitHub, sits in the repository beside the guide, and that a plain test can
compare with the code, so a changed signature without a regenerated page fails
the ordinary test run. The docstrings follow the Google style those tools
read, so moving to one later costs only this script.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import os
import re
import sys
import types
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

API_MD = Path(__file__).resolve().parent / "api.md"

#: (module, title) in the order they appear; each module's ``__all__`` is listed,
#: skipping objects already documented under an earlier module.
MODULES = (
    ("neutra_flows", "The top-level API (`import neutra_flows as nf`)"),
    ("neutra_flows.targets", "Targets"),
    ("neutra_flows.models", "Built-in targets and models"),
    ("neutra_flows.models.gym", "inference_gym's benchmark models"),
    ("neutra_flows.derived", "Derived quantities with their own truth"),
    ("neutra_flows.bijectors", "Flow bijectors"),
    ("neutra_flows.adaptation", "Adapting a flow on the warm-up draws"),
    ("neutra_flows.whitening", "The whitening stage"),
    ("neutra_flows.independence", "Independence proposals from the flow"),
    ("neutra_flows.psis", "Pareto-smoothed importance sampling"),
    ("neutra_flows.diagnostics", "Diagnostics"),
    ("neutra_flows.plots", "Plots"),
    ("neutra_flows.app.bench", "The benchmark pipeline"),
    ("neutra_flows.app.suite", "The real-model suite"),
)

_SECTION = re.compile(
    r"(Args|Arguments|Keyword Args|Returns|Yields|Raises|Attributes|Example|Examples|Note|Notes"
    r"|References|Shapes?|Warning|See Also)\s*:"
)
_TFP = ("bijectors", "distributions", "mcmc")
_ITEM_SECTIONS = {"Args", "Arguments", "Keyword Args", "Raises", "Attributes"}
_ROLE = re.compile(r":(?:func|class|meth|attr|data|mod|obj|exc|const|ref):`~?([^`]+)`")
_MATH = re.compile(r":math:`([^`]+)`")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_FENCE = re.compile(r"(```.*?```)", re.DOTALL)


# -- docstrings to Markdown ---------------------------------------------------------------


def _inline(text: str) -> str:
    """Sphinx roles and RST double backticks to Markdown code spans."""

    def role(match: re.Match) -> str:
        name = match.group(1)
        # ``~a.b.c`` shows ``c`` in Sphinx; keep the full dotted name otherwise.
        shown = name.split(".")[-1] if match.group(0).count("~") else name
        return f"`{shown}`"

    text = _MATH.sub(lambda m: f"${m.group(1)}$", text)
    text = _ROLE.sub(role, text)
    return re.sub(r"``([^`]+?)``", r"`\1`", text)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _literal_block(lines: list[str], start: int, base: int) -> tuple[list[str], int]:
    """The indented block after a ``::`` line: ``(block lines, next index)``."""
    i = start
    while i < len(lines) and not lines[i].strip():
        i += 1
    block: list[str] = []
    while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > base):
        block.append(lines[i])
        i += 1
    while block and not block[-1].strip():
        block.pop()
    cut = min((_indent(b) for b in block if b.strip()), default=0)
    return [b[cut:] for b in block], i


def docstring_to_markdown(doc: str | None) -> str:
    """A cleaned docstring (``inspect.getdoc``) as Markdown."""
    if not doc:
        return "*(no docstring)*"
    lines = doc.expandtabs().splitlines()
    out: list[str] = []
    section: str | None = None
    in_item = False
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        base = _indent(line)
        if not stripped:
            out.append("")
            in_item = False
            i += 1
            continue
        # NumPy-style heading: a title underlined with dashes.
        nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
        if len(nxt) >= 3 and set(nxt) == {"-"} and base == 0:
            out += [f"**{stripped}**", ""]
            section, in_item = stripped, False
            i += 2
            continue
        match = _SECTION.fullmatch(stripped)
        if match and base == 0:
            out += [f"**{match.group(1)}:**", ""]
            section, in_item = match.group(1), False
            i += 1
            continue
        if stripped.startswith(">>>"):
            block = []
            while i < len(lines) and lines[i].strip():
                block.append(lines[i][base:] if _indent(lines[i]) >= base else lines[i].strip())
                i += 1
            out += ["```python", *block, "```"]
            in_item = False
            continue
        if stripped.endswith("::"):
            lead = stripped[:-2].rstrip()
            if lead:
                out.append(_inline(lead) + ":")
            block, i = _literal_block(lines, i + 1, base)
            out += ["", "```text", *block, "```", ""]
            in_item = False
            continue
        if section in _ITEM_SECTIONS and base > 0:
            item = re.match(r"([\w*][\w*, .\[\]]*?)\s*:\s+(.*)$", stripped)
            if item and base <= 2:
                names = ", ".join(f"`{n.strip()}`" for n in item.group(1).split(","))
                out.append(f"- {names}: {_inline(item.group(2))}")
                in_item = True
            else:
                out.append(("  " if in_item else "") + _inline(stripped))
            i += 1
            continue
        if section is not None and section not in _ITEM_SECTIONS and base > 0 and base <= 2:
            out.append(_inline(stripped))
            i += 1
            continue
        out.append(_inline(line))
        i += 1
    text = "\n".join(out)
    # RST double backticks that span a line break; code fences are left alone.
    parts = _FENCE.split(text)
    parts = [p if p.startswith("```") else re.sub(r"``([^`]+?)``", r"`\1`", p) for p in parts]
    return re.sub(r"\n{3,}", "\n\n", "".join(parts)).strip()


# -- signatures -----------------------------------------------------------------------------


def _annotation(annotation: Any) -> str:
    if isinstance(annotation, str):
        return annotation
    return inspect.formatannotation(annotation)


def _default(value: Any) -> str:
    if isinstance(value, types.ModuleType):
        return value.__name__
    return _ADDRESS.sub("", repr(value))


def format_signature(name: str, obj: Any, *, drop_first: bool = False, is_class: bool = False) -> str:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return f"{name}(...)"
    params = list(sig.parameters.values())
    if drop_first and params and params[0].name in ("self", "cls"):
        params = params[1:]
    parts: list[str] = []
    star_done = False
    for p in params:
        if p.kind is p.KEYWORD_ONLY and not star_done:
            parts.append("*")
            star_done = True
        if p.kind is p.VAR_POSITIONAL:
            star_done = True
        prefix = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "")
        text = prefix + p.name
        if p.annotation is not p.empty:
            text += f": {_annotation(p.annotation)}"
        if p.default is not p.empty:
            text += f" = {_default(p.default)}" if p.annotation is not p.empty else f"={_default(p.default)}"
        parts.append(text)
        if p.kind is p.POSITIONAL_ONLY and (
            params.index(p) + 1 == len(params) or params[params.index(p) + 1].kind is not p.POSITIONAL_ONLY
        ):
            parts.append("/")
    returns = ""
    if sig.return_annotation is not sig.empty and not is_class:
        returns = f" -> {_annotation(sig.return_annotation)}"
    one_line = f"{name}({', '.join(parts)}){returns}"
    if len(one_line) <= 88:
        return one_line
    body = "".join(f"    {part},\n" for part in parts)
    return f"{name}(\n{body}){returns}"


# -- objects --------------------------------------------------------------------------------


def _constant_comment(module: types.ModuleType, name: str) -> str:
    """The ``#:`` comment lines right above ``name = ...`` in the module's source."""
    try:
        source = inspect.getsource(module).splitlines()
    except (OSError, TypeError):
        return ""
    for k, line in enumerate(source):
        if re.match(rf"{re.escape(name)}\s*(:[^=]+)?=", line):
            comments = []
            j = k - 1
            while j >= 0 and source[j].lstrip().startswith("#:"):
                comments.insert(0, source[j].lstrip()[2:].strip())
                j -= 1
            return " ".join(comments)
    return ""


def _document_constant(module: types.ModuleType, name: str, value: Any) -> list[str]:
    out = [f"### {name}", ""]
    comment = _constant_comment(module, name)
    if comment:
        out += [_inline(comment), ""]
    if isinstance(value, dict) and value and all(isinstance(v, str) for v in value.values()):
        out += ["| key | meaning |", "|---|---|"]
        for k, v in value.items():
            cell = _inline(v).replace("|", "\\|")
            out.append(f"| `{k}` | {cell} |")
    elif isinstance(value, dict):
        described = []
        for k, v in value.items():
            text = getattr(v, "description", None)
            described.append(f"- `{k}`" + (f": {_inline(str(text))}" if text else ""))
        out += [f"A dict with {len(value)} entries:", "", *described]
    else:
        out += ["```python", f"{name} = {_default(value)}", "```"]
    return out + [""]


def _members(cls: type) -> list[tuple[str, Any]]:
    members = []
    for name, raw in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(raw, (property, classmethod, staticmethod)) or inspect.isfunction(raw):
            members.append((name, raw))
    return members


def _public_name(cls: type) -> str:
    """Where a user reaches ``cls``: the first public class of its MRO, by its public path."""
    public = next((c for c in cls.__mro__ if not c.__name__.startswith("_")), object)
    for module_name, _ in MODULES:
        if getattr(importlib.import_module(module_name), public.__name__, None) is public:
            return f"{module_name}.{public.__name__}"
    tfp = importlib.import_module("tensorflow_probability")
    for sub in _TFP:
        if getattr(getattr(tfp, sub), public.__name__, None) is public:
            return f"tfp.{sub}.{public.__name__}"
    return f"{public.__module__}.{public.__qualname__}"


def _document_class(qualname: str, cls: type) -> list[str]:
    kind = "dataclass" if dataclasses.is_dataclass(cls) else "class"
    bases = [b for b in cls.__bases__ if b is not object]
    base_text = ""
    if bases:
        base_text = " (subclass of " + ", ".join(f"`{_public_name(b)}`" for b in bases) + ")"
    out = [f"### {qualname}", "", f"*{kind}*{base_text}", ""]
    out += ["```python", format_signature(qualname, cls, is_class=True), "```", ""]
    out += [docstring_to_markdown(inspect.getdoc(cls)), ""]
    for name, raw in _members(cls):
        if isinstance(raw, property):
            out += [f"#### {qualname}.{name}", "", "*property*", ""]
            doc = raw.fget.__doc__ if raw.fget is not None else None
            out += [docstring_to_markdown(inspect.cleandoc(doc)) if doc else "", ""]
            continue
        func = raw.__func__ if isinstance(raw, (classmethod, staticmethod)) else raw
        tag = {classmethod: "*classmethod*", staticmethod: "*staticmethod*"}.get(type(raw), "*method*")
        drop = not isinstance(raw, staticmethod)
        out += [f"#### {qualname}.{name}", "", tag, ""]
        out += ["```python", format_signature(f"{qualname}.{name}", func, drop_first=drop), "```", ""]
        doc = inspect.getdoc(func)
        if doc:
            out += [docstring_to_markdown(doc), ""]
    return out


def _document_function(name: str, func: Any) -> list[str]:
    out = [f"### {name}", "", "```python", format_signature(name, func), "```", ""]
    return out + [docstring_to_markdown(inspect.getdoc(func)), ""]


def render() -> str:
    """The whole of docs/api.md as a string (deterministic)."""
    seen: set[int] = set()
    toc: list[str] = []
    body: list[str] = []
    for module_name, title in MODULES:
        module = importlib.import_module(module_name)
        anchor = module_name.replace(".", "")
        toc.append(f"- [{title}: `{module_name}`](#{anchor})")
        body += [f"## {module_name}", "", f"*{title}.*", ""]
        doc = inspect.getdoc(module)
        if doc:
            body += [docstring_to_markdown(doc), ""]
        also: list[str] = []
        for name in module.__all__:
            obj = getattr(module, name)
            if isinstance(obj, types.ModuleType):
                also.append(f"[`{obj.__name__}`](#{obj.__name__.replace('.', '')}) (module)")
                continue
            if id(obj) in seen and (inspect.isclass(obj) or callable(obj)):
                also.append(f"[`{name}`](#{name.lower()})")
                continue
            toc.append(f"  - [{name}](#{name.lower()})")
            if inspect.isclass(obj):
                seen.add(id(obj))
                body += _document_class(name, obj)
            elif callable(obj):
                seen.add(id(obj))
                body += _document_function(name, obj)
            else:
                body += _document_constant(module, name, obj)
        if also:
            body += [f"Also public here, documented elsewhere: {', '.join(also)}.", ""]
    header = [
        "# API reference",
        "",
        "<!-- Generated by docs/gen_api.py from the package's signatures and docstrings. Do not edit",
        "     by hand: change the docstring, then run `python docs/gen_api.py`. -->",
        "",
        "Every public name of `neutra_flows` with its signature and docstring. The guide",
        "([guide.md](guide.md)) shows how the pieces fit together; [index.md](index.md)",
        "explains the ideas behind them.",
        "",
        *toc,
        "",
    ]
    text = "\n".join(header + body)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return "\n".join(line.rstrip() for line in text.splitlines()).strip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/api.md is stale")
    parser.add_argument("--output", type=Path, default=API_MD)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is stale: run python docs/gen_api.py", file=sys.stderr)
            return 1
        print(f"{args.output} is up to date")
        return 0
    args.output.write_text(text)
    print(f"wrote {args.output} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
