"""Domain-split BatchNorm and synchronised batch statistics: grouped kernel, sync, update.

Per-row moments of the ``[N, C, L]`` view in one fused pass
(:func:`~lightning_norms._moments.row_moments`), merged per domain by Chan's formula as three
small products with a :class:`Routing` (one-hot and weight matrices built once per ids tensor
and shared by every layer it routes); one fp64 all-reduce when synchronised. The
normalisation is one pass with per-row scale and shift, ``y = x * scale_r + shift_r``
(:func:`_affine_rows`); the backward takes the per-row sums ``sum(dy)``,
``sum(dy * (x - mu))`` in one fused pass, merges them per domain with two products, and
applies ``dx = a_r * dy + b_r * x + c_r``. No loop over domains, no per-sample Python.
Nothing reads a tensor back to the host on an accelerator: ids are range-checked on the host
for CPU tensors only (free there), by a device-side assert elsewhere, and not while
``torch.compile`` traces (no graph breaks). A domain with one value per channel in a
per-sample batch is normalised with its running statistics (:func:`_rare_domains`), a
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
    ema_factor,
    kernel_input_dtype,
    lerp_running,
    row_moments,
    running_factor,
    stat_dtype,
    update_running,
)
from lightning_norms._tracing import autocast_off, eager, eager_twin, functorch_active
from lightning_norms.functional._sync import AllReduceSum as _AllReduceSum
from lightning_norms.functional._sync import sync_world as _sync_world

Group = tuple[torch.distributed.ProcessGroup | None] | None
"""``None`` (local statistics) or a 1-tuple holding the process group to all-reduce over."""


def check_domains(
    domains: int | Tensor, batch_size: int, num_domains: int, name: str
) -> int | Tensor:
    """Validate domain ids: an ``int`` is returned as is, a tensor of shape ``[N]`` too (any
    integer dtype; :func:`expand_domains` makes it ``long`` on the input's device).

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
            if domains.numel() and eager():
                _check_range(domains, num_domains, name)
            return domains
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


class _LastIds:
    """What was derived from the last ids tensor seen: kept while the same tensor comes back
    unchanged (a weak reference, and its version: an in-place change bumps it), dropped for
    another tensor. Inference tensors have no version: nothing is kept for them."""

    def __init__(self) -> None:
        self._ref: weakref.ref[Tensor] | None = None
        self._version = -1
        self._values: dict[Any, Any] = {}

    def of(self, ids: Tensor) -> dict[Any, Any] | None:
        """The store for ``ids`` (emptied when ``ids`` is not the last tensor, unchanged)."""
        if ids.is_inference():
            return None
        if self._ref is None or self._ref() is not ids or self._version != ids._version:
            self._ref, self._version, self._values = weakref.ref(ids), ids._version, {}
        return self._values


_HOST_IDS = _LastIds()
"""What the host read of the last CPU ids tensor (key ``"host"``)."""


def host_ids(ids: Tensor) -> HostIds:
    """The values of CPU ``ids`` summarised on the host: one read per ids tensor and version.

    Every layer of a network called with the same ids tensor (``with domain(model, ids)``, or
    one ``ids`` passed to each layer) shares the one read: the 2nd layer on needs none, and
    neither does a repeated call with an unchanged tensor (an in-place change bumps its
    version and is read again). Inference tensors have no version: read on every call.
    """
    store = _HOST_IDS.of(ids)
    if store is not None and "host" in store:
        return cast(HostIds, store["host"])
    values = ids.flatten().tolist()
    info = HostIds(min(values, default=0), max(values, default=-1), Counter(values))
    if store is not None:
        store["host"] = info
    return info


_ASSERTED = _LastIds()
"""The smallest ``num_domains`` the last accelerator ids tensor was asserted below (key
``"below"``)."""


def _check_range(ids: Tensor, num_domains: int, name: str) -> None:
    """Raise unless every id is in ``[0, num_domains)``.

    CPU ids: a ``ValueError`` from :func:`host_ids` (one host read per ids tensor, shared by
    every layer it is passed to). Accelerator ids: a device-side assert
    (``torch._assert_async``, no host read; it fails at the next sync), once per ids tensor
    and version for layers of as many domains or more (the other layers of a network skip
    its four launches).
    """
    if ids.device.type != "cpu":
        store = _ASSERTED.of(ids)
        if store is not None and store.get("below", num_domains + 1) <= num_domains:
            return  # asserted already for this tensor
        lowest, highest = torch.aminmax(ids)
        message = f"{name}: domain ids must be in [0, {num_domains})"
        torch._assert_async((lowest >= 0) & (highest < num_domains), message)
        if store is not None:
            store["below"] = num_domains
        return
    low, high, _ = host_ids(ids)
    if low < 0 or high >= num_domains:
        bad = low if low < 0 else high
        raise ValueError(
            f"{name}: domain ids must be in [0, {num_domains}), got {bad} (min {low}, max {high})"
        )


_MOVED = _LastIds()
"""The last ids tensor converted to another device or to ``long``, per ``(device, dtype)``."""


def expand_domains(domains: int | Tensor, x: Tensor) -> Tensor:
    """Per-sample ids on ``x``'s device (an ``int`` is broadcast over the batch).

    An ids tensor on another device (CPU ids for a CUDA model) or not ``long`` is converted
    once per tensor and version in eager mode: every layer it routes gets the same converted
    tensor, so they share one :func:`routing` (a copy per layer would rebuild it per layer).
    """
    if isinstance(domains, int):
        return torch.full((x.shape[0],), domains, dtype=torch.long, device=x.device)
    if domains.dtype == torch.long and domains.device == x.device:
        return domains
    store = _MOVED.of(domains) if eager() and not torch.is_inference_mode_enabled() else None
    if store is None:
        return domains.to(device=x.device, dtype=torch.long)
    if x.device not in store:
        store[x.device] = domains.to(device=x.device, dtype=torch.long)
    return cast(Tensor, store[x.device])


def as_rows(x: Tensor) -> Tensor:
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


def domain_stats(
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
    with torch.no_grad(), autocast_off(x3.device):
        route = routing(ids, num_domains, x3.shape[2], stat_dtype(x3))
        _, moments = _local_moments(x3, route)
        if group is not None:
            (moments,) = all_reduce_moments([moments], group[0])
    if check and eager():
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
    domains = check_domains(domains, x.shape[0], num_domains, "domain_batch_stats")
    with torch.no_grad(), autocast_off(x.device):
        x3 = as_rows(x)
        route = routing(expand_domains(domains, x), num_domains, x3.shape[2], stat_dtype(x3))
        _, moments = _local_moments(x3, route)
        if _sync_world(sync, process_group):
            (moments,) = all_reduce_moments([moments], process_group)
        return moments.n, moments.mean, moments.var(unbiased=False)


def _fold_domains(grad: Tensor, param: tuple[int, torch.dtype]) -> Tensor:
    """A ``[D, C]`` gradient for a parameter of ``(dim, dtype)``: as is (per domain, ``dim``
    2) or summed over domains (shared)."""
    grad = grad if param[0] == 2 else grad.sum(0)
    return as_dtype(grad, param[1])


class Routing(NamedTuple):
    """Which domain each of ``N`` rows belongs to, as small matrices (see :func:`routing`).

    ``onehot [D, N]`` (1 where row ``r`` is of domain ``d``); ``weights [2D, N]``: the onehot
    scaled by ``1 / rows_d`` (means over a domain's rows), then by ``L / (n_d - 1)`` (an
    unbiased variance from per-row spreads); ``offset [2D, 1]``: ``eps``, then 0 (what
    ``addmm`` adds: ``[var + eps; unbiased var]`` in one product); ``neg_inv_count [D, 1]``:
    ``-1 / n_d`` (0 for an absent domain); ``counts [D]``: elements ``n_d``; ``present``:
    ``LongTensor[D]``, 1 where ``n_d > 0``; ``factor [D, 1]``: ``momentum * present``
    (``None`` for ``momentum=None``). All in the statistics' dtype on the ids' device.
    """

    onehot: Tensor
    weights: Tensor
    offset: Tensor
    neg_inv_count: Tensor
    counts: Tensor
    present: Tensor
    factor: Tensor | None


def _build_routing(
    ids: Tensor, num_domains: int, per_row: int, dtype: torch.dtype, eps: float,
    momentum: float | None,
) -> Routing:
    """:class:`Routing` of ``ids`` for rows of ``per_row`` elements (about 15 tiny ops)."""
    with torch.no_grad():
        domains = torch.arange(num_domains, device=ids.device).unsqueeze(1)
        onehot = (ids.unsqueeze(0) == domains).to(dtype)
        rows = onehot.sum(1, keepdim=True)
        count = rows * per_row
        unbiased = per_row / (count - 1.0).clamp(min=1.0)
        weights = torch.cat([onehot / rows.clamp(min=1.0), onehot * unbiased])
        offset = torch.cat([rows.new_full((num_domains, 1), eps), rows.new_zeros(num_domains, 1)])
        neg_inv = torch.where(count > 0, count.clamp(min=1.0).reciprocal().neg(), 0.0)
        present = count.flatten() > 0
        factor = None if momentum is None else present.to(dtype).unsqueeze(1) * momentum
        return Routing(
            onehot, weights, offset, neg_inv, count.flatten(), present.long(), factor
        )


_ROUTES = _LastIds()
"""Routings of the last ids tensor, per ``(D, L, dtype, eps, momentum)``."""


def routing(
    ids: Tensor, num_domains: int, per_row: int, dtype: torch.dtype, eps: float = 1e-5,
    momentum: float | None = None,
) -> Routing:
    """The :class:`Routing` of ``ids``: built once per ids tensor (and version) and layer shape.

    Every layer a ``domain()`` block (or one ids tensor passed to each layer) routes shares
    it, so the layers' calls launch no op for it; a new or changed ids tensor (an in-place
    change bumps its version) drops the old routings. Not cached while ``torch.compile``,
    ``torch.func`` or ``torch.jit.trace`` trace (the ops become part of the graph), for
    inference tensors (no version) or in inference mode.

    Example:
        >>> ids = torch.tensor([0, 1, 1])
        >>> route = routing(ids, 2, per_row=4, dtype=torch.float32)
        >>> route.counts.tolist(), route.onehot.tolist()
        ([4.0, 8.0], [[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
        >>> routing(ids, 2, per_row=4, dtype=torch.float32) is route  # shared, not rebuilt
        True
    """
    args = (ids, num_domains, per_row, dtype, eps, momentum)
    store = _ROUTES.of(ids) if eager() and not torch.is_inference_mode_enabled() else None
    if store is None:
        return _build_routing(*args)
    key = args[1:]
    if key not in store:
        store[key] = _build_routing(*args)
    return cast(Routing, store[key])


class RowStats(NamedTuple):
    """Per-row statistics: ``mean [N, C]`` of each ``(sample, channel)`` row and ``dev``,
    that mean minus its domain's mean (the backward's sums are taken about the row mean and
    moved to the domain mean with ``dev``)."""

    mean: Tensor
    dev: Tensor


def _row_stats(x3: Tensor, route: Routing) -> tuple[RowStats, Tensor, Tensor]:
    """Exact per-domain statistics of ``[N, C, L]`` rows: ``(rows, mean [D, C], var [2D, C])``.

    One fused pass per row (:func:`~lightning_norms._moments.row_moments`), then Chan's merge
    as three small products: ``mean_d = W_mean @ mean_r``, ``dev = mean_r - mean_{d(r)}``,
    ``[var_d + eps; unbiased var_d] = offset + W @ (var_r + dev**2)`` (callers run it without
    grad and with autocast off, :func:`_autocast_off`). A non-finite value in
    one row makes every domain's statistics non-finite (0 * inf in the products), as one
    BatchNorm over the batch would.
    """
    d = route.onehot.shape[0]
    if x3.numel():
        mean_r, var_r = row_moments(x3)
    else:  # a rank without data (synchronised): no rows, or rows of no elements
        mean_r = var_r = x3.new_zeros(x3.shape[:2], dtype=route.onehot.dtype)
    mean = torch.mm(route.weights[:d], mean_r)
    dev = torch.addmm(mean_r, route.onehot.t(), mean, alpha=-1.0)
    var = torch.addmm(route.offset, route.weights, torch.addcmul(var_r, dev, dev))
    return RowStats(mean_r, dev), mean, var


def _local_moments(x3: Tensor, route: Routing) -> tuple[RowStats, Moments]:
    """This rank's per-domain ``Moments`` of ``[N, C, L]`` rows, and the row statistics."""
    rows, mean, var = _row_stats(x3, route)
    d = mean.shape[0]
    m2 = (var[d:] * (route.counts.unsqueeze(1) - 1.0).clamp(min=0.0)).view_as(mean)
    return rows, Moments(route.counts, mean, m2)


def _scale_shift(
    mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None
) -> Tensor:
    """Per-domain ``[scale; shift]`` (``[2, D, C]``): ``scale = gamma / sigma``,
    ``shift = beta - mu * scale``.

    In the statistics' dtype (fp16/bf16 parameters are used in fp32, as the statistics); the
    two ops write into one buffer when they may (:func:`_halves`).
    """
    d, c = mean.shape
    packed, left, right = _halves(d, c, mean)
    if weight is None:
        scale = invstd if left is None else left.copy_(invstd)
    else:
        scale = torch.mul(invstd, as_dtype(weight, invstd.dtype), out=left)
    if bias is None:
        shift = torch.mul(mean, scale, out=right).neg_()
    else:
        shift = torch.addcmul(as_dtype(bias, invstd.dtype), mean, scale, value=-1.0, out=right)
    return torch.stack([scale, shift]) if packed is None else packed


def _halves(
    rows: int, c: int, like: Tensor
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """A ``[2, rows, C]`` buffer and its two (contiguous) halves, for ops to write into
    (``out=``) instead of a ``stack`` after them; ``(None, None, None)`` where ``out=`` is not
    allowed: with grad mode on (autograd), while tracing, or under ``torch.func`` (a batched
    op cannot write into an unbatched buffer)."""
    if torch.is_grad_enabled() or not eager():
        return None, None, None
    packed = torch.empty(2, rows, c, dtype=like.dtype, device=like.device)
    return packed, packed[0], packed[1]


def _low_precision(x3: Tensor, coefs: Tensor) -> bool:
    """Whether ``x3`` is fp16/bf16 that torch's BatchNorm kernels read next to fp32 ``coefs``.

    Not under a ``torch.func`` transform (batched, the kernel wants one dtype), nor for an
    empty input (no "channels" for the kernel).
    """
    low = x3.dtype in (torch.float16, torch.bfloat16) and coefs.dtype == torch.float32
    native = kernel_input_dtype(x3.device, x3.dtype, coefs.dtype) == x3.dtype
    return low and native and x3.numel() > 0 and not functorch_active()


_CONSTANTS: dict[tuple[int, torch.dtype, torch.device], tuple[Tensor, Tensor]] = {}
"""Zeros and ones vectors the BatchNorm kernels take as statistics, per size, dtype, device."""


def _constants(numel: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(zeros, ones)`` of ``numel``: made once per size, dtype and device in eager mode
    (never written; fresh ones while tracing or in inference mode)."""
    cache = eager() and not torch.is_inference_mode_enabled()  # before any use of numel:
    key = (numel, dtype, device)  # hashing a traced size would specialise the graph on it
    if cache and key in _CONSTANTS:
        return _CONSTANTS[key]
    zeros = torch.zeros(numel, dtype=dtype, device=device)
    made = (zeros, torch.ones_like(zeros))
    if cache:
        if len(_CONSTANTS) > 64:
            _CONSTANTS.clear()
        _CONSTANTS[key] = made
    return made


def _row_kernel(x3: Tensor, scale: Tensor, shift: Tensor | None) -> Tensor:
    """``x * scale + shift`` with per-row ``[N, C]`` coefficients, in one pass.

    BatchNorm's eval kernel on the ``[1, N*C, L]`` view (mean 0, variance 1, eps 0: the
    weight and bias are the coefficients as they are). With fp16/bf16 ``x3`` and fp32
    coefficients it computes in fp32 and writes ``x3``'s dtype, with no activation-sized fp32
    tensor (an elementwise op mixing the dtypes would make one). Differentiable to any order.
    """
    n, c, length = x3.shape
    zeros, ones = _constants(n * c, scale.dtype, scale.device)
    flat = None if shift is None else shift.reshape(-1)
    out = F.batch_norm(x3.view(1, n * c, length), zeros, ones, scale.reshape(-1), flat, eps=0.0)
    # not a view of the kernel's output: returned from a custom Function, a view would forbid
    # inplace ops after the layer (``nn.ReLU(inplace=True)``, ``out += identity``)
    return torch.ops.aten._unsafe_view(out, (n, c, length))


def _affine_rows(x3: Tensor, rows: Tensor) -> Tensor:
    """``x * rows[0] + rows[1]`` per ``(sample, channel)`` row, ``rows``: ``[2, N, C]``.

    fp16/bf16 input, or from ``2**19`` elements in eager mode on CPU: :func:`_row_kernel`
    (one pass; fp32 inside, no fp32 activation). Smaller inputs in eager mode on CPU: the
    shift copied into a new tensor, then ``addcmul_`` in place (the same fused rounding as one
    ``addcmul``, 2-5x faster there than ``addcmul`` whose first operand broadcasts, and than
    the BatchNorm kernel at small maps). Elsewhere (CUDA, traced or compiled code): one
    ``addcmul``, one kernel. Returns a new ``[N, C, L]`` tensor in ``x3``'s dtype (never a
    view).
    """
    cpu = x3.device.type == "cpu" and eager()
    large = x3.dtype == rows.dtype and x3.numel() >= 2**19
    if _low_precision(x3, rows) or (cpu and large):
        return _row_kernel(x3, rows[0], rows[1])
    rows3 = rows.unsqueeze(3)
    if cpu:
        out = torch.empty(x3.shape, dtype=rows.dtype, device=x3.device).copy_(rows3[1])
        return as_dtype(out.addcmul_(x3, rows3[0]), x3.dtype)
    return as_dtype(torch.addcmul(rows3[1], x3, rows3[0]), x3.dtype)


def _row_grad_sums(g3: Tensor, x3: Tensor, rows: RowStats) -> tuple[Tensor, Tensor]:
    """Per-row ``sum(dy)`` and ``sum(dy * (x - mu_d))`` as ``[N, C]``, in one fused pass.

    ``native_batch_norm_backward`` over the ``[1, N*C, L]`` view (every row a "channel", with
    unit weight and invstd, about the row mean), whose parameter gradients are
    ``sum(dy)`` and ``sum(dy * (x - mean_r))``; ``+ sum(dy) * dev`` moves the second to the
    domain mean. One position per row (``BatchNorm1d`` on ``(N, C)``): no reduction at all,
    the sums are ``dy`` and ``dy * dev`` elementwise; no element (a rank without data): 0.
    The kernel gets the input in :func:`~lightning_norms._moments.kernel_input_dtype`
    (upcast off CPU/CUDA, e.g. MPS).
    """
    n, c, length = x3.shape
    dtype = rows.mean.dtype
    if not x3.numel():  # a rank without data (synchronised): nothing to sum
        zeros = rows.mean.new_zeros(n, c)
        return zeros, zeros
    if length == 1:
        g = as_dtype(g3.view(n, c), dtype)
        return g, g * rows.dev
    kernel = kernel_input_dtype(x3.device, x3.dtype, dtype)
    g3, x3 = as_dtype(g3, kernel), as_dtype(x3, kernel)
    ones = _constants(n * c, dtype, x3.device)[1]
    _, row_dot, row_sum = torch.ops.aten.native_batch_norm_backward(
        g3.view(1, n * c, length),
        x3.view(1, n * c, length),
        None,
        None,
        None,
        rows.mean.reshape(-1),
        ones,
        True,
        0.0,
        [False, True, True],
    )
    row_sum = row_sum.view(n, c)
    return row_sum, torch.addcmul(row_dot.view(n, c), row_sum, rows.dev)


Grads = tuple[Tensor | None, Tensor | None, Tensor | None]


KernelStats = tuple[Tensor, Tensor, Tensor]
"""``(neg_inv_count [D, 1], mean [D, C], invstd [D, C])``: what :class:`_DomainBatchNormFn`
uses; ``-1 / count``, 0 for a domain of fixed statistics or none."""


def kernel_stats(stats: Moments, eps: float) -> KernelStats:
    """Per-domain ``-1 / count`` (0 where the count is 0), mean and ``1 / sqrt(var + eps)``.

    A domain of count 0 with rows has fixed statistics (:func:`_rare_domains`: ``M2`` holds
    its variance, divided by 1).
    """
    count = stats.n.unsqueeze(1)
    inv = count.clamp(min=1).reciprocal()
    invstd = (stats.m2 * inv).add_(eps).rsqrt_()
    return torch.where(count > 0, inv.neg_(), 0.0), stats.mean, invstd


class Prepared(NamedTuple):
    """What the kernel's forward uses and its backward keeps: the routing's ``onehot``, the
    :class:`RowStats` and the per-domain ``coefs [2, D, C]`` (``[scale; shift]``) with their
    per-row gather ``rows [2, N, C]``."""

    onehot: Tensor
    stats: RowStats
    coefs: Tensor
    rows: Tensor


def _prepare(
    x3: Tensor,
    ids: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    stats: KernelStats,
    rows: RowStats | None = None,
    onehot: Tensor | None = None,
) -> Prepared:
    """:class:`Prepared` for :class:`_DomainBatchNormFn` (callers run it without grad and
    with autocast off). Without ``rows`` (statistics computed elsewhere), the row statistics
    are taken here."""
    _, mean, invstd = stats
    if onehot is None:
        onehot = routing(ids, mean.shape[0], 1, mean.dtype).onehot
    if rows is None:
        mean_r = row_moments(x3)[0] if x3.numel() else mean.new_zeros(x3.shape[:2])
        rows = RowStats(mean_r, torch.addmm(mean_r, onehot.t(), mean, alpha=-1.0))
    coefs = _scale_shift(mean, invstd, weight, bias)
    return Prepared(onehot, rows, coefs, coefs.index_select(1, ids))


def _fused_grads(ctx: Any, saved: tuple[Tensor, ...], g3: Tensor) -> Grads:
    """First-order gradients of :class:`_DomainBatchNormFn` in a few fused passes (no graph).

    ``dx = s (dy - E_d[dy] - xhat E_d[dy xhat])`` (``s = gamma invstd_d``) regrouped as
    ``s_r * dy + b_r * x + c_r`` with per-domain ``b = -s invstd E_d[dy xhat]`` and
    ``c = -s E_d[dy] - b mu``: the per-row sums (one pass), two products with the onehot, a
    few ``[D, C]`` ops, one gather and two elementwise ops.
    """
    x3, ids, weight, neg_inv, mean, invstd, onehot, row_mean, dev, coefs, rows = saved
    d, c = mean.shape
    row_sum, row_dot = _row_grad_sums(g3.contiguous(), x3, RowStats(row_mean, dev))
    _, left, right = _halves(d, c, mean)
    sum_dy = torch.mm(onehot, row_sum, out=left)
    sum_dot = torch.mm(onehot, row_dot, out=right)  # sum_d dy (x - mu_d)
    sum_xhat = sum_dot * invstd  # sum_d dy xhat: gamma's gradient
    grad_weight = grad_bias = grad_x = None
    if weight is not None and ctx.needs_input_grad[1]:
        grad_weight = _fold_domains(sum_xhat, ctx.weight_meta)
    if ctx.needs_input_grad[2]:
        grad_bias = _fold_domains(sum_dy, ctx.bias_meta)
    if ctx.needs_input_grad[0]:
        if ctx.group is not None:  # input gradients see every rank's sums, as SyncBatchNorm
            sums = _AllReduceSum.apply(torch.stack([sum_dy, sum_xhat]), ctx.group[0])
            sum_dy, sum_xhat = sums[0], sums[1]
        stats = (neg_inv, mean, invstd)
        grad_x = _input_grad(g3, x3, ids, stats, (sum_dy, sum_xhat), (coefs, rows))
    return grad_x, grad_weight, grad_bias


def _input_grad(
    g3: Tensor,
    x3: Tensor,
    ids: Tensor,
    stats: KernelStats,
    sums: tuple[Tensor, Tensor],
    coefs: tuple[Tensor, Tensor],
) -> Tensor:
    """``dx = s_r dy + b_r x + c_r`` from the per-domain ``sum_d dy`` and ``sum_d dy xhat``
    (see :func:`_fused_grads`)."""
    neg_inv, mean, invstd = stats
    (sum_dy, sum_xhat), (per_domain, per_row) = sums, coefs
    d, c = mean.shape
    scale = per_domain[0]
    packed, left, right = _halves(d, c, mean)
    b = torch.mul(torch.mul(scale, invstd), sum_xhat * neg_inv, out=left)
    coef = torch.mul(sum_dy, neg_inv).mul_(scale)  # -s E_d[dy]
    coef = torch.addcmul(coef, b, mean, value=-1.0, out=right)
    bc = (torch.stack([b, coef]) if packed is None else packed).index_select(1, ids)
    if _low_precision(x3, bc) and g3.dtype == x3.dtype:
        return _low_precision_grad(g3, x3, per_row[0], bc)
    grad_x = _affine_rows(x3, bc)
    a3 = per_row[0].unsqueeze(2)
    # in place (no second activation-sized temporary) unless under torch.func, where grad_x
    # may be unbatched and g3 batched
    grad_x = torch.addcmul(grad_x, g3, a3) if functorch_active() else grad_x.addcmul_(g3, a3)
    return as_dtype(grad_x, x3.dtype)


def _low_precision_grad(g3: Tensor, x3: Tensor, scale: Tensor, bc: Tensor) -> Tensor:
    """``s * dy + (b * x + c)`` for fp16/bf16 ``g3``, ``x3``, fp32 rows ``scale [N, C]`` and
    ``bc [2, N, C] = [b; c]``.

    Both terms from :func:`_row_kernel` (fp32 inside, each rounded once to ``x3``'s dtype),
    added in place in that dtype: no activation-sized fp32 tensor (about one rounding more
    than a single fp32 expression; not used under ``torch.func``, see :func:`_low_precision`).
    """
    linear = _row_kernel(x3, bc[0], bc[1])
    return linear.add_(_row_kernel(g3, scale, None))


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
    x3, ids, weight, neg_inv, mean, fixed_invstd = saved[:6]
    group = ctx.group
    num_domains, c = mean.shape
    xf, gf = x3.to(mean.dtype), g3.to(mean.dtype)
    inv_count = -neg_inv
    fixed = neg_inv == 0  # fixed statistics: constants, as in eval

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

    Forward: ``y = x * scale_r + shift_r`` (:func:`_affine_rows`, one pass) with the
    per-domain ``scale = gamma / sigma_d``, ``shift = beta - mu_d * scale`` gathered per row
    (:class:`Prepared`, computed by the caller, or here when not given); the output is a new
    tensor, never a view, so an inplace op after the layer (``nn.ReLU(inplace=True)``,
    ``out += identity``) is legal. ``stats`` are :data:`KernelStats`; a domain with
    ``neg_inv_count`` 0 and rows uses ``mean`` and ``invstd`` as fixed statistics (running
    statistics: eval formula and gradient). Backward: :func:`_fused_grads` (one
    ``native_batch_norm_backward`` pass for the per-row sums, merged per domain and
    all-reduced across ranks as torch's SyncBatchNorm does, then ``a*dy + b*x + c``), or, when
    a graph of the gradient is asked for (``create_graph=True``: grad mode is on inside
    ``backward``), :func:`_graph_grads` on the saved input, which stays connected to the
    graph. ``forward`` without ``ctx`` plus ``setup_context`` and a generated vmap rule:
    ``torch.func`` (``grad``, ``vmap``, ``functional_call``) works through it.
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
        prepared: Prepared | None = None,
    ) -> Tensor:
        if prepared is None:
            with autocast_off(x3.device):
                prepared = _prepare(x3, ids, weight, bias, stats)
        return _affine_rows(x3, prepared.rows)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        # Any, as in torch's docs: FunctionCtx's stub has neither saved_tensors nor
        # needs_input_grad, takes no None in save_for_backward, and no custom attributes
        x3, weight, bias, ids, eps, group, stats, *rest = inputs
        prepared = rest[0] if rest and rest[0] is not None else None
        if prepared is None:
            with torch.no_grad(), autocast_off(x3.device):
                prepared = _prepare(x3, ids, weight, bias, stats)
        onehot, (row_mean, dev), coefs, rows = prepared
        kept = (*stats, onehot, row_mean, dev, coefs, rows)
        if getattr(ctx, "twin", False):  # eager twin: the kernel's own tensors on ctx
            ctx.save_for_backward(x3, ids, weight)
            ctx.kept = kept
        else:
            ctx.save_for_backward(x3, ids, weight, *kept)
            ctx.kept = ()
        ctx.eps, ctx.group = eps, group
        ctx.weight_meta = None if weight is None else (weight.dim(), weight.dtype)
        ctx.bias_meta = None if bias is None else (bias.dim(), bias.dtype)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_out: Tensor
    ) -> tuple[Tensor | None, ...]:
        saved = (*ctx.saved_tensors, *ctx.kept)
        g3 = grad_out.reshape(saved[0].shape)
        grad_fn = _graph_grads if torch.is_grad_enabled() else _fused_grads
        with autocast_off(g3.device):
            grads = grad_fn(ctx, saved, g3)
        return (*grads, None, None, None, None, None)


_DomainBatchNormTwin = eager_twin(_DomainBatchNormFn)
"""The kernel for eager calls (:func:`~lightning_norms._tracing.eager_twin`); only the inputs go
through ``save_for_backward`` there, the kernel's own tensors (statistics, routing,
coefficients) are kept on ``ctx``: no unpacking or version checks of 8 tensors in the backward."""


def grouped_batch_norm(*inputs: Any) -> Tensor:
    """:class:`_DomainBatchNormFn` applied to ``inputs`` (its eager twin outside transforms)."""
    fn = _DomainBatchNormTwin if eager() else _DomainBatchNormFn
    return cast(Tensor, fn.apply(*inputs))


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
            lerp_running(running_mean[domain], running_var[domain], fresh[0], fresh[1], factor_new)
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
    """Eval with per-sample ids: one pass with every row's domain statistics.

    Differentiable ops only (autograd gives gradients of any order for ``x`` and the affine).
    """
    dtype = torch.promote_types(stat_dtype(x3), running_mean.dtype)
    invstd = torch.rsqrt(running_var.to(dtype) + eps)
    coefs = _scale_shift(running_mean.to(dtype), invstd, weight, bias)
    return _affine_rows(x3, coefs.index_select(1, ids))


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
    rows3 = _scale_shift(zeros, invstd, weight, bias)[:, ids].unsqueeze(3)
    return torch.addcmul(rows3[1], centred, rows3[0]).to(x3.dtype)


class Running(NamedTuple):
    """The running state a training call updates: ``[D, C]`` mean and unbiased variance
    (``None``: nothing to update), ``momentum`` (``None``: cumulative average),
    ``LongTensor[D]`` batches per domain (or ``None``) and a ``BoolTensor[D]`` the one-value
    domains are OR-ed into (or ``None``)."""

    mean: Tensor | None
    var: Tensor | None
    momentum: float | None
    num_batches_tracked: Tensor | None
    rare_domains: Tensor | None


def _local_train(
    x3: Tensor,
    ids: Tensor,
    route: Routing,
    affine: tuple[Tensor | None, Tensor | None],
    eps: float,
    running: Running,
) -> Tensor:
    """Training on this rank's rows with every present domain of 2 values or more.

    The lean kernel: :func:`_row_stats` (5 ops), the scale and shift (4 ops), the output (1),
    and a running update of 3 ops with the routing's cached factor.
    """
    with torch.no_grad():
        rows, mean, var = _row_stats(x3, route)
        d = mean.shape[0]
        stats = (route.neg_inv_count, mean, var[:d].rsqrt())
        prepared = _prepare(x3, ids, *affine, stats, rows, route.onehot)
        if running.mean is not None and running.var is not None:
            tracked, factor = running.num_batches_tracked, route.factor
            if factor is None or factor.dtype != running.mean.dtype:
                factor = running_factor(route.counts, running.momentum, tracked, running.mean.dtype)
            elif tracked is not None:
                tracked.add_(route.present)
            lerp_running(running.mean, running.var, mean, var[d:], factor)
    return grouped_batch_norm(x3, *affine, ids, eps, None, stats, prepared)


def _general_train(
    x3: Tensor,
    ids: Tensor,
    route: Routing,
    affine: tuple[Tensor | None, Tensor | None],
    eps: float,
    running: Running,
    group: Group,
    name: str,
    rare: bool,
) -> Tensor:
    """Training with statistics all-reduced over ranks, or with one position per row.

    This rank's moments (:func:`_local_moments`), all-reduced; with ``rare`` (per-sample ids)
    a one-value domain takes its running statistics (:func:`_rare_domains`), else it raises
    (an ``int`` domain, as ``nn.BatchNorm``); the row deviations are taken about the
    statistics used.
    """
    with torch.no_grad():
        rows, stats = _local_moments(x3, route)
        if group is not None:
            (stats,) = all_reduce_moments([stats], group[0])
    if not rare and eager():
        _check_counts(stats.n, name)
    with torch.no_grad():
        if rare:
            stats, fixed = _rare_domains(stats, running.mean, running.var)
            if running.rare_domains is not None and eager():
                running.rare_domains.logical_or_(fixed)
        kernel = kernel_stats(stats, eps)
        dev = torch.addmm(rows.mean, route.onehot.t(), stats.mean, alpha=-1.0)
        prepared = _prepare(x3, ids, *affine, kernel, RowStats(rows.mean, dev), route.onehot)
    out = grouped_batch_norm(x3, *affine, ids, eps, group, kernel, prepared)
    if running.mean is not None and running.var is not None:
        with torch.no_grad():
            update_running(
                running.mean, running.var, stats, running.momentum, running.num_batches_tracked
            )
    return out


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
    domains = check_domains(domains, x.shape[0], num_domains, name)
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
    ids = expand_domains(domains, x)
    x3 = as_rows(x)
    if not use_batch_stats and running_mean is not None and running_var is not None:
        return _eval_rows(x3, ids, running_mean, running_var, weight, bias, eps).view(x.shape)
    if running_mean is None and group is None and torch.jit.is_tracing():
        return _traced_rows(x3, ids, num_domains, weight, bias, eps).view(x.shape)
    state = (running_mean, running_var) if training else (None, None)
    running = Running(*state, momentum, num_batches_tracked, rare_domains)
    with autocast_off(x.device):
        route = routing(ids, num_domains, x3.shape[2], stat_dtype(x3), eps, momentum)
        if group is None and x3.shape[2] > 1:  # every present domain has 2 values or more
            out = _local_train(x3, ids, route, (weight, bias), eps, running)
        else:
            rare = not isinstance(domains, int)  # an int domain raises on one value instead
            out = _general_train(x3, ids, route, (weight, bias), eps, running, group, name, rare)
    return out.view(x.shape)
