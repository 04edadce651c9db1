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

import argparse
import math
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch.cli import LightningArgumentParser

from lightning_norms.recipes.data import SingleDomainDigits
from lightning_norms.recipes.models import DigitsClassifier, Variant, accuracy_record
from lightning_norms.recipes.runner import RecipeCLI, recipe_cli, run_grid, write_json
from lightning_norms.recipes.verdict import Comparison, compare
from lightning_norms.recipes.writer import (
    MARKS,
    StudyReport,
    add_caption,
    by_seed,
    draw_points,
    group_by,
    mean_std,
    study_head,
    verdict_section,
)

__all__ = [
    "COLORS",
    "EPOCHS",
    "NORMS",
    "SEEDS",
    "SETTINGS",
    "STEP_BATCH",
    "SmallBatchCLI",
    "SmallBatchClassifier",
    "cli_main",
    "plot",
    "run_study",
    "verdicts",
]

#: epochs per run (the CLI's default and the study's)
EPOCHS = 6
#: seeds of the study (``lightning-norms report --study small_batch``): the effects are a point
#: or less, so three seeds cannot carry a verdict
SEEDS = 5

#: norm -> the two-domain variant with that normalisation
NORMS: dict[str, Variant] = {"batch": "mixed", "renorm": "renorm", "group": "group"}

#: the study's (per-device batch size, order) settings; every step trains on STEP_BATCH samples
SETTINGS: tuple[tuple[int, Literal["shuffled", "class_sorted"]], ...] = (
    (4, "shuffled"),
    (32, "shuffled"),
    (32, "class_sorted"),
)
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
        Others as :class:`lightning_norms.recipes.models.DigitsClassifier`.
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
        self.renorm_warmup = renorm_warmup


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
        seed = self.options["seed_everything"]
        record = {
            "norm": model.norm_name,
            "batch_size": data.batch_size // model.micro_batches,
            "step_batch": data.batch_size,
            "order": data.order,
            "seed": seed,
            "acc": accuracy_record(trainer.callback_metrics, 1)["acc"],
            "warmup_steps": model.renorm_warmup,
            "steps": trainer.global_step,
            "world_size": trainer.world_size,
        }
        path = Path(self.options["output_dir"]) / (
            _name(record["norm"], record["batch_size"], data.order, seed) + ".json"
        )
        write_json(path, record)
        self.record = record
        self.say(f"test accuracy {100 * record['acc']:.1f}%; record: {path}")


def cli_main(args: Any = None, run: bool = True, **options: Any) -> SmallBatchCLI:
    """Entry point: ``python -m recipes.small_batch fit --model.norm renorm ...``."""
    return recipe_cli(
        SmallBatchCLI,
        SmallBatchClassifier,
        SingleDomainDigits,
        "small_batch",
        EPOCHS,
        args,
        run,
        **options,
    )


def _runs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One CLI configuration per (norm, per-device batch, order, seed): every step trains on
    :data:`STEP_BATCH` samples, BN statistics over ``batch_size`` of them at a time
    (``STEP_BATCH // batch_size`` micro-batches); BatchRenorm's warm-up is
    :data:`WARMUP_SHARE` of the run's optimizer steps."""
    warmup = {}
    for b, order in SETTINGS:
        if STEP_BATCH % b:
            raise ValueError(f"small_batch: `batch_size` must divide {STEP_BATCH}, got {b}")
        loader = SingleDomainDigits(batch_size=STEP_BATCH, order=order).train_dataloader()
        warmup[order] = max(1, math.ceil(WARMUP_SHARE * args.epochs * len(loader)))
    return [
        {"model": {"norm": norm, "micro_batches": STEP_BATCH // b, "renorm_warmup": warmup[order]},
         "data": {"batch_size": STEP_BATCH, "order": order}, "seed_everything": s,
         "trainer": {"limit_val_batches": 0, "num_sanity_val_steps": 0}}
        for norm in NORMS
        for b, order in SETTINGS
        for s in range(args.seeds)
    ]  # fmt: skip


def _table(groups: dict[tuple, list[dict]]) -> list[str]:
    cols = [f"{b} per device, {order.replace('_', '-')}" for b, order in SETTINGS]
    lines = [
        f"Test accuracy (%) on the digits with running statistics. Every step trains on "
        f"{STEP_BATCH} samples with the same learning rate and the same epochs (same samples "
        "seen); BN statistics come from each device's share of the batch (per-device batch "
        f"b: {STEP_BATCH} // b micro-batches, as that many devices without synced BN). "
        "Class-sorted: every batch holds 2 of the 10 classes. BatchRenorm's warm-up counts "
        "optimizer steps and ends at a fifth of the run.",
        "",
        "| norm | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for norm in NORMS:
        cells = [mean_std([r["acc"] for r in groups[(norm, b, o)]]) for b, o in SETTINGS]
        lines.append(f"| {norm} | " + " | ".join(cells) + " |")
    return lines


def verdicts(records: list[dict]) -> list[tuple[Comparison, float, str]]:
    """The study's claims as paired comparisons ``(comparison, scale, unit)``: BatchRenorm
    against BN in every setting of :data:`SETTINGS`."""
    groups = group_by(records, ("norm", "batch_size", "order"))
    return [
        (
            compare(
                f"`renorm` > `batch` at {b} per device, {o.replace('_', '-')}",
                by_seed(groups[("renorm", b, o)], "acc"),
                by_seed(groups[("batch", b, o)], "acc"),
            ),
            100.0,
            " points",
        )
        for b, o in SETTINGS
        if ("renorm", b, o) in groups and ("batch", b, o) in groups
    ]


#: one colour per norm in the plot
COLORS = {"batch": "#4C72B0", "renorm": "#DD8452", "group": "#55A868"}


def plot(records: list[dict], path: Path, caption: str = "") -> None:
    """Test accuracy of every norm, one panel per setting of :data:`SETTINGS` with its own y
    axis fitted to its dots (the BatchRenorm-vs-BN effects are a point or less)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group_by(records, ("norm", "batch_size", "order"))
    fig, axes = plt.subplots(1, len(SETTINGS), figsize=(3.4 * len(SETTINGS), 4.0), squeeze=False)
    for ax, (b, o) in zip(axes[0], SETTINGS, strict=True):
        norms = [n for n in NORMS if (n, b, o) in groups]
        bars = {n: [r["acc"] for r in groups[(n, b, o)]] for n in norms}
        draw_points(ax, bars, colors=[COLORS[n] for n in norms])
        ax.set_title(f"{b} per device, {o.replace('_', '-')}", fontsize=9)
    axes[0][0].set_ylabel("test accuracy (%)", fontsize=8)
    fig.suptitle("Small-batch study: BN vs BatchRenorm vs GroupNorm (own y axis per panel)",
                 fontsize=9)  # fmt: skip
    note = (
        f"4 / 32 per device = samples whose statistics BN uses (every step trains on "
        f"{STEP_BATCH}: 8 or 1 micro-batches); class-sorted = every batch holds 2 classes"
    )
    text = MARKS + "\n" + note + (f"\n{caption}" if caption else "")
    fig.tight_layout(rect=(0, add_caption(fig, text), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_study(args: argparse.Namespace) -> StudyReport:
    """BN vs BatchRenorm vs GroupNorm with small per-device batches and class-sorted batches,
    through the CLI; the records, the table, the verdicts and the plot."""
    records, wall = run_grid(cli_main, _runs(args), args, desc="small_batch study")
    groups = group_by(records, ("norm", "batch_size", "order"))
    return StudyReport(
        records=records,
        title="Small and non-i.i.d. batches",
        head=study_head(records, args.epochs, wall, args.jobs, args.threads),
        body=[*_table(groups), *verdict_section(verdicts(records))],
        plot=lambda path: plot(records, path),
        wall=wall,
    )


if __name__ == "__main__":
    cli_main()
