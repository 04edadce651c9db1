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
import sys
import threading
import types
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.hooks import RemovableHandle

from lightning_norms._base import BatchNormBase
from lightning_norms._batches import DEFAULT_NUM_BATCHES as _DEFAULT_NUM_BATCHES
from lightning_norms._batches import batch_size, default_forward, takes_one_input
from lightning_norms._kinds import is_domain, reads_back
from lightning_norms._moments import (
    Moments,
    all_reduce_moments,
    as_dtype,
    batch_moments,
    merge_moments,
    merge_stacked,
    stat_dtype,
    zero_moments,
)
from lightning_norms._patterns import name_matches
from lightning_norms._shared import check_int
from lightning_norms.functional._domain import routing

__all__ = ["BNStatsReport", "LayerShift", "is_recomputing", "recompute_bn_stats"]

ForwardFn = Callable[[nn.Module, Any], Any]

_EXACT_DTYPES = (torch.float32, torch.float64)

_RECOMPUTING = threading.local()


def is_recomputing() -> bool:
    """Whether :func:`recompute_bn_stats` is running its pass in this thread.

    True from the first forward of the pass until every layer's state has been restored (on
    success and on error). Hooks that count training calls of BN layers (``BatchNormDoctor``)
    use it to ignore the recompute pass, whatever the order of the callbacks.

    Example:
        >>> is_recomputing()
        False
    """
    return getattr(_RECOMPUTING, "depth", 0) > 0


@contextmanager
def _recomputing() -> Iterator[None]:
    _RECOMPUTING.depth = getattr(_RECOMPUTING, "depth", 0) + 1
    try:
        yield
    finally:
        _RECOMPUTING.depth -= 1


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

    ``len(report)`` and ``num_layers`` count layers: a ``DomainBatchNorm`` is one layer with
    a row per domain in ``layers``. :meth:`summary` is the one line ``PreciseBN`` prints.

    Attributes:
        layers: one row per recomputed layer, or per recomputed domain of a
            ``DomainBatchNorm`` layer (``domain`` set), in module order.
        num_batches: batches this process drew from ``batches``.
        num_batches_requested: the ``num_batches`` cap that was asked for (``None`` when the
            pass was capped by ``num_samples``).
        num_samples: samples this process drew (dim 0 of each batch's first tensor; batches
            without a tensor count 0).
        num_samples_requested: the ``num_samples`` cap, or ``None``.
        skipped: layers without running statistics (``track_running_stats=False``).
        unseen: layers (``"name"``) or domains (``"name[domain=d]"``) that received fewer than
            two values per channel in total (a domain absent from the data, a layer the forward
            never reached); their buffers were left untouched.
    """

    layers: list[LayerShift] = field(default_factory=list)
    num_batches: int = 0
    num_batches_requested: int | None = 0
    num_samples: int = 0
    num_samples_requested: int | None = None
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

    @property
    def num_layers(self) -> int:
        """Recomputed layers: a ``DomainBatchNorm`` is one layer, whatever its domain rows."""
        return len({layer.name for layer in self.layers})

    def __len__(self) -> int:
        return self.num_layers

    def summary(self) -> str:
        """One line: layers, batches, samples, and the largest mean and variance shift."""
        mean = max((layer.mean_shift for layer in self.layers), default=0.0)
        var = max((layer.var_shift for layer in self.layers), default=0.0)
        return (
            f"PreciseBN: recomputed {self.num_layers} BN layer(s) from {self.num_batches} "
            f"batch(es), {self.num_samples} sample(s); largest shift: mean {mean:.3g}, "
            f"var {var:.3g}"
        )

    def __str__(self) -> str:
        if self.num_samples_requested is None:
            asked = f"asked for {self.num_batches_requested}"
        else:
            asked = f"{self.num_samples} samples, asked for {self.num_samples_requested} samples"
        title = (
            f"BN statistics recomputed for {self.num_layers} layer(s) over {self.num_batches} "
            f"batch(es) ({asked})"
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


def _reads_back(module: _BatchNorm) -> bool:
    """Whether a layer's momentum-1 update leaves exactly its batch statistics in its buffers.

    True for layers that run torch's ``_BatchNorm.forward`` (``nn.BatchNorm*d`` and subclasses
    that do not override ``forward``) or ``DomainBatchNorm*d``'s (torch's update rule per
    domain), with fp32/fp64 buffers (layer sync is off for the pass, see :func:`_sync_off`). A
    subclass with its own ``forward`` (timm's ``BatchNormAct2d``, ``SyncBatchNorm``,
    ``BatchRenorm*d``) may update differently: its moments come from its input.
    """
    if module.running_mean is None or module.running_mean.dtype not in _EXACT_DTYPES:
        return False
    return reads_back(module)


@contextmanager
def _sync_off(model: nn.Module) -> Iterator[None]:
    """Layer sync off for the pass: no per-batch collective, whatever each rank's batch count.

    This package's layers get ``sync=False`` and no ``process_group``; torch's ``SyncBatchNorm``
    runs ``_BatchNorm.forward`` (batch statistics of this rank, what one process would compute).
    The moments are all-reduced once at the end instead. Everything is put back on exit.
    """
    saved: list[tuple[nn.Module, dict[str, Any]]] = []
    try:
        for m in model.modules():
            if isinstance(m, nn.SyncBatchNorm):
                saved.append((m, {k: m.__dict__[k] for k in ("forward",) if k in m.__dict__}))
                m.forward = types.MethodType(_BatchNorm.forward, m)  # type: ignore[method-assign]
            elif isinstance(m, BatchNormBase):
                saved.append((m, {"sync": m.sync, "process_group": m.process_group}))
                m.sync, m.process_group = False, None
        yield
    finally:
        for m, attrs in saved:
            if isinstance(m, nn.SyncBatchNorm):
                m.__dict__.pop("forward", None)
            for key, value in attrs.items():
                setattr(m, key, value)


class _Collector:
    """Accumulates one layer's exact moments over the pass, and owns its state for the pass.

    Each batch leaves one small :class:`~lightning_norms._moments.Moments` (``[G, C]``, in the
    statistics' dtype, no host sync) in a list; every ``_CHUNK`` batches, and at the end, the
    list is merged at once in float64 (``merge_stacked``) into the running total. Nothing is
    allocated up front and nothing per batch beyond the batch's own moments.

    Two ways to get a batch's moments. *Read back*: layers whose own training update is known
    to be torch's (``nn.BatchNorm*d`` and ``DomainBatchNorm*d``, subclasses that keep their
    ``forward`` included; unsynced, fp32/fp64 buffers) run with ``momentum=1``, so after the
    forward their buffers hold the batch mean and unbiased variance their kernel already
    computed (per domain, absent domains untouched): a forward hook copies them, no second pass
    over the input. *From the input*: every other layer (subclasses with their own ``forward``,
    ``SyncBatchNorm``, ``BatchRenorm``, synced or half-buffer layers, ``domain=k`` routing) runs
    with ``momentum=0`` and a pre-hook computes the moments of its input with
    :func:`~lightning_norms._moments.batch_moments`. ``domains`` maps the rows of the moments to
    the buffers: ``[None]`` for a plain layer (the whole buffer), ``[0, ..., D-1]`` for a
    ``DomainBatchNorm``, ``[k]`` when only domain ``k`` is recomputed
    (every batch is routed to it).
    """

    _CHUNK = 64

    def __init__(self, name: str, module: _BatchNorm, target: int | None = None) -> None:
        if module.running_mean is None or module.running_var is None:
            raise ValueError(f"{name}: a BN layer without running statistics has no collector")
        self.name = name
        self.module = module
        self.domain = is_domain(module)
        self.target = target if self.domain else None
        self.mean: Tensor = module.running_mean
        self.var: Tensor = module.running_var
        self.tracked: Tensor | None = module.num_batches_tracked
        self.old = (self.mean.clone(), self.var.clone())
        self.old_tracked = None if self.tracked is None else self.tracked.clone()
        self.momentum = module.momentum
        if not self.domain:
            self.domains: list[int | None] = [None]
        elif self.target is None:
            self.domains = list(range(int(getattr(module, "num_domains", 1))))
        else:
            self.domains = [self.target]
        self.readback = self.target is None and _reads_back(module)
        self._start_rows = self.old
        self.moments: Moments = zero_moments(
            len(self.domains), self.mean.shape[-1], self.mean.device
        )
        self._parts: list[Moments] = []
        self._slots: Tensor | None = None  # plain read-back: [CHUNK, 2, C], one row per batch
        self._counts: list[int] = []

    def start(self) -> list[RemovableHandle]:
        """Freeze the layer's own EMA for the pass and attach the hooks."""
        self.module.momentum = 1.0 if self.readback else 0.0
        if not self.readback:
            return [self.module.register_forward_pre_hook(self.pre_hook, with_kwargs=True)]
        if not self.domain:
            return [self.module.register_forward_pre_hook(self._aim)]
        # finite values: 0 * old must vanish in the momentum-1 update
        self.mean.nan_to_num_(0.0, 0.0, 0.0)
        self.var.nan_to_num_(1.0, 1.0, 1.0)
        handles = [self.module.register_forward_hook(self.read_back, with_kwargs=True)]
        if self.domain:  # rows a batch does not update hold the running statistics, as in training
            self._start_rows = (self.mean.clone(), self.var.clone())
            handles.append(self.module.register_forward_pre_hook(self._reset_rows))
        return handles

    def _aim(self, module: nn.Module, args: tuple) -> None:
        """Before a batch of a plain layer: its buffers become this batch's slot, where its
        momentum-1 update writes the batch mean and unbiased variance (no copy, no op), and
        the batch's count is kept as a Python int (one hook per layer and batch)."""
        if len(self._counts) == self._CHUNK:  # the table is full: merge it first
            self.flush()
        if self._slots is None:  # zeros: finite, so 0 * old vanishes in the update
            shape = (self._CHUNK, 2, self.mean.shape[-1])
            self._slots = self.mean.new_zeros(shape)
        slot = self._slots[len(self._counts)]
        module._buffers["running_mean"], module._buffers["running_var"] = slot[0], slot[1]
        self._counts.append(args[0].numel() // self.mean.shape[-1])

    def _reset_rows(self, module: nn.Module, args: tuple) -> None:
        """Before each batch: the running statistics the layer's rare-domain rule reads (only
        a batch of one position per sample can have a one-value domain)."""
        if args[0].shape[2:].numel() != 1:
            return
        self.mean.copy_(self._start_rows[0])
        self.var.copy_(self._start_rows[1])

    def restore(self, keep_statistics: bool) -> None:
        """Put back momentum and step counter, and the statistics unless ``keep_statistics``."""
        self.module.momentum = self.momentum
        self.module._buffers["running_mean"] = self.mean  # the layer's own buffers again
        self.module._buffers["running_var"] = self.var
        if self.tracked is not None and self.old_tracked is not None:
            self.tracked.copy_(self.old_tracked)
        if not keep_statistics:
            self.mean.copy_(self.old[0])
            self.var.copy_(self.old[1])

    def flush(self) -> None:
        """Merge the stored batches' moments into ``moments`` (float64)."""
        dtype = self.moments.mean.dtype
        if self._counts and self._slots is not None:  # plain read-back: the filled slots
            rows = as_dtype(self._slots[: len(self._counts)], dtype)
            counts = torch.tensor(self._counts, dtype=dtype, device=rows.device)[:, None]
            self._counts = []
            counts, means, seconds = counts, rows[:, :1], rows[:, 1:]
        elif self._parts:
            counts, means, seconds = (
                as_dtype(torch.stack(t), dtype) for t in zip(*self._parts, strict=True)
            )
            self._parts = []
        else:
            return
        if self.readback:  # read-back rows hold the unbiased batch variance: m2 = var * (n - 1)
            seconds = seconds * (counts - 1.0).clamp(min=0.0)[..., None]
        self.moments = merge_moments(self.moments, merge_stacked(counts, means, seconds))

    def _store(self, moments: Moments) -> None:
        self._parts.append(moments)
        if len(self._parts) == self._CHUNK:
            self.flush()

    def _ids(self, module: nn.Module, x: Tensor, args: tuple, kwargs: dict) -> Tensor:
        """The per-sample domain ids the layer's forward resolves (validated by the layer)."""
        given = kwargs["domain"] if "domain" in kwargs else (args[1] if len(args) > 1 else None)
        return module.resolve_domain(x, given).to(x.device)  # type: ignore[operator]

    def _domain_counts(
        self, module: nn.Module, x: Tensor, args: tuple, kwargs: dict
    ) -> tuple[Tensor, Tensor]:
        """Per-sample ids, and values per channel of each domain in ``x``, without a host read.

        Runs after the layer's forward succeeded, so its ids were validated there: they are
        only looked up (no second range check) and counted with ``index_add_`` (``bincount``
        reads its minimum and maximum back to the host).
        """
        given = kwargs["domain"] if "domain" in kwargs else (args[1] if len(args) > 1 else None)
        lookup = getattr(module, "_ids", None)  # the ids the forward used, not re-validated
        ids = lookup(given) if callable(lookup) else self._ids(module, x, args, kwargs)
        per_row, device = x.shape[2:].numel(), self.mean.device
        if isinstance(ids, Tensor) and ids.dim() == 1 and ids.dtype == torch.long:
            # the routing the layer's forward built (cached per ids tensor): no op
            eps = float(self.module.eps)
            route = routing(ids, len(self.domains), per_row, stat_dtype(x), eps, 1.0)
            return ids, route.counts.to(self.mean.dtype)
        count = torch.zeros(len(self.domains), dtype=self.mean.dtype, device=device)
        if isinstance(ids, int):
            ids = torch.full((x.shape[0],), ids, dtype=torch.long, device=device)
        ids = ids.to(device=device, dtype=torch.long).expand(x.shape[0])
        count.index_add_(0, ids, count.new_ones(ids.shape))
        return ids, count.mul_(per_row)

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        x = args[0]
        if self.target is not None:  # route the whole batch to the recomputed domain
            self._store(batch_moments(x))
            return args[:1], {**kwargs, "domain": self.target}
        ids = self._ids(module, x, args, kwargs) if self.domain else None
        self._store(batch_moments(x, ids, len(self.domains)))
        return None

    def read_back(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        x = args[0]
        rows, dtype = (len(self.domains), -1), self.moments.mean.dtype
        mean, var = (as_dtype(t.view(rows), dtype, copy=True) for t in (self.mean, self.var))
        if self.domain:
            ids, count = self._domain_counts(module, x, args, kwargs)
            if x.shape[2:].numel() == 1:  # a one-value domain is not in the buffers: add it
                single = x.reshape(x.shape[0], -1).to(dtype)
                value = torch.zeros_like(mean).index_add_(0, ids, single)
                mean = torch.where((count == 1)[:, None], value, mean)
        else:
            count = self.mean.new_full((1,), x.numel() // self.module.num_features)
        self._store(Moments(count, mean, var))

    def write(self, report: BNStatsReport) -> list[str]:
        """Write the merged moments into the buffers; return the unexpectedly thin rows.

        Rows with fewer than two values per channel keep their original statistics and go to
        ``report.unseen``; they are returned for a warning unless they are domains of a fully
        recomputed ``DomainBatchNorm`` that got no data at all (an absent domain is expected).
        """
        count, mean, m2 = self.moments
        var = m2 / (count - 1).clamp_min(1.0)[:, None]
        rows = slice(None) if not self.domain else self.domains
        channels = self.mean.shape[-1]
        old = [t.view(-1, channels)[rows].to(mean.dtype) for t in self.old]
        seen = (count >= 2)[:, None]
        for buffer, new, before in zip((self.mean, self.var), (mean, var), old, strict=True):
            buffer.view(-1, channels)[rows] = torch.where(seen, new, before).to(buffer.dtype)
        eps = self.module.eps
        mean_shift = ((mean - old[0]).abs() / (var + eps).sqrt()).mean(1)
        var_shift = ((old[1] - var).abs() / (var + eps)).mean(1)
        figures = torch.stack([count, mean_shift, var_shift], 1).tolist()  # one host sync
        thin: list[str] = []
        for d, (n, m_shift, v_shift) in zip(self.domains, figures, strict=True):
            if n >= 2:
                report.layers.append(LayerShift(self.name, int(n), m_shift, v_shift, d))
                continue
            label = self.name if d is None else f"{self.name}[domain={d}]"
            report.unseen.append(label)
            if n > 0 or not self.domain or self.target is not None:
                thin.append(label)
        return thin


def _check_args(
    model: Any, batches: Any, num_batches: Any, forward_fn: Any, num_samples: Any, domain: Any
) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"recompute_bn_stats: `model` must be an nn.Module, got {type(model)}")
    if not isinstance(batches, Iterable):
        raise TypeError(
            f"recompute_bn_stats: `batches` must be an iterable of batches, got {type(batches)}"
        )
    check_int("num_batches", num_batches, 1, where="recompute_bn_stats")
    if num_samples is not None:
        check_int("num_samples", num_samples, 1, where="recompute_bn_stats")
        if num_batches is not _DEFAULT_NUM_BATCHES:
            raise ValueError(
                "recompute_bn_stats: pass `num_batches` or `num_samples`, not both "
                f"(got num_batches={num_batches}, num_samples={num_samples})"
            )
    if forward_fn is not None and not callable(forward_fn):
        raise TypeError(
            f"recompute_bn_stats: `forward_fn` must be callable or None, got {type(forward_fn)}"
        )
    if domain is not None:
        check_int("domain", domain, 0, where="recompute_bn_stats")


def _check_domain_layers(layers: list[tuple[str, _BatchNorm]], domain: int) -> None:
    domain_layers = [(name, m) for name, m in layers if is_domain(m)]
    if not domain_layers:
        raise ValueError(
            f"recompute_bn_stats: `domain={domain}` given, but the model has no DomainBatchNorm "
            "layer with running statistics"
        )
    for name, m in domain_layers:
        num_domains = int(getattr(m, "num_domains", 1))
        if domain >= num_domains:
            raise ValueError(
                f"recompute_bn_stats: `domain={domain}` is out of range for layer "
                f"{name or '<model>'} ({type(m).__name__} with num_domains={num_domains})"
            )


_END = object()


def _patterns(value: Any, name: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    patterns = (value,) if isinstance(value, str) else value
    if isinstance(patterns, Sequence) and all(isinstance(p, str) and p for p in patterns):
        return tuple(patterns)
    raise TypeError(
        f"recompute_bn_stats: `{name}` must be None, a module-name pattern or a list of them, "
        f"got {value!r}"
    )


def _selection(domain: Any, include: Any, exclude: Any, skip_eval_layers: Any) -> _Selection:
    if not isinstance(skip_eval_layers, bool):
        raise TypeError(
            "recompute_bn_stats: `skip_eval_layers` must be True or False, got "
            f"{skip_eval_layers!r}"
        )
    return _Selection(
        domain, _patterns(include, "include"), _patterns(exclude, "exclude") or (), skip_eval_layers
    )


def _device(device: Any) -> torch.device | None:
    if device is None or isinstance(device, torch.device):
        return device
    if isinstance(device, str):
        return torch.device(device)
    raise TypeError(
        f"recompute_bn_stats: `device` must be a torch.device, a string or None, got {device!r}"
    )


# warnings point at the caller of recompute_bn_stats, past the torch.no_grad() wrapper frame
_CALLER = 3


@dataclass(frozen=True)
class _Selection:
    """Which layers a call recomputes: ``domain``, name patterns, and the eval-mode rule."""

    domain: int | None = None
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    skip_eval_layers: bool = False

    def chooses(self, name: str, module: nn.Module) -> bool:
        if self.skip_eval_layers and not module.training:
            return False
        if self.include is not None and not any(name_matches(name, p) for p in self.include):
            return False
        return not any(name_matches(name, p) for p in self.exclude)


def _plan(
    model: nn.Module, report: BNStatsReport, selection: _Selection
) -> tuple[list[_Collector], list[nn.Module]]:
    """The collectors for the layers to recompute, and the BN layers to run in train mode.

    Layers without running statistics always normalise with batch statistics (train mode);
    the layers that keep their buffers (``domain`` set, left out by ``include`` / ``exclude``
    / ``skip_eval_layers``) run in eval mode, as at inference.
    """
    all_bn = [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]
    tracked = [
        (n, m) for n, m in all_bn if m.running_mean is not None and m.running_var is not None
    ]
    report.skipped = [name for name, m in all_bn if m.running_mean is None or m.running_var is None]
    candidates = len(tracked)
    tracked = [(name, m) for name, m in tracked if selection.chooses(name, m)]
    if selection.domain is not None:
        _check_domain_layers(tracked, selection.domain)
        tracked = [(name, m) for name, m in tracked if is_domain(m)]
    if report.skipped:
        warnings.warn(
            f"recompute_bn_stats: skipping {len(report.skipped)} BN layer(s) without running "
            f"statistics (track_running_stats=False): {', '.join(report.skipped)}",
            stacklevel=_CALLER + 1,
        )
    if not all_bn:
        warnings.warn(
            f"recompute_bn_stats: {type(model).__name__} has no BatchNorm layer; "
            "nothing to recompute",
            stacklevel=_CALLER + 1,
        )
    if candidates and not tracked and selection.domain is None:
        warnings.warn(
            "recompute_bn_stats: `include` / `exclude` / `skip_eval_layers` leave no BN layer "
            f"to recompute in {type(model).__name__}; nothing was changed",
            stacklevel=_CALLER + 1,
        )
    recomputed = {id(m) for _, m in tracked}
    train: list[nn.Module] = [m for _, m in all_bn if id(m) in recomputed or m.running_mean is None]
    return [_Collector(name, m, selection.domain) for name, m in tracked], train


@contextmanager
def _pass_state(
    model: nn.Module, train: list[nn.Module], collectors: list[_Collector]
) -> Iterator[None]:
    """Modes and hooks for the pass; everything restored on exit (statistics too, on error).

    Every module is in eval mode (dropout off: the statistics are meant for inference, where
    train-mode dropout would inflate the variances, Li et al. 2019) except the ``train`` BN
    layers. The collected layers' EMA is frozen and their step counters put back.
    """
    modes = {m: m.training for m in model.modules()}
    handles: list[RemovableHandle] = []
    completed = False
    try:
        model.eval()
        for m in train:
            m.training = True
        for c in collectors:
            handles.extend(c.start())
        with _sync_off(model):
            yield
        completed = True
    finally:
        for handle in handles:
            handle.remove()
        for c in collectors:
            c.restore(keep_statistics=completed)
        for m, mode in modes.items():
            m.training = mode


def _run_pass(
    model: nn.Module,
    batches: Iterator[Any],
    forward_fn: ForwardFn | None,
    report: BNStatsReport,
    device: torch.device | None,
    advance: Callable[[], None],
) -> None:
    """Feed batches until the cap (``num_batches``, or ``num_samples`` seen) or the end."""
    by_samples = report.num_samples_requested is not None
    while True:
        if by_samples and report.num_samples >= (report.num_samples_requested or 0):
            return
        if not by_samples and report.num_batches >= (report.num_batches_requested or 0):
            return
        try:
            batch = next(batches)
        except StopIteration:
            return
        size = batch_size(batch)
        if size is None and by_samples:
            raise TypeError(
                "recompute_bn_stats: `num_samples` needs batches whose size can be read (a "
                f"tensor, or a tuple/list/dict holding one), got a {type(batch).__name__}; "
                "use `num_batches` instead"
            )
        _forward(model, _to_device(batch, device), forward_fn)
        report.num_batches += 1
        report.num_samples += size or 0
        advance()


def _check_default_input(batch: Any) -> None:
    """Refuse a batch the default forward cannot run (a dict) with an error naming the fix."""
    if isinstance(batch, Mapping):
        raise TypeError(
            f"recompute_bn_stats: got a {type(batch).__name__} batch (keys "
            f"{list(batch)[:5]}), which the default forward (`model(batch[0])` for tuple/list "
            "batches, `model(batch)` otherwise) cannot run. Pass `forward_fn(model, batch)` "
            "that runs one batch (with PreciseBN: `forward_fn=` or define "
            "`precise_bn_forward(batch)` on the LightningModule)"
        )


def _to_device(batch: Any, device: torch.device | None) -> Any:
    """``batch`` with every tensor (in tuples, lists and dicts, nested) moved to ``device``."""
    if device is None:
        return batch
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return type(batch)({k: _to_device(v, device) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(_to_device(v, device) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _forward(model: nn.Module, batch: Any, forward_fn: ForwardFn | None) -> None:
    if forward_fn is not None:
        forward_fn(model, batch)
        return
    _check_default_input(batch)
    try:
        default_forward(model, batch)
    except TypeError as err:
        if takes_one_input(model):
            raise
        raise TypeError(
            f"recompute_bn_stats: {type(model).__name__}.forward needs more than the batch's "
            "input, and the default forward runs `model(batch[0])` (tuple/list batches) or "
            "`model(batch)`. Pass `forward_fn(model, batch)` that runs one batch (with "
            "PreciseBN: `forward_fn=` or define `precise_bn_forward(batch)` on the "
            f"LightningModule). The call failed with: {err}"
        ) from err


def _warn_after(report: BNStatsReport, thin: list[str]) -> None:
    if report.num_samples_requested is not None:
        asked, came = report.num_samples_requested, report.num_samples
        if came < asked:
            warnings.warn(
                f"recompute_bn_stats: got {came} sample(s) in {report.num_batches} batch(es), "
                f"asked for {asked} (num_samples={asked}); "
                + (f"the statistics use the {came} that came" if came else _NOTHING),
                stacklevel=_CALLER + 1,
            )
    elif report.num_batches < (asked := report.num_batches_requested or 0):
        came = report.num_batches
        warnings.warn(
            f"recompute_bn_stats: got {came} batch(es), asked for {asked} "
            f"(num_batches={asked}); "
            + (f"the statistics use the {came} that came" if came else _NOTHING),
            stacklevel=_CALLER + 1,
        )
    if report.num_batches and thin:
        warnings.warn(
            "recompute_bn_stats: fewer than two values per channel reached "
            f"{', '.join(thin)}; their running statistics were left untouched",
            stacklevel=_CALLER + 1,
        )


_NOTHING = "no batch came, so this process contributed nothing"


@contextmanager
def _progress(show: bool | None, total: int | None) -> Iterator[Callable[[], None]]:
    """A progress display on stderr (rich's bar where installed, else a plain counter).

    ``show=None`` shows it when stderr is a terminal.
    """
    if show is None:
        show = sys.stderr.isatty()
    if not show:
        yield lambda: None
        return
    try:
        from rich.console import Console
        from rich.progress import Progress
    except ImportError:
        with _plain_counter(total) as advance:
            yield advance
        return
    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("recompute_bn_stats", total=total)
        yield lambda: bar.advance(task)


@contextmanager
def _plain_counter(total: int | None) -> Iterator[Callable[[], None]]:
    """``recompute_bn_stats: k/total batches`` rewritten in place on stderr."""
    seen = 0

    def advance() -> None:
        nonlocal seen
        seen += 1
        sys.stderr.write(f"\rrecompute_bn_stats: {seen}/{total or '?'} batches")
        sys.stderr.flush()

    try:
        yield advance
    finally:
        if seen:
            sys.stderr.write("\n")


@torch.no_grad()
def recompute_bn_stats(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int = _DEFAULT_NUM_BATCHES,
    forward_fn: ForwardFn | None = None,
    *,
    num_samples: int | None = None,
    domain: int | None = None,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    skip_eval_layers: bool = False,
    device: torch.device | str | None = None,
    progress: bool | None = None,
) -> BNStatsReport:
    """Set every BN layer's running statistics to the exact statistics of the data (precise BN).

    Precise BN: He et al. 2016; Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm".
    One pass over at most ``num_batches`` batches (or until ``num_samples`` samples were seen)
    under ``torch.no_grad()``. Every ``_BatchNorm`` layer (``nn.BatchNorm*d``,
    ``SyncBatchNorm``, ``BatchRenorm*d``, ``DomainBatchNorm*d`` per domain) runs in train mode,
    so each normalises with batch statistics as in training, and records the count, mean and
    centred sum of squares of its inputs per batch; they are merged exactly (Chan et al. 1979)
    and written as

        running_mean = sum(x) / n,    running_var = sum((x - running_mean)**2) / (n - 1)

    over all ``n`` values per channel the layer saw (per domain for ``DomainBatchNorm``, where a
    domain that was not seen keeps its statistics). Every other module is put in eval mode for
    the pass (dropout off), because the statistics are meant for inference, where those modules
    are in eval mode too; train-mode dropout would inflate the variances (Li et al. 2019).
    Under ``torch.distributed`` (initialised) the moments are all-reduced in float64: every
    rank must call this (with its own shard; batch counts may differ), and all end with
    identical buffers equal to one process seeing every rank's batches. Layer sync
    (``sync=True`` / a ``process_group`` on this package's layers, torch's ``SyncBatchNorm``)
    is off for the pass, so no collective runs per batch and ranks with different numbers of
    batches never wait for each other; the one all-reduce comes at the end.

    ``domain=k`` is AdaBN (Li et al. 2016, "Revisiting Batch Normalization for Practical Domain
    Adaptation"): adapt a trained model to a new domain from unlabeled data. Every batch is
    routed to domain ``k`` of every ``DomainBatchNorm`` (whatever ids the forward passes), only
    those domains are recomputed, and every other layer keeps its buffers and runs as at
    inference (plain BN layers in eval mode, with their running statistics).

    The layers' own EMA updates do not leak: ``momentum`` is set for the pass (to 1 for exact
    ``nn.BatchNorm*d`` and ``DomainBatchNorm*d``, whose kernels then hand over the
    batch statistics they computed anyway, else to 0) and restored, with every module's
    ``training`` flag, ``num_batches_tracked`` (BatchRenorm's step counter) and, if anything
    fails, the original running statistics, in ``finally``, even when ``forward_fn`` raises.
    Weights are never touched. :func:`is_recomputing` is True throughout.

    Caveats: upstream BN layers use batch statistics, so a layer's statistics depend a little on
    the batch size (use batches like the training ones); ``BatchRenorm``'s ``r`` and ``d`` are
    taken against the running statistics as they were before the call (frozen for the pass).
    Per-batch moments are computed in fp32 (fp16/bf16 activations upcast) and merged in
    float64. Other stateful modules (e.g. a module keeping its own EMA in ``forward``) are run
    like in inference and may change. Under DDP ``num_batches`` and ``num_samples`` count per
    process.

    Args:
        model: the network; BN layers are found with ``model.named_modules()``.
        batches: any iterable of batches, including an endless iterator (``num_batches`` or
            ``num_samples`` caps it). On the model's device, or use ``device``.
        num_batches: how many batches to use at most. Default: ``200``.
        forward_fn: ``forward_fn(model, batch)`` runs one batch. Default: ``None``, meaning
            ``model(batch[0])`` for a tuple/list batch and ``model(batch)`` otherwise.
        num_samples: instead of ``num_batches``: stop once this many samples were seen (dim 0
            of the batch's first tensor); the batch that crosses it is used whole. Passing it
            together with ``num_batches`` raises. Default: ``None``.
        domain: recompute only this domain of every ``DomainBatchNorm`` (AdaBN, see above).
            Default: ``None`` (every layer, every domain seen).
        include: module-name patterns (``fnmatch``, as in ``convert_norms``; a pattern naming
            a module chooses every layer inside it): recompute only these layers. Default:
            ``None`` (all).
        exclude: module-name patterns of layers to leave out. Default: ``None``.
        skip_eval_layers: leave out the layers in eval mode (fvcore's rule). Default:
            ``False``. Layers left out keep their buffers bit for bit and run in eval mode
            for the pass, as at inference.
        device: move each batch (the tensors in tuples, lists and dicts) to this device.
            Default: ``None`` (batches used as they come).
        progress: show a progress bar on stderr (rich's where installed, else a plain
            counter). Default: ``None``, shown when stderr is a terminal.

    Returns:
        A :class:`BNStatsReport` with, per layer (per domain), the count and how far the old
        running statistics were from the new ones.

    Warns:
        UserWarning: when no BN layer has running statistics (the model is left alone and an
            empty report returned); when layers with ``track_running_stats=False`` are skipped
            (one warning naming them); when fewer batches than ``num_batches`` (fewer samples
            than ``num_samples``) came (the message says how many came and how many were asked
            for; what came is used); when no batch came at all or a layer/domain got fewer than
            two values per channel (its buffers are left untouched, nothing is raised, so DDP
            ranks stay in step).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, ``batches`` not iterable, ``num_batches``,
            ``num_samples`` or ``domain`` not an int, ``forward_fn`` not callable; a batch
            without a size under ``num_samples``; the default forward on a model whose
            ``forward`` needs more than the input (the message names ``forward_fn`` and
            ``precise_bn_forward``), also for a dict batch (raised before any buffer
            changes); ``include`` / ``exclude`` not patterns, ``skip_eval_layers`` not a
            bool, ``device`` not a device.
        ValueError: ``num_batches < 1``, ``num_samples < 1``, both given, ``domain < 0``, or
            ``domain`` given and the model has no ``DomainBatchNorm`` or one with too few
            domains (named).

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
        >>> recompute_bn_stats(model, data, num_samples=20).num_batches  # 8 + 8 + 8 >= 20
        3
    """
    _check_args(model, batches, num_batches, forward_fn, num_samples, domain)
    selection = _selection(domain, include, exclude, skip_eval_layers)
    target = _device(device)
    report = BNStatsReport(
        num_batches_requested=None if num_samples is not None else int(num_batches),
        num_samples_requested=num_samples,
    )
    collectors, train = _plan(model, report, selection)
    if not collectors:
        return report
    iterator = iter(batches)
    first = next(iterator, _END)
    if first is not _END and forward_fn is None:
        _check_default_input(first)  # before any buffer changes
    pending = iterator if first is _END else itertools.chain([first], iterator)
    with _recomputing(), _pass_state(model, train, collectors):
        with _progress(progress, report.num_batches_requested) as advance:
            _run_pass(model, pending, forward_fn, report, target, advance)
        for c in collectors:
            c.flush()
        merged = all_reduce_moments([c.moments for c in collectors])
        for c, moments in zip(collectors, merged, strict=True):
            c.moments = moments
        thin = [label for c in collectors for label in c.write(report)]
    _warn_after(report, thin)
    return report
