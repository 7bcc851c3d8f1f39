"""The frontier-walk experiment (notebook 07, issue 26): is one walk down the size–Ω frontier as
good as a separate QAT run per budget, for a fraction of the compute?

The walk (:func:`hmqat.study.walk.walk_frontier`) trains the largest point like a QAT run, then
reaches each smaller point by switching only the layers whose width changes, a scale-only phase
and a short fine-tune. Every point is compared, paired by seed, with two separate runs from
FP32 (docs/method.md §5.5):

* (a) ``"walk"``: the walk's model of that point;
* (b) ``"direct, equal steps"``: QAT from FP32 with as many optimizer steps as the walk spent up
  to and including that point (its ``cumulative_steps``; :func:`equal_steps_schedule`);
* (c) ``"direct, study budget"``: QAT from FP32 at the study's budget (notebook 03's runs, read
  back when their identity matches).

The goal (:func:`walk_verdict`): the walk produces every point for at most a third of the
optimizer steps of one study-budget run per point, and each point's paired interval of a − c
has its lower bound at or above −0.3 points. The functions here are pure (records and frames
in, frames and sentences out), so their numbers are checked by hand in tests/test_walk_study.py.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch.nn as nn

from .. import quant, search
from . import reporting

__all__ = ["ARMS", "BUDGET", "DEFAULT_POINTS", "EQUAL", "WALK", "Schedule", "WalkStudyError",
           "choose_scale_lr", "compute_summary", "equal_steps_schedule", "frontier_points",
           "movement_table", "run_row", "scale_lr_candidates", "screen_row", "walk_table",
           "walk_verdict"]

WALK, EQUAL, BUDGET = "walk", "direct, equal steps", "direct, study budget"
#: The three arms, in the order tables and figures show them.
ARMS = (WALK, EQUAL, BUDGET)
#: The issue's points, largest first: uniform W4A4's size, 8x, uniform W3A4's size, 10.34x
#: (the paper's headline) and 13.11x (HAWQ-V3's ResNet-20 point).
DEFAULT_POINTS: tuple[str | float, ...] = ("W4A4 size", 8.0, "W3A4 size", 10.34, 13.11)

_UNIFORM = re.compile(r"W(\d+)(?:A(\d+))? size")


class WalkStudyError(ValueError):
    """Input the walk experiment cannot use; the message names the value and the fix."""


# --------------------------------------------------------------------------------------------
# The points
# --------------------------------------------------------------------------------------------
def _point_budget(item: Any, i: int, a_bits: int | None) -> tuple[str, int | float]:
    """``("size", b)`` for ``"W<b>A<a_bits> size"`` (or ``"W<b> size"``), ``("compression",
    r)`` for a number; anything else is a :class:`WalkStudyError` naming ``walk_points[i]``."""
    fix = (f"walk_points[{i}] = {item!r:.40}; use 'W<b>A{a_bits} size' (the pick at uniform "
           f"W<b>A{a_bits}'s size) or a compression ratio > 1 such as 10.34")
    if isinstance(item, str):
        m = _UNIFORM.fullmatch(item.strip())
        if m is None or int(m.group(1)) not in quant.SUPPORTED_BITS:
            raise WalkStudyError(fix)
        if m.group(2) is not None and int(m.group(2)) != a_bits:
            raise WalkStudyError(f"walk_points[{i}] = {item!r} names A{m.group(2)}, but the study "
                                 f"quantizes activations at a_bits={a_bits}; write "
                                 f"'W{m.group(1)}A{a_bits} size'")
        return "size", int(m.group(1))
    if isinstance(item, bool) or not isinstance(item, (int, float)) or not math.isfinite(item) \
            or item <= 1:
        raise WalkStudyError(fix)
    return "compression", float(item)


def frontier_points(problem: search.Problem, model: nn.Module,
                    points: Sequence[str | float] = DEFAULT_POINTS, *, a_bits: int | None = 4,
                    policy: str = "first_last_8", rel_tol: float = 0.01,
                    input_size: tuple[int, ...] = (1, 3, 32, 32)
                    ) -> list[tuple[str, dict[str, int]]]:
    """The walk's ``[(label, bit config)]``, largest first, picked on ``problem``'s size–Ω
    frontier the way notebook 02 picks: ``"W<b>A<a> size"`` is
    :func:`hmqat.search.select_at_size` at uniform W<b>A<a>'s size (label ``"HMQAT =W<b>A<a>
    size"``), a number r is :func:`hmqat.search.select` with ``min_compression=r`` (label
    ``"HMQAT <r>x"``), so a point
    equal to one of notebook 02's picks has its label and config (and notebook 03's runs are
    read back). Refuses, naming both points, when the sizes do not strictly decrease in the
    given order: the walk only goes down."""
    if isinstance(points, (str, bytes)) or not isinstance(points, Sequence) or len(points) < 2:
        raise WalkStudyError(f"walk_points = {points!r:.60}; give a list of at least two "
                             f"points from the largest model to the smallest, e.g. "
                             f"{list(DEFAULT_POINTS)}")
    budgets = [_point_budget(item, i, a_bits) for i, item in enumerate(points)]
    frontier = problem.frontier("size")
    out: list[tuple[str, dict[str, int], float]] = []
    for i, (kind, value) in enumerate(budgets):
        if kind == "size":
            uni = quant.uniform_config(model, int(value), policy=policy, input_size=input_size)
            size = quant.model_size_mb(model, uni, a_bits=a_bits, input_size=input_size)
            label = f"HMQAT =W{value}A{a_bits} size"
            try:
                row = search.select_at_size(frontier, size, rel_tol=rel_tol)
            except search.SearchError as exc:
                raise WalkStudyError(f"walk_points[{i}] ({label}): {exc}") from None
        else:
            label = f"HMQAT {value:g}x"
            try:
                row = search.select(frontier, min_compression=value)
            except search.SearchError as exc:
                raise WalkStudyError(f"walk_points[{i}] ({label}): {exc}") from None
        size = float(row["size_mb"])
        if out and size >= out[-1][2]:
            raise WalkStudyError(
                f"walk_points[{i}] ({label}) picks {size:.5f} MB "
                f"({float(row['compression']):.2f}x), not smaller than walk_points[{i - 1}] "
                f"({out[-1][0]}) at {out[-1][2]:.5f} MB; the walk goes from the largest model to "
                f"the smallest: order walk_points by decreasing size and drop a point that "
                f"picks the same size")
        out.append((label, {k: int(v) for k, v in row["config"].items()}, size))
    return [(label, config) for label, config, _ in out]


# --------------------------------------------------------------------------------------------
# Equal steps
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Schedule:
    """A direct run's schedule: ``epochs`` × ``max_steps_per_epoch`` (None: whole epochs)
    optimizer steps, ``steps`` in all, for a requested ``target``."""

    epochs: int
    max_steps_per_epoch: int | None
    steps: int
    target: int

    @property
    def exact(self) -> bool:
        """True when the schedule trains exactly the requested steps."""
        return self.steps == self.target

    def describe(self, steps_per_epoch: int) -> str:
        """``"2 x 255"``, ``"1 ep"`` or ``"3 x 290 = 870 (rounded from 871)"`` for the table."""
        whole = self.max_steps_per_epoch is None or self.max_steps_per_epoch >= steps_per_epoch
        text = f"{self.epochs} ep" if whole else f"{self.epochs} x {self.max_steps_per_epoch}"
        if not self.exact:
            text += f" = {self.steps} (rounded from {self.target})"
        return text


def equal_steps_schedule(target: int, steps_per_epoch: int) -> Schedule:
    """The schedule of a direct QAT run of ``target`` optimizer steps, as
    :func:`hmqat.study.budget.schedule` builds budgets: one epoch cut at ``target`` steps below an
    epoch (whole epochs, ``max_steps_per_epoch=None``, at exactly one, notebook 03's identity).

    Above an epoch the cosine schedule must span ``target`` exactly, so it takes the fewest
    epochs e >= ⌈target / steps_per_epoch⌉ that divide ``target``, each of target / e steps.
    Where that would need more than twice the fewest epochs (a target with only large prime
    factors: hundreds of one-step epochs), it trains e = ⌈target / steps_per_epoch⌉ epochs of
    round(target / e) steps instead (at most e/2 steps off; Python's round, halves to even), and
    ``exact`` is False so the table says so."""
    if isinstance(target, bool) or not isinstance(target, int) or target < 1:
        raise WalkStudyError(f"equal_steps_schedule: target={target!r}; a direct run needs an "
                             f"int >= 1 optimizer steps (the walk's cumulative_steps)")
    if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) \
            or steps_per_epoch < 1:
        raise WalkStudyError(f"equal_steps_schedule: steps_per_epoch={steps_per_epoch!r}; the "
                             f"training loader must yield at least one batch per epoch")
    if target <= steps_per_epoch:
        return Schedule(1, None if target == steps_per_epoch else target, target, target)
    fewest = -(-target // steps_per_epoch)
    for epochs in range(fewest, 2 * fewest + 1):
        if target % epochs == 0:
            per = target // epochs
            return Schedule(epochs, None if per == steps_per_epoch else per, target, target)
    per = max(1, round(target / fewest))
    return Schedule(fewest, None if per == steps_per_epoch else per, fewest * per, target)


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------
def run_row(point: str, k: int, arm: str, seed: int, record: Mapping[str, Any], steps: int, *,
            target_steps: int | None = None, schedule: str = "") -> dict[str, Any]:
    """One row of the runs frame from a run record (:func:`hmqat.study.runs.qat_run`'s or a walk
    point's): the point and its index ``k``, the arm, the seed, validation and test top-1 with
    their per-image bits, the accounting, the optimizer ``steps`` that produced the model (for
    the walk its cumulative steps), ``target_steps`` (what an equal-steps run was asked for),
    its ``schedule`` text, training seconds, and for walk points the step movement."""
    if arm not in ARMS:
        raise WalkStudyError(f"arm {arm!r} is not one of {list(ARMS)}")
    missing = [key for key in ("top1", "test_top1", "size_mb", "compression", "bops",
                               "avg_bits") if key not in record]
    if missing:
        raise WalkStudyError(f"the record of {point!r} ({arm}, seed {seed}) lacks {missing}; "
                             f"the walk experiment needs runs with a test read (test_loader=)")
    return {"point": point, "k": int(k), "arm": arm, "seed": int(seed),
            "val_top1": float(record["top1"]), "test_top1": float(record["test_top1"]),
            "correct": record.get("correct"), "n_val": record.get("n_val"),
            "test_correct": record.get("test_correct"), "n_test": record.get("n_test"),
            "size_mb": float(record["size_mb"]), "compression": float(record["compression"]),
            "bops": float(record["bops"]), "avg_bits": float(record["avg_bits"]),
            "steps": int(steps), "target_steps": int(steps if target_steps is None
                                                     else target_steps),
            "schedule": schedule, "train_s": float(record.get("train_s", math.nan)),
            "cached": bool(record.get("cached", False)),
            "changed_layers": len(record.get("changed_layers") or []),
            "step_median": record.get("step_median"), "step_max": record.get("step_max"),
            "scale_phase_moved": record.get("scale_phase_moved")}


def _check_frame(runs: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in runs.columns]
    if missing:
        raise WalkStudyError(f"{what} lacks column(s) {missing}; build it from run_row() rows")
    if runs.empty:
        raise WalkStudyError(f"{what} is empty; there are no runs to summarise")


def _points(runs: pd.DataFrame) -> list[str]:
    """The points in walk order (by ``k``)."""
    return list(runs.sort_values("k", kind="stable").drop_duplicates("point")["point"])


def _one(sub: pd.DataFrame, column: str, what: str) -> Any:
    """The single value of ``column`` in ``sub`` (e.g. steps, equal across seeds)."""
    values = sub[column].drop_duplicates()
    if len(values) != 1:
        raise WalkStudyError(f"{what}: {column} differs between seeds ({values.tolist()}); every "
                             f"seed of an arm must train the same schedule")
    return values.iloc[0]


# --------------------------------------------------------------------------------------------
# The table, the compute, the movement
# --------------------------------------------------------------------------------------------
def walk_table(runs: pd.DataFrame, *, value: str = "test_top1",
               confidence: float = 0.95) -> pd.DataFrame:
    """One row per point (walk order): size and compression, the mean ``value`` of each arm
    over seeds, the paired differences a − c and a − b with their interval
    (:func:`hmqat.study.reporting.paired_comparisons`: seeds × images when the runs carry
    per-image bits; NaN with one seed), and the compute: the walk's cumulative steps, the
    equal-steps run's trained steps and schedule, and the study-budget run's steps."""
    _check_frame(runs, ["point", "k", "arm", "seed", value, "size_mb", "compression", "bops",
                        "avg_bits", "steps", "schedule"], "runs")
    rows = []
    for point in _points(runs):
        sub = runs[runs["point"] == point].assign(label=lambda d: d["arm"])
        have = set(sub["arm"])
        lacking = [a for a in ARMS if a not in have]
        if lacking:
            raise WalkStudyError(f"point {point!r} has no {lacking} run; every point needs all "
                                 f"three arms")
        cmp = reporting.paired_comparisons(sub, [(WALK, BUDGET), (WALK, EQUAL)], value=value,
                                           confidence=confidence)
        ac, ab = cmp.iloc[0], cmp.iloc[1]
        mean = sub.groupby("arm")[value].mean()
        arm = {a: sub[sub["arm"] == a] for a in ARMS}
        rows.append({
            "point": point, "k": int(sub["k"].iloc[0]),
            "size KB": 1024 * float(arm[WALK]["size_mb"].iloc[0]),
            "compression": float(arm[WALK]["compression"].iloc[0]),
            "seeds": int(ac["seeds"]), "images": int(ac["images"]),
            "walk": float(mean[WALK]), "equal steps": float(mean[EQUAL]),
            "study budget": float(mean[BUDGET]),
            "a-c": float(ac["diff"]), "a-c ci_low": float(ac["ci_low"]),
            "a-c ci_high": float(ac["ci_high"]),
            "a-b": float(ab["diff"]), "a-b ci_low": float(ab["ci_low"]),
            "a-b ci_high": float(ab["ci_high"]),
            "walk steps": int(_one(arm[WALK], "steps", f"{point} walk")),
            "equal steps trained": int(_one(arm[EQUAL], "steps", f"{point} equal steps")),
            "equal-steps schedule": str(_one(arm[EQUAL], "schedule", f"{point} equal steps")),
            "study budget steps": int(_one(arm[BUDGET], "steps", f"{point} study budget")),
            "interval": ac["interval"] or "none (1 seed)"})
    return pd.DataFrame(rows)


def compute_summary(table: pd.DataFrame) -> dict[str, Any]:
    """The compute to produce every point of ``table`` (:func:`walk_table`): the walk's steps
    (its last point's cumulative steps: one walk yields them all), the steps of one separate
    study-budget run per point (their sum), and their ratio; also the equal-steps runs' total
    (the control arm's cost, not part of the goal)."""
    _check_frame(table, ["point", "k", "walk steps", "study budget steps",
                         "equal steps trained"], "table")
    ordered = table.sort_values("k", kind="stable")
    walk_total = int(ordered["walk steps"].iloc[-1])
    separate = int(ordered["study budget steps"].sum())
    return {"points": len(ordered), "walk_steps": walk_total, "separate_steps": separate,
            "ratio": walk_total / separate,
            "equal_steps_total": int(ordered["equal steps trained"].sum())}


def movement_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per scale-only phase of every walk (each point after the first, each seed): the
    switched layers, the median and max relative step change |s_after/s_before − 1| in percent,
    and whether the phase moved the steps (``moved``: median >= the walk's threshold, as the
    walk recorded it; "no phase" without one)."""
    _check_frame(runs, ["point", "k", "arm", "seed", "changed_layers", "step_median",
                        "step_max", "scale_phase_moved"], "runs")
    walk = runs[(runs["arm"] == WALK) & (runs["k"] > 0)].sort_values(["k", "seed"])
    if walk.empty:
        raise WalkStudyError("runs hold no walk point after the first; a scale phase runs only "
                             "at a transition")
    rows = []
    for _, r in walk.iterrows():
        has = r["step_median"] is not None and not pd.isna(r["step_median"])
        rows.append({"point": r["point"], "k": int(r["k"]), "seed": int(r["seed"]),
                     "switched layers": int(r["changed_layers"]),
                     "median step change %": 100 * float(r["step_median"]) if has else math.nan,
                     "max step change %": 100 * float(r["step_max"]) if has else math.nan,
                     "moved": ("yes" if r["scale_phase_moved"] else "no") if has
                     else "no phase"})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# The screen
# --------------------------------------------------------------------------------------------
def screen_row(scale_lr: float, records: Sequence[Mapping[str, Any]] | None, *,
               diverged: str | None = None) -> dict[str, Any]:
    """One screened walk (one seed): its ``scale_lr``, the validation top-1 of its last point,
    the smallest median step change over its scale phases, whether every phase moved, and
    ``status`` ("moved", "a phase moved < threshold" or "diverged: <first clause of the
    error>"). A rate whose walk stopped on a non-finite loss is a row too (``records`` None,
    ``diverged`` the error's text), so a screen of large rates reports the rate that blew up
    instead of stopping there."""
    if diverged is not None:
        return {"scale_lr": float(scale_lr), "val_top1": math.nan,
                "min median step change %": math.nan, "moved": False,
                "status": f"diverged: {diverged.split(';')[0].strip()}"}
    if records is None or len(records) < 2:
        raise WalkStudyError("a screened walk needs at least two points (one transition)")
    phases = list(records[1:])
    meds = [r.get("step_median") for r in phases]
    moved = all(r.get("scale_phase_moved") is True for r in phases)
    return {"scale_lr": float(scale_lr), "val_top1": float(records[-1]["top1"]),
            "min median step change %": (100 * min(meds) if all(m is not None for m in meds)
                                         else math.nan),
            "moved": moved, "status": "moved" if moved else "a phase moved < threshold"}


def scale_lr_candidates(scale_lr: float | None, screen_lrs: Sequence[float],
                        scale_steps: int) -> list[float]:
    """The scale-phase rates to run: ``[scale_lr]`` when it is fixed (no screen), else the
    screen's ``screen_lrs`` (distinct, > 0). Refuses a screen without a scale phase
    (``scale_steps`` 0) or with nothing to screen, naming the parameters to set."""
    def positive(x: Any) -> bool:
        return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x) \
            and x > 0

    if scale_lr is not None:
        if not positive(scale_lr):
            raise WalkStudyError(f"walk_scale_lr={scale_lr!r}; use a learning rate > 0, or null "
                                 f"to screen walk_screen_scale_lrs")
        return [float(scale_lr)]
    if scale_steps == 0:
        raise WalkStudyError("walk_scale_lr is null (screen it) but walk_scale_steps is 0: "
                             "there is no scale-only phase to screen; set walk_scale_steps > 0, "
                             "or walk_scale_lr to any rate > 0 (it is then unused)")
    if isinstance(screen_lrs, (str, bytes)) or not isinstance(screen_lrs, Sequence) \
            or not screen_lrs:
        raise WalkStudyError(f"walk_screen_scale_lrs = {screen_lrs!r:.40}; with walk_scale_lr "
                             f"null give a list of rates to screen, e.g. [0.01, 0.05, 0.25], or "
                             f"set walk_scale_lr")
    bad = [x for x in screen_lrs if not positive(x)]
    if bad or len(set(screen_lrs)) != len(screen_lrs):
        raise WalkStudyError(f"walk_screen_scale_lrs = {list(screen_lrs)!r:.60}; every rate must "
                             f"be a number > 0 and appear once"
                             + (f" (bad: {bad[:3]})" if bad else " (a rate is repeated)"))
    return [float(x) for x in screen_lrs]


def choose_scale_lr(screen: pd.DataFrame, *, moved_threshold: float = 0.01
                    ) -> tuple[float, str]:
    """``(scale_lr, sentence)``: among the screened rows (:func:`screen_row`) whose every scale
    phase moved the steps, the one with the best validation top-1 at the last point (a tie goes
    to the smaller rate); the sentence names the rates left out and why. None moved: a
    :class:`WalkStudyError` naming each rate's smallest median and asking for other rates."""
    _check_frame(screen, ["scale_lr", "val_top1", "moved", "min median step change %",
                          "status"], "screen")
    ok = screen[screen["moved"].astype(bool)]
    if ok.empty:
        meds = ", ".join(f"{r['scale_lr']:g}: " + ("diverged" if r["status"].startswith(
            "diverged") else f"{r['min median step change %']:.3g} %")
            for _, r in screen.iterrows())
        raise WalkStudyError(
            f"no screened walk_scale_lr moved the switched steps by a median >= "
            f"{moved_threshold:.0%} in every scale phase (smallest median per rate: {meds}); "
            f"add rates to walk_screen_scale_lrs (larger where a phase moved too little, "
            f"smaller where the walk diverged) or raise walk_scale_steps")
    best = ok.sort_values(["val_top1", "scale_lr"], ascending=[False, True]).iloc[0]
    left = screen[~screen["moved"].astype(bool)]
    slow = [f"{x:g}" for x in left.loc[~left["status"].str.startswith("diverged"), "scale_lr"]]
    blew = [f"{x:g}" for x in left.loc[left["status"].str.startswith("diverged"), "scale_lr"]]
    why = "".join([f"; {', '.join(slow)} left out (a scale phase moved < "
                   f"{moved_threshold:.0%})" if slow else "",
                   f"; {', '.join(blew)} left out (the walk diverged)" if blew else ""])
    return float(best["scale_lr"]), (
        f"walk_scale_lr = {best['scale_lr']:g}: the best validation top-1 at the last point "
        f"({best['val_top1']:.2f} %) among the {len(ok)} of {len(screen)} screened rates whose "
        f"scale phases all moved the steps{why}.")


def _interval(diff: float, low: float, high: float) -> str:
    return f"{diff:+.2f} [{low:+.2f}, {high:+.2f}]"


def walk_verdict(table: pd.DataFrame, *, movement: pd.DataFrame | None = None,
                 tolerance: float = 0.3, compute_goal: float = 1 / 3) -> list[str]:
    """Sentences, written by code, that say what the numbers support against the goal "the walk
    produces every frontier model for <= ``compute_goal`` of the compute of one separate run per
    point, each within ``tolerance`` points of (or above) the study-budget run (paired CI)":
    per point, whether the lower bound of a − c is >= −``tolerance`` (and a − b beside it); the
    compute ratio; the scale phases that failed to move the steps (``movement``,
    :func:`movement_table`); and the goal, met or not, plainly."""
    _check_frame(table, ["point", "k", "seeds", "a-c", "a-c ci_low", "a-c ci_high", "a-b",
                         "a-b ci_low", "a-b ci_high", "walk steps", "study budget steps",
                         "equal steps trained"], "table")
    out, met, undecided, missed = [], [], [], []
    for _, r in table.sort_values("k", kind="stable").iterrows():
        name = r["point"]
        ab = (f"walk − equal steps {_interval(r['a-b'], r['a-b ci_low'], r['a-b ci_high'])}"
              if math.isfinite(r["a-b ci_low"]) else f"walk − equal steps {r['a-b']:+.2f}")
        if not math.isfinite(r["a-c ci_low"]):
            undecided.append(name)
            out.append(f"{name}: walk − study budget {r['a-c']:+.2f} pt on {int(r['seeds'])} "
                       f"seed, no interval, so the −{tolerance:g} bound is not tested; {ab}.")
            continue
        ok = r["a-c ci_low"] >= -tolerance
        (met if ok else missed).append(name)
        first = (" (the walk's first point is its own QAT run at the study's budget)"
                 if int(r["k"]) == 0 else "")
        out.append(f"{name}: walk − study budget "
                   f"{_interval(r['a-c'], r['a-c ci_low'], r['a-c ci_high'])} pt over "
                   f"{int(r['seeds'])} seeds; lower bound {r['a-c ci_low']:+.2f} "
                   f"{'>=' if ok else '<'} −{tolerance:g}: "
                   + (f"within {tolerance:g} pt of (or above) the separate run" if ok else
                      f"not shown within {tolerance:g} pt of the separate run")
                   + f"{first}; {ab}.")
    cost = compute_summary(table)
    cheap = cost["ratio"] <= compute_goal + 1e-12
    out.append(f"Compute: the walk trained all {cost['points']} models in {cost['walk_steps']:,} "
               f"optimizer steps; {cost['points']} separate runs at the study's budget take "
               f"{cost['separate_steps']:,}: ratio {cost['ratio']:.3f} "
               f"({'meets' if cheap else 'misses'} the <= {compute_goal:.3g} goal).")
    if movement is not None and not movement.empty:
        phases = movement[movement["moved"] != "no phase"]
        failed = phases[phases["moved"] == "no"]
        if len(phases):
            worst = (f"; failed: " + ", ".join(f"{r['point']} seed {int(r['seed'])} "
                                               f"({r['median step change %']:.2f} %)"
                                               for _, r in failed.iterrows())
                     if len(failed) else "")
            out.append(f"Scale phases: {len(phases) - len(failed)} of {len(phases)} moved the "
                       f"switched steps by the required median (median of medians "
                       f"{phases['median step change %'].median():.2f} %, largest max "
                       f"{phases['max step change %'].max():.2f} %){worst}.")
        else:
            out.append("Scale phases: none ran (walk_scale_steps = 0).")
    reasons = []
    if missed:
        reasons.append(f"the lower bound of walk − study budget is below −{tolerance:g} at "
                       f"{', '.join(missed)}")
    if not cheap:
        reasons.append(f"the walk costs {cost['ratio']:.3f} of the separate runs, above "
                       f"{compute_goal:.3g}")
    if undecided:
        reasons.append(f"one seed gives no interval at {', '.join(undecided)} (run >= 2 "
                       f"seeds to test the bound)")
    if not reasons:
        out.append(f"Goal met: every point's lower bound is >= −{tolerance:g} and the walk "
                   f"costs {cost['ratio']:.3f} <= {compute_goal:.3g} of the separate runs.")
    else:
        verdict = "not met" if missed or not cheap else "undecided"
        out.append(f"Goal {verdict}: " + "; ".join(reasons) + ".")
    return out
