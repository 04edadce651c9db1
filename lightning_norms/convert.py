"""Swap the BatchNorm layers of a model for another normalisation, keeping their state."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from lightning_norms.domain_bn import DomainBatchNorm1d, DomainBatchNorm2d, DomainBatchNorm3d
from lightning_norms.layernorm import LayerNorm2d
from lightning_norms.renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d

__all__ = ["convert_norms"]


def _rank(bn: _BatchNorm, path: str) -> int:
    """Spatial rank of a ``*BatchNorm{1,2,3}d`` (1, 2 or 3), from its class name."""
    suffix = type(bn).__name__[-2:]
    if suffix not in ("1d", "2d", "3d"):
        raise ValueError(
            f"convert_norms: cannot tell the input rank of {type(bn).__name__} at {path!r}; "
            "only *BatchNorm1d/2d/3d layers are converted (revert a SyncBatchNorm with "
            "nn.SyncBatchNorm.revert_sync_batchnorm(model) first)"
        )
    return int(suffix[0])


def _factory(bn: _BatchNorm) -> dict[str, Any]:
    """``device``/``dtype`` of ``bn``'s floating-point state (defaults when it has none)."""
    for tensor in (bn.weight, bn.running_mean):
        if tensor is not None:
            return {"device": tensor.device, "dtype": tensor.dtype}
    return {}


def _carry(src: _BatchNorm, dst: nn.Module, names: tuple[str, ...], path: str) -> None:
    """Copy the parameters/buffers ``names`` that both modules have (``requires_grad`` too)."""
    with torch.no_grad():
        for name in names:
            source: Tensor | None = getattr(src, name, None)
            target: Tensor | None = getattr(dst, name, None)
            if source is None or target is None:
                continue
            if source.shape != target.shape:
                raise ValueError(
                    f"convert_norms: cannot carry `{name}` of shape {list(source.shape)} from "
                    f"{type(src).__name__} at {path!r} into {type(dst).__name__} "
                    f"(shape {list(target.shape)})"
                )
            target.copy_(source)
            if isinstance(target, nn.Parameter):
                target.requires_grad_(source.requires_grad)


_AFFINE = ("weight", "bias")
_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _to_renorm(
    bn: _BatchNorm,
    path: str,
    *,
    r_max: float = 3.0,
    d_max: float = 5.0,
    warmup_steps: int = 5000,
    sync: bool = False,
    process_group: Any = None,
) -> nn.Module:
    """``BatchRenorm*d`` with ``bn``'s settings, affine and running statistics."""
    cls = (BatchRenorm1d, BatchRenorm2d, BatchRenorm3d)[_rank(bn, path) - 1]
    new = cls(
        bn.num_features,
        bn.eps,
        bn.momentum,
        bn.affine,
        bn.track_running_stats,
        **_factory(bn),
        r_max=r_max,
        d_max=d_max,
        warmup_steps=warmup_steps,
        sync=sync,
        process_group=process_group,
    )
    _carry(bn, new, _STATE, path)
    return new


def _to_batch(bn: _BatchNorm, path: str) -> nn.Module:
    """Plain ``nn.BatchNorm*d`` with ``bn``'s settings, affine and running statistics."""
    cls = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[_rank(bn, path) - 1]
    new = cls(
        bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, **_factory(bn)
    )
    _carry(bn, new, _STATE, path)
    return new


def _to_layer2d(bn: _BatchNorm, path: str, *, eps: float = 1e-6) -> nn.Module:
    """``LayerNorm2d`` (channels at every pixel) carrying ``bn``'s affine; 4D inputs only."""
    if _rank(bn, path) != 2:
        raise ValueError(
            f"convert_norms(to='layer2d'): {type(bn).__name__} at {path!r} does not normalise "
            "4D (N, C, H, W) maps; LayerNorm2d only replaces *BatchNorm2d (use to='group' with "
            "num_groups=1 for a LayerNorm over each sample)"
        )
    new = LayerNorm2d(bn.num_features, eps=eps, affine=bn.affine, **_factory(bn))
    _carry(bn, new, _AFFINE, path)
    return new


def _to_group(bn: _BatchNorm, path: str, *, num_groups: int, eps: float = 1e-5) -> nn.Module:
    """``nn.GroupNorm(num_groups, C)`` carrying ``bn``'s affine (1 group: per-sample LN)."""
    _rank(bn, path)
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0:
        raise ValueError(
            f"convert_norms(to='group'): `num_groups` must be a positive int, got {num_groups!r}"
        )
    if bn.num_features % num_groups:
        raise ValueError(
            f"convert_norms(to='group'): num_groups={num_groups} does not divide the "
            f"{bn.num_features} channels of {type(bn).__name__} at {path!r}"
        )
    new = nn.GroupNorm(num_groups, bn.num_features, eps=eps, affine=bn.affine, **_factory(bn))
    _carry(bn, new, _AFFINE, path)
    return new


def _to_domain(
    bn: _BatchNorm,
    path: str,
    *,
    num_domains: int,
    shared_affine: bool = False,
    sync: bool = False,
    process_group: Any = None,
) -> nn.Module:
    """``DomainBatchNorm*d`` with ``bn``'s settings, its affine and running stats per domain."""
    if isinstance(bn, (DomainBatchNorm1d, DomainBatchNorm2d, DomainBatchNorm3d)):
        raise ValueError(
            f"convert_norms(to='domain'): {type(bn).__name__} at {path!r} is already domain-split"
        )
    cls = (DomainBatchNorm1d, DomainBatchNorm2d, DomainBatchNorm3d)[_rank(bn, path) - 1]
    new = cls.from_batchnorm(bn, num_domains, shared_affine=shared_affine)
    new.sync, new.process_group = sync, process_group
    for name in _AFFINE:
        source, target = getattr(bn, name), getattr(new, name)
        if source is not None and target is not None:
            target.requires_grad_(source.requires_grad)
    return new


# name -> converter(bn, path, **kwargs) -> new module. A converter's keyword-only parameters are
# the kwargs `convert_norms` accepts for that target; those without a default are required.
_CONVERTERS: dict[str, Callable[..., nn.Module]] = {
    "renorm": _to_renorm,
    "layer2d": _to_layer2d,
    "group": _to_group,
    "batch": _to_batch,
    "domain": _to_domain,
}


def _check_kwargs(to: str, converter: Callable[..., nn.Module], kwargs: dict[str, Any]) -> None:
    params = [
        p
        for p in inspect.signature(converter).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    missing = [
        p.name for p in params if p.default is inspect.Parameter.empty and p.name not in kwargs
    ]
    if missing:
        raise ValueError(f"convert_norms(to={to!r}) needs the keyword argument(s) {missing}")
    unknown = sorted(set(kwargs) - {p.name for p in params})
    if unknown:
        allowed = [p.name for p in params]
        raise TypeError(
            f"convert_norms(to={to!r}) got unexpected keyword argument(s) {unknown}; "
            f"it accepts {allowed}"
        )


def convert_norms(model: nn.Module, to: str, **kwargs: Any) -> nn.Module:
    """Replace every BatchNorm layer inside ``model`` with another normalisation, in place.

    The "restructure the model" remedies of the BatchNorm pitfall (2017 article) in one call:
    swap ``nn.BatchNorm1d/2d/3d`` (and this package's BatchNorm variants) for Batch
    Renormalization (Ioffe 2017), LayerNorm over channels, GroupNorm/LayerNorm (Wu & He 2018),
    or back to plain BatchNorm. Each new layer keeps the old one's ``num_features``, ``eps``,
    ``momentum``, ``affine``, ``track_running_stats`` where it has them, and carries over the
    affine weights (with their ``requires_grad``) and the running statistics (with
    ``num_batches_tracked``: a converted pretrained model starts past BatchRenorm's warm-up)
    where the target has them, on the same device and dtype and in the same training mode.
    A layer shared by several parents is replaced by one shared new layer. Hooks registered on
    the old layers are not carried over.

    Targets and their keyword arguments:

    - ``"renorm"``: ``BatchRenorm1d/2d/3d``; optional ``r_max``, ``d_max``, ``warmup_steps``,
      ``sync``, ``process_group``.
    - ``"layer2d"``: :class:`~lightning_norms.LayerNorm2d` (``*BatchNorm2d`` only); optional
      ``eps`` (default ``1e-6``).
    - ``"group"``: ``nn.GroupNorm``; required ``num_groups`` (``1`` = LayerNorm over each whole
      sample); optional ``eps`` (default ``1e-5``).
    - ``"batch"``: ``nn.BatchNorm1d/2d/3d``.
    - ``"domain"``: ``DomainBatchNorm1d/2d/3d``; required ``num_domains`` (every domain starts
      from the old layer's affine and running statistics); optional ``shared_affine``,
      ``sync``, ``process_group``.

    Args:
        model: the model, modified in place.
        to: the target kind, one of the names above.
        **kwargs: the target's keyword arguments.

    Returns:
        ``model`` (or the new layer when ``model`` itself is a BatchNorm layer).

    Raises:
        ValueError: for an unknown ``to``, a missing required keyword argument, a layer the
            target cannot replace (e.g. ``BatchNorm1d`` to ``"layer2d"``, a ``num_groups`` that
            does not divide the channels, an uninitialised lazy layer, a ``SyncBatchNorm``).
        TypeError: for a keyword argument the target does not take.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        >>> convert_norms(net, "renorm", warmup_steps=1000)[1]
        BatchRenorm2d(8, eps=1e-05, ..., r_max=3.0, d_max=5.0, warmup_steps=1000)
        >>> convert_norms(net, "group", num_groups=1)[1]
        GroupNorm(1, 8, eps=1e-05, affine=True...)
    """
    if to not in _CONVERTERS:
        raise ValueError(f"convert_norms: unknown `to`={to!r}; choose one of {sorted(_CONVERTERS)}")
    converter = _CONVERTERS[to]
    _check_kwargs(to, converter, kwargs)
    return _convert(model, "", converter, kwargs, {})


def _convert(
    module: nn.Module,
    path: str,
    converter: Callable[..., nn.Module],
    kwargs: dict[str, Any],
    done: dict[int, nn.Module],
) -> nn.Module:
    if id(module) in done:
        return done[id(module)]
    if isinstance(module, _BatchNorm):
        where = path or "<model>"
        if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
            raise ValueError(
                f"convert_norms: {type(module).__name__} at {where!r} is not initialised yet; "
                "run one forward pass first"
            )
        new = converter(module, where, **kwargs)
        new.train(module.training)
        done[id(module)] = new
        return new
    for name, child in module.named_children():
        new_child = _convert(child, f"{path}.{name}" if path else name, converter, kwargs, done)
        if new_child is not child:
            setattr(module, name, new_child)
    done[id(module)] = module
    return module
