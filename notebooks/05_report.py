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

# %%
rows = pd.concat([pd.DataFrame([{"config": "FP32 (fine-tuned)", "avg_bits": 32.0,
                                 "size_mb": fp32["fp32_size_mb"], "compression": 1.0,
                                 "bops": float("nan"), "top1": fp32["top1"],
                                 "search_ms": float("nan")}]),
                  qat.drop(columns="config").rename(columns={"label": "config"})[["config", "avg_bits", "size_mb",
                                                           "compression", "bops", "top1",
                                                           "search_ms"]]],
                 ignore_index=True)
headline = reporting.headline_table(rows, fp32_top1=fp32["top1"])
paths = reporting.write_table(headline, study.tables / "headline",
                              caption=f"{arch}: mixed-precision (HMQAT reconstruction) vs uniform "
                                      "QAT", data_label=study.data_label, profile=profile,
                              float_format=reporting.HEADLINE_FORMATS)
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
timing = "\n".join(f"| {k} | {v.get('status', '')} | {v.get('wall_s', float('nan')) / 60:.1f} | "
                   f"{v.get('compute_wall_s', float('nan')) / 60:.1f} |" for k, v in steps.items())
figs = sorted(p.stem for p in study.figures.glob("*.png"))
spearman = study.tables / "sensitivity_kendall_fixed_size.md"   # docs/method.md §3
text = f"""# hmqat results — {profile} profile

**Data: {study.data_label}. Model: {arch}.** These are this repository's own measurements from a
reconstruction of HMQAT; they are not the paper's numbers (the paper reports ResNet18/ImageNet:
10.34x smaller at 99.81 % of FP32 top-1, a target we quote, not a result we reproduced here).

FP32 reference: {'published' if fp32.get('pretrained', True) else 'randomly initialised (no pretrained weights in this profile)'} {arch} weights, {fp32['pretrained_top1']:.2f} % top-1 on this test split
before fine-tuning, **{fp32['top1']:.2f} %** after fine-tuning on its training split.

## Headline

{paths['md'].read_text()}

![accuracy vs size](figures/accuracy_size.png)

## Does the Hessian metric predict damage?

{spearman.read_text() if spearman.exists() else '(not run)'}

![PTQ frontier](figures/sensitivity_frontier.png)

## Ablations

{ablation_md or '(notebook 04 did not run in this profile)'}

## Figures

{chr(10).join(f'- [{f}](figures/{f}.png) ([pdf](figures/{f}.pdf))' for f in figs)}

## Wall time per step (this machine; see manifest.json)

| step | status | minutes (last run) | minutes (full computation) |
|---|---|---|---|
{timing}

{manifest.get('timing_note', '')}

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
#
# Worked solutions: [`solutions/05_report_solutions.ipynb`](solutions/05_report_solutions.ipynb) (and its paired `.py`).
