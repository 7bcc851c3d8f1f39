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
# # Solutions — 08 across models
# Exercise 08.1 reads one model's PTQ frontier table (notebook 01); this answer uses the committed
# quick profile's ResNet-20 (`results/quick`). Point `model_folder` at any finished study, e.g.
# `../../results/models/resnet56` after `make reproduce PROFILE=models`.

# %% tags=["parameters"]
model_folder = "../../results/quick"

# %%
from hmqat.study import across_models, lessons

model = across_models.read_model(model_folder)
ptq = model.ptq
ptq[ptq["variant"].isin(["joint", "qerr_only"])]

# %% [markdown]
# ## Exercise 08.1 (fill in): the PTQ gain
# The joint pick's row at the budget, minus the median of the random configs of that size.

# %%
def ptq_gain(ptq, compression) -> float:
    """The joint pick's top-1 minus the median of the random same-size configs (points)."""
    row = ptq[(ptq["variant"] == "joint") & (ptq["target_compression"] == compression)].iloc[0]
    return float(row["top1"] - row["random_median"])


lessons.check_08_ptq_gain(ptq_gain, ptq)

# %% [markdown]
# ## Exercise 1: the step cost against the operation count
# Depth adds blocks of the same widths: 9 blocks in ResNet-20, 27 in ResNet-56, so the
# operations grow about 3×. A CPU step also pays per-layer overheads (kernel launches, the
# quantizers' elementwise work, Python), which do not shrink with the layer's size, so the
# measured ratio (notebook 08's `cost` table) need not equal the BOPs ratio.

# %%
from hmqat import quant
from hmqat.models import create_model

fp32_bops = {arch: quant.bops(create_model(arch)) for arch in ("resnet20", "resnet56")}
print(f"FP32 BOPs, ResNet-56 / ResNet-20: {fp32_bops['resnet56'] / fp32_bops['resnet20']:.2f}")
