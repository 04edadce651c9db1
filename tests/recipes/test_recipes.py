"""Recipes: every LightningCLI script runs (fast_dev_run), the two-domain study runs under DDP,
the report writes its three files, and the pieces the study's claims rest on hold numerically."""

from __future__ import annotations

import argparse
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

from lightning_norms.recipes.data import ClassSortedBatchSampler, SingleDomainDigits
from lightning_norms.recipes.models import VARIANTS, DigitsClassifier, SmallCNN
from lightning_norms.recipes.report import main
from lightning_norms.recipes.two_domain import RECORD_KEYS, summarise, verdict

REPO_ROOT = Path(__file__).resolve().parents[2]

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


@pytest.mark.parametrize(
    ("feed", "micro_batches"), [("separate", 1), ("mixed", 4), ("separate", 2)]
)
def test_renorm_warmup_counts_training_steps(feed: str, micro_batches: int) -> None:
    """BatchRenorm's clip limits ramp over `renorm_warmup` optimizer steps, however many times a
    step calls the layer (one forward per domain, micro-batches): after 2 of 4 warm-up steps
    every layer is half-way, r_max = 1 + (3 - 1) / 2 = 2 and d_max = 5 / 2 (Ioffe 2017)."""
    from lightning_norms.functional import renorm_limits
    from lightning_norms.renorm import BatchRenorm1d, BatchRenorm2d

    torch.manual_seed(0)
    model = DigitsClassifier(
        variant="renorm", feed=feed, renorm_warmup=4, micro_batches=micro_batches,
        image_shape=(3, 8, 8),
    )  # fmt: skip
    batch = _mixed_batch(32)
    for _ in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.training_step(_split(batch) if feed == "separate" else batch, 0)
    layers = [m for m in model.modules() if isinstance(m, (BatchRenorm1d, BatchRenorm2d))]
    assert len(layers) == 4
    for m in layers:
        r_max, d_max = renorm_limits(m.r_max, m.d_max, m.num_batches_tracked, m.warmup_steps)
        assert float(r_max) == pytest.approx(2.0) and float(d_max) == pytest.approx(2.5)


def test_micro_batches_normalise_each_chunk_on_its_own() -> None:
    """micro_batches=k: the loss is the mean of the k chunks' losses, each chunk through BN alone
    (its own batch statistics), as k devices without synced BN."""
    torch.manual_seed(0)
    model = DigitsClassifier(variant="mixed", micro_batches=4, image_shape=(3, 8, 8))
    x, y, d = _mixed_batch(32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = model.training_step((x, y, d), 0)
    chunks = zip(x.chunk(4), y.chunk(4), strict=True)
    ref = torch.stack([nn.functional.cross_entropy(model.net(xc), yc) for xc, yc in chunks]).mean()
    torch.testing.assert_close(loss, ref)
    whole = nn.functional.cross_entropy(model.net(x), y)
    assert abs(whole.item() - loss.item()) > 1e-3
    with pytest.raises(ValueError, match="micro_batches"):
        model.training_step((x[:30], y[:30], d[:30]), 0)


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
    ranks = [list(ClassSortedBatchSampler(labels, 8, 2, seed=3, sampler=_Rank(r))) for r in (0, 1)]
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
            a = 0.95 + shift + noise + (0.001 * s if v != "mixed" else 0.0)
            out.append(dict(variant=v, seed=s, acc_domain0=a, acc_domain1=a, acc=a))
    return out


def test_summary_and_verdict_follow_the_numbers() -> None:
    recs = _records(0.02, 0.01)
    summary = summarise(recs)
    assert summary["separate"]["acc"][0] == pytest.approx(0.931)
    assert summary["mixed"]["acc"][1] == pytest.approx(0.002)
    text = " ".join(verdict(recs, summary, ["a", "b"]))
    # paired differences separate - mixed: -0.020, -0.019, -0.018 per seed
    assert "**`separate` < `mixed`: held.** Paired difference -1.9 points (SE 0.1" in text
    assert "the claimed sign on 3 of 3 seeds (per seed -2.0 to -1.8)" in text
    assert "**`split` > `mixed`: held.**" in text
    flipped = _records(-0.02, -0.01)
    text = " ".join(verdict(flipped, summarise(flipped), ["a", "b"]))
    assert "**`separate` < `mixed`: not shown (the opposite held).**" in text
    assert "Paired difference +2.1 points" in text and "on 0 of 3 seeds" in text
    assert "**`split` > `mixed`: not shown (the opposite held).**" in text


def test_verdict_needs_paired_seeds_beyond_noise() -> None:
    """One seed never shows anything; a mean gap with mixed signs or inside 2 SE is noise."""
    one = [r for r in _records(0.02, 0.01) if r["seed"] == 0]
    text = " ".join(verdict(one, summarise(one), ["a", "b"]))
    assert "**`separate` < `mixed`: not shown.**" in text and "held" not in text
    noisy = _records(0.0, 0.0)
    for r, bump in zip(
        [r for r in noisy if r["variant"] == "separate"], (-0.03, 0.02, 0.005), strict=True
    ):
        r["acc"] += bump
    text = " ".join(verdict(noisy, summarise(noisy), ["a", "b"]))
    assert "**`separate` < `mixed`: within noise.**" in text


@pytest.mark.parametrize(
    ("diffs", "direction", "expected"),
    [
        ([0.02, 0.03, 0.025, 0.01, 0.04], 1, "held"),  # 5/5, t = 5.2
        ([0.02, 0.03, 0.025, 0.01, -0.001], 1, "held"),  # 4/5, t = 3.5
        ([0.05, 0.04, -0.01, -0.01, 0.06], 1, "within noise"),  # 3/5 seeds
        ([0.06, 0.001, 0.002, 0.001, 0.001], 1, "within noise"),  # 5/5 but t = 1.1
        ([-0.02, -0.03, -0.025], 1, "not shown (the opposite held)"),
        ([-0.02, -0.03, -0.025], -1, "held"),
        ([0.5, 0.4], 1, "not shown"),  # two seeds: no verdict
        ([0.01, 0.01, 0.01], 1, "held"),  # identical gaps: SE 0
    ],
)
def test_paired_verdict_rule(diffs: list[float], direction: int, expected: str) -> None:
    import statistics

    from lightning_norms.recipes.verdict import paired

    c = paired("claim", diffs, direction)
    assert c.verdict == expected
    assert c.mean == pytest.approx(statistics.fmean(diffs))
    if len(diffs) > 2 and len(set(diffs)) > 1:
        se = statistics.stdev(diffs) / len(diffs) ** 0.5
        assert c.se == pytest.approx(se) and c.t == pytest.approx(c.mean / se)
        from scipy.stats import ttest_1samp

        ref = ttest_1samp(diffs, 0.0, alternative="greater" if direction == 1 else "less")
        assert c.p == pytest.approx(ref.pvalue)


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

    args = ["--model.norm", "renorm", "--data.batch_size", "8", "--data.order", "class_sorted"]
    cli_main(args=_fit_args(tmp_path, *args, "--model.micro_batches", "2"))
    record = json.loads((tmp_path / "out" / "renorm_b4_class_sorted_seed0.json").read_text())
    assert record["step_batch"] == 8
    assert 0.0 <= record["acc"] <= 1.0


@pytest.mark.parametrize("mode", ["alternating", "mixed", "split"])
def test_gan_cli_fast_dev_run(tmp_path: Path, mode: str) -> None:
    from lightning_norms.recipes.gan import cli_main

    cli_main(args=_fit_args(tmp_path, "--model.mode", mode))
    record = json.loads((tmp_path / "out" / f"{mode}_seed0.json").read_text())
    assert record["judge_acc"] > 0.8  # the judge itself must be a good digits classifier
    assert 1 <= record["classes_covered"] <= 10
    assert (tmp_path / "out" / f"{mode}_seed0.png").stat().st_size > 0


def test_gan_split_discriminator_shares_its_affine() -> None:
    """`split` must not hand the real/fake label to the discriminator through a per-kind shift:
    with the same input as real and as fake, the split layers give the same output (per-kind
    statistics of identical batches are identical, and the affine is shared)."""
    from lightning_norms.domain_bn import DomainBatchNorm2d
    from lightning_norms.recipes.gan import Discriminator

    torch.manual_seed(0)
    disc = Discriminator((1, 8, 8), width=8, split=True)
    layers = [m for m in disc.modules() if isinstance(m, DomainBatchNorm2d)]
    assert layers and all(m.shared_affine for m in layers)
    for m in layers:  # a trained-looking affine: the domains' shifts would differ if per-domain
        m.weight.data.uniform_(0.5, 1.5)
        m.bias.data.uniform_(-1, 1)
    x = torch.randn(6, 1, 8, 8)
    import lightning_norms as ln

    with ln.domain(disc, torch.tensor([0, 0, 0, 1, 1, 1])):
        out = disc(torch.cat([x[:3], x[:3]]))
    torch.testing.assert_close(out[:3], out[3:])


def test_recipe_help_lists_every_choice(capsys: pytest.CaptureFixture) -> None:
    from lightning_norms.recipes.two_domain import cli_main

    with pytest.raises(SystemExit):
        cli_main(args=["fit", "--help"])
    text = capsys.readouterr().out
    assert "{mixed,separate,split,renorm,layer2d,group,cosine,none}" in text
    assert "--threads" in text


def test_recipe_cli_sets_the_thread_count(tmp_path: Path) -> None:
    from lightning_norms.recipes.two_domain import cli_main

    before = torch.get_num_threads()
    try:
        cli_main(args=_fit_args(tmp_path, "--threads", "1")[1:], run=False)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_lecture_cli_fast_dev_run(tmp_path: Path) -> None:
    from lightning_norms.recipes.lecture import cli_main

    args = ["--model.variant", "none", "--model.activation", "sigmoid", "--model.lr", "0.01"]
    cli_main(args=_fit_args(tmp_path, *args))
    record = json.loads((tmp_path / "out" / "none_sigmoid_lr0.01_seed0.json").read_text())
    assert record["variant"] == "none" and record["activation"] == "sigmoid"
    assert 0.0 <= record["acc"] <= 1.0


def test_lecture_steps_to_target_and_sigmoid_net() -> None:
    from lightning_norms.recipes.lecture import LectureClassifier, steps_to

    assert steps_to([(10, 0.5), (20, 0.95)], 0.9) == 20
    assert steps_to([(10, 0.5)], 0.9) is None
    model = LectureClassifier(variant="none", activation="sigmoid", image_shape=(3, 8, 8))
    acts = [m for m in model.modules() if isinstance(m, (nn.ReLU, nn.Sigmoid))]
    assert acts and all(isinstance(m, nn.Sigmoid) for m in acts)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    opt = model.configure_optimizers()
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9


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
    argv += ["--max-steps", "2", "--jobs", "1", "--no-progress", "--variants", "all"]
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


def test_report_demo_defaults_are_the_headline_over_five_seeds() -> None:
    from lightning_norms.recipes import report, two_domain

    args = report.parse_args(["report"])
    assert args.variants == ["mixed", "separate", "split"] and args.seeds == 5
    assert args.epochs == 15 and args.output_dir == "runs/demo"
    assert report.STUDIES["two_domain"].run is two_domain.run_study


def _study_args(tmp_path: Path) -> argparse.Namespace:
    return argparse.Namespace(
        output_dir=str(tmp_path), seeds=3, epochs=1, jobs=1, threads=1, accelerator="cpu",
        max_steps=-1, no_progress=True,
    )  # fmt: skip


def test_study_reports_give_verdicts_from_fixed_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every study renders its verdicts with the shared paired rule: fed fixed records, the
    small-batch and GAN reports say exactly what the numbers support, and draw the plot."""
    from lightning_norms.recipes import gan, small_batch
    from lightning_norms.recipes.writer import write_report

    monkeypatch.setattr(small_batch, "SETTINGS", ((4, "shuffled"), (32, "class_sorted")))
    monkeypatch.setattr(small_batch, "NORMS", {"batch": "mixed", "renorm": "renorm"})
    recs = [
        {"norm": n, "batch_size": b, "order": o, "seed": s,
         "acc": 0.9 + (0.01 + 0.001 * s if n == "renorm" and b == 4 else 0.0)
         + (0.02 * (-1) ** s if n == "renorm" and b == 32 else 0.0)}
        for n in ("batch", "renorm") for b, o in ((4, "shuffled"), (32, "class_sorted"))
        for s in range(3)
    ]  # fmt: skip
    monkeypatch.setattr(small_batch, "run_grid", lambda *a, **k: (recs, 1.0))
    paths = write_report(small_batch.run_study(_study_args(tmp_path)), tmp_path / "sb")
    text = paths["report"].read_text()
    assert "**`renorm` > `batch` at 4 per device, shuffled: held.**" in text
    assert "**`renorm` > `batch` at 32 per device, class-sorted: within noise.**" in text
    assert paths["plot"] == tmp_path / "sb" / "plot.png" and paths["plot"].stat().st_size > 0

    records = [
        {"mode": m, "seed": s, "mmd": {"alternating": 0.02, "mixed": 0.019, "split": 0.03}[m]
         + 0.001 * s * (m == "mixed"), "confidence": 0.7, "classes_covered": 10,
         "effective_classes": 9.0, "real_confidence": 0.98, "real_classes_covered": 10,
         "real_effective_classes": 10.0, "real_mmd": 0.0}
        for m in ("alternating", "mixed", "split") for s in range(3)
    ]  # fmt: skip
    monkeypatch.setattr(gan, "run_grid", lambda *a, **k: (records, 1.0))
    paths = write_report(gan.run_study(_study_args(tmp_path)), tmp_path / "gan")
    text = paths["report"].read_text()
    # mixed - alternating per seed: -1, 0, +1 (x 1e-3): no sign majority; split: +10 on 3/3
    assert "**`mixed` MMD² < `alternating` MMD²: within noise.**" in text
    assert "**`split` MMD² < `alternating` MMD²: not shown (the opposite held).**" in text
