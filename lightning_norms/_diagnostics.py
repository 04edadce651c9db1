"""Statistics behind ``BatchNormDoctor``: plain tensor code, no Lightning import.

Two accumulators are fed from forward pre-hooks of BN layers. Each call is reduced to
per-channel figures on the input's device with a handful of small ops and no host sync; the
figures are read once per check. Every accumulator keeps one row per *group* (one row for a
plain BN layer, one per domain for ``DomainBatchNorm``) so per-domain statistics come for free.

* :class:`BatchSpread` answers "is each training batch a fair sample of the data?". Per group
  ``g`` and channel ``c``, with ``m[n]`` the channel mean of sample ``n`` (over H, W, ...),
  ``mu_t`` the batch mean of ``m`` and ``s2_t`` its unbiased within-batch variance over the
  ``N_t`` samples of call ``t``, and ``D_k = mean_t (mu_t - mu_{t-k})^2 / 2`` the lag-``k``
  half mean squared successive difference:

  .. math::
      R = \\frac{2 D_1 - D_2}{\\operatorname{mean}_t s^2_t / N_t}

  The denominator is the variance a mean of ``N`` i.i.d. samples has. For i.i.d. batches
  ``D_1 = D_2 = Var(mu)``. While the weights train, the activations drift from step to step; a
  random-walk drift of step variance ``q`` adds ``q / 2`` to ``D_1`` and ``q`` to ``D_2`` and
  cancels in ``2 D_1 - D_2`` (smooth drift makes ``R`` smaller, never larger), so ``R ~ 1`` for
  shuffled batches however fast the weights move (less with stratified or without-replacement
  sampling). Batches whose composition changes from call to call faster
  than that -- towers fed alternating sources, randomly ordered single-source or single-class
  batches -- give ``R >> 1``. Slowly changing composition (a class-sorted data set read in
  order, runs of several batches per class) is indistinguishable from weight drift by any
  statistic of this series; ``BatchNormDoctor`` catches its usual cause, the sequential
  sampler, directly. Samples, not pixels, are the i.i.d. units: positions inside one sample
  are correlated.

* :class:`MomentAccumulator` collects exact per-channel population moments (count, mean, M2,
  merged with Chan's parallel formula) of the inputs a BN layer sees, e.g. in validation, and
  :func:`eval_mismatch` compares them with the layer's running statistics.

Under ``torch.distributed`` ``all_reduce_spreads`` / ``all_reduce_moments`` merge the
accumulators of all ranks (every rank must call them); the result equals one process that saw
every rank's calls.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "BatchSpread",
    "MomentAccumulator",
    "all_reduce_max_",
    "all_reduce_moments",
    "all_reduce_spreads",
    "eval_mismatch",
    "sample_channel_means",
    "summarise_spread",
]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_(tensors: list[Tensor], op: dist.ReduceOp.RedOpType) -> None:
    """All-reduce a list of same-device tensors in place with one collective (no-op off DDP)."""
    if not _distributed() or not tensors:
        return
    flat = torch.cat([t.reshape(-1).to(torch.float32) for t in tensors])
    dist.all_reduce(flat, op=op)
    for t, chunk in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
        t.copy_(chunk.view_as(t))


def sample_channel_means(x: Tensor) -> Tensor:
    """Per-sample, per-channel means of a BN input, in fp32.

    Args:
        x: a BN layer's input, ``[N, C]`` or ``[N, C, *]``.

    Returns:
        ``[N, C]`` float32: the mean of every sample's channel over its positions (``x`` itself,
        cast to fp32, for ``[N, C]`` input).

    Raises:
        ValueError: if ``x`` has fewer than 2 dimensions.

    Example:
        >>> sample_channel_means(torch.ones(2, 3, 4, 4)).shape
        torch.Size([2, 3])
    """
    if x.dim() < 2:
        raise ValueError(
            f"sample_channel_means: expected input [N, C, *], got shape {tuple(x.shape)}"
        )
    if x.dim() == 2:
        return x.float()
    return x.mean(dim=tuple(range(2, x.dim())), dtype=torch.float32)


def _group_counts(groups: Tensor, num_groups: int, dtype: torch.dtype) -> Tensor:
    ones = torch.ones(groups.shape[0], dtype=dtype, device=groups.device)
    return torch.zeros(num_groups, dtype=dtype, device=groups.device).index_add_(0, groups, ones)


def _group_sums(values: Tensor, groups: Tensor, num_groups: int) -> Tensor:
    out = torch.zeros(num_groups, values.shape[1], dtype=values.dtype, device=values.device)
    return out.index_add_(0, groups, values)


class BatchSpread:
    """Between-batch vs within-batch spread of channel means over successive training calls.

    See the module docstring for the statistic ``R``. Feed every training call of one BN layer
    to :meth:`update`; read :meth:`ratio` (``[G, C]``), after :func:`all_reduce_spreads` under DDP.

    Args:
        num_groups: rows (1 for a plain BN layer, ``num_domains`` for a domain-split one).
        num_channels: ``C``.
        device: where the accumulators live (the layer's device).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> spread = BatchSpread(1, 4, "cpu")
        >>> for _ in range(50):
        ...     _ = spread.update(torch.randn(32, 4, 3, 3))
        >>> bool(0.5 < summarise_spread(spread.ratio(), spread.num_batches, 20)[0] < 2.0)
        True
    """

    def __init__(self, num_groups: int, num_channels: int, device: torch.device | str) -> None:
        kw: dict[str, Any] = {"dtype": torch.float32, "device": device}
        self.num_groups = num_groups
        # lag-1 and lag-2 sums of squared differences side by side: one op updates both
        self._lags = torch.zeros(num_groups, 2, num_channels, **kw)
        self.lag1 = self._lags[:, 0]
        self.lag2 = self._lags[:, 1]
        self.num_lag1 = torch.zeros(num_groups, **kw)
        self.num_lag2 = torch.zeros(num_groups, **kw)
        self.within = torch.zeros(num_groups, num_channels, **kw)
        self.num_batches = torch.zeros(num_groups, **kw)
        self._prev = torch.zeros(num_groups, 2, num_channels, **kw)  # means 1 and 2 calls ago
        self._seen = torch.zeros(num_groups, **kw)
        # the ungrouped path counts on the host: no device op for a count known on the host
        self._host_calls = 0
        self._host_folded = 0

    def _add_lags(self, row: int, mu: Tensor) -> None:
        lags = min(self._host_calls - 1, 2)
        if lags:
            d = mu - self._prev[row, :lags]
            self._lags[row, :lags].addcmul_(d, d)
        self._prev[row, 1].copy_(self._prev[row, 0])
        self._prev[row, 0].copy_(mu)

    def update(self, x: Tensor, groups: Tensor | None = None) -> Tensor | None:
        """Add one call's input ``x`` (``[N, C, *]``); ``groups``: ``LongTensor[N]`` of rows.

        Returns the per-group sample counts ``[G]`` when ``groups`` is given (``None`` otherwise,
        the count is ``x.shape[0]``). Calls with fewer than 2 samples in a group add nothing for
        that group.
        """
        m = sample_channel_means(x)
        if groups is None:
            n = m.shape[0]
            if n < 2:
                return None
            # two-pass variance: torch's CPU var over dim 0 is several times slower
            mu = m.mean(dim=0)
            self.within[0].add_((m - mu).square_().sum(dim=0), alpha=1.0 / (n * (n - 1)))
            self._host_calls += 1
            self._add_lags(0, mu)
            return None
        cnt = _group_counts(groups, self.num_groups, m.dtype)
        mu = _group_sums(m, groups, self.num_groups) / cnt.clamp(min=1.0)[:, None]
        dev = m - mu[groups]
        s2 = _group_sums(dev * dev, groups, self.num_groups) / (cnt - 1.0).clamp(min=1.0)[:, None]
        present = cnt >= 2
        self.within.addcmul_(s2, (present / cnt.clamp(min=1.0))[:, None])
        self.num_batches.add_(present)
        has1 = present & (self._seen >= 1)
        has2 = present & (self._seen >= 2)
        d = (mu[:, None] - self._prev) * torch.stack([has1, has2], dim=1)[:, :, None]
        self._lags.addcmul_(d, d)
        self.num_lag1.add_(has1)
        self.num_lag2.add_(has2)
        shifted = torch.stack([mu, self._prev[:, 0]], dim=1)
        self._prev.copy_(torch.where(present[:, None, None], shifted, self._prev))
        self._seen.add_(present)
        return cnt

    def _fold_host_counts(self) -> None:
        n, done = self._host_calls, self._host_folded
        if n > done:
            self.num_batches[0] += n - done
            self.num_lag1[0] += max(n - 1, 0) - max(done - 1, 0)
            self.num_lag2[0] += max(n - 2, 0) - max(done - 2, 0)
            self._host_folded = n

    def additive(self) -> list[Tensor]:
        """The accumulators that add up over calls and ranks (``all_reduce_spreads`` sums them)."""
        self._fold_host_counts()
        return [self.lag1, self.lag2, self.num_lag1, self.num_lag2, self.within, self.num_batches]

    def ratio(self) -> Tensor:
        """``R`` per group and channel, ``[G, C]``; NaN where it is undefined.

        Undefined: no lag-2 difference yet, or a channel with zero within-batch variance (a
        dead channel). ``R`` can fall below 0 by chance or under smooth drift (it is an
        unbiased difference of two estimates); only large values matter.
        """
        self._fold_host_counts()
        d1 = self.lag1 / (2.0 * self.num_lag1.clamp(min=1.0))[:, None]
        d2 = self.lag2 / (2.0 * self.num_lag2.clamp(min=1.0))[:, None]
        expected = self.within / self.num_batches.clamp(min=1.0)[:, None]
        ok = (expected > 0) & (self.num_lag2 > 0)[:, None]
        tiny = torch.finfo(torch.float32).tiny
        return torch.where(ok, (2.0 * d1 - d2) / expected.clamp(min=tiny), torch.nan)


def all_reduce_spreads(spreads: list[BatchSpread]) -> None:
    """Sum several ``BatchSpread`` over all ranks with one collective (every rank must call it)."""
    _all_reduce_([t for s in spreads for t in s.additive()], dist.ReduceOp.SUM)


def all_reduce_max_(tensors: list[Tensor]) -> None:
    """Element-wise maximum over all ranks, in place, one collective (no-op off DDP)."""
    _all_reduce_(tensors, dist.ReduceOp.MAX)


def summarise_spread(ratio: Tensor, num_batches: Tensor, min_batches: int) -> Tensor:
    """One figure per group: the median of ``R`` over channels, NaN with < ``min_batches`` calls.

    The median makes the figure robust to a few noisy or near-dead channels; an unrepresentative
    batch (single-source, alternating sources) shifts most channels. Clamped at 0: a negative
    ``R`` only says that smooth weight drift dominates the series.

    Args:
        ratio: ``[G, C]`` from :meth:`BatchSpread.ratio`.
        num_batches: ``[G]`` calls that contributed per group.
        min_batches: fewest calls for a figure; below it the estimate is too noisy to judge.

    Example:
        >>> summarise_spread(torch.tensor([[1.0, 9.0, 2.0]]), torch.tensor([20.0]), 10)
        tensor([2.])
        >>> summarise_spread(torch.tensor([[-3.0]]), torch.tensor([20.0]), 10)
        tensor([0.])
    """
    med = ratio.nanmedian(dim=1).values.clamp(min=0.0)
    return torch.where(num_batches >= max(min_batches, 3), med, torch.nan)


class MomentAccumulator:
    """Exact per-channel population moments (count, mean, M2) of the inputs a BN layer sees.

    Chan et al.'s parallel update merges each call (and, under DDP, each rank) exactly, with
    no sum-of-squares cancellation. ``var()`` is unbiased like torch's ``running_var``.

    Args:
        num_groups: rows (1 for a plain BN layer, ``num_domains`` for a domain-split one).
        num_channels: ``C``.
        device: where the accumulators live.

    Example:
        >>> x = torch.randn(8, 3, 5, 5)
        >>> acc = MomentAccumulator(1, 3, "cpu")
        >>> acc.update(x[:3]); acc.update(x[3:])
        >>> torch.allclose(acc.mean[0], x.mean((0, 2, 3)), atol=1e-6)
        True
        >>> torch.allclose(acc.var()[0], x.transpose(0, 1).reshape(3, -1).var(1), atol=1e-5)
        True
    """

    def __init__(self, num_groups: int, num_channels: int, device: torch.device | str) -> None:
        kw: dict[str, Any] = {"dtype": torch.float32, "device": device}
        self.num_groups = num_groups
        self.count = torch.zeros(num_groups, **kw)
        self.mean = torch.zeros(num_groups, num_channels, **kw)
        self.m2 = torch.zeros(num_groups, num_channels, **kw)

    def _merge(self, cnt: Tensor, mean: Tensor, m2: Tensor) -> None:
        total = self.count + cnt
        w = cnt / total.clamp(min=1.0)
        delta = mean - self.mean
        self.mean.addcmul_(delta, w[:, None])
        self.m2.add_(m2).addcmul_(delta * delta, (self.count * w)[:, None])
        self.count.copy_(total)

    def update(self, x: Tensor, groups: Tensor | None = None) -> None:
        """Add one call's input ``x`` (``[N, C, *]``); ``groups``: ``LongTensor[N]`` of rows."""
        xf = x.float()
        c = xf.shape[1]
        if groups is None:
            dims = (0, *range(2, xf.dim()))
            var, mean = torch.var_mean(xf, dim=dims, correction=0)
            n = xf.numel() // c
            cnt = torch.tensor([float(n)], device=xf.device)
            self._merge(cnt, mean[None], (var * n)[None])
            return
        positions = xf[0, 0].numel() if xf.shape[0] else 1
        if xf.dim() == 2:
            sample_var, sample_mean = torch.zeros_like(xf), xf
        else:
            sample_var, sample_mean = torch.var_mean(xf.flatten(2), dim=2, correction=0)
        samples = _group_counts(groups, self.num_groups, xf.dtype)
        mean = _group_sums(sample_mean, groups, self.num_groups) / samples.clamp(min=1.0)[:, None]
        dev = sample_mean - mean[groups]
        m2 = positions * (
            _group_sums(sample_var, groups, self.num_groups)
            + _group_sums(dev * dev, groups, self.num_groups)
        )
        self._merge(samples * positions, mean, m2)

    def var(self) -> Tensor:
        """Unbiased population variance ``[G, C]``."""
        return self.m2 / (self.count - 1.0).clamp(min=1.0)[:, None]


def all_reduce_moments(accs: list[MomentAccumulator]) -> None:
    """Merge several ``MomentAccumulator`` over all ranks exactly, two collectives in all.

    After it every rank holds the moments of all ranks' inputs, as if one process had seen
    them (global mean first, then ``M2 + n (mean_r - mean)^2`` summed). Every rank must call it.
    """
    if not _distributed() or not accs:
        return
    sums = [t for a in accs for t in (a.count.clone(), a.mean * a.count[:, None])]
    _all_reduce_(sums, dist.ReduceOp.SUM)
    m2s = []
    for a, total, weighted in zip(accs, sums[0::2], sums[1::2], strict=True):
        mean = weighted / total.clamp(min=1.0)[:, None]
        delta = a.mean - mean
        m2s.append(a.m2 + delta * delta * a.count[:, None])
        a.count.copy_(total)
        a.mean.copy_(mean)
    _all_reduce_(m2s, dist.ReduceOp.SUM)
    for a, m2 in zip(accs, m2s, strict=True):
        a.m2.copy_(m2)


def eval_mismatch(
    count: Tensor,
    mean: Tensor,
    var: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """How far a BN layer's running statistics are from the population it normalises at eval.

    In eval mode BN outputs ``(x - running_mean) / sqrt(running_var + eps)`` (before the affine
    part). On inputs with population mean ``mu`` and variance ``v`` that output has, per channel,

    .. math::
        \\text{mean shift} = \\frac{|\\mu - \\text{running\\_mean}|}{\\sqrt{\\text{running\\_var}
        + \\epsilon}}, \\qquad
        \\text{log var ratio} = \\left|\\log\\frac{v + \\epsilon}{\\text{running\\_var} +
        \\epsilon}\\right|

    (ideally 0 and 0: zero mean, unit variance). Both are averaged over channels.

    Args:
        count: ``[G]`` values per channel seen per group (groups with ``count < 2`` give NaN).
        mean: ``[G, C]`` population mean.
        var: ``[G, C]`` population variance.
        running_mean: ``[C]`` or ``[G, C]``.
        running_var: ``[C]`` or ``[G, C]``.
        eps: the layer's ``eps``.

    Returns:
        ``(mean_shift, log_var_ratio)``, each ``[G]``.

    Example:
        >>> shift, lvr = eval_mismatch(torch.tensor([100.0]), torch.full((1, 2), 2.0),
        ...                            torch.full((1, 2), 4.0), torch.zeros(2), torch.ones(2), 0.0)
        >>> shift.tolist(), round(lvr.item(), 4)
        ([2.0], 1.3863)
    """
    rm = running_mean.float().reshape(-1, mean.shape[1])
    rv = running_var.float().reshape(-1, mean.shape[1])
    shift = ((mean - rm).abs() / (rv + eps).sqrt()).mean(dim=1)
    lvr = ((var + eps).log() - (rv + eps).log()).abs().mean(dim=1)
    ok = count >= 2
    return torch.where(ok, shift, torch.nan), torch.where(ok, lvr, torch.nan)
