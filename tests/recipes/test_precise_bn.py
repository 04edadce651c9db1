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
