"""The model zoo: real torchvision / timm models x every ``convert_norms`` target (API.md).

Each case builds the model with ``weights=None`` and seeded, non-trivial BatchNorm state,
converts it, and checks against the original model (the reference): eval outputs equal where
the target is exact in eval, one real training step (mixed per-sample domain ids for
``"domain"``) with finite loss and gradients and the buffers changed as the target promises,
a ``state_dict`` round trip into a freshly built model (``torch.equal``), and the way back to
``"batch"`` (``nn.BatchNorm2d`` everywhere, same count, same eval output; timm's
``BatchNormAct2d`` activation kept). Then ``channels_last`` on a domain-BN ResNet-18, bf16
(autocast and bf16 weights) and ``torch.compile`` on its stem and first stage, and a WGAN-GP
gradient penalty through every BatchNorm variant against float64 references.

Eval tolerances: the converted layers compute the same affine map as the original but possibly
through other kernels (``x * scale + shift`` in ``FrozenBatchNorm2d``), so each layer may
differ by a few float32 ulps; over up to 121 layers (DenseNet-121) that stays far below
``1e-5`` of the output's scale (measured on this matrix: 0 for "domain", "renorm" and "batch",
<= 4.5e-7 for "frozen").
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

import lightning_norms
from lightning_norms import BatchRenorm2d, DomainBatchNorm2d, LayerNorm2d, convert_norms
from lightning_norms.convert import (
    BatchRenormAct2d,
    DomainBatchNormAct2d,
    GroupNormAct2d,
    LayerNormAct2d,
)
from lightning_norms.distributed import SyncedBatchNorm2d
from tests._zoo import (
    EVAL_EXACT,
    GP_IDS,
    NUM_CLASSES,
    TARGETS,
    ZOO,
    build,
    convert,
    deterministic,
    gradient_penalty,
    inputs,
    interpolates,
    make_critic,
    norm_layers,
    randomise_bn,
    run,
)

timm = pytest.importorskip("timm")

# the class every norm layer has after convert_norms(model, target)
TARGET_TYPE: dict[str, type[nn.Module]] = {
    "domain": DomainBatchNorm2d,
    "renorm": BatchRenorm2d,
    "layer2d": LayerNorm2d,
    "group": nn.GroupNorm,
    "batch": nn.BatchNorm2d,
    "frozen": FrozenBatchNorm2d,
}
# what a norm + activation layer (timm's BatchNormAct2d) becomes: its keys and act are kept
ACT_TYPE: dict[str, type[nn.Module]] = {
    "domain": DomainBatchNormAct2d,
    "renorm": BatchRenormAct2d,
    "layer2d": LayerNormAct2d,
    "group": GroupNormAct2d,
    "batch": timm.layers.BatchNormAct2d,
    "frozen": timm.layers.FrozenBatchNormAct2d,
}


def assert_eval_close(actual: Tensor, expected: Tensor) -> None:
    """Equal up to float32 rounding accumulated over the layers (module docstring)."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale)


def leaf_types(model: nn.Module) -> Counter[str]:
    """Leaf modules other than norms and ``Identity``, by class: what a conversion must keep."""
    skip = (*TARGET_TYPE.values(), torch.nn.modules.batchnorm._BatchNorm, nn.Identity)
    return Counter(
        type(m).__name__
        for m in model.modules()
        if not isinstance(m, skip) and next(m.children(), None) is None
    )


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, ids: int | Tensor | None) -> Tensor:
    """``model``'s eval output (routed to ``ids`` when given)."""
    return run(model.eval(), x, ids)


def check_converted(model: nn.Module, original: nn.Module, target: str) -> None:
    """Every BN layer became ``target``'s class (same count) and nothing else was lost."""
    classes = (TARGET_TYPE[target], ACT_TYPE[target])
    norms = {id(m) for _, m in norm_layers(original)}
    already = sum(type(m) in classes and id(m) not in norms for m in original.modules())
    count = sum(type(m) in classes for m in model.modules())
    assert count == len(norms) + already, (target, count, len(norms), already)
    if target in ("layer2d", "group"):
        assert norm_layers(model) == []
    else:
        assert all(type(m) in classes for _, m in norm_layers(model))
    # timm's BatchNormAct2d: its activation (and anything else after the norm) is kept
    assert leaf_types(model) == leaf_types(original)


def train_step(model: nn.Module, target: str, x: Tensor, y: Tensor, ids: Tensor | None) -> None:
    """One SGD step; finite loss and gradients; buffers changed as ``target`` promises."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    with deterministic():
        out = run(model, x, ids)
    loss = F.cross_entropy(out, y)
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # one sample per domain makes BatchNorm gradients large (checked exact below): clip them
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    torch.optim.SGD(model.parameters(), lr=0.01).step()
    model.eval()
    _check_buffers(model, target, before, model.state_dict())


def _check_buffers(
    model: nn.Module, target: str, before: dict[str, Tensor], after: dict[str, Tensor]
) -> None:
    """Running statistics moved (each domain's, for ``"domain"``) or, frozen, did not."""
    domain_grads = torch.zeros(2)
    for name, layer in norm_layers(model):
        mean, var = f"{name}.running_mean", f"{name}.running_var"
        if target == "frozen":
            for key in (mean, var, f"{name}.weight", f"{name}.bias"):
                assert torch.equal(after[key], before[key]), key
        elif target == "domain":
            for k in range(2):  # both domains were in the batch: both rows changed
                assert not torch.equal(after[mean][k], before[mean][k]), (mean, k)
                assert not torch.equal(after[var][k], before[var][k]), (var, k)
            domain_grads += layer.weight.grad.abs().sum(1)
        else:
            assert not torch.equal(after[mean], before[mean]), mean
            assert not torch.equal(after[var], before[var]), var
            key = f"{name}.num_batches_tracked"
            assert after[key] == before[key] + 1, key
    # each domain's affine got gradients (not necessarily in every layer: stochastic depth
    # drops a sample's residual branch)
    assert target != "domain" or bool((domain_grads > 0).all()), domain_grads


@pytest.mark.slow
@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("name", list(ZOO))
def test_convert_train_round_trip(name: str, target: str) -> None:
    original = build(name)
    x, y, ids = inputs()
    routed = ids if target == "domain" else None  # mixed ids: sample i goes to domain ids[i]
    reference = evaluate(original, x, None)
    model = convert(copy.deepcopy(original), target)
    check_converted(model, original, target)
    if target in EVAL_EXACT:  # "domain": every domain starts as the original BN
        assert_eval_close(evaluate(model, x, routed), reference)

    train_step(model, target, x, y, routed)
    trained = evaluate(model, x, routed)

    fresh = convert(build(name, seed=1), target)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(evaluate(fresh, x, routed), trained)

    # back to plain BatchNorm; from "domain", domain 1's state (which training changed), which
    # in eval gives the samples routed to domain 1 their outputs
    back = convert_norms(model, "batch", **({"domain": 1} if target == "domain" else {}))
    rows = ids == 1 if target == "domain" else slice(None)
    if target in EVAL_EXACT:
        check_converted(back, original, "batch")
        assert_eval_close(evaluate(back, x, None)[rows], trained[rows])
    else:  # no BatchNorm left to convert: nothing changes
        check_converted(back, original, target)
        assert torch.equal(evaluate(back, x, None), trained)


@pytest.mark.parametrize("name", [n for n in ZOO if n.startswith("timm")])
def test_timm_batchnormact_renorm_and_back_keeps_the_activation(name: str) -> None:
    """The quick, targeted version of the BatchNormAct2d check (no training)."""
    original = build(name)
    x, _, _ = inputs(n=2)
    with torch.no_grad():
        reference = original(x)
        model = convert_norms(convert_norms(copy.deepcopy(original), "renorm"), "batch")
        assert [type(m) for _, m in norm_layers(model)] == [
            type(m) for _, m in norm_layers(original)
        ]
        assert leaf_types(model) == leaf_types(original)
        assert_eval_close(model(x), reference)


@pytest.mark.parametrize("name", list(ZOO))
def test_bn_modules_lists_every_norm_layer(name: str) -> None:
    """``bn_modules`` against a plain ``isinstance`` walk, on the real models and converted."""
    original = build(name)
    assert lightning_norms.bn_modules(original) == norm_layers(original)
    converted = convert(copy.deepcopy(original), "renorm")
    assert lightning_norms.bn_modules(converted) == norm_layers(converted)
    assert len(norm_layers(converted)) == len(norm_layers(original))


@pytest.mark.slow
def test_frozen_batchnorm_resnet18_converts_and_back() -> None:
    """torchvision's ``FrozenBatchNorm2d`` as the source (detection backbones ship with it)."""
    torch.manual_seed(0)
    original = torchvision.models.resnet18(weights=None, norm_layer=FrozenBatchNorm2d)
    randomise_bn(original.eval(), 0)
    x, _, ids = inputs()
    reference = evaluate(original, x, None)
    for target in EVAL_EXACT:
        model = convert(copy.deepcopy(original), target)
        check_converted(model, original, target)
        assert_eval_close(evaluate(model, x, ids if target == "domain" else None), reference)
        back = convert_norms(model, "frozen", **({"domain": 0} if target == "domain" else {}))
        check_converted(back, original, "frozen")
        assert_eval_close(evaluate(back, x, None), reference)


# --- channels_last, bf16 and torch.compile on a domain-BN ResNet-18 (mixed domain ids) ---


def _train_forward(model: nn.Module, x: Tensor, y: Tensor, ids: Tensor) -> dict[str, Tensor]:
    """One training forward/backward: the output, every gradient and every buffer."""
    model.train()
    out = run(model, x, ids)
    F.cross_entropy(out.float(), y).backward()
    result = {"out": out.detach()}
    result.update({f"grad:{n}": p.grad for n, p in model.named_parameters()})
    result.update({f"buffer:{n}": b.detach() for n, b in model.named_buffers()})
    return result


def _assert_runs_close(actual: dict[str, Tensor], expected: dict[str, Tensor], rel: float) -> None:
    """Each tensor within ``rel`` of its own scale (max-abs), key by key."""
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        scale = value.abs().max().item() if value.is_floating_point() else 0.0
        torch.testing.assert_close(
            actual[key].to(value.dtype),
            value,
            rtol=rel,
            atol=rel * scale,
            msg=lambda m, k=key: f"{k}: {m}",
        )


@pytest.mark.slow
def test_domain_resnet18_channels_last_matches_contiguous() -> None:
    model = convert(build("tv_resnet18"), "domain")
    last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x, y, ids = inputs(n=4)
    x_last = x.contiguous(memory_format=torch.channels_last)
    # other conv/norm kernels for the channels_last layout: float32 rounding only (measured:
    # the contiguous float32 run is within 4e-5 of a float64 run, relative to each scale)
    _assert_runs_close(_train_forward(last, x_last, y, ids), _train_forward(model, x, y, ids), 2e-4)
    assert_eval_close(evaluate(last, x_last, ids), evaluate(model, x, ids))


def resnet18_stage(target: str) -> nn.Module:
    """ResNet-18's stem and first stage (5 BN layers, inplace ReLU, ``out += identity``) + head.

    The bf16 and ``torch.compile`` cases use it: 8x8 maps at 32x32 inputs keep the statistics
    well conditioned (128 values per domain and channel), and it compiles in a fraction of the
    whole network's time.
    """
    net = build("tv_resnet18")
    torch.manual_seed(0)
    head = (nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, NUM_CLASSES))
    stage = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, *head)
    return convert(stage, target)


def _bf16_errors(target: str, x: Tensor, y: Tensor, ids: Tensor | None) -> dict[str, float]:
    """Errors of a bf16-autocast and a bf16-weights training step against a float64 one."""
    fp32 = resnet18_stage(target)
    expected = _train_forward(copy.deepcopy(fp32).double(), x.double(), y, ids)
    autocast_model, bf16_model = copy.deepcopy(fp32), copy.deepcopy(fp32).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = _train_forward(autocast_model, x, y, ids)
    assert all(b.dtype != torch.bfloat16 for b in autocast_model.buffers())  # fp32 statistics
    bf16 = _train_forward(bf16_model, x.bfloat16(), y, ids)
    errors = {}
    for name, actual in (("autocast", autocast), ("bf16", bf16)):
        assert all(torch.isfinite(v).all() for v in actual.values())
        grads = [k for k in expected if k.startswith("grad:")]
        stats = [k for k in expected if "running_" in k]
        flat = [torch.cat([r[k].double().flatten() for k in grads]) for r in (actual, expected)]
        errors[f"{name} out"] = _relative_error(actual["out"], expected["out"])
        errors[f"{name} grad"] = ((flat[0] - flat[1]).norm() / flat[1].norm()).item()
        errors[f"{name} stats"] = max(_relative_error(actual[k], expected[k]) for k in stats)
    return errors


def test_domain_resnet18_bf16_as_close_as_batchnorm() -> None:
    """bf16 autocast / bf16 weights: no further from float64 than torch's BatchNorm model.

    "Works wherever ``nn.BatchNorm2d`` does": the reference error is the unconverted model's,
    trained on the same batch the same way; the domain model (mixed ids) may be at most twice
    as far off. Errors: max-abs of the output and of each running statistic relative to its
    scale, and the norm of the whole gradient's error relative to its norm.
    """
    x, y, ids = inputs(n=4, size=32)
    batchnorm = _bf16_errors("batch", x, y, None)
    domain_bn = _bf16_errors("domain", x, y, ids)
    for key, error in batchnorm.items():
        assert domain_bn[key] <= 2 * error, (key, domain_bn[key], error)
    # bf16 keeps ~3 significant digits: outputs and statistics within a few percent
    assert max(domain_bn.values()) < 0.1


def _relative_error(actual: Tensor, expected: Tensor) -> float:
    scale = expected.abs().max().clamp(min=1e-12)
    return ((actual.double() - expected.double()).abs().max() / scale).item()


@pytest.mark.slow
def test_domain_resnet18_compiled_matches_eager() -> None:
    """``torch.compile`` (aot_eager) of a domain-BN ResNet-18 stage matches eager, training."""
    model = resnet18_stage("domain")
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager")
    x, y, ids = inputs(n=4, size=32)
    actual = _train_forward(compiled, x, y, ids)
    # aot_eager runs the same aten kernels, traced: rounding-level differences at most
    expected = _train_forward(eager, x, y, ids)
    _assert_runs_close({k.replace("_orig_mod.", ""): v for k, v in actual.items()}, expected, 1e-5)


# --- a WGAN-GP gradient penalty through every BatchNorm variant (float64 references) ---


class _FormulaNorm(nn.Module):
    """Reference BatchNorm / BatchRenorm in plain tensor ops, so autograd derives every order.

    ``y = w * ((x - mu_B) / sigma_B * r + d) + b``; plain BN has ``r = 1, d = 0``; with
    ``renorm=(r_max, d_max)`` ``r`` and ``d`` come from the running statistics, detached.
    """

    def __init__(self, layer: nn.Module, renorm: tuple[float, float] | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(layer.weight.detach().clone())
        self.bias = nn.Parameter(layer.bias.detach().clone())
        self.eps = layer.eps
        self.renorm = renorm
        self.running = (layer.running_mean.clone(), layer.running_var.clone())

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean((0, 2, 3), keepdim=True)
        var = (x - mean).square().mean((0, 2, 3), keepdim=True)
        sigma_b = (var + self.eps).sqrt()
        y = (x - mean) / sigma_b
        if self.renorm is not None:
            r_max, d_max = self.renorm
            run_mean, run_var = (t.view(1, -1, 1, 1) for t in self.running)
            sigma = (run_var + self.eps).sqrt()
            r = (sigma_b / sigma).clamp(1 / r_max, r_max).detach()
            d = ((mean - run_mean) / sigma).clamp(-d_max, d_max).detach()
            y = y * r + d
        return y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class _PerDomainNorm(nn.Module):
    """Reference DomainBatchNorm: each domain's sub-batch through its own BatchNorm."""

    def __init__(self, layer: DomainBatchNorm2d, ids: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(layer.weight.detach().clone())
        self.bias = nn.Parameter(layer.bias.detach().clone())
        self.eps = layer.eps
        self.ids = ids

    def forward(self, x: Tensor) -> Tensor:
        out = torch.zeros_like(x)
        for k in self.ids.unique().tolist():
            rows = self.ids == k
            w, b = self.weight[k], self.bias[k]
            bn = F.batch_norm(x[rows], None, None, w, b, training=True, eps=self.eps)
            out = out.index_put((rows,), bn)
        return out


_DOMAIN_INT = torch.full((8,), 1)
# variant -> (its norm layer, the reference norm built from a layer, domain ids to route)
GP_VARIANTS: dict[str, tuple[Callable[[int], nn.Module], Callable[..., nn.Module], object]] = {
    "batchnorm": (nn.BatchNorm2d, _FormulaNorm, None),
    "synced_single_process": (SyncedBatchNorm2d, _FormulaNorm, None),
    "renorm": (
        lambda c: BatchRenorm2d(c, r_max=1.5, d_max=0.5, warmup_steps=0),
        lambda layer: _FormulaNorm(layer, renorm=(1.5, 0.5)),
        None,
    ),
    "domain_mixed_ids": (
        lambda c: DomainBatchNorm2d(c, num_domains=2),
        lambda layer: _PerDomainNorm(layer, GP_IDS),
        GP_IDS,
    ),
    "domain_int": (
        lambda c: DomainBatchNorm2d(c, num_domains=2),
        lambda layer: _PerDomainNorm(layer, _DOMAIN_INT),
        1,
    ),
    "domain_sync_single_process": (
        lambda c: DomainBatchNorm2d(c, num_domains=2, sync=True),
        lambda layer: _PerDomainNorm(layer, GP_IDS),
        GP_IDS,
    ),
}


@pytest.mark.slow
def test_domain_resnet18_training_step_equals_per_domain_batchnorm() -> None:
    """Mixed ids on a real network: every layer as if each domain had its own BatchNorm.

    float64; the reference replaces each ``DomainBatchNorm2d`` of the same network by
    :class:`_PerDomainNorm` (each domain's sub-batch through ``F.batch_norm`` with that
    domain's affine). One sample per domain: the hardest case (2x2 maps at the last stage).
    """
    model = convert(build("tv_resnet18"), "domain").double().train()
    x, y, ids = inputs()
    reference = copy.deepcopy(model)
    for name, layer in norm_layers(reference):
        parent, _, child = name.rpartition(".")
        setattr(reference.get_submodule(parent), child, _PerDomainNorm(layer, ids))
    out = run(model, x.double(), ids)
    expected = reference(x.double())
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
    F.cross_entropy(out, y).backward()
    F.cross_entropy(expected, y).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        scale = q.grad.abs().max().item()
        torch.testing.assert_close(
            p.grad, q.grad, rtol=1e-7, atol=1e-7 * scale, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.mark.parametrize("variant", list(GP_VARIANTS))
def test_gradient_penalty_matches_reference(variant: str) -> None:
    norm, reference_norm, ids = GP_VARIANTS[variant]
    critic = make_critic(norm)
    reference = copy.deepcopy(critic)
    reference.norm1 = reference_norm(critic.norm1)
    reference.norm2 = reference_norm(critic.norm2)
    x_hat = interpolates()

    penalty, grad, grads = gradient_penalty(critic, x_hat, ids)
    ref_penalty, ref_grad, ref_grads = gradient_penalty(reference, x_hat, None)

    assert ref_penalty > 1e-3  # a penalty that can be wrong
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)  # first order
    torch.testing.assert_close(penalty, ref_penalty, rtol=1e-9, atol=1e-12)
    assert grads.keys() == ref_grads.keys()
    for name, expected in ref_grads.items():  # second order: d penalty / d parameters
        if name == "head.bias":  # dD/dx does not depend on it
            assert expected is None and grads[name] is None
            continue
        assert expected.abs().max() > 0, name
        torch.testing.assert_close(
            grads[name], expected, rtol=1e-7, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}"
        )
