"""DomainBatchNorm1d/2d/3d and ``domain()``: against per-domain ``nn.BatchNorm*d`` references."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lightning_norms import (
    DomainBatchNorm1d,
    DomainBatchNorm2d,
    DomainBatchNorm3d,
    convert_norms,
    domain,
)
from lightning_norms.functional import domain_batch_norm, domain_batch_stats
from tests._layers import assert_unchanged, op_names, randomise, snapshot_buffers, uniform

ATOL = 1e-5

CASES = [
    (DomainBatchNorm1d, nn.BatchNorm1d, (12, 4)),
    (DomainBatchNorm1d, nn.BatchNorm1d, (12, 4, 5)),
    (DomainBatchNorm2d, nn.BatchNorm2d, (12, 4, 5, 6)),
    (DomainBatchNorm3d, nn.BatchNorm3d, (12, 4, 3, 2, 4)),
]


def _references(layer: nn.Module, bn_cls: type[nn.Module]) -> list[nn.Module]:
    """One ``nn.BatchNorm*d`` per domain holding that domain's affine and running stats."""
    refs = []
    for d in range(layer.num_domains):
        bn = bn_cls(layer.num_features, momentum=layer.momentum)
        with torch.no_grad():
            w = layer.weight if layer.weight.dim() == 1 else layer.weight[d]
            b = layer.bias if layer.bias.dim() == 1 else layer.bias[d]
            bn.weight.copy_(w)
            bn.bias.copy_(b)
            bn.running_mean.copy_(layer.running_mean[d])
            bn.running_var.copy_(layer.running_var[d])
        refs.append(bn)
    return refs


_DRAWS = {
    "weight": uniform(0.5, 1.5),
    "bias": uniform(-1, 1),
    "running_mean": uniform(-1, 1),
    "running_var": uniform(0.5, 2),
}


def _randomise(layer: nn.Module) -> None:
    randomise(layer, _DRAWS, seed=None, dtype=None)


@pytest.mark.parametrize(("cls", "bn_cls", "shape"), CASES)
@pytest.mark.parametrize("shared_affine", [False, True])
def test_mixed_batch_equals_per_domain_batchnorm(cls, bn_cls, shape, shared_affine):
    torch.manual_seed(0)
    layer = cls(shape[1], num_domains=3, shared_affine=shared_affine)
    _randomise(layer)
    refs = _references(layer, bn_cls)
    ids = torch.tensor([0, 1, 1, 0, 2, 1, 0, 0, 2, 1, 1, 2])
    x = (torch.randn(shape) * 3 + 2).requires_grad_()
    grad = torch.randn(shape)

    y = layer(x, domain=ids)
    y.backward(grad)
    for d, bn in enumerate(refs):
        mask = ids == d
        exact = copy.deepcopy(bn).double()  # the input gradient's reference: fp32 BN itself
        xd64 = x.detach()[mask].double().requires_grad_()  # is up to 8e-6 off at 3 samples
        exact(xd64).backward(grad[mask].double())
        xd = x.detach()[mask].requires_grad_()
        yd = bn(xd)
        yd.backward(grad[mask])
        torch.testing.assert_close(y[mask], yd, atol=ATOL, rtol=0)
        torch.testing.assert_close(x.grad[mask].double(), xd64.grad, atol=ATOL, rtol=0)
        torch.testing.assert_close(layer.running_mean[d], bn.running_mean, atol=ATOL, rtol=0)
        torch.testing.assert_close(layer.running_var[d], bn.running_var, atol=ATOL, rtol=0)
        if not shared_affine:
            torch.testing.assert_close(layer.weight.grad[d], bn.weight.grad, atol=ATOL, rtol=0)
            torch.testing.assert_close(layer.bias.grad[d], bn.bias.grad, atol=ATOL, rtol=0)
    if shared_affine:
        w_grad = sum(bn.weight.grad for bn in refs)
        b_grad = sum(bn.bias.grad for bn in refs)
        torch.testing.assert_close(layer.weight.grad, w_grad, atol=ATOL, rtol=0)
        torch.testing.assert_close(layer.bias.grad, b_grad, atol=ATOL, rtol=0)
    assert layer.num_batches_tracked.tolist() == [1, 1, 1]

    layer.eval()
    x_eval = torch.randn(shape) + 1
    y_eval = layer(x_eval, domain=ids)
    for d, bn in enumerate(refs):
        mask = ids == d
        torch.testing.assert_close(y_eval[mask], bn.eval()(x_eval[mask]), atol=ATOL, rtol=0)


def test_eval_per_sample_grads_match_batchnorm():
    torch.manual_seed(1)
    layer = DomainBatchNorm2d(3, num_domains=2).eval()
    _randomise(layer)
    refs = [bn.eval() for bn in _references(layer, nn.BatchNorm2d)]
    ids = torch.tensor([1, 0, 0, 1, 1])
    x = torch.randn(5, 3, 4, 4, requires_grad=True)
    layer(x, domain=ids).square().sum().backward()
    for d, bn in enumerate(refs):
        xd = x.detach()[ids == d].requires_grad_()
        bn(xd).square().sum().backward()
        torch.testing.assert_close(x.grad[ids == d], xd.grad, atol=ATOL, rtol=0)
        torch.testing.assert_close(layer.weight.grad[d], bn.weight.grad, atol=1e-4, rtol=0)


def test_int_domain_is_batchnorm_on_that_row():
    torch.manual_seed(2)
    layer = DomainBatchNorm2d(4, num_domains=3)
    _randomise(layer)
    before = copy.deepcopy(layer)
    bn = _references(layer, nn.BatchNorm2d)[2]
    x = torch.randn(6, 4, 5, 5, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    torch.testing.assert_close(layer(x, domain=2), bn(xr), atol=0, rtol=0)
    layer(x, domain=2).sum().backward()
    bn(xr).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, atol=0, rtol=0)
    torch.testing.assert_close(layer.running_var[2], bn.running_var, atol=0, rtol=0)
    torch.testing.assert_close(layer.weight.grad[2], bn.weight.grad)
    assert torch.equal(layer.weight.grad[:2], torch.zeros(2, 4))
    assert torch.equal(layer.running_mean[:2], before.running_mean[:2])
    assert layer.num_batches_tracked.tolist() == [0, 0, 2]
    # a 0-dim integer tensor is an int domain
    torch.testing.assert_close(
        layer.eval()(x, domain=torch.tensor(2)), bn.eval()(x), atol=0, rtol=0
    )


def test_absent_domain_untouched_and_finite():
    torch.manual_seed(3)
    layer = DomainBatchNorm2d(3, num_domains=4)
    _randomise(layer)
    before = copy.deepcopy(layer)
    x = torch.randn(6, 3, 4, 4, requires_grad=True)
    y = layer(x, domain=torch.tensor([0, 2, 0, 2, 2, 0]))
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    for d in (1, 3):
        assert torch.equal(layer.running_mean[d], before.running_mean[d])
        assert torch.equal(layer.running_var[d], before.running_var[d])
        assert torch.equal(layer.weight.grad[d], torch.zeros(3))
    assert not torch.equal(layer.running_mean[0], before.running_mean[0])
    assert layer.num_batches_tracked.tolist() == [1, 0, 1, 0]


def test_momentum_none_is_a_cumulative_average_per_domain():
    torch.manual_seed(4)
    layer = DomainBatchNorm2d(2, num_domains=2, momentum=None)
    ref = [nn.BatchNorm2d(2, momentum=None) for _ in range(2)]
    for ids in ([0, 0, 1, 1], [0, 0, 0, 0], [1, 0, 1, 0], [1, 1, 1, 1], [0, 1, 1, 1]):
        ids_t = torch.tensor(ids)
        x = torch.randn(4, 2, 3, 3) * 2 + 1
        layer(x, domain=ids_t)
        for d in range(2):
            if (ids_t == d).any():
                ref[d](x[ids_t == d])
    for d in range(2):
        torch.testing.assert_close(layer.running_mean[d], ref[d].running_mean)
        torch.testing.assert_close(layer.running_var[d], ref[d].running_var)
        assert layer.num_batches_tracked[d] == ref[d].num_batches_tracked


def test_no_running_stats_uses_per_domain_batch_stats_in_eval():
    torch.manual_seed(5)
    layer = DomainBatchNorm2d(3, num_domains=2, track_running_stats=False).eval()
    assert layer.running_mean is None
    ids = torch.tensor([0, 1, 1, 0, 1])
    x = torch.randn(5, 3, 4, 4) * 2
    y = layer(x, domain=ids)
    for d in range(2):
        ref = nn.BatchNorm2d(3, track_running_stats=False).eval()
        torch.testing.assert_close(y[ids == d], ref(x[ids == d]), atol=ATOL, rtol=0)


def test_one_value_per_channel_int_domain_raises():
    layer = DomainBatchNorm1d(3, num_domains=2)
    with pytest.raises(ValueError, match=r"DomainBatchNorm1d.*more than 1 value"):
        layer(torch.randn(1, 3), domain=0)
    with pytest.raises(ValueError, match=r"DomainBatchNorm2d.*more than 1 value"):
        DomainBatchNorm2d(3, num_domains=2)(torch.randn(1, 3, 1, 1), domain=1)
    layer.eval()(torch.randn(1, 3), domain=0)  # eval: running stats, fine


# --- issue 17: a rare domain never crashes training ---


@pytest.mark.parametrize("sync", [False, True], ids=["local", "sync_one_process"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_one_value_domain_uses_running_stats_and_eval_gradient(sync, momentum):
    """Regression (issue 17.1): a domain with one value per channel raised in training."""
    torch.manual_seed(30)
    layer = DomainBatchNorm2d(4, num_domains=3, momentum=momentum, sync=sync)
    _randomise(layer)
    ids = torch.tensor([0, 2, 0, 0, 2, 1, 2])  # domain 1: one sample at a 1x1 map
    x = (torch.randn(7, 4, 1, 1) * 2 + 1).requires_grad_()
    refs = _batchnorms(layer, torch.float32)
    refs[1].eval()  # the one-value domain: eval formula, eval gradient, no update
    before = snapshot_buffers(layer)
    with pytest.warns(UserWarning, match=r"DomainBatchNorm2d\(4, num_domains=3\).*\[1\]"):
        y = layer(x, domain=ids)
    y.square().sum().backward()
    ref_y, ref_grad = _per_domain_reference(refs, x, ids, lambda bn, t: bn(t))
    torch.testing.assert_close(y, ref_y, atol=1e-5, rtol=0)
    torch.testing.assert_close(x.grad, ref_grad, atol=1e-5, rtol=0)
    assert torch.equal(y[ids == 1], refs[1](x[ids == 1]))  # the eval formula, bitwise
    for d, bn in enumerate(refs):
        torch.testing.assert_close(layer.weight.grad[d], bn.weight.grad, atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.bias.grad[d], bn.bias.grad, atol=1e-5, rtol=0)
    assert torch.equal(layer.running_mean[1], before["running_mean"][1])
    assert torch.equal(layer.running_var[1], before["running_var"][1])
    assert layer.num_batches_tracked.tolist() == [1, 0, 1]
    for d in (0, 2):
        torch.testing.assert_close(layer.running_mean[d], refs[d].running_mean, atol=1e-6, rtol=0)


def test_one_value_domain_leaves_other_domains_bitwise_unchanged():
    torch.manual_seed(31)
    layer = DomainBatchNorm2d(3, num_domains=2)
    _randomise(layer)
    x = torch.randn(5, 3, 1, 1)
    alone = copy.deepcopy(layer)(x[:4], domain=torch.zeros(4, dtype=torch.long))
    with pytest.warns(UserWarning):
        y = layer(x, domain=torch.tensor([0, 0, 0, 0, 1]))
    assert torch.equal(y[:4], alone)


def test_one_value_domain_warns_once_naming_the_module_path():
    torch.manual_seed(32)
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(DomainBatchNorm2d(4, num_domains=2)))
    x = torch.randn(3, 3, 1, 1)
    ids = torch.tensor([0, 0, 1])
    with domain(net, ids), pytest.warns(UserWarning, match=r"^1\.0: DomainBatchNorm2d\(4"):
        net(x)
    with domain(net, ids), warnings.catch_warnings():
        warnings.simplefilter("error")
        net(x)  # once per layer
        net.eval().train()


def test_one_value_domain_without_running_stats_gives_beta():
    """No running statistics: BatchNorm's limit at one value (output beta, zero dx)."""
    torch.manual_seed(33)
    layer = DomainBatchNorm2d(3, num_domains=2, track_running_stats=False)
    _randomise(layer)
    x = torch.randn(4, 3, 1, 1, requires_grad=True)
    ids = torch.tensor([0, 1, 0, 0])
    with pytest.warns(UserWarning, match="one value per channel"):
        y = layer(x, domain=ids)
    y.square().sum().backward()
    # x * (gamma / sqrt(eps)) + (beta - x * gamma / sqrt(eps)): fp32 rounding of |x| * 316
    torch.testing.assert_close(y[1, :, 0, 0], layer.bias[1], atol=1e-4, rtol=0)
    torch.testing.assert_close(x.grad[1], torch.zeros(3, 1, 1), atol=1e-4, rtol=0)
    ref = nn.BatchNorm2d(3, track_running_stats=False)
    with torch.no_grad():
        ref.weight.copy_(layer.weight[0])
        ref.bias.copy_(layer.bias[0])
    torch.testing.assert_close(y[ids == 0], ref(x[ids == 0]), atol=1e-6, rtol=0)


def test_one_value_domain_double_backward():
    torch.manual_seed(34)
    layer = DomainBatchNorm2d(2, num_domains=2, dtype=torch.float64)
    _randomise(layer)
    ids = torch.tensor([0, 1, 0])
    x = torch.randn(3, 2, 1, 1, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer.eval()
        eval_y = layer(x[1:2], domain=1)
        layer.train()
        torch.autograd.gradgradcheck(
            lambda t: copy.deepcopy(layer)(t, domain=ids), (x,), check_batched_grad=False
        )
        y = layer(x, domain=ids)
    torch.testing.assert_close(y[1:2], eval_y, atol=1e-12, rtol=0)
    (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad(g[1].sum(), x)
    assert torch.equal(gg[[0, 2]], torch.zeros_like(gg[[0, 2]]))  # eval dx of one row: no mixing


def test_converted_resnet18_with_single_sample_domain_trains():
    """Regression (issue 17.1): resnet18 at 32x32 crashed at layer4 with a one-sample domain."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(35)
    model = convert_norms(torchvision.models.resnet18(num_classes=10), "domain", num_domains=2)
    ids = torch.zeros(16, dtype=torch.long)
    ids[3] = 1
    layer = model.layer4[1].bn2
    before = layer.running_mean[1].clone()
    with domain(model, ids), pytest.warns(UserWarning, match=r"layer4\.1\.bn2: "):
        loss = model(torch.randn(16, 3, 32, 32)).square().mean()
    loss.backward()
    assert torch.isfinite(model.conv1.weight.grad).all()
    assert torch.equal(layer.running_mean[1], before)
    assert layer.num_batches_tracked.tolist() == [1, 0]
    assert model.layer1[0].bn1.num_batches_tracked.tolist() == [1, 1]  # 8x8 maps: updated


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (torch.tensor([0, 1, 2, 0]), r"in \[0, 2\), got 2"),
        (torch.tensor([0, -1, 1, 0]), r"in \[0, 2\), got -1"),
        (torch.tensor([0.0, 1.0, 1.0, 0.0]), "integer tensor, got dtype torch.float32"),
        (torch.tensor([True, False, True, False]), "integer tensor, got dtype torch.bool"),
        (torch.tensor([0, 1]), r"shape \[N\] = \[4\].*got shape \(2,\)"),
        (torch.zeros(4, 1, dtype=torch.long), r"got shape \(4, 1\)"),
        (2, r"in \[0, 2\), got 2"),
        (1.0, "an int or an integer LongTensor"),
        ("a", "an int or an integer LongTensor"),
    ],
)
def test_invalid_domain_ids_raise_naming_the_layer(ids, message):
    layer = DomainBatchNorm2d(3, num_domains=2)
    x = torch.randn(4, 3, 2, 2)
    with pytest.raises(ValueError, match=r"DomainBatchNorm2d\(3, num_domains=2\).*" + message):
        layer(x, domain=ids)
    with pytest.raises(ValueError, match=r"DomainBatchNorm2d\(3, num_domains=2\).*" + message):
        layer.resolve_domain(x, ids)


def test_missing_domain_and_bad_input_raise():
    layer = DomainBatchNorm2d(3, num_domains=2)
    x = torch.randn(4, 3, 2, 2)
    with pytest.raises(ValueError, match=r"DomainBatchNorm2d.*no domain given"):
        layer(x)
    with pytest.raises(ValueError, match="expected 4D"):
        layer(torch.randn(4, 3), domain=0)
    with pytest.raises(ValueError, match="num_domains"):
        DomainBatchNorm2d(3, num_domains=0)


def test_resolve_domain():
    layer = DomainBatchNorm2d(3, num_domains=3)
    x = torch.randn(4, 3, 2, 2)
    assert layer.resolve_domain(x, 2).tolist() == [2, 2, 2, 2]
    ids = torch.tensor([0, 2, 1, 0], dtype=torch.int32)
    out = layer.resolve_domain(x, ids)
    assert out.dtype == torch.long and out.tolist() == [0, 2, 1, 0]
    with domain(layer, 1):
        assert layer.resolve_domain(x).tolist() == [1, 1, 1, 1]
        assert layer.resolve_domain(x, 0).tolist() == [0, 0, 0, 0]  # explicit wins


def test_domain_context_manager_nests_and_restores():
    torch.manual_seed(6)
    net = nn.Sequential(nn.Conv2d(3, 4, 1), DomainBatchNorm2d(4, num_domains=3)).eval()
    _randomise(net[1])
    x = torch.randn(2, 3, 4, 4)
    outs = [net[1](net[0](x), domain=d) for d in range(3)]
    with domain(net, 0):
        torch.testing.assert_close(net(x), outs[0], atol=0, rtol=0)
        with domain(net, torch.tensor([2, 2])):
            torch.testing.assert_close(net(x), outs[2], atol=ATOL, rtol=0)
        torch.testing.assert_close(net(x), outs[0], atol=0, rtol=0)
        with pytest.raises(RuntimeError), domain(net, 1):
            raise RuntimeError("boom")
        torch.testing.assert_close(net(x), outs[0], atol=0, rtol=0)
    with pytest.raises(ValueError, match="no domain given"):
        net(x)
    with pytest.raises(ValueError, match="ids must be"), domain(net, 0.5):
        pass
    # issue 17.15: no DomainBatchNorm, nothing to route: say so
    with (
        pytest.warns(UserWarning, match="Linear has no DomainBatchNorm"),
        domain(nn.Linear(2, 2), 1) as plain,
    ):
        assert isinstance(plain, nn.Linear)


def test_from_batchnorm_eval_equals_original():
    torch.manual_seed(7)
    bn = nn.BatchNorm2d(5)
    bn(torch.randn(8, 5, 4, 4) * 3 + 1)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    bn.eval()
    layer = DomainBatchNorm2d.from_batchnorm(bn, num_domains=3)
    assert not layer.training
    assert layer.running_mean.shape == (3, 5)
    assert layer.num_batches_tracked.tolist() == [1, 1, 1]
    x = torch.randn(6, 5, 4, 4)
    for d in range(3):
        torch.testing.assert_close(layer(x, domain=d), bn(x), atol=0, rtol=0)
    ids = torch.tensor([0, 1, 2, 2, 1, 0])
    torch.testing.assert_close(layer(x, domain=ids), bn(x), atol=ATOL, rtol=0)
    shared = DomainBatchNorm2d.from_batchnorm(bn, 2, shared_affine=True)
    assert shared.weight.shape == (5,)
    torch.testing.assert_close(shared(x, domain=1), bn(x), atol=0, rtol=0)
    with pytest.raises(TypeError, match="from_batchnorm"):
        DomainBatchNorm2d.from_batchnorm(nn.Linear(2, 2), 2)


def test_converted_resnet18_under_domain_equals_original():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(8)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, 32, 32))  # non-trivial running statistics
    model.eval()
    converted = convert_norms(copy.deepcopy(model), "domain", num_domains=2)
    layers = [m for m in converted.modules() if isinstance(m, DomainBatchNorm2d)]
    assert len(layers) == 20 and not any(m.training for m in layers)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        for k in range(2):
            with domain(converted, k):
                torch.testing.assert_close(converted(x), expected, atol=0, rtol=0)
        with domain(converted, torch.tensor([1, 0])):
            torch.testing.assert_close(converted(x), expected, atol=1e-4, rtol=1e-4)
        layers[0].running_mean[1].add_(1.0)  # the test can fail: domain 1 now differs
        with domain(converted, 1):
            assert not torch.allclose(converted(x), expected, atol=1e-3)


def test_convert_norms_domain_options():
    net = nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm3d(2))
    net[0].weight.requires_grad_(False)
    convert_norms(net, "domain", num_domains=2, shared_affine=True)
    assert isinstance(net[0], DomainBatchNorm1d) and isinstance(net[1], DomainBatchNorm3d)
    assert net[0].weight.shape == (3,) and not net[0].weight.requires_grad
    with pytest.raises(ValueError, match="num_domains"):
        convert_norms(nn.Sequential(nn.BatchNorm2d(2)), "domain")
    with pytest.raises(ValueError, match="already domain-split"):
        convert_norms(net, "domain", num_domains=2)


def test_state_dict_round_trip_and_buffers():
    layer = DomainBatchNorm2d(3, num_domains=2)
    layer(torch.randn(4, 3, 2, 2), domain=torch.tensor([0, 1, 0, 1]))
    state = layer.state_dict()
    assert state["running_mean"].shape == (2, 3)
    assert state["num_batches_tracked"].tolist() == [1, 1]
    other = DomainBatchNorm2d(3, num_domains=2)
    other.load_state_dict(state)
    assert torch.equal(other.running_var, layer.running_var)
    assert "num_domains=2" in repr(layer)


def test_bf16_and_channels_last_inputs():
    torch.manual_seed(9)
    layer = DomainBatchNorm2d(4, num_domains=2)
    ids = torch.tensor([0, 1, 1, 0, 0, 1])
    x = torch.randn(6, 4, 5, 5) * 2 + 3
    ref = layer(x, domain=ids)
    y_cl = layer(x.contiguous(memory_format=torch.channels_last), domain=ids)
    torch.testing.assert_close(y_cl, ref, atol=ATOL, rtol=0)
    xb = x.bfloat16().requires_grad_()
    yb = layer(xb, domain=ids)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), ref, atol=0.05, rtol=0.02)
    yb.float().sum().backward()
    assert xb.grad.dtype == torch.bfloat16 and torch.isfinite(xb.grad.float()).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        conv = nn.Conv2d(4, 4, 1)
        ya = layer(conv(x), domain=ids)
    assert torch.isfinite(ya.float()).all()


def test_gradcheck_float64():
    torch.manual_seed(10)
    ids = torch.tensor([0, 2, 0, 2, 0, 2])
    x = torch.randn(6, 2, 3, dtype=torch.float64, requires_grad=True)
    for shape in ((3, 2), (2,)):
        w = torch.rand(shape, dtype=torch.float64).add(0.5).requires_grad_()
        b = torch.randn(shape, dtype=torch.float64, requires_grad=True)

        def fn(x, w, b):
            return domain_batch_norm(x, ids, 3, weight=w, bias=b, training=True)

        assert torch.autograd.gradcheck(fn, (x, w, b))


def test_stable_statistics_far_from_zero():
    torch.manual_seed(11)
    x = torch.randn(8, 3, 16, 16, dtype=torch.float64) + 1e4
    ids = torch.tensor([0, 1] * 4)
    count, mean, var = domain_batch_stats(x.float(), ids, 2)
    for d in range(2):
        xd = x[ids == d].transpose(0, 1).reshape(3, -1)
        assert count[d] == xd.shape[1]
        torch.testing.assert_close(mean[d].double(), xd.mean(1), atol=1e-2, rtol=0)
        torch.testing.assert_close(var[d].double(), xd.var(1, unbiased=False), atol=2e-2, rtol=0)


def test_channels_last_gradients_and_empty_batch():
    torch.manual_seed(12)
    layer = DomainBatchNorm2d(4, num_domains=2)
    ids = torch.tensor([0, 1, 1, 0, 0, 1])
    x = torch.randn(6, 4, 5, 5)
    grad = torch.randn(6, 4, 5, 5)
    xs = [x.clone().requires_grad_(), x.contiguous(memory_format=torch.channels_last)]
    xs[1].requires_grad_()
    for xi in xs:
        layer(xi, domain=ids).backward(grad.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(xs[1].grad, xs[0].grad, atol=ATOL, rtol=0)
    empty = torch.randn(0, 4, 5, 5, requires_grad=True)
    before = layer.running_mean.clone()
    y = layer(empty, domain=torch.zeros(0, dtype=torch.long))
    y.sum().backward()
    assert y.shape == empty.shape and torch.equal(layer.running_mean, before)
    assert layer.num_batches_tracked.tolist() == [2, 2]


def test_package_domain_is_the_context_manager_after_submodule_import() -> None:
    import lightning_norms
    import lightning_norms.domain_bn

    assert lightning_norms.domain is lightning_norms.domain_bn.domain
    assert callable(lightning_norms.domain)


# --- hardening (issue 10): inplace ops, fp16/bf16, empty batches, rejected calls, compile ---


def _batchnorms(layer: nn.Module, dtype: torch.dtype) -> list[nn.Module]:
    """One ``nn.BatchNorm2d`` in ``dtype`` per domain with that domain's current state."""
    refs = []
    for d in range(layer.num_domains):
        bn = nn.BatchNorm2d(layer.num_features, momentum=layer.momentum, dtype=dtype)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(bn, name).copy_(getattr(layer, name)[d])
        refs.append(bn.train(layer.training))
    return refs


def _per_domain_reference(
    refs: list[nn.Module], x: torch.Tensor, ids: torch.Tensor, block
) -> tuple[torch.Tensor, torch.Tensor]:
    """``block(bn, x_d)`` per domain through its own BatchNorm (``refs``): output and dx."""
    out = torch.empty_like(x)
    grad = torch.zeros_like(x)
    for d, bn in enumerate(refs):
        mask = ids == d
        if not mask.any():
            continue
        xd = x.detach()[mask].requires_grad_()
        yd = block(bn, xd)
        yd.to(torch.promote_types(yd.dtype, torch.float32)).square().sum().backward()
        out[mask], grad[mask] = yd.detach(), xd.grad
    return out, grad


def _relu_residual(norm, x: torch.Tensor) -> torch.Tensor:
    """``relu_(norm(x) += x)``: the inplace ops of a torchvision ResNet block after a norm."""
    out = norm(x)
    out += x
    return torch.relu_(out)


@pytest.mark.parametrize(
    ("domains", "sync", "training"),
    [
        (torch.tensor([0, 1, 1, 0, 1, 0]), False, True),
        (torch.tensor([0, 1, 1, 0, 1, 0]), True, True),  # one process: the synced kernel
        (1, False, True),
        (torch.tensor([0, 1, 1, 0, 1, 0]), False, False),
    ],
    ids=["per_sample", "per_sample_sync", "int", "per_sample_eval"],
)
def test_inplace_ops_after_the_layer(domains, sync, training):
    """Regression: per-sample outputs were views of the autograd Function's result."""
    torch.manual_seed(13)
    layer = DomainBatchNorm2d(3, num_domains=2, sync=sync).train(training)
    _randomise(layer)
    refs = _batchnorms(layer, torch.float32)
    x = torch.randn(6, 3, 4, 4, requires_grad=True)
    ids = domains if isinstance(domains, torch.Tensor) else torch.full((6,), domains)
    y = _relu_residual(lambda t: layer(t, domain=domains), x)
    y.square().sum().backward()
    ref_y, ref_grad = _per_domain_reference(refs, x, ids, _relu_residual)
    torch.testing.assert_close(y, ref_y, atol=ATOL, rtol=0)
    torch.testing.assert_close(x.grad, ref_grad, atol=1e-4, rtol=1e-5)
    for d, bn in enumerate(refs):
        if (ids == d).any():
            torch.testing.assert_close(layer.weight.grad[d], bn.weight.grad, atol=1e-4, rtol=1e-5)


def test_converted_resnet18_trains_with_mixed_ids():
    """Regression: a torchvision ResNet (inplace ReLU, ``out += identity``) with mixed ids.

    Every other layer works per sample, so the mixed batch equals each domain's sub-batch run
    through its own copy of the model with an ``int`` domain (outputs, summed parameter
    gradients, per-domain running statistics).
    """
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(14)
    model = torchvision.models.resnet18(num_classes=5).double()  # fp64: a tight comparison
    model = convert_norms(model, "domain", num_domains=2)
    refs = [copy.deepcopy(model) for _ in range(2)]
    ids = torch.tensor([0, 1, 1, 0, 1, 0])
    x = torch.randn(6, 3, 32, 32, dtype=torch.float64)
    with domain(model, ids):
        out = model(x)
    out.square().sum().backward()
    for d, ref in enumerate(refs):
        with domain(ref, d):
            out_d = ref(x[ids == d])
        out_d.square().sum().backward()
        torch.testing.assert_close(out[ids == d], out_d, atol=1e-10, rtol=1e-10)
    for (name, p), p0, p1 in zip(
        model.named_parameters(), refs[0].parameters(), refs[1].parameters(), strict=True
    ):
        torch.testing.assert_close(p.grad, p0.grad + p1.grad, atol=1e-8, rtol=1e-8, msg=name)
    for m, m0, m1 in zip(model.modules(), refs[0].modules(), refs[1].modules(), strict=True):
        if isinstance(m, DomainBatchNorm2d):
            torch.testing.assert_close(m.running_var[0], m0.running_var[0])
            torch.testing.assert_close(m.running_var[1], m1.running_var[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("domains", [torch.tensor([0, 1, 1, 0, 1, 0, 0, 1]), 1])
def test_half_precision_module_matches_batchnorm_per_domain(dtype, domains):
    """Regression: a bf16/fp16 module with per-sample ids raised a dtype mismatch."""
    torch.manual_seed(15)
    layer = DomainBatchNorm2d(3, num_domains=2)
    _randomise(layer)
    layer.to(dtype)
    refs = _batchnorms(layer, dtype)
    ids = domains if isinstance(domains, torch.Tensor) else torch.full((8,), domains)
    x = (torch.randn(8, 3, 4, 4) * 2 + 3).to(dtype).requires_grad_()
    y = layer(x, domain=domains)
    y.float().square().sum().backward()
    assert y.dtype == x.grad.dtype == layer.weight.grad.dtype == layer.running_mean.dtype == dtype
    ref_y, ref_grad = _per_domain_reference(refs, x, ids, lambda bn, t: bn(t))
    tol = {"atol": 0.05, "rtol": 0.02}
    torch.testing.assert_close(y.float(), ref_y.float(), **tol)
    torch.testing.assert_close(x.grad.float(), ref_grad.float(), atol=0.1, rtol=0.05)
    for d, bn in enumerate(refs):
        if (ids == d).any():
            torch.testing.assert_close(
                layer.running_mean[d].float(), bn.running_mean.float(), **tol
            )
            torch.testing.assert_close(layer.running_var[d].float(), bn.running_var.float(), **tol)
            torch.testing.assert_close(
                layer.weight.grad[d].float(), bn.weight.grad.float(), atol=0.5, rtol=0.05
            )
    layer.eval()
    torch.testing.assert_close(
        layer(x, domain=domains).float(),
        torch.cat([refs[int(d)].eval()(x[i : i + 1]) for i, d in enumerate(ids)]).float(),
        **tol,
    )


def test_autocast_bf16_matches_batchnorm_per_domain():
    torch.manual_seed(16)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    layer = DomainBatchNorm2d(4, num_domains=2)
    _randomise(layer)
    refs = _references(layer, nn.BatchNorm2d)
    ids = torch.tensor([1, 0, 0, 1, 1, 0])
    x = torch.randn(6, 3, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(conv(x), domain=ids)
        ref = [bn(conv(x[ids == d])) for d, bn in enumerate(refs)]
    assert y.dtype == ref[0].dtype == torch.bfloat16
    assert layer.running_mean.dtype == torch.float32
    for d, bn in enumerate(refs):
        torch.testing.assert_close(y[ids == d].float(), ref[d].float(), atol=0.05, rtol=0.02)
        torch.testing.assert_close(layer.running_var[d], bn.running_var, atol=0.02, rtol=0.01)




@pytest.mark.parametrize(
    ("domains", "sync", "training"),
    [
        (0, False, True),
        (torch.zeros(0, dtype=torch.long), False, True),
        (torch.zeros(0, dtype=torch.long), True, True),
        (1, True, True),
        (torch.zeros(0, dtype=torch.long), False, False),
        (1, False, False),
    ],
    ids=["int", "per_sample", "per_sample_sync", "int_sync", "eval_per_sample", "eval_int"],
)
def test_empty_batch_returns_empty_and_leaves_buffers(domains, sync, training):
    """Regression: an empty batch with an ``int`` domain raised in training."""
    layer = DomainBatchNorm2d(3, num_domains=2, momentum=None, sync=sync).train(training)
    _randomise(layer)
    before = snapshot_buffers(layer)
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    y = layer(x, domain=domains)
    ref = nn.BatchNorm2d(3).train(training)(x)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    y.sum().backward()
    assert torch.equal(layer.weight.grad, torch.zeros(2, 3))
    assert x.grad.shape == x.shape
    assert_unchanged(snapshot_buffers(layer), before)


@pytest.mark.parametrize(
    ("make", "call"),
    [
        (lambda: DomainBatchNorm2d(3, 2), lambda m: m(torch.randn(1, 3, 1, 1), domain=0)),
        (lambda: DomainBatchNorm2d(3, 2), lambda m: m(torch.randn(4, 3, 2, 2).double(), 1)),
        (
            lambda: DomainBatchNorm2d(3, 2, momentum=None),
            lambda m: m(torch.randn(4, 3, 2, 2).double(), domain=1),
        ),
        (
            lambda: DomainBatchNorm1d(3, 2),
            lambda m: m(torch.randn(3, 3), domain=torch.tensor([0, 0, 2])),
        ),
        (lambda: DomainBatchNorm2d(3, 2), lambda m: m(torch.randn(2, 3, 2, 2), domain=2)),
        (lambda: DomainBatchNorm2d(3, 2), lambda m: m(torch.randn(2, 4, 2, 2), domain=0)),
    ],
    ids=["one_value", "dtype", "dtype_cumulative", "per_sample_bad_id", "bad_id", "shape"],
)
def test_rejected_call_leaves_every_buffer(make, call):
    """Regression: a call that raised still advanced ``num_batches_tracked``."""
    torch.manual_seed(17)
    layer = make()
    layer(
        torch.randn(4, 3, 2, 2).flatten(2)
        if isinstance(layer, DomainBatchNorm1d)
        else torch.randn(4, 3, 2, 2),
        domain=torch.tensor([0, 1, 0, 1]),
    )
    before = snapshot_buffers(layer)
    with pytest.raises((ValueError, RuntimeError)):
        call(layer)
    assert_unchanged(snapshot_buffers(layer), before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    ("domains", "training"),
    [
        (torch.tensor([2, 0, 1, 0, 2, 2, 1, 0]), True),
        (1, True),
        (torch.tensor([2, 0, 1, 0, 2, 2, 1, 0]), False),
    ],
    ids=["per_sample", "int", "eval"],
)
def test_first_order_gradients_equal_batchnorm_per_domain(dtype, channels_last, domains, training):
    torch.manual_seed(18)
    layer = DomainBatchNorm2d(4, num_domains=3, dtype=dtype).train(training)
    _randomise(layer)
    ids = domains if isinstance(domains, torch.Tensor) else torch.full((8,), domains)
    x = torch.randn(8, 4, 5, 3, dtype=dtype) * 2 - 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    refs = _batchnorms(layer, dtype)
    y = layer(x, domain=domains)
    y.square().sum().backward()
    ref_y, ref_grad = _per_domain_reference(refs, x, ids, lambda bn, t: bn(t))
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 1e-10, "rtol": 1e-10}
    torch.testing.assert_close(y, ref_y, **tol)
    torch.testing.assert_close(x.grad, ref_grad, **tol)
    for d, bn in enumerate(refs):
        if (ids == d).any():
            torch.testing.assert_close(layer.weight.grad[d], bn.weight.grad, **tol)
            torch.testing.assert_close(layer.bias.grad[d], bn.bias.grad, **tol)
            torch.testing.assert_close(layer.running_var[d], bn.running_var, **tol)


@pytest.mark.slow
def test_torch_compile_equals_eager():
    torch.manual_seed(19)
    eager = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), DomainBatchNorm2d(4, num_domains=2), nn.ReLU(inplace=True)
    )
    _randomise(eager[1])
    model = copy.deepcopy(eager)
    compiled = torch.compile(model)
    for ids in (torch.tensor([0, 1, 1, 0, 1, 0]), 1):
        x = torch.randn(6, 3, 5, 5)
        outs = []
        for net, m in ((eager, eager), (compiled, model)):
            m.zero_grad()
            with domain(m, ids):
                y = net(x)
            y.square().sum().backward()
            outs.append((y.detach(), [p.grad.clone() for p in m.parameters()]))
        torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-5, rtol=1e-5)
        for g_compiled, g_eager in zip(outs[1][1], outs[0][1], strict=True):
            torch.testing.assert_close(g_compiled, g_eager, atol=1e-4, rtol=1e-4)
    for key, value in model.named_buffers():
        torch.testing.assert_close(value, dict(eager.named_buffers())[key], atol=1e-6, rtol=0)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("domains", [torch.tensor([0, 1, 0, 0, 1]), 1], ids=["per_sample", "int"])
def test_no_host_reads_off_cpu(training, domains, momentum):
    """Issue 17: on a device, nothing reads a value back (meta tensors raise on any read).

    Covers the id range check (a device-side assert off CPU), the one-value domain (domain 1
    at a 1x1 map: ``torch.where``, its warning deferred to ``train()``), an ``int`` domain with
    ``momentum=None`` (the row path, its factor on the device), first and second order
    backward.
    """
    layer = DomainBatchNorm2d(3, 2, momentum=momentum, device="meta").train(training)
    x = torch.randn(5, 3, 1, 1, device="meta", requires_grad=True)
    if isinstance(domains, int):
        x = torch.randn(5, 3, 2, 2, device="meta", requires_grad=True)
    ids = domains.to("meta") if isinstance(domains, torch.Tensor) else domains
    y = layer(x, domain=ids)
    y.sum().backward()
    (g,) = torch.autograd.grad(layer(x, domain=ids).square().sum(), x, create_graph=True)
    g.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape
    layer.eval()  # where accelerators report a one-value domain: a meta record is skipped


# --- issue 17: domain() + activation checkpointing ---


class _Checkpointed(nn.Module):
    """conv -> DomainBatchNorm -> ReLU under ``checkpoint`` (``mode``), then a plain head."""

    def __init__(self) -> None:
        super().__init__()
        self.mode: str | None = None
        self.block = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), DomainBatchNorm2d(4, num_domains=2), nn.ReLU()
        )
        self.head = nn.Sequential(nn.Conv2d(4, 4, 1), DomainBatchNorm2d(4, num_domains=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode is None:
            return self.head(self.block(x))
        reentrant = self.mode == "reentrant"
        h = torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=reentrant)
        return self.head(h)


@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
@pytest.mark.parametrize("ids", [torch.tensor([0, 1, 1, 0, 1, 1]), 1], ids=["per_sample", "int"])
@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
def test_checkpoint_recompute_after_domain_block_uses_the_same_ids(mode, ids):
    """Regression (issue 17.3): ``backward()`` after the block raised "no domain given"."""
    torch.manual_seed(40)
    base = _Checkpointed()
    for layer in (base.block[1], base.head[1]):
        _randomise(layer)
    x = torch.randn(6, 3, 5, 5)
    results = []
    for checkpointed in (None, mode):
        model = copy.deepcopy(base)
        model.mode = checkpointed
        xx = x.clone().requires_grad_()
        with domain(model, ids):
            y = model(xx)
        y.square().sum().backward()  # outside the block, as Lightning's automatic optimisation
        results.append((y, xx.grad, [p.grad for p in model.parameters()], model))
    (y0, g0, p0, m0), (y1, g1, p1, m1) = results
    assert torch.equal(y1, y0) and torch.equal(g1, g0)
    for a, b in zip(p1, p0, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="no domain given"):  # outside a backward: still raises
        m1(x)
    # the recompute updates the running statistics again, as nn.BatchNorm2d's does
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        h = m0.block[0](x)
    ref = copy.deepcopy(bn)
    torch.utils.checkpoint.checkpoint(
        bn, h.requires_grad_(), use_reentrant=mode == "reentrant"
    ).sum().backward()
    assert bn.num_batches_tracked == 2 and ref.num_batches_tracked == 0
    assert m1.block[1].num_batches_tracked.tolist() == [
        2 * int((torch.as_tensor(ids).expand(6) == d).any()) for d in range(2)
    ]


def test_timm_grad_checkpointing_under_domain():
    timm = pytest.importorskip("timm")
    torch.manual_seed(41)
    base = convert_norms(timm.create_model("resnet10t", num_classes=3), "domain", num_domains=2)
    ids = torch.tensor([0, 1, 1, 0])
    x = torch.randn(4, 3, 32, 32)
    grads = []
    for checkpointed in (False, True):
        model = copy.deepcopy(base)
        model.set_grad_checkpointing(checkpointed)
        with domain(model, ids):
            loss = model(x).square().sum()
        loss.backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# --- issue 17: plain BatchNorm checkpoints load ---


@pytest.mark.parametrize("shared_affine", [False, True])
def test_plain_batchnorm_state_loads_into_every_domain(shared_affine):
    """Regression (issue 17.8): ``[C]`` states raised a size mismatch ``[64]`` vs ``[2, 64]``."""
    torch.manual_seed(42)
    bn = nn.BatchNorm2d(5)
    bn(torch.randn(8, 5, 3, 3) * 2 + 1)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    state = bn.state_dict()
    layer = DomainBatchNorm2d(5, num_domains=3, shared_affine=shared_affine)
    layer.load_state_dict(state)
    ref = DomainBatchNorm2d.from_batchnorm(bn, 3, shared_affine=shared_affine)
    for key, value in ref.state_dict().items():
        assert torch.equal(layer.state_dict()[key], value), key
    assert state["running_mean"].shape == (5,)  # the caller's dict is not changed
    assigned = DomainBatchNorm2d(5, num_domains=3, shared_affine=shared_affine)
    assigned.load_state_dict(state, assign=True)  # its buffers are updated in place later
    assigned(torch.randn(6, 5, 2, 2), domain=torch.tensor([0, 1, 2, 0, 1, 2]))
    assert not torch.equal(assigned.running_mean[0], assigned.running_mean[1])
    layer.load_state_dict(ref.state_dict())  # [num_domains, C] loads as is
    bad = {**ref.state_dict(), "running_mean": torch.zeros(2, 5)}
    with pytest.raises(RuntimeError, match="size mismatch for running_mean"):
        layer.load_state_dict(bad)
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        layer.load_state_dict({**state, "weight": torch.ones(4)})


def test_plain_resnet18_checkpoint_loads_strictly_after_conversion():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(43)
    plain = torchvision.models.resnet18(num_classes=10)
    plain(torch.randn(4, 3, 32, 32))  # non-trivial running statistics
    model = convert_norms(torchvision.models.resnet18(num_classes=10), "domain", num_domains=2)
    model.load_state_dict(plain.state_dict(), strict=True)
    plain.eval()
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    for d in range(2):
        with domain(model, d):
            torch.testing.assert_close(model(x), plain(x), atol=1e-5, rtol=1e-5)


# --- issue 17: torch.func (grad, vmap, functional_call) ---


def _func_loss(layer: nn.Module, ids, buffers: dict[str, torch.Tensor]):
    """``loss(params, x)`` through ``functional_call``; buffers copied inside the transform."""

    def loss(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        state = {**params, **{k: v.clone() for k, v in buffers.items()}}
        return torch.func.functional_call(layer, state, (x,), {"domain": ids}).square().sum()

    return loss


@pytest.mark.parametrize(
    ("training", "track"), [(True, True), (True, False), (False, True), (False, False)]
)
@pytest.mark.parametrize("ids", [torch.tensor([0, 1, 1, 0, 1, 0]), 1], ids=["per_sample", "int"])
def test_torch_func_grad_equals_autograd(training, track, ids):
    """Regression (issue 17.4): ``_DomainBatchNormFn`` had no ``setup_context``."""
    torch.manual_seed(50)
    layer = DomainBatchNorm2d(3, num_domains=2, track_running_stats=track).train(training)
    _randomise(layer)
    x = torch.randn(6, 3, 4, 4) * 2 + 1
    params = {k: v.detach() for k, v in layer.named_parameters()}
    buffers = snapshot_buffers(layer)
    grads = torch.func.grad(_func_loss(layer, ids, buffers), argnums=(0, 1))(params, x)
    ref = copy.deepcopy(layer)
    xr = x.clone().requires_grad_()
    ref(xr, domain=ids).square().sum().backward()
    for key, p in ref.named_parameters():
        torch.testing.assert_close(grads[0][key], p.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[1], xr.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("training", "track"), [(True, False), (False, True), (False, False)])
def test_vmap_over_whole_batches_equals_a_loop(training, track):
    """``vmap`` of the layer and of its ``grad`` over a leading dim of whole batches.

    (Training with running statistics under ``vmap`` is refused as by ``nn.BatchNorm2d``:
    the in-place update of unbatched buffers.)
    """
    torch.manual_seed(51)
    layer = DomainBatchNorm2d(3, num_domains=2, track_running_stats=track).train(training)
    _randomise(layer)
    ids = torch.tensor([0, 1, 1, 0, 1, 0])
    xb = torch.randn(3, 6, 3, 4, 4)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    loss = _func_loss(layer, ids, snapshot_buffers(layer))
    out = torch.func.vmap(
        lambda x: torch.func.functional_call(layer, params, (x,), {"domain": ids})
    )(xb)
    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, xb)
    for i in range(3):
        torch.testing.assert_close(out[i], layer(xb[i], domain=ids), atol=1e-6, rtol=0)
        ref = torch.func.grad(loss)(params, xb[i])
        for key, value in ref.items():
            torch.testing.assert_close(grads[key][i], value, atol=1e-5, rtol=1e-5)


def test_per_sample_gradients_in_eval_match_a_loop():
    """Opacus-style ``vmap(grad(...))`` over samples with their own domain ids."""
    torch.manual_seed(52)
    layer = DomainBatchNorm2d(3, num_domains=2).eval()
    _randomise(layer)
    x = torch.randn(6, 3, 4, 4)
    ids = torch.tensor([0, 1, 1, 0, 1, 0])
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def loss(p, xi, di):
        out = torch.func.functional_call(layer, p, (xi[None],), {"domain": di[None]})
        return out.square().sum()

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, ids)
    for i in range(6):
        ref = copy.deepcopy(layer)
        ref(x[i : i + 1], domain=ids[i : i + 1]).square().sum().backward()
        torch.testing.assert_close(grads["weight"][i], ref.weight.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grads["bias"][i], ref.bias.grad, atol=1e-5, rtol=1e-5)
    assert layer._rare_seen is None  # no tensor made inside a transform outlives it
    copy.deepcopy(layer)


def test_bf16_per_sample_output_close_to_float64_truth_on_offset_inputs():
    """Issue 17: keep bf16 per-sample outputs close to the fp64 truth (fp32 statistics).

    Inputs at mean 100, std 1: our error is about 0.008 (the bf16 rounding of the output);
    ``nn.BatchNorm2d``'s own bf16 kernel is about 0.09 off, as is an ``int`` domain, which is
    that kernel by contract.
    """
    torch.manual_seed(60)
    x = (torch.randn(16, 8, 6, 6) + 100).bfloat16()
    ids = torch.tensor([0, 1] * 8)
    layer = DomainBatchNorm2d(8, num_domains=2, dtype=torch.bfloat16)
    y = layer(x, domain=ids).double()
    for d in range(2):
        truth = torch.nn.functional.batch_norm(x[ids == d].double(), None, None, training=True)
        assert (y[ids == d] - truth).abs().max() < 0.02
    bn = nn.BatchNorm2d(8, dtype=torch.bfloat16)
    assert torch.equal(layer(x, domain=1), bn(x))


def test_lightning_fit_with_checkpointing_and_domain_equals_plain_loop():
    """Issue 17.3: automatic optimisation runs ``backward`` after ``training_step`` returned."""
    pl = pytest.importorskip("lightning.pytorch")
    torch.manual_seed(44)
    base = _Checkpointed()
    x = torch.randn(3, 6, 3, 5, 5)
    ids = torch.tensor([[0, 1, 1, 0, 1, 1], [1, 1, 0, 0, 0, 1], [0, 0, 0, 1, 0, 1]])

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = copy.deepcopy(base)
            self.net.mode = "non_reentrant"

        def training_step(self, batch, batch_idx):
            xb, ib = batch
            with domain(self.net, ib):
                return self.net(xb).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    loader = torch.utils.data.DataLoader(list(zip(x, ids, strict=True)), batch_size=None)
    module = Module()
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)
    plain = copy.deepcopy(base)
    opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    for xb, ib in zip(x, ids, strict=True):
        opt.zero_grad()
        with domain(plain, ib):
            plain(xb).square().mean().backward()
        opt.step()
    for (key, p), q in zip(plain.named_parameters(), module.net.parameters(), strict=True):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=0, msg=key)


class _OpNames(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the aten ops dispatched inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    ("shape", "reduces"), [((8, 4), False), ((8, 4, 1), False), ((8, 4, 3), True)]
)
def test_one_position_input_has_no_row_reduction_kernels(shape, reduces):
    """Issue 21.7: BatchNorm1d-shaped input ran N*C one-element reductions (CUDA)."""
    torch.manual_seed(70)
    layer = DomainBatchNorm1d(4, num_domains=2)
    _randomise(layer)
    ids = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    x = (torch.randn(shape) * 2 + 1).requires_grad_()
    refs = _references(layer, nn.BatchNorm1d)
    with _OpNames() as ops:
        y = layer(x, domain=ids)
        y.square().sum().backward()
    kernels = {"batch_norm_update_stats", "native_batch_norm_backward"}
    assert bool(kernels & ops.names) == reduces, ops.names
    for d, bn in enumerate(refs):
        xd = x.detach()[ids == d].requires_grad_()
        yd = bn(xd)
        yd.square().sum().backward()
        torch.testing.assert_close(y[ids == d], yd, atol=ATOL, rtol=0)
        torch.testing.assert_close(x.grad[ids == d], xd.grad, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(layer.weight.grad[d], bn.weight.grad, atol=1e-4, rtol=1e-5)


def test_recompute_bn_stats_counts_a_one_value_domain():
    """Regression (issue 17.1): the population pass crashed on a one-sample domain at 1x1."""
    from lightning_norms.stats import recompute_bn_stats

    torch.manual_seed(71)
    net = nn.Sequential(nn.Conv2d(3, 4, 1), DomainBatchNorm2d(4, num_domains=2))
    batches = [(torch.randn(5, 3, 1, 1) + 3, torch.tensor([0, 0, 0, 0, 1])) for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        recompute_bn_stats(net, batches, forward_fn=lambda m, b: m[1](m[0](b[0]), domain=b[1]))
    with torch.no_grad():
        h = torch.cat([net[0](x) for x, _ in batches])
    ids = torch.cat([i for _, i in batches])
    for d in range(2):
        hd = h[ids == d].transpose(0, 1).flatten(1)
        torch.testing.assert_close(net[1].running_mean[d], hd.mean(1), atol=1e-5, rtol=0)
        torch.testing.assert_close(net[1].running_var[d], hd.var(1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("track", [True, False])
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::FutureWarning")
def test_jit_trace_save_load_of_eval_per_sample(track, tmp_path):
    """Issue 17 (harness): without running statistics the trace held the autograd Function."""
    torch.manual_seed(72)
    net = nn.Sequential(nn.Conv2d(3, 4, 1), DomainBatchNorm2d(4, 3, track_running_stats=track))
    net.eval()

    class Routed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x, ids):
            with domain(self.net, ids):
                return self.net(x)

    x, ids = torch.randn(6, 3, 3, 3), torch.tensor([0, 1, 1, 0, 2, 2])
    torch.jit.save(torch.jit.trace(Routed(), (x, ids)), tmp_path / "net.pt")
    loaded = torch.jit.load(tmp_path / "net.pt")
    for xx, ii in ((x, ids), (x.flip(0) * 2, torch.tensor([2, 2, 0, 0, 1, 0]))):
        torch.testing.assert_close(loaded(xx, ii), Routed()(xx, ii), atol=1e-5, rtol=1e-5)


def test_ids_read_once_per_tensor_and_again_after_an_inplace_change():
    """CPU ids are read on the host once per tensor (shared by layers), re-read when changed."""
    net = nn.Sequential(DomainBatchNorm2d(3, 2), DomainBatchNorm2d(3, 2))
    ids, x = torch.tensor([0, 1, 0, 1]), torch.randn(4, 3, 2, 2)
    with domain(net, ids):
        net(x)
    ids[0] = 2
    with domain(net, ids), pytest.raises(ValueError, match=r"in \[0, 2\), got 2"):
        net(x)


def test_device_ids_range_asserted_once_per_tensor_and_domain_count():
    """Off CPU (meta here) the device-side range assert runs once per ids tensor and version;
    a layer with fewer domains asserts again (its bound is tighter)."""
    from torch.profiler import profile

    three, two = DomainBatchNorm2d(4, 3).to("meta"), DomainBatchNorm2d(4, 2).to("meta")
    x = torch.empty(6, 4, 3, 3, device="meta")
    ids = torch.tensor([0, 1, 0, 1, 1, 0], device="meta")
    with profile() as prof:
        three(x, ids)
        three(x, ids)
        two(x, ids)
    assert sum(e.name == "aten::_assert_async" for e in prof.events()) == 2


class _FreshFloat32(TorchDispatchMode):
    """Counts op outputs in fp32 with at least ``numel`` elements that alias no input."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        taken = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.numel() >= self.numel:
                self.count += t.untyped_storage().data_ptr() not in taken
        return out


def _fp32_activations(layer: nn.Module, x: torch.Tensor, **kwargs: object) -> int:
    """Activation-sized fp32 tensors made by one forward+backward of ``layer`` on ``x``."""
    x = x.detach().requires_grad_(True)
    with _FreshFloat32(x.numel()) as mode:
        layer(x, **kwargs).backward(torch.ones_like(x))
    return mode.count


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("training", [True, False])
def test_low_precision_makes_no_more_fp32_activations_than_batchnorm(dtype, training):
    x = (torch.randn(8, 4, 6, 6, generator=torch.Generator().manual_seed(0)) + 100).to(dtype)
    ids = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1])
    layer, bn = DomainBatchNorm2d(4, 2).train(training), nn.BatchNorm2d(4).train(training)
    count = _fp32_activations(layer, x, domain=ids)
    assert count <= _fp32_activations(bn, x) == 0
    # still BatchNorm per domain in fp32 inside: output and input gradient near fp64's
    xr = x.double().requires_grad_(True)
    ref = DomainBatchNorm2d(4, 2).double().train(training)
    xl = x.detach().requires_grad_(True)
    y = DomainBatchNorm2d(4, 2).train(training)(xl, domain=ids)
    g = torch.linspace(-1, 1, x.numel()).view(x.shape)
    (y.float() * g).sum().backward()
    (ref(xr, domain=ids) * g.double()).sum().backward()
    torch.testing.assert_close(y.double(), ref(xr.detach(), domain=ids), atol=0.02, rtol=0.01)
    assert xl.grad is not None and xr.grad is not None
    torch.testing.assert_close(xl.grad.double(), xr.grad, atol=0.02, rtol=0.01)


def test_routing_follows_ids_changed_in_place_or_replaced() -> None:
    """The per-ids routing (cached per ids tensor and version) never serves stale ids."""
    torch.manual_seed(3)
    layer = DomainBatchNorm2d(3, num_domains=2)
    x = torch.randn(6, 3, 2, 2) * 2 + 1
    ids = torch.tensor([0, 0, 0, 1, 1, 1])
    layer(x, domain=ids)
    for change in ("in place", "new tensor"):
        if change == "in place":
            ids[:2] = 1  # same tensor, version bumped
        else:
            ids = torch.tensor([1, 0, 1, 0, 1, 0])  # a new tensor (maybe at the old address)
        y = domain_batch_norm(x, ids, 2, training=True)
        for d in range(2):
            ref = torch.nn.functional.batch_norm(x[ids == d], None, None, training=True)
            torch.testing.assert_close(y[ids == d], ref, atol=1e-5, rtol=0)


def test_layers_sharing_ids_share_one_routing() -> None:
    """A second layer routed by the same ids tensor launches no op for the routing."""
    first, second = DomainBatchNorm2d(3, 2), DomainBatchNorm2d(3, 2)
    x, ids = torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 1, 0])
    first(x, domain=ids)
    assert "aten::arange" not in op_names(lambda: second(x, domain=ids))
    assert "aten::arange" in op_names(lambda: second(x, domain=ids.clone()))


def test_converted_ids_are_shared_by_the_layers_they_route() -> None:
    """Ids that need a conversion (int32 here; CPU ids for a CUDA model alike) are converted
    once per tensor and version: a second layer builds no routing, and an in-place change of
    the original ids is followed."""
    torch.manual_seed(5)
    first, second = DomainBatchNorm2d(3, 2), DomainBatchNorm2d(3, 2)
    x, ids = torch.randn(6, 3, 2, 2), torch.tensor([0, 1, 1, 0, 0, 1], dtype=torch.int32)
    first(x, domain=ids)
    assert "aten::arange" not in op_names(lambda: second(x, domain=ids))
    ids[:3] = torch.tensor([1, 1, 0], dtype=torch.int32)  # in place: version bumped
    y = second(x, domain=ids)
    for d in range(2):
        mask = ids == d
        ref = torch.nn.functional.batch_norm(x[mask], None, None, training=True)
        torch.testing.assert_close(y[mask], ref, atol=1e-5, rtol=0)  # fresh affine: 1, 0
