"""The docs site: builds strict, every nav page exists, the HTML shows no raw markup.

One ``mkdocs build --strict`` per module (a few seconds), then checks on the written HTML: no
reStructuredText left over from the docstrings (``.. math::``, roles, ``^^^`` titles), no private
default constants in signatures, no private class of the package anywhere, math handed to the
vendored KaTeX (no CDN), and every page the nav names. The guides' Python blocks run as scripts
(``slow``), as the README's do in ``test_readme.py``.
"""

from __future__ import annotations

import ast
import html
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.integration.test_readme import run_block_as_script

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
RAW_MARKERS = [
    ".. math::",
    ":math:`",
    ":class:`",
    ":func:`",
    ":meth:`",
    ":attr:`",
    "~lightning_norms",
    "^^^^",
    "_DEFAULT_",
    "_DefaultInt",
]
NOT_RUN = "<!-- not run:"  # an HTML comment right above a block that cannot run here (says why)
GENERATED = {"coverage", "studies"}  # pages other tools write (the transforms harness, the records)


class _Loader(yaml.SafeLoader):
    """mkdocs.yml may hold ``!!python/name`` tags (none today); read them as plain strings."""


_Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)


def _nav_pages(nav: object) -> list[str]:
    if isinstance(nav, str):
        return [nav] if nav.endswith(".md") else []
    if isinstance(nav, dict):
        return [p for value in nav.values() for p in _nav_pages(value)]
    if isinstance(nav, list):
        return [p for item in nav for p in _nav_pages(item)]
    return []


NAV = _nav_pages(yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=_Loader)["nav"])


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "WARNING" not in proc.stderr, proc.stderr[-4000:]
    return out


def _pages(site: Path) -> dict[str, str]:
    """Every page's visible text (tags and scripts dropped, entities decoded), by path."""
    pages = {}
    for page in site.rglob("*.html"):
        text = re.sub(r"<script.*?</script>", "", page.read_text(), flags=re.S)
        pages[str(page.relative_to(site))] = html.unescape(re.sub(r"<[^>]+>", "", text))
    return pages


def _private_classes() -> set[str]:
    """Names of the package's private classes (``class _Name``), found in its source."""
    names = set()
    for path in (ROOT / "lightning_norms").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name.startswith("_"):
                names.add(node.name)
    return names


def test_every_nav_page_exists(site: Path) -> None:
    assert {"index.md", "coverage.md", "studies.md"} <= set(NAV)
    assert len([p for p in NAV if p.startswith("guides/")]) >= 8
    for page in NAV:
        assert (DOCS / page).is_file(), page
        built = site / ("index.html" if page == "index.md" else page[: -len(".md")] + "/index.html")
        assert built.is_file(), built


def test_no_raw_rst_markup(site: Path) -> None:
    found = [
        (page, marker)
        for page, text in _pages(site).items()
        for marker in RAW_MARKERS
        if marker in text
    ]
    assert found == []


def test_every_formula_reaches_arithmatex(site: Path) -> None:
    """Math outside an arithmatex element (a ``$$`` block Markdown did not take) stays raw."""
    found = []
    for page in site.rglob("*.html"):
        text = re.sub(r"<(script|pre|code)\b.*?</\1>", "", page.read_text(), flags=re.S)
        text = re.sub(r'<(div|span) class="arithmatex">.*?</\1>', "", text, flags=re.S)
        found += [(page.name, m) for m in re.findall(r"\$\$|\\\[|\\begin\{", text)]
    assert found == []


def test_no_private_class_of_the_package(site: Path) -> None:
    """The API reference and the guides name only what a user can import (torch's own kept).

    The generated coverage and studies pages are left out: a reason such as "``_RenormFn`` has
    no ``setup_context``" names the internal piece a transform fails on, on purpose.
    """
    private = _private_classes()
    assert {"_DomainBatchNorm", "_DefaultInt"} <= private  # the search sees the real source
    pattern = re.compile(r"\b(" + "|".join(sorted(private)) + r")\b")
    pages = {p: t for p, t in _pages(site).items() if p.split("/")[0] not in GENERATED}
    assert "api/layers/index.html" in pages and "guides/convert/index.html" in pages
    found = {(page, m) for page, text in pages.items() for m in pattern.findall(text)}
    assert found == set()


def test_signatures_and_bases_show_public_names_and_values(site: Path) -> None:
    layers = (site / "api" / "layers" / "index.html").read_text()
    signatures = re.findall(r'class="doc-signature.*?</div>', layers, re.S)
    bases = re.findall(r"Bases:(.*?)</p>", layers, re.S)
    assert signatures and bases
    for text in [*signatures, *bases]:
        assert "BatchNormBase" not in text and "lightning_norms._" not in text
    stats = _pages(site)["api/stats/index.html"]
    assert re.search(r"num_batches: int = 200\b", stats)


def test_math_goes_to_the_vendored_katex(site: Path) -> None:
    layers = (site / "api" / "layers" / "index.html").read_text()
    assert layers.count('class="arithmatex"') >= 10
    assert re.search(r'<div class="arithmatex">\\\[.*?\\frac', layers, re.S)
    katex = site / "assets" / "katex"
    for asset in [katex / "katex.min.js", katex / "katex.min.css", site / "assets/katex-init.js"]:
        assert asset.is_file(), asset
    fonts = re.findall(r"url\((fonts/[\w-]+\.woff2)\)", (katex / "katex.min.css").read_text())
    assert fonts and all((katex / font).is_file() for font in fonts)
    for page in site.rglob("*.html"):  # nothing fetched from the network to render a page
        assert not re.search(r'<(script|link)[^>]+(src|href)="https?://', page.read_text()), page


def test_readme_links_into_the_docs_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\((docs/[^)#]+)", readme)
    assert links
    assert [link for link in links if not (ROOT / link).exists()] == []


def _guide_blocks() -> list[tuple[str, str]]:
    blocks = []
    for page in sorted([DOCS / "index.md", *(DOCS / "guides").glob("*.md")]):
        text = page.read_text()
        for i, match in enumerate(re.finditer(r"^```python\n(.*?)^```$", text, re.M | re.S)):
            line_above = text[: match.start()].rstrip().rsplit("\n", 1)[-1]
            if not line_above.startswith(NOT_RUN):
                blocks.append((f"{page.stem}-{i + 1}", match.group(1)))
    return blocks


GUIDE_BLOCKS = _guide_blocks()


def test_guides_have_python_blocks() -> None:
    assert len(GUIDE_BLOCKS) >= 8


@pytest.mark.slow
@pytest.mark.parametrize("code", [c for _, c in GUIDE_BLOCKS], ids=[i for i, _ in GUIDE_BLOCKS])
def test_guide_block_runs_as_a_script(code: str, tmp_path: Path) -> None:
    run_block_as_script(code, tmp_path, timeout=240)


def test_peer_table_covers_the_peers_and_every_row_runs() -> None:
    """Each row's snippet (the code in its last column) appears in the block that runs it."""
    page = (DOCS / "guides" / "coming-from.md").read_text()
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in page.splitlines()
        if line.startswith("| ")
    ][1:]
    assert {row[1] for row in rows} >= {"torchvision", "timm", "fvcore", "mmpretrain", "Lightning"}
    code = "\n".join(c for i, c in GUIDE_BLOCKS if i.startswith("coming-from-"))
    for row in rows:
        snippets = re.findall(r"`([^`]+)`", row[-1])
        assert snippets, row
        missing = [s for s in snippets if s not in code]
        assert not missing, f"row {row[0]!r}: {missing} not in the block that runs the table"


def test_home_page_code_fits_without_scrolling() -> None:
    """The home page hides its table of contents, so its code has about 100 columns at 1280 px
    (a wider line is cut off behind a scroll bar: the install block was, before)."""
    home = (DOCS / "index.md").read_text()
    assert home.startswith("---\nhide:\n  - toc\n---")
    code = re.findall(r"^```\w*\n(.*?)^```$", home, re.M | re.S)
    assert [line for block in code for line in block.splitlines() if len(line) > 100] == []


def test_guide_commands_name_real_options() -> None:
    """The guides' ``lightning-norms`` lines parse; every ``python -m`` module exists."""
    from lightning_norms.recipes.report import build_parser

    lines = []
    for page in (DOCS / "guides").glob("*.md"):
        for code in re.findall(r"^```bash\n(.*?)^```$", page.read_text(), re.M | re.S):
            words = [shlex.split(line, comments=True) for line in code.splitlines()]
            lines += [w for w in words if w]
    reports = [w[1:] for w in lines if w[0] == "lightning-norms"]
    modules = [w[2] for w in lines if w[:2] == ["python", "-m"]]
    assert reports and modules
    for args in reports:
        build_parser().parse_args(args)  # SystemExit on an unknown option or study
    for module in modules:
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), module
