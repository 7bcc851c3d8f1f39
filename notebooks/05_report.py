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
# # 05 · Report
#
# > - **You will:** assemble the headline table and the report; compute one configuration's size
# >   and compression by hand (Eq. S); compute the FP32 model's BOPs and the seeds a difference
# >   needs yourself (exercises 05.1 and 05.2, checked); compare configurations by size and by
# >   BOPs.
# > - **Prerequisites:** the results of notebooks 00–03 (opened first, this notebook computes
# >   them at the lab defaults and says so); notebook 04's tables are included when it has run.
# > - **Run time with the lab defaults:** <!-- lab-time -->0.2 min, measured by the pipeline in the lab run of 2026-12-07 (2 CPU cores, git 431fef3); the chain of 9 notebooks took 46.2 min<!-- /lab-time -->
#
# This notebook gathers what notebooks 00–04 wrote into the headline table and a README for
# `results/<profile>/`; it trains nothing. At the lab defaults the table holds notebook 03's short
# runs (60 steps, one seed), so its ± std and paired intervals are empty: the quick profile's
# report (`results/quick/README.md`) has three seeds. Every number here is **ours**: a
# reconstruction of HMQAT (Huang et al., *Neural Networks* 182:106910, 2025) from its abstract and
# the prior work it builds on. The paper's own numbers are ResNet18/ImageNet (10.34× smaller,
# 99.81 % of FP32 top-1) and are quoted only as a target, never as our result.

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

# %%
import json
import math

import pandas as pd

from hmqat import models, quant, runtime
from hmqat.study import lessons, reporting
from hmqat.study.pipeline import Study

study = Study.from_params(globals())
lessons.ensure_upstream(study, "05_report")   # 00-03's results; computed here if missing
fp32 = study.load_json("fp32.json")
qat = pd.DataFrame(study.load_json("qat_results.json"))

# %% [markdown]
# ## The headline table
# Test top-1 as mean ± std over the training seeds of notebook 03 (`seeds`), BOPs next to size,
# and mixed vs uniform at equal size paired by seed with a 95 % interval (docs/method.md §8).

# %%
seeds = sorted(qat["seed"].unique())
fp32_row = pd.DataFrame([{"config": "FP32 (fine-tuned)", "avg bits": 32.0,
                          "size MB": fp32["fp32_size_mb"], "compression": 1.0,
                          "BOPs (G)": float("nan"), "test top-1": fp32["test_top1"],
                          "± std": float("nan"), "seeds": 1, "% of FP32": 100.0,
                          "val top-1": fp32.get("val_top1") or float("nan")}])
headline = pd.concat([fp32_row, reporting.seeded_headline(qat, fp32["test_top1"])],
                     ignore_index=True)
paths = reporting.write_table(headline, study.tables / "headline",
                              caption=f"{arch}: mixed-precision (HMQAT reconstruction) vs uniform "
                                      f"QAT; test top-1 mean ± std over {len(seeds)} seed(s); "
                                      "val top-1 = the validation split, for ranking only "
                                      "(docs/method.md §8)",
                              data_label=study.data_label, profile=profile,
                              float_format=reporting.SEEDED_FORMATS)
comparisons = reporting.paired_comparisons(qat, reporting.equal_size_pairs(list(qat["label"])))
sentences = [reporting.describe_comparison(r) for _, r in comparisons.iterrows()]
print("\n".join(sentences))
headline

# %% [markdown]
# ### From scratch: one configuration's size and compression (Eq. S)
# The `size MB` and `compression` columns follow HAWQ-V3's accounting (docs/design.md §3):
#
# $$\text{size} = \sum_i n_i b_i / 8 \;+\; 4\cdot(\text{other parameters}) \text{ bytes}, \qquad
# \text{MB} = 2^{20} \text{ bytes}$$
#
# where $n_i$ is layer $i$'s weight count at $b_i$ bits, and the "other parameters" stay FP32:
# biases, BatchNorm's affine weights, and the steps QAT adds (one per output channel of each
# weight quantizer, one per layer's activation quantizer). BatchNorm's running statistics are
# buffers, not parameters, and are not counted. Compression is FP32 size over that. Below: the
# most compressed mixed configuration of notebook 03, by hand, against `hmqat.quant` and the
# number notebook 03 recorded from its trained model.

# %%
model = study.fp32_model()
layers = models.quantizable_layers(model, input_size=study.input_size)
rows = study.load_json("qat_results.json")
row = max([r for r in rows if r["kind"] == "mixed"] or rows, key=lambda r: r["compression"])
config = row["config"]
n_all = sum(p.numel() for p in model.parameters())            # every FP32 parameter
n_low = sum(info.n_params for info in layers)                  # the weights that go low-bit
weight_bytes = sum(info.n_params * config[info.name] for info in layers) / 8
steps = sum(info.weight_shape[0] for info in layers) + len(layers)   # weight + activation steps
size_bytes = weight_bytes + 4 * (n_all - n_low + steps)
size_mb, compression = size_bytes / 2 ** 20, 4 * n_all / size_bytes
library_mb = quant.model_size_mb(model, config, a_bits=row["a_bits"],
                                 input_size=study.input_size)
assert math.isclose(size_mb, library_mb, rel_tol=1e-12)
assert math.isclose(size_mb, row["size_mb"], rel_tol=1e-9)
assert math.isclose(compression, row["compression"], rel_tol=1e-9)
print(f"{row['label']}: {n_low:,} low-bit weights in {weight_bytes / 1024:.1f} KB "
      f"({8 * weight_bytes / n_low:.2f} bits on average) + {n_all - n_low + steps:,} FP32 "
      f"parameters ({steps:,} of them steps) in {4 * (n_all - n_low + steps) / 1024:.1f} KB = "
      f"{size_bytes / 1024:.1f} KB; FP32 {4 * n_all / 1024:.1f} KB → {compression:.2f}x, as "
      f"hmqat.quant and notebook 03 report")

# %% [markdown]
# ### Exercise 05.1 (fill in): the FP32 model's BOPs
# Eq. B counts bit operations per image, $\text{BOPs} = \sum_i \text{MACs}_i\, b_i\, a_i$. The
# `BOPs (G)` column is that for each quantized model. What is it for the FP32 model (32-bit
# weights and activations)? Use `layers` from the cell above (each `info.macs` is one image's
# multiply-accumulates of that layer) and give BOPs, not GBOPs.

# %%
fp32_bops = ...   # YOUR CODE HERE
lessons.check_05_fp32_bops(fp32_bops, model, study.input_size)

# %% [markdown]
# ### Exercise 05.2 (fill in): seeds a difference needs
# A paired 95 % interval over $n$ seeds is $\bar d \pm t_{0.975,\,n-1}\, s_d/\sqrt n$
# (docs/method.md §8). Write `seeds_needed(diff, sd)`: the smallest $n \ge 2$ whose half-width
# $t_{0.975,\,n-1}\, s_d/\sqrt n$ is below `diff` (`scipy.stats.t.ppf` gives the quantile).

# %%
def seeds_needed(diff: float, sd: float) -> int:
    """Smallest n >= 2 with t(0.975, n − 1) · sd / √n < diff."""
    # YOUR CODE HERE
    raise NotImplementedError


lessons.check_05_seeds_needed(seeds_needed)

# %% [markdown]
# ## Ablations (notebook 04), if it ran
# Only when the manifest records notebook 04 as finished in this run: a table left by an earlier
# run (or a failed attempt) is not this run's result.

# %%
ablation_md = ""
abl_path = study.tables / "ablation.md"
ran_04 = reporting.step_finished(json.loads((study.root / "manifest.json").read_text()),
                                "04_ablations")
if abl_path.exists() and ran_04:
    ablation_md = abl_path.read_text()
    print(ablation_md)
else:
    print("notebook 04 has not finished in this run: no ablation table is reported")

# %% [markdown]
# ## results/<profile>/README.md

# %%
manifest = json.loads((study.root / "manifest.json").read_text()) \
    if (study.root / "manifest.json").exists() else {}
steps = manifest.get("steps", {})


def minutes(v):
    """A measured time in minutes, or '–' where the pipeline recorded none."""
    return "–" if v is None else f"{v / 60:.1f}"


timing = "\n".join(f"| {k} | {v['status']} | {minutes(v.get('wall_s'))} | "
                   f"{minutes(v.get('compute_wall_s'))} | {v.get('attempts', '–')} |"
                   for k, v in steps.items())
figs = sorted(p.stem for p in study.figures.glob("*.png"))
spearman = study.tables / "sensitivity_kendall_fixed_size.md"   # docs/method.md §3
after_qat = study.tables / "qat_level_kendall.md"                  # experiment 7, notebook 04
transition = study.tables / "transition_experiment.md"             # docs/method.md §7.1
text = f"""# hmqat results — {profile} profile

**Data: {study.data_label}. Model: {arch}.** These are this repository's own measurements from a
reconstruction of HMQAT; they are not the paper's numbers (the paper reports ResNet18/ImageNet:
10.34x smaller at 99.81 % of FP32 top-1, a target we quote, not a result we reproduced here).

FP32 reference: {'published' if fp32.get('pretrained', True) else 'randomly initialised (no pretrained weights in this profile)'} {arch} weights, {fp32['pretrained_top1']:.2f} % top-1 on this test split
before fine-tuning, **{fp32['test_top1']:.2f} %** after fine-tuning (seed {study.seed}; every choice
made on a validation split of {fp32['val_size']} images, disjoint from the test split;
docs/method.md §8).

## Headline

Test top-1 over seeds {', '.join(str(s) for s in seeds)} of the same schedule.

{paths['md'].read_text()}

### Mixed vs uniform at equal size (paired by seed)

{chr(10).join('- ' + t for t in sentences) or '(no equal-size pair in this profile)'}

![accuracy vs size](figures/accuracy_size.png) ![accuracy vs BOPs](figures/accuracy_bops.png)

## Does the Hessian metric predict damage?

{spearman.read_text() if spearman.exists() else '(not run)'}

![PTQ frontier](figures/sensitivity_frontier.png)

### After QAT (experiment 7)

{after_qat.read_text() if after_qat.exists() else '(not run in this profile)'}

## Ablations

{ablation_md or '(notebook 04 has not finished in this run of the profile)'}

### Transition-aware fine-tuning vs plain LSQ (paired seeds)

{transition.read_text() if transition.exists() else '(not run in this profile)'}

## Figures

{chr(10).join(f'- [{f}](figures/{f}.png) ([pdf](figures/{f}.pdf))' for f in figs)}

## Wall time per step (this machine; see manifest.json)

| step | status | minutes (last pass) | minutes (all attempts of its last computation) | attempts |
|---|---|---|---|---|
{timing}

Measured by the pipeline (`hmqat.study.pipeline`): "all attempts" adds the measured time of
earlier interrupted attempts of the same step; a skipped step keeps the numbers of its last run.

Executed notebooks: `executed/`. Tables (CSV, Markdown, LaTeX): `tables/`. Raw data: `data/`.
"""
runtime.atomic_write_text(study.root / "README.md", text)
print(text[:1500])

# %% [markdown]
# ## Exercises
# 1. Add a column "BOPs compression" (FP32 BOPs over each row's BOPs) to the headline table.
#    *Hint:* your `fp32_bops` of exercise 05.1, divided by `headline["BOPs (G)"] * 1e9`.
# 2. Which uniform baseline is the fairest comparison for the mixed configuration, by size and by
#    BOPs? Do both comparisons tell the same story?
#    *Hint:* find, for each mixed row, the uniform row nearest in size and the one nearest in BOPs.
# 3. How many seeds would a 0.2-point difference need for its 95 % interval to exclude 0, given
#    the std over seeds in the headline table?
#    *Hint:* your `seeds_needed` of exercise 05.2, with s_d from the paired table (the quick
#    profile's: at the lab defaults there is one seed and no s_d).
#
# Worked solutions: [`solutions/05_report_solutions.ipynb`](solutions/05_report_solutions.ipynb) (and its paired `.py`).
