"""Lightning callbacks: ``PreciseBN`` (exact population statistics), ``BatchNormDoctor`` and
``FreezeBatchNorm``."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY: dict[str, str] = {
    "PreciseBN": "precise_bn",
    "BatchNormDoctor": "doctor",
    "FreezeBatchNorm": "freeze",
}

__all__ = sorted(_LAZY)

if TYPE_CHECKING:
    from lightning_norms.callbacks.doctor import BatchNormDoctor
    from lightning_norms.callbacks.freeze import FreezeBatchNorm
    from lightning_norms.callbacks.precise_bn import PreciseBN


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
