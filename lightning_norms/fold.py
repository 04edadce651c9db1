"""Fold BatchNorm layers into the convolution or linear layer they normalise, for inference.

In eval, a BatchNorm layer is a per-channel affine map with fixed coefficients, so a BatchNorm
that directly follows a convolution or a linear layer can be merged into it: one layer less
to run and to export. Which layer feeds which is read from the model's forward traced by
:mod:`torch.fx`, not guessed from the module order.
"""

from __future__ import annotations

import sys
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import parametrize

from lightning_norms._kinds import after_norm, norm_state
from lightning_norms.convert import bn_modules

__all__ = ["FoldReport", "fold_norms"]

# the layers a norm is folded into (their own forward: ``conv(x, W) + b`` / ``x W^T + b``)
_LINEAR = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
)


@dataclass(repr=False)
class FoldReport:
    """What :func:`fold_norms` did.

    Attributes:
        model: the model, folded in place (the same module object that was passed).
        folded: the names (``named_modules()``) of the norm layers folded and replaced.
        kept: norm layer name -> why it was left as it is.
    """

    model: nn.Module
    folded: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"FoldReport(folded={len(self.folded)} layer(s), kept={self.kept!r})"


class _Tracer(fx.Tracer):
    """``torch.fx``'s tracer that stops at every norm layer (``leaves``), at this package's
    layers and at the modules and functions timm registers as not traceable."""

    def __init__(self, leaves: set[int]) -> None:
        timm_fx = sys.modules.get("timm.layers._fx")
        functions = [f for f in timm_fx.get_notrace_functions() if callable(f)] if timm_fx else []
        super().__init__(autowrap_functions=tuple(functions))
        self._leaves = leaves
        self._timm_leaves = set(timm_fx.get_notrace_modules()) if timm_fx else set()

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            id(m) in self._leaves
            or type(m) in self._timm_leaves
            or type(m).__module__.startswith("lightning_norms.")
            or super().is_leaf_module(m, module_qualified_name)
        )


def _affine(norm: nn.Module, name: str, domain: int | None) -> tuple[Tensor, Tensor] | str:
    """The eval-mode map of ``norm`` as ``y = x * scale + shift`` per channel (float64), or why
    it has none."""
    if isinstance(norm, LazyModuleMixin) and norm.has_uninitialized_params():
        return "not initialised (a lazy layer that never ran)"
    try:
        after_norm(norm, name)
    except ValueError:
        return f"{type(norm).__name__} overrides the BatchNorm forward"
    # float64 on the CPU (MPS has no float64): exact enough to fold any dtype into
    state = {k: v.cpu().double() for k, v in norm_state(norm, name, domain, "fold_norms").items()}
    if "running_mean" not in state or not getattr(norm, "track_running_stats", True):
        return "no running statistics: it normalises with batch statistics in eval too"
    mean, var = state["running_mean"], state["running_var"]
    scale = (var + cast(float, norm.eps)).rsqrt()
    if "weight" in state:
        scale = scale * state["weight"]
    shift = -mean * scale
    if "bias" in state:
        shift = shift + state["bias"]
    return scale, shift


def _describe(node: Any, modules: dict[str, nn.Module]) -> str:
    """A short description of what produced ``node`` (a norm's input)."""
    if not isinstance(node, fx.Node):
        return f"a constant {node!r}"
    if node.op == "call_module":
        return f"{type(modules[str(node.target)]).__name__} {node.target!r}"
    if node.op == "placeholder":
        return f"the model's input {node.target!r}"
    return f"{getattr(node.target, '__name__', node.target)}()"


def _source(
    node: fx.Node, modules: dict[str, nn.Module], calls: Counter, shared: set[int]
) -> nn.Module | str:
    """The conv / linear layer whose output is ``node``'s only input, or why there is none."""
    if len(node.args) != 1 or node.kwargs:
        return "called with more than its input"
    producer = node.args[0]
    if not isinstance(producer, fx.Node):
        return f"its input is {_describe(producer, modules)}, not a Conv or Linear output"
    layer = modules.get(str(producer.target))
    if (
        layer is None
        or producer.op != "call_module"
        or not any(type(layer).forward is cls.forward for cls in _LINEAR)
    ):
        return f"its input is {_describe(producer, modules)}, not a Conv or Linear output"
    if calls[producer.target] > 1:
        return f"its input layer {producer.target!r} is called more than once"
    if len(producer.users) > 1:
        return f"the output of {producer.target!r} is also used elsewhere"
    if any(id(p) in shared for p in layer.parameters(recurse=False)):
        return f"the weights of {producer.target!r} are shared with another module"
    if parametrize.is_parametrized(layer) or layer._forward_hooks or layer._forward_pre_hooks:
        return f"{producer.target!r} has hooks or parametrizations"
    return layer


def _fold(layer: nn.Module, scale: Tensor, shift: Tensor) -> None:
    """``W' = W * scale`` per output channel, ``b' = b * scale + shift`` (float64, CPU)."""
    weight = layer.get_parameter("weight")
    bias = cast("Tensor | None", layer.bias)
    w64 = weight.detach().cpu().double()
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):  # [in, out / groups, *kernel]
        groups, out = layer.groups, weight.shape[1]
        factor = scale.view(groups, 1, out, *[1] * (weight.dim() - 2))
        new = (w64.unflatten(0, (groups, -1)) * factor).flatten(0, 1)
    else:  # [out, in / groups, *kernel] or [out, in]
        new = w64 * scale.view(-1, *[1] * (weight.dim() - 1))
    new_bias = shift if bias is None else bias.detach().cpu().double() * scale + shift
    with torch.no_grad():
        weight.copy_(new)
        if bias is None:
            new_bias = new_bias.to(device=weight.device, dtype=weight.dtype)
            layer.bias = nn.Parameter(new_bias, requires_grad=weight.requires_grad)
        else:
            bias.copy_(new_bias)


def _replace(model: nn.Module, old: nn.Module) -> None:
    """Every reference to ``old`` in ``model``: ``nn.Identity``, or the ``drop`` and ``act``
    of a norm + activation layer (their ``state_dict`` keys unchanged)."""
    after = after_norm(old, "")
    new = nn.Identity() if after is None else nn.Sequential(OrderedDict(after))
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if child is old:
                setattr(parent, name, new)


def _plan(
    model: nn.Module, graph: fx.Graph, domain: int | None
) -> dict[str, tuple[nn.Module, Tensor, Tensor] | str]:
    """Norm name -> (layer to fold it into, scale, shift), or the reason it stays."""
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    seen: Counter[int] = Counter(
        id(p) for p in (p for _, p in model.named_parameters(remove_duplicate=False))
    )
    shared = {key for key, count in seen.items() if count > 1}
    nodes = {n.target: n for n in graph.nodes if n.op == "call_module"}
    plan: dict[str, tuple[nn.Module, Tensor, Tensor] | str] = {}
    for name, norm in bn_modules(model):
        affine = _affine(norm, name, domain)
        if name not in nodes:
            plan[name] = "not called by the traced forward"
        elif calls[name] > 1:
            plan[name] = "called more than once in the forward"
        elif isinstance(affine, str):
            plan[name] = affine
        elif norm._forward_hooks or norm._forward_pre_hooks:
            plan[name] = "it has hooks (folding would drop them)"
        else:
            layer = _source(nodes[name], modules, calls, shared)
            size = getattr(layer, "out_channels", getattr(layer, "out_features", None))
            if not isinstance(layer, str) and size != affine[0].numel():
                layer = f"{size} outputs of its input layer, {affine[0].numel()} channels"
            plan[name] = layer if isinstance(layer, str) else (layer, *affine)
    return plan


def fold_norms(model: nn.Module, *, domain: int | None = None) -> FoldReport:
    r"""Fold every BatchNorm-type layer into the conv or linear layer before it, in place.

    In eval mode a BatchNorm layer (Ioffe & Szegedy 2015) computes
    :math:`y = \gamma (z - \mu) / \sqrt{\sigma^2 + \epsilon} + \beta` with fixed running
    statistics. When :math:`z = W x + b` is the output of an ``nn.Conv1d/2d/3d``,
    ``nn.ConvTranspose1d/2d/3d`` or ``nn.Linear`` used nowhere else, the two merge into that
    layer (per output channel, computed in float64)::

        W' = W * gamma/sqrt(var+eps)
        b' = (b - mean) * gamma/sqrt(var+eps) + beta

    (a layer without bias gets one) and the norm is replaced by ``nn.Identity``. Folded:
    ``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm``, ``BatchRenorm*d`` and ``SyncedBatchNorm*d``
    (their eval form is BatchNorm's), torchvision's ``FrozenBatchNorm2d``, ``DomainBatchNorm*d``
    with the statistics and affine of domain ``domain=k``, and the norm part of timm's
    ``BatchNormAct2d`` / ``FrozenBatchNormAct2d`` (replaced by an ``nn.Sequential`` of its
    ``drop`` and ``act``, whose keys stay). Which layer feeds a norm is read from the forward
    traced by ``torch.fx`` (``symbolic_trace`` with the norm layers, this package's layers and
    timm's untraceable modules as leaves), never from the module order. A norm stays, with the
    reason in :attr:`FoldReport.kept`, when its input is not such a layer's output (e.g. it
    follows a ReLU or an addition), that output is also used elsewhere (a residual branch),
    either layer is called more than once or has hooks, the weights are tied, or the norm has
    no running statistics; when the forward cannot be traced (data-dependent control flow),
    nothing is folded and every norm is kept with the tracer's error. A ``BatchNorm1d`` after
    a ``Linear`` is assumed to normalise the linear layer's features (an ``(N, C)`` input);
    the trace has no shapes to tell a ``(N, L, C)`` input whose ``L`` equals ``C``.

    Args:
        model: the model, in eval mode; modified in place.
        domain: the domain whose statistics a ``DomainBatchNorm`` with several domains folds
            (may be omitted with one domain). Default: ``None``.

    Returns:
        A :class:`FoldReport` (``model``, ``folded`` names, ``kept`` name -> reason).

    Raises:
        ValueError: ``model`` or one of its norm layers is in training mode; a
            ``DomainBatchNorm`` with several domains and no ``domain``, or ``domain`` outside
            its range.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
        ...                     nn.BatchNorm2d(8)).eval()
        >>> x = torch.randn(2, 3, 8, 8)
        >>> expected = net(x)
        >>> report = fold_norms(net)
        >>> report.folded
        ['1']
        >>> print(report.kept["3"])
        its input is ReLU '2', not a Conv or Linear output
        >>> net[1], torch.allclose(net(x), expected, atol=1e-6)
        (Identity(), True)
    """
    norms = bn_modules(model)
    training = [name or "<model>" for name, m in [("", model), *norms] if m.training]
    if training:
        raise ValueError(
            f"fold_norms: {type(model).__name__} is in training mode ({training[:3]}); folding "
            "uses the running statistics of eval mode: call model.eval() first"
        )
    report = FoldReport(model)
    try:
        graph = _Tracer({id(m) for _, m in norms}).trace(model)
    except Exception as err:  # any tracing failure: fold nothing, say why
        reason = f"torch.fx cannot trace {type(model).__name__}: {type(err).__name__}: {err}"
        report.kept = {name: reason for name, _ in norms}
        return report
    plan = _plan(model, graph, domain)
    for name, norm in norms:
        step = plan[name]
        if isinstance(step, str):
            report.kept[name] = step
        else:
            _fold(*step)
            _replace(model, norm)
            report.folded.append(name)
    return report
