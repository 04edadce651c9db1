"""Domain-split BatchNorm and synchronised batch statistics: grouped kernel, sync, update.

The per-domain batch statistics come from the moment engine (:mod:`lightning_norms._moments`:
one fused ``var_mean`` per ``(sample, channel)`` row, Chan's merge per domain on the tiny
``[N, C]`` rows, one fp64 all-reduce when synchronised). The normalisation is ONE elementwise
op with per-row scale and shift, ``y = x * scale_r + shift_r`` (``torch.addcmul``); the
backward takes the per-row sums ``sum(dy)``, ``sum(dy * (x - mu))`` in one fused pass, merges
them per domain, and applies ``dx = a_r * dy + b_r * x + c_r``. No loop over domains, no
per-sample Python. Nothing reads a tensor back to the host on an accelerator: ids are
range-checked on the host for CPU tensors only (free there), by a device-side assert elsewhere,
and not while ``torch.compile`` traces (no graph breaks). A domain with one value per channel
in a per-sample batch is normalised with its running statistics (:func:`_rare_domains`), a
``torch.where`` on ``[D, C]`` rows, not a host-side branch.
"""

from __future__ import annotations

import weakref
from collections import Counter
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_norms._moments import (
    Moments,
    all_reduce_moments,
    as_dtype,
    batch_moments,
    ema_factor,
    kernel_input_dtype,
    stat_dtype,
    update_running,
)
from lightning_norms.functional._sync import AllReduceSum as _AllReduceSum
from lightning_norms.functional._sync import sync_world as _sync_world

Group = tuple[torch.distributed.ProcessGroup | None] | None
"""``None`` (local statistics) or a 1-tuple holding the process group to all-reduce over."""


def _functorch() -> bool:
    """Whether a ``torch.func`` transform (``grad``, ``vmap``, ...) is running."""
    return bool(torch._C._are_functorch_transforms_active())


def _eager() -> bool:
    """Whether host-needing checks may run (not while ``torch.compile``, ``torch.func`` or
    ``torch.jit.trace`` trace)."""
    return not (torch.compiler.is_compiling() or _functorch() or torch.jit.is_tracing())


def _check_domains(
    domains: int | Tensor, batch_size: int, num_domains: int, name: str
) -> int | Tensor:
    """Validate domain ids: an ``int`` is returned as is, a tensor as ``LongTensor[N]``.

    The range of a tensor's ids is checked in eager mode only: on the host for CPU ids, by a
    device-side assert (no host read) on accelerators.
    """
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
        else:
            if domains.numel() and _eager():
                _check_range(domains, num_domains, name)
            return domains if domains.dtype == torch.long else domains.long()
    if isinstance(domains, bool) or not isinstance(domains, int):
        raise ValueError(
            f"{name}: domain must be an int or an integer LongTensor[N], got {domains!r}"
        )
    if not 0 <= domains < num_domains:
        raise ValueError(f"{name}: domain must be in [0, {num_domains}), got {domains}")
    return domains


class HostIds(NamedTuple):
    """What the host knows of a CPU ids tensor: smallest and largest id, rows per id."""

    low: int
    high: int
    rows: Counter[int]


_HOST_IDS: list[tuple[weakref.ref[Tensor], int, HostIds]] = []
"""The last CPU ids tensor read (a weak reference, its version) and what it held."""


def host_ids(ids: Tensor) -> HostIds:
    """The values of CPU ``ids`` summarised on the host: one read per ids tensor and version.

    Every layer of a network called with the same ids tensor (``with domain(model, ids)``, or
    one ``ids`` passed to each layer) shares the one read: the 2nd layer on needs none, and
    neither does a repeated call with an unchanged tensor (an in-place change bumps its
    version and is read again). Inference tensors have no version: read on every call.
    """
    if not ids.is_inference() and _HOST_IDS:
        ref, version, info = _HOST_IDS[0]
        if ref() is ids and version == ids._version:
            return info
    values = ids.flatten().tolist()
    info = HostIds(min(values, default=0), max(values, default=-1), Counter(values))
    if not ids.is_inference():
        _HOST_IDS[:] = [(weakref.ref(ids), ids._version, info)]
    return info


_ASSERTED: list[tuple[weakref.ref[Tensor], int, int]] = []
"""The last accelerator ids tensor range-asserted (weak reference, version, ``num_domains``)."""


def _same_ids(
    cache: list[tuple[weakref.ref[Tensor], int, int]], ids: Tensor, num_domains: int
) -> bool:
    """Whether ``ids`` (same object, unchanged) was asserted below at most ``num_domains``."""
    if not cache or ids.is_inference():
        return False
    ref, version, checked = cache[0]
    return ref() is ids and version == ids._version and checked <= num_domains


def _check_range(ids: Tensor, num_domains: int, name: str) -> None:
    """Raise unless every id is in ``[0, num_domains)``.

    CPU ids: a ``ValueError`` from :func:`host_ids` (one host read per ids tensor, shared by
    every layer it is passed to). Accelerator ids: a device-side assert
    (``torch._assert_async``, no host read; it fails at the next sync), once per ids tensor
    and version for layers of as many domains or more (the other layers of a network skip
    its four launches).
    """
    if ids.device.type != "cpu":
        if _same_ids(_ASSERTED, ids, num_domains):  # asserted already for this tensor
            return
        lowest, highest = torch.aminmax(ids)
        message = f"{name}: domain ids must be in [0, {num_domains})"
        torch._assert_async((lowest >= 0) & (highest < num_domains), message)
        if not ids.is_inference():
            _ASSERTED[:] = [(weakref.ref(ids), ids._version, num_domains)]
        return
    low, high, _ = host_ids(ids)
    if low < 0 or high >= num_domains:
        bad = low if low < 0 else high
        raise ValueError(
            f"{name}: domain ids must be in [0, {num_domains}), got {bad} (min {low}, max {high})"
        )


def _expand_domains(domains: int | Tensor, x: Tensor) -> Tensor:
    """Per-sample ids on ``x``'s device (an ``int`` is broadcast over the batch)."""
    if isinstance(domains, int):
        return torch.full((x.shape[0],), domains, dtype=torch.long, device=x.device)
    if domains.dtype == torch.long and domains.device == x.device:
        return domains
    return domains.to(device=x.device, dtype=torch.long)


def _rows(x: Tensor) -> Tensor:
    """``x`` as contiguous ``[N, C, L]`` rows (``L`` = positions per sample; also for N = 0)."""
    return x.reshape(x.shape[0], x.shape[1], x.shape[2:].numel()).contiguous()


def _check_counts(count: Tensor, name: str) -> None:
    """Raise (on every rank alike, when ``count`` is global) for a one-value domain.

    A host read on CPU; a device-side assert (no host read) on accelerators.
    """
    single = count == 1
    if count.device.type != "cpu":
        message = f"{name}: expected more than 1 value per channel when training"
        torch._assert_async(~single.any(), message)
        return
    if bool(single.any()):
        which = torch.nonzero(single).flatten().tolist()
        raise ValueError(
            f"{name}: expected more than 1 value per channel when training, got 1 for "
            f"domain(s) {which}"
        )


def _local_moments(x3: Tensor, ids: Tensor, num_domains: int) -> Moments:
    """This rank's per-domain moments of ``[N, C, L]`` rows (count 0 everywhere when empty)."""
    if x3.numel():
        return batch_moments(x3, ids, num_domains)
    zeros = x3.new_zeros(num_domains, x3.shape[1], dtype=stat_dtype(x3))
    return Moments(zeros[:, 0], zeros, zeros)


def _domain_stats(
    x3: Tensor, ids: Tensor, num_domains: int, group: Group, name: str, *, check: bool = True
) -> Moments:
    """Per-domain ``Moments(count, mean, M2)`` of ``[N, C, L]`` rows, global over ``group``.

    From the engine (:func:`~lightning_norms._moments.batch_moments`, then
    :func:`~lightning_norms._moments.all_reduce_moments`); no gradient (the backward accounts
    for the statistics' dependence on ``x``). An empty input (a rank without data) counts
    nothing. With ``check`` (one statistics set for the whole batch, as ``nn.BatchNorm``), in
    eager mode, raises for a one-value domain before any state changes, on every rank alike
    when synchronised; per-sample ids pass ``check=False`` (see :func:`_rare_domains`).
    """
    with torch.no_grad():
        moments = _local_moments(x3, ids, num_domains)
        if group is not None:
            (moments,) = all_reduce_moments([moments], group[0])
    if check and _eager():
        _check_counts(moments.n, name)
    return moments


def _rare_domains(
    stats: Moments, running_mean: Tensor | None, running_var: Tensor | None
) -> tuple[Moments, Tensor]:
    """The statistics the kernel uses when a domain has one value per channel, and which did.

    Such a domain (``count == 1``, global when synchronised) is normalised as in eval: its
    row of the running statistics replaces the batch statistics and its count becomes 0, which
    :class:`_DomainBatchNormFn` reads as fixed statistics (no batch-statistics terms in the
    gradient: the eval-mode gradient) and :func:`update_running` as absent (its rows and its
    ``num_batches_tracked`` entry stay). Without running statistics the batch statistics stay
    (mean = the value, variance 0): output ``beta`` and input gradient 0, BatchNorm's limit
    at one value. ``torch.where`` on ``[D, C]`` rows: no host read. Returns the statistics
    and the ``BoolTensor[D]`` of one-value domains.
    """
    rare = stats.n == 1
    if running_mean is None or running_var is None:
        return stats, rare
    fixed, dtype = rare.unsqueeze(1), stats.mean.dtype
    count = stats.n.masked_fill(rare, 0.0)
    mean = torch.where(fixed, as_dtype(running_mean, dtype), stats.mean)
    return Moments(count, mean, torch.where(fixed, as_dtype(running_var, dtype), stats.m2)), rare


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
        moments = _local_moments(_rows(x), _expand_domains(domains, x), num_domains)
        if _sync_world(sync, process_group):
            (moments,) = all_reduce_moments([moments], process_group)
        return moments.n, moments.mean, moments.var(unbiased=False)


def _fold_domains(grad: Tensor, param: tuple[int, torch.dtype]) -> Tensor:
    """A ``[D, C]`` gradient for a parameter of ``(dim, dtype)``: as is (per domain, ``dim``
    2) or summed over domains (shared)."""
    grad = grad if param[0] == 2 else grad.sum(0)
    return as_dtype(grad, param[1])


def _scale_shift(
    mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Per-domain ``scale = gamma / sigma`` and ``shift = beta - mu * scale`` (``[D, C]``).

    In the statistics' dtype (fp16/bf16 parameters are used in fp32, as the statistics).
    """
    scale = invstd if weight is None else invstd * as_dtype(weight, invstd.dtype)
    if bias is None:
        return scale, (mean * scale).neg_()
    return scale, torch.addcmul(as_dtype(bias, invstd.dtype), mean, scale, value=-1.0)


def _low_precision(x3: Tensor, coefs: Tensor) -> bool:
    """Whether ``x3`` is fp16/bf16 that torch's BatchNorm kernels read next to fp32 ``coefs``.

    Not under a ``torch.func`` transform (batched, the kernel wants one dtype).
    """
    low = x3.dtype in (torch.float16, torch.bfloat16) and coefs.dtype == torch.float32
    native = kernel_input_dtype(x3.device, x3.dtype, coefs.dtype) == x3.dtype
    return low and native and not _functorch()


def _row_kernel(x3: Tensor, scale: Tensor, shift: Tensor | None) -> Tensor:
    """``x * scale + shift`` with fp32 per-row ``[N, C]`` coefficients, fp16/bf16 ``x3``.

    BatchNorm's eval kernel on the ``[1, N*C, L]`` view (mean 0, variance 1, eps 0: the
    weight and bias are the coefficients as they are): it computes in fp32 and writes
    ``x3``'s dtype, with no activation-sized fp32 tensor (an elementwise op mixing the dtypes
    would make one). Differentiable to any order.
    """
    n, c, length = x3.shape
    zeros = scale.new_zeros(2, n * c)
    flat = None if shift is None else shift.reshape(-1)
    out = F.batch_norm(
        x3.view(1, n * c, length), zeros[0], zeros[1] + 1.0, scale.reshape(-1), flat, eps=0.0
    )
    # not a view of the kernel's output: returned from a custom Function, a view would forbid
    # inplace ops after the layer (``nn.ReLU(inplace=True)``, ``out += identity``)
    return torch.ops.aten._unsafe_view(out, (n, c, length))


def _affine_rows(x3: Tensor, ids: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``x * scale[ids] + shift[ids]`` per ``(sample, channel)`` row: one elementwise op.

    fp16/bf16 on CPU/CUDA: :func:`_row_kernel` (computed in fp32, no fp32 activation).
    Returns a new ``[N, C, L]`` tensor in ``x3``'s dtype (never a view).
    """
    c = scale.shape[1]
    rows = torch.cat([scale, shift], 1).index_select(0, ids)
    if _low_precision(x3, rows):
        return _row_kernel(x3, rows[:, :c], rows[:, c:])
    rows = rows.unsqueeze(2)
    out = torch.addcmul(rows[:, c:], x3, rows[:, :c])
    return as_dtype(out, x3.dtype)


def _row_grad_sums(g3: Tensor, x3: Tensor, mean_rows: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row ``sum(dy)`` and ``sum(dy * (x - mean))`` as ``[N, C]``, in one fused pass.

    ``native_batch_norm_backward`` over the ``[1, N*C, L]`` view (every row a "channel", with
    unit weight and invstd), whose parameter gradients are exactly these sums. One position
    per row (``BatchNorm1d`` on ``(N, C)``): no reduction at all (``N*C`` one-element
    reductions on CUDA otherwise), the sums are ``dy`` and ``dy * (x - mean)`` elementwise.
    The kernel gets the input in :func:`~lightning_norms._moments.kernel_input_dtype`
    (upcast off CPU/CUDA, e.g. MPS).
    """
    n, c, length = x3.shape
    if length == 1:
        g, x = as_dtype(g3.view(n, c), mean_rows.dtype), as_dtype(x3.view(n, c), mean_rows.dtype)
        return g, g * (x - mean_rows)
    dtype = kernel_input_dtype(x3.device, x3.dtype, mean_rows.dtype)
    g3, x3 = as_dtype(g3, dtype), as_dtype(x3, dtype)
    ones = torch.ones(n * c, dtype=mean_rows.dtype, device=x3.device)
    _, row_dot, row_sum = torch.ops.aten.native_batch_norm_backward(
        g3.view(1, n * c, length),
        x3.view(1, n * c, length),
        ones,
        None,
        None,
        mean_rows.reshape(-1),
        ones,
        True,
        0.0,
        [False, True, True],
    )
    return row_sum.view(n, c), row_dot.view(n, c)


Grads = tuple[Tensor | None, Tensor | None, Tensor | None]


KernelStats = tuple[Tensor, Tensor, Tensor]
"""``(inv_count [D, 1], mean [D, C], invstd [D, C])``: what :class:`_DomainBatchNormFn` uses."""


def _kernel_stats(stats: Moments, eps: float) -> KernelStats:
    """Per-domain ``1 / count`` (0 where the count is 0), mean and ``1 / sqrt(var + eps)``.

    Computed once per call, for the forward and the backward. A domain of count 0 with rows
    has fixed statistics (:func:`_rare_domains`: ``M2`` holds its variance, divided by 1).
    """
    count = stats.n.unsqueeze(1)
    inv = count.clamp(min=1).reciprocal()
    invstd = (stats.m2 * inv).add_(eps).rsqrt_()
    return torch.where(count > 0, inv, 0.0), stats.mean, invstd


def _fused_grads(ctx: Any, saved: tuple[Tensor, ...], g3: Tensor) -> Grads:
    """First-order gradients of :class:`_DomainBatchNormFn` in a few fused passes (no graph).

    ``dx = scale * (dy - E_d[dy] - (x - mu_d) invstd_d^2 E_d[dy (x - mu_d)])`` regrouped as
    ``a_r * dy + b_r * x + c_r`` with per-row coefficients: two elementwise ops.
    """
    x3, ids, weight, inv_count, mean, invstd, scale = saved
    c = mean.shape[1]
    g3 = g3.contiguous()
    grad_x = None
    if x3.numel():
        row_sum, row_dot = _row_grad_sums(g3, x3, mean.index_select(0, ids))
        rows = as_dtype(torch.cat([row_sum, row_dot], 1), mean.dtype)
        sums = rows.new_zeros(mean.shape[0], 2 * c).index_add(0, ids, rows)
    else:
        sums = mean.new_zeros(mean.shape[0], 2 * c)
    grad_weight = grad_bias = None
    if weight is not None and ctx.needs_input_grad[1]:
        grad_weight = _fold_domains(sums[:, c:] * invstd, ctx.weight_meta)
    if ctx.needs_input_grad[2]:
        grad_bias = _fold_domains(sums[:, :c].clone(), ctx.bias_meta)
    if ctx.needs_input_grad[0]:
        if ctx.group is not None:  # input gradients see every rank's sums, as SyncBatchNorm
            sums = _AllReduceSum.apply(sums, ctx.group[0])
        means = sums * inv_count  # [E_d[dy] | E_d[dy (x - mu)]]
        k = invstd.square().mul_(means[:, c:])
        shifted = torch.addcmul(means[:, :c], k, mean, value=-1.0)  # E_d[dy] - k mu
        # per domain [scale | -scale k | -scale (E_d[dy] - k mu)]
        signed = torch.stack([k, shifted], 1).mul_(scale.unsqueeze(1)).neg_().flatten(1)
        coefs = torch.cat([scale, signed], 1)
        if _low_precision(x3, coefs) and g3.dtype == x3.dtype:
            return _low_precision_grad(g3, x3, coefs.index_select(0, ids)), grad_weight, grad_bias
        rows3 = coefs.index_select(0, ids).unsqueeze(2)
        grad_x = torch.addcmul(rows3[:, 2 * c :], x3, rows3[:, c : 2 * c])
        if _functorch():  # out of place: grad_x may be unbatched where g3 is batched
            grad_x = torch.addcmul(grad_x, g3, rows3[:, :c])
        else:  # in place: no second activation-sized temporary
            grad_x = grad_x.addcmul_(g3, rows3[:, :c])
        grad_x = as_dtype(grad_x, x3.dtype)
    return grad_x, grad_weight, grad_bias


def _low_precision_grad(g3: Tensor, x3: Tensor, rows: Tensor) -> Tensor:
    """``a * dy + (b * x + c)`` for fp16/bf16 ``g3``, ``x3`` and fp32 rows ``[N, 3C] = [a|b|c]``.

    Both terms from :func:`_row_kernel` (fp32 inside, each rounded once to ``x3``'s dtype),
    added in place in that dtype: no activation-sized fp32 tensor (about one rounding more
    than a single fp32 expression; not used under ``torch.func``, see :func:`_low_precision`).
    """
    c = rows.shape[1] // 3
    linear = _row_kernel(x3, rows[:, c : 2 * c], rows[:, 2 * c :])
    scaled = _row_kernel(g3, rows[:, :c], None)
    return linear.add_(scaled)


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
    x3, ids, weight, inv_count, mean, fixed_invstd, _ = saved
    group = ctx.group
    num_domains, c = mean.shape
    xf, gf = x3.to(mean.dtype), g3.to(mean.dtype)
    fixed = inv_count == 0  # fixed statistics: constants, as in eval

    def domain_sum(rows: Tensor, across_ranks: bool) -> Tensor:
        total = rows.new_zeros(num_domains, c).index_add(0, ids, rows)
        if across_ranks and group is not None:
            return _AllReduceSum.apply(total, group[0])
        return total

    batch_mean = domain_sum(xf.sum(2), True) * inv_count
    centred = xf - torch.where(fixed, mean, batch_mean)[ids].unsqueeze(2)
    batch_invstd = torch.rsqrt(domain_sum(centred.square().sum(2), True) * inv_count + ctx.eps)
    invstd = torch.where(fixed, fixed_invstd, batch_invstd)
    x_hat = centred * invstd[ids].unsqueeze(2)
    sum_dy = domain_sum(gf.sum(2), False)
    sum_dy_xhat = domain_sum((gf * x_hat).sum(2), False)
    grad_weight = grad_bias = grad_x = None
    if weight is not None and ctx.needs_input_grad[1]:
        grad_weight = _fold_domains(sum_dy_xhat, ctx.weight_meta)
    if ctx.needs_input_grad[2]:
        grad_bias = _fold_domains(sum_dy, ctx.bias_meta)
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

    Forward: ``y = x * scale_r + shift_r`` (:func:`_affine_rows`, one elementwise op) with the
    per-domain ``scale = gamma / sigma_d``, ``shift = beta - mu_d * scale`` gathered per row;
    the output is a new tensor, never a view, so an inplace op after the layer
    (``nn.ReLU(inplace=True)``, ``out += identity``) is legal. ``stats`` are
    ``(count [D], mean [D, C], M2 [D, C])``; a domain of count 0 with rows uses ``mean`` and
    ``M2`` as fixed mean and variance (running statistics: eval formula and gradient).
    Backward: :func:`_fused_grads` (one ``native_batch_norm_backward`` pass for the per-row
    sums, merged per domain and all-reduced across ranks as torch's SyncBatchNorm does, then
    ``a*dy + b*x + c``), or, when a graph of the gradient is asked for (``create_graph=True``:
    grad mode is on inside ``backward``), :func:`_graph_grads` on the saved input, which stays
    connected to the graph. ``forward`` without ``ctx`` plus ``setup_context`` and a generated
    vmap rule: ``torch.func`` (``grad``, ``vmap``, ``functional_call``) works through it.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(  # type: ignore[override]
        x3: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        ids: Tensor,
        eps: float,
        group: Group,
        stats: KernelStats,
    ) -> Tensor:
        _, mean, invstd = stats
        return _affine_rows(x3, ids, *_scale_shift(mean, invstd, weight, bias))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        # Any, as in torch's docs: FunctionCtx's stub has neither saved_tensors nor
        # needs_input_grad, takes no None in save_for_backward, and no custom attributes
        x3, weight, bias, ids, eps, group, (inv_count, mean, invstd) = inputs
        scale = invstd if weight is None else invstd * as_dtype(weight, invstd.dtype)
        ctx.save_for_backward(x3, ids, weight, inv_count, mean, invstd, scale)
        ctx.eps, ctx.group = eps, group
        ctx.weight_meta = None if weight is None else (weight.dim(), weight.dtype)
        ctx.bias_meta = None if bias is None else (bias.dim(), bias.dtype)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_out: Tensor
    ) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        g3 = grad_out.reshape(saved[0].shape)
        grad_fn = _graph_grads if torch.is_grad_enabled() else _fused_grads
        grads = grad_fn(ctx, saved, g3)
        return (*grads, None, None, None, None)


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
    ``momentum=None``: the kernel writes the batch statistics into fresh rows (momentum 1),
    merged into the buffers with the factor ``1 / steps`` on the device (no host read).
    """
    per_domain_affine = weight is not None and weight.dim() == 2
    tracked = running_mean is not None and num_batches_tracked is not None
    buffers = (running_mean, running_var)
    rows: list[Tensor | None] = [None if t is None else t[domain] for t in buffers]
    factor, fresh = (0.0 if momentum is None else momentum), []
    if momentum is None and tracked and running_mean is not None and running_var is not None:
        fresh = [torch.zeros_like(running_mean[domain]), torch.zeros_like(running_var[domain])]
        rows, factor = [fresh[0], fresh[1]], 1.0
    params = [t for t in (running_mean, weight) if t is not None]
    dtype = kernel_input_dtype(x.device, x.dtype, params[0].dtype) if params else x.dtype
    out = F.batch_norm(
        as_dtype(x, dtype),
        rows[0],
        rows[1],
        weight[domain] if per_domain_affine and weight is not None else weight,
        bias[domain] if per_domain_affine and bias is not None else bias,
        use_batch_stats,
        factor,
        eps,
    )
    if tracked and num_batches_tracked is not None:
        if fresh and running_mean is not None and running_var is not None:
            steps = num_batches_tracked[domain].to(fresh[0].dtype) + 1.0
            factor_new = cast(Tensor, ema_factor(None, steps))
            running_mean[domain].lerp_(fresh[0], factor_new)
            running_var[domain].lerp_(fresh[1], factor_new)
        num_batches_tracked[domain].add_(1)
    return as_dtype(out, x.dtype)


def _eval_rows(
    x3: Tensor,
    ids: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """Eval with per-sample ids: one elementwise op with every row's domain statistics.

    Differentiable ops only (autograd gives gradients of any order for ``x`` and the affine).
    """
    dtype = torch.promote_types(stat_dtype(x3), running_mean.dtype)
    invstd = torch.rsqrt(running_var.to(dtype) + eps)
    return _affine_rows(x3, ids, *_scale_shift(running_mean.to(dtype), invstd, weight, bias))


def _traced_rows(
    x3: Tensor,
    ids: Tensor,
    num_domains: int,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """Per-domain batch statistics normalisation from plain differentiable ops (``[N, C, L]``).

    What ``torch.jit.trace`` records for a call without running statistics (it cannot save a
    Python autograd Function): segment sums by ``index_add``, ``(x - mu_d) / sigma_d``
    with biased variance, then the affine; autograd gives the gradients.
    """
    c, dtype = x3.shape[1], stat_dtype(x3)
    xf = x3.to(dtype)
    zeros = xf.new_zeros(num_domains, c)
    rows = xf.new_zeros(num_domains).index_add(0, ids, xf.new_ones(ids.shape[0]))
    inv_count = (rows * x3.shape[2]).clamp(min=1).reciprocal().unsqueeze(1)
    centred = xf - (zeros.index_add(0, ids, xf.sum(2)) * inv_count)[ids].unsqueeze(2)
    invstd = torch.rsqrt(zeros.index_add(0, ids, centred.square().sum(2)) * inv_count + eps)
    scale, shift = _scale_shift(zeros, invstd, weight, bias)
    return torch.addcmul(shift[ids].unsqueeze(2), centred, scale[ids].unsqueeze(2)).to(x3.dtype)


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
    rare_domains: Tensor | None = None,
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
    ``num_batches_tracked``, are left untouched. With per-sample ids, a domain that has one
    value per channel (one sample at a 1x1 map; on the global count when synchronised) does
    not raise: it is normalised with its running statistics (eval formula and eval-mode
    gradient) and leaves them and its ``num_batches_tracked`` entry untouched, the other
    domains unaffected; without running statistics it gets ``beta`` (zero input gradient),
    BatchNorm's limit at one value. No host read decides this (``torch.where`` on the
    ``[D, C]`` statistics); pass ``rare_domains`` to learn which domains it concerned.
    With ``sync`` (or a ``process_group``) in training under ``torch.distributed``, batch
    statistics and the backward's sums are all-reduced so every rank normalises with the
    global per-domain statistics.

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
        rare_domains: a ``BoolTensor[D]`` on ``x``'s device into which the one-value domains
            of this call are OR-ed in place (device-side, no host read; not while
            ``torch.compile`` or ``torch.func`` trace), for the caller to report; the
            function itself never warns (keyword only). Default: ``None``.

    Shape:
        ``x``: :math:`(N, C, *)`; output: same shape.

    Raises:
        ValueError: domain ids not integer, not of shape ``[N]``, or outside
            ``[0, num_domains)`` (CPU ids; a device-side assert on accelerators); an ``int``
            domain with a single value per channel in training (decided on the global
            counts when synchronised, so every rank raises).

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
    use_batch_stats = training or running_mean is None or running_var is None
    group = (process_group,) if training and _sync_world(sync, process_group) else None
    if x.numel() == 0 and group is None:  # synced: every rank must join the collectives
        return _empty_batch_norm(x, weight, bias)
    local_int = isinstance(domains, int) and group is None
    if local_int and use_batch_stats and x.numel() <= x.shape[1]:
        raise ValueError(
            f"{name}: expected more than 1 value per channel when training, got input of "
            f"shape {tuple(x.shape)}"
        )
    if isinstance(domains, int) and local_int:
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
    if running_mean is None and group is None and torch.jit.is_tracing():
        return _traced_rows(x3, ids, num_domains, weight, bias, eps).view(x.shape)
    check = isinstance(domains, int) and group is not None  # else shape-checked above
    stats = _domain_stats(x3, ids, num_domains, group, name, check=check)
    # one value per channel needs one position per sample (or counts summed over ranks)
    if not isinstance(domains, int) and (group is not None or x3.shape[2] == 1):
        stats, rare = _rare_domains(stats, running_mean, running_var)
        if rare_domains is not None and _eager():
            rare_domains.logical_or_(rare)
    out = _DomainBatchNormFn.apply(x3, weight, bias, ids, eps, group, _kernel_stats(stats, eps))
    if training and running_mean is not None and running_var is not None:
        with torch.no_grad():
            update_running(running_mean, running_var, stats, momentum, num_batches_tracked)
    return out.view(x.shape)
