"""Batch Renormalization (Ioffe 2017): the clip limits, the affine fold, the kernel."""

from __future__ import annotations

import functools
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
from lightning_norms._tracing import eager, eager_twin, functorch_active
from lightning_norms.functional._domain import (
    as_rows,
    domain_stats,
    grouped_batch_norm,
    kernel_stats,
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


def _make_constants(
    c: int, eps: float, device: torch.device, dtype: torch.dtype, acc: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Ones ``[C]`` in ``dtype`` and the column ``[eps] * 4 + [0] * 3`` in ``acc``.

    Made by fill kernels (no host-to-device copy, so no stream synchronisation on CUDA).
    """
    with torch.no_grad():
        ones = torch.ones(c, device=device, dtype=dtype)
        column = torch.zeros(7, 1, device=device, dtype=acc)
        column[:4].fill_(eps)
    return ones, column


_constants = functools.lru_cache(maxsize=64)(_make_constants)
""":func:`_make_constants`, made once per channel count, ``eps``, device and dtypes (eager)."""


@functools.lru_cache(maxsize=64)
def _constant_bounds(
    r_max: float, d_max: float, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Clip limits ``[3, 1]`` of the rows ``1, r, d`` (1 lies in ``[1/r_max, r_max]``)."""
    with torch.no_grad():
        bounds = torch.empty(2, 3, 1, device=device, dtype=dtype)
        bounds[0, :2].fill_(1.0 / r_max)
        bounds[0, 2].fill_(-d_max)
        bounds[1, :2].fill_(r_max)
        bounds[1, 2].fill_(d_max)
    return bounds[0], bounds[1]


def _clip(factors: Tensor, r_max: float | Tensor, d_max: float | Tensor) -> None:
    """Clip the rows ``1, r, d`` of ``factors`` in place: one op for float limits."""
    # the warm-up's 0-dim tensors, or a trace (where the compiler folds the constants)
    if isinstance(r_max, Tensor) or isinstance(d_max, Tensor) or torch.compiler.is_compiling():
        r_low = r_max.reciprocal() if isinstance(r_max, Tensor) else 1.0 / r_max
        factors[:2].clamp_(r_low, r_max)  # type: ignore[arg-type]
        factors[2].clamp_(-d_max, d_max)  # type: ignore[arg-type]
        return
    factors[:3].clamp_(*_constant_bounds(r_max, d_max, factors.device, factors.dtype))


def _renorm_factors(
    batch_mean: Tensor,
    batch_var: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    r_max: float | Tensor,
    d_max: float | Tensor,
) -> Tensor:
    """``[1, r, d, invstd]`` (``[4, C]``, in the buffers' :func:`stat_dtype`) in six ops.

    ``r = clip(sigma_B / sigma, 1/r_max, r_max)``, ``d = clip((mu_B - mu) / sigma, +-d_max)``,
    ``invstd = 1 / sigma_B`` and a row of ones (the unit variance :class:`_RenormFn`'s eval
    kernel runs with) as one division of two row windows of a stacked table
    ``sqrt([v + eps, v + eps, v + eps, v_B + eps]), mu_B - mu, 1`` computed in
    :func:`accumulate_dtype`: ``invstd`` is then the training kernel's own (the reciprocal of
    the float64 square root, rounded once), so with ``r = 1, d = 0`` the output is
    ``F.batch_norm``'s to the bit. The stack is also the snapshot of the buffers (never
    recomputed by torch.compile's partitioner, which could otherwise re-read in the backward
    the buffers this step updates in place).
    """
    c, device = batch_var.shape[0], batch_var.device
    acc, dtype = accumulate_dtype(device), stat_dtype(running_mean)
    compiling = torch.compiler.is_compiling()
    ones, column = (_make_constants if compiling else _constants)(
        c, eps, device, batch_var.dtype, acc
    )
    # one dtype (a fast stack), then + eps in float64 (the training kernel's invstd)
    rows = [running_var, running_var, running_var, batch_var, batch_mean, ones, running_mean]
    table = torch.stack(rows).add_(column) if acc == batch_var.dtype else torch.stack(rows) + column
    table[4].sub_(table[6])  # mu_B - mu
    table[:4].sqrt_()  # sigma (3 rows), sigma_B
    if compiling or acc == dtype or functorch_active():
        factors = as_dtype(table[2:6] / table[:4], dtype)  # no out= in a trace
    else:  # computed in the accumulation dtype, rounded once
        out = torch.empty(4, c, dtype=dtype, device=device)
        factors = torch.div(table[2:6], table[:4], out=out)
    _clip(factors, r_max, d_max)
    return factors


_HISTORY = 4
"""Training calls per running-statistics buffer whose ``r, d`` a recompute can find."""

_FACTORS: WeakTensorKeyDictionary = WeakTensorKeyDictionary()
"""``running_mean`` -> ``deque`` of its last training calls' ``(mean_B, var_B, r, d)``."""

_SAME_BATCH = 1e-4
"""Relative tolerance under which a recompute's batch statistics are the original's."""


def _remembers() -> bool:
    """Whether :func:`_step_factors` keeps and reads its history: in eager Python only.

    Not while ``torch.compile``/``torch.export`` or ``torch.jit.trace`` trace (a graph has no
    Python state), nor inside a ``torch.func`` transform (its wrapped tensors must not outlive
    it).
    """
    return eager()


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
    key: Tensor,
) -> Tensor:
    """The factors ``[1, r, d, invstd]`` of this training call, the same in a recompute.

    ``torch.utils.checkpoint`` (either mode) runs the forward again inside the backward pass,
    after the first forward advanced the running statistics and ``num_batches_tracked``, so
    :func:`_renorm_factors` would give other ``r``, ``d`` (and warm-up limits) there, and
    wrong gradients. So each training call outside a backward pass keeps its
    ``(mean_B, var_B, factors)`` (references, no copy) in a short history per running-mean
    buffer ``key`` (:data:`_FACTORS`, weak: it dies with the buffer, and is not module state);
    a call inside a backward pass, the recompute, takes the factors of the newest kept call
    whose batch statistics equal its own (to :data:`_SAME_BATCH`, on the device: no host
    read), so the recompute reproduces the original forward. A layer called several times per
    step matches each call by its batch; with no match the fresh factors stand.
    """
    factors = _renorm_factors(batch_mean, batch_var, running_mean, running_var, eps, r_max, d_max)
    if not _remembers():
        return factors
    history = _FACTORS.get(key)
    if _in_backward():
        for mean, var, then in history or ():  # oldest first: the newest match wins
            factors = torch.where(_same_batch(mean, var, batch_mean, batch_var), then, factors)
        return factors
    if history is None:
        history = _FACTORS[key] = deque(maxlen=_HISTORY)
    history.append((batch_mean.detach(), batch_var.detach(), factors.detach()))
    return factors


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
    factors = _step_factors(
        batch_mean, batch_var, running_mean, running_var, eps, r_max, d_max, running_mean
    )
    dtype = running_mean.dtype if weight is None else weight.dtype
    return _fold(weight, bias, as_dtype(factors[1], dtype), as_dtype(factors[2], dtype))


def _is_plain_bn(r_max: float | Tensor, d_max: float | Tensor) -> bool:
    """Whether the clip limits force ``r = 1, d = 0`` (known without touching a tensor)."""
    return (
        isinstance(r_max, (int, float))
        and isinstance(d_max, (int, float))
        and (r_max == 1 and d_max == 0)
    )


class _RenormFn(torch.autograd.Function):
    """Batch Renormalization's training transform with its statistics given: one pass each way.

    ``forward(x, weight, bias, mean, factors, scaled, eps)``: ``factors`` are
    :func:`_renorm_factors`' rows ``[1, r, d, invstd]`` and ``scaled = [gamma r, gamma d]``
    (``[r, d]`` without ``weight``), a differentiable product the caller makes (so that in a
    double backward the gradient reaches ``gamma`` through the weight the backward used). The
    output is ``F.batch_norm``'s training transform with the batch ``mean`` and
    ``invstd = 1 / sqrt(var + eps)`` and the affine ``gamma r, gamma d + beta`` folded in, run
    by its eval kernel with unit variance (the ones row), ``eps = 0`` and the weight
    ``invstd * gamma r`` (the training kernel's arithmetic, ``x * alpha + beta``: equal
    results). The backward is torch's training-mode ``native_batch_norm_backward`` (the
    statistics' dependence on ``x`` included, ``r`` and ``d`` constants), itself
    differentiable: gradients of any order are those of ``F.batch_norm(training=True)`` with
    the folded affine. ``forward`` without ``ctx`` plus ``setup_context`` and a generated vmap
    rule: ``torch.func`` works through it.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(  # type: ignore[override]
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        mean: Tensor,
        factors: Tensor,
        scaled: Tensor,
        eps: float,
    ) -> Tensor:
        shift = scaled[1] if bias is None else scaled[1] + bias
        return F.batch_norm(x, mean, factors[0], scaled[0] * factors[3], shift, False, 0.0, 0.0)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, _, _, mean, factors, scaled, eps = inputs
        ctx.eps = eps
        ctx.save_for_backward(x, mean, factors, scaled)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, mean, factors, scaled = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            grad,
            x,
            scaled[0],
            None,
            None,
            mean,
            factors[3],
            True,
            ctx.eps,
            [need_x, need_w, need_w or need_b],
        )
        # d/dgamma of gamma (x_hat r + d): the folded weight's gradient times r, the bias's d
        grad_weight = torch.addcmul(grad_w * factors[1], grad_b, factors[2]) if need_w else None
        return grad_x, grad_weight, grad_b if need_b else None, None, None, None, None


_RenormTwin = eager_twin(_RenormFn)
""":class:`_RenormFn` for calls outside ``torch.func``
(:func:`~lightning_norms._tracing.eager_twin`)."""


def _renorm_train(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float | None,
    eps: float,
    r_max: float | Tensor,
    d_max: float | Tensor,
    num_batches_tracked: Tensor | None,
) -> Tensor:
    """The local training step: statistics once, ``r, d`` folded, buffers written on success.

    With a float ``momentum`` and buffers in the statistics' dtype (fp32 buffers for fp32,
    fp16 or bf16 input; CPU and CUDA) torch's statistics kernel updates the running
    statistics as it takes the batch's (``torch.batch_norm_update_stats``: BatchNorm's own
    update, unbiased variance), after a snapshot of the buffers for ``r, d``; otherwise
    (``momentum=None``, low-precision buffers, other devices) the package's update
    (:func:`lightning_norms._moments.update_running`) follows the snapshot. The caller has
    checked the dtypes (:func:`_check_renorm_call`). The transform: ``F.batch_norm`` with
    the folded affine up to :data:`_FOLDED_MAX_NUMEL` elements, else :class:`_RenormFn`. While
    ``torch.compile`` traces: :func:`_renorm_traced` instead.
    """
    if torch.compiler.is_compiling():
        return _renorm_traced(
            x,
            running_mean,
            running_var,
            weight,
            bias,
            momentum,
            eps,
            r_max,
            d_max,
            num_batches_tracked,
        )
    by_kernel = momentum is not None and running_mean.dtype == stat_dtype(x) and _fused_stats(x)
    if by_kernel:
        before = torch.stack([running_mean, running_var])
        mean, var = torch.batch_norm_update_stats(
            x.detach(), running_mean, running_var, cast(float, momentum)
        )
        old_mean, old_var = before[0], before[1]
    else:
        mean, var = _batch_mean_var(x)
        old_mean, old_var = running_mean, running_var
    factors = _step_factors(mean, var, old_mean, old_var, eps, r_max, d_max, running_mean)
    # buffers written before the transform, as F.batch_norm does (a checkpoint's recompute
    # re-runs the update wherever it re-runs nn.BatchNorm2d's)
    if not by_kernel:
        _update_running(running_mean, running_var, mean, var, x, momentum, num_batches_tracked)
    elif num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    dtype = stat_dtype(running_mean)  # no conversion dispatched where the dtype is already it
    weight = None if weight is None else as_dtype(weight, dtype)
    bias = None if bias is None else as_dtype(bias, dtype)
    if x.numel() <= _FOLDED_MAX_NUMEL:  # the statistics again, no Python autograd node
        scale, shift = _fold(weight, bias, factors[1], factors[2])
        return torch.batch_norm(  # F.batch_norm's op, without its checks (made above)
            x, scale, shift, None, None, True, 0.0, eps, torch.backends.cudnn.enabled
        )
    scaled = factors[1:3] if weight is None else weight * factors[1:3]
    kernel = _RenormFn if functorch_active() else _RenormTwin
    return cast(Tensor, kernel.apply(x, weight, bias, mean, factors, scaled, eps))


_FOLDED_MAX_NUMEL = 1 << 15
"""Inputs up to this size take ``F.batch_norm`` with the folded affine (it takes the batch
statistics a second time, cheaper there than :class:`_RenormFn`'s Python autograd node, about
20 us a step on a CPU); larger ones the Function (one statistics pass)."""


def _update_running(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    x: Tensor,
    momentum: float | None,
    num_batches_tracked: Tensor | None,
) -> None:
    """The package's running update (:func:`lightning_norms._moments.update_running`) with
    the batch mean and biased variance of ``x``; advances ``num_batches_tracked``."""
    count = x.numel() // x.shape[1]
    moments = Moments(mean.new_full((1,), count), mean[None], (var * count)[None])
    with torch.no_grad():
        update_running(
            running_mean.view(1, -1),
            running_var.view(1, -1),
            moments,
            momentum,
            None if num_batches_tracked is None else num_batches_tracked.view(1),
        )


def _renorm_traced(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float | None,
    eps: float,
    r_max: float | Tensor,
    d_max: float | Tensor,
    num_batches_tracked: Tensor | None,
) -> Tensor:
    """The training step for ``torch.compile``: ``F.batch_norm`` with the folded affine.

    ``r``, ``d`` (constants: from detached ``torch.var_mean`` statistics, a fake-tensor kernel,
    so dynamic shapes trace) folded into the weight ``gamma r`` and bias ``gamma d + beta`` of
    a training-mode ``F.batch_norm``: inductor lowers it as it lowers ``nn.BatchNorm2d``
    (its statistics reduction shared with ours, its own backward) and fuses the few ``[C]``
    ops around it. Same numbers as the eager :class:`_RenormFn` path to fp32 rounding.
    """
    dims = [0, *range(2, x.dim())]
    var, mean = torch.var_mean(as_dtype(x.detach(), stat_dtype(x)), dim=dims, correction=0)
    dtype = stat_dtype(running_mean)
    # the buffers' snapshot (a stack is never recomputed by the partitioner from the buffers
    # this step updates in place)
    before = torch.stack([running_mean, running_var]).to(dtype)
    inv_sigma = torch.rsqrt(before[1] + eps)
    r = (torch.sqrt(var + eps) * inv_sigma).clamp(1.0 / r_max, r_max)  # type: ignore[arg-type]
    d = ((mean - before[0]) * inv_sigma).clamp(-d_max, d_max)  # type: ignore[arg-type]
    weight = None if weight is None else as_dtype(weight, dtype)
    bias = None if bias is None else as_dtype(bias, dtype)
    # the folded affine as one [2, C] buffer: computed once, not per element of the pass
    scale, shift = torch.stack(_fold(weight, bias, r, d)).unbind()
    _update_running(running_mean, running_var, mean, var, x, momentum, num_batches_tracked)
    return F.batch_norm(x, None, None, scale, shift, True, 0.0, eps)


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
    if local and running_mean is not None and stat_dtype(x) != stat_dtype(running_mean):
        raise RuntimeError(  # what F.batch_norm raises, but before the buffers are updated
            f"{name}: expected an input of dtype {running_mean.dtype} or lower precision "
            f"for running statistics of that dtype, got {x.dtype}"
        )
    if local and x.numel() and x.numel() // x.shape[1] <= 1:
        raise ValueError(
            f"{name}: expected more than 1 value per channel when using batch statistics "
            f"(training), got input of shape {tuple(x.shape)}"
        )


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
    statistics are taken by torch's fused kernel (which also updates the running statistics
    with a float ``momentum``, as BatchNorm: unbiased variance), ``r`` and ``d`` are folded
    into the affine of BatchNorm's transform, and the backward is BatchNorm's training
    backward: about the cost of one ``F.batch_norm`` (16 kernel launches per training step
    where ``nn.BatchNorm2d`` takes 3). Otherwise (eval, or no running statistics:
    ``r = 1, d = 0``) this is ``F.batch_norm``. An empty training batch returns an empty
    output and changes nothing.

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
    if training and tracked and not _is_plain_bn(r_max, d_max):
        return _renorm_train(
            x,
            cast(Tensor, running_mean),
            cast(Tensor, running_var),
            weight,
            bias,
            momentum,
            eps,
            r_max,
            d_max,
            steps,
        )
    factor = momentum
    if factor is None:  # a float for F.batch_norm: read from the counter as nn.BatchNorm*d
        factor = 0.0 if steps is None else float(ema_factor(None, float(steps) + 1.0))
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
    group = (process_group,) if sync_world(True, process_group) else None
    x3 = as_rows(x)
    count, mean, m2 = domain_stats(x3, ids, 1, group, name)
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
    stats = kernel_stats(Moments(count, mean, m2), eps)
    out = grouped_batch_norm(x3, weight, bias, ids, eps, group, stats)
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
