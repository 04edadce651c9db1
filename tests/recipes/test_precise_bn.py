"""The PreciseBN recipe: its CLI compares EMA and recomputed statistics after ``fit``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.recipes._cli import fit_args

pytestmark = pytest.mark.filterwarnings("ignore")


def test_precise_bn_cli_fast_dev_run(tmp_path: Path) -> None:
    from lightning_norms.recipes.precise_bn import cli_main

    cli_main(args=fit_args(tmp_path, "--precise_batches", "[1, 3]", "--data.image_size", "8"))
    (path,) = (tmp_path / "out").glob("*.json")
    record = json.loads(path.read_text())
    assert set(record["acc_precise"]) == {"1", "3"}
    assert 0.0 <= record["acc_ema"] <= 1.0


def test_precise_bn_plot_draws_ema_and_precise_apart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EMA and PreciseBN dots differ in colour, and the caption explains `m`."""
    from matplotlib.collections import PathCollection
    from matplotlib.figure import Figure

    from lightning_norms.recipes import precise_bn

    figures: list[Figure] = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: figures.append(fig))
    records = [
        {"lr": lr, "bn_momentum": 0.1, "seed": s, "acc_ema": 0.5,
         "acc_precise": {str(n): 0.9 for n in precise_bn.DEFAULT_PRECISE_BATCHES}}
        for lr in (1e-3, 3e-2) for s in range(3)
    ]  # fmt: skip
    precise_bn.plot(records, tmp_path / "p.png")
    (ax,) = figures[0].axes
    dots = [c for c in ax.collections if isinstance(c, PathCollection)]
    colours = [tuple(c.get_facecolor()[0]) for c in dots]
    assert len(colours) == 4 and colours[0] != colours[1] and colours[0] == colours[2]
    assert "m = BN momentum" in " ".join(t.get_text() for t in figures[0].texts)
