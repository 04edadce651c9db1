"""Functional core of lightning-norms: plain tensor functions, no modules, no Lightning.

Every layer in the package is a thin ``nn.Module`` over one of these functions:
``batch_renorm`` / ``renorm_limits`` (Batch Renormalization), ``domain_batch_norm`` /
``domain_batch_stats`` (domain-split BatchNorm, optionally synchronised across ranks),
``cosine_linear`` / ``cosine_conv2d`` (Cosine Normalization) and ``layer_norm2d``.
"""

from lightning_norms.functional._cosine import cosine_conv2d, cosine_linear
from lightning_norms.functional._domain import domain_batch_norm, domain_batch_stats
from lightning_norms.functional._layer_norm import layer_norm2d
from lightning_norms.functional._renorm import batch_renorm, renorm_limits

__all__ = [
    "batch_renorm",
    "cosine_conv2d",
    "cosine_linear",
    "domain_batch_norm",
    "domain_batch_stats",
    "layer_norm2d",
    "renorm_limits",
]
