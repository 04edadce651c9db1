"""Argument and Trainer checks shared by the package's callbacks."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.plugins import TorchSyncBatchNorm
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_norms._shared import IntTypeError, check_int

__all__ = ["ArgumentError", "ArgumentTypeError", "check_int_arg", "check_no_torch_sync_batchnorm"]


class ArgumentError(MisconfigurationException, ValueError):
    """A bad callback argument: Lightning's ``MisconfigurationException`` and a ``ValueError``."""


class ArgumentTypeError(MisconfigurationException, IntTypeError):
    """A callback argument of the wrong type: a ``MisconfigurationException``, a ``TypeError``
    and (as :class:`~lightning_norms._shared.IntTypeError`) a ``ValueError``."""


def check_int_arg(name: str, value: Any, minimum: int | None = None) -> int:
    """:func:`~lightning_norms._shared.check_int` raising the callbacks' argument errors.

    Example:
        >>> check_int_arg("every_n_epochs", 2, 1)
        2
    """
    return check_int(name, value, minimum, errors=(ArgumentTypeError, ArgumentError))


def check_no_torch_sync_batchnorm(trainer: Any, callback: str) -> None:
    """Refuse ``Trainer(sync_batchnorm=True)`` (torch's ``SyncBatchNorm`` conversion).

    Lightning's ``TorchSyncBatchNorm`` plugin turns every ``_BatchNorm`` into
    ``torch.nn.SyncBatchNorm``, this package's layers included: a ``DomainBatchNorm``'s
    ``[D, C]`` buffers are copied into a layer that knows no domains, BatchRenorm loses its
    correction, and on CPU the first training step fails. ``NormSync`` is the plugin that
    synchronises them correctly, on CPU and GPU.

    Args:
        trainer: the ``Trainer`` being set up.
        callback: the callback's name, for the message.

    Raises:
        ValueError: the trainer would apply ``TorchSyncBatchNorm``.
    """
    connector = getattr(trainer, "_accelerator_connector", None)
    syncs = (
        getattr(trainer.strategy, "_layer_sync", None),
        getattr(connector, "_layer_sync", None),
    )
    if any(isinstance(s, TorchSyncBatchNorm) for s in syncs):
        raise ValueError(
            f"{callback}: `Trainer(sync_batchnorm=True)` would replace this package's layers with "
            "torch.nn.SyncBatchNorm (losing per-domain statistics and the BatchRenorm "
            "correction, and failing on CPU). Drop `sync_batchnorm=True` and pass "
            "`plugins=[lightning_norms.NormSync()]` instead: it synchronises every BatchNorm "
            "layer, ours and torch's, on CPU and GPU."
        )
