"""Cosine Normalization layers (Luo et al. 2017): the cosine instead of the dot product."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from lightning_norms import functional as LF

__all__ = ["CosineConv2d", "CosineLinear"]


class CosineLinear(nn.Module):
    r"""Linear layer whose outputs are cosines between the input and the weight rows.

    Luo et al. 2017, "Cosine Normalization: Using Cosine Similarity Instead of Dot Product in
    Neural Networks" (arXiv:1702.05870). No batch statistics (nothing depends on the other
    samples, training equals eval), bounded pre-activations:

    .. math::

        y_o = \frac{w_o \cdot x}{\lVert w_o \rVert \lVert x \rVert + \epsilon} \in [-1, 1]

    No bias (``bias`` is ``None``). A zero input gives 0 with finite gradients: of order
    ``|w| / eps`` in fp32/fp64; 0 when the dot product is fp16 (fp16 autocast or module), where
    ``|w| / eps`` overflows (see :func:`lightning_norms.functional.cosine_linear`). Norms are
    taken in fp32 for fp16/bf16 inputs and under autocast. ``weight`` has ``nn.Linear``'s shape
    and initialisation.

    Args:
        in_features: size of each input vector.
        out_features: size of each output vector.
        eps: added to the denominator. Default: ``1e-8``.
        device: device of the weight. Default: ``None``.
        dtype: dtype of the weight. Default: ``None``.

    Shape:
        - Input: :math:`(*, H_{in})`
        - Output: :math:`(*, H_{out})`

    Raises:
        ValueError: when the last dimension of the input is not ``in_features``.

    Example:
        >>> m = CosineLinear(4, 3)
        >>> y = m(torch.randn(5, 4) * 100)
        >>> y.shape, bool(y.abs().max() <= 1)
        (torch.Size([5, 3]), True)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        eps: float = 1e-8,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.eps = eps
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, device=device, dtype=dtype)
        )
        self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() == 0 or input.shape[-1] != self.in_features:
            raise ValueError(
                f"CosineLinear({self.in_features}, {self.out_features}): expected "
                f"{self.in_features} features in the last dim, got input of shape "
                f"{tuple(input.shape)}"
            )
        return LF.cosine_linear(input, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, eps={self.eps}"


class CosineConv2d(nn.Module):
    r"""2D convolution whose outputs are cosines between each filter and the patch under it.

    Luo et al. 2017, "Cosine Normalization: Using Cosine Similarity Instead of Dot Product in
    Neural Networks" (arXiv:1702.05870), convolutional form:

    .. math::

        y_{n,o,i,j} = \frac{w_o \cdot p_{n,i,j}}{\lVert w_o \rVert \lVert p_{n,i,j} \rVert
        + \epsilon} \in [-1, 1]

    with :math:`p_{n,i,j}` the zero-padded input patch (of ``o``'s group) under the kernel at
    output position ``(i, j)``. The patch norms come from a summing pool of the
    channel-summed ``x**2`` over the kernel window (a 1x1 kernel needs none, a dilated one
    takes a ones-kernel convolution), in fp32 for fp16/bf16 inputs and under autocast (an
    fp16 ``x**2`` overflows from ``|x| > 256``). No
    bias (``bias`` is ``None``). A zero patch gives 0 with finite gradients: of order
    ``|w| / eps`` in fp32/fp64; 0 when the convolution is fp16, where ``|w| / eps`` overflows
    (see :func:`lightning_norms.functional.cosine_conv2d`). ``weight`` has ``nn.Conv2d``'s
    shape and initialisation.

    Args:
        in_channels: input channels.
        out_channels: output channels (filters).
        kernel_size: int or ``(kH, kW)``.
        stride: as ``nn.Conv2d``. Default: ``1``.
        padding: as ``nn.Conv2d`` (zeros; int, pair, ``"valid"`` or ``"same"``). Default: ``0``.
        dilation: as ``nn.Conv2d``. Default: ``1``.
        groups: as ``nn.Conv2d``. Default: ``1``.
        eps: added to the denominator. Default: ``1e-8``.
        device: device of the weight. Default: ``None``.
        dtype: dtype of the weight. Default: ``None``.

    Shape:
        - Input: :math:`(N, C_{in}, H, W)` or :math:`(C_{in}, H, W)`
        - Output: :math:`(N, C_{out}, H_{out}, W_{out})` or :math:`(C_{out}, H_{out}, W_{out})`,
          sizes as ``nn.Conv2d``

    Raises:
        ValueError: when ``groups`` does not divide the channel counts, for a ``padding``
            string other than ``"same"``/``"valid"`` (``"same"`` needs ``stride=1``), or on an
            input that is not 3D/4D or has a channel count other than ``in_channels``.

    Example:
        >>> m = CosineConv2d(3, 8, 3, padding=1)
        >>> y = m(torch.randn(2, 3, 16, 16))
        >>> y.shape, bool(y.abs().max() <= 1)
        (torch.Size([2, 8, 16, 16]), True)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        eps: float = 1e-8,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if groups <= 0 or in_channels % groups or out_channels % groups:
            raise ValueError(
                f"CosineConv2d: `groups` must be positive and divide in_channels={in_channels} "
                f"and out_channels={out_channels}, got groups={groups}"
            )
        if isinstance(padding, str) and padding not in ("same", "valid"):
            raise ValueError(
                f"CosineConv2d: `padding` must be 'same', 'valid' or ints, got {padding!r}"
            )
        if padding == "same" and _pair(stride) != (1, 1):
            raise ValueError(f"CosineConv2d: padding='same' needs stride=1, got stride={stride!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.eps = eps
        self.weight = nn.Parameter(
            torch.empty(
                out_channels, in_channels // groups, *self.kernel_size, device=device, dtype=dtype
            )
        )
        self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() not in (3, 4) or input.shape[-3] != self.in_channels:
            raise ValueError(
                f"CosineConv2d({self.in_channels}, {self.out_channels}): expected a 4D "
                f"(N, {self.in_channels}, H, W) or 3D ({self.in_channels}, H, W) input, got "
                f"shape {tuple(input.shape)}"
            )
        batched = input if input.dim() == 4 else input.unsqueeze(0)
        out = LF.cosine_conv2d(
            batched, self.weight, self.stride, self.padding, self.dilation, self.groups, self.eps
        )
        return out if input.dim() == 4 else out.squeeze(0)

    def extra_repr(self) -> str:
        text = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}"
        )
        if self.padding != (0, 0):
            text += f", padding={self.padding}"
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        return f"{text}, eps={self.eps}"
