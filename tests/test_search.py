"""Tests for hmqat.search (docs/design.md §3 "Search"): exact frontier vs brute force and ILP,
select() semantics, the baselines and every validation error."""
from __future__ import annotations

import importlib.util
import re
import sys

import numpy as np
import pandas as pd
import pytest

from hmqat import search
from hmqat.search import (
    MB,
    InfeasibleBudgetError,
    SearchError,
    brute_force_frontier,
    evaluate_config,
    greedy_select,
    ilp_select,
    pareto_frontier,
    random_select,
    select,
    uniform_select,
)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def random_problem(seed: int) -> tuple[pd.DataFrame, dict, dict]:
    """A small random table (4-6 layers, 5 Ω columns, 4 candidate bits) plus search kwargs
    covering size/BOPs cost, fixed layers (possibly at a non-candidate width), tied groups
    (possibly holding a fixed layer), monotone and non-monotone Ω, int and per-layer a_bits."""
    rng = np.random.default_rng(seed)
    n_layers = int(rng.integers(4, 7))
    layers = [f"block{i}.conv" for i in range(n_layers)]
    columns = sorted(rng.choice(np.arange(2, 9), size=5, replace=False).tolist())
    if seed % 3 == 0:   # monotone: more bits, less Ω
        base = rng.lognormal(size=(n_layers, 1))
        noise = rng.uniform(0.5, 2, (n_layers, 5))
        vals = base * np.array([4.0 ** -b for b in columns])[None, :] * noise
        vals = np.sort(vals, axis=1)[:, ::-1]
    else:               # arbitrary non-negative Ω (the DP must not assume monotonicity)
        vals = rng.exponential(size=(n_layers, 5))
    omega = pd.DataFrame(vals, index=layers, columns=columns)
    n_params = {name: int(rng.integers(1, 60)) for name in layers}
    kw: dict = {"bits": columns[:4] if seed % 2 else columns[1:]}
    kw["cost"] = "bops" if seed % 4 >= 2 else "size"
    if kw["cost"] == "bops" or seed % 5 == 0:
        kw["macs"] = {name: int(rng.integers(0, 500)) for name in layers}
        kw["a_bits"] = int(rng.choice([4, 8])) if seed % 3 else {
            name: int(rng.choice([4, 8])) for name in layers}
    perm = rng.permutation(layers).tolist()
    n_fixed = int(rng.integers(0, 3))
    kw["fixed"] = {name: int(rng.choice(columns)) for name in perm[:n_fixed]}
    n_tied = int(rng.integers(0, 3))
    groups, pool = [], perm[n_fixed - 1 if n_fixed else 0:]  # may share one fixed layer
    for _ in range(n_tied):
        size = int(rng.integers(2, 4))
        if len(pool) < size:
            break
        groups.append(pool[:size])
        pool = pool[size:]
    kw["tied"] = groups
    kw["other_params"] = int(rng.integers(0, 100))
    return omega, n_params, kw


def resnet20_problem(seed: int = 0) -> tuple[pd.DataFrame, dict, dict]:
    """ResNet-20 layer sizes/MACs with a realistic Ω = T̄_i·n_i·Δ_b²/12 (log-uniform traces)."""
    from hmqat.models import create_model, quantizable_layers

    layers = quantizable_layers(create_model("resnet20"))
    rng = np.random.default_rng(seed)
    bits = (2, 3, 4, 5, 6, 8)
    rows = {}
    for info, trace in zip(layers, 10 ** rng.uniform(-4, 0, len(layers))):
        sigma = np.sqrt(2.0 / np.prod(info.weight_shape[1:]))
        rows[info.name] = {b: trace * info.n_params * (6 * sigma / (2 ** b - 1)) ** 2 / 12
                           for b in bits}
    omega = pd.DataFrame.from_dict(rows, orient="index")
    return (omega, {i.name: i.n_params for i in layers}, {i.name: i.macs for i in layers})


def assert_same_frontier(a, b) -> None:
    pa, pb = a.points, b.points
    assert len(pa) == len(pb)
    np.testing.assert_array_equal(pa["cost_int"].to_numpy(), pb["cost_int"].to_numpy())
    np.testing.assert_allclose(pa["omega"].to_numpy(), pb["omega"].to_numpy(), rtol=1e-12)
    assert list(pa["config"]) == list(pb["config"])
    pd.testing.assert_frame_equal(pa.drop(columns=["omega", "config"]),
                                  pb.drop(columns=["omega", "config"]))


# --------------------------------------------------------------------------------------------
# exactness
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(120))
def test_frontier_equals_brute_force(seed):
    omega, n_params, kw = random_problem(seed)
    dp = pareto_frontier(omega, n_params, **kw)
    bf = brute_force_frontier(omega, n_params, **kw)
    assert_same_frontier(dp, bf)
    pts = dp.points
    assert (np.diff(pts["cost_int"]) > 0).all() and (np.diff(pts["omega"]) < 0).all()
    for cfg in pts["config"]:
        assert all(cfg[k] == b for k, b in kw["fixed"].items())
        assert all(len({cfg[m] for m in g}) == 1 for g in kw["tied"])
        assert all(cfg[k] in kw["bits"] for k in cfg
                   if k not in kw["fixed"] and not any(k in g for g in kw["tied"]))


def test_frontier_dominates_every_config():
    """Independent of both implementations' pruning: every enumerated config is weakly dominated
    by the frontier point with the largest cost not above its own."""
    rng = np.random.default_rng(7)
    omega = pd.DataFrame(rng.exponential(size=(6, 4)), index=list("abcdef"), columns=[2, 3, 4, 8])
    n_params = {k: int(rng.integers(1, 40)) for k in omega.index}
    front = pareto_frontier(omega, n_params).points
    grids = np.meshgrid(*[np.arange(4)] * 6, indexing="ij")
    idx = np.stack([g.ravel() for g in grids], axis=1)
    costs = (np.array([2, 3, 4, 8])[idx] * np.array(list(n_params.values()))).sum(axis=1)
    totals = omega.to_numpy()[np.arange(6), idx].sum(axis=1)
    pos = np.searchsorted(front["cost_int"].to_numpy(), costs, side="right") - 1
    assert (pos >= 0).all()
    assert (front["omega"].to_numpy()[pos] <= totals + 1e-12).all()


def test_frontier_columns_and_accounting():
    omega = pd.DataFrame({2: [4.0, 9.0], 4: [1.0, 2.0], 8: [0.0, 0.1]}, index=["a", "b"])
    front = pareto_frontier(omega, {"a": 100, "b": 300}, other_params=10, fp32_params=1000,
                            macs={"a": 50, "b": 70}, a_bits={"a": 8, "b": 4})
    pts = front.points
    assert list(pts.columns) == ["cost_int", "size_mb", "compression", "bops", "omega",
                                 "avg_bits", "config"]
    row = pts[pts["config"] == {"a": 4, "b": 8}].iloc[0]
    assert row["cost_int"] == 100 * 4 + 300 * 8
    assert row["size_mb"] == pytest.approx((2800 / 8 + 40) / MB)
    assert row["compression"] == pytest.approx(4000 / (2800 / 8 + 40))
    assert row["bops"] == 50 * 4 * 8 + 70 * 8 * 4
    assert row["avg_bits"] == pytest.approx(2800 / 400)
    assert row["omega"] == pytest.approx(1.1)
    assert front.search_ms >= 0 and front.layers == ["a", "b"]
    # default fp32_params = Σ n_i + other_params
    default = pareto_frontier(omega, {"a": 100, "b": 300}, other_params=10)
    assert default.fp32_mb == pytest.approx(4 * 410 / MB)
    flat = front.to_frame()
    assert list(flat.columns[-2:]) == ["a", "b"] and "config" not in flat
    assert flat[["a", "b"]].to_dict("records") == list(pts["config"])


def test_dict_of_dicts_and_csv_columns_match_dataframe():
    omega, n_params, kw = random_problem(4)
    ref = pareto_frontier(omega, n_params, **kw)
    as_dict = {k: {int(b): v for b, v in row.items()} for k, row in omega.iterrows()}
    assert_same_frontier(pareto_frontier(as_dict, n_params, **kw), ref)
    as_csv = omega.rename(columns=str)
    assert_same_frontier(pareto_frontier(as_csv, n_params, **kw), ref)


def test_configs_follow_layer_order_and_evaluate_config_agrees():
    omega, n_params, macs = resnet20_problem()
    front = pareto_frontier(omega, n_params, macs=macs, a_bits=4)
    for _, row in front.points.iloc[:: max(1, len(front) // 15)].iterrows():
        assert list(row["config"]) == list(omega.index)
        a = evaluate_config(row["config"], omega, n_params, macs=macs, a_bits=4)
        assert a.cost_int == row["cost_int"] and a.bops == row["bops"]
        assert a.omega == pytest.approx(row["omega"], rel=1e-12)


@pytest.mark.parametrize("cost", ["size", "bops"])
def test_frontier_matches_ilp_on_resnet20(cost):
    pytest.importorskip("pulp")
    omega, n_params, macs = resnet20_problem()
    names = list(omega.index)
    fixed = {names[0]: 8, names[-1]: 8}
    tied = [["layer2.0.conv1", "layer2.0.conv2"]]
    kw = dict(fixed=fixed, tied=tied, macs=macs, a_bits=4, other_params=1000)
    front = pareto_frontier(omega, n_params, cost=cost, **kw)
    key, budget = ("size_mb", "max_mb") if cost == "size" else ("bops", "max_bops")
    pts = front.points
    n_budgets = 20 if cost == "size" else 8
    # half at frontier points exactly, half strictly between points
    at = pts[key].to_numpy()[np.linspace(0, len(pts) - 1, n_budgets // 2).astype(int)]
    mid = np.linspace(pts[key].iloc[0], pts[key].iloc[-1], n_budgets // 2 + 2)[1:-1]
    for value in np.concatenate([at, mid]):
        best = select(front, **{budget: float(value)})
        ilp = ilp_select(omega, n_params, **{budget: float(value)}, **kw)
        assert getattr(ilp, key) <= value
        assert ilp.omega == pytest.approx(best["omega"], rel=1e-9), value
        assert ilp.config[names[0]] == 8 and ilp.config["layer2.0.conv1"] == ilp.config[
            "layer2.0.conv2"]


def test_ilp_min_compression_matches_frontier_at_boundary():
    pytest.importorskip("pulp")
    omega, n_params, _ = resnet20_problem(1)
    front = pareto_frontier(omega, n_params, bits=(2, 4, 8))
    for ratio in front.points["compression"].iloc[[3, len(front) // 2, -4]]:
        best = select(front, min_compression=float(ratio))
        assert best["compression"] >= ratio
        ilp = ilp_select(omega, n_params, bits=(2, 4, 8), min_compression=float(ratio))
        assert ilp.omega == pytest.approx(best["omega"], rel=1e-9)


def test_ilp_without_pulp_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pulp", None)
    omega, n_params, _ = random_problem(1)
    with pytest.raises(ImportError, match="pip install pulp"):
        ilp_select(omega, n_params, max_mb=1.0)


# --------------------------------------------------------------------------------------------
# select()
# --------------------------------------------------------------------------------------------
def test_select_picks_lowest_omega_within_budget():
    omega, n_params, _ = resnet20_problem()
    front = pareto_frontier(omega, n_params)
    pts = front.points
    k = len(pts) // 2
    exact = select(front, max_mb=float(pts["size_mb"].iloc[k]))
    assert exact.name == k
    between = select(front, max_mb=float((pts["size_mb"].iloc[k] + pts["size_mb"].iloc[k + 1]) / 2))
    assert between.name == k
    assert between["omega"] == pts.loc[pts["size_mb"] <= between["size_mb"], "omega"].min()
    by_ratio = select(front, min_compression=float(pts["compression"].iloc[k]))
    assert by_ratio.name == k
    assert select(front, max_mb=1e9).name == len(pts) - 1
    assert isinstance(exact["config"], dict)


def test_select_infeasible_states_smallest_achievable():
    omega, n_params, macs = resnet20_problem()
    front = pareto_frontier(omega, n_params)
    smallest = front.points["size_mb"].iloc[0]
    msg = re.escape(f"smallest achievable is {smallest:.6g} MB")
    with pytest.raises(InfeasibleBudgetError, match=msg):
        select(front, max_mb=smallest * 0.99)
    with pytest.raises(InfeasibleBudgetError, match="highest achievable compression is 16x"):
        select(front, min_compression=100.0)
    bops_front = pareto_frontier(omega, n_params, cost="bops", macs=macs, a_bits=4)
    low = bops_front.points["bops"].iloc[0]
    msg = re.escape(f"smallest achievable is {low:.6g} BOPs")
    with pytest.raises(InfeasibleBudgetError, match=msg):
        select(bops_front, max_bops=low - 1)


def test_select_budget_arguments():
    omega, n_params, _ = random_problem(1)
    front = pareto_frontier(omega, n_params)
    with pytest.raises(SearchError, match="exactly one budget"):
        select(front)
    with pytest.raises(SearchError, match="exactly one budget"):
        select(front, max_mb=1.0, min_compression=2.0)
    with pytest.raises(SearchError, match="rebuild with cost='bops'"):
        select(front, max_bops=1e9)
    with pytest.raises(SearchError, match="finite number > 0"):
        select(front, max_mb=-1.0)


# --------------------------------------------------------------------------------------------
# the fast search: lazy Frontier, bucket pre-filter, merge order and same-cost blocks
# --------------------------------------------------------------------------------------------
def tie_problem(seed: int) -> tuple[pd.DataFrame, dict, dict]:
    """Integer Ω in {0..3} and weight counts in {1, 2, 3}: many configs tie exactly in cost and
    in ΣΩ (and, for BOPs, layers with 0 MACs make every width cost the same)."""
    rng = np.random.default_rng(seed)
    n_layers = int(rng.integers(3, 8))
    layers = [f"l{i}" for i in range(n_layers)]
    omega = pd.DataFrame(rng.integers(0, 4, (n_layers, 4)).astype(float), index=layers,
                         columns=[2, 3, 4, 8])
    n_params = {k: int(rng.integers(1, 4)) for k in layers}
    kw: dict = {}
    if seed % 4 == 1:
        kw = {"cost": "bops", "macs": {k: int(rng.integers(0, 3)) for k in layers}, "a_bits": 4}
    return omega, n_params, kw


def plain_dp(p) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference: the plain sort-and-prune DP over units in forward order (no pre-filter, no
    blocks, no reordering), configs back-tracked for every point: (cost, ΣΩ, [N, L] bits)."""
    cost, omega, trace = search._dp(p.units, use_filter=False)
    picks = search._backtrack(trace, len(p.units), np.arange(len(cost)))
    return cost, omega, search._bits_matrix(p, picks)


def prepared(omega, n_params, kw):
    kw = dict(kw)
    return search._prepare(omega, n_params, kw.pop("bits", None), **kw)


@pytest.mark.parametrize("seed", range(40))
def test_bucket_filter_changes_nothing(seed, monkeypatch):
    """The pre-filter only drops candidates the exact prune drops anyway: with the same merge
    order, costs, ΣΩ and back-pointers are bit-identical, exact ties included."""
    monkeypatch.setattr(search, "_FILTER_MIN_CANDIDATES", 1)    # filter every merge
    p = prepared(*(random_problem if seed % 2 else tie_problem)(seed))
    states = None
    for order in (None, search._dp_order(p.units)):
        ref = search._dp(p.units, order, use_filter=False)
        got = search._dp(p.units, order, use_filter=True)
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_array_equal(got[1], ref[1])
        states = np.arange(len(ref[0]))
        np.testing.assert_array_equal(search._backtrack(got[2], len(p.units), states),
                                      search._backtrack(ref[2], len(p.units), states))
    assert states is not None and len(states) >= 1


@pytest.mark.parametrize("seed", range(0, 60, 3))
def test_fast_search_equals_plain_dp(seed, monkeypatch):
    """Blocks + merge order + pre-filter give the plain DP's frontier: same costs and configs,
    ΣΩ equal up to summation order. On tie tables only (cost, ΣΩ) are unique."""
    monkeypatch.setattr(search, "_FILTER_MIN_CANDIDATES", 1)
    tie = seed % 2 == 1
    omega, n_params, kw = (tie_problem if tie else random_problem)(seed)
    p = prepared(omega, n_params, kw)
    cost, total, plan = search._search(p.units)
    ref_cost, ref_total, ref_bits = plain_dp(p)
    np.testing.assert_array_equal(cost, ref_cost)
    np.testing.assert_allclose(total, ref_total, rtol=1e-12, atol=1e-12)
    bits = search._bits_matrix(p, search._unit_picks(plan, np.arange(len(cost))))
    if not tie:
        np.testing.assert_array_equal(bits, ref_bits)
    acc = search._accounting(p, bits)                       # the configs achieve the frontier
    np.testing.assert_array_equal(acc["cost_int"], cost)
    np.testing.assert_allclose(search._omega_of(p, bits), total, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cost", ["size", "bops"])
def test_fast_search_equals_plain_dp_on_resnet20(cost):
    omega, n_params, macs = resnet20_problem(4)
    names = list(omega.index)
    kw = {"cost": cost, "fixed": {names[0]: 8, names[-1]: 8}, "macs": macs, "a_bits": 4,
          "tied": [["layer2.0.conv1", "layer2.0.conv2"]]}
    front = pareto_frontier(omega, n_params, **kw)
    p = prepared(omega, n_params, kw)
    assert len(front._plan.blocks) < len(p.units)              # same-size convs were grouped
    ref_cost, ref_total, ref_bits = plain_dp(p)
    np.testing.assert_array_equal(front.cost_int, ref_cost)
    np.testing.assert_allclose(front.omega, ref_total, rtol=1e-12)
    np.testing.assert_array_equal(front.bits_matrix, ref_bits)


@pytest.mark.parametrize("seed", range(0, 40, 3))
def test_lazy_frontier_rows_equal_eager_table(seed):
    """row(i) / config(i) / select() never build ``points``, and equal the eager table (the old
    behaviour: every config back-tracked by the plain DP, then :func:`_frame`)."""
    omega, n_params, kw = random_problem(seed)
    lazy = pareto_frontier(omega, n_params, **kw)
    assert f"{len(lazy)} points" in repr(lazy)
    pts = pareto_frontier(omega, n_params, **kw).points
    p = prepared(omega, n_params, kw)
    _, ref_total, ref_bits = plain_dp(p)
    eager = search._frame(p, ref_bits, ref_total)
    pd.testing.assert_frame_equal(pts.drop(columns="omega"), eager.drop(columns="omega"))
    np.testing.assert_allclose(pts["omega"], eager["omega"], rtol=1e-12)
    assert len(lazy) == len(pts)
    for i in range(len(pts)):
        row = lazy.row(i)
        pd.testing.assert_series_equal(row, pts.iloc[i])
        assert [type(v) for v in row] == [type(v) for v in pts.iloc[i]]
        assert lazy.config(i) == pts["config"].iloc[i]
    pd.testing.assert_series_equal(lazy.row(-1), pts.iloc[-1])
    with pytest.raises(IndexError, match="out of range"):
        lazy.row(len(pts))
    assert "points" not in vars(lazy) and "bits_matrix" not in vars(lazy)
    assert lazy.configs() == list(pts["config"])                # now built, and equal
    pd.testing.assert_series_equal(lazy.row(2 % len(pts)), pts.iloc[2 % len(pts)])


@pytest.mark.parametrize("seed", range(1, 80, 4))
def test_select_on_lazy_frontier_equals_brute_force(seed):
    """Binary-search select() on the lazy frontier = the last brute-force point meeting the
    budget (the old mask semantics), at every point, between points and past both ends."""
    omega, n_params, kw = random_problem(seed)
    front = pareto_frontier(omega, n_params, **kw)
    bf = brute_force_frontier(omega, n_params, **kw).points
    key, kind = ("bops", "max_bops") if kw["cost"] == "bops" else ("size_mb", "max_mb")
    vals = bf[key].to_numpy(dtype=float)
    budgets = [(kind, v) for v in np.concatenate([vals, (vals[1:] + vals[:-1]) / 2,
                                                  [vals[0] * 0.999, vals[-1] * 2]])]
    if key == "size_mb":
        comp = bf["compression"].to_numpy()
        budgets += [("min_compression", v) for v in np.concatenate([comp, comp * (1 + 1e-9)])]
    n_checked = 0
    for kind, value in budgets:
        if not value > 0:
            continue
        col = {"max_mb": "size_mb", "min_compression": "compression", "max_bops": "bops"}[kind]
        ok = (bf[col] >= value if kind == "min_compression" else bf[col] <= value).to_numpy()
        if not ok.any():
            with pytest.raises(InfeasibleBudgetError, match="achievable"):
                select(front, **{kind: float(value)})
            continue
        k = int(np.flatnonzero(ok)[-1])
        row = select(front, **{kind: float(value)})
        assert row.name == k == int(bf.loc[ok, "omega"].idxmin())
        assert row["config"] == bf["config"].iloc[k]
        assert row["cost_int"] == bf["cost_int"].iloc[k]
        assert row["omega"] == pytest.approx(bf["omega"].iloc[k], rel=1e-12)
        n_checked += 1
    assert n_checked >= len(vals)
    assert "points" not in vars(front)


def test_blocks_group_same_cost_units_and_backtracking_agrees():
    omega, n_params, macs = resnet20_problem()
    front = pareto_frontier(omega, n_params, macs=macs, a_bits=4)
    p, plan = front._problem, front._plan
    assert sorted(k for b in plan.blocks for k in b.units) == list(range(len(p.units)))
    for block in plan.blocks:
        assert all(np.array_equal(p.units[k].cost, p.units[block.units[0]].cost)
                   for k in block.units)
        assert (block.trace is None) == (len(block.units) == 1)
    assert max(len(b.units) for b in plan.blocks) >= 3         # e.g. layer1's 3x3 convs
    picks = search._unit_picks(plan, np.arange(len(front)))
    for i in range(0, len(front), 7):
        assert search._unit_picks_one(plan, i) == picks[i].tolist()


# --------------------------------------------------------------------------------------------
# baselines
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cost", ["size", "bops"])
def test_baselines_are_valid_and_never_beat_the_frontier(cost):
    omega, n_params, macs = resnet20_problem(2)
    names = list(omega.index)
    fixed = {names[0]: 8, names[-1]: 8}
    tied = [["layer3.0.conv1", "layer3.0.conv2"]]
    kw = dict(fixed=fixed, tied=tied, macs=macs, a_bits=4)
    front = pareto_frontier(omega, n_params, cost=cost, **kw)
    key, budget = ("size_mb", "max_mb") if cost == "size" else ("bops", "max_bops")
    for q in (0.1, 0.5, 0.9):
        value = float(front.points[key].quantile(q))
        opt = select(front, **{budget: value})["omega"]
        for fn in (greedy_select, random_select, uniform_select):
            a = fn(omega, n_params, **{budget: value}, **kw)
            assert getattr(a, key) <= value, fn.__name__
            assert a.omega >= opt * (1 - 1e-12), fn.__name__
            assert all(a.config[k] == 8 for k in fixed)
            assert a.config["layer3.0.conv1"] == a.config["layer3.0.conv2"]
            assert set(a.config.values()) <= set(omega.columns)
            ref = evaluate_config(a.config, omega, n_params, macs=macs, a_bits=4)
            assert ref.cost_int == (a.cost_int if cost == "size" else ref.cost_int)
            assert ref.omega == pytest.approx(a.omega, rel=1e-12)


def test_greedy_and_random_details():
    omega, n_params, _ = resnet20_problem(3)
    front = pareto_frontier(omega, n_params)
    value = float(front.points["size_mb"].median())
    a = random_select(omega, n_params, max_mb=value, seed=5)
    assert a == random_select(omega, n_params, max_mb=value, seed=5)   # seeded
    assert a.size_mb > 0.95 * value                                    # matched size
    g = greedy_select(omega, n_params, max_mb=1e9)
    assert set(g.config.values()) == {8}                               # starts at max bits
    u = uniform_select(omega, n_params, max_mb=value)
    assert len(set(u.config.values())) == 1
    higher = [b for b in omega.columns if b > u.config["conv1"]]
    if higher:   # the next uniform width would not fit
        over = uniform_select(omega, n_params, max_mb=1e9, bits=[higher[0]])
        assert over.size_mb > value
    with pytest.raises(InfeasibleBudgetError, match="smallest achievable is"):
        uniform_select(omega, n_params, max_mb=1e-6)
    with pytest.raises(InfeasibleBudgetError, match="smallest achievable is"):
        random_select(omega, n_params, max_mb=1e-6)


# --------------------------------------------------------------------------------------------
# validation errors
# --------------------------------------------------------------------------------------------
def small():
    omega = pd.DataFrame({2: [4.0, 9.0, 3.0], 4: [1.0, 2.0, 1.0], 8: [0.0, 0.1, 0.2]},
                         index=["a", "b", "c"])
    return omega, {"a": 10, "b": 20, "c": 30}


@pytest.mark.parametrize("value, match", [
    (-1.0, r"omega\['b'\]\[4\] = -1.0; Ω must be finite and >= 0"),
    (np.nan, r"omega\['b'\]\[4\] = nan"),
    (np.inf, r"omega\['b'\]\[4\] = inf"),
])
def test_bad_omega_values(value, match):
    omega, n = small()
    omega.loc["b", 4] = value
    with pytest.raises(SearchError, match=match):
        pareto_frontier(omega, n)


def test_bad_omega_outside_candidates_is_ignored():
    omega, n = small()
    omega.loc["b", 2] = np.nan
    assert len(pareto_frontier(omega, n, bits=[4, 8])) > 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_params={"a": 10, "b": 20}), r"n_params layer names do not match.*missing \['c'\]"),
    (dict(n_params={"a": 10, "b": 20, "c": 30, "d": 1}), r"unknown \['d'\]"),
    (dict(n_params={"a": 10, "b": 0, "c": 30}), r"n_params\['b'\] = 0"),
    (dict(fixed={"zz": 8}), r"fixed names unknown layers \['zz'\]"),
    (dict(fixed={"a": 6}), r"fixed\['a'\] = 6 is not a candidate bit width"),
    (dict(tied=[["a", "zz"]]), r"tied\[0\] names unknown layer 'zz'"),
    (dict(tied=[["a", "b"], ["b", "c"]]), r"layer 'b' is in two tied groups"),
    (dict(tied=["ab"]), r"tied\[0\] = 'ab'"),
    (dict(tied=[["a", "b"]], fixed={"a": 8, "b": 2}), r"conflicting fixed bits"),
    (dict(bits=[]), r"bits is empty"),
    (dict(bits=[2, 5]), r"bits \[5\] are not columns of omega"),
    (dict(bits=[2.5, 4]), r"bits \[2.5, 4\] must be integers"),
    (dict(cost="latency"), r"cost='latency'"),
    (dict(cost="bops"), r"cost='bops' needs macs"),
    (dict(macs={"a": 1, "b": 2, "c": 3}), r"macs given but a_bits is None"),
    (dict(macs={"a": 1, "b": 2}, a_bits=4), r"macs layer names do not match.*missing \['c'\]"),
    (dict(other_params=-1), r"other_params = -1"),
])
def test_bad_arguments(kwargs, match):
    omega, n = small()
    n = kwargs.pop("n_params", n)
    with pytest.raises(SearchError, match=match):
        pareto_frontier(omega, n, **kwargs)


def test_bad_tables():
    omega, n = small()
    with pytest.raises(SearchError, match="omega is empty"):
        pareto_frontier(pd.DataFrame(), n)
    with pytest.raises(SearchError, match="column 'x' is not a bit width"):
        pareto_frontier(omega.rename(columns={2: "x"}), n)
    for b in (1, 16, 64):   # quantize_model would reject the configs later
        with pytest.raises(SearchError, match=rf"omega column {b} is not a supported bit width: "
                                              r"hmqat.quant.quantize_model takes \[2, 3, 4, 5, 6, "
                                              r"7, 8\]"):
            pareto_frontier(omega.rename(columns={8: b}), n)
    dup = pd.concat([omega, omega.iloc[:1]])
    with pytest.raises(SearchError, match=r"duplicate layer names \['a'\]"):
        pareto_frontier(dup, n)


def test_fixed_width_outside_bits_but_in_omega_is_allowed():
    omega, n = small()
    front = pareto_frontier(omega, n, bits=[2, 4], fixed={"a": 8})
    assert {cfg["a"] for cfg in front.points["config"]} == {8}
    assert {cfg["b"] for cfg in front.points["config"]} <= {2, 4}


def test_brute_force_refuses_large_tables():
    omega = pd.DataFrame(np.ones((12, 4)), index=[f"l{i}" for i in range(12)],
                         columns=[2, 3, 4, 8])
    n = {k: 1 for k in omega.index}
    with pytest.raises(SearchError, match=r"16,777,216 configs \(> max_configs=1,000,000\)"):
        brute_force_frontier(omega, n)


def test_huge_budgets_return_max_bits():
    omega, n = small()
    fns = [greedy_select, uniform_select, random_select]
    if importlib.util.find_spec("pulp") is not None:
        fns.append(ilp_select)
    for fn in fns:
        assert set(fn(omega, n, max_mb=1e12).config.values()) == {8}
    assert set(greedy_select(omega, n, min_compression=1e-9).config.values()) == {8}


# --------------------------------------------------------------------------------------------
# Problem: one object built once, every search a method
# --------------------------------------------------------------------------------------------
def test_problem_from_model_matches_model_inputs_and_the_function_api():
    from hmqat.models import create_model

    model = create_model("resnet20", pretrained=False)
    acct = search.model_inputs(model, a_bits=4, input_size=(1, 3, 32, 32))
    rng = np.random.default_rng(0)
    omega = pd.DataFrame({b: rng.random(len(acct["n_params"])) * 4.0 ** -b for b in (2, 4, 8)},
                         index=list(acct["n_params"]))
    prob = search.Problem.from_model(model, omega, (2, 4, 8), a_bits=4)
    kw = dict(macs=acct["macs"], a_bits=acct["a_bits"], fixed=acct["fixed"],
              other_params=acct["other_params"], fp32_params=acct["fp32_params"])
    assert prob.layers == list(acct["n_params"]) and prob.fixed == acct["fixed"]
    front = prob.frontier()
    ref = search.pareto_frontier(omega, acct["n_params"], (2, 4, 8), **kw)
    assert front.points["omega"].tolist() == ref.points["omega"].tolist()
    assert prob.frontier("bops").points["bops"].is_monotonic_increasing
    budget = float(front.points["size_mb"].iloc[len(front) // 2])
    for method, fn in [("greedy", search.greedy_select), ("uniform", search.uniform_select),
                       ("random", search.random_select)]:
        got = getattr(prob, method)(max_mb=budget)
        want = fn(omega, acct["n_params"], (2, 4, 8), max_mb=budget, **kw)
        assert got == want, method
        assert got.size_mb <= budget
    pick = search.select(front, max_mb=budget)
    assert prob.evaluate(pick["config"]).omega == pytest.approx(pick["omega"])
    assert len(prob.random_points(n=5, seed=1)) == 5


def test_problem_validates_before_any_search():
    omega = pd.DataFrame({2: [1.0, 2.0], 4: [0.5, 1.0]}, index=["a", "b"])
    with pytest.raises(search.SearchError, match=r"fixed\['a'\] = 3 is not a candidate"):
        search.Problem(omega, {"a": 10, "b": 20}, fixed={"a": 3})
    prob = search.Problem(omega, {"a": 10, "b": 20})
    with pytest.raises(search.SearchError, match="give exactly one budget"):
        prob.greedy()
    with pytest.raises(search.SearchError, match="n must be >= 1"):
        prob.random_points(n=0)


def test_select_at_size_is_within_one_percent_of_the_uniform_size():
    """The equal-size picker (docs/method.md §8): at uniform W3's and W2's size the pick lies
    within ±1 % of the target, and a target the frontier cannot reach that closely is refused."""
    omega, n_params, _ = resnet20_problem()
    front = pareto_frontier(omega, n_params)
    for b in (2, 3):
        uniform = search.evaluate_config({layer: b for layer in omega.index}, omega, n_params)
        row = search.select_at_size(front, uniform.size_mb)
        assert abs(row["size_mb"] / uniform.size_mb - 1) <= 0.01
        assert row["size_mb"] <= uniform.size_mb and row["omega"] <= uniform.omega
    smallest = float(front.points["size_mb"].iloc[0])
    with pytest.raises(search.InfeasibleBudgetError):
        search.select_at_size(front, smallest * 0.5)
    with pytest.raises(search.SearchError, match="positive"):
        search.select_at_size(front, float("nan"))
