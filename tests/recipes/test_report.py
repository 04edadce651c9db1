"""``lightning-norms report``: the three files of the demo, its defaults, the study table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_norms.recipes.models import VARIANTS
from lightning_norms.recipes.report import main
from lightning_norms.recipes.two_domain import RECORD_KEYS

pytestmark = pytest.mark.filterwarnings("ignore")


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


def test_every_study_is_in_the_table_with_its_defaults() -> None:
    """``--study`` offers exactly the table's studies; each gets its own epochs, seeds and folder,
    and runs its own module's ``run_study``."""
    from lightning_norms.recipes import gan, lecture, precise_bn, report, small_batch, two_domain

    modules = {"two_domain": two_domain, "precise_bn": precise_bn, "small_batch": small_batch,
               "gan": gan, "lecture": lecture}  # fmt: skip
    assert set(report.STUDIES) == set(modules)
    for name, module in modules.items():
        args = report.parse_args(["report", "--study", name])
        study = report.STUDIES[name]
        assert study.run is module.run_study and args.epochs == module.EPOCHS
        assert args.seeds == getattr(module, "SEEDS", getattr(module, "DEMO_SEEDS", None)) == 5
        assert args.output_dir == ("runs/demo" if name == "two_domain" else f"runs/{name}")
    with pytest.raises(SystemExit):
        report.parse_args(["report", "--study", "sweeps"])


def test_parser_constants_match_the_study_modules() -> None:
    """``--help`` answers without importing the studies: its constants are written out in
    ``report.py``; here they meet the modules' own."""
    from lightning_norms.recipes import (
        gan,
        lecture,
        models,
        precise_bn,
        report,
        small_batch,
        two_domain,
    )

    assert tuple(models.VARIANTS) == report.VARIANT_NAMES
    assert report.HEADLINE == two_domain.HEADLINE
    assert report.DEMO_IMAGE_SIZE == two_domain.DEMO_IMAGE_SIZE
    assert report.STUDIES["two_domain"].seeds == two_domain.DEMO_SEEDS
    for module in (gan, lecture, precise_bn, small_batch):
        study = report.STUDIES[module.__name__.rpartition(".")[2]]
        assert (study.epochs, study.seeds) == (module.EPOCHS, module.SEEDS)


_HELP_PROBE = """
import sys, time
from lightning_norms.recipes.report import main
start = time.perf_counter()
try:
    main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
seconds = time.perf_counter() - start
heavy = sorted(m for m in ("torch", "lightning", "lightning.pytorch") if m in sys.modules)
print(f"@@ code={code} heavy={','.join(heavy) or '-'} seconds={seconds:.3f}")
"""


@pytest.mark.parametrize("argv", [["--help"], ["report", "--help"], ["--version"]])
def test_help_and_version_import_neither_torch_nor_lightning(argv: list[str]) -> None:
    """The real check of "``--help`` in under 2 s": torch and Lightning stay unimported; the
    help names every study and fits 80 columns."""
    import os
    import subprocess
    import sys
    import time

    from lightning_norms import __version__
    from lightning_norms.recipes.report import STUDIES

    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _HELP_PROBE, *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "80"},
    )
    wall = time.perf_counter() - start
    out, probe = done.stdout.rsplit("@@ ", 1)
    assert probe.split()[:2] == ["code=0", "heavy=-"], done.stderr
    assert float(probe.split("seconds=")[1]) < 2.0
    assert wall < 30.0  # interpreter start included, on a loaded 2-core machine
    if argv == ["--version"]:
        assert out.strip() == f"lightning-norms {__version__}"
        return
    assert all(name in out for name in STUDIES)
    assert "run the two-domain study" not in out
    assert max(map(len, out.splitlines())) <= 80


def test_grid_progress_reads_runs_done_and_time_left(capsys: pytest.CaptureFixture) -> None:
    """``demo: 3/15 runs done |██  | 20% [00:12 elapsed, ~00:48 left]``, not ``epoch/s``; a run that
    stops early (``--max-steps``) still counts its epochs as done."""
    from lightning_norms.recipes.runner import GridProgress

    progress = GridProgress(3, 2, "demo")
    first = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[0]
    assert first.startswith("demo: 0/3 runs done |")  # named from the first frame on
    for key in (0, 0, 1):
        progress.put(key)
    progress.run_done(0)
    progress.run_done(1)  # one epoch short: stopped early
    progress.put(2)
    progress.put(2)
    progress.put(2)  # more epochs than the bar's share: ignored
    progress.close()
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("demo: 2/3 runs done |") and "| 100% [" in last
    assert " elapsed, ~" in last and last.endswith(" left]")
    assert "epoch/s" not in last and "it/s" not in last and "s/epoch" not in last
    assert (progress.runs_done, progress.epochs_done) == (2, 6)


def test_results_table_prints_each_test_metric_once() -> None:
    """The two-domain recipe's test: three epoch-end accuracies that Lightning repeats under
    DataLoader 0 and 1, printed once each; a per-DataLoader metric keeps its columns."""
    from lightning_norms.recipes.runner import results_table

    shared = {"test/acc_domain0": 0.9, "test/acc_domain1": 0.8125, "test/acc": 0.85}
    lines = results_table([dict(shared), dict(shared)]).splitlines()
    assert lines == [
        "test metric       value",
        "test/acc_domain0  0.9000",
        "test/acc_domain1  0.8125",
        "test/acc          0.8500",
    ]
    both = [{**shared, "loss/dataloader_idx_0": 0.5}, {**shared, "loss/dataloader_idx_1": 0.25}]
    lines = results_table(both).splitlines()
    assert lines[0].split()[:3] == ["test", "metric", "value"] and "DataLoader 1" in lines[0]
    assert lines[-1].split() == ["loss", "0.5000", "0.2500"]
    assert sum("test/acc_domain0" in line for line in lines) == 1
