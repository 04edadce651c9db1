"""The lecture study: its CLI, steps to the target and the sigmoid network with SGD."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.recipes._cli import fit_args

pytestmark = pytest.mark.filterwarnings("ignore")


def test_lecture_cli_fast_dev_run(tmp_path: Path) -> None:
    from lightning_norms.recipes.lecture import cli_main

    args = ["--model.variant", "none", "--model.activation", "sigmoid", "--model.lr", "0.01"]
    cli_main(args=fit_args(tmp_path, *args))
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
