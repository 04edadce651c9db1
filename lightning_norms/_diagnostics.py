"""Statistics behind ``BatchNormDoctor``: plain tensor code, no Lightning import.

Two accumulators are fed from forward pre-hooks of BN layers: :class:`BatchSpread` (training
calls) and the moment engine's ``MomentAccumulator`` (validation calls). Each call is reduced to
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

* :func:`eval_mismatch` compares the exact population moments of the inputs a BN layer sees
  in validation (the engine's :class:`lightning_norms._moments.MomentAccumulator`, fp64
  accumulation, merged over ranks with :func:`lightning_norms._moments.all_reduce_moments`)
  with the layer's running statistics.

Every per-call statistic comes from the moment engine (:mod:`lightning_norms._moments`): the
per-sample channel means from ``row_moments``, the per-group count, mean and centred sum of
squares of those means from ``batch_moments``. Under ``torch.distributed``
``all_reduce_spreads`` sums the spreads of all ranks (every rank must call it); the result
equals one process that saw every rank's calls.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_norms._moments import batch_moments, row_moments

__all__ = [
    "BatchSpread",
    "all_reduce_max_",
    "all_reduce_spreads",
    "eval_mismatch",
    "nanmedian_rows",
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


def _sample_means(x: Tensor) -> Tensor:
    """Per-sample channel means ``[N, C]`` of ``x`` ``[N, C, *]`` in float32 (the row means of
    the engine's :func:`~lightning_norms._moments.row_moments`, without the unused variances).

    Raises:
        ValueError: if ``x`` has fewer than 2 dimensions.
    """
    if x.dim() < 2:
        raise ValueError(f"BatchSpread.update: `x` must be [N, C, *], got shape {tuple(x.shape)}")
    if x.dim() == 2:
        return x.float()
    return x.mean(dim=tuple(range(2, x.dim())), dtype=torch.float32)


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
        m = _sample_means(x)
        if groups is None:
            n = m.shape[0]
            if n < 2:
                return None
            # the engine's row kernel with channels as rows: moments of m over the samples
            mu, var = row_moments(m.t()[:, None])
            self.within[0].add_(var[:, 0], alpha=1.0 / (n - 1))  # s2 / n, s2 unbiased
            self._host_calls += 1
            self._add_lags(0, mu[:, 0])
            return None
        cnt, mu, m2 = batch_moments(m, groups, self.num_groups)
        s2 = m2 / (cnt - 1.0).clamp(min=1.0)[:, None]
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
    med = nanmedian_rows(ratio).clamp(min=0.0)
    return torch.where(num_batches >= max(min_batches, 3), med, torch.nan)


def nanmedian_rows(x: Tensor) -> Tensor:
    """``x.nanmedian(dim=1).values`` of a ``[G, C]`` tensor with deterministic kernels only.

    ``Tensor.nanmedian(dim=...)`` returns indices too, and its CUDA kernel raises under
    ``torch.use_deterministic_algorithms(True)`` (which ``Trainer(deterministic=True)`` sets);
    older MPS builds lack it. Here NaN becomes ``+inf``, each row is sorted, and the lower middle
    of its ``k`` non-NaN values (index ``(k - 1) // 2``, torch's choice for even ``k``) is
    gathered; a row of NaN gives NaN.

    Example:
        >>> nanmedian_rows(torch.tensor([[3.0, float("nan"), 1.0, 2.0], [4.0, 1.0, 2.0, 3.0]]))
        tensor([2., 2.])
    """
    missing = x.isnan()
    count = x.shape[1] - missing.sum(dim=1, keepdim=True)
    ordered = torch.where(missing, torch.inf, x).sort(dim=1).values
    middle = ordered.gather(1, ((count - 1) // 2).clamp(min=0)).squeeze(1)
    return torch.where(count.squeeze(1) > 0, middle, torch.nan)


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
    rm = running_mean.to(mean.dtype).reshape(-1, mean.shape[1])
    rv = running_var.to(mean.dtype).reshape(-1, mean.shape[1])
    shift = ((mean - rm).abs() / (rv + eps).sqrt()).mean(dim=1)
    lvr = ((var + eps).log() - (rv + eps).log()).abs().mean(dim=1)
    ok = count >= 2
    return torch.where(ok, shift, torch.nan), torch.where(ok, lvr, torch.nan)
