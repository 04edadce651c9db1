"""Swap the BatchNorm layers of a model for another normalisation, keeping their state.

One name -> kind table (``lightning_norms._kinds.KINDS``, timm style) serves both the layer
factory and the converter; the keyword arguments a name takes are its class's own, read from
its signature.
``torchvision`` is never imported at module level: its ``FrozenBatchNorm2d`` is imported when a
``"frozen"`` layer is built and recognised by its qualified class name otherwise.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from lightning_norms._kinds import (
    BN_SETTINGS,
    KINDS,
    NormAct,
    after_norm,
    is_bn,
    is_domain,
    is_frozen,
    norm_state,
    resolve,
)
from lightning_norms._patterns import name_matches
from lightning_norms._shared import check_int
from lightning_norms.distributed import SyncedBatchNorm2d
from lightning_norms.domain_bn import DomainBatchNorm2d
from lightning_norms.layernorm import LayerNorm2d
from lightning_norms.renorm import BatchRenorm2d

__all__ = [
    "BatchRenormAct2d",
    "DomainBatchNormAct2d",
    "GroupNormAct2d",
    "LayerNormAct2d",
    "SyncedBatchNormAct2d",
    "bn_modules",
    "convert_norms",
    "create_norm",
]


def bn_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every BatchNorm-type layer of ``model``, as ``(name, module)`` in ``named_modules()`` order.

    Every ``torch.nn.modules.batchnorm._BatchNorm`` (``nn.BatchNorm1d/2d/3d``,
    ``nn.SyncBatchNorm``, this package's ``BatchRenorm*d`` / ``DomainBatchNorm*d``, subclasses
    such as timm's ``BatchNormAct2d``) and the frozen ones (torchvision's
    ``FrozenBatchNorm2d``, timm's ``FrozenBatchNormAct2d``), in training or eval mode; a layer
    shared by several parents is listed once, under its first name. fvcore's
    ``get_bn_modules`` (used by its PreciseBN) differs on purpose: it keeps only the layers in
    training mode, of the exact torch BatchNorm types, because it lists what PreciseBN should
    recompute; this lists what :func:`convert_norms` can replace.

    Args:
        model: any module (a BatchNorm layer itself is listed under the name ``""``).

    Returns:
        ``[(name, module), ...]``.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        >>> [(name, type(m).__name__) for name, m in bn_modules(net)]
        [('1', 'BatchNorm2d')]
    """
    return [(name, m) for name, m in model.named_modules() if is_bn(m)]


class BatchRenormAct2d(NormAct, BatchRenorm2d):
    """:class:`~lightning_norms.BatchRenorm2d`, then its ``drop`` and ``act`` children.

    What :func:`convert_norms` makes of timm's ``BatchNormAct2d`` (same ``state_dict`` keys);
    the constructor is ``BatchRenorm2d``'s, ``drop`` and ``act`` start as ``nn.Identity``.

    Example:
        >>> layer = BatchRenormAct2d(4).eval()
        >>> layer.act = nn.ReLU()
        >>> bool((layer(torch.randn(2, 4, 3, 3) - 5) == 0).all())
        True
    """


class DomainBatchNormAct2d(NormAct, DomainBatchNorm2d):
    """:class:`~lightning_norms.DomainBatchNorm2d`, then its ``drop`` and ``act`` children.

    The ``convert_norms(..., "domain")`` form of timm's ``BatchNormAct2d``; see
    :class:`BatchRenormAct2d`.
    """


class SyncedBatchNormAct2d(NormAct, SyncedBatchNorm2d):
    """``SyncedBatchNorm2d``, then its ``drop`` and ``act`` children.

    The ``convert_norms(..., "sync")`` form of timm's ``BatchNormAct2d``; see
    :class:`BatchRenormAct2d`.
    """


class LayerNormAct2d(NormAct, LayerNorm2d):
    """:class:`~lightning_norms.LayerNorm2d`, then its ``drop`` and ``act`` children.

    The ``convert_norms(..., "layer2d")`` form of timm's ``BatchNormAct2d``; see
    :class:`BatchRenormAct2d`.
    """


class GroupNormAct2d(NormAct, nn.GroupNorm):
    """``nn.GroupNorm``, then its ``drop`` and ``act`` children.

    The ``convert_norms(..., "group")`` form of timm's ``BatchNormAct2d``; see
    :class:`BatchRenormAct2d`.
    """


# timm's names (lower case) -> (this table's name, the input rank the name fixes)
_TIMM_NAMES: dict[str, tuple[str, int | None]] = {
    "batchnorm": ("batch", None),
    "batchnorm1d": ("batch", 1),
    "batchnorm2d": ("batch", 2),
    "batchnorm3d": ("batch", 3),
    "layernorm2d": ("layer2d", None),
    "groupnorm": ("group", None),
    "frozenbatchnorm2d": ("frozen", 2),
}


def _class(name: str, dims: Any) -> type[nn.Module]:
    """The class of kind ``name`` for inputs of rank ``dims``, or ``ValueError``."""
    if isinstance(dims, bool) or dims not in (1, 2, 3):
        raise ValueError(f"create_norm({name!r}): `dims` must be 1, 2 or 3, got {dims!r}")
    cls = KINDS[name].classes[dims - 1]
    if cls is None:
        raise ValueError(
            f"create_norm({name!r}): only 2d layers (4D N, C, H, W inputs), got "
            f"dims={dims!r}{KINDS[name].hint}"
        )
    return resolve(cls)


def _arguments(name: str) -> tuple[list[str], list[str]]:
    """The keyword arguments kind ``name`` takes and those it requires, read from its class's
    own signature (``C`` excluded; ``device`` and ``dtype`` added for a class that moves)."""
    kind = KINDS[name]
    cls = resolve(next(c for c in kind.classes if c is not None))
    params = [
        p
        for p in inspect.signature(cls).parameters.values()
        if p.name != kind.features and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    names = [p.name for p in params] + (["device", "dtype"] if kind.moves else [])
    return names, [p.name for p in params if p.default is p.empty]


def _check_kwargs(where: str, name: str, kwargs: dict[str, Any], taken: Iterable[str]) -> None:
    """Required keyword arguments present, no unknown ones (``taken``: not the caller's)."""
    accepted, required = _arguments(name)
    accepted = [n for n in accepted if n not in taken]
    missing = [n for n in required if n not in kwargs and n not in taken]
    if missing:
        raise ValueError(f"{where} needs the keyword argument(s) {missing}")
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TypeError(
            f"{where} got unexpected keyword argument(s) {unknown}; it accepts {accepted}"
        )


def _check_groups(num_features: int, num_groups: Any) -> None:
    where = "create_norm('group')"
    if check_int("num_groups", num_groups, where=where) <= 0:
        raise ValueError(f"{where}: `num_groups` must be a positive int, got {num_groups}")
    if num_features % num_groups:
        raise ValueError(
            f"create_norm('group'): num_groups={num_groups} does not divide the "
            f"{num_features} channels"
        )


def _build(
    name: str, num_features: int, dims: Any, kwargs: dict[str, Any], act: bool = False
) -> nn.Module:
    """Kind ``name`` for ``num_features`` channels and inputs of rank ``dims`` (checked
    keyword arguments): the class (its norm + activation form with ``act``) called by keyword."""
    cls, kind = _class(name, dims), KINDS[name]
    if act:
        if kind.act is None:  # never drop the activation silently
            raise ValueError(f"create_norm({name!r}): no norm + activation form (drop, act)")
        cls = resolve(kind.act)
    if name == "group":
        _check_groups(num_features, kwargs["num_groups"])
    kwargs = dict(kwargs)
    moved = {k: kwargs.pop(k) for k in ("device", "dtype") if kind.moves and k in kwargs}
    layer = cls(**{kind.features: num_features}, **kwargs)
    return layer.to(**moved) if moved else layer


def _is_layer_class(value: Any) -> bool:
    """An ``nn.Module`` subclass, or a ``functools.partial`` of one."""
    if isinstance(value, functools.partial):
        value = value.func
    return isinstance(value, type) and issubclass(value, nn.Module)


def _name(name: str, kwargs: dict[str, Any]) -> str:
    """This table's name for ``name`` (any case, timm's names too); a rank a timm name fixes
    goes into ``kwargs["dims"]``."""
    key = name.lower()
    if key in KINDS:
        return key
    if key not in _TIMM_NAMES:
        known = sorted({*KINDS, *_TIMM_NAMES})
        raise ValueError(f"create_norm: unknown `name`={name!r}; choose one of {known}")
    key, dims = _TIMM_NAMES[key]
    if dims is not None and kwargs.setdefault("dims", dims) != dims:
        raise ValueError(
            f"create_norm({name!r}): the name fixes dims={dims}, got dims={kwargs['dims']!r}"
        )
    return key


def create_norm(
    name: str | type[nn.Module] | functools.partial, num_features: int, **kwargs: Any
) -> nn.Module:
    """Build one normalisation layer by name: the factory behind :func:`convert_norms`.

    A small name -> class table (timm's ``create_norm_layer`` idea); the layer is built by
    calling its class with ``C`` and the keyword arguments, which are the class's own (read
    from its signature, so they never drift from it):

    - ``"batch"``: ``nn.BatchNorm{dims}d`` (``eps``, ``momentum``, ``affine``,
      ``track_running_stats``, ``device``, ``dtype``, ...).
    - ``"renorm"``: ``BatchRenorm{dims}d`` (Ioffe 2017; the same, plus ``r_max``, ``d_max``,
      ``warmup_steps``, ``sync``, ``process_group``).
    - ``"domain"``: ``DomainBatchNorm{dims}d`` (required ``num_domains``; the BatchNorm ones,
      plus ``shared_affine``, ``sync``, ``process_group``).
    - ``"sync"``: ``SyncedBatchNorm{dims}d`` (``nn.BatchNorm{dims}d`` with its batch
      statistics synchronised across DDP ranks, on CPU too; the BatchNorm ones, plus ``sync``,
      ``process_group``).
    - ``"frozen"``: torchvision's ``FrozenBatchNorm2d`` (statistics and affine fixed; ``eps``,
      and ``device``, ``dtype`` applied after it is built; ``dims=2`` only).
    - ``"layer2d"``: :class:`~lightning_norms.LayerNorm2d` (Ba et al. 2016 over the channels;
      ``eps`` default ``1e-6``, ``affine``, ``device``, ``dtype``; ``dims=2`` only).
    - ``"group"``: ``nn.GroupNorm`` (Wu & He 2018; required ``num_groups``, ``1`` = LayerNorm
      over each sample; ``eps``, ``affine``, ``device``, ``dtype``, ...).
    - ``"none"``: ``nn.Identity`` (no arguments).

    Names are case-insensitive, and timm's names work too: ``"batchnorm"`` (``"batch"``),
    ``"batchnorm1d"`` / ``"batchnorm2d"`` / ``"batchnorm3d"`` (``"batch"`` with that ``dims``),
    ``"layernorm2d"``, ``"groupnorm"``, ``"frozenbatchnorm2d"``. A class or a
    ``functools.partial`` of one (a ``norm_layer=`` argument of timm or torchvision) is called
    as ``name(num_features, **kwargs)``.

    Args:
        name: one of the names above, an ``nn.Module`` class or a ``functools.partial`` of one.
        num_features: channels ``C``.
        **kwargs: ``dims`` (1, 2 or 3: the input rank of the BatchNorm kinds; default ``2``)
            and the layer's keyword arguments above.

    Returns:
        The new layer (fresh parameters and statistics).

    Raises:
        ValueError: an unknown ``name`` (the message lists the known ones), a missing required
            argument, a ``dims`` the kind does not take, a ``num_groups`` that does not divide
            ``num_features``.
        TypeError: a keyword argument the kind does not take; a ``name`` that is neither a
            string nor a module class.

    Example:
        >>> create_norm("group", 8, num_groups=2)
        GroupNorm(2, 8, eps=1e-05, affine=True...)
        >>> create_norm("renorm", 8, dims=1, warmup_steps=100)
        BatchRenorm1d(8, eps=1e-05, ..., r_max=3.0, d_max=5.0, warmup_steps=100)
        >>> create_norm("BatchNorm1d", 8)
        BatchNorm1d(8, eps=1e-05, momentum=0.1, affine=True...)
        >>> import functools
        >>> create_norm(functools.partial(nn.GroupNorm, 4), 8)
        GroupNorm(4, 8, eps=1e-05, affine=True...)
    """
    if _is_layer_class(name):
        return name(num_features, **kwargs)  # type: ignore[operator]
    if not isinstance(name, str):
        raise TypeError(
            f"create_norm: `name` must be a str, an nn.Module class or a functools.partial of "
            f"one, got {name!r}"
        )
    key = _name(name, kwargs)
    dims = kwargs.pop("dims", 2)
    _check_kwargs(f"create_norm({name!r})", key, kwargs, ())
    return _build(key, num_features, dims, kwargs)


@dataclass
class _Source:
    """What a BatchNorm-type layer hands on to its replacement."""

    dims: int
    settings: dict[str, Any]
    factory: dict[str, Any]
    state: dict[str, Tensor]
    requires_grad: dict[str, bool]
    training: bool
    after: dict[str, nn.Module] | None = None


def _rank(bn: nn.Module, where: str) -> int:
    """Spatial rank (1, 2 or 3) of a ``*BatchNorm{1,2,3}d``: its (or a base class's) name."""
    for cls in type(bn).__mro__:
        if cls.__name__[-2:] in ("1d", "2d", "3d") and (
            issubclass(cls, _BatchNorm) or is_frozen(bn)
        ):
            return int(cls.__name__[-2])
    raise ValueError(
        f"convert_norms: cannot tell the input rank of {type(bn).__name__} at {where!r}; "
        "only *BatchNorm1d/2d/3d layers are converted (revert a SyncBatchNorm with "
        "nn.SyncBatchNorm.revert_sync_batchnorm(model) first)"
    )


def _describe(bn: nn.Module, where: str, domain: int | None) -> _Source:
    """Read everything the replacement of ``bn`` needs; raises on a layer it cannot take."""
    if isinstance(bn, LazyModuleMixin) and bn.has_uninitialized_params():
        raise ValueError(
            f"convert_norms: {type(bn).__name__} at {where!r} is not initialised yet; "
            "run one forward pass first"
        )
    after, dims = after_norm(bn, where), _rank(bn, where)
    state = norm_state(bn, where, domain, "convert_norms")
    ref = state.get("running_mean", state.get("weight"))
    factory = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
    if is_frozen(bn):
        settings: dict[str, Any] = {"eps": bn.eps}
        requires_grad: dict[str, bool] = {}
    else:
        settings = {name: getattr(bn, name) for name in BN_SETTINGS}
        requires_grad = {
            n: p.requires_grad for n in ("weight", "bias") if (p := getattr(bn, n)) is not None
        }
    return _Source(dims, settings, factory, state, requires_grad, bn.training, after)


def _carry(src: _Source, new: nn.Module) -> None:
    """Copy ``src``'s state into ``new`` wherever ``new`` has it (every domain's row)."""
    with torch.no_grad():
        for name, value in src.state.items():
            target = getattr(new, name, None)
            if isinstance(target, Tensor):
                target.copy_(value.expand_as(target))
        for name, flag in src.requires_grad.items():
            target = getattr(new, name, None)
            if isinstance(target, nn.Parameter):
                target.requires_grad_(flag)


def _replacement(
    bn: nn.Module, where: str, to: str, kwargs: dict[str, Any], domain: int | None
) -> nn.Module:
    """The new module for ``bn``; a norm + activation layer's keeps its ``drop`` and ``act``."""
    if KINDS[to].per_domain and is_domain(bn):
        raise ValueError(
            f"convert_norms(to='domain'): {type(bn).__name__} at {where!r} is already domain-split"
        )
    src = _describe(bn, where, domain)
    if to == "frozen" and "running_mean" not in src.state:
        raise ValueError(
            f"convert_norms(to='frozen'): {type(bn).__name__} at {where!r} has no running "
            "statistics to freeze (track_running_stats=False)"
        )
    settings = {k: v for k, v in src.settings.items() if k in KINDS[to].carried}
    arguments = {**settings, **src.factory, **kwargs}
    try:
        new = _build(to, _num_features(bn), src.dims, arguments, act=src.after is not None)
    except ValueError as err:  # the builder's message without its "create_norm(...): "
        reason = str(err).split(": ", 1)[-1]
        raise ValueError(
            f"convert_norms(to={to!r}): {type(bn).__name__} at {where!r}: {reason}"
        ) from err
    _carry(src, new)
    new.train(src.training)
    for name, module in (src.after or {}).items():  # the same modules, their own mode kept
        setattr(new, name, module)
    return new


def _num_features(bn: nn.Module) -> int:
    if isinstance(bn, _BatchNorm):
        return bn.num_features
    return int(bn.get_buffer("running_var").shape[-1])


def _selected(name: str, include: list[str] | None, exclude: list[str]) -> bool:
    if include is not None and not any(name_matches(name, p) for p in include):
        return False
    return not any(name_matches(name, p) for p in exclude)


def _warn_unmatched(model: nn.Module, names: list[str], patterns: list[str], arg: str) -> None:
    """Warn about the ``arg`` patterns that choose no BatchNorm layer (``names``)."""
    unmatched = [p for p in patterns if not any(name_matches(n, p) for n in names)]
    if unmatched:
        warnings.warn(
            f"convert_norms: the `{arg}` pattern(s) {unmatched} match no BatchNorm layer of "
            f"{type(model).__name__}",
            UserWarning,
            stacklevel=3,
        )


def _patterns(value: str | Iterable[str] | None, arg: str) -> list[str] | None:
    if value is None:
        return None
    patterns = [value] if isinstance(value, str) else list(value)
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"convert_norms: `{arg}` must be a str or a list of str, got {value!r}")
    return patterns


def convert_norms(
    model: nn.Module,
    to: str,
    *,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Replace every BatchNorm layer inside ``model`` with another normalisation, in place.

    The "restructure the model" remedies of the BatchNorm pitfall (2017 article) in one call:
    swap the BatchNorm-type layers (see :func:`bn_modules`: ``nn.BatchNorm1d/2d/3d``, this
    package's variants, torchvision's ``FrozenBatchNorm2d``) for Batch Renormalization
    (Ioffe 2017), domain-split BatchNorm, frozen BatchNorm, LayerNorm over channels,
    GroupNorm/LayerNorm (Wu & He 2018), synchronised BatchNorm, or back to plain BatchNorm.
    Each new layer is built by :func:`create_norm` with the old one's ``eps``,
    ``momentum``, ``affine``, ``track_running_stats`` where the target has them, and carries
    over the affine weights (with their ``requires_grad``) and the running statistics (with
    ``num_batches_tracked``: a converted pretrained model starts past BatchRenorm's warm-up)
    where the target has them, on the same device and dtype and in the same training mode. A
    ``DomainBatchNorm`` hands on the state of domain ``domain=k`` (may be omitted with one
    domain); a new ``DomainBatchNorm`` starts every domain from the old layer's state. A layer
    shared by several parents is replaced by one shared new layer. Hooks registered on the old
    layers are not carried over.

    A norm + activation layer (timm's ``BatchNormAct2d`` and ``FrozenBatchNormAct2d``: norm,
    then ``drop``, then ``act``) becomes the target's norm + activation class carrying the same
    ``drop`` and ``act`` modules, so its ``state_dict`` keys stay and a timm checkpoint loads
    strictly before and after: ``BatchRenormAct2d``, ``DomainBatchNormAct2d``,
    ``SyncedBatchNormAct2d``, ``LayerNormAct2d``, ``GroupNormAct2d`` (subclasses of
    ``BatchRenorm2d``, ... with ``drop`` and ``act`` children), and back to timm's
    ``BatchNormAct2d`` (``"batch"``) or ``FrozenBatchNormAct2d`` (``"frozen"``). A subclass
    with another forward of its own raises ``ValueError`` naming it. All or nothing: every
    selected layer is checked and its replacement built before any is swapped in, so a call
    that raises leaves the model as it was. An ``include`` or ``exclude`` pattern that matches
    no BatchNorm layer is warned about (``UserWarning`` naming it).

    Targets (``to``) and their keyword arguments:

    - ``"renorm"``: optional ``r_max``, ``d_max``, ``warmup_steps``, ``sync``, ``process_group``.
    - ``"domain"``: required ``num_domains``; optional ``shared_affine``, ``sync``,
      ``process_group``.
    - ``"sync"``: optional ``process_group`` (``sync`` default ``True``): this package's
      ``SyncedBatchNorm*d``, the twin of ``nn.SyncBatchNorm.convert_sync_batchnorm`` that runs
      on CPU (gloo) as well; the state is copied, as for every target.
    - ``"batch"``: none. ``"frozen"``: none (2d layers with running statistics only).
    - ``"layer2d"``: optional ``eps`` (default ``1e-6``); 2d layers only.
    - ``"group"``: required ``num_groups``; optional ``eps`` (default ``1e-5``).

    Args:
        model: the model, modified in place.
        to: the target kind, one of the names above.
        include: ``fnmatch`` pattern(s) of ``named_modules()`` names; only matching layers
            change; a pattern naming a module matches every layer inside it (``"backbone"``),
            as in ``FreezeBatchNorm``. Default: ``None`` (all).
        exclude: pattern(s) of layers left as they are, e.g. ``["layer4*", "fc*"]``.
            Default: ``None``.
        **kwargs: the target's keyword arguments, and ``domain=k`` (an ``int``) for the
            ``DomainBatchNorm`` layers converted to a single-statistics kind.

    Returns:
        ``model`` (or the new layer when ``model`` itself is a selected BatchNorm layer).

    Raises:
        ValueError: an unknown ``to``, a missing required keyword argument, a layer the target
            cannot take (e.g. ``BatchNorm1d`` to ``"layer2d"`` or ``"frozen"``, a ``num_groups``
            that does not divide the channels, an uninitialised lazy layer, a
            ``SyncBatchNorm``, a subclass it cannot take apart), a ``DomainBatchNorm`` with
            several domains and no ``domain``.
        TypeError: a keyword argument the target does not take, or bad ``include``/``exclude``.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        >>> convert_norms(net, "renorm", warmup_steps=1000)[1]
        BatchRenorm2d(8, eps=1e-05, ..., r_max=3.0, d_max=5.0, warmup_steps=1000)
        >>> convert_norms(net, "group", num_groups=1)[1]
        GroupNorm(1, 8, eps=1e-05, affine=True...)
    """
    if to not in KINDS or to == "none":
        choices = sorted(set(KINDS) - {"none"})
        raise ValueError(f"convert_norms: unknown `to`={to!r}; choose one of {choices}")
    domain = kwargs.pop("domain", None)
    taken = (*KINDS[to].carried, "device", "dtype")
    _check_kwargs(f"convert_norms(to={to!r})", to, kwargs, taken)
    keep, drop = _patterns(include, "include"), _patterns(exclude, "exclude") or []
    new: dict[int, nn.Module] = {}
    for name, module in bn_modules(model):
        if _selected(name, keep, drop):
            layer = _replacement(module, name or "<model>", to, kwargs, domain)
            if hasattr(layer, "_module_path") and name:
                vars(layer)["_module_path"] = name  # a rare-domain warning names the layer
            new[id(module)] = layer
    names = [name for name, _ in bn_modules(model)]
    _warn_unmatched(model, names, keep or [], "include")
    _warn_unmatched(model, names, drop, "exclude")
    if id(model) in new:
        return new[id(model)]
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if id(child) in new:
                setattr(parent, name, new[id(child)])
    return model
