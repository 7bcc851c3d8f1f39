"""The budget axis (notebook 06): at which QAT budget does Hessian-guided mixed precision pay off?

Every verdict of notebooks 03/04 comes from one budget (one QAT epoch, cosine to 0), a
recovery-from-PTQ regime. This module trains the same paired comparisons at several budgets,
each on its own cosine schedule (docs/method.md §9):

* ``0`` steps: post-training quantization with the QAT quantizers, activation steps
  calibrated and BatchNorm re-estimated on seeded training batches (:func:`ptq_record`);
* ``k`` steps below one epoch: one epoch cut at ``k`` steps; whole epochs above it
  (:func:`schedule`). A budget equal to notebook 03's is notebook 03's run, read back.

The pairs (:func:`comparison_pairs`): the mixed pick at uniform W3A4's size vs uniform W3A4;
the 13.11× pick vs uniform W2A4 (a size-for-accuracy trade); the largest frontier pick whose
BOPs do not exceed uniform W3A4's (:func:`bops_matched_config`) vs uniform W3A4; and the joint
pick vs random configs of its size (:func:`random_same_size`), the k-th random config trained
with seed k, so the config draw is part of the replicate. Every interval is
:func:`hmqat.stats.crossed_paired_difference` over seeds and test images.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd
import torch.nn as nn

from .. import quant, search, train
from ..sensitivity import ptq_model
from . import reporting
from .runs import pack_correct

__all__ = ["BudgetError", "bops_matched_config", "budget_label", "budget_table",
           "budget_verdict", "comparison_pairs", "ptq_record", "random_same_size", "schedule"]


class BudgetError(ValueError):
    """A budget or pair the experiment cannot run; the message names the value and the fix."""


def schedule(steps: int, steps_per_epoch: int) -> tuple[int, int | None]:
    """``(epochs, max_steps_per_epoch)`` of a ``steps``-step budget: one cut epoch below an
    epoch, whole epochs (``max_steps_per_epoch=None``, the same identity as notebook 03's runs)
    at or above it. The cosine schedule of :func:`hmqat.train.fit` spans exactly ``steps``."""
    if not isinstance(steps, int) or steps < 1:
        raise BudgetError(f"a QAT budget is a positive step count, got {steps!r} (0 steps is "
                          "post-training quantization: ptq_record)")
    if steps_per_epoch < 1:
        raise BudgetError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    if steps < steps_per_epoch:
        return 1, steps
    if steps % steps_per_epoch:
        raise BudgetError(f"{steps} steps is not a whole number of {steps_per_epoch}-step "
                          f"epochs; use {steps // steps_per_epoch * steps_per_epoch} or "
                          f"{(steps // steps_per_epoch + 1) * steps_per_epoch}")
    return steps // steps_per_epoch, None


def budget_label(steps: int, steps_per_epoch: int) -> str:
    """``"0 (PTQ)"``, ``"150"`` or ``"390 (1 ep)"`` for tables and figures."""
    if steps == 0:
        return "0 (PTQ)"
    if steps >= steps_per_epoch and steps % steps_per_epoch == 0:
        return f"{steps} ({steps // steps_per_epoch} ep)"
    return str(steps)


def ptq_record(fp32: nn.Module, config: Mapping[str, int], calib_batches: Sequence,
               val_loader: Iterable, test_loader: Iterable, *, a_bits: int | None, policy: str,
               init: str, input_size: tuple[int, ...]) -> dict[str, Any]:
    """A 0-step "run": ``fp32`` quantized at ``config`` as every QAT run starts
    (:func:`hmqat.sensitivity.ptq_model`), scored like :func:`hmqat.study.runs.qat_run`'s
    record (``top1`` on validation, ``test_top1``, the per-image bits, size, BOPs)."""
    q = ptq_model(fp32, config, list(calib_batches), a_bits=a_bits, policy=policy, init=init)
    val = train.evaluate(q, val_loader, per_image=True)
    test = train.evaluate(q, test_loader, per_image=True)
    n_params = {n: m.weight.numel() for n, m in quant.quantized_layers(q).items()}
    return {"top1": val["top1"], "n_val": val["n"], "correct": pack_correct(val["correct"]),
            "test_top1": test["top1"], "n_test": test["n"],
            "test_correct": pack_correct(test["correct"]),
            "size_mb": quant.model_size_mb(q), "compression": quant.compression_ratio(q),
            "bops": quant.bops(q, policy=policy, input_size=input_size),
            "avg_bits": search.average_bits(quant.bit_config_of(q), n_params),
            "wall_s": 0.0}


def bops_matched_config(problem: search.Problem, uniform: Mapping[str, int]
                        ) -> search.Allocation:
    """The largest size-frontier config whose BOPs do not exceed ``uniform``'s (a mixed config
    that costs no more compute than the uniform one, and is as large as that allows)."""
    ref = problem.evaluate({**problem.fixed, **dict(uniform)}, method="uniform")
    front = problem.frontier("size")
    pts = front.points
    ok = pts.index[pts["bops"] <= ref.bops]
    if len(ok) == 0:
        raise BudgetError(f"no frontier config has BOPs <= the uniform config's ({ref.bops:.3g}); "
                          "drop the BOPs-matched pair")
    best = max(ok, key=lambda i: (pts.at[i, "size_mb"], -pts.at[i, "omega"]))
    return problem.evaluate(front.config(int(best)), method="bops-matched")


def random_same_size(problem: search.Problem, size_mb: float, n: int, *, seed: int = 0,
                     rel_tol: float = 0.01, n_samples: int = 4000) -> list[search.Allocation]:
    """``n`` seeded random configs within ``rel_tol`` of ``size_mb`` (:meth:`Problem.random`
    with seeds ``seed, seed+1, …``; draws outside the tolerance or repeated are skipped)."""
    out: list[search.Allocation] = []
    seen: set[tuple] = set()
    for s in range(seed, seed + 50 * max(n, 1)):
        a = problem.random(max_mb=size_mb, seed=s, n_samples=n_samples)
        key = tuple(sorted(a.config.items()))
        if abs(a.size_mb / size_mb - 1) <= rel_tol and key not in seen:
            out.append(a)
            seen.add(key)
        if len(out) == n:
            return out
    raise BudgetError(f"found {len(out)} of {n} random configs within {rel_tol:.0%} of "
                      f"{size_mb:.4f} MB; raise rel_tol or n_samples")


def comparison_pairs(labels: Iterable[str]) -> list[tuple[str, str, str]]:
    """``(pair name, a, b)`` of the budget axis among ``labels`` (arms present)."""
    have = set(labels)
    want = [("=W3A4 size: mixed − uniform W3A4", "HMQAT =W3A4 size", "uniform W3A4"),
            ("BOPs-matched: mixed − uniform W3A4", "HMQAT BOPs<=W3A4", "uniform W3A4"),
            ("13.11x − uniform W2A4 (trade)", "HMQAT 13.11x", "uniform W2A4"),
            ("allocation: joint − random, 10.34x", "HMQAT 10.34x", "random 10.34x")]
    return [p for p in want if p[1] in have and p[2] in have]


def budget_table(runs: pd.DataFrame, pairs: Sequence[tuple[str, str, str]]) -> pd.DataFrame:
    """One row per (budget, pair) that both arms ran: the paired test top-1 difference with its
    seeds × images interval (:func:`hmqat.study.reporting.paired_comparisons`), size gap and
    BOPs ratio. ``runs``: one row per (label, seed, steps) with notebook 03's run columns."""
    rows = []
    for steps, sub in runs.groupby("steps", sort=True):
        for name, a, b in pairs:
            if not {a, b} <= set(sub["label"]):
                continue
            r = reporting.paired_comparisons(sub, [(a, b)]).iloc[0].to_dict()
            rows.append({"steps": int(steps), "budget": sub["budget"].iloc[0], "pair": name,
                         **r})
    if not rows:
        raise BudgetError("no (budget, pair) has both arms; check the labels of the runs")
    return pd.DataFrame(rows)


def budget_verdict(table: pd.DataFrame, *, target_half_width: float = 0.3) -> list[str]:
    """Sentences that say what each pair's intervals support across budgets, plainly: where
    the sign is decided (the CI excludes 0) and which way, and whether the largest budget's
    half-width meets ``target_half_width``."""
    out = []
    for name, sub in table.groupby("pair", sort=False):
        parts = []
        for _, r in sub.sort_values("steps").iterrows():
            if not math.isfinite(float(r["ci_low"])):
                parts.append(f"{r['budget']}: {r['diff']:+.2f} (1 seed, no interval)")
                continue
            sign = ("a > b" if r["ci_low"] > 0 else "a < b" if r["ci_high"] < 0
                    else "undecided")
            parts.append(f"{r['budget']}: {r['diff']:+.2f} [{r['ci_low']:+.2f}, "
                         f"{r['ci_high']:+.2f}] {sign}")
        last = sub.sort_values("steps").iloc[-1]
        hw = float(last["half_width"])
        goal = ("" if not math.isfinite(hw) else
                f"; half-width at {last['budget']} {hw:.2f} pt "
                f"({'meets' if hw <= target_half_width else 'misses'} the ≤ "
                f"{target_half_width} target)")
        out.append(f"{name} — " + "; ".join(parts) + goal + ".")
    return out
