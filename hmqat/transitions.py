"""Transition-aware fine-tuning: precision transitions, rounding oscillations, distillation,
BatchNorm re-estimation.

docs/method.md §5 gives the abstract's phrase "transition-aware fine-tuning of the scale factor"
two readings; both are :class:`hmqat.train.Callback` s that plug into :func:`hmqat.train.qat`,
each configured by its own validated dataclass, and :class:`Recipe` bundles the four:

* **Precision transitions** (:class:`TransitionConfig`, :class:`PrecisionTransition`): every
  quantized layer moves through a ladder of widths (FP32 → 8 bit → … → its target) over a
  schedule. At each change the step is re-initialised, either by carrying the clipping range

      s_new = s_old · Q_P(old) / Q_P(new)                                            (Eq. T1)

  or **from data** (``reinit="data"``): weights get the MSE-optimal step of their current values,

      s* = argmin_s ‖ s·clamp(round(w/s), Q_N, Q_P) − w ‖²                           (Eq. T2)

  (the grid search of :func:`hmqat.quant.init_step`), activations the mean MSE-optimal step over
  ``calib_batches`` calibration batches. An optional **scale-only phase** follows every quantized
  stage start: for ``scale_only_steps`` steps the weights are frozen (no gradient, no update)
  while the steps and the BatchNorm affine parameters train. Optionally the step sizes' learning
  rate warms up linearly after the phase. :func:`ladder_stages` writes a schedule in optimizer
  steps whose number of steps at the target width is exact.
* **Rounding transitions** (Nagel et al. 2022; :class:`OscillationConfig`,
  :class:`OscillationTracker`): an oscillation is an integer change whose direction is opposite
  to the weight's previous change; its frequency is tracked with an EMA

      f_t = m · o_t + (1 − m) · f_{t−1}                                              (Eq. O1)

  and two remedies are offered, the dampening loss

      L_damp = λ(t) · ‖ s·w_int − clip(w, s·Q_N, s·Q_P) ‖²   (s, w_int detached)      (Eq. O2)

  and freezing: a weight whose f exceeds an annealed threshold is frozen to round(EMA of its
  integer) (Eq. O3).
* **Distillation** from the FP32 model (:class:`DistillationConfig`, :class:`Distillation`):

      L_kd = w · T² · KL(softmax(z_t/T) ‖ softmax(z_s/T))                             (Eq. D)

* **BatchNorm re-estimation** (:class:`BNConfig`; Nagel et al. 2022, :func:`hmqat.bn.reestimate_bn`)
  after every transition and/or at the end of the run (:class:`BNReestimation`).
* **The frontier walk** (the abstract's "along the accuracy-size Pareto frontier";
  :class:`WalkConfig`, :func:`frontier_transition`): from one Pareto config's trained model to
  the next smaller one, only the layers whose width changes switch (:func:`switch_layers`, their
  weight steps re-initialised by Eq. T2), a scale-only phase trains the steps alone and reports
  how far they moved (:func:`step_movement`), then a short full fine-tune. The driver with run
  identities, resume, evaluation and export is :func:`hmqat.study.walk.walk_frontier`.

LSQ's own transition-aware step gradient is the quantizer itself (:mod:`hmqat.quant`), so
"plain LSQ" is QAT without these callbacks. :func:`make_callbacks` turns a recipe into callbacks:

    >>> from hmqat import train, transitions
    >>> recipe = transitions.Recipe.from_dict({"transition": {"enabled": True},
    ...                                        "oscillation": {"freeze": True}})
    >>> qmodel, hist = train.qat(fp32, config, train_loader, val_loader, cfg,
    ...                          callbacks=transitions.make_callbacks(recipe, teacher=fp32))
"""
from __future__ import annotations

import bisect
import copy
import math
import numbers
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import bn as hbn
from . import quant
from . import train as htrain
from .runtime import seed_everything
from .train import Callback, TrainState

__all__ = [
    "AGGREGATIONS",
    "BNConfig",
    "BNReestimation",
    "DEFAULT_STAGES",
    "Distillation",
    "DistillationConfig",
    "OscillationConfig",
    "OscillationTracker",
    "PrecisionTransition",
    "Recipe",
    "RecipeError",
    "TransitionConfig",
    "WalkConfig",
    "WalkError",
    "dampening_loss",
    "distillation_loss",
    "frontier_transition",
    "ladder_stages",
    "make_callbacks",
    "parse_stages",
    "phase_configs",
    "ramp",
    "reestimate_bn_with_drift",
    "scale_only_phase",
    "split_steps",
    "step_movement",
    "switch_layers",
    "validate_frontier",
]

SCHEDULES: tuple[str, ...] = ("cosine", "linear")
AGGREGATIONS: tuple[str, ...] = ("sum", "mean", "kernel_mean")
STAGE_UNITS: tuple[str, ...] = ("fraction", "epoch", "step")
REINIT: tuple[str, ...] = quant.REINIT_METHODS + ("data",)  # "data": Eq. T2 (from data)
DEFAULT_STAGES: tuple[tuple[float, int | str], ...] = ((0.0, "fp32"), (0.1, 8), (0.3, "target"))
_REUSED = ("{name} already ran a training from step 0; callbacks hold run state, so build new "
           "ones for every run (transitions.make_callbacks(recipe))")


class RecipeError(ValueError):
    """A transition / oscillation / distillation option is invalid; the message names it."""


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------
def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(float(x))


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _choice(value: Any, choices: tuple[str, ...], what: str) -> str:
    if value not in choices:
        raise RecipeError(f"{what}={value!r} is not allowed; use one of {choices}")
    return value


def _check_bools(obj: Any, section: str) -> None:
    """Every field annotated ``bool`` of dataclass ``obj`` must hold a real bool."""
    for f in fields(obj):
        if f.type == "bool" and not isinstance(getattr(obj, f.name), bool):
            raise RecipeError(f"{section}.{f.name}={getattr(obj, f.name)!r}; use true or false")


def ramp(progress: float, start: float, final: float, *, begin: float = 0.0,
         kind: str = "cosine") -> float:
    """Annealed value at training ``progress`` ∈ [0, 1]: ``start`` until ``begin``, then
    to ``final`` at progress 1 (docs/method.md §5, "λ ramped up" / annealed threshold).

    cosine: v = final + (start − final)·(1 + cos πu)/2; linear: v = start + (final − start)·u,
    with u = (progress − begin)/(1 − begin) clipped to [0, 1] (Nagel et al.'s CosineTempDecay).
    """
    _choice(kind, SCHEDULES, "schedule")
    if progress <= begin:
        return float(start)
    u = min(1.0, (progress - begin) / max(1.0 - begin, 1e-12))
    if kind == "linear":
        return float(start + (final - start) * u)
    return float(final + (start - final) * 0.5 * (1.0 + math.cos(math.pi * u)))


# --------------------------------------------------------------------------------------------
# Precision schedules
# --------------------------------------------------------------------------------------------
def _stage_bits(label: Any, index: int, last: int) -> int | str:
    if label == "fp32":
        if index != 0:
            raise RecipeError(f"stages[{index}] = 'fp32': only the first stage may be FP32 "
                              f"(precision only goes down), e.g. [(0, 'fp32'), (0.1, 8), "
                              f"(0.3, 'target')]")
        return "fp32"
    if label == "target":
        if index != last:
            raise RecipeError(f"stages[{index}] = 'target' must be the last stage; later stages "
                              f"would move layers away from their searched bits")
        return "target"
    if not _is_int(label) or int(label) not in quant.SUPPORTED_BITS:
        raise RecipeError(f"stages[{index}] bits = {label!r}; use 'fp32', 'target' or an int "
                          f"in {quant.SUPPORTED_BITS}")
    return int(label)


def parse_stages(stages: Iterable[Sequence[Any]], unit: str = "fraction"
                 ) -> tuple[tuple[float | int, int | str], ...]:
    """Validate a precision schedule ``[(at, bits), ...]`` (docs/method.md §5).

    ``at`` is a fraction of all training steps in [0, 1) (``unit="fraction"``), an epoch index
    (``unit="epoch"``) or a global optimizer step (``unit="step"``, see :func:`ladder_stages`);
    the first stage starts at 0 and ``at`` strictly increases. ``bits`` is ``"fp32"`` (first
    stage only), an int (an intermediate width, applied as max(bits, target) so no layer goes
    below its target) or ``"target"`` (required, last).
    """
    _choice(unit, STAGE_UNITS, "transition.unit")
    if isinstance(stages, (str, bytes)) or not isinstance(stages, Iterable):
        raise RecipeError(f"stages={stages!r}; give a list of (at, bits) pairs, e.g. "
                          f"[(0, 'fp32'), (0.1, 8), (0.3, 'target')]")
    items = list(stages)
    if not items:
        raise RecipeError("stages is empty; give at least [(0, 'target')]")
    out: list[tuple[float | int, int | str]] = []
    for i, st in enumerate(items):
        if isinstance(st, (str, bytes)) or not isinstance(st, Sequence) or len(st) != 2:
            raise RecipeError(f"stages[{i}] = {st!r}; each stage is a pair (at, bits)")
        at, label = st
        if not _is_number(at):
            raise RecipeError(f"stages[{i}] at = {at!r}; it must be a number")
        if unit == "fraction" and not 0.0 <= float(at) < 1.0:
            raise RecipeError(f"stages[{i}] at = {at!r}; with unit='fraction' it must be "
                              f"in [0, 1) (a fraction of all training steps)")
        if unit in ("epoch", "step") and (float(at) < 0 or not float(at).is_integer()):
            raise RecipeError(f"stages[{i}] at = {at!r}; with unit={unit!r} it must be an "
                              f"{unit} index >= 0")
        if i == 0 and float(at) != 0.0:
            raise RecipeError(f"stages[0] at = {at!r}; the first stage must start at 0")
        if out and float(at) <= float(out[-1][0]):
            raise RecipeError(f"stages[{i}] at = {at!r} is not after stages[{i - 1}] at = "
                              f"{out[-1][0]!r}; stage starts must strictly increase")
        bits = _stage_bits(label, i, len(items) - 1)
        prev = [b for _, b in out if isinstance(b, int)]
        if isinstance(bits, int) and prev and bits >= prev[-1]:
            raise RecipeError(f"stages[{i}] bits = {bits} is not below the previous stage's "
                              f"{prev[-1]}; intermediate widths must decrease")
        out.append((float(at) if unit == "fraction" else int(at), bits))
    if out[-1][1] != "target":
        raise RecipeError(f"the last stage is {out[-1]!r}; the schedule must end with "
                          f"(at, 'target') so every layer trains at its searched bits")
    return tuple(out)


def ladder_stages(total_steps: int, steps_at_target: int, ladder: Sequence[int] = ()
                  ) -> tuple[tuple[int, int | str], ...]:
    """A schedule in optimizer steps (``unit="step"``) that trains exactly ``steps_at_target``
    steps at the target width (docs/method.md §5, "ladders").

    The ``total_steps − steps_at_target`` steps before the target are split evenly (floor)
    over the rungs of ``ladder`` (decreasing widths, e.g. ``(8, 4)``; no FP32 rung: QAT starts
    from a converged FP32 model). Each rung is applied as max(rung, target), so only layers
    below a rung step down through it. ``ladder=()`` needs ``steps_at_target == total_steps``.

        >>> ladder_stages(300, 250, (8, 4))
        ((0, 8), (25, 4), (50, 'target'))
    """
    if not _is_int(total_steps) or total_steps < 1:
        raise RecipeError(f"total_steps={total_steps!r}; it must be an int >= 1")
    if not _is_int(steps_at_target) or not 1 <= steps_at_target <= total_steps:
        raise RecipeError(f"steps_at_target={steps_at_target!r}; it must be an int in "
                          f"[1, total_steps={total_steps}]")
    rungs = list(ladder)
    pre = total_steps - steps_at_target
    if not rungs:
        if pre:
            raise RecipeError(f"ladder=() trains every step at the target, but steps_at_target="
                              f"{steps_at_target} < total_steps={total_steps}; give a ladder, "
                              f"e.g. (8,), or steps_at_target={total_steps}")
        return ((0, "target"),)
    if pre < len(rungs):
        raise RecipeError(f"ladder {tuple(rungs)} needs >= {len(rungs)} steps before the target "
                          f"(one per rung), but total_steps − steps_at_target = {pre}; lower "
                          f"steps_at_target or raise total_steps")
    starts = [i * pre // len(rungs) for i in range(len(rungs))]
    return parse_stages([*zip(starts, rungs), (pre, "target")], "step")


# --------------------------------------------------------------------------------------------
# Configs (one per callback; Recipe bundles them)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TransitionConfig:
    """Precision transitions (docs/method.md §5); see :class:`PrecisionTransition`.

    Attributes:
        enabled: build a :class:`PrecisionTransition` (make_callbacks).
        stages: ``[(at, bits), ...]`` in ``unit`` (:func:`parse_stages`, :func:`ladder_stages`).
        unit: ``"fraction"`` (of all steps), ``"epoch"`` or ``"step"`` (global step index).
        reinit: step re-init at a change between two quantized widths: ``"range"`` (Eq. T1),
            ``"data"`` (Eq. T2: weights MSE-optimal from their current values, activations from
            ``calib_batches`` calibration batches), ``"mse"`` / ``"lsq"`` (weights from their
            values, activations lazily from the next training batch).
        fp32_exit: the same choice when a layer leaves the FP32 stage.
        step_warmup: after every transition (and its scale-only phase) the "steps" group's
            ``lr_mult`` rises linearly (k+1)/(N+1), k = 0..N−1; N = step_warmup in ``unit``,
            rounded to steps. 0 disables it.
        activations: also move the input-activation quantizers (target = their a_bits).
        scale_only_steps: length of the scale-only phase after every quantized stage start
            (step 0 included): weights frozen, steps and BN affine parameters train. 0: none.
        scale_only_lr_mult: the "steps" group's ``lr_mult`` during the scale-only phase.
        calib_batches: calibration batches for ``reinit="data"`` activation steps (>= 2).
    """

    enabled: bool = False
    stages: tuple = DEFAULT_STAGES
    unit: str = "fraction"
    reinit: str = "range"
    fp32_exit: str = "mse"
    step_warmup: float = 0.02
    activations: bool = True
    scale_only_steps: int = 0
    scale_only_lr_mult: float = 1.0
    calib_batches: int = 2

    def __post_init__(self) -> None:
        _check_bools(self, "transition")
        object.__setattr__(self, "stages", parse_stages(self.stages, self.unit))
        _choice(self.reinit, REINIT, "transition.reinit")
        _choice(self.fp32_exit, REINIT, "transition.fp32_exit")
        if not _is_number(self.step_warmup) or self.step_warmup < 0:
            raise RecipeError(f"transition.step_warmup={self.step_warmup!r}; it must be >= 0 "
                              f"(in transition.unit units)")
        if not _is_int(self.scale_only_steps) or self.scale_only_steps < 0:
            raise RecipeError(f"transition.scale_only_steps={self.scale_only_steps!r}; it must "
                              f"be an int >= 0 (optimizer steps with frozen weights)")
        if not _is_number(self.scale_only_lr_mult) or self.scale_only_lr_mult <= 0:
            raise RecipeError(f"transition.scale_only_lr_mult={self.scale_only_lr_mult!r}; it "
                              f"must be > 0 (a multiplier of the steps' learning rate)")
        if not _is_int(self.calib_batches) or self.calib_batches < 2:
            raise RecipeError(f"transition.calib_batches={self.calib_batches!r}; use an int "
                              f">= 2 (activation steps from at least two batches)")

    @property
    def needs_batches(self) -> bool:
        """True when the data re-init needs calibration batches."""
        return "data" in (self.reinit, self.fp32_exit)


@dataclass(frozen=True)
class OscillationConfig:
    """Oscillation tracking, dampening and freezing (Nagel et al. 2022; Eq. O1–O3).

    ``track`` logs only; ``dampen`` adds Eq. O2 with λ ramped from ``dampen_weight`` to
    ``dampen_weight_final`` from progress ``dampen_start``; ``freeze`` freezes weights whose
    frequency exceeds a threshold annealed from ``freeze_threshold`` to
    ``freeze_threshold_final`` from ``freeze_start``, in layers of <= ``freeze_max_bits`` bits.
    ``momentum`` is m of Eq. O1; ``report_threshold`` (None: = momentum) defines osc_frac.
    """

    track: bool = False
    dampen: bool = False
    freeze: bool = False
    momentum: float = 0.01
    report_threshold: float | None = None
    dampen_weight: float = 0.0
    dampen_weight_final: float = 0.1
    dampen_start: float = 0.25
    dampen_schedule: str = "cosine"
    dampen_aggregation: str = "kernel_mean"
    freeze_threshold: float = 0.1
    freeze_threshold_final: float = 0.03
    freeze_start: float = 0.25
    freeze_schedule: str = "cosine"
    freeze_max_bits: int = 4

    def __post_init__(self) -> None:
        _check_bools(self, "oscillation")
        m = self.momentum
        if not _is_number(m) or not 0 < m < 1:
            raise RecipeError(f"oscillation.momentum={m!r}; the EMA momentum m must be in "
                              f"(0, 1), e.g. 0.01 (Nagel et al.)")
        for key in ("dampen_weight", "dampen_weight_final"):
            v = getattr(self, key)
            if not _is_number(v) or v < 0:
                raise RecipeError(f"oscillation.{key}={v!r}; λ must be a number >= 0")
        for key in ("dampen_start", "freeze_start"):
            v = getattr(self, key)
            if not _is_number(v) or not 0 <= v < 1:
                raise RecipeError(f"oscillation.{key}={v!r}; it is a fraction of training in "
                                  f"[0, 1)")
        _choice(self.dampen_schedule, SCHEDULES, "oscillation.dampen_schedule")
        _choice(self.freeze_schedule, SCHEDULES, "oscillation.freeze_schedule")
        _choice(self.dampen_aggregation, AGGREGATIONS, "oscillation.dampen_aggregation")
        for key in ("freeze_threshold", "freeze_threshold_final"):
            v = getattr(self, key)
            if not _is_number(v) or not 0 < v <= 1:
                raise RecipeError(f"oscillation.{key}={v!r}; a frequency threshold must be in "
                                  f"(0, 1]")
            if v < 2 * m:
                raise RecipeError(f"oscillation.{key}={v!r} is below 2 x oscillation.momentum "
                                  f"({2 * m:g}); a single oscillation would freeze a weight. "
                                  f"Nagel et al.: the threshold should be at least 2-3x the "
                                  f"momentum")
        if not _is_int(self.freeze_max_bits) or int(self.freeze_max_bits) not in \
                quant.SUPPORTED_BITS:
            raise RecipeError(f"oscillation.freeze_max_bits={self.freeze_max_bits!r}; use an "
                              f"int in {quant.SUPPORTED_BITS}")
        r = self.report_threshold
        if r is not None and (not _is_number(r) or not 0 < r < 1):
            raise RecipeError(f"oscillation.report_threshold={r!r}; use a frequency in (0, 1) "
                              f"or None (= oscillation.momentum)")

    @property
    def active(self) -> bool:
        """True when an OscillationTracker is needed (tracking, dampening or freezing)."""
        return self.track or self.dampen or self.freeze


@dataclass(frozen=True)
class DistillationConfig:
    """Knowledge distillation from the FP32 model (Eq. D): temperature T and weight w."""

    enabled: bool = False
    temperature: float = 4.0
    weight: float = 1.0

    def __post_init__(self) -> None:
        _check_bools(self, "distillation")
        if not _is_number(self.temperature) or self.temperature <= 0:
            raise RecipeError(f"distillation.temperature={self.temperature!r}; it must be > 0, "
                              f"e.g. 4")
        if not _is_number(self.weight) or self.weight < 0:
            raise RecipeError(f"distillation.weight={self.weight!r}; it must be >= 0")


@dataclass(frozen=True)
class BNConfig:
    """BatchNorm re-estimation (Nagel et al. 2022; :func:`hmqat.bn.reestimate_bn`): after every
    precision transition and/or once after the last optimizer step, on ``images`` training
    images without gradient."""

    after_transitions: bool = False
    at_end: bool = False
    images: int = 512

    def __post_init__(self) -> None:
        _check_bools(self, "bn")
        if not _is_int(self.images) or self.images < 1:
            raise RecipeError(f"bn.images={self.images!r}; use an int >= 1 (a few hundred "
                              f"training images)")

    @property
    def active(self) -> bool:
        return self.after_transitions or self.at_end


# --------------------------------------------------------------------------------------------
# BatchNorm re-estimation with its drift
# --------------------------------------------------------------------------------------------
def reestimate_bn_with_drift(model: nn.Module, batches: Iterable, images: int
                             ) -> list[dict[str, Any]]:
    """Re-estimate every BatchNorm (:func:`hmqat.bn.reestimate_bn`) and return its drift.

    One row per BN layer: ``mean_shift`` = mean over channels of |μ_new − μ_old| / √(σ²_old + ε)
    (how far the stale running mean was, in its own standard deviations) and ``var_ratio`` =
    mean of σ²_new / σ²_old.
    """
    ids = {id(m) for m in hbn.batchnorm_layers(model)}
    layers = {n: m for n, m in model.named_modules() if id(m) in ids}
    old = {n: (m.running_mean.detach().clone(), m.running_var.detach().clone())
           for n, m in layers.items()}
    hbn.reestimate_bn(model, batches, max_images=images)
    rows = []
    for n, m in layers.items():
        mu, var = old[n]
        sd = (var + m.eps).sqrt()
        rows.append({"layer": n,
                     "mean_shift": float(((m.running_mean - mu).abs() / sd).mean()),
                     "var_ratio": float((m.running_var / (var + m.eps)).mean())})
    return rows


class BNReestimation(Callback):
    """Re-estimate the BatchNorm statistics after the last optimizer step (``BNConfig.at_end``),
    before :func:`hmqat.train.fit` evaluates and saves the final epoch. ``log`` holds the
    per-layer drift rows of :func:`reestimate_bn_with_drift`."""

    def __init__(self, batches: Sequence[Any], images: int = 512):
        batches = list(batches or [])
        if not batches:
            raise RecipeError("BN re-estimation needs training batches; pass "
                              "make_callbacks(recipe, batches=[(x, y), ...])")
        self.batches, self.images = batches, int(images)
        self.log: list[dict[str, Any]] = []

    def on_after_step(self, state: TrainState) -> None:
        if state.step + 1 == state.total_steps:
            self.log = [{"step": state.step + 1, "when": "end", **r}
                        for r in reestimate_bn_with_drift(state.model, self.batches, self.images)]

    def state_dict(self) -> dict[str, Any]:
        return {"log": [dict(r) for r in self.log]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.log = [dict(r) for r in state["log"]]


# --------------------------------------------------------------------------------------------
# Precision transitions
# --------------------------------------------------------------------------------------------
def _weight_diagnostics(q: quant.LSQQuantizer, w: torch.Tensor,
                        carried: torch.Tensor | None) -> dict[str, float]:
    """How well the current step of weight quantizer ``q`` fits ``w`` (docs/method.md §5).

    ``step_ratio``: mean over channels of s / s*, s* the MSE-optimal step (Eq. T2) at the
    current width; ``range_ratio``: the same for ``carried`` (the step Eq. T1 would give; NaN
    when None); ``zero_frac``: share of integer codes equal to 0; ``err_ratio``: quantization
    error ‖q(w) − w‖² over the error at s*.
    """
    w = w.detach()
    s_opt = quant.init_step(w, q.bits, signed=q.signed, per_channel=q.per_channel, method="mse")
    s = q.step.detach().clamp_min(quant.MIN_STEP).reshape(s_opt.shape)
    codes = q.int_repr(w)
    err = (codes.to(w.dtype) * q.step_like(w) - w).pow(2).sum()
    view = quant.step_view(s_opt, w, q.per_channel)
    err_opt = (torch.clamp(w / view, q.qn, q.qp).round() * view - w).pow(2).sum()
    return {"step_ratio": float((s / s_opt).mean()),
            "range_ratio": (float((carried.reshape(s_opt.shape) / s_opt).mean())
                            if carried is not None else math.nan),
            "zero_frac": float((codes == 0).float().mean()),
            "err_ratio": float(err / err_opt.clamp_min(1e-30))}


class PrecisionTransition(Callback):
    """Staged precision schedule with data re-init and a scale-only phase (docs/method.md §5).

    Args:
        config: a :class:`TransitionConfig` (``enabled`` is make_callbacks' switch; the
            callback itself always applies the schedule).
        batches: training batches ``[(x, y), ...]`` for ``reinit="data"`` (the first
            ``config.calib_batches``) and BN re-estimation (up to ``bn.images`` images).
        bn: :class:`BNConfig`; ``bn.after_transitions`` re-estimates BatchNorm after every
            stage change (before the activation re-init, so calibration sees fresh statistics).

    At every stage start the quantizers move to the stage's width (intermediate widths as
    max(stage, target)); a changed weight quantizer is re-initialised (Eq. T1 or T2) and its
    step momentum reset. During the scale-only phase every parameter of the optimizer's
    "weights" group has ``requires_grad`` False (no gradient, no update, weight decay and
    momentum untouched), and the "steps" group runs at ``scale_only_lr_mult``.

    Run records (checkpointed by :func:`hmqat.train.fit`): ``events`` (one per stage start:
    step, stage, widths changed, the task loss of the step before and of the first step at the
    new stage; with a scale-only phase also how far it moved the changed weight steps,
    ``step_median`` and ``step_max`` of |s_end/s_start − 1| over every channel's step, as
    :func:`step_movement` measures the frontier walk's phase) and ``diagnostics`` (one row per
    changed weight quantizer: step / MSE-optimal step after the re-init and for the carried
    range, zero-code fraction, error ratio; plus a row per layer at the end of every scale-only
    phase and at the end of training, and BN drift rows, ``kind="bn"``).
    """

    def __init__(self, config: TransitionConfig | None = None, *,
                 batches: Sequence[Any] | None = None, bn: BNConfig | None = None):
        config = TransitionConfig(enabled=True) if config is None else config
        if not isinstance(config, TransitionConfig):
            raise RecipeError(f"PrecisionTransition needs a TransitionConfig, got "
                              f"{type(config).__name__}")
        self.config = config
        self.bn = BNConfig() if bn is None else bn
        self.batches = list(batches or [])
        if config.needs_batches and len(self.batches) < config.calib_batches:
            raise RecipeError(f"transition.reinit='data' needs >= {config.calib_batches} "
                              f"calibration batches, got {len(self.batches)}; pass "
                              f"make_callbacks(recipe, batches=[(x, y), ...])")
        if self.bn.after_transitions and not self.batches:
            raise RecipeError("bn.after_transitions needs training batches; pass "
                              "make_callbacks(recipe, batches=[(x, y), ...])")
        self.stages = config.stages
        self.unit = config.unit
        self.targets: dict[str, int] = {}
        self.applied = -1
        self.events: list[dict[str, Any]] = []
        self.diagnostics: list[dict[str, Any]] = []
        self._last_loss: float | None = None     # task loss of the last step (None: none yet)
        self._starts: list[int] = []
        self._warmup_steps = 0
        self._total = 0
        # the changed weight steps at the start of the open scale-only phase (after the re-init)
        # and the index of its stage's event; closed by _close_phase
        self._phase_start: dict[str, torch.Tensor] = {}
        self._phase_event = -1

    # -- schedule ------------------------------------------------------------------------------
    def stage_starts(self, steps_per_epoch: int, epochs: int) -> list[int]:
        """The global step at which each stage begins."""
        total = steps_per_epoch * epochs
        if self.unit == "fraction":
            return [int(math.floor(at * total)) for at, _ in self.stages]
        if self.unit == "step":
            late = [at for at, _ in self.stages if at >= total]
            if late:
                raise RecipeError(f"stages start at step(s) {late} but training has only {total} "
                                  f"steps (0..{total - 1}); build the schedule with "
                                  f"transitions.ladder_stages(total_steps={total}, ...)")
            return [int(at) for at, _ in self.stages]
        late = [at for at, _ in self.stages if at >= epochs]
        if late:
            raise RecipeError(f"stages start at epoch(s) {late} but training has only {epochs} "
                              f"epochs (0..{epochs - 1}); move them earlier or train longer")
        return [int(at) * steps_per_epoch for at, _ in self.stages]

    def stage_at(self, step: int) -> int:
        """Index of the stage in force at global ``step``."""
        return bisect.bisect_right(self._starts, step) - 1

    @staticmethod
    def bits_for(label: int | str, target: int) -> int | None:
        """A quantizer's width in a stage: None (FP32), its target, or max(stage bits, target)."""
        if label == "fp32":
            return None
        if label == "target":
            return target
        return max(int(label), target)

    def steps_at_target(self, total_steps: int | None = None) -> int:
        """Optimizer steps trained in the last ("target") stage."""
        total = self._total if total_steps is None else total_steps
        return total - self._starts[-1]

    def in_scale_only(self, step: int) -> bool:
        """True while ``step`` lies in the scale-only phase of a quantized stage."""
        k = self.stage_at(step)
        return (k >= 0 and self.stages[k][1] != "fp32"
                and step - self._starts[k] < self.config.scale_only_steps)

    def lr_mult(self, step: int) -> float:
        """The "steps" group's multiplier at ``step``: ``scale_only_lr_mult`` in a scale-only
        phase, the linear warm-up right after it (stages after the first), else 1."""
        k = self.stage_at(step)
        if k < 0 or self.stages[k][1] == "fp32":
            return 1.0
        j = step - self._starts[k]
        if j < self.config.scale_only_steps:
            return float(self.config.scale_only_lr_mult)
        j -= self.config.scale_only_steps
        n = self._warmup_steps
        if k == 0 or n == 0:
            return 1.0
        return 1.0 if j >= n else (j + 1) / (n + 1)

    # -- model access --------------------------------------------------------------------------
    def _quantizers(self, model: nn.Module
                    ) -> dict[str, tuple[quant.LSQQuantizer, torch.Tensor | None]]:
        out: dict[str, tuple[quant.LSQQuantizer, torch.Tensor | None]] = {}
        for name, layer in quant.quantized_layers(model).items():
            out[f"{name}.weight_quantizer"] = (layer.weight_quantizer, layer.weight)
            if self.config.activations and layer.act_quantizer is not None:
                out[f"{name}.act_quantizer"] = (layer.act_quantizer, None)
        return out

    def _set_lr_mult(self, state: TrainState, step: int) -> None:
        for g in state.optimizer.param_groups:
            if g.get("name") == "steps":
                g["lr_mult"] = self.lr_mult(step)

    @staticmethod
    def _freeze_weights(state: TrainState, frozen: bool) -> None:
        """requires_grad of the optimizer's "weights" group (the scale-only phase)."""
        for g in state.optimizer.param_groups:
            if g.get("name") == "weights":
                for p in g["params"]:
                    p.requires_grad_(not frozen)

    # -- hooks ---------------------------------------------------------------------------------
    def on_train_start(self, state: TrainState) -> None:
        qs = self._quantizers(state.model)
        if not qs:
            raise RecipeError("PrecisionTransition needs a quantized model (QConv2d/QLinear); "
                              "use it through hmqat.train.qat or after hmqat.quant.quantize_model")
        if state.step == 0 and self.applied >= 0:
            raise RecipeError(_REUSED.format(name="PrecisionTransition"))
        if not self.targets:
            self.targets = {k: q.bits for k, (q, _) in qs.items()}
        elif set(self.targets) != set(qs):
            raise RecipeError("PrecisionTransition: its saved targets name other quantizers than "
                              "this model has; use a fresh callback for another model")
        self._total = state.total_steps
        self._starts = self.stage_starts(state.steps_per_epoch, state.config.epochs)
        scale = {"fraction": state.total_steps, "epoch": state.steps_per_epoch,
                 "step": 1}[self.unit]
        self._warmup_steps = int(round(self.config.step_warmup * scale))
        if self.config.step_warmup > 0:
            self._warmup_steps = max(self._warmup_steps, 1)
        if self.applied >= 0:      # resumed: widths come from the state dict, switches from here
            self._restore(qs)
        self._set_lr_mult(state, state.step)

    def _restore(self, qs: Mapping[str, tuple[quant.LSQQuantizer, torch.Tensor | None]]) -> None:
        """Put every quantizer back at the applied stage's width, keeping its loaded step."""
        label = self.stages[self.applied][1]
        for key, (q, _) in qs.items():
            bits = self.bits_for(label, self.targets[key])
            q.enabled = bits is not None
            if bits is not None and q.bits != bits:
                saved = q.step.detach().clone()
                q.set_bits(bits, "range")
                with torch.no_grad():
                    q.step.copy_(saved)

    def on_step_start(self, state: TrainState) -> None:
        want = self.stage_at(state.step)
        while self.applied < want:
            self.applied += 1
            self._apply(state, self.applied)
        self._freeze_weights(state, self.in_scale_only(state.step))

    def _apply(self, state: TrainState, k: int) -> None:
        """Move every quantizer to stage ``k`` (Eq. T1 / T2), reset its step momentum, and
        record the diagnostics."""
        label = self.stages[k][1]
        model = state.model
        self._close_phase(model)      # a phase cut short by this stage ends here
        changed, acts = 0, []
        start: dict[str, torch.Tensor] = {}
        for key, (q, weight) in self._quantizers(model).items():
            new = self.bits_for(label, self.targets[key])
            old = q.bits if q.enabled else None
            if new == old:
                continue
            changed += 1
            if new is None:
                q.enabled = False
                continue
            mode = self.config.fp32_exit if old is None else self.config.reinit
            q.enabled = True
            new_qp = (quant.weight_qrange if q.signed else quant.act_qrange)(new)[1]
            carried = q.step.detach() * (q.qp / new_qp)
            if mode == "range":
                q.set_bits(new, "range")
            elif weight is not None:
                q.set_bits(new, "mse" if mode == "data" else mode, x=weight.detach())
            elif mode == "data":
                q.set_bits(new, "range")      # placeholder; calibrated below from the batches
                acts.append(q)
            else:
                q.set_bits(new, mode)         # lazily from the next training batch
            state.optimizer.state.pop(q.step, None)
            if weight is not None:
                start[key.rsplit(".", 1)[0]] = q.step.detach().clone()
                self.diagnostics.append({
                    "step": state.step, "stage": k, "when": "transition", "kind": "weight",
                    "layer": key.rsplit(".", 1)[0], "bits_old": old, "bits": new,
                    "reinit": mode, **_weight_diagnostics(q, weight, carried)})
        if changed and self.bn.after_transitions:
            self.diagnostics.extend(
                {"step": state.step, "stage": k, "when": "transition", "kind": "bn", **r}
                for r in reestimate_bn_with_drift(model, self.batches, self.bn.images))
        if acts:
            quant.calibrate_activations(model, self.batches[:self.config.calib_batches],
                                        method="mse", quantizers=acts)
        self.events.append({"step": state.step, "epoch": state.epoch, "stage": k,
                            "bits": label, "changed": changed, "loss_before": self._last_loss,
                            "loss_after": None})
        if start and self.config.scale_only_steps and label != "fp32":
            self._phase_start, self._phase_event = start, len(self.events) - 1

    def _close_phase(self, model: nn.Module) -> None:
        """Record on the open scale-only phase's event how far it moved the changed weight
        steps (:func:`step_movement`: ``step_median``, ``step_max``), then close it."""
        if not self._phase_start:
            return
        layers = quant.quantized_layers(model)
        moved = step_movement(self._phase_start,
                              {n: layers[n].weight_quantizer.step for n in self._phase_start})
        self.events[self._phase_event].update(step_median=moved["step_median"],
                                              step_max=moved["step_max"],
                                              step_layers=len(self._phase_start))
        self._phase_start, self._phase_event = {}, -1

    def _snapshot(self, state: TrainState, when: str) -> None:
        """Diagnostics rows of every active weight quantizer now (end of a phase or of training)."""
        for name, layer in quant.quantized_layers(state.model).items():
            q = layer.weight_quantizer
            if q.enabled:
                self.diagnostics.append({
                    "step": state.step + 1, "stage": self.applied, "when": when,
                    "kind": "weight", "layer": name, "bits_old": None, "bits": q.bits,
                    "reinit": None, **_weight_diagnostics(q, layer.weight, None)})

    def on_after_step(self, state: TrainState) -> None:
        step = state.step
        if self.events and self.events[-1]["step"] == step:
            self.events[-1]["loss_after"] = state.loss
        self._last_loss = state.loss
        if self.in_scale_only(step) and not self.in_scale_only(step + 1):
            self._snapshot(state, "scale_only_end")
            self._close_phase(state.model)
        if step + 1 == self._total:
            self._close_phase(state.model)         # a phase that lasts to the end of training
            self._snapshot(state, "end")
            self._freeze_weights(state, False)     # hand back a model whose weights train
        self._set_lr_mult(state, step + 1)   # the loop reads lr_mult before the next step

    def on_epoch_end(self, state: TrainState, metrics: dict[str, Any]) -> None:
        metrics["stage"] = str(self.stages[max(self.applied, 0)][1])

    def diagnostics_frame(self):
        """``diagnostics`` as a pandas DataFrame."""
        return pd.DataFrame(self.diagnostics)

    def state_dict(self) -> dict[str, Any]:
        return {"targets": dict(self.targets), "applied": self.applied,
                "events": [dict(e) for e in self.events],
                "diagnostics": [dict(d) for d in self.diagnostics],
                "last_loss": self._last_loss,
                "phase_start": {k: v.detach().clone() for k, v in self._phase_start.items()},
                "phase_event": self._phase_event}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.targets = dict(state["targets"])
        self.applied = int(state["applied"])
        self.events = [dict(e) for e in state["events"]]
        self.diagnostics = [dict(d) for d in state["diagnostics"]]
        self._last_loss = state["last_loss"]
        # checkpoints written before the phase movement was recorded have neither key
        self._phase_start = {k: v.detach().clone()
                             for k, v in (state.get("phase_start") or {}).items()}
        self._phase_event = int(state.get("phase_event", -1))


# --------------------------------------------------------------------------------------------
# Rounding oscillations (Nagel et al. 2022)
# --------------------------------------------------------------------------------------------
def dampening_loss(weight: torch.Tensor, quantizer: quant.LSQQuantizer,
                   aggregation: str = "kernel_mean") -> torch.Tensor:
    """Eq. O2 without λ: ‖s·w_int − clip(w, s·Q_N, s·Q_P)‖² (Nagel et al. 2022, §4a).

    The target s·w_int = q(w) and the step are detached, so the gradient pulls the latent
    weights toward their bin centres and leaves the step alone. ``aggregation``: "sum", "mean"
    or "kernel_mean" (sum over output channels, mean over the rest; the reference code's default).
    """
    _choice(aggregation, AGGREGATIONS, "dampen_aggregation")
    s = quantizer.step_like(weight)
    with torch.no_grad():
        target = quantizer.int_repr(weight).to(weight.dtype) * s
    clipped = torch.clamp(weight, min=s * quantizer.qn, max=s * quantizer.qp)
    loss = (target - clipped).pow(2)
    if aggregation == "sum":
        return loss.sum()
    if aggregation == "mean":
        return loss.mean()
    return loss.sum(0).mean()


@dataclass
class _Track:
    """Per-weight-tensor oscillation state (kept in the callback, not in the model)."""

    bits: int
    prev: torch.Tensor                 # int16: last integer codes
    direction: torch.Tensor            # int8: sign of the last change (0: none yet)
    ema: torch.Tensor                  # float32: f_t, Eq. O1
    events: torch.Tensor               # 0-d float: oscillations since the last epoch end
    steps: int = 0                     # observations since the last epoch end
    ema_int: torch.Tensor | None = None       # float32: EMA of the integer codes (freezing)
    frozen: torch.Tensor | None = None        # bool
    frozen_int: torch.Tensor | None = None    # int16

    def to(self, device: torch.device) -> "_Track":
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                setattr(self, f.name, v.to(device))
        return self

    def as_dict(self) -> dict[str, Any]:
        return {f.name: (getattr(self, f.name).detach().cpu().clone()
                         if isinstance(getattr(self, f.name), torch.Tensor)
                         else getattr(self, f.name)) for f in fields(self)}


class OscillationTracker(Callback):
    """Track weight oscillations (Eq. O1) and optionally dampen (Eq. O2) or freeze them (Eq. O3).

    Nagel et al. 2022 (reference code Qualcomm-AI-research/oscillations-qat), configured by an
    :class:`OscillationConfig` (default: tracking only):

    * After every optimizer step each tracked layer's integer codes round(clip(w/s)) are
      compared with the previous ones. An oscillation: the code changes AND the change's sign is
      opposite to the weight's previous change (the first change is not one). Frequency:
      f_t = m·o_t + (1 − m)·f_{t−1}. A layer's state resets when its bit width changes or it
      is in the FP32 stage of a :class:`PrecisionTransition`.
    * ``dampen``: adds λ(t)·Σ_layers dampening_loss (every quantized layer), λ ramped from
      ``dampen_weight`` to ``dampen_weight_final`` from progress ``dampen_start`` on.
    * ``freeze``: in layers with bits <= ``freeze_max_bits``, a weight with f > threshold(t) is
      frozen at round(EMA of its integer codes); the threshold is 0 (off) before
      ``freeze_start``, then
      anneals from ``freeze_threshold`` to ``freeze_threshold_final``. A frozen weight gets a
      zero gradient (tensor hook), zero momentum, and after every optimizer step is reset to
      s·k, so its integer code k never changes and the saved model alone reproduces it.
    * ``log``: one row per tracked layer and epoch (layer, bits, n, osc_frac = share of weights
      with f > report_threshold, osc_rate = oscillations per weight per step in the epoch,
      frozen_frac); ``metrics`` gets the weight-averaged osc_frac/osc_rate/frozen_frac.
    """

    def __init__(self, config: OscillationConfig | None = None):
        config = OscillationConfig(track=True) if config is None else config
        if not isinstance(config, OscillationConfig):
            raise RecipeError(f"OscillationTracker needs an OscillationConfig, got "
                              f"{type(config).__name__}")
        self.config = config
        self.momentum = float(config.momentum)
        self.dampen, self.freeze = config.dampen, config.freeze
        self.dampen_weight = float(config.dampen_weight)
        self.dampen_weight_final = float(config.dampen_weight_final)
        self.dampen_start, self.dampen_schedule = float(config.dampen_start), config.dampen_schedule
        self.dampen_aggregation = config.dampen_aggregation
        self.freeze_threshold = float(config.freeze_threshold)
        self.freeze_threshold_final = float(config.freeze_threshold_final)
        self.freeze_start, self.freeze_schedule = float(config.freeze_start), config.freeze_schedule
        self.max_bits = int(config.freeze_max_bits)
        self.report_threshold = float(config.momentum if config.report_threshold is None
                                      else config.report_threshold)
        self.tracks: dict[str, _Track] = {}
        self.log: list[dict[str, Any]] = []
        self._hooks: dict[str, Any] = {}
        self._damp_sum: torch.Tensor | float = 0.0
        self._damp_n = 0
        self._lam = 0.0

    # -- schedules -----------------------------------------------------------------------------
    def dampen_lambda(self, progress: float) -> float:
        """λ(t) of Eq. O2."""
        return ramp(progress, self.dampen_weight, self.dampen_weight_final,
                    begin=self.dampen_start, kind=self.dampen_schedule)

    def threshold(self, progress: float) -> float:
        """Freezing threshold at ``progress``: 0 (no freezing) before ``freeze_start``."""
        if not self.freeze or progress < self.freeze_start:
            return 0.0
        return ramp(progress, self.freeze_threshold, self.freeze_threshold_final,
                    begin=self.freeze_start, kind=self.freeze_schedule)

    # -- tracking in the integer domain ------------------------------------------------------------
    def observe(self, name: str, codes: torch.Tensor, bits: int,
                threshold: float = 0.0) -> torch.Tensor | None:
        """Feed one step's integer codes of tensor ``name`` (Eq. O1; freezing per Eq. O3).

        The first call (or one after a bit change / shape change) only initialises the state.
        With ``threshold > 0`` weights whose f exceeds it become frozen at round(EMA of their
        codes up to the previous step), as in the reference code; their frozen code replaces the
        observed one from then on (the caller pins the weights, see :meth:`on_after_step`).
        Returns the newly frozen mask (None when nothing could freeze).
        """
        codes = codes.detach().to(torch.int16)
        tr = self.tracks.get(name)
        if tr is None or tr.bits != bits or tr.prev.shape != codes.shape:
            self.tracks[name] = _Track(
                bits=int(bits), prev=codes.clone(),
                direction=torch.zeros_like(codes, dtype=torch.int8),
                ema=torch.zeros_like(codes, dtype=torch.float32),
                events=torch.zeros((), dtype=torch.float32, device=codes.device),
                ema_int=codes.float() if self.freeze else None,
                frozen=torch.zeros_like(codes, dtype=torch.bool) if self.freeze else None,
                frozen_int=torch.zeros_like(codes) if self.freeze else None)
            return None
        if tr.frozen is not None:
            codes = torch.where(tr.frozen, tr.frozen_int, codes)
        delta = codes - tr.prev
        direction = torch.sign(delta).to(torch.int8)
        osc = (direction * tr.direction) == -1
        tr.ema.mul_(1.0 - self.momentum).add_(osc.float(), alpha=self.momentum)
        tr.direction = torch.where(delta != 0, direction, tr.direction)
        tr.prev = codes
        tr.events += osc.sum()
        tr.steps += 1
        new = None
        if threshold > 0 and tr.frozen is not None:
            new = (tr.ema > threshold) & ~tr.frozen
            tr.frozen |= new
            tr.frozen_int = torch.where(new, tr.ema_int.round().to(torch.int16), tr.frozen_int)
            tr.prev = torch.where(new, tr.frozen_int, tr.prev)   # the code from now on
        if tr.ema_int is not None:
            tr.ema_int.mul_(1.0 - self.momentum).add_(codes.float(), alpha=self.momentum)
        return new

    # -- freezing in the weight domain ---------------------------------------------------------
    def freeze_weights(self, name: str, layer: nn.Module, mask: torch.Tensor,
                       optimizer: torch.optim.Optimizer | None = None) -> None:
        """Freeze the weights of ``layer`` (a QConv2d/QLinear named ``name``) where ``mask`` is
        True at their current integer codes (used by the threshold rule; public for tests and
        manual experiments). Starts tracking the layer if needed."""
        q = layer.weight_quantizer
        with torch.no_grad():
            codes = q.int_repr(layer.weight, dtype=torch.int16)
        tr = self.tracks.get(name)
        if tr is None or tr.bits != q.bits or tr.frozen is None:
            was = self.freeze
            self.freeze = True
            self.tracks.pop(name, None)
            self.observe(name, codes, q.bits)
            self.freeze = was
            tr = self.tracks[name]
        mask = mask.to(device=codes.device, dtype=torch.bool) & ~tr.frozen
        tr.frozen_int = torch.where(mask, codes, tr.frozen_int)
        tr.prev = torch.where(mask, codes, tr.prev)
        tr.frozen |= mask
        self._ensure_hook(name, layer)
        self._pin(layer, tr, optimizer)

    def _pin(self, layer: nn.Module, tr: _Track, optimizer: torch.optim.Optimizer | None) -> None:
        """Reset frozen weights to s·k and zero their momentum (Eq. O3: no update at all)."""
        w = layer.weight
        with torch.no_grad():
            s = layer.weight_quantizer.step_like(w)
            w.copy_(torch.where(tr.frozen, tr.frozen_int.to(w.dtype) * s, w))
            if optimizer is not None:
                buf = optimizer.state.get(w, {}).get("momentum_buffer")
                if buf is not None:
                    buf.masked_fill_(tr.frozen, 0.0)

    def _ensure_hook(self, name: str, layer: nn.Module) -> None:
        """Gradient hook zeroing the frozen weights' gradient (task, dampening and KD terms).
        Not registered while the weight takes no gradient (a scale-only phase); a later step
        registers it."""
        if name in self._hooks or not layer.weight.requires_grad:
            return

        def mask_grad(grad: torch.Tensor, _name: str = name) -> torch.Tensor:
            tr = self.tracks.get(_name)
            if tr is None or tr.frozen is None or tr.frozen.shape != grad.shape:
                return grad
            return grad.masked_fill(tr.frozen, 0.0)

        self._hooks[name] = layer.weight.register_hook(mask_grad)

    def _remove_hooks(self) -> None:
        for h in self._hooks.values():
            h.remove()
        self._hooks.clear()

    # -- callback hooks ------------------------------------------------------------------------
    def _layers(self, model: nn.Module) -> dict[str, nn.Module]:
        """Quantized layers whose weight quantizer is active (not in an FP32 stage)."""
        return {n: m for n, m in quant.quantized_layers(model).items()
                if m.weight_quantizer.enabled}

    def on_train_start(self, state: TrainState) -> None:
        layers = quant.quantized_layers(state.model)
        if not layers:
            raise RecipeError("OscillationTracker needs a quantized model (QConv2d/QLinear); use "
                              "it through hmqat.train.qat")
        if state.step == 0 and self.log:
            raise RecipeError(_REUSED.format(name="OscillationTracker"))
        dev = next(state.model.parameters()).device
        for name, tr in list(self.tracks.items()):
            if name not in layers:
                raise RecipeError(f"OscillationTracker: saved state names layer {name!r}, which "
                                  f"this model lacks; use a fresh callback for another model")
            tr.to(dev)
        for name, layer in self._layers(state.model).items():
            if name not in self.tracks:
                with torch.no_grad():
                    codes = layer.weight_quantizer.int_repr(layer.weight, dtype=torch.int16)
                self.observe(name, codes, layer.weight_quantizer.bits)

    def on_step_start(self, state: TrainState) -> None:
        if not self.freeze:
            return
        for name, layer in self._layers(state.model).items():
            if layer.weight_quantizer.bits <= self.max_bits:
                self._ensure_hook(name, layer)

    def extra_loss(self, state: TrainState, outputs: torch.Tensor,
                   targets: torch.Tensor) -> torch.Tensor | None:
        if not self.dampen:
            return None
        self._lam = self.dampen_lambda(state.progress)
        if self._lam == 0.0:
            return None
        terms = [dampening_loss(m.weight, m.weight_quantizer, self.dampen_aggregation)
                 for m in self._layers(state.model).values()]
        if not terms:
            return None
        total = torch.stack(terms).sum()
        self._damp_sum = self._damp_sum + total.detach()
        self._damp_n += 1
        return self._lam * total

    def on_after_step(self, state: TrainState) -> None:
        thr = self.threshold(state.progress)
        active = self._layers(state.model)
        for name in [n for n in self.tracks if n not in active]:
            del self.tracks[name]          # FP32 stage: start afresh when it is quantized again
        for name, layer in active.items():
            q = layer.weight_quantizer
            tr = self.tracks.get(name)
            if tr is not None and tr.frozen is not None and tr.bits == q.bits:
                self._pin(layer, tr, state.optimizer)
            with torch.no_grad():
                codes = q.int_repr(layer.weight, dtype=torch.int16)
            can_freeze = self.freeze and q.bits <= self.max_bits
            self.observe(name, codes, q.bits, threshold=thr if can_freeze else 0.0)
            tr = self.tracks[name]
            if can_freeze and tr.frozen is not None:
                self._pin(layer, tr, state.optimizer)

    def on_epoch_end(self, state: TrainState, metrics: dict[str, Any]) -> None:
        rows = []
        for name, tr in self.tracks.items():
            n = tr.prev.numel()
            rows.append({
                "epoch": metrics.get("epoch", state.epoch + 1), "layer": name, "bits": tr.bits,
                "n": n,
                "osc_frac": float((tr.ema > self.report_threshold).float().mean()),
                "osc_rate": float(tr.events) / (n * tr.steps) if tr.steps else 0.0,
                "frozen_frac": float(tr.frozen.float().mean()) if tr.frozen is not None else 0.0,
            })
            tr.events.zero_()
            tr.steps = 0
        self.log.extend(rows)
        total = sum(r["n"] for r in rows)
        for key in ("osc_frac", "osc_rate", "frozen_frac"):
            if key == "frozen_frac" and not self.freeze:
                continue
            metrics[key] = (sum(r[key] * r["n"] for r in rows) / total) if total else float("nan")
        if self.dampen:
            metrics["dampen_lambda"] = self.dampen_lambda(state.progress)
            metrics["dampen_loss"] = (float(self._damp_sum) / self._damp_n) if self._damp_n \
                else 0.0
            self._damp_sum, self._damp_n = 0.0, 0
        if self.freeze:
            metrics["freeze_threshold"] = self.threshold(state.progress)
        if state.epoch == state.config.epochs - 1:
            self._remove_hooks()            # training is over: leave the model hook-free

    def log_frame(self):
        """The per-layer, per-epoch log as a pandas DataFrame."""
        return pd.DataFrame(self.log, columns=["epoch", "layer", "bits", "n", "osc_frac",
                                               "osc_rate", "frozen_frac"])

    def state_dict(self) -> dict[str, Any]:
        return {"tracks": {n: tr.as_dict() for n, tr in self.tracks.items()},
                "log": [dict(r) for r in self.log]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tracks = {n: _Track(**d) for n, d in state["tracks"].items()}
        self.log = [dict(r) for r in state["log"]]




# --------------------------------------------------------------------------------------------
# Distillation
# --------------------------------------------------------------------------------------------
def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float = 4.0) -> torch.Tensor:
    """Eq. D without the weight: T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)), batch mean."""
    t = float(temperature)
    return F.kl_div(F.log_softmax(student_logits / t, dim=1),
                    F.log_softmax(teacher_logits.detach() / t, dim=1),
                    reduction="batchmean", log_target=True) * (t * t)


class Distillation(Callback):
    """Knowledge distillation from the FP32 model (Eq. D), configured by a
    :class:`DistillationConfig` (temperature, weight).

    The teacher is deep-copied, kept in eval mode without gradients, moved to the student's
    device, and run on ``state.inputs`` (the batch the student just saw).
    """

    def __init__(self, teacher: nn.Module, config: DistillationConfig | None = None):
        if not isinstance(teacher, nn.Module):
            raise RecipeError(f"distillation needs the FP32 teacher model (an nn.Module), got "
                              f"{type(teacher).__name__}; pass make_callbacks(recipe, "
                              f"teacher=fp32_model)")
        config = DistillationConfig(enabled=True) if config is None else config
        if not isinstance(config, DistillationConfig):
            raise RecipeError(f"Distillation needs a DistillationConfig, got "
                              f"{type(config).__name__}")
        self.config = config
        self.teacher = copy.deepcopy(teacher).eval().requires_grad_(False)
        self.temperature, self.weight = float(config.temperature), float(config.weight)

    def on_train_start(self, state: TrainState) -> None:
        self.teacher.to(next(state.model.parameters()).device).eval()

    def extra_loss(self, state: TrainState, outputs: torch.Tensor,
                   targets: torch.Tensor) -> torch.Tensor | None:
        if self.weight == 0.0:
            return None
        if state.inputs is None:
            raise RecipeError("Distillation: state.inputs is not set; use it with hmqat.train.fit")
        self.teacher.eval()
        with torch.no_grad():
            teacher_logits = self.teacher(state.inputs)
        return self.weight * distillation_loss(outputs, teacher_logits, self.temperature)


# --------------------------------------------------------------------------------------------
# Recipe
# --------------------------------------------------------------------------------------------
_SECTIONS: dict[str, type] = {"transition": TransitionConfig, "oscillation": OscillationConfig,
                              "distillation": DistillationConfig, "bn": BNConfig}
#: The flat keywords of the former one-level Recipe and where they live now (deprecated).
_FLAT_KEYS: dict[str, tuple[str, str]] = {
    "transitions": ("transition", "enabled"), "stages": ("transition", "stages"),
    "stage_unit": ("transition", "unit"), "reinit": ("transition", "reinit"),
    "fp32_exit": ("transition", "fp32_exit"), "step_warmup": ("transition", "step_warmup"),
    "transition_activations": ("transition", "activations"),
    "osc_track": ("oscillation", "track"), "osc_dampen": ("oscillation", "dampen"),
    "osc_freeze": ("oscillation", "freeze"), "osc_momentum": ("oscillation", "momentum"),
    "osc_report_threshold": ("oscillation", "report_threshold"),
    **{k: ("oscillation", k) for k in ("dampen_weight", "dampen_weight_final", "dampen_start",
                                       "dampen_schedule", "dampen_aggregation",
                                       "freeze_threshold", "freeze_threshold_final",
                                       "freeze_start", "freeze_schedule", "freeze_max_bits")},
    "distill": ("distillation", "enabled"),
    "distill_temperature": ("distillation", "temperature"),
    "distill_weight": ("distillation", "weight"),
}


def _section(name: str, value: Any) -> Any:
    """A section config from itself or a dict (unknown keys are an error naming them)."""
    cls = _SECTIONS[name]
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise RecipeError(f"recipe.{name} must be a {cls.__name__} or a dict, got "
                          f"{type(value).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise RecipeError(f"unknown recipe key(s) {[f'{name}.{k}' for k in unknown]}; known "
                          f"keys of {name}: {sorted(known)}")
    return cls(**value)


@dataclass(frozen=True)
class Recipe:
    """The QAT recipe's switches, one validated section per mechanism (docs/method.md §5, §7):
    ``transition`` (:class:`TransitionConfig`), ``oscillation`` (:class:`OscillationConfig`),
    ``distillation`` (:class:`DistillationConfig`) and ``bn`` (:class:`BNConfig`). Every
    section may be given as a dict; the defaults are plain LSQ.

    ``Recipe.from_dict`` reads the params-YAML form ``{"transition": {"enabled": true}, ...}``
    and rejects unknown keys; the former flat keys (``transitions``, ``osc_freeze``, ``distill``,
    ...) still load there, with a DeprecationWarning naming the nested key.
    """

    transition: TransitionConfig = field(default_factory=TransitionConfig)
    oscillation: OscillationConfig = field(default_factory=OscillationConfig)
    distillation: DistillationConfig = field(default_factory=DistillationConfig)
    bn: BNConfig = field(default_factory=BNConfig)

    def __post_init__(self) -> None:
        for name in _SECTIONS:
            object.__setattr__(self, name, _section(name, getattr(self, name)))

    @classmethod
    def from_dict(cls, params: Mapping[str, Any] | None) -> "Recipe":
        """A Recipe from a params-YAML dict (nested sections; flat legacy keys are deprecated)."""
        if params is not None and not isinstance(params, Mapping):
            raise RecipeError(f"a recipe is a dict of sections {list(_SECTIONS)}, got "
                              f"{type(params).__name__}")
        nested: dict[str, dict[str, Any]] = {}
        flat: list[str] = []
        unknown: list[str] = []
        for key, value in dict(params or {}).items():
            if key in _SECTIONS:
                if isinstance(value, _SECTIONS[key]):
                    value = asdict(value)
                if not isinstance(value, Mapping):
                    raise RecipeError(f"recipe.{key} must be a dict, got {value!r}")
                nested.setdefault(key, {}).update(value)
            elif key in _FLAT_KEYS:
                section, name = _FLAT_KEYS[key]
                nested.setdefault(section, {})[name] = value
                flat.append(f"{key} -> {section}.{name}")
            else:
                unknown.append(key)
        if unknown:
            raise RecipeError(f"unknown recipe key(s) {sorted(unknown)}; use the sections "
                              f"{list(_SECTIONS)}, e.g. {{'transition': {{'enabled': true}}}}")
        if flat:
            warnings.warn(f"flat recipe keys are deprecated; use the nested form "
                          f"({', '.join(flat)})", DeprecationWarning, stacklevel=2)
        return cls(**nested)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready nested dict (stages as lists); ``Recipe.from_dict(r.to_dict()) == r``."""
        d = asdict(self)
        d["transition"]["stages"] = [list(s) for s in self.transition.stages]
        return d

    def updated(self, changes: Mapping[str, Mapping[str, Any]]) -> "Recipe":
        """A copy with ``{section: {key: value}}`` changed (validated like every Recipe)."""
        bad = sorted(set(changes) - set(_SECTIONS))
        if bad:
            raise RecipeError(f"unknown recipe section(s) {bad}; use {list(_SECTIONS)}")
        return replace(self, **{s: _section(s, {**asdict(getattr(self, s)), **dict(v)})
                                for s, v in changes.items()})

    def describe(self) -> str:
        """One line for tables, e.g. ``LSQ + transitions(8@0→target@0.3 fraction, range)``."""
        parts = ["LSQ"]
        t, o, d, b = self.transition, self.oscillation, self.distillation, self.bn
        if t.enabled:
            sched = "→".join(f"{bits}@{at:g}" for at, bits in t.stages)
            extra = f", scale-only {t.scale_only_steps}" if t.scale_only_steps else ""
            if t.scale_only_steps and t.scale_only_lr_mult != 1:
                extra += f" at step lr x{t.scale_only_lr_mult:g}"
            parts.append(f"transitions({sched} {t.unit}, {t.reinit}{extra})")
        if o.dampen:
            parts.append(f"dampen(λ {o.dampen_weight:g}→{o.dampen_weight_final:g})")
        if o.freeze:
            parts.append(f"freeze(f>{o.freeze_threshold:g}→{o.freeze_threshold_final:g}, "
                         f"≤{o.freeze_max_bits}b)")
        if d.enabled:
            parts.append(f"KD(T={d.temperature:g}, w={d.weight:g})")
        if b.active:
            when = "+".join(w for w, on in (("transitions", b.after_transitions),
                                            ("end", b.at_end)) if on)
            parts.append(f"BN re-est({when}, {b.images} img)")
        return " + ".join(parts)

    @property
    def needs_batches(self) -> bool:
        """True when make_callbacks needs training batches (data re-init, BN re-estimation)."""
        return (self.transition.enabled and self.transition.needs_batches) or self.bn.active


def make_callbacks(recipe: Recipe | Mapping[str, Any] | None,
                   teacher: nn.Module | None = None,
                   batches: Sequence[Any] | None = None) -> list[Callback]:
    """The callbacks of ``recipe`` for :func:`hmqat.train.qat`, in a fixed order:
    PrecisionTransition, OscillationTracker (tracking, dampening or freezing), Distillation,
    BNReestimation (``bn.at_end``; last, so it sees the step's final weights). Plain LSQ (the
    default Recipe) gives no callbacks. ``teacher`` (the FP32 model) is needed only for
    distillation; ``batches`` (training ``(x, y)`` batches) only for ``transition.reinit="data"``
    and BN re-estimation. Build new callbacks for every run (they hold run state)."""
    if recipe is None or isinstance(recipe, Mapping):
        recipe = Recipe.from_dict(recipe)
    if not isinstance(recipe, Recipe):
        raise RecipeError(f"make_callbacks needs a Recipe or a dict, got {type(recipe).__name__}")
    if recipe.needs_batches and not batches:
        raise RecipeError(f"recipe {recipe.describe()!r} needs training batches (data re-init or "
                          f"BN re-estimation); call make_callbacks(recipe, batches=[(x, y), ...])")
    if recipe.distillation.enabled and teacher is None:
        raise RecipeError("recipe.distillation is enabled but no teacher was given; call "
                          "make_callbacks(recipe, teacher=fp32_model)")
    cbs: list[Callback] = []
    if recipe.transition.enabled:
        cbs.append(PrecisionTransition(recipe.transition, batches=batches,
                                       bn=replace(recipe.bn, at_end=False)))
    if recipe.oscillation.active:
        cbs.append(OscillationTracker(recipe.oscillation))
    if recipe.distillation.enabled:
        cbs.append(Distillation(teacher, recipe.distillation))
    if recipe.bn.at_end:
        cbs.append(BNReestimation(batches, recipe.bn.images))
    return cbs


# --------------------------------------------------------------------------------------------
# The frontier walk: one transition between neighbouring Pareto configs
# --------------------------------------------------------------------------------------------
class WalkError(RecipeError):
    """Bad input to the frontier walk (configs, phase settings); the message names the fix."""


@dataclass(frozen=True, kw_only=True)
class WalkConfig:
    """Phase settings of every transition of the frontier walk (docs/method.md §5; the driver
    is :func:`hmqat.study.walk.walk_frontier`).

    Attributes:
        scale_steps: optimizer steps of the scale-only phase after each switch (0: none). Only
            the step sizes (every weight and activation quantizer's) train; weights, biases and
            BN affine parameters are frozen.
        scale_lr: the steps' learning rate in that phase, held constant (no cosine: a cosine
            over a few dozen steps halves the mean rate and ends at zero, and the phase exists
            to move the steps).
        finetune_steps: optimizer steps of the full fine-tune that follows (>= 1), cosine from
            ``finetune_lr`` with no warm-up.
        finetune_lr: the fine-tune's weight learning rate (None: the QAT config's ``lr``); the
            steps keep the QAT config's ``step_lr`` (None: this rate).
        moved_threshold: the scale phase "has failed" when the median relative step change
            |s_after/s_before − 1| over the switched layers' steps is below this (1 %).
    """

    scale_steps: int
    scale_lr: float
    finetune_steps: int
    finetune_lr: float | None = None
    moved_threshold: float = 0.01

    def __post_init__(self) -> None:
        if not _is_int(self.scale_steps) or self.scale_steps < 0:
            raise WalkError(f"walk.scale_steps={self.scale_steps!r}; use an int >= 0 (optimizer "
                            f"steps of the scale-only phase, 0 for none)")
        if not _is_number(self.scale_lr) or self.scale_lr <= 0:
            raise WalkError(f"walk.scale_lr={self.scale_lr!r}; use a learning rate > 0 for the "
                            f"step sizes in the scale-only phase")
        if not _is_int(self.finetune_steps) or self.finetune_steps < 1:
            raise WalkError(f"walk.finetune_steps={self.finetune_steps!r}; use an int >= 1 (every "
                            f"point ends with a full fine-tune, whose checkpoint is the point's "
                            f"model)")
        if self.finetune_lr is not None and (not _is_number(self.finetune_lr)
                                             or self.finetune_lr <= 0):
            raise WalkError(f"walk.finetune_lr={self.finetune_lr!r}; use a learning rate > 0, or "
                            f"None for the QAT config's lr")
        if not _is_number(self.moved_threshold) or not 0 < self.moved_threshold < 1:
            raise WalkError(f"walk.moved_threshold={self.moved_threshold!r}; use a fraction in "
                            f"(0, 1), e.g. 0.01 (1 %)")

    @classmethod
    def from_value(cls, value: WalkConfig | Mapping[str, Any]) -> WalkConfig:
        """A WalkConfig from itself or a dict (unknown keys are an error naming them)."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise WalkError(f"walk must be a WalkConfig or a dict, got {type(value).__name__}; "
                            f"e.g. {{'scale_steps': 20, 'scale_lr': 0.01, 'finetune_steps': 300}}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        missing = sorted(f.name for f in fields(cls) if f.name not in value
                         and f.name in ("scale_steps", "scale_lr", "finetune_steps"))
        if unknown or missing:
            problems = "; ".join(p for p in (unknown and f"unknown key(s) {unknown}",
                                             missing and f"missing key(s) {missing}") if p)
            raise WalkError(f"walk: {problems}; the keys are {sorted(known)} (scale_steps, "
                            f"scale_lr and finetune_steps are required)")
        return cls(**value)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def validate_frontier(fp32_model: nn.Module, configs: Any, *, a_bits: int | None = 4,
                      per_channel: bool = True, policy: str = "first_last_8",
                      input_size: tuple[int, ...] = quant.DEFAULT_INPUT_SIZE
                      ) -> list[tuple[str, dict[str, int], float]]:
    """Check the walk's ``configs`` — ``[(label, bit_config), ...]`` (or an ordered dict
    ``{label: bit_config}``) from the largest model to the smallest — before anything trains:
    every config valid for ``fp32_model`` under ``policy``, labels distinct, sizes (Eq. S,
    :func:`hmqat.quant.model_size_mb`) strictly decreasing. Returns ``[(label, config, MB)]``;
    the first problem raises one :class:`WalkError` naming the entry and the fix."""
    if not isinstance(fp32_model, nn.Module) or quant.is_quantized(fp32_model):
        raise WalkError("the frontier walk starts from the FP32 model; pass it unquantized (not "
                        "a model with QConv2d/QLinear layers)")
    if isinstance(configs, Mapping):
        configs = list(configs.items())
    if isinstance(configs, (str, bytes)) or not isinstance(configs, Iterable):
        raise WalkError(f"configs must be a list of (label, bit_config) pairs, got "
                        f"{type(configs).__name__}")
    items = list(configs)
    if not items:
        raise WalkError("configs is empty; give [(label, bit_config), ...] from the largest model "
                        "to the smallest, e.g. the frontier's picks at decreasing budgets")
    out: list[tuple[str, dict[str, int], float]] = []
    for i, item in enumerate(items):
        if isinstance(item, (str, bytes)) or not isinstance(item, Sequence) or len(item) != 2:
            raise WalkError(f"configs[{i}] = {item!r:.80}; each entry is a (label, bit_config) "
                            f"pair")
        label, config = item
        if not isinstance(label, str) or not label:
            raise WalkError(f"configs[{i}] label = {label!r}; give a non-empty string, e.g. "
                            f"'10.34x'")
        if label in [lab for lab, _, _ in out]:
            raise WalkError(f"configs[{i}] label {label!r} is used twice; every point needs its "
                            f"own label")
        try:
            quant.validate_bit_config(fp32_model, config, policy=policy, input_size=input_size)
        except quant.BitConfigError as exc:
            raise WalkError(f"configs[{i}] ({label!r}): {exc}") from None
        config = {k: int(v) for k, v in config.items()}
        size = quant.model_size_mb(fp32_model, config, a_bits, per_channel=per_channel,
                                   input_size=input_size)
        if out and size >= out[-1][2]:
            raise WalkError(f"configs[{i}] ({label!r}) is {size:.6g} MB, not smaller than "
                            f"configs[{i - 1}] ({out[-1][0]!r}) at {out[-1][2]:.6g} MB; the walk "
                            f"goes from the largest model to the smallest: order configs by "
                            f"decreasing size and drop configs of equal size")
        out.append((label, config, size))
    return out


def switch_layers(qmodel: nn.Module, bit_config: Mapping[str, int]) -> dict[str, tuple[int, int]]:
    """Move ``qmodel`` (in place) to ``bit_config``, touching only the layers whose weight width
    changes: their weight quantizer gets the new bits and the data re-init of a precision
    transition (Eq. T2: the MSE-optimal step of the current weights, as ``reinit="data"`` does).
    Every other step — unchanged layers' and all activation quantizers' — is left as it is.

    Returns ``{layer: (old bits, new bits)}`` of the switched layers, in model order."""
    layers = quant.quantized_layers(qmodel)
    if not layers:
        raise WalkError("switch_layers needs a quantized model (QConv2d/QLinear); quantize it "
                        "with hmqat.quant.quantize_model or train it with hmqat.train.qat first")
    unknown = sorted(set(bit_config) - set(layers))
    missing = [n for n in layers if n not in bit_config]
    if unknown or missing:
        raise WalkError(f"switch_layers: bit config has unknown layer(s) {unknown[:4]} and lacks "
                        f"{missing[:4]}; give bits for exactly the model's quantized layers "
                        f"(hmqat.quant.bit_config_of(model) lists them)")
    bad = {n: b for n, b in bit_config.items()
           if not _is_int(b) or int(b) not in quant.SUPPORTED_BITS}
    if bad:
        raise WalkError(f"switch_layers: unsupported bits {bad}; use ints in "
                        f"{quant.SUPPORTED_BITS}")
    changed: dict[str, tuple[int, int]] = {}
    for name, layer in layers.items():
        q, new = layer.weight_quantizer, int(bit_config[name])
        if new != q.bits:
            changed[name] = (q.bits, new)
            q.set_bits(new, "mse", x=layer.weight.detach())
    return changed


def step_movement(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor],
                  threshold: float = 0.01) -> dict[str, Any]:
    """How far a scale-only phase moved the steps: r = |s_after/s_before − 1| over every step
    entry (per channel) of the layers in ``before``, in float64. Returns ``step_median`` and
    ``step_max`` of r (median: numpy's, the mean of the middle two for an even count),
    ``scale_phase_moved`` (median >= ``threshold``) and ``step_movement_layers``
    ({layer: {"median", "max"}})."""
    if not before:
        raise WalkError("step_movement: no switched layer to measure")
    per_layer, allr = {}, []
    for name, s0 in before.items():
        r = (after[name].detach().double().cpu() / s0.detach().double().cpu() - 1.0).abs()
        r = r.reshape(-1).numpy()
        per_layer[name] = {"median": float(np.median(r)), "max": float(r.max())}
        allr.append(r)
    r = np.concatenate(allr)
    median = float(np.median(r))
    return {"step_median": median, "step_max": float(r.max()),
            "scale_phase_moved": bool(median >= threshold), "step_movement_layers": per_layer}


def split_steps(steps: int, per_epoch: int) -> tuple[int, int]:
    """``(epochs, steps per epoch)`` for :func:`hmqat.train.fit` that train exactly ``steps``
    optimizer steps with at most ``per_epoch`` (the loader's length) per epoch, in the fewest
    epochs: fit checkpoints after every epoch, so a phase resumes at an epoch boundary."""
    if not _is_int(steps) or steps < 1:
        raise WalkError(f"split_steps: steps={steps!r}; use an int >= 1")
    if not _is_int(per_epoch) or per_epoch < 1:
        raise WalkError(f"split_steps: the training loader yields {per_epoch!r} batches per "
                        f"epoch; it needs at least one")
    for epochs in range(-(-steps // per_epoch), steps + 1):
        if steps % epochs == 0:
            return epochs, steps // epochs
    raise AssertionError("unreachable: epochs = steps always divides")   # pragma: no cover


def phase_configs(cfg: htrain.TrainConfig, walk: WalkConfig, per_epoch: int, *,
                  folder: str | Path | None = None
                  ) -> tuple[htrain.TrainConfig | None, htrain.TrainConfig]:
    """The TrainConfigs of one transition's two phases, derived from the QAT config ``cfg``:
    the scale-only phase (None when ``walk.scale_steps`` is 0; lr = step_lr = ``scale_lr``) and
    the fine-tune (lr ``finetune_lr`` or cfg.lr, cfg's step_lr), both without warm-up and
    ``split_steps`` long, checkpointed to ``folder/scale.pt`` and ``folder/finetune.pt``."""
    def ckpt(name: str) -> str | None:
        return None if folder is None else str(Path(folder) / name)

    scale = None
    if walk.scale_steps:
        e, m = split_steps(walk.scale_steps, per_epoch)
        scale = replace(cfg, lr=walk.scale_lr, step_lr=walk.scale_lr, warmup_steps=0, epochs=e,
                        max_steps_per_epoch=m, checkpoint=ckpt("scale.pt"))
    e, m = split_steps(walk.finetune_steps, per_epoch)
    finetune = replace(cfg, lr=walk.finetune_lr if walk.finetune_lr is not None else cfg.lr,
                       warmup_steps=0, epochs=e, max_steps_per_epoch=m,
                       checkpoint=ckpt("finetune.pt"))
    return scale, finetune


class _ConstantLR(Callback):
    """Holds every group's learning rate at base_lr × lr_mult: the loop sets the cosine rate
    before ``on_step_start``, which overrides it (the scale-only phase's constant rate)."""

    def on_step_start(self, state: TrainState) -> None:
        for g in state.optimizer.param_groups:
            g["lr"] = g["base_lr"] * g.get("lr_mult", 1.0)


class _EpochShift:
    """A training loader whose epoch ``e`` is the wrapped loader's epoch ``e + offset``: every
    phase of the walk reads the next epochs of the data stream, as one long run would, instead
    of replaying epoch 0 (data order still depends only on (seed, epoch), so resume is exact)."""

    def __init__(self, loader: Any, offset: int):
        self.loader, self.offset = loader, int(offset)
        self.batch_size = getattr(loader, "batch_size", None)

    def set_epoch(self, epoch: int) -> None:
        htrain._set_epoch(self.loader, epoch + self.offset)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return iter(self.loader)


def _shift(loader: Any, offset: int) -> Any:
    return loader if offset == 0 else _EpochShift(loader, offset)


def _is_step(name: str) -> bool:
    """A quantizer step Parameter, by the rule of :func:`hmqat.train.param_groups`."""
    return name.endswith(".step") or name == "step"


def scale_only_phase(qmodel: nn.Module, train_loader: Any, cfg: htrain.TrainConfig, *,
                     callbacks: Iterable[Callback] = (), device: Any = None,
                     run_info: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Train only the step sizes of ``qmodel`` for ``cfg``'s steps at a constant rate
    (``cfg.step_lr``): every other Parameter has ``requires_grad`` False during the phase, so
    :func:`hmqat.train.fit` builds an optimizer over the "steps" group alone. BatchNorm running
    statistics follow ``cfg.freeze_bn`` as in every phase. Returns fit's history."""
    frozen = [p for n, p in qmodel.named_parameters() if p.requires_grad and not _is_step(n)]
    for p in frozen:
        p.requires_grad_(False)
    try:
        return htrain.fit(qmodel, train_loader, None, cfg, callbacks=[_ConstantLR(), *callbacks],
                          device=device, run_info=run_info)
    finally:
        for p in frozen:
            p.requires_grad_(True)


def frontier_transition(qmodel: nn.Module, bit_config: Mapping[str, int], train_loader: Any,
                        cfg: htrain.TrainConfig, walk: WalkConfig, *,
                        folder: str | Path | None = None, epoch_offset: int = 0,
                        scale_callbacks: Iterable[Callback] = (),
                        finetune_callbacks: Iterable[Callback] = (), device: Any = None,
                        run_info: dict[str, Any] | None = None, label: str = "") -> dict[str, Any]:
    """One step of the frontier walk, in place on ``qmodel`` (the previous point's trained
    model; docs/method.md §5):

    1. :func:`switch_layers`: only the layers whose width changes get the new bits and the
       data re-init of their steps (Eq. T2);
    2. the scale-only phase (:func:`scale_only_phase`, ``walk.scale_steps`` steps at
       ``walk.scale_lr``) and its :func:`step_movement` over the switched layers' steps; a
       median below ``walk.moved_threshold`` warns (the phase has failed) and is recorded as
       ``scale_phase_moved=False``, it does not stop the walk;
    3. a full fine-tune of ``walk.finetune_steps`` steps (cosine).

    Both phases run :func:`hmqat.train.fit` with checkpoints in ``folder`` (see
    :func:`phase_configs`) and ``run_info`` as their identity, so an interrupted transition
    resumes; the phases read the loader's epochs from ``epoch_offset`` on. The torch seed is
    reset to ``cfg.seed`` before each phase. Returns the transition's record: changed layers
    and their old bits, the movement statistics (None without a scale phase), the phases'
    history (``phase`` = "scale" / "finetune"), ``steps`` and ``epochs`` spent.
    """
    walk = WalkConfig.from_value(walk)
    changed = switch_layers(qmodel, bit_config)
    layers = quant.quantized_layers(qmodel)
    before = {n: layers[n].weight_quantizer.step.detach().clone() for n in changed}
    scale_cfg, ft_cfg = phase_configs(cfg, walk, len(train_loader), folder=folder)
    info = dict(run_info or {})
    record: dict[str, Any] = {
        "changed_layers": list(changed), "bits_before": {n: o for n, (o, _) in changed.items()},
        "step_median": None, "step_max": None, "scale_phase_moved": None,
        "step_movement_layers": {}}
    history: list[dict[str, Any]] = []
    epochs = 0
    if scale_cfg is not None:
        seed_everything(cfg.seed)
        hist = scale_only_phase(qmodel, _shift(train_loader, epoch_offset), scale_cfg,
                                callbacks=scale_callbacks, device=device,
                                run_info={**info, "phase": "scale"})
        history += [{"phase": "scale", **h} for h in hist]
        epochs += scale_cfg.epochs
        if changed:
            record.update(step_movement(
                before, {n: layers[n].weight_quantizer.step for n in changed},
                walk.moved_threshold))
            if not record["scale_phase_moved"]:
                warnings.warn(
                    f"frontier walk {label!r}: the scale-only phase moved the switched layers' "
                    f"steps by a median of {record['step_median']:.3%} (max "
                    f"{record['step_max']:.3%}), below {walk.moved_threshold:.0%}: the phase has "
                    f"failed; raise walk.scale_lr (now {walk.scale_lr:g}) or walk.scale_steps "
                    f"(now {walk.scale_steps})", RuntimeWarning, stacklevel=2)
    seed_everything(cfg.seed)
    hist = htrain.fit(qmodel, _shift(train_loader, epoch_offset + epochs), None, ft_cfg,
                      callbacks=finetune_callbacks, device=device,
                      run_info={**info, "phase": "finetune"})
    history += [{"phase": "finetune", **h} for h in hist]
    epochs += ft_cfg.epochs
    record.update(history=history, steps=walk.scale_steps + walk.finetune_steps, epochs=epochs)
    return record
