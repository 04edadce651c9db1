"""One verdict rule for every study: a claim holds only when the paired per-seed differences say so.

Every study compares two settings trained with the same seeds (same initialisation, same batch
order), so the evidence is the list of per-seed differences ``d_s = a_s - b_s``, signed so that
a positive value is what the claim predicts. With ``n`` seeds, ``m`` their mean and
``SE = stdev(d) / sqrt(n)``:

* **held**: ``n >= 3``, the sign agrees on at least ``ceil(0.8 n)`` seeds (4 of 5, 3 of 3),
  *and* the mean is beyond two standard errors (``m > 2 SE``) or a one-sided paired t-test gives
  ``p < 0.05``;
* **not shown**: fewer than 3 seeds (no noise estimate: one seed never shows anything beyond
  noise), or the opposite of the claim meets the rule above;
* **within noise**: anything else.

The figures behind the verdict (mean, SE, t, p, seeds in the claimed direction, the per-seed
range) are always printed with it; with one seed, the difference alone (no standard error, no
test). :attr:`Comparison.claimed_sign` says whether the mean points the claimed way, so that a
study explains an effect only when the data show it in that direction.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["HELD", "MIN_SEEDS", "NOT_SHOWN", "WITHIN_NOISE", "Comparison", "compare", "paired"]

HELD = "held"
WITHIN_NOISE = "within noise"
NOT_SHOWN = "not shown"
MIN_SEEDS = 3
#: share of seeds whose difference must have the claimed sign (4 of 5, 3 of 3, 8 of 10)
SIGN_SHARE = 0.8


@dataclass(frozen=True)
class Comparison:
    """A paired comparison of two settings over seeds and its verdict.

    ``diffs`` are ``a - b`` per seed in the records' units; ``direction`` is ``+1`` when the
    claim says ``a > b`` and ``-1`` when it says ``a < b``.
    """

    claim: str
    diffs: tuple[float, ...]
    direction: int
    mean: float
    se: float
    t: float
    p: float
    agree: int
    verdict: str

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def claimed_sign(self) -> bool:
        """Whether the mean difference points the way the claim says (whatever the noise):
        an explanation of the claimed effect only reads right when it does."""
        return self.direction * self.mean > 0

    def _scaled(self, scale: float) -> tuple[float, float, float]:
        """Mean, lowest and highest per-seed difference times ``scale`` (``+ 0.0``: a zero
        difference reads ``+0.0``, never ``-0.0``)."""
        lo, hi = min(self.diffs), max(self.diffs)
        return scale * self.mean + 0.0, scale * lo + 0.0, scale * hi + 0.0

    def describe(self, scale: float = 100.0, unit: str = " points") -> str:
        """The verdict and its figures in one markdown sentence (one seed: the difference only,
        there is no standard error to test it against).

        Example:
            >>> paired("a > b", [0.05]).describe()
            '**a > b: not shown.** Difference +5.0 points on one seed: no standard error, no test.'
        """
        if self.n == 0:
            return f"**{self.claim}: {self.verdict}** (no paired seeds)."
        mean, lo, hi = self._scaled(scale)
        if self.n == 1:
            return (
                f"**{self.claim}: {self.verdict}.** Difference {mean:+.1f}{unit} "
                "on one seed: no standard error, no test."
            )
        t = "inf" if math.isinf(self.t) else f"{self.t:.1f}"
        return (
            f"**{self.claim}: {self.verdict}.** Paired difference {mean:+.1f}{unit} "
            f"(SE {scale * self.se:.1f}, t = {t}, one-sided p = {self.p:.3f}, {self.n} seeds); "
            f"the claimed sign on {self.agree} of {self.n} seeds "
            f"(per seed {lo:+.1f} to {hi:+.1f})."
        )

    def row(self, scale: float = 100.0) -> str:
        """``verdict (mean ± SE, k/n seeds)`` for a summary table."""
        if self.n == 0:
            return f"{self.verdict} (no seeds)"
        mean = self._scaled(scale)[0]
        if self.n == 1:
            return f"{self.verdict} ({mean:+.1f}, one seed: no SE)"
        return (
            f"{self.verdict} ({mean:+.1f} ± {scale * self.se:.1f} SE, "
            f"{self.agree}/{self.n} seeds)"
        )


def _one_sided_p(t: float, dof: int) -> float:
    """``P(T > t)`` for Student's t with ``dof`` degrees of freedom (scipy when available)."""
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    try:
        from scipy.stats import t as student_t
    except ImportError:  # normal approximation: a little optimistic for few seeds
        return 0.5 * math.erfc(t / math.sqrt(2))
    return float(student_t.sf(t, dof))


def _supports(diffs: Sequence[float], mean: float, se: float, p: float) -> bool:
    """The rule of the module docstring, for diffs signed so that positive = the claim."""
    n = len(diffs)
    agree = sum(d > 0 for d in diffs)
    return n >= MIN_SEEDS and agree >= math.ceil(SIGN_SHARE * n) and (mean > 2 * se or p < 0.05)


def paired(claim: str, diffs: Sequence[float], direction: int = 1) -> Comparison:
    """The verdict for per-seed differences ``diffs`` (``a - b``) of a claim ``a > b``
    (``direction=1``) or ``a < b`` (``direction=-1``).

    Raises:
        ValueError: ``direction`` not ``1`` or ``-1``.

    Example:
        >>> paired("a > b", [0.02, 0.03, 0.025, 0.01, 0.04]).verdict
        'held'
        >>> paired("a > b", [0.02, -0.03, 0.025, 0.01, -0.01]).verdict
        'within noise'
        >>> paired("a > b", [0.05]).verdict
        'not shown'
    """
    if direction not in (1, -1):
        raise ValueError(f"paired: `direction` must be 1 or -1, got {direction!r}")
    values = tuple(float(d) for d in diffs)
    n = len(values)
    signed = [direction * d for d in values]
    mean = statistics.fmean(signed) if n else 0.0
    sd = statistics.stdev(signed) if n > 1 else math.inf
    se = sd / math.sqrt(n) if n else math.inf
    t = mean / se if se else math.copysign(math.inf, mean) if mean else 0.0
    p = _one_sided_p(t, n - 1) if n > 1 else 1.0
    if n < MIN_SEEDS:
        verdict = NOT_SHOWN
    elif _supports(signed, mean, se, p):
        verdict = HELD
    elif _supports([-d for d in signed], -mean, se, 1.0 - p):
        verdict = f"{NOT_SHOWN} (the opposite held)"
    else:
        verdict = WITHIN_NOISE
    return Comparison(
        claim=claim,
        diffs=values,
        direction=direction,
        mean=direction * mean,
        se=se if n > 1 else math.nan,
        t=direction * t,
        p=p,
        agree=sum(d > 0 for d in signed),
        verdict=verdict,
    )


def compare(
    claim: str, a: Mapping[int, float], b: Mapping[int, float], direction: int = 1
) -> Comparison:
    """:func:`paired` on the seeds present in both ``a`` and ``b`` (``{seed: value}``)."""
    seeds = sorted(set(a) & set(b))
    return paired(claim, [a[s] - b[s] for s in seeds], direction)
