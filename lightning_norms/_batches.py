"""The batch conventions ``recompute_bn_stats`` and ``PreciseBN`` share.

What a batch is to them: how the default forward runs one, how many samples it holds, whether a
model's ``forward`` can take the batch's input alone, and ``num_batches``'s default (a sentinel
that tells the default apart from the same value passed, since ``num_samples`` may only be
combined with the default).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

__all__ = ["DEFAULT_NUM_BATCHES", "batch_size", "default_forward", "takes_one_input"]


class _DefaultInt(int):
    """An ``int`` default that can be told apart from the same value passed explicitly."""


DEFAULT_NUM_BATCHES: int = _DefaultInt(200)
"""``num_batches``'s default (200); ``num_samples`` may only be combined with this default."""


def default_forward(model: nn.Module, batch: Any) -> Any:
    """``model(batch[0])`` for a tuple or list batch, ``model(batch)`` otherwise.

    Example:
        >>> default_forward(nn.Identity(), ("x", "label"))
        'x'
    """
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def batch_size(batch: Any) -> int | None:
    """Samples in a batch: dim 0 of its first tensor (searching tuples, lists and dicts).

    Example:
        >>> import torch
        >>> batch_size({"label": 3, "x": torch.zeros(5, 2)}), batch_size("text")
        (5, None)
    """
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() else None
    if not isinstance(batch, (Mapping, tuple, list)):
        return None
    for item in batch.values() if isinstance(batch, Mapping) else batch:
        size = batch_size(item)
        if size is not None:
            return size
    return None


def takes_one_input(model: nn.Module) -> bool:
    """Whether ``model.forward`` can be called with a single positional argument.

    Example:
        >>> takes_one_input(nn.Linear(2, 2)), takes_one_input(nn.Bilinear(2, 2, 2))
        (True, False)
    """
    try:
        inspect.signature(model.forward).bind(None)
    except TypeError:
        return False
    except ValueError:  # no signature to inspect (a builtin): assume it can
        return True
    return True
