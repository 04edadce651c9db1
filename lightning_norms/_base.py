"""The one base of the package's BatchNorm variants (domain-split, renormalised, synced).

As torch's ``_BatchNorm`` is for ``nn.BatchNorm*d``: the base owns what every variant shares
and leaves the math to the functional twin, which each subclass's ``forward`` calls with
explicit keywords from :meth:`~BatchNormBase._norm_state` (``running_mean=state.running_mean``):

- input checks: the rank expected by a 1d/2d/3d class (:data:`INPUT_DIMS`) and the channel
  count, ``ValueError`` naming the layer and the shape it got;
- the buffers a forward hands over, with torch's rules (running statistics used in eval and
  updated in training when tracked; ``num_batches_tracked`` advanced in training only), and
  ``momentum`` (``None``: cumulative average, the factor decided at update time by
  :func:`lightning_norms._moments.ema_factor`, so a call that raises changes nothing);
- ``sync`` / ``process_group`` (:meth:`sync_active`: training, and more than one rank);
- ``extra_repr``: torch's fields, the subclass's own (:meth:`_extra_fields`), then ``sync``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_norms._sync_guard import RefuseTorchSyncConversion
from lightning_norms.functional._sync import sync_world

__all__ = ["INPUT_DIMS", "BatchNormBase", "NormState", "retype"]

INPUT_DIMS: dict[int, tuple[tuple[int, ...], str]] = {
    1: ((2, 3), "2D (N, C) or 3D (N, C, L)"),
    2: ((4,), "4D (N, C, H, W)"),
    3: ((5,), "5D (N, C, D, H, W)"),
}
"""Spatial kind (``1``, ``2``, ``3`` as in ``BatchNorm1d/2d/3d``) -> input ranks, their name."""


class NormState(NamedTuple):
    """What a layer's mode decides for one call of its functional twin (the rest, ``weight``,
    ``bias``, ``momentum``, ``eps``, are the layer's attributes as they are)."""

    running_mean: Tensor | None
    running_var: Tensor | None
    training: bool
    num_batches_tracked: Tensor | None
    sync: bool
    process_group: Any


class BatchNormBase(_BatchNorm):
    """Base of ``DomainBatchNorm*d``, ``BatchRenorm*d`` and ``SyncedBatchNorm*d``.

    Subclasses set ``_dims`` (1, 2 or 3), may extend :meth:`_extra_fields`, and implement
    ``forward`` as one call of their functional twin, by keyword, from :meth:`_norm_state`.

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype: as
            ``nn.BatchNorm2d``.
        sync: all-reduce batch statistics across ranks in training (keyword only).
            Default: ``False``.
        process_group: group to reduce over, implies ``sync`` (keyword only).
            Default: ``None`` (world).

    Example:
        >>> from lightning_norms import BatchRenorm2d
        >>> m = BatchRenorm2d(3, sync=True)
        >>> isinstance(m, BatchNormBase), m.sync_active()  # no process group initialised
        (True, False)
    """

    _dims: int = 2
    # torch's convert_sync_batchnorm (Trainer(sync_batchnorm=True)) refuses to replace us, loudly
    qconfig = RefuseTorchSyncConversion()

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        sync: bool = False,
        process_group: Any = None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        self.sync = sync
        self.process_group = process_group

    def _name(self) -> str:
        """The layer as error messages name it, e.g. ``BatchRenorm2d(64)``."""
        return f"{type(self).__name__}({self.num_features})"

    def _check_input_dim(self, input: Tensor) -> None:
        ranks, names = INPUT_DIMS[self._dims]
        if input.dim() not in ranks:
            raise ValueError(
                f"{type(self).__name__}: expected {names} input, got shape {tuple(input.shape)}"
            )
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}): expected {self.num_features} "
                "channels in dim 1, "
                f"got input of shape {tuple(input.shape)}"
            )

    def sync_active(self) -> bool:
        """Whether the next forward all-reduces its batch statistics.

        True when training, asked for (``sync=True`` or a ``process_group``) and
        ``torch.distributed`` is initialised with more than one rank in the group.
        """
        return bool(self.training and sync_world(self.sync, self.process_group))

    def _norm_state(self) -> NormState:
        """The state a functional twin takes, by keyword, with torch's ``_BatchNorm`` rules.

        Running statistics are passed in eval, and in training when tracked (then updated);
        ``num_batches_tracked`` only in training when tracked (advanced by the kernel after it
        succeeded). ``training`` is torch's ``bn_training``: batch statistics in training, or
        when there are no running statistics. ``sync`` and ``process_group`` are passed in
        training only (eval never synchronises, as ``nn.SyncBatchNorm``).
        """
        tracked = not self.training or self.track_running_stats
        counting = self.training and self.track_running_stats
        running_mean = self.running_mean if tracked else None
        running_var = self.running_var if tracked else None
        return NormState(
            running_mean=running_mean,
            running_var=running_var,
            training=self.training or (running_mean is None and running_var is None),
            num_batches_tracked=self.num_batches_tracked if counting else None,
            sync=self.sync and self.training,
            process_group=self.process_group if self.training else None,
        )

    def _extra_fields(self) -> list[str]:
        """The subclass's own ``name=value`` fields for :meth:`extra_repr`."""
        return []

    def extra_repr(self) -> str:
        fields = [super().extra_repr(), *self._extra_fields()]
        if self.sync or self.process_group is not None:
            fields.append("sync=True")
        if self.process_group is not None:
            fields.append("process_group=...")
        return ", ".join(fields)


def retype(module: nn.Module, cls: type[nn.Module], extra: dict[str, Any]) -> nn.Module:
    """A ``cls`` module sharing ``module``'s state objects (parameters, buffers, hooks)."""
    new = cls.__new__(cls)
    state = dict(module.__dict__)
    for key in ("sync", "process_group"):
        state.pop(key, None)
    new.__dict__.update(state)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = dict(module._modules)
    new.__dict__.update(extra)
    return new
