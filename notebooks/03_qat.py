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
# > - **You will:** write the LSQ fake quantizer (Eq. Q) by hand for one tensor; train quantized
# >   models with LSQ and distillation at the chosen budgets; compare mixed and uniform precision
# >   at equal size; export a real low-bit file.
# > - **Prerequisites:** notebooks 00 and 02; the straight-through estimator; knowledge
# >   distillation.
# > - **Run time with the lab defaults:** 16.7 min measured on this project's shared 2-core CPU
# >   (load average 10–17), kernel start included.
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
# The study's recipe (`recipe` parameter, `{distillation: {enabled: true}}` in
# params/quick.yaml) adds **knowledge distillation** from the FP32 model: the loss is the cross-entropy plus
# $T^2\,\mathrm{KL}\big(\mathrm{softmax}(z_\text{FP32}/T)\,\|\,\mathrm{softmax}(z/T)\big)$ at $T = 4$. HMQAT's
# abstract does not mention it; notebook 04's `lsq+distill` row shows what it buys.
#
# We train each mixed-precision configuration chosen in notebook 02 and the uniform baselines with
# the **same recipe and epochs, for every seed in `seeds`** (training seed; the data split stays
# fixed), then plot accuracy against size and against BOPs. Each run is scored on the validation
# hold-out during training (`val_top1`, docs/method.md §8; optimistic in absolute terms because the
# pretrained weights saw those images) and reads the test split once at the end (`test_top1`).
# Comparisons are paired by seed: mean difference with a 95 % t interval (`hmqat.stats`).

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
a_bits = 4
policy = "first_last_8"
init = "mse"
qat_epochs = 1
qat_lr = 0.004
step_lr = 0.0004
qat_wd = 0.00005
uniform_baselines = [[8, 8], [4, 4], [3, 4], [2, 4]]
seeds = [0]
recipe = {}
max_steps_per_epoch = 100

# %%
import pandas as pd

from hmqat import export, quant, train, transitions
from hmqat.study import plotting, reporting, runs
from hmqat.study.pipeline import Study

study = Study.from_params(globals())
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
print(f"codes used: {sorted(codes.unique().int().tolist())}; "
      f"‖Q(W) − W‖² = {float((by_hand - w).pow(2).sum()):.4f}; "
      f"equal to hmqat.quant.quantize_weight: {same}")

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
study.save_json("qat_results.json", results)

# %% [markdown]
# ## 2. Accuracy against size and against BOPs, over seeds
# Mean ± std of the test top-1 over `seeds`; BOPs next to size (equal size is not equal compute).

# %%
table = pd.DataFrame(results)
headline = reporting.seeded_headline(table, fp32_info["top1"])
reporting.write_table(headline, study.tables / "qat_results",
                      caption=f"QAT test top-1, mean ± std over {len(seeds)} seed(s) "
                              f"({qat_epochs} epochs; recipe {the_recipe.describe()}); val top-1: "
                              "the validation hold-out, for ranking only (optimistic: the "
                              "pretrained weights saw it, docs/method.md §8)",
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
                                          title=f"{title} (mean ± std, {len(seeds)} seed(s))",
                                          subtitle=study.subtitle())
        plotting.savefig(fig, study.figures / stem)
headline

# %% [markdown]
# ## 3. Mixed vs uniform at equal size, paired by seed
# Each "HMQAT =WbAa size" pick lies within ±1 % of uniform WbAa's size (`search.select_at_size`).
# The difference is paired by seed with a 95 % t interval; with one seed it is a screen, not a
# result.

# %%
pairs = reporting.equal_size_pairs(list(table["label"]))
comparisons = reporting.paired_comparisons(table, pairs) if pairs else pd.DataFrame()
if pairs:
    reporting.write_table(comparisons, study.tables / "paired_comparisons",
                          caption=f"Mixed − uniform test top-1 at equal size, paired over "
                                  f"{len(seeds)} seed(s), 95 % t interval (NaN with one seed)",
                          data_label=study.data_label, profile=profile,
                          float_format={"size gap %": "{:+.2f}", "BOPs ratio": "{:.2f}",
                                        "diff": "{:+.2f}", "ci_low": "{:+.2f}",
                                        "ci_high": "{:+.2f}", "seeds": "{:.0f}"})
    for _, row in comparisons.iterrows():
        print(reporting.describe_comparison(row))
comparisons

# %% [markdown]
# ## 3. A real low-bit file
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
# ## Exercises
# 1. Train the mixed configuration with `policy="none"` (first and last layer quantized too).
#    How much accuracy do those two small layers cost at 2–3 bits?
#    *Hint:* pass `policy="none"` to `train.qat` and set the first and last layers' bits yourself.
# 2. Compare `step_lr = qat_lr` with `step_lr = qat_lr / 10`. What happens to the learned steps?
#    *Hint:* compare each layer's weight step after QAT with its MSE initialisation (`weight_quantizer.step`).
# 3. The study's recipe already distils from the FP32 model. Rerun one budget with
#    `recipe={"distillation": {"enabled": False}}`. How much top-1 does distillation buy here, and why does it
#    help most when QAT is short?
#    *Hint:* `transitions.Recipe.from_dict({"distillation": {"enabled": False}})` gives plain cross-entropy; one seed only screens.
#
# Worked solutions: [`solutions/03_qat_solutions.ipynb`](solutions/03_qat_solutions.ipynb) (and its paired `.py`).
