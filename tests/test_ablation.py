"""The ablation runner of notebook 04 on a tiny synthetic setup."""
import json
from dataclasses import replace
import math
import re

import pandas as pd

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hmqat import data, models, quant, train
from hmqat.study import ablation, runs


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.conv4 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn4 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        x = F.relu(self.bn4(self.conv4(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    fp32 = Tiny()
    layers = models.quantizable_layers(fp32)
    n_params = {info.name: info.n_params for info in layers}
    bits = [2, 3, 4, 8]
    # synthetic Ω_i(b) = c_i · n_i · 4^-b, different layer sensitivities per variant
    sens = {"joint": [1.0, 3.0, 0.5, 2.0, 1.0], "trace": [1.0, 0.2, 4.0, 0.3, 1.0]}
    omegas = {v: pd.DataFrame({b: [c * n_params[info.name] * 4.0 ** -b
                                   for c, info in zip(cs, layers, strict=True)] for b in bits},
                              index=[info.name for info in layers])
              for v, cs in sens.items()}
    tr = data.make_loader(data.synthetic_cifar(64, seed=0), 16, train=True, seed=0)
    te = data.make_loader(data.synthetic_cifar(32, seed=1), 32)
    cfg = train.TrainConfig(epochs=1, lr=0.01, step_lr=0.001, max_steps_per_epoch=2, seed=0)
    budget = quant.model_size_mb(fp32, quant.uniform_config(fp32, 4), a_bits=4)
    return fp32, tr, te, cfg, omegas, n_params, budget


def test_runner_table_rows_equal_size_and_skip_on_rerun(setup, tmp_path, monkeypatch):
    fp32, tr, te, cfg, omegas, n_params, budget = setup
    table = ablation.run_ablations(fp32, tr, te, cfg, omegas, n_params, max_mb=budget,
                                   run_dir=tmp_path, a_bits=4)
    assert list(table.columns) == ablation.COLUMNS
    trans = table[table.group == "transition"]
    assert list(trans.variant) == list(ablation.TRANSITION_VARIANTS)
    alloc = table[table.group == "allocation"]
    assert list(alloc.variant) == ["hmqat-joint", "hmqat-trace", "uniform", "random", "random",
                                   "random", "greedy", "ilp"]
    assert list(alloc[alloc.variant == "random"].seed) == [0, 1, 2]
    assert (table.train_seed == 0).all() and table.top1.between(0, 100).all()
    assert alloc.search_ms.notna().all() and trans.search_ms.isna().all()
    # equal size: nobody exceeds the HMQAT pick, which fits the budget; sizes are measured
    hm = alloc.iloc[0]
    assert hm.size_mb <= budget and (alloc.size_mb <= hm.size_mb + 1e-12).all()
    assert table.loc[table.group == "transition", "size_mb"].nunique() == 1
    for rec in table.attrs["records"]:
        assert rec["size_mb"] == pytest.approx(quant.model_size_mb(fp32, rec["bit_config"], 4))
    assert json.loads(hm.bit_config) == json.loads(trans.iloc[0].bit_config)
    # the ILP is exact: its ΣΩ equals the frontier pick's (same table, same size cap)
    assert alloc[alloc.variant == "ilp"].omega.item() == pytest.approx(hm.omega)
    assert trans.recipe.iloc[-1].endswith("KD(T=4, w=1)")
    assert trans.osc_frac.notna().all() and trans.frozen_frac.isna().sum() == 4
    # lsq of the transition group and hmqat-joint are one run (trained once)
    assert trans.run_id.iloc[0] == hm.run_id
    assert len(table.attrs["trained"]) == len(set(table.run_id)) < len(table)
    for run_id in set(table.run_id):
        assert (tmp_path / run_id / "result.json").exists()
        assert (tmp_path / run_id / "checkpoint.pt").exists()

    # rerun: everything is read back, nothing trains
    def no_training(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(train, "qat", no_training)
    again = ablation.run_ablations(fp32, tr, te, cfg, omegas, n_params, max_mb=budget,
                                   run_dir=tmp_path, a_bits=4)
    assert again.attrs["trained"] == [] and len(again.attrs["cached"]) == len(table)
    live = ["search_ms"]                    # the searches rerun (milliseconds) and are re-timed
    pd.testing.assert_frame_equal(again.drop(columns=live), table.drop(columns=live))


def test_interrupted_run_resumes_from_its_checkpoint(setup, tmp_path):
    fp32, tr, te, cfg, omegas, n_params, budget = setup
    cfg2 = train.TrainConfig(epochs=2, lr=0.01, max_steps_per_epoch=2)
    table = ablation.transition_ablation(fp32, tr, te, cfg2, quant.uniform_config(fp32, 4),
                                         run_dir=tmp_path, variants=["lsq+freeze"])
    run = tmp_path / table.run_id.item()
    (run / "result.json").unlink()          # as if the process died after the last epoch
    ck = torch.load(run / "checkpoint.pt", weights_only=False)
    assert ck["epoch"] == 1
    again = ablation.transition_ablation(fp32, tr, te, cfg2, quant.uniform_config(fp32, 4),
                                         run_dir=tmp_path, variants=["lsq+freeze"])
    assert again.attrs["trained"] == [table.run_id.item()]     # re-entered, no epoch left
    cols = ["top1", "loss", "size_mb", "osc_frac", "frozen_frac"]
    pd.testing.assert_frame_equal(again[cols], table[cols])


def test_summary_and_bad_inputs(setup, tmp_path):
    fp32, tr, te, cfg, omegas, n_params, budget = setup
    specs = ablation.transition_specs(quant.uniform_config(fp32, 4), seeds=(0, 1),
                                      variants=["lsq", "all"])
    assert [(s.variant, s.seed) for s in specs] == [("lsq", 0), ("all", 0), ("lsq", 1),
                                                    ("all", 1)]
    r = specs[1].recipe
    assert r.transition.enabled and r.oscillation.freeze and r.oscillation.dampen
    assert not r.distillation.enabled and r.oscillation.track
    with pytest.raises(ablation.AblationError, match=r"unknown transition variant\(s\) \['al'\]"):
        ablation.transition_specs({}, variants=["al"])
    with pytest.raises(ablation.AblationError, match="give exactly one size budget"):
        ablation.allocation_specs(omegas, n_params)
    with pytest.raises(ablation.AblationError, match=r"primary='hessian' is not a key"):
        ablation.allocation_specs(omegas, n_params, max_mb=budget, primary="hessian")
    with pytest.raises(ablation.AblationError, match=r"unknown allocation method\(s\) \['dp'\]"):
        ablation.allocation_specs(omegas, n_params, max_mb=budget, methods=["dp"])
    with pytest.raises(ablation.AblationError, match=r"n_params names layers \['nope'\]"):
        ablation.allocation_ablation(fp32, tr, te, cfg, omegas, {"nope": 3}, max_mb=budget,
                                     run_dir=tmp_path)
    with pytest.raises(ablation.AblationError, match="seeds is empty"):
        ablation.transition_specs({}, seeds=())
    with pytest.raises(ablation.AblationError, match=r"groups=\['both'\]"):
        ablation.run_ablations(fp32, tr, te, cfg, omegas, max_mb=budget, run_dir=tmp_path,
                               groups=["both"])
    with pytest.raises(ablation.AblationError, match="the ablation table is empty"):
        ablation.summarize(pd.DataFrame(columns=ablation.COLUMNS))
    with pytest.raises(ablation.AblationError, match="val_loader is None"):
        ablation.run_specs(specs, fp32, tr, None, cfg, run_dir=tmp_path)
    with pytest.raises(runs.RunError, match="recipe must be a hmqat.transitions.Recipe or its"):
        runs.qat_run(fp32, {}, 42, tr, te, cfg, run_dir=tmp_path)
    table = pd.DataFrame({"group": ["a", "a", "b"], "variant": ["r", "r", "u"],
                          "top1": [50.0, 60.0, 70.0], "size_mb": 1.0, "compression": 2.0,
                          "avg_bits": 4.0, "osc_frac": 0.1})
    s = ablation.summarize(table)
    assert s.top1.tolist() == [55.0, 70.0] and s.n.tolist() == [2, 1]
    assert s.top1_std.iloc[0] == pytest.approx(7.0710678) and pd.isna(s.top1_std.iloc[1])


def test_allocation_specs_keep_only_equal_size_rows(setup, capsys):
    """Every allocation row lies within ±1 % of the budget's size (docs/method.md §8); one
    farther away (here uniform, whose nearest width is far from the budget) is left out with a
    printed line naming its size."""
    fp32, tr, te, cfg, omegas, n_params, budget = setup
    specs = ablation.allocation_specs(omegas, n_params, max_mb=budget, random_seeds=(0,))
    assert re.search(r"allocation 'uniform' is \d\.\d+ MB, [-+]\d+\.\d % from the .* budget "
                     r"\(outside ±1 %\): left out", capsys.readouterr().out)
    size = specs[0].info["planned_mb"]
    assert all(abs(s.info["planned_mb"] / size - 1) <= 0.01 for s in specs)
    loose = ablation.allocation_specs(omegas, n_params, max_mb=budget, random_seeds=(0,),
                                      size_tol=10.0)
    assert len(loose) > len(specs) and {s.variant for s in loose} >= {"uniform", "greedy"}


# --------------------------------------------------------------------------------------------
# The transition experiment (issue 14)
# --------------------------------------------------------------------------------------------
def test_transition_arm_budgets_and_recipes():
    from hmqat.transitions import Recipe

    base = Recipe(distillation={"enabled": True})
    lsq = ablation.TransitionArm("lsq")
    ladder = ablation.TransitionArm("data", "data", (8, 4), scale_only_steps=3)
    assert ablation._steps_for(lsq, "A", 300, 50) == (300, 300)
    assert ablation._steps_for(ladder, "A", 300, 50) == (300, 250)
    assert ablation._steps_for(ladder, "B", 300, 50) == (350, 300)
    r = ladder.recipe(base, 300, 250)
    assert r.transition.stages == ((0, 8), (25, 4), (50, "target")) and r.transition.unit == "step"
    assert r.transition.reinit == "data" and r.transition.scale_only_steps == 3
    assert r.distillation.enabled and not r.bn.at_end
    assert lsq.recipe(base, 300, 300) == base
    with pytest.raises(ablation.AblationError, match=r"no precision schedule"):
        lsq.recipe(base, 300, 250)
    with pytest.raises(ablation.AblationError, match=r"budget='C'"):
        ablation._steps_for(lsq, "C", 300, 50)
    names = [a.name for a in ablation.screening_arms(20)]
    assert names == ["data+so/none", "range/8>T", "data+so/8>T", "range/8>4>T", "data+so/8>4>T"]


def test_bn_arm_from_the_checkpoint_equals_bn_reestimation_in_the_run(setup, tmp_path):
    from hmqat.transitions import Recipe

    fp32 = setup[0]
    train_set = data.synthetic_cifar(64, seed=0)
    val = data.make_loader(data.synthetic_cifar(32, seed=2), 32)
    cfg = train.TrainConfig(epochs=1, lr=0.05, step_lr=0.005, seed=0)
    config = quant.uniform_config(fp32, 2)
    kw = dict(base=Recipe(), total_steps=3, steps_at_target=3, run_dir=tmp_path, batch_size=16,
              a_bits=4)
    lsq = ablation.TransitionArm("lsq")
    plain = ablation.run_transition_arm(lsq, 1, fp32, train_set, val, cfg, config, **kw)
    in_run = ablation.run_transition_arm(ablation.TransitionArm("lsq+bn", bn_end=True), 1, fp32,
                                         train_set, val, cfg, config, **kw)
    post = ablation.bn_reestimated(plain, lsq, fp32, train_set, val, config, base=Recipe(),
                                   run_dir=tmp_path, batch_size=16, a_bits=4)
    assert post["arm"] == "lsq+bn" and post["val_top1"] == in_run["val_top1"]
    got = pd.DataFrame(post["record"]["bn_drift"])
    want = pd.DataFrame(in_run["record"]["bn_drift"])
    pd.testing.assert_frame_equal(got, want)
    assert (tmp_path / plain["run_id"] / "bn.json").exists()


def test_transition_verdict_applies_the_goal_to_each_point():
    nan = float("nan")
    paired = pd.DataFrame([
        # point, budget, arm, seeds, test_mean, test_std, test_diff, low, high
        ("HMQAT 10.34x", "A", "lsq/step_lr=lr", 3, 86.4, 0.1, nan, nan, nan),
        ("HMQAT 10.34x", "A", "data+so/8>4>T", 3, 86.2, 0.2, -0.2, -0.6, 0.2),
        ("uniform W2A4", "A", "lsq/step_lr=lr", 3, 84.0, 0.3, nan, nan, nan),
        ("uniform W2A4", "A", "data+so/8>4>T", 3, 84.9, 0.2, 0.9, 0.4, 1.4),
        ("uniform W2A4", "A", "lsq/step_lr=lr+bn", 3, 84.3, 0.2, 0.3, 0.1, 0.5),
    ], columns=["point", "budget", "arm", "seeds", "test_mean", "test_std", "test_diff",
                "test_ci_low", "test_ci_high"])
    text = ablation.transition_verdict(paired, {"screen_seed": 0, "step_lr": "lr (0.004)",
                                                "final_arm": "data+so/8>4>T"})
    lines = text.splitlines()
    assert "`data+so/8>4>T` -0.20 [-0.60, +0.20]" in lines[1] and "goal met" not in lines[1]
    assert "`data+so/8>4>T` +0.90 [+0.40, +1.40] (goal met)" in lines[2]
    # +0.3 excludes 0 but is below the +0.5 goal: not met
    assert "`lsq/step_lr=lr+bn` +0.30 [+0.10, +0.50];" in lines[2] + ";"
    assert lines[-1].endswith("Met by data+so/8>4>T at uniform W2A4 (budget A).")
    none = ablation.transition_verdict(paired.iloc[:2], {})
    assert "No arm meets it" in none


@pytest.mark.parametrize("study_val, n_val, says, never", [
    (5000, 5000, "every arm trained from notebook 00's FP32 model; choices on the study's "
     "validation split (val_*), which no model involved has seen", "hold-out"),
    (0, 5000, "every arm trained from one FP32 model fine-tuned on train minus a 5000-image "
     "hold-out; choices on the hold-out (val_*)", "notebook 00's"),
    (5000, 2000, "fine-tuned on train minus a 2000-image hold-out", "notebook 00's"),
])
def test_transition_captions_name_where_the_model_and_validation_come_from(study_val, n_val,
                                                                           says, never):
    """Notebook 04's rule: the study's own validation split (same size) means notebook 00's
    model, unseen validation images; otherwise ablation.validation_fp32's hold-out model."""
    caps = ablation.transition_captions(
        arch="resnet20", point="HMQAT 10.34x", seeds=[0, 1, 2],
        settings={"val_size": n_val, "device": "cpu"},
        choices={"screen_seed": 0, "step_lr": "lr/10 (0.0004)"}, study_val_size=study_val,
        n_runs=29, run_hours=1.85)
    paired = caps["transition_experiment"]
    assert says in paired and never not in paired
    assert "seeds [0, 1, 2] (paired)" in paired and paired.endswith("29 trained runs 1.85 h")
    where = "validation split only" if "00's" in says else "validation hold-out only"
    assert caps["transition_screen"].startswith(
        f"Screening of transition arms at HMQAT 10.34x, seed 0, {where} (one seed")


def test_transition_verdict_judges_budget_b_against_the_equal_steps_control():
    nan = float("nan")
    cols = ["point", "budget", "arm", "role", "seeds", "test_mean", "test_std", "test_diff",
            "test_ci_low", "test_ci_high", "ctrl_test_diff", "ctrl_test_ci_low",
            "ctrl_test_ci_high"]
    paired = pd.DataFrame([
        ("P", "B", "lsq", "reference", 3, 86.0, 0.1, nan, nan, nan, nan, nan, nan),
        # +0.6 over plain LSQ with 50 fewer steps, but only +0.1 over the control: not met
        ("P", "B", "data+so/8>T", "arm", 3, 86.6, 0.1, 0.6, 0.3, 0.9, 0.1, -0.2, 0.4),
        # the control beats plain LSQ by its extra steps: shown, never a winner
        ("P", "B", "lsq (+50)", "control", 3, 86.5, 0.1, 0.5, 0.2, 0.8, nan, nan, nan),
    ], columns=cols)
    text = ablation.transition_verdict(paired, {})
    assert ("`data+so/8>T` +0.60 [+0.30, +0.90], vs the control with equal total steps "
            "+0.10 [-0.20, +0.40];") in text
    assert "No arm meets it" in text
    paired.loc[1, ["ctrl_test_diff", "ctrl_test_ci_low"]] = [0.7, 0.2]
    assert "Met by data+so/8>T at P (budget B)." in ablation.transition_verdict(paired, {})


def _fixed_size_table(fp32, n=7):
    """A fixed-size table like notebook 01's: configs of one size (2/8-bit swaps), predictors."""
    names = [i.name for i in models.quantizable_layers(fp32)]
    middles = [(2, 3, 4), (3, 3, 4), (4, 3, 2), (3, 4, 2), (2, 4, 3), (4, 2, 3), (3, 2, 4)]
    rows = []
    for k in range(n):
        cfg = dict(zip(names, (8, *middles[k], 8), strict=True))
        rows.append({"config_id": k, "top1": 50.0 - k, "loss": 1.0 + k, "loss_increase": 0.1 * k,
                     "size_mb": 0.01, "compression": 10.0 + 0.01 * k, "n_2bit": k % 2,
                     "omega_joint": float((k * 5) % n), "omega_qerr_only": float(k),
                     "config": json.dumps(cfg)})
    return pd.DataFrame(rows)


def test_qat_level_configs_span_omega_and_reject_too_few(setup):
    table = _fixed_size_table(setup[0])
    picked = ablation.qat_level_configs(table, 3)
    assert picked["omega_joint"].tolist() == [0.0, 3.0, 6.0]     # min, middle, max of ΣΩ
    assert len(ablation.qat_level_configs(table, 7)) == 7
    for bad in (2, 8, 3.0):
        with pytest.raises(ablation.AblationError, match="choose 3 <= n"):
            ablation.qat_level_configs(table, bad)
    with pytest.raises(ablation.AblationError, match="no column 'omega_x'"):
        ablation.qat_level_configs(table, 3, by="omega_x")


def test_qat_level_check_trains_each_config_and_ranks_predictors(setup, tmp_path):
    from hmqat.transitions import Recipe

    fp32, tr, te, cfg = setup[:4]
    table = _fixed_size_table(fp32)
    out = ablation.qat_level_check(fp32, tr, te, cfg, table, n=4, run_dir=tmp_path,
                                   recipe=Recipe(), a_bits=4, n_boot=200)
    runs, k = out["runs"], out["kendall"]
    assert len(runs) == 4 and runs["omega_joint"].is_monotonic_increasing
    assert ((runs["qat_top1"] + runs["qat_error"]) == 100).all()
    assert runs["ptq_top1"].tolist() == table.set_index("config_id").loc[
        runs["config_id"], "top1"].tolist()
    assert len(list(tmp_path.glob("*/result.json"))) == 4            # one trained run each
    # only the predictors the table has, joint first; τ against the QAT error by hand
    assert k["predictor"].tolist() == ["omega_joint", "omega_qerr_only", "n_2bit",
                                       "loss_increase"]
    from scipy.stats import kendalltau
    want = kendalltau(runs["omega_qerr_only"], runs["qat_error"]).statistic
    got = k.set_index("predictor").loc["omega_qerr_only", "kendall_tau"]
    assert got == pytest.approx(want) or (math.isnan(want) and math.isnan(got))
    again = ablation.qat_level_check(fp32, tr, te, cfg, table, n=4, run_dir=tmp_path,
                                     recipe=Recipe(), a_bits=4, n_boot=200)
    pd.testing.assert_frame_equal(again["runs"].drop(columns="wall_s"),
                                  runs.drop(columns="wall_s"))


def test_qat_level_verdict_reads_the_cis():
    runs = pd.DataFrame({"compression": [10.3, 10.4, 10.35], "omega_joint": [0.1, 0.5, 2.0],
                         "qat_top1": [89.0, 88.5, 87.0]})
    kendall = pd.DataFrame([
        ("omega_joint", 0.6, 0.2, 0.9, math.nan, math.nan, math.nan),
        ("omega_qerr_only", 0.5, 0.1, 0.8, 0.1, -0.2, 0.4),
        ("n_2bit", 0.2, -0.3, 0.6, 0.4, 0.1, 0.7),
    ], columns=["predictor", "kendall_tau", "tau_low", "tau_high", "ref_minus_tau", "diff_low",
                "diff_high"])
    text = ablation.qat_level_verdict({"runs": runs, "kendall": kendall}, steps=150)
    assert "spread 2.00 points" in text and "**+0.60** [+0.20, +0.90]" in text
    assert "`omega_qerr_only`, +0.50" in text and "cannot be told apart" in text
    assert "ΣΩ ranks configs of equal size" in text
    kendall.loc[0, "tau_low"] = -0.1
    assert "not shown to survive QAT" in ablation.qat_level_verdict(
        {"runs": runs, "kendall": kendall}, steps=150)
    tied = kendall.assign(kendall_tau=math.nan)      # every QAT error tied: no τ defined
    assert "No Kendall τ is defined here" in ablation.qat_level_verdict(
        {"runs": runs, "kendall": tied}, steps=150)


def test_transition_study_budget_b_gives_the_ladder_arm_an_equal_steps_control(setup, tmp_path,
                                                                               monkeypatch):
    from hmqat.transitions import Recipe

    fp32 = setup[0]
    ladder = ablation.TransitionArm("data+so/8>T", "data", (8,), 1, 0)
    monkeypatch.setattr(ablation, "screening_arms",      # only a ladder arm to choose from
                        lambda scale_only, step_lr_mult=None: [replace(ladder,
                                                                       step_lr_mult=step_lr_mult)])
    out = ablation.transition_study(
        fp32, data.synthetic_cifar(64, seed=0), data.make_loader(data.synthetic_cifar(32, seed=2), 32),
        data.make_loader(data.synthetic_cifar(32, seed=3), 32),
        train.TrainConfig(epochs=1, lr=0.05, step_lr=0.005, seed=0), quant.uniform_config(fp32, 2),
        base=Recipe(), run_dir=tmp_path, steps=4, pre_steps=2, scale_only_steps=1, seeds=(0, 1),
        budgets=("A", "B"), batch_size=16, log=lambda *_: None, a_bits=4)
    b = out["paired"][out["paired"]["budget"] == "B"]
    ctrl = b[b["role"] == "control"].iloc[0]
    arm = b[(b["role"] == "arm") & b["arm"].str.startswith("data+so/8>T")].iloc[0]
    assert (ctrl["total_steps"], ctrl["steps_at_target"]) == (6, 6)
    assert (arm["total_steps"], arm["steps_at_target"]) == (6, 4)
    # ctrl_test_diff = arm − control on the same seeds, by hand
    final = out["final"][out["final"]["budget"] == "B"].set_index(["arm", "seed"])["test_top1"]
    by_hand = final.loc[arm["arm"]] - final.loc[ctrl["arm"]]
    assert arm["ctrl_test_diff"] == pytest.approx(by_hand.mean())
    # plain LSQ + BN has fewer steps than the control: compared with plain LSQ only
    lsq_bn = b[b["arm"].str.startswith("lsq/") & b["arm"].str.endswith("+bn")].iloc[0]
    assert lsq_bn["role"] == "arm" and pd.isna(lsq_bn["ctrl_test_diff"])
    assert out["paired"].loc[out["paired"]["budget"] == "A", "ctrl_test_diff"].isna().all()
