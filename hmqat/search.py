"""Bit allocation: the exact Pareto frontier of (cost, ΣΩ) and the reference searches.

docs/design.md §3 "Search": minimise Σ_i Ω_i(b_i) subject to Σ_i n_i·b_i ≤ budget_bits (or a BOPs
budget). This is a multiple-choice knapsack with integer costs, so a dynamic program that merges
Pareto lists layer by layer, pruning dominated states, yields the *exact* set of non-dominated
configurations; every budget is then answered by a lookup (:func:`select`). The returned
:class:`Frontier` is lazy: it holds the frontier's costs and ΣΩ plus the DP's back-pointers, and
builds configs (one per :func:`select`, or the whole ``points`` table) only when asked.

    >>> import pandas as pd
    >>> from hmqat.search import pareto_frontier, select
    >>> omega = pd.DataFrame({2: [4.0, 9.0], 4: [1.0, 2.0], 8: [0.0, 0.1]}, index=["a", "b"])
    >>> front = pareto_frontier(omega, {"a": 100, "b": 300})
    >>> select(front, max_mb=0.0002)["config"]
    {'a': 4, 'b': 4}

Accounting (HAWQ-V3, docs/design.md §3 "Size, compression, BOPs"):

* ``size_bytes = Σ_i n_i·b_i/8 + 4·other_params``; ``MB = 2**20`` bytes.
* ``compression = fp32_mb / size_mb`` with ``fp32_mb = 4·fp32_params / 2**20``. ``fp32_params``
  is the parameter count of the FP32 model (weights + biases + BN, *without* quantizer steps).
  ``other_params`` (hmqat.quant's convention) *does* include the quantizer step sizes, so the
  default ``fp32_params = Σ n_i + other_params`` over-counts FP32 by the steps (a few hundred
  parameters); pass ``fp32_params`` (e.g. ``sum(p.numel() for p in fp32_model.parameters())``)
  for the exact ratio.
* ``BOPs = Σ_i MACs_i · b_i · a_bits_i`` (``a_bits`` an int or a per-layer dict, e.g. 8 for the
  first layer's input under the first_last_8 policy).

References for checking and ablations: :func:`brute_force_frontier`, :func:`ilp_select`
(HAWQ-V3 ILP with PuLP/CBC), :func:`greedy_select`, :func:`random_select`,
:func:`uniform_select`; :func:`evaluate_config` scores any config.
"""
from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd

from .models import quantizable_layers
from .quant import SUPPORTED_BITS, act_bits_config, fixed_layers, quantizer_steps

__all__ = [
    "SearchError",
    "InfeasibleBudgetError",
    "Frontier",
    "Allocation",
    "Problem",
    "pareto_frontier",
    "select",
    "select_at_size",
    "evaluate_config",
    "brute_force_frontier",
    "ilp_select",
    "greedy_select",
    "random_select",
    "uniform_select",
]

MB = 2 ** 20
BRUTE_FORCE_LIMIT = 1_000_000


class SearchError(ValueError):
    """Bad input to the bit-allocation search (the message names the key and the fix)."""


class InfeasibleBudgetError(SearchError):
    """No allowed configuration meets the budget; the message states the smallest achievable."""


# --------------------------------------------------------------------------------------------
# Problem preparation and validation
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Unit:
    """A super-layer of the DP: one free layer, a fixed layer or a tied group (docs/design.md §3)."""

    members: np.ndarray      # layer indices (int)
    bits: np.ndarray         # allowed bit widths, ascending (int)
    cost: np.ndarray         # Σ_{i∈unit} c_i·b for each allowed b (int64)
    omega: np.ndarray        # Σ_{i∈unit} Ω_i(b) for each allowed b (float64)


@dataclass(frozen=True)
class _Problem:
    """Validated search problem: per-layer tables and the unit decomposition."""

    layers: list[str]
    bits: tuple[int, ...]                 # candidate bits for free layers
    columns: tuple[int, ...]              # every bit with an Ω column
    omega: np.ndarray                     # [L, len(columns)] float64
    n_params: np.ndarray                  # [L] int64
    bops_coef: np.ndarray | None          # [L] int64: MACs_i · a_bits_i, or None
    cost: str                             # "size" | "bops"
    fixed: dict[str, int]
    tied: list[list[str]]
    units: list[_Unit]
    other_params: int
    fp32_params: int
    unit_of: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    """[L] index of each layer's unit (see :func:`_unit_tables`)."""
    unit_bits: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.int64))
    """[units, max options] bit width of each unit option (padded by repeating the last)."""

    @property
    def cost_coef(self) -> np.ndarray:
        """c_i with cost_int = Σ_i c_i·b_i: n_i (bits of weights) or MACs_i·a_bits_i."""
        coef = self.n_params if self.cost == "size" else self.bops_coef
        assert coef is not None  # _prepare requires macs for cost="bops"
        return coef

    @property
    def fp32_mb(self) -> float:
        """FP32 model size in MB: 4·fp32_params / 2^20."""
        return 4.0 * self.fp32_params / MB

    def col(self, b: int) -> int:
        return self.columns.index(b)


def _omega_table(omega: pd.DataFrame | Mapping[str, Mapping[int, float]]
                 ) -> tuple[list[str], tuple[int, ...], np.ndarray]:
    """Ω table as (layer names, ascending int bit columns, [L, columns] float64 values); accepts a
    DataFrame, a dict-of-dicts and CSV str column labels. Plain numpy after the label checks
    (pandas reindexing was a large part of a ResNet-50 search call). Columns must be widths
    :func:`hmqat.quant.quantize_model` accepts (``hmqat.quant.SUPPORTED_BITS``)."""
    if isinstance(omega, Mapping):
        omega = pd.DataFrame.from_dict({k: dict(v) for k, v in omega.items()}, orient="index")
    if not isinstance(omega, pd.DataFrame):
        raise SearchError(f"omega must be a pandas DataFrame (index=layer, columns=bits) or a "
                          f"dict {{layer: {{bits: Ω}}}}, got {type(omega).__name__}")
    if omega.empty:
        raise SearchError("omega is empty: it needs one row per layer and one column per "
                          "candidate bit width")
    cols = []
    for c in omega.columns:
        try:
            b = int(c)
        except (TypeError, ValueError):
            raise SearchError(f"omega column {c!r} is not a bit width; columns must be ints "
                              f"such as 2, 4, 8") from None
        if b != float(c) or b not in SUPPORTED_BITS:
            raise SearchError(f"omega column {c!r} is not a supported bit width: "
                              f"hmqat.quant.quantize_model takes {list(SUPPORTED_BITS)}; drop "
                              f"the column or recompute Ω for supported widths")
        cols.append(b)
    if len(set(cols)) != len(cols):
        raise SearchError(f"omega has duplicate bit columns {cols}")
    dup = omega.index[omega.index.duplicated()].tolist()
    if dup:
        raise SearchError(f"omega has duplicate layer names {dup}; one row per layer")
    try:
        values = omega.to_numpy(dtype=np.float64, na_value=np.nan)
    except (TypeError, ValueError) as exc:
        raise SearchError(f"omega values must be numbers: {exc}") from None
    order = sorted(range(len(cols)), key=cols.__getitem__)
    return ([str(i) for i in omega.index], tuple(cols[k] for k in order),
            np.ascontiguousarray(values[:, order]))


def _check_names(what: str, keys: Iterable[str], layers: Sequence[str]) -> None:
    """Raise if ``keys`` is not exactly the set of ``layers``, naming missing and extra keys."""
    keys = list(keys)
    key_set, layer_set = set(keys), set(layers)
    missing = [k for k in layers if k not in key_set]
    extra = [k for k in keys if k not in layer_set]
    if missing or extra:
        raise SearchError(f"{what} layer names do not match omega's index: missing {missing}, "
                          f"unknown {extra}. Give one entry per row of omega, same names.")


def _int_map(what: str, values: Mapping[str, Any], layers: Sequence[str],
             minimum: int) -> np.ndarray:
    """Per-layer non-negative integers in layer order, with name and value checks."""
    if not isinstance(values, Mapping):
        raise SearchError(f"{what} must be a dict {{layer: int}}, got {type(values).__name__}")
    _check_names(what, values.keys(), layers)
    out = np.empty(len(layers), dtype=np.int64)
    for j, name in enumerate(layers):
        v = values[name]
        if isinstance(v, (bool, np.bool_)) or not float(v).is_integer() or int(v) < minimum:
            raise SearchError(f"{what}[{name!r}] = {v!r}; it must be an integer >= {minimum}")
        out[j] = int(v)
    return out


def _prepare(omega, n_params, bits, *, cost="size", macs=None, a_bits=None, fixed=None,
             tied=None, other_params=0, fp32_params=None) -> _Problem:
    """Validate every input and build the unit decomposition (tied groups = super-layers)."""
    layers, columns, table = _omega_table(omega)
    layer_set = set(layers)
    if cost not in ("size", "bops"):
        raise SearchError(f"cost={cost!r}; choose 'size' (Σ n_i·b_i) or 'bops' "
                          f"(Σ MACs_i·b_i·a_bits_i)")
    n = _int_map("n_params", n_params, layers, minimum=1)

    if bits is None:
        cand = columns
    else:
        cand = tuple(sorted({int(b) for b in bits}))
        if any(float(b) != int(b) for b in bits):
            raise SearchError(f"bits {list(bits)} must be integers such as 2, 4, 8")
        if not cand:
            raise SearchError("bits is empty; give at least one candidate bit width, e.g. "
                              "bits=(2, 4, 8), or None for every omega column")
        bad = [b for b in cand if b not in columns]
        if bad:
            raise SearchError(f"bits {bad} are not columns of omega {list(columns)}; compute Ω "
                              f"for them or drop them from bits")

    fixed = dict(fixed or {})
    unknown = [k for k in fixed if k not in layer_set]
    if unknown:
        raise SearchError(f"fixed names unknown layers {unknown}; known layers: {layers}")
    for k, b in fixed.items():
        if b not in columns:
            raise SearchError(f"fixed[{k!r}] = {b!r} is not a candidate bit width: omega has no "
                              f"column {b!r} (columns {list(columns)}); add it or pin another")

    tied = list(tied or [])
    owner: dict[str, int] = {}
    for gi, group in enumerate(tied):
        if isinstance(group, str) or not isinstance(group, Iterable) or not list(group):
            raise SearchError(f"tied[{gi}] = {group!r}; each tied group is a non-empty list of "
                              f"layer names, e.g. tied=[['layer1.0.conv2', "
                              f"'layer1.0.downsample.0']]")
        for name in group:
            if name not in layer_set:
                raise SearchError(f"tied[{gi}] names unknown layer {name!r}; known layers: "
                                  f"{layers}")
            if name in owner:
                raise SearchError(f"layer {name!r} is in two tied groups (tied[{owner[name]}] "
                                  f"and tied[{gi}]); merge those groups into one")
            owner[name] = gi
    tied = [list(g) for g in tied]

    # Ω values used by the search: candidate columns for free layers, the pinned column otherwise
    used = set(cand) | set(fixed.values())
    used_cols = [j for j, c in enumerate(columns) if c in used]
    vals = table[:, used_cols]
    bad = ~np.isfinite(vals) | (vals < 0)
    if bad.any():
        r, c = map(int, np.argwhere(bad)[0])
        raise SearchError(f"omega[{layers[r]!r}][{columns[used_cols[c]]}] = "
                          f"{float(vals[r, c])!r}; "
                          f"Ω must be finite and >= 0 (fix or recompute the sensitivity table)")

    bops_coef = None
    if macs is not None:
        m = _int_map("macs", macs, layers, minimum=0)
        if a_bits is None:
            raise SearchError("macs given but a_bits is None; pass a_bits (int, e.g. 4, or "
                              "{layer: bits}) so BOPs = Σ MACs_i·b_i·a_bits_i can be computed")
        if isinstance(a_bits, Mapping):
            a = _int_map("a_bits", a_bits, layers, minimum=1)
        else:
            if not float(a_bits).is_integer() or int(a_bits) < 1:
                raise SearchError(f"a_bits = {a_bits!r}; it must be a positive int or a dict")
            a = np.full(len(layers), int(a_bits), dtype=np.int64)
        bops_coef = m * a
    if cost == "bops" and bops_coef is None:
        raise SearchError("cost='bops' needs macs={layer: MACs} (hmqat.models.quantizable_layers"
                          " gives them) and a_bits")
    if int(other_params) < 0:
        raise SearchError(f"other_params = {other_params!r}; it must be >= 0")
    fp32 = int(n.sum()) + int(other_params) if fp32_params is None else int(fp32_params)
    if fp32 <= 0:
        raise SearchError(f"fp32_params = {fp32_params!r}; it must be > 0")

    problem = _Problem(layers, cand, columns, table, n, bops_coef, cost, fixed, tied,
                       [], int(other_params), fp32)
    units = _units(problem)
    unit_of, unit_bits = _unit_tables(units, len(layers))
    return replace(problem, units=units, unit_of=unit_of, unit_bits=unit_bits)


def _units(p: _Problem) -> list[_Unit]:
    """Split layers into DP units in forward order: tied groups become one super-layer whose Ω and
    cost are member sums; fixed layers (or groups holding one) get a single allowed width.

    Free single layers (the common case) slice one precomputed [L, bits] Ω/cost table instead of
    indexing per layer (the search's validation cost on ResNet-50 was mostly this loop)."""
    index = {name: j for j, name in enumerate(p.layers)}
    group_of = {name: gi for gi, g in enumerate(p.tied) for name in g}
    coef = p.cost_coef
    free_bits = np.array(p.bits, dtype=np.int64)
    free_omega = p.omega[:, [p.col(b) for b in p.bits]]            # [L, len(bits)]
    free_cost = coef[:, None] * free_bits[None, :]                 # [L, len(bits)] int64
    units, done = [], set()
    for name in p.layers:
        if name in done:
            continue
        if name not in group_of and name not in p.fixed:            # free single layer
            j = index[name]
            done.add(name)
            units.append(_Unit(np.array([j], dtype=np.int64), free_bits, free_cost[j],
                               free_omega[j]))
            continue
        members = p.tied[group_of[name]] if name in group_of else [name]
        done.update(members)
        pinned = {p.fixed[m] for m in members if m in p.fixed}
        if len(pinned) > 1:
            raise SearchError(f"tied group {members} has conflicting fixed bits "
                              f"{ {m: p.fixed[m] for m in members if m in p.fixed} }; "
                              f"pin them to one width")
        allowed = np.array(sorted(pinned) if pinned else p.bits, dtype=np.int64)
        idx = np.array([index[m] for m in members], dtype=np.int64)
        cols = [p.col(int(b)) for b in allowed]
        omega = p.omega[np.ix_(idx, cols)].sum(axis=0)
        cost = int(coef[idx].sum()) * allowed
        units.append(_Unit(idx, allowed, cost.astype(np.int64), omega.astype(np.float64)))
    return units


def _unit_tables(units: Sequence[_Unit], n_layers: int) -> tuple[np.ndarray, np.ndarray]:
    """Lookup tables that turn unit option indices into per-layer bits in one gather:
    ``unit_of[l]`` = the unit holding layer l, ``unit_bits[u, k]`` = bits of option k of unit u
    (rows padded with their last width). Bits of a pick vector: ``unit_bits[unit_of,
    picks[unit_of]]``."""
    unit_of = np.empty(n_layers, dtype=np.int64)
    width = max(len(u.bits) for u in units)
    unit_bits = np.empty((len(units), width), dtype=np.int64)
    for k, u in enumerate(units):
        unit_of[u.members] = k
        unit_bits[k, :len(u.bits)] = u.bits
        unit_bits[k, len(u.bits):] = u.bits[-1]
    return unit_of, unit_bits


# --------------------------------------------------------------------------------------------
# Frontier and accounting
# --------------------------------------------------------------------------------------------
class Frontier:
    """The exact Pareto frontier of (cost_int, ΣΩ) (docs/design.md §3 "Search").

    ``points``: one row per non-dominated configuration, sorted by ``cost_int`` ascending (Ω then
    strictly decreases), with columns ``cost_int`` (Σ n_i·b_i bits, or BOPs), ``size_mb``,
    ``compression``, ``bops`` (only when MACs were given), ``omega`` (ΣΩ), ``avg_bits``
    (Σ n_i·b_i / Σ n_i) and ``config`` ({layer: bits}, layers in omega's order).

    The object is lazy: the search stores only the frontier's ``cost_int`` and ``omega`` arrays
    (ascending cost; read-only) and the DP's back-pointers (:class:`_Plan`). ``points`` (every
    config back-tracked plus one dict per point: ~100 ms for ResNet-50's 21k points, ~20x the
    DP) and ``bits_matrix`` are built on first access and cached; ``len()``, :func:`select`,
    :meth:`row`, :meth:`config` and :meth:`n_within` never build them.
    ``search_ms``: wall time of the search in ms (time.perf_counter): the DP (grouping, merges;
    configs are back-tracked lazily), or the enumeration for :func:`brute_force_frontier`.
    """

    def __init__(self, problem: _Problem, cost_int: np.ndarray, omega: np.ndarray,
                 search_ms: float, method: str, *, plan: _Plan | None = None,
                 bits_matrix: np.ndarray | None = None) -> None:
        if (plan is None) == (bits_matrix is None):
            raise ValueError("Frontier needs exactly one of plan= (DP back-pointers) or "
                             "bits_matrix= ([N, layers] bits)")
        self._problem = problem
        self._plan = plan
        self.cost_int = _readonly(np.asarray(cost_int, dtype=np.int64))
        self.omega = _readonly(np.asarray(omega, dtype=np.float64))
        self.search_ms = float(search_ms)
        self.layers = list(problem.layers)
        self.bits = problem.bits
        self.cost = problem.cost
        self.fixed = dict(problem.fixed)
        self.tied = [list(g) for g in problem.tied]
        self.other_params = problem.other_params
        self.fp32_params = problem.fp32_params
        self.method = method
        if bits_matrix is not None:      # fill the cache of the property below
            self.__dict__["bits_matrix"] = _readonly(np.asarray(bits_matrix, dtype=np.int64))

    @property
    def fp32_mb(self) -> float:
        """FP32 model size in MB: 4·fp32_params / 2^20."""
        return 4.0 * self.fp32_params / MB

    @cached_property
    def bits_matrix(self) -> np.ndarray:
        """[N, layers] bit widths of every frontier point (all points back-tracked at once)."""
        assert self._plan is not None
        picks = _unit_picks(self._plan, np.arange(len(self)))
        return _readonly(_bits_matrix(self._problem, picks))

    @cached_property
    def points(self) -> pd.DataFrame:
        """The frontier table (see the class doc), built on first access and cached."""
        pts = _frame(self._problem, self.bits_matrix, self.omega)
        # the DP's cost must equal the accounting's (guards the unit decomposition)
        assert np.array_equal(pts["cost_int"].to_numpy(), self.cost_int)
        return pts

    def bits_row(self, i: int) -> np.ndarray:
        """[layers] bit widths of point ``i`` (one back-track, O(units))."""
        i = _point_index(i, len(self))
        if "bits_matrix" in self.__dict__ or self._plan is None:
            return self.bits_matrix[i]
        p = self._problem
        picks = np.array(_unit_picks_one(self._plan, i), dtype=np.int64)
        return p.unit_bits[p.unit_of, picks[p.unit_of]]

    def config(self, i: int) -> dict[str, int]:
        """{layer: bits} of point ``i``, layers in omega's order."""
        return dict(zip(self.layers, self.bits_row(i).tolist()))

    def row(self, i: int) -> pd.Series:
        """Point ``i`` as a ``points`` row: same index, values, scalar types and name as
        ``points.iloc[i]``, computed from one back-tracked config without building ``points``."""
        i = _point_index(i, len(self))
        if "points" in self.__dict__:
            return self.points.iloc[i]
        bits = self.bits_row(i)
        acc = _accounting(self._problem, bits)        # 1-D bits: numpy scalars
        assert acc["cost_int"] == self.cost_int[i]    # guards the unit decomposition
        values = [acc["cost_int"], acc["size_mb"], acc["compression"]]
        if "bops" in acc:
            values.append(acc["bops"])
        values += [self.omega[i], acc["avg_bits"], None]
        data = np.array(values, dtype=object)
        data[-1] = dict(zip(self.layers, bits.tolist()))
        return pd.Series(data, index=self._columns, name=i, copy=False)

    @cached_property
    def _columns(self) -> pd.Index:
        """Column names of ``points`` (``bops`` only when MACs were given)."""
        bops = ["bops"] if self._problem.bops_coef is not None else []
        return pd.Index(["cost_int", "size_mb", "compression", *bops, "omega", "avg_bits",
                         "config"])

    @cached_property
    def _size_mb(self) -> np.ndarray:
        """size_mb of every point from cost_int (cost="size": cost_int = Σ n_i·b_i), with the
        same float operations as :func:`_accounting`, so it equals ``points["size_mb"]``."""
        return (self.cost_int / 8.0 + 4.0 * self.other_params) / MB

    @cached_property
    def _compression_ascending(self) -> np.ndarray:
        """compression of every point, reversed so it ascends (it falls as cost rises)."""
        return (self.fp32_mb / self._size_mb)[::-1]

    @cached_property
    def _cost_float(self) -> np.ndarray:
        """cost_int as float64: what numpy compares a float budget against."""
        return self.cost_int.astype(np.float64)

    def n_within(self, kind: str, value: float) -> int:
        """How many points meet the budget (``kind`` as in :func:`select`): the feasible points
        are a prefix (cost_int ascends; size_mb, BOPs and 1/compression are monotone in it,
        including their float rounding), found by binary search in O(log n). Equals
        ``_fits(kind, value, ...)`` counted over ``points`` (the frontier's cost must match the
        budget's kind: :func:`_budget` checks that)."""
        if kind == "max_mb":
            return int(np.searchsorted(self._size_mb, value, side="right"))
        if kind == "min_compression":
            asc = self._compression_ascending
            return len(asc) - int(np.searchsorted(asc, value, side="left"))
        return int(np.searchsorted(self._cost_float, value, side="right"))

    def configs(self) -> list[dict[str, int]]:
        """The frontier's bit configs, cheapest first."""
        return list(self.points["config"])

    def to_frame(self) -> pd.DataFrame:
        """Flat table for CSV/Markdown: the numeric columns plus one bits column per layer."""
        num = self.points.drop(columns="config")
        per_layer = pd.DataFrame(self.bits_matrix, index=self.points.index, columns=self.layers)
        return pd.concat([num, per_layer], axis=1)

    def __len__(self) -> int:
        return len(self.cost_int)

    def __repr__(self) -> str:
        return (f"Frontier({len(self)} points, cost={self.cost!r}, layers={len(self.layers)}, "
                f"method={self.method!r}, search_ms={self.search_ms:.3g})")


def _readonly(a: np.ndarray) -> np.ndarray:
    """``a`` flagged read-only (the frontier caches views of it)."""
    a.flags.writeable = False
    return a


def _point_index(i: int, n: int) -> int:
    """Frontier point index ``i`` (negative counts from the end) checked against ``n`` points."""
    if not -n <= int(i) < n:
        raise IndexError(f"frontier point {i} out of range for {n} points")
    return int(i) % n


@dataclass(frozen=True)
class Allocation:
    """One bit configuration and its accounting (same fields as a Frontier row)."""

    config: dict[str, int]
    cost_int: int
    size_mb: float
    compression: float
    bops: int | None
    omega: float
    avg_bits: float
    method: str


def _accounting(p: _Problem, bits_mat: np.ndarray) -> dict[str, np.ndarray]:
    """Size/compression/BOPs/avg-bits columns for configs given as a [N, L] bit matrix, or
    numpy scalars (the same float operations) for one [L] config
    (docs/design.md §3: size_bytes = Σ n_i b_i/8 + 4·other, MB = 2^20, BOPs = Σ MACs_i b_i a_i)."""
    wbits = bits_mat @ p.n_params
    size_mb = (wbits / 8.0 + 4.0 * p.other_params) / MB
    out = {"size_mb": size_mb, "compression": p.fp32_mb / size_mb,
           "avg_bits": wbits / float(p.n_params.sum())}
    if p.bops_coef is not None:
        out["bops"] = bits_mat @ p.bops_coef
    out["cost_int"] = wbits if p.cost == "size" else out["bops"]
    return out


def _omega_of(p: _Problem, bits_mat: np.ndarray) -> np.ndarray:
    """ΣΩ_i(b_i) of each config row, summed in layer order."""
    col = {b: j for j, b in enumerate(p.columns)}
    cols = np.vectorize(col.__getitem__, otypes=[np.int64])(bits_mat)
    return p.omega[np.arange(len(p.layers))[None, :], cols].sum(axis=1)


def _frame(p: _Problem, bits_mat: np.ndarray, omega: np.ndarray) -> pd.DataFrame:
    """The ``points`` DataFrame of a set of configs given as a bit matrix."""
    acc = _accounting(p, bits_mat)
    cols = {"cost_int": acc["cost_int"].astype(np.int64), "size_mb": acc["size_mb"],
            "compression": acc["compression"]}
    if "bops" in acc:
        cols["bops"] = acc["bops"].astype(np.int64)
    cols.update(omega=omega, avg_bits=acc["avg_bits"],
                config=[dict(zip(p.layers, row)) for row in bits_mat.tolist()])
    return pd.DataFrame(cols)


#: A DP merge with fewer candidates than this skips the bucket pre-filter (its fixed cost of a
#: few numpy calls outweighs sorting so few candidates).
_FILTER_MIN_CANDIDATES = 4096
#: Pre-filter buckets per parent state: finer buckets prune closer to the exact Pareto set but
#: cost a longer running minimum (0.5 to 2 gave the same ResNet-50 time within noise).
_BUCKETS_PER_STATE = 1


@dataclass(frozen=True)
class _Trace:
    """Back-pointers of one Pareto DP (docs/design.md §3 "Search"), enough to rebuild the choices of
    any final state on demand (O(items) for one state) instead of an [N, items] matrix.

    Step t merged item ``order[t]`` into ``n_parents[t]`` states; kept state i of that step came
    from flat candidate ``src[t][i] = k·n_parents[t] + j``: option k of the item on parent j."""

    order: tuple[int, ...]
    src: tuple[np.ndarray, ...]
    n_parents: tuple[int, ...]


@dataclass(frozen=True)
class _Block:
    """An item of the top-level DP: one unit, or a group of units whose options cost exactly the
    same (e.g. ResNet's repeated same-shape convs), pre-merged into the group's own Pareto
    frontier. The group frontier has at most one option per distinct cost sum (≤ m·(b_max −
    b_min) + 1 for m units, vs K^m configs), so the top-level DP makes fewer, cheaper steps
    (ResNet-50, size: 54 units → 15 blocks, 0.64 M → 0.45 M candidates). Exact: a frontier
    point's restriction to any group is a point of the group's frontier (else swapping it would
    dominate the whole config)."""

    cost: np.ndarray               # ascending option costs (int64)
    omega: np.ndarray              # option Ωs
    units: tuple[int, ...]         # the unit indices it covers
    trace: _Trace | None = None    # group: the DP over ``units`` (option = its final state)


@dataclass(frozen=True)
class _Plan:
    """Everything needed to back-track configs: the blocks and the top-level DP's trace."""

    blocks: tuple[_Block, ...]
    trace: _Trace
    n_units: int


def _blocks(units: Sequence[_Unit]) -> list[_Block]:
    """Group units with identical option-cost vectors into pre-merged blocks (:class:`_Block`),
    each group's members in forward order; blocks in order of their first unit."""
    by_cost: dict[tuple[int, ...], list[int]] = {}
    for k, u in enumerate(units):
        by_cost.setdefault(tuple(u.cost.tolist()), []).append(k)
    blocks = []
    for members in by_cost.values():
        if len(members) == 1:
            u = units[members[0]]
            blocks.append(_Block(u.cost, u.omega, (members[0],)))
        else:
            cost, omega, trace = _dp([units[k] for k in members])
            blocks.append(_Block(cost, omega, tuple(members), trace))
    return blocks


def _dp_order(items: Sequence[_Unit | _Block]) -> list[int]:
    """Order in which :func:`_dp` merges items: single-option items (fixed layers) first, as
    they only shift every state, then by cost span c_max − c_min, widest first.

    The Pareto set does not depend on the order, but the intermediate ones do: on ResNet-50
    (size cost, first/last fixed, units) this order makes 2.4x fewer DP candidates than forward
    order (0.64 M vs 1.53 M), because the wide layers are combined while the state lists are
    short and the fine, narrow ones come last. Ω is summed in this order (the DP's ΣΩ can
    differ from a forward-order sum in the last bits, which only matters between configs tied
    to rounding)."""
    return sorted(range(len(items)), key=lambda k: (items[k].cost.size > 1,
                                                    -int(items[k].cost[-1] - items[k].cost[0]),
                                                    k))


def _pareto_keep(cost: np.ndarray, omega: np.ndarray, order: np.ndarray | None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The non-dominated states among candidates (docs/design.md §3 "Search"): their indices into
    ``cost``/``omega``, costs and Ωs, ascending in cost. ``order`` lists the candidates to
    consider sorted by cost (stably); None means all of them, already in cost order.

    In that order keep a state iff its Ω is strictly below every earlier state's, then keep the
    last kept state of each equal-cost run (it has that cost's minimum Ω; ties in Ω keep the
    first in sorted order)."""
    w = omega if order is None else omega[order]
    if w.size == 0:
        return np.zeros(0, dtype=np.int64), cost[:0], omega[:0]
    run_min = np.minimum.accumulate(w)
    keep = np.empty(w.size, dtype=bool)
    keep[0] = True
    np.less(w[1:], run_min[:-1], out=keep[1:])
    pos = np.flatnonzero(keep)
    idx = pos if order is None else order[pos]
    c = cost[idx]
    tie = c[1:] == c[:-1]
    if tie.any():      # equal costs among the kept (common with same-size layers)
        last = np.append(~tie, True)
        pos, idx, c = pos[last], idx[last], c[last]
    return idx, c, w[pos]


def _bucket_filter(cost: np.ndarray, omega: np.ndarray, max_cost: int,
                   n_buckets: int) -> np.ndarray:
    """Ascending indices of the candidates that may be Pareto-optimal; the others are dominated
    by a strictly cheaper candidate, so dropping them leaves :func:`_pareto_keep` unchanged
    (docs/design.md §3 "Search"). ``cost`` >= 0 with maximum ``max_cost``.

    Costs fall into ~``n_buckets`` power-of-two buckets g = cost >> shift; ``bound[g]`` = min Ω
    over buckets < g, whose candidates all cost strictly less than any in bucket g. A candidate
    with Ω >= bound[g] is therefore not kept (it is not strictly below the running minimum);
    removing it changes no running minimum (a cheaper, no-worse Ω precedes it) and no
    equal-cost run's minimum, and the survivors keep their relative (stable) order. One
    scatter-min, one running min over the buckets and one gather: O(candidates), no sort."""
    shift = max(0, int(max_cost).bit_length() - max(1, n_buckets).bit_length())
    bucket = cost >> shift
    n = (int(max_cost) >> shift) + 1
    best = np.full(n, np.inf)
    np.minimum.at(best, bucket, omega)
    bound = np.empty(n)
    bound[0] = np.inf
    np.minimum.accumulate(best[:-1], out=bound[1:])
    return np.flatnonzero(omega < bound[bucket])


def _merge_unit(cost: np.ndarray, omega: np.ndarray, step: np.ndarray, unit_omega: np.ndarray,
                use_filter: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One DP step: Pareto states (``cost`` ascending from 0, ``omega``) ⊕ an item's options
    (``step`` = option cost − cheapest option cost, ascending; ``unit_omega``).

    The K options give K shifted copies of the state list, laid out option-major (flat index
    k·S + j). Returns the next states' costs, Ωs and flat source indices. With K = 1 the copy is
    already sorted; otherwise the bucket pre-filter (:func:`_bucket_filter`) drops most
    dominated candidates before a stable sort (timsort merges the K sorted runs)."""
    cand_c = np.add.outer(step, cost).ravel()
    cand_w = np.add.outer(unit_omega, omega).ravel()
    if step.size == 1:
        order = None
    elif use_filter and cand_c.size >= _FILTER_MIN_CANDIDATES:
        idx = _bucket_filter(cand_c, cand_w, int(step[-1] + cost[-1]),
                             int(cost.size * _BUCKETS_PER_STATE))
        order = idx[np.argsort(cand_c[idx], kind="stable")]
    else:
        order = np.argsort(cand_c, kind="stable")
    src, new_cost, new_omega = _pareto_keep(cand_c, cand_w, order)
    return new_cost, new_omega, src


def _dp(items: Sequence[_Unit | _Block], order: Sequence[int] | None = None,
        use_filter: bool = True) -> tuple[np.ndarray, np.ndarray, _Trace]:
    """Exact Pareto DP over items with ascending option costs ``cost`` and Ωs ``omega`` (units
    or blocks; multiple-choice knapsack, docs/design.md §3 "Search").

    State list = (cost, Ω) pairs sorted by cost with strictly decreasing Ω. Items are merged in
    ``order`` (default: forward) by :func:`_merge_unit`; costs are kept relative to the cheapest
    state (each item contributes its cheapest option's cost to a base added back at the end),
    which changes no comparison. Returns the final costs, Ωs and the back-pointers
    (:func:`_backtrack`). ``use_filter=False`` gives the plain sort-and-prune DP (same result)."""
    order = list(range(len(items))) if order is None else [int(k) for k in order]
    cost = np.zeros(1, dtype=np.int64)
    omega = np.zeros(1, dtype=np.float64)
    base = 0
    src, n_parents = [], []
    for k in order:
        item = items[k]
        base += int(item.cost[0])
        n_parents.append(int(cost.size))
        cost, omega, kept = _merge_unit(cost, omega, item.cost - item.cost[0], item.omega,
                                        use_filter)
        src.append(kept)
    return cost + base, omega, _Trace(tuple(order), tuple(src), tuple(n_parents))


def _backtrack(trace: _Trace, n_items: int, states: np.ndarray) -> np.ndarray:
    """[N, items] chosen option index of each DP item for final ``states`` (vectorised)."""
    picks = np.empty((len(states), n_items), dtype=np.int64)
    state = np.asarray(states, dtype=np.int64)
    for t in range(len(trace.order) - 1, -1, -1):
        picks[:, trace.order[t]], state = np.divmod(trace.src[t][state], trace.n_parents[t])
    return picks


def _backtrack_one(trace: _Trace, n_items: int, state: int) -> list[int]:
    """Chosen option index of each DP item for one final state (Python ints, O(items))."""
    picks = [0] * n_items
    for t in range(len(trace.order) - 1, -1, -1):
        picks[trace.order[t]], state = divmod(trace.src[t].item(state), trace.n_parents[t])
    return picks


def _search(units: Sequence[_Unit]) -> tuple[np.ndarray, np.ndarray, _Plan]:
    """The frontier's costs and Ωs (ascending cost) and its back-pointers: units grouped into
    blocks (:func:`_blocks`), blocks merged in :func:`_dp_order` by :func:`_dp`."""
    blocks = _blocks(units)
    cost, omega, trace = _dp(blocks, _dp_order(blocks))
    return cost, omega, _Plan(tuple(blocks), trace, len(units))


def _unit_picks(plan: _Plan, states: np.ndarray) -> np.ndarray:
    """[N, units] chosen option index of every unit for final ``states`` (vectorised)."""
    block_picks = _backtrack(plan.trace, len(plan.blocks), states)
    picks = np.empty((len(block_picks), plan.n_units), dtype=np.int64)
    for b, block in enumerate(plan.blocks):
        if block.trace is None:
            picks[:, block.units[0]] = block_picks[:, b]
        else:
            picks[:, list(block.units)] = _backtrack(block.trace, len(block.units),
                                                     block_picks[:, b])
    return picks


def _unit_picks_one(plan: _Plan, state: int) -> list[int]:
    """Chosen option index of every unit for one final state (Python ints, O(units))."""
    picks = [0] * plan.n_units
    for block, pick in zip(plan.blocks, _backtrack_one(plan.trace, len(plan.blocks), state)):
        if block.trace is None:
            picks[block.units[0]] = pick
        else:
            for unit, sub in zip(block.units, _backtrack_one(block.trace, len(block.units),
                                                             pick)):
                picks[unit] = sub
    return picks


def _bits_matrix(p: _Problem, picks: np.ndarray) -> np.ndarray:
    """[N, L] bit widths from [N, units] option indices (one gather via :func:`_unit_tables`)."""
    picks = np.asarray(picks, dtype=np.int64)
    return p.unit_bits[p.unit_of[None, :], picks[:, p.unit_of]]


def pareto_frontier(omega: pd.DataFrame | Mapping[str, Mapping[int, float]],
                    n_params: Mapping[str, int], bits: Iterable[int] | None = None, *,
                    cost: str = "size", macs: Mapping[str, int] | None = None,
                    a_bits: int | Mapping[str, int] | None = None,
                    fixed: Mapping[str, int] | None = None,
                    tied: Sequence[Sequence[str]] | None = None, other_params: int = 0,
                    fp32_params: int | None = None) -> Frontier:
    """Exact Pareto frontier of (cost, Σ_i Ω_i(b_i)) over all allowed bit configs (docs/design.md §3).

    Args:
        omega: Ω_i(b) >= 0, DataFrame index=layer (forward order), columns=bits; or a
            dict {layer: {bits: Ω}}.
        n_params: {layer: weight count n_i}.
        bits: candidate widths for free layers (default: every omega column).
        cost: "size" (cost_int = Σ n_i·b_i bits) or "bops" (Σ MACs_i·b_i·a_bits_i).
        macs, a_bits: per-layer MACs and activation bits (int or {layer: int}); needed for
            cost="bops", and add a ``bops`` column otherwise.
        fixed: {layer: bits} pinned layers (e.g. first conv / last linear at 8); the width must
            be an omega column but need not be in ``bits``.
        tied: groups of layers forced to one width (each group is a DP super-layer); a group
            holding a fixed layer is pinned to that layer's width.
        other_params: FP32 parameters that are not quantized weights (see module doc).
        fp32_params: parameter count of the FP32 model, for ``compression`` (default
            Σ n_i + other_params).

    Returns a lazy :class:`Frontier`: the call costs validation plus the DP; configs and the
    ``points`` table are built when first used.
    """
    return Problem(omega, n_params, bits, macs=macs, a_bits=a_bits, fixed=fixed, tied=tied,
                   other_params=other_params, fp32_params=fp32_params).frontier(cost)


# --------------------------------------------------------------------------------------------
# Budgets and selection
# --------------------------------------------------------------------------------------------
def _budget(p: _Problem | Frontier, max_mb, min_compression, max_bops) -> tuple[str, float]:
    """The one budget given: (kind, value); kind in max_mb | min_compression | max_bops."""
    given = {k: v for k, v in (("max_mb", max_mb), ("min_compression", min_compression),
                               ("max_bops", max_bops)) if v is not None}
    if len(given) != 1:
        raise SearchError(f"give exactly one budget (max_mb=, min_compression= or max_bops=), "
                          f"got {given or 'none'}")
    kind, value = next(iter(given.items()))
    if not (isinstance(value, (int, float, np.number)) and math.isfinite(value) and value > 0):
        raise SearchError(f"{kind}={value!r}; a budget must be a finite number > 0")
    need = "bops" if kind == "max_bops" else "size"
    if p.cost != need:
        raise SearchError(f"{kind} is a {need} budget but the search cost is {p.cost!r}; "
                          f"rebuild with cost={need!r} (the {p.cost} frontier is not optimal "
                          f"for a {need} budget)")
    return kind, float(value)


def _fits(kind: str, value: float, size_mb, compression, bops):
    """Budget predicate on accounting columns (arrays or scalars)."""
    if kind == "max_mb":
        return size_mb <= value
    if kind == "min_compression":
        return compression >= value
    return bops <= value


def _smallest_msg(kind: str, value: float, size_mb: float, compression: float,
                  bops: float | None) -> str:
    """Infeasible-budget message stating the smallest achievable cost of the cheapest config."""
    if kind == "max_bops":
        best = f"the smallest achievable is {bops:.6g} BOPs"
    elif kind == "max_mb":
        best = f"the smallest achievable is {size_mb:.6g} MB"
    else:
        best = f"the highest achievable compression is {compression:.6g}x"
    return (f"budget {kind}={value:g} is infeasible: {best} (cheapest allowed config: "
            f"{size_mb:.6g} MB, {compression:.4g}x compression); relax the budget or add lower "
            f"candidate bits")


def select(frontier: Frontier, *, max_mb: float | None = None,
           min_compression: float | None = None, max_bops: float | None = None) -> pd.Series:
    """Lowest-Ω frontier point meeting one budget: "≤ X MB", "≥ R× compression" or "≤ B BOPs"
    (docs/design.md §3 "Picking a point"). Returns the ``points`` row (``row["config"]`` is the dict).
    On a frontier Ω falls as cost rises, so this is the most expensive point within budget: a
    binary search (:meth:`Frontier.n_within`) plus one back-tracked config
    (:meth:`Frontier.row`); the ``points`` table is not built."""
    kind, value = _budget(frontier, max_mb, min_compression, max_bops)
    n_ok = frontier.n_within(kind, value)
    if n_ok == 0:
        first = frontier.row(0)
        raise InfeasibleBudgetError(_smallest_msg(kind, value, first["size_mb"],
                                                  first["compression"], first.get("bops")))
    return frontier.row(n_ok - 1)


def select_at_size(frontier: Frontier, size_mb: float, *, rel_tol: float = 0.01) -> pd.Series:
    """Lowest-Ω frontier point of (almost) exactly ``size_mb``: :func:`select` with
    ``max_mb=size_mb``, checked to lie within ``rel_tol`` (default ±1 %) of the target, so an
    "equal size" comparison is one (docs/method.md §8). A frontier with no point that close
    raises :class:`InfeasibleBudgetError` naming the gap and the fix."""
    if not (math.isfinite(size_mb) and size_mb > 0):
        raise SearchError(f"size_mb must be a positive size in MB, got {size_mb!r}")
    row = select(frontier, max_mb=size_mb)
    gap = float(row["size_mb"]) / size_mb - 1.0
    if abs(gap) > rel_tol:
        raise InfeasibleBudgetError(
            f"the frontier point nearest below {size_mb:.5f} MB is {float(row['size_mb']):.5f} MB "
            f"({100 * gap:+.2f} %), outside ±{100 * rel_tol:g} %; add bit widths (bits) or "
            f"compare at another size")
    return row


def _allocation(p: _Problem, bits_row: np.ndarray, method: str) -> Allocation:
    bits_row = np.asarray(bits_row, dtype=np.int64)[None, :]
    acc = _accounting(p, bits_row)
    return Allocation(dict(zip(p.layers, bits_row[0].tolist())), int(acc["cost_int"][0]),
                      float(acc["size_mb"][0]), float(acc["compression"][0]),
                      int(acc["bops"][0]) if "bops" in acc else None,
                      float(_omega_of(p, bits_row)[0]), float(acc["avg_bits"][0]), method)


def _max_cost(p: _Problem, kind: str, value: float) -> int:
    """Largest integer cost_int meeting the budget, using the same float predicate as
    :func:`select` so ILP/greedy/random agree with the frontier lookup at the boundary.
    Capped at the most expensive allowed config (any larger budget is equivalent)."""
    ceiling = sum(int(u.cost[-1]) for u in p.units)
    if kind == "max_bops":
        return min(int(math.floor(value)), ceiling)
    other_bytes = 4.0 * p.other_params
    target_mb = value if kind == "max_mb" else p.fp32_mb / value
    c = min(int(math.floor(8.0 * (target_mb * MB - other_bytes))), ceiling + 1)

    def ok(ci: int) -> bool:
        size_mb = (ci / 8.0 + other_bytes) / MB
        return bool(_fits(kind, value, size_mb, p.fp32_mb / size_mb if size_mb > 0 else math.inf,
                          None))

    while c <= ceiling and ok(c + 1):   # float rounding: at most a few steps either way
        c += 1
    while c >= 0 and not ok(c):
        c -= 1
    return min(c, ceiling)


def _unit_choice_bits(p: _Problem, picks: np.ndarray) -> np.ndarray:
    return _bits_matrix(p, np.atleast_2d(picks))[0]


def _check_feasible(p: _Problem, kind: str, value: float, max_cost: int) -> None:
    if sum(int(u.cost[0]) for u in p.units) > max_cost:
        a = _allocation(p, _unit_choice_bits(p, np.zeros(len(p.units), dtype=np.int64)), "min")
        raise InfeasibleBudgetError(_smallest_msg(kind, value, a.size_mb, a.compression, a.bops))


def evaluate_config(config: Mapping[str, int], omega, n_params, *, method: str = "given",
                    **accounting: Any) -> Allocation:
    """:meth:`Problem.evaluate` (``accounting``: the keyword arguments of :class:`Problem`)."""
    return Problem(omega, n_params, **accounting).evaluate(config, method=method)


# --------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------
def brute_force_frontier(omega, n_params, bits=None, *, cost="size",
                         max_configs: int = BRUTE_FORCE_LIMIT, **accounting: Any) -> Frontier:
    """:meth:`Problem.brute_force` (``accounting``: the keyword arguments of :class:`Problem`)."""
    return Problem(omega, n_params, bits, **accounting).brute_force(cost, max_configs=max_configs)


def ilp_select(omega, n_params, bits=None, *, max_mb=None, min_compression=None, max_bops=None,
               time_limit: float | None = None, msg: bool = False,
               **accounting: Any) -> Allocation:
    """:meth:`Problem.ilp` (``accounting``: the keyword arguments of :class:`Problem`)."""
    return Problem(omega, n_params, bits, **accounting).ilp(
        max_mb=max_mb, min_compression=min_compression, max_bops=max_bops,
        time_limit=time_limit, msg=msg)


def _cbc(pulp, **options):
    """CBC: a system ``cbc`` via COIN_CMD when present, else PuLP's bundled PULP_CBC_CMD (which
    PuLP 3.3 marks deprecated for 4.0; the warning is silenced as there is no other bundled CBC)."""
    coin = getattr(pulp, "COIN_CMD", None)
    if coin is not None and coin(msg=False).available():
        return coin(**options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return pulp.PULP_CBC_CMD(**options)


def greedy_select(omega, n_params, bits=None, *, max_mb=None, min_compression=None,
                  max_bops=None, **accounting: Any) -> Allocation:
    """:meth:`Problem.greedy` (``accounting``: the keyword arguments of :class:`Problem`)."""
    return Problem(omega, n_params, bits, **accounting).greedy(
        max_mb=max_mb, min_compression=min_compression, max_bops=max_bops)


def random_select(omega, n_params, bits=None, *, max_mb=None, min_compression=None,
                  max_bops=None, seed: int = 0, n_samples: int = 1000,
                  **accounting: Any) -> Allocation:
    """:meth:`Problem.random` (``accounting``: the keyword arguments of :class:`Problem`)."""
    return Problem(omega, n_params, bits, **accounting).random(
        max_mb=max_mb, min_compression=min_compression, max_bops=max_bops, seed=seed,
        n_samples=n_samples)


def uniform_select(omega, n_params, bits=None, *, max_mb=None, min_compression=None,
                   max_bops=None, **accounting: Any) -> Allocation:
    """:meth:`Problem.uniform` (``accounting``: the keyword arguments of :class:`Problem`)."""
    return Problem(omega, n_params, bits, **accounting).uniform(
        max_mb=max_mb, min_compression=min_compression, max_bops=max_bops)


# --------------------------------------------------------------------------------------------
# The search problem: one object, built once
# --------------------------------------------------------------------------------------------
def _ilp(p: _Problem, kind: str, value: float, max_cost: int, time_limit: float | None,
         msg: bool) -> Allocation:
    """HAWQ-V3 ILP (docs/design.md §3), generalised to the candidate set, solved with PuLP + CBC.

    Binary x_{i,b}; min Σ Ω_i(b)·x_{i,b} s.t. Σ_b x_{i,b} = 1, x_{i,b} = x_{j,b} for tied i, j,
    x_{i,f} = 1 for fixed layers, Σ c_i·b·x_{i,b} ≤ budget. One solve per budget.
    """
    try:
        import pulp
    except ImportError:  # pragma: no cover - pulp is in the dev/ilp extras
        raise ImportError("ilp_select needs PuLP: `pip install pulp` (ships the CBC solver)") \
            from None

    pinned = {name: p.fixed[m] for g in p.tied for m in g if m in p.fixed for name in g}
    allowed = [sorted(set(p.bits) | {pinned.get(n, p.fixed.get(n, p.bits[0]))})
               for n in p.layers]
    # CBC's tolerances are absolute (~1e-6): with max Ω -> 1e6 the small Ω differences that decide
    # the optimum are resolved (max Ω -> 1 gave 1 % suboptimal "Optimal" answers on ResNet-20).
    scale = (float(p.omega.max()) or 1.0) / 1e6
    prob = pulp.LpProblem("hmqat_bit_allocation", pulp.LpMinimize)
    new_var = getattr(prob, "add_variable", None)          # PuLP >= 3.3 (4.0 style)
    if new_var is None:  # pragma: no cover - older PuLP
        def new_var(name, lowBound=None, upBound=None, cat=pulp.LpContinuous):
            return pulp.LpVariable(name, lowBound, upBound, cat)
    x = {(i, b): new_var(f"x_{i}_{b}", cat=pulp.LpBinary)
         for i in range(len(p.layers)) for b in allowed[i]}
    prob += pulp.lpSum(p.omega[i, p.col(b)] / scale * v for (i, b), v in x.items())
    coef = p.cost_coef
    for i, name in enumerate(p.layers):
        prob += pulp.lpSum(x[i, b] for b in allowed[i]) == 1
        if name in p.fixed:
            prob += x[i, p.fixed[name]] == 1
        elif name not in pinned:  # free layers only use the candidate bits
            for b in allowed[i]:
                if b not in p.bits:
                    prob += x[i, b] == 0
    index = {n: i for i, n in enumerate(p.layers)}
    for g in p.tied:
        first = index[g[0]]
        for m in g[1:]:
            for b in allowed[first]:
                prob += x[index[m], b] == x[first, b]
    prob += pulp.lpSum(int(coef[i]) * b * v for (i, b), v in x.items()) <= max_cost
    status = prob.solve(_cbc(pulp, msg=msg, timeLimit=time_limit, gapRel=0.0, gapAbs=0.0))
    if pulp.LpStatus[status] != "Optimal":
        raise RuntimeError(f"CBC returned {pulp.LpStatus[status]!r} for {kind}={value:g}; "
                           f"raise time_limit or check the budget")
    row = np.array([max(allowed[i], key=lambda b: x[i, b].value()) for i in range(len(p.layers))])
    a = _allocation(p, row, "ilp")
    if a.cost_int > max_cost:
        raise RuntimeError(f"CBC's solution costs {a.cost_int} > budget {max_cost} after "
                           f"rounding; solver tolerance problem")
    return a


def _greedy(p: _Problem, max_cost: int) -> Allocation:
    """Greedy baseline: start every free unit at its highest bits; while over budget, lower the
    unit whose next-lower width costs the least ΔΩ per saved cost (ΔΩ/Δcost)."""
    pick = np.array([len(u.bits) - 1 for u in p.units])
    total = sum(int(u.cost[k]) for u, k in zip(p.units, pick))
    while total > max_cost:
        best, best_ratio = -1, math.inf
        for j, (u, k) in enumerate(zip(p.units, pick)):
            saved = float(u.cost[k] - u.cost[k - 1])
            if k == 0 or saved <= 0:      # at its lowest width, or lowering saves nothing
                continue
            ratio = (u.omega[k - 1] - u.omega[k]) / saved
            if ratio < best_ratio:
                best, best_ratio = j, ratio
        total -= int(p.units[best].cost[pick[best]] - p.units[best].cost[pick[best] - 1])
        pick[best] -= 1
    return _allocation(p, _unit_choice_bits(p, pick), "greedy")


def _random(p: _Problem, max_cost: int, seed: int, n_samples: int) -> Allocation:
    """Random baseline at matched size: draw ``n_samples`` uniform random configs (seeded),
    lower random units of those over budget until they fit, return the one closest to the
    budget (largest cost within it)."""
    rng = np.random.default_rng(seed)
    sizes = np.array([len(u.bits) for u in p.units])
    picks = (rng.random((n_samples, len(p.units))) * sizes).astype(np.int64)

    def total(pk: np.ndarray) -> np.ndarray:
        return sum(u.cost[pk[:, k]] for k, u in enumerate(p.units))

    cur = total(picks)
    while (over := cur > max_cost).any():
        rows = np.flatnonzero(over)
        score = rng.random((len(rows), len(p.units)))
        score[picks[rows] == 0] = -1.0          # only units that can still go lower
        col = score.argmax(axis=1)
        picks[rows, col] -= 1
        cur[rows] = total(picks[rows])
    best = int(np.argmax(cur))
    return _allocation(p, _unit_choice_bits(p, picks[best]), "random")


def _uniform(p: _Problem, kind: str, value: float, max_cost: int) -> Allocation:
    """Uniform baseline: the highest single width (fixed layers stay pinned) meeting the budget."""
    for b in sorted(p.bits, reverse=True):
        pick = np.array([int(np.searchsorted(u.bits, b)) if len(u.bits) > 1 else 0
                         for u in p.units])
        if sum(int(u.cost[k]) for u, k in zip(p.units, pick)) <= max_cost:
            return _allocation(p, _unit_choice_bits(p, pick), f"uniform{b}")
    low = np.zeros(len(p.units), dtype=np.int64)
    a = _allocation(p, _unit_choice_bits(p, low), "min")
    raise InfeasibleBudgetError(_smallest_msg(kind, value, a.size_mb, a.compression, a.bops))


def _brute_force(p: _Problem, max_configs: int) -> Frontier:
    """Reference frontier by enumerating every per-layer config (fixed layers pinned), dropping
    those that break a tie, then keeping each cost's minimum Ω when it is strictly below every
    cheaper cost's (pandas groupby + cummin). Refuses more than ``max_configs`` configs."""
    t0 = time.perf_counter()
    group_fixed = {name: p.fixed[m] for g in p.tied for m in g if m in p.fixed for name in g}
    options = [[group_fixed.get(name, p.fixed.get(name))] if name in p.fixed or
               name in group_fixed else list(p.bits) for name in p.layers]
    count = math.prod(len(o) for o in options)
    if count > max_configs:
        raise SearchError(f"brute force would enumerate {count:,} configs (> max_configs="
                          f"{max_configs:,}); use pareto_frontier (exact DP) or a smaller table")
    grids = np.meshgrid(*[np.array(o, dtype=np.int64) for o in options], indexing="ij")
    bits_mat = np.stack([g.ravel() for g in grids], axis=1)
    index = {name: j for j, name in enumerate(p.layers)}
    for g in p.tied:
        cols = bits_mat[:, [index[m] for m in g]]
        bits_mat = bits_mat[(cols == cols[:, :1]).all(axis=1)]
    total = _omega_of(p, bits_mat)
    cost_int = _accounting(p, bits_mat)["cost_int"]
    df = pd.DataFrame({"c": cost_int, "w": total}).sort_values(["c", "w"], kind="stable")
    best = df.groupby("c", sort=True).head(1)             # min Ω per cost
    prev = best["w"].cummin().shift(1, fill_value=np.inf)  # min Ω of strictly cheaper costs
    chosen = best.index[(best["w"] < prev).to_numpy()]
    ms = (time.perf_counter() - t0) * 1e3
    return Frontier(p, cost_int[chosen], total[chosen], ms, "brute_force",
                    bits_matrix=bits_mat[chosen])


def _evaluate(p: _Problem, config: Mapping[str, int], method: str) -> Allocation:
    """Size, compression, BOPs and ΣΩ of any {layer: bits} config (docs/design.md §3 accounting).

    With ``fixed``/``tied``, the config must honour them (an error names the offending layer).
    """
    _check_names("config", config.keys(), p.layers)
    wrong = {k: (config[k], b) for k, b in p.fixed.items() if int(config[k]) != int(b)}
    if wrong:
        raise SearchError(f"config breaks fixed layers (given, fixed): {wrong}")
    for group in p.tied:
        if len({int(config[k]) for k in group}) > 1:
            raise SearchError(f"config gives the tied group {group} different bits "
                              f"{[config[k] for k in group]}")
    bad = {k: v for k, v in config.items() if v not in p.columns}
    if bad:
        raise SearchError(f"config bits {bad} have no omega column (columns {list(p.columns)})")
    return _allocation(p, np.array([config[k] for k in p.layers]), method)


def _random_points(p: _Problem, n: int, seed: int) -> pd.DataFrame:
    """``n`` uniformly random allowed configs (seeded) with their size, compression, ΣΩ...:
    the faint cloud the frontier is drawn against (same accounting as :func:`pareto_frontier`)."""
    rng = np.random.default_rng(seed)
    picks = np.stack([rng.integers(0, len(u.bits), size=n) for u in p.units], axis=1)
    bits_mat = _bits_matrix(p, picks)
    return _frame(p, bits_mat, _omega_of(p, bits_mat)).drop(columns="config")


class Problem:
    """One bit-allocation problem, validated once: the Ω table and the accounting inputs that
    travel together (docs/design.md §3.4). Every search is a method:

        >>> prob = Problem.from_model(model, omega, bits=(2, 3, 4, 8), input_size=study.input_size)
        >>> front = prob.frontier()                          # exact Pareto frontier (DP)
        >>> prob.ilp(min_compression=10.34), prob.greedy(max_mb=0.2), prob.uniform(max_mb=0.2)
        >>> prob.evaluate(config).size_mb

    Args (as :func:`pareto_frontier`): ``omega`` Ω_i(b) >= 0 (DataFrame index=layer in forward
    order, columns=bits, or {layer: {bits: Ω}}); ``n_params`` {layer: n_i}; ``bits`` candidate
    widths of free layers (default: every Ω column); ``macs`` and ``a_bits`` for BOPs;
    ``fixed`` pinned layers; ``tied`` groups forced to one width; ``other_params`` and
    ``fp32_params`` for size and compression. Bad input raises :class:`SearchError` here, before
    any search runs.
    """

    def __init__(self, omega: pd.DataFrame | Mapping[str, Mapping[int, float]],
                 n_params: Mapping[str, int], bits: Iterable[int] | None = None, *,
                 macs: Mapping[str, int] | None = None,
                 a_bits: int | Mapping[str, int] | None = None,
                 fixed: Mapping[str, int] | None = None,
                 tied: Sequence[Sequence[str]] | None = None, other_params: int = 0,
                 fp32_params: int | None = None):
        self._args = (omega, n_params, None if bits is None else list(bits))
        self._kw = dict(macs=macs, a_bits=a_bits, fixed=fixed, tied=tied,
                        other_params=other_params, fp32_params=fp32_params)
        self._prepared_by_cost: dict[str, _Problem] = {}
        self._prepared("size")                   # validate now

    @classmethod
    def from_model(cls, model: Any, omega: pd.DataFrame, bits: Iterable[int] | None = None, *,
                   a_bits: int | None = 4, policy: str = "first_last_8",
                   per_channel: bool = True, tied: Sequence[Sequence[str]] | None = None,
                   input_size: tuple[int, ...] = (1, 3, 32, 32)) -> "Problem":
        """The problem for ``model``'s layers with :func:`model_inputs`' accounting (MACs at
        ``input_size``, the policy's fixed layers, step sizes in ``other_params``)."""
        acct = model_inputs(model, a_bits=a_bits, policy=policy, per_channel=per_channel,
                            input_size=input_size)
        return cls(omega, acct["n_params"], bits, macs=acct["macs"], a_bits=acct["a_bits"],
                   fixed=acct["fixed"], tied=tied, other_params=acct["other_params"],
                   fp32_params=acct["fp32_params"])

    @property
    def layers(self) -> list[str]:
        """Layer names in forward order (the Ω table's index)."""
        return list(self._prepared("size").layers)

    @property
    def fixed(self) -> dict[str, int]:
        """The pinned layers {name: bits}."""
        return dict(self._prepared("size").fixed)

    def _prepared(self, cost: str) -> _Problem:
        if cost not in self._prepared_by_cost:
            omega, n_params, bits = self._args
            self._prepared_by_cost[cost] = _prepare(omega, n_params, bits, cost=cost, **self._kw)
        return self._prepared_by_cost[cost]

    def _budgeted(self, max_mb: float | None, min_compression: float | None,
                  max_bops: float | None, *, check: bool = True
                  ) -> tuple[_Problem, str, float, int]:
        """(prepared problem, budget kind, value, largest integer cost within it): the set-up
        every budgeted search shares; ``check`` raises when even the cheapest config is over."""
        p = self._prepared("bops" if max_bops is not None else "size")
        kind, value = _budget(p, max_mb, min_compression, max_bops)
        max_cost = _max_cost(p, kind, value)
        if check:
            _check_feasible(p, kind, value, max_cost)
        return p, kind, value, max_cost

    def frontier(self, cost: str = "size") -> Frontier:
        """Exact Pareto frontier of (cost, ΣΩ) by dynamic programming over Pareto lists; cost
        "size" (Σ n_i·b_i) or "bops" (Σ MACs_i·b_i·a_i). A lazy :class:`Frontier`."""
        p = self._prepared(cost)
        t0 = time.perf_counter()
        cost_int, total, plan = _search(p.units)
        return Frontier(p, cost_int, total, (time.perf_counter() - t0) * 1e3, "dp", plan=plan)

    def brute_force(self, cost: str = "size", *,
                    max_configs: int = BRUTE_FORCE_LIMIT) -> Frontier:
        """Reference frontier by enumeration (refuses more than ``max_configs`` configs)."""
        return _brute_force(self._prepared(cost), max_configs)

    def ilp(self, *, max_mb: float | None = None, min_compression: float | None = None,
            max_bops: float | None = None, time_limit: float | None = None,
            msg: bool = False) -> Allocation:
        """HAWQ-V3's ILP at one budget (PuLP + CBC)."""
        p, kind, value, max_cost = self._budgeted(max_mb, min_compression, max_bops)
        return _ilp(p, kind, value, max_cost, time_limit, msg)

    def greedy(self, *, max_mb: float | None = None, min_compression: float | None = None,
               max_bops: float | None = None) -> Allocation:
        """Greedy ΔΩ/Δcost lowering from the highest widths until the budget is met."""
        p, _, _, max_cost = self._budgeted(max_mb, min_compression, max_bops)
        return _greedy(p, max_cost)

    def random(self, *, max_mb: float | None = None, min_compression: float | None = None,
               max_bops: float | None = None, seed: int = 0,
               n_samples: int = 1000) -> Allocation:
        """Seeded random allocation at matched size (closest to the budget of ``n_samples``)."""
        p, _, _, max_cost = self._budgeted(max_mb, min_compression, max_bops)
        return _random(p, max_cost, seed, n_samples)

    def uniform(self, *, max_mb: float | None = None, min_compression: float | None = None,
                max_bops: float | None = None) -> Allocation:
        """The highest single width (fixed layers pinned) that meets the budget."""
        p, kind, value, max_cost = self._budgeted(max_mb, min_compression, max_bops,
                                                  check=False)
        return _uniform(p, kind, value, max_cost)

    def evaluate(self, config: Mapping[str, int], *, method: str = "given") -> Allocation:
        """Size, compression, BOPs and ΣΩ of any {layer: bits} config under this accounting."""
        return _evaluate(self._prepared("size"), config, method)

    def random_points(self, n: int = 1000, seed: int = 0) -> pd.DataFrame:
        """``n`` seeded random allowed configs with their accounting (the frontier's cloud)."""
        if n < 1:
            raise SearchError(f"n must be >= 1, got {n}")
        return _random_points(self._prepared("size"), n, seed)


# --------------------------------------------------------------------------------------------
# From a model to the search's inputs (the accounting of hmqat.quant, docs/design.md §3)
# --------------------------------------------------------------------------------------------
def model_inputs(model: Any, *, a_bits: int | None = 4, policy: str = "first_last_8",
                 per_channel: bool = True, input_size: tuple[int, ...] = (1, 3, 32, 32)
                 ) -> dict[str, Any]:
    """``n_params``, ``macs``, ``a_bits`` (per layer), ``fixed``, ``other_params`` and
    ``fp32_params`` of an FP32 ``model``, consistent with :func:`hmqat.quant.model_size_mb`.

    other_params = every parameter that is not a quantized weight (biases, BN affine) plus the
    step sizes QAT adds (out_channels per layer when ``per_channel``, one per activation
    quantizer when ``a_bits`` is set).
    """
    layers = quantizable_layers(model, input_size)
    total = sum(p.numel() for p in model.parameters())
    n_weights = sum(l.n_params for l in layers)
    steps = quantizer_steps(layers, per_channel=per_channel, a_bits=a_bits)
    abits = act_bits_config(model, a_bits, policy) if a_bits is not None else None
    return {
        "n_params": {l.name: l.n_params for l in layers},
        "macs": {l.name: l.macs for l in layers},
        "a_bits": {k: (v or 32) for k, v in abits.items()} if abits else 32,
        "fixed": fixed_layers(model, policy),
        "other_params": total - n_weights + steps,
        "fp32_params": total,
    }


def model_frontier(model: Any, omega: pd.DataFrame, bits: Iterable[int] | None = None, *,
                   a_bits: int | None = 4, policy: str = "first_last_8", cost: str = "size",
                   tied: Sequence[Sequence[str]] | None = None,
                   input_size: tuple[int, ...] = (1, 3, 32, 32)) -> Frontier:
    """:meth:`Problem.from_model` then :meth:`Problem.frontier`."""
    return Problem.from_model(model, omega, bits, a_bits=a_bits, policy=policy, tied=tied,
                              input_size=input_size).frontier(cost)


def average_bits(config: Mapping[str, int], n_params: Mapping[str, int]) -> float:
    """Weight-count-weighted mean bit width, Σ n_i·b_i / Σ n_i."""
    _check_names("config", config.keys(), list(n_params))
    return sum(n_params[k] * int(b) for k, b in config.items()) / sum(n_params[k] for k in config)


def random_points(omega, n_params, bits=None, *, n: int = 1000, seed: int = 0,
                  **accounting: Any) -> pd.DataFrame:
    """:meth:`Problem.random_points` (``accounting``: the keyword arguments of :class:`Problem`)."""
    return Problem(omega, n_params, bits, **accounting).random_points(n=n, seed=seed)
