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
# # 01 · Which layers are sensitive? Hessian traces and the Ω table
#
# > - **You will:** estimate per-layer Hessian traces with Hutchinson's method and read their
# >   standard errors; turn traces into the sensitivity Ω_i(b); test whether Ω predicts the damage
# >   of real quantization (Spearman ρ).
# > - **Prerequisites:** notebook 00 (the fine-tuned FP32 model); gradients and the chain rule;
# >   the trace of a matrix.
# > - **Run time with the lab defaults:** 6.2 min measured on this project's shared 2-core CPU
# >   (load average 10–17), kernel start included.
#
# Quantizing layer $i$ to $b$ bits perturbs its weights by $\Delta W_i = Q_b(W_i) - W_i$. Near a
# trained minimum the gradient is small, so a second-order Taylor expansion of the loss gives
#
# $$\Delta\mathcal{L} \approx \tfrac12 \sum_i \Delta W_i^\top H_{ii}\, \Delta W_i ,$$
#
# where $H_{ii}$ is the block of the loss Hessian for layer $i$. HAWQ-V2 replaces the quadratic form
# by the **average Hessian trace** $\bar T_i = \mathrm{Tr}(H_{ii})/n_i$ times the perturbation size:
#
# $$\Omega_i(b) = \bar T_i\, \lVert Q_b(W_i) - W_i \rVert_2^2 .$$
#
# This is the "joint average Hessian trace and parameter size" of HMQAT's abstract: $\lVert\Delta
# W_i\rVert^2$ grows with the layer's size $n_i$, so a large layer with a moderate trace can matter
# as much as a small, very curved one.
#
# **Hutchinson's estimator.** The Hessian of ResNet-20 has $0.27\,\mathrm{M}^2$ entries, so we
# never form it. For a Rademacher vector $v$ (entries $\pm1$), $\mathbb E[v^\top H v] =
# \mathrm{Tr}(H)$, and $Hv$ costs one extra back-propagation (double backprop). One HVP over *all*
# layers would give every block's $v_i^\top (Hv)_i$ at once (cross-block terms vanish in
# expectation), but they do not vanish in the *variance*: on ResNet-20 they made each sample
# 5–67× noisier. So `layer_traces` probes one layer at a time, with a second backward that stops at
# that layer (cheap for late layers), gives every 16-image micro-batch its own probes, reports a
# standard error, and stops when every layer's relative standard error is below `tol`
# (docs/method.md §3 has the measurements).
#
# Finally we **check** that Ω predicts damage: quantize the FP32 model post-training with ≥30 random
# bit configurations and correlate ΣΩ with the measured loss increase (Spearman ρ).

# %% tags=["parameters"]
results_dir = "../results/lab"
profile = "lab"
arch = "resnet20"
dataset = "cifar10"
n_synthetic = 0
seed = 0
device = "auto"
batch_size = 128
bits = [2, 3, 4, 5, 6, 8]
policy = "first_last_8"
init = "mse"
calib_samples = 1024
calib_batch = 256
trace_tol = 0.1
trace_max_probes = 32
val_configs = 30
val_samples = 1000

# %%
import time

from hmqat import data, hessian, models, quant, runtime, sensitivity
from hmqat.study import plotting, reporting
from hmqat.study.pipeline import Study

study = Study.from_params(globals())
model = study.fp32_model()
print(study.subtitle())

# %% [markdown]
# ### From scratch: one Hutchinson probe
# Before the library call, Eq. H1 by hand for the last layer. Draw a Rademacher vector $v$, get
# $Hv$ by differentiating the gradient once more, and form $v^\top H v$. One probe is an unbiased
# but noisy estimate of $\mathrm{Tr}(H)$, on one batch. `layer_traces` averages many probes over
# every calibration batch and reports their standard error. Compare this number with the last
# row of the table below, which shows $\bar T = \mathrm{Tr}/n$.

# %%
import torch

name = models.quantizable_layers(model)[-1].name
w = model.get_submodule(name).weight
x0, y0 = data.calibration_batches(study.data("train"), n_samples=64, batch_size=64, seed=seed,
                                  device=study.dev)[0]
model.eval()
loss = torch.nn.functional.cross_entropy(model(x0), y0)
(g,) = torch.autograd.grad(loss, w, create_graph=True)          # ∇_w L, kept differentiable
v = torch.randint(0, 2, w.shape, generator=torch.Generator().manual_seed(seed)).to(w) * 2 - 1
(hv,) = torch.autograd.grad(g, w, grad_outputs=v)               # H v by double backprop
probe = float((v * hv).sum())
print(f"{name}: one probe vᵀHv = {probe:.4g}, i.e. T̄ ≈ {probe / w.numel():.4g} "
      f"({w.numel()} weights, 64 images)")

# %% [markdown]
# ## 1. Per-layer average traces with error bars
# The calibration set is a seeded random subset of the *training* split. Results are cached on
# disk, keyed by a hash of the weights, the data, the seed and the settings.

# %%
calib = data.calibration_batches(study.data("train"), n_samples=calib_samples,
                                 batch_size=calib_batch, seed=seed, device=study.dev)
traces = hessian.layer_traces(model, calib, tol=trace_tol, max_probes=trace_max_probes, seed=seed,
                              device=study.dev, cache_dir=study.root / "cache")
runtime.atomic_write_text(study.path("data", "traces.csv"), traces.to_csv())
print(f"up to {traces['probes'].max()} probes per layer ({traces.attrs['hvps']} HVPs), "
      f"{traces.attrs['wall_s']:.1f} s, converged: {traces.attrs['converged']}")
traces[["n_params", "avg_trace", "avg_trace_se", "rel_se", "probes"]]

# %%
with plotting.use_style():
    fig = plotting.plot_layer_traces(traces, title="Average Hessian trace per layer",
                                     subtitle=study.subtitle())
    plotting.savefig(fig, study.figures / "layer_traces")
table = traces.reset_index()[["layer", "n_params", "avg_trace", "avg_trace_se", "rel_se", "probes"]]
reporting.write_table(table, study.tables / "layer_traces",
                      caption="Per-layer average Hessian trace (Hutchinson, mean ± SE)",
                      data_label=study.data_label, profile=profile,
                      float_format={"avg_trace": "{:.3e}", "avg_trace_se": "{:.1e}",
                                    "rel_se": "{:.3f}"})

# %% [markdown]
# ## 2. The Ω table
# $\Omega_i(b)$ for every layer and candidate bit width, for the default `joint` form and the
# variants that notebook 04 ablates (`trace_size`: analytic noise $n_i\Delta_b^2/12$;
# `trace`: the trace alone; `size_only`: no Hessian; `random`: a control).
# The quantization error uses the same quantizer and initial step as QAT.

# %%
variants = list(sensitivity.VARIANTS)
omegas = {v: sensitivity.omega_table(model, traces, bits=bits, variant=v, seed=seed,
                                       method=init)
          for v in variants}
for v, om in omegas.items():
    runtime.atomic_write_text(study.path("data", f"omega_{v}.csv"), om.to_csv())
omegas["joint"]

# %% [markdown]
# ## 3. Does Ω predict the damage? (HAWQ-V2 claims it; we measure it)

# %%
t0 = time.perf_counter()
held_out = data.calibration_batches(study.data("test"), n_samples=val_samples, batch_size=500,
                                    seed=seed + 1, device=study.dev)
fixed = quant.fixed_layers(model, policy)
per_config, summary = sensitivity.validate_omega(model, omegas, held_out, n_configs=val_configs,
                                                 bits=bits, fixed=fixed, seed=seed,
                                                 method=init)
runtime.atomic_write_text(study.path("data", "omega_validation.csv"),
                            per_config.to_csv(index=False))
reporting.write_table(summary, study.tables / "omega_spearman",
                      caption=f"Spearman rho between sum of Omega and the measured loss increase "
                              f"over {val_configs} random post-training bit configs",
                      data_label=study.data_label, profile=profile,
                      float_format={"spearman_p": "{:.1e}", "partial_p": "{:.2f}"})
print(f"validation: {time.perf_counter() - t0:.0f} s")
summary

# %%
with plotting.use_style():
    rho = dict(zip(summary["variant"], summary["spearman_rho"]))
    fig = plotting.plot_omega_validation(per_config, spearman=rho,
                                         title="Predicted (ΣΩ) vs measured loss increase",
                                         subtitle=study.subtitle())
    plotting.savefig(fig, study.figures / "omega_validation")

# %% [markdown]
# ## Exercises
# 1. Run the estimator with `trace_tol=0.2` and `0.02`. How do the error bars and wall time scale
#    with the number of probes? (Standard error ∝ 1/√probes.)
#    *Hint:* look at `probes`, `rel_se` and `attrs["wall_s"]` of the two frames; a 10× smaller SE needs ~100× the probes.
# 2. Which layers have the largest average trace, and which the largest Ω at 2 bits? Why do the two
#    rankings differ?
#    *Hint:* Ω_i(b) = T̄_i·‖Q_b(W_i) − W_i‖²: which factor grows with the number of weights?
# 3. Replace the calibration subset by 128 images. Is the Spearman ρ of the `joint` variant still
#    higher than `size_only`'s?
#    *Hint:* `calib_samples` is a parameter; with 32 configs, how wide is a Spearman ρ's confidence interval?
#
# Worked solutions: [`solutions/01_sensitivity_solutions.ipynb`](solutions/01_sensitivity_solutions.ipynb) (and its paired `.py`).
