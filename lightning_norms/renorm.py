"""Batch Renormalization layers (Ioffe 2017): BatchNorm that stays consistent with eval.

BatchNorm normalises with the batch statistics in training and with the running averages at
test time. Batch Renormalization keeps the batch normalisation (and its gradient) but corrects
it, per channel, towards the running statistics with two constants ``r`` and ``d``, so that the
training output is what the running statistics would give, as far as the clip limits allow.
This reduces the dependence on the batch (small or non-i.i.d. batches).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_norms import functional as LF
from lightning_norms._base import BatchNormBase

__all__ = ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d"]


class _BatchRenorm(BatchNormBase):
    """Common base of ``BatchRenorm1d/2d/3d``; see :class:`BatchRenorm2d`."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 5000,
        *,
        sync: bool = False,
        process_group: Any = None,
    ) -> None:
        name = type(self).__name__
        if not r_max >= 1:
            raise ValueError(f"{name}: `r_max` must be >= 1, got {r_max!r}")
        if not d_max >= 0:
            raise ValueError(f"{name}: `d_max` must be >= 0, got {d_max!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int):
            raise TypeError(f"{name}: `warmup_steps` must be an int, got {warmup_steps!r}")
        if warmup_steps < 0:
            raise ValueError(f"{name}: `warmup_steps` must be >= 0, got {warmup_steps!r}")
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device=device,
            dtype=dtype,
            sync=sync,
            process_group=process_group,
        )
        self.r_max = float(r_max)
        self.d_max = float(d_max)
        self.warmup_steps = warmup_steps

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        state = self._norm_state()
        step = state.num_batches_tracked
        r_max: float | Tensor = 1.0
        d_max: float | Tensor = 0.0
        if step is not None:  # training with running statistics: the ramped limits
            r_max, d_max = LF.renorm_limits(self.r_max, self.d_max, step, self.warmup_steps)
        return LF.batch_renorm(
            x=input,
            running_mean=state.running_mean,
            running_var=state.running_var,
            weight=self.weight,
            bias=self.bias,
            training=state.training,
            momentum=self.momentum,
            eps=self.eps,
            r_max=r_max,
            d_max=d_max,
            sync=state.sync,
            process_group=state.process_group,
            num_batches_tracked=step,
            name=self._name(),
        )

    def _name(self) -> str:
        return type(self).__name__

    def _extra_fields(self) -> list[str]:
        return [f"r_max={self.r_max}", f"d_max={self.d_max}", f"warmup_steps={self.warmup_steps}"]


class BatchRenorm1d(_BatchRenorm):
    r"""Batch Renormalization over a 2D ``(N, C)`` or 3D ``(N, C, L)`` input.

    Ioffe 2017 (arXiv:1702.03275). Same arguments, buffers and behaviour as
    :class:`BatchRenorm2d`, for the inputs of ``nn.BatchNorm1d``.

    Shape:
        - Input: :math:`(N, C)` or :math:`(N, C, L)`
        - Output: same shape as input

    Example:
        >>> m = BatchRenorm1d(5, warmup_steps=0)
        >>> m(torch.randn(8, 5)).shape
        torch.Size([8, 5])
    """

    _dims = 1


class BatchRenorm2d(_BatchRenorm):
    r"""Batch Renormalization over a 4D ``(N, C, H, W)`` input.

    Ioffe 2017, "Batch Renormalization: Towards Reducing Minibatch Dependence in
    Batch-Normalized Models" (arXiv:1702.03275). In training:

    .. math::

        y = \gamma \left(\frac{x - \mu_B}{\sigma_B} r + d\right) + \beta,\quad
        r = \mathrm{clip}_{[1/r_{max},\, r_{max}]}\left(\frac{\sigma_B}{\sigma}\right),\quad
        d = \mathrm{clip}_{[-d_{max},\, d_{max}]}\left(\frac{\mu_B - \mu}{\sigma}\right)

    per channel, with :math:`\sigma_B = \sqrt{\mathrm{Var}_B[x] + \epsilon}` and
    :math:`\sigma = \sqrt{\text{running\_var} + \epsilon}` taken before this step's running
    update; ``r`` and ``d`` are constants in the backward pass. The clip limits ramp linearly
    from ``r_max = 1, d_max = 0`` (plain BatchNorm) at the first training step to their final
    values after ``warmup_steps`` steps, ``num_batches_tracked`` being the step counter (see
    :func:`lightning_norms.functional.renorm_limits`). The running statistics are updated and
    used in eval exactly as by ``nn.BatchNorm2d``; with ``r_max=1, d_max=0``, or with
    ``track_running_stats=False``, the layer is ``nn.BatchNorm2d``. Batch statistics are taken in
    fp32 under fp16/bf16 autocast.

    Under activation checkpointing (``torch.utils.checkpoint``, either mode) the recomputed
    forward uses the ``r``, ``d`` (and so the warm-up limits) of the original forward, found by
    its batch statistics (see :func:`lightning_norms.functional.batch_renorm`): gradients equal
    those without checkpointing. As for ``nn.BatchNorm2d``, the recompute updates the running
    statistics and ``num_batches_tracked`` again (twice per step).

    Args:
        num_features: number of channels ``C``.
        eps: added to the variances. Default: ``1e-5``.
        momentum: running-average factor; ``None`` for a cumulative average. Default: ``0.1``.
        affine: learnable ``gamma, beta``. Default: ``True``.
        track_running_stats: keep running statistics (else batch statistics in eval too, and
            no renormalisation). Default: ``True``.
        device: device of parameters and buffers. Default: ``None``.
        dtype: dtype of parameters and buffers. Default: ``None``.
        r_max: final clip limit of ``r`` (``>= 1``). Default: ``3.0``.
        d_max: final clip limit of ``d`` (``>= 0``). Default: ``5.0``.
        warmup_steps: training steps of the linear ramp of the limits; ``0``: none.
            Default: ``5000``.
        sync: all-reduce the batch statistics across DDP ranks (only when training and
            ``torch.distributed`` is initialised; otherwise local). Default: ``False``.
        process_group: group to synchronise over (implies ``sync``). Default: ``None``.

    Shape:
        - Input: :math:`(N, C, H, W)`
        - Output: :math:`(N, C, H, W)` (same shape as input)

    Raises:
        ValueError: on a non-4D input, a channel count other than ``num_features``, one value
            per channel when batch statistics are used, or an invalid ``r_max``/``d_max``/
            ``warmup_steps``.

    Example:
        >>> m = BatchRenorm2d(3, r_max=2.0, d_max=1.0, warmup_steps=0)
        >>> y = m(torch.randn(4, 3, 8, 8) * 5 + 2)
        >>> m.eval()(torch.randn(4, 3, 8, 8)).shape
        torch.Size([4, 3, 8, 8])
    """

    _dims = 2


class BatchRenorm3d(_BatchRenorm):
    r"""Batch Renormalization over a 5D ``(N, C, D, H, W)`` input.

    Ioffe 2017 (arXiv:1702.03275). Same arguments, buffers and behaviour as
    :class:`BatchRenorm2d`, for the inputs of ``nn.BatchNorm3d``.

    Shape:
        - Input: :math:`(N, C, D, H, W)`
        - Output: same shape as input

    Example:
        >>> m = BatchRenorm3d(2, warmup_steps=0)
        >>> m(torch.randn(2, 2, 3, 4, 4)).shape
        torch.Size([2, 2, 3, 4, 4])
    """

    _dims = 3
