"""Griffe extension for the API reference: read the package's docstrings as written.

The package's docstrings follow the Google style with a few reStructuredText habits (as torch's
own docstrings do). Griffe's Google parser and Markdown know none of them, so this extension
rewrites each docstring's text before it is parsed:

- a singular ``Example:`` heading over a doctest (as the Google style guide writes it) becomes
  ``Examples:``; griffe only knows the plural and would render the doctest as plain Markdown.
- one ``Args:`` item for several parameters (``num_features, eps, momentum: as
  nn.BatchNorm2d``, as torch's docs write it) is repeated for each name, so every parameter
  gets its own row and is still checked against the signature.
- ``.. math::`` blocks become display math and ``:math:`x``` inline math (``\\[ \\]`` and
  ``\\( \\)``, which ``pymdownx.arithmatex`` hands to the vendored KaTeX).
- cross-reference roles (``:class:`~pkg.mod.Name```, ``:func:`name```) become code, the ``~``
  form showing the last name only, as Sphinx shows it.
- a title underlined with ``^^^`` (or ``===``, ``---``, ``~~~``) becomes a bold line.

and, once the whole package is loaded, tidies what the signatures and class headings show:

- a parameter whose default is a private module constant (``num_batches=_DEFAULT_NUM_BATCHES``)
  shows the constant's value (``200``; a sentinel ``_DefaultInt(200)`` shows its argument).
- a return annotation naming a private class of the package reads ``Self`` where it is the
  method's own class (a private base's ``from_batchnorm``), else that class's first public base.
- a base class that is private to the package (``_DomainBatchNorm``, or a class of a private
  module such as ``lightning_norms._base``) is replaced by its own bases, so a page names only
  classes a reader can import.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

PACKAGE = "lightning_norms"

_EXAMPLE_HEADING = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)
_SECTION = re.compile(r"^(\s*)(Args|Arguments|Parameters|Keyword Args):[ \t]*$")
_GROUPED_ITEM = re.compile(r"^(\s*)([A-Za-z_]\w*(?:, [A-Za-z_]\w*)+):(.*)$")
_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_XREF_ROLE = re.compile(r":(?:func|class|meth|attr|data|mod|obj|exc):`(~?)([^`]+)`")
_MATH_DIRECTIVE = re.compile(r"^(\s*)\.\. math::[ \t]*(.*)$")
_UNDERLINE = re.compile(r"^\s*([\^=~\-])\1{2,}\s*$")
_PRIVATE_CONSTANT = re.compile(r"^_[A-Za-z_]\w*$")


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


def _math_blocks(text: str) -> str:
    """Turn every ``.. math::`` directive and its indented body into a ``\\[ ... \\]`` block."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        directive = _MATH_DIRECTIVE.match(lines[i])
        if directive is None:
            out.append(lines[i])
            i += 1
            continue
        pad, body = directive.group(1), [directive.group(2)] if directive.group(2) else []
        i += 1
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > len(pad)):
            body.append(lines[i].strip())
            i += 1
        formula = " ".join(part for part in body if part)
        out.extend(["", f"{pad}\\[", f"{pad}{formula}", f"{pad}\\]", ""])
    return "\n".join(out)


def _underlined_titles(text: str) -> str:
    """Turn an RST title (a line underlined with ``^^^`` and the like) into a bold line."""
    lines = text.split("\n")
    out: list[str] = []
    for line in lines:
        title = out[-1].strip() if out else ""
        if _UNDERLINE.match(line) and title and len(line.strip()) >= len(title):
            out[-1] = out[-1].replace(title, f"**{title}**")
            continue
        out.append(line)
    return "\n".join(out)


def _xref(match: re.Match[str]) -> str:
    target = match.group(2)
    return f"`{target.rsplit('.', 1)[-1] if match.group(1) else target}`"


def rewrite(text: str) -> str:
    """The Markdown form of one docstring written with the habits listed above."""
    text = _EXAMPLE_HEADING.sub(r"\1Examples:", text)
    text = _math_blocks(text)
    text = _MATH_ROLE.sub(lambda m: f"\\({m.group(1)}\\)", text)
    text = _XREF_ROLE.sub(_xref, text)
    text = _underlined_titles(text)
    return _split_grouped_args(text)


def _is_private(path: str) -> bool:
    return path.startswith(f"{PACKAGE}.") and any(p.startswith("_") for p in path.split(".")[1:])


def _target(collection: Any, path: str) -> griffe.Object | None:
    try:
        obj = collection[path]
    except (KeyError, ValueError):
        return None
    try:
        return obj.final_target if obj.is_alias else obj
    except griffe.AliasResolutionError:
        return None


def _public_bases(cls: griffe.Class, collection: Any) -> list[Any]:
    """``cls``'s bases, each private one of the package replaced by its own public bases."""
    bases: list[Any] = []
    for base in cls.bases:
        path = getattr(base, "canonical_path", str(base))
        parent = _target(collection, path) if _is_private(path) else None
        public = isinstance(parent, griffe.Class)
        bases.extend(_public_bases(parent, collection) if public else [base])
    return bases


def _adopt_private_members(cls: griffe.Class, collection: Any) -> None:
    """Give ``cls`` what it inherits from the package's private bases (``__init__`` included).

    Once those bases are hidden, their ``__init__`` (the signature that ``merge_init_into_class``
    shows) and their public methods would be lost; each becomes a member of ``cls`` aliasing the
    base's, unless ``cls`` defines its own.
    """
    for base in cls.resolved_bases if cls.bases else []:
        if not _is_private(base.path):
            continue
        _adopt_private_members(base, collection)
        for name, inherited in base.members.items():
            if name not in cls.members and (name == "__init__" or not name.startswith("_")):
                cls.set_member(name, griffe.Alias(name, inherited, parent=cls))


def _public_annotation(obj: griffe.Object, annotation: Any, collection: Any) -> Any:
    """``annotation``, or for a private class of the package what a reader can name instead.

    The function's own class (a private base's ``from_batchnorm``) reads ``Self``, what the
    class method returns; any other private class reads as its first public base.
    """
    path = getattr(annotation, "canonical_path", "")
    if not _is_private(path):
        return annotation
    if obj.parent is not None and obj.parent.path == path:
        return "Self"
    cls = _target(collection, path)
    bases = _public_bases(cls, collection) if isinstance(cls, griffe.Class) else []
    return bases[0] if bases else annotation


def _constant_value(func: griffe.Function, name: str, collection: Any) -> str | None:
    """The value of the module constant ``name`` seen from ``func`` (a sentinel's argument)."""
    constant = _target(collection, f"{func.module.path}.{name}")
    value = getattr(constant, "value", None)
    if isinstance(value, griffe.ExprCall) and len(value.arguments) == 1:
        return str(value.arguments[0])
    return None if value is None else str(value)


class ExampleSections(griffe.Extension):
    """Rewrite RST habits in docstrings; show defaults' values and only public bases."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Rewrite the docstring of every loaded object once, before it is parsed."""
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        """With the whole package loaded: defaults' values, public bases."""
        if pkg.path == PACKAGE:
            self._tidy(pkg, loader.modules_collection)

    def _tidy(self, obj: griffe.Object, collection: Any) -> None:
        for member in obj.members.values():
            if member.is_alias:
                continue
            if isinstance(member, griffe.Class):
                _adopt_private_members(member, collection)
                member.bases = _public_bases(member, collection)
            if isinstance(member, griffe.Attribute):  # properties too
                member.annotation = _public_annotation(member, member.annotation, collection)
            if isinstance(member, griffe.Function):
                member.returns = _public_annotation(member, member.returns, collection)
                for parameter in member.parameters:
                    name = str(parameter.default)
                    if parameter.default is not None and _PRIVATE_CONSTANT.match(name):
                        parameter.default = _constant_value(member, name, collection) or name
            if isinstance(member, (griffe.Module, griffe.Class)):
                self._tidy(member, collection)
