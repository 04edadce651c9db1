"""Synchronised batch statistics on CPU: 2 real gloo ranks on per-rank halves vs one process.

One spawn runs every case (spawning is the slow part); each test checks one case against a
single process seeing the whole batch (outputs, input gradients, summed parameter gradients,
running statistics identical on both ranks).
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_norms import BatchRenorm1d, BatchRenorm2d, DomainBatchNorm1d, DomainBatchNorm2d
from lightning_norms.distributed import (
    SyncedBatchNorm1d,
    SyncedBatchNorm2d,
    all_reduce_sum,
    is_sync_active,
)
from tests._dist import run_ddp
from tests._layers import randomise, snapshot_buffers, uniform

pytestmark = pytest.mark.ddp

ATOL = 1e-5
STEPS = 2
STATE = {
    "weight": uniform(-1, 1),
    "bias": uniform(-1, 1),
    "running_mean": uniform(-1, 1),
    "running_var": uniform(0.5, 1.5),
}


class _Net(nn.Module):
    """Conv + DomainBatchNorm2d, the domain passed through ``forward``."""

    def __init__(self, sync: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = DomainBatchNorm2d(4, num_domains=2, sync=sync)

    def forward(self, x: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x), domain=domain)


def _build(case: str, sync: bool) -> tuple[nn.Module, list[dict[str, Any]]]:
    """The layer and, per step, the whole batch ``x``, ``grad``, ``domain`` and the split."""
    torch.manual_seed(0)
    if case == "domain2d":
        layer = DomainBatchNorm2d(4, num_domains=3, sync=sync)
        # domain 2 only in rank 0's half; domain 0 and 1 on both ranks
        ids = [torch.tensor([0, 2, 1, 2, 0, 1, 1, 0]), torch.tensor([2, 2, 1, 0, 1, 1, 0, 0])]
        shape = (8, 4, 5, 5)
    elif case == "domain_int":
        layer = DomainBatchNorm2d(3, num_domains=2, sync=sync)
        ids = [torch.tensor([0] * 3 + [1] * 3)] * STEPS  # rank r: int domain r
        shape = (6, 3, 4, 4)
    elif case == "domain1d_one_each":
        layer = DomainBatchNorm1d(3, num_domains=2, momentum=None, sync=sync)
        ids = [torch.tensor([0, 1, 0, 1])] * STEPS  # local count 1 per domain, global 2
        shape = (4, 3)
    elif case == "renorm2d":
        layer = BatchRenorm2d(4, warmup_steps=0, r_max=1.5, d_max=0.5, sync=sync)
        ids = [None] * STEPS
        shape = (8, 4, 3, 3)
    elif case == "renorm1d_one_each":
        layer = BatchRenorm1d(3, warmup_steps=0, sync=sync)
        ids = [None] * STEPS
        shape = (2, 3)
    elif case == "synced_bn":
        layer = SyncedBatchNorm2d(4, momentum=None, sync=sync)
        ids = [None] * STEPS
        shape = (8, 4, 3, 3)
    else:
        raise AssertionError(case)
    randomise(layer, STATE, seed=1)
    steps = []
    for step in range(STEPS):
        steps.append(
            {
                "x": torch.randn(shape) * (1 + step) + 3,
                "grad": torch.randn(shape),
                "domain": ids[step],
            }
        )
    return layer, steps


def _domain_arg(case: str, ids: torch.Tensor | None, rank: int | None) -> Any:
    if ids is None:
        return None
    if case == "domain_int" and rank is not None:
        return rank
    return ids


def _run(layer: nn.Module, steps: list[dict[str, Any]], case: str, rank: int | None) -> dict:
    """Forward/backward every step on the rank's half (or the whole batch if rank is None)."""
    out: dict[str, list] = {"y": [], "x_grad": [], "w_grad": [], "b_grad": []}
    for step in steps:
        x, grad, ids = step["x"], step["grad"], step["domain"]
        if rank is not None:
            half = x.shape[0] // 2
            part = slice(rank * half, (rank + 1) * half)
            x, grad = x[part], grad[part]
            ids = None if ids is None else ids[part]
        x = x.clone().requires_grad_()
        layer.zero_grad()
        kwargs = {} if ids is None else {"domain": _domain_arg(case, ids, rank)}
        y = layer(x, **kwargs)
        y.backward(grad)
        out["y"].append(y.detach())
        out["x_grad"].append(x.grad)
        out["w_grad"].append(layer.weight.grad.clone())
        out["b_grad"].append(layer.bias.grad.clone())
    out["running_mean"] = layer.running_mean.clone()
    out["running_var"] = layer.running_var.clone()
    out["num_batches_tracked"] = layer.num_batches_tracked.clone()
    return out


CASES = ["domain2d", "domain_int", "domain1d_one_each", "renorm2d", "renorm1d_one_each"]
CASES += ["synced_bn"]


class _PenaltyNet(nn.Module):
    """Every synced layer with inplace ops after it, for a gradient penalty through them."""

    def __init__(self, sync: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1, dtype=torch.float64)
        self.dbn = DomainBatchNorm2d(3, num_domains=3, sync=sync, dtype=torch.float64)
        self.conv2 = nn.Conv2d(3, 3, 1, dtype=torch.float64)
        self.bn = SyncedBatchNorm2d(3, sync=sync, dtype=torch.float64)
        self.renorm = BatchRenorm2d(3, warmup_steps=0, sync=sync, dtype=torch.float64)
        with torch.no_grad():
            self.renorm.running_mean.fill_(0.3)  # r and d inside their limits: renormalising
            self.renorm.running_var.fill_(0.8)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        h = torch.relu_(self.dbn(self.conv1(x), domain=ids))
        out = self.bn(self.conv2(h))
        out += h
        return self.renorm(out)


def _penalty_step(
    x: torch.Tensor, ids: torch.Tensor, c: torch.Tensor, sync: bool
) -> dict[str, Any]:
    """WGAN-GP / R1: ``|d/dx sum(sin(f(x)) * c)|^2``, then its gradients."""
    torch.manual_seed(31)
    model = _PenaltyNet(sync)
    x = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad((model(x, ids).sin() * c).sum(), x, create_graph=True)
    grad.square().sum().backward()
    return {
        "x_grad": x.grad,
        "grads": {name: p.grad.clone() for name, p in model.named_parameters()},
        "buffers": snapshot_buffers(model),
    }


def _penalty_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input, domain ids (domain 2 only in rank 0's half), readout weights."""
    gen = torch.Generator().manual_seed(32)
    x = torch.randn(8, 2, 3, 3, generator=gen, dtype=torch.float64) * 2 + 1
    c = torch.randn(8, 3, 3, 3, generator=gen, dtype=torch.float64)
    return x, torch.tensor([0, 2, 1, 2, 0, 1, 1, 0]), c


def _empty_rank_cases(rank: int) -> dict[str, Any]:
    """Rank 1 holds no samples: it still joins the collectives; buffers follow rank 0's data."""
    torch.manual_seed(33)
    out: dict[str, Any] = {}
    x = torch.randn(4, 3, 2, 2) + 1
    ids = torch.tensor([0, 1, 1, 0])
    layers = {
        "domain": DomainBatchNorm2d(3, num_domains=2, sync=True),
        "synced_bn": SyncedBatchNorm2d(3, momentum=None),
    }
    for key, layer in layers.items():
        xr = (x if rank == 0 else x[:0]).clone().requires_grad_()
        kwargs = {"domain": ids if rank == 0 else ids[:0]} if key == "domain" else {}
        y = layer(xr, **kwargs)
        y.square().sum().backward()
        out[key] = {
            "y": y.detach(),
            "x_grad": xr.grad,
            "buffers": snapshot_buffers(layer),
        }
    # nothing anywhere: an all-empty global batch leaves every buffer
    layer = SyncedBatchNorm2d(3)
    layer(torch.randn(0, 3, 2, 2)).sum().backward()
    out["all_empty_untouched"] = layer.num_batches_tracked.item() == 0 and torch.equal(
        layer.running_var, torch.ones(3)
    )
    # BatchRenorm: an all-empty global batch is no step (its warm-up counter stays)
    renorm = BatchRenorm2d(3, sync=True)
    renorm(torch.randn(0, 3, 2, 2)).sum().backward()
    out["renorm_empty_buffers"] = snapshot_buffers(renorm)
    renorm1d = BatchRenorm1d(3, sync=True)
    try:
        renorm1d(torch.randn(1 - rank, 3))
        out["renorm_single_error"] = None
    except ValueError as err:
        out["renorm_single_error"] = str(err)
    out["renorm_single_buffers"] = snapshot_buffers(renorm1d)
    # one value per channel over all ranks: ValueError on both, every buffer as it was
    layer = SyncedBatchNorm1d(3)
    try:
        layer(torch.randn(1 - rank, 3))
        out["single_error"] = None
    except ValueError as err:
        out["single_error"] = str(err)
    out["single_buffers"] = snapshot_buffers(layer)
    return out


def _rare_domain_step(rank: int | None) -> dict[str, Any]:
    """Domain 1 has one sample of the global batch (on rank 1); ``rank=None``: whole batch."""
    torch.manual_seed(7)
    x, ids = torch.randn(4, 3) * 2 + 1, torch.tensor([0, 0, 0, 1])
    part = slice(None) if rank is None else slice(2 * rank, 2 * rank + 2)
    layer = DomainBatchNorm1d(3, num_domains=2, sync=True)
    randomise(layer, STATE, seed=8)
    xr = x[part].clone().requires_grad_()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = layer(xr, domain=ids[part])
    y.square().sum().backward()
    return {
        "y": y.detach(),
        "x_grad": xr.grad,
        "w_grad": layer.weight.grad,
        "buffers": snapshot_buffers(layer),
        "warnings": [str(w.message) for w in caught],
    }


def _func_step(rank: int) -> dict[str, Any]:
    """``torch.func.grad`` / ``vmap`` through synchronised layers, and autograd for reference."""
    torch.manual_seed(5)
    model = _Net(sync=True)
    x = torch.randn(8, 3, 4, 4)[rank * 4 : (rank + 1) * 4]
    ids = torch.tensor([0, 1, 1, 1, 0, 0, 1, 0])[rank * 4 : (rank + 1) * 4]
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = snapshot_buffers(model)

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        state = {**p, **{k: v.clone() for k, v in buffers.items()}}
        return torch.func.functional_call(model, state, (x, ids)).square().sum()

    grads = torch.func.grad(loss)(params)
    model(x, domain=ids).square().sum().backward()
    xb = torch.arange(6.0).view(3, 2) * (rank + 1)
    return {
        "grad": grads,
        "autograd": {k: p.grad for k, p in model.named_parameters()},
        "vmap_sum": torch.func.vmap(all_reduce_sum)(xb),
        "grad_sum": torch.func.grad(lambda t: (all_reduce_sum(t.square()) * (rank + 1)).sum())(
            torch.tensor([rank + 1.0])
        ),
    }


def _ddp_worker(rank: int, world_size: int) -> dict[str, Any]:
    torch.manual_seed(123)
    results: dict[str, Any] = {}
    for case in CASES:
        layer, steps = _build(case, sync=True)
        assert is_sync_active(layer)
        results[case] = _run(layer, steps, case, rank)

    # a domain whose global count is one value per channel: its running statistics on every
    # rank (issue 17.1), no hang; an int domain of one global value raises on every rank
    results["rare"] = _rare_domain_step(rank)
    layer = DomainBatchNorm1d(3, num_domains=2, sync=True)
    try:
        layer(torch.randn(1 - rank, 3), domain=1)
        results["single_error"] = None
    except ValueError as err:
        results["single_error"] = str(err)
    results["single_untouched"] = torch.equal(layer.running_mean, torch.zeros(2, 3))

    # eval: running statistics only, no collective (rank 1 does not call the layer)
    layer = DomainBatchNorm2d(2, num_domains=2, sync=True).eval()
    if rank == 0:
        layer(torch.randn(2, 2, 3, 3), domain=torch.tensor([0, 1]))
    results["eval_active"] = is_sync_active(layer)
    dist.barrier()

    # differentiable all-reduce: d(sum_r w_r * sum_r' x_r'^2)/dx_r = 2 x_r * sum_r w_r
    x = torch.tensor([rank + 1.0], requires_grad=True)
    (all_reduce_sum(x.square()) * (rank + 1)).sum().backward()
    results["all_reduce_grad"] = x.grad.item()

    # inside torch DDP: parameter gradients averaged by DDP, input gradients global
    torch.manual_seed(5)
    model = _Net(sync=True)
    ddp = nn.parallel.DistributedDataParallel(model)
    x = torch.randn(8, 3, 4, 4)[rank * 4 : (rank + 1) * 4]
    ids = torch.tensor([0, 1, 1, 1, 0, 0, 1, 0])[rank * 4 : (rank + 1) * 4]
    ddp(x, domain=ids).square().sum().backward()
    results["ddp_grads"] = [p.grad.clone() for p in model.parameters()]

    # torch.func through the synced kernel and the differentiable all-reduce (issue 17.4)
    results["func"] = _func_step(rank)

    x, ids, c = _penalty_batch()
    part = slice(rank * 4, (rank + 1) * 4)
    results["penalty"] = _penalty_step(x[part], ids[part], c[part], sync=True)
    results["empty_rank"] = _empty_rank_cases(rank)
    return results


@pytest.fixture(scope="module")
def ddp_results() -> list[dict[str, Any]]:
    return run_ddp(_ddp_worker)


@pytest.mark.parametrize("case", CASES)
def test_synced_halves_equal_one_process(ddp_results, case):
    layer, steps = _build(case, sync=True)
    assert not is_sync_active(layer)  # no process group here: plain single process
    ref = _run(layer, steps, case, None)
    ranks = [r[case] for r in ddp_results]
    for step in range(STEPS):
        y = torch.cat([r["y"][step] for r in ranks])
        x_grad = torch.cat([r["x_grad"][step] for r in ranks])
        torch.testing.assert_close(y, ref["y"][step], atol=ATOL, rtol=0)
        torch.testing.assert_close(x_grad, ref["x_grad"][step], atol=ATOL, rtol=0)
        for key in ("w_grad", "b_grad"):  # local on each rank; their sum is the whole batch's
            total = ranks[0][key][step] + ranks[1][key][step]
            torch.testing.assert_close(total, ref[key][step], atol=ATOL, rtol=0)
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        torch.testing.assert_close(ranks[0][key], ref[key], atol=ATOL, rtol=0)


def test_unsynced_halves_differ(ddp_results):
    """The comparison above can fail: per-rank statistics give other outputs."""
    layer, steps = _build("domain2d", sync=False)
    rank0 = _run(layer, steps, "domain2d", 0)
    synced = ddp_results[0]["domain2d"]
    assert not torch.allclose(rank0["y"][0], synced["y"][0], atol=1e-3)
    assert not torch.allclose(rank0["x_grad"][0], synced["x_grad"][0], atol=1e-3)
    assert not torch.allclose(rank0["running_mean"], synced["running_mean"], atol=1e-3)


def test_domain_only_on_one_rank(ddp_results):
    # domain 2 sits only in rank 0's half at step 0: both ranks updated its running stats
    assert ddp_results[1]["domain2d"]["num_batches_tracked"].tolist() == [2, 2, 2]


def test_global_single_value_int_domain_raises_on_every_rank(ddp_results):
    for r in ddp_results:
        assert r["single_error"] is not None
        assert "DomainBatchNorm1d(3, num_domains=2)" in r["single_error"]
        assert "more than 1 value per channel" in r["single_error"] and "[1]" in r["single_error"]
        assert r["single_untouched"]


def test_global_one_value_domain_uses_running_stats_on_every_rank(ddp_results):
    """Regression (issue 17.1): a domain of one global value raised on every rank."""
    ref = _rare_domain_step(None)
    ranks = [r["rare"] for r in ddp_results]
    for key in ("y", "x_grad"):
        torch.testing.assert_close(torch.cat([r[key] for r in ranks]), ref[key], atol=ATOL, rtol=0)
    torch.testing.assert_close(
        ranks[0]["w_grad"] + ranks[1]["w_grad"], ref["w_grad"], atol=ATOL, rtol=0
    )
    for key, value in ref["buffers"].items():
        assert torch.equal(ranks[0]["buffers"][key], ranks[1]["buffers"][key]), key
        torch.testing.assert_close(ranks[0]["buffers"][key], value, atol=ATOL, rtol=0)
    assert ref["buffers"]["num_batches_tracked"].tolist() == [1, 0]
    for r in ranks:
        assert len(r["warnings"]) == 1 and "[1] had one value per channel" in r["warnings"][0]


def test_eval_runs_without_collectives(ddp_results):
    assert [r["eval_active"] for r in ddp_results] == [False, False]


def test_all_reduce_sum_backward(ddp_results):
    assert [r["all_reduce_grad"] for r in ddp_results] == [2.0 * 3, 4.0 * 3]


def test_inside_torch_ddp(ddp_results):
    torch.manual_seed(5)
    model = _Net(sync=True)
    x = torch.randn(8, 3, 4, 4)
    model(x, domain=torch.tensor([0, 1, 1, 1, 0, 0, 1, 0])).square().sum().backward()
    grads_0, grads_1 = (r["ddp_grads"] for r in ddp_results)
    for g0, g1, p in zip(grads_0, grads_1, model.parameters(), strict=True):
        assert torch.equal(g0, g1)
        # DDP averages the ranks' gradients of their loss halves: half the whole batch's
        torch.testing.assert_close(g0, p.grad / 2, atol=1e-4, rtol=1e-5)


def test_torch_func_through_synced_layers(ddp_results):
    """Regression (issue 17.4): no ``setup_context`` / vmap rule in the synced pieces."""
    for rank, r in enumerate(ddp_results):
        for key, value in r["func"]["autograd"].items():
            # (the conv bias gradient is ~0 through BN: an absolute tolerance)
            torch.testing.assert_close(r["func"]["grad"][key], value, atol=1e-4, rtol=1e-5)
        assert torch.equal(r["func"]["vmap_sum"], torch.arange(6.0).view(3, 2) * 3)
        assert r["func"]["grad_sum"].tolist() == [2.0 * (rank + 1) * 3]


def test_torch_func_grad_single_process_synced_bn():
    torch.manual_seed(6)
    layer = SyncedBatchNorm2d(3)
    x = torch.randn(6, 3, 4, 4)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    buffers = snapshot_buffers(layer)

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        state = {**p, **{k: v.clone() for k, v in buffers.items()}}
        return torch.func.functional_call(layer, state, (x,)).square().sum()

    grads = torch.func.grad(loss)(params)
    layer(x).square().sum().backward()
    for key, p in layer.named_parameters():
        torch.testing.assert_close(grads[key], p.grad, atol=1e-5, rtol=1e-5)


def test_gradient_penalty_through_synced_layers(ddp_results):
    """Double backward across ranks equals one process on the concatenated batch.

    Regression: the synced kernel's gradient had no graph (wrong penalty gradients), and the
    inplace ops after the synced layers raised.
    """
    x, ids, c = _penalty_batch()
    ref = _penalty_step(x, ids, c, sync=False)
    ranks = [r["penalty"] for r in ddp_results]
    x_grad = torch.cat([r["x_grad"] for r in ranks])
    torch.testing.assert_close(x_grad, ref["x_grad"], atol=1e-9, rtol=1e-7)
    for name, grad in ref["grads"].items():  # local per rank: their sum is the whole batch's
        total = ranks[0]["grads"][name] + ranks[1]["grads"][name]
        torch.testing.assert_close(total, grad, atol=1e-9, rtol=1e-7, msg=name)
    for name, buf in ref["buffers"].items():
        assert torch.equal(ranks[0]["buffers"][name], ranks[1]["buffers"][name]), name
        torch.testing.assert_close(ranks[0]["buffers"][name], buf, atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("case", ["domain", "synced_bn"])
def test_rank_without_samples(ddp_results, case):
    """An empty local batch: empty output, and both ranks update like one process on rank 0's."""
    torch.manual_seed(33)
    x = torch.randn(4, 3, 2, 2) + 1
    if case == "domain":
        layer = DomainBatchNorm2d(3, num_domains=2)
        kwargs = {"domain": torch.tensor([0, 1, 1, 0])}
    else:
        layer = SyncedBatchNorm2d(3, momentum=None)
        kwargs = {}
    x.requires_grad_()
    y = layer(x, **kwargs)
    y.square().sum().backward()
    rank0, rank1 = (r["empty_rank"][case] for r in ddp_results)
    torch.testing.assert_close(rank0["y"], y.detach(), atol=ATOL, rtol=0)
    torch.testing.assert_close(rank0["x_grad"], x.grad, atol=ATOL, rtol=0)
    assert rank1["y"].shape == (0, 3, 2, 2) and rank1["x_grad"].shape == (0, 3, 2, 2)
    for key, value in layer.named_buffers():
        assert torch.equal(rank0["buffers"][key], rank1["buffers"][key]), key
        torch.testing.assert_close(rank0["buffers"][key], value, atol=ATOL, rtol=0)


def test_all_empty_and_global_single_value_leave_buffers(ddp_results):
    """Regression: SyncedBatchNorm counted the batch before the global check raised."""
    fresh = SyncedBatchNorm1d(3)
    for r in ddp_results:
        cases = r["empty_rank"]
        assert cases["all_empty_untouched"]
        assert "SyncedBatchNorm1d(3)" in cases["single_error"]
        assert "more than 1 value per channel" in cases["single_error"]
        for key, value in fresh.named_buffers():
            assert torch.equal(cases["single_buffers"][key], value), key
        assert "more than 1 value per channel" in cases["renorm_single_error"]
        for name, fresh_renorm in [("empty", BatchRenorm2d(3)), ("single", BatchRenorm1d(3))]:
            for key, value in fresh_renorm.named_buffers():
                assert torch.equal(cases[f"renorm_{name}_buffers"][key], value), (name, key)
