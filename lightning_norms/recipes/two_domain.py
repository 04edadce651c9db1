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

import argparse
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from lightning.pytorch.cli import LightningArgumentParser

from lightning_norms.data import TwoDomainDigits
from lightning_norms.recipes.models import VARIANTS, DigitsClassifier, Feed, accuracy_record
from lightning_norms.recipes.runner import RecipeCLI, recipe_cli, run_grid, write_json
from lightning_norms.recipes.verdict import Comparison, compare
from lightning_norms.recipes.writer import StudyReport

__all__ = [
    "DEMO_SEEDS",
    "EPOCHS",
    "HEADLINE",
    "RECORD_KEYS",
    "TwoDomainCLI",
    "batching_for",
    "cli_main",
    "comparisons",
    "data_batch_size",
    "format_table",
    "run_study",
    "summarise",
    "verdict",
    "verdicts",
]

#: epochs per run (the CLI's default and the study's)
EPOCHS = 15
#: the keys of a run's record that the study's ``results.json`` keeps
RECORD_KEYS = ("variant", "seed", "acc_domain0", "acc_domain1", "acc")
#: the demo: the pitfall (mixed / separate / split) over five seeds, so that the verdict rule
#: (the claimed sign on 4 of 5 seeds) can be met; about a minute on 2 idle cores
DEMO_SEEDS = 5
HEADLINE = ("mixed", "separate", "split")
DEMO_IMAGE_SIZE = 8


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
        self.run_test()
        config = self.options
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
        self.record = record
        self.say(f"results: {path}")


def cli_main(args: Any = None, run: bool = True, **options: Any) -> TwoDomainCLI:
    """Entry point: ``python -m recipes.two_domain fit --model.variant split ...``."""
    return recipe_cli(
        TwoDomainCLI, DigitsClassifier, TwoDomainDigits, "two_domain", EPOCHS, args, run, **options
    )


def _count(n: int, one: str, many: str | None = None) -> str:
    """``"1 seed"``, ``"5 seeds"``: ``n`` and the word in the right number."""
    return f"{n} {one if n == 1 else many or one + 's'}"


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


def verdicts(records: Sequence[dict[str, Any]]) -> list[tuple[Comparison, float, str]]:
    """:func:`comparisons` as ``(comparison, scale, unit)``, the form every study reports."""
    return [(c, 100.0, " points") for c in comparisons(records).values()]


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
    if "separate" in found and found["separate"].claimed_sign:
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


def _domain_bars(
    ax: Any,
    records: Sequence[dict[str, Any]],
    summary: dict[str, dict[str, Any]],
    variants: Sequence[str],
    domain_names: Sequence[str],
) -> list[float]:
    """Per variant a bar per domain (seed mean) with the seeds as dots; returns the dots."""
    colors = ("#4C72B0", "#DD8452")
    width = 0.38
    dots: list[float] = []
    for k in range(2):
        key = f"acc_domain{k}"
        for i, variant in enumerate(variants):
            x = i + (k - 0.5) * width
            label = domain_names[k] if i == 0 else None
            mean = 100 * summary[variant][key][0]
            ax.bar(x, mean, width * 0.92, color=colors[k], alpha=0.35, label=label)
            seeds = [100 * r[key] for r in records if r["variant"] == variant]
            dots += seeds
            offsets = [
                width * 0.5 * (j - (len(seeds) - 1) / 2) / max(1, len(seeds))
                for j in range(len(seeds))
            ]
            xs = [x + o for o in offsets]
            ax.scatter(xs, seeds, s=18, color=colors[k], edgecolor="black", linewidth=0.4, zorder=3)
    return dots


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
    dots = _domain_bars(ax, records, summary, variants, domain_names)
    means = [100 * summary[v]["acc"][0] for v in variants]
    ax.scatter(
        range(len(variants)),
        means,
        marker="D",
        s=34,
        color="black",
        zorder=4,
        label="mean of both domains",
    )
    if "mixed" in summary:
        ax.axhline(
            100 * summary["mixed"]["acc"][0],
            color="gray",
            linestyle="--",
            linewidth=0.8,
            label="mixed: mean of both domains",
        )
    floor = max(0.0, min(dots) - margin)
    for i, variant in enumerate(variants):
        mean, std = summary[variant]["acc"]
        ax.text(
            i,
            100 + 0.03 * (100 - floor),
            f"{100 * mean:.1f}\n±{100 * std:.1f}",
            ha="center",
            va="bottom",
            fontsize=8,
            fontweight="bold" if variant in HEADLINE else "normal",
        )
    ax.set_xticks(range(len(variants)), [f"{v}\n({VARIANTS[v][1]})" for v in variants], fontsize=8)
    ax.set_ylim(floor, 100 + 0.25 * (100 - floor))
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
        1,
        len(panels),
        figsize=(max(8.0, 1.0 * sum(ratios) + 2.5), 5.0),
        gridspec_kw={"width_ratios": ratios},
        squeeze=False,
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


def _data_options(args: argparse.Namespace) -> dict[str, Any]:
    """``TwoDomainDigits`` options from the report's ``--data-root`` and ``--image-size``."""
    options: dict[str, Any] = {}
    if args.data_root:
        options["root"] = args.data_root
    image_size = args.image_size or (None if args.data_root else DEMO_IMAGE_SIZE)
    if image_size:
        options["image_size"] = image_size
    return options


def _result_line(domain_names: Sequence[str]) -> Any:
    def line(r: dict[str, Any]) -> str:
        return (
            f"  {r['variant']:>8} seed {r['seed']}: {domain_names[0]} "
            f"{100 * r['acc_domain0']:5.1f}  {domain_names[1]} {100 * r['acc_domain1']:5.1f}  "
            f"mean {100 * r['acc']:5.1f}  ({r['seconds']:.1f}s)"
        )

    return line


def _closing() -> list[str]:
    return [
        "Every variant trains the same CNN with the same data, loss, optimizer and learning rate; "
        "`feed` says whether a training step saw one 50/50 mixed batch or one domain-pure "
        "forward per domain (losses averaged, so the objective is identical). Records: "
        "`results.json`.",
        "",
    ]


def run_study(args: argparse.Namespace) -> StudyReport:
    """Train every variant of ``args.variants`` over ``args.seeds`` seeds through the CLI;
    the records, the table, the verdicts and the accuracy plot.

    ``args``: the report's options (``variants``, ``seeds``, ``epochs``, ``batch_size``,
    ``data_root``, ``image_size`` and those of :func:`~lightning_norms.recipes.runner.run_grid`).
    """
    data = _data_options(args)
    domain_names = list(TwoDomainDigits(**data).domain_names)
    runs = [
        {"model": {"variant": v}, "data": data, "batch_size": args.batch_size,
         "seed_everything": seed,
         "trainer": {"limit_val_batches": 0, "num_sanity_val_steps": 0}}
        for v in args.variants
        for seed in range(args.seeds)
    ]  # fmt: skip
    print(
        f"two-domain study: {_count(len(args.variants), 'variant')} x "
        f"{_count(args.seeds, 'seed')}, {_count(args.epochs, 'epoch')} each, "
        f"{_count(min(args.jobs, len(runs)), 'process', 'processes')}",
        flush=True,
    )
    records, wall = run_grid(
        cli_main, runs, args, desc="two-domain study", on_result=_result_line(domain_names)
    )
    summary = summarise(records)
    seeds = sorted({r["seed"] for r in records})
    settings = f"epochs={args.epochs}, batch_size={args.batch_size}, "
    settings += f"data={args.data_root or 'embedded'}, wall_time={wall:.0f}s"
    table = format_table(summary, domain_names)
    findings = verdict(records, summary, domain_names)
    title = (
        f"One CNN, two domains, same data and optimizer: test accuracy ({len(seeds)} seeds)\n"
        "dots = seeds, bars = seed mean per domain, ◆ and label = mean of both domains ± std"
    )
    return StudyReport(
        records=[{k: r[k] for k in RECORD_KEYS} for r in records],
        title="Two domains, one network: BatchNorm's shared-tower pitfall",
        head=f"Test accuracy (%) on {domain_names[0]} and {domain_names[1]}, mean ± std over "
        f"seeds {seeds}. Settings: {settings}.",
        body=[table, "## Verdict", "", *[f"- {line}" for line in findings]],
        plot=lambda path: plot(records, summary, domain_names, path, title),
        plot_name="accuracy.png",
        plot_alt="accuracy per domain",
        closing=_closing(),
        printed=["", table, *[f"- {f.replace('**', '').replace('`', '')}" for f in findings]],
        wall=wall,
    )


if __name__ == "__main__":
    cli_main()
