"""Benchmark of hmqat.search (docs/design.md §3 "Search"): exact Pareto DP vs the PuLP/CBC ILP.

    python benchmarks/search.py            # writes results/bench/search.{txt,json}

Measured side by side in one process:
  (a) full exact frontier, ResNet-20 (20 layers), 6 candidate bits      goal <= 50 ms
  (b) full exact frontier, ResNet-50 (54 layers, 224x224), 6 bits       goal <= 1 s
  (c) 20 budgets: one frontier + 20 select() lookups vs 20 ILP solves   goal >= 100x faster
Times are medians over repeated runs (time.perf_counter); each run starts with the previous
run's results freed, so no run pays for deallocating another's. ``wall`` is the whole
pareto_frontier() call (validation + DP; the Frontier is lazy); ``search`` is Frontier.search_ms
(the DP only); ``points`` is the first access to Frontier.points on that fresh frontier, i.e.
the deferred work of back-tracking every config and building the DataFrame with one config dict
per point (select() does not need it: it back-tracks only the point it returns). The Ω table is
synthetic but realistic: Ω_i(b) = T̄_i·n_i·Δ_b²/12 with log-uniform average traces
T̄_i ∈ [1e-4, 1] and Δ_b = 6σ_i/(2^b−1), σ_i = sqrt(2/fan_in) (docs/design.md §3 `trace_size`).
First conv and last linear are fixed at 8 bits (first_last_8 policy) unless the row says "none".
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hmqat.models import create_model, quantizable_layers  # noqa: E402
from hmqat.runtime import atomic_write_text  # noqa: E402
from hmqat.search import Problem, select  # noqa: E402

BITS = (2, 3, 4, 5, 6, 8)
A_BITS = 4
SEED = 0
N_BUDGETS = 20


def omega_table(layers, bits=BITS, seed=SEED) -> pd.DataFrame:
    """Ω_i(b) = T̄_i · n_i · Δ_b²/12 with log-uniform T̄_i and Kaiming-scale weights (seeded)."""
    rng = np.random.default_rng(seed)
    traces = 10 ** rng.uniform(-4, 0, len(layers))
    rows = {}
    for info, trace in zip(layers, traces):
        sigma = np.sqrt(2.0 / np.prod(info.weight_shape[1:]))
        rows[info.name] = {b: trace * info.n_params * (6 * sigma / (2 ** b - 1)) ** 2 / 12
                           for b in bits}
    return pd.DataFrame.from_dict(rows, orient="index")


def problem(arch: str, input_size) -> dict:
    layers = quantizable_layers(create_model(arch), input_size=input_size)
    return {"arch": arch, "omega": omega_table(layers),
            "n_params": {i.name: i.n_params for i in layers},
            "macs": {i.name: i.macs for i in layers},
            "first_last": {layers[0].name: 8, layers[-1].name: 8}}


def time_frontier(pb: dict, cost: str, policy: str, repeats: int) -> dict:
    """Median wall/search time of building the Problem (validation) plus its frontier (DP) over
    ``repeats`` runs."""
    fixed = pb["first_last"] if policy == "first_last_8" else None
    walls, searches, points = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        front = Problem(pb["omega"], pb["n_params"], macs=pb["macs"], a_bits=A_BITS,
                        fixed=fixed).frontier(cost)
        walls.append((time.perf_counter() - t0) * 1e3)
        searches.append(front.search_ms)
        t0 = time.perf_counter()
        front.points  # noqa: B018 - the deferred table build is what is timed
        points.append((time.perf_counter() - t0) * 1e3)
        n_points = len(front)
        del front
    return {"arch": pb["arch"], "layers": len(pb["omega"]), "cost": cost, "policy": policy,
            "points": n_points, "wall_ms": statistics.median(walls),
            "search_ms": statistics.median(searches), "points_ms": statistics.median(points),
            "repeats": repeats}


def ilp_vs_frontier(pb: dict, repeats: int) -> dict:
    """20 size budgets spread over the frontier: one frontier (validation + DP) + 20 lookups vs
    20 ILP solves on the already validated problem."""
    prob = Problem(pb["omega"], pb["n_params"], fixed=pb["first_last"])
    front = prob.frontier()
    sizes = front.points["size_mb"]
    budgets = np.linspace(sizes.iloc[0], sizes.iloc[-1], N_BUDGETS + 2)[1:-1]
    del front, sizes
    dp_ms = []
    for _ in range(repeats):
        picks = None
        t0 = time.perf_counter()
        f = Problem(pb["omega"], pb["n_params"], fixed=pb["first_last"]).frontier()
        picks = [select(f, max_mb=float(b)) for b in budgets]
        dp_ms.append((time.perf_counter() - t0) * 1e3)
        del f
    t0 = time.perf_counter()
    ilps = [prob.ilp(max_mb=float(b)) for b in budgets]
    ilp_ms = (time.perf_counter() - t0) * 1e3
    rel = max(abs(a.omega - r["omega"]) / r["omega"] for a, r in zip(ilps, picks))
    dp = statistics.median(dp_ms)
    return {"arch": pb["arch"], "budgets": N_BUDGETS, "frontier_plus_select_ms": dp,
            "ilp_total_ms": ilp_ms, "ilp_per_budget_ms": ilp_ms / N_BUDGETS,
            "speedup": ilp_ms / dp, "max_rel_omega_diff": rel}


def main() -> None:
    import pulp

    r20 = problem("resnet20", (1, 3, 32, 32))
    r50 = problem("resnet50", (1, 3, 224, 224))
    rows = [time_frontier(r20, c, pol, 51) for pol in ("first_last_8", "none")
            for c in ("size", "bops")]
    rows += [time_frontier(r50, c, pol, 7) for pol in ("first_last_8", "none")
             for c in ("size", "bops")]
    ilp = [ilp_vs_frontier(r20, 21), ilp_vs_frontier(r50, 7)]

    lines = [
        "hmqat.search benchmark (python benchmarks/search.py)",
        f"machine: {platform.platform()}, {os.cpu_count()} CPUs (shared), python "
        f"{platform.python_version()}, numpy {np.__version__}, pandas {pd.__version__}, "
        f"pulp {pulp.__version__}",
        f"Ω: synthetic T̄_i·n_i·Δ_b²/12, log-uniform traces, seed {SEED}; bits {BITS}; "
        f"a_bits {A_BITS}",
        "",
        "(a)/(b) exact Pareto frontier (median of `repeats` runs; goals: ResNet-20 <= 50 ms, "
        "ResNet-50 <= 1000 ms)",
        f"{'arch':<9} {'layers':>6} {'cost':<5} {'policy':<13} {'points':>7} {'wall_ms':>9} "
        f"{'search_ms':>10} {'points_ms':>10} {'repeats':>7}",
    ]
    for r in rows:
        lines.append(f"{r['arch']:<9} {r['layers']:>6} {r['cost']:<5} {r['policy']:<13} "
                     f"{r['points']:>7} {r['wall_ms']:>9.2f} {r['search_ms']:>10.2f} "
                     f"{r['points_ms']:>10.2f} {r['repeats']:>7}")
    lines += [
        "",
        f"(c) {N_BUDGETS} size budgets, first_last_8: one frontier + {N_BUDGETS} select() vs "
        f"{N_BUDGETS} PuLP/CBC ILP solves (goal >= 100x)",
        f"{'arch':<9} {'frontier+select_ms':>18} {'ilp_total_ms':>12} {'ilp/budget_ms':>13} "
        f"{'speedup':>8} {'max_rel_dΩ':>11}",
    ]
    for r in ilp:
        lines.append(f"{r['arch']:<9} {r['frontier_plus_select_ms']:>18.2f} "
                     f"{r['ilp_total_ms']:>12.1f} {r['ilp_per_budget_ms']:>13.1f} "
                     f"{r['speedup']:>7.0f}x {r['max_rel_omega_diff']:>11.2e}")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    out = ROOT / "results" / "bench"
    atomic_write_text(out / "search.txt", text)
    atomic_write_text(out / "search.json", json.dumps({"frontier": rows, "ilp_vs_frontier": ilp,
                                                  "bits": BITS, "a_bits": A_BITS,
                                                  "seed": SEED}, indent=2) + "\n")


if __name__ == "__main__":
    main()
