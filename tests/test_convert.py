"""convert_norms on torchvision's resnet18 and on small models: state kept, errors clear."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.models import resnet18

from lightning_norms import (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    DomainBatchNorm1d,
    DomainBatchNorm2d,
    DomainBatchNorm3d,
    LayerNorm2d,
    bn_modules,
    convert_norms,
    create_norm,
    domain,
)
from lightning_norms.convert import BatchRenormAct2d, DomainBatchNormAct2d, SyncedBatchNormAct2d
from lightning_norms.distributed import SyncedBatchNorm2d, SyncedBatchNorm3d
from tests._layers import assert_unchanged, normal, randomise, snapshot_state, uniform


def _trained_resnet18() -> nn.Module:
    """resnet18 (no download) with non-trivial BN affine, running stats and step counters."""
    torch.manual_seed(0)
    model = resnet18(weights=None, num_classes=10)
    with torch.no_grad():
        for i, m in enumerate(model.modules()):
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(100 + i)
    return model.eval()


def _bn_count(model: nn.Module) -> int:
    return sum(isinstance(m, _BatchNorm) for m in model.modules())


def _routed(model: nn.Module, x: Tensor, ids: int) -> Tensor:
    """``model(x)`` without gradients, in domain ``ids`` if it has DomainBatchNorm layers."""
    domain_bns = (DomainBatchNorm1d, DomainBatchNorm2d, DomainBatchNorm3d)
    with torch.no_grad():
        if not any(isinstance(m, domain_bns) for m in model.modules()):
            return model(x)
        with domain(model, ids):
            return model(x)


def test_resnet18_to_renorm_and_back_keeps_every_weight_and_eval_output() -> None:
    model = _trained_resnet18()
    x = torch.randn(2, 3, 32, 32)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(x)
    conv1 = model.conv1
    assert _bn_count(model) == 20

    out = convert_norms(model, "renorm", r_max=2.0, d_max=1.0, warmup_steps=10)
    assert out is model and model.conv1 is conv1
    renorms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    assert len(renorms) == 20 and all(type(m) is BatchRenorm2d for m in renorms)
    assert all((m.r_max, m.d_max, m.warmup_steps) == (2.0, 1.0, 10) for m in renorms)
    assert not any(m.training for m in model.modules())
    new_state = model.state_dict()
    assert new_state.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(new_state[key], value), key
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)

    convert_norms(model, "batch")
    assert all(type(m) is nn.BatchNorm2d for m in model.modules() if isinstance(m, _BatchNorm))
    assert _bn_count(model) == 20
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("to", "kwargs", "cls"),
    [("group", {"num_groups": 1}, nn.GroupNorm), ("layer2d", {}, LayerNorm2d)],
)
def test_resnet18_group_and_layer2d_replace_every_batchnorm(
    to: str, kwargs: dict, cls: type
) -> None:
    model = _trained_resnet18().train()
    bn_affine = [
        (m.weight.detach().clone(), m.bias.detach().clone())
        for m in model.modules()
        if isinstance(m, nn.BatchNorm2d)
    ]
    convs = {k: v.clone() for k, v in model.state_dict().items() if "conv" in k or "fc" in k}
    convert_norms(model, to, **kwargs)
    assert _bn_count(model) == 0
    norms = [m for m in model.modules() if isinstance(m, cls)]
    assert len(norms) == 20 and all(m.training for m in norms)
    for norm, (weight, bias) in zip(norms, bn_affine, strict=True):
        assert torch.equal(norm.weight, weight) and torch.equal(norm.bias, bias)
    state = model.state_dict()
    for key, value in convs.items():
        assert torch.equal(state[key], value), key
    # no batch dependence any more: a sample's output does not depend on the rest of the batch
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[1:2], model(x[1:2]), rtol=1e-4, atol=1e-5)


def test_group_norm_from_1d_and_3d_and_its_arguments() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Conv3d(1, 6, 1), nn.BatchNorm3d(6))
    convert_norms(model, "group", num_groups=3, eps=1e-3)
    assert isinstance(model[1], nn.GroupNorm) and isinstance(model[3], nn.GroupNorm)
    assert (model[1].num_groups, model[1].num_channels, model[1].eps) == (3, 6, 1e-3)


def test_renorm_1d_3d_dtype_requires_grad_and_shared_layers() -> None:
    bn1 = nn.BatchNorm1d(4, momentum=None, eps=1e-3).double()
    bn1.weight.requires_grad_(False)
    bn3 = nn.BatchNorm3d(4, affine=False, track_running_stats=False)
    shared = nn.BatchNorm2d(4)
    model = nn.Sequential(bn1, nn.Sequential(bn3, shared), shared).eval()
    convert_norms(model, "renorm")
    new1, new3, new2 = model[0], model[1][0], model[1][1]
    assert type(new1) is BatchRenorm1d and type(new3) is BatchRenorm3d
    assert type(new2) is BatchRenorm2d and model[2] is new2
    assert new1.weight.dtype == new1.running_mean.dtype == torch.float64
    assert (new1.momentum, new1.eps) == (None, 1e-3)
    assert not new1.weight.requires_grad and new1.bias.requires_grad
    assert not new3.affine and not new3.track_running_stats and new3.running_mean is None
    assert not new1.training


def test_converts_a_batchnorm_at_the_root() -> None:
    bn = nn.BatchNorm2d(3)
    new = convert_norms(bn, "layer2d", eps=1e-5)
    assert isinstance(new, LayerNorm2d) and new.eps == 1e-5


@pytest.mark.parametrize(
    ("model", "to", "kwargs", "error", "match"),
    [
        (nn.BatchNorm2d(4), "instance", {}, ValueError, r"unknown `to`='instance'; choose one of"),
        (nn.BatchNorm2d(4), "group", {}, ValueError, r"to='group'\) needs .*\['num_groups'\]"),
        (nn.BatchNorm2d(4), "renorm", {"rmax": 2}, TypeError, r"unexpected keyword .*\['rmax'\]"),
        (
            nn.BatchNorm2d(4),
            "group",
            {"num_groups": 3},
            ValueError,
            r"num_groups=3 does not divide",
        ),
        (nn.BatchNorm2d(4), "group", {"num_groups": 0}, ValueError, "positive int, got 0"),
        (
            nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)),
            "layer2d",
            {},
            ValueError,
            r"to='layer2d'\): BatchNorm1d at '1': only 2d layers \(4D N, C, H, W .* dims=1",
        ),
        (
            nn.Sequential(nn.SyncBatchNorm(4)),
            "renorm",
            {},
            ValueError,
            r"cannot tell the input rank of SyncBatchNorm at '0'",
        ),
        (nn.LazyBatchNorm2d(), "batch", {}, ValueError, "LazyBatchNorm2d at '<model>' is not"),
    ],
)
def test_errors(model: nn.Module, to: str, kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        convert_norms(model, to, **kwargs)


BN_STATE = {
    "weight": uniform(0.5, 1.5),
    "bias": uniform(-0.2, 0.2),
    "running_mean": normal(0.1),
    "running_var": uniform(0.5, 1.5),
}


def _randomise_bns(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial affine and running statistics in every BatchNorm-type layer."""
    randomise((m for _, m in bn_modules(model)), BN_STATE, seed=seed)


def _snapshot(model: nn.Module) -> tuple[list[tuple[str, int]], dict[str, Tensor]]:
    """Module identities by name and a copy of the state: what an all-or-nothing call keeps."""
    ids = [(name, id(m)) for name, m in model.named_modules()]
    return ids, snapshot_state(model)


def _assert_unchanged(model: nn.Module, snap: tuple[list[tuple[str, int]], dict]) -> None:
    ids, state = snap
    assert [(name, id(m)) for name, m in model.named_modules()] == ids
    assert_unchanged(model.state_dict(), state)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["efficientnet_b0", "mobilenetv3_small_100", "regnety_002"])
def test_timm_batchnormact_keeps_its_activation(name: str) -> None:
    """Issue 10 item 11: BatchNormAct2d lost its activation (efficientnet_b0 off by ~84)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    _randomise_bns(model)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    count = len(bn_modules(model))
    acts = sum(isinstance(m, (nn.ReLU, nn.SiLU, nn.Hardswish)) for m in model.modules())
    for to, kwargs in (
        ("batch", {}),
        ("renorm", {"r_max": 1.0, "d_max": 0.0}),
        ("domain", {"num_domains": 1}),
        ("batch", {}),  # back from one domain: `domain` may be omitted
    ):
        convert_norms(model, to, **kwargs)
        kinds = {type(m) for _, m in bn_modules(model)}
        assert len(bn_modules(model)) == count and len(kinds) == 1, kinds
        assert sum(isinstance(m, (nn.ReLU, nn.SiLU, nn.Hardswish)) for m in model.modules()) == acts
        torch.testing.assert_close(_routed(model, x, 0), expected, rtol=1e-4, atol=1e-4, msg=to)


def test_batchnormact_order_and_training_flag() -> None:
    norm_act = pytest.importorskip("timm.layers.norm_act")
    layer = norm_act.BatchNormAct2d(4, act_layer=nn.ReLU, drop_layer=nn.Dropout)
    _randomise_bns(layer)
    layer.eval()
    model = nn.Sequential(nn.Conv2d(3, 4, 1), layer)
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        expected = model(x)
    act, drop = layer.act, layer.drop
    convert_norms(model, "renorm")
    new = model[1]
    assert type(new) is BatchRenormAct2d and isinstance(new, BatchRenorm2d)
    assert list(new.named_children()) == [("drop", drop), ("act", act)]
    assert not new.training
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_a_subclass_it_cannot_take_apart_raises_and_changes_nothing() -> None:
    class ScaledBN(nn.BatchNorm2d):
        def forward(self, x: Tensor) -> Tensor:
            return super().forward(x) * 2

    class PlainSubclass(nn.BatchNorm2d):
        pass

    model = nn.Sequential(nn.BatchNorm2d(3), nn.Sequential(ScaledBN(3)), PlainSubclass(3))
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"ScaledBN at '1.0' overrides the BatchNorm forward"):
        convert_norms(model, "renorm")
    _assert_unchanged(model, snap)
    convert_norms(model, "renorm", exclude="1.*")
    assert type(model[0]) is BatchRenorm2d and type(model[2]) is BatchRenorm2d
    assert type(model[1][0]) is ScaledBN


def _domain_model() -> nn.Module:
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1),
        DomainBatchNorm2d(4, 3),
        nn.Flatten(),
        DomainBatchNorm1d(4 * 25, 3, shared_affine=True),
    )
    with torch.no_grad():
        for m in (model[1], model[3]):
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_()
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.num_batches_tracked.copy_(torch.tensor([5, 6, 7]))
    return model.eval()


@pytest.mark.parametrize("to", ["batch", "renorm", "frozen"])
def test_domain_batchnorm_converts_back_carrying_the_named_domain(to: str) -> None:
    """Issue 10 item 7: a DomainBatchNorm could not be converted to any other kind."""
    model = _domain_model()
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        expected = model[3](model[2](model[1](model[0](x), domain=1)), domain=1)
    if to == "frozen":
        model = model[:2]
        with torch.no_grad():
            expected = model[1](model[0](x), domain=1)
    convert_norms(model, to, domain=1)
    assert not any(isinstance(m, (DomainBatchNorm1d, DomainBatchNorm2d)) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    if to != "frozen":
        assert int(model[1].num_batches_tracked) == 6


def test_domain_batchnorm_with_several_domains_needs_domain() -> None:
    model = _domain_model()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"DomainBatchNorm1d at '3' has 3 domains; name the one"):
        convert_norms(model, "batch", exclude="1")
    with pytest.raises(ValueError, match=r"domain=3 is outside \[0, 3\)"):
        convert_norms(model, "batch", domain=3)
    with pytest.raises(ValueError, match=r"already domain-split"):
        convert_norms(model, "domain", num_domains=2)
    _assert_unchanged(model, snap)


def test_all_or_nothing_when_one_layer_cannot_be_converted() -> None:
    """Issue 10 item 7: a failure half-way left a half-converted model."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Flatten(), nn.BatchNorm1d(4))
    _randomise_bns(model)
    snap = _snapshot(model)
    for to in ("layer2d", "frozen"):
        with pytest.raises(ValueError, match=rf"to='{to}'\): BatchNorm1d at '3': only 2d"):
            convert_norms(model, to)
        _assert_unchanged(model, snap)
    with pytest.raises(ValueError, match="num_groups=3 does not divide"):
        convert_norms(nn.Sequential(nn.BatchNorm2d(6), nn.BatchNorm2d(4)), "group", num_groups=3)
    with pytest.raises(ValueError, match="no running statistics to freeze"):
        convert_norms(nn.BatchNorm2d(4, track_running_stats=False), "frozen")


def test_resnet18_to_frozen_equals_torchvision_and_back() -> None:
    from torchvision.ops.misc import FrozenBatchNorm2d

    model = _trained_resnet18()
    x = torch.randn(2, 3, 32, 32)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(x)
    convert_norms(model.train(), "frozen")
    frozen = bn_modules(model)
    assert len(frozen) == 20 and all(type(m) is FrozenBatchNorm2d for _, m in frozen)
    # torchvision's own way to load a BatchNorm checkpoint into a frozen model
    reference = resnet18(weights=None, num_classes=10, norm_layer=FrozenBatchNorm2d)
    reference.load_state_dict(state)
    with torch.no_grad():
        out = model(x)  # training mode: the statistics are fixed anyway
        torch.testing.assert_close(out, reference(x), rtol=0, atol=0)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    for to, kwargs in (("renorm", {}), ("domain", {"num_domains": 2}), ("batch", {})):
        convert_norms(model, to, **kwargs)
        model.eval()
        torch.testing.assert_close(_routed(model, x, 1), expected, rtol=1e-4, atol=1e-4)
        if to == "domain":
            convert_norms(model, "frozen", domain=0)
    for key, value in model.state_dict().items():
        if not key.endswith("num_batches_tracked"):  # frozen layers keep no step counter
            torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)


def test_include_and_exclude_patterns_on_resnet18() -> None:
    model = _trained_resnet18()
    convert_norms(model, "renorm", exclude=["layer4*"])
    for name, m in bn_modules(model):
        assert type(m) is (nn.BatchNorm2d if name.startswith("layer4") else BatchRenorm2d), name
    convert_norms(model, "group", num_groups=2, include="layer1.*", exclude=["*.bn2"])
    groups = [name for name, m in model.named_modules() if isinstance(m, nn.GroupNorm)]
    assert groups == ["layer1.0.bn1", "layer1.1.bn1"]
    with pytest.raises(TypeError, match="`include` must be a str or a list of str"):
        convert_norms(model, "batch", include=[3])


def test_a_pattern_naming_a_module_matches_every_layer_inside_it() -> None:
    model = _trained_resnet18()
    before = {name: type(m) for name, m in bn_modules(model)}
    convert_norms(model, "renorm", exclude="layer4")  # as FreezeBatchNorm(modules="layer4")
    after = {name: type(m) for name, m in bn_modules(model)}
    assert sum(n.startswith("layer4.") for n in after) == 5
    for name, cls in after.items():
        assert cls is (before[name] if name.startswith("layer4.") else BatchRenorm2d), name
    convert_norms(model, "batch", include=["layer1", "layer2.0"])
    changed = sorted(n for n, m in bn_modules(model) if type(m) is nn.BatchNorm2d)
    assert changed == sorted(
        [n for n in after if n.startswith(("layer1.", "layer2.0.", "layer4."))]
    )


def test_bn_modules_lists_every_batchnorm_type_in_order() -> None:
    from torchvision.ops.misc import FrozenBatchNorm2d

    model = nn.Sequential(
        nn.Conv2d(3, 4, 1),
        nn.BatchNorm2d(4).eval(),
        nn.Sequential(BatchRenorm2d(4), nn.ReLU(), DomainBatchNorm2d(4, 2)),
        FrozenBatchNorm2d(4),
        nn.GroupNorm(2, 4),
        LayerNorm2d(4),
        nn.SyncBatchNorm(4),
    )
    names = [name for name, _ in bn_modules(model)]
    assert names == ["1", "2.0", "2.2", "3", "6"]
    assert [m for _, m in bn_modules(model)] == [
        model[1],
        model[2][0],
        model[2][2],
        model[3],
        model[6],
    ]
    # a BatchNorm layer itself is listed under the name ""
    bn = nn.BatchNorm1d(3)
    assert bn_modules(bn) == [("", bn)]


@pytest.mark.parametrize(
    ("name", "kwargs", "cls", "reference"),
    [
        ("batch", {"dims": 1, "momentum": None}, nn.BatchNorm1d, nn.BatchNorm1d(6, momentum=None)),
        ("batch", {}, nn.BatchNorm2d, nn.BatchNorm2d(6)),
        ("renorm", {"dims": 3, "warmup_steps": 7}, BatchRenorm3d, BatchRenorm3d(6, warmup_steps=7)),
        ("domain", {"num_domains": 2}, DomainBatchNorm2d, DomainBatchNorm2d(6, 2)),
        ("layer2d", {"eps": 1e-5}, LayerNorm2d, LayerNorm2d(6, eps=1e-5)),
        ("group", {"num_groups": 3}, nn.GroupNorm, nn.GroupNorm(3, 6)),
        ("none", {}, nn.Identity, nn.Identity()),
    ],
)
def test_create_norm_builds_the_named_layer(
    name: str, kwargs: dict, cls: type, reference: nn.Module
) -> None:
    layer = create_norm(name, 6, **kwargs)
    assert type(layer) is cls and repr(layer) == repr(reference)
    assert layer.state_dict().keys() == reference.state_dict().keys()


def test_create_norm_frozen_and_errors() -> None:
    from torchvision.ops.misc import FrozenBatchNorm2d

    frozen = create_norm("frozen", 4, dtype=torch.float64)
    assert type(frozen) is FrozenBatchNorm2d and frozen.running_var.dtype == torch.float64
    with pytest.raises(ValueError, match=r"unknown `name`='instance'"):
        create_norm("instance", 4)
    with pytest.raises(ValueError, match=r"create_norm\('frozen'\): only 2d .* got dims=3"):
        create_norm("frozen", 4, dims=3)
    with pytest.raises(ValueError, match=r"`dims` must be 1, 2 or 3, got 4"):
        create_norm("batch", 4, dims=4)
    with pytest.raises(ValueError, match=r"needs the keyword argument\(s\) \['num_domains'\]"):
        create_norm("domain", 4)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['momentum'\]"):
        create_norm("group", 4, num_groups=2, momentum=0.1)
    with pytest.raises(ValueError, match=r"unknown `to`='none'"):
        convert_norms(nn.BatchNorm2d(4), "none")


def _frozen(num_features: int, eps: float = 1e-5) -> nn.Module:
    from torchvision.ops.misc import FrozenBatchNorm2d

    return FrozenBatchNorm2d(num_features, eps)


# name, create_norm's keyword arguments (every one changed from its default), the same layer
# built directly
CREATE_CASES = [
    (
        "batch",
        {"dims": 3, "eps": 1e-3, "momentum": None, "affine": False, "track_running_stats": False},
        lambda: nn.BatchNorm3d(5, 1e-3, None, False, False),
    ),
    (
        "renorm",
        {"dims": 1, "momentum": 0.3, "r_max": 2.0, "d_max": 1.5, "warmup_steps": 7},
        lambda: BatchRenorm1d(5, momentum=0.3, r_max=2.0, d_max=1.5, warmup_steps=7),
    ),
    (
        "domain",
        {"num_domains": 3, "shared_affine": True, "eps": 1e-4, "dtype": torch.float64},
        lambda: DomainBatchNorm2d(5, 3, eps=1e-4, shared_affine=True, dtype=torch.float64),
    ),
    ("frozen", {"eps": 1e-3}, lambda: _frozen(5, 1e-3)),
    ("layer2d", {"eps": 1e-5, "affine": False}, lambda: LayerNorm2d(5, eps=1e-5, affine=False)),
    (
        "group",
        {"dims": 1, "num_groups": 5, "eps": 1e-3, "affine": False},
        lambda: nn.GroupNorm(5, 5, 1e-3, False),
    ),
    ("none", {}, nn.Identity),
]


@pytest.mark.parametrize(("name", "kwargs", "direct"), CREATE_CASES)
def test_create_norm_equals_the_class_built_directly(
    name: str, kwargs: dict, direct: object
) -> None:
    """Same type, same settings (repr), same buffers and parameters (names, dtypes, values),
    and the same output on one batch."""
    torch.manual_seed(0)
    layer = create_norm(name, 5, **kwargs)
    reference = direct()  # type: ignore[operator]
    assert type(layer) is type(reference) and repr(layer) == repr(reference)
    got, want = layer.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
    if name == "frozen":
        assert layer.running_var.shape == (5,)
    elif name != "none":
        assert getattr(layer, "num_features", getattr(layer, "num_channels", None)) == 5
    shape = {1: (6, 5), 2: (6, 5, 3, 3), 3: (6, 5, 2, 2, 2)}[kwargs.get("dims", 2)]
    x = torch.randn(shape, dtype=got[next(iter(got))].dtype if got else torch.float32)
    if name == "domain":
        ids = torch.tensor([0, 1, 2, 0, 1, 2])
        with domain(layer, ids), domain(reference, ids):
            torch.testing.assert_close(layer(x), reference(x), rtol=0, atol=0)
    else:
        torch.testing.assert_close(layer(x), reference(x), rtol=0, atol=0)


def test_create_norm_unknown_name_lists_every_name() -> None:
    with pytest.raises(ValueError, match=r"unknown `name`='instancenorm'") as info:
        create_norm("instancenorm", 4)
    known = ("batch", "domain", "frozen", "group", "layer2d", "none", "renorm", "sync")
    for name in (*known, *TIMM_NAMES):
        assert f"'{name}'" in str(info.value)


@pytest.mark.parametrize("name", [case[0] for case in CREATE_CASES])
def test_create_norm_names_a_keyword_argument_its_class_does_not_take(name: str) -> None:
    """The accepted arguments are the class's own: an unknown one is a TypeError naming it (and
    listing what the class takes); a missing required one a ValueError naming it."""
    required = {"domain": {"num_domains": 2}, "group": {"num_groups": 2}}.get(name, {})
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['warmup'\]"):
        create_norm(name, 4, warmup=3, **required)
    for arg in required:
        with pytest.raises(ValueError, match=rf"needs the keyword argument\(s\) \['{arg}'\]"):
            create_norm(name, 4)


def test_timm_frozen_batchnormact_converts_back_with_its_activation() -> None:
    timm = pytest.importorskip("timm")
    from timm.layers.norm_act import freeze_batch_norm_2d

    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_100", pretrained=False)
    _randomise_bns(model)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    model = freeze_batch_norm_2d(model)  # timm's FrozenBatchNormAct2d: not a _BatchNorm
    assert {type(m).__name__ for _, m in bn_modules(model)} == {"FrozenBatchNormAct2d"}
    convert_norms(model, "batch")  # a norm + activation layer again: timm's BatchNormAct2d
    assert {type(m) for _, m in bn_modules(model)} == {timm.layers.BatchNormAct2d}
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# issue 17 item 9: norm + activation layers keep their state_dict keys
# --------------------------------------------------------------------------------------------


def _efficientnet_b0() -> nn.Module:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("efficientnet_b0", pretrained=False)
    _randomise_bns(model)
    return model.eval()


def _count(model: nn.Module, cls: type) -> int:
    return sum(type(m) is cls for m in model.modules())


@pytest.mark.slow
@pytest.mark.parametrize(
    ("to", "kwargs", "back", "cls"),
    [
        ("renorm", {}, {}, BatchRenormAct2d),
        ("domain", {"num_domains": 2}, {"domain": 1}, DomainBatchNormAct2d),
        ("sync", {}, {}, SyncedBatchNormAct2d),
    ],
)
def test_timm_checkpoint_loads_strictly_before_and_after_a_round_trip(
    to: str, kwargs: dict, back: dict, cls: type
) -> None:
    """Issue 17 item 9: BatchNormAct2d became a Sequential (``.0.`` in 165 keys, 0 of 49
    BatchNormAct2d back after renorm -> batch)."""
    from timm.layers import BatchNormAct2d

    model = _efficientnet_b0()
    checkpoint = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    assert _count(model, BatchNormAct2d) == 49

    convert_norms(model, to, **kwargs)
    assert _count(model, cls) == 49 and _count(model, BatchNormAct2d) == 0
    assert list(model.state_dict()) == list(checkpoint)
    if to != "domain":  # [C] -> [num_domains, C]: same keys, other shapes
        model.load_state_dict(checkpoint, strict=True)
    torch.testing.assert_close(_routed(model, x, 1), expected, rtol=0, atol=0)

    convert_norms(model, "batch", **back)
    assert _count(model, BatchNormAct2d) == 49 and _count(model, cls) == 0
    state = model.state_dict()
    assert list(state) == list(checkpoint)
    for key, value in checkpoint.items():
        assert torch.equal(state[key], value), key
    model.load_state_dict(checkpoint, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_norm_act_layers_of_every_target_keep_drop_act_and_keys() -> None:
    """Every target: the layer is the target's class (isinstance), ``drop`` and ``act`` are the
    same module objects, the keys are the timm layer's where the target has that state."""
    norm_act = pytest.importorskip("timm.layers.norm_act")
    bn_keys = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    for to, kwargs, base, keys in (
        ("renorm", {}, BatchRenorm2d, bn_keys),
        ("domain", {"num_domains": 2}, DomainBatchNorm2d, bn_keys),
        ("sync", {}, SyncedBatchNorm2d, bn_keys),
        ("batch", {}, norm_act.BatchNormAct2d, bn_keys),
        ("frozen", {}, norm_act.FrozenBatchNormAct2d, bn_keys[:4]),
        ("layer2d", {}, LayerNorm2d, bn_keys[:2]),
        ("group", {"num_groups": 2}, nn.GroupNorm, bn_keys[:2]),
    ):
        layer = norm_act.BatchNormAct2d(4, act_layer=nn.PReLU, drop_layer=nn.Dropout)
        _randomise_bns(layer)
        model = nn.Sequential(nn.Conv2d(3, 4, 1), layer).eval()
        x = torch.randn(2, 3, 5, 5)
        checkpoint = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            expected = model(x)
        convert_norms(model, to, **kwargs)
        new = model[1]
        assert isinstance(new, base) and new is not layer, to
        assert list(new.named_children()) == [("drop", layer.drop), ("act", layer.act)], to
        want = ["0.weight", "0.bias", *(f"1.{k}" for k in keys), "1.act.weight"]
        assert list(model.state_dict()) == want, to
        if to in ("layer2d", "group"):
            continue
        torch.testing.assert_close(_routed(model, x, 0), expected, rtol=1e-6, atol=1e-6, msg=to)
        if to != "domain":  # timm's FrozenBatchNormAct2d drops num_batches_tracked on load
            model.load_state_dict(checkpoint, strict=True)


def test_norm_act_layers_pickle_and_deepcopy() -> None:
    import copy
    import pickle

    norm_act = pytest.importorskip("timm.layers.norm_act")
    model = nn.Sequential(nn.Conv2d(3, 4, 1), norm_act.BatchNormAct2d(4)).eval()
    convert_norms(model, "domain", num_domains=2)
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad(), domain(model, 1):
        expected = model(x)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert type(clone[1]) is DomainBatchNormAct2d
        with torch.no_grad(), domain(clone, 1):
            torch.testing.assert_close(clone(x), expected, rtol=0, atol=0)


def test_a_norm_act_subclass_it_cannot_take_apart_raises_naming_it() -> None:
    norm_act = pytest.importorskip("timm.layers.norm_act")

    class GatedBNAct(norm_act.BatchNormAct2d):
        def forward(self, x: Tensor) -> Tensor:
            return super().forward(x) * torch.sigmoid(x)

    model = nn.Sequential(norm_act.BatchNormAct2d(3), GatedBNAct(3))
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"GatedBNAct at '1' overrides the BatchNorm forward"):
        convert_norms(model, "renorm")
    _assert_unchanged(model, snap)


# --------------------------------------------------------------------------------------------
# issue 17 item 15b: include / exclude patterns that match nothing warn
# --------------------------------------------------------------------------------------------


def test_include_or_exclude_matching_no_layer_warns_naming_the_patterns() -> None:
    model = _trained_resnet18()
    with pytest.warns(UserWarning, match=r"`include` pattern\(s\) \['backbone\*'\] match no"):
        convert_norms(model, "renorm", include=["backbone*", "layer1"])
    assert sum(type(m) is BatchRenorm2d for _, m in bn_modules(model)) == 4
    with pytest.warns(UserWarning, match=r"`exclude` pattern\(s\) \['head', 'fc'\] match no"):
        convert_norms(model, "batch", exclude=["head", "layer4", "fc"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # patterns that match: silent
        convert_norms(model, "batch", include="layer*", exclude=["*.bn2"])


# --------------------------------------------------------------------------------------------
# create_norm: timm's names, a class or a partial
# --------------------------------------------------------------------------------------------

TIMM_NAMES = (
    "batchnorm",
    "batchnorm1d",
    "batchnorm2d",
    "batchnorm3d",
    "layernorm2d",
    "groupnorm",
    "frozenbatchnorm2d",
)


@pytest.mark.parametrize(
    ("name", "kwargs", "direct"),
    [
        ("batchnorm", {"eps": 1e-3}, lambda: nn.BatchNorm2d(6, eps=1e-3)),
        ("BatchNorm1d", {"momentum": None}, lambda: nn.BatchNorm1d(6, momentum=None)),
        ("batchnorm2d", {}, lambda: nn.BatchNorm2d(6)),
        ("BATCHNORM3D", {}, lambda: nn.BatchNorm3d(6)),
        ("LayerNorm2d", {}, lambda: LayerNorm2d(6)),
        ("groupnorm", {"num_groups": 3}, lambda: nn.GroupNorm(3, 6)),
        ("FrozenBatchNorm2d", {"eps": 1e-3}, lambda: _frozen(6, 1e-3)),
        ("Renorm", {"dims": 1}, lambda: BatchRenorm1d(6)),
        ("sync", {"dims": 3}, lambda: SyncedBatchNorm3d(6)),
    ],
)
def test_create_norm_takes_timm_names_in_any_case(name: str, kwargs: dict, direct: object) -> None:
    layer, reference = create_norm(name, 6, **kwargs), direct()  # type: ignore[operator]
    assert type(layer) is type(reference) and repr(layer) == repr(reference)
    assert layer.state_dict().keys() == reference.state_dict().keys()


def test_create_norm_a_timm_name_fixes_its_rank() -> None:
    assert type(create_norm("batchnorm1d", 4, dims=1)) is nn.BatchNorm1d
    with pytest.raises(ValueError, match=r"'batchnorm3d'\): the name fixes dims=3, got dims=2"):
        create_norm("batchnorm3d", 4, dims=2)
    with pytest.raises(ValueError, match=r"'frozenbatchnorm2d'\): the name fixes dims=2, got"):
        create_norm("frozenbatchnorm2d", 4, dims=1)


def test_create_norm_passes_a_norm_layer_argument_through() -> None:
    """What torchvision and timm take as ``norm_layer=`` (a class or a partial) builds the layer
    they would build with ``norm_layer(C)``."""
    from timm.layers import BatchNormAct2d
    from torchvision.ops.misc import FrozenBatchNorm2d

    for norm_layer in (
        nn.BatchNorm2d,
        functools.partial(nn.BatchNorm2d, eps=1e-3, momentum=0.01),  # torchvision's EfficientNet
        functools.partial(nn.GroupNorm, 4),
        FrozenBatchNorm2d,
        functools.partial(BatchNormAct2d, act_layer=nn.SiLU),
        DomainBatchNorm2d,
    ):
        kwargs = {"num_domains": 2} if norm_layer is DomainBatchNorm2d else {}
        layer, reference = create_norm(norm_layer, 8, **kwargs), norm_layer(8, **kwargs)
        assert type(layer) is type(reference) and repr(layer) == repr(reference)
        assert layer.state_dict().keys() == reference.state_dict().keys()
    # torchvision builds with it: the same resnet18 as with the class itself
    model = resnet18(norm_layer=functools.partial(create_norm, "renorm", warmup_steps=10))
    assert [type(m) for _, m in bn_modules(model)] == [BatchRenorm2d] * 20
    assert all(m.warmup_steps == 10 for _, m in bn_modules(model))
    with pytest.raises(TypeError, match=r"`name` must be a str, an nn.Module class .* got 3"):
        create_norm(3, 8)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# convert_norms(model, "sync"): the CPU-capable convert_sync_batchnorm
# --------------------------------------------------------------------------------------------


def test_sync_carries_every_parameter_and_buffer_like_convert_sync_batchnorm() -> None:
    import copy

    model = _trained_resnet18()
    model.bn1.weight.requires_grad_(False)
    reference = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    group = object()  # stands for a process group: stored, used only under torch.distributed
    convert_norms(model, "sync", process_group=group)
    layers = bn_modules(model)
    assert [type(m) for _, m in layers] == [SyncedBatchNorm2d] * 20
    assert all(m.sync and m.process_group is group for _, m in layers)
    assert not model.bn1.weight.requires_grad and model.layer1[0].bn1.weight.requires_grad
    state, want = model.state_dict(), reference.state_dict()
    assert list(state) == list(want)
    for key, value in want.items():
        assert torch.equal(state[key], value), key
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    # training, one process: what nn.BatchNorm2d computes (output and running statistics)
    plain = convert_norms(copy.deepcopy(model), "batch").train()
    model.train()
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)
    for (_, a), (_, b) in zip(bn_modules(model), bn_modules(plain), strict=True):
        assert torch.equal(a.running_var, b.running_var)


def _sync_step(rank: int, world_size: int, model: nn.Module, x: Tensor) -> dict[str, Tensor]:
    """One training forward/backward of the synced model on this rank's half of ``x``."""
    model = convert_norms(model, "sync").train()
    half = x.chunk(world_size)[rank].requires_grad_()
    model(half).square().sum().backward()
    return {"grad": half.grad, **{k: v for k, v in model.state_dict().items()}}


@pytest.mark.ddp
def test_sync_on_two_cpu_ranks_equals_one_process_on_the_whole_batch() -> None:
    from tests._dist import run_ddp

    norm_act = pytest.importorskip("timm.layers.norm_act")
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 1),
        norm_act.BatchNormAct2d(4),
    )
    x = torch.randn(8, 3, 6, 6)
    results = run_ddp(_sync_step, model, x)
    whole = x.clone().requires_grad_()
    model.train()(whole).square().sum().backward()
    grads = torch.cat([r["grad"] for r in results])
    torch.testing.assert_close(grads, whole.grad, rtol=1e-4, atol=1e-5)
    for key, value in model.state_dict().items():
        if "running" in key:  # every rank ends with the global statistics
            for r in results:
                torch.testing.assert_close(r[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_converted_domain_layers_know_their_module_path_for_warnings() -> None:
    """A rare domain's warning names where the layer sits, also without ``domain()``."""
    from torchvision.models import resnet18

    model = convert_norms(resnet18(num_classes=4), "domain", num_domains=2).train()
    layer = model.layer4[0].bn1
    assert layer._module_path == "layer4.0.bn1"
    ids = torch.tensor([0] * 7 + [1])  # one value per channel of domain 1 at a 1x1 map
    with pytest.warns(UserWarning, match=r"layer4\.0\.bn1"):
        out = layer(torch.randn(8, 512, 1, 1), domain=ids)
    assert torch.isfinite(out).all()


# --- one registry of layer kinds (lightning_norms._kinds) ---------------------------------------
def test_every_registry_answer_comes_from_the_kind_table() -> None:
    """convert's names, "is a BatchNorm / a domain layer", stats' read-back and NormSync's twins
    are all read off ``KINDS``: every class of every kind answers as its entry says."""
    import lightning_norms._kinds as kinds

    names = set(kinds.KINDS) - {"none"}
    with pytest.raises(ValueError, match="choose one of") as error:
        convert_norms(nn.BatchNorm2d(2), "nope")
    assert str(sorted(names)) in str(error.value)
    for name, kind in kinds.KINDS.items():
        for dims, cls in enumerate(kind.classes, start=1):
            if not isinstance(cls, type):
                continue
            kwargs = {"num_domains": 2} if kind.per_domain else {}
            kwargs |= {"num_groups": 1} if name == "group" else {}
            layer = create_norm(name, 4, dims=dims, **kwargs)
            assert type(layer) is cls
            assert kinds.is_bn(layer) is kind.batch_norm, (name, dims)
            assert kinds.is_domain(layer) is kind.per_domain, (name, dims)
            assert kinds.reads_back(layer) is kind.reads_back, (name, dims)
            assert kinds.is_small_batch_kind(layer) is kind.small_batches, (name, dims)
            if kind.batch_norm:
                assert kinds.after_norm(layer, "x") is None  # a plain normalisation
    act = convert_norms(nn.BatchNorm2d(4), "domain", num_domains=2)
    assert kinds.is_domain(DomainBatchNormAct2d(4, 2)) and kinds.is_domain(act)
    twins = {nn.BatchNorm1d: kinds.KINDS["sync"].classes[0], nn.BatchNorm2d: SyncedBatchNorm2d}
    twins[nn.BatchNorm3d] = SyncedBatchNorm3d
    assert twins == kinds.SYNCED_TWINS


def test_a_kind_without_a_norm_act_form_refuses_a_norm_act_layer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Converting timm's ``BatchNormAct2d`` into a kind with no ``*Act2d`` form raises, naming the
    layer, rather than building the plain norm and silently losing the activation."""
    import dataclasses

    import lightning_norms._kinds as kinds

    norm_act = pytest.importorskip("timm.layers.norm_act")
    monkeypatch.setitem(kinds.KINDS, "renorm", dataclasses.replace(kinds.KINDS["renorm"], act=None))
    model = nn.Sequential(nn.Conv2d(3, 4, 1), norm_act.BatchNormAct2d(4, act_layer=nn.ReLU))
    with pytest.raises(ValueError, match=r"BatchNormAct2d at '1': no norm \+ activation form"):
        convert_norms(model, "renorm")
    assert type(model[1]) is norm_act.BatchNormAct2d  # all or nothing: the model is unchanged


def test_lazy_exports_list_only_public_names() -> None:
    """The three packages resolve their names through one helper: ``dir()`` is ``__all__``
    (plus the lazily imported subpackages at the root), and an unknown name is an
    ``AttributeError`` naming the package."""
    import lightning_norms
    from lightning_norms import callbacks, data

    for package in (lightning_norms, callbacks, data):
        assert dir(package) == sorted(package.__all__)
        with pytest.raises(AttributeError, match=rf"module '{package.__name__}' has no attribute"):
            package.NoSuchName  # noqa: B018
    assert callbacks.PreciseBN.__name__ == "PreciseBN" and "PreciseBN" in vars(callbacks)
