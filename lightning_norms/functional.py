"""Functional core of lightning-norms: plain tensor functions, no modules, no Lightning.

Every layer in the package is a thin ``nn.Module`` over one of these functions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# --- Batch Renormalization, LayerNorm2d, Cosine Normalization (layers issue) ---


def _batch_mean_var(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``x`` (channels in dim 1), no gradient.

    The single place :func:`batch_renorm` gets its batch statistics from. Computed in at least
    fp32 (fp16/bf16 inputs are upcast) with an exact two-pass formula: per-row means, then the
    sum of squared deviations, rows merged with Chan's formula. ``torch.var_mean`` over
    ``(0, 2, 3)`` is about 10x slower than this on CPU.

    Returns:
        ``(mean, var)``, each of shape ``[C]``.
    """
    x = x.detach()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    channels_last = x.movedim(1, -1)
    if channels_last.is_contiguous():
        rows = channels_last.reshape(-1, x.shape[1])
        mean = rows.mean(0)
        var = torch.linalg.vector_norm(rows - mean, dim=0).square() / rows.shape[0]
        return mean, var
    rows = x.reshape(x.shape[0], x.shape[1], -1)
    row_mean = rows.mean(-1, keepdim=True)
    sum_sq = torch.linalg.vector_norm(rows - row_mean, dim=-1).square()
    row_mean = row_mean.squeeze(-1)
    mean = row_mean.mean(0)
    var = (sum_sq.sum(0) / rows.shape[-1] + (row_mean - mean).square().sum(0)) / rows.shape[0]
    return mean, var


def renorm_limits(
    r_max: float, d_max: float, step: Tensor | None, warmup_steps: int
) -> tuple[float | Tensor, float | Tensor]:
    """Clip limits of Batch Renormalization at a training step, with a linear warm-up.

    Ioffe 2017 (arXiv:1702.03275), section 4: the limits start at ``r_max = 1, d_max = 0``
    (plain BatchNorm) and are relaxed gradually. With ``k`` previous training steps:

    ``p = min(k / warmup_steps, 1)``, ``r_max(k) = 1 + (r_max - 1) p``, ``d_max(k) = d_max p``.

    Args:
        r_max: final limit of ``r`` (``>= 1``).
        d_max: final limit of ``d`` (``>= 0``).
        step: ``k`` as a tensor (``num_batches_tracked`` before the step); ``None``: no ramp.
        warmup_steps: length of the ramp; ``0`` means the final limits from the start.

    Returns:
        ``(r_limit, d_limit)``: Python floats when there is no ramp, else 0-dim fp32 tensors
        on ``step``'s device (no host synchronisation).

    Example:
        >>> renorm_limits(3.0, 5.0, torch.tensor(250), warmup_steps=1000)
        (tensor(1.5000), tensor(1.2500))
    """
    if step is None or warmup_steps <= 0 or (r_max == 1 and d_max == 0):
        return r_max, d_max
    progress = (step.to(torch.float32) / warmup_steps).clamp(max=1.0)
    return 1.0 + (r_max - 1.0) * progress, d_max * progress


def _renorm_affine(
    batch_mean: Tensor,
    batch_var: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    r_max: float | Tensor,
    d_max: float | Tensor,
) -> tuple[Tensor, Tensor]:
    """Fold Batch Renormalization's ``r`` and ``d`` into BatchNorm's affine (no gradient).

    ``gamma * (x_hat * r + d) + beta == x_hat * (gamma * r) + (gamma * d + beta)``.
    """
    sigma = (running_var + eps).sqrt()
    r = ((batch_var + eps).sqrt() / sigma).clamp(1.0 / r_max, r_max)
    d = ((batch_mean - running_mean) / sigma).clamp(-d_max, d_max)
    dtype = running_mean.dtype if weight is None else weight.dtype
    r, d = r.to(dtype), d.to(dtype)
    if weight is None:
        return r, d if bias is None else d + bias
    return weight * r, torch.addcmul(bias, weight, d) if bias is not None else weight * d


def _is_plain_bn(r_max: float | Tensor, d_max: float | Tensor) -> bool:
    """Whether the clip limits force ``r = 1, d = 0`` (known without touching a tensor)."""
    return (
        isinstance(r_max, (int, float))
        and isinstance(d_max, (int, float))
        and (r_max == 1 and d_max == 0)
    )


def batch_renorm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    r_max: float | Tensor = 3.0,
    d_max: float | Tensor = 5.0,
) -> Tensor:
    r"""Batch Renormalization: BatchNorm corrected towards the running statistics.

    Ioffe 2017, "Batch Renormalization: Towards Reducing Minibatch Dependence in
    Batch-Normalized Models" (arXiv:1702.03275). In training, with running statistics:

    .. math::

        y = \gamma \left(\frac{x - \mu_B}{\sigma_B} r + d\right) + \beta,\quad
        r = \mathrm{clip}_{[1/r_{max},\, r_{max}]}\left(\frac{\sigma_B}{\sigma}\right),\quad
        d = \mathrm{clip}_{[-d_{max},\, d_{max}]}\left(\frac{\mu_B - \mu}{\sigma}\right)

    with :math:`\sigma_B = \sqrt{\mathrm{Var}_B[x] + \epsilon}`,
    :math:`\sigma = \sqrt{\text{running\_var} + \epsilon}`; ``r`` and ``d`` are constants in the
    backward pass and use the running statistics from before this step's update. ``r`` and
    ``d`` are folded into the affine of a single ``F.batch_norm`` call, which also updates the
    running statistics exactly as BatchNorm does. Otherwise (eval, or no running statistics:
    ``r = 1, d = 0``) this is ``F.batch_norm``.

    Args:
        x: input with channels in dim 1.
        running_mean: ``[C]`` running mean (updated in place in training), or ``None``.
        running_var: ``[C]`` running (unbiased) variance, or ``None``.
        weight: ``gamma`` ``[C]`` or ``None``. Default: ``None``.
        bias: ``beta`` ``[C]`` or ``None``. Default: ``None``.
        training: use (and renormalise) batch statistics. Default: ``False``.
        momentum: running-average factor, as in ``F.batch_norm``. Default: ``0.1``.
        eps: added to the variances. Default: ``1e-5``.
        r_max: clip limit of ``r`` (float or 0-dim tensor, see :func:`renorm_limits`).
            Default: ``3.0``.
        d_max: clip limit of ``d``. Default: ``5.0``.

    Shape:
        ``x``: :math:`(N, C, *)`; output: same shape.

    Example:
        >>> x = torch.randn(8, 3, 4, 4) * 2 + 1
        >>> mean, var = torch.zeros(3), torch.ones(3)
        >>> y = batch_renorm(x, mean, var, training=True, r_max=1.0, d_max=0.0)
        >>> torch.allclose(y, F.batch_norm(x, None, None, training=True), atol=1e-5)
        True
    """
    if (
        training
        and running_mean is not None
        and running_var is not None
        and not _is_plain_bn(r_max, d_max)
    ):
        batch_mean, batch_var = _batch_mean_var(x)
        weight, bias = _renorm_affine(
            batch_mean, batch_var, running_mean, running_var, weight, bias, eps, r_max, d_max
        )
    return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)


def layer_norm2d(
    x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-6
) -> Tensor:
    r"""LayerNorm over the channels at every position of an ``N, C, H, W`` map (ConvNeXt).

    Ba et al. 2016 (arXiv:1607.06450), applied per pixel as in ConvNeXt (arXiv:2201.03545):

    .. math::

        y_{n,:,h,w} = \frac{x_{n,:,h,w} - \mathrm{E}_c[x_{n,c,h,w}]}
        {\sqrt{\mathrm{Var}_c[x_{n,c,h,w}] + \epsilon}} \gamma + \beta

    Runs ``F.layer_norm`` on the channels-last view; the output has channels-last strides
    (free for a ``channels_last`` input, whose view needs no copy).

    Args:
        x: ``N, C, H, W`` input.
        weight: ``gamma`` ``[C]`` or ``None``. Default: ``None``.
        bias: ``beta`` ``[C]`` or ``None``. Default: ``None``.
        eps: added to the variance. Default: ``1e-6``.

    Shape:
        ``x``: :math:`(N, C, H, W)`; output: same shape.

    Example:
        >>> x = torch.randn(2, 3, 4, 4)
        >>> y = layer_norm2d(x)
        >>> torch.allclose(y.mean(1), torch.zeros(2, 4, 4), atol=1e-6)
        True
    """
    c = x.shape[1]
    return F.layer_norm(x.permute(0, 2, 3, 1), (c,), weight, bias, eps).permute(0, 3, 1, 2)


def _safe_norm(sum_sq: Tensor) -> Tensor:
    """``sqrt(sum_sq)`` with a finite gradient at 0 (the gradient there is 0, not NaN)."""
    return sum_sq.clamp_min(torch.finfo(sum_sq.dtype).tiny).sqrt()


def cosine_linear(x: Tensor, weight: Tensor, eps: float = 1e-8) -> Tensor:
    r"""Cosine between each input vector and each weight row (Cosine Normalization).

    Luo et al. 2017, "Cosine Normalization: Using Cosine Similarity Instead of Dot Product in
    Neural Networks" (arXiv:1702.05870):

    .. math::

        y_{o} = \frac{w_o \cdot x}{\lVert w_o \rVert \lVert x \rVert + \epsilon} \in [-1, 1]

    A zero input (or weight row) gives 0 with finite gradients.

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
    x_norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    w_norm = torch.linalg.vector_norm(weight, dim=1)
    return F.linear(x, weight) / (x_norm * w_norm + eps)


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
    0 with finite gradients. Under fp16/bf16 the patch norms are taken in fp32.

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
    sq = x.square()
    if c != groups:
        sq = sq.unflatten(1, (groups, c // groups)).sum(2)
    ones = torch.ones(groups, 1, *weight.shape[2:], dtype=sq.dtype, device=x.device)
    patch_sq = F.conv2d(sq, ones, None, stride, padding, dilation, groups)
    if patch_sq.dtype in (torch.float16, torch.bfloat16):
        patch_sq = patch_sq.float()
    patch_norm = _safe_norm(patch_sq).unsqueeze(2)
    w_norm = torch.linalg.vector_norm(weight.flatten(1), dim=1, dtype=patch_norm.dtype)
    denom = patch_norm * w_norm.view(groups, -1, 1, 1) + eps
    return (out.unflatten(1, (groups, -1)) / denom).flatten(1, 2).to(out.dtype)


# --- Domain-split BatchNorm and synchronised batch statistics (domain issue) ---
