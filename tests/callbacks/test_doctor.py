"""BatchNormDoctor: its statistics against formulas written out here, and each planted pitfall.

Every Lightning test plants one pitfall in a tiny model and asserts the finding names the layer
that has it (and not the healthy ones); a clean run must raise nothing.
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from lightning_norms._diagnostics import (
    BatchSpread,
    all_reduce_spreads,
    eval_mismatch,
    nanmedian_rows,
    summarise_spread,
)
from lightning_norms._moments import MomentAccumulator
from lightning_norms.callbacks import BatchNormDoctor
from lightning_norms.callbacks.doctor import BatchNormDoctorWarning, BNFinding
from tests._boring import BoringNormModel, boring_trainer
from tests._dist import run_ddp, run_script

DIM, CLASSES = 8, 4


# ------------------------------------------------------------------------ statistics (pure torch)
def test_batch_spread_matches_formula() -> None:
    torch.manual_seed(0)
    batches = [torch.randn(6 + t % 3, 3, 2, 2) + 0.3 * t for t in range(7)]
    spread = BatchSpread(1, 3, "cpu")
    for x in batches:
        spread.update(x)
    means = [x.mean((2, 3)) for x in batches]
    mu = torch.stack([m.mean(0) for m in means])
    d1 = ((mu[1:] - mu[:-1]) ** 2).mean(0) / 2
    d2 = ((mu[2:] - mu[:-2]) ** 2).mean(0) / 2
    expected = torch.stack([m.var(0) / m.shape[0] for m in means]).mean(0)
    torch.testing.assert_close(spread.ratio()[0], (2 * d1 - d2) / expected)
    assert spread.num_batches.tolist() == [7.0]


def test_batch_spread_groups_equal_separate_accumulators() -> None:
    torch.manual_seed(1)
    grouped = BatchSpread(2, 4, "cpu")
    alone = [BatchSpread(1, 4, "cpu"), BatchSpread(1, 4, "cpu")]
    for t in range(6):
        x = torch.randn(10, 4, 3)
        ids = torch.randint(0, 2, (10,))
        ids[:2] = torch.tensor([0, 1])
        ids[2:4] = torch.tensor([0, 1])
        if t == 3:
            ids[:] = 0  # domain 1 absent: it keeps its previous mean
        cnt = grouped.update(x, ids)
        assert cnt is not None and cnt.tolist() == [float((ids == d).sum()) for d in (0, 1)]
        for d in (0, 1):
            alone[d].update(x[ids == d])
    for d in (0, 1):
        torch.testing.assert_close(grouped.ratio()[d], alone[d].ratio()[0])
        torch.testing.assert_close(grouped.num_batches[d], alone[d].num_batches[0])


def test_batch_spread_ignores_weight_drift_and_flags_single_source_batches() -> None:
    torch.manual_seed(2)
    iid, pure, alternating = (BatchSpread(1, 16, "cpu") for _ in range(3))
    centers = 2.0 * torch.randn(4, 16)
    drift = torch.zeros(16)
    for t in range(60):
        drift += 1.0 * torch.randn(16)  # activations random-walk as the weights train
        y = torch.randint(0, 4, (32,))
        iid.update(centers[y] + torch.randn(32, 16) + drift)
        pure.update(centers[torch.randint(0, 4, ())] + torch.randn(32, 16) + drift)
        alternating.update(centers[t % 2] + torch.randn(32, 16) + drift)
    r = {k: summarise_spread(v.ratio(), v.num_batches, 20).item()
         for k, v in {"iid": iid, "pure": pure, "alternating": alternating}.items()}  # fmt: skip
    assert 0.3 < r["iid"] < 2.0
    assert r["pure"] > 10 and r["alternating"] > 10
    # the plain lag-1 (von Neumann) ratio would call the drifting clean run unrepresentative
    lag1_only = (iid.lag1 / (2 * iid.num_lag1)) / (iid.within / iid.num_batches)
    assert lag1_only.median().item() > 4


def test_summarise_spread_needs_min_batches_and_skips_dead_channels() -> None:
    spread = BatchSpread(1, 3, "cpu")
    for _ in range(5):
        x = torch.randn(8, 3)
        x[:, 2] = 0.0  # a dead channel: no within-batch variance
        spread.update(x)
    ratio = spread.ratio()
    assert math.isnan(ratio[0, 2].item())
    assert math.isnan(summarise_spread(ratio, spread.num_batches, 6).item())
    assert summarise_spread(ratio, spread.num_batches, 5).item() == pytest.approx(
        max(ratio[0, :2].median().item(), 0.0)
    )


@pytest.mark.parametrize("channels", [1, 2, 3, 4, 7, 8])
def test_nanmedian_rows_equals_torch_nanmedian(channels: int) -> None:
    """Odd and even counts (torch takes the lower middle), NaN anywhere, all-NaN rows, ties."""
    gen = torch.Generator().manual_seed(channels)
    for _ in range(20):
        x = torch.randn(6, channels, generator=gen).round(decimals=1)  # ties included
        x[torch.rand(6, channels, generator=gen) < 0.4] = math.nan
        x[0] = math.nan
        x[1, 0] = math.inf
        expected = x.nanmedian(dim=1).values
        got = nanmedian_rows(x)
        assert torch.equal(got.isnan(), expected.isnan())
        assert torch.equal(got.nan_to_num(), expected.nan_to_num())


# ops whose CUDA kernel raises under torch.use_deterministic_algorithms(True) (torch's list:
# median/nanmedian with indices, histc, bincount with weights, put_, scatter_reduce 'prod'),
# plus the order statistics MPS lacked in older torch
_NO_DETERMINISTIC_KERNEL = {
    "median", "nanmedian", "kthvalue", "quantile", "nanquantile", "mode", "histc", "bincount",
    "put_", "put", "scatter_reduce", "scatter_reduce_",
}  # fmt: skip


class _OpLog(torch.overrides.TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.names.add(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("grouped", [False, True])
def test_doctor_runs_deterministic_and_calls_no_op_without_a_deterministic_kernel(
    tmp_path: Path, grouped: bool
) -> None:
    """A fit with the doctor under ``deterministic=True`` (every recipe's setting), plain or
    per-domain BN, every check judged: none of the ops the doctor adds to the fit is on torch's
    list of ops without a deterministic CUDA kernel (``nanmedian(dim=...)`` was)."""
    if grouped:
        data = _two_domains(320)
        val: Any = [DataLoader(TensorDataset(data.tensors[k]), batch_size=64) for k in (0, 2)]
    else:
        data = TensorDataset(*_data(640))
        val = DataLoader(TensorDataset(*_data(128, seed=1)), batch_size=64)
    train = DataLoader(data, batch_size=32, shuffle=True)

    def fit(doctor: BatchNormDoctor | None) -> set[str]:
        torch.manual_seed(0)
        model = DomainTowers() if grouped else Net(_mlp())
        log = _OpLog()
        callbacks = [] if doctor is None else [doctor]
        trainer = boring_trainer(tmp_path, max_epochs=1, deterministic=True, callbacks=callbacks)
        with log:
            trainer.fit(model, train, val)
        return log.names

    doctor = BatchNormDoctor(min_batches=5, warmup_batches=5, verbosity="quiet")
    added = fit(doctor) - fit(None)
    assert "sort" in added  # the doctor's median ran
    assert added & _NO_DETERMINISTIC_KERNEL == set()


def test_moment_accumulator_grouped_matches_torch() -> None:
    torch.manual_seed(3)
    acc = MomentAccumulator(3, 4, "cpu")
    xs, ids = [], []
    for n in (5, 9, 7):
        x = torch.randn(n, 4, 3, 2) * 3 + 10
        g = torch.randint(0, 2, (n,))  # domain 2 never appears
        acc.update(x, g)
        xs.append(x)
        ids.append(g)
    x, g = torch.cat(xs), torch.cat(ids)
    for d in (0, 1):
        flat = x[g == d].transpose(0, 1).reshape(4, -1)
        torch.testing.assert_close(acc.moments.mean[d].float(), flat.mean(1))
        torch.testing.assert_close(acc.moments.var()[d].float(), flat.var(1), rtol=1e-4, atol=1e-4)
        assert acc.moments.n[d].item() == flat.shape[1]
    assert acc.moments.n[2].item() == 0


def test_eval_mismatch_formula() -> None:
    mean, var = torch.tensor([[1.0, -2.0]]), torch.tensor([[4.0, 0.25]])
    rm, rv = torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0])
    shift, lvr = eval_mismatch(torch.tensor([50.0]), mean, var, rm, rv, 0.0)
    assert shift.item() == pytest.approx((1.0 + 2.0) / 2)
    assert lvr.item() == pytest.approx((math.log(4.0) + math.log(4.0)) / 2)
    shift, _ = eval_mismatch(torch.tensor([1.0]), mean, var, rm, rv, 0.0)
    assert math.isnan(shift.item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_statistics_in_fp32_for_half_inputs(dtype: torch.dtype) -> None:
    torch.manual_seed(4)
    xs = [(torch.randn(16, 3, 4, 4) * 2 + 50).to(dtype) for _ in range(5)]
    half, ref = BatchSpread(1, 3, "cpu"), BatchSpread(1, 3, "cpu")
    m_half, m_ref = MomentAccumulator(1, 3, "cpu"), MomentAccumulator(1, 3, "cpu")
    for x in xs:
        half.update(x)
        ref.update(x.float())
        m_half.update(x)
        m_ref.update(x.float())
    # per-call statistics in fp32, population moments accumulated in fp64 (the engine's policy)
    assert half.within.dtype == torch.float32 and m_half.moments.mean.dtype == torch.float64
    torch.testing.assert_close(half.ratio(), ref.ratio(), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(m_half.moments.var(), m_ref.moments.var())


def _ddp_reductions(rank: int, world_size: int) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(10 + rank)
    spread, acc = BatchSpread(1, 3, "cpu"), MomentAccumulator(2, 3, "cpu")
    for _ in range(4 + rank):
        x = torch.randn(6, 3, 2, generator=gen) * (1 + rank) + rank
        spread.update(x)
        acc.update(x, torch.tensor([0, 1, 0, 1, 0, 0]))
    all_reduce_spreads([spread])
    acc.all_reduce()
    return {
        "lag1": spread.lag1,
        "lag2": spread.lag2,
        "within": spread.within,
        "n": spread.num_batches,
        "n2": spread.num_lag2,
        "count": acc.moments.n,
        "mean": acc.moments.mean,
        "var": acc.moments.var(),
    }


@pytest.mark.ddp
def test_reductions_across_ranks_equal_one_process() -> None:
    results = run_ddp(_ddp_reductions, world_size=2)
    torch.testing.assert_close(results[0], results[1])
    single = [BatchSpread(1, 3, "cpu"), BatchSpread(1, 3, "cpu")]
    acc = MomentAccumulator(2, 3, "cpu")
    for rank in (0, 1):
        gen = torch.Generator().manual_seed(10 + rank)
        for _ in range(4 + rank):
            x = torch.randn(6, 3, 2, generator=gen) * (1 + rank) + rank
            single[rank].update(x)
            acc.update(x, torch.tensor([0, 1, 0, 1, 0, 0]))
    additive = [torch.stack(t).sum(0) for t in zip(*(s.additive() for s in single), strict=True)]
    for i, key in enumerate(["lag1", "lag2", None, "n2", "within", "n"]):
        if key is not None:
            torch.testing.assert_close(results[0][key], additive[i])
    torch.testing.assert_close(results[0]["count"], acc.moments.n)
    torch.testing.assert_close(results[0]["mean"], acc.moments.mean)
    torch.testing.assert_close(results[0]["var"], acc.moments.var(), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"check_every_n_epochs": 0}, "check_every_n_epochs"),
        ({"max_calls_per_step": 1.5}, "max_calls_per_step"),
        ({"min_batch_size": -1}, "min_batch_size"),
        ({"min_batches": True}, "min_batches"),
        ({"max_batch_spread": 0.0}, "max_batch_spread"),
        ({"max_mean_shift": math.inf}, "max_mean_shift"),
        ({"max_log_var_ratio": "big"}, "max_log_var_ratio"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=f"`{name}`") as error:
        BatchNormDoctor(**kwargs)
    assert isinstance(error.value, MisconfigurationException)  # as the other callbacks raise


# ------------------------------------------------------------------------ Lightning helpers
def _data(n: int = 1024, seed: int = 0, shift: float = 0.0) -> tuple[Tensor, Tensor]:
    centers = 3.0 * torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(123))
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % CLASSES
    return centers[y] + torch.randn(n, DIM, generator=gen) + shift, y


def _mlp(momentum: float = 0.1, bias: bool = False) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(DIM, 16, bias=bias), nn.BatchNorm1d(16), nn.ReLU(),
        nn.Linear(16, 16, bias=bias), nn.BatchNorm1d(16, momentum=momentum), nn.ReLU(),
        nn.Linear(16, CLASSES),
    )  # fmt: skip


class Net(BoringNormModel):
    """``BoringNormModel`` trained with plain SGD (no momentum), as the figures here were pinned."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _fit(
    model: LightningModule,
    train: DataLoader,
    val: DataLoader | None,
    tmp_path: Path,
    doctor: BatchNormDoctor,
    max_epochs: int = 2,
    **kw: Any,
) -> Trainer:
    trainer = boring_trainer(tmp_path, max_epochs=max_epochs, **{"callbacks": [doctor], **kw})
    trainer.fit(model, train, val)
    return trainer


def _doctor(**kwargs: Any) -> BatchNormDoctor:
    """Every layer printed, one warning per finding, every layer's figures logged: the planted
    pitfalls below assert per-layer warnings and metrics."""
    return BatchNormDoctor(verbosity="full", log_figures="all", **kwargs)


def _by_check(findings: list[BNFinding]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for f in findings:
        out.setdefault(f.check, {})[f.layer] = f.value
    return out


def _doctor_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, BatchNormDoctorWarning)]


# ------------------------------------------------------------------------- planted pitfalls
def test_clean_run_raises_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    torch.manual_seed(0)
    x, y = _data()
    xv, yv = _data(256, seed=1)
    train = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    val = DataLoader(TensorDataset(xv, yv), batch_size=64)
    doctor = _doctor()
    model = Net(_mlp())
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer = _fit(model, train, val, tmp_path, doctor, max_epochs=3)
    assert doctor.findings == []
    assert _doctor_warnings(record) == []
    metrics = trainer.callback_metrics
    assert 0.3 < metrics["bn_doctor/batch_spread/body.1"].item() < 2.0
    assert metrics["bn_doctor/calls_per_step/body.4"].item() == 1.0
    assert metrics["bn_doctor/batch_size/body.4"].item() == 32.0
    assert metrics["bn_doctor/eval_mean_shift/body.1"].item() < 0.2
    assert metrics["bn_doctor/eval_var_ratio/body.4"].item() < 0.2
    out = capsys.readouterr().out
    assert "batch spread" in out and "mean shift" in out and "body.4" in out
    assert not any(m._forward_pre_hooks for m in model.modules())  # removed at teardown


def test_plain_table_without_rich(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "rich", None)  # import rich... raises ImportError
    monkeypatch.setitem(sys.modules, "rich.console", None)
    monkeypatch.setitem(sys.modules, "rich.table", None)
    torch.manual_seed(0)
    x, y = _data()
    train = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    with caplog.at_level("INFO"):  # without rich the table goes through Lightning's logging
        _fit(Net(_mlp()), train, None, tmp_path, _doctor(), max_epochs=1,
             limit_val_batches=0)  # fmt: skip
    lines = caplog.text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("layer"))
    assert lines[header].split() == ["layer", "batch", "spread", "calls/step", "samples/call",
                                     "biased", "input", "status"]  # fmt: skip
    assert lines[header + 1].split()[0] == "body.1"
    assert lines[header + 1].split()[-4:] == ["1", "32", "0.00", "ok"]
    caplog.clear()
    with caplog.at_level("INFO"):  # the default summary: one line when every layer is fine
        _fit(Net(_mlp()), train, None, tmp_path, BatchNormDoctor(), max_epochs=1,
             limit_val_batches=0)  # fmt: skip
    assert "fair samples? 2 BN layers: 2 ok." in caplog.text
    assert "layer" not in caplog.text.replace("BN layers", "")  # no table


def test_unshuffled_class_sorted_loader(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x, y = _data()
    xv, yv = _data(256, seed=1)
    order = torch.argsort(y, stable=True)  # 8 batches of class 0, then class 1, ...
    train = DataLoader(TensorDataset(x[order], y[order]), batch_size=32, shuffle=False)
    val = DataLoader(TensorDataset(xv, yv), batch_size=64)
    doctor = _doctor()
    with pytest.warns(BatchNormDoctorWarning, match=r"`train_dataloader` does not shuffle"):
        _fit(Net(_mlp()), train, val, tmp_path, doctor, max_epochs=2)
    found = _by_check(doctor.findings)
    assert set(found["shuffle"]) == {"train_dataloader"}
    assert "MixingBatchSampler" in found_message(doctor, "shuffle")
    # the running statistics hold the last class read, not the data: the first BN layer's
    # inputs differ by class, so it is flagged (and the layer behind it)
    assert "body.1" in found["eval_var_ratio"]
    assert "batch_spread" not in found  # runs of 8 batches change as slowly as weight drift


def found_message(doctor: BatchNormDoctor, check: str) -> str:
    return next(f.message for f in doctor.findings if f.check == check)


class _ClassPureBatches(Sampler[list[int]]):
    """Shuffled order, but every batch holds one class only (single-source batches)."""

    def __init__(self, labels: Tensor, batch_size: int) -> None:
        self.labels, self.batch_size = labels, batch_size

    def __iter__(self):  # type: ignore[no-untyped-def]
        batches = []
        for c in self.labels.unique():
            idx = (self.labels == c).nonzero().flatten()
            idx = idx[torch.randperm(len(idx))]
            batches += [idx[i : i + self.batch_size].tolist() for i in range(0, len(idx), 32)]
        return iter([batches[i] for i in torch.randperm(len(batches)).tolist()])

    def __len__(self) -> int:
        return sum(math.ceil(int((self.labels == c).sum()) / 32) for c in self.labels.unique())


def test_single_source_batches_flagged_without_shuffle_finding(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x, y = _data()
    train = DataLoader(TensorDataset(x, y), batch_sampler=_ClassPureBatches(y, 32))
    doctor = _doctor()
    with pytest.warns(BatchNormDoctorWarning, match=r"`body.1` sees training batches"):
        _fit(Net(_mlp()), train, None, tmp_path, doctor, max_epochs=1, limit_val_batches=0)
    found = _by_check(doctor.findings)
    assert set(found) == {"batch_spread"}
    assert set(found["batch_spread"]) == {"body.1"}


class TwoTowers(LightningModule):
    """The MNIST/SVHN pitfall: one shared tower (with BN) run on two domain-pure batches."""

    def __init__(self) -> None:
        super().__init__()
        self.tower = nn.Sequential(nn.Linear(DIM, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU())
        self.head = nn.Sequential(nn.BatchNorm1d(16), nn.Linear(16, CLASSES))

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        xa, ya, xb, yb = batch
        features = torch.cat([self.tower(xa), self.tower(xb)])  # two calls, one per domain
        return F.cross_entropy(self.head(features), torch.cat([ya, yb]))

    def validation_step(self, batch: list[Tensor], batch_idx: int) -> None:
        self.head(self.tower(batch[0]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _two_domains(n: int = 640) -> TensorDataset:
    xa, ya = _data(n, seed=0)
    xb, yb = _data(n, seed=1)
    return TensorDataset(xa, ya, 0.5 * xb + 5.0, yb)  # domain B: other scale and offset


def test_shared_bn_fed_two_domain_pure_batches(tmp_path: Path) -> None:
    torch.manual_seed(0)
    train = DataLoader(_two_domains(), batch_size=32, shuffle=True)
    doctor = _doctor()
    with pytest.warns(BatchNormDoctorWarning, match=r"`tower.1` ran 2 times in one training step"):
        _fit(TwoTowers(), train, None, tmp_path, doctor, max_epochs=1, limit_val_batches=0)
    found = _by_check(doctor.findings)
    assert found["calls_per_step"] == {"tower.1": 2.0}
    assert set(found["batch_spread"]) == {"tower.1"}  # alternating domains
    assert found["batch_spread"]["tower.1"] > 3 * doctor._max_spread
    assert set(found) == {"calls_per_step", "batch_spread"}  # head.0 gets one mixed batch
    message = next(f.message for f in doctor.findings if f.check == "calls_per_step")
    assert "DomainBatchNorm1d" in message and "MixingBatchSampler" in message


class DomainTowers(LightningModule):
    """The remedy: the same towers with per-domain BN statistics (DomainBatchNorm1d)."""

    def __init__(self) -> None:
        super().__init__()
        from lightning_norms.domain_bn import DomainBatchNorm1d

        self.lin = nn.Linear(DIM, 16, bias=False)
        self.norm = DomainBatchNorm1d(16, num_domains=2)
        self.head = nn.Linear(16, CLASSES)

    def forward(self, x: Tensor, domain: int) -> Tensor:
        return self.head(F.relu(self.norm(self.lin(x), domain=domain)))

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        xa, ya, xb, yb = batch
        logits = torch.cat([self(xa, 0), self(xb, 1)])
        return F.cross_entropy(logits, torch.cat([ya, yb]))

    def validation_step(self, batch: list[Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self(batch[0], dataloader_idx)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_domain_batchnorm_per_domain_checks(tmp_path: Path) -> None:
    torch.manual_seed(0)
    data = _two_domains()
    train = DataLoader(data, batch_size=32, shuffle=True)
    val = [DataLoader(TensorDataset(data.tensors[0]), batch_size=64),
           DataLoader(TensorDataset(data.tensors[2]), batch_size=64)]  # fmt: skip
    doctor = _doctor()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer = _fit(DomainTowers(), train, val, tmp_path, doctor, max_epochs=2)  # 40 steps
    # one call per domain per step, per-domain batches i.i.d., per-domain running stats match
    assert doctor.findings == []
    assert _doctor_warnings(record) == []
    metrics = trainer.callback_metrics
    assert metrics["bn_doctor/calls_per_step/norm"].item() == 1.0
    assert metrics["bn_doctor/batch_size/norm"].item() == 32.0
    assert metrics["bn_doctor/batch_spread/norm"].item() < 2.0
    assert metrics["bn_doctor/eval_mean_shift/norm"].item() < 0.3

    # domain B evaluated with domain A's statistics: the per-domain comparison sees it
    class Mislabelled(DomainTowers):
        def validation_step(self, batch: list[Tensor], batch_idx: int, dataloader_idx: int = 0):
            self(batch[0], 0)

    doctor = _doctor()
    with pytest.warns(BatchNormDoctorWarning, match=r"`norm` is evaluated"):
        _fit(Mislabelled(), train, val[1], tmp_path, doctor, max_epochs=2)
    found = _by_check(doctor.findings)
    assert set(found["eval_mean_shift"]) == {"norm"}
    assert found["eval_mean_shift"]["norm"] > 1.0


def test_stale_running_stats(tmp_path: Path) -> None:
    torch.manual_seed(0)
    body = _mlp(momentum=1e-4, bias=True)  # body.4 barely moves its running stats
    with torch.no_grad():
        body[3].bias.fill_(3.0)  # and its inputs sit far from the initial (0, 1)
    x, y = _data()
    xv, yv = _data(256, seed=1)
    train = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    val = DataLoader(TensorDataset(xv, yv), batch_size=64)
    doctor = _doctor()
    with pytest.warns(BatchNormDoctorWarning, match=r"`body.4` is evaluated with a running mean"):
        _fit(Net(body), train, val, tmp_path, doctor, max_epochs=2)
    found = _by_check(doctor.findings)
    assert set(found["eval_mean_shift"]) == {"body.4"}  # body.1 (momentum 0.1) is fine
    assert found["eval_mean_shift"]["body.4"] > 2.0
    message = next(f.message for f in doctor.findings if f.check == "eval_mean_shift")
    assert "PreciseBN" in message


def test_train_validation_shift(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x, y = _data()
    xv, yv = _data(256, seed=1, shift=3.0)  # validation data differ from training
    train = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    val = DataLoader(TensorDataset(xv, yv), batch_size=64)
    doctor = _doctor()
    with pytest.warns(BatchNormDoctorWarning):
        _fit(Net(_mlp(bias=True)), train, val, tmp_path, doctor, max_epochs=2)
    found = _by_check(doctor.findings)
    assert "body.1" in found["eval_mean_shift"]
    assert found["eval_mean_shift"]["body.1"] == max(found["eval_mean_shift"].values())


def _conv_body() -> nn.Sequential:
    """Conv-BN, conv(bias)-GroupNorm, conv-BN on 3x6x6 images."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, CLASSES),
    )  # fmt: skip


def test_tiny_per_device_batch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, 3, 6, 6), torch.randint(0, CLASSES, (64,)))
    train = DataLoader(data, batch_size=4, shuffle=True)
    doctor = _doctor()
    with pytest.warns(BatchNormDoctorWarning, match=r"`body.1` normalises only 4 samples"):
        _fit(Net(_conv_body()), train, None, tmp_path, doctor, max_epochs=1, limit_val_batches=0)
    found = _by_check(doctor.findings)
    assert found["batch_size"] == {"body.1": 4.0, "body.7": 4.0}  # not the GroupNorm (body.4)
    message = next(f.message for f in doctor.findings if f.check == "batch_size")
    assert "BatchRenorm2d" in message and "NormSync" in message


def test_check_every_n_epochs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, 3, 6, 6), torch.randint(0, CLASSES, (64,)))
    train = DataLoader(data, batch_size=4, shuffle=True)
    doctor = _doctor(check_every_n_epochs=2)
    trainer = _fit(
        Net(_conv_body()), train, None, tmp_path, doctor, max_epochs=1, limit_val_batches=0
    )
    assert doctor.findings == []
    assert not any(k.startswith("bn_doctor/") for k in trainer.callback_metrics)
    doctor = _doctor(min_batch_size=4)  # the threshold is an argument
    _fit(Net(_conv_body()), train, None, tmp_path, doctor, max_epochs=1, limit_val_batches=0)
    assert doctor.findings == []


def test_validate_checks_running_stats(tmp_path: Path) -> None:
    model = Net(_mlp())
    xv, yv = _data(256, seed=1)
    doctor = _doctor()
    trainer = boring_trainer(tmp_path, callbacks=[doctor])
    with pytest.warns(BatchNormDoctorWarning, match=r"`body.1` is evaluated"):
        trainer.validate(model, DataLoader(TensorDataset(xv, yv), batch_size=64))
    assert {f.layer for f in doctor.findings if f.check == "eval_mean_shift"} >= {"body.1"}
    assert not any(m._forward_pre_hooks for m in model.modules())


# --------------------------------------------------------------------------------- DDP
DDP_SCRIPT = """
import json, sys, warnings
import torch
from torch.utils.data import DataLoader, TensorDataset
from lightning_norms.callbacks import BatchNormDoctor
from tests._boring import boring_trainer
from tests.callbacks.test_doctor import TwoTowers, _data, _two_domains

torch.manual_seed(0)
warnings.simplefilter("ignore")
xv, yv = _data(256, seed=2)
doctor = BatchNormDoctor(verbosity="full", log_figures="all")
trainer = boring_trainer(".", strategy="ddp", devices=2, max_epochs=2, callbacks=[doctor])
trainer.fit(TwoTowers(), DataLoader(_two_domains(), batch_size=16, shuffle=True),
            DataLoader(TensorDataset(xv, yv), batch_size=32))
findings = [[f.check, f.layer, round(f.value, 4)] for f in doctor.findings]
metrics = {k: v.item() for k, v in trainer.callback_metrics.items()}
with open(f"findings_{trainer.global_rank}.json", "w") as fh:
    json.dump({"findings": findings, "metrics": metrics}, fh)
"""


@pytest.mark.ddp
def test_ddp_findings_agree_across_ranks(tmp_path: Path) -> None:
    run_script(DDP_SCRIPT, tmp_path)
    ranks = [json.loads((tmp_path / f"findings_{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # merged over ranks: every rank reports the same
    checks = {(c, layer) for c, layer, _ in ranks[0]["findings"]}
    assert ("calls_per_step", "tower.1") in checks and ("batch_spread", "tower.1") in checks
    assert not {c for c, layer in checks if layer == "head.0"} & {"calls_per_step", "batch_size"}
    metrics = ranks[0]["metrics"]
    assert metrics["bn_doctor/batch_size/head.0"] == 32.0  # 16 + 16 per device
    assert metrics["bn_doctor/batch_size/tower.1"] == 16.0
    assert "bn_doctor/eval_mean_shift/head.0" in metrics


# ------------------------------------------------------- with PreciseBN, in either order (issue 10)
class ResNet(LightningModule):
    """torchvision's resnet18 (inplace ReLU, residual ``+=``) on small inputs."""

    def __init__(self) -> None:
        super().__init__()
        import torchvision

        self.net = torchvision.models.resnet18(num_classes=CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch: list[Tensor], batch_idx: int) -> None:
        self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _resnet_fit_with_precise_bn(
    tmp_path: Path, precise_first: bool
) -> tuple[BatchNormDoctor, ResNet, dict[str, Tensor], str]:
    from lightning_norms.callbacks import PreciseBN

    gen = torch.Generator().manual_seed(0)
    train = TensorDataset(torch.randn(64, 3, 32, 32, generator=gen), torch.arange(64) % CLASSES)
    val = TensorDataset(torch.randn(32, 3, 32, 32, generator=gen))
    torch.manual_seed(0)
    model = ResNet()
    doctor = _doctor(warmup_batches=1)
    precise = PreciseBN(num_batches=2, dataloader="val")  # exact stats of the validation data
    callbacks = [precise, doctor] if precise_first else [doctor, precise]
    trainer = boring_trainer(tmp_path, num_sanity_val_steps=0, callbacks=callbacks)
    loader = DataLoader(train, batch_size=16, shuffle=True, generator=torch.Generator())
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(model, loader, DataLoader(val, batch_size=16))
    metrics = {k: v.clone() for k, v in trainer.callback_metrics.items()}
    return doctor, model, metrics, "\n".join(_doctor_warnings(record))


def test_precise_bn_forwards_never_count_whatever_the_order(tmp_path: Path) -> None:
    runs = {
        first: _resnet_fit_with_precise_bn(tmp_path / str(first), first) for first in (True, False)
    }
    (doctor, model, metrics, warned), (doctor_r, _, metrics_r, warned_r) = runs[True], runs[False]
    assert doctor.findings == doctor_r.findings == []  # no "ran 3 times in one training step"
    assert warned == warned_r == ""
    num_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert num_bn == 20
    for check in ("calls_per_step", "batch_size"):
        figures = {k: v.item() for k, v in metrics.items() if k.startswith(f"bn_doctor/{check}/")}
        assert len(figures) == num_bn
        assert set(figures.values()) == ({1.0} if check == "calls_per_step" else {16.0})
    # identical figures, train and eval checks, in either order
    assert metrics.keys() == metrics_r.keys()
    for key in metrics:
        assert torch.equal(metrics[key], metrics_r[key]), key
    # PreciseBN set net.bn1 to the exact statistics of its validation inputs (conv1 output, which
    # no BN precedes): the eval check must read a float64 mismatch of ~0 for it
    gen = torch.Generator().manual_seed(0)
    torch.randn(64, 3, 32, 32, generator=gen)
    xv = torch.randn(32, 3, 32, 32, generator=gen)
    with torch.no_grad():
        h = model.net.conv1(xv).double()
    bn = model.net.bn1
    mu, var = h.mean((0, 2, 3)), h.var((0, 2, 3))
    rm, rv = bn.running_mean.double(), bn.running_var.double()
    shift = ((mu - rm).abs() / (rv + bn.eps).sqrt()).mean().item()
    lvr = ((var + bn.eps).log() - (rv + bn.eps).log()).abs().mean().item()
    assert shift < 1e-5 and lvr < 1e-5
    assert metrics["bn_doctor/eval_mean_shift/net.bn1"].item() == pytest.approx(shift, abs=1e-5)
    assert metrics["bn_doctor/eval_var_ratio/net.bn1"].item() == pytest.approx(lvr, abs=1e-5)
    # deeper layers see eval-mode inputs, PreciseBN measured train-mode ones: a real mismatch
    assert metrics["bn_doctor/eval_mean_shift/net.layer4.1.bn2"].item() > 1e-3


def test_train_table_comes_first_and_unjudged_layers_are_not_ok(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("rich", "rich.console", "rich.table"):  # the tables go through logging
        monkeypatch.setitem(sys.modules, name, None)
    torch.manual_seed(0)
    x, y = _data(160)
    xv, yv = _data(64, seed=1)
    train = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)  # 5 steps < 20
    val = DataLoader(TensorDataset(xv, yv), batch_size=64)
    doctor = _doctor(warmup_batches=5)
    with caplog.at_level("INFO"):
        _fit(Net(_mlp()), train, val, tmp_path, doctor, max_epochs=2, num_sanity_val_steps=0)
    text = caplog.text
    titles = [f"epoch {e}: {q}" for e in (0, 1) for q in ("are training", "do running stats")]
    positions = [text.index(t) for t in titles]
    assert positions == sorted(positions)  # train table, then eval table, each epoch
    train_rows = [line.split() for line in text.splitlines() if line.startswith("body.")]
    assert len(train_rows) == 8  # 2 layers x 2 tables x 2 epochs
    # batch spread needs min_batches=20 calls: never "ok" before; eval judged once warmed up
    epoch0_train, epoch0_eval = train_rows[0:2], train_rows[2:4]
    assert all(r[1] == "n/a" and r[-3:] == ["too", "few", "batches"] for r in epoch0_train)
    assert all(r[1] != "n/a" and r[-1] != "batches" for r in epoch0_eval)  # 5 steps >= warmup 5
    doctor = _doctor(warmup_batches=100)
    caplog.clear()
    with caplog.at_level("INFO"):
        _fit(Net(_mlp()), train, val, tmp_path, doctor, max_epochs=1, num_sanity_val_steps=0)
    rows = [line.split() for line in caplog.text.splitlines() if line.startswith("body.")]
    assert [r[1:] for r in rows[2:]] == [["n/a", "n/a", "too", "few", "batches"]] * 2


def test_spread_figure_against_float64_formula(tmp_path: Path) -> None:
    """End to end: the logged figure of a BN fed the raw batches equals R computed in float64."""
    torch.manual_seed(0)
    x, y = _data(32 * 24)
    x = x + 2.0 * torch.randn(24, 1, DIM).repeat_interleave(32, 0).reshape(-1, DIM)
    train = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=False)
    body = nn.Sequential(nn.BatchNorm1d(DIM), nn.Linear(DIM, CLASSES))
    with pytest.warns(BatchNormDoctorWarning, match="does not shuffle"):
        trainer = _fit(Net(body), train, None, tmp_path, _doctor(), max_epochs=1,
                       limit_val_batches=0)  # fmt: skip
    mu = torch.stack([b.double().mean(0) for b in x.split(32)])
    within = torch.stack([b.double().var(0) / 32 for b in x.split(32)]).mean(0)
    d1 = (mu[1:] - mu[:-1]).square().mean(0) / 2
    d2 = (mu[2:] - mu[:-2]).square().mean(0) / 2
    expected = ((2 * d1 - d2) / within).median().clamp(min=0).item()
    assert expected > 4  # the planted per-batch offsets
    figure = trainer.callback_metrics["bn_doctor/batch_spread/body.0"].item()
    assert figure == pytest.approx(expected, rel=1e-4)


def test_sync_batchnorm_is_refused(tmp_path: Path) -> None:
    x, y = _data(64)
    trainer = boring_trainer(tmp_path, sync_batchnorm=True, callbacks=[BatchNormDoctor()])
    model = Net(_mlp())
    with pytest.raises(ValueError, match=r"BatchNormDoctor.*NormSync"):
        trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=32))
    assert not any(m._forward_pre_hooks for m in model.modules())


class BiasedNet(LightningModule):
    """Three conv/linear -> BN pairs: only where the biased layer's output *is* the BN input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)  # bias -> bn: flagged
        self.bn = nn.BatchNorm2d(8)
        self.conv_relu = nn.Conv2d(8, 8, 3, padding=1)  # bias -> inplace ReLU -> bn: not flagged
        self.relu = nn.ReLU(inplace=True)
        self.bn_after_relu = nn.BatchNorm2d(8)
        self.lin = nn.Linear(8, 8, bias=False)  # no bias -> bn: not flagged
        self.bn_lin = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, CLASSES)

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        h = self.bn_after_relu(self.relu(self.conv_relu(self.bn(self.conv(batch[0])))))
        return F.cross_entropy(self.head(self.bn_lin(self.lin(h.mean((2, 3))))), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_bias_feeding_bn_is_flagged(tmp_path: Path) -> None:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(128, 3, 6, 6), torch.randint(0, CLASSES, (128,)))
    doctor = _doctor()
    with pytest.warns(BatchNormDoctorWarning, match=r"`bn` gets its input straight from `conv`"):
        trainer = _fit(BiasedNet(), DataLoader(data, batch_size=16, shuffle=True), None,
                       tmp_path, doctor, max_epochs=1, limit_val_batches=0)  # fmt: skip
    found = _by_check(doctor.findings)
    assert found == {"redundant_bias": {"bn": 1.0}}  # every one of the 8 calls
    assert "bias=False" in found_message(doctor, "redundant_bias")
    metrics = trainer.callback_metrics
    assert metrics["bn_doctor/redundant_bias/bn"].item() == 1.0
    assert metrics["bn_doctor/redundant_bias/bn_after_relu"].item() == 0.0
    assert metrics["bn_doctor/redundant_bias/bn_lin"].item() == 0.0
    assert not any(m._forward_hooks for m in trainer.lightning_module.modules())


@pytest.mark.parametrize("log_figures", ["worst", "all", "none"])
def test_log_figures_chooses_what_is_logged(tmp_path: Path, log_figures: str) -> None:
    """Default: one figure per check, the worst layer's (largest; smallest for batch_size)."""
    torch.manual_seed(0)
    x, y = _data(256)
    train = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    val = DataLoader(TensorDataset(*_data(64, seed=1)), batch_size=64)
    kind: Any = log_figures
    doctor = BatchNormDoctor(min_batches=5, warmup_batches=5, log_figures=kind)
    trainer = _fit(Net(_mlp()), train, val, tmp_path, doctor, max_epochs=1)
    keys = sorted(k for k in trainer.callback_metrics if k.startswith("bn_doctor/"))
    checks = ["batch_size", "batch_spread", "calls_per_step", "eval_mean_shift",
              "eval_var_ratio", "redundant_bias"]  # fmt: skip
    if log_figures == "none":
        assert keys == []
        return
    if log_figures == "all":
        assert keys == [f"bn_doctor/{c}/{layer}" for c in checks for layer in ("body.1", "body.4")]
        return
    assert keys == [f"bn_doctor/{c}" for c in checks]
    full = _doctor(min_batches=5, warmup_batches=5)
    torch.manual_seed(0)  # the same run, every layer logged
    every = _fit(Net(_mlp()), train, val, tmp_path, full, max_epochs=1).callback_metrics
    for c in checks:
        layers = [every[f"bn_doctor/{c}/{layer}"].item() for layer in ("body.1", "body.4")]
        worst = min(layers) if c == "batch_size" else max(layers)
        assert trainer.callback_metrics[f"bn_doctor/{c}"].item() == pytest.approx(worst)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"log_figures": True}, "log_figures"),
        ({"log_figures": ["batch_spread"]}, "log_figures"),
        ({"verbosity": "loud"}, "verbosity"),
        ({"verbosity": None}, "verbosity"),
    ],
)
def test_bad_choices_raise_value_error(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=f"`{name}` should be"):
        BatchNormDoctor(**kwargs)


@pytest.mark.parametrize("doctor_first", [True, False])
def test_with_freeze_batchnorm(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
    doctor_first: bool,
) -> None:  # fmt: skip
    from lightning_norms.callbacks import FreezeBatchNorm

    for name in ("rich", "rich.console", "rich.table"):
        monkeypatch.setitem(sys.modules, name, None)
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(256, 3, 6, 6), torch.randint(0, CLASSES, (256,)))
    model = Net(_conv_body())
    frozen = model.body[1]
    before = (frozen.running_mean.clone(), frozen.running_var.clone())
    doctor = _doctor(min_batches=5)
    callbacks = [doctor, FreezeBatchNorm(modules="body.1")]
    with caplog.at_level("INFO"):
        trainer = _fit(model, DataLoader(data, batch_size=16, shuffle=True), None, tmp_path,
                       callbacks[0], max_epochs=1, limit_val_batches=0,
                       callbacks=callbacks if doctor_first else callbacks[::-1])  # fmt: skip
    assert torch.equal(frozen.running_mean, before[0])
    assert torch.equal(frozen.running_var, before[1])
    assert doctor.findings == []
    rows = {line.split()[0]: line for line in caplog.text.splitlines() if line.startswith("body.")}
    assert rows["body.1"].split()[-2:] == ["eval", "mode"]  # neither "ok" nor "too few"
    assert rows["body.7"].split()[-1] == "ok"
    metrics = trainer.callback_metrics
    assert metrics["bn_doctor/calls_per_step/body.1"].item() == 0.0
    assert metrics["bn_doctor/calls_per_step/body.7"].item() == 1.0


# ------------------------------------------------------------- what a resnet18 epoch prints
class ResNetModule(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        import torchvision

        self.net = torchvision.models.resnet18(num_classes=CLASSES)

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def validation_step(self, batch: list[Tensor], batch_idx: int) -> None:
        self.net(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _resnet_epoch(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, **kw: Any
) -> tuple[list[str], list[str], BatchNormDoctor, dict[str, float]]:
    """One resnet18 epoch (6 steps of 16 images 32x32) on an 80-column console: the printed
    lines, the doctor's warnings as Python prints them, the doctor, the logged figures."""
    monkeypatch.setenv("COLUMNS", "80")
    torch.manual_seed(0)
    x, y = torch.randn(96, 3, 32, 32), torch.randint(0, CLASSES, (96,))
    train = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    val = DataLoader(TensorDataset(x[:32], y[:32]), batch_size=16)
    doctor = BatchNormDoctor(warmup_batches=4, **kw)  # the eval checks judge every layer
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer = _fit(ResNetModule(), train, val, tmp_path, doctor, max_epochs=1,
                       num_sanity_val_steps=0)  # fmt: skip
    printed = [line.rstrip() for line in capsys.readouterr().out.splitlines() if line.strip()]
    shown = [
        warnings.formatwarning(w.message, w.category, w.filename, w.lineno, "").rstrip()
        for w in record
        if issubclass(w.category, BatchNormDoctorWarning)
    ]
    metrics = {k: v.item() for k, v in trainer.callback_metrics.items() if "bn_doctor" in k}
    return printed, shown, doctor, metrics


_RESNET_BN = 20  # BatchNorm2d layers in resnet18


def test_resnet18_summary_fits_one_screen(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    printed, shown, doctor, metrics = _resnet_epoch(tmp_path, capsys, monkeypatch)
    assert len(doctor.findings) > 10  # running stats 6 steps old: most layers flagged
    flagged = {f.layer for f in doctor.findings}
    screen = len(printed) + sum(math.ceil(len(line) / 80) for w in shown for line in w.split("\n"))
    assert screen <= 25, "\n".join(printed + shown)
    assert max(map(len, printed)) <= 80
    assert len(shown) == 1  # one warning for the eval question, none for the train one
    assert f"{len(flagged)} of {_RESNET_BN} BN layers flagged" in shown[0]
    assert any(line.startswith(f"{_RESNET_BN} BN layers: {len(flagged)} flagged (the worst 6")
               for line in printed)  # fmt: skip
    rows = [line.split() for line in printed if line.split()[0].startswith(("net.", "…"))]
    worst = max(doctor.findings, key=lambda f: f.value if f.check == "eval_mean_shift" else 0)
    assert len(rows) == 6, "\n".join(printed)
    assert rows[0][0] in (worst.layer, "…" + worst.layer.split(".", 1)[1])
    assert sorted(metrics) == [f"bn_doctor/{c}" for c in ("batch_size", "calls_per_step",
                               "eval_mean_shift", "eval_var_ratio", "redundant_bias")]  # fmt: skip
    assert metrics["bn_doctor/eval_mean_shift"] == pytest.approx(worst.value)
    assert metrics["bn_doctor/batch_size"] == 16.0


def test_resnet18_full_prints_every_layer_and_quiet_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    printed, shown, doctor, metrics = _resnet_epoch(
        tmp_path, capsys, monkeypatch, verbosity="full", log_figures="all"
    )
    names = [n for n, m in ResNetModule().named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(names) == _RESNET_BN and max(map(len, printed)) <= 80
    for name in names:  # every layer in both tables, shortened from the left at a dot
        rows = [line for line in printed if line.split()[0] in (name, _tail(name))]
        assert len(rows) == 2, name
    assert len(shown) == len(doctor.findings)  # one warning per finding
    assert len(metrics) == _RESNET_BN * 5  # 5 figures judged per layer (spread: too few)
    printed, shown, doctor, metrics = _resnet_epoch(
        tmp_path, capsys, monkeypatch, verbosity="quiet"
    )
    assert printed == [] and shown == []
    assert len(doctor.findings) > 10 and len(metrics) == 5  # judged and logged all the same


def _tail(name: str) -> str:
    parts = name.split(".")
    return "…" + ".".join(parts[1:])


def test_paths_are_shortened_from_the_left_at_a_dot() -> None:
    from lightning_norms.callbacks.doctor import _short_paths

    names = ["net.layer4.1.downsample.1", "net.layer4.1.bn2", "encoder.blocks.0.bn",
             "decoder.blocks.0.bn", "model.a_very_long_single_module_name"]  # fmt: skip
    short = _short_paths(names, 16)
    assert short[:2] == ["…1.downsample.1", "net.layer4.1.bn2"]  # fits: kept whole
    assert short[2:4] == names[2:4]  # "…blocks.0.bn" twice would be ambiguous: kept whole
    assert short[4] == "…a_very_long_single_module_name"  # one name wider than the column
    for name, cut in zip(names, short, strict=True):
        assert cut == name or (name.endswith(cut[1:]) and name[-len(cut)] == ".")
