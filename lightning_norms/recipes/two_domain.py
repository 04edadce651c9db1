"""Two domains, one network: the BatchNorm pitfall of shared towers fed domain-pure batches.

The shared-tower BN pitfall: one small CNN trained on two digit domains (the embedded 8x8
digits and a derived "street" domain; real MNIST + SVHN with ``--data.root``) with identical
data, loss, optimizer and learning rate, built as these variants:

==========  =============================  ========  ==========================================
variant     normalisation                  feed      what it shows
==========  =============================  ========  ==========================================
mixed       one ``nn.BatchNorm2d``         mixed     every batch an exact 50/50 mix (the fix)
separate    one ``nn.BatchNorm2d``         separate  the pitfall: one forward per domain-pure
                                                     batch, losses averaged; BN trains on each
                                                     domain's own statistics, but its running
                                                     averages (used at test time) converge to the
                                                     mixture
split       ``DomainBatchNorm2d``          mixed     shared weights, BN statistics per domain;
                                                     at test time each domain's loader routes its
                                                     id
renorm      ``BatchRenorm2d``              separate  r/d pull training towards the running stats
layer2d     ``LayerNorm2d``                separate  batch-independent: the feed cannot matter
group       ``nn.GroupNorm``               separate  batch-independent
cosine      ``CosineConv2d``/``Linear``    separate  batch-independent, no norm layer
none        no normalisation               separate  batch-independent
==========  =============================  ========  ==========================================

The batch-independent variants (and BatchRenorm) are fed the *separate* batches on purpose: the
study asks which normalisations survive the pitfall; for the batch-independent ones both feeds
give the same gradients (the separate step's loss is the mean of the two per-domain mean losses,
i.e. the mixed batch's mean loss). ``--model.feed mixed|separate`` overrides the default feed.

The CLI and ``lightning-norms report`` train alike: the embedded digits at their native 8x8
(MNIST/SVHN at 32x32), 15 epochs, 64 samples per step, Adam 3e-3 with a cosine schedule.

Run (CPU, embedded data, no download)::

    python -m recipes.two_domain fit --model.variant split --trainer.max_epochs 15
    python -m recipes.two_domain fit --model.variant separate --seed_everything 1
    python -m recipes.two_domain fit --model.variant mixed --trainer.devices 2 \\
        --trainer.strategy ddp --trainer.accelerator cpu
    python -m recipes.two_domain fit --model.variant split --data.root /data \\
        --trainer.accelerator gpu --trainer.devices 1 --model.width 32

Under DDP each rank normalises with its own batch (of the same 50/50 composition); add
``--trainer.plugins lightning_norms.NormSync`` to all-reduce the BN statistics across ranks.

After ``fit`` the script tests the final weights on each domain's test loader and writes
``<output_dir>/<variant>_seed<seed>.json`` with per-domain and mean accuracy
(``--output_dir``, default ``runs/two_domain``). ``lightning-norms report`` runs every variant
over several seeds and writes the table and plot.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, cast

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser

from lightning_norms.data import TwoDomainDigits
from lightning_norms.recipes._common import (
    VARIANTS,
    DigitsClassifier,
    Feed,
    RecipeCLI,
    Variant,
    accuracy_record,
    recipe_cli,
    study_trainer,
    write_json,
)

__all__ = ["TwoDomainCLI", "batching_for", "cli_main", "data_batch_size", "run_variant"]


def batching_for(variant: str, feed: str | None) -> Feed:
    """The ``TwoDomainDigits`` batching a variant trains on (its own feed unless overridden)."""
    if variant not in VARIANTS:
        raise ValueError(f"two_domain: `variant` must be one of {list(VARIANTS)}, got {variant!r}")
    return cast(Feed, feed or VARIANTS[variant][1])


def data_batch_size(batch_size: int, variant: str, feed: str | None) -> int:
    """``TwoDomainDigits.batch_size`` for ``batch_size`` samples per step, both domains together.

    A mixed batch holds ``batch_size`` samples; the separate feed yields one batch of
    ``batch_size // 2`` per domain, so every variant sees the same samples per step.
    """
    if batch_size < 2 or batch_size % 2:
        raise ValueError(f"two_domain: `batch_size` must be even and >= 2, got {batch_size}")
    return batch_size if batching_for(variant, feed) == "mixed" else batch_size // 2


class TwoDomainCLI(RecipeCLI):
    """LightningCLI for the study: links the feed to the data's batching; tests after ``fit``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument(
            "--output_dir", default="runs/two_domain", help="where the results record goes"
        )
        parser.add_argument(
            "--batch_size",
            type=int,
            default=64,
            help="training samples per step, both domains together (sets data.batch_size)",
        )
        parser.link_arguments(
            ("model.variant", "model.feed"), "data.batching", compute_fn=batching_for
        )
        parser.link_arguments(
            ("batch_size", "model.variant", "model.feed"),
            "data.batch_size",
            compute_fn=data_batch_size,
        )
        parser.link_arguments("data.image_shape", "model.image_shape", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.num_domains", "model.num_domains", apply_on="instantiate")

    def after_fit(self) -> None:
        trainer, model = self.trainer, self.model
        if trainer.interrupted or trainer.sanity_checking:
            return
        trainer.test(model, datamodule=self.datamodule, verbose=True)
        config = self.config["fit"]
        record = {
            "variant": model.variant,
            "feed": model.feed,
            "seed": config["seed_everything"],
            **accuracy_record(trainer.callback_metrics, model.num_domains),
            "epochs": trainer.current_epoch,
            "steps": trainer.global_step,
            "world_size": trainer.world_size,
        }
        path = Path(config["output_dir"]) / f"{record['variant']}_seed{record['seed']}.json"
        write_json(path, record)
        if trainer.is_global_zero:
            print(f"results: {path}")


def cli_main(args: Any = None, run: bool = True) -> TwoDomainCLI:
    """Entry point: ``python -m recipes.two_domain fit --model.variant split ...``."""
    return recipe_cli(TwoDomainCLI, DigitsClassifier, TwoDomainDigits, "two_domain", 15, args, run)


def run_variant(
    variant: Variant,
    seed: int,
    *,
    max_epochs: int = 15,
    batch_size: int = 64,
    data_kwargs: dict[str, Any] | None = None,
    model_kwargs: dict[str, Any] | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train one variant with one seed on ``TwoDomainDigits``, test it, return its record.

    The programmatic twin of the CLI (no logger, no checkpoints, no validation loop): what the
    report calls once per variant and seed. The record holds ``variant``, ``seed``,
    ``acc_domain0``, ``acc_domain1``, ``acc``, ``feed`` and ``seconds``.
    """
    start = time.perf_counter()
    L.seed_everything(seed, workers=True, verbose=False)
    model_kwargs = dict(model_kwargs or {})
    feed = batching_for(variant, model_kwargs.pop("feed", None))
    data = TwoDomainDigits(
        batching=feed,
        batch_size=data_batch_size(batch_size, variant, feed),
        **(data_kwargs or {}),
    )
    model = DigitsClassifier(
        variant=variant,
        feed=feed,
        image_shape=data.image_shape,
        num_classes=data.num_classes,
        num_domains=data.num_domains,
        **model_kwargs,
    )
    trainer = study_trainer(max_epochs, trainer_kwargs)
    trainer.fit(model, datamodule=data)
    trainer.test(model, datamodule=data, verbose=False)
    record: dict[str, Any] = {"variant": variant, "seed": seed}
    record.update(accuracy_record(trainer.callback_metrics, data.num_domains))
    record.update(feed=feed, seconds=round(time.perf_counter() - start, 2))
    return record


if __name__ == "__main__":
    cli_main()
