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
# # Solutions — 05 report
# From the committed quick-profile headline table (`results/quick/tables/headline.csv`:
# ResNet-20, CIFAR-10 JPEG q75 mirror, test top-1 mean over seeds 0, 1, 2 per row). The two
# fill-in exercises of the notebook (05.1, 05.2) are solved in the cells of exercises 1 and 3,
# with their checks.

# %% tags=["parameters"]
arch = "resnet20"
quick_dir = "../../results/quick"

# %%
from pathlib import Path

import pandas as pd

from hmqat import models, quant
from hmqat.study import lessons

headline = pd.read_csv(Path(quick_dir) / "tables" / "headline.csv", comment="#")

# %% [markdown]
# ## Exercise 05.1 (fill in) and exercise 1: a "BOPs compression" column
# FP32 BOPs = Σ MACs·32·32 (Eq. B with 32-bit weights and activations), per image.

# %%
model = models.create_model(arch)
macs = sum(info.macs for info in models.quantizable_layers(model))
fp32_bops = macs * 32 * 32
lessons.check_05_fp32_bops(fp32_bops, model, quant.DEFAULT_INPUT_SIZE)
fp32_gbops = fp32_bops / 1e9
headline["BOPs compression"] = fp32_gbops / headline["BOPs (G)"]
print(f"FP32: {macs / 1e6:.1f} M MACs = {fp32_gbops:.1f} GBOPs")
headline[["config", "size MB", "compression", "BOPs (G)", "BOPs compression", "test top-1"]].round(2)

# %% [markdown]
# ## Exercise 2: the fairest uniform baseline
# By size, each mixed config's neighbour is the uniform config of (nearly) the same size:
# "HMQAT =W3A4 size" against uniform W3A4, and "HMQAT 10.34x" sits between W3A4 and W2A4. By
# BOPs the picture changes. The mixed configs spend their bits where weights are many and MACs
# per weight are few, so at equal size they need *more* BOPs than uniform W3A4. The size
# comparison favours mixed precision more than the BOPs comparison does. The table gives, for
# each mixed row, the nearest uniform row by size and by BOPs.

# %%
uniform = headline[headline["config"].str.startswith("uniform")]
rows = []
for _, r in headline[headline["config"].str.startswith("HMQAT")].iterrows():
    by_size = uniform.iloc[(uniform["size MB"] - r["size MB"]).abs().argmin()]
    by_bops = uniform.iloc[(uniform["BOPs (G)"] - r["BOPs (G)"]).abs().argmin()]
    rows.append({"mixed": r["config"], "test top-1": r["test top-1"],
                 "nearest by size": f"{by_size['config']} ({by_size['test top-1']:.2f})",
                 "nearest by BOPs": f"{by_bops['config']} ({by_bops['test top-1']:.2f})"})
pd.DataFrame(rows)

# %% [markdown]
# ## Exercise 05.2 (fill in) and exercise 3: seeds needed for a 0.2-point difference
# The paired 95 % interval is d̄ ± t(0.975, n−1)·s_d/√n (docs/method.md §8). It excludes 0 when
# the half-width is below the difference, so we look for the smallest n with
# t(0.975, n−1)·s_d/√n < 0.2. s_d is the std of the per-seed differences; the headline table's
# std per row is an upper-bound-ish guide (paired differences cancel the shared noise). The
# table below gives n for a few plausible values: at s_d = 0.1 four seeds suffice, at 0.2
# seven, at 0.3 twelve: a 0.2-point claim needs a quiet metric or many seeds.

# %%
from scipy import stats as st


def seeds_needed(diff: float, sd: float, n_max: int = 200) -> int:
    """Smallest n >= 2 whose paired 95 % t interval half-width is below ``diff``."""
    for n in range(2, n_max + 1):
        if st.t.ppf(0.975, n - 1) * sd / n ** 0.5 < diff:
            return n
    return n_max


lessons.check_05_seeds_needed(seeds_needed)
pd.DataFrame({"s_d": [0.1, 0.2, 0.3], "seeds for 0.2 points": [seeds_needed(0.2, s) for s in
                                                               (0.1, 0.2, 0.3)]})
