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
# # 00 · The FP32 baseline
#
# > - **You will:** evaluate a published checkpoint on the data in use; fine-tune it with
# >   `hmqat.train`; see why the FP32 reference must be trained on the same data as the quantized
# >   models.
# > - **Prerequisites:** PyTorch training loops (SGD, cross-entropy, BatchNorm in train/eval
# >   mode).
# > - **Run time with the lab defaults:** 4.2 min measured on this project's shared 2-core CPU
# >   (load average 10–17), kernel start included.
#
# Every number in this study is relative to a full-precision (FP32) model: HMQAT's headline claim
# is "10.34× smaller while keeping 99.81 % of the FP32 top-1" (ResNet18/ImageNet). So the first
# step is to get that reference right.
#
# We start from the published CIFAR-10 ResNet-20 (He et al. 2016, 0.27 M parameters) and
# **fine-tune it on the data we actually use**. On the build machines that is a JPEG (quality 75)
# re-encoding of CIFAR-10; its artefacts cost the published model about 10 points, so evaluating
# the published weights as they are would make every later ratio meaningless.
#
# What this notebook does:
# 1. evaluates the pretrained model before any training;
# 2. fine-tunes it (SGD + momentum, cosine learning rate; `hmqat.train.finetune`), checkpointing
#    every epoch, so an interrupted run resumes and a finished one returns at once;
# 3. records top-1 and loss in `data/fp32.json` for the later notebooks.
#
# The fine-tune trains on the training images **minus a seeded validation hold-out** (`val_size`,
# docs/method.md §8) and scores every epoch on that hold-out (`val_top1`); the test split is read
# once, after training (`test_top1`). Caveat: the published weights were trained on all 50,000
# original CIFAR-10 training images, so the hold-out is *not* unseen by the pretrained model and
# its accuracy is optimistic (measured: 93.3 % on the hold-out vs ~87.6 % on test). Validation
# numbers rank choices; they are never the model's accuracy.

# %% tags=["parameters"]
# Defaults: a few minutes on a laptop CPU (`make lab`). `make reproduce` overrides every value
# from params/<profile>.yaml.
results_dir = "../results/lab"
profile = "lab"
arch = "resnet20"
dataset = "cifar10"
n_synthetic = 0
pretrained = True
seed = 0
val_size = 0
device = "auto"
batch_size = 128
fp32_epochs = 1
fp32_lr = 0.01
fp32_wd = 0.0001
max_steps_per_epoch = 100

# %%
import time

import os

from hmqat import models, train
from hmqat.study import plotting
from hmqat.study.pipeline import Study

study = Study.from_params(globals())
print(study.subtitle())
n_val = len(study.data("val")) if val_size > 0 else 0
print(f"train {len(study.data('train'))} images, validation hold-out {n_val}, "
      f"test {len(study.data('test'))} images")
source = study.data("train").source   # an absolute folder: print it relative to its root
data_dir = os.environ.get("HMQAT_DATA_DIR", "")
print("data from: " + (f"$HMQAT_DATA_DIR/{os.path.relpath(source, data_dir)}"
                       if data_dir and source.startswith(os.path.abspath(data_dir))
                       else source.split(":")[0]))
scored = study.data("val") if val_size > 0 else study.data("test")  # per-epoch scores

# %% [markdown]
# ## 1. The pretrained model, as published
# `create_model(..., pretrained=True)` verifies the checkpoint's sha256 before loading it.

# %%
published = models.create_model(arch, pretrained=pretrained).to(study.dev)
before = train.evaluate(published, study.test_loader())
print(f"before fine-tuning: top-1 {before['top1']:.2f} %, loss {before['loss']:.4f}")
start = train.evaluate(published, study.val_loader() if val_size > 0 else study.test_loader())

# %% [markdown]
# ## 2. Fine-tune on the dataset in use
# One loop (`hmqat.train.fit`) serves FP32 fine-tuning and QAT alike. Rerunning this cell after an
# interruption resumes from the last epoch's checkpoint.

# %%
t0 = time.perf_counter()
cfg = train.TrainConfig(epochs=fp32_epochs, lr=fp32_lr, weight_decay=fp32_wd, seed=seed,
                        max_steps_per_epoch=max_steps_per_epoch,
                        checkpoint=str(study.fp32_checkpoint))
model, history = train.finetune(arch, study.data("train"), scored, cfg,
                                batch_size=batch_size, device=study.dev, pretrained=pretrained)
after_val = train.evaluate(model, study.val_loader()) if val_size > 0 else None
after = train.evaluate(model, study.test_loader())   # the one read of the test split
wall = time.perf_counter() - t0
print(f"after fine-tuning: test top-1 {after['top1']:.2f} %, loss {after['loss']:.4f}"
      + (f"; validation hold-out top-1 {after_val['top1']:.2f} % (optimistic, docs/method.md §8)"
         if after_val else "") + f" ({wall:.0f} s)")

# %%
layers = models.quantizable_layers(model)
n_total = sum(p.numel() for p in model.parameters())
study.save_json("fp32.json", {
    "arch": arch, "data_label": study.data_label, "profile": profile, "pretrained": pretrained,
    "pretrained_top1": before["top1"], "pretrained_loss": before["loss"],
    "top1": after["top1"], "loss": after["loss"], "test_top1": after["top1"],
    "val_top1": after_val["top1"] if after_val else None, "val_size": val_size,
    "history": history, "wall_s": wall,
    "n_params": n_total, "n_quantizable_weights": sum(l.n_params for l in layers),
    "fp32_size_mb": 4 * n_total / 2**20,
})
with plotting.use_style():
    fig = plotting.plot_training_curves({"FP32 fine-tune": history}, metric="val_top1",
                                        title="FP32 fine-tuning (per-epoch scores on the "
                                              + ("validation hold-out)" if val_size > 0 else
                                                 "test split)"), subtitle=study.subtitle(),
                                        start={"FP32 fine-tune": {"val_top1": start["top1"]}})
    plotting.savefig(fig, study.figures / "fp32_finetune")

# %% [markdown]
# ## Exercises
# 1. Evaluate the published weights on the *original* CIFAR-10 (unset `HMQAT_DATA_DIR`) and on the
#    JPEG mirror. Where do the 10 points go? Which classes suffer most?
#    *Hint:* compute top-1 per class with `torch.bincount` over labels and correct predictions.
# 2. Fine-tune for 1, 3 and 10 epochs. How much of the gap does each epoch close?
#    *Hint:* `fp32_epochs` and `max_steps_per_epoch` are parameters; compare with the `before` line.
# 3. Why must the FP32 reference be fine-tuned on the *same* data as the quantized models before
#    "% of FP32 top-1" means anything?
#    *Hint:* what would "% of FP32" credit to quantization if the reference never saw the JPEG images?
#
# Worked solutions: [`solutions/00_fp32_baseline_solutions.ipynb`](solutions/00_fp32_baseline_solutions.ipynb) (and its paired `.py`).
