"""One registry of every public layer and configuration, with its reference and sample inputs.

Modelled on torch's ``module_db`` / ``ModuleInfo`` (``common_modules.py``) and torchmetrics'
``MetricTester``: each :class:`LayerInfo` says how to build the layer (seeded, with non-trivial
affine and running state), how to compute what it must return in float64 (:func:`reference`:
per-domain ``nn.BatchNorm*d`` semantics through ``F.batch_norm`` for the domain layers, the
paper's formula for BatchRenorm, the unfold formula for the cosine layers, ``F.layer_norm`` on
the channels-last permutation for ``LayerNorm2d``) and which inputs to feed it, hard cases
included (empty batch, one sample of a domain, a domain absent, one value per channel,
``channels_last``, fp16/bf16/fp64, activations of mean 100). ``tests/integration/
test_transforms.py`` runs every entry through every transform in :data:`TRANSFORMS`; a new layer
needs one entry here. A transform an entry cannot support is in ``LayerInfo.skips`` with the
reason; a known bug being fixed is in ``LayerInfo.xfails`` (strict: the fix turns it into a
failure that says to drop the mark). ``docs/coverage.md`` is :func:`coverage_markdown`'s output.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lightning_norms as ln
from lightning_norms.distributed import SyncedBatchNorm1d, SyncedBatchNorm2d, SyncedBatchNorm3d
from tests._layers import BN_STATE, randomise
from tests.test_cosine import _linear_reference, _unfold_reference
from tests.test_layernorm import _reference as _layer_norm_reference
from tests.test_renorm import _reference as _renorm_formula

F64 = torch.float64

# transform -> what it checks (the coverage table's columns, in this order)
TRANSFORMS: dict[str, str] = {
    "train": "eager training vs the float64 reference: output, input and parameter gradients, "
    "buffers (every sample input)",
    "eval": "eager eval vs the float64 reference (every sample input)",
    "autocast": "a float32 layer under bf16 autocast (CPU): training output, input gradient and "
    "buffers vs the float64 reference at bf16 tolerance",
    "inplace": "inplace ops after the layer (out += 1; relu_): gradients as out of place",
    "gradgrad": "gradcheck + gradgradcheck in float64",
    "checkpoint": "torch.utils.checkpoint, reentrant and not: outputs and gradients unchanged",
    "func": "torch.func.grad and functional_call equal autograd",
    "vmap": "per-sample gradients by vmap(grad) equal a loop of single-sample backward (eval)",
    "compile": "torch.compile(aot_eager, fullgraph), static and dynamic shapes: training steps "
    "and eval equal eager, no graph break, no recompile for a new domain mix or batch size",
    "inductor": "torch.compile(inductor): one training step equals eager (a subset)",
    "export": "torch.export.export (eval, dynamic batch size) equals eager",
    "onnx": "torch.onnx.export (eval) run in onnxruntime equals eager",
    "jit": "torch.jit.trace (eval) + save/load equals eager",
    "copy": "copy.deepcopy and pickle: same state, same outputs",
    "state_dict": "state_dict round trip into a fresh layer, strict",
    "plain_bn_state": "a plain nn.BatchNorm*d state_dict loads into every domain",
    "ddp": "2-rank gloo: synced halves equal one process on the whole batch",
}


NO_STATS = "no batch statistics: equal to its unsynced layer, no collective to check"
NOT_DOMAIN = "not a domain layer (its own state_dict is a plain BN's already)"
SAME_EVAL = "eval computation identical to the base entry's (ONNX export is slow: checked once)"


@dataclass(frozen=True)
class Sample:
    """One input of a layer: shape, domain argument, dtype, layout and value range."""

    name: str
    shape: tuple[int, ...]
    domain: int | Tensor | None = None
    dtype: torch.dtype = torch.float32
    channels_last: bool = False
    mean: float = 0.0
    xfail: str | None = None  # a known bug (reason) on this input, training only

    def make(self, seed: int = 0) -> Tensor:
        """The seeded input (std 2 around ``mean``), in ``dtype`` and layout."""
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(self.shape, generator=gen, dtype=F64) * 2 + self.mean
        x = x.to(self.dtype)
        if self.channels_last:
            fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
            x = x.contiguous(memory_format=fmt)
        return x

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of the layer call (``domain=`` for the domain layers)."""
        return {} if self.domain is None else {"domain": self.domain}


@dataclass(frozen=True)
class LayerInfo:
    """A public layer in one configuration: constructor, reference, inputs, exceptions."""

    name: str
    make: Callable[[], nn.Module]
    kind: str  # "domain", "renorm", "synced", "cosine", "layernorm"
    samples: tuple[Sample, ...]
    skips: dict[str, str] = field(default_factory=dict)  # transform -> why it cannot apply
    xfails: dict[str, str] = field(default_factory=dict)  # transform -> issue 17 item
    inductor: bool = False  # one of the few entries compiled with inductor too
    # fp16/bf16 through torch's own kernel (F.batch_norm, F.layer_norm): held to torch's
    # accuracy there, not to the fixed tolerance the fp32-statistics paths meet
    low_precision_as_torch: bool = False

    def small(self) -> Sample:
        """The default sample cut to at most 4 samples and 2 positions per spatial dim (for
        the numerical Jacobians of gradcheck / gradgradcheck)."""
        sample = self.default
        n = min(sample.shape[0], 4)
        shape = (n, sample.shape[1], *(min(s, 2) for s in sample.shape[2:]))
        ids = sample.domain[:n] if isinstance(sample.domain, Tensor) else sample.domain
        return Sample("small", shape, ids, F64)

    @property
    def default(self) -> Sample:
        """The sample the single-input transforms use (the first one)."""
        return self.samples[0]

    def build(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        """A fresh seeded layer with random affine and running state, in ``dtype``."""
        torch.manual_seed(0)
        layer = self.make()
        norm = isinstance(layer, (nn.modules.batchnorm._NormBase, nn.LayerNorm))
        # only a norm's weight is an affine scale (near 1); a cosine layer's is its kernel
        draws = BN_STATE if norm else {k: v for k, v in BN_STATE.items() if k != "weight"}
        randomise(layer, draws, seed=1)
        return layer.to(dtype)

    def status(self, transform: str) -> tuple[str, str]:
        """The coverage-table cell: ``("✓", "")``, ``("n/a", why it does not apply)`` or
        ``("✗", the known bug)``; keys are a transform (``"func"``) or a variant
        (``"func[train]"``)."""
        if transform in self.skips:
            return "n/a", self.skips[transform]
        bugs = [
            f"{key.removeprefix(transform)} {reason}".strip()
            for key, reason in self.xfails.items()
            if key == transform or key.startswith(f"{transform}[")
        ]
        if bugs:
            return "✗", "; ".join(bugs)
        if transform == "inductor" and not self.inductor:
            return "n/a", "covered by aot_eager (inductor, a slow compile, on a subset only)"
        return "✓", ""


# --- references (float64) ---


def _ema(momentum: float | None, count: Tensor) -> float:
    """torch's factor: ``momentum``, or ``1 / count`` after the count advanced (None)."""
    return 1.0 / float(count) if momentum is None else momentum


def _bn_call(
    x: Tensor, mean: Tensor | None, var: Tensor | None, weight: Tensor | None,
    bias: Tensor | None, count: Tensor | None, momentum: float | None, eps: float,
    training: bool,
) -> Tensor:
    """``nn.BatchNorm*d.forward`` on explicit state: one domain's sub-batch (``count`` advanced)."""
    if training and count is not None:
        count += 1
    factor = _ema(momentum, count) if count is not None else 0.0
    return F.batch_norm(x, mean, var, weight, bias, training, factor, eps)


def _values_per_channel(x: Tensor) -> int:
    return x.shape[0] * math.prod(x.shape[2:])


def _domain_reference(layer: nn.Module, x: Tensor, domain: int | Tensor | None) -> Tensor:
    """Each domain's sub-batch through its own ``nn.BatchNorm*d`` (API.md), in place on state."""
    ids = domain if isinstance(domain, Tensor) else torch.full((x.shape[0],), int(domain or 0))
    tracked = layer.running_mean is not None
    out = x * 0  # empty batch: an empty output still connected to x
    for d in range(getattr(layer, "num_domains", 1)):
        mask = ids == d
        if not bool(mask.any()):
            continue
        xd = x[mask]
        per_domain = layer.weight is not None and layer.weight.dim() == 2
        w = layer.weight[d] if per_domain else layer.weight
        b = layer.bias[d] if per_domain else layer.bias
        rows = (layer.running_mean, layer.running_var, layer.num_batches_tracked)
        if tracked and rows[0].dim() == 2:
            rows = (rows[0][d], rows[1][d], rows[2][d])
        mean, var, count = rows if tracked else (None, None, None)
        rare = isinstance(domain, Tensor) and (layer.training or not tracked)
        rare = rare and _values_per_channel(xd) == 1
        if rare and not tracked:  # no running statistics: BN's limit, mean = the value
            shape = [1, -1] + [1] * (x.dim() - 2)
            yd = xd * 0 if w is None else (xd * 0) * w.view(shape)
            out = out.index_put((mask,), yd if b is None else yd + b.view(shape))
            continue
        training = (layer.training or not tracked) and not rare  # the rare-domain rule
        counted = count if layer.training and not rare else None
        yd = _bn_call(xd, mean, var, w, b, counted, layer.momentum, layer.eps, training)
        out = out.index_put((mask,), yd)
    return out


def _renorm_reference(layer: nn.Module, x: Tensor, domain: object = None) -> Tensor:
    """Ioffe 2017 with the limits ramped over ``warmup_steps`` (``k`` previous steps)."""
    tracked = layer.running_mean is not None
    if not (layer.training and tracked):
        return _domain_reference(layer, x, 0)
    progress = 1.0 if layer.warmup_steps == 0 else min(
        float(layer.num_batches_tracked) / layer.warmup_steps, 1.0
    )
    r_lim, d_lim = 1 + (layer.r_max - 1) * progress, layer.d_max * progress
    ones = torch.ones(x.shape[1], dtype=x.dtype)
    w = ones if layer.weight is None else layer.weight
    b = ones * 0 if layer.bias is None else layer.bias
    mean, var = layer.running_mean.clone(), layer.running_var.clone()
    out = _renorm_formula(x, mean, var, w, b, layer.eps, r_lim, d_lim)
    with torch.no_grad():  # the running update is BatchNorm's
        _domain_reference(layer, x.detach(), 0)
    return out


def _cosine_reference(layer: nn.Module, x: Tensor, domain: object = None) -> Tensor:
    if isinstance(layer, ln.CosineLinear):
        return _linear_reference(x, layer.weight)
    if x.shape[0] == 0:  # the unfold formula needs a sample: run one, keep none
        return _cosine_reference(layer, torch.cat([x, x.new_ones(1, *x.shape[1:])]))[:0]
    padding = layer.padding
    if padding == "same":
        raise NotImplementedError("no 'same' padding entry in the registry")
    return _unfold_reference(x, layer.weight, layer.stride, padding, layer.dilation, layer.groups)


def _layernorm_reference(layer: nn.Module, x: Tensor, domain: object = None) -> Tensor:
    return _layer_norm_reference(x, layer.weight, layer.bias, layer.eps)


REFERENCES: dict[str, Callable[[nn.Module, Tensor, Any], Tensor]] = {
    "domain": _domain_reference,
    "synced": _domain_reference,
    "renorm": _renorm_reference,
    "cosine": _cosine_reference,
    "layernorm": _layernorm_reference,
}


def reference(
    info: LayerInfo, layer: nn.Module, x: Tensor, sample: Sample
) -> tuple[Tensor, nn.Module]:
    """``(output, state)``: the reference of ``layer(x)`` and the layer's state after the call.

    ``state`` is a deepcopy of ``layer`` in ``x``'s dtype (float64 for the truth; the
    sample's dtype gives what plain torch ops reach in that precision) taken before the call,
    advanced by the reference as the layer must be; its parameters are leaves, so gradients
    can be compared (make ``x`` a leaf requiring grad for the input gradient).
    """
    state = copy.deepcopy(layer).to(x.dtype)
    return REFERENCES[info.kind](state, x, sample.domain), state


# --- sample inputs ---


def _ids(*values: int) -> Tensor:
    return torch.tensor(values, dtype=torch.long)


def _bn_samples(rank: int, ids: str) -> tuple[Sample, ...]:
    """Inputs of a BN-type layer of input rank ``rank`` (2..5).

    ``ids``: ``"tensor"`` (per-sample ids of 3 domains; the last absent from most inputs),
    ``"int"`` (``domain=1``) or ``"none"`` (no ``domain`` argument).
    """
    spatial = {2: (), 3: (3,), 4: (3, 3), 5: (2, 2, 2)}[rank]
    ones = (1,) * len(spatial)
    per_sample = ids == "tensor"

    def dom(*values: int) -> Tensor | int | None:
        return _ids(*values) if per_sample else {"int": 1, "none": None}[ids]

    mixed = dom(0, 1, 0, 1, 1, 0)
    shape = (6, 4, *spatial)
    samples = [
        Sample("mixed", shape, mixed),
        Sample("offset", shape, mixed, mean=100.0),
        Sample("fp64", shape, mixed, dtype=F64),
        Sample("fp16", shape, mixed, dtype=torch.float16),
        Sample("bf16", shape, mixed, dtype=torch.bfloat16),
        Sample("fp16_offset", shape, mixed, dtype=torch.float16, mean=100.0),
        Sample("bf16_offset", shape, mixed, dtype=torch.bfloat16, mean=100.0),
        Sample("empty", (0, 4, *spatial), dom()),
    ]
    if rank >= 4:
        samples.append(Sample("channels_last", shape, mixed, channels_last=True))
    if not per_sample:
        samples.append(Sample("one_value", (1, 4, *ones), dom(0)))
        return tuple(samples)
    if spatial:
        samples.append(Sample("one_of_domain", shape, dom(0, 0, 1, 0, 0, 0)))
    samples += [
        Sample("one_value", (6, 4, *ones), dom(0, 0, 1, 0, 0, 0), ),
        Sample("all_one_domain", shape, dom(2, 2, 2, 2, 2, 2)),
    ]
    return tuple(samples)


def _free_samples(shape: tuple[int, ...]) -> tuple[Sample, ...]:
    """Inputs of a layer without batch statistics (cosine, LayerNorm2d)."""
    samples = [
        Sample("batch", shape),
        Sample("offset", shape, mean=100.0),
        Sample("fp64", shape, dtype=F64),
        Sample("fp16", shape, dtype=torch.float16),
        Sample("bf16", shape, dtype=torch.bfloat16),
        Sample("fp16_offset", shape, dtype=torch.float16, mean=100.0),
        Sample("bf16_offset", shape, dtype=torch.bfloat16, mean=100.0),
        Sample("empty", (0, *shape[1:])),
        Sample("one_sample", (1, *shape[1:])),
    ]
    if len(shape) == 4:
        samples.append(Sample("channels_last", shape, channels_last=True))
    return tuple(samples)


# --- the entries ---

_NOT_DOMAIN = {"plain_bn_state": NOT_DOMAIN}
_NO_DDP = {"ddp": "covered by the sync=True entry of the same kind (keeps the 2-rank run short)"}
def _same_eval(variant: str) -> dict[str, str]:
    """``onnx`` skipped for a variant whose eval graph is its base entry's (slow export)."""
    same = variant in ("1d[NCL]", "momentum_none", "sync", "plain", "warmup")
    return {"onnx": SAME_EVAL} if same else {}


_RANK = {"1d": 2, "1d[NCL]": 3, "2d": 4, "3d": 5}
_DOMAIN_CLS = {"1d": ln.DomainBatchNorm1d, "1d[NCL]": ln.DomainBatchNorm1d,
               "2d": ln.DomainBatchNorm2d, "3d": ln.DomainBatchNorm3d}
_RENORM_CLS = {"1d": ln.BatchRenorm1d, "1d[NCL]": ln.BatchRenorm1d,
               "2d": ln.BatchRenorm2d, "3d": ln.BatchRenorm3d}
_SYNCED_CLS = {"1d": SyncedBatchNorm1d, "2d": SyncedBatchNorm2d, "3d": SyncedBatchNorm3d}


def _domain_entries() -> list[LayerInfo]:
    entries = [
        LayerInfo(f"DomainBatchNorm{dim}", lambda cls=cls: cls(4, 3), "domain",
                  _bn_samples(_RANK[dim], "tensor"), skips={**_NO_DDP, **_same_eval(dim)},
                  inductor=dim == "2d")
        for dim, cls in _DOMAIN_CLS.items()
    ]
    variants: dict[str, dict[str, Any]] = {
        "int": {},
        "affine_off": {"affine": False},
        "shared_affine": {"shared_affine": True},
        "momentum_none": {"momentum": None},
        "no_running_stats": {"track_running_stats": False},
        "sync": {"sync": True},
    }
    for suffix, kwargs in variants.items():
        skips = {} if suffix == "sync" else dict(_NO_DDP)
        skips.update(_same_eval(suffix))
        xfails: dict[str, str] = {}
        if suffix == "no_running_stats":
            skips["plain_bn_state"] = "no running statistics to load"
        if suffix == "affine_off":
            skips["vmap"] = "no parameters"
        entries.append(LayerInfo(
            f"DomainBatchNorm2d[{suffix}]",
            lambda kwargs=kwargs: ln.DomainBatchNorm2d(4, 3, **kwargs), "domain",
            _bn_samples(4, "int" if suffix == "int" else "tensor"), skips=skips, xfails=xfails,
            low_precision_as_torch=suffix == "int",
        ))
    return entries


def _renorm_entries() -> list[LayerInfo]:
    active = {"r_max": 1.5, "d_max": 0.5, "warmup_steps": 0}
    bugs: dict[str, str] = {}  # compile[dynamic] fixed (issue 20: traced path under compile)
    entries = [
        LayerInfo(f"BatchRenorm{dim}", lambda cls=cls: cls(4, **active), "renorm",
                  _bn_samples(_RANK[dim], "none"),
                  skips={**_NOT_DOMAIN, **_NO_DDP, **_same_eval(dim)},
                  xfails=dict(bugs), inductor=dim == "2d")
        for dim, cls in _RENORM_CLS.items()
    ]
    variants: dict[str, dict[str, Any]] = {
        "plain": {"r_max": 1.0, "d_max": 0.0},
        "warmup": {"r_max": 2.0, "d_max": 1.0, "warmup_steps": 4},
        "momentum_none": {**active, "momentum": None},
        "no_running_stats": {**active, "track_running_stats": False},
        "sync": {**active, "sync": True},
    }
    for suffix, kwargs in variants.items():
        skips = {**_NOT_DOMAIN} if suffix == "sync" else {**_NOT_DOMAIN, **_NO_DDP}
        skips.update(_same_eval(suffix))
        entries.append(LayerInfo(
            f"BatchRenorm2d[{suffix}]", lambda kwargs=kwargs: ln.BatchRenorm2d(4, **kwargs),
            "renorm", _bn_samples(4, "none"), skips=skips,
            xfails={} if suffix in ("plain", "no_running_stats") else dict(bugs),
            low_precision_as_torch=suffix in ("plain", "no_running_stats"),
        ))
    return entries


def _synced_entries() -> list[LayerInfo]:
    others = {**_NO_DDP, **_same_eval("sync")}  # 1d/3d: the 2d entry covers DDP and ONNX
    return [
        LayerInfo(f"SyncedBatchNorm{dim}", lambda cls=cls: cls(4), "synced",
                  _bn_samples(_RANK[dim], "none"),
                  skips={**_NOT_DOMAIN, **({} if dim == "2d" else others)},
                  low_precision_as_torch=True)
        for dim, cls in _SYNCED_CLS.items()
    ]


_FREE_SKIPS = {
    "plain_bn_state": "not a BatchNorm",
    "ddp": NO_STATS,
    "gradgrad[eval]": "training and eval are the same computation (gradgrad[train])",
}


def _free_entries() -> list[LayerInfo]:
    conv: dict[str, dict[str, Any]] = {
        "1x1": {"kernel_size": 1},
        "3x3": {"kernel_size": 3, "padding": 1},
        "stride2": {"kernel_size": 3, "stride": 2, "padding": 1},
        "dilation2": {"kernel_size": 3, "padding": 2, "dilation": 2},
        "groups2": {"kernel_size": 3, "padding": 1, "groups": 2},
    }
    entries = [LayerInfo("CosineLinear", lambda: ln.CosineLinear(4, 3), "cosine",
                         _free_samples((5, 4)), skips=dict(_FREE_SKIPS))]
    entries += [
        LayerInfo(f"CosineConv2d[{suffix}]", lambda kwargs=kwargs: ln.CosineConv2d(4, 2, **kwargs),
                  "cosine", _free_samples((2, 4, 4, 4)), skips=dict(_FREE_SKIPS),
                  inductor=suffix == "3x3")
        for suffix, kwargs in conv.items()
    ]
    entries += [
        LayerInfo(f"LayerNorm2d[affine={'on' if affine else 'off'}]",
                  lambda affine=affine: ln.LayerNorm2d(4, affine=affine), "layernorm",
                  _free_samples((2, 4, 3, 3)), low_precision_as_torch=True,
                  skips={**_FREE_SKIPS, **({} if affine else {"vmap": "no parameters"})})
        for affine in (True, False)
    ]
    return entries


REGISTRY: tuple[LayerInfo, ...] = (
    *_domain_entries(), *_renorm_entries(), *_synced_entries(), *_free_entries()
)
"""Every public layer in every configuration the harness runs."""

BY_NAME: dict[str, LayerInfo] = {info.name: info for info in REGISTRY}


def _escape_brackets(text: str) -> str:
    """``[x]`` in a note would be read as a cross-reference by the docs build: escape it."""
    return text.replace("[", "\\[").replace("]", "\\]")


def coverage_markdown() -> str:
    """``docs/coverage.md``: the registry x transforms table, ✓ or a note with the reason."""
    notes: dict[str, int] = {}
    rows = []
    for info in REGISTRY:
        cells = []
        for transform in TRANSFORMS:
            mark, reason = info.status(transform)
            if reason:
                mark = f"{mark} [{notes.setdefault(reason, len(notes) + 1)}]"
            cells.append(mark)
        rows.append(f"| `{info.name}` | " + " | ".join(cells) + " |")
    lines = [
        "# Layers and transforms",
        "",
        "Generated from the layer registry (`tests/_registry.py`) by",
        "`python -m tests.integration.gen_coverage`; `tests/integration/test_transforms.py` runs",
        "every ✓ cell and fails when this page is out of date. ✗: a known bug, run as a strict",
        "xfail until it is fixed; n/a: the transform does not apply or another entry covers it.",
        "",
        "| Transform | What is checked |",
        "|---|---|",
        *(f"| `{name}` | {text} |" for name, text in TRANSFORMS.items()),
        "",
        "| Layer | " + " | ".join(f"`{t}`" for t in TRANSFORMS) + " |",
        "|---|" + "---|" * len(TRANSFORMS),
        *rows,
        "",
        *(f"[{n}] {_escape_brackets(reason)}  " for reason, n in notes.items()),
        "",
        "Sample inputs (`train` and `eval` run every one of them):",
        "",
        *(f"- `{info.name}`: " + ", ".join(s.name for s in info.samples) for info in REGISTRY),
        "",
        "fp16/bf16 accuracy: within a fixed tolerance of the float64 truth (bf16: 1e-2 relative,",
        "1.6e-2 of the output's scale), also at mean 100, except where the layer computes through",
        "torch's own kernel, which is held to torch's accuracy (twice its error): "
        + ", ".join(f"`{i.name}`" for i in REGISTRY if i.low_precision_as_torch) + ".",
    ]
    return "\n".join(lines) + "\n"
