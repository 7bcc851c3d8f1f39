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
# # 06 · The budget axis: when does Hessian-guided mixed precision pay off?
#
# > - **You will:** train the study's paired comparisons at several QAT budgets (0 steps, a few
# >   hundred, one epoch and, in the extended profile, four epochs) and read each difference with
# >   an interval that carries both the training seeds and the finite test set.
# > - **Prerequisites:** notebooks 00–02 (the FP32 model, Ω, the picks); notebook 03's one-epoch
# >   runs are read back when the budgets include one epoch. Paired differences and the crossed
# >   interval of notebook 04's section on statistics.
# > - **Run time with the lab defaults:** <!-- lab-time -->6.1 min, measured by the pipeline in the lab run of 2026-12-07 (2 CPU cores, git 431fef3); the chain of 9 notebooks took 46.2 min<!-- /lab-time -->
#
# Notebooks 03 and 04 judge everything after **one** QAT epoch (cosine to 0): a recovery-from-PTQ
# regime, not where mixed-precision papers evaluate. Three things suggest the budget, not the
# method, may decide the outcome: a few more steps still help at 2 bits; the mixed configs carry
# 2-bit layers that a short budget penalises; and at 0 steps allocation matters enormously. So
# this notebook asks the question directly: **at which budget does the sign of each comparison
# settle, and which way?**
#
# Each budget has its **own cosine schedule** (a 150-step run is not the first 150 steps of a
# longer one). Budgets below an epoch cut one epoch at that many steps; budgets at or above an
# epoch are whole epochs, so the one-epoch budget *is* notebook 03's run, read back.
#
# **The interval.** Every arm is scored on the same test images, so the images' sampling noise
# is shared by all seeds and never shows in a seed-only t interval. With three seeds the paired
# differences behind a −0.12 point result can be 17, 12 and 8 images. We keep, for every run, which
# images it got right, and treat seeds and images as crossed random effects
# (`hmqat.stats.crossed_paired_difference`, docs/method.md §8):
#
# $$\operatorname{Var}(\bar D) = \frac{\sigma_s^2}{n} + \frac{\sigma_i^2}{M} + \frac{\sigma_e^2}{nM}
#   = \frac{MS_\text{seed} + MS_\text{image} - MS_\text{err}}{nM}.$$
#
# More seeds shrink only the first term; the second needs more test images.

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
a_bits = 4
policy = "first_last_8"
init = "mse"
qat_lr = 0.004
step_lr = 0.0004
qat_wd = 0.00005
recipe = {"distillation": {"enabled": True}}
seeds = [0]
budget_steps = [0, 60]
random_budgets = [0]
bn_batches = 8
target_half_width = 0.3

# %%
import pandas as pd

from hmqat import quant, search, stats, train, transitions
from hmqat.study import budget, lessons, plotting, reporting, runs
from hmqat.study.pipeline import Study

study = Study.from_params(globals())
lessons.ensure_upstream(study, "06_budget")      # 00-02's results; computed here if missing
fp32 = study.fp32_model()
fp32_info = study.load_json("fp32.json")
picks = study.load_json("configs.json")
omega = study.omega("joint")
problem = search.Problem.from_model(fp32, omega, bits, a_bits=a_bits, policy=policy,
                                    input_size=study.input_size)
the_recipe = transitions.Recipe.from_dict(recipe)
steps_per_epoch = len(study.train_loader())
print(study.subtitle())
print(f"recipe: {the_recipe.describe()}; {steps_per_epoch} steps per epoch; budgets "
      f"{[budget.budget_label(s, steps_per_epoch) for s in budget_steps]}; seeds {seeds}")

# %% [markdown]
# ## 1. The arms
# The picks of notebook 02, the uniform baselines, the **BOPs-matched** pick (the largest config on
# the size–Ω frontier whose BOPs do not exceed uniform W3A4's: equal size is not equal compute) and
# random configs of the 10.34× pick's size for the allocation contrast; random config *k* is
# trained with seed *k*, so the draw of the config is part of each replicate.

# %%
uniform = {f"uniform W{w}A4": quant.uniform_config(fp32, w, policy=policy) for w in (3, 2)}
bm = budget.bops_matched_config(problem, uniform["uniform W3A4"])
arms = {label: p["config"] for label, p in picks.items()
        if label in ("HMQAT =W3A4 size", "HMQAT 13.11x", "HMQAT 10.34x")}
arms.update(uniform)
arms["HMQAT BOPs<=W3A4"] = bm.config
randoms = ([] if "HMQAT 10.34x" not in picks else
           budget.random_same_size(problem, picks["HMQAT 10.34x"]["size_mb"], len(seeds), seed=0))
for label, cfg in arms.items():
    a = problem.evaluate({**problem.fixed, **cfg})
    print(f"{label:>18}: {a.size_mb * 1024:6.1f} KB ({a.compression:5.2f}x), "
          f"BOPs {a.bops / 1e9:.3f} G, avg bits {a.avg_bits:.2f}, ΣΩ {a.omega:.4f}")
for k, r in enumerate(randoms):
    print(f"  random 10.34x #{k}: {r.size_mb * 1024:6.1f} KB ({r.compression:5.2f}x), "
          f"ΣΩ {r.omega:.4f}")

# %% [markdown]
# ## 2. The runs
# 0 steps is post-training quantization exactly as every QAT run starts: activation steps from two
# seeded training batches, BatchNorm re-estimated on `bn_batches` batches with the quantizers on.
# Every trained run checkpoints and resumes, and one whose identity matches an earlier run (the
# one-epoch budget and notebook 03) is read back instead of trained.

# %%
def run_arm(label, config, steps, run_seed):
    if steps == 0:
        loader = study.train_loader(seed=run_seed)
        calib = [b for b, _ in zip(loader, range(bn_batches))]
        return budget.ptq_record(fp32, config, calib, study.val_loader(), study.test_loader(),
                                 a_bits=a_bits, policy=policy, init=init,
                                 input_size=study.input_size), False
    epochs, max_steps = budget.schedule(steps, steps_per_epoch)
    cfg = train.TrainConfig(epochs=epochs, lr=qat_lr, step_lr=step_lr, weight_decay=qat_wd,
                            seed=run_seed, max_steps_per_epoch=max_steps)
    run = runs.qat_run(fp32, config, the_recipe, study.train_loader(seed=run_seed),
                       study.val_loader(), cfg, run_dir=study.qat_dir, a_bits=a_bits,
                       policy=policy, init=init, device=study.dev, input_size=study.input_size,
                       data=study.data_key, eval_each_epoch=True,
                       test_loader=study.test_loader())
    return run.record, run.cached


rows = []
for steps in budget_steps:
    plan = list(arms.items())
    for run_seed in seeds:
        todo = plan + ([("random 10.34x", randoms[seeds.index(run_seed)].config)]
                       if steps in random_budgets and randoms else [])
        for label, config in todo:
            rec, cached = run_arm(label, config, steps, run_seed)
            rows.append({"label": label, "seed": run_seed, "steps": steps,
                         "budget": budget.budget_label(steps, steps_per_epoch),
                         "val_top1": rec["top1"], "test_top1": rec["test_top1"],
                         "test_correct": rec.get("test_correct"), "n_test": rec.get("n_test"),
                         "size_mb": rec["size_mb"], "compression": rec["compression"],
                         "bops": rec["bops"], "avg_bits": rec["avg_bits"],
                         "wall_s": rec["wall_s"], "cached": cached})
            print(f"[06] {budget.budget_label(steps, steps_per_epoch):>11} {label:>18} seed "
                  f"{run_seed}: test {rec['test_top1']:.2f} %  val {rec['top1']:.2f} %"
                  + ("  (read back)" if cached else ""), flush=True)
budget_runs = pd.DataFrame(rows)
study.save_json("budget_runs.json", rows)

# %% [markdown]
# ### From scratch: Eq. V for one pair
# The first pair at the largest budget, by hand from the per-image bits: the two-way ANOVA mean
# squares, the variance of the mean difference, and its seed and image parts. With one seed there
# is no seed term to estimate, so the cell says so.

# %%
import numpy as np

name, a_label, b_label = budget.comparison_pairs(budget_runs["label"])[0]
last = budget_runs[budget_runs["steps"] == max(budget_steps)]


def bits_of(label):
    recs = last[last["label"] == label].sort_values("seed").to_dict("records")
    return runs.correct_matrix(recs)


D = bits_of(a_label) - bits_of(b_label)            # (seeds, images), points
n_s, n_i = D.shape
if n_s >= 2:
    r_k, c_j, g = D.mean(1), D.mean(0), D.mean()
    ms_seed = n_i * ((r_k - g) ** 2).sum() / (n_s - 1)
    ms_image = n_s * ((c_j - g) ** 2).sum() / (n_i - 1)
    ms_err = ((D - r_k[:, None] - c_j[None, :] + g) ** 2).sum() / ((n_s - 1) * (n_i - 1))
    var = (ms_seed + ms_image - ms_err) / (n_s * n_i)
    lib = stats.crossed_paired_difference(bits_of(a_label), bits_of(b_label))
    print(f"{name}: mean {g:+.3f}, Var by hand {var:.5f}, library "
          f"{lib.seed_var + lib.image_var:.5f} (equal unless a component was clipped at 0)")
else:
    print(f"{name}: one seed, so only the image term exists: per-image differences have "
          f"variance {D[0].var(ddof=1):.1f}, SE of the mean {np.sqrt(D[0].var(ddof=1) / n_i):.3f} pt")

# %% [markdown]
# ## 3. Paired differences against the budget
# One row per budget and pair: test top-1 of *a* − *b*, paired by seed, with the 95 % interval over
# seeds and test images; size gap and BOPs ratio of *a* to *b* beside it.

# %%
pairs = budget.comparison_pairs(budget_runs["label"])
table = budget.budget_table(budget_runs, pairs)
shown = table[["budget", "pair", "seeds", "images", "diff", "ci_low", "ci_high", "half_width",
               "size gap %", "BOPs ratio"]]
reporting.write_table(shown, study.tables / "budget_axis",
                      caption="Budget axis: paired test top-1 differences (a - b) with 95 % "
                              "intervals over seeds and test images",
                      data_label=study.data_label, profile=profile)
accuracy = (budget_runs.groupby(["budget", "steps", "label"], sort=False)
            .agg(test_top1=("test_top1", "mean"), std=("test_top1", "std"),
                 seeds=("seed", "nunique"), size_mb=("size_mb", "first"),
                 compression=("compression", "first"), bops=("bops", "first"))
            .reset_index().sort_values(["steps", "size_mb"], ascending=[True, False]))
accuracy["% of FP32"] = 100 * accuracy["test_top1"] / fp32_info["test_top1"]
reporting.write_table(accuracy.drop(columns="steps"), study.tables / "budget_accuracy",
                      caption="Budget axis: test top-1 per arm and budget (mean over seeds)",
                      data_label=study.data_label, profile=profile)
plotting.savefig(plotting.plot_budget_axis(table, subtitle=study.subtitle()),
                 study.figures / "budget_axis")
plotting.savefig(plotting.plot_budget_accuracy_size(budget_runs, subtitle=study.subtitle()),
                 study.figures / "budget_accuracy_size")
shown

# %% [markdown]
# ## 4. What the intervals support
# Written by code from the table above; "undecided" means the interval includes 0.

# %%
verdict = budget.budget_verdict(table, target_half_width=target_half_width)
ten = accuracy[accuracy["label"] == "HMQAT 10.34x"]
for _, r in ten.iterrows():
    verdict.append(f"HMQAT 10.34x at {r['budget']}: {r['test_top1']:.2f} % test top-1 = "
                   f"{r['% of FP32']:.1f} % of FP32 ({fp32_info['test_top1']:.2f} %), "
                   f"{int(r['seeds'])} seed(s)")
study.save_json("budget_verdict.json", verdict)
for line in verdict:
    print("*", line)

# %% [markdown]
# ### Exercise 06.1 (fill in): the image term of one seed
# A seed-only interval treats the test images as fixed. Write `image_se(bits_a, bits_b)`: for ONE
# seed's per-image results of arms *a* and *b* (bool arrays over the same M test images), the
# standard error of the mean difference in points, $\mathrm{sd}(d_j)/\sqrt{M}$ with
# $d_j = 100\,(a_j - b_j)$. That is how far the difference would move with another M images.

# %%
def image_se(bits_a, bits_b) -> float:
    """SE of the mean of d_j = 100·(a_j − b_j) over the M images of one seed."""
    # YOUR CODE HERE
    raise NotImplementedError


first = last[last["seed"] == seeds[0]].set_index("label")
lessons.check_06_image_se(image_se,
                          runs.unpack_correct(first.at[a_label, "test_correct"],
                                              int(first.at[a_label, "n_test"])),
                          runs.unpack_correct(first.at[b_label, "test_correct"],
                                              int(first.at[b_label, "n_test"])))

# %% [markdown]
# ## Exercises
# 1. Exercise 06.1 above: the image term of one seed, checked by `lessons.check_06_image_se`.
#    *Hint:* `numpy.std(d, ddof=1) / numpy.sqrt(len(d))`.
# 2. Compute the seed-only paired t interval of the first pair at the largest budget
#    (`hmqat.stats.paired_difference` on the per-seed test top-1; it needs ≥ 2 seeds) and compare
#    its half-width with the crossed interval's. Which is wider, and why can more seeds not close
#    the gap?
#    *Hint:* the image term σ_i²/M does not depend on the number of seeds.
# 3. Which budgets would you add to see where the =W3A4-size difference changes sign?
#    *Hint:* look at the trend of `diff` against `steps` in the table.
#
# Worked answers: `solutions/06_budget_solutions.ipynb`.
