"""The README runs as written: every Python block, the peer table, the commands it shows.

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


def test_readme_has_python_blocks() -> None:
    assert len(PYTHON_BLOCKS) >= 6
    assert len({block_id for block_id, _ in PYTHON_BLOCKS}) == len(PYTHON_BLOCKS)


@pytest.mark.slow
@pytest.mark.parametrize("code", [c for _, c in PYTHON_BLOCKS], ids=[i for i, _ in PYTHON_BLOCKS])
def test_python_block_runs_as_a_script(code: str, tmp_path: Path) -> None:
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
        timeout=BLOCK_TIMEOUT_S,
    )
    assert proc.returncode == 0, f"block failed:\n{code}\n--- output ---\n{proc.stderr[-3000:]}"


def _peer_table() -> list[list[str]]:
    section = README.split("## Coming from torchvision", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[1:]]


def test_peer_table_covers_the_peers_and_every_row_runs() -> None:
    """Each row's snippet (the code in its last column) appears in the block that runs it."""
    rows = _peer_table()
    assert {row[1] for row in rows} >= {"torchvision", "timm", "fvcore", "mmpretrain", "Lightning"}
    section = README.split("## Coming from torchvision", 1)[1].split("\n## ", 1)[0]
    code = "\n".join(c for _, c in _blocks("python") if c in section)
    for row in rows:
        snippets = re.findall(r"`([^`]+)`", row[-1])
        assert snippets, row
        missing = [s for s in snippets if s not in code]
        assert not missing, f"row {row[0]!r}: {missing} not in the block that runs the table"


def _bash_lines() -> list[list[str]]:
    lines = []
    for _, code in _blocks("bash"):
        for line in code.splitlines():
            words = shlex.split(line, comments=True)
            if words:
                lines.append(words)
    return lines


def test_shell_commands_name_real_options() -> None:
    """``lightning-norms report ...`` lines parse; ``python -m recipes.<name>`` launchers exist."""
    from lightning_norms.recipes.report import build_parser

    lines = _bash_lines()
    reports = [w[1:] for w in lines if w[0] == "lightning-norms"]
    launchers = [w[2] for w in lines if w[:2] == ["python", "-m"]]
    assert reports and launchers
    for args in reports:
        build_parser().parse_args(args)  # SystemExit on an unknown option or study
    for module in launchers:
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), module
    assert ["make", "demo"] in lines and ["make", "test"] in lines
    assert ["pip", "install", "lightning-norms"] in lines
    assert ["pip", "install", "lightning-norms[recipes]"] in lines


def test_first_screen_holds_exactly_the_two_setup_commands() -> None:
    first_screen = README.split("\n## ", 1)[0]
    lines = [
        shlex.split(line, comments=True)
        for _, code in _blocks("bash")
        if code in first_screen
        for line in code.splitlines()
    ]
    assert [words for words in lines if words] == [["make", "demo"], ["make", "test"]]
