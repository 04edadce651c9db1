"""Cosine Normalization (Luo et al. 2017): cosine between weights and inputs or patches."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair


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


class _CosineDivide(torch.autograd.Function):
    """``y = dot / D``, ``D = p * w + eps``: the cosine from the dot products and the norms.

    Shapes: ``dot [B, G, K, S]`` (``K`` outputs per group ``G``, ``S`` positions), patch or
    input norms ``p [B, G, 1, S]``, weight norms ``w [G, K, 1]``. Returns ``(y, D)``; ``D`` is
    an output only so that the backward can reuse it and stay differentiable (gradients of
    any order are exact). The backward takes three full-size passes (``g / D``,
    ``g dot / D^2``) and two matrix products for the norms' gradients, where autograd's chain
    of ``mul``, ``add`` and ``div`` takes about eight. ``y`` itself is not kept: the caller
    may change it in place.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, dot: Tensor, p: Tensor, w: Tensor, eps: float
    ) -> tuple[Tensor, Tensor]:
        denom = torch.addcmul(p.new_full((), eps), p, w)
        ctx.save_for_backward(dot, p, w, denom)
        ctx.set_materialize_grads(False)  # no zeros for the unused D
        return (dot / denom).to(dot.dtype), denom

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad: Tensor | None, grad_denom: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        dot, p, w, denom = ctx.saved_tensors
        grad_dot = (torch.zeros_like(dot) if grad is None else grad) / denom
        spread = grad_dot * dot / denom  # minus d loss / d denominator
        if grad_denom is not None:
            spread = spread - grad_denom
        grad_p = grad_w = None
        if ctx.needs_input_grad[1]:
            grad_p = torch.matmul(w.transpose(-1, -2), spread).neg()
        if ctx.needs_input_grad[2]:
            grad_w = torch.matmul(spread, p.transpose(-1, -2)).sum(0).neg()
        return grad_dot.to(dot.dtype), grad_p, grad_w, None


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
        x_norm = torch.linalg.vector_norm(_at_least_fp32(x), dim=-1)
        w_norm = torch.linalg.vector_norm(_at_least_fp32(weight), dim=1)
    # rows as positions: dot^T is [1, 1, out, rows], a view (the products are matrix-vector)
    rows = dot.reshape(-1, weight.shape[0])
    cos, _ = _CosineDivide.apply(
        rows.t()[None, None], x_norm.reshape(1, 1, 1, -1), w_norm.view(1, -1, 1), eps
    )
    return cos[0, 0].t().reshape(dot.shape)


class _GroupSumSq(torch.autograd.Function):
    """``sum_c x[n, c, h, w]^2`` over each group's channels: ``[N, C, H, W] -> [N, G, H, W]``.

    The backward is one broadcast product ``x * 2g`` (autograd's ``square`` backward takes
    three full-size passes: ``x^1``, ``* 2``, ``* g``); it is differentiable, so gradients of
    any order are exact.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, groups: int) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        sq = x.square()
        return sq.sum(1, keepdim=True) if groups == 1 else sq.unflatten(1, (groups, -1)).sum(2)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        scale = grad * 2.0
        if scale.shape[1] == 1:
            return x * scale, None
        return (x.unflatten(1, (scale.shape[1], -1)) * scale.unsqueeze(2)).flatten(1, 2), None


def _symmetric_padding(
    padding: int | tuple[int, int] | str, kernel: tuple[int, int], dilation: tuple[int, int]
) -> tuple[int, int] | None:
    """``padding`` as two ints when it pads both sides alike (``None`` for even "same")."""
    if padding == "valid":
        return 0, 0
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
        if any(t % 2 for t in totals):
            return None
        return totals[0] // 2, totals[1] // 2
    pair = _pair(padding)
    return int(pair[0]), int(pair[1])


def _patch_sum_sq(
    x: Tensor,
    kernel: tuple[int, ...],
    stride: int | tuple[int, int],
    padding: int | tuple[int, int] | str,
    dilation: int | tuple[int, int],
    groups: int,
) -> Tensor:
    """``|p|^2`` of every (zero-padded) patch of each group: ``[N, G, H_out, W_out]``, fp32+.

    The channel-summed squares, then a summing pool over the kernel window (a 1x1 kernel:
    a strided view, no pool); a dilated window, or padding the pool cannot take (one-sided
    "same", more than half the window), falls back to a convolution with a ones kernel.
    """
    sq = _GroupSumSq.apply(_at_least_fp32(x), groups)
    k = (int(kernel[0]), int(kernel[1]))
    s, d = _pair(stride), _pair(dilation)
    pad = _symmetric_padding(padding, k, d)
    if k == (1, 1) and pad == (0, 0):
        return sq[..., :: s[0], :: s[1]]
    if d == (1, 1) and pad is not None and all(2 * q <= w for q, w in zip(pad, k, strict=True)):
        return F.avg_pool2d(sq, k, s, pad, count_include_pad=True, divisor_override=1)
    ones = torch.ones(groups, 1, *k, dtype=sq.dtype, device=x.device)
    return F.conv2d(sq, ones, None, s, padding, d, groups)


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
    position ``(i, j)``. :math:`\lVert p \rVert^2` is a summing pool of the channel-summed
    ``x**2`` over the kernel window (same stride and padding; a 1x1 kernel needs no pool; a
    dilated window takes a convolution with a ones kernel). A zero patch gives
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
    with _full_precision(x):
        patch_sq = _patch_sum_sq(x, weight.shape[2:], stride, padding, dilation, groups)
        patch_norm = _safe_norm(patch_sq)
        w_norm = torch.linalg.vector_norm(weight.flatten(1), dim=1, dtype=patch_norm.dtype)
    n, o, h, w = out.shape
    cos, _ = _CosineDivide.apply(
        out.reshape(n, groups, o // groups, h * w),
        patch_norm.reshape(n, groups, 1, h * w),
        w_norm.view(groups, -1, 1),
        eps,
    )
    return cos.reshape(out.shape)


# --- Domain-split BatchNorm and synchronised batch statistics (domain issue) ---
