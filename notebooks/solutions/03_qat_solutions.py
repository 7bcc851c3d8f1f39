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
# First the two fill-in exercises of the notebook (03.1, 03.2), with their checks; then the
# open exercises, each a pair of short QAT runs that differ in one switch, from the same FP32
# model, seed and data. At the defaults below that is four runs of 100 steps with distillation,
# about 3–4 min on a 2-core CPU (an estimate at ~0.4 s per step, not a measurement). One seed screens a question; a
# claim needs ≥ 3 seeds and a paired confidence interval (`hmqat.stats`). The test suite runs
# this on synthetic data, where the numbers mean nothing.

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
import torch.nn.functional as F

from hmqat import data, models, quant, train, transitions
from hmqat.study import lessons

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
# ## Exercise 03.1 (fill in): LSQ's step gradient
# With v = w/s: round(v) − v inside the range (the rounding's derivative is taken as 0, the STE),
# Q_N below it and Q_P above it, since a clipped value is s·Q_N or s·Q_P. Inside the range the
# gradient is the signed distance to the nearest grid point, largest at the rounding
# thresholds: LSQ's step "sees" the transition points.

# %%
def lsq_step_grad(w: torch.Tensor, s: torch.Tensor, b: int) -> torch.Tensor:
    """∂q/∂s of Eq. Q for every element of w (signed b-bit range), without LSQ's scale g."""
    v = w / s
    qn, qp = -2 ** (b - 1), 2 ** (b - 1) - 1
    inside = torch.round(v) - v
    return torch.where(v <= qn, float(qn), torch.where(v >= qp, float(qp), inside))


w = fp32.get_submodule("layer1.0.conv1").weight.detach()
s = quant.init_step(w, 3, method="mse").view(-1, 1, 1, 1)
lessons.check_03_step_grad(lsq_step_grad, w, s, 3)

# %% [markdown]
# ## Exercise 03.2 (fill in): the distillation term
# KL(p ‖ q) = Σ_k p_k (log p_k − log q_k) with p the teacher's softened distribution, averaged
# over the batch and multiplied by T²: the softened targets' gradients shrink as 1/T², and T²
# keeps their weight against the cross-entropy comparable across temperatures. The student here
# is one short QAT run of the study's recipe.

# %%
def kd_term(z_student: torch.Tensor, z_teacher: torch.Tensor, T: float) -> torch.Tensor:
    """T² · KL(softmax(z_teacher / T) ‖ softmax(z_student / T)), the batch mean."""
    log_p = F.log_softmax(z_teacher / T, dim=1)
    log_q = F.log_softmax(z_student / T, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1).mean() * T * T


qm_kd, top_kd = run(qat_lr / 10, distill=True)   # also exercise 3's distilled run
x_batch = next(iter(test_loader))[0]
with torch.no_grad():
    z_teacher, z_student = fp32.eval()(x_batch), qm_kd.eval()(x_batch)
lessons.check_03_distillation(kd_term, z_student, z_teacher, 4.0)

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
top_fixed = top_kd                       # the same run as exercise 03.2's (step_lr = lr/10, KD)
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
    qm, top = (qm_kd, top_kd) if lr == qat_lr / 10 else run(lr)   # lr/10: exercise 03.2's run
    init = quant.quantize_model(fp32, config, a_bits=4, init="mse")
    with torch.no_grad():     # the steps are trainable parameters; only their values matter
        moves[f"{name} ({top:.1f} %)"] = {
            n: float((m.weight_quantizer.step - init.get_submodule(n).weight_quantizer.step).abs()
                     .div(init.get_submodule(n).weight_quantizer.step).mean())
            for n, m in quant.quantized_layers(qm).items()}
pd.DataFrame(moves).describe().loc[["mean", "50%", "max"]].round(3)

# %% [markdown]
# ## Exercise 3: distillation off
# With distillation the student matches the FP32 model's soft outputs, a denser signal than
# one-hot labels. That matters most when there are few steps to recover from the quantization
# shock. Both runs below are one seed; a claim about the gain needs the same pair on ≥ 3 seeds
# and a paired interval.

# %%
_, top_plain = run(qat_lr / 10, distill=False)   # top_kd: exercise 03.2's distilled run
print(f"with distillation {top_kd:.2f} %, without {top_plain:.2f} % "
      f"(difference {top_kd - top_plain:+.2f} points, one seed)")
