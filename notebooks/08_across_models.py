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
# # 08 · Across models: does any conclusion change with depth?
#
# > - **You will:** put ResNet-20, -32 and -56 side by side: accuracy against size for mixed and
# >   uniform QAT, the paired differences at equal size, the Kendall τ of the trace-weighted Ω
# >   against the quantization error alone, and the PTQ gain of the allocation over random
# >   configs; time one QAT step of each model side by side; compute one paired difference by
# >   hand and one PTQ gain yourself (exercise 08.1, checked).
# > - **Prerequisites:** finished studies of the models to compare: `make reproduce
# >   PROFILE=quick` (ResNet-20, `results/quick`) and `make reproduce PROFILE=models` (ResNet-32
# >   and -56, `results/models/<arch>`). This notebook trains nothing that it reports; with the
# >   lab defaults it reads the committed folders and says which are missing. Notebooks 01, 03
# >   and 06 explain what is compared.
# > - **Run time with the lab defaults:** <!-- lab-time -->0.5 min, measured by the pipeline in the lab run of 2026-12-07 (2 CPU cores, git 431fef3); the chain of 9 notebooks took 46.2 min<!-- /lab-time -->
#
# HMQAT's abstract claims its strategy "consistently ensures optimal inference performance along
# the accuracy-size Pareto frontier **across multiple models**". On ResNet-20 the study found
# three things (notebooks 01, 03 and 06): the Hessian trace adds nothing measurable over the
# quantization error when ranking equal-size configs; mixed precision ties or loses to uniform at
# equal size after QAT; and the allocation clearly beats random configs of the same size at PTQ.
# Any of them could be a property of that one small network. Here the same study, with the same
# validation/test split, recipe and seeds, is read for deeper networks (docs/method.md §10), and
# the closing verdict, written by code, says for each conclusion whether its sign changes with
# depth.
#
# What "the same sign" means: a difference's 95 % interval lies above 0 (+), below 0 (−) or
# straddles it (0). A conclusion holds across models when every model gives the same sign.

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
a_bits = 4
recipe = {"distillation": {"enabled": True}}
# one model's study per folder, relative to the results root (results/)
model_results = ["quick", "models/resnet32", "models/resnet56"]
# the cost probe: QAT steps of each model timed side by side, in interleaved rounds
cost_steps = 5
cost_rounds = 1
cost_archs = ["resnet20", "resnet32", "resnet56"]

# %%
import pandas as pd

from hmqat.study import across_models, lessons, plotting, reporting
from hmqat.study.pipeline import Study

study = Study.from_params(globals())
lessons.ensure_upstream(study, "08_across_models")   # reads finished studies; computes nothing
models, missing = across_models.read_models(study.root.parent, model_results)
for line in missing:
    print("[not yet run]", line)
print(f"{len(models)} of {len(model_results)} models have finished: "
      f"{', '.join(m.arch for m in models) or 'none'}")

# %% [markdown]
# ## 1. The models
# One row per results folder: the architecture, its parameter count, the fine-tuned FP32 model's
# test top-1 and the profile and commit that produced it. Deeper networks have more layers to
# allocate bits to: 18, 30 and 54 convolutions, with the first convolution and the classifier
# fixed at 8 bits.

# %%
overview = pd.DataFrame([{
    "model": m.arch, "parameters": m.fp32.get("n_params"), "FP32 test top-1": m.fp32["test_top1"],
    "profile": m.profile, "folder": m.folder.name, "QAT runs": len(m.runs),
    "seeds": m.runs["seed"].nunique(), "commit": str(m.manifest.get("git_sha") or "")[:7],
} for m in models])
overview

# %% [markdown]
# ### From scratch: one paired difference by hand
# A comparison at equal size pairs the two configs **by seed**: both were trained from the same
# FP32 model with the same data order, so the seed-to-seed variation that both share cancels in
# the difference. Below: the per-seed differences of the first model's mixed pick at uniform
# W3A4's size and uniform W3A4 itself, their mean, and the same mean from `hmqat`.

# %%
first = models[0] if models else None
if first is not None and {"HMQAT =W3A4 size", "uniform W3A4"} <= set(first.runs["label"]):
    wide = first.runs.pivot_table(index="seed", columns="label", values="test_top1")
    by_hand = wide["HMQAT =W3A4 size"] - wide["uniform W3A4"]
    print(f"{first.arch}: per-seed differences {[round(d, 2) for d in by_hand]}, mean "
          f"{by_hand.mean():+.3f} points")
    library = reporting.paired_comparisons(first.runs, [("HMQAT =W3A4 size", "uniform W3A4")])
    print(f"hmqat: {library['diff'].iloc[0]:+.3f} points, 95 % CI "
          f"[{library['ci_low'].iloc[0]:+.2f}, {library['ci_high'].iloc[0]:+.2f}] over seeds "
          f"and test images (Eq. V)")
else:
    print("no model with both the =W3A4-size pick and uniform W3A4 yet")

# %% [markdown]
# ## 2. Accuracy against size
# Every configuration of notebook 03, for every model: the mean test top-1 over seeds and its
# standard deviation, against the model's size. Mixed picks are joined by a line per model.

# %%
points = across_models.accuracy_points(models)
reporting.write_table(points, study.tables / "across_models_points",
                      caption="Across models: test top-1 (mean ± std over seeds) vs size, every "
                              "notebook-03 config of every model, from each model's own results "
                              "folder",
                      data_label=study.data_label, profile=profile)
if not points.empty:
    fig = plotting.plot_across_models(points, subtitle=study.data_label)
    plotting.savefig(fig, study.figures / "across_models")
points

# %% [markdown]
# ## 3. Mixed against uniform, per model
# Notebook 03's comparisons for each model: the mixed pick minus uniform at equal size, and the
# 13.11× pick (HAWQ-V3's ResNet-20 budget) minus uniform W2A4, which is about 8 % larger and
# 2-bit everywhere. Intervals over seeds and test images (Eq. V, docs/method.md §8).

# %%
paired = across_models.paired_table(models)
reporting.write_table(paired, study.tables / "across_models_paired",
                      caption="Across models: a − b test top-1, paired over seeds and test images "
                              "(95 % CI, Eq. V); size gap and BOPs ratio of a to b",
                      data_label=study.data_label, profile=profile)
paired

# %% [markdown]
# ## 4. Does the trace help the ranking, per model?
# Notebook 01 ranks equal-size configs by each predictor and measures Kendall's τ against their
# PTQ loss increase on validation. `joint` is HMQAT's Ω (trace × quantization error);
# `qerr_only` drops the trace. The paired bootstrap interval of τ(joint) − τ(qerr_only) says
# whether the trace adds anything.

# %%
kendall = across_models.kendall_table(models)
reporting.write_table(kendall, study.tables / "across_models_kendall",
                      caption="Across models: Kendall tau of joint and qerr_only vs the PTQ loss "
                              "increase of equal-size configs (bootstrap 95 % CIs) and their "
                              "paired difference",
                      data_label=study.data_label, profile=profile)
kendall

# %% [markdown]
# ## 5. Allocation against random, at PTQ
# For each budget of notebook 01's PTQ frontier: the joint pick's validation top-1 and the median
# of random configs of the same size (4-bit activations, BN re-estimated, no QAT).
#
# ### Exercise 08.1 (fill in): the PTQ gain
# Write `ptq_gain(ptq, compression)`: for one model's frontier table `ptq` (columns `variant`,
# `target_compression`, `top1`, `random_median`), the joint pick's top-1 minus the random median
# at `compression`, in points.

# %%
def ptq_gain(ptq, compression) -> float:
    """The joint pick's top-1 minus the median of the random same-size configs (points)."""
    # YOUR CODE HERE
    raise NotImplementedError


if models:
    lessons.check_08_ptq_gain(ptq_gain, models[0].ptq)

# %%
gains = across_models.ptq_gain_table(models)
reporting.write_table(gains, study.tables / "across_models_ptq_gain",
                      caption="Across models: PTQ top-1 (validation) of the joint pick minus the "
                              "median of random same-size configs",
                      data_label=study.data_label, profile=profile)
gains

# %% [markdown]
# ## 6. What a deeper model costs
# Each model's QAT step, timed side by side in this process (`cost_rounds` interleaved rounds of
# `cost_steps` steps, uniform W4A4 with the study's recipe, fresh weights; the median per step),
# and each model's measured wall time per notebook from its own manifest (minutes; earlier
# interrupted attempts included). The two agree only roughly: the manifests were measured in
# different runs, possibly under different load.

# %%
cost = across_models.step_cost(cost_archs, study.train_loader(), steps=cost_steps,
                               rounds=cost_rounds, num_classes=len(study.data("train").classes),
                               recipe=recipe, a_bits=a_bits, device=study.dev)
reporting.write_table(cost, study.tables / "across_models_step_cost",
                      caption=f"QAT seconds per optimizer step, timed side by side ({cost_rounds} "
                              f"round(s) of {cost_steps} steps, batch {batch_size}, median)",
                      data_label=study.data_label, profile=profile)
walls = across_models.wall_times(models)
reporting.write_table(walls, study.tables / "across_models_wall_time",
                      caption="Measured wall time of each model's study per notebook (minutes, "
                              "from its manifest; the steps every model runs)",
                      data_label=study.data_label, profile=profile)
cost

# %%
walls

# %% [markdown]
# ## 7. What the numbers support
# Written by code from the tables above: for each conclusion, the sign of its interval in each
# model, and whether it changes with depth.

# %%
verdict = [f"Not yet run: {line}" for line in missing]
verdict += across_models.verdict(kendall, paired, gains)
study.save_json("across_models.json", {
    "models": [m.arch for m in models], "verdict": verdict,
    "step_cost": cost.to_dict(orient="records"), "wall_time": walls.to_dict(orient="records")})
for line in verdict:
    print("*", line)

# %% [markdown]
# ## Exercises
# 0. Exercise 08.1 above: the PTQ gain, checked by `lessons.check_08_ptq_gain`.
#    *Hint:* select the `joint` row at `target_compression == compression`, then subtract its
#    `random_median` from its `top1`.
# 1. The cost probe measures ResNet-56's step at some multiple of ResNet-20's. Compare it with
#    the ratio of their FP32 BOPs (`hmqat.quant.bops(model)` of `create_model("resnet56")` and
#    of `create_model("resnet20")`). Which grows faster, and why might a CPU step not follow the
#    operation count exactly?
#    *Hint:* `cost` holds the ratios; depth adds blocks of the same widths, so the operations
#    grow about linearly with the block count (9 vs 27 blocks).
# 2. Which conclusion would you trust least at a new depth, and how many seeds would make its
#    interval exclude 0? Use notebook 05's seeds-needed formula with the per-model `paired`
#    half-widths.
#    *Hint:* the image term of Eq. V does not shrink with seeds (notebook 06).
#
# Worked answers: `solutions/08_across_models_solutions.ipynb`.
