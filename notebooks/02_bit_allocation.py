# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · Bit allocation: the exact Pareto frontier
#
# > - **You will:** merge two layers' options into a Pareto frontier by hand; compute the exact
# >   size–Ω Pareto frontier of the whole model and pick budgets from it; compare it with greedy,
# >   HAWQ-V3's ILP, random and uniform allocation.
# > - **Prerequisites:** notebooks 00 (the fine-tuned FP32 model: layer sizes and MACs) and 01 (the
# >   Ω table); when they have not run, the first code cell runs them at the lab profile and says
# >   so. What a Pareto frontier is; model size in bits.
# > - **Run time with the lab defaults:** <!-- lab-time -->0.2 min, measured by the pipeline in the lab run of 2026-12-07 (2 CPU cores, git 431fef3); the chain of 9 notebooks took 46.2 min<!-- /lab-time -->
# > - **Exercises:** 1 and 2 are checked by code (`lessons.check_…` after a `# YOUR CODE HERE`
# >   cell); exercise 3 is open.
#
# Given the table $\Omega_i(b)$ from notebook 01, choosing bits is an optimisation problem:
#
# $$\min_{b_1..b_L} \sum_i \Omega_i(b_i) \quad \text{s.t.} \quad \sum_i n_i b_i \le \text{budget}.$$
#
# Because the objective and the cost are both **sums over layers**, this is a *multiple-choice
# knapsack*. HAWQ-V3 solves one budget at a time with an integer linear program (ILP); HAWQ-V2 draws
# the **Pareto frontier** of (size, ΣΩ). We compute that frontier *exactly* with a dynamic program:
# walk through the layers, keep for every reachable integer cost only the configurations that no
# other configuration beats in both size and ΣΩ, and merge. Dominated states never come back, so the
# lists stay short and the whole frontier takes milliseconds — every budget is answered at once.
#
# Conventions (HAWQ-V3): size = Σ nᵢbᵢ/8 bytes + 4 bytes per remaining FP32 parameter (BN, biases,
# the step sizes themselves); MB = 2²⁰ bytes; compression = FP32 size / size. The first conv and
# the last linear layer stay at 8 bits (`policy="first_last_8"`).

# %% tags=["parameters"]
results_dir = "../results/lab"
profile = "lab"
arch = "resnet20"
dataset = "cifar10"
n_synthetic = 0
seed = 0
val_size = 5000
val_from = "test"
device = "auto"
batch_size = 128
bits = [2, 3, 4, 5, 6, 8]
a_bits = 4
policy = "first_last_8"
target_compressions = [10.34]
match_uniform_bits = [3]
n_candidates = 2000

# %%
import statistics
import time

import pandas as pd
from IPython.display import display

from hmqat import quant, runtime, search
from hmqat.study import lessons, plotting, reporting
from hmqat.study.pipeline import Study

study = Study.from_params(globals())
# notebooks 00 and 01, computed first (at the lab profile) when this notebook runs alone
lessons.ensure_upstream(study, "02_bit_allocation")
model = study.fp32_model()
omega = study.omega("joint")
# the search problem, built and validated once: Ω, weight counts, MACs at the study's input size,
# the policy's fixed layers and the accounting of hmqat.quant
problem = search.Problem.from_model(model, omega, bits, a_bits=a_bits, policy=policy,
                                    input_size=study.input_size)

# %% [markdown]
# ## 1. From scratch: two layers merged by hand
# The dynamic program's one step is a **merge**. Take two free layers, a small one from the first
# stage and a large one from the last. Each alone has one option per width: cost $n_i b_i$
# bits, sensitivity $\Omega_i(b_i)$. Together they have every pair of options, with costs and
# Ω's added. Sort the pairs by cost and keep a pair only when its ΣΩ is below that of every
# cheaper pair: the rest are **dominated** (another pair is no larger and no worse) and no budget
# ever picks them. The DP does exactly this, layer after layer, on lists that stay short
# because the dominated states are dropped at every step. The cell checks the hand-made frontier
# against `search.Problem(...).frontier()` on the same two layers.

# %%
n_params = search.model_inputs(model, a_bits=a_bits, policy=policy,
                               input_size=study.input_size)["n_params"]
free = [name for name in problem.layers if name not in problem.fixed]
pair = (free[0], free[-1])                            # a stage-1 and a stage-3 conv
options = {name: [(n_params[name] * b, float(omega.loc[name, b]), b) for b in bits]
           for name in pair}
merged = sorted(((ca + cb, oa + ob, {pair[0]: ba, pair[1]: bb})
                 for ca, oa, ba in options[pair[0]] for cb, ob, bb in options[pair[1]]),
                key=lambda t: (t[0], t[1]))
by_hand, best = [], float("inf")
for cost, om, config in merged:                       # cheapest first
    if om < best:                                     # below every cheaper pair: not dominated
        by_hand.append((cost, om, config))
        best = om
two = search.Problem(omega.loc[list(pair)], {name: n_params[name] for name in pair}, bits)
library = two.frontier()
lessons.check_close([c for c, _, _ in by_hand], library.cost_int, "frontier costs by hand")
lessons.check_close([o for _, o, _ in by_hand], library.omega, "frontier ΣΩ by hand", rtol=1e-9)
lessons.check(all(cfg == library.config(i) for i, (_, _, cfg) in enumerate(by_hand)),
              "the hand-made frontier's configs differ from Problem.frontier's")
print(f"{pair[0]} ({n_params[pair[0]]:,} weights) × {pair[1]} ({n_params[pair[1]]:,}): "
      f"{len(merged)} pairs, {len(by_hand)} on the Pareto frontier by hand = Problem.frontier "
      f"({len(library)} points)")
pd.DataFrame([{"cost (bits)": c, "ΣΩ": o, **cfg} for c, o, cfg in by_hand])

# %% [markdown]
# ## 2. The whole frontier, exactly

# %%
def timed(fn, repeats=5):
    """fn()'s last result and its median wall time in ms over `repeats` calls (a single call
    in a fresh kernel also pays one-off costs, such as numpy's first use of a function)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return out, statistics.median(times)


frontier, frontier_ms = timed(problem.frontier)
print(f"{len(frontier)} Pareto-optimal configurations out of "
      f"{len(bits) ** (len(omega) - len(problem.fixed)):.3g}, found in {frontier_ms:.2f} ms "
      f"(exact DP on the validated problem)")
frontier.points[["size_mb", "compression", "avg_bits", "omega"]].head()

# %% [markdown]
# ## 3. Budgets for QAT
# We pick (a) the target compressions (the paper's 10.34× headline; in the quick profile also
# 13.11×, HAWQ-V3's ResNet-20 point) and (b) the size of uniform W*b*A`a_bits` models, so that
# notebook 03 compares mixed and uniform precision at **equal size**: `search.select_at_size`
# refuses a pick more than 1 % away from the uniform model's size. Equal size is not equal
# compute: the BOPs column shows the difference (docs/method.md §8).

# %%
picks = {}
for r in target_compressions:
    row = search.select(frontier, min_compression=r)
    picks[f"HMQAT {r:g}x"] = row
for b in match_uniform_bits:
    uni = quant.uniform_config(model, b, policy=policy)
    size = quant.model_size_mb(model, uni, a_bits=a_bits)
    row = search.select_at_size(frontier, size)
    if all(row["config"].get(k, v) == v for k, v in uni.items()):
        # e.g. at uniform W2's size with first/last at 8 bits nothing can go below 2 bits, so the
        # only config of that size is the uniform one: there is no mixed-vs-uniform comparison
        print(f"at uniform W{b}A{a_bits}'s size ({size:.4f} MB) the frontier pick IS uniform "
              f"W{b}: no mixed configuration of that size exists; no equal-size pick")
        continue
    picks[f"HMQAT =W{b}A{a_bits} size"] = row
picked = pd.DataFrame([{"label": k, **{c: v[c] for c in ("size_mb", "compression", "bops",
                                                            "avg_bits", "omega")}}
                       for k, v in picks.items()])
picked

# %% [markdown]
# ## 4. The same budgets with the references
# The ILP (HAWQ-V3's formulation over our candidate set, PuLP + CBC) must reach the frontier's ΣΩ
# exactly; greedy, random (same size) and uniform show what the exact search buys.

# %%
rows = []
for label, row in picks.items():
    budget = dict(max_mb=float(row["size_mb"]))
    _, select_ms = timed(lambda: search.select(frontier, **budget))
    rows.append({"budget": label, "method": "HMQAT frontier (exact DP)", "omega": row["omega"],
                 "size_mb": row["size_mb"], "search_ms": frontier_ms + select_ms})
    for name, fn in [("HAWQ-V3 ILP (PuLP/CBC)", problem.ilp), ("greedy", problem.greedy),
                     ("random", problem.random), ("uniform", problem.uniform)]:
        alloc, ms = timed(lambda: fn(**budget), repeats=3)
        rows.append({"budget": label, "method": name, "omega": alloc.omega,
                     "size_mb": alloc.size_mb, "search_ms": ms})
comparison = pd.DataFrame(rows)
reporting.write_table(comparison, study.tables / "search_comparison",
                      caption="Sum of Omega reached by each allocation method at the same size "
                              "budget, and its wall time (median of repeated calls; HMQAT: "
                              "frontier + select)", data_label=study.data_label,
                      profile=profile,
                      float_format={"omega": "{:.4g}", "size_mb": "{:.4f}", "search_ms": "{:.2f}"})
comparison

# %% [markdown]
# ## 5. Pictures: the frontier among random configurations, and the chosen bit widths

# %%
cands = problem.random_points(n=n_candidates, seed=seed)
uniform = {f"W{b}": quant.uniform_config(model, b, policy=policy) for b in bits}
uniform_pts = pd.DataFrame([{"label": k, **vars(problem.evaluate(c))} for k, c in uniform.items()])
with plotting.use_style():
    fig = plotting.plot_frontier(cands, frontier.points, picked, uniform=uniform_pts,
                                 title="Exact Pareto frontier of model size vs ΣΩ",
                                 subtitle=study.subtitle())
    plotting.savefig(fig, study.figures / "pareto_frontier")
    configs = {k: dict(v["config"]) for k, v in picks.items()}
    fig = plotting.plot_bit_heatmap(configs, list(omega.index), title="Bits per layer",
                                    subtitle=study.subtitle())
    plotting.savefig(fig, study.figures / "bit_allocation")

# %%
study.save_json("configs.json", {k: {"config": {l: int(b) for l, b in v["config"].items()},
                                     "size_mb": float(v["size_mb"]),
                                     "compression": float(v["compression"]),
                                     "bops": float(v["bops"]), "avg_bits": float(v["avg_bits"]),
                                     "omega": float(v["omega"]),
                                     "search_ms": frontier_ms}
                                 for k, v in picks.items()})
written = runtime.atomic_write_text(study.path("data", "frontier.csv"),
                                    frontier.to_frame().to_csv(index=False))
print(f"wrote data/configs.json ({len(picks)} picks) and data/{written.name} "
      f"({len(frontier)} points) for notebook 03")

# %% [markdown]
# ## Exercises
# 1. **HAWQ-V3's bits (checked).** Build the problem with candidate bits `[4, 8]` (HAWQ-V3's
#    set) and find the smallest model its frontier reaches, in MB and as a compression. Why can
#    it not reach 10× compression?
#    *Hint:* `search.Problem.from_model(model, omega[[4, 8]], [4, 8], a_bits=a_bits, policy=policy, input_size=study.input_size).frontier().points`; the first/last layers stay at 8 bits and the FP32 parameters stay FP32.
# 2. **A BOPs budget (checked).** Use `problem.frontier(cost="bops")` and pick the point with the
#    least ΣΩ whose BOPs do not exceed those of the first size pick above. Which layers get more
#    bits under the BOPs budget than under the size budget, and why?
#    *Hint:* `search.select(frontier, max_bops=…)`; MACs per weight = output pixels of the layer: 32², 16² or 8² in ResNet-20's three stages.
# 3. Time `problem.ilp(min_compression=r)` for 20 budgets against one `problem.frontier()` call
#    plus 20 `search.select(frontier, min_compression=r)` calls.
#    *Hint:* `time.perf_counter` around both; `benchmarks/search.py` does it carefully.
#
# Worked solutions: [`solutions/02_bit_allocation_solutions.ipynb`](solutions/02_bit_allocation_solutions.ipynb) (and its paired `.py`).

# %%
# YOUR CODE HERE (exercise 1): two numbers
smallest_mb_48 = ...          # the smallest size (MB) on the frontier with bits [4, 8]
max_compression_48 = ...      # its compression (FP32 size / size)

# %%
lessons.check_02_hawq_bits(smallest_mb_48, max_compression_48, model=model, omega=omega,
                           a_bits=a_bits, policy=policy, input_size=study.input_size)

# %%
size_pick = next(iter(picks.values()))   # the first pick of section 3 (a size budget)
# YOUR CODE HERE (exercise 2): a row of the BOPs frontier, as search.select returns it
bops_pick = ...

# %%
if lessons.check_02_bops_pick(bops_pick, problem=problem, size_pick=size_pick):
    stages = pd.DataFrame({"size budget": size_pick["config"], "BOPs budget": bops_pick["config"]})
    stages["stage"] = [name.split(".")[0] for name in stages.index]
    display(stages.groupby("stage", sort=False)[["size budget", "BOPs budget"]].mean().round(2))
