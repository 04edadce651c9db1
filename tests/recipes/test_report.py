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
        assert args.seeds == (5 if name == "two_domain" else 3)
        assert args.output_dir == ("runs/demo" if name == "two_domain" else f"runs/{name}")
    with pytest.raises(SystemExit):
        report.parse_args(["report", "--study", "sweeps"])
