"""The recipe's choices, re-decided on the validation split (hmqat.study.ablation.choice_*)."""
import math

import numpy as np
import pandas as pd
import pytest
import torch

from hmqat import data, models, quant, stats, train
from hmqat.study import ablation, runs
from hmqat.transitions import Recipe


def test_choice_arms_flip_one_setting_each():
    kd = Recipe.from_dict({"distillation": {"enabled": True}})
    arms = ablation.choice_arms(lr=0.004, step_lr=0.004, recipe=kd, init="mse")
    by = {a.choice: a for a in arms}
    assert [a.label for a in arms] == ["profile", "step_lr = lr/10", "distillation off",
                                       "init lsq"]
    assert by["step_lr"].step_lr == pytest.approx(0.0004) and by["step_lr"].init == "mse"
    assert not by["distillation"].recipe.distillation.enabled
    assert by["distillation"].recipe.distillation.temperature == kd.distillation.temperature
    assert by["init"].init == "lsq" and by["init"].recipe == kd
    other = ablation.choice_arms(lr=0.004, step_lr=0.0004, recipe=Recipe(), init="lsq")
    assert [a.label for a in other] == ["profile", "step_lr = lr", "distillation on", "init mse"]


def test_recipe_choices_train_each_arm_per_seed_and_read_back(tmp_path):
    torch.manual_seed(0)
    fp32 = models.create_model("resnet20", pretrained=False).eval()
    tr = data.synthetic_cifar(32, seed=0)
    val = data.make_loader(data.synthetic_cifar(20, seed=1), 10)
    cfg = train.TrainConfig(epochs=1, lr=0.01, max_steps_per_epoch=1)
    arms = ablation.choice_arms(lr=0.01, step_lr=0.01, recipe=Recipe(), init="lsq")[:2]
    loader = lambda s: data.make_loader(tr, 16, train=True, seed=s, drop_last=True)  # noqa: E731
    kw = dict(run_dir=tmp_path, a_bits=4, device="cpu")
    table = ablation.recipe_choices(fp32, quant.uniform_config(fp32, 4), arms, cfg, [0, 1],
                                    loader, val, **kw)
    assert len(table) == 4 and set(table["label"]) == {"profile", "step_lr = lr/10"}
    assert table["correct"].map(lambda b: isinstance(b, str)).all()
    again = ablation.recipe_choices(fp32, quant.uniform_config(fp32, 4), arms, cfg, [0, 1],
                                    loader, val, **kw)
    assert again["cached"].all() and again["val_top1"].tolist() == table["val_top1"].tolist()
    out = ablation.choice_table(table)
    assert list(out["choice"]) == ["step_lr"] and out.iloc[0]["interval"] == "seeds × images"


def _frame(delta_bits: int):
    """Two arms on 3 seeds x 400 validation images that every seed gets right alike; the
    alternative gets ``delta_bits`` more (or fewer) images right, the same ones in every seed."""
    rng = np.random.default_rng(0)
    base = np.tile(rng.random(400) < 0.8, (3, 1))
    alt = base.copy()
    if delta_bits > 0:
        idx = np.flatnonzero(~base[0])[:delta_bits]
        alt[:, idx] = True
    elif delta_bits < 0:
        idx = np.flatnonzero(base[0])[:-delta_bits]
        alt[:, idx] = False
    rows = []
    for label, choice, bits in (("profile", "profile", base), ("init lsq", "init", alt)):
        for k in range(3):
            rows.append({"label": label, "choice": choice, "seed": k,
                         "val_top1": 100 * bits[k].mean(), "correct": runs.pack_correct(bits[k]),
                         "n_val": 400, "size_mb": 0.1, "compression": 10.0, "bops": 1e9,
                         "avg_bits": 3.0})
    return pd.DataFrame(rows), base, alt


@pytest.mark.parametrize("delta,word", [(40, "contradicted"), (-40, "confirmed"),
                                        (0, "undecided")])
def test_choice_verdict_says_what_the_interval_supports(delta, word):
    frame, base, alt = _frame(delta)
    table = ablation.choice_table(frame)
    want = stats.crossed_paired_difference(100.0 * alt, 100.0 * base)
    row = table.iloc[0]
    if math.isfinite(want.low):
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((want.low, want.high))
    text = ablation.choice_verdict(table)
    assert len(text) == 1 and word in text[0] and text[0].startswith("init:")
    one = ablation.choice_verdict(ablation.choice_table(frame[frame["seed"] == 0]))
    assert "a screen, not a decision" in one[0]
