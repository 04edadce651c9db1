"""EMA running statistics vs PreciseBN: how far the EMA lags, and how many samples fix it.

BatchNorm's running averages are an EMA over batches taken while the weights move, so at the
end of training they describe a mixture of past networks. "Precise BN" freezes the weights
and recomputes the population statistics exactly over many training batches
(``lightning_norms.stats.recompute_bn_stats``). This recipe trains the BN variant of the
two-domain CNN (``--model.variant mixed`` by default; ``split`` recomputes per domain) and after
``fit`` tests the same weights with

* the EMA running statistics (``acc_ema``), and
* PreciseBN statistics recomputed over ``n`` training batches for each ``n`` in
  ``--precise_batches`` (``acc_precise[n]``: how many samples PreciseBN needs).

The model uses a constant learning rate here (``--model.schedule constant``, this recipe's
default): the weights keep moving to the end, as in most real runs. The EMA lags most with a
high learning rate (weights move fast) and a small BN momentum (the
average forgets slowly): sweep ``--model.lr`` and ``--model.bn_momentum``, or run
``lightning-norms report --study precise_bn`` for the grid. Add
``--trainer.callbacks+=lightning_norms.callbacks.PreciseBN`` to recompute after every epoch.

Run::

    python -m recipes.precise_bn fit --model.lr 0.03 --model.bn_momentum 0.01
    python -m recipes.precise_bn fit --model.variant split --trainer.devices 2 \\
        --trainer.strategy ddp --trainer.accelerator cpu

Writes ``<output_dir>/<variant>_lr<lr>_m<bn_momentum>_seed<seed>.json``
(default ``runs/precise_bn``).
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import LightningArgumentParser
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_norms.data import TwoDomainDigits
from lightning_norms.recipes.models import DigitsClassifier
from lightning_norms.recipes.runner import RecipeCLI, recipe_cli, run_grid, write_json
from lightning_norms.recipes.two_domain import batching_for
from lightning_norms.recipes.verdict import Comparison, compare
from lightning_norms.recipes.writer import (
    StudyReport,
    by_seed,
    group_by,
    mean_std,
    plot_bars,
    study_head,
    verdict_section,
)
from lightning_norms.stats import recompute_bn_stats

__all__ = [
    "DEFAULT_PRECISE_BATCHES",
    "EPOCHS",
    "SEEDS",
    "PreciseBNCLI",
    "cli_main",
    "ema_vs_precise",
    "evaluate",
    "forward_train_batch",
    "plot",
    "run_study",
    "verdicts",
]

#: epochs per run (the CLI's default and the study's)
EPOCHS = 3
#: seeds of the study (``lightning-norms report --study precise_bn``): its runs take
#: seconds, and three seeds leave the momentum-0.1 settings near the rule's edge
SEEDS = 5
DEFAULT_PRECISE_BATCHES = (1, 2, 5, 10, 20, 50)


def forward_train_batch(model: nn.Module, batch: Any) -> None:
    """Run a training batch of either feed through ``model`` (the ``forward_fn`` for PreciseBN;
    ``model`` a :class:`DigitsClassifier`)."""
    device = next(model.parameters()).device
    parts = [batch] if isinstance(batch[0], Tensor) else list(batch)
    for x, _, d in parts:
        model(x.to(device), d.to(device))


@torch.no_grad()
def evaluate(model: DigitsClassifier, loaders: Sequence[Any]) -> dict[str, float]:
    """Per-domain and mean test accuracy of ``model`` in eval mode (loader ``k`` = domain ``k``).

    A plain loop (no Trainer) for the recipes that compare several sets of statistics on one
    set of weights; the training flag is restored afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        out: dict[str, float] = {}
        for k, loader in enumerate(loaders):
            metric = MulticlassAccuracy(
                model.num_classes, average="micro", sync_on_compute=False
            ).to(model.device)
            for x, y, d in loader:
                x, y, d = x.to(model.device), y.to(model.device), d.to(model.device)
                metric.update(model(x, d).argmax(dim=1), y)
            out[f"acc_domain{k}"] = float(metric.compute())
        out["acc"] = sum(out.values()) / len(loaders)
        return out
    finally:
        model.train(was_training)


def _endless(data: TwoDomainDigits) -> Iterator[Any]:
    """Training batches across as many epochs as asked (a fresh loader each pass)."""
    epoch = 0
    while True:
        loader = data.train_dataloader()
        set_epoch = getattr(loader.batch_sampler, "set_epoch", None)
        if set_epoch is not None:
            set_epoch(1000 + epoch)
        yield from loader
        epoch += 1


def ema_vs_precise(
    model: DigitsClassifier, data: TwoDomainDigits, precise_batches: Sequence[int]
) -> dict[str, Any]:
    """Test ``model`` with its EMA statistics, then with PreciseBN over each ``n`` batches.

    The weights are never touched: every recomputation runs on a copy of the model.
    """
    loaders = data.test_dataloader()
    result: dict[str, Any] = {"ema": evaluate(model, loaders), "precise": {}}
    for n in precise_batches:
        twin = copy.deepcopy(model)
        recompute_bn_stats(twin, _endless(data), num_batches=n, forward_fn=forward_train_batch)
        result["precise"][str(n)] = evaluate(twin, loaders)
    return result


def _record(model: DigitsClassifier, seed: Any, batch_size: int, res: dict) -> dict[str, Any]:
    return {
        "variant": model.variant,
        "lr": model.lr,
        "bn_momentum": model.bn_momentum,
        "seed": seed,
        "batch_size": batch_size,
        "acc_ema": res["ema"]["acc"],
        "acc_precise": {n: r["acc"] for n, r in res["precise"].items()},
        "detail": res,
    }


class PreciseBNCLI(RecipeCLI):
    """LightningCLI for the recipe: after ``fit``, compares EMA and PreciseBN statistics."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument("--output_dir", default="runs/precise_bn", help="records go here")
        parser.add_argument(
            "--precise_batches",
            type=list[int],
            default=list(DEFAULT_PRECISE_BATCHES),
            help="PreciseBN batch counts to compare",
        )
        parser.set_defaults({"model.schedule": "constant"})
        parser.link_arguments(
            ("model.variant", "model.feed"), "data.batching", compute_fn=batching_for
        )
        parser.link_arguments("data.image_shape", "model.image_shape", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.num_domains", "model.num_domains", apply_on="instantiate")

    def after_fit(self) -> None:
        trainer, model = self.trainer, self.model
        if trainer.interrupted:
            return
        config = self.options
        res = ema_vs_precise(model, self.datamodule, config["precise_batches"])
        record = _record(model, config["seed_everything"], self.datamodule.batch_size, res)
        name = f"{model.variant}_lr{model.lr:g}_m{model.bn_momentum:g}_seed{record['seed']}.json"
        write_json(Path(config["output_dir"]) / name, record)
        self.record = record
        best = max(record["acc_precise"].items(), key=lambda kv: kv[1])
        self.say(
            f"acc with EMA stats {100 * record['acc_ema']:.1f}%, with PreciseBN "
            f"{100 * best[1]:.1f}% ({best[0]} batches); record: {config['output_dir']}/{name}"
        )


def cli_main(args: Any = None, run: bool = True, **options: Any) -> PreciseBNCLI:
    """Entry point: ``python -m recipes.precise_bn fit --model.lr 0.03 ...``."""
    return recipe_cli(
        PreciseBNCLI, DigitsClassifier, TwoDomainDigits, "precise_bn", EPOCHS, args, run, **options
    )


def _table(records: list[dict]) -> list[str]:
    """The table: one row per setting (lr, momentum), EMA and PreciseBN at every n."""
    ns = [str(n) for n in DEFAULT_PRECISE_BATCHES]
    lines = [
        "Mean test accuracy (%) of the same weights with EMA running statistics and with PreciseBN "
        "statistics recomputed over n training batches (64 samples each).",
        "",
        "| lr | BN momentum | EMA | " + " | ".join(f"PreciseBN n={n}" for n in ns) + " |",
        "|---|---|---|" + "---|" * len(ns),
    ]
    for (lr, m), rows in group_by(records, ("lr", "bn_momentum")).items():
        cells = [mean_std([r["acc_precise"][n] for r in rows]) for n in ns]
        ema = mean_std([r["acc_ema"] for r in rows])
        lines.append(f"| {lr:g} | {m:g} | {ema} | " + " | ".join(cells) + " |")
    return lines


def _precise_max(rows: list[dict]) -> dict[int, float]:
    """``{seed: accuracy}`` with PreciseBN over the most batches (the last n of the study)."""
    n = str(DEFAULT_PRECISE_BATCHES[-1])
    return {int(r["seed"]): float(r["acc_precise"][n]) for r in rows}


def verdicts(records: list[dict]) -> list[tuple[Comparison, float, str]]:
    """The study's claims as paired comparisons ``(comparison, scale, unit)``: PreciseBN over the
    most batches beats the EMA, in every setting (lr, momentum)."""
    n = DEFAULT_PRECISE_BATCHES[-1]
    return [
        (
            compare(
                f"PreciseBN (n={n}) > EMA at lr {lr:g}, momentum {m:g}",
                _precise_max(rows),
                by_seed(rows, "acc_ema"),
            ),
            100.0,
            " points",
        )
        for (lr, m), rows in group_by(records, ("lr", "bn_momentum")).items()
    ]


def plot(records: list[dict], path: Path, caption: str = "") -> None:
    """Test accuracy of the same weights with EMA (grey) and PreciseBN (orange) statistics, per
    setting, one dot per seed."""
    bars: dict[str, list[float]] = {}
    colors: list[str] = []
    for (lr, m), rows in group_by(records, ("lr", "bn_momentum")).items():
        bars[f"lr {lr:g}, m {m:g}: EMA"] = [r["acc_ema"] for r in rows]
        bars[f"lr {lr:g}, m {m:g}: PreciseBN"] = list(_precise_max(rows).values())
        colors += ["#8C8C8C", "#DD8452"]
    note = (
        "m = BN momentum (weight of each new batch in the EMA); grey: EMA running statistics; "
        f"orange: PreciseBN over {DEFAULT_PRECISE_BATCHES[-1]} training batches"
    )
    plot_bars(
        bars,
        path,
        "test accuracy (%)",
        "PreciseBN study: the same weights with EMA vs PreciseBN statistics",
        colors=colors,
        caption=note + (f"\n{caption}" if caption else ""),
    )


def run_study(args: argparse.Namespace) -> StudyReport:
    """EMA vs PreciseBN over learning rates x BN momenta x seeds (constant learning rate),
    through the CLI; the records, the table, the verdicts and the plot."""
    runs = [
        {"model": {"lr": lr, "bn_momentum": m}, "seed_everything": s,
         "precise_batches": list(DEFAULT_PRECISE_BATCHES),
         "trainer": {"limit_val_batches": 0, "num_sanity_val_steps": 0}}
        for lr in (1e-3, 3e-2)
        for m in (0.1, 0.01)
        for s in range(args.seeds)
    ]  # fmt: skip
    records, wall = run_grid(cli_main, runs, args, desc="precise_bn study")
    for r in records:
        r.pop("detail", None)
    return StudyReport(
        records=records,
        title="EMA vs PreciseBN statistics",
        head=study_head(records, args.epochs, wall, args.jobs, args.threads),
        body=[*_table(records), *verdict_section(verdicts(records))],
        plot=lambda path: plot(records, path),
        wall=wall,
    )


if __name__ == "__main__":
    cli_main()
