"""The statistics of ``aapo compare``: pure Python (no scipy), unit-tested against textbook values.

* :func:`mean_ci`: mean and the half-width of its two-sided 95 % Student-t confidence interval
  (``t_{0.975, n-1} · s / √n``, ``s`` the sample standard deviation).
* :func:`paired`: the same for paired differences, with the paired t-test's two-sided p-value
  and the exact sign-flip permutation p-value (every one of the ``2^n`` sign assignments).
* :func:`steps_to_threshold`: the first step whose trailing mean reaches a threshold.

The Student-t distribution comes from the regularized incomplete beta function
``I_x(a, b)`` (continued fraction, modified Lentz; Numerical Recipes §6.4):
``P(|T| > t) = I_{ν/(ν+t²)}(ν/2, 1/2)`` for ``ν`` degrees of freedom.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import product
from typing import Sequence

#: exact sign-flip p-values enumerate 2^n assignments; above this many pairs they are not computed
MAX_SIGN_FLIP_PAIRS = 20


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function ``I_x(a, b)`` for ``a, b > 0`` and ``0 <= x <= 1``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):  # the continued fraction converges fast here; else use the symmetry
        return front * _beta_fraction(a, b, x) / a
    return 1.0 - front * _beta_fraction(b, a, 1.0 - x) / b


def _beta_fraction(a: float, b: float, x: float) -> float:
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),            # even step d_{2m}
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):  # odd step d_{2m+1}
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def t_two_sided_p(t: float, df: float) -> float:
    """``P(|T| >= |t|)`` for Student's t with ``df`` degrees of freedom."""
    if math.isnan(t):
        return float("nan")
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_cdf(t: float, df: float) -> float:
    half = t_two_sided_p(t, df) / 2.0
    return 1.0 - half if t > 0 else half


def t_quantile(q: float, df: float) -> float:
    """The ``q`` quantile of Student's t (``t_quantile(0.975, 4)`` = 2.776), by bisection on :func:`t_cdf`."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"q must be in (0, 1) (got {q})")
    if q < 0.5:
        return -t_quantile(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < q:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * hi:
            break
    return (lo + hi) / 2.0


def sample_std(values: Sequence[float]) -> float:
    """Standard deviation with the n - 1 denominator."""
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


@dataclass
class Interval:
    """A mean over ``n`` values and the half-width of its confidence interval (None when n < 2)."""

    mean: float | None
    half: float | None
    n: int

    def as_dict(self) -> dict:
        return {"mean": self.mean, "ci95_half": self.half, "n": self.n}


def mean_ci(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean ± ``t_{(1+level)/2, n-1} · s/√n``."""
    n = len(values)
    if n == 0:
        return Interval(None, None, 0)
    mean = sum(values) / n
    if n < 2:
        return Interval(mean, None, n)
    return Interval(mean, t_quantile((1.0 + level) / 2.0, n - 1) * sample_std(values) / math.sqrt(n), n)


@dataclass
class Paired(Interval):
    """Mean of paired differences with its CI, the t statistic, the paired t-test's two-sided
    p-value and the exact sign-flip permutation p-value."""

    t: float | None = None
    p_t: float | None = None
    p_sign_flip: float | None = None

    def as_dict(self) -> dict:
        return {**super().as_dict(), "t": self.t, "p_t_test": self.p_t, "p_sign_flip": self.p_sign_flip}


def paired(differences: Sequence[float], level: float = 0.95) -> Paired:
    """Paired t-test of ``differences`` (H0: their mean is 0), two-sided. When every difference is the
    same the t statistic is 0/0 (all zero: p = 1) or ±∞ (p = 0); the sign-flip p-value stays exact."""
    ci = mean_ci(differences, level)
    if ci.n < 2:
        return Paired(ci.mean, ci.half, ci.n)
    sd = sample_std(differences)
    scale = max(1.0, max(abs(d) for d in differences))
    if max(differences) - min(differences) <= 1e-12 * scale:  # all equal (but for rounding in the mean)
        t = 0.0 if abs(ci.mean) <= 1e-12 * scale else math.copysign(math.inf, ci.mean)
    else:
        t = ci.mean / (sd / math.sqrt(ci.n))
    return Paired(ci.mean, ci.half, ci.n, t, t_two_sided_p(t, ci.n - 1), sign_flip_p(differences))


def sign_flip_p(differences: Sequence[float]) -> float | None:
    """Exact two-sided permutation p-value of paired differences: under H0 each difference is as
    likely negated, so p = (number of the 2^n sign assignments whose |sum| is at least the observed
    |sum|) / 2^n. Its smallest possible value is 2 / 2^n. None above MAX_SIGN_FLIP_PAIRS pairs."""
    n = len(differences)
    if n == 0 or n > MAX_SIGN_FLIP_PAIRS:
        return None
    observed = abs(sum(differences))
    slack = 1e-12 * max(1.0, sum(abs(d) for d in differences))  # sums that are equal but for rounding count
    hits = sum(1 for signs in product((1.0, -1.0), repeat=n)
               if abs(sum(s * d for s, d in zip(signs, differences))) >= observed - slack)
    return hits / 2 ** n


def steps_to_threshold(values_by_step: Sequence[tuple[int, float]], threshold: float, window: int = 3) -> int | None:
    """The first step ``s`` whose trailing ``window``-step mean (steps s - window + 1 .. s, all logged)
    is >= ``threshold``; None if no step's is (also when the run has fewer than ``window`` steps).
    A mean within 1e-9 below the threshold counts as reaching it (0.8, 0.9, 1.0 average to 0.9)."""
    points = sorted(values_by_step)
    for i in range(window - 1, len(points)):
        part = [v for _, v in points[i - window + 1:i + 1]]
        if sum(part) / window >= threshold - 1e-9:
            return points[i][0]
    return None


def median(values: Sequence[float]) -> float | None:
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return None
    return float(ordered[n // 2]) if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2.0


def reach_summary(outcomes: Sequence[int | None]) -> dict:
    """How many runs reached a threshold and the median (and range) of those that did; runs that
    never reached it are counted, not averaged in."""
    reached = [v for v in outcomes if v is not None]
    return {"reached": len(reached), "runs": len(outcomes), "median": median(reached),
            "min": min(reached) if reached else None, "max": max(reached) if reached else None}
