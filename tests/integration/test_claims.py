"""Every figure of the README's claims table and of ``docs/studies.md`` comes from a record.

The records are ``docs/records/<study>/`` (``results.json``, ``report.md``, ``meta.json``);
``python -m lightning_norms.recipes.claims`` writes the README block and the page from them.
These checks read JSON only (no training): the committed texts are exactly what the records
give, each row's two sides are the paired values its verdict was computed from, each verdict
is the one the study's report printed, and each row's command is the study at its defaults.
"""

from __future__ import annotations

import importlib
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

from lightning_norms.recipes import claims
from lightning_norms.recipes.report import parse_args

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
ROWS = claims.rows(ROOT)
STUDIES = sorted({c.study for c in claims.CLAIMS})


def _block(text: str) -> str:
    start, end = claims.MARKERS
    return text[text.index(start) : text.index(end) + len(end)]


def test_readme_claims_block_is_written_from_the_records() -> None:
    assert _block(README) == claims.readme_block(ROOT), (
        "README's claims table differs from the records: run "
        "`python -m lightning_norms.recipes.claims`"
    )


def test_studies_page_is_written_from_the_records() -> None:
    page = (ROOT / "docs" / "studies.md").read_text()
    assert page == claims.studies_page(ROOT) + "\n"


def test_every_claim_has_a_row_and_every_study_a_record() -> None:
    assert len(_block(README).splitlines()) == len(claims.CLAIMS) + 4  # markers, head, rule
    for study in claims.PLOTS:
        assert (ROOT / claims.RECORDS / study / "results.json").exists(), study


@pytest.mark.parametrize("row", ROWS, ids=[f"{r[0].study}-{r[0].position}" for r in ROWS])
def test_row_sides_are_the_paired_values_of_its_verdict(row: tuple) -> None:
    """The two settings a row names are the ones its verdict compared, seed by seed."""
    claim, comparison, measured, _ = row
    records, _ = claims.load(ROOT, claim.study)
    (_, a), (_, b) = claim.sides(records)
    assert len(a) == len(b) == comparison.n >= 3
    assert comparison.diffs == pytest.approx([x - y for x, y in zip(a, b, strict=True)])
    assert f"{claim.scale * comparison.mean:+.1f}" in measured


@pytest.mark.parametrize("study", STUDIES)
def test_verdicts_are_the_ones_the_report_printed(study: str) -> None:
    """The committed ``report.md`` (the study's own output) holds every verdict line and every
    table row the generator writes from ``results.json``."""
    records, _ = claims.load(ROOT, study)
    report = (ROOT / claims.RECORDS / study / "report.md").read_text()
    module = importlib.import_module(f"lightning_norms.recipes.{study}")
    for comparison, scale, unit in module.verdicts(records):
        assert comparison.describe(scale, unit) in report
    for line in claims._table(study, records):
        assert line.strip() in report


@pytest.mark.parametrize("study", STUDIES)
def test_record_meta_matches_its_results(study: str) -> None:
    records, meta = claims.load(ROOT, study)
    assert meta["study"] == study
    assert re.fullmatch(r"[0-9a-f]{40}", meta["commit"])
    assert meta["seeds"] == sorted({r["seed"] for r in records})
    assert meta["wall_s"] > 0
    assert f"{meta['wall_s']:.0f} s" in _block(README) or study not in _block(README)


@pytest.mark.parametrize("study", STUDIES)
def test_row_commands_name_the_study_at_its_defaults(study: str) -> None:
    """A row's command, parsed by the CLI, gives the record's settings, and those are the study
    module's defaults: epochs its ``EPOCHS``, seeds its ``SEEDS`` (the demo: ``DEMO_SEEDS``)."""
    _, meta = claims.load(ROOT, study)
    cmd = claims.command(meta)
    assert f"`{cmd}`" in _block(README)
    words = shlex.split(cmd)
    assert words[:2] == ["lightning-norms", "report"]
    assert {w for w in words[2:] if w.startswith("--")} <= {"--study", "--seeds"}
    args = parse_args(words[1:])
    module = importlib.import_module(f"lightning_norms.recipes.{study}")
    assert (args.study, args.epochs, args.seeds) == (study, meta["epochs"], len(meta["seeds"]))
    assert args.epochs == module.EPOCHS
    assert args.seeds == getattr(module, "SEEDS", getattr(module, "DEMO_SEEDS", None))


def test_write_all_replaces_only_the_block(tmp_path: Path) -> None:
    shutil.copytree(ROOT / claims.RECORDS, tmp_path / claims.RECORDS)
    before, after = "# title\n\nintro\n", "\n## next\n\nrest\n"
    readme = tmp_path / "README.md"
    readme.write_text(before + claims.MARKERS[0] + "\nstale\n" + claims.MARKERS[1] + after)
    claims.write_all(tmp_path, plots=False)
    assert readme.read_text() == before + claims.readme_block(ROOT) + after
    assert (tmp_path / "docs" / "studies.md").read_text() == claims.studies_page(ROOT) + "\n"
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="once each"):
        claims.write_all(tmp_path, plots=False)


def test_records_are_plain_json() -> None:
    for path in (ROOT / claims.RECORDS).glob("*/*.json"):
        json.loads(path.read_text())
