"""The two-domain study: its CLI for every variant (also under DDP), the table and verdicts from
fixed records, and the report's run giving exactly what the CLI gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_norms.recipes.models import VARIANTS
from lightning_norms.recipes.two_domain import summarise, verdict
from tests.recipes._cli import fit_args

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.filterwarnings("ignore")


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


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_domain_cli_fast_dev_run(tmp_path: Path, variant: str) -> None:
    from lightning_norms.recipes.two_domain import cli_main

    cli_main(args=fit_args(tmp_path, "--model.variant", variant, "--data.image_size", "8"))
    record = json.loads((tmp_path / "out" / f"{variant}_seed0.json").read_text())
    assert record["variant"] == variant and record["feed"] == VARIANTS[variant][1]
    for key in ("acc_domain0", "acc_domain1", "acc"):
        assert 0.0 <= record[key] <= 1.0
    assert record["acc"] == pytest.approx((record["acc_domain0"] + record["acc_domain1"]) / 2)


def test_two_domain_cli_feed_override_links_batching(tmp_path: Path) -> None:
    from lightning_norms.recipes.two_domain import cli_main

    args = fit_args(tmp_path, "--model.variant", "group", "--model.feed", "mixed")[1:]
    cli = cli_main(args=args, run=False)
    assert cli.datamodule.batching == "mixed" and cli.datamodule.batch_size == 64
    cli = cli_main(args=fit_args(tmp_path, "--model.variant", "separate")[1:], run=False)
    assert cli.datamodule.batching == "separate" and cli.datamodule.batch_size == 32


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
        cli_main(args=fit_args(tmp_path, "--threads", "1")[1:], run=False)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


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


def test_report_run_is_the_cli_run(tmp_path: Path) -> None:
    """The report trains through the recipe's own CLI: a run from options (``run_recipe``) gives
    the record that ``python -m recipes.two_domain fit`` with the same options writes."""
    from lightning_norms.recipes.runner import run_recipe
    from lightning_norms.recipes.two_domain import cli_main

    steps = ["--trainer.max_steps", "3", "--trainer.limit_val_batches", "0"]
    args = ["fit", "--model.variant", "split", "--seed_everything", "1", *steps]
    args += ["--trainer.logger", "false", "--trainer.enable_checkpointing", "false"]
    args += ["--trainer.enable_progress_bar", "false", "--output_dir", str(tmp_path / "cli")]
    cli_main(args=[*args, "--trainer.default_root_dir", str(tmp_path)])
    from_cli = json.loads((tmp_path / "cli" / "split_seed1.json").read_text())
    config = {
        "model": {"variant": "split"}, "seed_everything": 1, "output_dir": str(tmp_path / "run"),
        "trainer": {"max_steps": 3, "limit_val_batches": 0, "default_root_dir": str(tmp_path)},
    }  # fmt: skip
    record = run_recipe(cli_main, config)
    assert record["seconds"] > 0 and record["steps"] == from_cli["steps"] == 3
    assert {k: record[k] for k in from_cli} == from_cli
    assert json.loads((tmp_path / "run" / "split_seed1.json").read_text()) == from_cli
