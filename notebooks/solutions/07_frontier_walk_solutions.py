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
# # Solutions — 07 frontier walk
# Exercise 07.1 needs only the shape of notebook 07's table, so this answer builds one with the
# quick profile's proposed schedule: one epoch (390 steps) at the first point, then 20 scale-only
# and 40 fine-tune steps per transition, five points. With a results folder of a real run, read
# `tables/walk_frontier.csv` with `hmqat.study.reporting.read_table` instead.

# %% tags=["parameters"]
epoch_steps = 390
transition_steps = 60
n_points = 5

# %%
import pandas as pd

from hmqat.study import lessons, walk_study

walk_steps = [epoch_steps + k * transition_steps for k in range(n_points)]
table = pd.DataFrame({"point": [f"P{k}" for k in range(n_points)], "k": range(n_points),
                      "walk steps": walk_steps, "study budget steps": [epoch_steps] * n_points,
                      "equal steps trained": walk_steps})

# %% [markdown]
# ## Exercise 07.1 (fill in): the compute ratio
# One walk yields every point, so it costs its last cumulative step count; five separate runs
# cost five budgets.

# %%
def compute_ratio(table) -> float:
    ordered = table.sort_values("k")
    return float(ordered["walk steps"].iloc[-1]) / float(ordered["study budget steps"].sum())


lessons.check_07_compute_ratio(compute_ratio, table)
print(walk_study.compute_summary(table))

# %% [markdown]
# ## Exercise 3: how short may a transition be?
# The ratio is (E + (P − 1)·t) / (P·E) for an epoch of E steps, P points and t steps per
# transition: at E = 390 and P = 5 it stays ≤ 1/3 while t ≤ (5·390/3 − 390)/4 = 65 steps. Whether
# 65 steps recover the accuracy is what the a−c column of a real run answers.

# %%
limit = (n_points * epoch_steps / 3 - epoch_steps) / (n_points - 1)
print(f"at most {limit:.0f} steps per transition keep the walk within 1/3 of separate runs")
