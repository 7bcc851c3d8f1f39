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
# # 04 · Ablations: what does each piece buy?
#
# > - **You will:** measure what each piece of the method buys (transitions, oscillation remedies,
# >   distillation, the Ω variants, the allocation itself) at equal size; read one-seed results
# >   for what they can and cannot show.
# > - **Prerequisites:** notebooks 01–03; oscillations in QAT (Nagel et al. 2022).
# > - **Run time with the lab defaults:** 14.2 min measured on this project's shared 2-core CPU
# >   (load average 10–17), kernel start included.
#
# HMQAT's abstract names "quantization **transition** aware fine-tuning of scale factor" but its
# text is not public. "Transition" has two defensible readings, and we implement both as switches
# (docs/method.md):
#
# 1. **Precision transitions.** Instead of jumping from FP32 straight to 2–3 bits, every layer moves
#    FP32 → 8 bit → its target width in stages. At each change the step is re-initialised so the
#    clipping range carries over, $s_\text{new} = s_\text{old}\,Q_P^\text{old}/Q_P^\text{new}$, and
#    the step sizes' learning rate warms up again.
# 2. **Rounding transitions** (Nagel et al. 2022). With the straight-through estimator, latent
#    weights sitting near a rounding threshold flip between two grid points from step to step —
#    *oscillation*. We track each weight's flip frequency with an EMA and either *dampen*
#    ($\lambda\lVert w - q(w)\rVert^2$, pulling weights to bin centres) or *freeze* weights that
#    oscillate too often.
#
# Plain LSQ — whose step-size gradient already depends on each value's distance to the nearest
# transition point — is the baseline. Optionally we also distil from the FP32 model.
#
# The second half holds the training recipe fixed and changes only **how bits are allocated** at
# the same model size: Hessian-guided (each Ω variant), uniform, random (3 seeds), greedy, and
# HAWQ-V3's ILP.

# %% tags=["parameters"]
results_dir = "../results/lab"
profile = "lab"
arch = "resnet20"
dataset = "cifar10"
n_synthetic = 0
seed = 0
val_size = 0
device = "auto"
batch_size = 128
bits = [2, 3, 4, 5, 6, 8]
a_bits = 4
policy = "first_last_8"
init = "mse"
ablation_compression = 10.34
ablation_epochs = 1
qat_lr = 0.004
step_lr = 0.0004
qat_wd = 0.00005
random_seeds = [0, 1, 2]
max_steps_per_epoch = 50

# %%
from hmqat import runtime, search, sensitivity, train
from hmqat.study import ablation, plotting, reporting
from hmqat.study.pipeline import Study

study = Study.from_params(globals())
fp32 = study.fp32_model()
omegas = {v: study.omega(v) for v in sensitivity.VARIANTS}
acct = search.model_inputs(fp32, a_bits=a_bits, policy=policy, input_size=study.input_size)
cfg = train.TrainConfig(epochs=ablation_epochs, lr=qat_lr, step_lr=step_lr, weight_decay=qat_wd,
                        seed=seed, max_steps_per_epoch=max_steps_per_epoch)

# %% [markdown]
# ## Run every variant (each run is checkpointed and skipped once finished)
# Ablations are choices, so every row is scored on the **validation hold-out** (`val_size`,
# docs/method.md §8), never on the test split; `top1` below is that validation top-1 (optimistic
# in absolute terms, fine for ranking).

# %%
table = ablation.run_ablations(
    fp32, study.train_loader(), study.val_loader() if val_size > 0 else study.test_loader(), cfg, omegas, acct["n_params"],
    run_dir=study.path("checkpoints", "ablation"), min_compression=ablation_compression,
    primary="joint", bits=bits, random_seeds=random_seeds, fixed=acct["fixed"],
    other_params=acct["other_params"], fp32_params=acct["fp32_params"], a_bits=a_bits,
    policy=policy, init=init, device=study.dev, input_size=study.input_size,
    data=study.data_key)
runtime.atomic_write_text(study.path("data", "ablation_runs.csv"), table.to_csv(index=False))
summary = ablation.summarize(table)
steps = len(study.train_loader())                 # optimizer steps per full epoch
if max_steps_per_epoch:
    steps = min(steps, max_steps_per_epoch)
reporting.write_table(summary, study.tables / "ablation",
                      caption=f"Ablations at ~{ablation_compression:g}x compression, top1 = "
                              f"{'validation hold-out' if val_size > 0 else 'test'} top-1 "
                              f"(ranking only): same seed, "
                              f"{ablation_epochs} QAT epoch(s) of {steps} steps at batch "
                              f"{batch_size} each; random allocation over {len(random_seeds)} "
                              f"seeds (mean, std); osc_frac = share of weights whose flip "
                              f"frequency exceeds the tracker's threshold",
                      data_label=study.data_label, profile=profile,
                      float_format={"osc_frac": "{:.2%}"})
summary

# %%
fig = plotting.plot_ablation(table, title="Ablations at equal size", subtitle=study.subtitle())
plotting.savefig(fig, study.figures / "ablation")

# %% [markdown]
# ## What these results say
# The cell below reads this run's own table: the best transition variant against plain LSQ, and
# the Hessian-guided allocation against the spread of random allocations of the same size.

# %%
trans = summary[summary["group"] == "transition"].set_index("variant")["top1"]
alloc = summary[summary["group"] == "allocation"].set_index("variant")
best = trans.drop("lsq").idxmax()
print(f"transition: best variant {best} {trans[best]:.2f} % vs lsq {trans['lsq']:.2f} % "
      f"({trans[best] - trans['lsq']:+.2f} points); variants below lsq: "
      f"{', '.join(v for v in trans.index if trans[v] < trans['lsq']) or 'none'}")
rnd = alloc.loc["random"]
hess = alloc.loc["hmqat-joint", "top1"]
print(f"allocation: Hessian-guided {hess:.2f} % vs random {rnd['top1']:.2f} ± "
      f"{rnd['top1_std']:.2f} % over {int(rnd['n'])} seeds "
      f"({(hess - rnd['top1']) / rnd['top1_std']:+.1f} random-std)")

# %% [markdown]
# **What they cannot show.**
# * Every row except `random` is **one training seed**. A difference of a few tenths of a point
#   is within seed-to-seed noise (the random rows' std is a rough yardstick), so these rows
#   screen ideas and do not decide between them. A claim needs ≥ 3 seeds and a paired 95 % CI
#   (`hmqat.stats.paired_difference`).
# * The runs are **short**: `ablation_epochs` × `max_steps_per_epoch` steps. Remedies that act
#   late in training, such as precision transitions, oscillation dampening and freezing, may
#   rank differently after full QAT. A variant that loses here has not been shown to lose in
#   general.
# * One architecture (ResNet-20), one data set and one budget (~`ablation_compression`×). The
#   allocation gap may shrink at milder budgets, where uniform already does well.
# * `osc_frac` is a share over all weights; it does not say which layers oscillate or whether
#   the oscillations cost accuracy.

# %% [markdown]
# ## Exercises
# 1. Which transition variant helps most at ~10× compression? Does the ranking hold with more
#    epochs (`ablation_epochs=3`)?
#    *Hint:* every row here has n = 1: what does a ranking from one seed support?
# 2. Look at the fraction of oscillating weights per layer (`osc_frac`). Which layers oscillate most,
#    and do they have few weights per channel or few bits?
#    *Hint:* `osc_frac` in the table is over all weights; the per-layer split is in the tracker's `log`.
# 3. The random allocation's spread over seeds tells you how much any allocation matters at this
#    size. Is the Hessian-guided allocation outside that spread?
#    *Hint:* compare the Hessian-guided top-1 with the random rows' mean ± std; is it a paired comparison?
#
# Worked solutions: [`solutions/04_ablations_solutions.ipynb`](solutions/04_ablations_solutions.ipynb) (and its paired `.py`).
