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
# # Solutions — 03 QAT
# Each exercise is a pair of short QAT runs that differ in one switch, from the same FP32 model,
# seed and data. The defaults (the lab settings) take minutes on a laptop CPU. One seed screens
# a question; a claim needs ≥ 3 seeds and a paired confidence interval (`hmqat.stats`). The
# test suite runs this on synthetic data, where the numbers mean nothing.

# %% tags=["parameters"]
arch = "resnet20"
dataset = "cifar10"
n_synthetic = 0
pretrained = True
quick_dir = "../../results/quick"
label = "HMQAT 10.34x"
qat_lr = 0.004
max_steps_per_epoch = 100
batch_size = 128
seed = 0

# %%
import json
from pathlib import Path

import pandas as pd
import torch

from hmqat import data, models, quant, train, transitions

torch.manual_seed(seed)
fp32 = models.create_model(arch, pretrained=pretrained)
train_ds = data.load_dataset(dataset, "train", n_synthetic=n_synthetic, seed=seed)
test_ds = data.load_dataset(dataset, "test", n_synthetic=n_synthetic, seed=seed)
train_loader = data.make_loader(train_ds, batch_size, train=True, seed=seed)
test_loader = data.make_loader(test_ds, 500)
config = json.loads((Path(quick_dir) / "data" / "configs.json").read_text())[label]["config"]


def run(step_lr: float, policy: str = "first_last_8", distill: bool = True,
        cfg_bits: dict | None = None) -> tuple[torch.nn.Module, float]:
    """One QAT run of the study's recipe (MSE init, distillation) with one switch changed."""
    cfg = train.TrainConfig(epochs=1, lr=qat_lr, step_lr=step_lr, seed=seed,
                            max_steps_per_epoch=max_steps_per_epoch)
    kd = transitions.make_callbacks({"distillation": {"enabled": distill}}, teacher=fp32)
    qm, _ = train.qat(fp32, cfg_bits or config, train_loader, None, cfg, init="mse",
                      policy=policy, callbacks=kd)
    return qm, train.evaluate(qm, test_loader)["top1"]


# %% [markdown]
# ## Exercise 1: quantize the first and last layers too (`policy="none"`)
# The first conv and the last linear hold about 1 % of ResNet-20's weights, so putting them at
# 2–3 bits saves little size. The first conv sees the raw image and every later layer depends
# on it, and the linear's output is the logits. At 2–3 bits they usually cost more accuracy
# than the bytes are worth; the difference below is that cost (one seed).

# %%
low_ends = dict(config)
names = list(config)
low_ends[names[0]] = low_ends[names[-1]] = 3
_, top_fixed = run(qat_lr / 10)
_, top_low = run(qat_lr / 10, policy="none", cfg_bits=low_ends)
print(f"first/last at 8 bits: {top_fixed:.2f} %; at 3 bits: {top_low:.2f} % "
      f"(size {quant.model_size_mb(fp32, config, a_bits=4) * 1024:.1f} vs "
      f"{quant.model_size_mb(fp32, low_ends, a_bits=4) * 1024:.1f} KB)")

# %% [markdown]
# ## Exercise 2: step lr = lr vs lr / 10
# LSQ's step gradient is already scaled by g = 1/√(N·Q_P) (Eq. Q), but the steps stay sensitive
# to their own learning rate. The table gives how far each layer's weight step moved from its
# MSE initialisation. At `step_lr = lr` they drift more, which can undo the careful MSE init in
# a short run.

# %%
moves = {}
for name, lr in (("step_lr = lr", qat_lr), ("step_lr = lr/10", qat_lr / 10)):
    qm, top = run(lr)
    init = quant.quantize_model(fp32, config, a_bits=4, init="mse")
    moves[f"{name} ({top:.1f} %)"] = {
        n: float((m.weight_quantizer.step - init.get_submodule(n).weight_quantizer.step).abs()
                 .div(init.get_submodule(n).weight_quantizer.step).mean())
        for n, m in quant.quantized_layers(qm).items()}
pd.DataFrame(moves).describe().loc[["mean", "50%", "max"]].round(3)

# %% [markdown]
# ## Exercise 3: distillation off
# With distillation the student matches the FP32 model's soft outputs, a denser signal than
# one-hot labels. That matters most when there are few steps to recover from the quantization
# shock. The quick profile measured +1.6 points for `lsq+distill` over `lsq` at 200 steps
# (README, ablation table; one seed).

# %%
_, top_kd = run(qat_lr / 10, distill=True)
_, top_plain = run(qat_lr / 10, distill=False)
print(f"with distillation {top_kd:.2f} %, without {top_plain:.2f} % "
      f"(difference {top_kd - top_plain:+.2f} points, one seed)")
