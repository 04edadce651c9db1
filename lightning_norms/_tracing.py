"""What is tracing the current call: the one place the kernels ask (compile, ``torch.func``, jit).

Host-side checks, caches of tensors made in a call and ``out=`` buffers are only safe in eager
mode: a graph being traced would bake a cached tensor in as a constant or specialise on a
Python value, and a ``torch.func`` transform batches the tensors an op writes into.
"""

from __future__ import annotations

import contextlib
from typing import Any, cast

import torch
from torch.autograd import Function

HOST_READS = frozenset(
    {
        "aten::_local_scalar_dense",
        "aten::item",
        "aten::is_nonzero",
        "aten::nonzero",
        "aten::unique",
        "aten::_unique2",
        "aten::unique_dim",
    }
)
"""aten ops that read a device tensor's values back to the host (a stream sync on CUDA): the
kernels run none of them in training or eval (the profiler-counted contract of the benchmarks
and the tests)."""


def functorch_active() -> bool:
    """Whether a ``torch.func`` transform (``grad``, ``vmap``, ...) is running.

    Example:
        >>> functorch_active()
        False
    """
    return bool(torch._C._are_functorch_transforms_active())


def eager() -> bool:
    """Whether the call runs eagerly: not while ``torch.compile``, ``torch.func`` or
    ``torch.jit.trace`` trace it.

    Example:
        >>> eager()
        True
    """
    return not (torch.compiler.is_compiling() or functorch_active() or torch.jit.is_tracing())


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Autocast off where it is on, so that statistics' products (``mm``, which autocast would
    run in fp16/bf16) stay in the statistics' dtype; a no-op context elsewhere.

    Example:
        >>> with torch.autocast("cpu", dtype=torch.bfloat16):
        ...     with autocast_off(torch.device("cpu")):
        ...         (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
        torch.float32
    """
    if device.type in ("cpu", "cuda", "mps", "xpu") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def eager_twin(fn: type[Function]) -> type[Function]:
    """``fn`` (a Function with ``setup_context``) as a ``forward(ctx, ...)`` Function.

    The same forward, context, backward (and ``jvp``), without the argument binding
    (``inspect.signature``) torch performs on every call of a ``setup_context`` Function:
    15-40 us a call on a CPU, a large part of a small layer's step. For eager calls only (a
    ``torch.func`` transform needs ``setup_context``). The twin sets ``ctx.twin = True``
    before ``setup_context`` runs, so a Function may keep its own intermediates (tensors it
    made, never exposed or changed) on ``ctx`` instead of saving them.

    Example:
        >>> class Double(torch.autograd.Function):
        ...     @staticmethod
        ...     def forward(x):
        ...         return 2 * x
        ...     @staticmethod
        ...     def setup_context(ctx, inputs, output):
        ...         pass
        ...     @staticmethod
        ...     def backward(ctx, grad):
        ...         return 2 * grad
        >>> x = torch.ones(2, requires_grad=True)
        >>> eager_twin(Double).apply(x).sum().backward()
        >>> x.grad
        tensor([2., 2.])
    """

    def forward(ctx: Any, *inputs: Any) -> Any:
        ctx.twin = True
        output = fn.forward(*inputs)
        fn.setup_context(ctx, inputs, output)
        return output

    body = {
        "__doc__": f"{fn.__name__} without setup_context (see eager_twin).",
        "forward": staticmethod(forward),
        "backward": staticmethod(fn.backward),
    }
    if "jvp" in vars(fn):  # forward mode (torch.autograd.forward_ad) too
        body["jvp"] = staticmethod(fn.jvp)
    # torch's FunctionMeta makes the backward node class; the twin keeps fn's name, so the
    # profiler and grad_fn show the same op either way
    meta: Any = type(fn)
    return cast(type[Function], meta(fn.__name__, (Function,), body))
