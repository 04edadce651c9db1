"""Population statistics for BatchNorm layers: exact "precise BN" recomputation.

A BN layer's running statistics are an exponential moving average (EMA) of batch statistics
taken while the weights were still changing, so they lag the final weights. Precise BN
(He et al. 2016; Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm") freezes the model and
recomputes them over many batches. :func:`recompute_bn_stats` does it exactly: the result is the
mean and unbiased variance of every activation each layer saw, merged across batches and DDP
ranks with Chan's parallel formula — not an EMA, and not an average of per-batch variances
(which is biased low by ``(n - 1) / n`` for batches of ``n`` values per channel).
"""

from __future__ import annotations

import itertools
import math
import threading
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.hooks import RemovableHandle

from lightning_norms._moments import (
    Moments,
    all_reduce_moments,
    batch_moments,
    merge_moments,
    merge_stacked,
    zero_moments,
)

__all__ = ["BNStatsReport", "LayerShift", "is_recomputing", "recompute_bn_stats"]

ForwardFn = Callable[[nn.Module, Any], Any]

_PLAIN_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

_RECOMPUTING = threading.local()


def is_recomputing() -> bool:
    """Whether :func:`recompute_bn_stats` is running its pass in this thread.

    Hooks that count training calls of BN layers (``BatchNormDoctor``) use it to ignore the
    recompute pass, whatever the order of the callbacks.

    Example:
        >>> is_recomputing()
        False
    """
    return getattr(_RECOMPUTING, "depth", 0) > 0


@dataclass(frozen=True)
class LayerShift:
    """How far one BN layer's (or one domain's) running statistics moved when recomputed.

    ``mean_shift`` is the channel average of ``|mean_new - mean_old| / sqrt(var_new + eps)`` (the
    EMA's error in units of the true standard deviation: the offset it put on the normalised
    output); ``var_shift`` is the channel average of ``|var_old - var_new| / (var_new + eps)``.
    ``count`` is the number of values per channel the new statistics are computed from.
    """

    name: str
    count: int
    mean_shift: float
    var_shift: float
    domain: int | None = None


@dataclass
class BNStatsReport:
    """What :func:`recompute_bn_stats` did: one :class:`LayerShift` per layer (per domain).

    Attributes:
        layers: one entry per recomputed layer, or per recomputed domain of a
            ``DomainBatchNorm`` layer (``domain`` set), in module order.
        num_batches: batches this process drew from ``batches``.
        num_batches_requested: the ``num_batches`` cap that was asked for.
        skipped: layers without running statistics (``track_running_stats=False``).
        unseen: layers (``"name"``) or domains (``"name[domain=d]"``) that received fewer than
            two values per channel in total (a domain absent from the data, a layer the forward
            never reached); their buffers were left untouched.
    """

    layers: list[LayerShift] = field(default_factory=list)
    num_batches: int = 0
    num_batches_requested: int = 0
    skipped: list[str] = field(default_factory=list)
    unseen: list[str] = field(default_factory=list)

    @property
    def mean_shift(self) -> float:
        """Average of the layers' ``mean_shift`` (0.0 when nothing was recomputed)."""
        return _average([layer.mean_shift for layer in self.layers])

    @property
    def var_shift(self) -> float:
        """Average of the layers' ``var_shift`` (0.0 when nothing was recomputed)."""
        return _average([layer.var_shift for layer in self.layers])

    def __len__(self) -> int:
        return len(self.layers)

    def __str__(self) -> str:
        title = (
            f"BN statistics recomputed for {len(self.layers)} layer(s) over {self.num_batches} "
            f"batch(es) (asked for {self.num_batches_requested})"
        )
        header = ("layer", "domain", "count", "mean shift", "var shift")
        rows = [
            (
                layer.name or "<model>",
                "-" if layer.domain is None else str(layer.domain),
                str(layer.count),
                f"{layer.mean_shift:.4g}",
                f"{layer.var_shift:.4g}",
            )
            for layer in self.layers
        ]
        rows.append(("average", "", "", f"{self.mean_shift:.4g}", f"{self.var_shift:.4g}"))
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

        def fmt(row: tuple[str, ...]) -> str:
            cells = [row[0].ljust(widths[0])] + [
                c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
            ]
            return "  ".join(cells).rstrip()

        lines = [title, fmt(header), "  ".join("-" * w for w in widths)]
        lines += [fmt(row) for row in rows]
        if self.skipped:
            lines.append(f"skipped (no running stats): {', '.join(self.skipped)}")
        if self.unseen:
            lines.append(f"left untouched (no data): {', '.join(self.unseen)}")
        return "\n".join(lines)


def _average(values: list[float]) -> float:
    return math.fsum(values) / len(values) if values else 0.0


def _default_forward(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def _is_domain_bn(module: nn.Module) -> bool:
    return callable(getattr(module, "resolve_domain", None)) and hasattr(module, "num_domains")


class _Collector:
    """Accumulates one layer's exact moments over the pass.

    Hooks only copy each call's per-channel results into a small float64 buffer (``_CHUNK``
    rows); full buffers are merged at once (``merge_stacked``) into the running total, which
    keeps the per-call cost to a couple of tiny copies whatever the number of batches.
    """

    _CHUNK = 64

    def __init__(self, name: str, module: _BatchNorm) -> None:
        self.name = name
        self.module = module
        self.domain = _is_domain_bn(module)
        if module.running_mean is None or module.running_var is None:
            raise ValueError(f"{name}: a BN layer without running statistics has no collector")
        self.mean: Tensor = module.running_mean
        self.var: Tensor = module.running_var
        self.tracked: Tensor | None = module.num_batches_tracked
        buffer = self.mean
        self.num_groups = int(getattr(module, "num_domains", 1)) if self.domain else 1
        # Exact nn.BatchNorm*d with fp32/fp64 buffers: run the layer with momentum=1 and read the
        # batch statistics torch's fused kernel already computed ("free" path). Everything else
        # (subclasses, SyncBatchNorm, this package's variants, half buffers): a pre-hook computes
        # the moments from the input, with momentum=0 so the layer's own update is a no-op.
        self.fast = type(module) in _PLAIN_BN and buffer.dtype in (torch.float32, torch.float64)
        channels, device = buffer.shape[-1], buffer.device
        self.moments: Moments = zero_moments(self.num_groups, channels, device)
        shape = (self._CHUNK, self.num_groups, channels)
        self._counts = torch.zeros(shape[:2], dtype=torch.float64, device=device)
        self._means = torch.zeros(shape, dtype=torch.float64, device=device)
        self._seconds = torch.zeros(shape, dtype=torch.float64, device=device)  # m2 or var
        self._rows = 0

    def flush(self) -> None:
        """Merge the buffered rows into ``moments``."""
        k, self._rows = self._rows, 0
        if k == 0:
            return
        counts, means, seconds = self._counts[:k], self._means[:k], self._seconds[:k]
        if self.fast:  # rows hold torch's unbiased batch variance: m2 = var * (n - 1)
            seconds = seconds * (counts - 1.0)[..., None]
        self.moments = merge_moments(self.moments, merge_stacked(counts, means, seconds))

    def _next_row(self) -> int:
        if self._rows == self._CHUNK:
            self.flush()
        self._rows += 1
        return self._rows - 1

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0]
        if self.domain:
            given = kwargs["domain"] if "domain" in kwargs else (args[1] if len(args) > 1 else None)
            ids = module.resolve_domain(x, given)  # type: ignore[operator]
            count, mean, m2 = batch_moments(x, ids.to(x.device), self.num_groups)
        else:
            count, mean, m2 = batch_moments(x)
        row = self._next_row()
        self._counts[row].copy_(count)
        self._means[row].copy_(mean)
        self._seconds[row].copy_(m2)

    def post_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        row = self._next_row()
        self._counts[row].fill_(args[0].numel() // self.module.num_features)
        self._means[row, 0].copy_(self.mean)
        self._seconds[row, 0].copy_(self.var)

    def register(self) -> RemovableHandle:
        if self.fast:
            return self.module.register_forward_hook(self.post_hook)
        return self.module.register_forward_pre_hook(self.pre_hook, with_kwargs=True)


def _check_args(model: Any, batches: Any, num_batches: Any, forward_fn: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"recompute_bn_stats: `model` must be an nn.Module, got {type(model)}")
    if not isinstance(batches, Iterable):
        raise TypeError(
            f"recompute_bn_stats: `batches` must be an iterable of batches, got {type(batches)}"
        )
    if isinstance(num_batches, bool) or not isinstance(num_batches, int):
        raise TypeError(f"recompute_bn_stats: `num_batches` must be an int, got {num_batches!r}")
    if num_batches < 1:
        raise ValueError(f"recompute_bn_stats: `num_batches` must be >= 1, got {num_batches}")
    if forward_fn is not None and not callable(forward_fn):
        raise TypeError(
            f"recompute_bn_stats: `forward_fn` must be callable or None, got {type(forward_fn)}"
        )


def _shift(
    name: str,
    domain: int | None,
    count: float,
    old: tuple[Tensor, Tensor],
    new: tuple[Tensor, Tensor],
    eps: float,
) -> LayerShift:
    old_mean, old_var = (t.double() for t in old)
    new_mean, new_var = new
    mean_shift = ((new_mean - old_mean).abs() / (new_var + eps).sqrt()).mean()
    var_shift = ((old_var - new_var).abs() / (new_var + eps)).mean()
    return LayerShift(name, int(count), float(mean_shift), float(var_shift), domain)


# warnings point at the caller of recompute_bn_stats, past the torch.no_grad() wrapper frame
_CALLER = 3


@torch.no_grad()
def recompute_bn_stats(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int = 200,
    forward_fn: ForwardFn | None = None,
) -> BNStatsReport:
    """Set every BN layer's running statistics to the exact statistics of the data (precise BN).

    Precise BN: He et al. 2016; Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm".
    One pass over at most ``num_batches`` batches under ``torch.no_grad()``. Every
    ``_BatchNorm`` layer (``nn.BatchNorm*d``, ``SyncBatchNorm``, ``BatchRenorm*d``,
    ``DomainBatchNorm*d`` per domain) runs in train mode, so each normalises with batch
    statistics as in training, and records the count, mean and centred sum of squares of its
    inputs per batch; they are merged exactly (Chan et al. 1979) and written as

        running_mean = sum(x) / n,    running_var = sum((x - running_mean)**2) / (n - 1)

    over all ``n`` values per channel the layer saw (per domain for ``DomainBatchNorm``, where a
    domain that was not seen keeps its statistics). Every other module is put in eval mode for
    the pass (dropout off), because the statistics are meant for inference, where those modules
    are in eval mode too; train-mode dropout would inflate the variances (Li et al. 2019).
    Under ``torch.distributed`` (initialised) the moments are all-reduced in float64: every
    rank must call this (with its own shard; counts may differ), and all end with identical
    buffers equal to one process seeing every rank's batches.

    The layers' own EMA updates do not leak: ``momentum`` is set for the pass (to 1 for exact
    ``nn.BatchNorm*d``, whose fused kernel then hands over the batch statistics, else to 0) and
    restored, with every module's ``training`` flag, ``num_batches_tracked`` (BatchRenorm's step
    counter) and, if anything fails, the original running statistics, in ``finally``, even when
    ``forward_fn`` raises. Weights are never touched.

    Caveats: upstream BN layers use batch statistics, so a layer's statistics depend a little on
    the batch size (use batches like the training ones); ``BatchRenorm``'s ``r`` and ``d`` are
    taken against the running statistics as they were before the call (frozen for the pass).
    Per-batch moments are computed in fp32 (fp16/bf16 activations upcast) and merged in
    float64. Other stateful modules (e.g. a module keeping its own EMA in ``forward``) are run
    like in inference and may change.

    Args:
        model: the network; BN layers are found with ``model.named_modules()``.
        batches: any iterable of batches, including an endless iterator (``num_batches`` caps
            it). Batches must already be on the model's device.
        num_batches: how many batches to use at most. Default: ``200``.
        forward_fn: ``forward_fn(model, batch)`` runs one batch. Default: ``None``, meaning
            ``model(batch[0])`` for a tuple/list batch and ``model(batch)`` otherwise.

    Returns:
        A :class:`BNStatsReport` with, per layer (per domain), the count and how far the old
        running statistics were from the new ones.

    Warns:
        UserWarning: when no BN layer has running statistics (the model is left alone and an
            empty report returned); when layers with ``track_running_stats=False`` are skipped
            (one warning naming them); when fewer batches than ``num_batches`` came (the message
            says how many came and how many were asked for; what came is used); when no batch
            came at all or a layer/domain got fewer than two values per channel (its buffers are
            left untouched, nothing is raised, so DDP ranks stay in step).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, ``batches`` not iterable, ``num_batches``
            not an int, ``forward_fn`` not callable.
        ValueError: ``num_batches < 1``.

    Shape:
        - Each batch: whatever ``forward_fn`` (or the model) accepts.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
        >>> data = [torch.randn(8, 4) * 2 + 1 for _ in range(5)]
        >>> report = recompute_bn_stats(model, data, num_batches=5)
        >>> acts = model[0](torch.cat(data)).double()
        >>> torch.allclose(model[1].running_mean, acts.mean(0).float(), atol=1e-6)
        True
        >>> torch.allclose(model[1].running_var, acts.var(0).float(), atol=1e-5)
        True
        >>> report.layers[0].name, report.layers[0].count
        ('1', 40)
    """
    _check_args(model, batches, num_batches, forward_fn)
    forward = forward_fn if forward_fn is not None else _default_forward
    all_bn = [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]
    tracked = [
        (name, m) for name, m in all_bn if m.running_mean is not None and m.running_var is not None
    ]
    skipped = [name for name, m in all_bn if (name, m) not in tracked]
    report = BNStatsReport(num_batches_requested=num_batches, skipped=skipped)
    if skipped:
        warnings.warn(
            f"recompute_bn_stats: skipping {len(skipped)} BN layer(s) without running statistics "
            f"(track_running_stats=False): {', '.join(skipped)}",
            stacklevel=_CALLER,
        )
    if not tracked:
        if not all_bn:
            warnings.warn(
                f"recompute_bn_stats: {type(model).__name__} has no BatchNorm layer; "
                "nothing to recompute",
                stacklevel=_CALLER,
            )
        return report

    collectors = [_Collector(name, m) for name, m in tracked]
    modes = {m: m.training for m in model.modules()}
    momenta = [c.module.momentum for c in collectors]
    saved = [
        (c.mean.clone(), c.var.clone(), None if c.tracked is None else c.tracked.clone())
        for c in collectors
    ]
    handles: list[RemovableHandle] = []
    written = False
    _RECOMPUTING.depth = getattr(_RECOMPUTING, "depth", 0) + 1
    try:
        model.eval()
        for _, bn in all_bn:
            bn.training = True
        for c in collectors:
            c.module.momentum = 1.0 if c.fast else 0.0
            if c.fast:  # finite scratch values: 0 * old must vanish in the momentum-1 update
                c.mean.zero_()
                c.var.fill_(1.0)
            handles.append(c.register())
        for batch in itertools.islice(batches, num_batches):
            forward(model, batch)
            report.num_batches += 1
        for handle in handles:
            handle.remove()
        handles.clear()
        for c in collectors:
            c.flush()
        if dist.is_available() and dist.is_initialized():
            moments = [c.moments for c in collectors]
            all_reduce_moments(moments)
        thin = _write(collectors, saved, report)
        written = True
    finally:
        _RECOMPUTING.depth -= 1
        for handle in handles:
            handle.remove()
        for c, momentum, (mean, var, tracked_count) in zip(collectors, momenta, saved, strict=True):
            c.module.momentum = momentum
            if c.tracked is not None and tracked_count is not None:
                c.tracked.copy_(tracked_count)
            if not written:
                c.mean.copy_(mean)
                c.var.copy_(var)
        for m, mode in modes.items():
            m.training = mode
    if report.num_batches < num_batches:
        warnings.warn(
            f"recompute_bn_stats: got {report.num_batches} batch(es), asked for {num_batches} "
            f"(num_batches={num_batches}); "
            + (
                f"the statistics use the {report.num_batches} that came"
                if report.num_batches
                else "no batch came, so this process contributed nothing"
            ),
            stacklevel=_CALLER,
        )
    if report.num_batches and thin:
        warnings.warn(
            "recompute_bn_stats: fewer than two values per channel reached "
            f"{', '.join(thin)}; their running statistics were left untouched",
            stacklevel=_CALLER,
        )
    return report


def _write(
    collectors: list[_Collector],
    saved: list[tuple[Tensor, Tensor, Tensor | None]],
    report: BNStatsReport,
) -> list[str]:
    """Write the merged moments into the buffers; return the unexpectedly thin layers/domains.

    Layers and domains with fewer than two values per channel keep their original statistics
    and go to ``report.unseen``; those are returned for a warning except domains that got no
    data at all (a domain absent from the data is expected to stay untouched).
    """
    thin: list[str] = []
    for c, (old_mean, old_var, _) in zip(collectors, saved, strict=True):
        count, mean, m2 = c.moments
        seen = count >= 2
        var = m2 / (count - 1).clamp_min(1.0)[:, None]
        if c.domain:
            c.mean.copy_(torch.where(seen[:, None], mean.to(old_mean), old_mean))
            c.var.copy_(torch.where(seen[:, None], var.to(old_var), old_var))
        elif bool(seen[0]):
            c.mean.copy_(mean[0])
            c.var.copy_(var[0])
        else:
            c.mean.copy_(old_mean)
            c.var.copy_(old_var)
        counts = count.tolist()
        for g, n in enumerate(counts):
            domain = g if c.domain else None
            label = c.name if domain is None else f"{c.name}[domain={domain}]"
            if n < 2:
                report.unseen.append(label)
                if n > 0 or not c.domain:
                    thin.append(label)
                continue
            old = (old_mean[g], old_var[g]) if c.domain else (old_mean, old_var)
            report.layers.append(_shift(c.name, domain, n, old, (mean[g], var[g]), c.module.eps))
    return thin
