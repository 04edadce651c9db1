"""Batch Renormalization (Ioffe 2017): the clip limits, the affine fold, the kernel."""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_norms.functional._domain import (
    _domain_stats,
    _DomainBatchNormFn,
    _rows,
    _sync_world,
    _update_running_stats,
)


def _batch_mean_var(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``x`` (channels in dim 1), no gradient.

    The single place :func:`batch_renorm` gets its batch statistics from. Computed in at least
    fp32 (fp16/bf16 inputs are upcast). A contiguous (``N, C, ...``) input takes an exact
    two-pass formula on views (per-row means, sums of squared deviations, rows merged with
    Chan's formula); other layouts (``channels_last``) use torch's Welford kernel on CPU and
    CUDA. Both are several times faster on CPU than ``torch.var_mean`` over ``(0, 2, 3)``.

    Returns:
        ``(mean, var)``, each of shape ``[C]``.
    """
    x = x.detach()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    if not x.is_contiguous() and x.device.type in ("cpu", "cuda"):
        mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
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
    # each limit is a float or a 0-dim tensor; clamp takes either (its stubs want one kind)
    r = ((batch_var + eps).sqrt() / sigma).clamp(1.0 / r_max, r_max)  # type: ignore[arg-type]
    d = ((batch_mean - running_mean) / sigma).clamp(-d_max, d_max)  # type: ignore[arg-type]
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


def _check_renorm_call(
    x: Tensor,
    running_mean: Tensor | None,
    momentum: float | None,
    num_batches_tracked: Tensor | None,
    name: str,
    local: bool,
) -> None:
    """Raise (before any state changes) on a training call :func:`batch_renorm` cannot run."""
    if momentum is None and running_mean is not None and num_batches_tracked is None:
        raise ValueError(
            f"{name}: `momentum=None` (cumulative average) needs `num_batches_tracked`"
        )
    if local and x.numel() and x.numel() // x.shape[1] <= 1:
        raise ValueError(
            f"{name}: expected more than 1 value per channel when using batch statistics "
            f"(training), got input of shape {tuple(x.shape)}"
        )


def _ema_factor(momentum: float | None, num_batches_tracked: Tensor | None) -> float:
    """Running-average factor of a step: ``momentum``, or ``1 / (k + 1)`` (cumulative)."""
    if momentum is not None:
        return momentum
    return 0.0 if num_batches_tracked is None else 1.0 / (float(num_batches_tracked) + 1.0)


def batch_renorm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    r_max: float | Tensor = 3.0,
    d_max: float | Tensor = 5.0,
    *,
    sync: bool = False,
    process_group: torch.distributed.ProcessGroup | None = None,
    num_batches_tracked: Tensor | None = None,
    name: str = "batch_renorm",
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
    ``r = 1, d = 0``) this is ``F.batch_norm``. An empty training batch returns an empty
    output and changes nothing.

    Args:
        x: input with channels in dim 1.
        running_mean: ``[C]`` running mean (updated in place in training), or ``None``.
        running_var: ``[C]`` running (unbiased) variance, or ``None``.
        weight: ``gamma`` ``[C]`` or ``None``. Default: ``None``.
        bias: ``beta`` ``[C]`` or ``None``. Default: ``None``.
        training: use (and renormalise) batch statistics. Default: ``False``.
        momentum: running-average factor, as in ``F.batch_norm``; ``None``: cumulative average
            over the steps counted by ``num_batches_tracked`` (factor ``1 / (k + 1)`` at step
            ``k``, as ``nn.BatchNorm*d(momentum=None)``). Default: ``0.1``.
        eps: added to the variances. Default: ``1e-5``.
        r_max: clip limit of ``r`` (float or 0-dim tensor, see :func:`renorm_limits`).
            Default: ``3.0``.
        d_max: clip limit of ``d``. Default: ``5.0``.
        sync: in training, take the batch statistics over all ranks of ``process_group``
            (when ``torch.distributed`` is initialised with more than one rank; otherwise
            local). A module passes it only while training, as ``nn.SyncBatchNorm``.
            Default: ``False``.
        process_group: group to synchronise over (implies ``sync``). Default: ``None`` (world).
        num_batches_tracked: the step counter (``LongTensor`` buffer, 0-dim or ``[1]``), or
            ``None``. Advanced in place by 1 once per successful training call that updates the
            running statistics, and only when the (global) batch is non-empty.
            Default: ``None``.
        name: how errors name the caller (e.g. ``"BatchRenorm2d(64)"``).
            Default: ``"batch_renorm"``.

    Shape:
        ``x``: :math:`(N, C, *)`; output: same shape.

    Raises:
        ValueError: in training, on one value per channel (with synchronisation: globally, on
            every rank), or on ``momentum=None`` with running statistics but no
            ``num_batches_tracked``. Nothing is changed then.

    Example:
        >>> x = torch.randn(8, 3, 4, 4) * 2 + 1
        >>> mean, var = torch.zeros(3), torch.ones(3)
        >>> y = batch_renorm(x, mean, var, training=True, r_max=1.0, d_max=0.0)
        >>> torch.allclose(y, F.batch_norm(x, None, None, training=True), atol=1e-5)
        True
        >>> steps = torch.tensor(0)
        >>> y = batch_renorm(x, mean, var, training=True, momentum=None, num_batches_tracked=steps)
        >>> int(steps), torch.allclose(mean, x.mean((0, 2, 3)))
        (1, True)
    """
    tracked = running_mean is not None and running_var is not None
    steps = num_batches_tracked if training and tracked else None
    if training:
        synced = _sync_world(sync, process_group)
        _check_renorm_call(x, running_mean, momentum, steps, name, not synced)
        if synced:
            return _synced_batch_renorm(
                x,
                running_mean,
                running_var,
                weight,
                bias,
                momentum,
                eps,
                r_max,
                d_max,
                process_group,
                name,
                num_batches_tracked=steps,
            )
        if x.numel() == 0:  # as nn.BatchNorm*d: an empty output, no statistics to take
            return F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
    if training and tracked and not _is_plain_bn(r_max, d_max):
        batch_mean, batch_var = _batch_mean_var(x)
        weight, bias = _renorm_affine(
            batch_mean,
            batch_var,
            cast(Tensor, running_mean),
            cast(Tensor, running_var),
            weight,
            bias,
            eps,
            r_max,
            d_max,
        )
    factor = _ema_factor(momentum, steps)
    out = F.batch_norm(x, running_mean, running_var, weight, bias, training, factor, eps)
    if steps is not None:
        steps.add_(1)
    return out


def _synced_batch_renorm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float | None,
    eps: float,
    r_max: float | Tensor,
    d_max: float | Tensor,
    process_group: torch.distributed.ProcessGroup | None,
    name: str,
    num_batches_tracked: Tensor | None = None,
) -> Tensor:
    """Training-mode :func:`batch_renorm` with batch statistics over all ranks.

    The global per-channel count, mean and variance (one all-reduce) give ``r`` and ``d`` and
    the running-statistics update (unbiased with the global count, identical on every rank);
    the normalisation and its backward (one more all-reduce) are those of the synchronised
    domain kernel with a single domain. A global count of 1 raises on every rank.
    ``num_batches_tracked`` (the step counter) is advanced once the call has succeeded, and
    only when some rank had samples (an all-empty global batch is no step).
    """
    ids = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    group = (process_group,) if _sync_world(True, process_group) else None
    x3 = _rows(x)
    count, mean, m2 = _domain_stats(x3, ids, 1, group, name)
    tracked = running_mean is not None and running_var is not None
    # when tracked, both are tensors (mypy does not narrow through the bool)
    if tracked and not _is_plain_bn(r_max, d_max):
        weight, bias = _renorm_affine(
            mean[0],
            m2[0] / count.clamp(min=1),
            cast(Tensor, running_mean),
            cast(Tensor, running_var),
            weight,
            bias,
            eps,
            r_max,
            d_max,
        )
    out = _DomainBatchNormFn.apply(x3, weight, bias, ids, eps, group, (count, mean, m2))
    if tracked:
        with torch.no_grad():
            _update_running_stats(
                cast(Tensor, running_mean).view(1, -1),
                cast(Tensor, running_var).view(1, -1),
                None if num_batches_tracked is None else num_batches_tracked.view(1),
                count,
                mean,
                m2 / (count - 1).clamp(min=1).unsqueeze(1),
                momentum,
            )
    return out.view(x.shape)
