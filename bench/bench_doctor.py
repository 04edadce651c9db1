"""Cost of ``BatchNormDoctor``: one Lightning training epoch with the doctor on vs off.

Run: ``python bench/bench_doctor.py [--threads 1] [--rounds 7] [--steps 300]``. A small CNN
(three conv-BN-ReLU blocks, 16/32/64 channels, 16x16 RGB inputs, batch 64, SGD) trains
``--steps`` steps on random data, CPU. Each round fits a fresh model (same seed) three times
in turn -- doctor off, doctor on, doctor off again (control) -- with the order rotated every
round. The time of one epoch is measured by a callback from ``on_train_epoch_start`` (before
the doctor's) to ``on_train_end`` (after the doctor's end-of-epoch report, table included), on
the main thread's CPU clock with one thread, so time spent preempted by other jobs does not
count. Printed: the median epoch time of each configuration and the median of the per-round
ratios ``on / off``; the control row ``off / off`` shows the noise floor of the run.
``--conv-bias`` gives every conv a bias, so every BN layer is fed by a biased conv: the worst
case of the ``redundant_bias`` check (a forward hook on each biased conv, flagged each epoch).

Target (issue 6): doctor on <= 1.1x off.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import time
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_norms.callbacks import BatchNormDoctor


class _Net(LightningModule):
    def __init__(self, conv_bias: bool = False) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        c_in = 3
        for c in (16, 32, 64):
            conv = nn.Conv2d(c_in, c, 3, padding=1, bias=conv_bias)
            blocks += [conv, nn.BatchNorm2d(c), nn.ReLU()]
            blocks.append(nn.MaxPool2d(2) if c != 64 else nn.AdaptiveAvgPool2d(1))
            c_in = c
        self.body = nn.Sequential(*blocks, nn.Flatten(), nn.Linear(64, 10))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.body(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class _EpochTimer(Callback):
    def __init__(self) -> None:
        self.start = 0.0
        self.seconds = 0.0

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.start = time.thread_time()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.seconds = time.thread_time() - self.start


def _epoch_seconds(loader: DataLoader, doctor: bool, steps: int, conv_bias: bool) -> float:
    torch.manual_seed(0)
    timer = _EpochTimer()
    callbacks: list[Any] = [timer, BatchNormDoctor()] if doctor else [timer]
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        limit_train_batches=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(_Net(conv_bias), loader)
    return timer.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--conv-bias", action="store_true", help="convs with a bias feed BN")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    gen = torch.Generator().manual_seed(0)
    n = 64 * args.steps
    data = TensorDataset(torch.randn(n, 3, 16, 16, generator=gen), torch.randint(0, 10, (n,)))
    loader = DataLoader(data, batch_size=64, shuffle=True)

    _epoch_seconds(loader, True, 20, args.conv_bias)  # warm-up
    configs = ["off", "on", "control"]
    times: dict[str, list[float]] = {c: [] for c in configs}
    for r in range(args.rounds):
        for c in configs[r % 3 :] + configs[: r % 3]:
            times[c].append(_epoch_seconds(loader, c == "on", args.steps, args.conv_bias))

    ratio_on = statistics.median(a / b for a, b in zip(times["on"], times["off"], strict=True))
    ratio_ctl = statistics.median(
        a / b for a, b in zip(times["control"], times["off"], strict=True)
    )
    print(
        f"threads={args.threads} rounds={args.rounds} steps={args.steps} "
        f"conv_bias={args.conv_bias} "
        "(one training epoch, CPU thread time)"
    )
    print(f"{'case':<28}{'epoch s':>10}{'ms/step':>10}{'ratio':>8}")
    for name, key, ratio in [
        ("doctor off", "off", 1.0),
        ("doctor on", "on", ratio_on),
        ("control: off again", "control", ratio_ctl),
    ]:
        med = statistics.median(times[key])
        print(f"{name:<28}{med:>10.3f}{1000 * med / args.steps:>10.2f}{ratio:>8.3f}")


if __name__ == "__main__":
    main()
