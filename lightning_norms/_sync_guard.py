"""Make ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` refuse this package's layers, loudly.

``Trainer(sync_batchnorm=True)`` (Lightning's ``TorchSyncBatchNorm`` plugin) and direct calls of
``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` replace every ``_BatchNorm`` with a
``torch.nn.SyncBatchNorm`` that copies torch's fields only: a ``DomainBatchNorm``'s per-domain
``[D, C]`` state ends in a layer that knows no domains (its first training step fails), and
``BatchRenorm`` silently becomes plain BatchNorm. Nothing of this package runs at that moment
except attribute reads of the old layer; torch's function asks ``hasattr(module, "qconfig")``
of every layer it converts (to carry a quantization config over).
:class:`RefuseTorchSyncConversion` is a class attribute that answers that one question with a
``ValueError`` naming ``NormSync`` (the plugin that synchronises these layers, on CPU and GPU),
and behaves exactly like an unset attribute everywhere else (``hasattr`` is ``False``,
``getattr(m, "qconfig", None)`` is ``None``; assigning a ``qconfig`` stores it as usual). No
Lightning import, no global patch. torch converts children as it walks the model, so plain
BatchNorm layers met before the first of this package's layers are already converted when it
raises; the fit (or the caller) stops there.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["RefuseTorchSyncConversion"]

_CONVERTER = "convert_sync_batchnorm"


class RefuseTorchSyncConversion:
    """Data descriptor: ``qconfig`` of a layer that torch's SyncBatchNorm must not replace.

    Raises:
        ValueError: when read by a function named ``convert_sync_batchnorm`` (torch's, which
            ``Trainer(sync_batchnorm=True)`` calls), before anything is replaced. The message
            names the layer and ``NormSync``.

    Example:
        >>> from torch import nn
        >>> class Guarded(nn.BatchNorm2d):
        ...     qconfig = RefuseTorchSyncConversion()
        >>> hasattr(Guarded(3), "qconfig")
        False
        >>> nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(Guarded(3)))
        Traceback (most recent call last):
        ...
        ValueError: ...convert_sync_batchnorm would replace Guarded ...NormSync...
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        if self.name in obj.__dict__:
            return obj.__dict__[self.name]
        if sys._getframe(1).f_code.co_name == _CONVERTER:
            raise ValueError(_message(obj))
        raise AttributeError(f"{type(obj).__name__!r} object has no attribute {self.name!r}")

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__[self.name] = value

    def __delete__(self, obj: Any) -> None:
        if obj.__dict__.pop(self.name, _MISSING) is _MISSING:
            raise AttributeError(self.name)


_MISSING = object()


def _message(layer: Any) -> str:
    return (
        f"torch.nn.SyncBatchNorm.convert_sync_batchnorm would replace {type(layer).__name__} "
        "with torch.nn.SyncBatchNorm, which keeps none of its own behaviour (per-domain "
        "statistics, the BatchRenorm correction) and refuses CPU tensors. With Lightning, drop "
        "`Trainer(sync_batchnorm=True)` and pass `plugins=[lightning_norms.NormSync()]`, which "
        "synchronises this package's layers and torch's BatchNorm on CPU and GPU; without "
        "Lightning, use `lightning_norms.convert_norms(model, 'sync')` or `sync=True` on the "
        "layers."
    )
