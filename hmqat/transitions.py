"""Transition-aware fine-tuning: precision transitions, rounding oscillations, distillation.

docs/design.md §3 "Transition-aware fine-tuning of the scale factor" gives the abstract's phrase two
readings; both are :class:`hmqat.train.Callback` s that plug into :func:`hmqat.train.qat`
(docs/method.md explains each choice and its source):

* **Precision transitions** (docs/design.md §1 reading T4, §3.5), :class:`PrecisionTransition`: every quantized
  layer moves FP32 → 8 bit → its target bits over a schedule; at each change the step is
  re-initialised so that the clipping range carries over,

      s_new = s_old · Q_P(old) / Q_P(new)                                            (Eq. T1)

  or by an MSE-optimal re-init, and the step sizes' learning rate warms up linearly afterwards.
* **Rounding transitions** (Nagel et al. 2022; docs/design.md §1 reading T3, §3.5),
  :class:`OscillationTracker`: an oscillation is an integer change whose direction is opposite
  to the weight's previous change; its frequency is tracked with an EMA

      f_t = m · o_t + (1 − m) · f_{t−1}                                              (Eq. O1)

  and two remedies are offered, the dampening loss

      L_damp = λ(t) · ‖ s·w_int − clip(w, s·Q_N, s·Q_P) ‖²   (s, w_int detached)      (Eq. O2)

  and freezing: a weight whose f exceeds an annealed threshold is frozen to round(EMA of its
  integer) (Eq. O3).
* **Distillation** from the FP32 model (optional), :class:`Distillation`:

      L_kd = w · T² · KL(softmax(z_t/T) ‖ softmax(z_s/T))                             (Eq. D)

LSQ's own transition-aware step gradient (H1) is the quantizer itself (:mod:`hmqat.quant`), so
"plain LSQ" is simply QAT without these callbacks. :class:`Recipe` bundles every switch and
:func:`make_callbacks` turns it into callbacks:

    >>> from hmqat import train, transitions
    >>> recipe = transitions.Recipe(transitions=True, osc_freeze=True)
    >>> qmodel, hist = train.qat(fp32, config, train_loader, test_loader, cfg,
    ...                          callbacks=transitions.make_callbacks(recipe, teacher=fp32))
"""
from __future__ import annotations

import bisect
import copy
import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import quant
from .train import Callback, TrainState

__all__ = [
    "AGGREGATIONS",
    "DEFAULT_STAGES",
    "Distillation",
    "OscillationTracker",
    "PrecisionTransition",
    "Recipe",
    "RecipeError",
    "dampening_loss",
    "distillation_loss",
    "is_passthrough",
    "make_callbacks",
    "parse_stages",
    "ramp",
    "set_passthrough",
]

SCHEDULES: tuple[str, ...] = ("cosine", "linear")
AGGREGATIONS: tuple[str, ...] = ("sum", "mean", "kernel_mean")
STAGE_UNITS: tuple[str, ...] = ("fraction", "epoch")
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


def _choice(value: Any, choices: tuple[str, ...], what: str) -> str:
    if value not in choices:
        raise RecipeError(f"{what}={value!r} is not allowed; use one of {choices}")
    return value


def ramp(progress: float, start: float, final: float, *, begin: float = 0.0,
         kind: str = "cosine") -> float:
    """Annealed value at training ``progress`` ∈ [0, 1]: ``start`` until ``begin``, then
    to ``final`` at progress 1 (docs/design.md §3, "λ ramped up" / annealed threshold).

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


def _step_view(q: quant.LSQQuantizer, x: torch.Tensor) -> torch.Tensor:
    """The detached, clamped step of ``q`` broadcast against ``x`` (as hmqat.quant does)."""
    return quant.step_view(q.step.detach().clamp_min(quant.MIN_STEP), x, q.per_channel)


# --------------------------------------------------------------------------------------------
# FP32 pass-through of a quantizer (the "fp32" stage), without touching hmqat.quant
# --------------------------------------------------------------------------------------------
_PASS_ATTR = "_hmqat_passthrough"


def _passthrough_hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: Any
                      ) -> torch.Tensor:
    """Forward hook: return the quantizer's input unchanged (FP32; the step gets no gradient)."""
    return inputs[0]


def set_passthrough(quantizer: quant.LSQQuantizer, enabled: bool) -> None:
    """Make ``quantizer`` return its input unchanged (FP32 stage) or quantize again.

    Implemented as a removable forward hook that replaces the output with the input, so
    :mod:`hmqat.quant` is untouched; the discarded fake-quant output gives the step no gradient.
    """
    handle = getattr(quantizer, _PASS_ATTR, None)
    if enabled and handle is None:
        setattr(quantizer, _PASS_ATTR, quantizer.register_forward_hook(_passthrough_hook))
    elif not enabled and handle is not None:
        handle.remove()
        setattr(quantizer, _PASS_ATTR, None)


def is_passthrough(quantizer: quant.LSQQuantizer) -> bool:
    """True while ``quantizer`` is in FP32 pass-through (see :func:`set_passthrough`)."""
    return getattr(quantizer, _PASS_ATTR, None) is not None


# --------------------------------------------------------------------------------------------
# Precision transitions (H4)
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
    if isinstance(label, bool) or not isinstance(label, numbers.Integral) \
            or int(label) not in quant.SUPPORTED_BITS:
        raise RecipeError(f"stages[{index}] bits = {label!r}; use 'fp32', 'target' or an int "
                          f"in {quant.SUPPORTED_BITS}")
    return int(label)


def parse_stages(stages: Iterable[Sequence[Any]], unit: str = "fraction"
                 ) -> tuple[tuple[float | int, int | str], ...]:
    """Validate a precision schedule ``[(at, bits), ...]`` (docs/design.md §3 "Precision transitions").

    ``at`` is a fraction of all training steps in [0, 1) (``unit="fraction"``) or an epoch
    index (``unit="epoch"``); the first stage starts at 0 and ``at`` strictly increases. ``bits``
    is ``"fp32"`` (first stage only), an int (an intermediate width, applied as
    max(bits, target) so no layer goes below its target) or ``"target"`` (required, last).
    """
    _choice(unit, STAGE_UNITS, "stage_unit")
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
            raise RecipeError(f"stages[{i}] at = {at!r}; with stage_unit='fraction' it must be "
                              f"in [0, 1) (a fraction of all training steps)")
        if unit == "epoch" and (float(at) < 0 or not float(at).is_integer()):
            raise RecipeError(f"stages[{i}] at = {at!r}; with stage_unit='epoch' it must be an "
                              f"epoch index >= 0")
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


class PrecisionTransition(Callback):
    """Staged precision schedule FP32 → 8 bit → target (docs/design.md §3.5, reading T4).

    Args:
        stages: ``[(at, bits), ...]``, see :func:`parse_stages`. Default
            ``((0, "fp32"), (0.1, 8), (0.3, "target"))``.
        unit: ``"fraction"`` (of all steps; stage k starts at step floor(at·total)) or
            ``"epoch"`` (stage k starts at the first step of epoch ``at``).
        reinit: step re-init at a change between two quantized widths: ``"range"`` (Eq. T1,
            the clipping range s·Q_P carries over), ``"mse"`` or ``"lsq"`` (re-initialised from
            the current weight; activations from the next training batch).
        fp32_exit: step init when a layer leaves the FP32 stage (its weights have moved, so the
            default re-initialises, ``"mse"``); ``"range"`` carries the range of the step set
            when the model was quantized.
        warmup: after every transition the "steps" param group's ``lr_mult`` rises linearly
            (k+1)/(N+1), k = 0..N−1, then 1; N = warmup in ``unit`` (fraction of all steps or
            epochs), rounded to steps. 0 disables it.
        activations: also move the input-activation quantizers (target = their a_bits).

    The step optimizer momentum of a changed quantizer is reset (it belonged to another grid).
    ``events`` lists the transitions applied; the state is checkpointed by :func:`train.fit`.
    """

    def __init__(self, stages: Iterable[Sequence[Any]] = DEFAULT_STAGES, *,
                 unit: str = "fraction", reinit: str = "range", fp32_exit: str = "mse",
                 warmup: float = 0.02, activations: bool = True):
        self.stages = parse_stages(stages, unit)
        self.unit = unit
        self.reinit = _choice(reinit, quant.REINIT_METHODS, "reinit")
        self.fp32_exit = _choice(fp32_exit, quant.REINIT_METHODS, "fp32_exit")
        if not _is_number(warmup) or warmup < 0:
            raise RecipeError(f"warmup={warmup!r}; it must be a number >= 0 (in {unit} units)")
        self.warmup = float(warmup)
        self.activations = bool(activations)
        self.targets: dict[str, int] = {}
        self.applied = -1
        self.events: list[dict[str, Any]] = []
        self._starts: list[int] = []
        self._warmup_steps = 0

    # -- schedule ------------------------------------------------------------------------------
    def stage_starts(self, steps_per_epoch: int, epochs: int) -> list[int]:
        """The global step at which each stage begins."""
        total = steps_per_epoch * epochs
        if self.unit == "fraction":
            return [int(math.floor(at * total)) for at, _ in self.stages]
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

    def lr_mult(self, step: int) -> float:
        """Warm-up factor of the "steps" group at ``step`` (1 outside warm-ups)."""
        k = self.stage_at(step)
        n = self._warmup_steps
        if k <= 0 or n == 0 or self.stages[k][1] == "fp32":
            return 1.0
        j = step - self._starts[k]
        return 1.0 if j >= n else (j + 1) / (n + 1)

    # -- model access --------------------------------------------------------------------------
    def _quantizers(self, model: nn.Module
                    ) -> dict[str, tuple[quant.LSQQuantizer, torch.Tensor | None]]:
        out: dict[str, tuple[quant.LSQQuantizer, torch.Tensor | None]] = {}
        for name, layer in quant.quantized_layers(model).items():
            out[f"{name}.weight_quantizer"] = (layer.weight_quantizer, layer.weight)
            if self.activations and layer.act_quantizer is not None:
                out[f"{name}.act_quantizer"] = (layer.act_quantizer, None)
        return out

    def _set_lr_mult(self, state: TrainState, step: int) -> None:
        for g in state.optimizer.param_groups:
            if g.get("name") == "steps":
                g["lr_mult"] = self.lr_mult(step)

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
        self._starts = self.stage_starts(state.steps_per_epoch, state.config.epochs)
        scale = state.total_steps if self.unit == "fraction" else state.steps_per_epoch
        self._warmup_steps = int(round(self.warmup * scale))
        if self.warmup > 0:
            self._warmup_steps = max(self._warmup_steps, 1)
        if self.applied >= 0:      # resumed: bits are not in the state_dict, the steps are
            self._restore(qs)
        self._set_lr_mult(state, state.step)

    def _restore(self, qs: Mapping[str, tuple[quant.LSQQuantizer, torch.Tensor | None]]) -> None:
        """Put every quantizer back at the applied stage's width, keeping its loaded step."""
        label = self.stages[self.applied][1]
        for key, (q, _) in qs.items():
            bits = self.bits_for(label, self.targets[key])
            set_passthrough(q, bits is None)
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

    def _apply(self, state: TrainState, k: int) -> None:
        """Move every quantizer to stage ``k`` (Eq. T1 or a re-init) and reset its step momentum."""
        label = self.stages[k][1]
        changed = 0
        for key, (q, weight) in self._quantizers(state.model).items():
            new = self.bits_for(label, self.targets[key])
            old = None if is_passthrough(q) else q.bits
            if new == old:
                continue
            changed += 1
            if new is None:
                set_passthrough(q, True)
                continue
            mode = self.fp32_exit if old is None else self.reinit
            set_passthrough(q, False)
            if mode == "range":
                q.set_bits(new, "range")
            else:
                q.set_bits(new, mode, x=None if weight is None else weight.detach())
            state.optimizer.state.pop(q.step, None)
        self.events.append({"step": state.step, "epoch": state.epoch, "stage": k,
                            "bits": label, "changed": changed})

    def on_after_step(self, state: TrainState) -> None:
        self._set_lr_mult(state, state.step + 1)   # the loop reads lr_mult before the next step

    def on_epoch_end(self, state: TrainState, metrics: dict[str, Any]) -> None:
        metrics["stage"] = str(self.stages[max(self.applied, 0)][1])

    def state_dict(self) -> dict[str, Any]:
        return {"targets": dict(self.targets), "applied": self.applied,
                "events": [dict(e) for e in self.events]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.targets = dict(state["targets"])
        self.applied = int(state["applied"])
        self.events = [dict(e) for e in state["events"]]


# --------------------------------------------------------------------------------------------
# Rounding oscillations (H3, Nagel et al. 2022)
# --------------------------------------------------------------------------------------------
def dampening_loss(weight: torch.Tensor, quantizer: quant.LSQQuantizer,
                   aggregation: str = "kernel_mean") -> torch.Tensor:
    """Eq. O2 without λ: ‖s·w_int − clip(w, s·Q_N, s·Q_P)‖² (Nagel et al. 2022, §4a).

    The target s·w_int = q(w) and the step are detached, so the gradient pulls the latent
    weights toward their bin centres and leaves the step alone. ``aggregation``: "sum", "mean"
    or "kernel_mean" (sum over output channels, mean over the rest; the reference code's default).
    """
    _choice(aggregation, AGGREGATIONS, "dampen_aggregation")
    s = _step_view(quantizer, weight)
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

    Nagel et al. 2022 (reference code Qualcomm-AI-research/oscillations-qat):

    * After every optimizer step each tracked layer's integer codes round(clip(w/s)) are
      compared with the previous ones. An oscillation: the code changes AND the change's sign is
      opposite to the weight's previous change (the first change is not one). Frequency:
      f_t = m·o_t + (1 − m)·f_{t−1}. A layer's state resets when its bit width changes or it
      is in the FP32 stage of a :class:`PrecisionTransition`.
    * ``dampen``: adds λ(t)·Σ_layers dampening_loss (every quantized layer), λ ramped from
      ``dampen_weight`` to ``dampen_weight_final`` from progress ``dampen_start`` on.
    * ``freeze``: in layers with bits <= ``max_bits``, a weight with f > threshold(t) is frozen
      at round(EMA of its integer codes); the threshold is 0 (off) before ``freeze_start``, then
      anneals from ``freeze_threshold`` to ``freeze_threshold_final``. A frozen weight gets a
      zero gradient (tensor hook), zero momentum, and after every optimizer step is reset to
      s·k, so its integer code k never changes and the saved model alone reproduces it.
    * ``log``: one row per tracked layer and epoch (layer, bits, n, osc_frac = share of weights
      with f > report_threshold, osc_rate = oscillations per weight per step in the epoch,
      frozen_frac); ``metrics`` gets the weight-averaged osc_frac/osc_rate/frozen_frac.
    """

    def __init__(self, momentum: float = 0.01, *, dampen: bool = False,
                 dampen_weight: float = 0.0, dampen_weight_final: float = 0.1,
                 dampen_start: float = 0.25, dampen_schedule: str = "cosine",
                 dampen_aggregation: str = "kernel_mean", freeze: bool = False,
                 freeze_threshold: float = 0.1, freeze_threshold_final: float = 0.03,
                 freeze_start: float = 0.25, freeze_schedule: str = "cosine", max_bits: int = 4,
                 report_threshold: float | None = None):
        _check_oscillation_options(momentum, dampen_weight, dampen_weight_final, dampen_start,
                                   dampen_schedule, dampen_aggregation, freeze_threshold,
                                   freeze_threshold_final, freeze_start, freeze_schedule,
                                   max_bits, report_threshold)
        self.momentum = float(momentum)
        self.dampen, self.freeze = bool(dampen), bool(freeze)
        self.dampen_weight = float(dampen_weight)
        self.dampen_weight_final = float(dampen_weight_final)
        self.dampen_start, self.dampen_schedule = float(dampen_start), dampen_schedule
        self.dampen_aggregation = dampen_aggregation
        self.freeze_threshold = float(freeze_threshold)
        self.freeze_threshold_final = float(freeze_threshold_final)
        self.freeze_start, self.freeze_schedule = float(freeze_start), freeze_schedule
        self.max_bits = int(max_bits)
        self.report_threshold = float(momentum if report_threshold is None else report_threshold)
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
            s = _step_view(layer.weight_quantizer, w)
            w.copy_(torch.where(tr.frozen, tr.frozen_int.to(w.dtype) * s, w))
            if optimizer is not None:
                buf = optimizer.state.get(w, {}).get("momentum_buffer")
                if buf is not None:
                    buf.masked_fill_(tr.frozen, 0.0)

    def _ensure_hook(self, name: str, layer: nn.Module) -> None:
        """Gradient hook zeroing the frozen weights' gradient (task, dampening and KD terms)."""
        if name in self._hooks:
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
                if not is_passthrough(m.weight_quantizer)}

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


def _check_oscillation_options(momentum, dampen_weight, dampen_weight_final, dampen_start,
                               dampen_schedule, dampen_aggregation, freeze_threshold,
                               freeze_threshold_final, freeze_start, freeze_schedule, max_bits,
                               report_threshold) -> None:
    """Validate the OscillationTracker options (one RecipeError naming the option)."""
    if not _is_number(momentum) or not 0 < momentum < 1:
        raise RecipeError(f"osc_momentum={momentum!r}; the EMA momentum m must be in (0, 1), "
                          f"e.g. 0.01 (Nagel et al.)")
    for key, v in (("dampen_weight", dampen_weight), ("dampen_weight_final", dampen_weight_final)):
        if not _is_number(v) or v < 0:
            raise RecipeError(f"{key}={v!r}; λ must be a number >= 0")
    for key, v in (("dampen_start", dampen_start), ("freeze_start", freeze_start)):
        if not _is_number(v) or not 0 <= v < 1:
            raise RecipeError(f"{key}={v!r}; it is a fraction of training in [0, 1)")
    _choice(dampen_schedule, SCHEDULES, "dampen_schedule")
    _choice(freeze_schedule, SCHEDULES, "freeze_schedule")
    _choice(dampen_aggregation, AGGREGATIONS, "dampen_aggregation")
    for key, v in (("freeze_threshold", freeze_threshold),
                   ("freeze_threshold_final", freeze_threshold_final)):
        if not _is_number(v) or not 0 < v <= 1:
            raise RecipeError(f"{key}={v!r}; a frequency threshold must be in (0, 1]")
        if v < 2 * momentum:
            raise RecipeError(f"{key}={v!r} is below 2 x osc_momentum ({2 * momentum:g}); a "
                              f"single oscillation would freeze a weight. Nagel et al.: the "
                              f"threshold should be at least 2-3x the momentum")
    if isinstance(max_bits, bool) or not isinstance(max_bits, numbers.Integral) \
            or int(max_bits) not in quant.SUPPORTED_BITS:
        raise RecipeError(f"freeze_max_bits={max_bits!r}; use an int in {quant.SUPPORTED_BITS}")
    if report_threshold is not None and (not _is_number(report_threshold)
                                         or not 0 < report_threshold < 1):
        raise RecipeError(f"osc_report_threshold={report_threshold!r}; use a frequency in "
                          f"(0, 1) or None (= osc_momentum)")


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
    """Knowledge distillation from the FP32 model (Eq. D); off in the default recipe.

    The teacher is deep-copied, kept in eval mode without gradients, moved to the student's
    device, and run on ``state.inputs`` (the batch the student just saw).
    """

    def __init__(self, teacher: nn.Module, temperature: float = 4.0, weight: float = 1.0):
        if not isinstance(teacher, nn.Module):
            raise RecipeError(f"distillation needs the FP32 teacher model (an nn.Module), got "
                              f"{type(teacher).__name__}; pass make_callbacks(recipe, "
                              f"teacher=fp32_model)")
        _check_distill(temperature, weight)
        self.teacher = copy.deepcopy(teacher).eval().requires_grad_(False)
        self.temperature, self.weight = float(temperature), float(weight)

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


def _check_distill(temperature: Any, weight: Any) -> None:
    if not _is_number(temperature) or temperature <= 0:
        raise RecipeError(f"distill_temperature={temperature!r}; it must be > 0, e.g. 4")
    if not _is_number(weight) or weight < 0:
        raise RecipeError(f"distill_weight={weight!r}; it must be >= 0")


# --------------------------------------------------------------------------------------------
# Recipe
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    """Every switch of transition-aware fine-tuning (docs/design.md §3); defaults = plain LSQ (H1).

    Precision transitions (H4): ``transitions``, ``stages``, ``stage_unit``, ``reinit``,
    ``fp32_exit``, ``step_warmup``, ``transition_activations`` (see :class:`PrecisionTransition`).
    Rounding oscillations (H3): ``osc_track`` (log only), ``osc_dampen``, ``osc_freeze`` and their
    hyper-parameters (see :class:`OscillationTracker`). Distillation: ``distill``,
    ``distill_temperature``, ``distill_weight``. Bad values raise :class:`RecipeError`;
    ``Recipe.from_dict`` also rejects unknown keys (YAML typos).
    """

    transitions: bool = False
    stages: tuple = DEFAULT_STAGES
    stage_unit: str = "fraction"
    reinit: str = "range"
    fp32_exit: str = "mse"
    step_warmup: float = 0.02
    transition_activations: bool = True
    osc_track: bool = False
    osc_dampen: bool = False
    osc_freeze: bool = False
    osc_momentum: float = 0.01
    osc_report_threshold: float | None = None
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
    distill: bool = False
    distill_temperature: float = 4.0
    distill_weight: float = 1.0

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.type in ("bool",) and not isinstance(getattr(self, f.name), bool):
                raise RecipeError(f"{f.name}={getattr(self, f.name)!r}; use true or false")
        object.__setattr__(self, "stages", parse_stages(self.stages, self.stage_unit))
        _choice(self.reinit, quant.REINIT_METHODS, "reinit")
        _choice(self.fp32_exit, quant.REINIT_METHODS, "fp32_exit")
        if not _is_number(self.step_warmup) or self.step_warmup < 0:
            raise RecipeError(f"step_warmup={self.step_warmup!r}; it must be >= 0 (in "
                              f"stage_unit units)")
        _check_oscillation_options(self.osc_momentum, self.dampen_weight,
                                   self.dampen_weight_final, self.dampen_start,
                                   self.dampen_schedule, self.dampen_aggregation,
                                   self.freeze_threshold, self.freeze_threshold_final,
                                   self.freeze_start, self.freeze_schedule,
                                   self.freeze_max_bits, self.osc_report_threshold)
        _check_distill(self.distill_temperature, self.distill_weight)

    @classmethod
    def from_dict(cls, params: Mapping[str, Any] | None) -> "Recipe":
        """A Recipe from a params-YAML dict; unknown keys are an error naming them."""
        params = dict(params or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise RecipeError(f"unknown recipe key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**params)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (stages as lists); ``Recipe.from_dict(r.to_dict()) == r``."""
        d = asdict(self)
        d["stages"] = [list(s) for s in self.stages]
        return d

    def describe(self) -> str:
        """One line for tables, e.g. ``LSQ + transitions(fp32@0→8@0.1→target@0.3, range)``."""
        parts = ["LSQ"]
        if self.transitions:
            sched = "→".join(f"{b}@{a:g}" for a, b in self.stages)
            parts.append(f"transitions({sched} {self.stage_unit}, {self.reinit})")
        if self.osc_dampen:
            parts.append(f"dampen(λ {self.dampen_weight:g}→{self.dampen_weight_final:g})")
        if self.osc_freeze:
            parts.append(f"freeze(f>{self.freeze_threshold:g}→{self.freeze_threshold_final:g}, "
                         f"≤{self.freeze_max_bits}b)")
        if self.distill:
            parts.append(f"KD(T={self.distill_temperature:g}, w={self.distill_weight:g})")
        return " + ".join(parts)


def make_callbacks(recipe: Recipe | Mapping[str, Any] | None,
                   teacher: nn.Module | None = None) -> list[Callback]:
    """The callbacks of ``recipe`` for :func:`hmqat.train.qat`, in a fixed order:
    PrecisionTransition, OscillationTracker (if tracking, dampening or freezing), Distillation.
    Plain LSQ (the default Recipe) gives no callbacks. ``teacher`` (the FP32 model) is needed
    only when ``recipe.distill``. Build new callbacks for every run (they hold run state)."""
    if recipe is None or isinstance(recipe, Mapping):
        recipe = Recipe.from_dict(recipe)
    if not isinstance(recipe, Recipe):
        raise RecipeError(f"make_callbacks needs a Recipe or a dict, got {type(recipe).__name__}")
    cbs: list[Callback] = []
    if recipe.transitions:
        cbs.append(PrecisionTransition(recipe.stages, unit=recipe.stage_unit,
                                       reinit=recipe.reinit, fp32_exit=recipe.fp32_exit,
                                       warmup=recipe.step_warmup,
                                       activations=recipe.transition_activations))
    if recipe.osc_track or recipe.osc_dampen or recipe.osc_freeze:
        cbs.append(OscillationTracker(
            recipe.osc_momentum, dampen=recipe.osc_dampen, dampen_weight=recipe.dampen_weight,
            dampen_weight_final=recipe.dampen_weight_final, dampen_start=recipe.dampen_start,
            dampen_schedule=recipe.dampen_schedule,
            dampen_aggregation=recipe.dampen_aggregation, freeze=recipe.osc_freeze,
            freeze_threshold=recipe.freeze_threshold,
            freeze_threshold_final=recipe.freeze_threshold_final,
            freeze_start=recipe.freeze_start, freeze_schedule=recipe.freeze_schedule,
            max_bits=recipe.freeze_max_bits, report_threshold=recipe.osc_report_threshold))
    if recipe.distill:
        if teacher is None:
            raise RecipeError("recipe.distill is on but no teacher was given; call "
                              "make_callbacks(recipe, teacher=fp32_model)")
        cbs.append(Distillation(teacher, recipe.distill_temperature, recipe.distill_weight))
    return cbs
