"""Synchronisation pieces of the functional core: is sync on, and a differentiable all-reduce."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def sync_world(sync: bool, process_group: torch.distributed.ProcessGroup | None) -> bool:
    """Whether batch statistics must be all-reduced: asked for, and more than one rank.

    ``sync=True`` or a ``process_group`` (which implies it) asks for it; it happens only under
    an initialised ``torch.distributed`` whose group has more than one rank.

    Example:
        >>> sync_world(True, None)  # no process group initialised here
        False
    """
    dist = torch.distributed
    if not (sync or process_group is not None):
        return False
    if not (dist.is_available() and dist.is_initialized()):
        return False
    return dist.get_world_size(process_group) > 1


class AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of every rank's input is the sum of all ranks' gradients.

    The backward is itself an ``AllReduceSum``, so gradients of any order are correct
    (gradient penalties through synchronised layers). ``setup_context`` and a ``vmap`` rule
    (the sum over ranks is elementwise: a batched tensor is all-reduced as a whole) make it
    usable under ``torch.func`` transforms.
    """

    @staticmethod
    def forward(tensor: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        out = tensor.clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(out, group=group)
        return out

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.group = inputs[1]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return AllReduceSum.apply(grad, ctx.group), None

    @staticmethod
    def vmap(
        info: Any, in_dims: tuple[int | None, None], tensor: Tensor, group: Any
    ) -> tuple[Tensor, int | None]:
        return AllReduceSum.apply(tensor, group), in_dims[0]
