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

import copy
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser

from lightning_norms.data import TwoDomainDigits
from lightning_norms.recipes._common import (
    DigitsClassifier,
    RecipeCLI,
    Variant,
    evaluate,
    forward_train_batch,
    recipe_cli,
    study_trainer,
    write_json,
)
from lightning_norms.recipes.two_domain import batching_for
from lightning_norms.stats import recompute_bn_stats

__all__ = ["DEFAULT_PRECISE_BATCHES", "PreciseBNCLI", "cli_main", "ema_vs_precise", "run_setting"]

DEFAULT_PRECISE_BATCHES = (1, 2, 5, 10, 20, 50)


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
        config = self.config["fit"]
        res = ema_vs_precise(model, self.datamodule, config["precise_batches"])
        record = _record(model, config["seed_everything"], self.datamodule.batch_size, res)
        name = f"{model.variant}_lr{model.lr:g}_m{model.bn_momentum:g}_seed{record['seed']}.json"
        write_json(Path(config["output_dir"]) / name, record)
        if trainer.is_global_zero:
            best = max(record["acc_precise"].items(), key=lambda kv: kv[1])
            print(
                f"acc with EMA stats {100 * record['acc_ema']:.1f}%, with PreciseBN "
                f"{100 * best[1]:.1f}% ({best[0]} batches); record: {config['output_dir']}/{name}"
            )


def cli_main(args: Any = None, run: bool = True) -> PreciseBNCLI:
    """Entry point: ``python -m recipes.precise_bn fit --model.lr 0.03 ...``."""
    return recipe_cli(PreciseBNCLI, DigitsClassifier, TwoDomainDigits, "precise_bn", 3, args, run)


def run_setting(
    lr: float,
    bn_momentum: float,
    seed: int,
    *,
    variant: Variant = "mixed",
    schedule: Literal["cosine", "constant"] = "constant",
    max_epochs: int = 3,
    batch_size: int = 64,
    precise_batches: Sequence[int] = DEFAULT_PRECISE_BATCHES,
    image_size: int | None = 8,
    trainer_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train one (lr, momentum, seed) setting and compare EMA vs PreciseBN; the record."""
    start = time.perf_counter()
    L.seed_everything(seed, workers=True, verbose=False)
    feed = batching_for(variant, None)
    data = TwoDomainDigits(batching=feed, batch_size=batch_size, image_size=image_size)
    model = DigitsClassifier(
        variant=variant,
        lr=lr,
        bn_momentum=bn_momentum,
        schedule=schedule,
        image_shape=data.image_shape,
        num_classes=data.num_classes,
        num_domains=data.num_domains,
    )
    study_trainer(max_epochs, trainer_kwargs).fit(model, datamodule=data)
    res = ema_vs_precise(model, data, precise_batches)
    record = _record(model, seed, batch_size, res)
    record["seconds"] = round(time.perf_counter() - start, 2)
    return record


if __name__ == "__main__":
    cli_main()
