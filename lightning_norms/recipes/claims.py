"""The claims table of the README and the studies page, written from the committed study records.

Every study run that the README quotes is committed under ``docs/records/<study>/``: the
report's ``results.json``, ``report.md`` and plot, and a ``meta.json`` with the command, the
commit, the seeds, the epochs and the wall time. This module turns those records, and nothing
else, into

* the README's claims table (between ``<!-- claims:start -->`` and ``<!-- claims:end -->``),
* ``docs/studies.md`` (every claim, its command, settings, seeds, wall time, commit, the verdict
  as the report prints it, the table and the plot),
* the captioned plots ``docs/<study>.png`` (``docs/accuracy.png`` for the demo) and the GAN's
  sample grids ``docs/gan_samples.png``.

Each verdict comes from the study's own ``verdicts(records)`` (the function its report uses),
so the README says what ``lightning-norms report --study NAME`` prints.
``tests/integration/test_claims.py`` checks that the committed README block and page are what
this module writes from the committed records.

Run (from the repository root)::

    python -m lightning_norms.recipes.claims            # README block, docs/studies.md, plots
    python -m lightning_norms.recipes.claims --no-plots
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from lightning_norms.recipes.verdict import Comparison

__all__ = [
    "CLAIMS",
    "MARKERS",
    "PLOTS",
    "Claim",
    "command",
    "load",
    "readme_block",
    "recorded",
    "rows",
    "studies_page",
    "write_all",
]

#: the README block's markers
MARKERS = ("<!-- claims:start -->", "<!-- claims:end -->")
#: the committed records, relative to the repository root
RECORDS = Path("docs") / "records"
#: study -> the captioned plot written into ``docs/``
PLOTS = {
    "two_domain": "accuracy.png",
    "gan": "gan.png",
    "small_batch": "small_batch.png",
    "precise_bn": "precise_bn.png",
    "lecture": "lecture.png",
}

#: a claim's two sides: ``(label, values)`` each, from the records
Sides = tuple[tuple[str, list[float]], tuple[str, list[float]]]


class Claim(NamedTuple):
    """One row of the claims table.

    Attributes:
        study: the study whose ``verdicts(records)[position]`` decides it.
        position: which of the study's verdicts.
        text: the claim in words, with its source article.
        sides: the two compared settings (label, per-seed values) from the records.
        scale, unit: how the values and the difference are printed.
    """

    study: str
    position: int
    text: str
    sides: Callable[[list[dict]], Sides]
    scale: float = 100.0
    unit: str = " points"


def _pick(records: Sequence[dict], key: str | Callable[[dict], float], **match: Any) -> list[float]:
    """``key`` of the records whose fields equal ``match``, in seed order."""
    rows = sorted(
        (r for r in records if all(r[k] == v for k, v in match.items())), key=lambda r: r["seed"]
    )
    return [float(key(r) if callable(key) else r[key]) for r in rows]


def _variant(name: str) -> Callable[[list[dict]], tuple[str, list[float]]]:
    return lambda recs: (f"`{name}`", _pick(recs, "acc", variant=name))


def _two_domain(a: str) -> Callable[[list[dict]], Sides]:
    return lambda recs: (_variant(a)(recs), _variant("mixed")(recs))


def _gan(mode: str) -> Callable[[list[dict]], Sides]:
    return lambda recs: (
        (f"`{mode}`", _pick(recs, "mmd", mode=mode)),
        ("`alternating`", _pick(recs, "mmd", mode="alternating")),
    )


def _small(b: int, order: str) -> Callable[[list[dict]], Sides]:
    return lambda recs: (
        ("BatchRenorm", _pick(recs, "acc", norm="renorm", batch_size=b, order=order)),
        ("BN", _pick(recs, "acc", norm="batch", batch_size=b, order=order)),
    )


def _precise(lr: float, m: float) -> Callable[[list[dict]], Sides]:
    def sides(recs: list[dict]) -> Sides:
        n = str(max(int(k) for k in recs[0]["acc_precise"]))
        precise = _pick(recs, lambda r: r["acc_precise"][n], lr=lr, bn_momentum=m)
        ema = _pick(recs, "acc_ema", lr=lr, bn_momentum=m)
        return (f"PreciseBN (n={n})", precise), ("EMA", ema)

    return sides


def _lecture_steps(recs: list[dict]) -> Sides:
    cap = max(p[0] for r in recs for p in r["curve"])

    def steps(r: dict) -> float:
        return float(cap if r["steps_to_target"] is None else r["steps_to_target"])

    return (
        ("BN", _pick(recs, steps, variant="mixed", activation="relu", lr=0.003)),
        (f"no BN (never: {cap})", _pick(recs, steps, variant="none", activation="relu", lr=0.003)),
    )


def _lecture(a: tuple[str, str, float], b: tuple[str, str, float]) -> Callable[[list], Sides]:
    def side(v: str, act: str, lr: float, recs: list[dict]) -> tuple[str, list[float]]:
        name = "BN" if v == "mixed" else "no BN"
        return f"{name}, {act}, lr {lr:g}", _pick(recs, "acc", variant=v, activation=act, lr=lr)

    return lambda recs: (side(*a, recs), side(*b, recs))


A1, A3, A4 = "(article 1)", "(article 3)", "(article 4)"
#: every row of the claims table, in order
CLAIMS: tuple[Claim, ...] = (
    Claim("two_domain", 0, f"Domain-pure batches through one shared BN lose accuracy {A1}",
          _two_domain("separate")),
    Claim("two_domain", 1, f"Separate BN statistics per domain do best {A1}",
          _two_domain("split")),
    Claim("gan", 0, f"A GAN discriminator fed 50/50 mixed batches beats alternating all-real / "
          f"all-fake batches {A1} (MMD², lower is better)", _gan("mixed"), 1000.0, " x 1e-3"),
    Claim("gan", 1, f"... per-kind BN statistics with a shared affine (`split`) beat "
          f"alternating {A1}", _gan("split"), 1000.0, " x 1e-3"),
    Claim("gan", 2, f"... a discriminator without BN (`none`) beats alternating {A1}",
          _gan("none"), 1000.0, " x 1e-3"),
    Claim("small_batch", 0, "BatchRenorm beats BN with small per-device batches, 4 per device "
          "(Ioffe 2017, named in article 1)", _small(4, "shuffled")),
    Claim("small_batch", 1, "... and at 32 per device, shuffled (Ioffe 2017)",
          _small(32, "shuffled")),
    Claim("small_batch", 2, "... and with class-sorted (non-i.i.d.) batches (Ioffe 2017)",
          _small(32, "class_sorted")),
    Claim("precise_bn", 0, f"PreciseBN statistics beat the EMA running statistics {A3}: "
          "lr 0.001, momentum 0.1", _precise(0.001, 0.1)),
    Claim("precise_bn", 1, "... lr 0.001, momentum 0.01", _precise(0.001, 0.01)),
    Claim("precise_bn", 2, "... lr 0.03, momentum 0.1", _precise(0.03, 0.1)),
    Claim("precise_bn", 3, "... lr 0.03, momentum 0.01", _precise(0.03, 0.01)),
    Claim("lecture", 0, f"BN reaches 90 % validation accuracy in fewer steps {A4} "
          "(ReLU, lr 0.003)", _lecture_steps, 1.0, " steps"),
    Claim("lecture", 1, f"BN trains at a much higher learning rate (30x shown) {A4}",
          _lecture(("mixed", "relu", 0.1), ("none", "relu", 0.003))),
    Claim("lecture", 2, "... and beats no BN at that learning rate",
          _lecture(("mixed", "relu", 0.1), ("none", "relu", 0.1))),
    Claim("lecture", 3, f"BN makes a sigmoid network trainable {A4}",
          _lecture(("mixed", "sigmoid", 0.003), ("none", "sigmoid", 0.003))),
)  # fmt: skip


def load(root: Path, study: str) -> tuple[list[dict], dict[str, Any]]:
    """The committed ``results.json`` and ``meta.json`` of ``study`` under ``root``."""
    folder = root / RECORDS / study
    records = json.loads((folder / "results.json").read_text())
    meta = json.loads((folder / "meta.json").read_text())
    return records, meta


def recorded(root: Path) -> list[str]:
    """The studies of :data:`PLOTS` whose records are committed under ``root``."""
    return [s for s in PLOTS if (root / RECORDS / s / "meta.json").exists()]


def command(meta: dict[str, Any]) -> str:
    """The command that reproduces a record: the study at its defaults, its seed count spelled
    out (the study module's ``SEEDS``, which the test checks; explicit, so that the command
    means the same whatever the report's own default count is)."""
    return f"lightning-norms report --study {meta['study']} --seeds {len(meta['seeds'])}"


def _verdicts(study: str, records: list[dict]) -> list[tuple[Comparison, float, str]]:
    module = importlib.import_module(f"lightning_norms.recipes.{study}")
    return list(module.verdicts(records))


def _level(values: list[float], scale: float) -> str:
    mean = statistics.fmean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {std:.1f}"


def rows(root: Path) -> list[tuple[Claim, Comparison, str, dict[str, Any]]]:
    """``(claim, comparison, measured text, meta)`` for every claim, from the records."""
    out = []
    cache: dict[str, tuple[list[dict], dict[str, Any], list]] = {}
    for claim in (c for c in CLAIMS if c.study in recorded(root)):
        if claim.study not in cache:
            records, meta = load(root, claim.study)
            cache[claim.study] = (records, meta, _verdicts(claim.study, records))
        records, meta, found = cache[claim.study]
        comparison, scale, unit = found[claim.position][:3]
        if scale != claim.scale or unit != claim.unit:
            raise ValueError(f"claims: {claim.text!r} is in{unit}, the report says{claim.unit}")
        (a, va), (b, vb) = claim.sides(records)
        measured = (
            f"{a} {_level(va, scale)} vs {b} {_level(vb, scale)}; difference "
            f"{scale * comparison.mean:+.1f} ± {scale * comparison.se:.1f} (SE){unit}, the claimed "
            f"sign on {comparison.agree}/{comparison.n} seeds"
        )
        out.append((claim, comparison, measured, meta))
    return out


def readme_block(root: Path) -> str:
    """The README's claims table, markers included."""
    lines = [
        MARKERS[0],
        "| claim (source article) | command (its defaults) | measured: mean ± std over seeds "
        "| verdict |",
        "|---|---|---|---|",
    ]
    for claim, comparison, measured, meta in rows(root):
        lines.append(
            f"| {claim.text} | `{command(meta)}` ({meta['wall_s']:.0f} s) | {measured} "
            f"| {comparison.verdict} |"
        )
    lines.append(MARKERS[1])
    return "\n".join(lines)


#: the studies on the page, in order, with what each one asks
STUDY_INTRO = {
    "two_domain": "The demo (article 1): one CNN trained on two digit domains, fed 50/50 mixed "
    "batches (`mixed`), one domain-pure forward per domain through shared BN (`separate`), or "
    "domain-pure forwards with per-domain BN statistics (`split`).",
    "gan": "Article 1's advice for GAN discriminators: a small DCGAN on the digits whose "
    "discriminator's BN is fed alternating all-real / all-fake batches, one 50/50 mixed batch, the "
    "mixed batch with per-kind statistics and a shared affine (`split`), or has no BN (`none`).",
    "small_batch": "Batch Renormalization (Ioffe 2017, named in article 1) against BN and "
    "GroupNorm when each device normalises over few samples or over class-sorted batches. "
    "GroupNorm with class-sorted batches stays at chance on every seed (a rerun of seed 0 "
    "gives near-zero logits and one predicted class for every test image): an open question "
    "about this recipe, not a claim.",
    "precise_bn": "Article 3: the EMA running statistics lag the weights; PreciseBN recomputes "
    "them on the frozen model. The same weights are tested with both. The BN momentum changes "
    "only the EMA, never the weights, so at one learning rate the two momenta share their "
    "PreciseBN figures.",
    "lecture": "Article 4 (the lecture): with BN the same network converges in fewer steps, "
    "trains at a much higher learning rate and trains with sigmoids.",
}


def _table(study: str, records: list[dict]) -> list[str]:
    """The study's own table, rendered from the records by the study's module."""
    from lightning_norms.recipes import gan, lecture, precise_bn, small_batch, two_domain
    from lightning_norms.recipes.writer import group_by

    if study == "two_domain":
        names = ("digits", "street")
        return two_domain.format_table(two_domain.summarise(records), names).splitlines()
    if study == "gan":
        return gan._table(records, group_by(records, ("mode",)))
    if study == "small_batch":
        return small_batch._table(group_by(records, ("norm", "batch_size", "order")))
    if study == "precise_bn":
        return precise_bn._table(records)
    grid = [("relu", lr) for lr in lecture.LEARNING_RATES] + [("sigmoid", lecture.SIGMOID_LR)]
    groups = group_by(records, ("variant", "activation", "lr"))
    return lecture._table(groups, grid, lecture._cap(records))


def _settings(meta: dict[str, Any]) -> list[str]:
    dirty = meta.get("dirty") or []
    tree = (
        f" plus uncommitted edits by other sessions in {', '.join(f'`{d}`' for d in dirty)}"
        if dirty
        else ""
    )
    return [
        f"- Command: `{command(meta)}` (its defaults: {meta['epochs']} epochs per run, seeds "
        f"{meta['seeds']}); run as `{meta['ran']}`.",
        f"- Wall time: {meta['wall_s']:.0f} s on {meta['machine']}, {meta['date']}.",
        f"- Code: commit `{meta['commit'][:10]}`{tree}.",
        f"- Records: `docs/records/{meta['study']}/` (`results.json`, "
        f"[`report.md`](records/{meta['study']}/report.md), the report's plot, `meta.json`).",
    ]


def _gan_why(records: list[dict]) -> list[str]:
    """The GAN paragraphs on what helps and why, their figures from the records."""
    from lightning_norms.recipes import gan
    from lightning_norms.recipes.writer import group_by

    by = {m: rows for (m,), rows in group_by(records, ("mode",)).items()}
    found = {c.claim.split("`")[1]: c for c, _, _ in gan.verdicts(records)}

    def mean(mode: str, key: str, scale: float = 1.0) -> str:
        value = scale * statistics.fmean(r[key] for r in by[mode])
        return f"{value:.1f}" if scale != 1.0 else f"{value:.2f}"

    def worse(mode: str) -> str:
        c = found[mode]
        return f"higher on {c.n - c.agree} of {c.n} seeds, verdict: {c.verdict}"

    return [
        "**What the data say.** On this DCGAN the first article's advice does not hold: the "
        "discriminator fed one 50/50 mixed batch gives worse samples than the one fed "
        f"alternating all-real / all-fake batches (MMD² {mean('mixed', 'mmd', 1000)} vs "
        f"{mean('alternating', 'mmd', 1000)} x 1e-3; {worse('mixed')}), and so does a "
        f"discriminator without BN ({mean('none', 'mmd', 1000)}; {worse('none')}). What helps "
        "the discriminator's BN here is per-kind statistics: `alternating` and `split` "
        "(`mix_real_fake` with a `DomainBatchNorm2d(shared_affine=True)` discriminator, "
        f"{mean('split', 'mmd', 1000)}) are the two best feeds.",
        "",
        "**Why.** In training `alternating` and `split` normalise identically: each kind by its "
        "own batch statistics under one shared affine (the discriminator's running averages are "
        "never used). They differ only in how the batch is assembled and in the random draws "
        f"that follow, so read the `split` row ({found['split'].verdict}) as the same "
        "normalisation measured twice, not as a gain of `split` over `alternating`. `mixed` is "
        "the one feed in which real and fake share one normalisation: a fake image's features "
        "are centred and scaled with the real images of its batch, so the discriminator's "
        "output for a fake depends on the reals beside it. The per-kind shift "
        "that per-kind statistics erase is small at the end of training (kind gap "
        f"{mean('alternating', 'kind_gap')} with `alternating`, {mean('mixed', 'kind_gap')} "
        "with `mixed`: the mean per-channel difference between real and generated digits at "
        "the input of D's first BN, in pooled standard deviations), and every run covers "
        f"{min(r['classes_covered'] for r in records)} classes or more, but the mixed-batch "
        "generators spread their samples less evenly over them: "
        f"{mean('mixed', 'effective_classes')} effective classes against "
        f"{mean('alternating', 'effective_classes')} with `alternating` (the real test digits: "
        f"{by['alternating'][0]['real_effective_classes']:.2f}). In seed 0's grids below the "
        "`mixed` digits also sit on greyer backgrounds than the `alternating` and `split` ones. "
        "So keep `mix_real_fake` for "
        "what it is: a choice with a measured cost on this model, best paired with the split "
        "discriminator when the batches must be mixed.",
        "",
        "![GAN samples, seed 0 of every feed](gan_samples.png)",
    ]


def _section(root: Path, study: str, claims: list[tuple[Claim, Comparison, str, dict]]) -> list:
    records, meta = load(root, study)
    title = (root / RECORDS / study / "report.md").read_text().splitlines()[0].lstrip("# ")
    lines = [f'<a id="{study}"></a>', "", f"## {title}", "", STUDY_INTRO[study], ""]
    lines += [*_settings(meta), ""]
    lines += ["Claims, as the README's table gives them:", ""]
    lines += [f"- {c.text}: **{cmp.verdict}**. {measured}." for c, cmp, measured, _ in claims]
    lines += ["", *_table(study, records), "", "Verdicts, as the report prints them:", ""]
    lines += [f"- {c.describe(s, u)}" for c, s, u in _verdicts(study, records)]
    if study == "gan":
        lines += ["", *_gan_why(records)]
    alt = f"{study} study plot"
    return [*lines, "", f"![{alt}]({PLOTS[study]})", ""]


def studies_page(root: Path) -> str:
    """``docs/studies.md``: every study's claims, command, settings, verdicts, table and plot."""
    found = rows(root)
    lines = [
        "# Studies and verdicts",
        "",
        "Every figure on this page and in the README's claims table is written by "
        "`python -m lightning_norms.recipes.claims` from the committed records under "
        "`docs/records/`; `tests/integration/test_claims.py` checks them. A claim is "
        "**held** only when its paired per-seed difference has the claimed sign on at least 4 "
        "of 5 seeds (3 of 3) and is beyond two standard errors or a one-sided paired t-test "
        "gives p < 0.05; **not shown (the opposite held)** when the opposite meets that rule; "
        "**within noise** otherwise (`lightning_norms/recipes/verdict.py`). In the plots, dots "
        "are seeds, the black bar their mean and the whiskers ± 1 std over seeds.",
        "",
    ]
    for study in recorded(root):
        lines += _section(root, study, [r for r in found if r[0].study == study])
    missing = [s for s in PLOTS if s not in recorded(root)]
    if missing:
        lines += [
            "## Not re-measured on the current code",
            "",
            "No committed record yet, so no claim is made for: "
            + ", ".join(f"`lightning-norms report --study {s}`" for s in missing)
            + ".",
            "",
        ]
    return "\n".join(lines)


def _caption(meta: dict[str, Any]) -> str:
    return (
        f"{command(meta)} | commit {meta['commit'][:10]} | seeds {meta['seeds']} | "
        f"{meta['epochs']} epochs | wall {meta['wall_s']:.0f} s"
    )


def write_plots(root: Path) -> None:
    """The captioned plots ``docs/<name>.png`` and the GAN's ``docs/gan_samples.png``."""
    from lightning_norms.recipes import gan, lecture, precise_bn, small_batch, two_domain

    docs = root / "docs"
    for study in recorded(root):
        name = PLOTS[study]
        records, meta = load(root, study)
        path = docs / name
        if study == "two_domain":
            title = (
                "Two-domain study (the demo): test accuracy per domain\ndots = seeds, bars = seed "
                "mean per domain, ◆ and label = mean of both domains ± std\n" + _caption(meta)
            )
            summary = two_domain.summarise(records)
            two_domain.plot(records, summary, ("digits", "street"), path, title)
            continue
        module = {"gan": gan, "small_batch": small_batch, "precise_bn": precise_bn}.get(
            study, lecture
        )
        module.plot(records, path, _caption(meta))
    _gan_samples(root / RECORDS / "gan" / "grids", docs / "gan_samples.png")


def _gan_samples(grids: Path, path: Path) -> None:
    """The seed-0 sample grid of every feed side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lightning_norms.recipes.gan import MODES

    files = [f for m in MODES if (f := grids / f"{m}_seed0.png").exists()]
    cols = 2
    rows = -(-len(files) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.6 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(files) :]:
        ax.axis("off")
    for ax, file in zip(axes.flat, files, strict=False):
        ax.imshow(plt.imread(file), cmap="gray")
        ax.set_title(f"{file.stem.split('_')[0]} (seed 0)", fontsize=9)
        ax.axis("off")
    fig.suptitle("GAN study: 128 samples of the generator, per discriminator feed", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_all(root: Path, plots: bool = True) -> None:
    """Replace the README block, write ``docs/studies.md`` and (``plots``) the plots.

    Raises:
        ValueError: the README does not hold the markers exactly once each.
    """
    readme = root / "README.md"
    text = readme.read_text()
    start, end = (text.count(m) for m in MARKERS)
    if start != 1 or end != 1:
        raise ValueError(f"claims: README.md must hold {MARKERS} once each, got {start}, {end}")
    old = text[text.index(MARKERS[0]) : text.index(MARKERS[1]) + len(MARKERS[1])]
    readme.write_text(text.replace(old, readme_block(root)))
    (root / "docs" / "studies.md").write_text(studies_page(root) + "\n")
    if plots:
        write_plots(root)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lightning_norms.recipes.claims [--root .] [--no-plots]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".", help="the repository root (default: .)")
    parser.add_argument("--no-plots", action="store_true", help="leave docs/*.png alone")
    args = parser.parse_args(argv)
    write_all(Path(args.root), plots=not args.no_plots)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
