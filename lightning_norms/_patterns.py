"""Module-name patterns shared by ``convert_norms`` and ``FreezeBatchNorm``."""

from __future__ import annotations

from fnmatch import fnmatchcase

__all__ = ["name_matches"]


def name_matches(name: str, pattern: str) -> bool:
    """Whether ``fnmatch`` ``pattern`` matches module ``name`` or a module containing it.

    Names are ``named_modules()`` names; ``"backbone"`` matches ``"backbone.layer1.bn1"``
    (every layer inside ``backbone``) as well as ``"backbone"`` itself. Case-sensitive.

    Example:
        >>> name_matches("backbone.layer1.bn1", "backbone"), name_matches("head.bn", "back*")
        (True, False)
        >>> name_matches("layer4.0.bn1", "layer4*")
        True
    """
    parts = name.split(".")
    return any(fnmatchcase(".".join(parts[:i]), pattern) for i in range(1, len(parts) + 1))
