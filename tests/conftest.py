"""Shared test configuration: one torch thread per pytest worker (the suite runs with -n 2)."""

import functools
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

from tests._boring import BoringNormModel, boring_trainer

torch.set_num_threads(1)
os.environ.setdefault("PYTHONHASHSEED", "0")


@pytest.fixture
def boring_model() -> BoringNormModel:
    """A fresh ``BoringNormModel`` (conv -> BatchNorm2d -> ReLU -> linear), seeded."""
    torch.manual_seed(0)
    return BoringNormModel()


@pytest.fixture
def make_trainer(tmp_path: Path) -> Callable[..., Trainer]:
    """``make_trainer(**kw)``: a quiet single-CPU ``Trainer`` under ``tmp_path``."""
    return functools.partial(boring_trainer, tmp_path)
