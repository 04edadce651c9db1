"""Recipes: every LightningCLI script runs (fast_dev_run), the two-domain study runs under DDP,
the report writes its three files, and the pieces the study's claims rest on hold numerically."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_norms.recipes._common import (
    VARIANTS,
    ClassSortedBatchSampler,
    DigitsClassifier,
    SingleDomainDigits,
    SmallCNN,
)
from lightning_norms.recipes.report import RECORD_KEYS, main, summarise, verdict

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.filterwarnings("ignore")


def _fit_args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--trainer.fast_dev_run",
        "2",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.enable_progress_bar",
        "false",
        "--output_dir",
        str(tmp_path / "out"),
        *extra,
    ]


# ---------------------------------------------------------------- the study's building blocks


def _split(batch: tuple[torch.Tensor, ...]) -> list[tuple[torch.Tensor, ...]]:
    x, y, d = batch
    return [(x[d == k], y[d == k], d[d == k]) for k in (0, 1)]


def _grads(model: nn.Module, batch: object) -> tuple[torch.Tensor, list[torch.Tensor]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = model.training_step(batch, 0)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def _mixed_batch(n: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, 8, 8, generator=g)
    x[1::2] = 1 - x[1::2] * 0.5  # domain 1: another mean and spread
    return x, torch.randint(0, 10, (n,), generator=g), torch.tensor([0, 1] * (n // 2))


@pytest.mark.parametrize("variant", ["none", "layer2d", "group", "cosine"])
def test_separate_feed_has_the_mixed_objective_without_batch_statistics(variant: str) -> None:
    """Batch-independent nets: the separate step's loss and gradients equal the mixed step's."""
    torch.manual_seed(0)
    mixed = DigitsClassifier(variant=variant, feed="mixed", image_shape=(3, 8, 8))
    separate = DigitsClassifier(variant=variant, feed="separate", image_shape=(3, 8, 8))
    separate.load_state_dict(mixed.state_dict())
    batch = _mixed_batch()
    loss_m, grads_m = _grads(mixed, batch)
    loss_s, grads_s = _grads(separate, _split(batch))
    torch.testing.assert_close(loss_s, loss_m)
    for gs, gm in zip(grads_s, grads_m, strict=True):
        torch.testing.assert_close(gs, gm, rtol=1e-4, atol=1e-6)


def test_separate_feed_changes_batchnorm_training() -> None:
    """With a shared BN the same samples give another loss and other gradients: each domain is
    normalised with its own batch statistics instead of the mixture's."""
    torch.manual_seed(0)
    mixed = DigitsClassifier(variant="mixed", image_shape=(3, 8, 8))
    separate = DigitsClassifier(variant="separate", image_shape=(3, 8, 8))
    separate.load_state_dict(mixed.state_dict())
    batch = _mixed_batch()
    loss_m, grads_m = _grads(mixed, batch)
    loss_s, grads_s = _grads(separate, _split(batch))
    assert abs(loss_m.item() - loss_s.item()) > 1e-3
    assert not torch.allclose(grads_m[0], grads_s[0], rtol=1e-2, atol=1e-5)


def test_mixed_eval_uses_the_mixture_statistics() -> None:
    """After training with separate batches, the running mean of the first BN lies between the
    per-domain means (the mixture) and differs from both by more than the tolerance."""
    torch.manual_seed(0)
    model = DigitsClassifier(variant="separate", image_shape=(3, 8, 8), bn_momentum=None)
    x, y, d = _mixed_batch(64)
    conv, bn = model.net.features[0], model.net.features[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.training_step(_split((x, y, d)), 0)
    with torch.no_grad():
        h = conv(x)
    mean0 = h[d == 0].mean(dim=(0, 2, 3))
    mean1 = h[d == 1].mean(dim=(0, 2, 3))
    # cumulative average (momentum=None) over the two domain batches = the mixture's mean
    torch.testing.assert_close(bn.running_mean, (mean0 + mean1) / 2, rtol=1e-4, atol=1e-5)
    assert (mean0 - mean1).abs().max() > 0.05


def test_split_variant_routes_domains_in_train_and_eval() -> None:
    """split: a mixed batch gives each sample what its own domain-only batch gives."""
    torch.manual_seed(0)
    model = DigitsClassifier(variant="split", image_shape=(3, 8, 8))
    x, _, d = _mixed_batch()
    for train in (True, False):
        twin = copy.deepcopy(model).train(train)
        out = twin(x, d)
        for k in (0, 1):
            solo = copy.deepcopy(model).train(train)
            torch.testing.assert_close(out[d == k], solo(x[d == k], k), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="domain"):
        model(x)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_small_cnn_size(variant: str) -> None:
    model = DigitsClassifier(variant=variant, image_shape=(3, 8, 8))
    n = sum(p.numel() for p in model.net.parameters())
    assert 3_000 <= n <= 100_000
    assert model(torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 0, 1])).shape == (4, 10)


def test_small_cnn_rejects_unknown_norm() -> None:
    with pytest.raises(ValueError, match="norm"):
        SmallCNN((3, 8, 8), 10, norm="instance")
    with pytest.raises(ValueError, match="variant"):
        DigitsClassifier(variant="batch")


def test_class_sorted_batches() -> None:
    labels = torch.arange(10).repeat_interleave(20)
    sampler = ClassSortedBatchSampler(labels, batch_size=8, classes_per_batch=2, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 25
    seen = [i for b in batches for i in b]
    assert len(seen) == len(set(seen)) == 200
    for b in batches:
        counts = torch.bincount(labels[b], minlength=10)
        assert sorted(counts[counts > 0].tolist()) in ([4, 4], [8])
    ranks = [
        list(ClassSortedBatchSampler(labels, 8, 2, seed=3, sampler=_Rank(r))) for r in (0, 1)
    ]
    assert len(ranks[0]) == len(ranks[1]) == 12
    assert not {i for b in ranks[0] for i in b} & {i for b in ranks[1] for i in b}
    sampler.set_epoch(1)
    assert list(sampler) != batches
    with pytest.raises(ValueError, match="multiple"):
        ClassSortedBatchSampler(labels, batch_size=7, classes_per_batch=2)


class _Rank:
    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.num_replicas = 2


def test_single_domain_digits_grey_tanh() -> None:
    data = SingleDomainDigits(batch_size=8, grey=True, tanh_range=True)
    x, _, d = next(iter(data.train_dataloader()))
    assert x.shape == (8, 1, 8, 8) and data.image_shape == (1, 8, 8)
    assert x.min() >= -1 and x.max() <= 1 and x.min() < -0.9
    assert (d == 0).all()
    xt, yt = data.test_tensors()
    assert len(xt) == len(yt) == 359


# ---------------------------------------------------------------- report logic


def _records(sep_drop: float, split_gain: float) -> list[dict]:
    out = []
    for v, shift in (("mixed", 0.0), ("separate", -sep_drop), ("split", split_gain)):
        for s, noise in enumerate((-0.002, 0.0, 0.002)):
            a = 0.95 + shift + noise
            out.append(dict(variant=v, seed=s, acc_domain0=a, acc_domain1=a, acc=a))
    return out


def test_summary_and_verdict_follow_the_numbers() -> None:
    recs = _records(0.02, 0.01)
    summary = summarise(recs)
    assert summary["separate"]["acc"][0] == pytest.approx(0.93)
    assert summary["mixed"]["acc"][1] == pytest.approx(0.002)
    text = " ".join(verdict(recs, summary, ["a", "b"]))
    assert "`separate` < `mixed`: held" in text and "2.0 points below" in text
    assert "`split` >= `mixed`: held" in text and "3 of 3 seeds" in text
    flipped = _records(-0.02, -0.01)
    text = " ".join(verdict(flipped, summarise(flipped), ["a", "b"]))
    assert "did NOT hold" in text and "2.0 points above" in text
    assert "`split` >= `mixed`: did NOT hold" in text


# ---------------------------------------------------------------- the CLI scripts


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_domain_cli_fast_dev_run(tmp_path: Path, variant: str) -> None:
    from lightning_norms.recipes.two_domain import cli_main

    cli_main(args=_fit_args(tmp_path, "--model.variant", variant, "--data.image_size", "8"))
    record = json.loads((tmp_path / "out" / f"{variant}_seed0.json").read_text())
    assert record["variant"] == variant and record["feed"] == VARIANTS[variant][1]
    for key in ("acc_domain0", "acc_domain1", "acc"):
        assert 0.0 <= record[key] <= 1.0
    assert record["acc"] == pytest.approx((record["acc_domain0"] + record["acc_domain1"]) / 2)


def test_two_domain_cli_feed_override_links_batching(tmp_path: Path) -> None:
    from lightning_norms.recipes.two_domain import cli_main

    args = _fit_args(tmp_path, "--model.variant", "group", "--model.feed", "mixed")[1:]
    cli = cli_main(args=args, run=False)
    assert cli.datamodule.batching == "mixed" and cli.datamodule.batch_size == 64
    cli = cli_main(args=_fit_args(tmp_path, "--model.variant", "separate")[1:], run=False)
    assert cli.datamodule.batching == "separate" and cli.datamodule.batch_size == 32


def test_precise_bn_cli_fast_dev_run(tmp_path: Path) -> None:
    from lightning_norms.recipes.precise_bn import cli_main

    cli_main(args=_fit_args(tmp_path, "--precise_batches", "[1, 3]", "--data.image_size", "8"))
    (path,) = (tmp_path / "out").glob("*.json")
    record = json.loads(path.read_text())
    assert set(record["acc_precise"]) == {"1", "3"}
    assert 0.0 <= record["acc_ema"] <= 1.0


def test_small_batch_cli_fast_dev_run(tmp_path: Path) -> None:
    from lightning_norms.recipes.small_batch import cli_main

    args = ["--model.norm", "renorm", "--data.batch_size", "4", "--data.order", "class_sorted"]
    cli_main(args=_fit_args(tmp_path, *args))
    record = json.loads((tmp_path / "out" / "renorm_b4_class_sorted_seed0.json").read_text())
    assert 0.0 <= record["acc"] <= 1.0


@pytest.mark.parametrize("mode", ["alternating", "mixed", "split"])
def test_gan_cli_fast_dev_run(tmp_path: Path, mode: str) -> None:
    from lightning_norms.recipes.gan import cli_main

    cli_main(args=_fit_args(tmp_path, "--model.mode", mode))
    record = json.loads((tmp_path / "out" / f"{mode}_seed0.json").read_text())
    assert record["judge_acc"] > 0.8  # the judge itself must be a good digits classifier
    assert 1 <= record["classes_covered"] <= 10
    assert (tmp_path / "out" / f"{mode}_seed0.png").stat().st_size > 0


def test_gan_mmd_separates_distributions() -> None:
    from lightning_norms.recipes.gan import _mmd2

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(200, 4, generator=g), torch.randn(200, 4, generator=g)
    assert abs(_mmd2(a, b)) < 0.02
    assert _mmd2(a + 2, b) > 0.2


@pytest.mark.ddp
def test_two_domain_ddp_two_cpu_processes(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "recipes.two_domain", "fit",
        "--model.variant", "split", "--data.image_size", "8",
        "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu",
        "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0",
        "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
        "--trainer.enable_progress_bar", "false", "--output_dir", "out",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads((tmp_path / "out" / "split_seed0.json").read_text())
    assert record["world_size"] == 2 and record["steps"] == 3
    assert 0.0 <= record["acc"] <= 1.0


# ---------------------------------------------------------------- the report


def test_report_main_writes_three_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "demo"
    argv = ["report", "--output-dir", str(out), "--seeds", "2", "--epochs", "1"]
    argv += ["--max-steps", "2", "--jobs", "1", "--no-progress"]
    assert main(argv) == 0
    for name in ("results.json", "report.md", "accuracy.png"):
        assert (out / name).stat().st_size > 0
    records = json.loads((out / "results.json").read_text())
    assert all(tuple(r) == RECORD_KEYS for r in records)
    assert sorted((r["variant"], r["seed"]) for r in records) == sorted(
        (v, s) for v in VARIANTS for s in range(2)
    )
    report = (out / "report.md").read_text()
    assert "| mixed | batch | mixed |" in report and "## Verdict" in report
    assert str(out / "report.md") in capsys.readouterr().out
