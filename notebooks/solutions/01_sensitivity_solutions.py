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
# # Solutions — 01 sensitivity
# Exercises 1 and 3 recompute traces on the data in use (lab settings by default; the test suite
# runs them on synthetic data with tiny settings). Exercise 2 reads the committed quick-profile
# results (`results/quick/data/`: ResNet-20, CIFAR-10 JPEG q75 mirror), so its numbers are real.

# %% tags=["parameters"]
arch = "resnet20"
dataset = "cifar10"
n_synthetic = 0
pretrained = True
quick_dir = "../../results/quick"
tols = [0.2, 0.02]
max_probes = 100
n_calib = 512
small_calib = 128
n_configs = 32
val_size = 5000              # validation hold-out from the training split (not the test split)
seed = 0

# %%
import time
from pathlib import Path

import pandas as pd
import torch

from hmqat import data, hessian, models, quant, sensitivity

torch.manual_seed(seed)
model = models.create_model(arch, pretrained=pretrained).eval()
train_ds = data.load_dataset(dataset, "train", n_synthetic=n_synthetic, seed=seed)
calib = data.calibration_batches(train_ds, n_samples=n_calib, batch_size=128, seed=seed)

# %% [markdown]
# ## Exercise 1: error bars and wall time against the tolerance
# The standard error of a mean of r probes falls like 1/√r. To shrink the relative SE ten times
# (0.2 → 0.02) the estimator needs about 100× the probes, and the wall time grows the same way.
# The table checks it: `rel_se·√probes` stays roughly constant per layer while probes and time
# grow. The last column compares each run with the exact traces of the same images
# (`method="gauss_newton"`): the deviation should be of the order of the run's own rel. SE.

# %%
exact = hessian.layer_traces(model, calib, method="gauss_newton", progress=False)
rows = []
for tol in tols:
    t0 = time.perf_counter()
    df = hessian.layer_traces(model, calib, tol=tol, max_probes=max_probes, seed=seed,
                              progress=False)
    gap = (df["trace"] / exact["trace"] - 1).abs()
    rows.append({"tol": tol, "wall_s": time.perf_counter() - t0, "hvps": df.attrs["hvps"],
                 "median probes": df["probes"].median(), "median rel_se": df["rel_se"].median(),
                 "median rel_se·√samples": (df["rel_se"] * df["samples"] ** 0.5).median(),
                 "median |rel. deviation from exact|": gap.median()})
rows.append({"tol": "exact", "wall_s": exact.attrs["wall_s"], "hvps": 0, "median probes": 0,
             "median rel_se": 0.0})
pd.DataFrame(rows)

# %% [markdown]
# ## Exercise 2: largest average trace vs largest Ω at 2 bits (quick-profile results)
# Ω_i(b) = T̄_i · ‖Q_b(W_i) − W_i‖² (docs/method.md §3). The trace ranks curvature per weight;
# Ω also counts how many weights a layer has and how coarse its 2-bit grid is. The first conv
# has a large trace but few weights. The wide stage-3 convs have small traces but many weights,
# so they move up the Ω ranking.

# %%
quick = Path(quick_dir)
traces = pd.read_csv(quick / "data" / "traces.csv", index_col="layer")
omega = pd.read_csv(quick / "data" / "omega_joint.csv", index_col="layer")
ranks = pd.DataFrame({"avg_trace": traces["avg_trace"], "n_params": traces["n_params"],
                      "omega@2": omega["2"]})
ranks["trace rank"] = ranks["avg_trace"].rank(ascending=False).astype(int)
ranks["Ω@2 rank"] = ranks["omega@2"].rank(ascending=False).astype(int)
print("Spearman ρ between the two rankings:",
      round(ranks["avg_trace"].corr(ranks["omega@2"], method="spearman"), 2))
ranks.sort_values("trace rank").head(8)

# %% [markdown]
# ## Exercise 3: 128 calibration images
# Fewer images make the traces noisier *and* a biased sample of the data. Recompute the Ω
# variants on `small_calib` images and validate them against the measured damage of random
# post-training configs, as notebook 01 does. Read the answer off the table: compare `joint`
# with `qerr_only` (the quantization error alone; formerly `size_only`). With 32 configs the Spearman ρ's have wide confidence intervals (±0.2 or
# so); a difference smaller than that is not evidence either way.

# %%
small = data.calibration_batches(train_ds, n_samples=small_calib, batch_size=128, seed=seed)
tr = hessian.layer_traces(model, small, tol=tols[0], max_probes=max_probes, seed=seed,
                          progress=False)
omegas = {v: sensitivity.omega_table(model, tr, variant=v, method="mse")
          for v in ("joint", "qerr_only")}
val_ds = data.load_dataset(dataset, "val", n_synthetic=n_synthetic, seed=seed, val_size=val_size)
evals = data.calibration_batches(val_ds, n_samples=min(1000, len(val_ds)), batch_size=250,
                                 seed=seed)
_, summary = sensitivity.validate_omega(model, omegas, evals, n_configs=n_configs,
                                        fixed=quant.fixed_layers(model), method="mse",
                                        progress=False)
summary
