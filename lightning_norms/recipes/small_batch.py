"""Small and non-i.i.d. batches: BatchNorm vs BatchRenorm vs GroupNorm (Ioffe 2017's settings).

BatchNorm trains on batch statistics and tests on population statistics; the two agree only when
a batch is a large, fair sample. Batch Renormalization (``BatchRenorm2d``) corrects the batch
statistics towards the running averages with ``r``/``d``; GroupNorm uses no batch statistics at
all. This recipe trains the same small CNN on one digit domain (the embedded 8x8 digits by
default) with each normalisation (``--model.norm batch|renorm|group``) at per-device batches of
2, 4 or 32 (``--data.batch_size``), with i.i.d. (``--data.order shuffled``) or class-sorted
(``--data.order class_sorted``: every batch holds 2 classes) batches, for the same number of
epochs (same samples seen), and tests with the running statistics.

Run::

    python -m recipes.small_batch fit --model.norm batch --data.batch_size 2
    python -m recipes.small_batch fit --model.norm renorm --data.order class_sorted
    python -m recipes.small_batch fit --model.norm group --data.batch_size 4 \\
        --trainer.devices 2 --trainer.strategy ddp --trainer.accelerator cpu

Writes ``<output_dir>/<norm>_b<batch>_<order>_seed<seed>.json`` (default ``runs/small_batch``);
``lightning-norms report --study small_batch`` runs the grid.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_norms.recipes._common import (
    DigitsClassifier,
    SingleDomainDigits,
    accuracy_record,
    recipe_cli,
    study_trainer,
    write_json,
)

__all__ = ["NORMS", "SETTINGS", "SmallBatchCLI", "SmallBatchClassifier", "cli_main", "run_setting"]

#: norm -> the two-domain variant with that normalisation
NORMS = {"batch": "mixed", "renorm": "renorm", "group": "group"}

#: the study's (per-device batch size, order) settings
SETTINGS = ((2, "shuffled"), (4, "shuffled"), (32, "shuffled"), (32, "class_sorted"))


class SmallBatchClassifier(DigitsClassifier):
    """The two-domain CNN on a single domain, choosing the norm by name.

    Args:
        norm: ``"batch"``, ``"renorm"`` or ``"group"``.
        renorm_warmup: ``BatchRenorm`` warm-up steps (default 200: the clip limits open during
            the first fraction of an epoch at batch 2, later at batch 32).
        Others as :class:`lightning_norms.recipes._common.DigitsClassifier`.
    """

    def __init__(
        self,
        norm: str = "batch",
        width: int = 16,
        hidden: int = 64,
        lr: float = 3e-3,
        schedule: str = "cosine",
        bn_momentum: float = 0.1,
        renorm_warmup: int = 200,
        num_groups: int = 4,
        image_shape: tuple[int, int, int] = (3, 8, 8),
        num_classes: int = 10,
    ) -> None:
        if norm not in NORMS:
            raise ValueError(
                f"SmallBatchClassifier: `norm` must be one of {list(NORMS)}, got {norm!r}"
            )
        super().__init__(
            variant=NORMS[norm],
            feed="mixed",
            width=width,
            hidden=hidden,
            lr=lr,
            schedule=schedule,
            bn_momentum=bn_momentum,
            renorm_warmup=renorm_warmup,
            num_groups=num_groups,
            image_shape=image_shape,
            num_classes=num_classes,
            num_domains=1,
        )
        self.norm_name = norm


def _name(norm: str, batch_size: int, order: str, seed: Any) -> str:
    return f"{norm}_b{batch_size}_{order}_seed{seed}"


class SmallBatchCLI(LightningCLI):
    """LightningCLI for the recipe: tests with running statistics after ``fit``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--output_dir", default="runs/small_batch", help="records go here")
        parser.link_arguments("data.image_shape", "model.image_shape", apply_on="instantiate")

    def after_fit(self) -> None:
        trainer, model, data = self.trainer, self.model, self.datamodule
        if trainer.interrupted:
            return
        trainer.test(model, datamodule=data, verbose=False)
        seed = self.config["fit"]["seed_everything"]
        record = {
            "norm": model.norm_name,
            "batch_size": data.batch_size,
            "order": data.order,
            "seed": seed,
            "acc": accuracy_record(trainer.callback_metrics, 1)["acc"],
            "world_size": trainer.world_size,
        }
        path = Path(self.config["fit"]["output_dir"]) / (
            _name(record["norm"], data.batch_size, data.order, seed) + ".json"
        )
        write_json(path, record)
        if trainer.is_global_zero:
            print(f"test accuracy {100 * record['acc']:.1f}%; record: {path}")


def cli_main(args: Any = None, run: bool = True) -> SmallBatchCLI:
    """Entry point: ``python -m recipes.small_batch fit --model.norm renorm ...``."""
    return recipe_cli(
        SmallBatchCLI, SmallBatchClassifier, SingleDomainDigits, "small_batch", 6, args, run
    )


def run_setting(
    norm: str,
    batch_size: int,
    order: str,
    seed: int,
    *,
    max_epochs: int = 6,
    trainer_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train one (norm, batch size, order, seed) setting and test it; the record."""
    start = time.perf_counter()
    L.seed_everything(seed, workers=True, verbose=False)
    data = SingleDomainDigits(batch_size=batch_size, order=order)
    model = SmallBatchClassifier(norm=norm, image_shape=data.image_shape)
    trainer = study_trainer(max_epochs, trainer_kwargs)
    trainer.fit(model, datamodule=data)
    trainer.test(model, datamodule=data, verbose=False)
    return {
        "norm": norm,
        "batch_size": batch_size,
        "order": order,
        "seed": seed,
        "acc": accuracy_record(trainer.callback_metrics, 1)["acc"],
        "seconds": round(time.perf_counter() - start, 2),
    }


if __name__ == "__main__":
    cli_main()
