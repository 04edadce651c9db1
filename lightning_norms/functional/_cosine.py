"""Cosine Normalization (Luo et al. 2017): cosine between weights and inputs or patches."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def _safe_norm(sum_sq: Tensor) -> Tensor:
    """``sqrt(sum_sq)`` with a finite gradient at 0 (the gradient there is 0, not NaN)."""
    return sum_sq.clamp_min(torch.finfo(sum_sq.dtype).tiny).sqrt()


def _at_least_fp32(x: Tensor) -> Tensor:
    """``x`` upcast to fp32 when it is fp16/bf16 (norms of those overflow or lose precision)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _full_precision(x: Tensor) -> contextlib.AbstractContextManager[Any]:
    """A context in which ``x``'s device runs without autocast (only entered when it is on)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


def cosine_linear(x: Tensor, weight: Tensor, eps: float = 1e-8) -> Tensor:
    r"""Cosine between each input vector and each weight row (Cosine Normalization).

    Luo et al. 2017, "Cosine Normalization: Using Cosine Similarity Instead of Dot Product in
    Neural Networks" (arXiv:1702.05870):

    .. math::

        y_{o} = \frac{w_o \cdot x}{\lVert w_o \rVert \lVert x \rVert + \epsilon} \in [-1, 1]

    A zero input (or weight row) gives 0 with finite gradients. The norms are taken in (at
    least) fp32, outside autocast, so fp16/bf16 inputs neither overflow nor lose precision there;
    the output has the dtype of the dot product (``F.linear``'s, autocast's under autocast).

    Args:
        x: input, features in the last dim.
        weight: ``[out_features, in_features]`` (as ``nn.Linear``).
        eps: added to the denominator. Default: ``1e-8``.

    Shape:
        ``x``: :math:`(*, H_{in})`; output: :math:`(*, H_{out})`.

    Example:
        >>> w = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
        >>> cosine_linear(torch.tensor([[2.0, 0.0], [0.0, 0.0]]), w)
        tensor([[1.0000, 0.7071],
                [0.0000, 0.0000]])
    """
    dot = F.linear(x, weight)
    with _full_precision(x):
        x_norm = torch.linalg.vector_norm(_at_least_fp32(x), dim=-1, keepdim=True)
        w_norm = torch.linalg.vector_norm(_at_least_fp32(weight), dim=1)
    return (dot / (x_norm * w_norm + eps)).to(dot.dtype)


def cosine_conv2d(
    x: Tensor,
    weight: Tensor,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] | str = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    eps: float = 1e-8,
) -> Tensor:
    r"""Cosine between each filter and each input patch under it (Cosine Normalization).

    Luo et al. 2017 (arXiv:1702.05870), the convolutional form:

    .. math::

        y_{n,o,i,j} = \frac{w_o \cdot p_{n,i,j}}{\lVert w_o \rVert \lVert p_{n,i,j} \rVert
        + \epsilon}

    where :math:`p_{n,i,j}` is the (zero-padded) input patch of ``o``'s group seen by output
    position ``(i, j)``. :math:`\lVert p \rVert^2` is a convolution of the channel-summed
    ``x**2`` with a ones kernel using the same stride, padding and dilation. A zero patch gives
    0 with finite gradients. The squares and norms are taken in (at least) fp32, outside
    autocast: an fp16 ``x**2`` overflows from ``|x| > 256``. The output has the dtype of the
    convolution (``F.conv2d``'s, autocast's under autocast).

    Args:
        x: input.
        weight: ``[out_channels, in_channels / groups, kH, kW]`` (as ``nn.Conv2d``).
        stride: as ``F.conv2d``. Default: ``1``.
        padding: as ``F.conv2d`` (zeros). Default: ``0``.
        dilation: as ``F.conv2d``. Default: ``1``.
        groups: as ``F.conv2d``. Default: ``1``.
        eps: added to the denominator. Default: ``1e-8``.

    Shape:
        ``x``: :math:`(N, C_{in}, H, W)`; output :math:`(N, C_{out}, H_{out}, W_{out})`.

    Example:
        >>> w = torch.randn(4, 3, 3, 3)
        >>> y = cosine_conv2d(torch.randn(2, 3, 8, 8), w, padding=1)
        >>> y.shape, bool(y.abs().max() <= 1)
        (torch.Size([2, 4, 8, 8]), True)
    """
    out = F.conv2d(x, weight, None, stride, padding, dilation, groups)
    c = x.shape[1]
    with _full_precision(x):
        sq = _at_least_fp32(x).square()
        if c != groups:
            sq = sq.unflatten(1, (groups, c // groups)).sum(2)
        ones = torch.ones(groups, 1, *weight.shape[2:], dtype=sq.dtype, device=x.device)
        patch_sq = F.conv2d(sq, ones, None, stride, padding, dilation, groups)
        patch_norm = _safe_norm(patch_sq).unsqueeze(2)
        w_norm = torch.linalg.vector_norm(weight.flatten(1), dim=1, dtype=patch_norm.dtype)
    denom = patch_norm * w_norm.view(groups, -1, 1, 1) + eps
    return (out.unflatten(1, (groups, -1)) / denom).flatten(1, 2).to(out.dtype)


# --- Domain-split BatchNorm and synchronised batch statistics (domain issue) ---
