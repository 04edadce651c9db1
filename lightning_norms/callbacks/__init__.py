"""Lightning callbacks: ``PreciseBN`` (exact population statistics), ``BatchNormDoctor`` and
``FreezeBatchNorm``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_norms._shared import lazy_exports

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


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
