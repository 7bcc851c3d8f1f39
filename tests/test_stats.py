"""Paired seeded comparisons against hand computations."""
import math

import numpy as np
import pandas as pd
import pytest

from hmqat.stats import (StatsError, bootstrap_ci, paired_difference, paired_table,
                         seed_summary)


def test_paired_difference_matches_hand_computation():
    a, b = [87.0, 86.5, 87.3], [86.0, 86.4, 86.6]
    d = [1.0, 0.1, 0.7]                       # a - b by seed
    mean = sum(d) / 3                         # 0.6
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    t975_df2 = 4.302652729911275              # Student t quantile, 2 degrees of freedom
    r = paired_difference(a, b)
    assert r.mean == pytest.approx(mean)
    assert r.sd == pytest.approx(sd)
    assert r.low == pytest.approx(mean - t975_df2 * sd / math.sqrt(3))
    assert r.high == pytest.approx(mean + t975_df2 * sd / math.sqrt(3))
    assert r.n == 3 and not r.excludes_zero   # wide interval at n = 3
    assert "+0.60" in str(r)


def test_paired_difference_rejects_bad_samples():
    with pytest.raises(StatsError, match="equal lengths"):
        paired_difference([1, 2, 3], [1, 2])
    with pytest.raises(StatsError, match=">= 2 paired seeds"):
        paired_difference([1], [2])
    with pytest.raises(StatsError, match="non-finite"):
        paired_difference([1, float("nan")], [1, 2])


def test_bootstrap_ci_brackets_point_and_is_seeded():
    x = np.arange(20.0)
    stat = lambda idx: float(x[idx].mean())  # noqa: E731
    p, lo, hi = bootstrap_ci(stat, len(x), n_boot=500, seed=3)
    assert p == pytest.approx(9.5) and lo < p < hi
    assert bootstrap_ci(stat, len(x), n_boot=500, seed=3) == (p, lo, hi)


def test_paired_table_and_seed_summary():
    f = pd.DataFrame({"arm": ["lsq"] * 3 + ["new"] * 3, "seed": [0, 1, 2] * 2,
                      "top1": [80.0, 81.0, 82.0, 81.0, 82.5, 83.0]})
    t = paired_table(f, "arm", "top1", reference="lsq").set_index("arm")
    assert t.loc["new", "diff"] == pytest.approx(paired_difference([81, 82.5, 83],
                                                                   [80, 81, 82]).mean)
    assert math.isnan(t.loc["lsq", "diff"]) and t.loc["new", "seeds"] == 3
    s = seed_summary(f, "arm", "top1").set_index("arm")
    assert s.loc["lsq", "mean"] == pytest.approx(81.0) and s.loc["lsq", "seeds"] == 3
    with pytest.raises(StatsError, match="reference arm"):
        paired_table(f, "arm", "top1", reference="missing")


def _crossed_by_hand(d):
    """Eq. V with explicit loops: the two-way ANOVA of a (seeds, images) difference matrix."""
    n, m = len(d), len(d[0])
    grand = sum(sum(r) for r in d) / (n * m)
    rows = [sum(r) / m for r in d]
    cols = [sum(d[k][j] for k in range(n)) / n for j in range(m)]
    ms_seed = m * sum((r - grand) ** 2 for r in rows) / (n - 1)
    ms_image = n * sum((c - grand) ** 2 for c in cols) / (m - 1)
    ms_err = sum((d[k][j] - rows[k] - cols[j] + grand) ** 2
                 for k in range(n) for j in range(m)) / ((n - 1) * (m - 1))
    return grand, ms_seed, ms_image, ms_err


def test_crossed_interval_matches_hand_computation():
    from scipy import stats as st

    from hmqat.stats import crossed_paired_difference
    a = [[0, 100, 100, 0, 100, 100], [100, 0, 0, 100, 0, 100], [100, 100, 0, 100, 0, 100]]
    b = [[0, 0, 100, 100, 100, 0], [100, 100, 0, 0, 100, 100], [0, 0, 0, 0, 100, 0]]
    d = [[x - y for x, y in zip(ra, rb)] for ra, rb in zip(a, b)]
    grand, ms_s, ms_i, ms_e = _crossed_by_hand(d)
    n, m = 3, 6
    assert ms_s > ms_e and ms_i > ms_e            # both components kept in this example
    var = (ms_s + ms_i - ms_e) / (n * m)          # Eq. V
    df = (n * m * var) ** 2 / (ms_s ** 2 / (n - 1) + ms_i ** 2 / (m - 1)
                               + ms_e ** 2 / ((n - 1) * (m - 1)))
    half = st.t.ppf(0.975, df) * math.sqrt(var)
    r = crossed_paired_difference(a, b)
    assert r.mean == pytest.approx(grand)
    assert (r.low, r.high) == (pytest.approx(grand - half), pytest.approx(grand + half))
    assert r.image_var == pytest.approx((ms_i - ms_e) / (n * m))
    assert r.seed_var + r.image_var == pytest.approx(var)
    assert r.n == 3 and r.n_images == 6 and "6 images" in str(r)


def test_crossed_interval_drops_a_negative_component():
    from hmqat.stats import crossed_paired_difference
    # every seed has the same row mean: MS_seed = 0 < MS_err, so σ̂_s² is clipped to 0
    a = [[100, 0, 100, 0], [0, 100, 100, 0], [100, 0, 0, 100]]
    b = [[0, 0, 0, 0]] * 3
    grand, ms_s, ms_i, ms_e = _crossed_by_hand([[x for x in r] for r in a])
    assert ms_s == 0 and ms_i < ms_e   # both components clipped: Var = MS_err / (nM)
    r = crossed_paired_difference(a, b)
    assert r.seed_var == pytest.approx(ms_e / 12) and r.image_var == 0


def test_crossed_interval_covers_when_the_seed_interval_does_not():
    """Simulated experiments with a known true difference: image effects shared by all seeds
    make the seed-only t interval too narrow; the crossed interval keeps its level."""
    from hmqat.stats import crossed_paired_difference
    rng = np.random.default_rng(0)
    n, m, reps, mu = 3, 400, 400, 0.5
    cover_crossed = cover_seed = 0
    for _ in range(reps):
        image = rng.normal(0, 10.0, m)                # σ_i: which images favour arm a
        seed = rng.normal(0, 0.2, n)                 # σ_s: training-seed noise
        d = mu + seed[:, None] + image[None, :] + rng.normal(0, 3.0, (n, m))
        r = crossed_paired_difference(d, np.zeros_like(d))
        s = paired_difference(d.mean(axis=1), np.zeros(n))
        cover_crossed += r.low <= mu <= r.high
        cover_seed += s.low <= mu <= s.high
    assert 0.92 <= cover_crossed / reps <= 0.98
    assert cover_seed / reps < 0.75


def test_crossed_interval_rejects_bad_input():
    from hmqat.stats import crossed_paired_difference
    with pytest.raises(StatsError, match=r"\(seeds, images\) matrix"):
        crossed_paired_difference([1, 2, 3], [1, 2, 3])
    with pytest.raises(StatsError, match="equal shapes"):
        crossed_paired_difference(np.zeros((3, 4)), np.zeros((3, 5)))
    with pytest.raises(StatsError, match=">= 2 seeds and >= 2 images"):
        crossed_paired_difference(np.zeros((1, 4)), np.zeros((1, 4)))
