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
# > - **You will:** assemble the headline table and the report; compare configurations by size and
# >   by BOPs.
# > - **Prerequisites:** notebooks 00–04 (their results files).
# > - **Run time with the lab defaults:** 0.2 min measured on this project's shared 2-core CPU
# >   (load average 10–17), kernel start included.
#
# This notebook gathers what notebooks 00–04 wrote into the headline table and a README for
# `results/<profile>/`. Every number here is **ours**: a reconstruction of HMQAT (Huang et al.,
# *Neural Networks* 182:106910, 2025) from its abstract and the prior work it builds on. The paper's
# own numbers are ResNet18/ImageNet (10.34× smaller, 99.81 % of FP32 top-1) and are quoted only
# as a target, never as our result.

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

# %%
import json

import pandas as pd

from hmqat import runtime
from hmqat.study import reporting
from hmqat.study.pipeline import Study

study = Study.from_params(globals())
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
                                      "val top-1 = validation hold-out, for ranking only "
                                      "(optimistic: the pretrained weights saw it)",
                              data_label=study.data_label, profile=profile,
                              float_format=reporting.SEEDED_FORMATS)
comparisons = reporting.paired_comparisons(qat, reporting.equal_size_pairs(list(qat["label"])))
sentences = [reporting.describe_comparison(r) for _, r in comparisons.iterrows()]
print("\n".join(sentences))
headline

# %% [markdown]
# ## Ablations (notebook 04), if it ran

# %%
ablation_md = ""
abl_path = study.tables / "ablation.md"
if abl_path.exists():
    ablation_md = abl_path.read_text()
    print(ablation_md)

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
before fine-tuning, **{fp32['test_top1']:.2f} %** after fine-tuning on its training split minus a
validation hold-out of {fp32['val_size']} images (seed {study.seed}; docs/method.md §8).

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

{ablation_md or '(notebook 04 did not run in this profile)'}

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
# 1. Add a column "BOPs compression" (FP32 BOPs = MACs·32·32) to the headline table.
#    *Hint:* FP32 BOPs = MACs·32·32 with MACs from `models.quantizable_layers`.
# 2. Which uniform baseline is the fairest comparison for the mixed configuration, by size and by
#    BOPs? Do both comparisons tell the same story?
#    *Hint:* find, for each mixed row, the uniform row nearest in size and the one nearest in BOPs.
# 3. How many seeds would a 0.2-point difference need for its 95 % interval to exclude 0, given
#    the std over seeds in the headline table?
#    *Hint:* the half-width is t(0.975, n−1)·s_d/√n; solve for n with s_d from the paired table.
#
# Worked solutions: [`solutions/05_report_solutions.ipynb`](solutions/05_report_solutions.ipynb) (and its paired `.py`).
