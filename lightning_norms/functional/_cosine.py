"""Cosine Normalization (Luo et al. 2017): cosine between weights and inputs or patches."""

from __future__ import annotations

import math
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair

from lightning_norms._moments import as_dtype
from lightning_norms._tracing import autocast_off, eager_twin, functorch_active


def _safe_norm(sum_sq: Tensor) -> Tensor:
    """``sqrt(sum_sq)`` with a finite gradient at 0 (the gradient there is 0, not NaN)."""
    return sum_sq.clamp_min(torch.finfo(sum_sq.dtype).tiny).sqrt()


def _norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp16/bf16 (norms of those overflow or lose precision), else ``dtype``."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _at_least_fp32(x: Tensor) -> Tensor:
    """``x`` in :func:`_norm_dtype` (upcast when it is fp16/bf16)."""
    return as_dtype(x, _norm_dtype(x.dtype))


def _use_functions(*tensors: Tensor) -> bool:
    """Whether :class:`_Cosine` runs: only when eager autograd records the call.

    It computes what the plain ops compute, with a cheaper backward. Without a gradient to
    take (eval, ``no_grad``), under ``torch.jit.trace`` and in ``torch.onnx.export`` the plain
    differentiable ops run instead: a traced or exported graph cannot hold a Python Function.
    Under ``torch.compile`` too: inductor fuses the plain ops and their autograd (and dynamo
    cannot trace a Function with a custom ``jvp``). And in eager forward-mode AD
    (``torch.autograd.forward_ad``): the Function's ``jvp`` runs ``torch.func.jvp``, which
    cannot nest in an eager dual level (it can under ``torch.func``).
    """
    eager_forward_ad = torch.autograd.forward_ad._current_level >= 0 and not functorch_active()
    return (
        torch.is_grad_enabled()
        and any(t.requires_grad for t in tensors)
        and not eager_forward_ad
        and not torch.jit.is_tracing()
        and not torch.onnx.is_in_onnx_export()
        and not torch.compiler.is_compiling()
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
    denom = torch.mul(p, w).add_(eps)  # addcmul of broadcast operands: 5x slower on CPU
    if dot.dtype != torch.float16:
        return denom
    return denom.masked_fill((p < _FP16_ZERO) | (w < _FP16_ZERO), math.inf)


_AUTOCAST_CASTS = (torch.float32, torch.float16, torch.bfloat16)
"""The dtypes autocast casts to its own for a convolution or a linear layer (not float64)."""


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype autocast runs ``x``'s convolution / linear layer in (``None``: no autocast)."""
    device = x.device.type
    if x.dtype in _AUTOCAST_CASTS and device != "meta" and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


def _cast(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    """``t`` as autocast passes it to the dot product (unchanged without autocast)."""
    return t if dtype is None or t.dtype not in _AUTOCAST_CASTS else as_dtype(t, dtype)


def _norm_grads(
    grad_dot: Tensor, dot: Tensor, p: Tensor, w: Tensor, denom: Tensor, inplace: bool
) -> tuple[Tensor, Tensor]:
    """``-dL/dp / p`` and ``-dL/dw / w`` of ``y = dot / D``, ``D = p w + eps``, from ``g / D``.

    With ``h = g dot / D^2``: ``dL/dp = -sum_k h w``, ``dL/dw = -sum_(n, s) h p`` (shapes as
    :class:`_Cosine`). The callers multiply these by the input and the weight (the norms'
    gradients) in the op that adds the dot product's gradient. ``inplace``: ``h`` overwrites
    ``grad_dot`` (no full-size allocation; not under ``create_graph``).
    """
    h = grad_dot.mul_(dot) if inplace else torch.mul(grad_dot, dot)
    h = h.div_(denom)
    grad_p = torch.matmul(w.transpose(-1, -2), h).div_(p)
    grad_w = torch.matmul(h, p.transpose(-1, -2))
    grad_w = (grad_w.sum(0) if grad_w.shape[0] != 1 else grad_w[0]).div_(w)
    return grad_p, grad_w


def _minus(total: Tensor, t: Tensor, scale: Tensor, inplace: bool) -> Tensor:
    """``total - t * scale`` in one op; into ``total`` when ``inplace`` and the dtypes agree."""
    if inplace and total.dtype == t.dtype == scale.dtype:
        return total.addcmul_(t, scale, value=-1)
    return torch.addcmul(total, t, scale, value=-1)


_CONV = tuple[tuple[int, int], Any, tuple[int, int], int]
"""A convolution's ``(stride, padding, dilation, groups)``; ``None`` for a linear layer."""


def _cosine(
    x: Tensor, weight: Tensor, conv: _CONV | None, eps: float, dtype: torch.dtype | None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The cosine (the layer's output) and the parts it is made of, in plain ops.

    ``dot [B, G, K, S]``, norms ``p [B, G, 1, S]``, ``w [G, K, 1]``, ``D = p w + eps``; a
    linear layer is ``B = G = 1`` with the rows as positions (views of the ``[rows, out]``
    dot product and denominator). The cosine is a new tensor of the layer's output shape
    (the caller may change it in place). The dot product
    runs outside autocast on the inputs cast as autocast casts them (``dtype``); the norms in
    (at least) fp32. The eval path, the forward of :class:`_Cosine`, and its backward under
    ``create_graph`` (these ops are differentiable) all run this.
    """
    xc, wc = _cast(x, dtype), _cast(weight, dtype)
    with autocast_off(x.device):
        if conv is None:
            out = F.linear(xc, wc)
            p = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=_norm_dtype(x.dtype))
            p = p.clamp_min(math.sqrt(torch.finfo(p.dtype).tiny))  # as _safe_norm's
            w = torch.linalg.vector_norm(weight, dim=1, dtype=p.dtype)
            denom = _denominator(out, p, w, eps)
            dot, d = (t.reshape(-1, t.shape[-1]).t()[None, None] for t in (out, denom))
            parts = (dot, p.flatten()[None, None, None], w.view(1, -1, 1), d)
        else:
            stride, padding, dilation, groups = conv
            out = F.conv2d(xc, wc, None, stride, padding, dilation, groups)
            sum_sq = _patch_sum_sq(x, weight.shape[2:], stride, padding, dilation, groups)
            p = _safe_norm(sum_sq).flatten(2).unsqueeze(2)
            w = torch.linalg.vector_norm(weight.flatten(1), dim=1, dtype=p.dtype)
            dot = out.flatten(2).unflatten(1, (groups, -1))
            d = _denominator(dot, p, w.view(groups, -1, 1), eps)
            parts = (dot, p, w.view(groups, -1, 1), d)
            denom = d.view(out.shape)
    return as_dtype(out / denom, out.dtype), *parts


def _is_pointwise(conv: _CONV, kernel: tuple[int, ...]) -> bool:
    """Whether each patch is one position's channels (a 1x1 kernel, no stride, no padding)."""
    return tuple(kernel) == (1, 1) and conv[0] == (1, 1) and conv[1] == (0, 0)


class _Cosine(torch.autograd.Function):
    """A whole cosine layer, ``y = dot / (p w + eps)``, with a closed-form backward.

    Inputs and outputs as :func:`_cosine` (the parts are saved, not differentiable). The
    backward runs the dot product's backward on ``g / D``, takes the norms' gradients in a
    few ops (:func:`_norm_grads`: two small matrix products) and adds them to the input and
    weight gradients in one ``addcmul`` each, into the dot product's gradients: about a third
    of the launches of autograd's chain through the norms and the division. Under
    ``create_graph`` it runs the same formula on parts recomputed with differentiable ops, so
    gradients of any order are exact. ``setup_context`` and a generated vmap rule serve
    ``torch.func``. ``y`` itself is not kept: the caller may change it in place.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(  # type: ignore[override]
        x: Tensor, weight: Tensor, conv: _CONV | None, eps: float, dtype: torch.dtype | None
    ) -> tuple[Tensor, ...]:
        return _cosine(x, weight, conv, eps, dtype)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        x, weight, ctx.conv, ctx.eps, ctx.dtype = inputs
        ctx.save_for_backward(x, weight, *output[1:])
        ctx.save_for_forward(x, weight)
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)

    @staticmethod
    def jvp(ctx: Any, x_t: Tensor | None, weight_t: Tensor | None, *_: Any) -> tuple[Any, ...]:  # type: ignore[override]
        """Forward mode (``torch.func.jvp``, ``jacfwd``): the plain formula's, by ``jvp``."""
        x, weight = ctx.saved_tensors[:2]
        tangents = (
            torch.zeros_like(x) if x_t is None else x_t,
            torch.zeros_like(weight) if weight_t is None else weight_t,
        )
        y_t = torch.func.jvp(
            lambda a, b: _cosine(a, b, ctx.conv, ctx.eps, ctx.dtype)[0], (x, weight), tangents
        )[1]
        return y_t, None, None, None, None

    @staticmethod
    def backward(ctx: Any, grad: Tensor | None, *_: Any) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if grad is None:
            return None, None, None, None, None
        x, weight, *parts = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the parts as functions of x and weight
            parts = _cosine(x, weight, ctx.conv, ctx.eps, ctx.dtype)[1:]
        dot, p, w, denom = parts
        if ctx.conv is None:
            grad_dot = grad.reshape(-1, dot.shape[2]).t()[None, None] / denom
        else:
            grad_dot = grad.reshape(dot.shape) / denom
        xc, wc = _cast(x, ctx.dtype), _cast(weight, ctx.dtype)
        needs = ctx.needs_input_grad[:2]
        grad_out = as_dtype(grad_dot, dot.dtype)
        if ctx.conv is None:
            dx, dw = _linear_backward(grad_out, xc, wc, needs)
        else:
            dx, dw = _conv_backward(grad_out.reshape(grad.shape), xc, wc, ctx.conv, needs)
        inplace = not torch.is_grad_enabled()  # the dot product's gradients are done with
        grad_p, grad_w = _norm_grads(grad_dot, dot, p, w, denom, inplace)
        grad_x = grad_weight = None
        if dx is not None:
            if ctx.conv is None:
                x_part, grad_p = x.reshape(-1, x.shape[-1]), grad_p.view(-1, 1)
            else:
                x_part, grad_p = _spread(grad_p, x, weight.shape[2:], ctx.conv)
            grad_x = _minus(dx.view(x_part.shape), x_part, grad_p, inplace)
            grad_x = as_dtype(grad_x.reshape(x.shape), x.dtype)
        if dw is not None:
            scale = grad_w.view(-1, *(1,) * (weight.dim() - 1))
            grad_weight = as_dtype(_minus(dw, weight, scale, inplace), weight.dtype)
        return grad_x, grad_weight, None, None, None


_CosineTwin = eager_twin(_Cosine)
""":class:`_Cosine` outside ``torch.func`` (:func:`~lightning_norms._tracing.eager_twin`: no
argument binding on every call, about a tenth of a small layer's step)."""


def _fused(*inputs: Any) -> Tensor:
    """The layer's output by :class:`_Cosine` (its twin outside ``torch.func``)."""
    fn = _Cosine if functorch_active() else _CosineTwin
    return cast(Tensor, fn.apply(*inputs)[0])


def _linear_backward(
    grad_dot: Tensor, x: Tensor, weight: Tensor, needs: tuple[bool, bool]
) -> tuple[Tensor | None, Tensor | None]:
    """The dot product's input and weight gradients; ``grad_dot`` is ``[1, 1, out, rows]``."""
    grad_rows = grad_dot.squeeze(1).squeeze(0).t()
    dx = grad_rows.mm(weight) if needs[0] else None
    dw = grad_rows.t().mm(x.reshape(-1, x.shape[-1])) if needs[1] else None
    return dx, dw


def _conv_backward(
    grad_out: Tensor, x: Tensor, weight: Tensor, conv: _CONV, needs: tuple[bool, bool]
) -> tuple[Tensor | None, Tensor | None]:
    """The convolution's input and weight gradients (``grad_out`` has the output's shape).

    A 1x1 kernel: two matrix products (on CPU, half the time of ``convolution_backward``).
    """
    stride, padding, dilation, groups = conv
    if _is_pointwise(conv, weight.shape[2:]):
        grad_g = grad_out.flatten(2).unflatten(1, (groups, -1))  # [N, G, K, S]
        w_g = weight.view(groups, -1, weight.shape[1])  # [G, K, C/G]
        dx = torch.matmul(w_g.transpose(1, 2), grad_g).view(x.shape) if needs[0] else None
        x_g = x.flatten(2).unflatten(1, (groups, -1)).transpose(2, 3)  # [N, G, S, C/G]
        dw = torch.matmul(grad_g, x_g).sum(0).view(weight.shape) if needs[1] else None
        return dx, dw
    mask = (needs[0], needs[1], False)
    dx, dw, _ = torch.ops.aten.convolution_backward(
        grad_out, x, weight, None, stride, padding, dilation, False, (0, 0), groups, mask
    )
    return dx, dw


def _spread(
    grad_p: Tensor, x: Tensor, kernel: tuple[int, ...], conv: _CONV
) -> tuple[Tensor, Tensor]:
    """``x`` by group ``[N, G, C/G, H, W]`` and ``grad_p / p`` spread over each patch.

    The adjoint of the summing pool of :func:`_patch_sum_sq` (a strided 1x1 kernel's view
    too), broadcast over the channels.
    """
    stride, padding, _, groups = conv
    xg = x.unflatten(1, (groups, -1))
    h_out = (x.shape[2] + 2 * padding[0] - int(kernel[0])) // stride[0] + 1
    grad_p = grad_p.unflatten(3, (h_out, -1))
    if _is_pointwise(conv, kernel):
        return xg, grad_p
    like = as_dtype(x[:, :groups], grad_p.dtype)  # the pool's input size (values unused)
    spread = torch.ops.aten.avg_pool2d_backward(
        grad_p.squeeze(2), like, kernel, stride, padding, False, True, 1
    )
    return xg, spread.unsqueeze(2)


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
    tiny input can still overflow fp16 (a ``GradScaler`` then lowers its scale). When autograd
    records the call, the layer is one autograd Function with a closed-form backward (gradients
    of any order exact); without a gradient, traced, exported or compiled: plain ops.

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
    dtype = _autocast_dtype(x)
    if _use_functions(x, weight):
        return _fused(x, weight, None, eps, dtype)
    return _cosine(x, weight, None, eps, dtype)[0]


def _group_sum_sq(x: Tensor, groups: int) -> Tensor:
    """``sum_c x[n, c, h, w]^2`` over each group's channels: ``[N, C, H, W] -> [N, G, H, W]``."""
    sq = x.square()
    return sq.sum(1, keepdim=True) if groups == 1 else sq.unflatten(1, (groups, -1)).sum(2)


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
    sq = _group_sum_sq(x, groups)
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
    convolution (``F.conv2d``'s, autocast's under autocast). Without dilation, when autograd
    records the call, the layer is one autograd Function with a closed-form backward (as
    :func:`cosine_linear`); a dilated window, no gradient, tracing, export, compile: plain ops.

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
    s, d = _pair(stride), _pair(dilation)
    kernel = (int(weight.shape[2]), int(weight.shape[3]))
    pad = _symmetric_padding(padding, kernel, d)
    dtype = _autocast_dtype(x)
    pooled = pad is not None and all(2 * q <= k for q, k in zip(pad, kernel, strict=True))
    if pooled and d == (1, 1) and _use_functions(x, weight):  # its backward: the pool's adjoint
        conv = ((int(s[0]), int(s[1])), pad, (1, 1), groups)
        return _fused(x, weight, conv, eps, dtype)
    return _cosine(x, weight, (s, padding, d, groups), eps, dtype)[0]
