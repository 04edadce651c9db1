"""The lecture's experiments: BatchNorm trains faster, takes a much higher learning rate, and makes
a sigmoid network trainable.

Ioffe & Szegedy 2015 (figure 2 and section 4.2.1), as taught in the usual BN lecture: with BN
the same network (1) reaches a given accuracy in fewer steps, (2) trains at a learning rate many
times higher (30x shown) where the plain network fails, and (3) trains with sigmoid activations,
which without BN hardly learn. This recipe trains the small digits CNN of the other recipes on
the embedded 8x8 digits with SGD (momentum 0.9, constant learning rate), with BN
(``--model.variant mixed``: one ``nn.BatchNorm2d`` after every conv and the hidden linear layer)
or without any normalisation (``--model.variant none``), ReLU or sigmoid
(``--model.activation``), validates every ``--eval_every`` steps and records the validation
accuracy curve, the steps to reach ``--target`` accuracy and the final test accuracy.

Run::

    python -m recipes.lecture fit --model.variant mixed --model.lr 0.3
    python -m recipes.lecture fit --model.variant none --model.activation sigmoid --model.lr 0.1

Writes ``<output_dir>/<variant>_<activation>_lr<lr>_seed<seed>.json`` (default
``runs/lecture``); ``lightning-norms report --study lecture`` runs the grid (learning rates
spanning 30x, both activations, several seeds), the verdicts and the curves.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser

from lightning_norms.recipes.data import SingleDomainDigits
from lightning_norms.recipes.models import DigitsClassifier, accuracy_record
from lightning_norms.recipes.runner import RecipeCLI, recipe_cli, run_grid, write_json
from lightning_norms.recipes.verdict import Comparison, compare
from lightning_norms.recipes.writer import (
    StudyReport,
    add_caption,
    by_seed,
    group_by,
    mean_std,
    study_head,
    verdict_section,
)

__all__ = [
    "DEFAULT_TARGET",
    "EPOCHS",
    "LEARNING_RATES",
    "SEEDS",
    "LectureCLI",
    "LectureClassifier",
    "ValCurve",
    "cli_main",
    "plot",
    "run_study",
    "steps_to",
    "verdicts",
]

#: the study's SGD learning rates: 30x from the first to the last
LEARNING_RATES = (0.003, 0.01, 0.1)
#: the learning rate of the sigmoid comparison
SIGMOID_LR = 0.003
#: validation accuracy that counts as "trained" for the steps-to-target figure
DEFAULT_TARGET = 0.9
DEFAULT_EVAL_EVERY = 10
#: epochs per run (the CLI's default and the study's)
EPOCHS = 6
#: seeds of the study (``lightning-norms report --study lecture``): its runs take
#: seconds, and three seeds leave the highest-lr comparison near the rule's edge
SEEDS = 5


class LectureClassifier(DigitsClassifier):
    """The digits CNN on one domain, with BN (``variant="mixed"``) or without (``"none"``), SGD.

    Args:
        variant: ``"mixed"`` (BatchNorm) or ``"none"`` (no normalisation; convs keep a bias).
        activation: ``"relu"`` or ``"sigmoid"``.
        lr: SGD learning rate, constant (default 0.05).
        Others as :class:`lightning_norms.recipes.models.DigitsClassifier`.
    """

    def __init__(
        self,
        variant: Literal["mixed", "none"] = "mixed",
        activation: Literal["relu", "sigmoid"] = "relu",
        lr: float = 0.05,
        width: int = 16,
        hidden: int = 64,
        image_shape: tuple[int, int, int] = (3, 8, 8),
        num_classes: int = 10,
    ) -> None:
        if variant not in ("mixed", "none"):
            raise ValueError(
                f"LectureClassifier: `variant` must be 'mixed' or 'none', got {variant!r}"
            )
        super().__init__(
            variant=variant,
            feed="mixed",
            width=width,
            hidden=hidden,
            lr=lr,
            schedule="constant",
            activation=activation,
            optimizer="sgd",
            image_shape=image_shape,
            num_classes=num_classes,
            num_domains=1,
        )
        self.activation = activation


class ValCurve(L.Callback):
    """Collects ``(global_step, val/acc)`` after every validation run (sanity checks skipped)."""

    def __init__(self) -> None:
        self.points: list[tuple[int, float]] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or "val/acc" not in trainer.callback_metrics:
            return
        self.points.append((int(trainer.global_step), float(trainer.callback_metrics["val/acc"])))


def steps_to(points: list[tuple[int, float]], target: float) -> int | None:
    """The first step whose validation accuracy reaches ``target``; ``None`` if none does.

    Example:
        >>> steps_to([(10, 0.5), (20, 0.91), (30, 0.8)], 0.9)
        20
    """
    return next((step for step, acc in points if acc >= target), None)


def _record(
    model: LectureClassifier,
    seed: Any,
    curve: list[tuple[int, float]],
    test_acc: float,
    target: float,
) -> dict[str, Any]:
    return {
        "variant": model.variant,
        "activation": model.activation,
        "lr": model.lr,
        "seed": seed,
        "acc": test_acc,
        "target": target,
        "steps_to_target": steps_to(curve, target),
        "curve": curve,
    }


class LectureCLI(RecipeCLI):
    """LightningCLI for the recipe: validates every ``--eval_every`` steps, tests after ``fit``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument("--output_dir", default="runs/lecture", help="records go here")
        parser.add_argument(
            "--target", type=float, default=DEFAULT_TARGET, help="accuracy for steps-to-target"
        )
        parser.add_argument(
            "--eval_every", type=int, default=DEFAULT_EVAL_EVERY, help="validate every N steps"
        )
        parser.link_arguments("eval_every", "trainer.val_check_interval")
        parser.set_defaults({"trainer.check_val_every_n_epoch": None})
        parser.link_arguments("data.image_shape", "model.image_shape", apply_on="instantiate")

    def before_fit(self) -> None:
        self.curve = ValCurve()
        self.trainer.callbacks.append(self.curve)  # type: ignore[attr-defined]

    def after_fit(self) -> None:
        trainer, model = self.trainer, self.model
        if trainer.interrupted:
            return
        trainer.test(model, datamodule=self.datamodule, verbose=False)
        config = self.options
        acc = accuracy_record(trainer.callback_metrics, 1)["acc"]
        record = _record(model, config["seed_everything"], self.curve.points, acc, config["target"])
        name = f"{model.variant}_{model.activation}_lr{model.lr:g}_seed{record['seed']}.json"
        write_json(Path(config["output_dir"]) / name, record)
        self.record = record
        self.say(
            f"test accuracy {100 * acc:.1f}%, steps to {100 * config['target']:.0f}% "
            f"validation accuracy: {record['steps_to_target']}; record: "
            f"{config['output_dir']}/{name}"
        )


def cli_main(args: Any = None, run: bool = True, **options: Any) -> LectureCLI:
    """Entry point: ``python -m recipes.lecture fit --model.variant none --model.lr 0.3 ...``."""
    return recipe_cli(
        LectureCLI, LectureClassifier, SingleDomainDigits, "lecture", EPOCHS, args, run, **options
    )


def _steps(record: dict, cap: int) -> float:
    """Steps to the target accuracy; a run that never reached it counts as ``cap``."""
    steps = record["steps_to_target"]
    return float(cap if steps is None else steps)


def plot(records: Sequence[dict], path: Path, caption: str = "") -> None:
    """Validation accuracy vs steps, one panel per setting: BN solid, no BN dashed (seed mean,
    the band spans the seeds), the target accuracy as a labelled dotted line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    target = float(records[0]["target"]) if records else DEFAULT_TARGET
    panels = group_by(records, ("activation", "lr"))
    fig, axes = plt.subplots(1, len(panels), figsize=(2.8 * len(panels), 3.4), squeeze=False)
    for ax, ((act, lr), rows) in zip(axes[0], panels.items(), strict=True):
        for variant, style, color in (("mixed", "-", "#4C72B0"), ("none", "--", "#C44E52")):
            curves = [r["curve"] for r in rows if r["variant"] == variant]
            if not curves:
                continue
            steps = [p[0] for p in curves[0]]
            per_step = [[100 * c[i][1] for c in curves] for i in range(len(steps))]
            mean = [statistics.fmean(v) for v in per_step]
            label = "BN" if variant == "mixed" else "no BN"
            ax.plot(steps, mean, style, color=color, label=f"{label} (mean of {len(curves)})")
            lo, hi = [min(v) for v in per_step], [max(v) for v in per_step]
            ax.fill_between(steps, lo, hi, color=color, alpha=0.15, linewidth=0)
        ax.axhline(100 * target, color="gray", linewidth=0.8, linestyle=":",
                   label=f"target {100 * target:.0f} %")  # fmt: skip
        ax.set_title(f"{act}, SGD lr {lr:g}", fontsize=8)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylim(0, 100)
        ax.legend(fontsize=6, loc="lower right")
    axes[0][0].set_ylabel("validation accuracy (%)")
    text = "lines: seed mean; bands: min to max over seeds" + (f"\n{caption}" if caption else "")
    fig.suptitle("Lecture study: BN vs no BN, validation accuracy vs training steps", fontsize=9)
    fig.tight_layout(rect=(0, add_caption(fig, text), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _claims(groups: dict[tuple, list[dict]], cap: int) -> list[tuple[Comparison, float, str]]:
    """The lecture's four claims as paired comparisons ``(comparison, scale, unit)``."""
    low, high = LEARNING_RATES[0], LEARNING_RATES[-1]
    steps = {k: {int(r["seed"]): _steps(r, cap) for r in rows} for k, rows in groups.items()}

    def acc(variant: str, act: str, lr: float) -> dict[int, float]:
        return by_seed(groups[(variant, act, lr)], "acc")

    target = f"{100 * DEFAULT_TARGET:.0f}%"
    return [
        (
            compare(
                f"BN reaches {target} in fewer steps (ReLU, lr {low:g})",
                steps[("mixed", "relu", low)],
                steps[("none", "relu", low)],
                -1,
            ),
            1.0,
            " steps",
        ),
        (
            compare(
                f"BN at {high / low:.0f}x the lr ({high:g}) > no BN at lr {low:g} (test acc)",
                acc("mixed", "relu", high),
                acc("none", "relu", low),
            ),
            100.0,
            " points",
        ),
        (
            compare(
                f"BN > no BN at the highest lr {high:g} (test acc)",
                acc("mixed", "relu", high),
                acc("none", "relu", high),
            ),
            100.0,
            " points",
        ),
        (
            compare(
                f"sigmoid: BN > no BN (lr {SIGMOID_LR:g}, test acc)",
                acc("mixed", "sigmoid", SIGMOID_LR),
                acc("none", "sigmoid", SIGMOID_LR),
            ),
            100.0,
            " points",
        ),
    ]


def _table(
    groups: dict[tuple, list[dict]], grid: Sequence[tuple[str, float]], cap: int
) -> list[str]:
    lines = [
        f"The digits CNN with BN after every conv / hidden layer (`BN`) or without normalisation "
        f"(`none`), SGD with momentum 0.9 at a constant learning rate, batch 32. Steps to "
        f"{100 * DEFAULT_TARGET:.0f}% validation accuracy (validated every 10 steps; a run that "
        f"never gets there counts as {cap}, the last step) and final test accuracy (%).",
        "",
        "| activation | lr | BN: steps | BN: test acc | none: steps | none: test acc |",
        "|---|---|---|---|---|---|",
    ]
    for act, lr in grid:
        bn, plain = groups[("mixed", act, lr)], groups[("none", act, lr)]
        lines.append(
            f"| {act} | {lr:g} | {mean_std([_steps(r, cap) for r in bn], 1.0, 0)} | "
            f"{mean_std([r['acc'] for r in bn])} | "
            f"{mean_std([_steps(r, cap) for r in plain], 1.0, 0)} | "
            f"{mean_std([r['acc'] for r in plain])} |"
        )
    return lines


def _cap(records: Sequence[dict]) -> int:
    """The last validated step: what a run that never reached the target counts as."""
    return max((p[0] for r in records for p in r["curve"]), default=0)


def verdicts(records: Sequence[dict]) -> list[tuple[Comparison, float, str]]:
    """The lecture's four claims as paired comparisons ``(comparison, scale, unit)``."""
    return _claims(group_by(records, ("variant", "activation", "lr")), _cap(records))


def run_study(args: argparse.Namespace) -> StudyReport:
    """BN vs no BN across learning rates (ReLU) and with sigmoids, through the CLI: steps to the
    target, test accuracy, the verdicts and the validation curves."""
    grid = [("relu", lr) for lr in LEARNING_RATES] + [("sigmoid", SIGMOID_LR)]
    runs = [
        {"model": {"variant": v, "activation": act, "lr": lr}, "seed_everything": s,
         "trainer": {"num_sanity_val_steps": 0}}
        for act, lr in grid
        for v in ("mixed", "none")
        for s in range(args.seeds)
    ]  # fmt: skip
    records, wall = run_grid(cli_main, runs, args, desc="lecture study")
    groups = group_by(records, ("variant", "activation", "lr"))
    return StudyReport(
        records=records,
        title="The lecture: BN trains faster, higher, with sigmoids",
        head=study_head(records, args.epochs, wall, args.jobs, args.threads),
        body=[*_table(groups, grid, _cap(records)), *verdict_section(verdicts(records))],
        plot=lambda path: plot(records, path),
        wall=wall,
    )


if __name__ == "__main__":
    cli_main()
