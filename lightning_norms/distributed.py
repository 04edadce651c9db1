"""Synchronised batch statistics across DDP ranks, on CPU (gloo) and GPU (nccl).

BatchNorm under DDP normalises each rank's batch with that rank's statistics: the effective
BatchNorm batch is the per-device batch, not the global one. Synchronising the statistics
(Ioffe & Szegedy 2015's batch, over all ranks) fixes that; ``torch.nn.SyncBatchNorm`` does it
on GPU only ("SyncBatchNorm layers only work with GPU modules"). This module has:

- :func:`all_reduce_sum`, a differentiable all-reduce (its backward all-reduces the gradient);
- :class:`SyncedBatchNorm1d`/``2d``/``3d``: ``nn.BatchNorm*d`` whose batch statistics are
  synchronised in training (CPU and GPU), what :class:`~lightning_norms.NormSync` converts
  plain BatchNorm layers into, keeping their parameter and buffer objects.

``DomainBatchNorm*d`` and ``BatchRenorm*d`` synchronise with ``sync=True`` / a
``process_group`` through the same functional core (``lightning_norms.functional``); all three
share one internal base class and subclass torch's ``_BatchNorm``.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_norms import functional as LF
from lightning_norms._base import BatchNormBase, retype
from lightning_norms.functional._sync import AllReduceSum, sync_world

__all__ = [
    "SyncedBatchNorm1d",
    "SyncedBatchNorm2d",
    "SyncedBatchNorm3d",
    "all_reduce_sum",
    "is_sync_active",
]


def all_reduce_sum(tensor: Tensor, process_group: Any = None) -> Tensor:
    r"""Differentiable sum of ``tensor`` over the ranks of ``process_group``.

    :math:`y = \sum_r x_r` on every rank. Since every rank's loss depends on every rank's
    input, :math:`\partial L / \partial x_r = \sum_{r'} \partial L_{r'} / \partial y`: the
    backward is an all-reduce of the gradient as well (``L = \sum_r L_r``, what DDP optimises
    up to its ``1 / world_size``); that backward is itself differentiable, so gradients of any
    order are correct. Without an initialised process group it returns a copy.

    Args:
        tensor: the local tensor (not modified).
        process_group: group to reduce over. Default: ``None`` (world).

    Returns:
        The sum, a new tensor on every rank.

    Example:
        >>> x = torch.ones(3, requires_grad=True)
        >>> all_reduce_sum(x).sum().backward()  # single process: identity
        >>> x.grad
        tensor([1., 1., 1.])
    """
    if not (dist.is_available() and dist.is_initialized()):
        return tensor.clone()
    return AllReduceSum.apply(tensor, process_group)


def is_sync_active(module: nn.Module) -> bool:
    """Whether ``module`` all-reduces its batch statistics in its next forward.

    True when it is training, asks for it (``sync=True`` or a ``process_group``), and
    ``torch.distributed`` is initialised with more than one rank in the group.

    Example:
        >>> is_sync_active(SyncedBatchNorm2d(3))  # no process group initialised
        False
    """
    if isinstance(module, BatchNormBase):
        return module.sync_active()
    sync = bool(getattr(module, "sync", False))
    return bool(module.training and sync_world(sync, getattr(module, "process_group", None)))


class _SyncedBatchNorm(BatchNormBase):
    """Base of ``SyncedBatchNorm1d/2d/3d``; see :class:`SyncedBatchNorm2d`."""

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
        sync: bool = True,
        process_group: Any = None,
    ) -> None:
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            sync=sync,
            process_group=process_group,
        )

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        state = self._norm_state()
        # one domain: [1, C] views of the buffers (the same storage); in one process (or eval)
        # this is nn.BatchNorm's own F.batch_norm call, advancing the counter only after it
        # succeeded and not for an empty batch
        mean, var, steps = [
            None if t is None else t.view(1, *t.shape)
            for t in (state.running_mean, state.running_var, state.num_batches_tracked)
        ]
        return LF.domain_batch_norm(
            x=input,
            domains=0,
            num_domains=1,
            running_mean=mean,
            running_var=var,
            weight=self.weight,
            bias=self.bias,
            training=state.training,
            momentum=self.momentum,
            eps=self.eps,
            num_batches_tracked=steps,
            sync=state.sync,
            process_group=state.process_group,
            name=self._name(),
        )

    @classmethod
    def from_batchnorm(cls, bn: nn.Module, process_group: Any = None) -> nn.Module:
        """The synced twin of ``bn``: the same parameter, buffer and hook objects, new class.

        ``bn`` should be the matching ``nn.BatchNorm*d``. Its device, dtype, training flag
        and registered hooks are kept, and ``state_dict`` keys are unchanged.

        Example:
            >>> bn = nn.BatchNorm2d(4)
            >>> synced = SyncedBatchNorm2d.from_batchnorm(bn)
            >>> synced.weight is bn.weight, synced.running_mean is bn.running_mean
            (True, True)
        """
        # called on the concrete SyncedBatchNorm*d, never on the mixin itself
        synced = cast("type[nn.Module]", cls)
        return retype(bn, synced, {"sync": True, "process_group": process_group})


class SyncedBatchNorm1d(_SyncedBatchNorm, nn.BatchNorm1d):
    r"""``nn.BatchNorm1d`` with batch statistics synchronised across ranks (CPU and GPU).

    Same as :class:`SyncedBatchNorm2d`, for ``(N, C)`` or ``(N, C, L)`` inputs.

    Example:
        >>> SyncedBatchNorm1d(4)(torch.randn(8, 4)).shape
        torch.Size([8, 4])
    """

    _dims = 1


class SyncedBatchNorm2d(_SyncedBatchNorm, nn.BatchNorm2d):
    r"""``nn.BatchNorm2d`` with batch statistics synchronised across ranks (CPU and GPU).

    Ioffe & Szegedy 2015 (arXiv:1502.03167) with the batch taken over all ranks:

    .. math::

        y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}\,\gamma + \beta,\qquad
        \mu, \sigma^2 \text{ over the union of all ranks' batches}

    In training with ``sync`` (default ``True``) or a ``process_group``, under an initialised
    ``torch.distributed`` with more than one rank, every rank sends its count, mean and sum of
    squared deviations per channel (one all-reduce, fp64), normalises with the global
    statistics and updates the running statistics identically (unbiased with the global
    count); the backward all-reduces ``sum(dy)`` and ``sum(dy * (x - mu))`` so input gradients
    are those of one process on the whole batch (parameter gradients stay local, DDP averages
    them). Everywhere else (eval, one process) it computes what ``nn.BatchNorm2d`` computes
    (the same ``F.batch_norm`` call), except that an empty batch or a call that raises leaves
    every buffer, ``num_batches_tracked`` included, as it was (``nn.BatchNorm2d`` counts
    both); an inplace op on the output is fine on every path. Unlike
    ``torch.nn.SyncBatchNorm`` it runs on CPU (gloo) as well as GPU (nccl). Same parameters,
    buffers and ``state_dict`` as ``nn.BatchNorm2d``.

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype: as
            ``nn.BatchNorm2d``.
        sync: synchronise in training (keyword only). Default: ``True``.
        process_group: group to reduce over (keyword only). Default: ``None`` (world).

    Shape:
        - Input: :math:`(N, C, H, W)`
        - Output: same shape as input

    Raises:
        ValueError: one value per channel over all ranks in training (on every rank; a
            device-side assert on accelerators, which read no value back).

    Example:
        >>> m = SyncedBatchNorm2d(3)
        >>> x = torch.randn(4, 3, 5, 5)
        >>> torch.equal(m(x), nn.BatchNorm2d(3)(x))  # single process: plain BatchNorm
        True
    """

    _dims = 2


class SyncedBatchNorm3d(_SyncedBatchNorm, nn.BatchNorm3d):
    r"""``nn.BatchNorm3d`` with batch statistics synchronised across ranks (CPU and GPU).

    Same as :class:`SyncedBatchNorm2d`, for ``(N, C, D, H, W)`` inputs.

    Example:
        >>> SyncedBatchNorm3d(2)(torch.randn(2, 2, 3, 3, 3)).shape
        torch.Size([2, 2, 3, 3, 3])
    """

    _dims = 3

