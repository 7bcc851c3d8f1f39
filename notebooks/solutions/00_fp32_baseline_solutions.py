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
# # Solutions — 00 FP32 baseline
# Worked answers to the exercises of `00_fp32_baseline`. With the defaults below they run on the
# data `HMQAT_DATA_DIR` names (the lab settings, a few minutes on a laptop CPU); the test suite
# runs them on synthetic data, where the numbers mean nothing and only the code is checked.

# %% tags=["parameters"]
arch = "resnet20"
dataset = "cifar10"
n_synthetic = 0
pretrained = True
other_data_dir = ""          # a second CIFAR-10 copy (e.g. the original) for exercise 1; "" skips
epochs_list = [1, 3, 10]
max_steps_per_epoch = 100
batch_size = 128
seed = 0

# %%
import pandas as pd
import torch

from hmqat import data, models, train

torch.manual_seed(seed)
train_ds = data.load_dataset(dataset, "train", n_synthetic=n_synthetic, seed=seed)
test_ds = data.load_dataset(dataset, "test", n_synthetic=n_synthetic, seed=seed)
test_loader = data.make_loader(test_ds, 500)
published = models.create_model(arch, pretrained=pretrained)


# %% [markdown]
# ## Exercise 1: where do the points go?
# Per-class top-1 of the published weights on the data in use, and (with `other_data_dir`) on a
# second copy. A class loses most where its images rely on fine texture, which JPEG q75 blurs;
# read it off the `drop` column rather than guessing.

# %%
def per_class_top1(model: torch.nn.Module, loader, classes) -> pd.Series:
    """Top-1 (%) of ``model`` on each class."""
    model.eval()
    hit, n = torch.zeros(len(classes)), torch.zeros(len(classes))
    with torch.no_grad():
        for x, y in loader:
            pred = model(x).argmax(1)
            n += torch.bincount(y, minlength=len(classes))
            hit += torch.bincount(y[pred == y], minlength=len(classes))
    return pd.Series((100 * hit / n.clamp_min(1)).numpy(), index=list(classes))


table = pd.DataFrame({"in use": per_class_top1(published, test_loader, test_ds.classes)})
if other_data_dir:
    other = data.make_loader(data.load_cifar10(other_data_dir, "test"), 500)
    table["other copy"] = per_class_top1(published, other, test_ds.classes)
    table["drop"] = table["other copy"] - table["in use"]
    table = table.sort_values("drop", ascending=False)
table.round(2)

# %% [markdown]
# ## Exercise 2: how much of the gap does each epoch close?
# Fine-tune from the published weights for each epoch count (same seed and recipe) and compare
# with the published model's top-1. Expect diminishing returns: most of the gain comes in the
# first epoch, because the network only has to adapt to the JPEG statistics, not learn anew.

# %%
start = train.evaluate(published, test_loader)["top1"]
rows = []
for epochs in epochs_list:
    cfg = train.TrainConfig(epochs=epochs, seed=seed, max_steps_per_epoch=max_steps_per_epoch)
    model, _ = train.finetune(arch, train_ds, test_ds, cfg, batch_size=batch_size,
                              pretrained=pretrained)
    rows.append({"epochs": epochs, "top1": train.evaluate(model, test_loader)["top1"]})
gain = pd.DataFrame(rows)
gain["gain over published"] = gain["top1"] - start
gain

# %% [markdown]
# ## Exercise 3: why fine-tune the FP32 reference on the same data?
# "% of FP32 top-1" divides a quantized model's accuracy by the reference's. The quantized
# models are trained (QAT) on the data in use. A reference that never saw that data would be
# handicapped by the distribution shift (here about 6 points from JPEG compression alone, the
# 81 → 87 % of notebook 00). The ratio would then credit quantization with recovering accuracy
# that fine-tuning alone recovers, and could exceed 100 %. Both sides must see the same training
# data and an equal amount of training for the ratio to measure the cost of quantization.
