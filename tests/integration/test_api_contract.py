"""Black-box contract tests written only from /work/shared/API.md.

Every test imports only the public paths API.md names (``lightning_norms``,
``lightning_norms.stats``, ``lightning_norms.callbacks``, ``lightning_norms.data``), plus the
shared test model and Trainer of ``tests/_boring.py`` for the Lightning fits, and compares
against an independent reference: torch's ``nn.BatchNorm*d``, a formula written out here, or a
single-process run. Details API.md leaves to the implementer (the report's field names, the
warm-up step's off-by-one) are read from the public docstrings or accepted either way.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
import re
import subprocess
import sys
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import lightning_norms as ln
from lightning_norms import stats as lns
from lightning_norms.callbacks import BatchNormDoctor, PreciseBN
from lightning_norms.data import MixingBatchSampler, mix_real_fake
from tests._boring import BoringNormModel, boring_body, boring_data, boring_loader, boring_trainer

F64 = torch.float64

# expected in tests that hand over fewer batches than the default num_batches=200
pytestmark = [
    pytest.mark.filterwarnings("ignore:recompute_bn_stats. got:UserWarning"),
    pytest.mark.filterwarnings("ignore:PreciseBN. the train dataloader has:UserWarning"),
]

# dim key -> (torch reference class, package renorm class name, domain class name, input shape)
DIMS = {
    "1d-NC": (nn.BatchNorm1d, "BatchRenorm1d", "DomainBatchNorm1d", (8, 4)),
    "1d-NCL": (nn.BatchNorm1d, "BatchRenorm1d", "DomainBatchNorm1d", (6, 4, 5)),
    "2d": (nn.BatchNorm2d, "BatchRenorm2d", "DomainBatchNorm2d", (6, 4, 3, 3)),
    "3d": (nn.BatchNorm3d, "BatchRenorm3d", "DomainBatchNorm3d", (4, 4, 2, 3, 2)),
}
BN_VARIANTS = [
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "DomainBatchNorm1d",
    "DomainBatchNorm2d",
    "DomainBatchNorm3d",
]
TORCH_BN = {"1d": nn.BatchNorm1d, "2d": nn.BatchNorm2d, "3d": nn.BatchNorm3d}
SHAPE_OF = {"1d": (6, 4, 5), "2d": (6, 4, 3, 3), "3d": (4, 4, 2, 3, 2)}


def _make(name: str, *args, **kwargs):
    """Build a package BN variant; DomainBatchNorm gets num_domains=1 unless given."""
    if name.startswith("Domain") and len(args) == 1:
        kwargs.setdefault("num_domains", 1)
    return getattr(ln, name)(*args, **kwargs)


def _close(a, b, atol=1e-6, rtol=1e-5):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def _bshape(x):
    return [1, -1] + [1] * (x.dim() - 2)


def _red(x):
    return [0, *range(2, x.dim())]


def _randomize_bn(bn: _BatchNorm, seed: int = 0) -> _BatchNorm:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if bn.affine:
            bn.weight.copy_(torch.rand(bn.weight.shape, generator=g, dtype=bn.weight.dtype) + 0.5)
            bn.bias.copy_(torch.randn(bn.bias.shape, generator=g, dtype=bn.bias.dtype))
        if bn.track_running_stats:
            rm = bn.running_mean
            bn.running_mean.copy_(torch.randn(rm.shape, generator=g, dtype=rm.dtype))
            bn.running_var.copy_(torch.rand(rm.shape, generator=g, dtype=rm.dtype) * 2 + 0.5)
            bn.num_batches_tracked.fill_(7)
    return bn


# --------------------------------------------------------------------------------------------
# Layers: common contract
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BN_VARIANTS)
def test_variant_is_batchnorm_subclass_with_torch_buffer_names(name):
    m = _make(name, 4)
    assert isinstance(m, _BatchNorm)
    buffers = dict(m.named_buffers())
    for b in ("running_mean", "running_var", "num_batches_tracked"):
        assert b in buffers


@pytest.mark.parametrize("name", BN_VARIANTS)
def test_variant_signature_starts_with_batchnorm_arguments(name):
    params = list(inspect.signature(getattr(ln, name)).parameters.values())
    names = [p.name for p in params]
    expected = [
        "num_features",
        "eps",
        "momentum",
        "affine",
        "track_running_stats",
        "device",
        "dtype",
    ]
    defaults = {
        "eps": 1e-5,
        "momentum": 0.1,
        "affine": True,
        "track_running_stats": True,
        "device": None,
        "dtype": None,
    }
    if name.startswith("Domain"):
        assert names[:8] == ["num_features", "num_domains", *expected[1:]]
        assert inspect.signature(getattr(ln, name)).parameters["shared_affine"].default is False
    else:
        assert names[:7] == expected
        sig = inspect.signature(getattr(ln, name)).parameters
        assert sig["r_max"].default == 3.0
        assert sig["d_max"].default == 5.0
        assert sig["warmup_steps"].default == 5000
    sig = inspect.signature(getattr(ln, name)).parameters
    for k, v in defaults.items():
        assert sig[k].default == v, k


@pytest.mark.parametrize("name", ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d"])
def test_renorm_positional_constructor_order(name):
    cls = getattr(ln, name)
    m = cls(4, 1e-3, 0.3, False, True, "cpu", F64)
    assert (m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats) == (
        4,
        1e-3,
        0.3,
        False,
        True,
    )
    assert m.running_mean.dtype == F64 and m.running_mean.device.type == "cpu"
    m = cls(4, 1e-3, None, True, False)
    assert m.momentum is None and m.affine and not m.track_running_stats
    d = cls(5)
    assert (d.eps, d.momentum, d.affine, d.track_running_stats) == (1e-5, 0.1, True, True)


@pytest.mark.parametrize("name", ["DomainBatchNorm1d", "DomainBatchNorm2d", "DomainBatchNorm3d"])
def test_domain_positional_constructor_order(name):
    cls = getattr(ln, name)
    m = cls(4, 3, 1e-3, 0.3, False, True, "cpu", F64)
    assert (m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats) == (
        4,
        1e-3,
        0.3,
        False,
        True,
    )
    assert tuple(m.running_mean.shape) == (3, 4)
    assert tuple(m.running_var.shape) == (3, 4)
    assert m.running_mean.dtype == F64
    d = cls(5, 2)
    assert (d.eps, d.momentum, d.affine, d.track_running_stats) == (1e-5, 0.1, True, True)


CONFIGS = [
    # momentum, affine, track_running_stats
    (0.1, True, True),
    (None, True, True),
    (0.3, False, True),
    (0.1, True, False),
]


def _check_equals_torch_bn(layer, ref, shape, call, steps=3):
    """Train a few steps and eval once; layer must match ref in output, grads, running stats."""
    g = torch.Generator().manual_seed(1)
    if ref.affine:
        _randomize_bn(ref, seed=3)
        with torch.no_grad():
            layer.weight.copy_(ref.weight.reshape(layer.weight.shape))
            layer.bias.copy_(ref.bias.reshape(layer.bias.shape))
            if ref.track_running_stats:
                layer.running_mean.copy_(ref.running_mean.reshape(layer.running_mean.shape))
                layer.running_var.copy_(ref.running_var.reshape(layer.running_var.shape))
                layer.num_batches_tracked.fill_(int(ref.num_batches_tracked))
    layer.train()
    ref.train()
    for step in range(steps):
        n = shape[0] + step  # uneven batch sizes
        x = torch.randn((n, *shape[1:]), generator=g, dtype=F64) * (1.5 + step) + step
        x1 = x.clone().requires_grad_(True)
        x2 = x.clone().requires_grad_(True)
        y1, y2 = call(layer, x1), ref(x2)
        _close(y1, y2)
        up = torch.randn(y1.shape, generator=g, dtype=F64)
        y1.backward(up)
        y2.backward(up)
        _close(x1.grad, x2.grad)
        if ref.affine:
            _close(layer.weight.grad.reshape(-1), ref.weight.grad)
            _close(layer.bias.grad.reshape(-1), ref.bias.grad)
        if ref.track_running_stats:
            _close(layer.running_mean.reshape(-1), ref.running_mean)
            _close(layer.running_var.reshape(-1), ref.running_var)
            assert int(layer.num_batches_tracked.reshape(-1)[0]) == int(ref.num_batches_tracked)
    layer.eval()
    ref.eval()
    x = torch.randn(shape, generator=g, dtype=F64) * 2 + 1
    with torch.no_grad():
        _close(call(layer, x), ref(x))


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"m{c[0]}-a{c[1]}-t{c[2]}")
@pytest.mark.parametrize("dim", list(DIMS))
def test_renorm_with_rmax1_dmax0_equals_torch_bn(dim, cfg):
    ref_cls, renorm, _, shape = DIMS[dim]
    momentum, affine, trs = cfg
    n_ch = shape[1]
    layer = getattr(ln, renorm)(
        n_ch,
        momentum=momentum,
        affine=affine,
        track_running_stats=trs,
        dtype=F64,
        r_max=1.0,
        d_max=0.0,
    )
    ref = ref_cls(n_ch, momentum=momentum, affine=affine, track_running_stats=trs, dtype=F64)
    _check_equals_torch_bn(layer, ref, shape, lambda m, x: m(x))


@pytest.mark.parametrize("ids_as_tensor", [False, True], ids=["int", "tensor"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"m{c[0]}-a{c[1]}-t{c[2]}")
@pytest.mark.parametrize("dim", list(DIMS))
def test_domain_with_one_domain_equals_torch_bn(dim, cfg, ids_as_tensor):
    ref_cls, _, dom, shape = DIMS[dim]
    momentum, affine, trs = cfg
    n_ch = shape[1]
    layer = getattr(ln, dom)(
        n_ch, 1, momentum=momentum, affine=affine, track_running_stats=trs, dtype=F64
    )
    ref = ref_cls(n_ch, momentum=momentum, affine=affine, track_running_stats=trs, dtype=F64)

    def call(m, x):
        d = torch.zeros(x.shape[0], dtype=torch.long) if ids_as_tensor else 0
        return m(x, domain=d)

    _check_equals_torch_bn(layer, ref, shape, call)


@pytest.mark.parametrize("name", ["BatchRenorm2d", "DomainBatchNorm2d"])
def test_variant_rejects_wrong_input_rank_like_torch(name):
    with pytest.raises(ValueError):
        nn.BatchNorm2d(4)(torch.randn(4, 4, 4))
    m = _make(name, 4)
    with pytest.raises(ValueError):
        if name.startswith("Domain"):
            m(torch.randn(4, 4, 4), domain=0)
        else:
            m(torch.randn(4, 4, 4))


# --------------------------------------------------------------------------------------------
# DomainBatchNorm
# --------------------------------------------------------------------------------------------


def _domain_setup(n_dom=3, n_ch=4, momentum=0.1, seed=0):
    m = ln.DomainBatchNorm2d(n_ch, n_dom, momentum=momentum, dtype=F64)
    refs = [
        _randomize_bn(nn.BatchNorm2d(n_ch, momentum=momentum, dtype=F64), seed=seed + d)
        for d in range(n_dom)
    ]
    with torch.no_grad():
        for d, r in enumerate(refs):
            m.weight.view(n_dom, n_ch)[d].copy_(r.weight)
            m.bias.view(n_dom, n_ch)[d].copy_(r.bias)
            m.running_mean[d].copy_(r.running_mean)
            m.running_var[d].copy_(r.running_var)
    return m, refs


def test_domain_buffers_and_parameters_shapes():
    m = ln.DomainBatchNorm2d(4, 3)
    assert tuple(m.running_mean.shape) == (3, 4)
    assert tuple(m.running_var.shape) == (3, 4)
    assert sum(p.numel() for p in m.parameters()) == 2 * 3 * 4  # per-domain affine
    s = ln.DomainBatchNorm2d(4, 3, shared_affine=True)
    assert tuple(s.running_mean.shape) == (3, 4)
    assert sum(p.numel() for p in s.parameters()) == 2 * 4  # one shared affine
    assert tuple(s.weight.shape) == (4,) and tuple(s.bias.shape) == (4,)
    n = ln.DomainBatchNorm2d(4, 3, affine=False)
    assert sum(p.numel() for p in n.parameters()) == 0


def test_domain_mixed_batch_train_equals_per_domain_bn():
    n_dom, n_ch = 3, 4
    m, refs = _domain_setup(n_dom, n_ch)
    before_absent = (m.running_mean[1].clone(), m.running_var[1].clone())
    g = torch.Generator().manual_seed(5)
    ids = torch.tensor([0, 2, 2, 0, 0, 2, 0, 2, 2, 0, 2])  # domain 1 absent
    x = torch.randn(len(ids), n_ch, 3, 3, generator=g, dtype=F64) * 2 + 1
    x[ids == 2] = x[ids == 2] * 3 - 2  # domains really differ
    m.train()
    xm = x.clone().requires_grad_(True)
    y = m(xm, domain=ids)
    up = torch.randn(y.shape, generator=g, dtype=F64)
    (y * up).sum().backward()
    for d in (0, 2):
        xr = x[ids == d].clone().requires_grad_(True)
        refs[d].train()
        yr = refs[d](xr)
        (yr * up[ids == d]).sum().backward()
        _close(y[ids == d], yr)
        _close(xm.grad[ids == d], xr.grad)
        _close(m.running_mean[d], refs[d].running_mean)
        _close(m.running_var[d], refs[d].running_var)
        _close(m.weight.grad.view(n_dom, n_ch)[d], refs[d].weight.grad)
        _close(m.bias.grad.view(n_dom, n_ch)[d], refs[d].bias.grad)
    # absent domain untouched, never NaN
    assert torch.equal(m.running_mean[1], before_absent[0])
    assert torch.equal(m.running_var[1], before_absent[1])
    assert torch.isfinite(m.running_mean).all() and torch.isfinite(m.running_var).all()
    assert torch.isfinite(y).all()
    assert float(m.weight.grad.view(n_dom, n_ch)[1].abs().sum()) == 0.0


def test_domain_mixed_batch_eval_uses_per_domain_running_stats():
    n_dom, n_ch = 3, 4
    m, refs = _domain_setup(n_dom, n_ch)
    m.eval()
    g = torch.Generator().manual_seed(6)
    ids = torch.tensor([2, 0, 1, 1, 0, 2, 2])
    x = torch.randn(len(ids), n_ch, 2, 3, generator=g, dtype=F64)
    with torch.no_grad():
        y = m(x, domain=ids)
        for d in range(n_dom):
            _close(y[ids == d], refs[d].eval()(x[ids == d]))
        # a single-sample batch is fine in eval
        _close(m(x[:1], domain=2), refs[2](x[:1]))


def test_domain_int_id_routes_whole_batch_and_updates_only_that_domain():
    n_dom, n_ch = 3, 4
    m, refs = _domain_setup(n_dom, n_ch)
    stats0 = m.running_mean.clone(), m.running_var.clone()
    x = torch.randn(5, n_ch, 2, 2, generator=torch.Generator().manual_seed(7), dtype=F64)
    m.train()
    y = m(x, domain=1)
    _close(y, refs[1].train()(x))
    _close(m.running_mean[1], refs[1].running_mean)
    _close(m.running_var[1], refs[1].running_var)
    for d in (0, 2):
        assert torch.equal(m.running_mean[d], stats0[0][d])
        assert torch.equal(m.running_var[d], stats0[1][d])


def test_domain_cumulative_average_per_domain():
    """momentum=None: each domain's running stats are the cumulative average of its batches."""
    n_dom, n_ch = 2, 3
    m = ln.DomainBatchNorm1d(n_ch, n_dom, momentum=None, dtype=F64)
    refs = [nn.BatchNorm1d(n_ch, momentum=None, dtype=F64) for _ in range(n_dom)]
    g = torch.Generator().manual_seed(8)
    for d in (0, 1, 0, 0, 1):
        x = torch.randn(6, n_ch, generator=g, dtype=F64) * (d + 1) + d
        m(x, domain=d)
        refs[d](x)
    for d in range(n_dom):
        _close(m.running_mean[d], refs[d].running_mean)
        _close(m.running_var[d], refs[d].running_var)


def test_domain_shared_affine_mixed_batch():
    n_dom, n_ch = 2, 3
    m = ln.DomainBatchNorm1d(n_ch, n_dom, shared_affine=True, dtype=F64)
    ref0 = _randomize_bn(nn.BatchNorm1d(n_ch, dtype=F64), seed=1)
    ref1 = copy.deepcopy(ref0)
    with torch.no_grad():
        ref1.running_mean.add_(3.0)
        m.weight.copy_(ref0.weight)
        m.bias.copy_(ref0.bias)
        m.running_mean[0].copy_(ref0.running_mean)
        m.running_var[0].copy_(ref0.running_var)
        m.running_mean[1].copy_(ref1.running_mean)
        m.running_var[1].copy_(ref1.running_var)
    ids = torch.tensor([0, 1, 1, 0, 1, 0])
    x = torch.randn(6, n_ch, generator=torch.Generator().manual_seed(2), dtype=F64)
    y = m(x, domain=ids)
    _close(y[ids == 0], ref0(x[ids == 0]))
    _close(y[ids == 1], ref1(x[ids == 1]))
    m.eval()
    ref0.eval()
    ref1.eval()
    y = m(x, domain=ids)
    _close(y[ids == 0], ref0(x[ids == 0]))
    _close(y[ids == 1], ref1(x[ids == 1]))


def test_domain_none_without_context_raises_value_error_naming_layer():
    m = ln.DomainBatchNorm2d(4, 2)
    with pytest.raises(ValueError, match="DomainBatchNorm2d"):
        m(torch.randn(4, 4, 2, 2))
    with pytest.raises(ValueError, match="DomainBatchNorm2d"):
        m(torch.randn(4, 4, 2, 2), domain=None)


@pytest.mark.parametrize("bad", [2, -1, 7, "tensor_high", "tensor_neg"])
def test_domain_out_of_range_raises_value_error(bad):
    m = ln.DomainBatchNorm2d(4, 2)
    if bad == "tensor_high":
        bad = torch.tensor([0, 1, 2, 0])
    elif bad == "tensor_neg":
        bad = torch.tensor([0, -1, 1, 0])
    for mode in ("train", "eval"):
        getattr(m, mode)()
        with pytest.raises(ValueError):
            m(torch.randn(4, 4, 2, 2), domain=bad)


@pytest.mark.parametrize("dim", ["1d", "2d", "3d"])
def test_domain_from_batchnorm_copies_into_every_domain(dim):
    bn = _randomize_bn(TORCH_BN[dim](4, eps=1e-3, momentum=0.2, dtype=F64), seed=4)
    cls = getattr(ln, f"DomainBatchNorm{dim}")
    m = cls.from_batchnorm(bn, 3)
    assert isinstance(m, cls)
    assert m.eps == 1e-3 and m.momentum == 0.2
    assert tuple(m.running_mean.shape) == (3, 4)
    x = torch.randn(SHAPE_OF[dim], generator=torch.Generator().manual_seed(0), dtype=F64) + 1
    m.eval()
    bn.eval()
    with torch.no_grad():
        for d in range(3):
            _close(m(x, domain=d), bn(x))
    m.train()
    for d in range(3):
        r = copy.deepcopy(bn).train()
        _close(m(x, domain=d), r(x))
        _close(m.running_mean[d], r.running_mean)
        _close(m.running_var[d], r.running_var)


def _domain_net():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 1),
        ln.DomainBatchNorm2d(4, 3),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(4, 4, 1), ln.DomainBatchNorm2d(4, 3)),
    ).double()
    with torch.no_grad():
        for mod in net.modules():
            if isinstance(mod, _BatchNorm):
                mod.running_mean.normal_()
                mod.running_var.uniform_(0.5, 2)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_()
    return net


def _manual_forward(net, x, ids):
    h = net[0](x)
    h = net[1](h, domain=ids)
    h = net[2](h)
    h = net[3][0](h)
    return net[3][1](h, domain=ids)


@pytest.mark.parametrize("ids", [2, torch.tensor([0, 2, 1, 2, 0, 1])], ids=["int", "tensor"])
def test_domain_context_manager(ids):
    net = _domain_net()
    x = torch.randn(6, 3, 2, 2, dtype=F64)
    for mode in ("eval", "train"):
        a, b = copy.deepcopy(net), copy.deepcopy(net)
        getattr(a, mode)()
        getattr(b, mode)()
        with ln.domain(a, ids):
            ya = a(x)
        yb = _manual_forward(b, x, ids)
        _close(ya, yb)
        for ma, mb in zip(a.modules(), b.modules(), strict=True):
            if isinstance(ma, _BatchNorm):
                _close(ma.running_mean, mb.running_mean)
                _close(ma.running_var, mb.running_var)
    # the ids are gone after the block
    with pytest.raises(ValueError):
        net(x)


def test_domain_context_manager_restores_on_error_and_nesting():
    net = _domain_net().eval()
    x = torch.randn(4, 3, 2, 2, dtype=F64)
    with pytest.raises(RuntimeError), ln.domain(net, 1):
        raise RuntimeError("boom")
    with pytest.raises(ValueError):
        net(x)
    with ln.domain(net, 0):
        with ln.domain(net, 2):
            _close(net(x), _manual_forward(net, x, 2))
        _close(net(x), _manual_forward(net, x, 0))
    with pytest.raises(ValueError):
        net(x)


def test_domain_context_manager_out_of_range():
    net = _domain_net()
    with pytest.raises(ValueError), ln.domain(net, 3):
        net(torch.randn(4, 3, 2, 2, dtype=F64))


# --------------------------------------------------------------------------------------------
# BatchRenorm
# --------------------------------------------------------------------------------------------


def _renorm_ref(x, rm, rv, w, b, eps, r_lim, d_lim):
    s = _bshape(x)
    mu = x.mean(_red(x))
    sb = (x.var(_red(x), unbiased=False) + eps).sqrt()
    sig = (rv + eps).sqrt()
    r = (sb / sig).clamp(1.0 / r_lim, r_lim).detach()
    d = ((mu - rm) / sig).clamp(-d_lim, d_lim).detach()
    xhat = (x - mu.view(s)) / sb.view(s) * r.view(s) + d.view(s)
    return w.view(s) * xhat + b.view(s)


def test_renorm_training_formula_with_active_clipping():
    n_ch = 4
    m = ln.BatchRenorm2d(n_ch, r_max=1.5, d_max=0.5, warmup_steps=0, dtype=F64)
    rm = torch.tensor([3.0, -3.0, 0.0, 0.1], dtype=F64)
    rv = torch.tensor([9.0, 0.04, 1.0, 1.2], dtype=F64)
    with torch.no_grad():
        m.running_mean.copy_(rm)
        m.running_var.copy_(rv)
        m.weight.copy_(torch.tensor([1.5, 0.5, 1.0, 2.0]))
        m.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, n_ch, 3, 3, generator=g, dtype=F64)
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    w = m.weight.detach().clone().requires_grad_(True)
    b = m.bias.detach().clone().requires_grad_(True)
    m.train()
    y = m(x1)
    expected = _renorm_ref(x2, rm, rv, w, b, m.eps, 1.5, 0.5)
    plain = F.batch_norm(x, None, None, w.detach(), b.detach(), True, 0.0, m.eps)
    assert not torch.allclose(expected, plain, atol=1e-3)  # clipping really matters here
    _close(y, expected)
    up = torch.randn(y.shape, generator=g, dtype=F64)
    y.backward(up)
    expected.backward(up)
    _close(x1.grad, x2.grad)  # r and d are constants in the backward pass
    _close(m.weight.grad, w.grad)
    _close(m.bias.grad, b.grad)
    # running stats update like BN
    mu = x.mean((0, 2, 3))
    var = x.var((0, 2, 3), unbiased=True)
    _close(m.running_mean, 0.9 * rm + 0.1 * mu)
    _close(m.running_var, 0.9 * rv + 0.1 * var)
    assert int(m.num_batches_tracked) == 1


def _saturated_renorm(warmup_steps, nbt):
    n_ch = 3
    m = ln.BatchRenorm1d(n_ch, r_max=3.0, d_max=5.0, warmup_steps=warmup_steps, dtype=F64)
    with torch.no_grad():
        m.running_mean.fill_(80.0)  # (mu_B - mu) / sigma ~ -8: d saturates at -d_lim
        m.running_var.fill_(100.0)  # sigma_B / sigma ~ 0.1: r saturates at 1 / r_lim
        m.num_batches_tracked.fill_(nbt)
    x = torch.randn(16, n_ch, generator=torch.Generator().manual_seed(1), dtype=F64)
    rm, rv = m.running_mean.clone(), m.running_var.clone()
    y = m.train()(x)
    w, b = m.weight.detach(), m.bias.detach()

    def expected(t):
        frac = min(t / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
        return _renorm_ref(x, rm, rv, w, b, m.eps, 1.0 + 2.0 * frac, 5.0 * frac)

    return y.detach(), expected


@pytest.mark.parametrize("nbt", [0, 4, 9, 10, 25])
def test_renorm_warmup_ramps_clip_limits_linearly(nbt):
    """num_batches_tracked is the step counter; counted before or after this step's increment."""
    y, expected = _saturated_renorm(10, nbt)
    candidates = [expected(nbt), expected(nbt + 1)]
    assert any(torch.allclose(y, c, atol=1e-6) for c in candidates), (
        f"output matches neither step {nbt} nor {nbt + 1} of a linear ramp"
    )


def test_renorm_warmup_starts_at_plain_bn_and_ends_at_final_limits():
    y0, expected = _saturated_renorm(10, 0)
    plain = expected(0)  # r_lim=1, d_lim=0
    full = expected(10)
    assert not torch.allclose(plain, full, atol=1e-3)
    assert not torch.allclose(y0, full, atol=1e-3)
    y_late, _ = _saturated_renorm(10, 1000)
    _close(y_late, full)


def test_renorm_warmup_zero_means_no_ramp():
    y, expected = _saturated_renorm(0, 0)
    _close(y, expected(1))  # full limits on the very first step


@pytest.mark.parametrize("dim", ["1d", "2d", "3d"])
def test_renorm_eval_equals_bn_eval(dim):
    bn = _randomize_bn(TORCH_BN[dim](4, dtype=F64), seed=9)
    m = getattr(ln, f"BatchRenorm{dim}")(4, dtype=F64)
    m.load_state_dict(bn.state_dict())
    m.eval()
    bn.eval()
    x = torch.randn(SHAPE_OF[dim], dtype=F64) * 3
    with torch.no_grad():
        _close(m(x), bn(x))


# --------------------------------------------------------------------------------------------
# Cosine layers
# --------------------------------------------------------------------------------------------


def test_cosine_linear_formula_range_and_no_bias():
    torch.manual_seed(0)
    m = ln.CosineLinear(6, 5)
    assert getattr(m, "bias", None) is None
    assert sum(p.numel() for p in m.parameters()) == 30
    w = m.weight.detach()
    assert tuple(w.shape) == (5, 6)
    x = torch.randn(7, 6) * 10
    y = m(x)
    expected = (x @ w.T) / (x.norm(dim=1, keepdim=True) * w.norm(dim=1)[None, :])
    _close(y, expected, atol=1e-5, rtol=1e-4)
    # aligned / anti-aligned inputs hit the ends of the range, never beyond
    xa = torch.cat([w[:1] * 1e3, -w[:1] * 1e-3])
    ya = m(xa)
    _close(ya[0, 0], torch.tensor(1.0), atol=1e-4, rtol=0)
    _close(ya[1, 0], torch.tensor(-1.0), atol=1e-4, rtol=0)
    big = torch.randn(64, 6) * 1e6
    for out in (y, ya, m(big)):
        assert out.abs().max() <= 1.0


def test_cosine_linear_leading_dims_like_linear():
    m = ln.CosineLinear(6, 5)
    x = torch.randn(2, 3, 6)
    _close(m(x), m(x.reshape(6, 6)).reshape(2, 3, 5))


def test_cosine_zero_input_gives_zero_not_nan():
    lin = ln.CosineLinear(4, 3)
    x = torch.zeros(2, 4, requires_grad=True)
    y = lin(x)
    assert torch.equal(y, torch.zeros(2, 3))
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(lin.weight.grad).all()
    conv = ln.CosineConv2d(2, 3, 3, padding=1)
    xc = torch.zeros(1, 2, 4, 4, requires_grad=True)
    yc = conv(xc)
    assert torch.equal(yc, torch.zeros(1, 3, 4, 4))
    yc.sum().backward()
    assert torch.isfinite(xc.grad).all() and torch.isfinite(conv.weight.grad).all()


def _cos_conv_ref(x, w, stride, padding, dilation, groups):
    n_batch, c_in = x.shape[:2]
    out_c, _, kh, kw = w.shape
    out_shape = F.conv2d(x, w, None, stride, padding, dilation, groups).shape
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)
    n_pos = cols.shape[-1]
    cols = cols.view(n_batch, groups, c_in // groups * kh * kw, n_pos)
    wg = w.reshape(groups, out_c // groups, -1)
    num = torch.einsum("gok,ngkl->ngol", wg, cols)
    den = wg.norm(dim=-1)[None, :, :, None] * cols.norm(dim=2)[:, :, None, :]
    out = torch.nan_to_num(num / den, nan=0.0)
    return out.reshape(out_shape)


@pytest.mark.parametrize(
    "kw",
    [
        dict(kernel_size=3),
        dict(kernel_size=3, stride=2, padding=1),
        dict(kernel_size=3, stride=1, padding=2, dilation=2, groups=2),
        dict(kernel_size=(1, 3), padding=(0, 1)),
    ],
)
def test_cosine_conv2d_formula(kw):
    torch.manual_seed(0)
    m = ln.CosineConv2d(4, 6, **kw)
    assert getattr(m, "bias", None) is None
    assert sum(p.numel() for p in m.parameters()) == m.weight.numel()
    x = torch.randn(2, 4, 7, 8) * 5
    x[..., :4] = 0.0  # whole patches of zeros: 0, not NaN
    y = m(x)
    kwc = {k: v for k, v in kw.items() if k != "kernel_size"}
    expected = _cos_conv_ref(
        x.double(),
        m.weight.detach().double(),
        kwc.get("stride", 1),
        kwc.get("padding", 0),
        kwc.get("dilation", 1),
        kwc.get("groups", 1),
    ).float()
    assert torch.isfinite(y).all()
    _close(y, expected, atol=1e-5, rtol=1e-4)
    assert y.abs().max() <= 1.0
    ref_conv = nn.Conv2d(4, 6, **kw)
    assert y.shape == ref_conv(x).shape


# --------------------------------------------------------------------------------------------
# LayerNorm2d
# --------------------------------------------------------------------------------------------


def _ln2d_ref(x, w, b, eps):
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), w, b, eps).permute(0, 3, 1, 2)


def test_layernorm2d_equals_channels_last_layer_norm():
    n_ch = 5
    m = ln.LayerNorm2d(n_ch).double()
    with torch.no_grad():
        m.weight.copy_(torch.rand(n_ch) + 0.5)
        m.bias.copy_(torch.randn(n_ch))
    assert tuple(m.weight.shape) == (n_ch,) and tuple(m.bias.shape) == (n_ch,)
    x = (torch.randn(3, n_ch, 4, 2, dtype=F64) * 3 + 1).requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    w = m.weight.detach().clone().requires_grad_(True)
    b = m.bias.detach().clone().requires_grad_(True)
    y = m(x)
    yr = _ln2d_ref(xr, w, b, 1e-6)
    _close(y, yr)
    up = torch.randn_like(y)
    y.backward(up)
    yr.backward(up)
    _close(x.grad, xr.grad)
    _close(m.weight.grad, w.grad)
    _close(m.bias.grad, b.grad)


def test_layernorm2d_default_eps_and_affine_false():
    n_ch = 4
    x = torch.randn(2, n_ch, 3, 3, dtype=F64) * 1e-3  # per-position variance ~1e-6: eps matters
    m = ln.LayerNorm2d(n_ch).double()
    _close(m(x), _ln2d_ref(x, None, None, 1e-6))
    assert not torch.allclose(
        _ln2d_ref(x, None, None, 1e-6), _ln2d_ref(x, None, None, 1e-5), atol=1e-3
    )
    m3 = ln.LayerNorm2d(n_ch, 1e-3).double()
    _close(m3(x), _ln2d_ref(x, None, None, 1e-3))
    na = ln.LayerNorm2d(n_ch, affine=False)
    assert sum(p.numel() for p in na.parameters()) == 0
    xf = torch.randn(2, n_ch, 3, 3)
    _close(na(xf), _ln2d_ref(xf, None, None, 1e-6), atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# convert_norms
# --------------------------------------------------------------------------------------------


class _Holder(nn.Module):
    def __init__(self, kind="torch"):
        super().__init__()
        if kind == "torch":
            mk = {"1d": nn.BatchNorm1d, "2d": nn.BatchNorm2d, "3d": nn.BatchNorm3d}
        else:
            mk = {d: getattr(ln, f"BatchRenorm{d}") for d in ("1d", "2d", "3d")}
        self.bn1 = mk["1d"](4, dtype=F64)
        self.bn2 = mk["2d"](4, dtype=F64)
        self.bn3 = mk["3d"](4, dtype=F64)
        self.inner = nn.Sequential(nn.Linear(2, 2), nn.Sequential(mk["2d"](4, dtype=F64)))
        for i, bn in enumerate(self._bns()):
            _randomize_bn(bn, seed=10 + i)

    def _bns(self):
        return [self.bn1, self.bn2, self.bn3, self.inner[1][0]]


_INPUTS = [(6, 4, 5), (6, 4, 3, 3), (4, 4, 2, 3, 2), (6, 4, 3, 3)]


def _eval_outputs(mods, call=lambda m, x: m(x)):
    torch.manual_seed(123)
    outs = []
    with torch.no_grad():
        for mod, shape in zip(mods, _INPUTS, strict=True):
            mod.eval()
            outs.append(call(mod, torch.randn(shape, dtype=F64) * 2 + 0.5))
    return outs


@pytest.mark.parametrize("source", ["torch", "renorm"])
def test_convert_to_domain_carries_stats_into_every_domain(source):
    model = _Holder(source)
    before = _eval_outputs(model._bns())
    out = ln.convert_norms(model, "domain", num_domains=3)
    assert out is model
    want = [ln.DomainBatchNorm1d, ln.DomainBatchNorm2d, ln.DomainBatchNorm3d, ln.DomainBatchNorm2d]
    for mod, cls in zip(model._bns(), want, strict=True):
        assert type(mod) is cls
        assert tuple(mod.running_mean.shape) == (3, 4)
    for d in range(3):
        after = _eval_outputs(model._bns(), lambda m, x, d=d: m(x, domain=d))
        for a, b in zip(after, before, strict=True):
            _close(a, b)


def test_convert_to_renorm_carries_weights_and_stats():
    model = _Holder("torch")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    before = _eval_outputs(model._bns())
    out = ln.convert_norms(model, "renorm")
    assert out is model
    want = [ln.BatchRenorm1d, ln.BatchRenorm2d, ln.BatchRenorm3d, ln.BatchRenorm2d]
    for mod, cls in zip(model._bns(), want, strict=True):
        assert type(mod) is cls
    new_sd = model.state_dict()
    for k, v in sd.items():
        if k.rsplit(".", 1)[-1] in ("weight", "bias", "running_mean", "running_var"):
            _close(new_sd[k], v)
    for a, b in zip(_eval_outputs(model._bns()), before, strict=True):
        _close(a, b)


def test_convert_to_batch_gives_exact_torch_batchnorm():
    model = _Holder("renorm")
    before = _eval_outputs(model._bns())
    out = ln.convert_norms(model, "batch")
    assert out is model
    want = [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.BatchNorm2d]
    for mod, cls in zip(model._bns(), want, strict=True):
        assert type(mod) is cls
    for a, b in zip(_eval_outputs(model._bns()), before, strict=True):
        _close(a, b)


def _bn2d_model():
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(3, 4, 3, padding=1),
            bn=nn.BatchNorm2d(4),
            relu=nn.ReLU(),
            inner=nn.Sequential(nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6)),
        )
    )
    _randomize_bn(model.bn, 1)
    _randomize_bn(model.inner[1], 2)
    return model


def test_convert_to_layer2d():
    model = _bn2d_model()
    w = [model.bn.weight.detach().clone(), model.inner[1].weight.detach().clone()]
    b = [model.bn.bias.detach().clone(), model.inner[1].bias.detach().clone()]
    out = ln.convert_norms(model, "layer2d")
    assert out is model
    assert type(model.bn) is ln.LayerNorm2d and type(model.inner[1]) is ln.LayerNorm2d
    for mod, wi, bi in zip([model.bn, model.inner[1]], w, b, strict=True):
        _close(mod.weight.detach(), wi)
        _close(mod.bias.detach(), bi)
        x = torch.randn(2, wi.numel(), 3, 3)
        _close(mod(x), _ln2d_ref(x, wi, bi, 1e-6), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("groups", [1, 2])
def test_convert_to_group(groups):
    model = _bn2d_model()
    w = model.bn.weight.detach().clone()
    b = model.bn.bias.detach().clone()
    out = ln.convert_norms(model, "group", num_groups=groups)
    assert out is model
    assert type(model.bn) is nn.GroupNorm and type(model.inner[1]) is nn.GroupNorm
    assert model.bn.num_groups == groups and model.bn.num_channels == 4
    assert model.inner[1].num_groups == groups and model.inner[1].num_channels == 6
    _close(model.bn.weight.detach(), w)
    _close(model.bn.bias.detach(), b)
    x = torch.randn(2, 4, 3, 3)
    _close(model.bn(x), F.group_norm(x, groups, w, b, model.bn.eps))
    if groups == 1:  # whole-sample LayerNorm over C,H,W with per-channel affine
        ref = F.layer_norm(x, (4, 3, 3), None, None, model.bn.eps) * w.view(1, -1, 1, 1) + b.view(
            1, -1, 1, 1
        )
        _close(model.bn(x), ref, atol=1e-5, rtol=1e-4)
    model(torch.randn(2, 3, 5, 5))  # the converted model runs


def test_convert_to_domain_needs_num_domains():
    with pytest.raises((TypeError, ValueError)):
        ln.convert_norms(_bn2d_model(), "domain")


# --------------------------------------------------------------------------------------------
# import hygiene and NormSync
# --------------------------------------------------------------------------------------------


def test_import_lightning_norms_never_imports_lightning():
    code = (
        "import sys, torch\n"
        "import lightning_norms as ln\n"
        "for n in ['BatchRenorm1d','BatchRenorm2d','BatchRenorm3d','DomainBatchNorm1d',\n"
        "          'DomainBatchNorm2d','DomainBatchNorm3d','CosineLinear','CosineConv2d',\n"
        "          'LayerNorm2d','convert_norms','domain']:\n"
        "    getattr(ln, n)\n"
        "m = ln.convert_norms(torch.nn.Sequential(torch.nn.BatchNorm2d(3)), 'renorm')\n"
        "m(torch.randn(2, 3, 2, 2))\n"
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in\n"
        "             ('lightning', 'pytorch_lightning', 'lightning_fabric'))\n"
        "print('BAD', bad)\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def _layer_sync_classes():
    classes = []
    for mod in ("lightning.pytorch.plugins", "pytorch_lightning.plugins"):
        with contextlib.suppress(ImportError):
            classes.append(__import__(mod, fromlist=["LayerSync"]).LayerSync)
    return tuple(classes)


class _SyncHolder(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn1 = _randomize_bn(nn.BatchNorm1d(4, dtype=F64), 1)
        self.bn2 = _randomize_bn(nn.BatchNorm2d(4, dtype=F64), 2)
        self.bn3 = _randomize_bn(nn.BatchNorm3d(4, dtype=F64), 3)
        self.seq = nn.Sequential(
            nn.Conv2d(4, 4, 1), _randomize_bn(nn.BatchNorm2d(4, momentum=0.3, eps=1e-3), 4)
        )
        self.renorm = _randomize_bn(ln.BatchRenorm2d(4, dtype=F64), 5)
        self.dom = ln.DomainBatchNorm2d(4, 2, dtype=F64)


def test_normsync_is_layersync_with_apply_and_revert():
    sig = inspect.signature(ln.NormSync)
    assert "process_group" in sig.parameters
    plugin = ln.NormSync(process_group=None)
    assert isinstance(plugin, _layer_sync_classes())
    model = _SyncHolder()
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    x2 = torch.randn(3, 4, 2, 2, dtype=F64)
    model.eval()
    with torch.no_grad():
        ref2 = model.bn2(x2)
    applied = plugin.apply(model)
    for name, cls in (("bn1", nn.BatchNorm1d), ("bn2", nn.BatchNorm2d), ("bn3", nn.BatchNorm3d)):
        layer = getattr(applied, name)
        assert type(layer) is not cls, f"{name} was not converted"
        assert isinstance(layer, _BatchNorm)
    assert type(applied.seq[1]) is not nn.BatchNorm2d
    assert isinstance(applied.renorm, ln.BatchRenorm2d)
    assert isinstance(applied.dom, ln.DomainBatchNorm2d)
    sd = applied.state_dict()
    for k, v in snap.items():
        assert k in sd, k
        assert torch.equal(sd[k], v), k
    assert applied.seq[1].eps == 1e-3 and applied.seq[1].momentum == 0.3
    applied.eval()
    with torch.no_grad():  # the synced layer runs on CPU
        _close(applied.bn2(x2), ref2)
    reverted = plugin.revert(applied)
    for name, cls in (("bn1", nn.BatchNorm1d), ("bn2", nn.BatchNorm2d), ("bn3", nn.BatchNorm3d)):
        assert type(getattr(reverted, name)) is cls
    assert type(reverted.seq[1]) is nn.BatchNorm2d
    assert type(reverted.renorm) is ln.BatchRenorm2d
    assert type(reverted.dom) is ln.DomainBatchNorm2d
    sd = reverted.state_dict()
    assert set(sd) == set(snap)
    for k, v in snap.items():
        assert torch.equal(sd[k], v), k


# --------------------------------------------------------------------------------------------
# recompute_bn_stats
# --------------------------------------------------------------------------------------------


def _two_bn_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 5),
        nn.BatchNorm1d(5, momentum=0.3),
        nn.ReLU(),
        nn.Linear(5, 4),
        nn.BatchNorm1d(4, momentum=None),
    ).double()
    for mod in model:
        if isinstance(mod, _BatchNorm):
            _randomize_bn(mod, 1)
    return model


def _batches(sizes=(7, 3, 11, 5, 2), seed=0, d_in=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d_in, generator=g, dtype=F64) * 2 + 1 for n in sizes]


def _expected_two_bn(model, xs):
    """Reference: both BN layers in train mode (batch stats upstream), exact stats of inputs."""
    l1, bn1, _, l2, _ = model
    a1, a2 = [], []
    with torch.no_grad():
        for x in xs:
            h1 = l1(x)
            n1 = F.batch_norm(h1, None, None, bn1.weight, bn1.bias, True, 0.0, bn1.eps)
            h2 = l2(F.relu(n1))
            a1.append(h1)
            a2.append(h2)
    a1, a2 = torch.cat(a1), torch.cat(a2)
    return [(a1.mean(0), a1.var(0, unbiased=True)), (a2.mean(0), a2.var(0, unbiased=True))]


def _bn_layers(model):
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


@pytest.mark.parametrize("form", ["tensor", "tuple", "list"])
def test_recompute_exact_population_stats_with_default_forward(form):
    model = _two_bn_mlp().eval()
    xs = _batches()
    if form == "tensor":
        batches = xs
    elif form == "tuple":
        batches = [(x, torch.zeros(len(x))) for x in xs]
    else:
        batches = [[x, "label"] for x in xs]
    exp = _expected_two_bn(model, xs)
    report = lns.recompute_bn_stats(model, batches, num_batches=len(xs))
    assert isinstance(report, lns.BNStatsReport)
    for bn, (mu, var) in zip(_bn_layers(model), exp, strict=True):
        _close(bn.running_mean, mu, atol=1e-10, rtol=1e-9)
        _close(bn.running_var, var, atol=1e-10, rtol=1e-9)
    # not the average of per-batch variances (uneven batches make them differ)
    per_batch = torch.stack([model[0](x).var(0) for x in xs]).mean(0).detach()
    assert not torch.allclose(per_batch, exp[0][1], atol=1e-3)


def test_recompute_conv_stats_over_all_positions():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3)).double()
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(n, 2, 4, 3, generator=g, dtype=F64) * 3 for n in (1, 4, 2)]
    lns.recompute_bn_stats(model, xs)
    with torch.no_grad():
        acts = torch.cat([model[0](x) for x in xs]).transpose(0, 1).reshape(3, -1)
    _close(model[1].running_mean, acts.mean(1), atol=1e-10, rtol=1e-9)
    _close(model[1].running_var, acts.var(1, unbiased=True), atol=1e-10, rtol=1e-9)


def test_recompute_package_variant_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), _randomize_bn(ln.BatchRenorm1d(4), 2)).double()
    xs = _batches((5, 9, 2))
    lns.recompute_bn_stats(model, xs)
    with torch.no_grad():
        acts = torch.cat([model[0](x) for x in xs])
    _close(model[1].running_mean, acts.mean(0), atol=1e-10, rtol=1e-9)
    _close(model[1].running_var, acts.var(0, unbiased=True), atol=1e-10, rtol=1e-9)


def test_recompute_endless_iterator_is_capped():
    model = _two_bn_mlp()
    xs = _batches((4, 6, 3, 8, 5, 7))
    drawn = []

    def endless():
        for i in itertools.count():
            drawn.append(i)
            yield xs[i % len(xs)]

    exp = _expected_two_bn(model, xs[:4])
    lns.recompute_bn_stats(model, endless(), num_batches=4)
    for bn, (mu, var) in zip(_bn_layers(model), exp, strict=True):
        _close(bn.running_mean, mu, atol=1e-10, rtol=1e-9)
        _close(bn.running_var, var, atol=1e-10, rtol=1e-9)
    assert len(drawn) <= 5


def test_recompute_caps_a_longer_list():
    model = _two_bn_mlp()
    xs = _batches((4, 6, 3, 8, 5, 7))
    exp = _expected_two_bn(model, xs[:2])
    lns.recompute_bn_stats(model, xs, num_batches=2)
    for bn, (mu, var) in zip(_bn_layers(model), exp, strict=True):
        _close(bn.running_mean, mu, atol=1e-10, rtol=1e-9)
        _close(bn.running_var, var, atol=1e-10, rtol=1e-9)


def test_recompute_custom_forward_fn_runs_under_no_grad():
    model = _two_bn_mlp()
    xs = _batches()
    seen = []

    def fwd(m, batch):
        seen.append(torch.is_grad_enabled())
        return m(batch["x"])

    exp = _expected_two_bn(model, xs)
    lns.recompute_bn_stats(model, [{"x": x} for x in xs], forward_fn=fwd)
    assert seen == [False] * len(xs)
    for bn, (mu, var) in zip(_bn_layers(model), exp, strict=True):
        _close(bn.running_mean, mu, atol=1e-10, rtol=1e-9)
        _close(bn.running_var, var, atol=1e-10, rtol=1e-9)


def test_recompute_signature():
    sig = inspect.signature(lns.recompute_bn_stats).parameters
    assert list(sig)[:4] == ["model", "batches", "num_batches", "forward_fn"]
    assert sig["num_batches"].default == 200
    assert sig["forward_fn"].default is None


def _flags(model):
    return [(m.training, getattr(m, "momentum", "n/a")) for m in model.modules()]


@pytest.mark.parametrize("fail", [False, True])
def test_recompute_restores_training_and_momentum(fail):
    model = _two_bn_mlp().eval()
    model[1].train()  # a mix of flags
    model[3].train()
    before = _flags(model)

    def fwd(m, batch):
        out = m(batch)
        if fail:
            raise RuntimeError("forward failed")
        return out

    if fail:
        with pytest.raises(RuntimeError, match="forward failed"):
            lns.recompute_bn_stats(model, _batches(), forward_fn=fwd)
    else:
        lns.recompute_bn_stats(model, _batches(), forward_fn=fwd)
    assert _flags(model) == before
    assert model[1].momentum == 0.3 and model[4].momentum is None


def test_recompute_short_loader_warns_with_both_numbers_and_uses_what_came():
    model = _two_bn_mlp()
    xs = _batches((5, 4, 6))
    exp = _expected_two_bn(model, xs)
    with pytest.warns(Warning) as rec:
        lns.recompute_bn_stats(model, xs, num_batches=17)
    msgs = " | ".join(str(w.message) for w in rec)
    assert any(
        re.search(r"\b3\b", str(w.message)) and re.search(r"\b17\b", str(w.message)) for w in rec
    ), msgs
    for bn, (mu, var) in zip(_bn_layers(model), exp, strict=True):
        _close(bn.running_mean, mu, atol=1e-10, rtol=1e-9)
        _close(bn.running_var, var, atol=1e-10, rtol=1e-9)


def test_recompute_no_bn_layers_warns_and_returns_empty_report():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.LayerNorm(3))
    with pytest.warns(Warning):
        report = lns.recompute_bn_stats(model, [torch.randn(4, 3)])
    assert isinstance(report, lns.BNStatsReport)
    assert len(report) == 0
    assert len(report.layers) == 0


def test_recompute_report_gives_relative_change_per_layer():
    model = _two_bn_mlp()
    xs = _batches()
    report = lns.recompute_bn_stats(model, xs)
    assert len(report) == 2 and len(report.layers) == 2
    for entry in report.layers:  # the EMA was far off (random running stats)
        assert entry.mean_shift > 0.05 and entry.var_shift > 0.05
    # run again: the stats are already exact, so nothing moves
    report2 = lns.recompute_bn_stats(model, xs)
    assert len(report2.layers) == 2
    for entry in report2.layers:
        assert abs(entry.mean_shift) < 1e-6 and abs(entry.var_shift) < 1e-6


def test_recompute_per_domain():
    n_dom, n_ch = 3, 4
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, n_ch)
            self.bn = ln.DomainBatchNorm1d(n_ch, n_dom)

        def forward(self, x, ids):
            return self.bn(self.lin(x), domain=ids)

    net = Net().double()
    with torch.no_grad():
        net.bn.running_mean.normal_()
        net.bn.running_var.uniform_(0.5, 2)
    untouched = net.bn.running_mean[2].clone(), net.bn.running_var[2].clone()
    g = torch.Generator().manual_seed(1)
    batches = []
    for n in (6, 9, 4, 7):
        ids = torch.randint(0, 2, (n,), generator=g)
        ids[:4] = torch.tensor([0, 0, 1, 1])  # >= 2 values per domain: BN trains on batch stats
        x = torch.randn(n, 3, generator=g, dtype=F64) + ids[:, None] * 2.0
        batches.append((x, ids))
    lns.recompute_bn_stats(net, batches, forward_fn=lambda m, b: m(*b))
    with torch.no_grad():
        acts = torch.cat([net.lin(x) for x, _ in batches])
    ids = torch.cat([i for _, i in batches])
    for d in (0, 1):
        _close(net.bn.running_mean[d], acts[ids == d].mean(0), atol=1e-10, rtol=1e-9)
        _close(net.bn.running_var[d], acts[ids == d].var(0, unbiased=True), atol=1e-10, rtol=1e-9)
    assert torch.equal(net.bn.running_mean[2], untouched[0])
    assert torch.equal(net.bn.running_var[2], untouched[1])


# --------------------------------------------------------------------------------------------
# Callbacks
# --------------------------------------------------------------------------------------------


def test_callback_signatures():
    sig = inspect.signature(PreciseBN).parameters
    assert list(sig)[:4] == ["num_batches", "every_n_epochs", "dataloader", "forward_fn"]
    assert sig["num_batches"].default == 200
    assert sig["every_n_epochs"].default == 1
    assert sig["dataloader"].default == "train"
    assert sig["forward_fn"].default is None
    sig = inspect.signature(BatchNormDoctor).parameters
    assert list(sig)[:1] == ["check_every_n_epochs"]
    assert sig["check_every_n_epochs"].default == 1
    PreciseBN()
    BatchNormDoctor()


class _MemLogger(Logger):
    """A logger that keeps every logged row in memory (the figures the callbacks log)."""

    def __init__(self):
        super().__init__()
        self.metrics = []

    @property
    def name(self):
        return "mem"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.metrics.append(dict(metrics))

    def keys(self):
        return set().union(*self.metrics)


# the shared quiet Trainer (tests/_boring.py), logging every step into a fresh _MemLogger
LOGGING = {"num_sanity_val_steps": 0, "log_every_n_steps": 1}


@pytest.fixture
def logging_trainer(make_trainer):
    """``logging_trainer(callbacks, **kw)``: ``make_trainer`` with a ``_MemLogger``."""

    def build(callbacks, **kw):
        return make_trainer(callbacks=callbacks, logger=_MemLogger(), **LOGGING, **kw)

    return build


X_TRAIN = boring_data(48).tensors[0]  # what boring_loader(48, 12) yields, in order


def _channel_stats(a):
    """Per-channel mean and unbiased variance of ``a`` over every other dimension."""
    a = a.transpose(0, 1).flatten(1)
    return a.mean(1), a.var(1, unbiased=True)


def _bn_input_stats(model, x):
    """The exact statistics of the BatchNorm's input (the conv's output) over ``x``."""
    with torch.no_grad():
        return _channel_stats(model.body[0](x))


class _ValidationProbe(Callback):
    """Records, as each validation starts, the BN's running stats and the exact ones over x."""

    def __init__(self, x):
        self.x = x
        self.checks = []

    def on_validation_start(self, trainer, pl_module):
        bn = pl_module.bn_layers()[0]
        exact = _bn_input_stats(pl_module, self.x)
        self.checks.append((bn.running_mean.clone(), bn.running_var.clone(), *exact))


def test_precise_bn_in_a_tiny_fit(boring_model, logging_trainer):
    probe = _ValidationProbe(X_TRAIN)
    trainer = logging_trainer([PreciseBN(num_batches=50), probe], max_epochs=2, limit_val_batches=1)
    trainer.fit(boring_model, boring_loader(48, 12), boring_loader(8, 8))
    keys = set(trainer.callback_metrics) | trainer.logger.keys()
    assert "precise_bn/mean_shift" in keys and "precise_bn/var_shift" in keys
    # every epoch's validation saw precise stats for the weights of that moment
    assert len(probe.checks) == 2
    for rm, rv, mu, var in probe.checks:
        _close(rm, mu, atol=1e-5, rtol=1e-4)
        _close(rv, var, atol=1e-5, rtol=1e-4)
    # and the end of fit leaves precise stats for the final weights
    mu, var = _bn_input_stats(boring_model, X_TRAIN)
    bn = boring_model.bn_layers()[0]
    _close(bn.running_mean, mu, atol=1e-5, rtol=1e-4)
    _close(bn.running_var, var, atol=1e-5, rtol=1e-4)


class _DomainModel(BoringNormModel):
    """The boring model on DomainBatchNorm2d: batches are ``(x, domain, y)``."""

    def __init__(self):
        super().__init__(body=boring_body(norm=ln.DomainBatchNorm2d(8, 2)))
        self.calls = 0

    def forward(self, x, d):
        with ln.domain(self.body, d):
            return self.body(x)

    def training_step(self, batch, i):
        x, d, y = batch
        return F.cross_entropy(self(x, d), y)

    def precise_bn_forward(self, batch):
        self.calls += 1
        x, d, _ = batch
        return self(x, d)


def test_precise_bn_uses_module_precise_bn_forward(logging_trainer):
    from torch.utils.data import DataLoader, TensorDataset

    x_all, y_all = boring_data(40).tensors
    ids = torch.arange(40) % 2
    x_all = x_all + ids[:, None, None, None] * 3.0
    torch.manual_seed(0)
    model = _DomainModel()
    loader = DataLoader(TensorDataset(x_all, ids, y_all), batch_size=10, shuffle=False)
    logging_trainer([PreciseBN()]).fit(model, loader)
    assert model.calls > 0
    bn = model.bn_layers()[0]
    for d in (0, 1):
        mu, var = _bn_input_stats(model, x_all[ids == d])
        _close(bn.running_mean[d], mu, atol=1e-5, rtol=1e-4)
        _close(bn.running_var[d], var, atol=1e-5, rtol=1e-4)


class _DoctorBody(nn.Module):
    """Linear -> BatchNorm1d -> Linear; ``twice``: the BN runs once per half of the batch."""

    def __init__(self, twice):
        super().__init__()
        self.twice = twice
        self.lin = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = self.lin(x)
        if self.twice:
            k = len(x) // 2
            return self.head(torch.cat([self.bn(h[:k]), self.bn(h[k:])]))
        return self.head(self.bn(h))


def _doctor_loader_kw(fault_data, batch_size, nb, g):
    """The training DataLoader's arguments: shuffled, unshuffled, or one source per batch."""
    n = nb * batch_size
    if fault_data == "alternating":  # shuffled, but every batch holds one source only
        p0 = torch.randperm(n // 2, generator=g)
        p1 = torch.randperm(n // 2, generator=g) + n // 2
        k = batch_size
        return dict(
            batch_sampler=[
                (p0 if b % 2 == 0 else p1)[(b // 2) * k : (b // 2 + 1) * k].tolist()
                for b in range(nb)
            ]
        )
    if fault_data == "unshuffled":
        return dict(batch_size=batch_size, shuffle=False)
    return dict(batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(1))


def _doctor_fit(root, twice=False, batch_size=16, fault_data=None):
    import logging

    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    nb = 32  # above the doctor's documented minimum number of calls before judging
    n = nb * batch_size
    src = (torch.arange(n) >= n // 2).long()  # two sources, sorted: first half, second half
    x_all = torch.randn(n, 3, generator=g) + src[:, None] * 6.0
    y_all = (torch.randn(n, generator=g) > 0).long()
    loader_kw = _doctor_loader_kw(fault_data, batch_size, nb, g)
    torch.manual_seed(0)
    model = BoringNormModel(body=_DoctorBody(twice), lr=0.01)
    records = []

    class H(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                records.append(record.getMessage())

    handler = H()
    logging.getLogger().addHandler(handler)
    trainer = boring_trainer(root, callbacks=[BatchNormDoctor()], logger=_MemLogger(), **LOGGING)
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            trainer.fit(
                model,
                DataLoader(TensorDataset(x_all, y_all), **loader_kw),
                DataLoader(TensorDataset(x_all, y_all), batch_size=16),
            )
    finally:
        logging.getLogger().removeHandler(handler)
    msgs = {str(x.message) for x in w} | set(records)
    return msgs, trainer.logger.keys()


@pytest.fixture(scope="module")
def doctor_control(tmp_path_factory):
    return _doctor_fit(tmp_path_factory.mktemp("doctor"))


def test_batchnorm_doctor_logs_figures(doctor_control):
    _, keys = doctor_control
    assert keys - {"val_loss", "epoch"}, "BatchNormDoctor logged no figures"


@pytest.mark.parametrize("fault", ["twice", "small_batch", "unshuffled", "alternating"])
def test_batchnorm_doctor_warns(doctor_control, fault, tmp_path):
    base, _ = doctor_control
    if fault == "twice":
        msgs, _ = _doctor_fit(tmp_path, twice=True)
    elif fault == "small_batch":
        msgs, _ = _doctor_fit(tmp_path, batch_size=2)
    else:
        msgs, _ = _doctor_fit(tmp_path, fault_data=fault)
    new = msgs - base
    assert new, f"no new warning for {fault}"


# --------------------------------------------------------------------------------------------
# MixingBatchSampler
# --------------------------------------------------------------------------------------------


def _source_of(idx, sizes):
    offsets = list(itertools.accumulate(sizes))
    for s, end in enumerate(offsets):
        if idx < end:
            return s
    raise AssertionError(f"index {idx} outside the ConcatDataset of {sizes}")


def _counts(batch, sizes):
    c = [0] * len(sizes)
    for i in batch:
        c[_source_of(int(i), sizes)] += 1
    return c


def test_sampler_exact_equal_quotas_and_epoch_end():
    sizes = [10, 20, 30]
    s = MixingBatchSampler(sizes, 6, num_replicas=1, rank=0)
    batches = [list(b) for b in s]
    assert len(s) == len(batches) == 5  # source 0 runs out after 5 batches of 2
    for b in batches:
        assert len(b) == 6
        assert _counts(b, sizes) == [2, 2, 2]
    flat = [int(i) for b in batches for i in b]
    assert len(flat) == len(set(flat))


def test_sampler_ratios_and_concat_dataset():
    from torch.utils.data import ConcatDataset, DataLoader, TensorDataset

    sizes = [12, 36]
    s = MixingBatchSampler(sizes, 8, ratios=[1, 3], num_replicas=1, rank=0)
    batches = [list(b) for b in s]
    assert len(s) == len(batches) == 6
    for b in batches:
        assert _counts(b, sizes) == [2, 6]
    ds = ConcatDataset([TensorDataset(torch.zeros(12)), TensorDataset(torch.ones(36))])
    for (xb,) in DataLoader(ds, batch_sampler=s):
        assert int((xb == 0).sum()) == 2 and int((xb == 1).sum()) == 6
    s2 = MixingBatchSampler(sizes, 8, ratios=[0.25, 0.75], num_replicas=1, rank=0)
    assert [_counts(b, sizes) for b in s2] == [[2, 6]] * 6


def test_sampler_shuffles_inside_batches_and_across_epochs():
    sizes = [40, 40]
    s = MixingBatchSampler(sizes, 8, num_replicas=1, rank=0)
    batches = [list(b) for b in s]
    grouped = 0
    for b in batches:
        src = [_source_of(i, sizes) for i in b]
        if src == sorted(src) or src == sorted(src, reverse=True):
            grouped += 1
    assert grouped < len(batches)  # sources are interleaved inside the batch
    flat = [i for b in batches for i in b]
    assert flat[:8] != sorted(flat[:8]) or flat[8:16] != sorted(flat[8:16])


def test_sampler_set_epoch_is_deterministic():
    sizes = [20, 30]
    a = MixingBatchSampler(sizes, 10, seed=3, num_replicas=1, rank=0)
    b = MixingBatchSampler(sizes, 10, seed=3, num_replicas=1, rank=0)
    a.set_epoch(4)
    b.set_epoch(4)
    ea = [list(x) for x in a]
    assert ea == [list(x) for x in b]
    assert ea == [list(x) for x in a]  # same epoch again: same batches
    a.set_epoch(5)
    assert [list(x) for x in a] != ea
    c = MixingBatchSampler(sizes, 10, seed=4, num_replicas=1, rank=0)
    c.set_epoch(4)
    assert [list(x) for x in c] != ea


def test_sampler_replicas_get_disjoint_batches_of_same_composition():
    sizes = [21, 35, 50]
    per_rank = []
    for rank in range(2):
        s = MixingBatchSampler(sizes, 6, ratios=[1, 2, 3], num_replicas=2, rank=rank)
        s.set_epoch(1)
        batches = [list(b) for b in s]
        assert len(s) == len(batches)
        for b in batches:
            assert _counts(b, sizes) == [1, 2, 3]
        per_rank.append(batches)
    assert len(per_rank[0]) == len(per_rank[1]) > 0
    f0 = {i for b in per_rank[0] for i in b}
    f1 = {i for b in per_rank[1] for i in b}
    assert not (f0 & f1)
    total = sum(len(b) for r in per_rank for b in r)
    assert len(f0 | f1) == total  # no repeats at all


def test_sampler_default_rank_without_distributed():
    sizes = [10, 10]
    a = MixingBatchSampler(sizes, 4)
    b = MixingBatchSampler(sizes, 4, num_replicas=1, rank=0)
    assert [list(x) for x in a] == [list(x) for x in b]
    assert len(a) == 5


@pytest.mark.parametrize(
    "sizes,bs,ratios",
    [([10, 10, 10], 6, [1, 2, 3]), ([7, 9], 4, None), ([4, 4, 4], 6, None), ([13, 5], 6, [2, 1])],
)
def test_sampler_drop_last_false(sizes, bs, ratios):
    full = MixingBatchSampler(sizes, bs, ratios=ratios, num_replicas=1, rank=0)
    s = MixingBatchSampler(sizes, bs, ratios=ratios, drop_last=False, num_replicas=1, rank=0)
    fb = [list(b) for b in full]
    batches = [list(b) for b in s]
    assert len(s) == len(batches)
    flat = [i for b in batches for i in b]
    assert len(flat) == len(set(flat))  # never repeats
    assert all(len(b) == bs for b in batches[: len(fb)])
    quotas = _counts(fb[0], sizes)
    extra = batches[len(fb) :]
    assert len(extra) <= 1
    used = [len(fb) * q for q in quotas]
    left = [n - u for n, u in zip(sizes, used, strict=True)]
    if extra:
        last = extra[0]
        assert 0 < len(last) < bs
        c = _counts(last, sizes)
        assert all(ci <= qi for ci, qi in zip(c, quotas, strict=True))
        assert all(ci <= li for ci, li in zip(c, left, strict=True))
    if sizes == [4, 4, 4]:
        assert extra == []  # nothing left, no empty batch
    if sizes == [7, 9]:  # 3 + 5 left, ratios equal -> a last batch of 1 + 1 at least
        assert extra and _counts(extra[0], sizes)[0] >= 1 and _counts(extra[0], sizes)[1] >= 1


# --------------------------------------------------------------------------------------------
# mix_real_fake
# --------------------------------------------------------------------------------------------


def test_mix_real_fake_mixture_labels_and_undo():
    real = torch.randn(6, 3, 2) + 5
    fake = torch.randn(6, 3, 2) - 5
    x, is_real, perm = mix_real_fake(real, fake, generator=torch.Generator().manual_seed(0))
    assert x.shape == (12, 3, 2)
    assert is_real.shape == (12,) and perm.shape == (12,)
    assert int(is_real.bool().sum()) == 6
    both = torch.cat([real, fake])
    assert torch.equal(x, both[perm])
    assert torch.equal(x[perm.argsort()], both)  # the documented undo
    # labels: rows flagged real are exactly the real rows
    mask = is_real.bool()
    assert torch.equal(mask, perm < 6)
    assert (x[mask].mean((1, 2)) > 0).all() and (x[~mask].mean((1, 2)) < 0).all()
    assert torch.equal(torch.sort(perm).values, torch.arange(12))
    assert not torch.equal(perm, torch.arange(12))  # shuffled
    # deterministic under a seeded generator
    x2, r2, p2 = mix_real_fake(real, fake, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, x2) and torch.equal(is_real, r2) and torch.equal(perm, p2)


def test_mix_real_fake_gradients_flow():
    real = torch.randn(4, 3, requires_grad=True)
    fake = torch.randn(4, 3, requires_grad=True)
    x, _, perm = mix_real_fake(real, fake)
    (x * torch.arange(8.0)[:, None]).sum().backward()
    inv = perm.argsort()
    _close(real.grad, inv[:4].float()[:, None].expand(4, 3))
    _close(fake.grad, inv[4:].float()[:, None].expand(4, 3))


# --------------------------------------------------------------------------------------------
# Signatures of the remaining public names
# --------------------------------------------------------------------------------------------


def _sig(obj):
    return [(p.name, p.default) for p in inspect.signature(obj).parameters.values()]


def test_public_signatures():
    e = inspect.Parameter.empty
    assert _sig(ln.CosineLinear)[:2] == [("in_features", e), ("out_features", e)]
    assert _sig(ln.CosineConv2d)[:7] == [
        ("in_channels", e),
        ("out_channels", e),
        ("kernel_size", e),
        ("stride", 1),
        ("padding", 0),
        ("dilation", 1),
        ("groups", 1),
    ]
    assert _sig(ln.LayerNorm2d)[:3] == [("num_channels", e), ("eps", 1e-6), ("affine", True)]
    conv = inspect.signature(ln.convert_norms).parameters
    assert list(conv)[:2] == ["model", "to"]
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in conv.values())
    assert _sig(mix_real_fake)[:3] == [("real", e), ("fake", e), ("generator", None)]
    assert _sig(MixingBatchSampler)[:8] == [
        ("source_sizes", e),
        ("batch_size", e),
        ("ratios", None),
        ("shuffle", True),
        ("drop_last", True),
        ("seed", 0),
        ("num_replicas", None),
        ("rank", None),
    ]
    assert _sig(ln.NormSync)[:1] == [("process_group", None)]


def test_cosine_conv2d_positional_order():
    torch.manual_seed(0)
    a = ln.CosineConv2d(4, 6, 3, 2, 1, 2, 2)
    b = ln.CosineConv2d(
        in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, dilation=2, groups=2
    )
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 4, 9, 9)
    _close(a(x), b(x))
    _close(a(x), _cos_conv_ref(x, a.weight.detach(), 2, 1, 2, 2), atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# SWA's update_bn sees the variants
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["renorm", "domain"])
def test_swa_update_bn_sees_variants(kind):
    from torch.optim.swa_utils import update_bn

    torch.manual_seed(0)
    lin = nn.Linear(3, 4).double()
    ref = nn.Sequential(copy.deepcopy(lin), _randomize_bn(nn.BatchNorm1d(4, dtype=F64), 1))
    if kind == "renorm":
        layer = ln.BatchRenorm1d(4, dtype=F64)
    else:
        layer = ln.DomainBatchNorm1d(4, 1, dtype=F64)
    model = nn.Sequential(copy.deepcopy(lin), _randomize_bn(layer, 1))
    loader = [(x,) for x in _batches((5, 8, 3))]
    update_bn(loader, ref)
    if kind == "domain":
        with ln.domain(model, 0):
            update_bn(loader, model)
    else:
        update_bn(loader, model)
    _close(model[1].running_mean.reshape(-1), ref[1].running_mean)
    _close(model[1].running_var.reshape(-1), ref[1].running_var)
    assert model[1].momentum == 0.1  # update_bn restores it


# --------------------------------------------------------------------------------------------
# Distributed semantics that a world-size-1 gloo group exercises on CPU (no spawning)
# --------------------------------------------------------------------------------------------


@pytest.fixture
def gloo_world1(tmp_path):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("how", ["sync", "process_group"])
@pytest.mark.parametrize("name", ["BatchRenorm2d", "DomainBatchNorm2d"])
def test_sync_layers_run_on_cpu_and_equal_bn(gloo_world1, name, how):
    kw = {"sync": True} if how == "sync" else {"process_group": gloo_world1}
    if name == "BatchRenorm2d":
        layer = ln.BatchRenorm2d(4, dtype=F64, r_max=1.0, d_max=0.0, **kw)
        call = lambda m, x: m(x)  # noqa: E731
    else:
        layer = ln.DomainBatchNorm2d(4, 1, dtype=F64, **kw)
        call = lambda m, x: m(x, domain=0)  # noqa: E731
    _check_equals_torch_bn(layer, nn.BatchNorm2d(4, dtype=F64), (6, 4, 3, 3), call)


def test_sync_domain_mixed_batch_and_single_value_domain(gloo_world1):
    plain, refs = _domain_setup(3, 4)
    m = ln.DomainBatchNorm2d(4, 3, sync=True, dtype=F64)
    m.load_state_dict(plain.state_dict())
    ids = torch.tensor([0, 2, 2, 0, 0, 2])
    x = torch.randn(6, 4, 2, 2, dtype=F64)
    y = m(x, domain=ids)
    for d in (0, 2):
        _close(y[ids == d], refs[d].train()(x[ids == d]))
        _close(m.running_mean[d], refs[d].running_mean)
    # domain 1 has one value per channel in total (1 sample, 1x1 map): the rare-domain rule
    # (API.md) normalises it with its running statistics and leaves them as they were
    before = m.running_mean[1].clone(), m.running_var[1].clone(), m.num_batches_tracked[1].clone()
    x1 = torch.randn(3, 4, 1, 1, dtype=F64)
    with pytest.warns(UserWarning, match="one value per channel|running statistics"):
        y1 = m(x1, domain=torch.tensor([0, 0, 1]))
    _close(y1[2:], refs[1].eval()(x1[2:]))
    buffers = (m.running_mean[1], m.running_var[1], m.num_batches_tracked[1])
    for got, want in zip(buffers, before, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("name", ["BatchRenorm2d", "DomainBatchNorm2d"])
def test_sync_stats_in_fp32_under_bf16_autocast(gloo_world1, name):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(16, 4, 4, 4, generator=g) + 100.0).bfloat16()  # bf16 sums would be garbage
    if name == "BatchRenorm2d":
        layer = ln.BatchRenorm2d(4, sync=True, r_max=1.0, d_max=0.0, momentum=1.0)
        call = lambda m, v: m(v)  # noqa: E731
    else:
        layer = ln.DomainBatchNorm2d(4, 2, sync=True, momentum=1.0)
        call = lambda m, v: m(v, domain=1)  # noqa: E731
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = call(layer, x)
    xd = x.double()
    mean = xd.mean((0, 2, 3))
    var = xd.var((0, 2, 3), unbiased=True)
    _close(layer.running_mean.reshape(-1, 4)[-1].double(), mean, atol=1e-3, rtol=1e-5)
    _close(layer.running_var.reshape(-1, 4)[-1].double(), var, atol=1e-3, rtol=1e-3)
    yd = (xd - mean.view(1, -1, 1, 1)) / (xd.var((0, 2, 3), unbiased=False) + 1e-5).sqrt().view(
        1, -1, 1, 1
    )
    _close(y.double(), yd, atol=0.05, rtol=0.02)


def test_normsync_converted_layer_trains_on_cpu(gloo_world1):
    model = _SyncHolder()
    ref = copy.deepcopy(model.bn2).train()
    applied = ln.NormSync(process_group=None).apply(model).train()
    x = torch.randn(5, 4, 3, 3, dtype=F64)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y1, y2 = applied.bn2(x1), ref(x2)
    _close(y1, y2)
    y1.sum().backward()
    y2.sum().backward()
    _close(x1.grad, x2.grad)
    _close(applied.bn2.running_mean, ref.running_mean)
    _close(applied.bn2.running_var, ref.running_var)


def test_sampler_defaults_from_torch_distributed(gloo_world1):
    a = MixingBatchSampler([10, 10], 4)
    b = MixingBatchSampler([10, 10], 4, num_replicas=1, rank=0)
    assert [list(x) for x in a] == [list(x) for x in b]


def test_domain_track_running_stats_false_mixed_batch_eval():
    n_dom, n_ch = 3, 2
    m = ln.DomainBatchNorm1d(n_ch, n_dom, track_running_stats=False, dtype=F64).eval()
    ids = torch.tensor([0, 1, 1, 0, 2, 2, 0])
    x = torch.randn(7, n_ch, 5, dtype=F64)
    y = m(x, domain=ids)
    ref = nn.BatchNorm1d(n_ch, track_running_stats=False, dtype=F64).eval()
    with torch.no_grad():
        ref.weight.copy_(m.weight.view(-1, n_ch)[0])
        ref.bias.copy_(m.bias.view(-1, n_ch)[0])
    for d in range(n_dom):
        _close(y[ids == d], ref(x[ids == d]))


@pytest.mark.parametrize("to", ["domain", "renorm"])
def test_convert_keeps_affine_false_and_no_running_stats(to):
    model = nn.Sequential(
        nn.BatchNorm2d(4, affine=False), nn.BatchNorm2d(4, momentum=None, track_running_stats=False)
    )
    kw = {"num_domains": 2} if to == "domain" else {}
    ln.convert_norms(model, to, **kw)
    assert not model[0].affine and model[0].track_running_stats
    assert model[1].affine and not model[1].track_running_stats
    assert model[1].momentum is None
    assert sum(p.numel() for p in model[0].parameters()) == 0


def test_recompute_float32_large_mean_is_accurate():
    """Chan's merge of centred sums stays accurate where E[x^2] - E[x]^2 in fp32 would not."""
    model = nn.Sequential(nn.Identity(), nn.BatchNorm1d(3))
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, 3, generator=g) + 3000.0 for n in (64, 17, 80, 33)]
    lns.recompute_bn_stats(model, xs)
    a = torch.cat(xs).double()
    _close(model[1].running_mean.double(), a.mean(0), atol=2e-3, rtol=1e-6)
    _close(model[1].running_var.double(), a.var(0, unbiased=True), atol=1e-3, rtol=5e-3)


def test_recompute_skips_untracked_layers_and_uses_domain_context():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 4),
        ln.DomainBatchNorm1d(4, 2),
        nn.BatchNorm1d(4, track_running_stats=False),
    ).double()
    xs = _batches((5, 7, 4))
    before0 = model[1].running_mean[0].clone()
    with ln.domain(model, 1):
        lns.recompute_bn_stats(model, xs)
    with torch.no_grad():
        a = torch.cat([model[0](x) for x in xs])
    _close(model[1].running_mean[1], a.mean(0), atol=1e-10, rtol=1e-9)
    _close(model[1].running_var[1], a.var(0, unbiased=True), atol=1e-10, rtol=1e-9)
    assert torch.equal(model[1].running_mean[0], before0)
    assert model[2].running_mean is None


def test_sampler_replicas_drop_last_false_equal_len():
    sizes = [23, 31]
    per_rank = []
    for rank in range(2):
        s = MixingBatchSampler(sizes, 6, drop_last=False, num_replicas=2, rank=rank)
        batches = [list(b) for b in s]
        assert len(s) == len(batches)
        per_rank.append(batches)
    assert len(per_rank[0]) == len(per_rank[1])
    flat = [i for r in per_rank for b in r for i in b]
    assert len(flat) == len(set(flat))
    for b0, b1 in zip(per_rank[0], per_rank[1], strict=True):
        assert _counts(b0, sizes) == _counts(b1, sizes)  # same composition on every rank


def _precise_every2_fit(logging_trainer, tmp_path, resume):
    probe = _ValidationProbe(X_TRAIN)
    calls = []

    def fwd(m, batch):
        calls.append(1)
        return m(batch[0])

    def cb():
        return PreciseBN(num_batches=50, every_n_epochs=2, forward_fn=fwd)

    def fit(trainer, **kw):
        torch.manual_seed(0)
        trainer.fit(BoringNormModel(), boring_loader(48, 12), boring_loader(8, 8), **kw)

    if resume:  # epoch 1 in one fit, epoch 2 in a second fit resumed from its checkpoint
        ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
        first = [cb(), ckpt, probe]
        fit(logging_trainer(first, max_epochs=1, limit_val_batches=1, enable_checkpointing=True))
        fit(
            logging_trainer([cb(), probe], max_epochs=2, limit_val_batches=1),
            ckpt_path=str(tmp_path / "last.ckpt"),
        )
    else:
        fit(logging_trainer([cb(), probe], max_epochs=2, limit_val_batches=1))
    return probe.checks, calls


@pytest.mark.parametrize("resume", [False, True], ids=["plain", "resumed"])
def test_precise_bn_every_n_epochs_and_resume(logging_trainer, tmp_path, resume):
    checks, calls = _precise_every2_fit(logging_trainer, tmp_path, resume)
    assert len(checks) == 2
    (rm0, _, mu0, _), (rm1, rv1, mu1, var1) = checks
    assert not torch.allclose(rm0, mu0, atol=1e-3)  # epoch 1 of 2: still the EMA
    _close(rm1, mu1, atol=1e-5, rtol=1e-4)  # epoch 2 of 2: precise before validation
    _close(rv1, var1, atol=1e-5, rtol=1e-4)
    assert calls  # the forward_fn argument is used


def test_domain_single_sample_subbatch_with_spatial_values():
    """One sample of a domain on a 2x2 map is 4 values per channel: BN trains on it."""
    m, refs = _domain_setup(2, 3)
    ids = torch.tensor([0, 0, 0, 1])
    x = torch.randn(4, 3, 2, 2, dtype=F64)
    y = m.train()(x, domain=ids)
    for d in (0, 1):
        _close(y[ids == d], refs[d].train()(x[ids == d]))
        _close(m.running_var[d], refs[d].running_var)


def test_domain_context_on_the_layer_itself():
    m, refs = _domain_setup(3, 2)
    m.eval()
    x = torch.randn(4, 2, 3, 3, dtype=F64)
    with ln.domain(m, 2):
        _close(m(x), refs[2].eval()(x))


def test_recompute_with_no_batches_warns_and_leaves_buffers():
    model = _two_bn_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    with pytest.warns(Warning):
        lns.recompute_bn_stats(model, [], num_batches=5)
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
