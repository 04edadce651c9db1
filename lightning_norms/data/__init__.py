"""Data tools that keep every batch a fair sample: batch mixing and the two-domain digits.

``MixingBatchSampler`` and ``mix_real_fake`` are plain PyTorch; ``TwoDomainDigits`` is a
LightningDataModule. Names resolve lazily, so importing the sampler never imports Lightning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_norms._shared import lazy_exports

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


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
