"""``torch.compile``: no graph breaks in the layers, compiled results equal eager ones.

Host-needing validation (domain ids in range, one value per channel for an ``int`` domain)
runs in eager mode only, and a one-value domain among per-sample ids is a ``torch.where``,
so dynamo traces DomainBatchNorm2d (per-sample and ``int`` ids) and BatchRenorm2d in one
graph, in training and eval. The references are the same layers run eagerly: outputs, input
and parameter gradients, running statistics and ``num_batches_tracked``.
"""

from __future__ import annotations

import copy
import shutil
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from lightning_norms import BatchRenorm2d, DomainBatchNorm2d

IDS = torch.tensor([0, 1, 1, 0, 1, 0])


def _cases() -> dict[str, tuple[Callable[[], nn.Module], dict]]:
    return {
        "domain-ids": (lambda: DomainBatchNorm2d(3, 2), {"domain": IDS}),
        "domain-int": (lambda: DomainBatchNorm2d(3, 2), {"domain": 1}),
        "renorm": (lambda: BatchRenorm2d(3, r_max=1.5, d_max=0.5, warmup_steps=0), {}),
    }


def _input() -> Tensor:
    torch.manual_seed(0)
    return torch.randn(6, 3, 4, 4) * 2 + 1


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", list(_cases()))
def test_no_graph_breaks(case: str, training: bool) -> None:
    make, kwargs = _cases()[case]
    layer = make().train(training)

    def fn(x: Tensor) -> Tensor:
        return layer(x, **kwargs)

    explained = torch._dynamo.explain(fn)(_input())
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def _step(layer: nn.Module, kwargs: dict, x: Tensor) -> tuple[Tensor, ...]:
    x = x.clone().requires_grad_(True)
    out = layer(x, **kwargs)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = [p.grad for p in layer.parameters()]
    return (out.detach(), x.grad, *grads, *layer.buffers())


@pytest.mark.parametrize("case", list(_cases()))
def test_compiled_equals_eager(case: str) -> None:
    """Two training steps then eval, compiled (aot_eager: dynamo + AOT autograd) vs eager."""
    make, kwargs = _cases()[case]
    eager = make()
    compiled_layer = copy.deepcopy(eager)
    compiled = torch.compile(compiled_layer, backend="aot_eager", fullgraph=True)
    for step in range(2):
        x = _input() + step
        for got, want in zip(_step(compiled, kwargs, x), _step(eager, kwargs, x), strict=True):
            torch.testing.assert_close(got, want)
    eager.eval()
    compiled_layer.eval()
    torch.testing.assert_close(compiled(_input(), **kwargs), eager(_input(), **kwargs))


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="no C++")
def test_inductor_equals_eager_per_sample_ids() -> None:
    """Inductor once (the slow compile): per-sample ids, forward and backward, one step."""
    make, kwargs = _cases()["domain-ids"]
    eager = make()
    compiled_layer = copy.deepcopy(eager)
    compiled = torch.compile(compiled_layer, backend="inductor", fullgraph=True)
    x = _input()
    for got, want in zip(_step(compiled, kwargs, x), _step(eager, kwargs, x), strict=True):
        torch.testing.assert_close(got, want)


def test_eager_validation_still_raises() -> None:
    layer = DomainBatchNorm2d(3, 2)
    with pytest.raises(ValueError, match=r"DomainBatchNorm2d\(3, num_domains=2\).*got 2"):
        layer(_input(), domain=torch.tensor([0, 1, 2, 0, 1, 0]))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(1, 3, 1, 1), domain=1)
    assert layer.num_batches_tracked.tolist() == [0, 0]


def test_one_value_domain_compiles_without_breaks_or_recompiles() -> None:
    """Issue 17.1: the rare-domain rule is a ``torch.where``, not a host-side branch.

    The same compiled graph serves a batch where domain 1 has one value per channel and one
    where it has several (only the composition changes), and equals eager on both.
    """
    eager = DomainBatchNorm2d(3, 2)
    compiled_layer = copy.deepcopy(eager)
    counts = torch._dynamo.utils.counters
    counts.clear()
    compiled = torch.compile(compiled_layer, backend="aot_eager", fullgraph=True, dynamic=False)
    x = torch.randn(6, 3, 1, 1) * 2 + 1
    for ids in (torch.tensor([0, 0, 1, 0, 0, 0]), torch.tensor([0, 1, 1, 0, 1, 0])):
        with warnings.catch_warnings():  # the eager layer warns once (one-value domain)
            warnings.simplefilter("ignore")
            want = _step(eager, {"domain": ids}, x)
        for got, ref in zip(_step(compiled, {"domain": ids}, x), want, strict=True):
            torch.testing.assert_close(got, ref)
    assert counts["stats"]["unique_graphs"] == 1
    assert compiled_layer.num_batches_tracked.tolist() == [2, 1]


def test_batch_renorm_compiles_to_plain_ops_that_inductor_fuses() -> None:
    """Issue 20: while compiling, BatchRenorm traces plain ops (no autograd Function and no
    ``batch_norm_update_stats``, which stop fusion and break dynamic shapes), equal to eager."""
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, _: list[Tensor]) -> Callable[..., object]:
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    layer = BatchRenorm2d(4, r_max=1.5, d_max=0.5, warmup_steps=0)
    with torch.no_grad():
        layer.running_mean.fill_(0.3)
        layer.running_var.fill_(2.0)
    eager, x = copy.deepcopy(layer), (torch.randn(8, 4, 3, 3) * 2 + 1).requires_grad_()
    out = torch.compile(layer, backend=backend, fullgraph=True, dynamic=True)(x)
    targets = {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    assert not [t for t in targets if "autograd_function" in t or "update_stats" in t], targets
    x_ref = x.detach().clone().requires_grad_()
    ref = eager(x_ref)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    (g,) = torch.autograd.grad(out.square().sum(), x)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x_ref)
    torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(layer.running_var, eager.running_var, atol=1e-6, rtol=0)
