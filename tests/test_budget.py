"""hmqat.study.budget: the budget axis's schedules, pairs, 0-step records and verdicts."""
import numpy as np
import pandas as pd
import pytest
import torch

from hmqat import data, models, quant, search, sensitivity, stats, train
from hmqat.study import budget, runs


def test_schedule_cuts_one_epoch_below_it_and_keeps_whole_epochs_above():
    assert budget.schedule(150, 390) == (1, 150)
    assert budget.schedule(390, 390) == (1, None)          # notebook 03's identity
    assert budget.schedule(1560, 390) == (4, None)
    with pytest.raises(budget.BudgetError, match="use 780 or 1170"):
        budget.schedule(1000, 390)
    with pytest.raises(budget.BudgetError, match="post-training"):
        budget.schedule(0, 390)
    assert budget.budget_label(0, 390) == "0 (PTQ)"
    assert budget.budget_label(1560, 390) == "1560 (4 ep)" and budget.budget_label(150, 390) == "150"


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    model = models.create_model("resnet20", pretrained=False).eval()
    layers = list(quant.uniform_config(model, 8))
    omega = pd.DataFrame({b: np.linspace(1, 2, len(layers)) * 4.0 ** (-b) for b in (2, 3, 4, 8)},
                         index=layers)
    return model, search.Problem.from_model(model, omega, (2, 3, 4, 8))


def test_bops_matched_is_the_largest_frontier_config_within_the_uniform_bops(problem):
    model, prob = problem
    uni = quant.uniform_config(model, 3)
    ref = prob.evaluate({**prob.fixed, **uni})
    pick = budget.bops_matched_config(prob, uni)
    pts = prob.frontier("size").points
    ok = pts[pts["bops"] <= ref.bops]
    assert pick.bops <= ref.bops and pick.size_mb == pytest.approx(ok["size_mb"].max())
    bigger = pts[pts["size_mb"] > pick.size_mb]
    assert (bigger["bops"] > ref.bops).all()      # every larger frontier point costs more BOPs


def test_random_same_size_configs_are_distinct_and_within_tolerance(problem):
    _, prob = problem
    target = prob.evaluate({n: prob.fixed.get(n, 3) for n in prob.layers}).size_mb
    picks = budget.random_same_size(prob, target, 3, seed=0)
    assert len({tuple(sorted(p.config.items())) for p in picks}) == 3
    assert all(abs(p.size_mb / target - 1) <= 0.01 for p in picks)
    assert [p.config for p in picks] == [p.config for p in budget.random_same_size(prob, target, 3)]


def test_ptq_record_scores_the_model_every_qat_run_starts_from(problem):
    model, _ = problem
    tr = data.make_loader(data.synthetic_cifar(64, seed=0), 32, train=True, seed=0, drop_last=True)
    val = data.make_loader(data.synthetic_cifar(40, seed=1), 20)
    te = data.make_loader(data.synthetic_cifar(30, seed=2), 10)
    calib = [b for b, _ in zip(tr, range(2))]
    cfg = quant.uniform_config(model, 4)
    rec = budget.ptq_record(model, cfg, calib, val, te, a_bits=4, policy="first_last_8",
                            init="mse", input_size=(1, 3, 32, 32))
    q = sensitivity.ptq_model(model, cfg, calib, a_bits=4, init="mse")
    want = train.evaluate(q, te, per_image=True)
    assert rec["test_top1"] == pytest.approx(want["top1"]) and rec["n_test"] == 30
    assert np.array_equal(runs.unpack_correct(rec["test_correct"], 30), want["correct"])
    assert rec["bops"] == quant.bops(q, input_size=(1, 3, 32, 32))


def _runs_frame(rng, steps_list=(0, 150)):
    rows = []
    for steps in steps_list:
        for label in ("HMQAT =W3A4 size", "uniform W3A4"):
            for seed in range(3):
                bits = rng.random(40) < (0.7 if label.startswith("HMQAT") else 0.6)
                rows.append({"label": label, "seed": seed, "steps": steps,
                             "budget": budget.budget_label(steps, 390), "avg_bits": 3.0,
                             "size_mb": 0.1, "compression": 10.0, "bops": 1e9,
                             "test_top1": 100 * bits.mean(),
                             "test_correct": runs.pack_correct(bits), "n_test": 40})
    return pd.DataFrame(rows)


def test_budget_table_pairs_within_each_budget_and_the_verdict_says_the_sign():
    frame = _runs_frame(np.random.default_rng(0))
    pairs = budget.comparison_pairs(frame["label"])
    assert pairs == [("=W3A4 size: mixed − uniform W3A4", "HMQAT =W3A4 size", "uniform W3A4")]
    table = budget.budget_table(frame, pairs)
    assert list(table["steps"]) == [0, 150] and set(table["interval"]) == {"seeds × images"}
    sub = frame[frame["steps"] == 150]

    def mat(label):
        rows = sub[sub["label"] == label].sort_values("seed")
        return runs.correct_matrix(rows.to_dict("records"))
    want = stats.crossed_paired_difference(mat("HMQAT =W3A4 size"), mat("uniform W3A4"))
    row = table.set_index("steps").loc[150]
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((want.low, want.high))
    text = budget.budget_verdict(table, target_half_width=0.3)
    assert len(text) == 1 and "0 (PTQ)" in text[0] and "150" in text[0]
    assert "misses the ≤ 0.3 target" in text[0]          # 40 images cannot give ±0.3 pt
    with pytest.raises(budget.BudgetError, match="no \\(budget, pair\\)"):
        budget.budget_table(frame, [("x", "nope", "uniform W3A4")])


def test_budget_figures_render(tmp_path):
    from hmqat.study import plotting
    frame = _runs_frame(np.random.default_rng(1), steps_list=(0, 150, 390))
    table = budget.budget_table(frame, budget.comparison_pairs(frame["label"]))
    one_seed = budget.budget_table(frame[frame["seed"] == 0].assign(),
                                   budget.comparison_pairs(frame["label"]))
    for stem, fig in (("axis", plotting.plot_budget_axis(table, subtitle="synthetic")),
                      ("axis1", plotting.plot_budget_axis(one_seed)),
                      ("acc", plotting.plot_budget_accuracy_size(frame, subtitle="synthetic"))):
        paths = plotting.savefig(fig, tmp_path / stem, show=False)
        assert all(p.stat().st_size > 1000 for p in paths)
