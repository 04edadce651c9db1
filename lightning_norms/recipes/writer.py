"""The report writer every study shares: table cells, the verdict section, bar plots, the files.

A study hands :func:`write_report` a :class:`StudyReport` (its records, title, settings line,
markdown body, plot) and gets ``results.json``, ``report.md`` and the plot in its output folder,
with the body printed.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_norms.recipes.verdict import Comparison

__all__ = [
    "MARKS",
    "StudyReport",
    "add_caption",
    "by_seed",
    "draw_points",
    "group_by",
    "mean_std",
    "plot_bars",
    "study_head",
    "verdict_section",
    "write_report",
]


def mean_std(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    """``"mean ± std"`` of ``values`` times ``scale``; one value alone (no spread to show).

    Example:
        >>> mean_std([0.9, 0.95]), mean_std([0.9])
        ('92.5 ± 3.5', '90.0')
    """
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{scale * mean:.{digits}f}"
    return f"{scale * mean:.{digits}f} ± {scale * statistics.stdev(values):.{digits}f}"


def group_by(records: Sequence[dict], keys: Sequence[str]) -> dict[tuple, list[dict]]:
    """The records grouped by their values of ``keys``, in first-seen order."""
    out: dict[tuple, list[dict]] = {}
    for r in records:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def by_seed(rows: Sequence[dict], key: str) -> dict[int, float]:
    """``{seed: row[key]}``: the input of :func:`lightning_norms.recipes.verdict.compare`."""
    return {int(r["seed"]): float(r[key]) for r in rows}


def verdict_section(found: Sequence[tuple[Comparison, float, str]]) -> list[str]:
    """The ``## Verdict`` section: one line per claim ``(comparison, scale, unit, ...)``."""
    return ["", "## Verdict", "", *[f"- {f[0].describe(f[1], f[2])}" for f in found]]


#: what every point plot's marks are, printed under it
MARKS = "dots: one per seed; black bar: seed mean; whiskers: ± 1 std over seeds"


def draw_points(
    ax: Any,
    groups: dict[str, list[float]],
    scale: float = 100.0,
    colors: Sequence[str] | None = None,
) -> None:
    """On ``ax``, one column per group: the seeds as dots, their mean as a black bar, ± 1 std
    whiskers (:data:`MARKS`); the y axis fits the dots."""
    colors = list(colors) if colors is not None else ["#4C72B0"] * len(groups)
    for i, (values, color) in enumerate(zip(groups.values(), colors, strict=True)):
        ys = [scale * v for v in values]
        mean = statistics.fmean(ys)
        std = statistics.stdev(ys) if len(ys) > 1 else 0.0
        ax.errorbar(i, mean, yerr=std, color="black", capsize=4, linewidth=1, zorder=2)
        ax.plot([i - 0.25, i + 0.25], [mean, mean], color="black", linewidth=2.2, zorder=4)
        spread = [0.18 * (j - (len(ys) - 1) / 2) / max(1, len(ys) - 1) for j in range(len(ys))]
        ax.scatter([i + o for o in spread], ys, s=22, color=color, edgecolor="black",
                   linewidth=0.4, zorder=3)  # fmt: skip
    ax.set_xticks(range(len(groups)), list(groups), fontsize=7, rotation=30, ha="right")
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.grid(axis="y", linewidth=0.4, alpha=0.5)
    ax.spines[["top", "right"]].set_visible(False)


def plot_bars(
    groups: dict[str, list[float]],
    path: Path,
    ylabel: str,
    title: str,
    scale: float = 100.0,
    *,
    colors: Sequence[str] | None = None,
    caption: str = "",
) -> None:
    """One column per group (:func:`draw_points`) in one axis, the y axis fitted to the dots
    (a small effect stays visible); :data:`MARKS` and ``caption`` (for example the command and
    commit) are printed under the plot. ``colors``: one per group.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.5, 0.75 * len(groups) + 2.0), 4.2))
    draw_points(ax, groups, scale, colors)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=9)
    bottom = add_caption(fig, MARKS + (f"\n{caption}" if caption else ""))
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_caption(fig: Any, text: str) -> float:
    """Print ``text`` small under the figure, wrapped to its width; returns the share of the
    figure's height it takes (the bottom of ``tight_layout``'s rect)."""
    import textwrap

    width_in, height_in = fig.get_size_inches()
    chars = max(40, int(width_in * 17))
    lines = [w for line in text.splitlines() for w in textwrap.wrap(line, chars) or [""]]
    fig.text(0.01, 0.01, "\n".join(lines), fontsize=6.5, ha="left", va="bottom", color="#333")
    return min(0.5, (0.03 + 0.11 * len(lines)) / height_in)


@dataclass
class StudyReport:
    """What a study reports; :func:`write_report` turns it into files.

    Attributes:
        records: one per run, written to ``results.json``.
        title: the ``# title`` of ``report.md``.
        head: the paragraph under the title (seeds, settings, wall time).
        body: the markdown lines after it (table, verdicts).
        plot: draws the plot into the path it is given.
        plot_name: the plot's file name; ``plot_alt`` its alt text in ``report.md``.
        closing: markdown lines after the plot.
        printed: what is printed (default: ``body``).
        wall: the study's wall time in seconds.
    """

    records: list[dict[str, Any]]
    title: str
    head: str
    body: list[str]
    plot: Callable[[Path], None]
    plot_name: str = "plot.png"
    plot_alt: str = "plot"
    closing: list[str] = field(default_factory=list)
    printed: list[str] | None = None
    wall: float = 0.0


def study_head(records: Sequence[dict], epochs: int, wall: float, jobs: int, threads: int) -> str:
    """The usual head paragraph: seeds, epochs per run, wall time, processes and threads."""
    seeds = sorted({r["seed"] for r in records})
    return (
        f"Seeds {seeds}, {epochs} epochs per run, wall time {wall:.0f}s "
        f"({jobs} process(es), {threads} torch thread(s) each)."
    )


def write_report(report: StudyReport, output_dir: str | Path) -> dict[str, Path]:
    """Write ``results.json``, ``report.md`` and the plot into ``output_dir``; print the body.

    Returns the three paths (keys ``results``, ``report``, ``plot``).
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "results": out / "results.json",
        "report": out / "report.md",
        "plot": out / report.plot_name,
    }
    paths["results"].write_text(json.dumps(report.records, indent=2) + "\n")
    report.plot(paths["plot"])
    text = [f"# {report.title}", "", report.head, "", *report.body, ""]
    text += [f"![{report.plot_alt}]({report.plot_name})", "", *report.closing]
    paths["report"].write_text("\n".join(text))
    print("\n".join(report.body if report.printed is None else report.printed))
    return paths
