"""One small Lightning model and Trainer for the callback tests (Lightning's BoringModel idea).

``BoringNormModel`` wraps any ``body`` (default: a conv -> BatchNorm2d -> ReLU -> pool -> linear
net on 3x6x6 images) with a cross-entropy ``training_step``, a ``validation_step`` that logs
``val_loss``, SGD, and a record of what each training step saw (``train_steps``, every BN
layer's ``training`` flag). ``boring_data`` makes labelled images whose channel means sit far
from zero, so a lagging EMA is visible; ``boring_trainer`` is a quiet single-CPU ``Trainer``.
The fixtures ``boring_model`` and ``boring_trainer`` in ``conftest.py`` hand these out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, TensorDataset

CHANNELS = 3
SIZE = 6
CLASSES = 2


def boring_body(norm: nn.Module | None = None, width: int = 8) -> nn.Sequential:
    """Conv (no bias) -> ``norm`` (default ``BatchNorm2d(width)``) -> ReLU -> pool -> linear."""
    return nn.Sequential(
        nn.Conv2d(CHANNELS, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width) if norm is None else norm,
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, CLASSES),
    )


def boring_data(n: int = 64, seed: int = 0, offset: float = 5.0) -> TensorDataset:
    """``n`` images ``[3, 6, 6]`` around ``offset`` with a learnable binary label."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, CHANNELS, SIZE, SIZE, generator=g) * 2.0 + offset
    y = (x[:, 0].mean((1, 2)) > offset).long()
    return TensorDataset(x, y)


def boring_loader(n: int = 64, batch_size: int = 16, seed: int = 0, **kw: Any) -> DataLoader:
    """A ``DataLoader`` over ``boring_data(n, seed)`` (``shuffle`` and the rest via ``kw``)."""
    return DataLoader(boring_data(n, seed), batch_size=batch_size, **kw)


class BoringNormModel(LightningModule):
    """A LightningModule around ``body`` that records every training step's BN modes."""

    def __init__(self, body: nn.Module | None = None, lr: float = 0.05) -> None:
        super().__init__()
        self.body = boring_body() if body is None else body
        self.lr = lr
        self.train_steps = 0
        self.bn_modes: list[list[bool]] = []

    def bn_layers(self) -> list[_BatchNorm]:
        return [m for m in self.modules() if isinstance(m, _BatchNorm)]

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        self.train_steps += 1
        self.bn_modes.append([m.training for m in self.bn_layers()])
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch: list[Tensor], batch_idx: int) -> None:
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def boring_trainer(root: Path, **kw: Any) -> Trainer:
    """A quiet single-CPU ``Trainer`` writing under ``root``; ``kw`` overrides any default."""
    defaults: dict[str, Any] = {
        "default_root_dir": root,
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return Trainer(**{**defaults, **kw})
