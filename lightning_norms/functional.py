"""Functional core of lightning-norms: plain tensor functions, no modules, no Lightning.

Every layer in the package is a thin ``nn.Module`` over one of these functions.
"""

from __future__ import annotations

# --- Batch Renormalization, LayerNorm2d, Cosine Normalization (layers issue) ---

# --- Domain-split BatchNorm and synchronised batch statistics (domain issue) ---
