"""Every target of issue 20 (one grouped-BN kernel) next to its threshold, met or missed, one run.

Run: ``python bench/bench_targets.py [--threads 1] [--rounds 7] [--quick]``. CPU, training
mode unless a row says eval. Sections, in this order (each row: target, threshold, measured,
``met`` / ``MISSED``; ``info`` rows have no threshold and ``ctl`` rows are the noise floor):

- ``host reads``: profiler count of ``aten::_local_scalar_dense``, ``item``, ``is_nonzero``,
  ``nonzero``, ``unique`` (``lightning_norms._tracing.HOST_READS``) in one training
  forward+backward and one eval forward (``torch.no_grad()``), for every public layer, each
  read counted once (the outermost of nested events: ``bool(t)`` is ``is_nonzero`` calling
  ``item`` calling ``_local_scalar_dense``, one read). ``.tolist()`` of a CPU tensor calls no
  aten op and is not seen on CPU (on CUDA it is a device-to-host copy);
- ``launches``: top-level aten ops that are not views or allocations (``gpu_check.NO_KERNEL``)
  in one forward+backward at 32x64x16x16, next to the native twin's count (``nn.BatchNorm2d``,
  ``nn.Conv2d``, ``nn.Linear``, all ``bias=False`` where ours has none);
- ``eager``: forward+backward time ratios, ours / peer, per size; every round times each side
  back to back (``torch.utils.benchmark``, ``blocked_autorange``) in an order rotated each
  round, and the figure is the median over rounds of the per-round ratios (as
  ``bench/bench_domain.py``). With one thread the clock is the thread's CPU time. Peers:
  ``nn.BatchNorm2d``, the masked ModuleList of BNs (``bench/_peers.py``), ``nn.Conv2d``,
  ``nn.Linear``; the ``ctl`` row of each group times the peer against a copy of itself;
- ``compiled``: ``torch.compile`` (inductor; ``aot_eager`` with ``--quick``), ``dynamic=False``,
  ours / compiled ``nn.BatchNorm2d`` at 32x64x16x16, with a compiled BN copy as control; graph
  breaks from ``torch._dynamo.explain`` in training and eval (static shapes); compiles counted
  by a backend that counts its calls (default ``dynamic``: the second size recompiles with a
  dynamic batch dimension), over 3 batch sizes x 3 domain compositions (an ``int`` domain: the
  values 0, 1, 2), and the graph breaks of that run (``torch._dynamo.utils.counters``);
- ``precise BN``: ``recompute_bn_stats`` / the bare no-grad training-mode forwards over the same
  batches (``bench/bench_precise_bn.py``'s method: rotated order, median of per-round ratios,
  the bare forwards timed twice as control) on torchvision ``resnet18`` and
  ``mobilenet_v3_small`` (``num_classes=10``, 32x3x32x32), and its largest relative variance
  error against a float64 reference of every BN layer's inputs;
- ``memory``: peak memory of one forward+backward at 32x64x16x16 from the profiler's memory
  events (``profile_memory=True``: the running sum, in op-end order, of each op's own
  allocations minus frees, peak above the step's start, previous gradients freed before; fp32
  and bf16 input), the bytes saved for backward
  (``torch.autograd.graph.saved_tensors_hooks``, distinct storages) and, under bf16 input, the
  number of activation-sized fp32 tensors the ops make (a ``TorchDispatchMode`` counting op
  outputs that alias no input; issue 21 item 3), each against ``nn.BatchNorm2d``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn
from torch.utils import benchmark
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(_BENCH))
sys.path.insert(0, str(_BENCH.parent))

from _peers import MaskedBatchNorms  # noqa: E402
from bench_precise_bn import _errors, _Float64Reference  # noqa: E402
from gpu_check import HOST_READS, _count_ops  # noqa: E402

import lightning_norms  # noqa: E402
from lightning_norms import (  # noqa: E402
    BatchRenorm2d,
    CosineConv2d,
    CosineLinear,
    DomainBatchNorm2d,
    LayerNorm2d,
)
from lightning_norms.distributed import SyncedBatchNorm2d  # noqa: E402
from lightning_norms.stats import recompute_bn_stats  # noqa: E402

Step = Callable[[], None]
LAUNCH_SHAPE = (32, 64, 16, 16)


@dataclass
class Row:
    """One printed line: a target, its threshold, what was measured and whether it is met."""

    name: str
    threshold: str
    measured: str
    met: bool | None  # None: an info or control row (no threshold)


ROWS: list[Row] = []


def report(name: str, measured: str, met: bool | None, threshold: str = "-") -> None:
    """Record and print one row at once (a long run shows its progress)."""
    row = Row(name, threshold, measured, met)
    ROWS.append(row)
    verdict = {True: "met", False: "MISSED", None: "info"}[met]
    print(f"{name:<58} {threshold:>10} {measured:>22}  {verdict}", flush=True)


def section(title: str) -> None:
    print(f"\n== {title}", flush=True)


def step_fn(module: nn.Module, x: Tensor, kwargs: dict[str, Any] | None = None) -> Step:
    """One forward+backward of ``module`` on ``x`` with a fixed output gradient (warmed up)."""
    kwargs = kwargs or {}
    x = x.detach().requires_grad_(True)
    with torch.no_grad():
        grad = torch.randn_like(module(x, **kwargs).float()).to(x.dtype)

    def step() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x, **kwargs).backward(grad)

    step()
    return step


def mixed_ids(n: int, seed: int = 0) -> Tensor:
    """A shuffled balanced mix of 2 domains (as ``MixingBatchSampler`` gives)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g) % 2


# ---------------------------------------------------------------------------- host reads


def _layers(c: int, ids: Tensor) -> Iterator[tuple[str, nn.Module, dict[str, Any], bool]]:
    """(name, layer, forward kwargs, 2-D input?) for every public layer, ``c`` channels."""
    yield "nn.BatchNorm2d (control)", nn.BatchNorm2d(c), {}, False
    yield "DomainBatchNorm2d ids", DomainBatchNorm2d(c, 2), {"domain": ids}, False
    yield "DomainBatchNorm2d int", DomainBatchNorm2d(c, 2), {"domain": 1}, False
    yield "BatchRenorm2d", BatchRenorm2d(c, warmup_steps=0), {}, False
    yield "SyncedBatchNorm2d", SyncedBatchNorm2d(c), {}, False
    yield "CosineConv2d 1x1", CosineConv2d(c, c, 1), {}, False
    yield "CosineConv2d 3x3", CosineConv2d(c, c, 3, padding=1), {}, False
    yield "CosineLinear", CosineLinear(c, c), {}, True
    yield "LayerNorm2d", LayerNorm2d(c), {}, False


def count_host_reads(fn: Step) -> int:
    """Host reads (``HOST_READS`` events not nested in another) while ``fn`` runs."""
    from torch.profiler import profile

    with profile() as prof:
        fn()
    return sum(
        1
        for e in prof.events()
        if e.name in HOST_READS and (e.cpu_parent is None or e.cpu_parent.name not in HOST_READS)
    )


def host_reads(quick: bool) -> None:
    section("host reads per training forward+backward / eval forward (profiler)")
    n, c = 8, 16
    for name, layer, kwargs, flat in _layers(c, mixed_ids(n)):
        x = torch.randn(n, c) if flat else torch.randn(n, c, 8, 8)
        step = step_fn(layer.train(), x, kwargs)
        train = count_host_reads(step)
        layer.eval()
        with torch.no_grad():
            evals = count_host_reads(functools.partial(_forward, layer, x, kwargs))
        met = None if "control" in name else train == 0 and evals == 0
        report(f"host reads  {name}  train / eval", f"{train} / {evals}", met, "0 / 0")


def _forward(module: nn.Module, x: Tensor, kwargs: dict[str, Any]) -> None:
    module(x, **kwargs)


# ------------------------------------------------------------------------------ launches

LAUNCH_TARGETS = {
    "DomainBatchNorm2d ids": 32,
    "DomainBatchNorm2d int": 10,
    "BatchRenorm2d": 20,
    "CosineConv2d 1x1": 22,
    "CosineConv2d 3x3": 22,
    "CosineLinear": 18,
}


def _launch_cases() -> Iterator[tuple[str, nn.Module, dict[str, Any], nn.Module, Tensor]]:
    n, c = LAUNCH_SHAPE[:2]
    x = torch.randn(LAUNCH_SHAPE) + 1
    bn = nn.BatchNorm2d(c)
    yield "nn.BatchNorm2d (control)", nn.BatchNorm2d(c), {}, bn, x
    yield "DomainBatchNorm2d ids", DomainBatchNorm2d(c, 2), {"domain": mixed_ids(n)}, bn, x
    yield "DomainBatchNorm2d int", DomainBatchNorm2d(c, 2), {"domain": 1}, bn, x
    yield "BatchRenorm2d", BatchRenorm2d(c, warmup_steps=0), {}, bn, x
    yield "SyncedBatchNorm2d", SyncedBatchNorm2d(c), {}, bn, x
    for k in (1, 3):
        conv = nn.Conv2d(c, c, k, padding=k // 2, bias=False)
        yield f"CosineConv2d {k}x{k}", CosineConv2d(c, c, k, padding=k // 2), {}, conv, x
    linear, xl = nn.Linear(c * 4, c, bias=False), torch.randn(n * 8, c * 4)
    yield "CosineLinear", CosineLinear(c * 4, c), {}, linear, xl
    yield "LayerNorm2d", LayerNorm2d(c), {}, nn.GroupNorm(1, c), x


def launches(quick: bool) -> None:
    section(f"launches per forward+backward at {'x'.join(map(str, LAUNCH_SHAPE))}, ours (twin)")
    for name, ours, kwargs, twin, x in _launch_cases():
        count, native = _count_ops(step_fn(ours, x, kwargs)), _count_ops(step_fn(twin, x))
        limit = LAUNCH_TARGETS.get(name)
        met = None if limit is None else count <= limit
        threshold = "-" if limit is None else f"<= {limit}"
        report(f"launches  {name}", f"{count} (twin {native})", met, threshold)


# --------------------------------------------------------------------------------- eager


def time_step(step: Step, min_run_time: float) -> float:
    """Median seconds of one call (thread CPU time with one thread)."""
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    timer = benchmark.Timer(stmt="step()", globals={"step": step}, timer=clock)
    return timer.blocked_autorange(min_run_time=min_run_time).median


def median_ratios(
    sides: dict[str, Step], pairs: dict[str, tuple[str, str]], rounds: int, min_run_time: float
) -> dict[str, float]:
    """Per pair, the median over rounds of the per-round ratio ``a / b`` (order rotated)."""
    names = list(sides)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(time_step(sides[name], min_run_time))
    return {
        label: statistics.median(ta / tb for ta, tb in zip(times[a], times[b], strict=True))
        for label, (a, b) in pairs.items()
    }


def _ratio_rows(what: str, ratios: dict[str, float], limits: dict[str, float | None]) -> None:
    for label, ratio in ratios.items():
        limit = limits.get(label)
        met = None if limit is None else ratio <= limit
        threshold = "-" if limit is None else f"<= {limit}x"
        report(f"{what}  {label}", f"{ratio:.2f}x", met, threshold)


IDS_LIMITS = {(8, 16, 4, 4): 2.5, (8, 16, 16, 16): 1.6, (64, 64, 16, 16): 1.2}
IDS_LIMITS[(64, 64, 56, 56)] = 1.1


def eager_bn(
    shape: tuple[int, int, int, int], rounds: int, min_run_time: float, with_mask: bool
) -> None:
    """DomainBatchNorm2d ids and BatchRenorm2d against nn.BatchNorm2d (and the masked BNs)."""
    n, c = shape[:2]
    torch.manual_seed(0)
    x, ids = torch.randn(shape) * 2 + 0.5, mixed_ids(n)
    bn = nn.BatchNorm2d(c)
    sides = {
        "bn": step_fn(bn, x),
        "bn copy": step_fn(copy.deepcopy(bn), x),
        "ids": step_fn(DomainBatchNorm2d(c, 2), x, {"domain": ids}),
        "renorm": step_fn(BatchRenorm2d(c, warmup_steps=0), x),
    }
    pairs = {"ctl BN / BN copy": ("bn copy", "bn"), "DomainBatchNorm2d ids / BN": ("ids", "bn")}
    pairs["BatchRenorm2d / BN"] = ("renorm", "bn")
    if with_mask:
        sides["mask"] = step_fn(MaskedBatchNorms(c, 2), x, {"domain": ids})
        pairs["DomainBatchNorm2d ids / masked BNs"] = ("ids", "mask")
    limits: dict[str, float | None] = {"DomainBatchNorm2d ids / BN": IDS_LIMITS.get(shape)}
    limits |= {"BatchRenorm2d / BN": 1.05, "DomainBatchNorm2d ids / masked BNs": 0.5}
    ratios = median_ratios(sides, pairs, rounds, min_run_time)
    _ratio_rows(f"eager {'x'.join(map(str, shape))}", ratios, limits)


def eager_cosine(rounds: int, min_run_time: float, quick: bool) -> None:
    """CosineConv2d 1x1 against nn.Conv2d, CosineLinear against nn.Linear (with controls)."""
    maps = [(8, 16, 16, 16)] if quick else [(8, 16, 16, 16), (32, 64, 16, 16)]
    for shape in maps:
        c, x = shape[1], torch.randn(shape)
        conv = nn.Conv2d(c, c, 1)
        sides = {
            "conv": step_fn(conv, x),
            "conv copy": step_fn(copy.deepcopy(conv), x),
            "ours": step_fn(CosineConv2d(c, c, 1), x),
        }
        pairs = {
            "ctl Conv2d / copy": ("conv copy", "conv"),
            "CosineConv2d 1x1 / Conv2d": ("ours", "conv"),
        }
        ratios = median_ratios(sides, pairs, rounds, min_run_time)
        _ratio_rows(
            f"eager {'x'.join(map(str, shape))}", ratios, {"CosineConv2d 1x1 / Conv2d": 1.4}
        )
    for rows, features in ((64, 256),) if quick else ((64, 256), (256, 1024)):
        x, linear = torch.randn(rows, features), nn.Linear(features, features)
        sides = {
            "linear": step_fn(linear, x),
            "linear copy": step_fn(copy.deepcopy(linear), x),
            "ours": step_fn(CosineLinear(features, features), x),
        }
        pairs = {"ctl Linear / copy": ("linear copy", "linear")}
        pairs["CosineLinear / Linear"] = ("ours", "linear")
        ratios = median_ratios(sides, pairs, rounds, min_run_time)
        _ratio_rows(f"eager [{rows},{features}]", ratios, {"CosineLinear / Linear": 1.2})


def eager_grid(quick: bool) -> list[tuple[tuple[int, int, int, int], bool]]:
    """(size, with the masked-BN peer): the issue's 4 sizes, mid and large with the peer."""
    if quick:
        return [((8, 16, 4, 4), False), ((8, 16, 16, 16), True)]
    small = [((8, 16, 4, 4), False), ((8, 16, 16, 16), False)]
    return [*small, ((64, 64, 16, 16), True), ((64, 64, 56, 56), True)]


# ------------------------------------------------------------------------------ compiled


def bn_variants(c: int, ids: Tensor) -> dict[str, tuple[nn.Module, dict[str, Any]]]:
    """Every BN variant of the package (2-D) with its forward kwargs."""
    return {
        "DomainBatchNorm2d ids": (DomainBatchNorm2d(c, 2), {"domain": ids}),
        "DomainBatchNorm2d int": (DomainBatchNorm2d(c, 2), {"domain": 1}),
        "BatchRenorm2d": (BatchRenorm2d(c, warmup_steps=0), {}),
        "SyncedBatchNorm2d": (SyncedBatchNorm2d(c), {}),
    }


def compiled_ratios(backend: str, rounds: int, min_run_time: float, quick: bool) -> None:
    shape = (8, 16, 8, 8) if quick else LAUNCH_SHAPE
    n, c = shape[:2]
    torch._dynamo.reset()
    x, bn = torch.randn(shape) * 2 + 0.5, nn.BatchNorm2d(c)

    def compiled(m: nn.Module) -> nn.Module:
        return torch.compile(m, backend=backend, dynamic=False)  # type: ignore[return-value]

    sides = {"bn": step_fn(compiled(bn), x), "bn copy": step_fn(compiled(copy.deepcopy(bn)), x)}
    pairs = {"ctl BN / BN copy": ("bn copy", "bn")}
    for name, (layer, kwargs) in bn_variants(c, mixed_ids(n)).items():
        sides[name] = step_fn(compiled(layer), x, kwargs)
        pairs[f"{name} / BN"] = (name, "bn")
    ratios = median_ratios(sides, pairs, rounds, min_run_time)
    limits: dict[str, float | None] = {label: 1.1 for label in pairs if "ctl" not in label}
    _ratio_rows(f"compiled ({backend}) {'x'.join(map(str, shape))}", ratios, limits)


def graph_breaks() -> None:
    n, c = 8, 16
    x = torch.randn(n, c, 8, 8)
    for name, (layer, kwargs) in bn_variants(c, mixed_ids(n)).items():
        breaks, graphs = 0, 0
        for training in (True, False):
            layer.train(training)
            torch._dynamo.reset()
            explained = torch._dynamo.explain(lambda x, m=layer, kw=kwargs: m(x, **kw))(x)
            breaks += explained.graph_break_count
            graphs += explained.graph_count
        report(f"graph breaks  {name}  train+eval", f"{breaks} ({graphs} graphs)", breaks == 0, "0")


def _compositions(name: str, n: int) -> list[dict[str, Any]]:
    """3 domain compositions of a batch of ``n``: per-sample ids or the int domain's value."""
    if name == "DomainBatchNorm2d ids":
        one = torch.zeros(n, dtype=torch.long)
        one[n // 2] = 1
        return [{"domain": ids} for ids in (mixed_ids(n), torch.zeros_like(one), one)]
    if name == "DomainBatchNorm2d int":
        return [{"domain": d} for d in (0, 1, 2)]
    return [{}]


class CountingBackend:
    """A ``torch.compile`` backend that runs the captured graph eagerly and counts compiles."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Tensor]) -> Callable:
        self.calls += 1
        return gm.forward


def compile_counts() -> None:
    """Compiles (calls of a counting backend) over 3 batch sizes x 3 compositions, training."""
    c = 16
    for name, (layer, _) in bn_variants(c, mixed_ids(8)).items():
        if name == "DomainBatchNorm2d int":
            layer = DomainBatchNorm2d(c, 3)  # three int domains: three compositions
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        backend = CountingBackend()
        compiled = torch.compile(layer, backend=backend)
        batches = 0
        for n in (8, 16, 24):
            for kwargs in _compositions(name, n):
                compiled(torch.randn(n, c, 8, 8, requires_grad=True), **kwargs).sum().backward()
                batches += 1
        what = "3 sizes x 3 compositions" if batches == 9 else "3 sizes"
        report(f"compiles  {name}  {what}", str(backend.calls), backend.calls <= 2, "<= 2")
        breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
        report(f"graph breaks  {name}  same run (dynamic shapes)", str(breaks), breaks == 0, "0")


# ---------------------------------------------------------------------------- precise BN


def _vision_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None, num_classes=10)  # type: ignore[no-any-return]


def _forwards(model: nn.Module, batches: list[Tensor]) -> None:
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)


def _recompute(model: nn.Module, batches: list[Tensor]) -> None:
    recompute_bn_stats(model, batches, num_batches=len(batches), progress=False)


def _variance_error(name: str, batches: list[Tensor]) -> float:
    """Largest relative error of the recomputed running variance against float64."""
    reference_model = _vision_model(name).eval()
    for m in reference_model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.train()
            m.momentum = 0.0
    reference = _Float64Reference(reference_model)
    with torch.no_grad():
        for x in batches:
            reference_model(x)
    model = _vision_model(name)
    _recompute(model, batches)
    return _errors(model, reference.stats())[1]


def precise_bn(rounds: int, quick: bool) -> None:
    count, size = (2, 8) if quick else (10, 32)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(size, 3, 32, 32, generator=g) for _ in range(count)]
    clock = time.thread_time if torch.get_num_threads() == 1 else time.process_time
    for name in ("resnet18", "mobilenet_v3_small"):
        model = _vision_model(name)
        cases: dict[str, Step] = {
            "forwards": functools.partial(_forwards, model, batches),
            "recompute": functools.partial(_recompute, model, batches),
            "control": functools.partial(_forwards, model, batches),
        }
        seconds: dict[str, list[float]] = {case: [] for case in cases}
        names = list(cases)
        for r in range(rounds + 1):  # round 0 is the warm-up
            for case in names[r % 3 :] + names[: r % 3]:
                start = clock()
                cases[case]()
                if r:
                    seconds[case].append(clock() - start)
        ratio = {
            case: statistics.median(a / b for a, b in zip(t, seconds["forwards"], strict=True))
            for case, t in seconds.items()
        }
        what = f"precise BN  {name} {count}x{size}x3x32x32"
        report(f"{what}  ctl forwards / forwards", f"{ratio['control']:.3f}x", None)
        report(
            f"{what}  recompute / forwards",
            f"{ratio['recompute']:.3f}x",
            ratio["recompute"] <= 1.05,
            "<= 1.05x",
        )
        err = _variance_error(name, batches)
        report(f"{what}  var rel err max (exact)", f"{err:.1e}", err <= 1e-6, "<= 1e-6")


# -------------------------------------------------------------------------------- memory


def peak_bytes(module: nn.Module, x: Tensor, kwargs: dict[str, Any]) -> int:
    """Peak of the running sum of each op's own allocations minus frees in one forward+backward.

    From the profiler's memory events, in op-end order, above the step's start. The previous
    step's gradients are freed before profiling; the second of two profiled steps is kept (the
    first sees blocks allocated before any profiling, of unknown size).
    """
    from torch.profiler import profile

    x = x.detach().requires_grad_(True)
    grad = torch.randn_like(module(x, **kwargs).float()).to(x.dtype)
    peak = 0
    for _ in range(2):
        module.zero_grad(set_to_none=True)
        x.grad = None
        with profile(profile_memory=True) as prof:
            module(x, **kwargs).backward(grad)
        total = peak = 0
        # an op's own net allocation counts when it ends (inner ops end first): a parent that
        # frees its children's temporaries must not free them before they are made
        for event in sorted(prof.events(), key=lambda e: (e.time_range.end, -e.time_range.start)):
            total += event.self_cpu_memory_usage
            peak = max(peak, total)
    return peak


def saved_bytes(module: nn.Module, x: Tensor, kwargs: dict[str, Any]) -> int:
    """Bytes of the distinct storages one forward saves for backward."""
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x.detach().requires_grad_(True), **kwargs)
    return sum(storages.values())


class FreshTensors(TorchDispatchMode):
    """Counts op outputs of ``dtype`` with at least ``numel`` elements that alias no input."""

    def __init__(self, dtype: torch.dtype, numel: int) -> None:
        super().__init__()
        self.dtype, self.numel, self.count = dtype, numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        inputs = tree_flatten((args, kwargs))[0]
        taken = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor) and t.dtype == self.dtype and t.numel() >= self.numel:
                self.count += t.untyped_storage().data_ptr() not in taken
        return out


def fp32_activations(step: Step, numel: int) -> int:
    with FreshTensors(torch.float32, numel) as mode:
        step()
    return mode.count


def memory() -> None:
    section(f"memory of one forward+backward at {'x'.join(map(str, LAUNCH_SHAPE))}, vs BN")
    n, c = LAUNCH_SHAPE[:2]
    x = torch.randn(LAUNCH_SHAPE) + 1
    xb = x.bfloat16()
    layers: dict[str, tuple[nn.Module, dict[str, Any]]] = {"BN": (nn.BatchNorm2d(c), {})}
    layers |= {k: v for k, v in bn_variants(c, mixed_ids(n)).items() if "Synced" not in k}
    peak = {k: peak_bytes(m, x, kw) for k, (m, kw) in layers.items()}
    peak_bf16 = {k: peak_bytes(m, xb, kw) for k, (m, kw) in layers.items()}
    saved = {k: saved_bytes(m, x, kw) for k, (m, kw) in layers.items()}
    fp32 = {k: fp32_activations(step_fn(m, xb, kw), x.numel()) for k, (m, kw) in layers.items()}
    mib = f"{peak['BN'] / 2**20:.1f} / {saved['BN'] / 2**20:.1f} MiB"
    report("memory  BN peak (profiler) / saved for backward", mib, None)
    for name in list(layers)[1:]:
        domain = name.startswith("Domain")
        limit = "<= 1.1x" if domain else "-"
        for what, peaks in (("fp32", peak), ("bf16", peak_bf16)):
            ratio = peaks[name] / peaks["BN"]
            met = ratio <= 1.1 if domain else None
            report(f"memory  {name}  peak / BN's, {what} input", f"{ratio:.2f}x", met, limit)
        ratio = saved[name] / saved["BN"]
        report(f"memory  {name}  saved for backward / BN's", f"{ratio:.2f}x", None)
        met = fp32[name] <= fp32["BN"] if domain else None
        limit = f"<= {fp32['BN']} (BN)" if domain else "-"
        report(f"memory  {name}  bf16 input: fp32 activations made", str(fp32[name]), met, limit)


# ---------------------------------------------------------------------------------- main


def _commit() -> str:
    """The commit measured, ``+dirty`` with uncommitted package edits, ``unknown`` outside git."""
    root = _BENCH.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "lightning_norms"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty (uncommitted lightning_norms edits)" if dirty else "")


def summary() -> int:
    judged = [row for row in ROWS if row.met is not None]
    missed = [row for row in judged if not row.met]
    print(
        f"\nsummary: {len(judged) - len(missed)} of {len(judged)} targets met; {len(missed)} missed"
    )
    for row in missed:
        print(f"  missed: {row.name}: {row.measured} (target {row.threshold})")
    return len(missed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds per timing")
    parser.add_argument("--min-run-time", type=float, default=0.1, help="seconds per timing")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: small, 2 rounds, aot_eager"
    )
    parser.add_argument("--commit", help="commit to print when run outside git (git archive)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.min_run_time = 2, 0.01
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # torchvision and one-value-domain notes
    backend = "aot_eager" if args.quick else "inductor"
    print(
        f"issue 20 targets: commit {args.commit or _commit()} "
        f"({Path(lightning_norms.__file__).parent}), "
        f"torch {torch.__version__}, threads "
        f"{torch.get_num_threads()}, rounds {args.rounds}, cpus {os.cpu_count()}, load average "
        f"{os.getloadavg()[0]:.1f} at start{', QUICK (smoke run)' if args.quick else ''}"
    )
    print(f"{'target':<58} {'threshold':>10} {'measured':>22}  verdict")
    host_reads(args.quick)
    launches(args.quick)
    section("eager forward+backward time ratios (median of per-round ratios)")
    for shape, with_mask in eager_grid(args.quick):
        eager_bn(shape, args.rounds, args.min_run_time, with_mask)
    eager_cosine(args.rounds, args.min_run_time, args.quick)
    section("torch.compile")
    compiled_ratios(backend, args.rounds, args.min_run_time, args.quick)
    graph_breaks()
    compile_counts()
    section("recompute_bn_stats against the bare forwards")
    precise_bn(3 if args.quick else 5, args.quick)
    memory()
    summary()
    print(f"load average {os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
    main()
