"""Griffe extension for the API reference: read the package's Google-style docstrings as written.

Two conventions of the package's docstrings that griffe's Google parser does not know:

- a singular ``Example:`` heading over a doctest (as the Google style guide writes it). Griffe
  only knows the plural ``Examples:`` and would render the doctest as plain Markdown, where an
  output such as ``[1, 2]`` reads as a link. The heading is renamed.
- one ``Args:`` item for several parameters (``num_features, eps, momentum: as
  nn.BatchNorm2d``, as torch's docs write it). The item is repeated for each name, so every
  parameter gets its own row and is still checked against the signature.

- Sphinx roles (``:func:`name```, ``:math:`x```): Markdown has none; the role is dropped and
  its target shown as code.

The rewrites happen on the docstring text, before it is parsed.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE_HEADING = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)
_SECTION = re.compile(r"^(\s*)(Args|Arguments|Parameters|Keyword Args):[ \t]*$")
_SPHINX_ROLE = re.compile(r":(?:func|class|meth|attr|data|mod|obj|exc|math):(`[^`]+`)")
_GROUPED_ITEM = re.compile(r"^(\s*)([A-Za-z_]\w*(?:, [A-Za-z_]\w*)+):(.*)$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _split_grouped_args(text: str) -> str:
    """Repeat every ``a, b, c: text`` item of an ``Args:`` section once per name."""
    lines = text.split("\n")
    out: list[str] = []
    section_indent: int | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        heading = _SECTION.match(line)
        if heading:
            section_indent = len(heading.group(1))
        elif line.strip() and section_indent is not None and _indent(line) <= section_indent:
            section_indent = None
        item = _GROUPED_ITEM.match(line) if section_indent is not None else None
        if item is None:
            out.append(line)
            i += 1
            continue
        block_end = i + 1
        while block_end < len(lines) and (
            not lines[block_end].strip() or _indent(lines[block_end]) > _indent(line)
        ):
            block_end += 1
        for name in item.group(2).split(", "):
            out.append(f"{item.group(1)}{name}:{item.group(3)}")
            out.extend(lines[i + 1 : block_end])
        i = block_end
    return "\n".join(out)


class ExampleSections(griffe.Extension):
    """Rename ``Example:`` headings, drop Sphinx roles, split grouped ``Args:`` items."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Rewrite the docstring of every loaded object once, before it is parsed."""
        if obj.docstring is not None:
            text = _EXAMPLE_HEADING.sub(r"\1Examples:", obj.docstring.value)
            text = _SPHINX_ROLE.sub(r"\1", text)
            obj.docstring.value = _split_grouped_args(text)
