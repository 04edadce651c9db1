"""``lightning-norms report`` / ``make demo``: the two-domain study, end to end, on a CPU.

Trains the headline variants of :mod:`lightning_norms.recipes.two_domain` (``mixed``,
``separate``, ``split``; ``--variants all`` adds ``renorm``, ``layer2d``, ``group``,
``cosine``, ``none``) with five seeds on the embedded two-domain digits, then writes into
``--output-dir`` (default ``runs/demo``):

* ``results.json``: one record per variant and seed with keys ``variant``, ``seed``,
  ``acc_domain0``, ``acc_domain1``, ``acc`` (test accuracy, per domain and mean);
* ``report.md``: the table (mean ± std over seeds) and the verdicts, computed from the paired
  per-seed differences by :mod:`lightning_norms.recipes.verdict` (the rule every study uses);
* ``accuracy.png``: per-domain accuracy of every seed (dots) and the seed mean (bars).

``--study precise_bn | small_batch | gan | lecture`` runs the other claims of the source
articles instead (:mod:`lightning_norms.recipes.sweeps`), into ``runs/<study>/``.

Run::

    python -m recipes.report                      # the demo, same as `make demo`
    lightning-norms report --variants all --seeds 3 --output-dir runs/all
    lightning-norms report --variants mixed separate split --data-root /data  # MNIST + SVHN
    lightning-norms report --study lecture
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_norms.recipes._common import VARIANTS, run_tasks
from lightning_norms.recipes.verdict import Comparison, compare

RECORD_KEYS = ("variant", "seed", "acc_domain0", "acc_domain1", "acc")

#: epochs per run of each study (the demo: 3 variants x 5 seeds x 15 epochs, two processes)
STUDY_EPOCHS = {"two_domain": 15, "precise_bn": 3, "small_batch": 6, "gan": 60, "lecture": 6}
DEFAULT_BATCH_SIZE = 64
DEFAULT_SEEDS = 3
#: the demo: the pitfall (mixed / separate / split) over five seeds, so that the verdict rule
#: (the claimed sign on 4 of 5 seeds) can be met; about a minute on 2 idle cores
DEMO_SEEDS = 5
HEADLINE = ("mixed", "separate", "split")
DEMO_IMAGE_SIZE = 8


def build_parser() -> argparse.ArgumentParser:
    """The ``lightning-norms`` argument parser (one subcommand: ``report``)."""
    parser = argparse.ArgumentParser(
        prog="lightning-norms", description="lightning-norms studies and reports"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser(
        "report", help="run the two-domain BatchNorm study and write results, table and plot"
    )
    rep.add_argument(
        "--study",
        choices=list(STUDY_EPOCHS),
        default="two_domain",
        help="two_domain (default: the demo; article 1), precise_bn (article 3), small_batch "
        "(BatchRenorm, article 1), gan (article 1), lecture (article 4)",
    )
    rep.add_argument(
        "--output-dir", default=None, help="default: runs/demo (two_domain), else runs/<study>"
    )
    rep.add_argument(
        "--seeds", type=int, default=None, help="seeds 0..N-1 (default 5 two_domain, else 3)"
    )
    rep.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="epochs per run (default: "
        + ", ".join(f"{k} {v}" for k, v in STUDY_EPOCHS.items())
        + ")",
    )
    rep.add_argument(
        "--max-steps",
        type=int,
        default=-1,
        help="cap on training steps per run (default -1: no cap; for quick checks)",
    )
    rep.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="default 64")
    rep.add_argument(
        "--variants",
        nargs="+",
        default=list(HEADLINE),
        choices=[*VARIANTS, "all"],
        metavar="VARIANT",
        help="two_domain variants (default: mixed separate split; 'all': "
        + " ".join(VARIANTS)
        + ")",
    )
    rep.add_argument("--data-root", default=None, help="real MNIST + SVHN instead of embedded")
    rep.add_argument(
        "--image-size",
        type=int,
        default=None,
        help=f"image height/width (default {DEMO_IMAGE_SIZE} embedded: the digits' native 8x8; "
        "32 with --data-root)",
    )
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
    return parser


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def summarise(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per variant: mean and std over seeds of ``acc_domain0``, ``acc_domain1`` and ``acc``."""
    out: dict[str, dict[str, Any]] = {}
    for variant in dict.fromkeys(r["variant"] for r in records):
        rows = [r for r in records if r["variant"] == variant]
        entry: dict[str, Any] = {"n": len(rows), "seeds": [r["seed"] for r in rows]}
        for key in ("acc_domain0", "acc_domain1", "acc"):
            entry[key] = _mean_std([r[key] for r in rows])
        out[variant] = entry
    return out


def _fmt(mean_std: tuple[float, float]) -> str:
    mean, std = mean_std
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def format_table(summary: dict[str, dict[str, Any]], domain_names: Sequence[str]) -> str:
    """A markdown table: variant, norm, feed, per-domain and mean accuracy (%, mean ± std)."""
    head = (
        f"| variant | norm | feed | {domain_names[0]} | {domain_names[1]} | mean acc (%) |\n"
        "|---|---|---|---|---|---|\n"
    )
    rows = []
    for variant, s in summary.items():
        norm, feed = VARIANTS[variant]
        rows.append(
            f"| {variant} | {norm} | {feed} | {_fmt(s['acc_domain0'])} | "
            f"{_fmt(s['acc_domain1'])} | **{_fmt(s['acc'])}** |"
        )
    return head + "\n".join(rows) + "\n"


def _by_seed(records: Sequence[dict[str, Any]], variant: str) -> dict[int, float]:
    return {int(r["seed"]): float(r["acc"]) for r in records if r["variant"] == variant}


def comparisons(records: Sequence[dict[str, Any]]) -> dict[str, Comparison]:
    """The study's claims as paired comparisons (see :mod:`lightning_norms.recipes.verdict`).

    ``separate < mixed`` (the pitfall), ``split > mixed`` (per-domain BN is the best), and for
    every other variant fed domain-pure batches ``<variant> < mixed`` (it does not survive them).
    """
    present = {r["variant"] for r in records}
    out: dict[str, Comparison] = {}
    if {"mixed", "separate"} <= present:
        out["separate"] = compare(
            "`separate` < `mixed`", _by_seed(records, "separate"), _by_seed(records, "mixed"), -1
        )
    if {"mixed", "split"} <= present:
        out["split"] = compare(
            "`split` > `mixed`", _by_seed(records, "split"), _by_seed(records, "mixed"), 1
        )
    for variant in VARIANTS:
        if variant in ("mixed", "separate", "split") or variant not in present:
            continue
        if "mixed" in present and VARIANTS[variant][1] == "separate":
            out[variant] = compare(
                f"`{variant}` < `mixed`",
                _by_seed(records, variant),
                _by_seed(records, "mixed"),
                -1,
            )
    return out


def verdict(
    records: Sequence[dict[str, Any]],
    summary: dict[str, dict[str, Any]],
    domain_names: Sequence[str],
) -> list[str]:
    """The study's findings in words, computed from the numbers (one paragraph per finding)."""
    found = comparisons(records)
    lines: list[str] = []
    if "separate" in found:
        lines.append(found["separate"].describe())
        d_sep, d_mix = summary["separate"], summary["mixed"]
        gaps = [d_sep[f"acc_domain{k}"][0] - d_mix[f"acc_domain{k}"][0] for k in range(2)]
        worst = min(range(2), key=lambda k: gaps[k])
        lines.append(
            f"The largest per-domain change from `mixed` to `separate` is on "
            f"{domain_names[worst]}: {100 * gaps[worst]:+.1f} points. With domain-pure forwards, "
            "BN normalises each domain with its own batch statistics during training, while its "
            "running averages (used at test time) converge to the mixture of both domains: "
            "the test-time normalisation is not the one the network was trained with."
        )
    if "split" in found:
        lines.append(found["split"].describe())
    others = [c for k, c in found.items() if k not in ("separate", "split")]
    if others:
        lines.append(
            "Fed the same domain-pure batches as `separate` (for the batch-independent ones, "
            "`layer2d`, `group`, `cosine`, `none`, the feed changes nothing: their gap to `mixed` "
            "is what the normalisation itself is worth on this data): "
            + "; ".join(f"{c.claim} {c.row()}" for c in others)
            + "."
        )
    return lines



def _panel(
    ax: Any,
    records: Sequence[dict[str, Any]],
    summary: dict[str, dict[str, Any]],
    variants: Sequence[str],
    domain_names: Sequence[str],
    margin: float,
) -> None:
    """One axis: per variant, a bar per domain (seed mean) with the seeds as dots, a diamond at
    the mean of both domains and its value ± std above; the y range fits the dots."""
    colors = ("#4C72B0", "#DD8452")
    width = 0.38
    dots: list[float] = []
    for k in range(2):
        key = f"acc_domain{k}"
        for i, variant in enumerate(variants):
            x = i + (k - 0.5) * width
            ax.bar(x, 100 * summary[variant][key][0], width * 0.92, color=colors[k], alpha=0.35,
                   label=domain_names[k] if i == 0 else None)
            seeds = [100 * r[key] for r in records if r["variant"] == variant]
            dots += seeds
            offsets = [width * 0.5 * (j - (len(seeds) - 1) / 2) / max(1, len(seeds))
                       for j in range(len(seeds))]
            ax.scatter([x + o for o in offsets], seeds, s=18, color=colors[k],
                       edgecolor="black", linewidth=0.4, zorder=3)
    means = [100 * summary[v]["acc"][0] for v in variants]
    ax.scatter(range(len(variants)), means, marker="D", s=34, color="black", zorder=4,
               label="mean of both domains")
    if "mixed" in summary:
        ax.axhline(100 * summary["mixed"]["acc"][0], color="gray", linestyle="--", linewidth=0.8,
                   label="mixed: mean of both domains")
    floor = max(0.0, min(dots) - margin)
    top = 100 + 0.25 * (100 - floor)
    for i, variant in enumerate(variants):
        mean, std = summary[variant]["acc"]
        ax.text(i, 100 + 0.03 * (100 - floor), f"{100 * mean:.1f}\n±{100 * std:.1f}",
                ha="center", va="bottom", fontsize=8,
                fontweight="bold" if variant in HEADLINE else "normal")
    ax.set_xticks(range(len(variants)), [f"{v}\n({VARIANTS[v][1]})" for v in variants],
                  fontsize=8)
    ax.set_ylim(floor, top)
    ax.set_yticks([t for t in ax.get_yticks() if floor <= t <= 100])
    ax.spines[["top", "right"]].set_visible(False)


def plot(
    records: Sequence[dict[str, Any]],
    summary: dict[str, dict[str, Any]],
    domain_names: Sequence[str],
    path: Path,
    title: str,
) -> None:
    """Save the accuracy plot: the pitfall zoomed in (mixed / separate / split) on the left,
    every variant on the right; seed dots, mean bars per domain, mean-of-domains diamonds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(summary)
    headline = [v for v in HEADLINE if v in summary]
    panels = [(headline, "the pitfall, zoomed in", 1.5)] if len(headline) > 1 else []
    if len(variants) > len(headline) or not panels:
        panels.append((variants, "every variant", 5.0))
    ratios = [max(2, len(v)) for v, _, _ in panels]
    fig, axes = plt.subplots(
        1, len(panels), figsize=(max(8.0, 1.0 * sum(ratios) + 2.5), 5.0),
        gridspec_kw={"width_ratios": ratios}, squeeze=False,
    )
    for ax, (names, subtitle, margin) in zip(axes[0], panels, strict=True):
        _panel(ax, records, summary, names, domain_names, margin)
        ax.set_title(subtitle, fontsize=9, pad=22)
    axes[0][0].set_ylabel("test accuracy (%)")
    handles, labels = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def write_report(
    records: Sequence[dict[str, Any]],
    output_dir: Path,
    *,
    domain_names: Sequence[str],
    settings: dict[str, Any],
) -> dict[str, Path]:
    """Write ``results.json``, ``report.md`` and ``accuracy.png`` into ``output_dir``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    results = [{k: r[k] for k in RECORD_KEYS} for r in records]
    paths = {
        "results": output_dir / "results.json",
        "report": output_dir / "report.md",
        "plot": output_dir / "accuracy.png",
    }
    paths["results"].write_text(json.dumps(results, indent=2) + "\n")
    summary = summarise(records)
    seeds = sorted({r["seed"] for r in records})
    title = (
        f"One CNN, two domains, same data and optimizer: test accuracy ({len(seeds)} seeds)\n"
        "dots = seeds, bars = seed mean per domain, ◆ and label = mean of both domains ± std"
    )
    plot(records, summary, domain_names, paths["plot"], title)
    table = format_table(summary, domain_names)
    findings = verdict(records, summary, domain_names)
    settings_line = ", ".join(f"{k}={v}" for k, v in settings.items())
    text = [
        "# Two domains, one network: BatchNorm's shared-tower pitfall",
        "",
        f"Test accuracy (%) on {domain_names[0]} and {domain_names[1]}, mean ± std over seeds "
        f"{seeds}. Settings: {settings_line}.",
        "",
        table,
        "## Verdict",
        "",
        *[f"- {line}" for line in findings],
        "",
        "![accuracy per domain](accuracy.png)",
        "",
        "Every variant trains the same CNN with the same data, loss, optimizer and learning rate; "
        "`feed` says whether a training step saw one 50/50 mixed batch or one domain-pure "
        "forward per domain (losses averaged, so the objective is identical). Records: "
        "`results.json`.",
        "",
    ]
    paths["report"].write_text("\n".join(text))
    return paths


def run_study(args: argparse.Namespace) -> dict[str, Path]:
    """Train every requested variant and seed, write the report, print the table."""
    from lightning_norms.data import TwoDomainDigits
    from lightning_norms.recipes.two_domain import run_variant

    output_dir = Path(args.output_dir)
    data_kwargs: dict[str, Any] = {}
    if args.data_root:
        data_kwargs["root"] = args.data_root
    image_size = args.image_size or (None if args.data_root else DEMO_IMAGE_SIZE)
    if image_size:
        data_kwargs["image_size"] = image_size
    domain_names = list(
        getattr(TwoDomainDigits(**data_kwargs), "domain_names", ("domain 0", "domain 1"))
    )
    start = time.perf_counter()
    trainer_kwargs: dict[str, Any] = {
        "accelerator": args.accelerator,
        "max_steps": args.max_steps,
    }
    tasks = [
        {
            "variant": variant,
            "seed": seed,
            "max_epochs": args.epochs,
            "batch_size": args.batch_size,
            "data_kwargs": data_kwargs,
            "trainer_kwargs": trainer_kwargs,
        }
        for variant in args.variants
        for seed in range(args.seeds)
    ]
    jobs = min(args.jobs, len(tasks))
    print(
        f"two-domain study: {len(args.variants)} variants x {args.seeds} seeds, "
        f"{args.epochs} epochs each, {jobs} process(es)",
        flush=True,
    )

    def line(r: dict[str, Any]) -> str:
        return (
            f"  {r['variant']:>8} seed {r['seed']}: {domain_names[0]} "
            f"{100 * r['acc_domain0']:5.1f}  {domain_names[1]} {100 * r['acc_domain1']:5.1f}  "
            f"mean {100 * r['acc']:5.1f}  ({r['seconds']:.1f}s)"
        )

    records = run_tasks(
        run_variant,
        tasks,
        epochs_per_task=args.epochs,
        jobs=jobs,
        threads=args.threads,
        desc="two-domain study",
        progress=not args.no_progress,
        on_result=line,
    )
    wall = time.perf_counter() - start
    settings = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "data": args.data_root or "embedded",
        "wall_time": f"{wall:.0f}s",
    }
    paths = write_report(records, output_dir, domain_names=domain_names, settings=settings)
    summary = summarise(records)
    print()
    print(format_table(summary, domain_names))
    for finding in verdict(records, summary, domain_names):
        print("-", finding.replace("**", "").replace("`", ""))
    print(f"\nwall time {wall:.0f}s; report written to {paths['report']}")
    print(f"  table + verdict: {paths['report']}\n  plot: {paths['plot']}")
    print(f"  records: {paths['results']}")
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """``lightning-norms report [options]``; with no arguments at all, the demo."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["report", *argv]
    args = build_parser().parse_args(argv)
    if args.output_dir is None:
        args.output_dir = "runs/demo" if args.study == "two_domain" else f"runs/{args.study}"
    if args.seeds is None:
        args.seeds = DEMO_SEEDS if args.study == "two_domain" else DEFAULT_SEEDS
    if "all" in args.variants:
        args.variants = list(VARIANTS)
    if args.epochs is None:
        args.epochs = STUDY_EPOCHS[args.study]
    if args.seeds < 1 or args.epochs < 1 or args.batch_size < 2 or args.jobs < 1:
        raise SystemExit(
            "lightning-norms report: --seeds, --epochs and --jobs >= 1, --batch-size >= 2"
        )
    if args.study == "two_domain":
        run_study(args)
    else:
        from lightning_norms.recipes import sweeps

        getattr(sweeps, f"run_{args.study}")(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
