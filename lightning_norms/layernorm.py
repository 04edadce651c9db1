"""LayerNorm over the channels of a convolutional feature map (ConvNeXt style)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_norms import functional as LF

__all__ = ["LayerNorm2d"]


class LayerNorm2d(nn.LayerNorm):
    r"""LayerNorm over the channel dimension at every position of an ``N, C, H, W`` map.

    Ba et al. 2016, "Layer Normalization" (arXiv:1607.06450), applied per pixel as in ConvNeXt
    (Liu et al. 2022, arXiv:2201.03545). Independent of the other samples in the batch, the
    same in training and eval (no running statistics):

    .. math::

        y_{n,:,h,w} = \frac{x_{n,:,h,w} - \mathrm{E}_c[x_{n,c,h,w}]}
        {\sqrt{\mathrm{Var}_c[x_{n,c,h,w}] + \epsilon}} \gamma + \beta

    It equals ``F.layer_norm`` on ``x.permute(0, 2, 3, 1)``, permuted back; the output has
    channels-last strides (a ``channels_last`` input costs no copy). A subclass of
    ``nn.LayerNorm`` (so optimiser recipes that exclude norm weights from weight decay see it).
    LayerNorm over a whole sample ``C, H, W`` is ``nn.GroupNorm(1, C)``.

    Args:
        num_channels: number of channels ``C``.
        eps: added to the variance. Default: ``1e-6``.
        affine: learnable per-channel ``gamma, beta``. Default: ``True``.
        device: device of the parameters. Default: ``None``.
        dtype: dtype of the parameters. Default: ``None``.

    Shape:
        - Input: :math:`(N, C, H, W)`
        - Output: :math:`(N, C, H, W)`

    Raises:
        ValueError: on a non-4D input or a channel count other than ``num_channels``.

    Example:
        >>> m = LayerNorm2d(8)
        >>> y = m(torch.randn(2, 8, 5, 5) * 3 + 1)
        >>> torch.allclose(y.mean(1), torch.zeros(2, 5, 5), atol=1e-5)
        True
    """

    def __init__(
        self,
        num_channels: int,
        eps: float = 1e-6,
        affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            num_channels, eps=eps, elementwise_affine=affine, device=device, dtype=dtype
        )
        self.num_channels = num_channels
        self.affine = affine

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() != 4 or input.shape[1] != self.num_channels:
            raise ValueError(
                f"LayerNorm2d({self.num_channels}): expected a 4D (N, {self.num_channels}, H, W) "
                f"input, got shape {tuple(input.shape)}"
            )
        return LF.layer_norm2d(input, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}, affine={self.affine}"
