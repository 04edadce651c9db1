"""The verdict rule every study uses, against scipy's paired t-test."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize(
    ("diffs", "direction", "expected"),
    [
        ([0.02, 0.03, 0.025, 0.01, 0.04], 1, "held"),  # 5/5, t = 5.2
        ([0.02, 0.03, 0.025, 0.01, -0.001], 1, "held"),  # 4/5, t = 3.5
        ([0.05, 0.04, -0.01, -0.01, 0.06], 1, "within noise"),  # 3/5 seeds
        ([0.06, 0.001, 0.002, 0.001, 0.001], 1, "within noise"),  # 5/5 but t = 1.1
        ([-0.02, -0.03, -0.025], 1, "not shown (the opposite held)"),
        ([-0.02, -0.03, -0.025], -1, "held"),
        ([0.5, 0.4], 1, "not shown"),  # two seeds: no verdict
        ([0.01, 0.01, 0.01], 1, "held"),  # identical gaps: SE 0
    ],
)
def test_paired_verdict_rule(diffs: list[float], direction: int, expected: str) -> None:
    import statistics

    from lightning_norms.recipes.verdict import paired

    c = paired("claim", diffs, direction)
    assert c.verdict == expected
    assert c.mean == pytest.approx(statistics.fmean(diffs))
    if len(diffs) > 2 and len(set(diffs)) > 1:
        se = statistics.stdev(diffs) / len(diffs) ** 0.5
        assert c.se == pytest.approx(se) and c.t == pytest.approx(c.mean / se)
        from scipy.stats import ttest_1samp

        ref = ttest_1samp(diffs, 0.0, alternative="greater" if direction == 1 else "less")
        assert c.p == pytest.approx(ref.pvalue)


def test_one_seed_says_so_instead_of_nan_figures() -> None:
    from lightning_norms.recipes.verdict import paired

    c = paired("`split` > `mixed`", [-0.012])
    text, row = c.describe(), c.row()
    assert text == (
        "**`split` > `mixed`: not shown.** Difference -1.2 points on one seed: "
        "no standard error, no test."
    )
    assert "nan" not in row and "±" not in row
    assert row == "not shown (-1.2, one seed: no SE)"
    assert not c.claimed_sign and paired("a > b", [0.01], 1).claimed_sign
    assert paired("a < b", [-0.01], -1).claimed_sign  # a < b, and a - b < 0
    assert "Difference +0.0 points" in paired("a < b", [0.0], -1).describe()  # never -0.0
    two = paired("a > b", [0.02, 0.04]).describe()
    assert "SE 1.0" in two and "t = 3.0" in two  # from two seeds on, the figures are real
