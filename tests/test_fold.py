"""fold_norms: every BatchNorm kind folded into the conv / linear it follows, found by tracing.

Reference: the unfolded model's eval output (and, for resnet18, torch's own FX conv-BN fuser);
tolerance: fp32 rounding, rtol 1e-4 and atol 1e-5 times the output scale.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torchvision.models import mobilenet_v3_small, resnet18
from torchvision.ops.misc import FrozenBatchNorm2d

from lightning_norms import (
    BatchRenorm1d,
    BatchRenorm2d,
    DomainBatchNorm2d,
    FoldReport,
    bn_modules,
    convert_norms,
    domain,
    fold_norms,
)
from lightning_norms.distributed import SyncedBatchNorm3d
from tests._layers import randomise, snapshot_state, uniform

STATE = {
    "weight": uniform(0.5, 1.5),
    "bias": uniform(-0.2, 0.2),
    "running_mean": uniform(-0.2, 0.2),
    "running_var": uniform(0.5, 2.0),
}


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial affine and running statistics in every BatchNorm-type layer (every domain's
    row differs); the model in eval mode."""
    randomise((m for _, m in bn_modules(model)), STATE, seed=seed)
    return model.eval()


def _assert_folded_output(model: nn.Module, x: Tensor, expected: Tensor) -> None:
    with torch.no_grad():
        out = model(x)
    scale = expected.abs().max().item()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5 * scale)


def _fold_and_check(model: nn.Module, x: Tensor, **kwargs: int) -> FoldReport:
    """Fold ``model``; its eval output is unchanged and every folded norm is gone."""
    with torch.no_grad():
        if any(isinstance(m, DomainBatchNorm2d) for m in model.modules()):
            with domain(model, 0):
                expected = model(x)
        else:
            expected = model(x)
    report = fold_norms(model, **kwargs)
    assert report.model is model
    names = {name for name, _ in model.named_modules()}
    assert not any(
        name in names and bn_modules(model.get_submodule(name)) for name in report.folded
    )
    _assert_folded_output(model, x, expected)
    return report


def test_resnet18_folds_all_20_and_matches_torch_fx_fuser() -> None:
    from torch.fx.experimental.optimization import fuse

    torch.manual_seed(0)
    model = _randomise(resnet18(weights=None, num_classes=10))
    fused = fuse(copy.deepcopy(model))  # torch's own: nn.BatchNorm2d after nn.Conv2d only
    report = _fold_and_check(model, torch.randn(2, 3, 32, 32))
    assert len(report.folded) == 20 and report.kept == {}
    assert bn_modules(model) == [] and isinstance(model.layer1[0].bn1, nn.Identity)
    assert report.folded[:3] == ["bn1", "layer1.0.bn1", "layer1.0.bn2"]
    for name in ("conv1", "layer2.0.downsample.0", "layer4.1.conv2"):
        ours, theirs = model.get_submodule(name), fused.get_submodule(name)
        torch.testing.assert_close(ours.weight, theirs.weight, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(ours.bias, theirs.bias, rtol=1e-5, atol=1e-6)


def test_mobilenet_v3_small_grouped_convs_all_34_folded() -> None:
    torch.manual_seed(0)
    model = _randomise(mobilenet_v3_small(weights=None, num_classes=10))
    report = _fold_and_check(model, torch.randn(2, 3, 64, 64))
    assert len(report.folded) == 34 and report.kept == {}


def test_domain_resnet18_folds_the_named_domain() -> None:
    torch.manual_seed(0)
    model = convert_norms(resnet18(weights=None, num_classes=10), "domain", num_domains=2)
    _randomise(model)  # domain 0 and domain 1 rows differ
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), domain(model, 1):
        expected = model(x)
    with torch.no_grad(), domain(model, 0):
        other = model(x)
    assert not torch.allclose(other, expected, atol=1e-3)
    report = fold_norms(model, domain=1)
    assert len(report.folded) == 20 and report.kept == {}
    _assert_folded_output(model, x, expected)  # no DomainBatchNorm left: no domain needed


def test_domain_batchnorm_with_several_domains_needs_domain() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), DomainBatchNorm2d(4, 3)).eval()
    with pytest.raises(ValueError, match=r"fold_norms: DomainBatchNorm2d at '1' has 3 domains"):
        fold_norms(model)
    with pytest.raises(ValueError, match=r"fold_norms: domain=3 is outside \[0, 3\)"):
        fold_norms(model, domain=3)
    assert isinstance(model[1], DomainBatchNorm2d)


class _Residual(nn.Module):
    """conv -> bn, with the conv's output also added back: the bn's input is reused."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        return self.bn(y) + y + self.bn2(self.conv2(x))


def test_a_norm_whose_input_is_reused_stays() -> None:
    model = _randomise(_Residual())
    report = _fold_and_check(model, torch.randn(2, 4, 6, 6))
    assert report.folded == ["bn2"]
    assert report.kept == {"bn": "the output of 'conv' is also used elsewhere"}
    assert isinstance(model.bn, nn.BatchNorm2d) and model.conv2.bias is not None


def test_a_norm_after_relu_or_an_input_or_twice_called_stays() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn_in = nn.BatchNorm2d(3)
            self.conv = nn.Conv2d(3, 4, 1)
            self.relu = nn.ReLU()
            self.bn = nn.BatchNorm2d(4)
            self.shared = nn.Conv2d(4, 4, 1)
            self.bn_shared = nn.BatchNorm2d(4)

        def forward(self, x: Tensor) -> Tensor:
            y = self.bn(self.relu(self.conv(self.bn_in(x))))
            return self.bn_shared(self.shared(y)) + self.shared(y)

    model = _randomise(Net())
    report = _fold_and_check(model, torch.randn(2, 3, 5, 5))
    assert report.folded == []
    assert report.kept == {
        "bn_in": "its input is the model's input 'x', not a Conv or Linear output",
        "bn": "its input is ReLU 'relu', not a Conv or Linear output",
        "bn_shared": "its input layer 'shared' is called more than once",
    }


def test_timm_batchnormact_norm_folded_activation_kept() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = _randomise(timm.create_model("efficientnet_b0", pretrained=False))
    acts = sum(isinstance(m, nn.SiLU) for m in model.modules())
    prelu_model = nn.Sequential(
        nn.Conv2d(3, 4, 1), timm.layers.BatchNormAct2d(4, act_layer=nn.PReLU)
    )
    keys = list(prelu_model.state_dict())
    report = _fold_and_check(model, torch.randn(2, 3, 64, 64))
    assert len(report.folded) == 49 and report.kept == {}
    assert bn_modules(model) == [] and sum(isinstance(m, nn.SiLU) for m in model.modules()) == acts
    assert list(model.bn1.named_children()) == [("drop", model.bn1.drop), ("act", model.bn1.act)]
    # the activation's own state keeps its key
    _fold_and_check(_randomise(prelu_model), torch.randn(2, 3, 4, 4))
    assert list(prelu_model.state_dict()) == [*keys[:2], "1.act.weight"]


@pytest.mark.parametrize(
    ("layer", "norm", "shape"),
    [
        (nn.Conv2d(4, 6, 3, groups=2, bias=False), nn.BatchNorm2d(6), (2, 4, 5, 5)),
        (nn.Conv1d(3, 4, 3), BatchRenorm1d(4), (2, 3, 7)),
        (nn.Conv3d(2, 4, 2, bias=False), SyncedBatchNorm3d(4), (2, 2, 3, 3, 3)),
        (nn.Linear(5, 4), nn.BatchNorm1d(4), (3, 5)),
        (nn.Linear(5, 4, bias=False), BatchRenorm1d(4), (3, 5)),
        (nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), BatchRenorm2d(6), (2, 4, 3, 3)),
        (nn.ConvTranspose1d(3, 4, 2, bias=False), nn.BatchNorm1d(4), (2, 3, 5)),
        (nn.Conv2d(3, 4, 1), FrozenBatchNorm2d(4), (2, 3, 4, 4)),
        (nn.Conv2d(3, 4, 1), DomainBatchNorm2d(4, 1, shared_affine=True), (2, 3, 4, 4)),
        (nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, affine=False), (2, 3, 4, 4)),
    ],
)
def test_every_layer_kind_folds(layer: nn.Module, norm: nn.Module, shape: tuple) -> None:
    model = _randomise(nn.Sequential(layer, norm))
    report = _fold_and_check(model, torch.randn(shape) * 3 + 1)
    assert report.folded == ["1"] and isinstance(model[1], nn.Identity)
    assert model[0].bias is not None and model[0].bias.requires_grad


def test_kept_norms_say_why() -> None:
    hooked = nn.BatchNorm2d(4)
    hooked.register_forward_hook(lambda *args: None)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1),
        nn.BatchNorm2d(4, track_running_stats=False),  # batch statistics in eval too
        nn.Conv2d(4, 4, 1),
        hooked,
        nn.Conv2d(4, 4, 1),
        nn.BatchNorm2d(4),
    )
    model = _randomise(model)
    report = _fold_and_check(model, torch.randn(2, 3, 4, 4))
    assert report.folded == ["5"]
    assert report.kept == {
        "1": "no running statistics: it normalises with batch statistics in eval too",
        "3": "it has hooks (folding would drop them)",
    }


def test_untraceable_forward_folds_nothing_and_says_why() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: Tensor) -> Tensor:
            if x.sum() > 0:  # data-dependent: torch.fx cannot trace it
                return self.bn(self.conv(x))
            return self.bn(self.conv(-x))

    model = Branchy().eval()
    state = snapshot_state(model)
    report = fold_norms(model)
    assert report.folded == [] and list(report.kept) == ["bn"]
    assert report.kept["bn"].startswith("torch.fx cannot trace Branchy: TraceError:")
    assert isinstance(model.bn, nn.BatchNorm2d)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_training_mode_raises() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match=r"fold_norms: Sequential is in training mode"):
        fold_norms(model)
    model.eval()
    model[1].train()
    with pytest.raises(ValueError, match=r"training mode \(\['1'\]\).*model.eval\(\)"):
        fold_norms(model)
    assert isinstance(model[1], nn.BatchNorm2d)


def test_report_repr_is_short() -> None:
    report = fold_norms(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).eval())
    assert repr(report) == "FoldReport(folded=1 layer(s), kept={})"


def test_float64_fold_is_exact_to_float64_rounding() -> None:
    """The formula itself, free of fp32 rounding: a float64 model folds to 1e-12."""
    torch.manual_seed(0)
    model = _randomise(resnet18(weights=None, num_classes=10).double())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
    assert len(fold_norms(model).folded) == 20
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)


def test_domain_norm_act_folds_the_named_domain_and_keeps_the_activation() -> None:
    norm_act = pytest.importorskip("timm.layers.norm_act")
    model = nn.Sequential(nn.Conv2d(3, 4, 1), norm_act.BatchNormAct2d(4, act_layer=nn.SiLU))
    model = _randomise(convert_norms(model, "domain", num_domains=2))
    act = model[1].act
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad(), domain(model, 1):
        expected = model(x)
    assert fold_norms(model, domain=1).folded == ["1"]
    assert list(model[1].named_children()) == [("drop", model[1].drop), ("act", act)]
    _assert_folded_output(model, x, expected)
