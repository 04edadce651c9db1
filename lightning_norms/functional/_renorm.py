"""Batch Renormalization (Ioffe 2017): the clip limits, the affine fold, the kernel."""

from __future__ import annotations

from collections import deque
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.weak import WeakTensorKeyDictionary

from lightning_norms._moments import (
    Moments,
    accumulate_dtype,
    as_dtype,
    batch_moments,
    ema_factor,
    stat_dtype,
    update_running,
)
from lightning_norms.functional._domain import (
    _domain_stats,
    _DomainBatchNormFn,
    _kernel_stats,
    _rows,
)
from lightning_norms.functional._sync import sync_world


def _fused_stats(x: Tensor) -> bool:
    """Whether torch's fused statistics kernel (``batch_norm_update_stats``) runs on ``x``."""
    return x.device.type in ("cpu", "cuda")


def _batch_mean_var(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``x`` (channels in dim 1), no gradient.

    The single place :func:`batch_renorm` gets its batch statistics from: on CPU and CUDA
    torch's fused kernel (``torch.batch_norm_update_stats``: the very statistics a
    training-mode ``F.batch_norm`` takes, in one pass, any memory layout), elsewhere the moment
    engine (:func:`lightning_norms._moments.batch_moments`). In fp32 at least (fp16/bf16
    inputs accumulate in fp32).

    Returns:
        ``(mean, var)``, each of shape ``[C]``.
    """
    x = x.detach()
    if not _fused_stats(x):
        n, mean, m2 = batch_moments(x)
        return mean[0], m2[0] / n.clamp(min=1)
    with torch.no_grad():
        if x.dtype == stat_dtype(x):
            mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
            return mean, var
        # fp16/bf16: fp32 running statistics (kept as they are: momentum 0) select the kernel
        # that accumulates and returns in fp32, without an fp32 copy of x
        zeros = x.new_zeros(x.shape[1], dtype=stat_dtype(x))
        mean, var = torch.batch_norm_update_stats(x, zeros, torch.ones_like(zeros), 0.0)
        return mean, var


def _update_running(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    count: int,
    factor: float | Tensor,
) -> None:
    """``running <- running + factor * (batch - running)``, the variance unbiased.

    BatchNorm's running update (``F.batch_norm``), in the statistics' dtype (fp32 at least):
    in place for buffers of that dtype, else computed in it and rounded once to the buffers'.
    """
    unbiased = var * (count / max(count - 1, 1))
    if isinstance(factor, Tensor):
        factor = as_dtype(factor, mean.dtype)
    with torch.no_grad():
        for buf, stat in ((running_mean, mean), (running_var, unbiased)):
            if buf.dtype == stat.dtype:
                buf.lerp_(stat, factor)
            else:
                buf.copy_(buf.to(stat.dtype).lerp_(stat, factor))


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
    progress = (step / warmup_steps).clamp(max=1.0)  # true division: fp32, one op
    return 1.0 + (r_max - 1.0) * progress, d_max * progress


def _renorm_factors(
    batch_mean: Tensor,
    batch_var: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    r_max: float | Tensor,
    d_max: float | Tensor,
) -> tuple[Tensor, Tensor]:
    """``r = clip(sigma_B / sigma, 1/r_max, r_max)``, ``d = clip((mu_B - mu) / sigma, +-d_max)``."""
    # a snapshot of the buffers (``stack`` is never recomputed by torch.compile's partitioner,
    # which could otherwise re-read in the backward the buffers this step updates in place),
    # the batch variance stacked with them: both 1 / sigma in one pass
    dtype = batch_var.dtype
    rows = torch.stack([as_dtype(running_mean, dtype), as_dtype(running_var, dtype), batch_var])
    inv_sigma, inv_sigma_batch = rows[1:].add_(eps).rsqrt_().unbind()
    # each limit is a float or a 0-dim tensor; clamp takes either (its stubs want one kind)
    low = r_max.reciprocal() if isinstance(r_max, Tensor) else 1.0 / r_max
    r = (inv_sigma / inv_sigma_batch).clamp(low, r_max)  # type: ignore[arg-type]
    d = ((batch_mean - rows[0]) * inv_sigma).clamp(-d_max, d_max)  # type: ignore[arg-type]
    return r, d


_HISTORY = 4
"""Training calls per running-statistics buffer whose ``r, d`` a recompute can find."""

_FACTORS: WeakTensorKeyDictionary = WeakTensorKeyDictionary()
"""``running_mean`` -> ``deque`` of its last training calls' ``(mean_B, var_B, r, d)``."""

_SAME_BATCH = 1e-4
"""Relative tolerance under which a recompute's batch statistics are the original's."""


def _remembers(*tensors: Tensor) -> bool:
    """Whether :func:`_step_factors` keeps and reads its history: in eager Python only.

    Not while ``torch.compile``/``torch.export`` or ``torch.jit.trace`` trace (a graph has no
    Python state), nor on ``torch.func``'s wrapped tensors (they must not outlive the transform).
    """
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    return not any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


def _in_backward() -> bool:
    """Whether this call runs inside an autograd backward pass (a checkpoint's recompute)."""
    return bool(torch._C._current_graph_task_id() != -1)


def _same_batch(mean: Tensor, var: Tensor, batch_mean: Tensor, batch_var: Tensor) -> Tensor:
    """0-dim bool on the device: ``(mean, var)`` equal ``(batch_mean, batch_var)`` to rounding."""
    scale = batch_var.abs() + torch.finfo(batch_var.dtype).tiny
    near_mean = (mean - batch_mean).square() <= _SAME_BATCH**2 * scale
    near_var = (var - batch_var).abs() <= _SAME_BATCH * scale
    return (near_mean & near_var).all()


def _step_factors(
    batch_mean: Tensor,
    batch_var: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    r_max: float | Tensor,
    d_max: float | Tensor,
) -> tuple[Tensor, Tensor]:
    """``r, d`` of this training call, the same in an activation-checkpointing recompute.

    ``torch.utils.checkpoint`` (either mode) runs the forward again inside the backward pass,
    after the first forward advanced the running statistics and ``num_batches_tracked``, so
    :func:`_renorm_factors` would give other ``r``, ``d`` (and warm-up limits) there, and
    wrong gradients. So each training call outside a backward pass keeps its
    ``(mean_B, var_B, r, d)`` (references, no copy) in a short history per ``running_mean``
    buffer (:data:`_FACTORS`, weak: it dies with the buffer, and is not module state); a call
    inside a backward pass, the recompute, takes the ``r, d`` of the newest kept call whose
    batch statistics equal its own (to :data:`_SAME_BATCH`, on the device: no host read), so
    the recompute reproduces the original forward. A layer called several times per step
    matches each call by its batch; with no match the fresh factors stand.
    """
    r, d = _renorm_factors(batch_mean, batch_var, running_mean, running_var, eps, r_max, d_max)
    if not _remembers(batch_mean, running_mean, running_var):
        return r, d
    history = _FACTORS.get(running_mean)
    if _in_backward():
        for mean, var, r_then, d_then in history or ():  # oldest first: the newest match wins
            same = _same_batch(mean, var, batch_mean, batch_var)
            r, d = torch.where(same, r_then, r), torch.where(same, d_then, d)
        return r, d
    if history is None:
        history = _FACTORS[running_mean] = deque(maxlen=_HISTORY)
    history.append((batch_mean.detach(), batch_var.detach(), r.detach(), d.detach()))
    return r, d


def _fold(
    weight: Tensor | None, bias: Tensor | None, r: Tensor, d: Tensor
) -> tuple[Tensor, Tensor]:
    """``gamma * (x_hat * r + d) + beta == x_hat * (gamma * r) + (gamma * d + beta)``."""
    if weight is None:
        return r, d if bias is None else d + bias
    return weight * r, torch.addcmul(bias, weight, d) if bias is not None else weight * d


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
    """Fold ``r`` and ``d`` into BatchNorm's affine, in the affine's (else the buffers') dtype."""
    r, d = _step_factors(batch_mean, batch_var, running_mean, running_var, eps, r_max, d_max)
    dtype = running_mean.dtype if weight is None else weight.dtype
    return _fold(weight, bias, as_dtype(r, dtype), as_dtype(d, dtype))


def _is_plain_bn(r_max: float | Tensor, d_max: float | Tensor) -> bool:
    """Whether the clip limits force ``r = 1, d = 0`` (known without touching a tensor)."""
    return (
        isinstance(r_max, (int, float))
        and isinstance(d_max, (int, float))
        and (r_max == 1 and d_max == 0)
    )


class _RenormFn(torch.autograd.Function):
    """Batch Renormalization's training transform with its statistics given: one pass each way.

    ``forward(x, weight, bias, mean, invstd, r, d, eps)`` is ``F.batch_norm``'s training
    transform with the batch ``mean``, ``invstd = 1 / sqrt(var + eps)`` and the affine
    ``gamma * r, gamma * d + beta`` folded in, run by its eval kernel with unit variance,
    ``eps = 0`` and the weight ``invstd * gamma * r`` (the training kernel's arithmetic,
    ``x * alpha + beta``: equal results). The backward is torch's training-mode
    ``native_batch_norm_backward`` (the statistics' dependence on ``x`` included, ``r`` and
    ``d`` constants), itself differentiable: gradients of any order are those of
    ``F.batch_norm(training=True)`` with the folded affine. ``forward`` without ``ctx`` plus
    ``setup_context`` and a generated vmap rule: ``torch.func`` works through it.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(  # type: ignore[override]
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        mean: Tensor,
        invstd: Tensor,
        r: Tensor,
        d: Tensor,
        eps: float,
    ) -> Tensor:
        folded_weight, folded_bias = _fold(weight, bias, r, d)
        unit = torch.ones_like(mean)
        return F.batch_norm(x, mean, unit, invstd * folded_weight, folded_bias, False, 0.0, 0.0)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, weight, _, mean, invstd, r, d, eps = inputs
        ctx.eps = eps
        ctx.save_for_backward(x, weight, mean, invstd, r, d)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight, mean, invstd, r, d = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        folded = r if weight is None else weight * r
        grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            grad,
            x,
            folded,
            None,
            None,
            mean,
            invstd,
            True,
            ctx.eps,
            [need_x, need_w, need_w or need_b],
        )
        grad_weight = torch.addcmul(grad_w * r, grad_b, d) if need_w else None
        return grad_x, grad_weight, grad_b if need_b else None, None, None, None, None, None


def _renorm_train(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float | Tensor,
    eps: float,
    r_max: float | Tensor,
    d_max: float | Tensor,
) -> Tensor:
    """The local training step: statistics once, ``r, d`` folded, buffers written on success.

    ``r``, ``d`` and the affine are taken in the buffers' dtype (fp32 at least): the kernel
    rejects what ``F.batch_norm`` rejects (e.g. an fp64 input to fp32 buffers) before any
    buffer changes. While ``torch.compile`` traces: :func:`_renorm_traced` instead.
    """
    if torch.compiler.is_compiling():
        return _renorm_traced(
            x, running_mean, running_var, weight, bias, momentum, eps, r_max, d_max
        )
    mean, var = _batch_mean_var(x)
    dtype = stat_dtype(running_mean)  # no conversion dispatched where the dtype is already it
    r, d = _step_factors(mean, var, running_mean, running_var, eps, r_max, d_max)
    # as the training kernel: 1 / sqrt(var + eps) in the accumulation dtype, then rounded
    invstd = as_dtype(as_dtype(var, accumulate_dtype(var.device)).add(eps).rsqrt(), var.dtype)
    weight = None if weight is None else as_dtype(weight, dtype)
    bias = None if bias is None else as_dtype(bias, dtype)
    r, d = as_dtype(r, dtype), as_dtype(d, dtype)
    out = _RenormFn.apply(x, weight, bias, mean, invstd, r, d, eps)
    _update_running(running_mean, running_var, mean, var, x.numel() // x.shape[1], momentum)
    return cast(Tensor, out)


def _renorm_traced(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float | Tensor,
    eps: float,
    r_max: float | Tensor,
    d_max: float | Tensor,
) -> Tensor:
    """The training step from plain differentiable ops, for ``torch.compile`` to fuse.

    ``y = (x - mu_B) * (invstd_B * gamma r) + (gamma d + beta)`` with ``torch.var_mean``
    statistics (a fake-tensor kernel: dynamic shapes trace), ``r`` and ``d`` detached
    (constants in the backward); autograd gives BatchNorm's training backward, which inductor
    fuses with the forward's reductions as it does for ``F.batch_norm``. Same numbers as the
    eager :class:`_RenormFn` path to fp32 rounding.
    """
    dims = [0, *range(2, x.dim())]
    xf = as_dtype(x, stat_dtype(x))
    var, mean = torch.var_mean(xf, dim=dims, correction=0)
    dtype = stat_dtype(running_mean)
    r, d = _step_factors(mean.detach(), var.detach(), running_mean, running_var, eps, r_max, d_max)
    weight = None if weight is None else as_dtype(weight, dtype)
    bias = None if bias is None else as_dtype(bias, dtype)
    scale, shift = _fold(weight, bias, as_dtype(r, dtype), as_dtype(d, dtype))
    shape = [1, -1] + [1] * (x.dim() - 2)
    scale = torch.rsqrt(var + eps) * scale
    out = torch.addcmul(shift.view(shape), xf - mean.view(shape), scale.view(shape))
    count = x.numel() // x.shape[1]
    _update_running(running_mean, running_var, mean.detach(), var.detach(), count, momentum)
    return as_dtype(out, x.dtype)


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


def _ema_factor(
    momentum: float | None, num_batches_tracked: Tensor | None, on_host: bool
) -> float | Tensor:
    """This step's running-average factor (:func:`lightning_norms._moments.ema_factor`).

    ``num_batches_tracked`` counts the steps before this one; without it (statistics not
    tracked) there is nothing to update and the factor is 0. ``momentum=None``: a 0-dim
    tensor on the device (no host read), or with ``on_host`` a float (for ``F.batch_norm``,
    which reads it as ``nn.BatchNorm*d`` does).
    """
    if momentum is not None:
        return momentum
    if num_batches_tracked is None:
        return 0.0
    if on_host:
        return float(ema_factor(None, float(num_batches_tracked) + 1.0))
    steps = num_batches_tracked.reshape(()).to(accumulate_dtype(num_batches_tracked.device))
    return ema_factor(None, steps + 1.0)


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
    backward pass and use the running statistics from before this step's update. The batch
    statistics are taken once (torch's fused kernel), ``r`` and ``d`` are folded into the
    affine of BatchNorm's transform, and the backward is BatchNorm's training backward: the
    cost of one ``F.batch_norm``. The running statistics are updated as by BatchNorm (unbiased
    variance). Otherwise (eval, or no running statistics: ``r = 1, d = 0``) this is
    ``F.batch_norm``. An empty training batch returns an empty output and changes nothing.

    Activation checkpointing: a training call inside a backward pass (the recompute of
    ``torch.utils.checkpoint``, which comes after this step's update of ``running_mean``,
    ``running_var`` and ``num_batches_tracked``) reuses the ``r``, ``d`` of the recent call on
    the same ``running_mean`` buffer with equal batch statistics (the original forward), so its
    output and gradients are the original's. It updates the running statistics again, as
    ``F.batch_norm`` does under checkpointing.

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
        synced = sync_world(sync, process_group)
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
    renorm = training and tracked and not _is_plain_bn(r_max, d_max)
    factor = _ema_factor(momentum, steps, on_host=not renorm)
    if renorm:
        out = _renorm_train(
            x,
            cast(Tensor, running_mean),
            cast(Tensor, running_var),
            weight,
            bias,
            factor,
            eps,
            r_max,
            d_max,
        )
    else:
        momentum_float = cast(float, factor)  # on_host: a float
        out = F.batch_norm(
            x, running_mean, running_var, weight, bias, training, momentum_float, eps
        )
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
    group = (process_group,) if sync_world(True, process_group) else None
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
    stats = _kernel_stats(Moments(count, mean, m2), eps)
    out = _DomainBatchNormFn.apply(x3, weight, bias, ids, eps, group, stats)
    if tracked:
        with torch.no_grad():
            update_running(
                cast(Tensor, running_mean).view(1, -1),
                cast(Tensor, running_var).view(1, -1),
                Moments(count, mean, m2),
                momentum,
                None if num_batches_tracked is None else num_batches_tracked.view(1),
            )
    return out.view(x.shape)
