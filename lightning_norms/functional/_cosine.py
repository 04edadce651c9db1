"""Cosine Normalization (Luo et al. 2017): cosine between weights and inputs or patches."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair

from lightning_norms._moments import as_dtype


def _safe_norm(sum_sq: Tensor) -> Tensor:
    """``sqrt(sum_sq)`` with a finite gradient at 0 (the gradient there is 0, not NaN)."""
    return sum_sq.clamp_min(torch.finfo(sum_sq.dtype).tiny).sqrt()


def _at_least_fp32(x: Tensor) -> Tensor:
    """``x`` upcast to fp32 when it is fp16/bf16 (norms of those overflow or lose precision)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _full_precision(x: Tensor) -> contextlib.AbstractContextManager[Any]:
    """A context in which ``x``'s device runs without autocast (only entered when it is on).

    The meta device has no autocast (torch raises when asked about it).
    """
    if x.device.type != "meta" and torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


def _use_functions(*tensors: Tensor) -> bool:
    """Whether the custom autograd Functions run: only when eager autograd records the call.

    They compute what the plain ops compute, with a cheaper backward. Without a gradient to
    take (eval, ``no_grad``), under ``torch.jit.trace`` and in ``torch.onnx.export`` the plain
    differentiable ops run instead: a traced or exported graph cannot hold a Python Function.
    """
    return (
        torch.is_grad_enabled()
        and any(t.requires_grad for t in tensors)
        and not torch.jit.is_tracing()
        and not torch.onnx.is_in_onnx_export()
    )


_FP16_ZERO = 2.0**-25
"""Below this magnitude every fp16 value rounds to 0 (half of fp16's smallest subnormal)."""


def _denominator(dot: Tensor, p: Tensor, w: Tensor, eps: float) -> Tensor:
    """``D = p * w + eps``; for an fp16 ``dot``, ``inf`` where ``p`` or ``w`` is zero in fp16.

    A patch (input, weight row) whose norm is below :data:`_FP16_ZERO` is all zeros once cast
    to fp16: its fp16 dot product is exactly 0, and so is the output, with either ``D``. The
    exact gradient there, ``g / eps``, is beyond fp16's range (it overflows to ``inf``, and the
    convolution's backward turns ``inf * 0`` into NaN); ``D = inf`` makes it 0 instead, the
    value torch takes for the gradient of a norm at 0. In fp32/fp64 nothing changes.
    """
    denom = torch.addcmul(p.new_full((), eps), p, w)
    if dot.dtype != torch.float16:
        return denom
    return denom.masked_fill((p < _FP16_ZERO) | (w < _FP16_ZERO), math.inf)


class _CosineDivide(torch.autograd.Function):
    """``y = dot / D``, ``D = p * w + eps``: the cosine from the dot products and the norms.

    Shapes: ``dot [B, G, K, S]`` (``K`` outputs per group ``G``, ``S`` positions), patch or
    input norms ``p [B, G, 1, S]``, weight norms ``w [G, K, 1]``. Returns ``(y, D)``; ``D`` is
    an output only so that the backward can reuse it and stay differentiable (gradients of
    any order are exact). The backward takes three full-size passes (``g / D``,
    ``g dot / D^2``) and two matrix products for the norms' gradients, where autograd's chain
    of ``mul``, ``add`` and ``div`` takes about eight. ``y`` itself is not kept: the caller
    may change it in place. ``setup_context`` and a generated vmap rule serve ``torch.func``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(dot: Tensor, p: Tensor, w: Tensor, eps: float) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        denom = _denominator(dot, p, w, eps)
        return as_dtype(dot / denom, dot.dtype), denom

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
        dot, p, w, _ = inputs
        ctx.save_for_backward(dot, p, w, output[1])
        ctx.set_materialize_grads(False)  # no zeros for the unused D

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad: Tensor | None, grad_denom: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        dot, p, w, denom = ctx.saved_tensors
        grad_dot = (torch.zeros_like(dot) if grad is None else grad) / denom
        grad_denom_total = torch.mul(grad_dot, dot).div_(denom).neg_()  # d loss / d denominator
        if grad_denom is not None:
            grad_denom_total = grad_denom_total + grad_denom
        grad_p = grad_w = None
        if ctx.needs_input_grad[1]:
            grad_p = torch.matmul(w.transpose(-1, -2), grad_denom_total)
        if ctx.needs_input_grad[2]:
            grad_w = torch.matmul(grad_denom_total, p.transpose(-1, -2)).sum(0)
        return as_dtype(grad_dot, dot.dtype), grad_p, grad_w, None


def _cosine_divide(dot: Tensor, p: Tensor, w: Tensor, eps: float) -> Tensor:
    """``dot / (p * w + eps)`` in ``dot``'s dtype: :class:`_CosineDivide` or the plain ops."""
    if _use_functions(dot, p, w):
        return _CosineDivide.apply(dot, p, w, eps)[0]  # type: ignore[no-any-return]
    return as_dtype(dot / _denominator(dot, p, w, eps), dot.dtype)


def cosine_linear(x: Tensor, weight: Tensor, eps: float = 1e-8) -> Tensor:
    r"""Cosine between each input vector and each weight row (Cosine Normalization).

    Luo et al. 2017, "Cosine Normalization: Using Cosine Similarity Instead of Dot Product in
    Neural Networks" (arXiv:1702.05870):

    .. math::

        y_{o} = \frac{w_o \cdot x}{\lVert w_o \rVert \lVert x \rVert + \epsilon} \in [-1, 1]

    A zero input (or weight row) gives 0 with finite gradients. The norms are taken in (at
    least) fp32, outside autocast, so fp16/bf16 inputs neither overflow nor lose precision there;
    the output has the dtype of the dot product (``F.linear``'s, autocast's under autocast).
    The gradient at a zero input is ``g w / eps`` (exact, for the ``eps`` above); when the dot
    product is fp16 that is beyond fp16's range (``inf``, and NaN after ``inf * 0`` in the
    backward of the product, e.g. under a ``GradScaler``), so there an input (weight row) that
    is all zeros in fp16 gets gradient 0, torch's value for the gradient of a norm at 0.
    Elsewhere the gradient is exact: it is ``1 / (|w| |x|)`` times the plain layer's, so a
    tiny input can still overflow fp16 (a ``GradScaler`` then lowers its scale).

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
    cos = _cosine_divide(
        rows.t()[None, None], x_norm.reshape(1, 1, 1, -1), w_norm.view(1, -1, 1), eps
    )
    return cos.squeeze(1).squeeze(0).t().reshape(dot.shape)  # views: no select_backward


def _group_sum_sq(x: Tensor, groups: int) -> Tensor:
    """``sum_c x[n, c, h, w]^2`` over each group's channels: ``[N, C, H, W] -> [N, G, H, W]``."""
    sq = x.square()
    return sq.sum(1, keepdim=True) if groups == 1 else sq.unflatten(1, (groups, -1)).sum(2)


class _GroupSumSq(torch.autograd.Function):
    """:func:`_group_sum_sq` with a one-pass backward.

    The backward is one broadcast product ``x * 2g`` (autograd's ``square`` backward takes
    three full-size passes: ``x^1``, ``* 2``, ``* g``); it is differentiable, so gradients of
    any order are exact. ``setup_context`` and a generated vmap rule serve ``torch.func``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, groups: int) -> Tensor:  # type: ignore[override]
        return _group_sum_sq(x, groups)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.save_for_backward(inputs[0])

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
    a strided view, no pool); a dilated window, padding the pool cannot take (one-sided
    "same", more than half the window), or an ONNX export (``AveragePool`` has no
    ``divisor_override``: the exporters drop it) falls back to a convolution with a ones kernel.
    """
    x = _at_least_fp32(x)
    sq = _GroupSumSq.apply(x, groups) if _use_functions(x) else _group_sum_sq(x, groups)
    k = (int(kernel[0]), int(kernel[1]))
    s, d = _pair(stride), _pair(dilation)
    pad = _symmetric_padding(padding, k, d)
    if k == (1, 1) and pad == (0, 0):
        return sq[..., :: s[0], :: s[1]]
    pool = d == (1, 1) and not torch.onnx.is_in_onnx_export()
    if pool and pad is not None and all(2 * q <= w for q, w in zip(pad, k, strict=True)):
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
    0 with finite gradients: ``g w / eps`` there (exact), or 0 when the convolution is fp16 and
    the patch is all zeros in fp16, where ``g w / eps`` overflows (as :func:`cosine_linear`).
    The squares and norms are taken in (at least) fp32, outside
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
    cos = _cosine_divide(
        out.reshape(n, groups, o // groups, h * w),
        patch_norm.reshape(n, groups, 1, h * w),
        w_norm.view(groups, -1, 1),
        eps,
    )
    return cos.reshape(out.shape)


# --- Domain-split BatchNorm and synchronised batch statistics (domain issue) ---
