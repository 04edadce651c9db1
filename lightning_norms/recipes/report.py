"""``lightning-norms report`` / ``make demo``: run one study end to end and write its report.

The default study is the two-domain one (:mod:`lightning_norms.recipes.two_domain`): the
headline variants (``mixed``, ``separate``, ``split``; ``--variants all`` adds ``renorm``,
``layer2d``, ``group``, ``cosine``, ``none``) with five seeds on the embedded two-domain digits,
written into ``--output-dir`` (default ``runs/demo``):

* ``results.json``: one record per variant and seed with keys ``variant``, ``seed``,
  ``acc_domain0``, ``acc_domain1``, ``acc`` (test accuracy, per domain and mean);
* ``report.md``: the table (mean ± std over seeds) and the verdicts, computed from the paired
  per-seed differences by :mod:`lightning_norms.recipes.verdict` (the rule every study uses);
* ``accuracy.png``: per-domain accuracy of every seed (dots) and the seed mean (bars).

``--study precise_bn | small_batch | gan | lecture`` runs the other claims of the source
articles instead, into ``runs/<study>/`` (``results.json``, ``report.md``, ``plot.png``). Every
study is one module with its LightningCLI and a ``run_study(args)`` that trains its grid
through that same CLI; :data:`STUDIES` names them. Each run also leaves the CLI's own record
(``<run>.json``) in the output folder.

Run::

    python -m recipes.report                      # the demo, same as `make demo`
    python -m lightning_norms.recipes.report      # the same from an installed wheel
    lightning-norms report --variants all --seeds 3 --output-dir runs/all
    lightning-norms report --variants mixed separate split --data-root /data  # MNIST + SVHN
    lightning-norms report --study lecture
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from lightning_norms.recipes.writer import StudyReport

__all__ = ["STUDIES", "Study", "build_parser", "main"]

DEFAULT_BATCH_SIZE = 64
DEFAULT_SEEDS = 5
# The parser's constants, written out so that ``--help`` imports neither torch nor Lightning
# (``tests/recipes/test_report.py`` checks them against the study modules).
#: :data:`lightning_norms.recipes.models.VARIANTS`, in order
VARIANT_NAMES = ("mixed", "separate", "split", "renorm", "layer2d", "group", "cosine", "none")
#: :data:`lightning_norms.recipes.two_domain.HEADLINE`
HEADLINE = ("mixed", "separate", "split")
#: :data:`lightning_norms.recipes.two_domain.DEMO_IMAGE_SIZE`
DEMO_IMAGE_SIZE = 8


class Study(NamedTuple):
    """A study the report can run: its module, epochs and seeds per run by default, folder, and
    what it tests (the ``--help`` line)."""

    module: str
    epochs: int
    seeds: int
    output_dir: str
    claim: str

    @property
    def run(self) -> Callable[[argparse.Namespace], StudyReport]:
        """The study module's ``run_study`` (imported on first use: it imports Lightning)."""
        return importlib.import_module(f"lightning_norms.recipes.{self.module}").run_study


#: the studies ``--study`` names (the demo: 3 variants x 5 seeds x 15 epochs, two processes);
#: the epochs are each module's ``EPOCHS``
STUDIES: dict[str, Study] = {
    "two_domain": Study(
        "two_domain", 15, 5, "runs/demo",
        "the demo: one BN for two domains vs per-domain BN (article 1)",
    ),
    "precise_bn": Study(
        "precise_bn", 3, DEFAULT_SEEDS, "runs/precise_bn",
        "PreciseBN's exact statistics vs the running average (article 3)",
    ),
    "small_batch": Study(
        "small_batch", 6, DEFAULT_SEEDS, "runs/small_batch",
        "BN, BatchRenorm, GroupNorm on small/sorted batches (article 1)",
    ),
    "gan": Study(
        "gan", 60, DEFAULT_SEEDS, "runs/gan",
        "GAN discriminator fed alternating vs mixed batches (article 1)",
    ),
    "lecture": Study(
        "lecture", 6, DEFAULT_SEEDS, "runs/lecture",
        "BN: faster training, higher learning rates, sigmoids (article 4)",
    ),
}  # fmt: skip


def _add_study_options(rep: argparse.ArgumentParser) -> None:
    rep.add_argument(
        "--study",
        choices=list(STUDIES),
        default="two_domain",
        metavar="NAME",
        help="the study to run (default two_domain; the studies are listed below)",
    )
    rep.add_argument(
        "--output-dir", default=None, help="default: runs/demo (two_domain), else runs/<study>"
    )
    rep.add_argument(
        "--seeds", type=int, default=None, help="seeds 0..N-1 (default 5, every study)"
    )
    epochs = ", ".join(f"{k} {s.epochs}" for k, s in STUDIES.items())
    rep.add_argument("--epochs", type=int, default=None, help=f"epochs per run (default: {epochs})")
    rep.add_argument(
        "--max-steps",
        type=int,
        default=-1,
        help="cap on training steps per run (default -1: no cap; for quick checks)",
    )


def _add_two_domain_options(rep: argparse.ArgumentParser) -> None:
    rep.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="default 64")
    rep.add_argument(
        "--variants",
        nargs="+",
        default=list(HEADLINE),
        choices=[*VARIANT_NAMES, "all"],
        metavar="VARIANT",
        help="two_domain variants (default: mixed separate split; 'all': "
        + " ".join(VARIANT_NAMES)
        + ")",
    )
    rep.add_argument("--data-root", default=None, help="real MNIST + SVHN instead of embedded")
    rep.add_argument(
        "--image-size",
        type=int,
        default=None,
        help=f"image height/width (default {DEMO_IMAGE_SIZE} embedded: the digits' "
        "native 8x8; 32 with --data-root)",
    )


def _add_machine_options(rep: argparse.ArgumentParser) -> None:
    rep.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="runs trained in parallel processes (default: 2, or 1 on a 1-core machine)",
    )
    rep.add_argument(
        "--threads", type=int, default=1, help="torch threads per run (default 1: tiny model)"
    )
    rep.add_argument("--accelerator", default="cpu", help="Lightning accelerator (default cpu)")
    rep.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _studies_epilog() -> str:
    width = max(map(len, STUDIES))
    lines = [f"  {name:<{width}}  {study.claim}" for name, study in STUDIES.items()]
    return "\n".join(["studies (--study NAME):", *lines])


def build_parser() -> argparse.ArgumentParser:
    """The ``lightning-norms`` argument parser (one subcommand: ``report``); building it and
    answering ``--help`` or ``--version`` imports neither torch nor Lightning."""
    from lightning_norms import __version__

    studies = ", ".join(STUDIES)
    parser = argparse.ArgumentParser(
        prog="lightning-norms",
        description=f"lightning-norms {__version__}: reproduce the source articles' "
        "BatchNorm claims\n(`lightning-norms report --study NAME`).",
        epilog=_studies_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"lightning-norms {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser(
        "report",
        help=f"run one study ({studies}; default two_domain) and write its records, "
        "verdicts and plot",
        description="Train a study's grid of runs (settings x seeds) and write results.json,\n"
        "report.md (table and verdicts) and a plot into --output-dir.",
        epilog=_studies_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_study_options(rep)
    _add_two_domain_options(rep)
    _add_machine_options(rep)
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The report's options with the chosen study's defaults filled in.

    Raises:
        SystemExit: a count below its minimum.
    """
    args = build_parser().parse_args(argv)
    study = STUDIES[args.study]
    args.output_dir = args.output_dir or study.output_dir
    args.seeds = study.seeds if args.seeds is None else args.seeds
    args.epochs = study.epochs if args.epochs is None else args.epochs
    if "all" in args.variants:
        args.variants = list(VARIANT_NAMES)
    if args.seeds < 1 or args.epochs < 1 or args.batch_size < 2 or args.jobs < 1:
        raise SystemExit(
            "lightning-norms report: --seeds, --epochs and --jobs >= 1, --batch-size >= 2"
        )
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """``lightning-norms report [options]``; with no arguments at all, the demo."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv = ["report", *argv]
    args = parse_args(argv)
    from lightning_norms.recipes.writer import write_report

    report = STUDIES[args.study].run(args)
    paths = write_report(report, args.output_dir)
    print(f"\nwall time {report.wall:.0f}s; report written to {paths['report']}")
    print(f"  table + verdict: {paths['report']}\n  plot: {paths['plot']}")
    print(f"  records: {paths['results']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
