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
