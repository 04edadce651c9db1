"""The sweeps behind ``lightning-norms report --study precise_bn | small_batch | gan | lecture``.

Each trains a grid of one recipe's settings over seeds (parallel processes, one progress bar),
then writes ``results.json`` (every run's record), ``report.md`` (mean ± std over seeds and the
claim's verdicts, computed by :mod:`lightning_norms.recipes.verdict` from the paired per-seed
differences) and a plot into ``--output-dir`` (default ``runs/<study>``) and prints them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lightning_norms.recipes._common import run_tasks
from lightning_norms.recipes.verdict import Comparison, compare

__all__ = ["run_gan", "run_lecture", "run_precise_bn", "run_small_batch"]


def _ms(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def _groups(records: Sequence[dict], keys: Sequence[str]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in records:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def _by_seed(rows: Sequence[dict], key: str) -> dict[int, float]:
    return {int(r["seed"]): float(r[key]) for r in rows}


def _verdicts(found: Sequence[tuple[Comparison, float, str]]) -> list[str]:
    """The ``## Verdict`` section: one line per claim, with its figures."""
    return ["", "## Verdict", "", *[f"- {c.describe(scale, unit)}" for c, scale, unit in found]]


def _plot_bars(
    groups: dict[str, list[float]], path: Path, ylabel: str, title: str, scale: float = 100.0
) -> None:
    """One bar per group (seed mean) with the seeds as dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(groups) + 1.5), 3.8))
    for i, values in enumerate(groups.values()):
        ax.bar(i, scale * statistics.fmean(values), 0.7, color="#4C72B0", alpha=0.4)
        ax.scatter([i] * len(values), [scale * v for v in values], s=16, color="black", zorder=3)
    ax.set_xticks(range(len(groups)), list(groups), fontsize=7, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
        f"Seeds {seeds}, {args.epochs} epochs per run, wall time {wall:.0f}s "
        f"({args.jobs} process(es), {args.threads} torch thread(s) each).",
        "",
    ]
    (out / "report.md").write_text("\n".join([*head, *lines, "", "![plot](plot.png)", ""]))
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
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(records, indent=2) + "\n")
    return records, time.perf_counter() - start


def run_precise_bn(args: argparse.Namespace) -> Path:
    """EMA vs PreciseBN over learning rates x BN momenta x seeds (constant learning rate)."""
    from lightning_norms.recipes.precise_bn import DEFAULT_PRECISE_BATCHES, run_setting

    tasks: list[dict[str, Any]] = [
        {"lr": lr, "bn_momentum": m, "seed": s}
        for lr in (1e-3, 3e-2)
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
    found, bars = [], {}
    for (lr, m), rows in _groups(records, ("lr", "bn_momentum")).items():
        cells = [_ms([r["acc_precise"][n] for r in rows]) for n in ns]
        lines.append(
            f"| {lr:g} | {m:g} | {_ms([r['acc_ema'] for r in rows])} | " + " | ".join(cells) + " |"
        )
        for r in rows:
            r["acc_precise_max"] = r["acc_precise"][ns[-1]]
        claim = f"PreciseBN (n={ns[-1]}) > EMA at lr {lr:g}, momentum {m:g}"
        found.append(
            (
                compare(claim, _by_seed(rows, "acc_precise_max"), _by_seed(rows, "acc_ema")),
                100.0,
                " points",
            )
        )
        bars[f"lr {lr:g} m {m:g}: EMA"] = [r["acc_ema"] for r in rows]
        bars[f"lr {lr:g} m {m:g}: PreciseBN"] = [r["acc_precise_max"] for r in rows]
    lines += _verdicts(found)
    out = _write(args, records, "EMA vs PreciseBN statistics", lines, wall)
    _plot_bars(bars, out / "plot.png", "test accuracy (%)", "same weights, EMA vs PreciseBN stats")
    return out


def run_small_batch(args: argparse.Namespace) -> Path:
    """BN vs BatchRenorm vs GroupNorm with small per-device batches and class-sorted batches."""
    from lightning_norms.recipes.small_batch import NORMS, SETTINGS, STEP_BATCH, run_setting

    tasks: list[dict[str, Any]] = [
        {"norm": norm, "batch_size": b, "order": order, "seed": s}
        for norm in NORMS
        for b, order in SETTINGS
        for s in range(args.seeds)
    ]
    records, wall = _run(args, run_setting, tasks, "small_batch study")
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
    groups = _groups(records, ("norm", "batch_size", "order"))
    for norm in NORMS:
        cells = [_ms([r["acc"] for r in groups[(norm, b, o)]]) for b, o in SETTINGS]
        lines.append(f"| {norm} | " + " | ".join(cells) + " |")
    found = [
        (
            compare(
                f"`renorm` > `batch` at {b} per device, {o.replace('_', '-')}",
                _by_seed(groups[("renorm", b, o)], "acc"),
                _by_seed(groups[("batch", b, o)], "acc"),
            ),
            100.0,
            " points",
        )
        for b, o in SETTINGS
        if ("renorm", b, o) in groups and ("batch", b, o) in groups
    ]
    lines += _verdicts(found)
    out = _write(args, records, "Small and non-i.i.d. batches", lines, wall)
    bars = {
        f"{n} {b}{' sorted' if o != 'shuffled' else ''}": [r["acc"] for r in groups[(n, b, o)]]
        for b, o in SETTINGS
        for n in NORMS
    }
    _plot_bars(bars, out / "plot.png", "test accuracy (%)", "per-device batch and order")
    return out


def run_gan(args: argparse.Namespace) -> Path:
    """DCGAN discriminator fed alternating / mixed / split batches; sample quality per mode."""
    from lightning_norms.recipes.gan import MODES, run_mode

    tasks: list[dict[str, Any]] = [
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
    by_mode = _groups(records, ("mode",))
    for (mode,), rows in by_mode.items():
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
    mmd = {m: _by_seed(rows, "mmd") for (m,), rows in by_mode.items()}
    found = [
        (
            compare(f"`{m}` MMD² < `alternating` MMD²", mmd[m], mmd["alternating"], -1),
            1000.0,
            " x 1e-3",
        )
        for m in ("mixed", "split")
        if m in mmd and "alternating" in mmd
    ]
    lines += _verdicts(found)
    if "split" in mmd:
        lines += [
            "",
            "`split` gives the discriminator per-kind BN statistics with one shared affine "
            "(`DomainBatchNorm2d(shared_affine=True)`), so the real/fake label reaches it only "
            "through the statistics, not through a per-kind shift.",
        ]
    out = _write(args, records, "DCGAN: how the discriminator's BatchNorm is fed", lines, wall)
    bars = {m: list(v.values()) for m, v in mmd.items()}
    _plot_bars(bars, out / "plot.png", "MMD² to real digits (lower is better)", "GAN", 1.0)
    return out


def _steps(record: dict, cap: int) -> float:
    """Steps to the target accuracy; a run that never reached it counts as ``cap``."""
    steps = record["steps_to_target"]
    return float(cap if steps is None else steps)


def _plot_curves(records: Sequence[dict], path: Path, target: float) -> None:
    """Validation accuracy vs steps (seed mean), one panel per setting, BN solid, none dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _groups(records, ("activation", "lr"))
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 3.0), squeeze=False)
    for ax, ((act, lr), rows) in zip(axes[0], panels.items(), strict=True):
        for variant, style in (("mixed", "-"), ("none", "--")):
            curves = [r["curve"] for r in rows if r["variant"] == variant]
            if not curves:
                continue
            steps = [p[0] for p in curves[0]]
            mean = [100 * statistics.fmean(c[i][1] for c in curves) for i in range(len(steps))]
            ax.plot(steps, mean, style, label="BN" if variant == "mixed" else "no BN")
        ax.axhline(100 * target, color="gray", linewidth=0.6)
        ax.set_title(f"{act}, SGD lr {lr:g}", fontsize=8)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylim(0, 100)
    axes[0][0].set_ylabel("validation accuracy (%)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_lecture(args: argparse.Namespace) -> Path:
    """BN vs no BN across learning rates (ReLU) and with sigmoids: speed, lr range, accuracy."""
    from lightning_norms.recipes.lecture import (
        DEFAULT_TARGET,
        LEARNING_RATES,
        SIGMOID_LR,
        run_setting,
    )

    grid = [("relu", lr) for lr in LEARNING_RATES] + [("sigmoid", SIGMOID_LR)]
    tasks: list[dict[str, Any]] = [
        {"variant": v, "activation": act, "lr": lr, "seed": s}
        for act, lr in grid
        for v in ("mixed", "none")
        for s in range(args.seeds)
    ]
    records, wall = _run(args, run_setting, tasks, "lecture study")
    cap = max(p[0] for r in records for p in r["curve"]) if records[0]["curve"] else 0
    groups = _groups(records, ("variant", "activation", "lr"))
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
            f"| {act} | {lr:g} | {_ms([_steps(r, cap) for r in bn], 1.0, 0)} | "
            f"{_ms([r['acc'] for r in bn])} | {_ms([_steps(r, cap) for r in plain], 1.0, 0)} | "
            f"{_ms([r['acc'] for r in plain])} |"
        )
    low, high = LEARNING_RATES[0], LEARNING_RATES[-1]
    steps = {k: {int(r["seed"]): _steps(r, cap) for r in rows} for k, rows in groups.items()}
    found = [
        (
            compare(
                f"BN reaches {100 * DEFAULT_TARGET:.0f}% in fewer steps (ReLU, lr {low:g})",
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
                _by_seed(groups[("mixed", "relu", high)], "acc"),
                _by_seed(groups[("none", "relu", low)], "acc"),
            ),
            100.0,
            " points",
        ),
        (
            compare(
                f"BN > no BN at the highest lr {high:g} (test acc)",
                _by_seed(groups[("mixed", "relu", high)], "acc"),
                _by_seed(groups[("none", "relu", high)], "acc"),
            ),
            100.0,
            " points",
        ),
        (
            compare(
                f"sigmoid: BN > no BN (lr {SIGMOID_LR:g}, test acc)",
                _by_seed(groups[("mixed", "sigmoid", SIGMOID_LR)], "acc"),
                _by_seed(groups[("none", "sigmoid", SIGMOID_LR)], "acc"),
            ),
            100.0,
            " points",
        ),
    ]
    lines += _verdicts(found)
    out = _write(args, records, "The lecture: BN trains faster, higher, with sigmoids", lines, wall)
    _plot_curves(records, out / "plot.png", DEFAULT_TARGET)
    return out
