"""Student-t statistics over seeds, for ``diffusionflow.compare``: the confidence interval of a mean and
the two-sided t-test of two configurations (paired on shared seeds, else Welch's).

With n values x_i of mean x̄ and sample standard deviation s (ddof = 1):

* confidence interval of the mean at level 1 − α: x̄ ± t_{1−α/2, n−1} · s/√n;
* paired t-test (the same seeds in both): d_i = b_i − a_i, t = d̄ / (s_d/√n), df = n − 1;
* Welch's t-test: t = (b̄ − ā) / √(s_a²/n_a + s_b²/n_b), with the Welch–Satterthwaite
  df = (s_a²/n_a + s_b²/n_b)² / ((s_a²/n_a)²/(n_a − 1) + (s_b²/n_b)²/(n_b − 1));

p = 2 · P(T_df ≥ |t|). A zero standard error (all differences equal) gives p = 1 when the means are
equal and p = 0 otherwise.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from scipy.stats import t as student_t

__all__ = ["ALPHA", "LEVEL", "TTest", "confidence_interval", "paired_t_test", "seed_test", "welch_t_test"]

ALPHA = 0.05
"""Significance level of the tests."""
LEVEL = 0.95
"""Confidence level of the intervals."""


@dataclass(frozen=True)
class TTest:
    """A two-sided t-test of b against a: ``kind`` (``paired`` | ``welch``), statistic, df, p-value."""

    kind: str
    t: float
    df: float
    p: float


def confidence_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float]:
    """x̄ ± t_{(1+level)/2, n−1} · s/√n; (nan, nan) for fewer than two values."""
    n = len(values)
    if n < 2:
        return math.nan, math.nan
    mean, half = statistics.fmean(values), student_t.ppf((1 + level) / 2, n - 1)
    half *= statistics.stdev(values) / math.sqrt(n)
    return mean - half, mean + half


def _two_sided(kind: str, diff: float, var: float, df: float) -> TTest:
    """t = diff / √var, p = 2 · P(T_df ≥ |t|); var = 0 gives p = 1 for diff = 0, else 0."""
    if var == 0:
        return TTest(kind, 0.0 if diff == 0 else math.copysign(math.inf, diff), df, float(diff == 0))
    t = diff / math.sqrt(var)
    return TTest(kind, t, df, float(2 * student_t.sf(abs(t), df)))


def paired_t_test(a: Sequence[float], b: Sequence[float]) -> TTest:
    """Paired t-test on d_i = b_i − a_i (a_i, b_i: the same seed): t = d̄ / (s_d/√n), df = n − 1."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"a paired t-test needs two equal-length samples of >= 2, got {len(a)}, {len(b)}")
    d = [y - x for x, y in zip(a, b, strict=True)]
    return _two_sided("paired", statistics.fmean(d), statistics.variance(d) / len(d), len(d) - 1)


def welch_t_test(a: Sequence[float], b: Sequence[float]) -> TTest:
    """Welch's t-test (unequal variances): t = (b̄ − ā) / √(s_a²/n_a + s_b²/n_b), Welch–Satterthwaite df."""
    if min(len(a), len(b)) < 2:
        raise ValueError(f"Welch's t-test needs >= 2 values in each sample, got {len(a)}, {len(b)}")
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)) if va + vb > 0 else math.nan
    return _two_sided("welch", statistics.fmean(b) - statistics.fmean(a), va + vb, df)


def seed_test(a: Sequence[tuple[str, float]], b: Sequence[tuple[str, float]]) -> TTest | None:
    """The test of b against a from their (seed, value) pairs: paired when both have exactly the same
    seeds (each once), else Welch's; None when either has fewer than two values."""
    if min(len(a), len(b)) < 2:
        return None
    of_a = dict(a)
    if len(of_a) == len(a) and sorted(of_a) == sorted(s for s, _ in b):
        return paired_t_test([of_a[s] for s, _ in b], [v for _, v in b])
    return welch_t_test([v for _, v in a], [v for _, v in b])
