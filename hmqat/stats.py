"""Paired seeded comparisons: the uncertainty every claim of the study carries.

A comparison of two recipes (or allocations) trains each on the same seeds; seed ``k`` of arm A
and seed ``k`` of arm B share data order and initial noise, so the per-seed differences
d_k = a_k − b_k are the unit of evidence (docs/method.md §8):

    mean d̄ = (1/n) Σ d_k,   s_d² = Σ (d_k − d̄)² / (n − 1),
    95 % CI = d̄ ± t_{0.975, n−1} · s_d / √n                       (paired t interval)

:func:`bootstrap_ci` gives a percentile interval for statistics without a t form (Kendall τ,
τ differences). Both need ≥ 2 samples; the study asks for ≥ 3.

The paired t interval treats the evaluation images as fixed: it answers "would another training
seed change the difference?", not "would another 5,000 images?". Every seed is scored on the
*same* images, so their sampling noise is shared by all seeds and never shows in s_d.
:func:`crossed_paired_difference` carries both sources: it takes the per-image correctness of
each seed and treats seeds and images as crossed random effects (docs/method.md §8):

    D_kj = a_kj − b_kj = μ + s_k + i_j + e_kj       (seed k, image j; n seeds, M images)
    Var(D̄) = σ_s²/n + σ_i²/M + σ_e²/(nM) = (MS_seed + MS_image − MS_err) / (nM)     (Eq. V)

with the two-way ANOVA mean squares MS_seed = M Σ_k (D̄_k· − D̄)²/(n−1), MS_image =
n Σ_j (D̄_·j − D̄)²/(M−1), MS_err = Σ_kj (D_kj − D̄_k· − D̄_·j + D̄)²/((n−1)(M−1)), and a
Satterthwaite t interval on that combination.

    >>> from hmqat.stats import paired_difference
    >>> paired_difference([86.9, 87.1, 86.8], [86.5, 86.9, 86.6])  # doctest: +SKIP
    PairedDifference(mean=0.2667, low=..., high=..., n=3, ...)
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as _st

__all__ = ["PairedDifference", "StatsError", "bootstrap_ci", "crossed_paired_difference",
           "paired_difference", "paired_table", "seed_summary"]


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
    seed_var: float = math.nan    # σ_s²/n + σ_e²/(nM): the part another set of seeds would move
    image_var: float = math.nan   # σ_i²/M: the part another set of images would move
    n_images: int = 0             # 0: the images are treated as fixed (the seed-only t interval)

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        pct = round(100 * self.confidence)
        images = f", {self.n_images} images" if self.n_images else ""
        return (f"{self.mean:+.2f} [{pct}% CI {self.low:+.2f}, {self.high:+.2f}] "
                f"(n={self.n}{images})")

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


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


def _as_matrix(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=float)
    if a.ndim != 2:
        raise StatsError(f"{name} must be a (seeds, images) matrix of per-image scores, got "
                         f"shape {a.shape}")
    if not np.isfinite(a).all():
        raise StatsError(f"{name} holds a non-finite value")
    return a


def crossed_paired_difference(a: Any, b: Any, confidence: float = 0.95) -> PairedDifference:
    """Interval of mean(a − b) over seeds AND images (Eq. V of the module docstring).

    ``a[k, j]``/``b[k, j]``: seed ``k``'s score of image ``j`` (100 × correct for top-1 in
    points), both arms paired by seed and scored on the same images in the same order. The
    variance components are the ANOVA estimates clipped at 0 (σ̂_s² = (MS_seed − MS_err)/M,
    σ̂_i² = (MS_image − MS_err)/n, σ̂_e² = MS_err); the t quantile takes the Satterthwaite
    degrees of freedom of their combination. With one image per seed this is the paired t
    interval's job: call :func:`paired_difference`.
    """
    x, y = _as_matrix(a, "a"), _as_matrix(b, "b")
    if x.shape != y.shape:
        raise StatsError(f"paired matrices need equal shapes (seeds, images), got {x.shape} "
                         f"and {y.shape}")
    n, m = x.shape
    if n < 2 or m < 2:
        raise StatsError(f"a crossed interval needs >= 2 seeds and >= 2 images, got {n} x {m}")
    if not 0 < confidence < 1:
        raise StatsError(f"confidence must be in (0, 1), got {confidence}")
    d = x - y
    grand = float(d.mean())
    rows, cols = d.mean(axis=1), d.mean(axis=0)
    ms_seed = m * float(((rows - grand) ** 2).sum()) / (n - 1)
    ms_image = n * float(((cols - grand) ** 2).sum()) / (m - 1)
    resid = d - rows[:, None] - cols[None, :] + grand
    ms_err = float((resid ** 2).sum()) / ((n - 1) * (m - 1))
    # Var(D̄) = Σ c·MS: σ̂_s²/n = (MS_seed − MS_err)/(nM), σ̂_i²/M = (MS_image − MS_err)/(nM), each
    # dropped when negative (a variance component is >= 0), plus σ̂_e²/(nM) = MS_err/(nM)
    keep_s, keep_i = float(ms_seed > ms_err), float(ms_image > ms_err)
    coef = np.array([keep_s, keep_i, 1.0 - keep_s - keep_i]) / (n * m)
    ms = np.array([ms_seed, ms_image, ms_err])
    dfs = np.array([n - 1, m - 1, (n - 1) * (m - 1)], dtype=float)
    var = float(coef @ ms)
    seed_var = float(var - coef[1] * (ms_image - ms_err)) if keep_i else var
    image_var = var - seed_var
    denom = float(((coef * ms) ** 2 / dfs).sum())
    df = var ** 2 / denom if denom > 0 else math.inf           # Satterthwaite
    half = float(_st.t.ppf(0.5 + confidence / 2, df) if math.isfinite(df)
                 else _st.norm.ppf(0.5 + confidence / 2)) * math.sqrt(max(var, 0.0))
    return PairedDifference(grand, grand - half, grand + half, n, float(rows.std(ddof=1)),
                            confidence, seed_var=seed_var, image_var=image_var, n_images=m)


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
