"""hmqat.study.walk_study (notebook 07, issue 26): the frontier walk's points, equal-steps
schedules, table, compute, movement, screen and verdict against hand computations, and notebook
07 end to end through papermill on synthetic data with a random-init ResNet-20."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from hmqat import models, quant, search, stats, train
from hmqat.sensitivity import VARIANTS
from hmqat.study import plotting, runs, walk_study
from hmqat.study.walk_study import BUDGET, EQUAL, WALK, Schedule, WalkStudyError

ROOT = Path(__file__).resolve().parent.parent
BITS = (2, 3, 4, 8)


def _omega(layers: list[str]) -> pd.DataFrame:
    """A synthetic Ω: later layers more sensitive, each bit less 4x less (as tests/test_budget)."""
    table = pd.DataFrame({b: np.linspace(1, 2, len(layers)) * 4.0 ** (-b) for b in BITS},
                         index=pd.Index(layers, name="layer"))
    return table


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    model = models.create_model("resnet20", pretrained=False).eval()
    omega = _omega(list(quant.uniform_config(model, 8)))
    return model, search.Problem.from_model(model, omega, BITS)


# --------------------------------------------------------------------------------------------
# Points
# --------------------------------------------------------------------------------------------
def test_frontier_points_are_notebook_02_picks_in_decreasing_size(problem):
    model, prob = problem
    points = walk_study.frontier_points(prob, model)
    assert [label for label, _ in points] == ["HMQAT =W4A4 size", "HMQAT 8x",
                                              "HMQAT =W3A4 size", "HMQAT 10.34x", "HMQAT 13.11x"]
    front = prob.frontier()
    want = []
    for item in ("W4", 8.0, "W3", 10.34, 13.11):
        if isinstance(item, str):
            size = quant.model_size_mb(model, quant.uniform_config(model, int(item[1])), a_bits=4)
            want.append(search.select_at_size(front, size)["config"])
        else:
            want.append(search.select(front, min_compression=item)["config"])
    assert [config for _, config in points] == want
    sizes = [quant.model_size_mb(model, c, a_bits=4) for _, c in points]
    assert all(a > b for a, b in zip(sizes, sizes[1:]))


def test_frontier_points_refuse_an_order_that_does_not_shrink(problem):
    model, prob = problem
    with pytest.raises(WalkStudyError) as err:
        walk_study.frontier_points(prob, model, [10.34, "W3A4 size", 13.11])
    assert str(err.value) == (
        "walk_points[1] (HMQAT =W3A4 size) picks 0.10463 MB (9.83x), not smaller than "
        "walk_points[0] (HMQAT 10.34x) at 0.09914 MB; the walk goes from the largest model to "
        "the smallest: order walk_points by decreasing size and drop a point that picks the "
        "same size")
    with pytest.raises(WalkStudyError, match=r"walk_points\[1\] \(HMQAT 8x\) picks .* not "
                                             r"smaller than walk_points\[0\] \(HMQAT 8x\)"):
        walk_study.frontier_points(prob, model, [8.0, 8.0])


@pytest.mark.parametrize("points, message", [
    (["=W3", 13.11], "walk_points[0] = '=W3'; use 'W<b>A4 size' (the pick at uniform W<b>A4's "
                     "size) or a compression ratio > 1 such as 10.34"),
    (["W3A8 size", 13.11], "walk_points[0] = 'W3A8 size' names A8, but the study quantizes "
                           "activations at a_bits=4; write 'W3A4 size'"),
    ([8.0, True], "walk_points[1] = True; use 'W<b>A4 size' (the pick at uniform W<b>A4's "
                  "size) or a compression ratio > 1 such as 10.34"),
    ([8.0], "walk_points = [8.0]; give a list of at least two points from the largest model to "
            "the smallest, e.g. ['W4A4 size', 8.0, 'W3A4 size', 10.34, 13.11]"),
])
def test_frontier_points_refuse_bad_specs(problem, points, message):
    model, prob = problem
    with pytest.raises(WalkStudyError) as err:
        walk_study.frontier_points(prob, model, points)
    assert str(err.value) == message


def test_frontier_points_name_an_infeasible_point(problem):
    model, prob = problem
    with pytest.raises(WalkStudyError, match=r"^walk_points\[1\] \(HMQAT 40x\): "):
        walk_study.frontier_points(prob, model, [8.0, 40.0])


# --------------------------------------------------------------------------------------------
# Equal steps
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target, per_epoch, want, text", [
    (2, 4, Schedule(1, 2, 2, 2), "1 x 2"),             # below an epoch: one cut epoch
    (4, 4, Schedule(1, None, 4, 4), "1 ep"),           # exactly one: notebook 03's identity
    (6, 4, Schedule(2, 3, 6, 6), "2 x 3"),
    (8, 4, Schedule(2, None, 8, 8), "2 ep"),
    (10, 4, Schedule(5, 2, 10, 10), "5 x 2"),          # 3 and 4 do not divide 10; 5 <= 2 x 3
    (5, 4, Schedule(2, 2, 4, 5), "2 x 2 = 4 (rounded from 5)"),  # no e in 2..4 divides 5
    (510, 390, Schedule(2, 255, 510, 510), "2 x 255"),
    (870, 390, Schedule(3, 290, 870, 870), "3 x 290"),
    (1567, 390, Schedule(5, 313, 1565, 1567), "5 x 313 = 1565 (rounded from 1567)"),  # prime
])
def test_equal_steps_schedule_by_hand(target, per_epoch, want, text):
    got = walk_study.equal_steps_schedule(target, per_epoch)
    assert got == want and got.describe(per_epoch) == text
    assert got.exact == (want.steps == target)


def test_schedule_text_of_a_cap_above_the_epoch_is_whole_epochs():
    # notebook 03 with max_steps_per_epoch larger than the loader: whole epochs
    assert Schedule(2, 500, 780, 780).describe(390) == "2 ep"


def test_equal_steps_schedule_refuses_nonsense():
    with pytest.raises(WalkStudyError) as err:
        walk_study.equal_steps_schedule(0, 390)
    assert str(err.value) == ("equal_steps_schedule: target=0; a direct run needs an int >= 1 "
                              "optimizer steps (the walk's cumulative_steps)")
    with pytest.raises(WalkStudyError, match="steps_per_epoch=0; the training loader must "
                                             "yield at least one batch per epoch"):
        walk_study.equal_steps_schedule(5, 0)


# --------------------------------------------------------------------------------------------
# Rows, table, compute
# --------------------------------------------------------------------------------------------
N_IMAGES = 10
#: Per-image test bits by (arm, point, seed): chosen by hand so every mean is a round number.
BITS_BY_HAND = {
    (WALK, 0): [[1, 1, 1, 0, 0, 1, 1, 0, 1, 1], [1, 1, 0, 0, 1, 1, 1, 0, 1, 1],
                [1, 0, 1, 0, 1, 1, 1, 0, 1, 1]],
    (EQUAL, 0): [[1, 1, 1, 0, 0, 1, 1, 0, 1, 1], [1, 1, 0, 0, 1, 1, 1, 0, 1, 1],
                 [1, 0, 1, 0, 1, 1, 1, 0, 1, 1]],
    (BUDGET, 0): [[1, 1, 1, 0, 0, 1, 1, 0, 1, 1], [1, 1, 0, 0, 1, 1, 1, 0, 1, 1],
                  [1, 0, 1, 0, 1, 1, 1, 0, 1, 1]],
    (WALK, 1): [[1, 1, 0, 0, 0, 1, 1, 0, 1, 0], [1, 0, 0, 0, 1, 1, 1, 0, 1, 0],
                [0, 1, 1, 0, 0, 1, 1, 0, 1, 1]],
    (EQUAL, 1): [[1, 1, 0, 0, 0, 1, 0, 0, 1, 0], [1, 0, 0, 0, 1, 0, 1, 0, 1, 0],
                 [0, 1, 0, 0, 0, 1, 1, 0, 1, 0]],
    (BUDGET, 1): [[1, 1, 1, 0, 0, 1, 1, 0, 1, 1], [1, 1, 0, 0, 1, 1, 1, 1, 1, 1],
                  [1, 1, 1, 0, 0, 1, 1, 0, 1, 1]],
}
STEPS = {(WALK, 0): 2, (EQUAL, 0): 2, (BUDGET, 0): 2, (WALK, 1): 5, (EQUAL, 1): 4, (BUDGET, 1): 2}
SCHEDULES = {(EQUAL, 0): "1 x 2", (EQUAL, 1): "2 x 2 = 4 (rounded from 5)"}
POINTS = ("P0", "P1")


def _record(bits: list[int], *, size: float, moved: bool | None = None) -> dict:
    b = np.array(bits, dtype=bool)
    return {"top1": 100 * b.mean(), "test_top1": 100 * b.mean(), "n_val": N_IMAGES,
            "correct": runs.pack_correct(b), "test_correct": runs.pack_correct(b),
            "n_test": N_IMAGES, "size_mb": size, "compression": 1.0 / size, "bops": 1e9,
            "avg_bits": 4.0, "train_s": 1.0, "changed_layers": ["a", "b"] if moved is not None
            else [], "step_median": None if moved is None else (0.02 if moved else 0.004),
            "step_max": None if moved is None else 0.1, "scale_phase_moved": moved}


def _runs() -> pd.DataFrame:
    rows = []
    for (arm, k), per_seed in BITS_BY_HAND.items():
        for seed, bits in enumerate(per_seed):
            moved = None if arm != WALK or k == 0 else seed != 2    # seed 2's phase failed
            rows.append(walk_study.run_row(POINTS[k], k, arm, seed,
                                           _record(bits, size=0.1 - 0.02 * k, moved=moved),
                                           STEPS[arm, k], schedule=SCHEDULES.get((arm, k), "")))
    return pd.DataFrame(rows)


def _matrix(arm: str, k: int) -> np.ndarray:
    return 100.0 * np.array(BITS_BY_HAND[arm, k], dtype=float)


def test_walk_table_matches_the_hand_computation():
    table = walk_study.walk_table(_runs())
    assert list(table["point"]) == ["P0", "P1"] and list(table["seeds"]) == [3, 3]
    p1 = table.iloc[1]
    # arm means over seeds x images, by hand: walk 16/30, equal 12/30, budget 22/30 correct
    assert p1["walk"] == pytest.approx(100 * 16 / 30)
    assert p1["equal steps"] == pytest.approx(100 * 12 / 30)
    assert p1["study budget"] == pytest.approx(100 * 22 / 30)
    assert p1["a-c"] == pytest.approx(100 * (16 - 22) / 30)
    assert p1["a-b"] == pytest.approx(100 * (16 - 12) / 30)
    ac = stats.crossed_paired_difference(_matrix(WALK, 1), _matrix(BUDGET, 1))
    ab = stats.crossed_paired_difference(_matrix(WALK, 1), _matrix(EQUAL, 1))
    assert (p1["a-c ci_low"], p1["a-c ci_high"]) == pytest.approx((ac.low, ac.high))
    assert (p1["a-b ci_low"], p1["a-b ci_high"]) == pytest.approx((ab.low, ab.high))
    assert p1["images"] == N_IMAGES and p1["interval"] == "seeds × images"
    # point 0: three identical arms, a zero difference with a zero-width interval
    p0 = table.iloc[0]
    assert (p0["a-c"], p0["a-c ci_low"], p0["a-c ci_high"]) == (0.0, 0.0, 0.0)
    assert list(table["walk steps"]) == [2, 5] and list(table["study budget steps"]) == [2, 2]
    assert list(table["equal steps trained"]) == [2, 4]
    assert list(table["equal-steps schedule"]) == ["1 x 2", "2 x 2 = 4 (rounded from 5)"]
    assert list(table["size KB"]) == pytest.approx([102.4, 81.92])


def test_compute_summary_is_the_walk_total_over_one_run_per_point():
    cost = walk_study.compute_summary(walk_study.walk_table(_runs()))
    assert cost == {"points": 2, "walk_steps": 5, "separate_steps": 4, "ratio": 1.25,
                    "equal_steps_total": 6}


def test_walk_table_with_one_seed_has_no_interval():
    table = walk_study.walk_table(_runs()[lambda d: d["seed"] == 0])
    assert table["seeds"].tolist() == [1, 1] and table["a-c ci_low"].isna().all()
    assert table["a-c"].iloc[1] == pytest.approx(100 * (5 - 7) / 10)
    assert table["interval"].tolist() == ["none (1 seed)"] * 2


def test_walk_table_refuses_a_missing_arm_and_differing_steps():
    frame = _runs()
    with pytest.raises(WalkStudyError) as err:
        walk_study.walk_table(frame[frame["arm"] != EQUAL])
    assert str(err.value) == ("point 'P0' has no ['direct, equal steps'] run; every point "
                              "needs all three arms")
    frame.loc[(frame["arm"] == WALK) & (frame["seed"] == 1), "steps"] = 7
    with pytest.raises(WalkStudyError, match=r"P0 walk: steps differs between seeds \(\[2, 7\]\)"):
        walk_study.walk_table(frame)


def test_run_row_refuses_a_record_without_a_test_read():
    rec = _record([1, 0] * 5, size=0.1)
    del rec["test_top1"]
    with pytest.raises(WalkStudyError) as err:
        walk_study.run_row("P0", 0, WALK, 0, rec, 2)
    assert str(err.value) == ("the record of 'P0' (walk, seed 0) lacks ['test_top1']; the walk "
                              "experiment needs runs with a test read (test_loader=)")
    with pytest.raises(WalkStudyError, match=r"arm 'ladder' is not one of \['walk', "):
        walk_study.run_row("P0", 0, "ladder", 0, _record([1] * 10, size=0.1), 2)


# --------------------------------------------------------------------------------------------
# Movement and the screen
# --------------------------------------------------------------------------------------------
def test_movement_table_lists_every_scale_phase():
    mv = walk_study.movement_table(_runs())
    assert mv[["point", "seed", "moved"]].values.tolist() == [["P1", 0, "yes"], ["P1", 1, "yes"],
                                                             ["P1", 2, "no"]]
    assert mv["median step change %"].tolist() == pytest.approx([2.0, 2.0, 0.4])
    assert mv["max step change %"].tolist() == pytest.approx([10.0] * 3)
    assert mv["switched layers"].tolist() == [2, 2, 2]


def _walk_records(val: float, medians: list[float], threshold: float = 0.01) -> list[dict]:
    recs = [{"top1": 50.0, "step_median": None, "scale_phase_moved": None}]
    recs += [{"top1": 50.0, "step_median": m, "scale_phase_moved": m >= threshold}
             for m in medians]
    recs[-1]["top1"] = val
    return recs


DIVERGED = ("loss became nan at epoch 1, step 2 (global step 1); nothing was written for this "
            "epoch. Lower the learning rate")


def test_screen_chooses_the_best_validation_among_rates_that_moved():
    screen = pd.DataFrame([walk_study.screen_row(0.01, _walk_records(70.0, [0.002, 0.004])),
                           walk_study.screen_row(0.1, _walk_records(66.0, [0.03, 0.012])),
                           walk_study.screen_row(0.5, _walk_records(68.0, [0.2, 0.05])),
                           walk_study.screen_row(1.0, _walk_records(68.0, [0.4, 0.1])),
                           walk_study.screen_row(9.0, None, diverged=DIVERGED)])
    assert screen["moved"].tolist() == [False, True, True, True, False]
    assert screen["min median step change %"].tolist()[:4] == pytest.approx([0.2, 1.2, 5.0, 10.0])
    assert screen["status"].tolist() == ["a phase moved < threshold", "moved", "moved", "moved",
                                         "diverged: loss became nan at epoch 1, step 2 (global "
                                         "step 1)"]
    lr, sentence = walk_study.choose_scale_lr(screen)
    assert lr == 0.5        # 0.01 has the best top-1 but its phases did not move; tie -> smaller
    assert sentence == ("walk_scale_lr = 0.5: the best validation top-1 at the last point "
                        "(68.00 %) among the 3 of 5 screened rates whose scale phases all moved "
                        "the steps; 0.01 left out (a scale phase moved < 1%); 9 left out (the "
                        "walk diverged).")
    with pytest.raises(WalkStudyError) as err:
        walk_study.choose_scale_lr(screen.iloc[[0, 4]])
    assert str(err.value) == (
        "no screened walk_scale_lr moved the switched steps by a median >= 1% in every scale "
        "phase (smallest median per rate: 0.01: 0.2 %, 9: diverged); add rates to "
        "walk_screen_scale_lrs (larger where a phase moved too little, smaller where the walk "
        "diverged) or raise walk_scale_steps")


@pytest.mark.parametrize("fixed, screen, steps, message", [
    (None, [], 5, "walk_screen_scale_lrs = []; with walk_scale_lr null give a list of rates to "
                  "screen, e.g. [0.01, 0.05, 0.25], or set walk_scale_lr"),
    (None, [0.1, 0.1], 5, "walk_screen_scale_lrs = [0.1, 0.1]; every rate must be a number > 0 "
                          "and appear once (a rate is repeated)"),
    (None, [0.1, -1], 5, "walk_screen_scale_lrs = [0.1, -1]; every rate must be a number > 0 "
                         "and appear once (bad: [-1])"),
    (None, [0.1], 0, "walk_scale_lr is null (screen it) but walk_scale_steps is 0: there is no "
                     "scale-only phase to screen; set walk_scale_steps > 0, or walk_scale_lr to "
                     "any rate > 0 (it is then unused)"),
    (0.0, [0.1], 5, "walk_scale_lr=0.0; use a learning rate > 0, or null to screen "
                    "walk_screen_scale_lrs"),
])
def test_scale_lr_candidates_refuse_what_cannot_be_screened(fixed, screen, steps, message):
    with pytest.raises(WalkStudyError) as err:
        walk_study.scale_lr_candidates(fixed, screen, steps)
    assert str(err.value) == message


def test_scale_lr_candidates_fixed_or_screened():
    assert walk_study.scale_lr_candidates(0.05, [], 0) == [0.05]
    assert walk_study.scale_lr_candidates(None, [0.01, 0.1], 20) == [0.01, 0.1]


# --------------------------------------------------------------------------------------------
# The verdict, both ways
# --------------------------------------------------------------------------------------------
def _table(ci_lows: list[float], walk_steps: list[int], seeds: int = 3) -> pd.DataFrame:
    n = len(ci_lows)
    return pd.DataFrame({
        "point": [f"P{k}" for k in range(n)], "k": list(range(n)), "seeds": [seeds] * n,
        "a-c": [lo + 0.3 for lo in ci_lows], "a-c ci_low": ci_lows,
        "a-c ci_high": [lo + 0.6 for lo in ci_lows], "a-b": [0.1] * n,
        "a-b ci_low": [-0.2] * n, "a-b ci_high": [0.4] * n, "walk steps": walk_steps,
        "study budget steps": [390] * n, "equal steps trained": walk_steps})


def test_verdict_goal_met():
    table = _table([0.0, -0.3], [390, 540])
    table["study budget steps"] = [810, 810]        # 540 / 1620 = 1/3 exactly: meets
    lines = walk_study.walk_verdict(table)
    assert lines == [
        "P0: walk − study budget +0.30 [+0.00, +0.60] pt over 3 seeds; lower bound +0.00 >= "
        "−0.3: within 0.3 pt of (or above) the separate run (the walk's first point is its own "
        "QAT run at the study's budget); walk − equal steps +0.10 [-0.20, +0.40].",
        "P1: walk − study budget +0.00 [-0.30, +0.30] pt over 3 seeds; lower bound -0.30 >= "
        "−0.3: within 0.3 pt of (or above) the separate run; walk − equal steps +0.10 "
        "[-0.20, +0.40].",
        "Compute: the walk trained all 2 models in 540 optimizer steps; 2 separate runs at the "
        "study's budget take 1,620: ratio 0.333 (meets the <= 0.333 goal).",
        "Goal met: every point's lower bound is >= −0.3 and the walk costs 0.333 <= 0.333 of "
        "the separate runs."]


def test_verdict_goal_missed_names_every_reason():
    lines = walk_study.walk_verdict(_table([0.0, -0.5], [390, 500]),
                                    movement=walk_study.movement_table(_runs()))
    assert lines[1] == ("P1: walk − study budget -0.20 [-0.50, +0.10] pt over 3 seeds; lower "
                        "bound -0.50 < −0.3: not shown within 0.3 pt of the separate run; walk − "
                        "equal steps +0.10 [-0.20, +0.40].")
    assert lines[2] == ("Compute: the walk trained all 2 models in 500 optimizer steps; 2 "
                        "separate runs at the study's budget take 780: ratio 0.641 (misses the "
                        "<= 0.333 goal).")
    assert lines[3] == ("Scale phases: 2 of 3 moved the switched steps by the required median "
                        "(median of medians 2.00 %, largest max 10.00 %); failed: P1 seed 2 "
                        "(0.40 %).")
    assert lines[4] == ("Goal not met: the lower bound of walk − study budget is below −0.3 at "
                        "P1; the walk costs 0.641 of the separate runs, above 0.333.")


def test_verdict_with_one_seed_is_undecided():
    nan = float("nan")
    table = _table([nan, nan], [390, 420], seeds=1)
    table[["a-c", "a-b ci_low", "a-b ci_high", "study budget steps"]] = [[0.0, nan, nan, 900],
                                                                         [-0.4, nan, nan, 900]]
    lines = walk_study.walk_verdict(table)
    assert lines[1] == ("P1: walk − study budget -0.40 pt on 1 seed, no interval, so the −0.3 "
                        "bound is not tested; walk − equal steps +0.10.")
    assert lines[-1] == ("Goal undecided: one seed gives no interval at P0, P1 (run >= 2 seeds "
                         "to test the bound).")


def test_plot_walk_refuses_runs_without_the_arm_column():
    with pytest.raises(plotting.PlotError, match=r"runs lacks column\(s\) \['arm'\]"):
        plotting.plot_walk(_runs().drop(columns="arm"))


# --------------------------------------------------------------------------------------------
# The old ladder, re-tested fairly (issue 26, item 3)
# --------------------------------------------------------------------------------------------
def test_ladder_arm_is_notebook_04s_choice_at_the_main_lines_step_lr():
    from hmqat.transitions import Recipe

    arm = walk_study.ladder_arm(scale_only_steps=26, scale_lr_mult=500.0)
    assert walk_study.LADDER_CHOICE == "data+so/8>T/step_lr=lr/10+bn"
    assert (arm.name, arm.reinit, arm.ladder, arm.scale_only_steps, arm.step_warmup,
            arm.bn_end, arm.step_lr_mult, arm.scale_only_lr_mult) == (
        "data+so/8>T+bn", "data", (8,), 26, 0, True, None, 500.0)   # None: cfg's step_lr
    base = Recipe.from_dict({"distillation": {"enabled": True}})
    t = arm.recipe(base, 390, 325)
    assert t.transition.stages == ((0, 8), (65, "target")) and t.transition.reinit == "data"
    assert t.transition.scale_only_lr_mult == 500.0 and t.bn.at_end and t.distillation.enabled
    assert "scale-only 26 at step lr x500" in t.describe()
    # the new field at its default gives notebook 04's recipe exactly (the same run ids)
    old = walk_study.ladder_arm("data+so/8>4>T", scale_only_steps=20, scale_lr_mult=1.0)
    assert old.recipe(base, 300, 250) == base.updated({"bn": {"at_end": False}, "transition": {
        "enabled": True, "unit": "step", "reinit": "data", "fp32_exit": "data",
        "stages": ((0, 8), (25, 4), (50, "target")), "scale_only_steps": 20, "step_warmup": 0}})
    assert old.name == "data+so/8>4>T" and not old.bn_end


@pytest.mark.parametrize("choice, kw, message", [
    ("lsq/step_lr=lr", {}, r"'lsq' is not one of notebook 04's screening arms"),
    ("data+so/none", {}, r"has no ladder; the re-test needs a ladder arm with a scale-only "),
    ("range/8>T+bn", {}, r"has no scale-only phase; the re-test needs"),
    ("data+so/8>T", {"scale_only_steps": 0}, r"scale_only_steps=0; the re-test needs a "),
    ("data+so/8>T", {"scale_lr_mult": 0.0}, r"scale_lr_mult=0.0; use a multiplier > 0"),
    ("", {}, r"ladder choice ''; give notebook 04's arm name"),
])
def test_ladder_arm_refuses_what_is_not_a_ladder_with_a_scale_phase(choice, kw, message):
    with pytest.raises(WalkStudyError, match=message):
        walk_study.ladder_arm(choice, **{"scale_only_steps": 5, "scale_lr_mult": 2.0, **kw})


@pytest.mark.parametrize("total, want", [(300, (50, 20)), (390, (65, 26)), (80, (13, 5)),
                                         (2, (1, 1)), (3, (1, 1)), (12, (2, 1))])
def test_ladder_schedule_keeps_notebook_04s_shares(total, want):
    # by hand: round(total / 6) steps at 8 bit, round(total / 15) scale-only steps, >= 1 each
    assert walk_study.ladder_schedule(total) == want
    pre, scale = want
    assert 1 <= scale <= pre < total


def test_ladder_schedule_refuses_a_run_too_short_for_a_ladder():
    for bad in (1, 0, True, 2.5):
        with pytest.raises(WalkStudyError, match=r"a ladder needs an int >= 2"):
            walk_study.ladder_schedule(bad)


def test_ladder_points_are_02s_pick_and_03s_uniform_w2a4(problem):
    model, prob = problem
    points = walk_study.ladder_points(prob, model, seeds=[0, 1, 2])
    assert [label for label, _ in points] == ["HMQAT 10.34x", "uniform W2A4"]
    assert points[0][1] == search.select(prob.frontier(), min_compression=10.34)["config"]
    assert points[1][1] == quant.uniform_config(model, 2)
    one = walk_study.ladder_points(prob, model, seeds=[0])     # one seed: the screen point only
    assert one == points[:1]


def _ladder_record(bits: list[int], medians: list[float | None], *, size: float = 0.1) -> dict:
    rec = _record(bits, size=size)
    rec["transition_events"] = [
        {"step": 5 * i, "stage": i, "bits": [8, "target"][i], "changed": 3,
         **({} if m is None else {"step_median": m, "step_max": 3 * m})}
        for i, m in enumerate(medians)]
    return rec


def test_ladder_phases_and_screen_rows_from_the_recorded_events():
    rec = _ladder_record([1] * 7 + [0] * 3, [0.05, 0.004])
    phases = walk_study.ladder_phases(rec)
    assert phases == [
        {"stage": 0, "bits": "8", "step": 0, "median step change %": pytest.approx(5.0),
         "max step change %": pytest.approx(15.0), "moved": True},
        {"stage": 1, "bits": "target", "step": 5, "median step change %": pytest.approx(0.4),
         "max step change %": pytest.approx(1.2), "moved": False}]
    row = walk_study.ladder_screen_row(2.0, rec)
    assert row == {"scale_lr": 2.0, "val_top1": 70.0,
                   "min median step change %": pytest.approx(0.4), "moved": False,
                   "status": "a phase moved < threshold"}
    assert walk_study.ladder_screen_row(2.0, rec, threshold=0.003)["moved"] is True
    assert walk_study.ladder_phases(_ladder_record([1] * 10, [None, None])) == []
    with pytest.raises(WalkStudyError, match=r"records no scale-only phase movement"):
        walk_study.ladder_screen_row(2.0, _ladder_record([1] * 10, [None, None]))
    div = walk_study.ladder_screen_row(8.0, None, diverged=DIVERGED)
    assert div["status"] == "diverged: loss became nan at epoch 1, step 2 (global step 1)"


def test_ladder_rate_moved_or_the_most_movement_with_a_warning():
    rows = [walk_study.ladder_screen_row(0.5, _ladder_record([1] * 9 + [0], [0.02, 0.004])),
            walk_study.ladder_screen_row(2.0, _ladder_record([1] * 8 + [0] * 2, [0.05, 0.012])),
            walk_study.ladder_screen_row(8.0, _ladder_record([1] * 7 + [0] * 3, [0.2, 0.05])),
            walk_study.ladder_screen_row(32.0, None, diverged=DIVERGED)]
    lr, note = walk_study.choose_ladder_scale_lr(pd.DataFrame(rows), where="at HMQAT 10.34x")
    assert lr == 2.0 and note == (
        "ladder scale_lr = 2: the best validation top-1 at HMQAT 10.34x (80.00 %) among the 2 of "
        "4 screened rates whose scale phases all moved the steps; 0.5 left out (a scale phase "
        "moved < 1%); 32 left out (the walk diverged).")
    # none moved: the rate that moved most runs, named as not the fair re-test
    lr, note = walk_study.choose_ladder_scale_lr(pd.DataFrame([rows[0], rows[3]]))
    assert lr == 0.5 and note == (
        "ladder scale_lr = 0.5: no screened rate moved every scale phase by a median >= 1% "
        "(smallest median per rate: 0.5: 0.4 %, 32: diverged); the decision runs at the rate "
        "that moved the steps most and is NOT the fair re-test: add larger rates to "
        "walk_screen_scale_lrs.")
    with pytest.raises(WalkStudyError, match=r"every screened ladder scale_lr diverged \(32\)"):
        walk_study.choose_ladder_scale_lr(pd.DataFrame([rows[3]]))


#: Per-image test bits of the re-test by (arm, point): three seeds of ten images each.
LADDER_BITS = {
    (walk_study.LSQ, "HMQAT 10.34x"): [[1, 1, 1, 0, 0, 1, 1, 0, 1, 1],
                                       [1, 1, 0, 0, 1, 1, 1, 0, 1, 1],
                                       [1, 0, 1, 0, 1, 1, 1, 0, 1, 1]],
    (walk_study.LADDER, "HMQAT 10.34x"): [[1, 1, 1, 0, 0, 1, 1, 0, 1, 0],
                                          [1, 1, 0, 0, 1, 1, 0, 0, 1, 1],
                                          [1, 0, 1, 0, 0, 1, 1, 0, 1, 1]],
    (walk_study.LSQ, "uniform W2A4"): [[1, 0, 1, 0, 0, 1, 0, 0, 1, 1],
                                       [1, 1, 0, 0, 0, 1, 0, 0, 1, 1],
                                       [0, 1, 1, 0, 0, 1, 0, 0, 1, 1]],
    (walk_study.LADDER, "uniform W2A4"): [[1, 0, 1, 0, 0, 1, 0, 0, 1, 1],
                                          [1, 1, 0, 0, 0, 1, 0, 0, 1, 1],
                                          [0, 1, 1, 0, 0, 1, 0, 0, 1, 0]],
}


def _ladder_runs() -> pd.DataFrame:
    rows = []
    for (arm, point), per_seed in LADDER_BITS.items():
        for seed, bits in enumerate(per_seed):
            if arm == walk_study.LSQ:
                rows.append(walk_study.ladder_row(point, arm, seed, _record(bits, size=0.1), 390))
            else:     # seed 2's target phase at W2A4 moved too little
                small = point == "uniform W2A4" and seed == 2
                rec = _ladder_record(bits, [0.08, 0.005 if small else 0.02])
                rows.append(walk_study.ladder_row(point, arm, seed, rec, 390,
                                                  steps_at_target=325, scale_lr=2.0))
    return pd.DataFrame(rows)


def test_ladder_table_is_the_paired_eq_v_interval_at_equal_total_steps():
    runs_ = _ladder_runs()
    table = walk_study.ladder_table(runs_)
    assert table["point"].tolist() == ["HMQAT 10.34x", "uniform W2A4"]
    first = table.iloc[0]
    # by hand: plain LSQ 21/30 correct, the ladder 18/30
    assert (first["plain LSQ"], first["ladder"]) == pytest.approx((70.0, 60.0))
    want = stats.crossed_paired_difference(
        100.0 * np.array(LADDER_BITS[walk_study.LADDER, "HMQAT 10.34x"], dtype=float),
        100.0 * np.array(LADDER_BITS[walk_study.LSQ, "HMQAT 10.34x"], dtype=float))
    assert first["diff"] == pytest.approx(-10.0) == pytest.approx(want.mean)
    assert (first["ci_low"], first["ci_high"]) == pytest.approx((want.low, want.high))
    assert (first["seeds"], first["images"], first["interval"]) == (3, 10, "seeds × images")
    assert (first["total steps"], first["ladder steps at target"], first["scale lr"]) == \
        (390, 325, 2.0)
    assert first["min median step change %"] == pytest.approx(2.0)
    assert table["phases moved"].tolist() == ["6 of 6", "5 of 6"]
    mv = walk_study.ladder_movement(runs_)
    assert len(mv) == 12 and mv["stage"].tolist()[:2] == ["8 bit", "target"]
    assert mv[mv["moved"] == "no"][["point", "seed", "stage"]].values.tolist() == [
        ["uniform W2A4", 2, "target"]]
    assert mv["median step change %"].tolist()[:2] == pytest.approx([8.0, 2.0])


def test_ladder_table_refuses_unequal_total_steps_and_a_missing_arm():
    runs_ = _ladder_runs()
    with pytest.raises(WalkStudyError, match=r"point 'HMQAT 10.34x' has no \['plain LSQ'\] run"):
        walk_study.ladder_table(runs_[runs_["label"] != walk_study.LSQ])
    runs_.loc[runs_["label"] == walk_study.LSQ, "steps"] = 455
    with pytest.raises(WalkStudyError) as err:
        walk_study.ladder_table(runs_)
    assert str(err.value) == ("point 'HMQAT 10.34x': the ladder trained 390 steps, plain LSQ "
                              "455; the re-test compares them at equal total steps")
    with pytest.raises(WalkStudyError, match=r"arm 'walk' is not one of \['ladder', "):
        walk_study.ladder_row("P", WALK, 0, _record([1] * 10, size=0.1), 2)


def _ladder_table(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame([{"point": p, "seeds": n, "diff": d, "ci_low": lo, "ci_high": hi,
                          "phases moved": moved, "min median step change %": 2.5}
                         for p, n, d, lo, hi, moved in rows])


def test_ladder_verdict_every_interval_excludes_the_goal():
    out = walk_study.ladder_verdict(_ladder_table([
        ("HMQAT 10.34x", 3, -0.3, -0.5, -0.1, "6 of 6"),
        ("uniform W2A4", 3, 0.2, 0.05, 0.35, "6 of 6")]))
    assert out == [
        "HMQAT 10.34x: ladder − plain LSQ -0.30 [-0.50, -0.10] pt over 3 seeds: the interval "
        "excludes +0.5: no +0.5 pt gain; the ladder is worse than plain LSQ; scale phases moved "
        "the steps by a median of at least 2.50 % (6 of 6 moved).",
        "uniform W2A4: ladder − plain LSQ +0.20 [+0.05, +0.35] pt over 3 seeds: the interval "
        "excludes +0.5: no +0.5 pt gain; a smaller gain; scale phases moved the steps by a "
        "median of at least 2.50 % (6 of 6 moved).",
        "Goal decided: every interval excludes +0.5; the re-tested ladder, at the main line's "
        "step_lr and with scale phases that move the steps, does not gain +0.5 pt over plain "
        "LSQ at equal total steps at any point. Plain LSQ (+ KD) stays the main line."]


def test_ladder_verdict_a_gain_and_the_undecided_cases():
    out = walk_study.ladder_verdict(_ladder_table([
        ("HMQAT 10.34x", 3, 0.8, 0.6, 1.0, "6 of 6"),
        ("uniform W2A4", 3, 0.3, -0.1, 0.7, "6 of 6")]))
    assert "a gain of at least +0.5 pt with the interval above 0" in out[0]
    assert "undecided: the interval holds +0.5" in out[1]
    assert out[-1] == ("Goal decided: the re-tested ladder gains >= +0.5 pt with the interval "
                       "above 0 at HMQAT 10.34x.")
    out = walk_study.ladder_verdict(_ladder_table([
        ("HMQAT 10.34x", 3, 0.6, -0.1, 1.3, "6 of 6"),
        ("uniform W2A4", 1, 0.9, math.nan, math.nan, "2 of 2")]))
    assert "undecided: the interval holds +0.5" in out[0]
    assert out[1] == ("uniform W2A4: ladder − plain LSQ +0.90 pt on 1 seed, no interval: a "
                      "screen, not a decision; scale phases moved the steps by a median of at "
                      "least 2.50 % (2 of 2 moved).")
    assert out[-1] == ("Goal undecided: one seed gives no interval at uniform W2A4 (the decision "
                       "runs >= 2 seeds); the interval holds +0.5 or reaches 0 at HMQAT 10.34x "
                       "(more seeds would decide).")


def test_ladder_verdict_names_a_scale_phase_that_did_not_move():
    out = walk_study.ladder_verdict(_ladder_table([
        ("HMQAT 10.34x", 3, -0.3, -0.5, -0.1, "6 of 6"),
        ("uniform W2A4", 3, -1.0, -1.3, -0.7, "5 of 6")]))
    assert out[-2] == ("Not the fair re-test at uniform W2A4: a scale phase moved the steps by a "
                       "median below the required 1 %; screen larger rates.")
    assert out[-1] == ("Goal undecided: a scale phase did not move the steps at uniform W2A4.")


def test_earlier_scale_movement_of_notebook_04s_phases():
    diag = pd.DataFrame({"when": ["transition", "scale_only_end", "scale_only_end",
                                  "scale_only_end", "end"],
                         "kind": ["weight", "weight", "weight", "bn", "weight"],
                         "step_ratio": [1.0, 1.002, 0.97, math.nan, 1.5]})
    got = walk_study.earlier_scale_movement(diag)
    assert got["rows"] == 2
    assert got["median %"] == pytest.approx((0.2 + 3.0) / 2)
    assert got["max %"] == pytest.approx(3.0)
    assert walk_study.earlier_scale_movement(pd.DataFrame()) is None
    assert walk_study.earlier_scale_movement(diag[diag["when"] != "scale_only_end"]) is None


# --------------------------------------------------------------------------------------------
# Notebook 07 end to end
# --------------------------------------------------------------------------------------------
SMOKE = {"results_dir": "", "profile": "smoke", "arch": "resnet20", "dataset": "synthetic",
         "n_synthetic": 64, "seed": 0, "val_size": 32, "val_from": "test", "device": "cpu",
         "batch_size": 8, "bits": list(BITS), "a_bits": 4, "policy": "first_last_8",
         "init": "mse", "qat_epochs": 1, "qat_lr": 0.01, "step_lr": 0.001, "qat_wd": 0.00005,
         "recipe": {}, "max_steps_per_epoch": 2, "seeds": [0, 1],
         "walk_points": ["W4A4 size", 8.0, "W3A4 size", 10.34, 13.11], "walk_scale_steps": 3,
         "walk_scale_lr": None, "walk_screen_scale_lrs": [3.0, 5.0, 20.0],
         "walk_finetune_steps": 1,
         "walk_finetune_lr": None, "walk_onnx": False}


def _upstream(root: Path) -> None:
    """What notebook 07 reads from notebooks 00–02, written directly: the smoke pipeline's 01
    alone takes minutes, and these are the same files in the same formats (a random-init
    ResNet-20 as the FP32 checkpoint, a synthetic Ω as 01's tables, 02's picks and frontier
    from that Ω). ``lessons.ensure_upstream`` checks they exist."""
    from hmqat.study.pipeline import Study

    study = Study(results_dir=str(root), profile="smoke", dataset="synthetic", n_synthetic=64,
                  val_size=32, device="cpu", batch_size=SMOKE["batch_size"], pretrained=False)
    torch.manual_seed(0)
    model = models.create_model("resnet20", num_classes=10, pretrained=False).eval()
    torch.save(model.state_dict(), study.fp32_checkpoint)
    ev = train.evaluate(model, study.test_loader())
    study.save_json("fp32.json", {"top1": ev["top1"], "test_top1": ev["top1"]})
    layers = list(quant.uniform_config(model, 8))
    omega = _omega(layers)
    for variant in VARIANTS:   # every Ω table notebook 01 writes (pipeline.KEY_OUTPUTS)
        omega.to_csv(study.path("data", f"omega_{variant}.csv"))
    pd.DataFrame({"layer": layers, "trace": np.linspace(1, 2, len(layers))}).to_csv(
        study.path("data", "traces.csv"), index=False)
    (root / "data" / "sensitivity").mkdir(exist_ok=True)
    pd.DataFrame({"config": [], "omega_joint": []}).to_csv(
        root / "data" / "sensitivity" / "fixed_size.csv", index=False)
    prob = search.Problem.from_model(model, omega, BITS)
    front = prob.frontier()
    pick = search.select(front, min_compression=8.0)
    study.save_json("configs.json", {"HMQAT 8x": {
        "config": {k: int(v) for k, v in pick["config"].items()},
        "size_mb": float(pick["size_mb"]), "compression": float(pick["compression"]),
        "bops": float(pick["bops"]), "avg_bits": float(pick["avg_bits"]),
        "omega": float(pick["omega"]), "search_ms": 0.0}})
    front.to_frame().to_csv(study.path("data", "frontier.csv"), index=False)


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    import papermill as pm

    root = tmp_path_factory.mktemp("walk_nb") / "smoke"
    _upstream(root)
    out = root / "executed" / "07_frontier_walk.ipynb"
    out.parent.mkdir(parents=True, exist_ok=True)
    pm.execute_notebook(str(ROOT / "notebooks" / "07_frontier_walk.ipynb"), str(out),
                        parameters={**SMOKE, "results_dir": str(root)}, kernel_name="python3",
                        cwd=str(ROOT / "notebooks"), progress_bar=False,
                        extra_arguments=["--IPKernelApp.log_level=CRITICAL"])
    return root, json.loads(out.read_text())


def test_notebook_07_runs_end_to_end(executed):
    root, nb = executed
    assert nb["metadata"]["papermill"]["exception"] in (None, False)
    rows = json.loads((root / "data" / "walk_runs.json").read_text())
    frame = pd.DataFrame(rows)
    labels = ["HMQAT =W4A4 size", "HMQAT 8x", "HMQAT =W3A4 size", "HMQAT 10.34x", "HMQAT 13.11x"]
    assert len(frame) == 5 * 3 * 2 and list(dict.fromkeys(frame["point"])) == labels
    # the walk's first point is the study-budget run's training: the same per-image bits
    first = frame[frame["k"] == 0].set_index(["arm", "seed"])
    for s in (0, 1):
        assert first.at[(WALK, s), "test_correct"] == first.at[(BUDGET, s), "test_correct"]
    # 64 training images / batch 8 = 8 steps per epoch; point 0 = 2 steps, each transition
    # 3 scale-only + 1 fine-tune steps: cumulative 2, 6, 10, 14, 18
    table = pd.read_csv(root / "tables" / "walk_frontier.csv", comment="#")
    assert table["point"].tolist() == labels
    assert table["walk steps"].tolist() == [2, 6, 10, 14, 18]
    assert table["equal steps trained"].tolist() == [2, 6, 10, 14, 18]
    # one cut epoch below 8 steps, else the fewest epochs >= ceil(steps / 8) that divide them
    assert table["equal-steps schedule"].tolist() == ["1 x 2", "1 x 6", "2 x 5", "2 x 7", "3 x 6"]
    assert table["study budget steps"].tolist() == [2] * 5 and (table["seeds"] == 2).all()
    assert table["size KB"].is_monotonic_decreasing
    movement = pd.read_csv(root / "tables" / "walk_movement.csv", comment="#")
    assert len(movement) == 4 * 2 and set(movement["moved"]) <= {"yes", "no"}
    screen = pd.read_csv(root / "tables" / "walk_screen.csv", comment="#")
    # on seed 0, rate 3 leaves phases below 1 %, rate 5 moves all four, rate 20 diverges
    assert screen["scale_lr"].tolist() == [3.0, 5.0, 20.0]
    assert screen["moved"].tolist() == [False, True, False]
    assert screen["status"].iloc[2].startswith("diverged: loss became nan at epoch 1")
    verdict = json.loads((root / "data" / "walk_verdict.json").read_text())
    assert verdict[0].startswith("walk_scale_lr = 5: the best validation top-1 at the last "
                                 "point") and verdict[0].endswith(
        "among the 1 of 3 screened rates whose scale phases all moved the steps; 3 left out (a "
        "scale phase moved < 1%); 20 left out (the walk diverged).")
    assert ("Compute: the walk trained all 5 models in 18 optimizer steps; 5 separate runs at "
            "the study's budget take 10: ratio 1.800 (misses the <= 0.333 goal).") in verdict
    assert verdict[-1].startswith("Goal not met: ")
    for ext in ("png", "pdf"):
        assert (root / "figures" / f"walk_frontier.{ext}").stat().st_size > 0
    outputs = [o for c in nb["cells"] for o in c.get("outputs", [])]
    assert any("image/png" in o.get("data", {}) for o in outputs)     # the figure is shown
    hmq = sorted((root / "checkpoints" / "walk").glob("*/model.hmq"))
    # seed 0: rate 3's five points, rate 5's four more (point 0 is shared), none of rate 20
    # (it diverged in its first transition); seed 1: five
    assert len(hmq) == 5 + 4 + 5


def test_notebook_07_re_tests_the_ladder(executed):
    """Section 8: the ladder screen, the decision runs paired with plain LSQ (the walk's
    study-budget runs at 10.34x, read back), the movement of every scale phase, the verdict."""
    root, nb = executed
    screen = pd.read_csv(root / "tables" / "ladder_screen.csv", comment="#")
    # a random-init ResNet-20 on synthetic data: the target phase's steps hardly move at any rate
    assert screen["scale_lr"].tolist() == [3.0, 5.0, 20.0] and not screen["moved"].any()
    verdict = json.loads((root / "data" / "ladder_verdict.json").read_text())
    assert verdict[0].startswith("ladder scale_lr = 5: no screened rate moved every scale phase "
                                 "by a median >= 1% (smallest median per rate: 3: ")
    assert verdict[0].endswith("is NOT the fair re-test: add larger rates to "
                               "walk_screen_scale_lrs.")
    assert verdict[-2].startswith("Not the fair re-test at HMQAT 10.34x, uniform W2A4")
    assert verdict[-1].startswith("Goal undecided: ")
    table = pd.read_csv(root / "tables" / "ladder_retest.csv", comment="#")
    assert table["point"].tolist() == ["HMQAT 10.34x", "uniform W2A4"]
    # 2 steps per run: 1 at 8 bit (its 1-step scale phase) and 1 at the target (scale-only)
    assert table["total steps"].tolist() == [2, 2]
    assert table["ladder steps at target"].tolist() == [1, 1]
    assert (table["seeds"] == 2).all() and (table["interval"] == "seeds × images").all()
    assert (table["scale lr"] == 5.0).all()
    moves = pd.read_csv(root / "tables" / "ladder_movement.csv", comment="#")
    assert len(moves) == 2 * 2 * 2 and moves["stage"].tolist()[:2] == ["8 bit", "target"]
    rows = pd.DataFrame(json.loads((root / "data" / "ladder_runs.json").read_text()))
    walk = pd.DataFrame(json.loads((root / "data" / "walk_runs.json").read_text()))
    for s in (0, 1):   # plain LSQ at 10.34x is the walk's study-budget run there, read back
        lsq = rows[(rows["point"] == "HMQAT 10.34x") & (rows["label"] == walk_study.LSQ)
                   & (rows["seed"] == s)].iloc[0]
        budget = walk[(walk["point"] == "HMQAT 10.34x") & (walk["arm"] == BUDGET)
                      & (walk["seed"] == s)].iloc[0]
        assert lsq["test_correct"] == budget["test_correct"] and lsq["cached"]
    ladder = rows[rows["label"] == walk_study.LADDER]
    assert (ladder["steps"] == rows[rows["label"] == walk_study.LSQ]["steps"].iloc[0]).all()
    # three screened rates at 10.34x (rate 5's is seed 0's decision run), W2A4 seed 0, seed 1 x 2
    assert len(list((root / "checkpoints" / "ladder").glob("*/result.json"))) == 3 + 1 + 2
    text = "".join("".join(o.get("text", "")) for c in nb["cells"] for o in c.get("outputs", []))
    assert "did not run notebook 04's transition experiment" in text


def test_run_screen_records_a_diverged_rate_and_keeps_the_others(capsys):
    from hmqat.train import NonFiniteLossError

    def run(rate):
        if rate > 4:
            raise NonFiniteLossError("loss became nan at epoch 1; lower the learning rate")
        return {"top1": 80.0 + rate, "rate": rate}

    def row(rate, rec):
        return {"scale_lr": rate, "val_top1": rec["top1"], "min median step change %": 2.0,
                "moved": True, "status": "moved"}

    screen, results = walk_study.run_screen([1.0, 8.0, 2.0], run, row, what="test screen")
    assert list(screen["scale_lr"]) == [1.0, 8.0, 2.0] and set(results) == {1.0, 2.0}
    assert screen.loc[1, "status"] == "diverged: loss became nan at epoch 1"
    assert not screen.loc[1, "moved"] and math.isnan(screen.loc[1, "val_top1"])
    assert walk_study.choose_scale_lr(screen)[0] == 2.0
    out = capsys.readouterr().out
    assert out.count("[07] test screen scale_lr") == 3 and "(diverged: loss became nan" in out
