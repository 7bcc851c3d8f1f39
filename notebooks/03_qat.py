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
# # 03 · Quantization-aware training at the chosen budgets
#
# > - **You will:** write the LSQ fake quantizer (Eq. Q) by hand for one tensor; write its step
# >   gradient and the distillation term yourself (exercises 03.1 and 03.2, checked); train
# >   quantized models with LSQ and distillation at the chosen budgets; compare mixed and uniform
# >   precision at equal size; export a real low-bit file.
# > - **Prerequisites:** the results of notebooks 00–02 (opened first, this notebook computes
# >   them at the lab defaults and says so); the straight-through estimator; knowledge
# >   distillation.
# > - **Run time with the lab defaults:** <!-- lab-time -->9.4 min, measured by the pipeline in the lab run of 2026-12-07 (2 CPU cores, git 431fef3); the chain of 9 notebooks took 46.2 min<!-- /lab-time -->
#
# Post-training quantization to ~3 bits destroys accuracy; **quantization-aware training** (QAT)
# recovers it by training *through* the quantizer. We use LSQ (Esser et al. 2020):
#
# $$q(x) = s\cdot \mathrm{clamp}\big(\lfloor x/s \rceil,\, Q_N,\, Q_P\big)$$
#
# with a **learned step size** $s$ per output channel (weights, signed) or per tensor (activations,
# unsigned after ReLU). Rounding passes gradients straight through (STE). The gradient of $s$,
# $\partial \hat v/\partial s = -v/s + \lfloor v/s \rceil$ inside the range, depends on how far each value sits from
# the nearest **quantization transition point**. That sensitivity is why LSQ fine-tunes scales
# better than methods that only see the clipping points, and it is one reading of HMQAT's
# "transition aware fine-tuning of scale factor" (see notebook 04 and docs/method.md). The step's
# gradient is scaled by $g = 1/\sqrt{N\,Q_P}$, and the steps get their own learning rate.
#
# The study's recipe (`recipe` parameter: `{"distillation": {"enabled": True}}` at the lab
# defaults below and in params/quick.yaml) adds **knowledge distillation** from the FP32 model:
# the loss is the cross-entropy plus
# $T^2\,\mathrm{KL}\big(\mathrm{softmax}(z_\text{FP32}/T)\,\|\,\mathrm{softmax}(z/T)\big)$ at
# $T = 4$ (Eq. D; you write it in exercise 03.2). HMQAT's abstract does not mention it; exercise 3
# at the end measures what it buys. The teacher's extra forward pass makes each step dearer, but
# short runs are where distillation helps most, so the lab keeps it and saves on steps instead.
#
# We train each mixed-precision configuration chosen in notebook 02 and the uniform baselines with
# the **same recipe and steps, for every seed in `seeds`** (training seed; the data split stays
# fixed), then plot accuracy against size and against BOPs. Each run is scored on the validation
# split during training (`val_top1`, docs/method.md §8) and reads the test split once at the end
# (`test_top1`). Comparisons are paired by seed: mean difference with a 95 % t interval
# (`hmqat.stats`).
#
# **The lab defaults are a short screen:** notebook 02's picks (two at its lab defaults: ~10.34×
# and uniform W3A4's size) and the three `uniform_baselines` (W4A4, W3A4, W2A4), each trained
# for `max_steps_per_epoch` = 60 steps (about a sixth of an epoch) on one seed. The quick
# profile trains a full epoch on three seeds; its numbers are in the README.

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
policy = "first_last_8"
init = "mse"
qat_epochs = 1
qat_lr = 0.004
step_lr = 0.0004
qat_wd = 0.00005
uniform_baselines = [[4, 4], [3, 4], [2, 4]]
seeds = [0]
# the study's QAT recipe: FP32 teacher, KL at T = 4 (Eq. D)
recipe = {"distillation": {"enabled": True}}
max_steps_per_epoch = 60
choice_seeds = [0]     # section 5 at lab scale: 3 more runs of 60 steps, one seed: a screen

# %%
import pandas as pd

from hmqat import export, quant, train, transitions
from hmqat.study import lessons, plotting, reporting, runs
from hmqat.study.pipeline import Study

study = Study.from_params(globals())
lessons.ensure_upstream(study, "03_qat")      # 00-02's results; computed here if missing
fp32 = study.fp32_model()
fp32_info = study.load_json("fp32.json")
picks = study.load_json("configs.json")
the_recipe = transitions.Recipe.from_dict(recipe)
print(study.subtitle(), "| recipe:", the_recipe.describe())

# %% [markdown]
# ### From scratch: quantize one tensor
# Eq. Q for one layer's weights at 3 bits. Take one step $s_c$ per output channel (the study's MSE
# init), compute the integer codes $c = \mathrm{clamp}(\mathrm{round}(W/s), -4, 3)$, and
# dequantize to $c\cdot s$. That is all the fake quantizer does in the forward pass. QAT then
# learns $W$ and $s$ through it with the straight-through estimator.

# %%
import torch

w = fp32.get_submodule("layer1.0.conv1").weight.detach()
b = 3
s = quant.init_step(w, b, method=init).view(-1, 1, 1, 1)        # [C_out, 1, 1, 1]
codes = torch.clamp(torch.round(w / s), -2 ** (b - 1), 2 ** (b - 1) - 1)
by_hand = codes * s
same = torch.equal(by_hand, quant.quantize_weight(w, b, method=init))
assert same, "the hand-written Eq. Q differs from hmqat.quant.quantize_weight"
print(f"codes used: {sorted(codes.unique().int().tolist())}; "
      f"‖Q(W) − W‖² = {float((by_hand - w).pow(2).sum()):.4f}; "
      f"equal to hmqat.quant.quantize_weight: {same}")

# %% [markdown]
# ### Exercise 03.1 (fill in): LSQ's step gradient
# QAT learns $s$ through the same forward pass. With $v = W/s$, the rounding passed straight
# through, and the clamp to $[Q_N, Q_P]$:
#
# $$\frac{\partial q}{\partial s} = \begin{cases} \lfloor v \rceil - v & Q_N < v < Q_P \\
# Q_N & v \le Q_N \\ Q_P & v \ge Q_P \end{cases}$$
#
# Write `lsq_step_grad(w, s, b)`: the value of $\partial q/\partial s$ for **every element** of `w`
# (same shape as `w`; `s` has shape `[C_out, 1, 1, 1]` as above), before LSQ's gradient scale $g$.
# The check compares it with autograd through `hmqat.quant.LSQQuantizer`, inside the range and
# at the clipping ends separately.

# %%
def lsq_step_grad(w: torch.Tensor, s: torch.Tensor, b: int) -> torch.Tensor:
    """∂q/∂s of Eq. Q for every element of w (signed b-bit range), without LSQ's scale g."""
    # YOUR CODE HERE
    raise NotImplementedError


lessons.check_03_step_grad(lsq_step_grad, w, s, b)

# %% [markdown]
# ## 1. The runs
# Mixed precision at each budget (activations at `a_bits`), and uniform W/A baselines, each for
# every seed. Every run checkpoints each epoch, so an interrupted notebook resumes where it
# stopped; a run's identity includes the FP32 weights, the data split and the seed
# (`hmqat.study.runs.qat_run`), so a changed input trains anew instead of resuming.

# %%
plan = [(label, p["config"], a_bits, "mixed") for label, p in picks.items()]
plan += [(f"uniform W{w}A{a}", quant.uniform_config(fp32, w, policy=policy), a, "uniform")
         for w, a in uniform_baselines]
scored_loader = study.val_loader() if val_size > 0 else study.test_loader()


def run_one(label, config, a, kind, run_seed):
    cfg = train.TrainConfig(epochs=qat_epochs, lr=qat_lr, step_lr=step_lr, weight_decay=qat_wd,
                            seed=run_seed, max_steps_per_epoch=max_steps_per_epoch)
    print(f"[03] {label} seed {run_seed}: {qat_epochs} epoch(s)", flush=True)
    run = runs.qat_run(fp32, config, the_recipe, study.train_loader(seed=run_seed), scored_loader,
                       cfg, run_dir=study.qat_dir, a_bits=a, policy=policy, init=init,
                       device=study.dev, input_size=study.input_size, data=study.data_key,
                       eval_each_epoch=True, keep_model=True,
                       test_loader=study.test_loader() if val_size > 0 else None)
    rec = run.record
    row = {"label": label, "kind": kind, "seed": run_seed, "a_bits": a,
           "val_top1": rec["top1"] if val_size > 0 else float("nan"),
           "test_top1": rec["test_top1"] if val_size > 0 else rec["top1"],
           "size_mb": rec["size_mb"], "compression": rec["compression"], "bops": rec["bops"],
           "avg_bits": rec["avg_bits"],
           "test_correct": rec.get("test_correct" if val_size > 0 else "correct"),
           "n_test": rec.get("n_test" if val_size > 0 else "n_val"),
           "search_ms": picks.get(label, {}).get("search_ms", float("nan")),
           "wall_s": rec["wall_s"], "cached": run.cached, "run_id": run.run_id,
           "history": rec["history"], "config": config}
    return run.model, row


results, models_by_label = [], {}
for run_seed in seeds:
    for label, config, a, kind in plan:
        qm, row = run_one(label, config, a, kind, run_seed)
        if run_seed == seeds[0]:
            models_by_label[label] = qm
        results.append(row)
        print(f"[03] {label:>22} seed {run_seed}: test top-1 {row['test_top1']:.2f} %  "
              f"val top-1 {row['val_top1']:.2f} %  size {row['size_mb'] * 1024:.1f} KB "
              f"({row['compression']:.2f}x)  {row['wall_s'] / 60:.1f} min"
              + ("  (read back, trained earlier)" if row["cached"] else ""), flush=True)
saved = study.save_json("qat_results.json", results)
print(f"[03] {len(results)} runs written to data/{saved.name}")

# %% [markdown]
# ### Exercise 03.2 (fill in): the distillation term
# Every run above added Eq. D to its loss. Write `kd_term(z_student, z_teacher, T)`:
# $T^2\,\mathrm{KL}\big(\mathrm{softmax}(z_\text{teacher}/T)\,\|\,\mathrm{softmax}(z_\text{student}/T)\big)$,
# averaged over the images of the batch, with $\mathrm{KL}(p\,\|\,q) = \sum_k p_k \log(p_k/q_k)$.
# The check compares it with `hmqat.transitions.distillation_loss` on one validation batch, the
# first mixed model against its FP32 teacher, and names the usual slips.

# %%
def kd_term(z_student: torch.Tensor, z_teacher: torch.Tensor, T: float) -> torch.Tensor:
    """T² · KL(softmax(z_teacher / T) ‖ softmax(z_student / T)), the batch mean."""
    # YOUR CODE HERE
    raise NotImplementedError


x_batch = next(iter(scored_loader))[0]
with torch.no_grad():
    z_teacher = fp32.eval()(x_batch)
    z_student = models_by_label[plan[0][0]].eval()(x_batch)
lessons.check_03_distillation(kd_term, z_student, z_teacher, the_recipe.distillation.temperature)

# %% [markdown]
# ## 2. Accuracy against size and against BOPs, over seeds
# Mean ± std of the test top-1 over `seeds`; BOPs next to size (equal size is not equal compute).

# %%
table = pd.DataFrame(results)
headline = reporting.seeded_headline(table, fp32_info["top1"])
reporting.write_table(headline, study.tables / "qat_results",
                      caption=f"QAT test top-1, mean ± std over {len(seeds)} seed(s) "
                              f"({qat_epochs} epoch(s) of at most {max_steps_per_epoch or 'all'} "
                              f"steps; recipe {the_recipe.describe()}); val top-1: the "
                              "validation split, for ranking only (docs/method.md §8)",
                      data_label=study.data_label, profile=profile,
                      float_format=reporting.SEEDED_FORMATS)
means = (table.groupby(["label", "kind"], sort=False)
         .agg(size_mb=("size_mb", "first"), bops=("bops", "first"),
              compression=("compression", "first"), top1=("test_top1", "mean"),
              top1_std=("test_top1", "std")).reset_index().fillna({"top1_std": 0.0}))
with plotting.use_style():
    for x, stem, title in [("size_mb", "accuracy_size", "Test top-1 vs model size"),
                           ("bops", "accuracy_bops", "Test top-1 vs BOPs")]:
        fig = plotting.plot_accuracy_size(means, x=x, yerr="top1_std", fp32_top1=fp32_info["top1"],
                                          runs=table,
                                          title=f"{title} (mean ± std, {len(seeds)} seed(s))",
                                          subtitle=study.subtitle())
        plotting.savefig(fig, study.figures / stem)
headline

# %% [markdown]
# ## 3. Mixed vs uniform at equal size, paired by seed
# Each "HMQAT =WbAa size" pick lies within ±1 % of uniform WbAa's size (`search.select_at_size`).
# The difference is paired by seed. Its 95 % interval carries both the training seeds and the
# finite test set: every run keeps which test images it got right, and seeds and images are
# crossed random effects (`hmqat.stats.crossed_paired_difference`, docs/method.md §8). With one
# seed it is a screen, not a result.

# %%
pairs = reporting.equal_size_pairs(list(table["label"]))
comparisons = reporting.paired_comparisons(table, pairs) if pairs else pd.DataFrame()
if pairs:
    reporting.write_table(comparisons, study.tables / "paired_comparisons",
                          caption=f"Mixed − uniform test top-1 at equal size, paired over "
                                  f"{len(seeds)} seed(s), 95 % interval over seeds and test "
                                  f"images (NaN with one seed)",
                          data_label=study.data_label, profile=profile,
                          float_format={"size gap %": "{:+.2f}", "BOPs ratio": "{:.2f}",
                                        "diff": "{:+.2f}", "ci_low": "{:+.2f}",
                                        "ci_high": "{:+.2f}", "seeds": "{:.0f}"})
    for _, row in comparisons.iterrows():
        print(reporting.describe_comparison(row))
comparisons

# %% [markdown]
# ## 4. A real low-bit file
# `export.save_packed` writes the integer weights bit-packed at their width: a real low-bit file,
# not an FP32 file with fake-quantized values. It is a little larger than the size accounting
# (Eq. S counts parameters only): it also holds the BatchNorm running statistics and the
# metadata. The line below prints both sizes.

# %%
best_mixed = max((r for r in results if r["kind"] == "mixed" and r["seed"] == seeds[0]),
                 key=lambda r: r["compression"])
packed = study.path("data", "hmqat_model.hmq")
export.save_packed(models_by_label[best_mixed["label"]], packed)
reloaded = export.load_packed(packed)
same = train.evaluate(reloaded, study.test_loader())["top1"] == best_mixed["test_top1"]
study.save_json("export.json", {"label": best_mixed["label"], "file_bytes": packed.stat().st_size,
                                "size_mb_accounting": best_mixed["size_mb"],
                                "reloaded_top1_equal": bool(same)})
print(f"{packed.name}: {packed.stat().st_size / 1024:.1f} KB on disk vs "
      f"{best_mixed['size_mb'] * 1024:.1f} KB by the accounting; reloaded top-1 identical: {same}")

# %% [markdown]
# ## 5. The recipe's choices, re-decided on the validation split
# Three settings of the recipe were once chosen on one-seed screens: the step learning rate (LSQ's
# `step_lr = lr` against a tenth of it), distillation from the FP32 model, and the MSE step init
# (against LSQ's $2\langle|w|\rangle/\sqrt{Q_P}$). Each is re-decided here at the 10.34× pick (the
# first pick where a profile has none):
# the profile's arm (this notebook's own runs, read back) against the arm that makes that one
# choice the other way, paired over `choice_seeds`, on the **validation** split with its
# seeds × images interval. The test split is not read for a choice.

# %%
choice_pick = "HMQAT 10.34x" if "HMQAT 10.34x" in picks else next(iter(picks), None)
if choice_seeds and choice_pick and val_size > 0:
    from hmqat.study import ablation

    arms = ablation.choice_arms(lr=qat_lr, step_lr=step_lr, recipe=the_recipe, init=init)
    choice_cfg = train.TrainConfig(epochs=qat_epochs, lr=qat_lr, step_lr=step_lr,
                                   weight_decay=qat_wd, max_steps_per_epoch=max_steps_per_epoch)
    choice_runs = ablation.recipe_choices(
        fp32, picks[choice_pick]["config"], arms, choice_cfg, choice_seeds,
        lambda s: study.train_loader(seed=s), scored_loader, run_dir=study.qat_dir,
        a_bits=a_bits, policy=policy, device=study.dev, input_size=study.input_size,
        data=study.data_key, eval_each_epoch=True, test_loader=study.test_loader())
    choices = ablation.choice_table(choice_runs)
    _ = reporting.write_table(
        choices[["choice", "a", "b", "seeds", "images", "diff", "ci_low", "ci_high"]],
        study.tables / "recipe_choices",
        caption=f"Recipe choices at {choice_pick}: alternative − profile, validation top-1 "
                f"paired over {len(choice_seeds)} seed(s), 95 % interval over seeds and "
                f"validation images", data_label=study.data_label, profile=profile)
    choice_text = ablation.choice_verdict(choices)
    study.save_json("recipe_choices.json", {"verdict": choice_text,
                                            "runs": choice_runs.drop(columns="correct")
                                            .to_dict("records")})
    for line in choice_text:
        print("*", line)
else:
    print("section 5 skipped: it needs choice_seeds, a mixed pick and a validation split")

# %% [markdown]
# ## Exercises
# 1. Train the mixed configuration with `policy="none"` (first and last layer quantized too).
#    How much accuracy do those two small layers cost at 2–3 bits?
#    *Hint:* pass `policy="none"` to `train.qat` and set the first and last layers' bits yourself.
# 2. Compare `step_lr = qat_lr` with `step_lr = qat_lr / 10`. What happens to the learned steps?
#    *Hint:* compare each layer's weight step after QAT with its MSE initialisation (`weight_quantizer.step`).
# 3. The recipe distils from the FP32 model (`recipe` above). Rerun one budget with
#    `recipe={"distillation": {"enabled": False}}`. How much top-1 does distillation buy here, and
#    why does it help most when QAT is short?
#    *Hint:* `transitions.Recipe.from_dict({"distillation": {"enabled": False}})` gives plain cross-entropy; one seed only screens.
#
# Worked solutions: [`solutions/03_qat_solutions.ipynb`](solutions/03_qat_solutions.ipynb) (and its paired `.py`).
