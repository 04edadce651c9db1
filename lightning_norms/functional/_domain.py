"""Domain-split BatchNorm and synchronised batch statistics: grouped kernel, sync, update."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_norms._moments import Moments, ema_factor, running_factor, update_running
from lightning_norms.functional._sync import AllReduceSum as _AllReduceSum
from lightning_norms.functional._sync import sync_world as _sync_world


def _check_domains(
    domains: int | Tensor, batch_size: int, num_domains: int, name: str
) -> int | Tensor:
    """Validate domain ids: an ``int`` is returned as is, a tensor as ``LongTensor[N]``."""
    if isinstance(domains, Tensor):
        if domains.dtype == torch.bool or domains.is_floating_point() or domains.is_complex():
            raise ValueError(
                f"{name}: domain ids must be an integer tensor, got dtype {domains.dtype}"
            )
        if domains.dim() == 0:
            domains = int(domains)
        elif tuple(domains.shape) != (batch_size,):
            raise ValueError(
                f"{name}: domain ids must have shape [N] = [{batch_size}] (one per sample), "
                f"got shape {tuple(domains.shape)}"
            )
        elif domains.numel() and bool(((domains < 0) | (domains >= num_domains)).any()):
            bad = domains[(domains < 0) | (domains >= num_domains)][0].item()
            raise ValueError(
                f"{name}: domain ids must be in [0, {num_domains}), got {bad} "
                f"(min {domains.min().item()}, max {domains.max().item()})"
            )
        else:
            return domains.long()
    if isinstance(domains, bool) or not isinstance(domains, int):
        raise ValueError(
            f"{name}: domain must be an int or an integer LongTensor[N], got {domains!r}"
        )
    if not 0 <= domains < num_domains:
        raise ValueError(f"{name}: domain must be in [0, {num_domains}), got {domains}")
    return domains


def _expand_domains(domains: int | Tensor, x: Tensor) -> Tensor:
    """Per-sample ids on ``x``'s device (an ``int`` is broadcast over the batch)."""
    if isinstance(domains, int):
        return torch.full((x.shape[0],), domains, dtype=torch.long, device=x.device)
    return domains.to(device=x.device, dtype=torch.long)


def _rows(x: Tensor) -> Tensor:
    """``x`` as contiguous ``[N, C, L]`` rows (``L`` = positions per sample; also for N = 0)."""
    return x.reshape(x.shape[0], x.shape[1], x.shape[2:].numel()).contiguous()


def _stat_dtype(x: Tensor) -> torch.dtype:
    """Statistics are kept in fp32 at least (fp16/bf16 inputs are accumulated in fp32)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _local_domain_stats(x3: Tensor, ids: Tensor, num_domains: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-domain element count ``[D]``, mean ``[D, C]`` and sum of squared deviations.

    Two exact passes per ``(sample, channel)`` row (mean, then the norm of the centred row),
    merged per domain with Chan's formula: no ``E[x^2] - E[x]^2`` cancellation. An empty
    input (a rank without data) counts nothing.
    """
    n, c, length = x3.shape
    dtype = _stat_dtype(x3)
    zeros = torch.zeros(num_domains, c, dtype=dtype, device=x3.device)
    samples = torch.zeros(num_domains, dtype=dtype, device=x3.device)
    if x3.numel() == 0:
        return samples, zeros, zeros.clone()
    row_mean = x3.mean(2, dtype=dtype)
    row_m2 = torch.linalg.vector_norm(x3 - row_mean.unsqueeze(2), dim=2, dtype=dtype).square()
    samples.index_add_(0, ids, torch.ones(n, dtype=dtype, device=x3.device))
    mean = zeros.index_add(0, ids, row_mean) / samples.clamp(min=1).unsqueeze(1)
    spread = (row_mean - mean[ids]).square().mul_(length).add_(row_m2)
    return samples * length, mean, zeros.index_add(0, ids, spread)


def _all_reduce_stats(
    count: Tensor, mean: Tensor, m2: Tensor, process_group: torch.distributed.ProcessGroup | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Merge per-rank ``(count, mean, M2)`` into global ones with a single all-reduce.

    Every rank sends ``[count, count * mean, M2 + count * mean^2]`` (all domains, present or
    not) in fp64 (fp32 on MPS, which has no fp64), so ``M2 = SS - count * mean^2`` does not
    cancel catastrophically; results come back in the statistics' dtype.
    """
    acc = torch.float32 if count.device.type == "mps" else torch.float64
    n, mu, m2 = count.to(acc).unsqueeze(1), mean.to(acc), m2.to(acc)
    packed = torch.cat([n, n * mu, torch.addcmul(m2, n, mu.square())], dim=1)
    torch.distributed.all_reduce(packed, group=process_group)
    c = mean.shape[1]
    total = packed[:, :1]
    g_mean = packed[:, 1 : 1 + c] / total.clamp(min=1)
    g_m2 = (packed[:, 1 + c :] - total * g_mean.square()).clamp(min=0)
    dtype = mean.dtype
    return total.squeeze(1).to(dtype), g_mean.to(dtype), g_m2.to(dtype)


def _check_counts(count: Tensor, name: str) -> None:
    """Raise (on every rank alike, when ``count`` is global) for a one-value domain."""
    single = count == 1
    if bool(single.any()):
        which = torch.nonzero(single).flatten().tolist()
        raise ValueError(
            f"{name}: expected more than 1 value per channel when training, got 1 for "
            f"domain(s) {which}"
        )


def _domain_stats(
    x3: Tensor,
    ids: Tensor,
    num_domains: int,
    group: tuple[torch.distributed.ProcessGroup | None] | None,
    name: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-domain ``(count, mean, M2)`` of ``[N, C, L]`` rows, global over ``group``; checked.

    No gradient (the backward accounts for the statistics' dependence on ``x``). Raises before
    any state changes, on every rank alike when synchronised.
    """
    with torch.no_grad():
        count, mean, m2 = _local_domain_stats(x3, ids, num_domains)
        if group is not None:
            count, mean, m2 = _all_reduce_stats(count, mean, m2, group[0])
    _check_counts(count, name)
    return count, mean, m2


def domain_batch_stats(
    x: Tensor,
    domains: int | Tensor,
    num_domains: int,
    sync: bool = False,
    process_group: torch.distributed.ProcessGroup | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Per-domain batch statistics: element count, mean and biased variance (no gradient).

    The statistics each domain's BatchNorm would use (Ioffe & Szegedy 2015): for domain
    :math:`d` with elements :math:`S_d` (all samples of the domain, all positions),

    .. math::

        \mu_d = \frac{1}{|S_d|}\sum_{S_d} x,\qquad
        \sigma^2_d = \frac{1}{|S_d|}\sum_{S_d} (x - \mu_d)^2

    computed in fp32 (fp64 inputs: fp64) with exact two-pass row statistics merged by Chan's
    formula. With ``sync`` (or a ``process_group``) and ``torch.distributed`` initialised, the
    statistics are global over the ranks (one all-reduce; every rank must call it).

    Args:
        x: input with channels in dim 1.
        domains: an ``int`` (one domain for the whole batch) or ``LongTensor[N]``.
        num_domains: number of domains ``D``.
        sync: all-reduce across ranks. Default: ``False``.
        process_group: group to reduce over (implies ``sync``). Default: ``None`` (world).

    Returns:
        ``(count [D], mean [D, C], var [D, C])``; an absent domain has count 0, mean 0, var 0.

    Raises:
        ValueError: invalid domain ids.

    Example:
        >>> x = torch.tensor([[1.0], [3.0], [10.0], [20.0]])
        >>> count, mean, var = domain_batch_stats(x, torch.tensor([0, 0, 1, 1]), 3)
        >>> count, mean.flatten(), var.flatten()
        (tensor([2., 2., 0.]), tensor([ 2., 15.,  0.]), tensor([ 1., 25.,  0.]))
    """
    domains = _check_domains(domains, x.shape[0], num_domains, "domain_batch_stats")
    with torch.no_grad():
        x3 = _rows(x)
        count, mean, m2 = _local_domain_stats(x3, _expand_domains(domains, x), num_domains)
        if _sync_world(sync, process_group):
            count, mean, m2 = _all_reduce_stats(count, mean, m2, process_group)
        return count, mean, m2 / count.clamp(min=1).unsqueeze(1)


def _gather_rows(param: Tensor | None, ids: Tensor, n: int, dtype: torch.dtype) -> Tensor | None:
    """Per-``(sample, channel)`` ``[N*C]`` values of a ``[D, C]`` (per domain) or ``[C]`` tensor.

    In ``dtype`` (the statistics' dtype): fp16/bf16 parameters are used in fp32, as the fp32
    statistics they are combined with.
    """
    if param is None:
        return None
    rows = param[ids] if param.dim() == 2 else param.expand(n, -1)
    return rows.reshape(-1).to(dtype)


def _fold_domains(grad: Tensor, param: Tensor) -> Tensor:
    """A ``[D, C]`` gradient for ``param``: as is (per domain) or summed over domains (shared)."""
    return (grad if param.dim() == 2 else grad.sum(0)).to(param.dtype)


def _normalize_rows(
    x3: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` with per-row ``[N*C]`` values.

    One ``batch_norm`` inference kernel over the ``[1, N*C, L]`` view of the rows; returns
    that kernel's own ``[1, N*C, L]`` tensor (not a view), in ``x3``'s dtype.
    """
    n, c, length = x3.shape
    if x3.numel() == 0:
        return x3.reshape(1, n * c, length).clone()
    flat = x3.view(1, n * c, length)
    cudnn = torch.backends.cudnn.enabled
    return torch.batch_norm(flat, weight, bias, mean, var, False, 0.0, eps, cudnn)


def _row_grad_sums(g3: Tensor, x3: Tensor, mean: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row ``sum(dy)`` and ``sum(dy * (x - mean))`` as ``[N, C]``, in one fused pass."""
    n, c, length = x3.shape
    if x3.numel() == 0:
        zeros = torch.zeros(n, c, dtype=mean.dtype, device=x3.device)
        return zeros, zeros
    ones = torch.ones(n * c, dtype=mean.dtype, device=x3.device)
    _, row_dot, row_sum = torch.ops.aten.native_batch_norm_backward(
        g3.view(1, n * c, length),
        x3.view(1, n * c, length),
        ones,
        None,
        None,
        mean,
        ones,
        True,
        0.0,
        [False, True, True],
    )
    return row_sum.view(n, c), row_dot.view(n, c)


Grads = tuple[Tensor | None, Tensor | None, Tensor | None]


def _fused_grads(ctx: Any, saved: tuple[Tensor, ...], g3: Tensor) -> Grads:
    """First-order gradients of :class:`_DomainBatchNormFn` in a few fused passes (no graph)."""
    x3, ids, weight, count, row_mean, mean, invstd = saved
    num_domains, c = mean.shape
    g3 = g3.contiguous()
    row_sum, row_dot = _row_grad_sums(g3, x3, row_mean)
    zeros = torch.zeros(num_domains, c, dtype=mean.dtype, device=x3.device)
    sum_dy = zeros.index_add(0, ids, row_sum.to(mean.dtype))
    sum_dy_xmu = zeros.index_add(0, ids, row_dot.to(mean.dtype))
    grad_weight = grad_bias = grad_x = None
    if weight is not None and ctx.needs_input_grad[1]:
        grad_weight = _fold_domains(sum_dy_xmu * invstd, weight)
    if ctx.needs_input_grad[2]:
        grad_bias = _fold_domains(sum_dy, ctx.bias_like)
    if ctx.needs_input_grad[0]:
        if ctx.group is not None:
            packed = torch.stack([sum_dy, sum_dy_xmu])
            torch.distributed.all_reduce(packed, group=ctx.group[0])
            sum_dy, sum_dy_xmu = packed[0], packed[1]
        # dx = scale * (dy - sum_dy / M - (x - mu) * invstd^2 * sum_dy_xmu / M): the
        # (x - mu) part is one inference batch_norm kernel (exact centring), then + scale*dy
        scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
        inv_count = 1.0 / count.clamp(min=1).unsqueeze(1)
        coef_xmu = -scale * invstd.square() * sum_dy_xmu * inv_count
        coef_1 = -scale * sum_dy * inv_count
        grad_x = _normalize_rows(
            x3,
            row_mean,
            torch.ones_like(row_mean),
            coef_xmu[ids].reshape(-1),
            coef_1[ids].reshape(-1),
            0.0,
        ).view(x3.shape)
        grad_x = grad_x.addcmul_(g3, scale[ids].unsqueeze(2).to(grad_x.dtype))
    return grad_x, grad_weight, grad_bias


def _graph_grads(ctx: Any, saved: tuple[Tensor, ...], g3: Tensor) -> Grads:
    r"""Gradients of :class:`_DomainBatchNormFn` from differentiable ops (``create_graph``).

    BatchNorm's backward per domain :math:`d`, with :math:`\mu_d, \sigma_d` recomputed from
    the saved input (through a differentiable all-reduce when synchronised) and
    :math:`\hat x = (x - \mu_d) / \sigma_d`:

    .. math::

        \partial\beta_d = \textstyle\sum_d \partial y,\quad
        \partial\gamma_d = \textstyle\sum_d \partial y\,\hat x,\quad
        \partial x = \frac{\gamma_d}{\sigma_d}\left(\partial y - \mathrm{E}_d[\partial y]
        - \hat x\, \mathrm{E}_d[\partial y\, \hat x]\right)

    (means over the domain's elements on all ranks), in fp32 at least. Autograd
    differentiates this graph, so double backward (gradient penalties) is exact.
    """
    x3, ids, weight, count, _, mean, _ = saved
    group = ctx.group
    num_domains, c = mean.shape
    xf, gf = x3.to(mean.dtype), g3.to(mean.dtype)
    inv_count = count.clamp(min=1).reciprocal().unsqueeze(1)

    def domain_sum(rows: Tensor, across_ranks: bool) -> Tensor:
        total = rows.new_zeros(num_domains, c).index_add(0, ids, rows)
        if across_ranks and group is not None:
            return _AllReduceSum.apply(total, group[0])
        return total

    centred = xf - (domain_sum(xf.sum(2), True) * inv_count)[ids].unsqueeze(2)
    invstd = torch.rsqrt(domain_sum(centred.square().sum(2), True) * inv_count + ctx.eps)
    x_hat = centred * invstd[ids].unsqueeze(2)
    sum_dy = domain_sum(gf.sum(2), False)
    sum_dy_xhat = domain_sum((gf * x_hat).sum(2), False)
    grad_weight = grad_bias = grad_x = None
    if weight is not None and ctx.needs_input_grad[1]:
        grad_weight = _fold_domains(sum_dy_xhat, weight)
    if ctx.needs_input_grad[2]:
        grad_bias = _fold_domains(sum_dy, ctx.bias_like)
    if ctx.needs_input_grad[0]:
        sums = torch.stack([sum_dy, sum_dy_xhat]) * inv_count
        if group is not None:
            sums = _AllReduceSum.apply(sums, group[0])
        scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
        grad_x = scale[ids].unsqueeze(2) * (
            gf - sums[0][ids].unsqueeze(2) - x_hat * sums[1][ids].unsqueeze(2)
        )
        grad_x = grad_x.to(x3.dtype)
    return grad_x, grad_weight, grad_bias


class _DomainBatchNormFn(torch.autograd.Function):
    """BatchNorm of ``[N, C, L]`` rows with given per-domain batch statistics.

    Forward: one ``batch_norm`` inference kernel over the ``[1, N*C, L]`` view with per-row
    mean/var/affine gathered from the domains' ``(count, mean, M2)`` (global when
    synchronised); the output is that kernel's own ``[1, N*C, L]`` tensor, never a view, so an
    inplace op after the layer (``nn.ReLU(inplace=True)``, ``out += identity``) is legal.
    Backward: :func:`_fused_grads` (one ``native_batch_norm_backward`` pass for the per-row
    sums, merged per domain and all-reduced across ranks as torch's SyncBatchNorm does, then
    ``A*dy + B*x + C``), or, when a graph of the gradient is asked for (``create_graph=True``:
    grad mode is on inside ``backward``), :func:`_graph_grads` on the saved input, which stays
    connected to the graph.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        # Any, as in torch's docs: FunctionCtx's stub has neither saved_tensors nor
        # needs_input_grad, takes no None in save_for_backward, and no custom attributes
        ctx: Any,
        x3: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        ids: Tensor,
        eps: float,
        group: tuple[torch.distributed.ProcessGroup | None] | None,
        stats: tuple[Tensor, Tensor, Tensor],
    ) -> Tensor:
        n = x3.shape[0]
        count, mean, m2 = stats
        var = m2 / count.clamp(min=1).unsqueeze(1)
        row_mean = mean[ids].reshape(-1)
        out = _normalize_rows(
            x3,
            row_mean,
            var[ids].reshape(-1),
            _gather_rows(weight, ids, n, mean.dtype),
            _gather_rows(bias, ids, n, mean.dtype),
            eps,
        )
        invstd = torch.rsqrt(var + eps)
        ctx.save_for_backward(x3, ids, weight, count, row_mean, mean, invstd)
        ctx.eps, ctx.group = eps, group
        ctx.bias_like = bias.detach() if bias is not None else None
        return out

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_out: Tensor
    ) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        g3 = grad_out.reshape(saved[0].shape)
        grad_fn = _graph_grads if torch.is_grad_enabled() else _fused_grads
        grads = grad_fn(ctx, saved, g3)
        return (*grads, None, None, None, None)


def _update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor | None,
    count: Tensor,
    mean: Tensor,
    unbiased_var: Tensor,
    momentum: float | None,
) -> None:
    """EMA (or cumulative average) update of the present domains' rows; absent rows untouched.

    The factor comes from :func:`lightning_norms._moments.running_factor`.
    """
    factor = running_factor(count, momentum, num_batches_tracked, running_mean.dtype)
    keep = 1 - factor
    running_mean.mul_(keep).add_(mean.to(running_mean.dtype) * factor)
    running_var.mul_(keep).add_(unbiased_var.to(running_var.dtype) * factor)


def _empty_batch_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """Output of a batch without elements: empty, attached to ``weight``/``bias`` (zero grads).

    What ``F.batch_norm`` returns for an empty input; nothing is computed or updated.
    """
    out = x.clone()
    if weight is not None and weight.numel():
        out = out * weight.flatten()[0]
    if bias is not None and bias.numel():
        out = out + bias.flatten()[0]
    return out


def _int_domain_batch_norm(
    x: Tensor,
    domain: int,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    use_batch_stats: bool,
    momentum: float | None,
    eps: float,
    num_batches_tracked: Tensor | None,
    name: str,
) -> Tensor:
    """A whole batch of one domain: one ``F.batch_norm`` on row views of the buffers.

    ``num_batches_tracked`` (given in training only) is advanced after the kernel succeeded.
    """
    if use_batch_stats and x.numel() <= x.shape[1]:
        raise ValueError(
            f"{name}: expected more than 1 value per channel when training, got input of "
            f"shape {tuple(x.shape)}"
        )
    per_domain_affine = weight is not None and weight.dim() == 2
    tracked = running_mean is not None and num_batches_tracked is not None
    factor = 0.0
    if tracked and num_batches_tracked is not None:
        steps = float(num_batches_tracked[domain]) + 1.0 if momentum is None else 1.0
        factor = float(ema_factor(momentum, steps))
    elif momentum is not None:
        factor = momentum
    out = F.batch_norm(
        x,
        None if running_mean is None else running_mean[domain],
        None if running_var is None else running_var[domain],
        weight[domain] if per_domain_affine and weight is not None else weight,
        bias[domain] if per_domain_affine and bias is not None else bias,
        use_batch_stats,
        factor,
        eps,
    )
    if tracked and num_batches_tracked is not None:
        num_batches_tracked[domain].add_(1)
    return out


def _eval_rows(
    x3: Tensor,
    ids: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """Eval with per-sample ids: one inference kernel with every row's domain statistics."""
    n, c, length = x3.shape
    return F.batch_norm(
        x3.view(1, n * c, length),
        running_mean[ids].reshape(-1),
        running_var[ids].reshape(-1),
        _gather_rows(weight, ids, n, running_mean.dtype),
        _gather_rows(bias, ids, n, running_mean.dtype),
        False,
        0.0,
        eps,
    )


def _domain_batch_norm(
    x: Tensor,
    domains: int | Tensor,
    num_domains: int,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
    num_batches_tracked: Tensor | None,
    sync: bool,
    process_group: torch.distributed.ProcessGroup | None,
    name: str,
) -> Tensor:
    """:func:`domain_batch_norm` on validated domain ids, with ``name`` in error messages.

    Every check runs before any buffer changes: a call that raises leaves them as they were.
    """
    use_batch_stats = training or running_mean is None or running_var is None
    group = (process_group,) if training and _sync_world(sync, process_group) else None
    if x.numel() == 0 and group is None:  # synced: every rank must join the collectives
        return _empty_batch_norm(x, weight, bias)
    if isinstance(domains, int) and group is None:
        return _int_domain_batch_norm(
            x,
            domains,
            running_mean,
            running_var,
            weight,
            bias,
            use_batch_stats,
            momentum,
            eps,
            num_batches_tracked if training else None,
            name,
        )
    ids = _expand_domains(domains, x)
    x3 = _rows(x)
    if not use_batch_stats and running_mean is not None and running_var is not None:
        return _eval_rows(x3, ids, running_mean, running_var, weight, bias, eps).view(x.shape)
    count, mean, m2 = _domain_stats(x3, ids, num_domains, group, name)
    out = _DomainBatchNormFn.apply(x3, weight, bias, ids, eps, group, (count, mean, m2))
    if training and running_mean is not None and running_var is not None:
        with torch.no_grad():
            update_running(
                running_mean, running_var, Moments(count, mean, m2), momentum, num_batches_tracked
            )
    return out.view(x.shape)


def domain_batch_norm(
    x: Tensor,
    domains: int | Tensor,
    num_domains: int,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    num_batches_tracked: Tensor | None = None,
    sync: bool = False,
    process_group: torch.distributed.ProcessGroup | None = None,
    *,
    name: str = "domain_batch_norm",
) -> Tensor:
    r"""Domain-split BatchNorm: every sample normalised with the statistics of its own domain.

    Li et al. 2016, "Revisiting Batch Normalization For Practical Domain Adaptation"
    (AdaBN, arXiv:1603.04779); Chang et al. 2019, "Domain-Specific Batch Normalization for
    Unsupervised Domain Adaptation" (arXiv:1906.03950). For a sample of domain :math:`d`:

    .. math::

        y = \frac{x - \mu_d}{\sqrt{\sigma^2_d + \epsilon}}\, \gamma_d + \beta_d

    with :math:`\mu_d, \sigma^2_d` the batch statistics of domain :math:`d`'s samples
    (training, or no running statistics) or row :math:`d` of the running statistics (eval).
    The output equals running each domain's sub-batch through its own ``F.batch_norm``, in
    one call without a loop over samples. An ``int`` domain is a single ``F.batch_norm`` on
    row views of the buffers. In training, the rows of present domains are updated like
    BatchNorm's (unbiased variance); an absent domain's rows, and its entry of
    ``num_batches_tracked``, are left untouched. With ``sync`` (or a ``process_group``) in
    training under ``torch.distributed``, batch statistics and the backward's sums are
    all-reduced so every rank normalises with the global per-domain statistics.

    As ``F.batch_norm``: statistics in fp32 for fp16/bf16 inputs or parameters, output in the
    input's dtype; an empty batch gives an empty output and changes no buffer; a call that
    raises changes no buffer; the output is never a view (inplace ops after it are fine); and
    double backward (gradient penalties) is exact on every path, synchronised ones included.

    Args:
        x: input with channels in dim 1.
        domains: an ``int`` (whole batch one domain) or ``LongTensor[N]`` of per-sample ids.
        num_domains: number of domains ``D``.
        running_mean: ``[D, C]`` (updated in place in training), or ``None``. Default: ``None``.
        running_var: ``[D, C]`` unbiased running variance, or ``None``. Default: ``None``.
        weight: ``gamma``, ``[D, C]`` per domain or ``[C]`` shared, or ``None``.
            Default: ``None``.
        bias: ``beta``, same shape as ``weight``, or ``None``. Default: ``None``.
        training: use batch statistics and update the running ones. Default: ``False``.
        momentum: running-average factor; ``None``: cumulative average per domain (needs
            ``num_batches_tracked``). Default: ``0.1``.
        eps: added to the variance. Default: ``1e-5``.
        num_batches_tracked: ``LongTensor[D]``, training batches each domain appeared in
            (incremented in place), or ``None``. Default: ``None``.
        sync: all-reduce batch statistics across ranks in training. Default: ``False``.
        process_group: group to reduce over (implies ``sync``). Default: ``None`` (world).
        name: how error messages name the caller (keyword only; layers pass their own
            name). Default: ``"domain_batch_norm"``.

    Shape:
        ``x``: :math:`(N, C, *)`; output: same shape.

    Raises:
        ValueError: domain ids not integer, not of shape ``[N]``, or outside
            ``[0, num_domains)``; a domain with a single value per channel in training
            (decided on the global counts when synchronised, so every rank raises).

    Example:
        >>> x = torch.randn(6, 3, 4, 4)
        >>> ids = torch.tensor([0, 1, 0, 1, 1, 0])
        >>> y = domain_batch_norm(x, ids, 2, training=True)
        >>> ref = F.batch_norm(x[ids == 1], None, None, training=True)
        >>> torch.allclose(y[ids == 1], ref, atol=1e-5)
        True
    """
    domains = _check_domains(domains, x.shape[0], num_domains, name)
    if momentum is None and num_batches_tracked is None and training and running_mean is not None:
        raise ValueError(f"{name}: momentum=None (cumulative average) needs num_batches_tracked")
    return _domain_batch_norm(
        x,
        domains,
        num_domains,
        running_mean,
        running_var,
        weight,
        bias,
        training,
        momentum,
        eps,
        num_batches_tracked,
        sync,
        process_group,
        name,
    )
