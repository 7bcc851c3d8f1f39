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
# >   `hmqat.train`; compute top-1 and BatchNorm statistics by hand and check them against the
# >   library; see why the FP32 reference must be trained on the same data as the quantized
# >   models.
# > - **Prerequisites:** none among the notebooks (this is the first); PyTorch training loops
# >   (SGD, cross-entropy, BatchNorm in train/eval mode).
# > - **Run time with the lab defaults:** <!-- lab-time -->1.4 min, measured by the pipeline in the lab run of 2026-12-07 (2 CPU cores, git 431fef3); the chain of 9 notebooks took 46.2 min<!-- /lab-time -->
# > - **Exercises:** two are checked by code (`lessons.check_…` after a `# YOUR CODE HERE`
# >   cell); an untouched one prints "not attempted yet", a wrong one raises with a hint.
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
# 3. records top-1 and loss in `data/fp32.json` for the later notebooks;
# 4. recomputes top-1 and one BatchNorm layer's statistics by hand, against the library.
#
# The lab defaults fine-tune for `max_steps_per_epoch = 100` steps (a third of an epoch); the
# quick profile (`make reproduce`) fine-tunes for 2 whole epochs. Every epoch is scored on the
# **validation split** (`val_size` images, docs/method.md §8: `val_top1`); the test split is
# read once, after training (`test_top1`). Validation numbers rank choices; the test number is
# the model's accuracy. (Where the validation images come from the training split, the
# published weights have seen them, so their validation accuracy is optimistic.)

# %% tags=["parameters"]
# Defaults = the lab profile (params/lab.yaml; `make lab`). `make reproduce` overrides every value
# from params/<profile>.yaml.
results_dir = "../results/lab"
profile = "lab"
arch = "resnet20"
dataset = "cifar10"
n_synthetic = 0
pretrained = True
seed = 0
val_size = 5000
val_from = "test"
device = "auto"
batch_size = 128
fp32_epochs = 1
fp32_lr = 0.01
fp32_wd = 0.0001
max_steps_per_epoch = 100

# %%
import copy
import os
import time

import torch

from hmqat import bn, models, train
from hmqat.study import lessons, plotting
from hmqat.study.pipeline import Study

study = Study.from_params(globals())
print(study.subtitle())
n_val = len(study.data("val")) if val_size > 0 else 0
print(f"train {len(study.data('train'))} images, validation split {n_val}, "
      f"test {len(study.data('test'))} images")
source = study.data("train").source   # an absolute folder: print it relative to its root
data_dir = os.environ.get("HMQAT_DATA_DIR", "")
print("data from: " + (f"$HMQAT_DATA_DIR/{os.path.relpath(source, data_dir)}"
                       if data_dir and source.startswith(os.path.abspath(data_dir))
                       else source.split(":")[0]))
scored = study.data("val") if val_size > 0 else study.data("test")  # per-epoch scores
scored_loader = study.val_loader() if val_size > 0 else study.test_loader()
scored_name = "validation split" if val_size > 0 else "test split (this profile has no validation split)"

# %% [markdown]
# ## 1. The pretrained model, as published
# `create_model(..., pretrained=True)` verifies the checkpoint's sha256 before loading it.

# %%
published = models.create_model(arch, pretrained=pretrained).to(study.dev)
before = train.evaluate(published, study.test_loader())
print(f"before fine-tuning: test top-1 {before['top1']:.2f} %, loss {before['loss']:.4f}")
start = train.evaluate(published, scored_loader)

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
      + (f"; validation top-1 {after_val['top1']:.2f} %" if after_val else "")
      + f" ({wall:.0f} s)")

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
                                        title=f"FP32 fine-tuning: top-1 per epoch on the "
                                              f"{scored_name.split(' (')[0]}",
                                        subtitle=study.subtitle(),
                                        start={"FP32 fine-tune": {"val_top1": start["top1"]}})
    fig.axes[0].set_ylabel(("val." if val_size > 0 else "test") + " top-1 (%)")
    plotting.savefig(fig, study.figures / "fp32_finetune")

# %% [markdown]
# ## 3. From scratch: top-1 and BatchNorm statistics by hand
# Two things the library does for us everywhere, recomputed here on one batch of the validation
# split and checked against it (`lessons.check_close` raises if they disagree):
#
# * **top-1** is the share of images whose largest logit is the true class:
#   $100\cdot\frac1N\sum_n [\arg\max_c z_{n,c} = y_n]$ (`train.evaluate`);
# * **BatchNorm** normalises each channel $c$ of its input $x$ with a mean and variance. In
#   training mode it uses the batch's own $\mu_c = \mathrm{mean}_{n,h,w}\, x$ and $\sigma^2_c$
#   (unbiased) and keeps a running average of them; in evaluation mode it uses that running
#   average: $y = \gamma_c (x - \mu_c)/\sqrt{\sigma^2_c + \epsilon} + \beta_c$.
#   `hmqat.bn.reestimate_bn` recomputes the running statistics from given batches (QAT and PTQ
#   use it after the weights change); fed one batch, it must reproduce the batch's statistics.

# %%
x, y = next(iter(scored_loader))                      # one batch of the scoring split
model.eval()
with torch.no_grad():
    logits = model(x)
top1_by_hand = 100.0 * (logits.argmax(dim=1) == y).float().mean().item()
lessons.check_close(top1_by_hand, train.evaluate(model, [(x, y)])["top1"], "top-1 by hand")

first_bn = bn.batchnorm_layers(model)[0]              # the BatchNorm after the first conv
seen = {}
hook = first_bn.register_forward_hook(lambda m, inp, out: seen.update(x=inp[0], y=out))
with torch.no_grad():
    model(x)
hook.remove()
z = seen["x"]                                         # its input: (N, C, H, W)
mu, var = z.mean(dim=(0, 2, 3)), z.var(dim=(0, 2, 3), unbiased=True)
scale = first_bn.weight / torch.sqrt(first_bn.running_var + first_bn.eps)
y_by_hand = (z - first_bn.running_mean[:, None, None]) * scale[:, None, None] \
    + first_bn.bias[:, None, None]
lessons.check_close(y_by_hand.detach(), seen["y"], "eval-mode BatchNorm output by hand",
                    rtol=1e-4, atol=1e-5)
twin = copy.deepcopy(model)
bn.reestimate_bn(twin, [(x, y)])                      # one batch: running stats = its stats
twin_bn = bn.batchnorm_layers(twin)[0]
lessons.check_close(mu, twin_bn.running_mean, "batch mean by hand", rtol=1e-4, atol=1e-5)
lessons.check_close(var, twin_bn.running_var, "batch variance by hand", rtol=1e-4, atol=1e-5)
print(f"top-1 on {len(y)} images by hand {top1_by_hand:.2f} % = train.evaluate; the first "
      f"BatchNorm ({z.shape[1]} channels): eval-mode output and batch mean/variance by hand = "
      f"the module and reestimate_bn. This batch's means differ from the running means by up "
      f"to {(mu - first_bn.running_mean).abs().max().item():.3f} (running stats average many "
      f"batches).")

# %% [markdown]
# ## Exercises
# 1. **Where do the points go? (checked)** Fill in `per_class_top1` below: the top-1 (%) of a
#    model on each class of a loader. The check compares it with its own count; then the table
#    compares the published and the fine-tuned model per class on the same data.
#    Which classes gain most from fine-tuning on the JPEG images?
#    *Hint:* `torch.bincount(y, minlength=n_classes)` counts images per class; do the same for
#    `y[pred == y]`, the correctly classified ones, and divide.
# 2. Fine-tune for 1, 3 and 10 epochs (`fp32_epochs`; `max_steps_per_epoch` caps each). How
#    much of the gap does each epoch close?
#    *Hint:* compare each run's `test_top1` with the `before` line of section 1; at ~0.2 s per
#    step on 2 cores, 1 + 3 + 10 epochs of 100 steps take about 5 min.
# 3. **Why fine-tune the reference? (checked)** A quantized model trained on the JPEG images
#    reaches `quantized_top1` (one point below the fine-tuned FP32 model). Compute its "% of
#    FP32 top-1" against the published weights (`before`) and against the fine-tuned reference
#    (`after`). Which one would credit quantization with accuracy that fine-tuning alone buys?
#    *Hint:* % of FP32 = 100 · quantized top-1 / FP32 top-1, both on the same test split.
#
# Worked solutions: [`solutions/00_fp32_baseline_solutions.ipynb`](solutions/00_fp32_baseline_solutions.ipynb) (and its paired `.py`).

# %%
def per_class_top1(model, loader, n_classes):
    """Top-1 (%) of ``model`` on each class of ``loader``: a tensor of ``n_classes`` values."""
    # YOUR CODE HERE
    raise NotImplementedError


# %%
classes = study.data("test").classes
if lessons.check_00_per_class_top1(per_class_top1, model, scored_loader, classes):
    import pandas as pd
    from IPython.display import display

    gains = pd.DataFrame({name: torch.as_tensor(per_class_top1(m, scored_loader, len(classes))).tolist()
                          for name, m in (("published", published), ("fine-tuned", model))},
                         index=list(classes))
    gains["gain"] = gains["fine-tuned"] - gains["published"]
    display(gains.sort_values("gain", ascending=False).round(2))

# %%
quantized_top1 = after["top1"] - 1.0   # a made-up QAT result on the same test split
# YOUR CODE HERE: two numbers, in percent
pct_of_published = ...
pct_of_finetuned = ...

# %%
lessons.check_00_percent_of_fp32(pct_of_published, pct_of_finetuned, quantized_top1,
                                 published_top1=before["top1"], finetuned_top1=after["top1"])
