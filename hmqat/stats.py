"""Paired seeded comparisons: the uncertainty every claim of the study carries.

A comparison of two recipes (or allocations) trains each on the same seeds; seed ``k`` of arm A
and seed ``k`` of arm B share data order and initial noise, so the per-seed differences
d_k = a_k − b_k are the unit of evidence (docs/method.md §8):

    mean d̄ = (1/n) Σ d_k,   s_d² = Σ (d_k − d̄)² / (n − 1),
    95 % CI = d̄ ± t_{0.975, n−1} · s_d / √n                       (paired t interval)

:func:`bootstrap_ci` gives a percentile interval for statistics without a t form (Kendall τ,
τ differences). Both need ≥ 2 samples; the study asks for ≥ 3.

    >>> from hmqat.stats import paired_difference
    >>> paired_difference([86.9, 87.1, 86.8], [86.5, 86.9, 86.6])  # doctest: +SKIP
    PairedDifference(mean=0.2667, low=..., high=..., n=3, ...)
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats as _st

__all__ = ["PairedDifference", "StatsError", "bootstrap_ci", "paired_difference",
           "paired_table", "seed_summary"]


class StatsError(ValueError):
    """Samples that cannot carry the requested interval."""


@dataclass(frozen=True)
class PairedDifference:
    """Mean paired difference a − b with a two-sided t confidence interval."""

    mean: float
    low: float
    high: float
    n: int
    sd: float
    confidence: float = 0.95

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        pct = round(100 * self.confidence)
        return f"{self.mean:+.2f} [{pct}% CI {self.low:+.2f}, {self.high:+.2f}] (n={self.n})"


def _as_array(x: Sequence[float], name: str) -> np.ndarray:
    a = np.asarray(x, dtype=float)
    if a.ndim != 1:
        raise StatsError(f"{name} must be one value per seed, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise StatsError(f"{name} holds a non-finite value: {a.tolist()}")
    return a


def paired_difference(a: Sequence[float], b: Sequence[float],
                      confidence: float = 0.95) -> PairedDifference:
    """Paired t interval of mean(a − b); ``a[k]`` and ``b[k]`` share seed ``k``."""
    x, y = _as_array(a, "a"), _as_array(b, "b")
    if len(x) != len(y):
        raise StatsError(f"paired samples need equal lengths (one per seed), got {len(x)} "
                         f"and {len(y)}")
    if len(x) < 2:
        raise StatsError(f"a confidence interval needs >= 2 paired seeds, got {len(x)}")
    if not 0 < confidence < 1:
        raise StatsError(f"confidence must be in (0, 1), got {confidence}")
    d = x - y
    n = len(d)
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    half = float(_st.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return PairedDifference(mean, mean - half, mean + half, n, sd, confidence)


def bootstrap_ci(statistic: Callable[[np.ndarray], float], n_items: int, *,
                 n_boot: int = 2000, confidence: float = 0.95, seed: int = 0
                 ) -> tuple[float, float, float]:
    """(point, low, high): percentile bootstrap over ``n_items`` resampled with replacement.

    ``statistic(idx)`` receives an index array (the identity for the point estimate), so
    paired statistics (e.g. τ(joint) − τ(baseline) on the same configs) resample jointly.
    """
    if n_items < 2:
        raise StatsError(f"the bootstrap needs >= 2 items, got {n_items}")
    rng = np.random.default_rng(seed)
    point = float(statistic(np.arange(n_items)))
    draws = np.array([statistic(rng.integers(0, n_items, n_items)) for _ in range(n_boot)],
                     dtype=float)
    draws = draws[np.isfinite(draws)]
    alpha = (1 - confidence) / 2
    return point, float(np.quantile(draws, alpha)), float(np.quantile(draws, 1 - alpha))


def seed_summary(frame: pd.DataFrame, by: str | list[str], value: str,
                 seed: str = "seed") -> pd.DataFrame:
    """Mean, std and seed count of ``value`` per group (one row per group)."""
    g = frame.groupby(by, sort=False)
    out = g[value].agg(mean="mean", std="std").join(g[seed].nunique().rename("seeds"))
    return out.reset_index()


def paired_table(frame: pd.DataFrame, arm: str, value: str, reference: str,
                 seed: str = "seed", confidence: float = 0.95) -> pd.DataFrame:
    """Each arm's paired difference to ``reference`` over the seeds both ran.

    ``frame`` has one row per (arm, seed). Columns: arm, mean, std, seeds, diff, ci_low,
    ci_high (of arm − reference, paired by seed; NaN where fewer than 2 shared seeds).
    """
    wide = frame.pivot_table(index=seed, columns=arm, values=value, aggfunc="first")
    if reference not in wide.columns:
        raise StatsError(f"reference arm {reference!r} not in {list(wide.columns)}")
    rows = []
    for name in wide.columns:
        col = wide[name].dropna()
        row = {arm: name, "mean": col.mean(), "std": col.std(ddof=1), "seeds": len(col),
               "diff": math.nan, "ci_low": math.nan, "ci_high": math.nan}
        both = wide[[name, reference]].dropna()
        if name != reference and len(both) >= 2:
            d = paired_difference(both[name], both[reference], confidence)
            row.update(diff=d.mean, ci_low=d.low, ci_high=d.high)
        rows.append(row)
    return pd.DataFrame(rows)
