"""The sweeps behind ``lightning-norms report --study precise_bn | small_batch | gan``.

Each trains a grid of one recipe's settings over seeds (parallel processes, one progress bar),
then writes ``results.json`` (every run's record) and ``report.md`` (mean ± std over seeds)
into ``--output-dir`` (default ``runs/<study>``) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from lightning_norms.recipes._common import run_tasks

__all__ = ["run_gan", "run_precise_bn", "run_small_batch"]


def _ms(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def _groups(records: Sequence[dict], keys: Sequence[str]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in records:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def _write(
    args: argparse.Namespace, records: list[dict], title: str, lines: list[str], wall: float
) -> Path:
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(records, indent=2) + "\n")
    seeds = sorted({r["seed"] for r in records})
    head = [
        f"# {title}",
        "",
        f"Seeds {seeds}, {args.epochs} epochs per run, wall time {wall:.0f}s.",
        "",
    ]
    (out / "report.md").write_text("\n".join([*head, *lines, ""]))
    print("\n".join(lines))
    print(f"\nwall time {wall:.0f}s; report written to {out / 'report.md'}")
    return out


def _run(
    args: argparse.Namespace, fn: Callable[..., dict], tasks: list[dict], desc: str
) -> tuple[list[dict], float]:
    start = time.perf_counter()
    trainer_kwargs = {"accelerator": args.accelerator, "max_steps": args.max_steps}
    for task in tasks:
        task["trainer_kwargs"] = trainer_kwargs
        task["max_epochs"] = args.epochs
    records = run_tasks(
        fn,
        tasks,
        epochs_per_task=args.epochs,
        jobs=min(args.jobs, len(tasks)),
        threads=args.threads,
        desc=desc,
        progress=not args.no_progress,
    )
    return records, time.perf_counter() - start


def run_precise_bn(args: argparse.Namespace) -> Path:
    """EMA vs PreciseBN over learning rates x BN momenta x seeds (constant learning rate)."""
    from lightning_norms.recipes.precise_bn import DEFAULT_PRECISE_BATCHES, run_setting

    tasks = [
        {"lr": lr, "bn_momentum": m, "seed": s}
        for lr in (1e-3, 1e-2, 3e-2)
        for m in (0.1, 0.01)
        for s in range(args.seeds)
    ]
    records, wall = _run(args, run_setting, tasks, "precise_bn study")
    for r in records:
        r.pop("detail", None)
    ns = [str(n) for n in DEFAULT_PRECISE_BATCHES]
    lines = [
        "Mean test accuracy (%) of the same weights with EMA running statistics and with PreciseBN "
        "statistics recomputed over n training batches (64 samples each).",
        "",
        "| lr | BN momentum | EMA | " + " | ".join(f"PreciseBN n={n}" for n in ns) + " |",
        "|---|---|---|" + "---|" * len(ns),
    ]
    for (lr, m), rows in _groups(records, ("lr", "bn_momentum")).items():
        cells = [_ms([r["acc_precise"][n] for r in rows]) for n in ns]
        lines.append(
            f"| {lr:g} | {m:g} | {_ms([r['acc_ema'] for r in rows])} | " + " | ".join(cells) + " |"
        )
    return _write(args, records, "EMA vs PreciseBN statistics", lines, wall)


def run_small_batch(args: argparse.Namespace) -> Path:
    """BN vs BatchRenorm vs GroupNorm at batches 2, 4, 32 and class-sorted batches of 32."""
    from lightning_norms.recipes.small_batch import NORMS, SETTINGS, run_setting

    tasks = [
        {"norm": norm, "batch_size": b, "order": order, "seed": s}
        for norm in NORMS
        for b, order in SETTINGS
        for s in range(args.seeds)
    ]
    records, wall = _run(args, run_setting, tasks, "small_batch study")
    cols = [f"batch {b}, {order.replace('_', '-')}" for b, order in SETTINGS]
    lines = [
        "Test accuracy (%) on the digits with running statistics, per-device batch size and "
        "batch order (class-sorted: every batch holds 2 of the 10 classes), same epochs.",
        "",
        "| norm | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    groups = _groups(records, ("norm", "batch_size", "order"))
    for norm in NORMS:
        cells = [_ms([r["acc"] for r in groups[(norm, b, o)]]) for b, o in SETTINGS]
        lines.append(f"| {norm} | " + " | ".join(cells) + " |")
    sorted_group = groups.get(("group", 32, "class_sorted"), [])
    if sorted_group and statistics.fmean(r["acc"] for r in sorted_group) < 0.5:
        lines += [
            "",
            "GroupNorm has no train/test difference, so its failure with class-sorted batches "
            "is not BN's statistics mismatch: it is the optimisation (every step's gradient sees "
            "2 classes only). BN and BatchRenorm train through it here; what separates them is "
            "the test-time normalisation, which BatchRenorm keeps closer to what training used.",
        ]
    return _write(args, records, "Small and non-i.i.d. batches", lines, wall)


def run_gan(args: argparse.Namespace) -> Path:
    """DCGAN discriminator fed alternating / mixed / split batches; sample quality per mode."""
    from lightning_norms.recipes.gan import MODES, run_mode

    tasks = [
        {"mode": mode, "seed": s, "output_dir": args.output_dir}
        for mode in MODES
        for s in range(args.seeds)
    ]
    records, wall = _run(args, run_mode, tasks, "gan study")
    lines = [
        "Quality of 1000 samples judged by a digits classifier trained on the real digits: mean "
        "confidence, classes covered (>= 2 % of samples), effective number of classes "
        "(exp entropy), MMD² to real test digits in the classifier's features (lower is better). "
        "Grids: `<mode>_seed<seed>.png`.",
        "",
        "| discriminator feed | confidence (%) | classes covered | effective classes | MMD² |",
        "|---|---|---|---|---|",
    ]
    for (mode,), rows in _groups(records, ("mode",)).items():
        lines.append(
            f"| {mode} | {_ms([r['confidence'] for r in rows])} | "
            f"{_ms([r['classes_covered'] for r in rows], 1.0)} | "
            f"{_ms([r['effective_classes'] for r in rows], 1.0)} | "
            f"{_ms([r['mmd'] for r in rows], 1.0, 3)} |"
        )
    real = records[0]
    lines.append(
        f"| real test digits | {100 * real['real_confidence']:.1f} | "
        f"{real['real_classes_covered']} | "
        f"{real['real_effective_classes']:.1f} | {real['real_mmd']:.3f} |"
    )
    by_mode = _groups(records, ("mode",))
    mmd = {m: statistics.fmean(r["mmd"] for r in rows) for (m,), rows in by_mode.items()}
    if {"alternating", "mixed"} <= set(mmd):
        better = "mixed" if mmd["mixed"] < mmd["alternating"] else "alternating"
        lines += [
            "",
            f"Lower MMD² (closer to the real digits): `{better}` "
            f"(mixed {mmd['mixed']:.3f} vs alternating {mmd['alternating']:.3f}). "
            + (
                "The article's advice (feed the discriminator 50/50 mixed batches) helped here."
                if better == "mixed"
                else "On this small data set the article's advice (50/50 mixed batches) did not "
                "improve the samples over alternating pure batches."
            ),
        ]
    if "split" in mmd:
        lines.append(
            f"`split` (per-kind BN statistics in the discriminator): MMD² {mmd['split']:.3f}. "
            "Normalising real and fake batches with their own statistics hides the difference "
            "of their feature means and scales from the discriminator, so those are not learned "
            "by the generator; per-domain BN suits inputs that should be treated alike, not "
            "a real/fake decision."
        )
    return _write(args, records, "DCGAN: how the discriminator's BatchNorm is fed", lines, wall)
