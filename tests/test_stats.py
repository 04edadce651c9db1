"""recompute_bn_stats: exact population statistics, restoration, warnings, DDP."""

from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_norms import (
    BatchRenorm1d,
    BatchRenorm2d,
    DomainBatchNorm1d,
    DomainBatchNorm2d,
    domain,
)
from lightning_norms.distributed import SyncedBatchNorm2d
from lightning_norms.stats import BNStatsReport, recompute_bn_stats
from tests._dist import run_ddp
from tests._layers import host_reads, snapshot_state


class SubclassBN1d(nn.BatchNorm1d):
    """A BN subclass with its own forward (as timm's ``BatchNormAct2d``): the generic path,
    moments from the input in a pre-hook, instead of reading back the fused kernel's."""

    def forward(self, input: Tensor) -> Tensor:
        return super().forward(input)


class SubclassBN2d(nn.BatchNorm2d):
    """A BN subclass with its own forward: the generic (input pre-hook) path."""

    def forward(self, input: Tensor) -> Tensor:
        return super().forward(input)


class PlainSubclassBN2d(nn.BatchNorm2d):
    """A BN subclass that keeps torch's forward: its batch statistics are read back."""


def mlp(bn: type[nn.Module] = nn.BatchNorm1d) -> nn.Module:
    return nn.Sequential(
        nn.Linear(5, 6), bn(6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, 4), bn(4, momentum=None)
    )


def conv1d() -> nn.Module:
    return nn.Sequential(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4), nn.ReLU(), nn.Conv1d(4, 2, 1))


def conv2d(bn: type[nn.Module] = nn.BatchNorm2d) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), bn(4), nn.ReLU(), nn.Conv2d(4, 5, 3), bn(5), nn.ReLU()
    )


def conv3d() -> nn.Module:
    return nn.Sequential(nn.Conv3d(2, 3, 3, padding=1), nn.BatchNorm3d(3), nn.ReLU())


def make_batches(shape: tuple[int, ...], sizes: list[int], seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, *shape, generator=g) * 2.0 + 3.0 for n in sizes]


CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "bn1d-2d-input": (mlp, (5,)),
    "bn1d-2d-input-generic": (lambda: mlp(SubclassBN1d), (5,)),
    "bn1d-3d-input": (conv1d, (3, 7)),
    "bn2d": (conv2d, (3, 6, 5)),
    "bn2d-generic": (lambda: conv2d(SubclassBN2d), (3, 6, 5)),
    "bn2d-subclass-keeps-forward": (lambda: conv2d(PlainSubclassBN2d), (3, 6, 5)),
    "bn3d": (conv3d, (2, 4, 3, 5)),
}


def bn_layers(model: nn.Module) -> dict[str, _BatchNorm]:
    return {n: m for n, m in model.named_modules() if isinstance(m, _BatchNorm)}


def reference_inputs(
    model: nn.Module,
    batches: list[Any],
    forward: Callable[[nn.Module, Any], Any] = lambda m, b: m(b),
) -> dict[str, list[tuple[Tensor, Tensor | None]]]:
    """Capture every BN layer's inputs (and per-sample domain ids) over one pass of a copy.

    The copy runs as the documented pass does: BN layers in train mode with their EMA frozen
    (momentum 0), every other module in eval mode. Domain ids come from the layer's own
    ``resolve_domain`` applied to the ``domain`` the call passed (keyword or positional).
    """
    ref = copy.deepcopy(model).eval()
    captured: dict[str, list[tuple[Tensor, Tensor | None]]] = {}
    for name, bn in bn_layers(ref).items():
        bn.train()
        bn.momentum = 0.0
        captured[name] = []

        def hook(m: nn.Module, args: tuple, kwargs: dict, name: str = name) -> None:
            ids = None
            if hasattr(m, "resolve_domain"):
                given = kwargs.get("domain", args[1] if len(args) > 1 else None)
                ids = m.resolve_domain(args[0], given)
            captured[name].append((args[0].detach().double(), ids))

        bn.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        for batch in batches:
            forward(ref, batch)
    return captured


def exact_stats(xs: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Float64 mean and unbiased variance per channel (dim 1) over all captured inputs."""
    flat = torch.cat([x.transpose(0, 1).reshape(x.shape[1], -1) for x in xs], dim=1)
    var, mean = torch.var_mean(flat, dim=1, correction=1)
    return mean, var


def assert_close_to(buffer: Tensor, expected: Tensor) -> None:
    torch.testing.assert_close(buffer.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", sorted(CASES))
def test_stats_equal_exact_population_stats(case: str) -> None:
    factory, shape = CASES[case]
    torch.manual_seed(0)
    model = factory()
    batches = make_batches(shape, [16, 16, 16, 7])  # uneven last batch
    captured = reference_inputs(model, batches)
    report = recompute_bn_stats(model, batches, num_batches=4)
    layers = bn_layers(model)
    assert len(report) == len(layers)
    for name, bn in layers.items():
        mean, var = exact_stats([x for x, _ in captured[name]])
        assert_close_to(bn.running_mean, mean)
        assert_close_to(bn.running_var, var)
    assert report.num_batches == 4
    counts = {layer.name: layer.count for layer in report.layers}
    first = next(iter(layers))
    assert counts[first] == sum(x[0].numel() // x[0].shape[1] for x in captured[first])


def test_float64_model_and_tensor_batches() -> None:
    torch.manual_seed(0)
    model = conv2d().double()
    batches = [b.double() for b in make_batches((3, 6, 5), [9, 4])]
    captured = reference_inputs(model, batches)
    recompute_bn_stats(model, iter(batches), num_batches=2)
    for name, bn in bn_layers(model).items():
        mean, var = exact_stats([x for x, _ in captured[name]])
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-12, atol=1e-12)


def test_bfloat16_model_stats_within_storage_precision() -> None:
    torch.manual_seed(0)
    model = conv2d().to(torch.bfloat16)
    batches = [b.to(torch.bfloat16) for b in make_batches((3, 6, 5), [16, 16, 7])]
    captured = reference_inputs(model, batches)
    recompute_bn_stats(model, batches, num_batches=3)
    for name, bn in bn_layers(model).items():
        assert bn.running_var.dtype == torch.bfloat16
        mean, var = exact_stats([x for x, _ in captured[name]])
        torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-2, atol=1e-2)


def test_dropout_is_off_during_the_pass() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Dropout(0.9), nn.BatchNorm1d(5))
    batches = make_batches((5,), [32, 32])
    recompute_bn_stats(model, batches, num_batches=2)
    mean, var = exact_stats(batches)  # dropout off: the BN sees the raw inputs
    assert_close_to(model[1].running_mean, mean.double())
    assert_close_to(model[1].running_var, var.double())
    assert model.training and model[0].training


def test_default_forward_uses_first_element_of_tuple_batches() -> None:
    torch.manual_seed(0)
    model = mlp()
    xs = make_batches((5,), [10, 6])
    batches = [(x, torch.zeros(len(x))) for x in xs]
    captured = reference_inputs(model, xs)
    recompute_bn_stats(model, batches, num_batches=2)
    mean, var = exact_stats([x for x, _ in captured["1"]])
    assert_close_to(model[1].running_mean, mean)
    assert_close_to(model[1].running_var, var)


def test_custom_forward_fn_and_endless_iterator() -> None:
    torch.manual_seed(0)
    model = mlp()
    xs = make_batches((5,), [8, 8, 8])
    batches = itertools.cycle([{"x": x} for x in xs])
    calls: list[int] = []

    def forward(m: nn.Module, batch: dict) -> Tensor:
        calls.append(1)
        return m(batch["x"])

    captured = reference_inputs(model, xs + xs[:2])
    report = recompute_bn_stats(model, batches, num_batches=5, forward_fn=forward)
    assert len(calls) == 5 and report.num_batches == 5
    mean, var = exact_stats([x for x, _ in captured["5"]])
    assert_close_to(model[5].running_mean, mean)
    assert_close_to(model[5].running_var, var)


@pytest.mark.parametrize("bn", [nn.BatchNorm1d, SubclassBN1d])
def test_many_small_batches(bn: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = mlp(bn)
    sizes = torch.randint(2, 6, (150,), generator=torch.Generator().manual_seed(1)).tolist()
    batches = make_batches((5,), sizes)
    captured = reference_inputs(model, batches)
    recompute_bn_stats(model, batches, num_batches=150)
    for name, layer in bn_layers(model).items():
        mean, var = exact_stats([x for x, _ in captured[name]])
        assert_close_to(layer.running_mean, mean)
        assert_close_to(layer.running_var, var)


def snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "state": snapshot_state(model),
        "training": {n: m.training for n, m in model.named_modules()},
        "momentum": {n: m.momentum for n, m in bn_layers(model).items()},
    }


@pytest.mark.parametrize("bn", [nn.BatchNorm1d, SubclassBN1d])
def test_weights_untouched_and_state_restored(bn: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = mlp(bn)
    model[1].momentum = 0.3
    model[1].num_batches_tracked.fill_(7)
    model.train()
    model[4].eval()  # mixed modes survive
    model[5].eval()
    before = snapshot(model)
    recompute_bn_stats(model, make_batches((5,), [8, 8]), num_batches=2)
    after = snapshot(model)
    for key, value in before["state"].items():
        if "running" in key:
            assert not torch.equal(value, after["state"][key]), key
        else:  # weights, biases, num_batches_tracked
            assert torch.equal(value, after["state"][key]), key
    assert after["training"] == before["training"]
    assert after["momentum"] == {"1": 0.3, "5": None}


@pytest.mark.parametrize("bn", [nn.BatchNorm1d, SubclassBN1d])
def test_everything_restored_when_forward_fn_raises(bn: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = mlp(bn)
    model.eval()
    model[1].running_var.fill_(float("nan"))  # even a diverged EMA comes back bit for bit
    before = snapshot(model)
    seen: list[int] = []

    def forward(m: nn.Module, batch: Tensor) -> Tensor:
        seen.append(1)
        if len(seen) == 3:
            raise RuntimeError("boom")
        return m(batch)

    with pytest.raises(RuntimeError, match="boom"):
        recompute_bn_stats(model, make_batches((5,), [8, 8, 8, 8]), forward_fn=forward)
    after = snapshot(model)
    for key, value in before["state"].items():
        torch.testing.assert_close(after["state"][key], value, equal_nan=True, rtol=0, atol=0)
    assert after["training"] == before["training"]
    assert after["momentum"] == before["momentum"]


def test_short_loader_warns_with_both_numbers_and_uses_what_came() -> None:
    torch.manual_seed(0)
    model = mlp()
    batches = make_batches((5,), [8, 8, 5])
    captured = reference_inputs(model, batches)
    with pytest.warns(UserWarning, match=r"got 3 batch\(es\), asked for 50"):
        report = recompute_bn_stats(model, batches, num_batches=50)
    assert report.num_batches == 3 and report.num_batches_requested == 50
    mean, var = exact_stats([x for x, _ in captured["1"]])
    assert_close_to(model[1].running_mean, mean)
    assert_close_to(model[1].running_var, var)


def test_no_batch_at_all_warns_and_leaves_buffers() -> None:
    model = mlp()
    model[1].running_mean.fill_(2.0)
    before = snapshot(model)
    with pytest.warns(UserWarning, match=r"got 0 batch\(es\), asked for 4"):
        report = recompute_bn_stats(model, [], num_batches=4)
    assert len(report) == 0 and report.unseen == ["1", "5"]
    for key, value in before["state"].items():
        assert torch.equal(snapshot(model)["state"][key], value)


def test_layers_without_running_stats_are_skipped_with_one_warning() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 6),
        nn.BatchNorm1d(6, track_running_stats=False),
        nn.Linear(6, 3),
        nn.BatchNorm1d(3),
        nn.BatchNorm1d(3, track_running_stats=False),
    )
    batches = make_batches((5,), [8, 8])
    captured = reference_inputs(model, batches)
    with pytest.warns(UserWarning, match="track_running_stats=False") as record:
        report = recompute_bn_stats(model, batches, num_batches=2)
    assert len([w for w in record if "track_running_stats" in str(w.message)]) == 1
    assert "1, 4" in str(record[0].message)
    assert report.skipped == ["1", "4"] and [layer.name for layer in report.layers] == ["3"]
    mean, var = exact_stats([x for x, _ in captured["3"]])
    assert_close_to(model[3].running_mean, mean)
    assert_close_to(model[3].running_var, var)


def test_model_without_bn_warns_and_returns_empty_report() -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    consumed: list[int] = []

    def gen() -> Iterator[Tensor]:
        consumed.append(1)
        yield torch.randn(2, 3)

    with pytest.warns(UserWarning, match="no BatchNorm layer"):
        report = recompute_bn_stats(model, gen())
    assert isinstance(report, BNStatsReport) and len(report) == 0 and not consumed
    assert report.mean_shift == 0.0 and report.var_shift == 0.0


def test_report_shifts_and_table() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4))
    old_mean = torch.tensor([0.5, -1.0, 2.0, 0.0])
    old_var = torch.tensor([1.0, 4.0, 0.5, 2.0])
    model[1].running_mean.copy_(old_mean)
    model[1].running_var.copy_(old_var)
    batches = make_batches((5,), [16, 16])
    report = recompute_bn_stats(model, batches, num_batches=2)
    new_mean, new_var = model[1].running_mean.double(), model[1].running_var.double()
    eps = model[1].eps
    expected_mean_shift = ((new_mean - old_mean).abs() / (new_var + eps).sqrt()).mean()
    expected_var_shift = ((old_var - new_var).abs() / (new_var + eps)).mean()
    (layer,) = report.layers
    assert layer.count == 32 and layer.domain is None
    assert layer.mean_shift == pytest.approx(float(expected_mean_shift), rel=1e-6)
    assert layer.var_shift == pytest.approx(float(expected_var_shift), rel=1e-6)
    assert report.mean_shift == layer.mean_shift and report.var_shift == layer.var_shift
    table = str(report)
    assert "mean shift" in table and "var shift" in table
    assert f"{layer.mean_shift:.4g}" in table and "asked for 2" in table
    again = recompute_bn_stats(model, batches, num_batches=2)  # same data: nothing to fix
    assert again.mean_shift < 1e-6 and again.var_shift < 1e-6


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"model": "net"}, TypeError, "`model`"),
        ({"batches": 3}, TypeError, "`batches`"),
        ({"num_batches": 2.5}, TypeError, "`num_batches`"),
        ({"num_batches": True}, TypeError, "`num_batches`"),
        ({"num_batches": 0}, ValueError, "`num_batches` must be >= 1, got 0"),
        ({"forward_fn": "model"}, TypeError, "`forward_fn`"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type[Exception], match: str) -> None:
    args: dict[str, Any] = {"model": mlp(), "batches": [torch.randn(4, 5)], **kwargs}
    with pytest.raises(error, match=match):
        recompute_bn_stats(**args)


def renorm_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        BatchRenorm2d(4, r_max=1.5, d_max=0.5, warmup_steps=10),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 5, 6),
        BatchRenorm1d(6, r_max=1.2, d_max=0.2, warmup_steps=0),
    )
    for bn in (model[1], model[5]):  # running stats far off, so r and d clip and matter
        bn.running_mean.fill_(0.5)
        bn.running_var.fill_(4.0)
        bn.num_batches_tracked.fill_(3)
    return model


def test_batch_renorm_exact_stats_and_step_counter_kept() -> None:
    model = renorm_model()
    batches = make_batches((3, 6, 5), [16, 16, 5])
    captured = reference_inputs(model, batches)
    before = snapshot(model)
    report = recompute_bn_stats(model, batches, num_batches=3)
    assert [layer.name for layer in report.layers] == ["1", "5"]
    for name, bn in bn_layers(model).items():
        mean, var = exact_stats([x for x, _ in captured[name]])
        assert_close_to(bn.running_mean, mean)
        assert_close_to(bn.running_var, var)
        assert int(bn.num_batches_tracked) == 3  # the warm-up step counter is not advanced
    assert snapshot(model)["momentum"] == before["momentum"]


class DomainNet(nn.Module):
    """Domain ids reach the layers three ways: keyword, positional and the context manager."""

    def __init__(self, num_domains: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = DomainBatchNorm2d(4, num_domains)
        self.bn2 = DomainBatchNorm2d(4, num_domains, shared_affine=True)
        self.fc = nn.Linear(4, 5)
        self.bn3 = DomainBatchNorm1d(5, num_domains)

    def forward(self, x: Tensor, ids: Tensor) -> Tensor:
        h = torch.relu(self.bn1(self.conv(x), domain=ids))
        h = self.bn2(h, ids.flip(0))  # positional, and not the ids the context sets
        return self.bn3(self.fc(h.mean((2, 3))))  # ids from `domain(...)`


def domain_forward(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Any:
    x, ids = batch
    with domain(model, ids):
        return model(x, ids)


def domain_batches(sizes: list[int], domains: list[int], seed: int) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed + 100)
    choices = torch.tensor(domains)
    out = []
    for x in make_batches((3, 6, 5), sizes, seed):
        ids = choices[torch.randint(len(domains), (len(x),), generator=g)]
        x = x + ids.view(-1, 1, 1, 1).float() * 2.0  # domains differ in their statistics
        out.append((x, ids))
    return out


def exact_domain_stats(
    captured: list[tuple[Tensor, Tensor | None]],
) -> dict[int, tuple[Tensor, Tensor]]:
    xs = torch.cat([x for x, _ in captured])
    ids = torch.cat([ids for _, ids in captured if ids is not None])
    return {int(d): exact_stats([xs[ids == d]]) for d in ids.unique()}


def test_domain_batchnorm_exact_stats_per_domain() -> None:
    torch.manual_seed(0)
    model = DomainNet(num_domains=3)
    for bn in (model.bn1, model.bn2, model.bn3):
        bn.running_mean[2].fill_(7.0)  # domain 2 never appears: must stay as it is
        bn.running_var[2].fill_(3.0)
        bn.num_batches_tracked.copy_(torch.tensor([4, 5, 6]))
    batches = domain_batches([16, 16, 9], [0, 1], seed=0)
    captured = reference_inputs(model, batches, domain_forward)
    report = recompute_bn_stats(model, batches, num_batches=3, forward_fn=domain_forward)
    for name in ("bn1", "bn2", "bn3"):
        bn = getattr(model, name)
        for d, (mean, var) in exact_domain_stats(captured[name]).items():
            assert_close_to(bn.running_mean[d], mean)
            assert_close_to(bn.running_var[d], var)
        assert torch.equal(bn.running_mean[2], torch.full((bn.num_features,), 7.0))
        assert torch.equal(bn.running_var[2], torch.full((bn.num_features,), 3.0))
        assert bn.num_batches_tracked.tolist() == [4, 5, 6]
    rows = [(layer.name, layer.domain) for layer in report.layers]
    assert rows == [(n, d) for n in ("bn1", "bn2", "bn3") for d in (0, 1)]
    assert report.unseen == ["bn1[domain=2]", "bn2[domain=2]", "bn3[domain=2]"]
    ids = torch.cat([ids for _, ids in batches])
    counts = {(layer.name, layer.domain): layer.count for layer in report.layers}
    assert counts[("bn1", 0)] == int((ids == 0).sum()) * 6 * 5
    assert counts[("bn3", 1)] == int((ids == 1).sum())
    assert "bn2" in str(report)


def test_domain_batchnorm_without_ids_raises_and_restores() -> None:
    model = nn.Sequential(nn.Linear(3, 4), DomainBatchNorm1d(4, num_domains=2))
    before = snapshot(model)
    with pytest.raises(ValueError, match="DomainBatchNorm1d"):
        recompute_bn_stats(model, [torch.randn(8, 3)])
    after = snapshot(model)
    assert all(torch.equal(v, after["state"][k]) for k, v in before["state"].items())
    assert after["momentum"] == before["momentum"] and after["training"] == before["training"]


# --- DDP: every rank recomputes over its own shard ---------------------------------------------

DDP_SIZES = {"uneven": ([8, 8, 5], [6, 6, 6, 6, 3]), "empty-rank": ([7, 9], [])}
DDP_DOMAINS = ([0, 1], [1, 2])  # domain 0 only on rank 0, domain 2 only on rank 1, 3 nowhere


class DDPNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = conv2d(nn.BatchNorm2d).append(SubclassBN2d(5))
        self.domain_bn = DomainBatchNorm2d(5, num_domains=4)

    def forward(self, x: Tensor) -> Tensor:
        return self.domain_bn(self.body(x))


def ddp_batches(scenario: str, rank: int) -> list[tuple[Tensor, Tensor]]:
    return domain_batches(DDP_SIZES[scenario][rank], DDP_DOMAINS[rank], seed=rank + 1)


def ddp_forward(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Any:
    x, ids = batch
    with domain(model, ids):
        return model(x)


def _ddp_recompute(rank: int, world_size: int, scenario: str) -> dict[str, Tensor]:
    model = DDPNet()
    recompute_bn_stats(model, ddp_batches(scenario, rank), num_batches=5, forward_fn=ddp_forward)
    return {k: v for k, v in model.state_dict().items() if "running" in k}


@pytest.mark.ddp
@pytest.mark.parametrize("scenario", sorted(DDP_SIZES))
def test_ddp_ranks_agree_with_single_process(scenario: str) -> None:
    rank0, rank1 = run_ddp(_ddp_recompute, scenario)
    single = DDPNet()
    all_batches = ddp_batches(scenario, 0) + ddp_batches(scenario, 1)
    captured = reference_inputs(single, all_batches, ddp_forward)
    recompute_bn_stats(single, all_batches, num_batches=len(all_batches), forward_fn=ddp_forward)
    for key, value in single.state_dict().items():
        if "running" not in key:
            continue
        assert torch.equal(rank0[key], rank1[key]), key
        torch.testing.assert_close(rank0[key], value, rtol=1e-6, atol=1e-6)
    for name, bn in bn_layers(single).items():
        if name == "domain_bn":
            stats = exact_domain_stats(captured[name])
            assert sorted(stats) == ([0, 1, 2] if scenario == "uneven" else [0, 1])
            for d, (mean, var) in stats.items():
                assert_close_to(rank0["domain_bn.running_mean"][d], mean)
                assert_close_to(rank0["domain_bn.running_var"][d], var)
            assert torch.equal(rank0["domain_bn.running_var"][3], torch.ones(5))  # never seen
            continue
        mean, var = exact_stats([x for x, _ in captured[name]])
        assert_close_to(rank0[f"{name}.running_mean"], mean)
        assert_close_to(rank0[f"{name}.running_var"], var)
        assert_close_to(bn.running_var, var)


def test_warnings_point_at_the_caller() -> None:
    model = nn.Sequential(nn.Linear(3, 3))
    with pytest.warns(UserWarning, match="no BatchNorm layer") as record:
        recompute_bn_stats(model, [torch.randn(4, 3)])
    assert record[0].filename == __file__


# --- num_samples --------------------------------------------------------------------------------


class CountingIterator:
    """An iterator over ``batches`` that counts how many were taken from it."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches = batches
        self.taken = 0

    def __iter__(self) -> CountingIterator:
        return self

    def __next__(self) -> Any:
        if self.taken == len(self.batches):
            raise StopIteration
        self.taken += 1
        return self.batches[self.taken - 1]


@pytest.mark.parametrize(("num_samples", "used"), [(1, 1), (8, 1), (9, 2), (16, 2), (20, 3)])
def test_num_samples_stops_after_the_crossing_batch(num_samples: int, used: int) -> None:
    torch.manual_seed(0)
    model = mlp()
    xs = make_batches((5,), [8, 8, 8, 8, 5])
    captured = reference_inputs(model, xs[:used])
    source = CountingIterator([(x, torch.zeros(len(x))) for x in xs])
    report = recompute_bn_stats(model, source, num_samples=num_samples)
    assert source.taken == used  # nothing drawn past the batch that crossed the cap
    assert report.num_batches == used and report.num_samples == 8 * used
    assert report.num_samples_requested == num_samples and report.num_batches_requested is None
    for name, layer in bn_layers(model).items():
        mean, var = exact_stats([x for x, _ in captured[name]])
        assert_close_to(layer.running_mean, mean)
        assert_close_to(layer.running_var, var)
    assert f"asked for {num_samples} samples" in str(report)


def test_num_samples_counts_dict_batches_and_endless_iterators() -> None:
    torch.manual_seed(0)
    model = mlp()
    xs = make_batches((5,), [6, 4])
    captured = reference_inputs(model, xs + xs)
    batches = itertools.cycle([{"meta": "x", "x": x} for x in xs])
    report = recompute_bn_stats(model, batches, forward_fn=lambda m, b: m(b["x"]), num_samples=17)
    assert (report.num_batches, report.num_samples) == (4, 20)
    mean, var = exact_stats([x for x, _ in captured["5"]])
    assert_close_to(model[5].running_mean, mean)
    assert_close_to(model[5].running_var, var)


def test_num_samples_short_loader_warns_with_both_numbers() -> None:
    torch.manual_seed(0)
    model = mlp()
    xs = make_batches((5,), [8, 8, 5])
    captured = reference_inputs(model, xs)
    with pytest.warns(UserWarning, match=r"got 21 sample\(s\) in 3 batch\(es\), asked for 100"):
        report = recompute_bn_stats(model, xs, num_samples=100)
    assert report.num_samples == 21
    mean, var = exact_stats([x for x, _ in captured["1"]])
    assert_close_to(model[1].running_var, var)
    assert_close_to(model[1].running_mean, mean)


def test_num_samples_needs_readable_batch_sizes_and_restores() -> None:
    model = mlp()
    before = snapshot(model)
    with pytest.raises(TypeError, match="`num_samples`"):
        recompute_bn_stats(model, ["not a tensor"], forward_fn=lambda m, b: None, num_samples=4)
    after = snapshot(model)
    assert all(torch.equal(v, after["state"][k]) for k, v in before["state"].items())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_samples": 0}, ValueError, "`num_samples` must be >= 1, got 0"),
        ({"num_samples": 2.0}, TypeError, "`num_samples`"),
        ({"num_samples": 4, "num_batches": 3}, ValueError, "`num_batches` or `num_samples`"),
        ({"num_samples": 4, "num_batches": 200}, ValueError, "not both"),  # explicit 200 too
        ({"domain": True}, TypeError, "`domain`"),
        ({"domain": -1}, ValueError, "`domain` must be >= 0"),
        ({"domain": 0}, ValueError, "no DomainBatchNorm"),
    ],
)
def test_bad_num_samples_and_domain(kwargs: dict, error: type[Exception], match: str) -> None:
    model = mlp()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        recompute_bn_stats(model, [torch.randn(4, 5)], **kwargs)
    after = snapshot(model)
    assert all(torch.equal(v, after["state"][k]) for k, v in before["state"].items())


# --- domain=k (AdaBN) ---------------------------------------------------------------------------


class AdaNet(nn.Module):
    """Plain BN (shared) upstream of per-domain layers; ids passed explicitly and by context."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.plain = nn.BatchNorm2d(4)
        self.dbn = DomainBatchNorm2d(4, num_domains=3)
        self.fc = nn.Linear(4, 5)
        self.dbn1d = DomainBatchNorm1d(5, num_domains=3)
        with torch.no_grad():  # trained-looking buffers, far from the data
            self.plain.running_mean.uniform_(-1.0, 1.0)
            self.plain.running_var.uniform_(0.5, 2.0)
            for bn in (self.dbn, self.dbn1d):
                bn.running_mean.uniform_(-1.0, 1.0)
                bn.running_var.uniform_(0.5, 2.0)
                bn.num_batches_tracked.copy_(torch.tensor([3, 4, 5]))

    def forward(self, x: Tensor, ids: Tensor) -> Tensor:
        h = torch.relu(self.dbn(self.plain(self.conv(x)), domain=ids))
        with domain(self, ids):
            return self.dbn1d(self.fc(h.mean((2, 3))))


def adabn_reference(model: AdaNet, batches: list[tuple[Tensor, Tensor]], k: int) -> dict:
    """Exact float64 statistics of what each domain layer sees at inference on domain ``k``.

    A copy runs every batch with all ids set to ``k``: plain BN in eval mode (its running
    statistics, as at inference), the domain layers in train mode (batch statistics).
    """
    ref = copy.deepcopy(model).eval()
    inputs: dict[str, list[Tensor]] = {"dbn": [], "dbn1d": []}
    for name in inputs:
        layer = getattr(ref, name)
        layer.train()
        layer.momentum = 0.0
        layer.register_forward_pre_hook(
            lambda m, args, name=name: inputs[name].append(args[0].double())
        )
    with torch.no_grad():
        for x, ids in batches:
            ref(x, torch.full_like(ids, k))
    return {name: exact_stats(xs) for name, xs in inputs.items()}


def test_domain_k_recomputes_only_that_domain_exactly() -> None:
    model = AdaNet()
    before = copy.deepcopy(model.state_dict())
    batches = domain_batches([16, 16, 9], [0, 1], seed=3)  # ids 0/1 in the batches: ignored
    expected = adabn_reference(model, batches, k=2)
    report = recompute_bn_stats(model, batches, 3, lambda m, b: m(*b), domain=2)
    for name in ("dbn", "dbn1d"):
        mean, var = expected[name]
        layer = getattr(model, name)
        assert_close_to(layer.running_mean[2], mean)
        assert_close_to(layer.running_var[2], var)
        for key in ("running_mean", "running_var"):  # domains 0 and 1 untouched, bit for bit
            assert torch.equal(getattr(layer, key)[:2], before[f"{name}.{key}"][:2])
        assert layer.num_batches_tracked.tolist() == [3, 4, 5]
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(model.plain, key), before[f"plain.{key}"])
    assert [(layer.name, layer.domain) for layer in report.layers] == [("dbn", 2), ("dbn1d", 2)]
    assert report.layers[0].count == 41 * 6 * 5 and report.layers[1].count == 41
    assert model.training and all(m.momentum == 0.1 for m in (model.plain, model.dbn))


def test_domain_k_out_of_range_names_the_layer_and_changes_nothing() -> None:
    model = nn.Sequential(DomainBatchNorm1d(3, num_domains=4), DomainBatchNorm1d(3, num_domains=2))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"`domain=2`.*layer 1 .*num_domains=2"):
        recompute_bn_stats(model, [torch.randn(4, 3)], domain=2)
    after = snapshot(model)
    assert all(torch.equal(v, after["state"][k]) for k, v in before["state"].items())


# --- forward errors and is_recomputing ----------------------------------------------------------


class TwoInputNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x: Tensor, scale: Tensor) -> Tensor:
        return self.bn(x * scale)


def test_default_forward_on_a_two_input_model_names_forward_fn() -> None:
    model = TwoInputNet()
    before = snapshot(model)
    batches = [(torch.randn(4, 3), torch.ones(4, 1))]
    with pytest.raises(TypeError, match=r"`forward_fn\(model, batch\)`.*precise_bn_forward"):
        recompute_bn_stats(model, batches)
    after = snapshot(model)
    assert all(torch.equal(v, after["state"][k]) for k, v in before["state"].items())
    recompute_bn_stats(model, batches, num_batches=1, forward_fn=lambda m, b: m(*b))
    assert_close_to(model.bn.running_mean, batches[0][0].double().mean(0))


def test_type_error_inside_a_one_input_forward_is_not_rewritten() -> None:
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x: Tensor) -> Tensor:
            return self.bn(x) + "oops"  # type: ignore[operator]

    with pytest.raises(TypeError) as info:
        recompute_bn_stats(Broken(), [torch.randn(4, 3)])
    assert "forward_fn" not in str(info.value)


def test_is_recomputing_during_every_forward_of_the_pass_and_after_errors() -> None:
    from lightning_norms.stats import is_recomputing

    model = mlp()
    flags: list[bool] = []
    model[1].register_forward_pre_hook(lambda m, a: flags.append(is_recomputing()))
    recompute_bn_stats(model, make_batches((5,), [4, 4, 4]), num_batches=3)
    assert flags == [True, True, True] and not is_recomputing()
    model(torch.randn(4, 5))  # an ordinary training call afterwards
    assert flags[-1] is False

    def failing(m: nn.Module, batch: Tensor) -> Tensor:
        if len(flags) == 6:
            raise RuntimeError("boom")
        return m(batch)

    with pytest.raises(RuntimeError, match="boom"):
        recompute_bn_stats(model, make_batches((5,), [4, 4, 4]), forward_fn=failing)
    assert flags[4:] == [True, True] and not is_recomputing()


# --- issue 17 item 7: DDP with uneven batch counts and synced layers ---------------------------


class SyncedNet(nn.Module):
    """Every kind of synced layer: ours (plain, per domain, renorm) and torch's SyncBatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.plain = SyncedBatchNorm2d(5)
        self.domains = DomainBatchNorm2d(5, num_domains=2, sync=True)
        self.renorm = BatchRenorm2d(5, sync=True)
        self.torch_sync = nn.SyncBatchNorm(5)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.plain(self.conv(x)))
        return self.torch_sync(self.renorm(self.domains(h)))


UNEVEN = ([6, 6, 6, 5], [6, 6, 4])  # rank 0 holds 4 batches, rank 1 holds 3


def synced_batches(rank: int) -> list[tuple[Tensor, Tensor]]:
    return domain_batches(UNEVEN[rank], [0, 1], seed=rank + 7)


def _synced_recompute(rank: int, world_size: int) -> dict[str, Any]:
    model = SyncedNet()
    recompute_bn_stats(model, synced_batches(rank), num_batches=10, forward_fn=ddp_forward)
    return {
        "buffers": {k: v for k, v in model.state_dict().items() if "running" in k},
        "sync": (model.plain.sync, model.domains.sync, model.renorm.sync),
        "torch_forward_restored": "forward" not in model.torch_sync.__dict__,
    }


@pytest.mark.ddp
def test_ddp_uneven_batch_counts_with_synced_layers_match_one_process() -> None:
    rank0, rank1 = run_ddp(_synced_recompute)
    single = SyncedNet()
    all_batches = synced_batches(0) + synced_batches(1)
    captured = reference_inputs(single, all_batches, ddp_forward)
    for key, value in rank0["buffers"].items():
        assert torch.equal(value, rank1["buffers"][key]), key  # identical on every rank
    for name in ("plain", "renorm", "torch_sync"):
        mean, var = exact_stats([x for x, _ in captured[name]])
        assert_close_to(rank0["buffers"][f"{name}.running_mean"], mean)
        assert_close_to(rank0["buffers"][f"{name}.running_var"], var)
    for d, (mean, var) in exact_domain_stats(captured["domains"]).items():
        assert_close_to(rank0["buffers"]["domains.running_mean"][d], mean)
        assert_close_to(rank0["buffers"]["domains.running_var"][d], var)
    for rank in (rank0, rank1):
        assert rank["sync"] == (True, True, True) and rank["torch_forward_restored"]


# --- issue 18: include / exclude / skip_eval_layers / device / progress ------------------------


def two_bn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 1), nn.BatchNorm2d(5)
    )


@pytest.mark.parametrize(
    "kwargs",
    [{"exclude": "1"}, {"include": ["4"]}, {"include": "*", "exclude": ["1"]}, "skip-eval"],
)
def test_left_out_layers_keep_buffers_and_run_as_at_inference(kwargs: Any) -> None:
    model = two_bn()
    model[1].running_mean.fill_(1.5)
    model[1].running_var.fill_(4.0)
    if kwargs == "skip-eval":
        model[1].eval()
        kwargs = {"skip_eval_layers": True}
    before = {k: v.clone() for k, v in model[1].state_dict().items()}
    batches = make_batches((3, 6, 5), [8, 8, 6])
    ref = copy.deepcopy(model).eval()
    inputs = [ref[3](ref[2](ref[1](ref[0](x)))).double() for x in batches]  # model[1] in eval
    report = recompute_bn_stats(model, batches, num_batches=3, **kwargs)
    assert [layer.name for layer in report.layers] == ["4"]
    for key, value in model[1].state_dict().items():
        assert torch.equal(value, before[key]), key
    mean, var = exact_stats(inputs)
    assert_close_to(model[4].running_mean, mean)
    assert_close_to(model[4].running_var, var)
    assert model[1].training == (kwargs != {"skip_eval_layers": True})


def test_a_selection_that_leaves_nothing_warns_and_changes_nothing() -> None:
    model = two_bn()
    before = copy.deepcopy(model.state_dict())
    with pytest.warns(UserWarning, match="leave no BN layer"):
        report = recompute_bn_stats(model, make_batches((3, 6, 5), [8]), include="head*")
    assert len(report) == 0
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"include": 3}, "`include`"),
        ({"exclude": [""]}, "`exclude`"),
        ({"skip_eval_layers": 1}, "`skip_eval_layers`"),
        ({"device": 0}, "`device`"),
    ],
)
def test_bad_selection_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        recompute_bn_stats(two_bn(), make_batches((3, 6, 5), [8]), **kwargs)


def test_device_moves_tensors_in_tuples_lists_and_dicts() -> None:
    seen: list[Any] = []

    def forward(model: nn.Module, batch: Any) -> None:
        seen.append(batch)

    batch = {"x": torch.ones(2, 3), "pair": (torch.zeros(2), [torch.ones(1)]), "tag": "a"}
    with pytest.warns(UserWarning, match="fewer than two values"):
        recompute_bn_stats(two_bn(), [batch], num_batches=1, forward_fn=forward, device="meta")
    (moved,) = seen
    assert moved["x"].device.type == "meta" and moved["tag"] == "a"
    assert moved["pair"][0].device.type == "meta" and moved["pair"][1][0].device.type == "meta"
    assert batch["x"].device.type == "cpu"  # the caller's batch is left alone


def test_progress_plain_counter_without_rich(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(__import__("sys").modules, "rich.progress", None)  # not installed
    recompute_bn_stats(two_bn(), make_batches((3, 6, 5), [8, 8, 8]), num_batches=3, progress=True)
    err = capsys.readouterr().err
    assert "recompute_bn_stats: 1/3 batches" in err and "recompute_bn_stats: 3/3 batches" in err


def test_progress_rich_bar_and_hidden_when_not_a_terminal(
    capsys: pytest.CaptureFixture[str],
) -> None:
    recompute_bn_stats(two_bn(), make_batches((3, 6, 5), [8, 8]), num_batches=2, progress=None)
    assert capsys.readouterr().err == ""  # stderr is not a terminal under pytest
    recompute_bn_stats(two_bn(), make_batches((3, 6, 5), [8, 8]), num_batches=2, progress=False)
    assert capsys.readouterr().err == ""
    from rich.progress import Progress

    advanced: list[int] = []
    original = Progress.advance
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            Progress, "advance", lambda bar, task, n=1: advanced.append(n) or original(bar, task, n)
        )
        recompute_bn_stats(two_bn(), make_batches((3, 6, 5), [8, 8]), num_batches=2, progress=True)
    assert advanced == [1, 1]


# --- issue 17 item 13: a dict batch without forward_fn -----------------------------------------


def test_dict_batch_without_forward_fn_names_the_fix_before_any_buffer_changes() -> None:
    model = two_bn()
    before = copy.deepcopy(model.state_dict())
    calls: list[str] = []
    for bn in (model[1], model[4]):
        bn.register_forward_pre_hook(lambda m, a: calls.append("bn"))
    batches = [{"image": x, "label": torch.zeros(len(x))} for x in make_batches((3, 6, 5), [8])]
    with pytest.raises(TypeError, match=r"forward_fn.*precise_bn_forward"):
        recompute_bn_stats(model, batches)
    assert calls == []
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


# --- issue 18: the report counts layers ----------------------------------------------------------


def test_report_counts_a_domain_layer_once_with_a_row_per_domain() -> None:
    model = DomainNet(num_domains=2)
    batches = domain_batches([16, 16], [0, 1], seed=0)
    report = recompute_bn_stats(model, batches, num_batches=2, forward_fn=domain_forward)
    assert len(report.layers) == 6 and report.num_layers == len(report) == 3
    assert "for 3 layer(s) over 2 batch(es)" in str(report)
    mean = max(layer.mean_shift for layer in report.layers)
    assert report.summary() == (
        f"PreciseBN: recomputed 3 BN layer(s) from 2 batch(es), 32 sample(s); largest shift: "
        f"mean {mean:.3g}, var {max(layer.var_shift for layer in report.layers):.3g}"
    )


# --- issue 21 item 4: no host read per batch in the read-back of DomainBatchNorm --------------


@pytest.mark.parametrize("ids", ["tensor", "int"])
def test_read_back_adds_no_host_read_per_batch(ids: str) -> None:
    """The pass's host reads grow per batch exactly as the layers' own forwards' do."""
    model = DomainNet(num_domains=2)
    xs = make_batches((3, 6, 5), [8] * 6, seed=1)
    many = [(x, torch.tensor(1) if ids == "int" else torch.arange(8) % 2) for x in xs]

    def forwards(n: int) -> Callable[[], None]:
        def run() -> None:
            ref = copy.deepcopy(model).train()
            with torch.no_grad():
                for batch in many[:n]:
                    domain_forward(ref, batch)

        return run

    def recompute(n: int) -> Callable[[], None]:
        return lambda: recompute_bn_stats(
            copy.deepcopy(model), many[:n], num_batches=n, forward_fn=domain_forward
        )

    assert recompute_bn_stats(model, many[:1], forward_fn=domain_forward).layers  # read-back
    per_batch_forward = (host_reads(forwards(6)) - host_reads(forwards(2))) / 4
    per_batch_pass = (host_reads(recompute(6)) - host_reads(recompute(2))) / 4
    assert per_batch_pass == per_batch_forward


class RareNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.bn1 = nn.Linear(4, 5), DomainBatchNorm1d(5, 2)
        self.fc2, self.bn2 = nn.Linear(5, 3), DomainBatchNorm1d(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn2(self.fc2(self.bn1(self.fc1(x))))


def test_a_one_value_domain_counts_exactly_and_is_normalised_with_running_stats() -> None:
    """The rare-domain rule: one sample of a domain in a batch (1 value per channel)."""
    model = RareNet()
    for bn in (model.bn1, model.bn2):
        bn.running_mean.fill_(0.5)
        bn.running_var.fill_(2.0)
    g = torch.Generator().manual_seed(3)
    ids = [torch.tensor([0, 1, 1, 1, 1, 1]), torch.tensor([0, 0, 1, 1, 0, 1, 0])]
    ids.append(torch.tensor([1, 1, 0, 1, 1, 1, 1, 1]))
    batches = [(torch.randn(len(i), 4, generator=g) * 3 + i[:, None], i) for i in ids]
    captured = reference_inputs(model, batches, ddp_forward)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the layer's own rare-domain warning
        report = recompute_bn_stats(model, batches, num_batches=3, forward_fn=ddp_forward)
    assert sorted(layer.count for layer in report.layers) == [6, 6, 15, 15]
    for name in ("bn1", "bn2"):
        bn = getattr(model, name)
        for d, (mean, var) in exact_domain_stats(captured[name]).items():
            assert_close_to(bn.running_mean[d], mean)
            assert_close_to(bn.running_var[d], var)


# --- one int check for the package (lightning_norms._shared.check_int) --------------------------
def _non_int_calls() -> dict[str, Any]:
    """One call per module that takes an int argument, each given a float instead."""
    from lightning_norms import DomainBatchNorm2d, create_norm
    from lightning_norms.callbacks import BatchNormDoctor, FreezeBatchNorm, PreciseBN
    from lightning_norms.data import MixingBatchSampler

    return {
        "DomainBatchNorm2d": lambda: DomainBatchNorm2d(4, num_domains=1.5),
        "create_norm": lambda: create_norm("group", 4, num_groups=2.0),
        "recompute_bn_stats": lambda: recompute_bn_stats(mlp(), [torch.randn(4, 5)], 2.5),
        "MixingBatchSampler": lambda: MixingBatchSampler([8, 8], batch_size=4.0),
        "PreciseBN": lambda: PreciseBN(num_batches=2.5),
        "FreezeBatchNorm": lambda: FreezeBatchNorm(until_epoch=1.5),
        "BatchNormDoctor": lambda: BatchNormDoctor(min_batches=2.5),
    }


@pytest.mark.parametrize("where", list(_non_int_calls()))
def test_a_non_int_argument_raises_the_same_error_everywhere(where: str) -> None:
    """A float where an int is expected is a ``TypeError`` in every module (and a ``ValueError``,
    as some modules raised before), with a message naming the argument and the value."""
    with pytest.raises(TypeError, match=r"` must be an int, got (1\.5|2\.0|2\.5|4\.0)") as error:
        _non_int_calls()[where]()
    assert isinstance(error.value, ValueError)


@pytest.mark.parametrize("value", [True, 0, -1])
def test_check_int_refuses_bools_and_values_below_the_minimum(value: Any) -> None:
    import numpy as np

    from lightning_norms._shared import IntTypeError, check_int

    error = IntTypeError if isinstance(value, bool) else ValueError
    with pytest.raises(error, match=rf"^sampler: `seed` must be (an int|>= 1), got {value}$"):
        check_int("seed", value, 1, where="sampler")
    assert check_int("seed", 1, 1) == 1
    assert type(check_int("seed", np.int64(3), 1)) is int  # numpy integers become ints


def test_plain_layers_keep_their_own_buffer_objects_across_chunks_and_errors() -> None:
    """Plain BN layers write each batch's statistics into a slot table during the pass (their
    buffers point at its rows); afterwards, and after a failing batch, they hold their own
    tensors again, with the exact statistics over more batches than one table holds."""
    torch.manual_seed(12)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    bn = model[1]
    mean, var = bn.running_mean, bn.running_var
    batches = [torch.randn(3, 3, 5, 5) * 2 + 1 for _ in range(70)]  # more than one table of 64
    recompute_bn_stats(model, batches, num_batches=70)
    assert bn.running_mean is mean and bn.running_var is var
    with torch.no_grad():
        feats = torch.cat([model[0](b) for b in batches]).double().transpose(0, 1).flatten(1)
    torch.testing.assert_close(mean.double(), feats.mean(1), atol=1e-6, rtol=0)
    torch.testing.assert_close(var.double(), feats.var(1), atol=1e-5, rtol=1e-6)
    before = (mean.clone(), var.clone())

    def failing() -> Iterator[Tensor]:
        yield batches[0]
        yield torch.randn(3, 5, 5, 5)  # wrong channels: the conv raises mid-pass

    with pytest.raises(RuntimeError):
        recompute_bn_stats(model, failing(), num_batches=2)
    assert bn.running_mean is mean and bn.running_var is var
    assert torch.equal(mean, before[0]) and torch.equal(var, before[1])
