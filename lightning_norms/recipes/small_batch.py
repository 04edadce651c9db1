"""Small and non-i.i.d. batches: BatchNorm vs BatchRenorm vs GroupNorm (Ioffe 2017's settings).

BatchNorm trains on batch statistics and tests on population statistics; the two agree only when
a batch is a large, fair sample. Batch Renormalization (``BatchRenorm2d``) corrects the batch
statistics towards the running averages with ``r``/``d``; GroupNorm uses no batch statistics at
all. This recipe trains the same small CNN on one digit domain (the embedded 8x8 digits by
default) with each normalisation (``--model.norm batch|renorm|group``), with i.i.d.
(``--data.order shuffled``) or class-sorted (``--data.order class_sorted``: every batch holds 2
classes) batches, and tests with the running statistics.

The paper's small-minibatch setting keeps the optimizer's batch (32) and learning rate and
computes BN statistics over each device's share of it (4 samples): ``--model.micro_batches 8``
does exactly that in one process (8 chunks of the batch, each normalised on its own, one step on
all 32), so every setting sees the same samples in the same steps at the same learning rate.
BatchRenorm's ``--model.renorm_warmup`` counts optimizer steps, however many chunks a step has;
``lightning-norms report --study small_batch`` ends it at a fifth of the run.

Run::

    python -m recipes.small_batch fit --model.norm batch --model.micro_batches 8
    python -m recipes.small_batch fit --model.norm renorm --data.order class_sorted
    python -m recipes.small_batch fit --model.norm group --data.batch_size 4 \\
        --trainer.devices 2 --trainer.strategy ddp --trainer.accelerator cpu

Writes ``<output_dir>/<norm>_b<batch>_<order>_seed<seed>.json`` (default ``runs/small_batch``);
``lightning-norms report --study small_batch`` runs the grid.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Literal

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser

from lightning_norms.recipes._common import (
    DigitsClassifier,
    RecipeCLI,
    SingleDomainDigits,
    Variant,
    accuracy_record,
    recipe_cli,
    study_trainer,
    write_json,
)

__all__ = [
    "NORMS",
    "SETTINGS",
    "STEP_BATCH",
    "SmallBatchCLI",
    "SmallBatchClassifier",
    "cli_main",
    "run_setting",
]

#: norm -> the two-domain variant with that normalisation
NORMS: dict[str, Variant] = {"batch": "mixed", "renorm": "renorm", "group": "group"}

#: the study's (per-device batch size, order) settings; every step trains on STEP_BATCH samples
SETTINGS = ((4, "shuffled"), (32, "shuffled"), (32, "class_sorted"))
STEP_BATCH = 32
#: share of the training steps BatchRenorm's clip limits take to open fully in the study
WARMUP_SHARE = 0.2


class SmallBatchClassifier(DigitsClassifier):
    """The two-domain CNN on a single domain, choosing the norm by name.

    Args:
        norm: ``"batch"``, ``"renorm"`` or ``"group"``.
        renorm_warmup: ``BatchRenorm`` warm-up in optimizer steps (default 50, about a fifth of
            the default 6 epochs at batch 32), however many micro-batches a step has.
        micro_batches: BN statistics per chunk of the batch (default 1; see the module doc).
        Others as :class:`lightning_norms.recipes._common.DigitsClassifier`.
    """

    def __init__(
        self,
        norm: Literal["batch", "renorm", "group"] = "batch",
        width: int = 16,
        hidden: int = 64,
        lr: float = 3e-3,
        schedule: Literal["cosine", "constant"] = "cosine",
        bn_momentum: float = 0.1,
        renorm_warmup: int = 50,
        num_groups: int = 4,
        micro_batches: int = 1,
        image_shape: tuple[int, int, int] = (3, 8, 8),
        num_classes: int = 10,
    ) -> None:
        if norm not in NORMS:
            raise ValueError(
                f"SmallBatchClassifier: `norm` must be one of {list(NORMS)}, got {norm!r}"
            )
        super().__init__(
            variant=NORMS[norm],  # type: ignore[arg-type]
            feed="mixed",
            width=width,
            hidden=hidden,
            lr=lr,
            schedule=schedule,
            bn_momentum=bn_momentum,
            renorm_warmup=renorm_warmup,
            num_groups=num_groups,
            micro_batches=micro_batches,
            image_shape=image_shape,
            num_classes=num_classes,
            num_domains=1,
        )
        self.norm_name = norm


def _name(norm: str, batch_size: int, order: str, seed: Any) -> str:
    return f"{norm}_b{batch_size}_{order}_seed{seed}"


class SmallBatchCLI(RecipeCLI):
    """LightningCLI for the recipe: tests with running statistics after ``fit``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
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
            "batch_size": data.batch_size // model.micro_batches,
            "step_batch": data.batch_size,
            "order": data.order,
            "seed": seed,
            "acc": accuracy_record(trainer.callback_metrics, 1)["acc"],
            "world_size": trainer.world_size,
        }
        path = Path(self.config["fit"]["output_dir"]) / (
            _name(record["norm"], record["batch_size"], data.order, seed) + ".json"
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
    norm: Literal["batch", "renorm", "group"],
    batch_size: int,
    order: Literal["shuffled", "class_sorted"],
    seed: int,
    *,
    max_epochs: int = 6,
    trainer_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train one (norm, per-device batch, order, seed) setting and test it; the record.

    Every step trains on :data:`STEP_BATCH` samples; BN statistics come from ``batch_size`` of
    them at a time (``STEP_BATCH // batch_size`` micro-batches). BatchRenorm's warm-up is
    :data:`WARMUP_SHARE` of the run's optimizer steps.
    """
    if STEP_BATCH % batch_size:
        raise ValueError(f"small_batch: `batch_size` must divide {STEP_BATCH}, got {batch_size}")
    start = time.perf_counter()
    L.seed_everything(seed, workers=True, verbose=False)
    data = SingleDomainDigits(batch_size=STEP_BATCH, order=order)
    steps = max_epochs * len(data.train_dataloader())
    model = SmallBatchClassifier(
        norm=norm,
        micro_batches=STEP_BATCH // batch_size,
        renorm_warmup=max(1, math.ceil(WARMUP_SHARE * steps)),
        image_shape=data.image_shape,
    )
    trainer = study_trainer(max_epochs, trainer_kwargs)
    trainer.fit(model, datamodule=data)
    trainer.test(model, datamodule=data, verbose=False)
    return {
        "norm": norm,
        "batch_size": batch_size,
        "order": order,
        "seed": seed,
        "acc": accuracy_record(trainer.callback_metrics, 1)["acc"],
        "warmup_steps": max(1, math.ceil(WARMUP_SHARE * steps)),
        "steps": trainer.global_step,
        "seconds": round(time.perf_counter() - start, 2),
    }


if __name__ == "__main__":
    cli_main()
