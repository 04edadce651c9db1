"""The one registry of normalisation kinds, and what the package reads off a BatchNorm layer.

:data:`KINDS` maps each name of ``create_norm`` / ``convert_norms`` to a :class:`NormKind`: its
class per input rank and what the rest of the package needs to know about it. Everything that
asks "which layers are BatchNorm layers", "is this a domain layer", "may ``stats`` read this
layer's buffers back", "what does ``NormSync`` convert a BatchNorm into" derives its answer
from this table, so a new BatchNorm variant is one entry here (its module and its public name in
``lightning_norms/__init__.py`` aside; ``convert.py`` only for a norm + activation form).

The helpers below read a BatchNorm-type layer the way :func:`~lightning_norms.convert_norms`
and :func:`~lightning_norms.fold_norms` both need: its per-channel state (one domain's row of a
``DomainBatchNorm``) and what a norm + activation layer applies after the norm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_norms._shared import check_int, import_qualified
from lightning_norms.distributed import SyncedBatchNorm1d, SyncedBatchNorm2d, SyncedBatchNorm3d
from lightning_norms.domain_bn import DomainBatchNorm1d, DomainBatchNorm2d, DomainBatchNorm3d
from lightning_norms.layernorm import LayerNorm2d
from lightning_norms.renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d

__all__ = [
    "BN_SETTINGS",
    "KINDS",
    "SYNCED_TWINS",
    "NormAct",
    "NormKind",
    "after_norm",
    "is_bn",
    "is_domain",
    "is_frozen",
    "is_small_batch_kind",
    "norm_state",
    "reads_back",
    "resolve",
]

Layer = type[nn.Module] | str | None
"""A class, a qualified name imported when first needed (torchvision, timm), or ``None``."""

BN_SETTINGS = ("eps", "momentum", "affine", "track_running_stats")
"""The settings a BatchNorm layer hands on to its replacement."""
_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_AFTER = ("drop", "act")
"""The children a norm + activation layer applies after the norm (timm's order)."""


@dataclass(frozen=True)
class NormKind:
    """One normalisation kind.

    ``classes``: the class for ``dims`` 1, 2, 3. ``carried``: the source layer's settings
    ``convert_norms`` passes on. ``features``: the constructor argument that takes ``C``.
    ``hint``: added to the error for a rank the kind lacks. ``moves``: the class takes no
    ``device``/``dtype``, the layer is moved after it is built. ``act``: the 2d class that also
    applies ``drop`` and ``act``; ``act_aliases``: other qualified names of such classes.
    ``batch_norm``: a BatchNorm-type kind (``convert_norms`` replaces it; its forward is a plain
    normalisation). ``frozen``: fixed statistics, not a ``_BatchNorm`` (recognised by qualified
    name, never imported to check). ``per_domain``: ``[num_domains, C]`` state routed by domain
    ids. ``reads_back``: its training update is torch's (per domain), so after a momentum-1
    forward its buffers hold the batch moments (``recompute_bn_stats`` reads them back).
    ``small_batches``: designed for small batches (``BatchNormDoctor`` does not judge its
    batch size).
    """

    classes: tuple[Layer, Layer, Layer]
    carried: tuple[str, ...] = ()
    features: str = "num_features"
    hint: str = ""
    moves: bool = False
    act: Layer = None
    act_aliases: tuple[str, ...] = ()
    batch_norm: bool = False
    frozen: bool = False
    per_domain: bool = False
    reads_back: bool = False
    small_batches: bool = False


_CONVERT = "lightning_norms.convert"
KINDS: dict[str, NormKind] = {
    "batch": NormKind(
        (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d),
        BN_SETTINGS,
        act="timm.layers.norm_act.BatchNormAct2d",
        act_aliases=("timm.models.layers.norm_act.BatchNormAct2d",),
        batch_norm=True,
        reads_back=True,
    ),
    "renorm": NormKind(
        (BatchRenorm1d, BatchRenorm2d, BatchRenorm3d),
        BN_SETTINGS,
        act=f"{_CONVERT}.BatchRenormAct2d",
        batch_norm=True,
        small_batches=True,
    ),
    "domain": NormKind(
        (DomainBatchNorm1d, DomainBatchNorm2d, DomainBatchNorm3d),
        BN_SETTINGS,
        act=f"{_CONVERT}.DomainBatchNormAct2d",
        batch_norm=True,
        per_domain=True,
        reads_back=True,
    ),
    "sync": NormKind(
        (SyncedBatchNorm1d, SyncedBatchNorm2d, SyncedBatchNorm3d),
        BN_SETTINGS,
        act=f"{_CONVERT}.SyncedBatchNormAct2d",
        batch_norm=True,
    ),
    "frozen": NormKind(
        (None, "torchvision.ops.misc.FrozenBatchNorm2d", None),
        ("eps",),
        hint=" (torchvision's FrozenBatchNorm2d)",
        moves=True,
        act="timm.layers.norm_act.FrozenBatchNormAct2d",
        batch_norm=True,
        frozen=True,
    ),
    "layer2d": NormKind(
        (None, LayerNorm2d, None),
        ("affine",),
        features="num_channels",
        hint=" (use 'group' with num_groups=1 for a LayerNorm over each sample)",
        act=f"{_CONVERT}.LayerNormAct2d",
    ),
    "group": NormKind(
        (nn.GroupNorm,) * 3, ("affine",), features="num_channels", act=f"{_CONVERT}.GroupNormAct2d"
    ),
    "none": NormKind((nn.Identity,) * 3),
}
"""Every kind, by the name ``create_norm`` and ``convert_norms`` take."""


def resolve(cls: type[nn.Module] | str) -> type[nn.Module]:
    """The class itself, or the one a qualified name names (imported now)."""
    return import_qualified(cls) if isinstance(cls, str) else cls


def _classes(flag: str) -> tuple[type[nn.Module], ...]:
    """The classes (not the qualified names) of the kinds with ``flag`` set."""
    return tuple(
        c
        for kind in KINDS.values()
        if getattr(kind, flag)
        for c in kind.classes
        if isinstance(c, type)
    )


_FROZEN = frozenset(
    c
    for kind in KINDS.values()
    if kind.frozen
    for c in (*kind.classes, kind.act)
    if isinstance(c, str)
)
_NORM_ACT = frozenset(
    name
    for kind in KINDS.values()
    if kind.batch_norm
    for name in (kind.act, *kind.act_aliases)
    if isinstance(name, str)
)
# forwards that are a plain normalisation (a subclass may inherit one); torch's SyncBatchNorm too
_PLAIN: tuple[type[nn.Module], ...] = (*_classes("batch_norm"), nn.SyncBatchNorm)
_PLAIN_FORWARDS = frozenset(c.forward for c in _PLAIN)
_DOMAIN = _classes("per_domain")
_READ_BACK_FORWARDS = frozenset(c.forward for c in _classes("reads_back"))
_SMALL_BATCHES = _classes("small_batches")


def _qualname(module: nn.Module) -> str:
    """``module``'s class as ``package.module.Class``."""
    return f"{type(module).__module__}.{type(module).__qualname__}"


def is_frozen(module: nn.Module) -> bool:
    """A frozen BatchNorm (torchvision's ``FrozenBatchNorm2d``, timm's ``FrozenBatchNormAct2d``)."""
    return _qualname(module) in _FROZEN


def is_bn(module: nn.Module) -> bool:
    """A BatchNorm-type layer: any ``_BatchNorm`` (ours included) or a frozen BatchNorm."""
    return isinstance(module, _BatchNorm) or is_frozen(module)


def is_domain(module: nn.Module) -> bool:
    """A layer with statistics per domain (``DomainBatchNorm*d`` and its subclasses)."""
    return isinstance(module, _DOMAIN)


def is_small_batch_kind(module: nn.Module) -> bool:
    """A layer designed for small batches (``BatchRenorm*d`` and its subclasses)."""
    return isinstance(module, _SMALL_BATCHES)


def reads_back(module: nn.Module) -> bool:
    """Whether ``module`` runs the training update of a ``reads_back`` kind (its forward is
    that kind's own, not a subclass's override)."""
    return type(module).forward in _READ_BACK_FORWARDS


SYNCED_TWINS: dict[type[nn.Module], type[nn.Module]] = {
    plain: synced
    for plain, synced in zip(KINDS["batch"].classes, KINDS["sync"].classes, strict=True)
    if isinstance(plain, type) and isinstance(synced, type)
}
"""Exact ``nn.BatchNorm*d`` class -> its ``"sync"`` twin (what ``NormSync`` converts)."""


class NormAct(nn.Module):
    """Mixin: the norm's own forward, then ``drop``, then ``act``, as timm's ``BatchNormAct2d``.

    The norm's parameters and buffers keep their names and ``drop`` / ``act`` are children of
    the layer itself, so the ``state_dict`` keys are those of timm's layer.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.drop: nn.Module = nn.Identity()
        self.act: nn.Module = nn.Identity()

    def forward(self, input: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return self.act(self.drop(super().forward(input, *args, **kwargs)))


def _is_norm_act(bn: nn.Module) -> bool:
    """A norm + activation layer whose forward is ``norm -> drop -> act`` (timm's
    ``BatchNormAct2d`` / ``FrozenBatchNormAct2d``, this package's ``*Act2d``)."""
    return any(
        (cls is NormAct or f"{cls.__module__}.{cls.__qualname__}" in _NORM_ACT)
        and type(bn).forward is getattr(cls, "forward", None)
        for cls in type(bn).__mro__
    )


def after_norm(
    bn: nn.Module, where: str, caller: str = "convert_norms"
) -> dict[str, nn.Module] | None:
    """The ``drop`` and ``act`` children of a norm + activation layer, ``None`` for a plain
    norm, or ``ValueError`` for a forward it does not know."""
    if _is_norm_act(bn):
        return {name: getattr(bn, name) for name in _AFTER}
    if is_frozen(bn) or type(bn).forward in _PLAIN_FORWARDS:
        return None
    raise ValueError(
        f"{caller}: {type(bn).__name__} at {where!r} overrides the BatchNorm forward "
        "(it may add behaviour after the norm, e.g. an activation) and cannot be taken apart; "
        "exclude it (`exclude=`) or replace it by hand"
    )


def _domain_row(bn: nn.Module, where: str, domain: int | None, caller: str) -> int:
    """The row of a ``DomainBatchNorm`` named by ``domain`` (may be omitted with one domain)."""
    num_domains = int(getattr(bn, "num_domains", 1))
    if domain is None:
        if num_domains == 1:
            return 0
        raise ValueError(
            f"{caller}: {type(bn).__name__} at {where!r} has {num_domains} domains; "
            "name the one whose state to use with `domain=k`"
        )
    check_int("domain", domain, where=caller)
    if not 0 <= domain < num_domains:
        raise ValueError(
            f"{caller}: domain={domain} is outside [0, {num_domains}) for "
            f"{type(bn).__name__} at {where!r}"
        )
    return domain


def norm_state(bn: nn.Module, where: str, domain: int | None, caller: str) -> dict[str, Tensor]:
    """The per-channel ``[C]`` state of ``bn`` (of domain ``k`` for a ``DomainBatchNorm``)."""
    state = {n: t.detach() for n in _STATE if isinstance(t := getattr(bn, n, None), Tensor)}
    if is_domain(bn):
        row = _domain_row(bn, where, domain, caller)
        state = {
            n: t[row] if t.dim() == 2 or n == "num_batches_tracked" else t for n, t in state.items()
        }
    return state
