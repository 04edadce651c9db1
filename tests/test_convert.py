"""convert_norms on torchvision's resnet18 and on small models: state kept, errors clear."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.models import resnet18

from lightning_norms import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, LayerNorm2d, convert_norms


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
            r"BatchNorm1d at '1' does not normalise 4D",
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
