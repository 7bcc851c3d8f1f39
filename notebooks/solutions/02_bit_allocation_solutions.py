# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     formats: ipynb,py:percent
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
# # Solutions — 02 bit allocation
# All three exercises run on the committed quick-profile Ω table (`results/quick/data/
# omega_joint.csv`: ResNet-20, CIFAR-10 JPEG q75 mirror) and the model's accounting, so the
# numbers are real and take seconds.

# %% tags=["parameters"]
arch = "resnet20"
quick_dir = "../../results/quick"
n_budgets = 20
a_bits = 4

# %%
import time
from pathlib import Path

import pandas as pd

from hmqat import models, search

model = models.create_model(arch)
omega = pd.read_csv(Path(quick_dir) / "data" / "omega_joint.csv", index_col="layer")
omega.columns = [int(c) for c in omega.columns]
inp = search.model_inputs(model, a_bits=a_bits)

# %% [markdown]
# ## Exercise 1: candidate bits {4, 8}
# The smallest model puts every free layer at 4 bits. Its compression is below 32/4 = 8×,
# because the first and last layers stay at 8 bits and biases, BN and steps stay FP32. So no
# budget of 10× is reachable with HAWQ-V3's set: `select` says so.

# %%
for bits in ([4, 8], [2, 3, 4, 5, 6, 8]):
    fr = search.model_frontier(model, omega[bits], bits=bits, a_bits=a_bits)
    pts = fr.points
    print(f"bits {bits}: {len(pts)} frontier points, smallest {pts['size_mb'].min():.3f} MB "
          f"= {pts['compression'].max():.2f}x")
try:
    search.select(search.model_frontier(model, omega[[4, 8]], bits=[4, 8], a_bits=a_bits),
                  min_compression=10)
except Exception as exc:  # the message names the feasible range
    print(type(exc).__name__, ":", exc)

# %% [markdown]
# ## Exercise 2: a BOPs budget instead of a size budget
# BOPs weigh a layer by its MACs, size by its weights. MACs per weight = output pixels: 32×32 in
# stage 1, 16×16 in stage 2, 8×8 in stage 3. Under a BOPs budget, bits in stage 3 are cheap
# (few MACs per weight), so stage 3 gets more bits and stage 1 fewer than under a size budget.
# Both picks below sit at about the same Ω.

# %%
by_size = search.model_frontier(model, omega, a_bits=a_bits)
by_bops = search.model_frontier(model, omega, a_bits=a_bits, cost="bops")
pick_size = search.select(by_size, min_compression=10.34)
pick_bops = search.select(by_bops, max_bops=float(pick_size["bops"]))
cmp = pd.DataFrame({"size budget": pick_size["config"], "BOPs budget": pick_bops["config"]})
cmp["stage"] = [n.split(".")[0] for n in cmp.index]
print(f"size pick: Ω {pick_size['omega']:.3f}, {pick_size['bops'] / 1e9:.2f} GBOPs; "
      f"BOPs pick: Ω {pick_bops['omega']:.3f}, {pick_bops['bops'] / 1e9:.2f} GBOPs")
cmp.groupby("stage", sort=False)[["size budget", "BOPs budget"]].mean().round(2)

# %% [markdown]
# ## Exercise 3: one frontier + n lookups vs n ILP solves
# The frontier is computed once (exactly), then every budget is a binary search. The ILP
# (HAWQ-V3) is solved from scratch for each budget. `benchmarks/search.py` has the careful
# version (medians over repeats).

# %%
lo, hi = by_size.points["compression"].min(), by_size.points["compression"].max()
budgets = [lo + (hi - lo) * (k + 1) / (n_budgets + 1) for k in range(n_budgets)]
t0 = time.perf_counter()
fr = search.model_frontier(model, omega, a_bits=a_bits)
dp = [search.select(fr, min_compression=b)["omega"] for b in budgets]
t_dp = time.perf_counter() - t0
t0 = time.perf_counter()
ilp = [search.ilp_select(omega, inp["n_params"], min_compression=b, a_bits=inp["a_bits"],
                         fixed=inp["fixed"], other_params=inp["other_params"],
                         fp32_params=inp["fp32_params"]).omega for b in budgets]
t_ilp = time.perf_counter() - t0
same = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(dp, ilp))
print(f"{n_budgets} budgets: frontier + lookups {t_dp * 1e3:.0f} ms, ILP {t_ilp * 1e3:.0f} ms "
      f"({t_ilp / t_dp:.0f}x); largest relative Ω difference {same:.1e}")
