"""How a recipe runs: its LightningCLI (seeded, ``--threads``), and a study's grid of such runs.

Every run of a study, from ``python -m recipes.<name> fit ...`` or from ``lightning-norms
report``, goes through the same path: the recipe's ``cli_main`` builds the LightningCLI, trains,
and its ``after_fit`` makes the run's record (``cli.record``, also written as JSON). The report
calls :func:`run_grid` with one CLI configuration per setting and seed; it runs them quietly
(no logger, checkpoints, summary or progress bar of their own) in ``--jobs`` spawned processes
under one progress bar (runs done of the total, elapsed time and time left).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import multiprocessing as mp
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_only

__all__ = [
    "DEFAULT_THREADS",
    "GridProgress",
    "RecipeCLI",
    "default_threads",
    "recipe_cli",
    "results_table",
    "run_grid",
    "run_recipe",
    "torch_threads",
    "write_json",
]

#: torch threads per process a recipe uses unless told otherwise: the models are tiny, so on a
#: shared or small CPU one thread is fastest (a 2-epoch run: 2 min with torch's default, 20 s
#: with one thread on 2 cores); set ``--threads`` (or ``LIGHTNING_NORMS_THREADS``) for big data
DEFAULT_THREADS = 1

#: a recipe's ``cli_main(args=None, run=True, *, callbacks=(), quiet=False)``
CliMain = Callable[..., "RecipeCLI"]


def default_threads() -> int:
    """``LIGHTNING_NORMS_THREADS`` when set, else :data:`DEFAULT_THREADS`."""
    value = os.environ.get("LIGHTNING_NORMS_THREADS", "")
    return int(value) if value.strip().isdigit() and int(value) > 0 else DEFAULT_THREADS


class RecipeCLI(LightningCLI):
    """The recipes' LightningCLI: adds ``--threads`` (torch threads, set before training).

    A recipe's ``after_fit`` stores the run's record in ``self.record`` (``None`` until then);
    ``quiet=True`` (the report's runs) keeps it from printing.
    """

    def __init__(self, *args: Any, quiet: bool = False, **kwargs: Any) -> None:
        self.quiet = quiet
        self.record: dict[str, Any] | None = None
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--threads",
            type=int,
            default=default_threads(),
            help="torch threads per process (default 1, or LIGHTNING_NORMS_THREADS: the "
            "recipes' models are tiny; raise it for real MNIST/SVHN on a many-core CPU)",
        )

    @property
    def options(self) -> Any:
        """The parsed options of this run (under ``fit`` when run as ``... fit ...``)."""
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        threads = int(self.options["threads"])
        if threads < 1:
            raise ValueError(f"{type(self).__name__}: `--threads` must be >= 1, got {threads}")
        torch.set_num_threads(threads)

    def run_fit(self) -> None:
        """What the ``fit`` subcommand runs (``before_fit``, ``Trainer.fit``, ``after_fit``), for
        a CLI built with ``run=False`` (which skips the parsers of the other subcommands)."""
        before = getattr(self, "before_fit", None)
        if before is not None:
            before()
        self.trainer.fit(self.model, datamodule=self.datamodule)
        after = getattr(self, "after_fit", None)
        if after is not None:
            after()

    def run_test(self) -> list[Mapping[str, float]]:
        """``trainer.test`` of the fitted model and data, its results printed as one table
        (:func:`results_table`; rank zero, unless quiet) instead of Lightning's, which repeats
        every epoch-end metric under each DataLoader."""
        results = self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
        self.say(results_table(results))
        return results

    def say(self, text: str) -> None:
        """Print ``text`` on rank zero unless quiet."""
        if not self.quiet and self.trainer.is_global_zero:
            print(text)


def results_table(results: Sequence[Mapping[str, float]]) -> str:
    """``trainer.test``'s results as one table, each metric once.

    Lightning prints a column per DataLoader and repeats under each one every metric logged at
    epoch end (the recipes' per-domain accuracies): those appear here once, with one value;
    metrics logged per DataLoader (``<name>/dataloader_idx_<k>``) get a value per DataLoader.

    Example:
        >>> print(results_table([{"test/acc": 0.85, "loss/dataloader_idx_0": 0.25},
        ...                      {"test/acc": 0.85, "loss/dataloader_idx_1": 0.5}]))
        test metric  value   DataLoader 0  DataLoader 1
        test/acc     0.8500
        loss                 0.2500        0.5000
    """
    loaders = len(results)
    rows: dict[str, list[str]] = {}
    for result in results:
        for key, value in result.items():
            name, _, idx = key.rpartition("/dataloader_idx_")
            cells = rows.setdefault(name if idx.isdigit() else key, [""] * (loaders + 1))
            cells[int(idx) + 1 if idx.isdigit() else 0] = f"{float(value):.4f}"
    per_loader = loaders > 1 and any(any(cells[1:]) for cells in rows.values())
    header = ["test metric", "value", *([f"DataLoader {k}" for k in range(loaders)] * per_loader)]
    lines = [header, *([name, *cells[: len(header) - 1]] for name, cells in rows.items())]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def recipe_cli(
    cli_class: type[RecipeCLI],
    model_class: type[L.LightningModule],
    datamodule_class: type[L.LightningDataModule],
    name: str,
    max_epochs: int,
    args: Any = None,
    run: bool = True,
    *,
    callbacks: Sequence[L.Callback] = (),
    quiet: bool = False,
) -> Any:
    """A recipe's LightningCLI with the shared defaults: seed 0, deterministic, ``runs/<name>``.

    ``callbacks`` are added to the Trainer's; ``quiet=True`` (a report's run) turns off the
    logger, checkpoints, model summary, progress bar, saved config and the recipe's prints.
    """
    defaults: dict[str, Any] = {
        "max_epochs": max_epochs,
        "deterministic": True,
        "default_root_dir": f"runs/{name}",
    }
    if quiet:
        defaults.update(
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=False,
        )
    if callbacks:
        defaults["callbacks"] = list(callbacks)
    return cli_class(
        model_class,
        datamodule_class,
        save_config_callback=None if quiet else SaveConfigCallback,
        seed_everything_default=0,
        trainer_defaults=defaults,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        quiet=quiet,
    )


@rank_zero_only
def write_json(path: str | Path, record: Any) -> None:
    """Write ``record`` as indented JSON to ``path`` (rank zero only), creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")


@contextlib.contextmanager
def torch_threads(num_threads: int | None) -> Iterator[None]:
    """Set ``torch.set_num_threads`` for the block (``None`` leaves it), restoring it after."""
    if num_threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class EpochProgress(L.Callback):
    """Reports every finished training epoch as ``sink.put(key)`` (a queue, or a local sink)."""

    def __init__(self, sink: Any, key: int) -> None:
        self._sink = sink
        self._key = key

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sink.put(self._key)


class GridProgress:
    """The progress bar of a grid of runs: ``3/15 runs done``, elapsed time and time left,
    filled by training epochs (``put(key)`` after each epoch of run ``key``, the sink of
    :class:`EpochProgress`; ``run_done(key)`` when a run ends, early stops included).

    Example:
        >>> progress = GridProgress(2, 3, "demo", disable=True)
        >>> progress.put(0); progress.run_done(0); progress.close()
        >>> progress.runs_done, progress.epochs_done
        (1, 3)
    """

    FORMAT = "{desc} |{bar:20}| {percentage:3.0f}% [{elapsed} elapsed, ~{remaining} left]"

    def __init__(self, runs: int, epochs: int, desc: str, disable: bool = False) -> None:
        from tqdm.auto import tqdm

        self.runs_done = 0
        self.epochs_done = 0
        self._runs = runs
        self._name = desc
        self._epochs = epochs
        self._seen = [0] * runs
        self.bar = tqdm(
            total=runs * epochs, desc=self._desc(), disable=disable, bar_format=self.FORMAT
        )

    def _desc(self) -> str:
        return f"{self._name}: {self.runs_done}/{self._runs} runs done"

    def _show(self) -> None:
        self.bar.set_description_str(self._desc(), refresh=True)

    def put(self, key: int) -> None:
        """One training epoch of run ``key`` ended."""
        if self._seen[key] < self._epochs:
            self._seen[key] += 1
            self._advance(1)

    def _advance(self, epochs: int) -> None:
        self.epochs_done += epochs
        self.bar.update(epochs)

    def run_done(self, key: int) -> None:
        """Run ``key`` ended (its epochs not seen, after an early stop, count as done)."""
        self._advance(self._epochs - self._seen[key])
        self._seen[key] = self._epochs
        self.runs_done += 1
        self._show()

    def write(self, text: str) -> None:
        """Print ``text`` above the bar."""
        self.bar.write(text)

    def close(self) -> None:
        self.bar.close()


def run_recipe(
    cli_main: CliMain, config: dict[str, Any], callbacks: Sequence[L.Callback] = ()
) -> dict[str, Any]:
    """One quiet ``fit`` of a recipe with ``config`` (the CLI's options as a nested dict);
    returns the record its ``after_fit`` made, with the run's ``seconds``."""
    start = time.perf_counter()
    cli = cli_main(args=config, run=False, callbacks=callbacks, quiet=True)
    cli.run_fit()
    if cli.record is None:
        raise RuntimeError(f"{type(cli).__name__}: the run made no record (interrupted?)")
    return {**cli.record, "seconds": round(time.perf_counter() - start, 2)}


def _run_task(cli_main: CliMain, config: dict[str, Any], sink: Any, key: int) -> dict[str, Any]:
    """:func:`run_recipe` with an epoch reporter and Lightning's info messages off."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    with torch_threads(int(config["threads"])), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        try:
            return run_recipe(cli_main, config, [EpochProgress(sink, key)])
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def _run_parallel(
    cli_main: CliMain,
    configs: Sequence[dict[str, Any]],
    jobs: int,
    progress: GridProgress,
    on_result: Callable[[dict], None],
) -> list[dict]:
    """The runs in ``jobs`` spawned processes (safe with torch); results in ``configs`` order."""
    results: list[dict] = [{}] * len(configs)
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager, ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
        queue = manager.Queue()
        futures = {
            pool.submit(_run_task, cli_main, config, queue, i): i
            for i, config in enumerate(configs)
        }
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            while not queue.empty():
                progress.put(queue.get())
            for fut in done:
                results[futures[fut]] = fut.result()
                progress.run_done(futures[fut])
                on_result(results[futures[fut]])
    return results


def run_grid(
    cli_main: CliMain,
    runs: Sequence[dict[str, Any]],
    args: argparse.Namespace,
    *,
    desc: str,
    on_result: Callable[[dict], str] | None = None,
) -> tuple[list[dict], float]:
    """Run a recipe once per entry of ``runs`` (CLI options: ``model``, ``data``,
    ``seed_everything``, ...) with the report's options ``args`` (``epochs``, ``max_steps``,
    ``accelerator``, ``threads``, ``jobs``, ``output_dir``, ``no_progress``).

    Returns the records in the order of ``runs`` (every run seeds itself, so they do not depend
    on ``jobs``) and the wall time in seconds; ``on_result(record)`` gives the line printed as
    each run finishes.
    """
    base = {
        "max_epochs": args.epochs,
        "max_steps": args.max_steps,
        "accelerator": args.accelerator,
        "devices": 1,
    }
    configs = [
        {**run, "trainer": {**base, **run.get("trainer", {})}, "threads": args.threads,
         "output_dir": str(args.output_dir)}
        for run in runs
    ]  # fmt: skip
    start = time.perf_counter()
    progress = GridProgress(len(configs), args.epochs, desc, disable=args.no_progress)

    def report(record: dict) -> None:
        if on_result is not None:
            progress.write(on_result(record))

    try:
        jobs = min(args.jobs, len(configs))
        if jobs > 1:
            records = _run_parallel(cli_main, configs, jobs, progress, report)
        else:
            records = []
            for i, config in enumerate(configs):
                records.append(_run_task(cli_main, config, progress, i))
                progress.run_done(i)
                report(records[-1])
    finally:
        progress.close()
    return records, time.perf_counter() - start
