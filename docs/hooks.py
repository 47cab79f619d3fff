"""MkDocs hook: the method sheet's per-method sections come from the registry and the method files.

``<!-- registry -->`` in a page becomes one section per registered method (oldest paper first): the paper
with its link, the authors' settings, vlat's defaults and command-line options, and the method module's
docstring (formula, what the authors' code does, where vlat deviates). A new method file therefore
appears in the docs without editing them.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

MARKER = "<!-- registry -->"
ROLE = re.compile(r":(?:meth|func|class|mod|attr|data):`~?([^`]+)`")


def _plain(doc: str) -> str:
    """A method module's docstring as Markdown: Sphinx roles become code, doctest lines a code block, and
    the first paragraph (title, authors, links) is dropped (the section heading says it)."""
    doc = ROLE.sub(lambda m: f"`{m.group(1).split('.')[-1]}`", doc)
    paragraphs = doc.strip().split("\n\n")
    out, fence = [], False
    for line in "\n\n".join(paragraphs[1:]).splitlines():
        doctest = line.startswith(">>>") or line.startswith("...")
        if doctest and not fence:
            out.append("```python")
            fence = True
        elif not doctest and fence:
            out.append("```")
            fence = False
        out.append(line.split("# doctest")[0].rstrip() if doctest else line)
    if fence:
        out.append("```")
    return "\n".join(out)


def _defaults(cls) -> str:
    shown = []
    for f in dataclasses.fields(cls):
        if not f.init or f.name in ("trace", "scales"):
            continue
        value = f.default if f.default is not dataclasses.MISSING else None
        shown.append(f"`{f.name}={value!r}`" if not isinstance(value, float) else f"`{f.name}={value:.4g}`")
    return ", ".join(shown)


def method_sections() -> str:
    root = Path(__file__).resolve().parents[1]
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from vlat.adversarial import registry

    parts, seen = [], {}
    for spec in registry.specs():
        p = spec.paper
        lines = [f"## {spec.label} {{#{spec.anchor}}}", "",
                 f"**{p.authors}**, [*{p.title}*]({p.url}), {p.venue} {p.year}.", "",
                 f"{spec.summary[0].upper()}{spec.summary[1:]}.", "",
                 "| the authors' setting | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in spec.reference.items()]
        flags = ", ".join(f"`{o.cli}` ({o.help})" for o in spec.options) or "none beyond the common ones"
        lines += ["", f"**In vlat:** `vlat train --method {spec.name}` · class `vlat.adversarial.{spec.cls.__name__}` · "
                  f"defaults {_defaults(spec.cls)}.", "",
                  f"Options: `--sites`, `--norm`, `--eps`, `--step-size` and {flags}. In the explorer, *steps* sets "
                  f"{spec.steps_mean}.", ""]
        module = spec.cls.__module__
        if module in seen:
            lines.append(f"Shares its implementation and notes with [{seen[module]}](#{registry.get(seen[module]).anchor}).")
        else:
            seen[module] = spec.label
            lines.append(_plain(sys.modules[module].__doc__ or ""))
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, method_sections())
    return markdown
