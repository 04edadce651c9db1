"""Double backward (gradient penalties) through every layer of the package.

``gradgradcheck`` in float64 for each layer and path (per-sample domain ids, an ``int`` domain,
eval, the synchronised autograd Function in one process and on a one-rank process group,
BatchRenorm, LayerNorm2d, Cosine layers), and a WGAN-GP / R1 style penalty through
``DomainBatchNorm2d`` with per-sample ids against each domain's sub-batch through its own
``nn.BatchNorm2d`` (torch's BatchNorm double backward is the reference).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd import gradcheck, gradgradcheck
from torch.func import functional_call

from lightning_norms import (
    BatchRenorm2d,
    CosineConv2d,
    CosineLinear,
    DomainBatchNorm2d,
    LayerNorm2d,
)
from lightning_norms import functional as LF
from lightning_norms.distributed import SyncedBatchNorm2d
from lightning_norms.functional import _domain as LFD
from lightning_norms.functional import _renorm as LFR

IDS = torch.tensor([0, 1, 0, 1, 1, 0])


def _randn(*shape: int, scale: float = 1.0, shift: float = 0.0) -> Tensor:
    return (torch.randn(*shape, dtype=torch.float64) * scale + shift).requires_grad_()


def _module_fn(module: nn.Module, **kwargs: object) -> tuple[Callable[..., Tensor], list[Tensor]]:
    """``f(x, *params)`` calling ``module`` with the given parameter tensors, and the params."""
    names = [name for name, _ in module.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in module.named_parameters()]

    def fn(x: Tensor, *values: Tensor) -> Tensor:
        return functional_call(module, dict(zip(names, values, strict=True)), (x,), kwargs)

    return fn, params


def _check(fn: Callable[..., Tensor], inputs: list[Tensor]) -> None:
    inputs = [t.detach().requires_grad_() for t in inputs]
    assert gradcheck(fn, inputs, atol=1e-6)
    assert gradgradcheck(fn, inputs, atol=1e-6)


@pytest.mark.parametrize("affine", ["per_domain", "shared", "none"])
def test_domain_per_sample_training(affine):
    torch.manual_seed(0)
    x = _randn(6, 3, 2, 2, scale=2, shift=1)
    params = {"per_domain": [_randn(2, 3), _randn(2, 3)], "shared": [_randn(3), _randn(3)]}
    inputs = [x, *params.get(affine, [])]

    def fn(x: Tensor, *wb: Tensor) -> Tensor:
        return LF.domain_batch_norm(x, IDS, 2, None, None, *wb, training=True)

    _check(fn, inputs)


def test_domain_per_sample_training_updates_stats_and_stays_exact():
    """The module path: running statistics are updated on every call, the output is not."""
    torch.manual_seed(1)
    layer = DomainBatchNorm2d(3, num_domains=3, dtype=torch.float64)
    ids = torch.tensor([2, 0, 1, 0, 2, 1, 0])
    fn, params = _module_fn(layer, domain=ids)
    _check(fn, [_randn(7, 3, 2, 1, shift=-2), *params])


def test_domain_int_and_eval_paths():
    torch.manual_seed(2)
    layer = DomainBatchNorm2d(3, num_domains=2, dtype=torch.float64)
    with torch.no_grad():
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
    fn, params = _module_fn(layer, domain=1)
    _check(fn, [_randn(4, 3, 2, 2), *params])
    layer.eval()
    fn, params = _module_fn(layer, domain=IDS)
    _check(fn, [_randn(6, 3, 2, 2), *params])


def test_synced_function_single_process():
    """The synchronised kernel (``stats`` given, as BatchRenorm's synced path uses it)."""
    torch.manual_seed(3)

    def fn(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        return LFR._synced_batch_renorm(x, None, None, w, b, 0.1, 1e-5, 1.0, 0.0, None, "test")

    _check(fn, [_randn(4, 3, 2, 2, shift=3), _randn(3), _randn(3)])


@pytest.fixture
def one_rank_group() -> Iterator[None]:
    """A one-rank gloo process group: the synced paths run their (identity) all-reduces."""
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def test_synced_function_with_all_reduces(one_rank_group):
    torch.manual_seed(4)
    group = (None,)

    def fn(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        x3 = LFD.as_rows(x)
        stats = LFD.kernel_stats(LFD.domain_stats(x3, IDS, 2, group, "test"), 1e-5)
        return LFD.grouped_batch_norm(x3, w, b, IDS, 1e-5, group, stats).view(x.shape)

    _check(fn, [_randn(6, 3, 2, 2, shift=1), _randn(2, 3), _randn(2, 3)])


def test_synced_batchnorm_single_process():
    torch.manual_seed(5)
    fn, params = _module_fn(SyncedBatchNorm2d(3, dtype=torch.float64))
    _check(fn, [_randn(4, 3, 2, 2), *params])


def _clipped_renorm() -> BatchRenorm2d:
    """Renormalising with ``r`` and ``d`` at their clip limits: constants near the input."""
    layer = BatchRenorm2d(3, r_max=1.5, d_max=0.5, warmup_steps=0, dtype=torch.float64)
    layer.momentum = 0.0  # running statistics (hence r and d) fixed between the calls
    with torch.no_grad():
        layer.running_mean.fill_(-100.0)
        layer.running_var.fill_(1e-4)
    return layer


def test_batch_renorm_active_and_plain():
    torch.manual_seed(6)
    fn, params = _module_fn(_clipped_renorm())
    _check(fn, [_randn(4, 3, 2, 2), *params])
    fn, params = _module_fn(BatchRenorm2d(3, r_max=1.0, d_max=0.0, dtype=torch.float64))
    _check(fn, [_randn(4, 3, 2, 2), *params])


def test_batch_renorm_synced_function_single_process():
    torch.manual_seed(7)
    mean = torch.full((3,), -100.0, dtype=torch.float64)
    var = torch.full((3,), 1e-4, dtype=torch.float64)

    def fn(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        return LFR._synced_batch_renorm(
            x, mean.clone(), var.clone(), w, b, 0.1, 1e-5, 1.5, 0.5, None, "test"
        )

    _check(fn, [_randn(4, 3, 2, 2), _randn(3), _randn(3)])


@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda: LayerNorm2d(3), (2, 3, 2, 2)),
        (lambda: CosineLinear(4, 3), (3, 4)),
        (lambda: CosineConv2d(2, 3, 2, padding=1), (2, 2, 3, 3)),
    ],
    ids=["LayerNorm2d", "CosineLinear", "CosineConv2d"],
)
def test_other_layers(make, shape):
    torch.manual_seed(8)
    fn, params = _module_fn(make().double())
    _check(fn, [_randn(*shape), *params])


def _penalty(model: Callable[[Tensor], Tensor], x: Tensor, c: Tensor) -> Tensor:
    """R1 / WGAN-GP style: squared norm of the input gradient of a nonlinear readout."""
    (grad,) = torch.autograd.grad((model(x).sin() * c).sum(), x, create_graph=True)
    return grad.square().sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradient_penalty_equals_per_domain_batchnorm(dtype):
    """The penalty's gradients (input, conv before the layer, affine) match torch's BN."""
    torch.manual_seed(9)
    ids = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    conv = nn.Conv2d(2, 3, 3, padding=1, dtype=dtype)
    layer = DomainBatchNorm2d(3, num_domains=2, dtype=dtype)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
    x = torch.randn(8, 2, 4, 4, dtype=dtype, requires_grad=True)
    c = torch.randn(8, 3, 4, 4, dtype=dtype)
    _penalty(lambda t: layer(conv(t), domain=ids), x, c).backward()

    total_conv_grad = torch.zeros_like(conv.weight)
    for d in range(2):
        mask = ids == d
        ref_conv = nn.Conv2d(2, 3, 3, padding=1, dtype=dtype)
        ref_conv.load_state_dict(conv.state_dict())
        bn = nn.BatchNorm2d(3, dtype=dtype)
        with torch.no_grad():
            bn.weight.copy_(layer.weight[d])
            bn.bias.copy_(layer.bias[d])
        xd = x.detach()[mask].requires_grad_()
        _penalty(nn.Sequential(ref_conv, bn), xd, c[mask]).backward()
        tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {}
        torch.testing.assert_close(x.grad[mask], xd.grad, **tol)
        torch.testing.assert_close(layer.weight.grad[d], bn.weight.grad, **tol)
        torch.testing.assert_close(layer.bias.grad[d], bn.bias.grad, **tol)
        total_conv_grad += ref_conv.weight.grad
    torch.testing.assert_close(conv.weight.grad, total_conv_grad, atol=1e-4, rtol=1e-4)


def test_first_order_gradients_unchanged_by_create_graph():
    """The graph path and the fused path give the same first-order gradients."""
    torch.manual_seed(10)
    layer = DomainBatchNorm2d(4, num_domains=3, shared_affine=True)
    ids = torch.tensor([0, 2, 1, 1, 0, 2, 2, 0])
    x = (torch.randn(8, 4, 5, 5) * 3).requires_grad_()
    grad = torch.randn(8, 4, 5, 5)
    y = layer(x, domain=ids)
    fused = torch.autograd.grad(y, [x, layer.weight, layer.bias], grad, retain_graph=True)
    graph = torch.autograd.grad(y, [x, layer.weight, layer.bias], grad, create_graph=True)
    assert graph[0].requires_grad and graph[1].requires_grad  # dbias = sum(dy): a constant
    for a, b in zip(fused, graph, strict=True):
        assert not a.requires_grad
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
