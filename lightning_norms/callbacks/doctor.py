"""``BatchNormDoctor``: a Lightning callback that checks, per BN layer, how BatchNorm is used."""

from __future__ import annotations

import math
import re
import weakref
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, Protocol, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler
from torch.utils.data.distributed import DistributedSampler
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_norms._diagnostics import (
    BatchSpread,
    all_reduce_max_,
    all_reduce_spreads,
    eval_mismatch,
    summarise_spread,
)
from lightning_norms._kinds import is_domain, is_small_batch_kind
from lightning_norms._moments import MomentAccumulator, Moments, all_reduce_moments
from lightning_norms.callbacks._checks import (
    ArgumentError,
    check_int_arg,
    check_no_torch_sync_batchnorm,
)
from lightning_norms.stats import is_recomputing

__all__ = ["BNFinding", "BatchNormDoctor", "BatchNormDoctorWarning"]

_TOO_FEW = "too few batches"  # status of a layer a check cannot judge yet (never "ok")
_EVAL_MODE = "eval mode"  # training status of a layer run in eval mode only (frozen)


class BatchNormDoctorWarning(UserWarning):
    """Category of every ``BatchNormDoctor`` finding (filter it with ``warnings`` as usual)."""


@dataclass(frozen=True)
class BNFinding:
    """One problem found by ``BatchNormDoctor``.

    Attributes:
        check: one of ``batch_spread``, ``calls_per_step``, ``batch_size``, ``redundant_bias``,
            ``eval_mean_shift``, ``eval_var_ratio``, ``shuffle``.
        layer: the BN layer's module path inside the LightningModule (e.g. ``body.1``); for
            ``shuffle`` the DataLoader (``train_dataloader``, ``train_dataloader[1]``, ...).
        value: the figure measured (NaN for ``shuffle``).
        threshold: the threshold it crossed (NaN for ``shuffle``).
        message: the warning text, with the remedy.
    """

    check: str
    layer: str
    value: float
    threshold: float
    message: str


def _dim_suffix(module: nn.Module) -> str:
    match = re.search(r"([123]d)$", type(module).__name__)
    return match.group(1) if match else "2d"


def _module_device(module: nn.Module, default: torch.device) -> torch.device:
    for t in (*module.buffers(), *module.parameters()):
        return t.device
    return default


def _nanmax(values: Tensor) -> Tensor:
    """Max over a 1-D tensor ignoring NaN; NaN when every entry is NaN."""
    best = torch.where(values.isnan(), -torch.inf, values).max()
    return torch.where(best == -torch.inf, torch.nan, best)


def _sync_world_size(module: nn.Module) -> int:
    """How many ranks a layer pools its batch statistics over (1 unless it syncs under DDP)."""
    syncs = isinstance(module, nn.SyncBatchNorm) or bool(getattr(module, "sync", False))
    group = getattr(module, "process_group", None)
    if not (syncs or group is not None):
        return 1
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1
    return torch.distributed.get_world_size(group)


def _loaders(obj: Any, name: str) -> list[tuple[str, Any]]:
    if isinstance(obj, Mapping):
        return [item for k, v in obj.items() for item in _loaders(v, f"{name}[{k!r}]")]
    if isinstance(obj, Sequence) and not isinstance(obj, str):
        return [item for i, v in enumerate(obj) for item in _loaders(v, f"{name}[{i}]")]
    return [(name, obj)]


def _unshuffled(loader: Any) -> bool:
    """Whether a DataLoader visibly reads its data in order (SequentialSampler, shuffle=False)."""
    if not isinstance(loader, DataLoader):
        return False
    sampler: Any = loader.sampler
    batch_sampler = loader.batch_sampler
    if batch_sampler is not None:
        if not isinstance(batch_sampler, BatchSampler):
            shuffle = getattr(batch_sampler, "shuffle", None)
            if isinstance(shuffle, bool):
                return not shuffle
            if not hasattr(batch_sampler, "sampler"):
                return False  # a custom batch sampler: its order is its own business
        sampler = batch_sampler.sampler
    if isinstance(sampler, SequentialSampler):
        return True
    return isinstance(sampler, DistributedSampler) and not sampler.shuffle


def _fmt(value: float, spec: str) -> str:
    return "n/a" if math.isnan(value) else format(value, spec)


def _epoch_training_done(trainer: pl.Trainer) -> bool:
    """Whether the batch that just ended was the epoch's last (its validation runs next)."""
    progress = trainer.fit_loop.epoch_loop.batch_progress
    max_steps_reached = trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps
    return (
        progress.is_last_batch
        or progress.current.ready == trainer.num_training_batches
        or max_steps_reached
    )


def _short_path(name: str, width: int) -> str:
    """``name`` shortened from the left at a dot to fit ``width``, never cut inside a part.

    Example:
        >>> _short_path("net.layer4.1.downsample.1", 18)
        '…1.downsample.1'
        >>> _short_path("net.layer4.1.bn2", 16)
        'net.layer4.1.bn2'
    """
    if len(name) <= width:
        return name
    parts = name.split(".")
    for i in range(1, len(parts)):
        tail = ".".join(parts[i:])
        if len(tail) < width:
            return "…" + tail
    return "…" + parts[-1]  # one part longer than the column: kept whole


def _short_paths(names: Sequence[str], width: int) -> list[str]:
    """:func:`_short_path` of each name; names whose short forms collide stay whole."""
    short = [_short_path(n, width) for n in names]
    seen = Counter(short)
    return [s if seen[s] == 1 else n for s, n in zip(short, names, strict=True)]


@dataclass
class _Row:
    """One layer's line of a check's table."""

    layer: str
    cells: list[str]
    status: str  # "ok", too few batches, eval mode, or the failed columns
    severity: float  # how far past its threshold the worst failed figure is (0: none failed)


_STATUS_WIDTH = 15  # the status column's width budget (wider statuses wrap at ", ")
_SUMMARY_ROWS = 6  # flagged layers a summary table shows (the worst first)


def _layer_width(headers: Sequence[str], rows: Sequence[_Row], width: int) -> int:
    """Columns left for the layer path in a ``width``-column table of these figure columns."""
    used = 1 + _STATUS_WIDTH + 3
    for i, header in enumerate(headers):
        used += 3 + max(*(len(w) for w in header.split("\n")), *(len(r.cells[i]) for r in rows))
    return max(width - used, 12)


def _counts(rows: Sequence[_Row], shown: int) -> str:
    """``20 BN layers: 9 flagged (the worst 6 shown), 9 ok, 2 too few batches``."""
    flagged = sum(r.severity > 0 for r in rows)
    kinds = {"ok": 0, _TOO_FEW: 0, _EVAL_MODE: 0}
    for r in rows:
        if r.status in kinds:
            kinds[r.status] += 1
    parts = [f"{flagged} flagged"] if flagged else []
    if flagged > shown:
        parts[0] += f" (the worst {shown} shown)"
    parts += [f"{n} {kind}" for kind, n in kinds.items() if n]
    return f"{len(rows)} BN layer{'s' if len(rows) != 1 else ''}: " + ", ".join(parts)


def _console() -> Any:
    """A rich console, or ``None`` without rich (the tables then go through logging)."""
    try:
        from rich.console import Console
    except ImportError:
        return None
    return Console()


def _plain_table(headers: list[str], cells: list[list[str]]) -> list[str]:
    columns = ["layer", *(h.replace("/\n", "/").replace("\n", " ") for h in headers), "status"]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = [columns, *cells]
    return ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in lines]


def _rich_table(
    title: str, caption: str, headers: list[str], rows: list[_Row], cells: list[list[str]]
) -> Any:
    from rich import box
    from rich.table import Table

    table = Table(
        title=title, caption=caption, box=box.SIMPLE_HEAD, show_edge=False,
        title_justify="left", caption_justify="left",
    )  # fmt: skip
    table.add_column("layer", no_wrap=True)
    for header in headers:
        table.add_column(header, justify="right", no_wrap=True)
    table.add_column("status", min_width=_STATUS_WIDTH)
    styles = {"ok": None, _TOO_FEW: "yellow", _EVAL_MODE: "dim"}
    for row, line in zip(rows, cells, strict=True):
        table.add_row(*line, style=styles.get(row.status, "bold red"))
    return table


@rank_zero_only
def _print_report(
    title: str, headers: list[str], rows: list[_Row], caption: str, summary: bool
) -> None:
    """One check's table (``summary``: the flagged layers only, the worst first, and a count of
    the rest) through a rich console, or as plain text through logging without rich."""
    console = _console()
    shown = rows
    if summary:
        flagged = sorted((r for r in rows if r.severity > 0), key=lambda r: -r.severity)
        shown = flagged[:_SUMMARY_ROWS]
    counts = _counts(rows, len(shown))
    if not shown:
        if console is None:
            rank_zero_info(f"{title} {counts}.")
        else:
            console.print(f"{title} {counts}.")
        return
    width = _layer_width(headers, shown, console.width if console is not None else 80)
    names = [r.layer for r in rows]
    short = dict(zip(names, _short_paths(names, width), strict=True))
    cells = [[short[r.layer], *r.cells, r.status] for r in shown]
    if console is None:
        rank_zero_info("\n".join([title, *_plain_table(headers, cells), caption, counts]))
    else:
        console.print(_rich_table(title, f"{caption}\n{counts}", headers, shown, cells))


class _ResolvesDomain(Protocol):
    """A grouped BN layer (``_Probe.grouped``): a domain layer, with ``resolve_domain``."""

    def resolve_domain(self, x: Tensor, domain: Any = None, /) -> Tensor: ...


class _Probe:
    """Hook state of one BN layer: accumulators for the current check."""

    def __init__(self, name: str, module: _BatchNorm) -> None:
        self.name = name
        self.module = module
        self.grouped = is_domain(module)
        self.num_groups = int(getattr(module, "num_domains", 1)) if self.grouped else 1
        self.spread: BatchSpread | None = None
        self.moments: MomentAccumulator | None = None
        self.calls = 0
        self.max_calls = 0
        self.max_batch = 0
        self.train_calls = 0
        self.eval_calls = 0  # eval-mode calls during training (a frozen layer)
        self.biased_calls = 0
        self.bias_source = ""
        self.step_calls: Tensor | None = None
        self.max_group_calls: Tensor | None = None
        self.max_group_batch: Tensor | None = None
        self.figures: dict[str, Tensor] = {}  # per-group inputs of the figures, see `gather_*`

    def reset_train(self, device: torch.device) -> None:
        c = self.module.num_features
        self.spread = BatchSpread(self.num_groups, c, device)
        self.calls = self.max_calls = self.max_batch = 0
        self.train_calls = self.eval_calls = self.biased_calls = 0
        self.bias_source = ""
        if self.grouped:
            self.step_calls = torch.zeros(self.num_groups, device=device)
            self.max_group_calls = torch.zeros(self.num_groups, device=device)
            self.max_group_batch = torch.zeros(self.num_groups, device=device)

    def reset_eval(self, device: torch.device) -> None:
        self.moments = MomentAccumulator(self.num_groups, self.module.num_features, device)

    def groups(self, x: Tensor, args: tuple, kwargs: dict[str, Any]) -> Tensor | None:
        domain = kwargs.get("domain", args[1] if len(args) > 1 else None)
        return cast(_ResolvesDomain, self.module).resolve_domain(x, domain)

    def record_train(self, x: Tensor, groups: Tensor | None, bias_source: str | None) -> None:
        assert self.spread is not None
        self.train_calls += 1
        if bias_source is not None:
            self.biased_calls += 1
            self.bias_source = bias_source
        if groups is None:
            self.spread.update(x)
            self.calls += 1
            self.max_batch = max(self.max_batch, x.shape[0])
            return
        cnt = self.spread.update(x, groups)
        assert cnt is not None and self.step_calls is not None and self.max_group_batch is not None
        self.step_calls.add_(cnt > 0)
        torch.maximum(self.max_group_batch, cnt, out=self.max_group_batch)

    def end_step(self) -> None:
        if self.grouped:
            assert self.step_calls is not None and self.max_group_calls is not None
            torch.maximum(self.max_group_calls, self.step_calls, out=self.max_group_calls)
            self.step_calls.zero_()
        else:
            self.max_calls = max(self.max_calls, self.calls)
            self.calls = 0

    def gather_train(self, step: tuple[Tensor, Tensor, Tensor], min_batches: int) -> None:
        """The training figures' inputs, from accumulators already merged over ranks."""
        assert self.spread is not None
        spread = summarise_spread(self.spread.ratio(), self.spread.num_batches, min_batches)
        calls, batch, biased = step
        self.figures = {"spread": spread, "calls": calls, "batch": batch, "biased": biased}

    def gather_eval(self, moments: Moments, warmup: int) -> None:
        """The eval figures' inputs; groups tracked for fewer than ``warmup`` batches are NaN."""
        module = self.module
        assert module.running_mean is not None and module.running_var is not None
        count = moments.n
        tracked = module.num_batches_tracked
        if warmup and tracked is not None:
            count = torch.where(tracked.reshape(-1) >= warmup, count, 0.0)
        shift, lvr = eval_mismatch(
            count, moments.mean, moments.var(), module.running_mean, module.running_var, module.eps
        )
        self.figures = {"mean_shift": shift, "log_var_ratio": lvr}

    def step_figures(self) -> tuple[Tensor, Tensor, Tensor]:
        """Per group: most calls per step, most samples per call; the biased-input fraction."""
        device = self.spread.within.device if self.spread is not None else None
        biased = torch.tensor([self.biased_calls / max(self.train_calls, 1)], device=device)
        if self.grouped:
            assert self.max_group_calls is not None and self.max_group_batch is not None
            return self.max_group_calls, self.max_group_batch, biased
        return (
            torch.tensor([float(self.max_calls)], device=device),
            torch.tensor([float(self.max_batch)], device=device),
            biased,
        )


# ------------------------------------------------------------------- the checks, as a table
def _spread_text(probe: _Probe, value: float, threshold: float) -> str:
    return (
        "sees training batches that are not a fair sample of the data: the batch means of its "
        f"input vary {value:.1f}x more from batch to batch than random batches would "
        f"(threshold {threshold:g}). Shuffle the training data and put every source in every "
        "batch (`lightning_norms.data.MixingBatchSampler`), or give each source its own "
        f"statistics (`lightning_norms.DomainBatchNorm{_dim_suffix(probe.module)}`)."
    )


def _calls_text(probe: _Probe, value: float, threshold: float) -> str:
    per = " for the same domain" if probe.grouped else ""
    return (
        f"ran {int(value)} times{per} in one training step (threshold {threshold:g}): towers "
        "sharing BatchNorm fed separate batches are each normalised with their own batch "
        "statistics, while the running statistics used at eval average them. Feed one mixed "
        "batch (`lightning_norms.data.MixingBatchSampler`; `lightning_norms.data.mix_real_fake` "
        "for GAN discriminators) or give each source its own statistics with "
        f"`lightning_norms.DomainBatchNorm{_dim_suffix(probe.module)}`."
    )


def _batch_text(probe: _Probe, value: float, threshold: float) -> str:
    per = " for the same domain" if probe.grouped else ""
    return (
        f"normalises only {int(value)} samples per call{per} on this device (threshold "
        f"{threshold:g}): its batch statistics are noisy. Use "
        f"`lightning_norms.BatchRenorm{_dim_suffix(probe.module)}`, a batch-independent norm "
        "(`lightning_norms.convert_norms(model, 'group')` for GroupNorm), or synchronise the "
        "statistics across devices with `Trainer(plugins=[lightning_norms.NormSync()])`."
    )


def _bias_text(probe: _Probe, value: float, threshold: float) -> str:
    return (
        f"gets its input straight from `{probe.bias_source}` ({value:.0%} of its training "
        "calls), whose bias the normalisation cancels: BN subtracts the batch mean of every "
        "channel, a per-channel constant included (the BN paper drops it). Build "
        f"`{probe.bias_source}` with `bias=False`; the BN layer's own bias is the shift that "
        "trains."
    )


def _eval_remedy(probe: _Probe) -> str:
    return (
        "the running statistics lag behind the weights or the validation data differ from "
        "training. Recompute exact statistics after training with "
        "`lightning_norms.callbacks.PreciseBN` (or `lightning_norms.stats.recompute_bn_stats`); "
        "if sources differ, give each its own statistics with "
        f"`lightning_norms.DomainBatchNorm{_dim_suffix(probe.module)}`."
    )


def _shift_text(probe: _Probe, value: float, threshold: float) -> str:
    return (
        f"is evaluated with a running mean {value:.2f} running standard deviations away from "
        f"the mean of its validation inputs (threshold {threshold:g}): {_eval_remedy(probe)}"
    )


def _var_text(probe: _Probe, value: float, threshold: float) -> str:
    return (
        "is evaluated with a running variance that differs from the variance of its validation "
        f"inputs by a mean |log ratio| of {value:.2f} (about x{math.exp(value):.1f}; threshold "
        f"{threshold:g}): {_eval_remedy(probe)}"
    )


# figures: one 0-d tensor per probe (NaN: cannot be judged yet), from the probe's gathered
# state (``_Probe.gather_train`` / ``gather_eval``, merged over ranks); read with one host sync
def _spread_figure(probe: _Probe) -> Tensor:
    return _nanmax(probe.figures["spread"])


def _calls_figure(probe: _Probe) -> Tensor:
    return probe.figures["calls"].max()


def _batch_figure(probe: _Probe) -> Tensor:
    """The smallest non-empty batch a call normalised (times the ranks it syncs over)."""
    batch = probe.figures["batch"]
    smallest = torch.where(batch > 0, batch, torch.inf).min()  # no boolean indexing: no sync
    return torch.where(smallest.isinf(), torch.nan, smallest) * _sync_world_size(probe.module)


def _bias_figure(probe: _Probe) -> Tensor:
    return probe.figures["biased"].max()


def _shift_figure(probe: _Probe) -> Tensor:
    return _nanmax(probe.figures["mean_shift"])


def _var_figure(probe: _Probe) -> Tensor:
    return _nanmax(probe.figures["log_var_ratio"])


@dataclass(frozen=True)
class _Check:
    """One per-layer check: its figure, how it is judged, what the finding says.

    The table below drives everything: :meth:`BatchNormDoctor._report` computes every check's
    ``figure`` of a phase for every layer, judges each against its threshold (one judge) and
    prints one table per phase (one writer).
    """

    name: str
    phase: Literal["train", "eval"]
    figure: Callable[[_Probe], Tensor]
    column: str  # the figure's column in the table
    spec: str  # format of the figure in the table
    threshold: str  # the BatchNormDoctor attribute that holds the threshold
    below: bool  # flag figures below the threshold (else above it)
    remedy: Callable[[_Probe, float, float], str]  # the finding's text, remedy included
    header: str  # the column's header in the table, on two lines
    hint: str  # the remedy in a few words (the summary's warning)
    exempt: Callable[[nn.Module], bool] | None = None  # layers this check does not judge

    def severity(self, value: float, threshold: float) -> float:
        """How far ``value`` is past ``threshold`` (a ratio above 1 when it fails the check)."""
        if self.below:
            return threshold / max(value, 1e-12)
        return value / threshold if threshold > 0 else (math.inf if value > 0 else 0.0)

    def worst(self, values: Sequence[float]) -> float:
        """The worst of several layers' figures (NaN when none was judged)."""
        judged = [v for v in values if not math.isnan(v)]
        if not judged:
            return math.nan
        return min(judged) if self.below else max(judged)


_EVAL_HINT = "recompute exact statistics (`PreciseBN`); `DomainBatchNorm` if sources differ"
_CHECK_TABLE = (
    _Check(
        "batch_spread", "train", _spread_figure, "batch spread", ".2f", "_max_spread", False,
        _spread_text, "batch\nspread",
        "shuffle, and put every source in every batch (`MixingBatchSampler`)",
    ),
    _Check(
        "calls_per_step", "train", _calls_figure, "calls/step", ".0f", "_max_calls", False,
        _calls_text, "calls/\nstep",
        "feed one mixed batch (`MixingBatchSampler`, `mix_real_fake`) or `DomainBatchNorm`",
    ),
    _Check(
        "batch_size", "train", _batch_figure, "samples/call", ".0f", "_min_batch", True,
        _batch_text, "samples/\ncall", "use `BatchRenorm`, GroupNorm, or `NormSync` on DDP",
        exempt=is_small_batch_kind,  # designed for small batches
    ),
    _Check(
        "redundant_bias", "train", _bias_figure, "biased input", ".2f", "_max_bias", False,
        _bias_text, "biased\ninput", "build the layer feeding it with `bias=False`",
    ),
    _Check(
        "eval_mean_shift", "eval", _shift_figure, "mean shift", ".3f", "_max_shift", False,
        _shift_text, "mean\nshift", _EVAL_HINT,
    ),
    _Check(
        "eval_var_ratio", "eval", _var_figure, "log var ratio", ".3f", "_max_lvr", False,
        _var_text, "log var\nratio", _EVAL_HINT,
    ),
)  # fmt: skip
_QUESTIONS = {
    "train": "are training batches fair samples?",
    "eval": "do running stats match the validation data?",
}


_VERBOSITIES = ("summary", "full", "quiet")
_LOG_FIGURES = ("worst", "all", "none")


def _check_arguments(ints: dict[str, Any], floats: dict[str, Any], choices: dict[str, Any]) -> None:
    """Positive integers, positive finite thresholds and the named choices, by argument name."""
    for name, value in ints.items():
        check_int_arg(name, value, 1)
    for name, value in floats.items():
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value <= 0
        ):
            raise ArgumentError(f"`{name}` should be a positive finite number, got {value!r}.")
    allowed = {"verbosity": _VERBOSITIES, "log_figures": _LOG_FIGURES}
    for name, value in choices.items():
        if value not in allowed[name]:
            options = " or ".join(repr(v) for v in allowed[name])
            raise ArgumentError(f"`{name}` should be {options}, got {value!r}.")


class BatchNormDoctor(Callback):
    r"""Checks every BatchNorm layer for the pitfalls that make BN train or evaluate badly.

    BatchNorm (Ioffe & Szegedy 2015, arXiv:1502.03167) assumes two things every BN user must check:
    is each training batch a fair sample of the data, and do the running statistics used at test
    time match the data? This callback answers both, per BN layer (any
    ``torch.nn.modules.batchnorm._BatchNorm``: torch's, ``SyncBatchNorm``, ``BatchRenorm*d``,
    ``DomainBatchNorm*d``), with forward pre-hooks that reduce each call to per-channel figures on
    the device (no host sync per step), plus common causes. The training checks:

    ``batch_spread`` — between-batch vs within-batch spread of the activation means.
        With ``m`` the per-sample channel means, ``mu_t`` their batch mean over call ``t``,
        ``s2_t / N_t`` the variance a mean of ``N_t`` i.i.d. samples would have and
        ``D_k = mean_t (mu_t - mu_{t-k})^2 / 2``: ``R = (2 D_1 - D_2) / mean_t (s2_t / N_t)``,
        the median over channels, the max over domains. The lag-2 term cancels the drift of the
        activations while the weights train, so
        shuffled batches give ``R ~ 1`` however fast the weights move; batches whose source
        changes from call to call (towers fed alternating domains, real/fake GAN batches,
        randomly ordered single-class batches) give ``R >> 1``. The first BN layer on a path
        is where it shows: every BN re-centres each batch, so layers behind it see batch means
        near-constant (``R << 1``). A class-sorted data set read in order changes the batch
        composition as slowly as drift does: the ``shuffle`` check and the eval checks (running
        statistics of the last class seen) catch that. Judged with at least ``min_batches``
        training calls.
    ``calls_per_step`` — how often a layer runs in train mode within one training step (per
        domain for ``DomainBatchNorm``). More than one means towers sharing BN fed separate
        batches: each is normalised with its own batch statistics, while the running
        statistics used at eval average them (the MNIST/SVHN pitfall).
    ``batch_size`` — the most samples one call normalised together on this device (per domain
        for ``DomainBatchNorm``; times the group size for layers that sync their statistics).
        Samples, not pixels, are the independent units. ``BatchRenorm*d`` layers, designed for
        small batches, are exempt.
    ``redundant_bias`` — the fraction of training calls whose input is the very output tensor
        of a ``Linear`` / ``Conv*d`` with a bias (seen by forward hooks: the BN input *is* that
        tensor, unmodified since, so an inplace ReLU in between or a reshape clears it). BN
        subtracts the batch mean per channel, so ``BN(Wx + b) = BN(Wx)``: the bias never
        reaches the output (Ioffe & Szegedy 2015 drop it). Flagged above 0.

    The eval checks (``eval_mean_shift`` / ``eval_var_ratio``, at each validation run) take the
    exact per-channel mean ``mu`` and variance ``v`` of every eval-mode input over the whole
    validation epoch (per domain for ``DomainBatchNorm``, merged over ranks) and compare them
    with the running statistics the layer normalises with: ``|mu - running_mean| /
    sqrt(running_var + eps)`` and ``|log((v + eps) / (running_var + eps))|``, averaged over
    channels: the mean and log variance of the layer's normalised eval output, 0 when they
    match. They flag EMA lag (tiny momentum, fast-moving weights) and train/validation
    mismatch. Sanity-check validation is skipped. Finally ``shuffle``: the training DataLoader
    reads in order (``SequentialSampler``, or a sampler with ``shuffle=False``); warned once.

    Each check epoch reports once per question on rank zero, the training one first (right after
    the epoch's last training batch, before its validation), then the eval one (after each
    validation run), through a rich console, or through Lightning's logging
    (``rank_zero_info``) without rich. ``verbosity="summary"`` (default) prints a short table of
    the layers that need attention (at most 8, the furthest past a threshold first) and a line
    counting the rest, or that line alone when none does, and one ``rank_zero_warn`` (category
    :class:`BatchNormDoctorWarning`) per failed check, naming its worst layer, the figure, the
    remedy this package offers and the other layers it flagged; ``"full"`` prints every layer
    and warns once per finding; ``"quiet"`` prints and warns nothing (the findings and logged
    figures stay). Tables fit the console's width (80 columns at least): module paths are
    shortened from the left at a dot (``…layer4.1.bn2``), never inside a name. A layer a check
    cannot judge yet shows ``too few batches``, never ``ok``; one that ran in eval mode only
    during training (frozen, e.g. by ``FreezeBatchNorm``) shows ``eval mode`` in the training
    table and is judged by the eval checks. :attr:`findings` holds every finding of the last
    check epoch (or ``trainer.validate`` run), whatever the verbosity. Under DDP the figures
    are merged over ranks (sums for the statistics, maxima for counts), so every rank reports
    the same findings.

    The forwards of :func:`lightning_norms.stats.recompute_bn_stats` (``PreciseBN``) are
    ignored, whatever the callback order. Gradient checkpointing that re-runs a BN layer in
    train mode counts as a second call (it also updates its running statistics twice). Hooks
    are installed at the start of ``fit`` / ``validate`` and removed at teardown.

    Args:
        check_every_n_epochs: check during every n-th training epoch and its validation
            (default ``1``); ``trainer.validate`` always checks.
        max_batch_spread: flag ``R`` above this (default ``4.0``; shuffled data gives about 1;
            two alternating sources give ``R = 1 + N delta^2``, above 4 once their means differ
            by ``delta > sqrt(3 / N)`` per-sample standard deviations at batch size ``N``).
        max_calls_per_step: flag layers called more often per training step (default ``1``).
        min_batch_size: flag layers normalising fewer samples per call (default ``16``).
        max_mean_shift: flag an eval mean shift above this, in running standard deviations
            (default ``0.75``; clean CNN runs with Adam or SGD up to lr 0.5 stayed below 0.5).
        max_log_var_ratio: flag a mean ``|log variance ratio|`` above this (default ``1.0``, a
            factor of about 2.7; the same clean runs stayed below 0.85).
        min_batches: fewest training calls (per domain) before ``batch_spread`` is judged
            (default ``20``; below it chance alone can exceed the threshold).
        warmup_batches: during ``fit``, the eval checks skip a layer (per domain) whose
            ``num_batches_tracked`` is below this (default ``30``): with the default momentum
            0.1 its running statistics still hold ``0.9^n`` of their initial values, an EMA
            warm-up rather than a finding. A layer whose momentum is too small to forget them
            in that many batches is flagged. ``trainer.validate`` judges every layer.
        verbosity: ``"summary"`` (default), ``"full"`` or ``"quiet"``: what is printed and
            warned, see above.
        log_figures: ``"worst"`` (default) logs one figure per check, its worst layer's, as
            ``bn_doctor/<check>`` (the largest, the smallest for ``batch_size``); ``"all"``
            logs every layer's as ``bn_doctor/<check>/<layer>``; ``"none"`` logs nothing.
            The checks: ``batch_spread``, ``calls_per_step``, ``batch_size``,
            ``redundant_bias``, ``eval_mean_shift``, ``eval_var_ratio``.

    Raises:
        ValueError: on a non-positive ``check_every_n_epochs``, ``max_calls_per_step``,
            ``min_batch_size``, ``min_batches`` or ``warmup_batches``, a non-positive or
            non-finite ``max_batch_spread``, ``max_mean_shift`` or ``max_log_var_ratio``, or
            an unknown ``verbosity`` or ``log_figures``; the message names the argument (also
            a Lightning ``MisconfigurationException``, like the other callbacks' errors).
        ValueError: in ``setup``, with ``Trainer(sync_batchnorm=True)``, which would replace
            this package's layers with ``torch.nn.SyncBatchNorm``; use
            ``plugins=[lightning_norms.NormSync()]``.

    Example:
        >>> doctor = BatchNormDoctor(min_batch_size=8, verbosity="full", log_figures="all")
        >>> doctor.findings
        []
        >>> # trainer = Trainer(callbacks=[doctor]); trainer.fit(model)
    """

    def __init__(
        self,
        check_every_n_epochs: int = 1,
        max_batch_spread: float = 4.0,
        max_calls_per_step: int = 1,
        min_batch_size: int = 16,
        max_mean_shift: float = 0.75,
        max_log_var_ratio: float = 1.0,
        min_batches: int = 20,
        warmup_batches: int = 30,
        verbosity: Literal["summary", "full", "quiet"] = "summary",
        log_figures: Literal["worst", "all", "none"] = "worst",
    ) -> None:
        _check_arguments(
            {
                "check_every_n_epochs": check_every_n_epochs,
                "max_calls_per_step": max_calls_per_step,
                "min_batch_size": min_batch_size,
                "min_batches": min_batches,
                "warmup_batches": warmup_batches,
            },
            {
                "max_batch_spread": max_batch_spread,
                "max_mean_shift": max_mean_shift,
                "max_log_var_ratio": max_log_var_ratio,
            },
            {"verbosity": verbosity, "log_figures": log_figures},
        )
        self._verbosity = verbosity
        self._log_figures = log_figures
        self._every = check_every_n_epochs
        self._max_spread = float(max_batch_spread)
        self._max_calls = max_calls_per_step
        self._min_batch = min_batch_size
        self._max_bias = 0.0
        self._max_shift = float(max_mean_shift)
        self._max_lvr = float(max_log_var_ratio)
        self._min_batches = min_batches
        self._warmup = warmup_batches
        self.findings: list[BNFinding] = []
        self._probes: list[_Probe] = []
        self._handles: list[RemovableHandle] = []
        # this step's outputs of biased Linear/Conv layers: id -> (tensor ref, version, name)
        self._biased_outputs: dict[int, tuple[weakref.ref[Tensor], int, str]] = {}
        self._phase: str | None = None
        self._phase_before_val: str | None = None
        self._warned_shuffle: set[str] = set()

    # ----------------------------------------------------------------- hooks on the BN layers
    def _install(self, pl_module: pl.LightningModule) -> None:
        if self._handles:
            return
        for name, module in pl_module.named_modules():
            if isinstance(module, _BatchNorm):
                probe = _Probe(name, module)
                hook = partial(self._pre_hook, probe)
                self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
                self._probes.append(probe)
            elif isinstance(module, (nn.Linear, _ConvNd)) and module.bias is not None:
                self._handles.append(module.register_forward_hook(partial(self._bias_hook, name)))

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._probes = []
        self._biased_outputs.clear()
        self._phase = None

    def _bias_hook(self, name: str, module: nn.Module, args: tuple, output: Any) -> None:
        if self._phase == "train" and isinstance(output, Tensor) and not is_recomputing():
            self._biased_outputs[id(output)] = (weakref.ref(output), output._version, name)

    def _bias_source(self, x: Tensor) -> str | None:
        """The biased layer whose unmodified output tensor ``x`` is, if any."""
        entry = self._biased_outputs.get(id(x))
        if entry is None:
            return None
        ref, version, name = entry
        return name if ref() is x and x._version == version else None

    def _pre_hook(
        self, probe: _Probe, module: _BatchNorm, args: tuple, kwargs: dict[str, Any]
    ) -> None:
        phase = self._phase
        if phase is None or is_recomputing() or not args or not isinstance(args[0], Tensor):
            return
        if args[0].dim() < 2:
            return
        if module.training != (phase == "train"):
            if phase == "train":
                probe.eval_calls += 1
            return
        if phase == "val" and module.running_mean is None:
            return
        x = args[0].detach()
        groups = None
        if probe.grouped:
            try:
                groups = probe.groups(x, args, kwargs)
            except ValueError:
                return  # the layer's own forward raises the same error
        if phase == "train":
            probe.record_train(x, groups, self._bias_source(args[0]))
        else:
            assert probe.moments is not None
            probe.moments.update(x, groups)

    def _is_check_epoch(self, trainer: pl.Trainer) -> bool:
        return (trainer.current_epoch + 1) % self._every == 0

    # ------------------------------------------------------------------- Lightning hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_no_torch_sync_batchnorm(trainer, "BatchNormDoctor")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install(pl_module)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install(pl_module)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._is_check_epoch(trainer):
            self._phase = None
            return
        self.findings = []
        for probe in self._probes:
            probe.reset_train(_module_device(probe.module, pl_module.device))
        self._phase = "train"
        self._check_shuffle(trainer)

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._phase != "train":
            return
        for probe in self._probes:
            probe.end_step()
        self._biased_outputs.clear()
        if _epoch_training_done(trainer):  # the training table comes before validation's
            self._phase = None
            self._report("train", trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._phase == "train":  # an epoch cut short without a last-batch signal
            self._phase = None
            self._report("train", trainer, pl_module)

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._phase_before_val = self._phase
        validating = trainer.state.fn == "validate"
        if trainer.sanity_checking or not (validating or self._is_check_epoch(trainer)):
            self._phase = None
            return
        if validating:
            self.findings = []
        for probe in self._probes:
            probe.reset_eval(_module_device(probe.module, pl_module.device))
        self._phase = "val"

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._phase == "val":
            self._report("eval", trainer, pl_module)
        self._phase = self._phase_before_val

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._remove()

    # ---------------------------------------------------------------------------- checks
    def _check_shuffle(self, trainer: pl.Trainer) -> None:
        for name, loader in _loaders(trainer.train_dataloader, "train_dataloader"):
            if not _unshuffled(loader):
                continue
            message = (
                f"BatchNormDoctor: the training DataLoader `{name}` does not shuffle "
                "(SequentialSampler / shuffle=False): every BatchNorm layer then normalises "
                "batches that are not a random sample of the data. Pass `shuffle=True`, or "
                "build mixed batches with `lightning_norms.data.MixingBatchSampler`."
            )
            self.findings.append(BNFinding("shuffle", name, math.nan, math.nan, message))
            if name not in self._warned_shuffle and self._verbosity != "quiet":
                self._warned_shuffle.add(name)
                rank_zero_warn(message, category=BatchNormDoctorWarning)

    def _judge(self, check: _Check, probe: _Probe, value: float) -> float:
        """Judge one figure: its severity (> 0: a finding, recorded), 0 if ok, NaN if unjudged."""
        if math.isnan(value):
            return math.nan
        threshold = float(getattr(self, check.threshold))
        exempt = check.exempt is not None and check.exempt(probe.module)
        if exempt or not (value < threshold if check.below else value > threshold):
            return 0.0
        message = (
            f"BatchNormDoctor: BN layer `{probe.name}` {check.remedy(probe, value, threshold)}"
        )
        self.findings.append(BNFinding(check.name, probe.name, value, threshold, message))
        return check.severity(value, threshold)

    def _row(self, checks: list[_Check], probe: _Probe, values: list[float], phase: str) -> _Row:
        """One layer's table row, its checks judged."""
        severities = [self._judge(c, probe, v) for c, v in zip(checks, values, strict=True)]
        failed = [c.column for c, s in zip(checks, severities, strict=True) if s > 0]
        if phase == "train" and probe.eval_calls > 0 and probe.train_calls == 0:
            status = _EVAL_MODE
        elif failed:
            status = ", ".join(failed)
        else:
            status = _TOO_FEW if any(math.isnan(s) for s in severities) else "ok"
        cells = [_fmt(v, c.spec) for c, v in zip(checks, values, strict=True)]
        return _Row(probe.name, cells, status, max((s for s in severities if s > 0), default=0.0))

    def _log(
        self,
        checks: list[_Check],
        probes: list[_Probe],
        figures: list[list[float]],
        pl_module: pl.LightningModule,
    ) -> None:
        """``log_figures="worst"``: ``bn_doctor/<check>`` (the worst layer); ``"all"``:
        ``bn_doctor/<check>/<layer>`` for every layer."""
        values: dict[str, float] = {}
        for i, check in enumerate(checks):
            column = [row[i] for row in figures]
            if self._log_figures == "worst":
                values[f"bn_doctor/{check.name}"] = check.worst(column)
            elif self._log_figures == "all":
                for probe, value in zip(probes, column, strict=True):
                    values[f"bn_doctor/{check.name}/{probe.name}"] = value
        for name, value in values.items():
            if not math.isnan(value):
                pl_module.log(
                    name, value, on_step=False, on_epoch=True, sync_dist=True, batch_size=1
                )

    def _warn(self, checks: list[_Check], rows: list[_Row], epoch: int) -> None:
        """``full``: one warning per finding; ``summary``: one per check epoch and question,
        counting the flagged layers, naming the worst, with the remedies in a few words."""
        found = [f for f in self.findings if f.check in {c.name for c in checks}]
        if self._verbosity == "quiet" or not found:
            return
        if self._verbosity == "full":
            for finding in found:
                rank_zero_warn(finding.message, category=BatchNormDoctorWarning)
            return
        failed = [c for c in checks if any(f.check == c.name for f in found)]
        worst = max(rows, key=lambda r: r.severity)
        hints = "; ".join(dict.fromkeys(c.hint for c in failed))
        flagged = sum(r.severity > 0 for r in rows)
        rank_zero_warn(
            f"BatchNormDoctor: {flagged} of {len(rows)} BN layers flagged at epoch {epoch} "
            f"({', '.join(c.column for c in failed)}; worst `{worst.layer}`): {hints}. "
            "`verbosity='full'` or `.findings` explains each.",
            category=BatchNormDoctorWarning,
        )

    def _report(
        self, phase: Literal["train", "eval"], trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> None:
        """Gather one phase's figures, log and judge every check of the phase, report it."""
        checks = [c for c in _CHECK_TABLE if c.phase == phase]
        names = {c.name for c in checks}
        self.findings = [f for f in self.findings if f.check not in names]
        probes = self._gather(phase, trainer)
        if not probes:
            return
        figures = torch.stack(
            [torch.stack([c.figure(p).float() for c in checks]) for p in probes]
        ).tolist()  # the one host sync of the check
        self._log(checks, probes, figures, pl_module)
        rows = [self._row(checks, p, v, phase) for p, v in zip(probes, figures, strict=True)]
        if self._verbosity != "quiet":
            self._print(phase, checks, rows, trainer.current_epoch)
        self._warn(checks, rows, trainer.current_epoch)

    def _print(self, phase: str, checks: list[_Check], rows: list[_Row], epoch: int) -> None:
        limits = [
            f"{c.column} {'<' if c.below else '>'} {getattr(self, c.threshold):g}" for c in checks
        ]
        _print_report(
            f"BatchNormDoctor, epoch {epoch}: {_QUESTIONS[phase]}",
            [c.header for c in checks],
            rows,
            "flagged: " + ", ".join(limits),
            summary=self._verbosity == "summary",
        )

    def _gather(self, phase: Literal["train", "eval"], trainer: pl.Trainer) -> list[_Probe]:
        """Merge the probes' accumulators over ranks; the probes the phase's checks judge."""
        if phase == "train":
            spreads = [p.spread for p in self._probes if p.spread is not None]
            all_reduce_spreads(spreads)
            steps = [p.step_figures() for p in self._probes]
            all_reduce_max_([t for figures in steps for t in figures])
            for probe, step in zip(self._probes, steps, strict=True):
                probe.gather_train(step, self._min_batches)
            return self._probes
        probes = [
            p for p in self._probes if p.moments is not None and p.module.running_var is not None
        ]
        merged = all_reduce_moments([cast(MomentAccumulator, p.moments).moments for p in probes])
        warmup = self._warmup if trainer.state.fn == "fit" else 0
        for probe, moments in zip(probes, merged, strict=True):
            probe.gather_eval(moments, warmup)
        return probes
