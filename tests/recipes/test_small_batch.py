"""The small-batch study: its CLI with micro-batches and class-sorted batches, and its report's
verdicts from fixed records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_norms.recipes import small_batch
from lightning_norms.recipes.writer import write_report
from tests.recipes._cli import fit_args, study_args

pytestmark = pytest.mark.filterwarnings("ignore")


def test_small_batch_cli_fast_dev_run(tmp_path: Path) -> None:
    from lightning_norms.recipes.small_batch import cli_main

    args = ["--model.norm", "renorm", "--data.batch_size", "8", "--data.order", "class_sorted"]
    cli_main(args=fit_args(tmp_path, *args, "--model.micro_batches", "2"))
    record = json.loads((tmp_path / "out" / "renorm_b4_class_sorted_seed0.json").read_text())
    assert record["step_batch"] == 8
    assert 0.0 <= record["acc"] <= 1.0


def test_small_batch_report_gives_verdicts_from_fixed_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The study renders its verdicts with the shared paired rule: fed fixed records, the
    report says exactly what the numbers support, and draws the plot."""

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
    paths = write_report(small_batch.run_study(study_args(tmp_path)), tmp_path / "sb")
    text = paths["report"].read_text()
    assert "**`renorm` > `batch` at 4 per device, shuffled: held.**" in text
    assert "**`renorm` > `batch` at 32 per device, class-sorted: within noise.**" in text
    assert paths["plot"] == tmp_path / "sb" / "plot.png" and paths["plot"].stat().st_size > 0


def test_small_batch_plot_fits_its_axis_to_a_one_point_effect(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A +0.7-point effect must be visible: the y axis spans the dots, not 0-100, and the
    caption says what 4 and 32 are and what the marks are."""
    from matplotlib.collections import PathCollection
    from matplotlib.figure import Figure

    figures: list[Figure] = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: figures.append(fig))
    records = [
        {"norm": n, "batch_size": b, "order": o, "seed": s,
         "acc": 0.979 + 0.007 * (n == "renorm") + 0.001 * s}
        for n in small_batch.NORMS for b, o in small_batch.SETTINGS for s in range(3)
    ]  # fmt: skip
    small_batch.plot(records, tmp_path / "p.png", "the command")
    ax = figures[0].axes[0]  # 4 per device, shuffled: the panel of the claimed effect
    low, high = ax.get_ylim()
    assert 97.0 < low < 97.9 and 98.8 < high < 99.5
    assert len(figures[0].axes) == len(small_batch.SETTINGS)
    text = " ".join(t.get_text() for t in figures[0].texts)
    assert "per device = samples" in text and "whiskers" in text and "the command" in text
    dots = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert len({tuple(c.get_facecolor()[0]) for c in dots}) == 3  # one colour per norm
