"""Internals shared by several modules of the package: argument checks and lazy imports.

Nothing here imports torch or Lightning, so ``import lightning_norms`` (whose lazy names come
from :func:`lazy_exports`) stays cheap. The names have no leading underscore: the module is
private, the names are the package's own.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from numbers import Integral
from typing import Any

__all__ = ["IntTypeError", "check_int", "import_qualified", "lazy_exports"]


class IntTypeError(TypeError, ValueError):
    """A value that is not an ``int`` where one is expected (``bool`` included).

    A ``TypeError``, and a ``ValueError`` as the package's argument checks raised before one
    helper did them all.
    """


def check_int(
    name: str,
    value: Any,
    minimum: int | None = None,
    *,
    where: str = "",
    errors: tuple[type[Exception], type[Exception]] = (IntTypeError, ValueError),
) -> int:
    """``value`` as an ``int``, checked: an integer (not a ``bool``), ``>= minimum`` if given.

    Args:
        name: the argument's name, shown in backticks in the message.
        value: what the caller got.
        minimum: the smallest value allowed. Default: ``None`` (no bound).
        where: the caller, prefixed to the message (``"recompute_bn_stats"``). Default: ``""``.
        errors: the classes raised for a non-integer and for a value below ``minimum``
            (a callback passes Lightning's ``MisconfigurationException`` subclasses).
            Default: ``(IntTypeError, ValueError)``.

    Returns:
        ``int(value)`` (a numpy integer becomes a Python ``int``).

    Raises:
        IntTypeError: ``value`` is not an integer (a ``TypeError`` and a ``ValueError``).
        ValueError: ``value < minimum``.

    Example:
        >>> check_int("batch_size", 4, 1)
        4
        >>> check_int("seed", True, where="sampler")
        Traceback (most recent call last):
        ...
        lightning_norms._shared.IntTypeError: sampler: `seed` must be an int, got True
    """
    prefix = f"{where}: " if where else ""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise errors[0](f"{prefix}`{name}` must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise errors[1](f"{prefix}`{name}` must be >= {minimum}, got {value!r}")
    return int(value)


def import_qualified(name: str) -> Any:
    """The object a qualified name (``"torchvision.ops.misc.FrozenBatchNorm2d"``) names.

    Example:
        >>> import_qualified("collections.OrderedDict").__name__
        'OrderedDict'
    """
    module, _, attribute = name.rpartition(".")
    return getattr(importlib.import_module(module), attribute)


def lazy_exports(
    package: str, names: dict[str, str], submodules: Iterable[str] = ()
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A package's PEP 562 ``__getattr__`` and ``__dir__``: names imported when first used.

    ``names`` maps each public name to the submodule (relative to ``package``) defining it; a
    resolved name is cached in the package's namespace, so the lookup runs once.
    ``submodules`` are importable as attributes too. ``__dir__`` lists both, sorted.

    Example:
        >>> getattr_, dir_ = lazy_exports("lightning_norms", {"create_norm": "convert"})
        >>> getattr_("create_norm").__name__, dir_()
        ('create_norm', ['create_norm'])
    """
    modules = tuple(submodules)
    public = sorted([*names, *modules])

    def getattr_(name: str) -> Any:
        if name in names:
            value = getattr(importlib.import_module(f"{package}.{names[name]}"), name)
            vars(importlib.import_module(package))[name] = value
            return value
        if name in modules:
            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def dir_() -> list[str]:
        return list(public)

    return getattr_, dir_
