"""LayerNorm over the channels of an ``N, C, H, W`` map (ConvNeXt style)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def layer_norm2d(
    x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-6
) -> Tensor:
    r"""LayerNorm over the channels at every position of an ``N, C, H, W`` map (ConvNeXt).

    Ba et al. 2016 (arXiv:1607.06450), applied per pixel as in ConvNeXt (arXiv:2201.03545):

    .. math::

        y_{n,:,h,w} = \frac{x_{n,:,h,w} - \mathrm{E}_c[x_{n,c,h,w}]}
        {\sqrt{\mathrm{Var}_c[x_{n,c,h,w}] + \epsilon}} \gamma + \beta

    Runs ``F.layer_norm`` on the channels-last view; the output has channels-last strides
    (free for a ``channels_last`` input, whose view needs no copy).

    Args:
        x: ``N, C, H, W`` input.
        weight: ``gamma`` ``[C]`` or ``None``. Default: ``None``.
        bias: ``beta`` ``[C]`` or ``None``. Default: ``None``.
        eps: added to the variance. Default: ``1e-6``.

    Shape:
        ``x``: :math:`(N, C, H, W)`; output: same shape.

    Example:
        >>> import torch
        >>> x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
        >>> y = layer_norm2d(x)
        >>> torch.allclose(y.mean(1), torch.zeros(2, 4, 4), atol=1e-5)
        True
    """
    c = x.shape[1]
    return F.layer_norm(x.permute(0, 2, 3, 1), (c,), weight, bias, eps).permute(0, 3, 1, 2)
