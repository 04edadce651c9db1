r"""
PreciseBN
^^^^^^^^^

A Lightning callback that replaces every BN layer's running statistics (an EMA that lags the
weights) with the exact population statistics of the data, at the end of training epochs and
of ``fit``, via :func:`lightning_norms.stats.recompute_bn_stats`.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import (
    Callback,
    RichProgressBar,
    StochasticWeightAveraging,
    TQDMProgressBar,
)
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.swa_utils import AveragedModel
from typing_extensions import override

from lightning_norms._batches import DEFAULT_NUM_BATCHES as _DEFAULT_NUM_BATCHES
from lightning_norms._batches import batch_size, default_forward, takes_one_input
from lightning_norms.callbacks._checks import check_int_arg, check_no_torch_sync_batchnorm
from lightning_norms.callbacks.freeze import FreezeBatchNorm
from lightning_norms.stats import BNStatsReport, ForwardFn, recompute_bn_stats

__all__ = ["PreciseBN"]

_LOADER_NAMES = ("train", "val")


class PreciseBN(Callback):
    r"""Recompute exact BN population statistics before validation and at the end of ``fit``.

    Precise BN (He et al. 2016; Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm"): the
    running statistics BN uses at inference are an EMA of batch statistics collected while the
    weights moved, so they lag the weights (badly with a high learning rate, a small
    ``momentum`` or few steps). This callback calls
    :func:`~lightning_norms.stats.recompute_bn_stats` (exact merged mean and unbiased variance
    over ``num_batches`` batches, or ``num_samples`` samples) at the end of every
    ``every_n_epochs``-th training epoch, right after its last training batch and therefore
    before that epoch's validation sees the model, and once more at the end of ``fit`` if the
    weights changed since. A stop in the middle of an epoch (``max_steps``) is not that epoch's
    end: the recompute then happens at the end of ``fit``, and a run resumed from a checkpoint
    taken there still recomputes at the epoch's real end.

    The batches come from a fresh iterator of the chosen loader (the training iterator is never
    touched), are converted and moved like training batches (the precision plugin's
    ``convert_input`` and the strategy's ``batch_to_device``, so ``transfer_batch_to_device``
    and the ``on_*_batch_transfer`` hooks apply) and run under the precision plugin's forward
    context. Batches of one sample (a loader's tail) are skipped: a BN layer in train mode
    cannot normalise one value per channel. Under DDP each rank uses its own shard (the
    loader's ``DistributedSampler``) and the sums are all-reduced, so all ranks end with
    identical buffers; ``num_batches`` / ``num_samples`` count per process (ranks may hold
    different numbers of batches: layer sync is off for the pass). Progress shows in
    the Trainer's progress bar (a ``PreciseBN`` bar under TQDM or Rich), and each recompute
    prints one line on rank zero (:meth:`~lightning_norms.stats.BNStatsReport.summary`:
    layers, batches, samples, largest mean and variance shift) above the bars, or through
    Lightning's logging when no bar shows. Logged:
    ``precise_bn/mean_shift`` and ``precise_bn/var_shift`` (see
    :class:`~lightning_norms.stats.BNStatsReport`). The latest report is ``last_report``; a
    summary of every run (``when``: ``"epoch_end"``/``"fit_end"``, ``epoch`` and ``step`` as the
    trainer counted them, ``num_batches``, ``num_samples``, ``mean_shift``, ``var_shift``) is
    kept in ``history``, which is saved in checkpoints with the callback's progress, so a
    resumed run continues where it left off.

    How a batch is run: ``forward_fn(model, batch)`` if given, else the LightningModule's
    ``precise_bn_forward(batch)`` if it defines one (route domains, unpack custom batches),
    else ``model(batch[0])`` for tuple/list batches and ``model(batch)`` otherwise; a dict
    batch then raises a ``TypeError`` naming ``forward_fn`` and ``precise_bn_forward``
    before any buffer changes.

    Weight averaging: every ``torch.optim.swa_utils.AveragedModel`` inside the LightningModule
    gets the exact statistics of its own (averaged) weights in the same pass, each batch run
    as ``forward_fn(averaged, batch)`` if ``forward_fn`` is given, else
    ``averaged(batch[0])`` / ``averaged(batch)`` (``torch.optim.swa_utils.update_bn`` would
    average per-batch variances instead, which is biased low). With Lightning's
    ``StochasticWeightAveraging`` the averaged weights end up in the module itself; this
    callback's end-of-fit recompute runs after that callback's ``on_train_end`` (it moves
    itself behind it in ``trainer.callbacks``), so the final statistics are those of the
    averaged weights whatever the order the callbacks were given in. The exact pass replaces
    SWA's own BN-update epoch (which averages per-batch variances): a fit with
    ``max_epochs=E`` runs ``E`` epochs, not ``E + 1``. With either kind of averaging the
    end-of-fit recompute always runs (averaged weights change outside training batches).

    The layers a ``FreezeBatchNorm`` held in the latest training batch are never recomputed
    (they run in eval mode in the pass, as in training), whatever the order of the callbacks.

    Caveats: with ``persistent_workers=True`` torch hands out one shared iterator per loader;
    the recompute runs only after the epoch's last training batch, so nothing training needs is
    lost. Statistics reflect the chosen loader's inputs (training augmentations included for
    ``"train"``).

    Args:
        num_batches: batches per recompute (capped by the loader's length). Default: ``200``.
        every_n_epochs: recompute after every n-th training epoch. Default: ``1``.
        dataloader: ``"train"`` or ``"val"`` (several validation loaders are interleaved batch
            by batch, so per-domain loaders all contribute), or any re-iterable of batches such
            as a ``DataLoader``. Default: ``"train"``.
        forward_fn: ``forward_fn(model, batch)``; see above. Default: ``None``.
        num_samples: instead of ``num_batches``: samples per recompute (the batch that crosses
            it is used whole; passing both raises). Default: ``None``.

    Raises:
        MisconfigurationException: a bad argument (named in backticks), or in ``setup`` a
            LightningModule whose ``forward`` is missing or needs more than the input, with
            neither ``precise_bn_forward`` nor ``forward_fn``.
        ValueError: in ``setup``, ``Trainer(sync_batchnorm=True)`` (use
            ``plugins=[lightning_norms.NormSync()]``).

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[PreciseBN(num_batches=100)], logger=False)
        >>> from lightning.pytorch.utilities.exceptions import MisconfigurationException
        >>> try:
        ...     PreciseBN(every_n_epochs=0)
        ... except MisconfigurationException as err:
        ...     print(err)
        `every_n_epochs` must be >= 1, got 0
    """

    def __init__(
        self,
        num_batches: int = _DEFAULT_NUM_BATCHES,
        every_n_epochs: int = 1,
        dataloader: str | Iterable[Any] = "train",
        forward_fn: ForwardFn | None = None,
        *,
        num_samples: int | None = None,
    ) -> None:
        _check_init_args(num_batches, every_n_epochs, dataloader, forward_fn, num_samples)
        self._num_batches = num_batches
        self._num_samples = num_samples
        self._every_n_epochs = every_n_epochs
        self._dataloader = dataloader
        self._forward_fn = forward_fn
        self._last_epoch = -1  # last epoch whose real end was recomputed
        self._dirty = False  # weights trained since the last recompute
        self._warned_short = False
        self.history: list[dict[str, Any]] = []
        self.last_report: BNStatsReport | None = None

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        check_no_torch_sync_batchnorm(trainer, "PreciseBN")
        if stage != "fit":
            return
        _run_after_swa(trainer, self)
        if self._forward_fn is not None or callable(getattr(pl_module, "precise_bn_forward", None)):
            return
        name = type(pl_module).__name__
        if type(pl_module).forward is LightningModule.forward:
            raise MisconfigurationException(
                f"PreciseBN needs to run batches through {name}: define its "
                "`forward` or `precise_bn_forward(batch)`, or pass `forward_fn`"
            )
        if not takes_one_input(pl_module):
            raise MisconfigurationException(
                f"PreciseBN runs `{name}(batch[0])` by default, but {name}.forward needs more "
                "than the input: define `precise_bn_forward(batch)` on it, or pass "
                "`forward_fn(model, batch)`"
            )

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # after every StochasticWeightAveraging's on_fit_start (this callback runs behind it)
        for swa in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(swa, StochasticWeightAveraging):
                _skip_swa_bn_epoch(trainer, swa)

    @override
    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._dirty = True
        # Validation at the end of the epoch runs right after this hook: recompute now.
        if self._epoch_training_done(trainer):
            self._epoch_end(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Fallback for epochs that ended without a last-batch signal (e.g. a hook returning -1).
        self._epoch_end(trainer, pl_module)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Weight averaging may change weights without a training batch (SWA's transfer in its
        # own on_train_end, an AveragedModel updated in on_train_epoch_end): always recompute.
        if self._dirty or _averages_weights(trainer, pl_module):
            self._recompute(trainer, pl_module, log_to_module=False)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "last_epoch": self._last_epoch,
            "dirty": self._dirty,
            "history": [dict(entry) for entry in self.history],
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_epoch = int(state_dict["last_epoch"])
        self._dirty = bool(state_dict["dirty"])
        self.history = [dict(entry) for entry in state_dict["history"]]

    @staticmethod
    def _epoch_training_done(trainer: Trainer) -> bool:
        """The epoch's last training batch just ran (not a ``max_steps`` stop mid-epoch).

        A mid-epoch stop must not count as the epoch's end: a run resumed from a checkpoint
        taken there finishes the epoch and must recompute at its real end.
        """
        progress = trainer.fit_loop.epoch_loop.batch_progress
        return progress.is_last_batch or progress.current.ready == trainer.num_training_batches

    def _epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch
        due = (epoch + 1) % self._every_n_epochs == 0
        if due and self._dirty and self._last_epoch != epoch:
            self._recompute(trainer, pl_module, log_to_module=True)
            self._last_epoch = epoch

    def _recompute(self, trainer: Trainer, pl_module: LightningModule, log_to_module: bool) -> None:
        source = self._source(trainer)
        if source is None:
            return
        num_batches, total = self._pass_length(source)
        forward = _with_averaged_models(pl_module, self._forward(pl_module), self._forward_fn)
        cap: dict[str, Any] = (
            {"num_batches": num_batches}
            if self._num_samples is None
            else {"num_samples": self._num_samples}
        )
        held = _held_by_freeze(trainer, pl_module)
        if held is None:
            return
        with _progress_bar(trainer, total) as advance:
            batches = _device_batches(trainer, source, advance)
            try:
                with trainer.precision_plugin.forward_context():
                    report = recompute_bn_stats(
                        pl_module,
                        batches,
                        forward_fn=forward,
                        exclude=held,
                        progress=False,
                        **cap,
                    )
            finally:
                batches.close()
        self._dirty = False
        self.last_report = report
        if report.layers:
            self._log(trainer, pl_module, report, log_to_module)
            _announce(trainer, report.summary())

    def _pass_length(self, source: Iterable[Any]) -> tuple[int, int | None]:
        """``num_batches`` capped by the loader's length (warned once), and the bar's total."""
        length = _length(source)
        if self._num_samples is not None:
            per_batch = getattr(source, "batch_size", None)
            if not isinstance(per_batch, int) or per_batch < 1:
                return self._num_batches, length
            needed = math.ceil(self._num_samples / per_batch)
            return self._num_batches, needed if length is None else min(needed, length)
        num_batches = self._num_batches
        if length is not None and 0 < length < num_batches:
            if not self._warned_short:
                rank_zero_warn(
                    f"PreciseBN: the {self._loader_name()} has {length} batches per process, "
                    f"fewer than `num_batches={num_batches}`; using all {length}."
                )
                self._warned_short = True
            num_batches = length
        return num_batches, num_batches

    def _log(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        report: BNStatsReport,
        log_to_module: bool,
    ) -> None:
        metrics = {
            "precise_bn/mean_shift": report.mean_shift,
            "precise_bn/var_shift": report.var_shift,
        }
        self.history.append(
            {
                "when": "epoch_end" if log_to_module else "fit_end",
                "epoch": trainer.current_epoch,
                "step": trainer.global_step,
                "num_batches": report.num_batches,
                "num_samples": report.num_samples,
                "mean_shift": report.mean_shift,
                "var_shift": report.var_shift,
            }
        )
        if log_to_module:
            for name, value in metrics.items():
                pl_module.log(
                    name, value, on_step=False, on_epoch=True, batch_size=1, sync_dist=True
                )
            return
        # ``self.log`` is not allowed in ``on_train_end``: write to the loggers directly.
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})

    def _loader_name(self) -> str:
        if isinstance(self._dataloader, str):
            return f"{self._dataloader} dataloader"
        return "given dataloader"

    def _forward(self, pl_module: LightningModule) -> ForwardFn | None:
        if self._forward_fn is not None:
            return self._forward_fn
        precise_forward = getattr(pl_module, "precise_bn_forward", None)
        if callable(precise_forward):
            return lambda _model, batch: precise_forward(batch)
        return None

    def _source(self, trainer: Trainer) -> Iterable[Any] | None:
        if not isinstance(self._dataloader, str):
            return self._dataloader
        if self._dataloader == "train":
            loaders = trainer.train_dataloader
            if isinstance(loaders, (Mapping, list, tuple)):
                return _CombinedBatches(loaders)
            return loaders
        loaders = trainer.val_dataloaders
        if loaders is None:
            trainer.fit_loop.epoch_loop.val_loop.setup_data()
            loaders = trainer.val_dataloaders
        if loaders is None:
            rank_zero_warn("PreciseBN: no validation dataloader to recompute from; skipped.")
            return None
        if isinstance(loaders, Mapping):
            return _Interleaved(list(loaders.values()))
        if isinstance(loaders, (list, tuple)):
            return _Interleaved(list(loaders))
        return loaders


def _check_init_args(
    num_batches: Any, every_n_epochs: Any, dataloader: Any, forward_fn: Any, num_samples: Any
) -> None:
    check_int_arg("num_batches", num_batches, 1)
    check_int_arg("every_n_epochs", every_n_epochs, 1)
    if num_samples is not None:
        check_int_arg("num_samples", num_samples, 1)
        if num_batches is not _DEFAULT_NUM_BATCHES:
            raise MisconfigurationException(
                "pass `num_batches` or `num_samples`, not both "
                f"(got num_batches={num_batches}, num_samples={num_samples})"
            )
    if isinstance(dataloader, str):
        if dataloader not in _LOADER_NAMES:
            raise MisconfigurationException(
                f"`dataloader` must be 'train', 'val' or an iterable of batches, got {dataloader!r}"
            )
    elif not isinstance(dataloader, Iterable):
        raise MisconfigurationException(
            "`dataloader` must be 'train', 'val' or an iterable of batches, "
            f"got {type(dataloader).__name__}"
        )
    if forward_fn is not None and not callable(forward_fn):
        raise MisconfigurationException(
            f"`forward_fn` must be callable or None, got {type(forward_fn).__name__}"
        )


def _run_after_swa(trainer: Trainer, callback: Callback) -> None:
    """Move ``callback`` right behind the last ``StochasticWeightAveraging`` in the trainer.

    SWA copies the averaged weights into the module in its ``on_train_end``; the end-of-fit
    recompute must see them. A new list is assigned (the one being iterated is not mutated),
    and checkpoint callbacks, which Lightning keeps last, stay behind both.
    """
    callbacks: list[Callback] = list(trainer.callbacks)  # type: ignore[attr-defined]
    swa = [i for i, c in enumerate(callbacks) if isinstance(c, StochasticWeightAveraging)]
    if not swa or callbacks.index(callback) > swa[-1]:
        return
    callbacks.remove(callback)
    callbacks.insert(swa[-1], callback)  # the SWA callback moved down by one
    trainer.callbacks = callbacks  # type: ignore[attr-defined]


def _skip_swa_bn_epoch(trainer: Trainer, swa: StochasticWeightAveraging) -> None:
    """Undo the extra epoch SWA adds for its own BN update: the exact pass replaces it.

    With BN layers and ``max_epochs != -1``, SWA's ``on_fit_start`` adds one epoch to the fit
    loop in which it re-estimates the statistics (``momentum=None``, per-batch variances);
    without it, SWA copies the averaged weights in its ``on_train_end`` after the last epoch,
    and this callback's end-of-fit recompute (run behind it) gives them exact statistics.
    """
    if not getattr(swa, "_model_contains_batch_norm", False) or trainer.max_epochs == -1:
        return
    swa._model_contains_batch_norm = False
    if trainer.fit_loop.max_epochs is not None:
        trainer.fit_loop.max_epochs -= 1


def _held_by_freeze(trainer: Trainer, pl_module: nn.Module) -> list[str] | None:
    """Name patterns (escaped) of the layers a ``FreezeBatchNorm`` held in the latest batch.

    ``None`` when it holds every BN layer with running statistics: nothing to recompute.
    """
    held = {
        id(layer)
        for c in trainer.callbacks  # type: ignore[attr-defined]
        if isinstance(c, FreezeBatchNorm)
        for layer in c.held_layers
    }
    if not held:
        return []
    tracked = [
        (name, m)
        for name, m in pl_module.named_modules()
        if isinstance(m, _BatchNorm) and m.running_mean is not None
    ]
    if all(id(m) in held for _, m in tracked):
        return None
    return [re.sub(r"([*?\[])", r"[\1]", name) for name, m in tracked if id(m) in held]


def _announce(trainer: Trainer, line: str) -> None:
    """``line`` through the Trainer's console, on rank zero only.

    Above the progress bars when one shows (``tqdm.write`` / the bar's ``print``), else through
    Lightning's logging, where the Trainer's own messages go.
    """
    if not trainer.is_global_zero:
        return
    bar = trainer.progress_bar_callback
    if isinstance(bar, TQDMProgressBar) and bar.is_enabled:
        Tqdm.write(line, file=sys.stdout)
    elif bar is not None and getattr(bar, "is_enabled", True):
        bar.print(line)
    else:
        rank_zero_info(line)


def _averages_weights(trainer: Trainer, pl_module: nn.Module) -> bool:
    callbacks = trainer.callbacks  # type: ignore[attr-defined]
    return any(isinstance(c, StochasticWeightAveraging) for c in callbacks) or any(
        isinstance(m, AveragedModel) for m in pl_module.modules()
    )


def _with_averaged_models(
    pl_module: nn.Module, forward: ForwardFn | None, forward_fn: ForwardFn | None
) -> ForwardFn | None:
    """``forward``, plus each ``AveragedModel`` inside ``pl_module`` run on the same batch."""
    averaged = [m for m in pl_module.modules() if isinstance(m, AveragedModel)]
    if not averaged:
        return forward
    run_averaged = forward_fn if forward_fn is not None else default_forward

    def forward_all(model: nn.Module, batch: Any) -> None:
        (forward if forward is not None else default_forward)(model, batch)
        for average in averaged:
            run_averaged(average, batch)

    return forward_all


class _Interleaved:
    """Round-robin over several loaders, batch by batch, until all are exhausted."""

    def __init__(self, loaders: list[Iterable[Any]]) -> None:
        self.loaders = loaders

    def __len__(self) -> int:
        lengths = [_length(loader) for loader in self.loaders]
        if any(n is None for n in lengths):
            raise TypeError("an interleaved loader has no length")
        return sum(n for n in lengths if n is not None)

    def __iter__(self) -> Iterator[Any]:
        iterators = [iter(loader) for loader in self.loaders]
        while iterators:
            for it in list(iterators):
                try:
                    yield next(it)
                except StopIteration:
                    iterators.remove(it)


class _CombinedBatches:
    """The batches ``training_step`` gets from a collection of train loaders (max_size_cycle)."""

    def __init__(self, loaders: Mapping[str, Iterable[Any]] | list | tuple) -> None:
        self.loaders = loaders

    def __len__(self) -> int:
        values = self.loaders.values() if isinstance(self.loaders, Mapping) else self.loaders
        lengths = [_length(loader) for loader in values]
        if not lengths or any(n is None for n in lengths):
            raise TypeError("a combined loader without a length")
        return max(n for n in lengths if n is not None)

    def __iter__(self) -> Iterator[Any]:
        from lightning.pytorch.utilities import CombinedLoader

        for batch, _, _ in CombinedLoader(self.loaders, "max_size_cycle"):
            yield batch


def _length(loader: Any) -> int | None:
    try:
        return len(loader)
    except (TypeError, NotImplementedError):
        return None


def _device_batches(trainer: Trainer, source: Iterable[Any], advance: Callable[[], None]) -> Any:
    """Generator: the source's batches, converted and moved like training batches.

    The bar advances as each batch is handed over (the consumer stops pulling after the last one,
    so advancing after the ``yield`` would leave the bar one short). One-sample batches (a
    loader's tail) are skipped: BN in train mode cannot take one value per channel.
    """
    for batch in source:
        if batch_size(batch) == 1:
            continue
        batch = trainer.precision_plugin.convert_input(batch)
        advance()
        yield trainer.strategy.batch_to_device(batch)


@contextmanager
def _progress_bar(trainer: Trainer, total: int | None) -> Iterator[Callable[[], None]]:
    """A ``PreciseBN`` bar in the Trainer's TQDM or Rich progress display (no-op otherwise).

    ``total=None`` (a ``num_samples`` pass over a loader without a batch size) shows a count.
    """
    bar = trainer.progress_bar_callback
    if isinstance(bar, RichProgressBar) and bar.is_enabled and bar.progress is not None:
        progress = bar.progress
        task = progress.add_task("PreciseBN", total=total)

        def advance_rich() -> None:
            progress.update(task, advance=1)
            bar.refresh()

        try:
            yield advance_rich
        finally:
            progress.remove_task(task)
            bar.refresh()
    elif isinstance(bar, TQDMProgressBar) and bar.is_enabled:
        tqdm_bar = Tqdm(
            desc="PreciseBN",
            total=total,
            position=2 * bar.process_position + 1,
            leave=False,
            dynamic_ncols=True,
            file=sys.stdout,
        )
        try:
            yield lambda: tqdm_bar.update(1)
        finally:
            tqdm_bar.close()
    else:
        yield lambda: None
