"""Write ``docs/coverage.md`` from the layer registry: ``python -m tests.integration.gen_coverage``.

``tests/integration/test_transforms.py::test_coverage_doc_is_up_to_date`` fails until the
committed file equals what this writes.
"""

from __future__ import annotations

from pathlib import Path

from tests._registry import coverage_markdown

PATH = Path(__file__).resolve().parents[2] / "docs" / "coverage.md"


def main() -> None:
    PATH.write_text(coverage_markdown())


if __name__ == "__main__":
    main()
