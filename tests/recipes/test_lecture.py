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


def test_lecture_plot_has_a_legend_and_a_labelled_target_on_every_panel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from matplotlib.figure import Figure

    from lightning_norms.recipes import lecture

    figures: list[Figure] = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: figures.append(fig))
    records = [
        {"variant": v, "activation": act, "lr": lr, "seed": s, "target": 0.9,
         "curve": [(10, 0.5), (20, 0.95 if v == "mixed" else 0.1)]}
        for act, lr in (("relu", 0.003), ("sigmoid", 0.003)) for v in ("mixed", "none")
        for s in range(2)
    ]  # fmt: skip
    lecture.plot(records, tmp_path / "p.png")
    axes = figures[0].axes
    assert len(axes) == 2
    for ax in axes:
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert labels == ["BN (mean of 2)", "no BN (mean of 2)", "target 90 %"]
