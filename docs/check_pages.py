"""Look at the built docs in a real browser: ``make docs-check`` (after ``make docs``).

Serves ``build/site`` on a local port, opens a few pages in headless Chromium (Debian's
``chromium`` package: ``apt-get install -y chromium``), and for each page

- dumps the DOM after the scripts ran and checks that every math element became KaTeX
  (``.katex`` spans, no ``.arithmatex`` left unrendered) and that KaTeX reported no error;
- takes a screenshot (``build/screens/<page>.png``) and checks that it is not blank: enough
  distinct colours and enough non-background pixels.

Exit status 1 with one line per failed check. Not part of the test run: a browser start takes
seconds per page and Chromium is not a Python dependency.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
# page -> how many rendered formulas it must hold at least
PAGES = {
    "index.html": 0,
    "guides/two-domains/index.html": 2,
    "guides/precise-bn/index.html": 2,
    "api/layers/index.html": 10,
}
WINDOW = "1280,1400"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """No access log: the check prints one line per page."""


def _browser() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    sys.exit("docs-check: no Chromium found; install Debian's package: apt-get install -y chromium")


def _chromium(browser: str, url: str, *args: str) -> str:
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            [
                browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                f"--window-size={WINDOW}",
                "--virtual-time-budget=5000",
                *args,
                url,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"chromium failed on {url}: {proc.stderr[-2000:]}")
    return proc.stdout


def _check_dom(dom: str, min_math: int) -> list[str]:
    rendered = len(re.findall(r'<span class="katex">', dom))
    left = len(re.findall(r'class="arithmatex"(?![^>]*data-rendered)', dom))
    problems = []
    if rendered < min_math:
        problems.append(f"{rendered} KaTeX formulas, expected at least {min_math}")
    if left:
        problems.append(f"{left} math elements left unrendered")
    prose = re.sub(r"<(script|pre|code)\b.*?</\1>", "", dom, flags=re.S)
    prose = re.sub(r'<span class="katex">.*?</annotation>', "", prose, flags=re.S)
    if re.search(r"\$\$|\\\[|\\begin\{|\\frac", prose):
        problems.append("raw LaTeX left in the page text")
    if "katex-error" in dom:
        problems.append("KaTeX reported an error (class katex-error)")
    return problems


def _check_image(path: Path) -> list[str]:
    image = Image.open(path).convert("RGB")
    small = image.resize((image.width // 4, image.height // 4))
    colours = small.getcolors(maxcolors=1 << 20) or []
    background = max(colours)[1] if colours else (255, 255, 255)
    inked = sum(count for count, colour in colours if colour != background)
    share = inked / (small.width * small.height)
    problems = []
    if len(colours) < 16:
        problems.append(f"screenshot nearly blank: {len(colours)} colours")
    if share < 0.03:
        problems.append(f"screenshot nearly blank: {share:.1%} of pixels drawn")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", type=Path, default=ROOT / "build" / "site")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "screens")
    args = parser.parse_args(argv)
    browser = _browser()
    args.out.mkdir(parents=True, exist_ok=True)
    handler = functools.partial(_QuietHandler, directory=str(args.site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    failures = []
    try:
        for page, min_math in PAGES.items():
            if not (args.site / page).is_file():
                failures.append(f"{page}: not built (run `make docs` first)")
                continue
            url = f"http://127.0.0.1:{server.server_port}/{page}"
            shot = args.out / (page.replace("/index.html", "").replace("/", "_") + ".png")
            problems = _check_dom(_chromium(browser, url, "--dump-dom"), min_math)
            _chromium(browser, url, f"--screenshot={shot}")
            problems += _check_image(shot)
            failures += [f"{page}: {problem}" for problem in problems]
            print(f"{page}: {'ok' if not problems else 'FAILED'} -> {shot}")
    finally:
        server.shutdown()
    for failure in failures:
        print(failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
