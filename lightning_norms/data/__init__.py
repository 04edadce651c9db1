"""Data tools that keep every batch a fair sample: batch mixing and the two-domain digits.

``MixingBatchSampler`` and ``mix_real_fake`` are plain PyTorch; ``TwoDomainDigits`` is a
LightningDataModule. Names resolve lazily, so importing the sampler never imports Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY: dict[str, str] = {
    "MixingBatchSampler": "sampler",
    "mix_real_fake": "gan",
    "TwoDomainDigits": "digits",
}

__all__ = ["MixingBatchSampler", "TwoDomainDigits", "mix_real_fake"]

if TYPE_CHECKING:
    from lightning_norms.data.digits import TwoDomainDigits
    from lightning_norms.data.gan import mix_real_fake
    from lightning_norms.data.sampler import MixingBatchSampler


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
