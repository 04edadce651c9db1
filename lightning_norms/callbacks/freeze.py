"""``FreezeBatchNorm``: keep chosen BatchNorm layers in eval mode while the rest trains."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from typing_extensions import override

from lightning_norms._patterns import name_matches
from lightning_norms.callbacks._checks import check_int_arg, check_no_torch_sync_batchnorm

__all__ = ["FreezeBatchNorm"]


def _patterns(modules: Any) -> tuple[str, ...] | None:
    """Validate ``modules``: ``None``, one pattern or a sequence of non-empty patterns."""
    if modules is None:
        return None
    patterns = (modules,) if isinstance(modules, str) else modules
    if (
        isinstance(patterns, Sequence)
        and patterns
        and all(isinstance(p, str) and p for p in patterns)
    ):
        return tuple(patterns)
    raise MisconfigurationException(
        "`modules` should be None (every BatchNorm layer), a module-name pattern such as "
        f"'backbone.*' or a non-empty list of them, got {modules!r}."
    )


def _select_layers(
    model: nn.Module, patterns: tuple[str, ...] | None
) -> tuple[list[tuple[str, _BatchNorm]], list[str]]:
    """The BatchNorm layers with running statistics that ``patterns`` choose, in module order.

    A layer is chosen when a pattern matches its ``named_modules()`` name or the name of a
    module that contains it (``"backbone"`` chooses every BN layer inside ``backbone``);
    ``None`` chooses all. Layers without running statistics (``track_running_stats=False``)
    have nothing to freeze and are never chosen.

    Returns:
        ``(layers, unmatched)``: ``(name, layer)`` pairs and the patterns that chose nothing.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm2d(4))
        >>> [name for name, _ in _select_layers(net, ("1", "fc*"))[0]]
        ['1']
        >>> _select_layers(net, ("1", "fc*"))[1]
        ['fc*']
    """
    layers = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, _BatchNorm) and m.running_mean is not None
    ]
    if patterns is None:
        return layers, []
    chosen = [(n, m) for n, m in layers if any(name_matches(n, p) for p in patterns)]
    unmatched = [p for p in patterns if not any(name_matches(n, p) for n, _ in layers)]
    return chosen, unmatched


class FreezeBatchNorm(Callback):
    r"""Keeps chosen BatchNorm layers in eval mode — running statistics fixed — while training.

    Fine-tuning a pretrained network on small or different data, the usual remedy for the
    BatchNorm pitfalls of small batches (Ioffe & Szegedy 2015: at inference BN computes
    ``y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta``) is to keep the
    pretrained statistics: a frozen layer normalises with its running statistics in training
    too, and never updates them (nor ``num_batches_tracked``), so they stay bit-identical across
    epochs. Lightning puts the whole model back into train mode at the start of fit and after
    every validation run (restoring the modes it saw, unless the LightningModule overrides
    ``on_validation_model_train``); this callback sets ``training = False`` on each chosen layer
    at the start of every training epoch and before every training batch, so no training
    forward ever sees them in train mode, whatever calls ``model.train()`` in between. Only the
    BN layer itself is switched: what a subclass runs after the norm (timm's ``BatchNormAct2d``
    activation and dropout) keeps the model's mode.

    The affine parameters (``gamma``, ``beta``) keep training unless ``train_affine=False``,
    which sets their ``requires_grad`` to ``False`` for every training batch (from
    ``on_train_batch_start`` to ``on_train_batch_end``, after every callback's epoch-start
    hooks) and hands each flag back between batches as it was, or as another callback set
    it meanwhile (``BaseFinetuning``'s ``freeze_module`` / ``make_trainable`` are recognised
    by the layer's ``track_running_stats``, which they switch together with the flags).
    Frozen for the whole fit, they are also turned off in ``setup``, before DDP wraps the
    model, so DDP expects no gradient for them, and handed back in ``on_fit_start``.
    ``BaseFinetuning`` may thus freeze and unfreeze the same modules in either order of the
    callbacks: at the end of ``fit`` every ``requires_grad`` flag is what ``BaseFinetuning``
    alone would have left. The layers are released at the start of epoch
    ``until_epoch`` (they train normally from then on) and at the end of ``fit`` (before a
    layer-sync plugin swaps its layers back), also when it fails: every layer gets back the
    mode it had when first frozen.

    ``Trainer(sync_batchnorm=True)`` is refused (it would replace this package's layers with
    ``torch.nn.SyncBatchNorm``); use ``plugins=[lightning_norms.NormSync()]``.
    ``PreciseBN`` never recomputes the layers held in the latest training batch
    (:attr:`held_layers`), whatever the order of the callbacks: frozen statistics stay
    bit-identical.

    Args:
        modules: which BN layers (default ``None``: every ``_BatchNorm`` layer with running
            statistics, torch's and this package's): one ``fnmatch`` module-name pattern or a
            list of them, matched against the names of ``LightningModule.named_modules()``; a
            pattern naming a module chooses every BN layer inside it (``"backbone"``,
            ``"net.layer[12]*"``). A pattern that chooses no BN layer is warned about.
        train_affine: keep training the affine parameters of the frozen layers (default
            ``True``).
        until_epoch: release the layers at the start of this epoch (default ``None``: frozen
            for the whole fit).

    Raises:
        MisconfigurationException: on a ``modules`` that is not ``None``, a pattern or a
            non-empty list of patterns, a non-bool ``train_affine`` or an ``until_epoch`` that
            is not a positive integer.
        ValueError: in ``setup``, with ``Trainer(sync_batchnorm=True)``, or with
            ``train_affine=False`` and ``until_epoch`` on more than one process (DDP only
            synchronises the gradients of parameters that required grad when it wrapped the
            model: released affine parameters would drift apart between ranks).

    Example:
        >>> freeze = FreezeBatchNorm(modules="backbone", train_affine=False, until_epoch=5)
        >>> # Trainer(callbacks=[freeze]).fit(model): backbone BN statistics fixed for 5 epochs
    """

    def __init__(
        self,
        modules: str | Sequence[str] | None = None,
        train_affine: bool = True,
        until_epoch: int | None = None,
    ) -> None:
        if not isinstance(train_affine, bool):
            raise MisconfigurationException(
                f"`train_affine` should be True or False, got {train_affine!r}."
            )
        if until_epoch is not None:
            check_int_arg("until_epoch", until_epoch, 1)
        self._patterns = _patterns(modules)
        self._train_affine = train_affine
        self._until_epoch = until_epoch
        self._layers: list[tuple[str, _BatchNorm]] = []
        self._modes: dict[_BatchNorm, bool] = {}  # each layer's mode when first frozen
        # affine parameters this callback turned off: flag and layer's track_running_stats then
        self._wanted: dict[int, tuple[nn.Parameter, bool, _BatchNorm, bool]] = {}
        self._taken = False
        self._frozen = False
        self._held_in_training: list[_BatchNorm] = []

    @property
    def frozen_layers(self) -> list[str]:
        """Names of the layers currently held in eval mode."""
        return [name for name, _ in self._layers] if self._frozen else []

    @property
    def held_layers(self) -> list[nn.Module]:
        """The layers held in eval mode during the latest training batch (kept after the fit
        releases them): ``PreciseBN`` never recomputes these."""
        return list(self._held_in_training)

    # ----------------------------------------------------------------------- freeze / release
    def _take(self, layers: list[tuple[str, _BatchNorm]]) -> None:
        """Affine ``requires_grad`` off; remember the flag (and the layer's
        ``track_running_stats``, which ``BaseFinetuning`` switches with it) as they were."""
        if self._taken:
            return
        for _, layer in layers:
            for p in layer.parameters(recurse=False):
                self._wanted[id(p)] = (p, p.requires_grad, layer, layer.track_running_stats)
                p.requires_grad_(False)
        self._taken = True

    def _give_back(self) -> None:
        """Every flag back as it was, or as another callback set it while it was taken.

        A flag found on was turned on by someone else; a layer whose ``track_running_stats``
        changed was frozen (``False``) or made trainable (``True``) by ``BaseFinetuning``,
        whose ``freeze_module`` / ``make_trainable`` switch both together.
        """
        for p, wanted, layer, tracked in self._wanted.values():
            if layer.track_running_stats != tracked:
                wanted = layer.track_running_stats
            p.requires_grad_(wanted or p.requires_grad)
        self._wanted.clear()
        self._taken = False

    def _freeze(self) -> None:
        for _, layer in self._layers:
            self._modes.setdefault(layer, layer.training)
            layer.training = False
        self._held_in_training = [layer for _, layer in self._layers]
        self._frozen = True

    def _release(self) -> None:
        for layer, mode in self._modes.items():
            layer.training = mode
        self._give_back()
        self._modes.clear()
        self._frozen = False

    # ----------------------------------------------------------------------- Lightning hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_no_torch_sync_batchnorm(trainer, "FreezeBatchNorm")
        if stage != "fit" or self._train_affine:
            return
        if self._until_epoch is not None and trainer.world_size > 1:
            raise ValueError(
                "FreezeBatchNorm: `train_affine=False` with `until_epoch` cannot work under "
                "DDP: the strategy wraps the model after `setup` and only ever synchronises "
                "the gradients of parameters that required grad then, so affine parameters "
                "released at `until_epoch` would train apart on every rank. Keep "
                "`train_affine=True`, or drop `until_epoch`."
            )
        if self._until_epoch is None:
            # before DDP wraps the model: it then expects no gradient for them (no
            # "parameters that were not used" error), as for parameters frozen by the user
            self._take(_select_layers(pl_module, self._patterns)[0])

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the model is wrapped: flags back, so that what other callbacks (BaseFinetuning) do
        # to them from here on is seen; they are taken again for every training batch
        self._give_back()
        # after the strategy's setup: layer-sync plugins (NormSync) have replaced their layers
        self._layers, unmatched = _select_layers(pl_module, self._patterns)
        for pattern in unmatched:
            rank_zero_warn(
                f"FreezeBatchNorm: the pattern {pattern!r} in `modules` matches no BatchNorm "
                f"layer with running statistics in {type(pl_module).__name__}."
            )
        if not self._layers and not unmatched:
            rank_zero_warn(
                f"FreezeBatchNorm: {type(pl_module).__name__} has no BatchNorm layer with "
                "running statistics to freeze."
            )

    def _sync(self, trainer: pl.Trainer) -> None:
        """Frozen before ``until_epoch``, released from it on (also right after a resume)."""
        if self._until_epoch is None or trainer.current_epoch < self._until_epoch:
            if not self._frozen and self._layers:
                rank_zero_info(
                    f"FreezeBatchNorm: {len(self._layers)} BatchNorm layer(s) in eval mode "
                    "(running statistics fixed"
                    + ("" if self._train_affine else ", affine parameters frozen")
                    + ")."
                )
            self._freeze()
        elif self._frozen:
            self._held_in_training = []
            self._release()
            rank_zero_info(
                f"FreezeBatchNorm: {len(self._layers)} BatchNorm layer(s) train again from "
                f"epoch {trainer.current_epoch}."
            )

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync(trainer)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._sync(trainer)  # after any model.train() since the epoch started
        if self._frozen and not self._train_affine:
            self._take(self._layers)  # after every other callback's epoch-start hooks

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._give_back()  # between batches the flags are everyone else's

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # before the strategy's teardown, where a layer-sync plugin (NormSync) swaps its layers
        # back: the layers it puts into the model must be the released ones
        self._release()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release()  # a fit that ended without on_train_end (e.g. the tuner's exit)

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._release()
