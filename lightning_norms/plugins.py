"""``NormSync``: a Lightning ``LayerSync`` plugin that synchronises BatchNorm on CPU and GPU.

Lightning's own ``Trainer(sync_batchnorm=True)`` converts BatchNorm layers to
``torch.nn.SyncBatchNorm``, which refuses CPU modules and knows nothing of this package's
layers. ``Trainer(plugins=[NormSync()])`` instead turns on ``sync`` for ``DomainBatchNorm*d``
and ``BatchRenorm*d`` and converts exact ``nn.BatchNorm1d/2d/3d`` layers into
:class:`~lightning_norms.distributed.SyncedBatchNorm2d` (and 1d/3d), which keep the very same
parameter, buffer and hook objects, so optimizers, checkpoints and callbacks are unaffected.
This module imports Lightning; ``import lightning_norms`` does not import it.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.plugins.layer_sync import LayerSync
from torch import nn
from typing_extensions import override

from lightning_norms._base import BatchNormBase, retype
from lightning_norms._kinds import SYNCED_TWINS

__all__ = ["NormSync"]

_CONVERTED = "_norm_sync_converted"
_PREVIOUS = "_norm_sync_previous"


class NormSync(LayerSync):
    """Synchronise every BatchNorm layer's batch statistics across DDP ranks, CPU or GPU.

    Ioffe & Szegedy 2015's BatchNorm with the batch taken over all ranks (what
    ``torch.nn.SyncBatchNorm`` does on GPU only). Pass it to the Trainer; Lightning's DDP
    (and FSDP) strategies call :meth:`apply` when fitting starts and :meth:`revert` at the end:

    - ``DomainBatchNorm*d``, ``BatchRenorm*d`` and ``SyncedBatchNorm*d``: ``sync=True`` and
      ``process_group`` set (their previous values are restored by ``revert``);
    - exact ``nn.BatchNorm1d/2d/3d`` (not subclasses): converted into
      ``SyncedBatchNorm1d/2d/3d`` sharing the same parameter, buffer and hook objects (same
      device, dtype, training flag, ``state_dict`` keys); ``revert`` turns exactly those back
      into ``nn.BatchNorm*d``.

    Synchronisation happens in training only; a single process (or eval) is plain BatchNorm.

    Args:
        process_group: group to reduce over. Default: ``None`` (world).

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        >>> weight = net[1].weight
        >>> plugin = NormSync()
        >>> type(plugin.apply(net)[1]).__name__, net[1].weight is weight
        ('SyncedBatchNorm2d', True)
        >>> type(plugin.revert(net)[1]).__name__
        'BatchNorm2d'

        In a Trainer: ``Trainer(strategy="ddp", devices=2, plugins=[NormSync()])``.
    """

    def __init__(self, process_group: Any = None) -> None:
        self.process_group = process_group

    @override
    def apply(self, model: nn.Module) -> nn.Module:
        """Turn sync on for this package's layers; convert exact ``nn.BatchNorm*d``."""
        return self._walk(model, self._apply_one, {})

    @override
    def revert(self, model: nn.Module) -> nn.Module:
        """Undo :meth:`apply`: previous sync settings back, converted layers back to BN."""
        return self._walk(model, self._revert_one, {})

    def _walk(self, module: nn.Module, fn: Any, done: dict[int, nn.Module]) -> nn.Module:
        if id(module) in done:
            return done[id(module)]
        new = fn(module)
        done[id(module)] = new
        for name, child in list(new.named_children()):
            new_child = self._walk(child, fn, done)
            if new_child is not child:
                setattr(new, name, new_child)
        return new

    def _apply_one(self, module: nn.Module) -> nn.Module:
        synced = SYNCED_TWINS.get(type(module))
        if synced is not None:
            return retype(
                module, synced, {"sync": True, "process_group": self.process_group, _CONVERTED: 1}
            )
        if isinstance(module, BatchNormBase) and not hasattr(module, _PREVIOUS):
            setattr(module, _PREVIOUS, (module.sync, module.process_group))
            module.sync, module.process_group = True, self.process_group
        return module

    def _revert_one(self, module: nn.Module) -> nn.Module:
        if getattr(module, _CONVERTED, False):
            base = next(k for k, v in SYNCED_TWINS.items() if v is type(module))
            new = retype(module, base, {})
            del new.__dict__[_CONVERTED]
            return new
        if hasattr(module, _PREVIOUS):
            module.sync, module.process_group = getattr(module, _PREVIOUS)
            delattr(module, _PREVIOUS)
        return module
