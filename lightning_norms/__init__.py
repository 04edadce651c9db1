"""lightning-norms: Batch Normalization made safe, and its alternatives.

Layers are plain ``torch.nn`` modules; ``import lightning_norms`` never imports Lightning.
Public names are resolved lazily (PEP 562), so ``NormSync`` (a Lightning plugin) only imports
Lightning when it is first touched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_norms._shared import lazy_exports

__version__ = "0.1.0"

_LAZY: dict[str, str] = {
    "BatchRenorm1d": "renorm",
    "BatchRenorm2d": "renorm",
    "BatchRenorm3d": "renorm",
    "LayerNorm2d": "layernorm",
    "CosineLinear": "cosine",
    "CosineConv2d": "cosine",
    "convert_norms": "convert",
    "create_norm": "convert",
    "bn_modules": "convert",
    "fold_norms": "fold",
    "FoldReport": "fold",
    "DomainBatchNorm1d": "domain_bn",
    "DomainBatchNorm2d": "domain_bn",
    "DomainBatchNorm3d": "domain_bn",
    "domain": "domain_bn",
    "NormSync": "plugins",
}

_SUBMODULES = ("functional", "stats", "callbacks", "data")

__all__ = sorted([*_LAZY, *_SUBMODULES])

if TYPE_CHECKING:
    from lightning_norms.convert import bn_modules, convert_norms, create_norm
    from lightning_norms.cosine import CosineConv2d, CosineLinear
    from lightning_norms.domain_bn import (
        DomainBatchNorm1d,
        DomainBatchNorm2d,
        DomainBatchNorm3d,
        domain,
    )
    from lightning_norms.fold import FoldReport, fold_norms
    from lightning_norms.layernorm import LayerNorm2d
    from lightning_norms.plugins import NormSync
    from lightning_norms.renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, _SUBMODULES)
