"""Shared pieces of the recipe tests: a quick ``fit`` command line and the report's options."""

from __future__ import annotations

import argparse
from pathlib import Path


def fit_args(tmp_path: Path, *extra: str) -> list[str]:
    """``fit`` for two steps (``fast_dev_run``), quiet, writing under ``tmp_path``."""
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


def study_args(tmp_path: Path, **overrides: object) -> argparse.Namespace:
    """The report's options for a tiny study run into ``tmp_path`` (one process, one thread)."""
    options: dict[str, object] = dict(
        output_dir=str(tmp_path), seeds=3, epochs=1, jobs=1, threads=1, accelerator="cpu",
        max_steps=-1, no_progress=True,
    )  # fmt: skip
    options.update(overrides)
    return argparse.Namespace(**options)
