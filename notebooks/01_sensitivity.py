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
# > - **You will:** compute per-layer average Hessian traces exactly (the Gauss-Newton identity,
# >   `trace_method = "auto"`), after one Hutchinson probe by hand; read the traces' data
# >   standard errors; turn traces into the sensitivity Ω_i(b); test whether Ω tells sensitivity
# >   apart from size at fixed size (Kendall τ with bootstrap CIs).
# > - **Prerequisites:** notebook 00 (the fine-tuned FP32 model; when it has not run, the first
# >   code cell runs it and says so); gradients and the chain rule; the trace of a matrix.
# > - **Run time with the lab defaults:** <!-- lab-time -->11.4 min, measured by the pipeline in the lab run of 2026-12-07 (2 CPU cores, git 431fef3); the chain of 9 notebooks took 46.2 min<!-- /lab-time -->
# > - **Exercises:** 2 and 3 are checked by code (`lessons.check_…` after a `# YOUR CODE HERE`
# >   cell); exercise 1 is open.
# > - **Lab defaults vs the quick profile** (`make reproduce`): 256 calibration images (quick:
# >   512), the one-layer check at 2 bits (quick: 2, 3 and 4), the matched-noise control on every
# >   2nd layer (quick: every layer), 4 additivity configs (16), 10 fixed-size configs (64), one
# >   PTQ frontier budget with 4 random configs (three budgets with 20 each) and 2 calibration
# >   sets for the variability check (3). The lab run shows every part
# >   of the study with wider confidence intervals; quote the quick profile's numbers
# >   (docs/method.md §3).
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
# 5–67× noisier. So `layer_traces(method="hutchinson")` probes one layer at a time, with a second
# backward that stops at that layer (cheap for late layers), gives every 16-image micro-batch its
# own probes, reports a standard error, and stops when every layer's relative standard error is
# below `tol` (docs/method.md §3 has the measurements). This notebook's default,
# `trace_method = "auto"`, needs no probes for ResNet-20: the Gauss-Newton identity below gives
# the traces exactly. Hutchinson remains the estimator for smooth activations (SiLU, GELU), and
# exercise 1 compares the two.
#
# Finally we **check** whether Ω tells sensitivity apart from size (docs/method.md §3). An earlier
# check correlated ΣΩ with the damage of random configs spanning 2.4–7.7 average bits; every Ω
# variant then mostly measured the average bit width, so it could not discriminate. Here every
# test holds size fixed or works one layer at a time, every measured loss and accuracy is on the
# validation split (`val_size` images, docs/method.md §8), and the baselines are named for what
# they are: `param_size` (n_i·4^-b, no data), `qerr_only` (‖ΔW‖², no Hessian), `permuted_trace`
# (traces shuffled between layers), `fisher` (diagonal empirical Fisher) and `exact_quad`
# (ΔWᵀH_iiΔW, one Hessian-vector product per cell).

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
policy = "first_last_8"
init = "mse"
calib_samples = 256
calib_batch = 128
trace_tol = 0.1
trace_max_probes = 32
trace_method = "auto"          # exact Gauss-Newton traces where they apply, probes elsewhere
a_bits = 4
fp32_checkpoint = ""
single_bits = [2]
noise_pairs = 1
noise_every = 2                # the matched-noise control on every 2nd layer (quick: every layer)
additivity_configs = 4
fixed_configs = 10
target_compression = 10.34
frontier_compressions = [10.34]
frontier_random = 4
variability_sets = 2
variability_tol = 0.1

# %%
import functools
import json

from IPython.display import display

from hmqat import data, hessian, models, runtime, sensitivity
from hmqat.study import lessons, plotting, reporting, sensitivity_study
from hmqat.study.pipeline import Study

study = Study.from_params(globals())
# notebook 00's checkpoint, computed first (at the lab profile) when this notebook runs alone
lessons.ensure_upstream(study, "01_sensitivity",
                        skip=("00_fp32_baseline",) if fp32_checkpoint else ())
# fp32_checkpoint "": notebook 00's model; else e.g. a model fine-tuned on train minus the
# validation hold-out (a path from the repository root; a checkpoint or a plain state dict)
model = study.fp32_model(fp32_checkpoint)
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
# ### Without probes: the Gauss-Newton identity
# For one layer, $H_{ii} = J_i^\top \Lambda J_i + \sum_c \partial\ell/\partial z_c\,
# \partial^2 z_c/\partial W_i^2$ ($J_i$ the Jacobian of the logits $z$, $\Lambda$ the Hessian of
# the loss in the logits). With ReLU, eval-mode BatchNorm, convolutions and residual sums the
# logits are piecewise linear in $W_i$, so the second term is zero and, writing
# $\Lambda_n = F_n F_n^\top$ per image, $\mathrm{Tr}(H_{ii}) = \frac1N\sum_n \lVert
# J_{n,i}^\top F_n\rVert_F^2$: ten vector-Jacobian products per image (one per class), all layers
# at once, and **no probe noise** (docs/method.md §3, Eqs. H5–H7). `layer_traces(method="auto")`
# checks the identity on one batch and uses it; a model with smooth activations (SiLU, GELU)
# keeps the Hutchinson probes above. The cell below compares the two on the last layer.

# %%
exact = hessian.gauss_newton_traces(model, [(x0, y0)], layers=[name])
print(f"{name}: exact T̄ on the same 64 images = {exact.loc[name, 'avg_trace']:.4g}; the single "
      f"probe above was {probe / w.numel():.4g}")

# %% [markdown]
# ## 1. Per-layer average traces with error bars
# The calibration set is a seeded random subset of the *training* split (without the validation
# images, when they are drawn from it); section 3 measures every loss on the validation split.
# With exact traces the probe error bars are zero; `data_se` is the standard error over the
# calibration images: how far another calibration set of the same size would move T̄.
# Results are cached on disk, keyed by a hash of the weights, the data, the seed and the settings.

# %%
train_ds = study.data("train")                       # never holds a validation image
val_ds = study.data("val") if val_size > 0 else None
calib = data.calibration_batches(train_ds, n_samples=calib_samples, batch_size=calib_batch,
                                 seed=seed, device=study.dev)
traces = hessian.layer_traces(model, calib, tol=trace_tol, max_probes=trace_max_probes, seed=seed,
                              device=study.dev, cache_dir=study.root / "cache",
                              method=trace_method)
runtime.atomic_write_text(study.path("data", "traces.csv"), traces.to_csv())
if traces.attrs["method"] == "gauss_newton":      # exact (or output-space probes): VJPs, no HVPs
    k = traces.attrs["projections"]
    how = "exact" if k is None else f"{k} output-space probes per image"
    print(f"method gauss_newton, {how}: {traces.attrs['vjps']} VJPs, "
          f"{traces.attrs['wall_s']:.1f} s")
else:                                            # Hutchinson: HVPs until rel_se <= tol
    print(f"method hutchinson: up to {traces['probes'].max()} probes per layer "
          f"({traces.attrs['hvps']} HVPs), {traces.attrs['wall_s']:.1f} s, converged: "
          f"{traces.attrs['converged']}")
traces[[c for c in ("n_params", "avg_trace", "avg_trace_se", "rel_se", "probes", "data_se")
        if c in traces]]

# %%
with plotting.use_style():
    fig = plotting.plot_layer_traces(traces, title="Average Hessian trace per layer",
                                     subtitle=study.subtitle())
    plotting.savefig(fig, study.figures / "layer_traces")
table = traces.reset_index()[["layer", "n_params", "avg_trace", "avg_trace_se", "rel_se", "probes"]]
estimator = ("exact Gauss-Newton traces: no probe error, avg_trace_se 0"
             if traces.attrs["method"] == "gauss_newton" and traces.attrs.get("projections") is None
             else f"{traces.attrs['method']} estimate, mean ± SE")
written = reporting.write_table(table, study.tables / "layer_traces",
                                caption=f"Per-layer average Hessian trace ({estimator})",
                                data_label=study.data_label, profile=profile,
                                float_format={"avg_trace": "{:.3e}", "avg_trace_se": "{:.1e}",
                                              "rel_se": "{:.3f}"})
print("table written:", ", ".join(p.name for p in written.values()))

# %% [markdown]
# ## 2. The Ω table
# $\Omega_i(b)$ for every layer and candidate bit width, for the default `joint` form and the
# variants and baselines of docs/method.md §3 (`trace_size`: analytic noise $n_i\Delta_b^2/12$;
# `trace`: the trace alone; `param_size`, `qerr_only`, `permuted_trace`, `fisher`,
# `exact_quad`). The quantization error uses the same quantizer and initial step as QAT.

# %%
omegas = {v: sensitivity.omega_table(model, traces, bits=bits, variant=v, seed=seed,
                                       method=init, batches=calib)
          for v in sensitivity.VARIANTS}
for v, om in omegas.items():
    runtime.atomic_write_text(study.path("data", f"omega_{v}.csv"), om.to_csv())
for old, new in sensitivity.DEPRECATED_VARIANTS.items():   # old file names, for one release
    runtime.atomic_write_text(study.path("data", f"omega_{old}.csv"), omegas[new].to_csv())
omegas["joint"]

# %% [markdown]
# ## 3. Does Ω tell sensitivity apart from size?
# Six experiments (docs/method.md §3), cheapest first, all measured on the validation split:
# one layer at a time (Taylor vs the isotropic trace approximation), matched isotropic noise
# (the traces themselves), additivity, fixed-size configurations (Kendall τ, bootstrap CIs),
# PTQ frontier curves against random configs of the same size, and how much the traces move
# between disjoint calibration sets. Each finished stage's raw frame is written to
# `data/sensitivity/`; a rerun with the same model and settings resumes finished stages from
# its cache (`cache/sensitivity/`), any change recomputes.

# %%
if val_ds is not None:
    split_label = (f"measured on the validation split ({study.split_label}); calibration "
                   f"images from the training split")
    report = functools.partial(sensitivity_study.write_study_report, root=study.root,
                               data_label=study.data_label, profile=profile,
                               split_label=split_label)
    res = sensitivity_study.run_study(
        model, train_ds, val_ds, study.root, bits=bits, a_bits=a_bits, policy=policy,
        method=init, calib_samples=calib_samples, calib_batch=calib_batch, trace_tol=trace_tol,
        trace_max_probes=trace_max_probes, trace_method=trace_method, single_bits=single_bits,
        noise_pairs=noise_pairs, noise_every=noise_every,
        additivity_configs=additivity_configs, fixed_configs=fixed_configs,
        target_compression=target_compression, frontier_compressions=frontier_compressions,
        frontier_random=frontier_random, variability_sets=variability_sets,
        variability_tol=variability_tol, seed=seed, report=report,
        omega_tables=omegas)   # section 2's tables: the costly fisher/exact_quad are not redone
    tables = sensitivity_study.study_tables(res)
else:
    res, tables = {}, {}
    print("val_size = 0: the discrimination study is skipped in this profile")

# %%
for stem in ("single_layer_summary", "noise_summary", "additivity_summary"):
    if stem in tables:
        print(tables[stem][1])
        display(tables[stem][0])  # noqa: F821 (IPython)

# %% [markdown]
# Fixed size: Kendall τ of ΣΩ with the PTQ loss increase (4-bit activations, BN re-estimated),
# and τ(joint) − τ(other) from the same bootstrap resamples.

# %%
if "kendall_fixed_size" in tables:
    display(tables["kendall_fixed_size"][0])  # noqa: F821
if "ptq_frontier_summary" in tables:
    display(tables["ptq_frontier_summary"][0])  # noqa: F821
for stem in ("trace_variability", "trace_variability_picks"):
    if stem in tables:
        display(tables[stem][0])  # noqa: F821

# %% [markdown]
# ## Verdict of this run
#
# The cell below states what *this* run measured, computed from the tables above
# (`sensitivity_study.verdict`), with the rules written before looking: a predictor is right in
# scale when its log-log slope CI contains 1; the Hessian **adds** over a baseline only when the
# paired τ(joint) − τ(baseline) CI lies above 0; allocation **matters** when a pick beats ≥ 95 %
# of the random configs of its size. CIs are bootstrap intervals over layers or configs of one
# model and one calibration set (and probe seed, for Hutchinson traces), not over training
# seeds; every loss/accuracy is on the validation split. docs/method.md §3 discusses the
# committed quick-profile run. Whether ΣΩ still ranks these configs *after QAT* (experiment 7) is
# trained and measured in notebook 04.

# %%
from IPython.display import Markdown

display(Markdown(sensitivity_study.verdict(tables)))  # noqa: F821

# %% [markdown]
# ## Exercises
# 1. Run the Hutchinson estimator, `hessian.layer_traces(model, calib, method="hutchinson",
#    tol=…)`, with `tol=0.2` and `0.02`. How do the error bars and wall time scale with the
#    number of probes? (Standard error ∝ 1/√probes.) How close does it get to the exact traces
#    of section 1, and at what cost?
#    *Hint:* look at `probes`, `rel_se` and `attrs["wall_s"]` of the two frames; a 10× smaller SE needs ~100× the probes.
# 2. **Trace or Ω? (checked)** Name the layer with the largest average trace and the layer with
#    the largest Ω at 2 bits, and compute that Ω by hand from its two factors. Why do the two
#    rankings differ?
#    *Hint:* Ω_i(b) = T̄_i·‖Q_b(W_i) − W_i‖²: `traces.loc[name, "avg_trace"]` times
#    `sensitivity.weight_perturbation(w, 2, method=init)`; which factor grows with the number of weights?
# 3. **Fewer calibration images (checked).** Fill in `sum_omega(omega, config)`, the ΣΩ of one
#    configuration; the check compares it with the fixed-size frame of section 3. The cell then
#    recomputes the traces on 128 images and re-scores the same fixed-size configs: is Kendall τ
#    of the `joint` variant still above `qerr_only`'s (the quantization error alone)?
#    *Hint:* `omega.loc[layer, bits]` for every `layer, bits` in `config.items()`; with 20
#    configs a τ's bootstrap CI spans about ±0.3, so read the paired `diff_low`/`diff_high`.
#
# Worked solutions: [`solutions/01_sensitivity_solutions.ipynb`](solutions/01_sensitivity_solutions.ipynb) (and its paired `.py`).

# %%
# YOUR CODE HERE (exercise 2): two layer names and one number
top_trace_layer = ...     # the layer with the largest average trace (`traces`)
top_omega2_layer = ...    # the layer with the largest Ω at 2 bits (`omegas["joint"]`)
omega2_by_hand = ...      # Ω of top_omega2_layer at 2 bits: T̄ · ‖Q_2(W) − W‖²

# %%
lessons.check_01_trace_vs_omega(top_trace_layer, top_omega2_layer, omega2_by_hand,
                                traces=traces, omega=omegas["joint"])

# %%
def sum_omega(omega, config):
    """ΣΩ of ``config`` ({layer: bits}): the sum over its layers of ``omega.loc[layer, bits]``."""
    # YOUR CODE HERE (exercise 3)
    raise NotImplementedError


# %%
fixed = res.get("fixed_size")          # section 3's fixed-size configs (None without val split)
configs = ([json.loads(c) for c in fixed["config"]] if fixed is not None else
           [{layer: b for layer in omegas["joint"].index} for b in bits])
if lessons.check_01_sum_omega(sum_omega, omegas["joint"], configs,
                              expected=None if fixed is None else fixed["omega_joint"].tolist()) \
        and fixed is not None:
    small = data.calibration_batches(train_ds, n_samples=128, batch_size=calib_batch, seed=seed,
                                     device=study.dev)
    small_traces = hessian.layer_traces(model, small, tol=trace_tol, max_probes=trace_max_probes,
                                        seed=seed, device=study.dev, method=trace_method,
                                        progress=False)
    rescored = fixed.copy()
    for v in ("joint", "qerr_only"):
        om = sensitivity.omega_table(model, small_traces, bits=bits, variant=v, seed=seed,
                                     method=init)
        rescored[f"omega_{v}"] = [sum_omega(om, c) for c in configs]
    display(sensitivity.kendall_table(rescored, ["omega_joint", "omega_qerr_only"], seed=seed)
            .round(3))
