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

import time
from pathlib import Path
from typing import Any, Literal

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser

from lightning_norms.recipes._common import (
    DigitsClassifier,
    RecipeCLI,
    SingleDomainDigits,
    accuracy_record,
    recipe_cli,
    study_trainer,
    write_json,
)

__all__ = [
    "DEFAULT_TARGET",
    "LEARNING_RATES",
    "LectureCLI",
    "LectureClassifier",
    "ValCurve",
    "cli_main",
    "run_setting",
    "steps_to",
]

#: the study's SGD learning rates: 30x from the first to the last
LEARNING_RATES = (0.003, 0.01, 0.1)
#: the learning rate of the sigmoid comparison
SIGMOID_LR = 0.003
#: validation accuracy that counts as "trained" for the steps-to-target figure
DEFAULT_TARGET = 0.9
DEFAULT_EVAL_EVERY = 10


class LectureClassifier(DigitsClassifier):
    """The digits CNN on one domain, with BN (``variant="mixed"``) or without (``"none"``), SGD.

    Args:
        variant: ``"mixed"`` (BatchNorm) or ``"none"`` (no normalisation; convs keep a bias).
        activation: ``"relu"`` or ``"sigmoid"``.
        lr: SGD learning rate, constant (default 0.05).
        Others as :class:`lightning_norms.recipes._common.DigitsClassifier`.
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
        config = self.config["fit"]
        acc = accuracy_record(trainer.callback_metrics, 1)["acc"]
        record = _record(model, config["seed_everything"], self.curve.points, acc, config["target"])
        name = f"{model.variant}_{model.activation}_lr{model.lr:g}_seed{record['seed']}.json"
        write_json(Path(config["output_dir"]) / name, record)
        if trainer.is_global_zero:
            print(
                f"test accuracy {100 * acc:.1f}%, steps to {100 * config['target']:.0f}% "
                f"validation accuracy: {record['steps_to_target']}; record: "
                f"{config['output_dir']}/{name}"
            )


def cli_main(args: Any = None, run: bool = True) -> LectureCLI:
    """Entry point: ``python -m recipes.lecture fit --model.variant none --model.lr 0.3 ...``."""
    return recipe_cli(LectureCLI, LectureClassifier, SingleDomainDigits, "lecture", 6, args, run)


def run_setting(
    variant: Literal["mixed", "none"],
    activation: Literal["relu", "sigmoid"],
    lr: float,
    seed: int,
    *,
    max_epochs: int = 6,
    batch_size: int = 32,
    target: float = DEFAULT_TARGET,
    eval_every: int = DEFAULT_EVAL_EVERY,
    trainer_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train one (variant, activation, lr, seed) setting with the validation curve; the record."""
    start = time.perf_counter()
    L.seed_everything(seed, workers=True, verbose=False)
    data = SingleDomainDigits(batch_size=batch_size)
    model = LectureClassifier(
        variant=variant,
        activation=activation,
        lr=lr,
        image_shape=data.image_shape,
    )
    curve = ValCurve()
    options = dict(trainer_kwargs or {})
    options["callbacks"] = [*options.get("callbacks", []), curve]
    options.update(val_check_interval=eval_every, check_val_every_n_epoch=None)
    options.setdefault("num_sanity_val_steps", 0)
    trainer = study_trainer(max_epochs, options, validate=True)
    trainer.fit(model, datamodule=data)
    trainer.test(model, datamodule=data, verbose=False)
    acc = accuracy_record(trainer.callback_metrics, 1)["acc"]
    record = _record(model, seed, curve.points, acc, target)
    record["seconds"] = round(time.perf_counter() - start, 2)
    return record


if __name__ == "__main__":
    cli_main()
