"""The one moment engine: grouped per-channel counts, means and centred sums of squares.

Every statistic in the package comes from here: the batch statistics of the BatchNorm variants
(per domain for ``DomainBatchNorm``, all-reduced when synchronised), the exact population
statistics of :func:`lightning_norms.stats.recompute_bn_stats`, and the
``BatchNormDoctor``'s figures. A set of moments is ``Moments(n[G], mean[G, C], m2[G, C])``,
one row per group (a domain, or a single group for plain BN), ``m2`` the sum of squared
deviations from the group mean. Sets merge exactly (Chan, Golub & LeVeque 1979, "Updating
formulae and a pairwise algorithm for computing sample variances"):

    n = n_a + n_b,  delta = mean_b - mean_a,
    mean = mean_a + delta * n_b / n,  m2 = m2_a + m2_b + delta**2 * n_a * n_b / n

so merged statistics equal those of the concatenated data, whatever the batch sizes.

Precision policy (one, for every caller): a batch's moments are computed in
:func:`stat_dtype` (float32 for fp16/bf16/fp32 input, float64 stays float64) from per-row
``torch.var_mean`` (one fused pass, no ``E[x^2] - E[x]^2`` cancellation), merged per group with
Chan's formula. Accumulations over many batches (:class:`MomentAccumulator`) and the
all-reduce across ranks run in :func:`accumulate_dtype` (float64; float32 on MPS, which has
no float64).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_norms._tracing import functorch_active


class Moments(NamedTuple):
    """Per-group element count ``n[G]``, ``mean[G, C]`` and centred sum of squares ``m2[G, C]``."""

    n: Tensor
    mean: Tensor
    m2: Tensor

    def var(self, unbiased: bool = True) -> Tensor:
        """Per-group variance ``[G, C]`` (unbiased like torch's ``running_var`` by default)."""
        n = self.n - 1.0 if unbiased else self.n
        return self.m2 / n.clamp(min=1.0)[:, None]

    def to(self, dtype: torch.dtype) -> Moments:
        """The same moments in ``dtype``."""
        return Moments(self.n.to(dtype), self.mean.to(dtype), self.m2.to(dtype))


def stat_dtype(x: Tensor) -> torch.dtype:
    """The dtype a batch's statistics are computed in: float64 for float64, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def as_dtype(t: Tensor, dtype: torch.dtype, copy: bool = False) -> Tensor:
    """``t`` in ``dtype``; no op dispatched when it already is, unless ``copy`` asks for one.

    Example:
        >>> x = torch.ones(2)
        >>> as_dtype(x, torch.float32) is x, as_dtype(x, torch.float32, copy=True) is x
        (True, False)
    """
    if t.dtype != dtype:
        return t.to(dtype)
    return t.clone() if copy else t


def kernel_input_dtype(
    device: torch.device, input_dtype: torch.dtype, stat_dtype: torch.dtype
) -> torch.dtype:
    """The dtype to hand torch's BatchNorm kernels an input in, next to ``stat_dtype`` tensors.

    CPU and CUDA kernels take a fp16/bf16 input with fp32 statistics and parameters (what
    ``nn.BatchNorm2d`` does under autocast): the input as it is. Other devices (MPS) get one
    dtype: the input upcast to the statistics' dtype first (the output is cast back by the
    caller).

    Example:
        >>> kernel_input_dtype(torch.device("cuda"), torch.float16, torch.float32)
        torch.float16
        >>> kernel_input_dtype(torch.device("mps"), torch.float16, torch.float32)
        torch.float32
    """
    if device.type in ("cpu", "cuda") or input_dtype == stat_dtype:
        return input_dtype
    return stat_dtype


def accumulate_dtype(device: torch.device) -> torch.dtype:
    """The dtype of accumulations and all-reduces: float64 (float32 on MPS, which lacks it)."""
    return torch.float32 if device.type == "mps" else torch.float64


def zero_moments(
    num_groups: int, num_channels: int, device: torch.device | str, dtype: torch.dtype | None = None
) -> Moments:
    """Empty moments (count 0) for ``num_groups`` groups of ``num_channels`` channels.

    ``dtype`` defaults to :func:`accumulate_dtype` of ``device``.

    Example:
        >>> n, mean, m2 = zero_moments(2, 3, "cpu")
        >>> n.tolist(), mean.shape, m2.dtype
        ([0.0, 0.0], torch.Size([2, 3]), torch.float64)
    """
    device = torch.device(device)
    dtype = dtype or accumulate_dtype(device)
    mean = torch.zeros(num_groups, num_channels, dtype=dtype, device=device)
    count = torch.zeros(num_groups, dtype=dtype, device=device)
    return Moments(count, mean, torch.zeros_like(mean))


def row_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-``(sample, channel)`` mean and biased variance of ``x`` ``[N, C, *]``, in stat dtype.

    A contiguous CPU/CUDA input takes torch's BatchNorm statistics kernel over the
    ``[1, N*C, L]`` view (every row a "channel": an exact two-pass mean and variance per row,
    the row still in cache for the second pass; about 3x faster on CPU than ``var_mean`` over
    the last dim); other inputs (``channels_last``, other devices, or while ``torch.compile``
    traces, or a ``torch.func`` transform, which has no batching rule for that kernel) one
    ``torch.var_mean`` over the positions. A ``[N, C]`` input (or ``[N, C, 1, ...]``) has one
    position per row: the rows are the values, variance 0, no reduction kernel.

    Example:
        >>> mean, var = row_moments(torch.tensor([[[1.0, 3.0], [2.0, 2.0]]]))
        >>> mean.tolist(), var.tolist()
        ([[2.0, 2.0]], [[1.0, 0.0]])
    """
    dtype = stat_dtype(x)
    n, c = x.shape[:2]
    if math.prod(x.shape[2:]) == 1:  # one position per row
        rows = as_dtype(x.reshape(n, c), dtype)
        return rows, torch.zeros_like(rows)
    traced = torch.compiler.is_compiling() or functorch_active()
    native = x.device.type in ("cpu", "cuda") and not traced
    if native and x.numel() and x.is_contiguous():
        # fp16/bf16 read as they are: the kernel accumulates in fp32 and, given fp32 running
        # buffers (momentum 0: left as they are), returns fp32 rows (no fp32 copy of x)
        xk = as_dtype(x, kernel_input_dtype(x.device, x.dtype, dtype))
        buffer = None if xk.dtype == dtype else x.new_ones(2, n * c, dtype=dtype)
        mean, var = torch.batch_norm_update_stats(
            xk.view(1, n * c, -1),
            None if buffer is None else buffer[0],
            None if buffer is None else buffer[1],
            0.0,
        )
        return mean.view(n, c), var.view(n, c)
    var, mean = torch.var_mean(as_dtype(x, dtype).flatten(2), dim=2, correction=0)
    return mean, var


def group_moments(
    row_mean: Tensor, row_var: Tensor, per_row: int, ids: Tensor | None, num_groups: int = 1
) -> Moments:
    """Chan's merge of per-row moments (:func:`row_moments`) into groups, no gradient.

    A row holds ``per_row`` elements with mean ``row_mean`` and biased variance ``row_var``
    (``[N, C]``); ``ids`` (``LongTensor[N]``, ``None``: one group) assigns rows to groups:

        n_g = per_row * rows_g,  mean_g = mean of its row means,
        m2_g = per_row * sum_rows (row_var + (row_mean - mean_g)**2)

    by segment sums (``index_add``) on the tiny ``[N, C]`` rows. Groups without rows get count
    0, mean 0 and m2 0. ``ids`` are not checked here.

    Example:
        >>> n, mean, m2 = group_moments(torch.tensor([[1.0], [3.0]]), torch.ones(2, 1), 2, None)
        >>> n.tolist(), mean.tolist(), m2.tolist()
        ([4.0], [[2.0]], [[8.0]])
    """
    with torch.no_grad():
        if ids is None:
            rows = row_mean.new_full((1,), row_mean.shape[0])
            mean = (
                row_mean.mean(0, keepdim=True)
                if row_mean.shape[0]
                else row_mean.new_zeros(1, row_mean.shape[1])
            )
            spread = torch.addcmul(row_var, row_mean - mean, row_mean - mean).sum(0, keepdim=True)
            return Moments(rows * per_row, mean, spread * per_row)
        zeros = row_mean.new_zeros(num_groups, row_mean.shape[1])
        rows = row_mean.new_zeros(num_groups).index_add_(0, ids, row_mean.new_ones(ids.shape[0]))
        mean = zeros.index_add(0, ids, row_mean).div_(rows.clamp(min=1.0)[:, None])
        dev = row_mean - mean.index_select(0, ids)
        spread = torch.addcmul(row_var, dev, dev)
        return Moments(rows * per_row, mean, zeros.index_add_(0, ids, spread).mul_(per_row))


def batch_moments(x: Tensor, ids: Tensor | None = None, num_groups: int = 1) -> Moments:
    """Per-group count, mean and centred sum of squares of ``x`` (channels on dim 1).

    Rows (one per sample and channel) come from :func:`row_moments`; they are merged per group
    with Chan's formula (:func:`group_moments`). Groups without samples get count 0 and
    zero mean / m2. Computed in :func:`stat_dtype` of ``x``; no gradient is tracked.

    Args:
        x: activations ``[N, C, *]``.
        ids: optional ``LongTensor[N]`` of group ids in ``[0, num_groups)`` (not checked here).
            Default: ``None`` (one group).
        num_groups: number of groups when ``ids`` is given. Default: ``1``.

    Shape:
        - Output: ``count[G]``, ``mean[G, C]``, ``m2[G, C]`` with ``G = num_groups``.

    Example:
        >>> n, mean, m2 = batch_moments(torch.tensor([[1.0], [3.0]]))
        >>> n.tolist(), mean.tolist(), m2.tolist()
        ([2.0], [[2.0]], [[2.0]])
        >>> n, mean, m2 = batch_moments(torch.tensor([[1.0], [3.0], [5.0]]),
        ...                             torch.tensor([0, 1, 1]), num_groups=3)
        >>> n.tolist(), mean.tolist(), m2.tolist()
        ([1.0, 2.0, 0.0], [[1.0], [4.0], [0.0]], [[0.0], [2.0], [0.0]])
    """
    with torch.no_grad():
        row_mean, row_var = row_moments(x)
        per_row = math.prod(x.shape[2:])
        return group_moments(row_mean, row_var, per_row, ids, num_groups)


def merge_moments(a: Moments, b: Moments) -> Moments:
    """Chan's exact merge of two sets of moments (in ``a``'s dtype); empty groups are neutral.

    Example:
        >>> x = torch.tensor([[1.0], [2.0], [4.0], [7.0], [8.0]])
        >>> n, mean, m2 = merge_moments(batch_moments(x[:2]), batch_moments(x[2:]))
        >>> ref = batch_moments(x)
        >>> bool(torch.allclose(mean, ref.mean) and torch.allclose(m2, ref.m2)), n.tolist()
        (True, [5.0])
    """
    n_b, mean_b, m2_b = b.to(a.mean.dtype)
    n = a.n + n_b
    safe_n = n.clamp_min(1.0)
    delta = mean_b - a.mean
    mean = a.mean + delta * (n_b / safe_n)[:, None]
    m2 = a.m2 + m2_b + delta.square() * (a.n * n_b / safe_n)[:, None]
    return Moments(n, mean, m2)


def merge_stacked(counts: Tensor, means: Tensor, m2s: Tensor) -> Moments:
    """Exact merge of ``K`` stacked sets of moments at once (empty parts are neutral).

    ``n = sum_k n_k``, ``mean = sum_k n_k mean_k / n``,
    ``m2 = sum_k (m2_k + n_k (mean_k - mean)**2)``: Chan's formula for ``K`` parts.

    Shape:
        - Input: ``counts[K, G]``, ``means[K, G, C]``, ``m2s[K, G, C]``.
        - Output: ``count[G]``, ``mean[G, C]``, ``m2[G, C]``.

    Example:
        >>> x = torch.tensor([[1.0], [2.0], [4.0], [7.0], [8.0]])
        >>> parts = [batch_moments(x[:2]), batch_moments(x[2:3]), batch_moments(x[3:])]
        >>> n, mean, m2 = merge_stacked(*(torch.stack(p) for p in zip(*parts)))
        >>> ref = batch_moments(x)
        >>> bool(torch.allclose(mean, ref.mean) and torch.allclose(m2, ref.m2)), n.tolist()
        (True, [5.0])
    """
    n = counts.sum(0)
    weights = counts[..., None]
    mean = (weights * means).sum(0).div_(n.clamp_min(1.0)[:, None])
    spread = (means - mean).square_().mul_(weights).add_(m2s)  # one [K, G, C] temporary
    return Moments(n, mean, spread.sum(0))


def all_reduce_moments(
    moments: Sequence[Moments], group: dist.ProcessGroup | None = None
) -> list[Moments]:
    """Every rank's moments merged over all ranks (one collective; each returned in its dtype).

    Each rank sends ``[n, n * mean, m2 + n * mean**2]`` for every set, packed in one
    :func:`accumulate_dtype` buffer; ``m2 = SS - n * mean**2`` of the sums is exact to float64
    rounding. Every rank must call it with the same layout (same groups and channels),
    including ranks that saw no data (count 0), so the collectives always match. Without an
    initialised process group the moments come back unchanged.

    Example:
        >>> moments = all_reduce_moments([batch_moments(torch.ones(2, 3))])
        >>> moments[0].n.tolist()
        [2.0]
    """
    if not moments or not (dist.is_available() and dist.is_initialized()):
        return list(moments)
    acc = accumulate_dtype(moments[0].mean.device)
    packed = []
    for n, mean, m2 in moments:
        n64, mean64 = n.to(acc)[:, None], mean.to(acc)
        packed.append(
            torch.cat([n64, n64 * mean64, torch.addcmul(m2.to(acc), n64, mean64.square())], 1)
        )
    flat = torch.cat([p.flatten() for p in packed])
    dist.all_reduce(flat, group=group)
    out = []
    for part, (_, mean, _) in zip(flat.split([p.numel() for p in packed]), moments, strict=True):
        part = part.view(mean.shape[0], -1)
        c = mean.shape[1]
        total = part[:, 0]
        g_mean = part[:, 1 : 1 + c] / total.clamp(min=1.0)[:, None]
        g_m2 = (part[:, 1 + c :] - total[:, None] * g_mean.square()).clamp(min=0.0)
        out.append(Moments(total, g_mean, g_m2).to(mean.dtype))
    return out


class MomentAccumulator:
    """Exact population moments of everything passed to :meth:`update`, in accumulate dtype.

    Each call's :func:`batch_moments` are merged with Chan's formula; :meth:`all_reduce` merges
    the ranks. ``moments.var()`` is unbiased like torch's ``running_var``.

    Example:
        >>> x = torch.randn(8, 3, 5, 5)
        >>> acc = MomentAccumulator(1, 3, "cpu")
        >>> acc.update(x[:3]); acc.update(x[3:])
        >>> torch.allclose(acc.moments.mean[0], x.mean((0, 2, 3)).double(), atol=1e-6)
        True
        >>> ref = x.transpose(0, 1).reshape(3, -1).var(1).double()
        >>> torch.allclose(acc.moments.var()[0], ref, atol=1e-5)
        True
    """

    def __init__(self, num_groups: int, num_channels: int, device: torch.device | str) -> None:
        self.num_groups = num_groups
        self.moments = zero_moments(num_groups, num_channels, device)

    def update(self, x: Tensor, ids: Tensor | None = None) -> None:
        """Add one batch ``x`` ``[N, C, *]``; ``ids``: ``LongTensor[N]`` of group rows."""
        if ids is None and self.num_groups != 1:
            raise ValueError(f"ids: required with num_groups={self.num_groups}, got None")
        self.add(batch_moments(x, ids, self.num_groups))

    def add(self, moments: Moments) -> None:
        """Merge already computed moments (same groups and channels)."""
        self.moments = merge_moments(self.moments, moments)

    def all_reduce(self, group: dist.ProcessGroup | None = None) -> None:
        """Merge this accumulator over all ranks (every rank must call it)."""
        (self.moments,) = all_reduce_moments([self.moments], group)


def ema_factor(momentum: float | None, steps: Tensor | float) -> Tensor | float:
    """Weight of a new batch in a running statistic: ``momentum``, or ``1 / steps`` if ``None``.

    ``momentum=None`` is torch's cumulative moving average: after ``steps`` batches (this one
    included) the running value is their plain average. The one place this rule lives: every
    layer's running-statistics update takes its factor from here, at update time (after every
    check passed), so a call that raises changes nothing.

    Example:
        >>> ema_factor(0.1, 7), ema_factor(None, 4.0)
        (0.1, 0.25)
    """
    if momentum is not None:
        return momentum
    return 1.0 / steps


def running_factor(
    count: Tensor, momentum: float | None, num_batches_tracked: Tensor | None, dtype: torch.dtype
) -> Tensor:
    """Per-group weight ``[G, 1]`` of this batch in the running statistics (0: group absent).

    Advances ``num_batches_tracked`` (``LongTensor[G]``) for the groups present (count > 0),
    then takes :func:`ema_factor` per group, in ``dtype`` (the buffers' dtype: a float32 factor
    would round fp64 updates).

    Raises:
        ValueError: ``momentum=None`` without ``num_batches_tracked``.
    """
    if momentum is None and num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    present = count > 0
    if num_batches_tracked is not None:
        num_batches_tracked.add_(present)
    factor = present.to(dtype).unsqueeze(1)
    if momentum is None and num_batches_tracked is not None:
        steps = num_batches_tracked.clamp(min=1).to(dtype).unsqueeze(1)
        return factor.mul_(ema_factor(None, steps))
    return factor.mul_(ema_factor(momentum, 1.0))


def update_running(
    running_mean: Tensor,
    running_var: Tensor,
    moments: Moments,
    momentum: float | None,
    num_batches_tracked: Tensor | None = None,
) -> None:
    """Running-statistics update of the groups present in ``moments`` (rows ``[G, C]``).

    ``running = running + f * (batch - running)`` (``lerp``) with ``f`` from
    :func:`running_factor` per
    group and the batch variance unbiased, as torch's BatchNorm; groups with count 0 keep
    their rows and their ``num_batches_tracked`` entry.

    Raises:
        ValueError: ``momentum=None`` without ``num_batches_tracked``.

    Example:
        >>> mean, var = torch.zeros(1, 2), torch.ones(1, 2)
        >>> update_running(mean, var, batch_moments(torch.tensor([[1.0, 2.0], [3.0, 2.0]])), 0.5)
        >>> mean.tolist(), var.tolist()
        ([[1.0, 1.0]], [[1.5, 0.5]])
    """
    factor = running_factor(moments.n, momentum, num_batches_tracked, running_mean.dtype)
    unbiased = moments.m2 / (moments.n - 1).clamp(min=1).unsqueeze(1)
    lerp_running(running_mean, running_var, moments.mean, unbiased, factor)


def lerp_running(
    running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, factor: Tensor
) -> None:
    """The one running-statistics step: ``running += factor * (batch - running)`` (``lerp``).

    ``mean`` and the unbiased ``var`` (``[G, C]``) and ``factor`` (``[G, 1]``, from
    :func:`running_factor`; 0 leaves a group's rows exactly as they are) are cast to the
    buffers' dtype; two in-place ops.

    Example:
        >>> mean, var, half = torch.zeros(1, 2), torch.ones(1, 2), torch.tensor([[0.5]])
        >>> lerp_running(mean, var, torch.ones(1, 2), torch.full((1, 2), 3.0), half)
        >>> mean.tolist(), var.tolist()
        ([[0.5, 0.5]], [[2.0, 2.0]])
    """
    dtype = running_mean.dtype
    factor = as_dtype(factor, dtype)
    running_mean.lerp_(as_dtype(mean, dtype), factor)
    running_var.lerp_(as_dtype(var, dtype), factor)
