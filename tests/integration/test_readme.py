"""The README runs as written: the quickstart, the install lines, the commands it shows.

Each ```python block is written to a file and run as its own script (``python block.py``, in an
empty temporary directory, one torch thread), exactly as a reader would paste it: a block that
leans on a name defined in another block, or on a file of the repository, fails here.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
BLOCK_TIMEOUT_S = 240  # per block, on a loaded 2-core machine; each block takes seconds alone


def _blocks(language: str) -> list[tuple[str, str]]:
    """``(id, code)`` of every fenced block in ``language``; the id names its section."""
    blocks, heading, counts = [], "top", {}
    for match in re.finditer(r"^(#+ [^\n]*)$|^```(\w*)\n(.*?)^```$", README, re.M | re.S):
        if match.group(1):
            heading = re.sub(r"\W+", "-", match.group(1).lstrip("# ").lower()).strip("-")[:40]
        elif match.group(2) == language:
            counts[heading] = counts.get(heading, 0) + 1
            blocks.append((f"{heading}-{counts[heading]}", match.group(3)))
    return blocks


PYTHON_BLOCKS = _blocks("python")


def test_readme_has_the_quickstart() -> None:
    """One quickstart: a torchvision model converted, PreciseBN and the doctor in a Trainer."""
    assert PYTHON_BLOCKS and PYTHON_BLOCKS[0][0].startswith("quickstart")
    quickstart = PYTHON_BLOCKS[0][1]
    for name in ["resnet18", "convert_norms(", "PreciseBN(", "BatchNormDoctor(", "Trainer("]:
        assert name in quickstart, name
    assert len(quickstart.strip().splitlines()) <= 30
    assert len({block_id for block_id, _ in PYTHON_BLOCKS}) == len(PYTHON_BLOCKS)


def run_block_as_script(code: str, tmp_path: Path, timeout: float = BLOCK_TIMEOUT_S) -> None:
    """Run a documentation block as its own script in ``tmp_path`` (outside the clone's
    ``PYTHONPATH``); fail with the block and its stderr when it exits non-zero."""
    script = tmp_path / "block.py"
    script.write_text(code)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(OMP_NUM_THREADS="1", PYTHONHASHSEED="0", MPLBACKEND="Agg")
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"block failed:\n{code}\n--- output ---\n{proc.stderr[-3000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("code", [c for _, c in PYTHON_BLOCKS], ids=[i for i, _ in PYTHON_BLOCKS])
def test_python_block_runs_as_a_script(code: str, tmp_path: Path) -> None:
    run_block_as_script(code, tmp_path)


def _bash_lines() -> list[list[str]]:
    lines = []
    for _, code in _blocks("bash"):
        for line in code.splitlines():
            words = shlex.split(line, comments=True)
            if words:
                lines.append(words)
    return lines


def test_shell_commands_name_real_options() -> None:
    """``lightning-norms`` lines parse; every ``python -m`` launcher exists where it says."""
    from lightning_norms.recipes.report import build_parser

    lines = _bash_lines()
    reports = [w[1:] for w in lines if w[0] == "lightning-norms"]
    launchers = [w[2] for w in lines if w[:2] == ["python", "-m"]]
    assert reports and launchers
    for args in reports:
        build_parser().parse_args(args)  # SystemExit on an unknown option or study
    for module in launchers:  # recipes.<name> in the clone, lightning_norms.recipes.<name>
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), module
    assert {m.split(".")[0] for m in launchers} == {"recipes", "lightning_norms"}


def test_install_lines_work_from_the_repository() -> None:
    """Not on PyPI yet: the install lines are the clone, its extra and the VCS URL, said so."""
    installs = [w for w in _bash_lines() if w[:2] == ["pip", "install"]]
    assert installs == [
        ["pip", "install", "."],
        ["pip", "install", ".[recipes]"],
        ["pip", "install", "lightning-norms @ git+https://github.com/lightning-norms/lightning-norms"],
    ]
    assert "Not published on PyPI yet" in README


def test_first_screen_holds_exactly_the_two_setup_commands() -> None:
    """What it is, install, the quickstart, then ``make demo`` / ``make test`` and no other make."""
    first_screen = README.split("\n## Documentation", 1)[0]
    assert first_screen.index("## Install") < first_screen.index("## Quickstart")
    lines = [
        shlex.split(line, comments=True)
        for _, code in _blocks("bash")
        if code in first_screen
        for line in code.splitlines()
    ]
    makes = [words for words in lines if words and words[0] == "make"]
    assert makes == [["make", "demo"], ["make", "test"]]


def test_source_articles_are_named_and_the_claims_block_is_marked() -> None:
    articles = README.split("## The source articles", 1)[1].split("\n## ", 1)[0]
    assert len(re.findall(r"^\d\. \*\*", articles, re.M)) == 4
    for year in ["2017", "2015", "2022", "2021"]:
        assert f"({year})" in articles or f"{year})" in articles, year
    claims = README.split("<!-- claims:start -->", 1)[1].split("<!-- claims:end -->", 1)[0]
    assert claims.count("\n| ") >= 3
    assert "docs/studies.md" in README
