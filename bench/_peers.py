"""Peer implementations the benchmarks compare against (what a user would write instead)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class MaskedBatchNorms(nn.Module):
    """One ``nn.BatchNorm2d`` per domain applied to ``x[ids == d]``, scattered back.

    The ModuleList-of-BN a user writes for domain-specific BatchNorm without this package:
    a Python loop over domains, a boolean-mask gather per domain and an index-put back.
    """

    def __init__(self, num_features: int, num_domains: int) -> None:
        super().__init__()
        self.bns = nn.ModuleList(nn.BatchNorm2d(num_features) for _ in range(num_domains))

    def forward(self, x: Tensor, domain: Tensor) -> Tensor:
        out = torch.empty_like(x)
        for d, bn in enumerate(self.bns):
            mask = domain == d
            out[mask] = bn(x[mask])
        return out
