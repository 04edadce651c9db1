"""Shared layer helpers of the tests: seeded non-trivial state, state snapshots, op counts.

- :func:`randomise` fills the named tensors (affine, running statistics) of one or several
  modules, each from its own draw; :func:`randomise_alike` gives several modules the same
  values. A draw is :func:`uniform` or :func:`normal`; every caller passes its own table, so
  its ranges (and, with the same seed, its values) stay what its tests were written for.
- :func:`snapshot_buffers` / :func:`snapshot_state` copy a module's buffers / ``state_dict``;
  :func:`assert_unchanged` says which entry changed.
- :data:`HOST_READS` (the package's one list, :mod:`lightning_norms._tracing`, which
  ``bench/`` uses too), :func:`op_names` and :func:`host_reads`: the aten ops that read a
  tensor's values back to the host (a stream synchronisation on an accelerator) and profiler
  counts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

from lightning_norms._tracing import HOST_READS

Draw = Callable[[torch.Size, torch.Generator | None, torch.dtype], Tensor]
"""``draw(shape, generator, dtype)``: fresh values (the global RNG when ``generator`` is None)."""


def uniform(low: float, high: float) -> Draw:
    """Values in ``[low, high)``: ``rand * (high - low) + low`` (bitwise ``Tensor.uniform_``
    for the ranges whose width is exact in float32)."""

    def draw(shape: torch.Size, gen: torch.Generator | None, dtype: torch.dtype) -> Tensor:
        return torch.rand(shape, generator=gen, dtype=dtype) * (high - low) + low

    return draw


def normal(std: float = 1.0) -> Draw:
    """Values ``randn * std`` (mean 0)."""

    def draw(shape: torch.Size, gen: torch.Generator | None, dtype: torch.dtype) -> Tensor:
        return torch.randn(shape, generator=gen, dtype=dtype) * std

    return draw


BN_STATE: dict[str, Draw] = {
    "weight": uniform(0.5, 1.5),
    "bias": uniform(-0.5, 0.5),
    "running_mean": uniform(-0.5, 0.5),
    "running_var": uniform(0.5, 1.5),
}
"""Affine weights near 1, running statistics away from ``0 / 1`` (the registry's state)."""


def _generator(seed: int | None) -> torch.Generator | None:
    return None if seed is None else torch.Generator().manual_seed(seed)


def randomise(
    modules: nn.Module | Iterable[nn.Module],
    draws: Mapping[str, Draw] = BN_STATE,
    *,
    seed: int | None = 0,
    dtype: torch.dtype | None = torch.float32,
) -> None:
    """Fill each module's tensors named in ``draws`` in place, module by module, in the order
    of ``draws``; a tensor a module lacks (``None``: no affine, untracked) draws nothing.

    Args:
        modules: a module, or several (e.g. ``m for _, m in bn_modules(model)``).
        draws: tensor name -> :func:`uniform` / :func:`normal`.
        seed: a fresh ``torch.Generator`` seeded so; ``None``: the global RNG.
        dtype: the dtype the values are drawn in, then cast to the tensor's; ``None``: each
            tensor's own (with ``seed=None``, the values ``Tensor.uniform_`` and
            ``Tensor.normal_`` give).

    Example:
        >>> bn = nn.BatchNorm1d(3, affine=False)
        >>> randomise(bn, {"weight": uniform(0.5, 1.5), "running_var": uniform(2, 3)})
        >>> bn.weight, bool(((bn.running_var >= 2) & (bn.running_var < 3)).all())
        (None, True)
    """
    gen = _generator(seed)
    with torch.no_grad():
        for m in [modules] if isinstance(modules, nn.Module) else modules:
            for name, draw in draws.items():
                t = getattr(m, name, None)
                if isinstance(t, Tensor):
                    t.copy_(draw(t.shape, gen, dtype or t.dtype))


def randomise_alike(*modules: nn.Module, draws: Mapping[str, Draw], seed: int | None = 0) -> None:
    """The same values in every module: one float32 draw of ``[num_features]`` per name of
    ``draws`` (made whether or not a module has that tensor, so the values do not depend on
    ``affine``), copied, broadcast over the domain rows, into each module that has it.

    Example:
        >>> a, b = nn.BatchNorm1d(3), nn.BatchNorm1d(3, affine=False)
        >>> randomise_alike(a, b, draws=BN_STATE, seed=0)
        >>> torch.equal(a.running_var, b.running_var), b.weight
        (True, None)
    """
    gen = _generator(seed)
    shape = torch.Size([modules[0].num_features])
    values = {name: draw(shape, gen, torch.float32) for name, draw in draws.items()}
    with torch.no_grad():
        for m in modules:
            for name, value in values.items():
                t = getattr(m, name, None)
                if isinstance(t, Tensor):
                    t.copy_(value.expand_as(t))


def snapshot_buffers(module: nn.Module) -> dict[str, Tensor]:
    """A copy of every named buffer (running statistics, counters)."""
    return {name: b.detach().clone() for name, b in module.named_buffers()}


def snapshot_state(module: nn.Module) -> dict[str, Tensor]:
    """A copy of the ``state_dict`` (parameters and persistent buffers)."""
    return {name: t.detach().clone() for name, t in module.state_dict().items()}


def assert_unchanged(current: Mapping[str, Tensor], before: Mapping[str, Tensor]) -> None:
    """The same names and every tensor bitwise equal (the failing name in the message).

    Example:
        >>> bn = nn.BatchNorm1d(2)
        >>> before = snapshot_buffers(bn)
        >>> assert_unchanged(snapshot_buffers(bn), before)
        >>> _ = bn(torch.randn(4, 2))  # a training step moves the running statistics
        >>> assert_unchanged(snapshot_buffers(bn), before)
        Traceback (most recent call last):
        AssertionError: running_mean...
    """
    assert current.keys() == before.keys(), sorted(set(current) ^ set(before))
    for name, value in before.items():
        assert torch.equal(current[name], value), name




def op_names(fn: Callable[[], Any]) -> set[str]:
    """The names of every op (nested ones included) the profiler records while ``fn`` runs."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


def host_reads(fn: Callable[[], Any]) -> int:
    """How many :data:`HOST_READS` ops run while ``fn`` runs (nested ones included: ``item``
    calling ``_local_scalar_dense`` counts 2).

    Example:
        >>> host_reads(lambda: torch.ones(2) + 1), host_reads(lambda: torch.ones(2).sum().item())
        (0, 2)
    """
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name in HOST_READS)
