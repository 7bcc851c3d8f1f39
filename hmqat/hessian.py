"""Per-layer Hutchinson traces of the loss Hessian, with standard errors (docs/design.md §3 "Sensitivity").

Equations (L = mean loss over the calibration set, BN in eval mode so L is a mean of per-sample
losses and the Hessian of the whole set is the size-weighted mean of the batch Hessians):

    Tr(H_ii) = E_v[ v_iᵀ (H v)_i ],  v Rademacher (entries ±1)                (Eq. H1, Hutchinson)
    T̄_i      = Tr(H_ii) / n_i                                               (Eq. H2, average trace)
    H        = Σ_b w_b H_b,  w_b = n_b / N                                   (Eq. H3)
    T̂_i      = Σ_b w_b · mean_k x_ibk,   x_ibk = v_ibkᵀ (H_b v_ibk)_i        (Eq. H4, stratified mean)
    SE_i²    = Σ_b w_b² · s²_ib / r_ib  (s²_ib: sample variance over the r_ib probes of batch b)
    stop when SE_i / |T̂_i| <= tol for every layer (after min_probes), or at max_probes.

Every (micro-)batch b is a stratum that gets the same number of probes, each probe drawn
independently, so the calibration-set trace is estimated without data-sampling variance and the SE
measures the probe noise only. The estimand is the trace of the Hessian of the mean loss over
*these* images, whatever the micro-batching; how well they represent the data set is the caller's
choice of ``n_samples``. Eq. H3 holds only for a per-sample mean criterion, so a summed or
class-weighted loss is refused up front (:func:`check_criterion`), as are NaN/inf weights.

Measured choices (pretrained ResNet-20, CIFAR-10 JPEG mirror, 2-core shared CPU, 1 thread;
``benchmarks/hessian_traces.py`` reproduces the numbers in results/bench/hessian_traces.txt):

* Independent probes per batch (stratified), not one probe shared by all batches (PyHessian's
  dataloader mode): a shared probe's errors are correlated across batches, so a pass over the data
  yields one sample instead of n_batches (an exploratory run on 16 batches of 128: ≈10× fewer
  passes for the worst layer).
  Shared-probe means over a few probes are also skewed low: vᵀHv = Σ_k λ_k (u_kᵀv)² + … is
  right-skewed when outlier eigenvalues carry much of the trace.
* ``probe="layer"`` (default): one HVP per layer, v and the second backward restricted to that
  layer's weights. docs/design.md §3's single HVP over all layers (``probe="joint"``) gives every block at
  once, but each block's sample then carries the cross-block terms v_iᵀ H_ij v_j of every other
  layer: 5–67× (median ≈12×) more variance per sample, far more than the ≈5× HVP time of
  per-layer probes (a late layer's second backward stops at that layer, so it is cheap).
* ``micro_batch="auto"`` = 16 images on CPU: the per-sample variance falls roughly like 1/B only
  below ≈16–32 images (the probe noise of the block structure dominates above), while the time is
  linear in B, so batches of 16 reach the target ≈2× faster than batches of 128 (8 and 16 tie).
  On other devices "auto" keeps the caller's batches (small batches waste a GPU; not measured).
* One first-order graph (create_graph) per batch serves all of that batch's HVPs (≈1.4× per HVP).
  Several probes per backward (is_grads_batched / vmap) and channels_last were not faster here.
* Converged layers stop being probed; each sweep schedules 0.8× the probes the current SE predicts
  (SE ∝ 1/sqrt(samples)), so few sweeps are needed and the overshoot is small.
* Sequential stopping on an estimated SE has the usual small selection effect; the estimate
  matches exact block traces on small nets (tests/test_hessian.py).
* Activations without a second derivative in autograd (``nn.Hardsigmoid``: aten has no
  derivative for ``hardsigmoid_backward``; MobileNetV3's and other squeeze-excitation blocks use
  it) are swapped, for the measurement only, for ``relu6(x + 3) / 6``: the same values, and the
  same Hessian (a piecewise-linear function has second derivative 0 between its kinks) — see
  :func:`twice_differentiable`. Any other op without a double backward raises one HessianError
  naming the op and the fix.

For networks whose logits are piecewise linear in each layer's weights (ReLU, eval-mode BN,
conv, linear, pooling, residual sums; ResNet-20 among them), :func:`gauss_newton_traces`
computes the same estimand exactly, without probes, from C vector-Jacobian products per image
(H_ii = J_iᵀΛJ_i, Eqs. H5–H7; it checks the identity first and refuses other models).

    >>> from hmqat import data, hessian, models
    >>> model = models.create_model("resnet20", pretrained=True)
    >>> calib = data.calibration_batches(data.load_cifar10(), n_samples=2048, batch_size=256)
    >>> traces = hessian.layer_traces(model, calib, tol=0.05, cache_dir="results/quick/cache")
    >>> traces[["avg_trace", "avg_trace_se", "rel_se", "probes"]]
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import numbers
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn

from . import distributed as hdist
from . import runtime
from .models import LayerInfo, quantizable_layers
from .train import first_nonfinite

__all__ = [
    "CPU_MICRO_BATCH",
    "CRITERION_RTOL",
    "PROBE_MODES",
    "GN_AUTO_MAX_OUTPUTS",
    "GN_CHECK_RTOL",
    "GN_FIRST_ROUND",
    "GN_MAX_ELEMENTS",
    "HessianError",
    "METHODS",
    "NotPiecewiseLinearError",
    "cache_key",
    "check_batches",
    "check_criterion",
    "check_finite_model",
    "gauss_newton_traces",
    "group_product",
    "hessian_vector_product",
    "layer_traces",
    "rademacher",
    "select_layers",
    "twice_differentiable",
]

log = logging.getLogger(__name__)

VERSION = "hmqat.hessian/1"
PROBE_MODES = ("layer", "joint")
METHODS = ("hutchinson", "gauss_newton", "auto")   # layer_traces(method=...)
CPU_MICRO_BATCH = 16     # measured default on CPU (see module docstring)
_MIN_DOF = 8             # min_probes=None: smallest r with n_batches·(r-1) >= 8 (SE degrees of freedom)
_GROWTH = 0.8            # fraction of the predicted remaining probes scheduled in the next sweep
#: Largest |criterion(z, y) − mean_n criterion(z_n, y_n)| / scale that :func:`check_criterion`
#: accepts as rounding (float32 logits round at ~1e-7; a summed or class-weighted loss is off
#: by a factor or by O(1)).
CRITERION_RTOL = 1e-4
_CRITERION_IMAGES = 8    # images check_criterion compares batch and per-sample losses on
COLUMNS = ["n_params", "trace", "avg_trace", "avg_trace_se", "rel_se", "probes", "samples", "kind"]


class HessianError(ValueError):
    """Bad input to :func:`layer_traces`; the message names the offending value and the fix."""


class NotPiecewiseLinearError(HessianError):
    """:func:`gauss_newton_traces`' check failed: the logits are not piecewise linear in some
    layer's weights, so H_ii has a remainder beyond its Gauss-Newton block (Eq. H5)."""


# --------------------------------------------------------------------------------------------
# Vocabulary over lists of tensors (PyHessian style)
# --------------------------------------------------------------------------------------------
def rademacher(shape: torch.Size, generator: torch.Generator,
               device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
               ) -> torch.Tensor:
    """Random ±1 tensor of ``shape`` from ``generator`` (drawn on CPU, so results do not depend
    on the device). The probe distribution of Eq. H1."""
    v = torch.randint(0, 2, shape, generator=generator, dtype=dtype)
    return v.mul_(2).sub_(1).to(device)


def group_product(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> list[float]:
    """Blockwise inner products [⟨x_i, y_i⟩] (one number per layer, Eq. H1)."""
    return [float(torch.vdot(x.reshape(-1), y.reshape(-1))) for x, y in zip(xs, ys)]


def hessian_vector_product(grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
                           v: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """H v for the blocks ``params``: d(Σ_i g_i·v_i)/dθ by a second backward through ``grads``
    (computed with create_graph=True), keeping the graph for further probes. A block the gradient
    does not depend on gets a zero product."""
    live = [i for i, g in enumerate(grads) if g.requires_grad]
    out = [torch.zeros_like(p) for p in params]
    if not live:
        return out
    hv = torch.autograd.grad([grads[i] for i in live], list(params),
                             grad_outputs=[v[i] for i in live], retain_graph=True,
                             allow_unused=True)
    return [o if h is None else h for o, h in zip(out, hv)]


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------
def check_batches(batches: Iterable[Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Materialise ``batches`` as a list of (x, y) tensor pairs with matching, non-zero sizes."""
    if isinstance(batches, torch.Tensor) or batches is None:
        raise HessianError("batches must be a list of (x, y) pairs, e.g. "
                           "hmqat.data.calibration_batches(ds); got "
                           f"{type(batches).__name__}")
    out = []
    for i, batch in enumerate(batches):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2 \
                or not all(isinstance(t, torch.Tensor) for t in batch):
            raise HessianError(f"batches[{i}] must be an (x, y) pair of tensors; got "
                               f"{type(batch).__name__}")
        x, y = batch
        if x.shape[0] == 0 or x.shape[0] != y.shape[0]:
            raise HessianError(f"batches[{i}]: x has {x.shape[0]} samples and y has {y.shape[0]}; "
                               "each batch needs the same, non-zero number of inputs and targets")
        for what, t in (("x", x), ("y", y)):
            if t.is_floating_point():
                bad = int((~torch.isfinite(t)).sum())
                if bad:
                    raise HessianError(
                        f"batches[{i}]: {what} holds {bad} NaN/inf of {t.numel()} values, so "
                        "every trace would be NaN; fix the data pipeline that made them (decoding, "
                        "normalisation) or drop that batch")
        out.append((x, y))
    if not out:
        raise HessianError("batches is empty: pass at least one (x, y) calibration batch, e.g. "
                           "hmqat.data.calibration_batches(ds, n_samples=2048)")
    return out


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_settings(tol: float, max_probes: int, min_probes: int | None, probe: str,
                    micro_batch: int | str | None) -> None:
    """Raise HessianError for a non-positive tol, bad probe counts, mode or micro-batch."""
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise HessianError(f"tol={tol!r}: the target relative standard error must be a number > 0 "
                           "(e.g. 0.05 for 5 %)")
    if not _is_int(max_probes) or max_probes < 2:
        raise HessianError(f"max_probes={max_probes!r}: need an int >= 2 (probes per batch; two "
                           "are needed for a standard error)")
    if min_probes is not None and (not _is_int(min_probes) or not 2 <= min_probes <= max_probes):
        raise HessianError(f"min_probes={min_probes!r}: need an int with 2 <= min_probes <= "
                           f"max_probes={max_probes}, or None for the automatic minimum")
    if probe not in PROBE_MODES:
        raise HessianError(f"probe={probe!r}: use one of {PROBE_MODES}")
    if not (micro_batch is None or micro_batch == "auto"
            or (_is_int(micro_batch) and micro_batch >= 1)):
        raise HessianError(f"micro_batch={micro_batch!r}: use 'auto', None (keep the batches) or "
                           "an int >= 1")


def check_finite_model(model: nn.Module, where: str = "layer_traces") -> None:
    """Raise HessianError naming the first parameter or floating-point buffer (BN running
    statistics) that holds NaN/inf: the traces of such a model are NaN, and finding that out
    after the whole measurement would blame the traces instead of the weight."""
    bad = first_nonfinite(model)
    if bad is not None:
        raise HessianError(
            f"{where}: the model is not finite: {bad}, so every trace would be NaN; nothing was "
            "measured. Load a finite checkpoint (the run that wrote this one diverged, or the "
            "file is damaged) or find the step that wrote the NaN/inf")


def _loss_settings(fn: nn.Module) -> dict[str, Any]:
    """The settings of a loss module that its repr hides: plain attributes (reduction,
    label_smoothing, ignore_index, ...) that differ from a default-built instance of its type,
    and its tensor buffers (class weights, pos_weight) as "<shape> sha256:<12 hex>". Only
    torch.nn's own losses are built for the comparison; a user's module lists every attribute."""
    ref: Any = None
    if type(fn).__module__.startswith("torch.nn"):
        try:
            ref = type(fn)()
        except TypeError:       # a torch module that needs arguments: list every attribute
            ref = None
    out: dict[str, Any] = {}
    for k, v in vars(fn).items():
        if k.startswith("_") or k == "training" or not isinstance(v, (bool, int, float, str)):
            continue
        if ref is None or getattr(ref, k, object()) != v:
            out[k] = v
    for k, b in fn.named_buffers():
        h = hashlib.sha256()
        runtime.hash_tensor(h, b)
        out[k] = f"<{list(b.shape)} sha256:{h.hexdigest()[:12]}>"
    return out


def _criterion_name(fn: Callable) -> str:
    """A readable name for a criterion in messages: nn.CrossEntropyLoss(reduction='sum',
    weight=<[10] ...>) for a loss module (the settings its repr hides), else its qualified name."""
    if isinstance(fn, nn.Module):
        extra = ", ".join(f"{k}={v!r}" if not str(v).startswith("<") else f"{k}={v}"
                          for k, v in _loss_settings(fn).items())
        return f"nn.{type(fn).__name__}({extra})" if type(fn).__module__.startswith("torch.nn") \
            else f"{type(fn).__qualname__}({extra})"
    return getattr(fn, "__qualname__", type(fn).__qualname__)


def _mean_fix(fn: Callable) -> str:
    """The criterion to pass instead of a non-mean one (the fix part of check_criterion)."""
    if isinstance(fn, (nn.CrossEntropyLoss, nn.NLLLoss)):
        return f"pass nn.{type(fn).__name__}() (reduction='mean', no class weights)"
    if isinstance(fn, nn.Module) and hasattr(fn, "reduction"):
        return f"pass nn.{type(fn).__name__}(reduction='mean')" \
            if type(fn).__module__.startswith("torch.nn") else "set reduction='mean'"
    return ("pass a criterion that returns the mean over the batch of per-sample losses (for a "
            "summed loss: lambda z, y: loss(z, y) / len(y))")


def _model_logits(model: nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The model's outputs for ``x`` in eval mode without gradient (train/eval flags restored)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            return model(x.to(device))
    finally:
        for m, training in modes:
            m.training = training


def check_criterion(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                    device: torch.device, where: str = "layer_traces") -> int:
    """Refuse a criterion that is not a per-sample mean; return the model's number of outputs.

    Both trace paths measure one estimand, the Hessian of the *mean* loss over the calibration
    images, (1/N) Σ_n ℓ_n: Hutchinson as Σ_b (n_b/N) H_b over micro-batch losses (Eq. H3),
    Gauss-Newton as (1/N) Σ_n J_nᵀΛ_nJ_n from each image's loss alone (Eq. H6). That holds only
    when the criterion's value on a batch is the mean of its values on the single samples. A
    summed loss makes Eq. H3 give (micro-batch/N) × the summed loss's Hessian, and a
    class-weighted cross-entropy (Σ w_y ℓ / Σ w_y) has a normaliser that depends on each
    micro-batch's labels; neither is the same number on the two paths or for two micro-batch
    sizes. Checked by the loss's settings (reduction 'sum'/'none', CE/NLL ``weight``) and, for
    any criterion, on the first :data:`_CRITERION_IMAGES` images: criterion(z, y) against the
    mean of criterion(z[n:n+1], y[n:n+1]) within :data:`CRITERION_RTOL`. Raises HessianError
    naming the loss, what is wrong with it and the criterion to pass instead."""
    name = _criterion_name(criterion)
    head = (f"{where}: criterion {name} is not a per-sample mean loss, and the traces are those "
            "of the mean loss over the calibration images (docs/design.md §3.2)")
    reduction = getattr(criterion, "reduction", "mean") if isinstance(criterion, nn.Module) \
        else "mean"
    if reduction in ("sum", "none"):
        why = ("it sums over the samples, so each micro-batch's Hessian would be its size times "
               "the mean's and the result would depend on micro_batch" if reduction == "sum"
               else "it returns one loss per sample, not a number to differentiate twice")
        raise HessianError(f"{head}: reduction={reduction!r}: {why}; {_mean_fix(criterion)}")
    if isinstance(criterion, (nn.CrossEntropyLoss, nn.NLLLoss)) \
            and getattr(criterion, "weight", None) is not None:
        raise HessianError(
            f"{head}: its class weights make it the weighted mean Σ w_y·ℓ / Σ w_y, whose "
            "normaliser depends on each micro-batch's labels, so the two trace methods and two "
            f"micro-batch sizes would measure different things; {_mean_fix(criterion)}")
    xs, ys, n = [], [], 0
    for x, y in batches:
        xs.append(x[:_CRITERION_IMAGES - n])
        ys.append(y[:_CRITERION_IMAGES - n])
        n += xs[-1].shape[0]
        if n >= _CRITERION_IMAGES:
            break
    x, y = torch.cat(xs), torch.cat(ys).to(device)
    z = _model_logits(model, x, device)
    with torch.no_grad():
        loss = criterion(z, y)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            shape = list(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise HessianError(f"{head}: it returns {shape} for {n} images, not one number; "
                               f"{_mean_fix(criterion)}")
        per = torch.stack([criterion(z[k:k + 1], y[k:k + 1]).reshape(()) for k in range(n)])
    total, mean = float(loss), float(per.double().mean())
    if not (math.isfinite(total) and math.isfinite(mean)):
        raise HessianError(f"{where}: criterion {name} gives {total} on the first {n} "
                           "calibration images (finite logits): check the targets (e.g. labels "
                           "outside the model's classes or all equal to ignore_index)")
    scale = max(abs(total), float(per.double().abs().mean()), 1e-30)
    if n >= 2 and abs(total - mean) > CRITERION_RTOL * scale:
        why = ("it sums over the samples" if abs(total - n * mean) <= CRITERION_RTOL * n * scale
               else "it is not the mean of its per-sample values (a weighted mean, or a loss "
                    "that couples the samples)")
        raise HessianError(f"{head}: on the first {n} images it gives {total:.6g}, the mean of "
                           f"its per-sample values is {mean:.6g}: {why}; {_mean_fix(criterion)}")
    return int(z.shape[1])


def _default_dtype_call(dtype: torch.dtype | None, fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """Call ``fn`` with torch's default dtype set to ``dtype`` (quantizable_layers probes with a
    default-dtype zero input, which a float64 model rejects); restored afterwards."""
    old = torch.get_default_dtype()
    if dtype is None or dtype == old:
        return fn(*args, **kwargs)
    torch.set_default_dtype(dtype)
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_default_dtype(old)


def select_layers(model: nn.Module, layers: Sequence[str] | None,
                   input_size: tuple[int, ...], device: torch.device) -> list[LayerInfo]:
    """The quantizable layers to measure, in forward order; unknown names raise HessianError."""
    first = next(model.parameters(), None)
    dtype = first.dtype if first is not None and first.is_floating_point() else None
    modes = [(m, m.training) for m in model.modules()]
    try:   # quantizable_layers resets every submodule to the root's mode: keep each one's own
        infos = _default_dtype_call(dtype, quantizable_layers, model, input_size=input_size,
                                    device=device)
    finally:
        for m, training in modes:
            m.training = training
    if layers is None:
        if not infos:
            raise HessianError(f"{type(model).__name__} has no Conv2d/Linear layer to measure")
        return infos
    if isinstance(layers, str):
        layers = [layers]
    by_name = {i.name: i for i in infos}
    unknown = [n for n in layers if n not in by_name]
    if unknown:
        raise HessianError(f"unknown layer name(s) {unknown}; valid names (forward order): "
                           f"{list(by_name)}")
    if not layers:
        raise HessianError(f"layers is empty; pass None for all layers or some of {list(by_name)}")
    wanted = set(layers)
    return [i for i in infos if i.name in wanted]


def _resolve_micro_batch(micro_batch: int | str | None, device: torch.device) -> int | None:
    """'auto' -> CPU_MICRO_BATCH on CPU, None (keep the caller's batches) elsewhere."""
    if micro_batch == "auto":
        return CPU_MICRO_BATCH if device.type == "cpu" else None
    return micro_batch  # type: ignore[return-value]


def _split(batches: list[tuple[torch.Tensor, torch.Tensor]], size: int | None
           ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Chunk every batch into pieces of at most ``size`` samples (None: unchanged). The loss of
    the calibration set, hence its Hessian (Eq. H3), does not depend on the chunking."""
    if size is None:
        return batches
    return [(xs, ys) for x, y in batches
            for xs, ys in zip(torch.split(x, size), torch.split(y, size))]


def _auto_min_probes(n_batches: int) -> int:
    """Smallest r >= 2 with n_batches·(r-1) >= 8 degrees of freedom in the pooled SE."""
    return max(2, 1 + math.ceil(_MIN_DOF / n_batches))


# --------------------------------------------------------------------------------------------
# Model state: eval mode and requires_grad on the measured weights only, restored afterwards
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def measurement_mode(model: nn.Module, params: Sequence[nn.Parameter],
                     device: torch.device) -> Iterator[None]:
    """Eval mode for every module (BN uses running statistics, docs/design.md §3), gradients only for
    ``params``, the model on ``device``; the caller's train/eval flags, requires_grad flags and
    device are restored on exit, also after an exception."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    first = next(model.parameters(), None)
    home = first.device if first is not None else device
    try:
        model.to(device)
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training
        for p, flag in flags:
            p.requires_grad_(flag)
        model.to(home)


class _Hardsigmoid2(nn.Module):
    """nn.Hardsigmoid's values as relu6(x + 3) / 6, built from ops that have a double backward."""

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.relu6(x + 3.0) / 6.0


# module type -> factory of a twice-differentiable module with the same values
_TWICE_DIFFERENTIABLE: dict[type[nn.Module], Callable[[nn.Module], nn.Module]] = {
    nn.Hardsigmoid: lambda m: _Hardsigmoid2(m.inplace),
}


@contextlib.contextmanager
def twice_differentiable(model: nn.Module) -> Iterator[list[str]]:
    """Swap modules whose backward has no derivative (nn.Hardsigmoid) for equal-valued ones that
    have it, warn once naming them, and put the originals back on exit (also after an error).
    Yields the swapped module names. Hessian-vector products need the double backward (Eq. H1)."""
    swapped: list[tuple[nn.Module, str, nn.Module, str]] = []
    for name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            make = _TWICE_DIFFERENTIABLE.get(type(child))
            if make is not None:
                full = f"{name}.{child_name}" if name else child_name
                swapped.append((parent, child_name, child, full))
    try:
        for parent, child_name, child, _ in swapped:
            setattr(parent, child_name, _TWICE_DIFFERENTIABLE[type(child)](child))
        if swapped:
            names = [s[3] for s in swapped]
            warnings.warn(f"layer_traces: {len(names)} nn.Hardsigmoid module(s) (e.g. "
                          f"{names[0]!r}) have no second derivative in autograd; measuring with "
                          "the equal-valued relu6(x + 3) / 6 in their place (the model is "
                          "restored afterwards)", stacklevel=4)
        yield [s[3] for s in swapped]
    finally:
        for parent, child_name, child, _ in swapped:
            setattr(parent, child_name, child)


def _no_double_backward(exc: RuntimeError) -> HessianError | None:
    """A HessianError naming the op and the fix when ``exc`` is autograd's missing double
    backward ("derivative for aten::X is not implemented"), else None."""
    msg = str(exc)
    if "derivative for" not in msg or "not implemented" not in msg:
        return None
    op = msg.split("derivative for", 1)[1].split("is not implemented", 1)[0].strip()
    return HessianError(
        f"layer_traces: the model uses an op without a second derivative ({op}), so Hessian-"
        "vector products cannot pass through it. Replace the module or functional call that "
        "produces it by an equal-valued twice-differentiable expression for the measurement "
        "(as hessian.twice_differentiable does for nn.Hardsigmoid: relu6(x + 3) / 6), or pass "
        "layers= with only layers that come after it in the forward pass")


# --------------------------------------------------------------------------------------------
# Cache (docs/design.md §4: keyed by a hash of the inputs, atomic writes)
# --------------------------------------------------------------------------------------------
def cache_key(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
              settings: dict[str, Any]) -> str:
    """sha256 over the state_dict (weights and BN statistics), the batch tensors and the
    settings (seed, tol, probe counts, layers, criterion, ...)."""
    h = hashlib.sha256(VERSION.encode())
    runtime.hash_state_dict(h, model)
    for x, y in batches:
        runtime.hash_tensor(h, x)
        runtime.hash_tensor(h, y)
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _describe(fn: Callable) -> str:
    """A session-independent name for the criterion in the cache key: the repr of a module plus
    the settings its repr hides (:func:`_loss_settings`: label_smoothing, class weights, ...;
    none for a default-built loss, whose key is unchanged), else its qualified name."""
    if isinstance(fn, nn.Module):
        extra = _loss_settings(fn)
        return repr(fn) if not extra else f"{fn!r} {json.dumps(extra, sort_keys=True)}"
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"


def _cache_path(cache_dir: str | os.PathLike, key: str) -> Path:
    return Path(cache_dir) / f"traces-{key[:24]}.json"


def _frame_to_json(df: pd.DataFrame) -> dict[str, Any]:
    return {"index": [str(i) for i in df.index],
            "columns": {c: df[c].tolist() for c in df.columns},
            "dtypes": {c: str(df[c].dtype) for c in df.columns},
            "attrs": df.attrs}


def _frame_from_json(blob: dict[str, Any]) -> pd.DataFrame:
    df = pd.DataFrame(blob["columns"], index=pd.Index(blob["index"], name="layer"))
    df = df.astype(blob["dtypes"])[list(blob["columns"])]
    df.attrs.update(blob["attrs"])
    return df


def _read_cache(path: Path, key: str) -> pd.DataFrame | None:
    """The cached frame for ``key``, or None (missing, unreadable or another key)."""
    try:
        blob = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if blob.get("attrs", {}).get("cache_key") != key:
        return None
    return _frame_from_json(blob)


def _write_cache(path: Path, df: pd.DataFrame) -> None:
    runtime.atomic_write_text(path, json.dumps(_frame_to_json(df)) + "\n")


# --------------------------------------------------------------------------------------------
# The estimator
# --------------------------------------------------------------------------------------------
@dataclass
class _Samples:
    """x_ibk of Eq. H4: samples[i][b] is the list of probe values of layer i on batch b."""

    weights: np.ndarray                        # w_b = n_b / N
    n_layers: int
    data: list[list[list[float]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.data = [[[] for _ in self.weights] for _ in range(self.n_layers)]

    def probes(self) -> np.ndarray:
        """r_i: probes per batch of each layer (equal over batches by construction)."""
        return np.array([len(per_b[0]) for per_b in self.data])

    def estimate(self) -> tuple[np.ndarray, np.ndarray]:
        """(T̂_i, SE_i) of Eq. H4; SE is NaN below two probes per batch."""
        mean, se = np.zeros(self.n_layers), np.full(self.n_layers, np.nan)
        for i, per_b in enumerate(self.data):
            x = [np.asarray(s, dtype=np.float64) for s in per_b]
            mean[i] = sum(w * s.mean() for w, s in zip(self.weights, x))
            if min(len(s) for s in x) >= 2:
                se[i] = math.sqrt(sum(w * w * s.var(ddof=1) / len(s)
                                      for w, s in zip(self.weights, x)))
        return mean, se


def _rel_se(mean: np.ndarray, se: np.ndarray) -> np.ndarray:
    """SE/|mean| (the abs matters: traces can be negative); 0 where SE is 0, inf where mean is 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = se / np.abs(mean)
    return np.where(se == 0, 0.0, rel)


def _plan(rel: np.ndarray, r: np.ndarray, tol: float, max_probes: int) -> np.ndarray:
    """Probes per batch for the next sweep: _GROWTH of the predicted remaining
    r·((rel/tol)² - 1) (SE ∝ 1/sqrt(r)), at least 1, at most what max_probes leaves."""
    need = np.ceil(_GROWTH * r * ((rel / tol) ** 2 - 1))
    need = np.where(np.isfinite(need), need, max_probes)
    return np.clip(need, 1, max_probes - r).astype(int)


def _sweep(model: nn.Module, criterion: Callable, chunks: list[tuple[torch.Tensor, torch.Tensor]],
           params: list[nn.Parameter], plan: dict[int, int], groups: list[list[int]],
           gens: list[list[torch.Generator]], samples: _Samples, device: torch.device,
           bar: Any, strata: Sequence[int] | None = None) -> int:
    """One pass over the batches ``strata`` (global indices b; default all): per batch one
    first-order graph, then ``plan[i]`` probes for layer i; in each group the layers share one
    HVP (a group per layer for probe='layer', one group of all active layers for 'joint').
    Returns the number of HVPs."""
    active = sorted(plan)
    hvps = 0
    for b in range(len(chunks)) if strata is None else strata:
        x, y = chunks[b]
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = criterion(model(x), y)
        grads = torch.autograd.grad(loss, [params[i] for i in active], create_graph=True,
                                    allow_unused=True)
        g_of = {i: torch.zeros_like(params[i]) if g is None else g for i, g in zip(active, grads)}
        for group in groups:
            for _ in range(max(plan[i] for i in group)):
                ps = [params[i] for i in group]
                v = [rademacher(p.shape, gens[i][b], device, p.dtype) for i, p in zip(group, ps)]
                hv = hessian_vector_product([g_of[i] for i in group], ps, v)
                for i, val in zip(group, group_product(hv, v)):
                    samples.data[i][b].append(val)
                hvps += 1
                bar.update(1)
        del grads, g_of, loss
    return hvps


def _owned_strata(n_batches: int) -> range:
    """The strata this rank probes: b ≡ rank (mod world size) (all of them in one process)."""
    return range(hdist.rank(), n_batches, hdist.world_size())


def _share_sweep(samples: _Samples, plan: dict[int, int], owned: Sequence[int]) -> None:
    """After a sweep, give every rank the probe values x_ibk that the other ranks drew (Eq. H4).

    Each rank writes its strata's ``plan[i]`` new values of layer i into a zero tensor
    [layer, stratum, probe]; an all-reduce (SUM) over ranks then holds every value exactly
    (x + 0 = x), so each rank's ``samples`` equal those of one process that probed all strata,
    and the estimate, the stopping rule and the next sweep's plan are bit-identical on every
    rank: no rank-local decision, hence no deadlock. A no-op without a process group.
    """
    if not hdist.is_distributed() or not plan:
        return
    active = sorted(plan)
    n_batches = len(samples.weights)
    buf = torch.zeros(len(active), n_batches, max(plan.values()), dtype=torch.float64)
    for j, i in enumerate(active):
        for b in owned:
            buf[j, b, :plan[i]] = torch.tensor(samples.data[i][b][-plan[i]:], dtype=torch.float64)
    buf = buf.to(hdist.comm_device())
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    buf = buf.cpu()
    mine = set(owned)
    for j, i in enumerate(active):
        for b in range(n_batches):
            if b not in mine:
                samples.data[i][b].extend(buf[j, b, :plan[i]].tolist())


def _check_same_inputs(key: str) -> None:
    """Raise HessianError on every rank when some rank's model, batches or settings (hashed into
    ``key``) differ from rank 0's: the ranks would otherwise measure different things or block in
    mismatched collectives."""
    if not hdist.is_distributed():
        return
    ref = hdist.broadcast_object(key)
    flags = [0.0] * hdist.world_size()
    flags[hdist.rank()] = float(key != ref)
    bad = [r for r, f in enumerate(hdist.all_reduce_sum(flags)) if f]
    if bad:
        raise HessianError(
            f"layer_traces under torch.distributed: rank(s) {bad} hold other weights, calibration "
            "batches or settings than rank 0 (their cache keys differ); pass every rank the same "
            "full, deterministic calibration list (e.g. data.calibration_batches(ds, seed=0)), "
            "the same model state and the same arguments")


def _reduce_stats(wall_s: float, hvps: int) -> tuple[float, int]:
    """(max wall time over ranks, total HVPs over ranks); the inputs without a process group."""
    if not hdist.is_distributed():
        return wall_s, hvps
    walls = [0.0] * hdist.world_size()
    walls[hdist.rank()] = wall_s
    total = hdist.all_reduce_sum(walls + [float(hvps)])
    return max(total[:-1]), round(total[-1])


def _generators(names: Sequence[str], n_batches: int, seed: int) -> list[list[torch.Generator]]:
    """One CPU generator per (layer, batch), seeded from (seed, layer name, batch index): the k-th
    probe of a layer on a batch does not depend on the other layers, the sweeps or convergence."""
    def gen(name: str, b: int) -> torch.Generator:
        digest = hashlib.sha256(f"{seed}:{name}:{b}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)

    return [[gen(name, b) for b in range(n_batches)] for name in names]


def _estimate(model: nn.Module, criterion: Callable, chunks: list[tuple[torch.Tensor, torch.Tensor]],
              infos: list[LayerInfo], params: list[nn.Parameter], *, tol: float, max_probes: int,
              min_probes: int, probe: str, seed: int, device: torch.device, progress: bool,
              stop_rule: Callable[[pd.DataFrame], bool] | None = None
              ) -> tuple[_Samples, dict[str, Any]]:
    """Sweeps over the batches until every layer's relative SE <= tol or max_probes (Eq. H4).
    Under torch.distributed each rank probes its strata (:func:`_owned_strata`) and the sweep's
    values are shared (:func:`_share_sweep`) before the stopping rule; the progress bar is rank
    0's. The returned HVP count is this rank's.

    ``stop_rule`` (decision-based stopping, docs/method.md §3): called with the current frame
    after every sweep once every SE is defined; True stops probing. With a rule, a sweep at most
    doubles a layer's probes, so the rule is consulted before the tol schedule's big jump."""
    sizes = np.array([x.shape[0] for x, _ in chunks], dtype=np.float64)
    samples = _Samples(sizes / sizes.sum(), len(infos))
    gens = _generators([i.name for i in infos], len(chunks), seed)
    plan = {i: min_probes for i in range(len(infos))}
    owned = _owned_strata(len(chunks))
    progress = progress and hdist.is_main()
    hvps = sweeps = 0
    stopped_by_rule = False
    while plan:
        groups = [[i] for i in sorted(plan)] if probe == "layer" else [sorted(plan)]
        if probe == "joint":   # one shared HVP: every active layer gets the largest plan
            plan = dict.fromkeys(plan, max(plan.values()))
        total = len(owned) * sum(max(plan[i] for i in g) for g in groups)
        bar = runtime.progress(total=total, unit="hvp", disable=not progress,
                               desc=f"hessian traces, sweep {sweeps + 1} ({len(plan)} layers)")
        try:
            hvps += _sweep(model, criterion, chunks, params, plan, groups, gens, samples, device,
                           bar, owned)
            _share_sweep(samples, plan, owned)
            sweeps += 1
            mean, se = samples.estimate()
            rel, r = _rel_se(mean, se), samples.probes()
            todo = np.flatnonzero((rel > tol) & (r < max_probes))
            plan = dict(zip(todo.tolist(), _plan(rel[todo], r[todo], tol, max_probes).tolist()))
            if stop_rule is not None and plan:
                if np.isfinite(se).all() and stop_rule(_frame(infos, samples, len(chunks))):
                    stopped_by_rule = True
                    plan = {}
                else:
                    plan = {i: min(k, int(r[i])) for i, k in plan.items()}
            bar.set_postfix(max_rel_se=f"{np.nanmax(rel):.3f}", left=len(plan), refresh=False)
        finally:
            bar.close()
    return samples, {"hvps": hvps, "sweeps": sweeps, "stopped_by_rule": stopped_by_rule}


def _frame(infos: list[LayerInfo], samples: _Samples, n_batches: int) -> pd.DataFrame:
    """The result table (columns COLUMNS, index = layer name in forward order)."""
    mean, se = samples.estimate()
    n = np.array([i.n_params for i in infos], dtype=np.int64)
    r = samples.probes()
    df = pd.DataFrame({
        "n_params": n,
        "trace": mean,
        "avg_trace": mean / n,
        "avg_trace_se": se / n,
        "rel_se": _rel_se(mean, se),
        "probes": r.astype(np.int64),
        "samples": (r * n_batches).astype(np.int64),
        "kind": [i.kind for i in infos],
    }, index=pd.Index([i.name for i in infos], name="layer"))
    return df[COLUMNS]


def _warn_fallback(why: str) -> None:
    """Warn (UserWarning, pointing at layer_traces' caller) that ``method='auto'`` measures with
    Hutchinson probes (an estimate with a standard error) instead of the exact traces, and why."""
    warnings.warn(f"layer_traces(method='auto'): using Hutchinson probes (an estimate with a "
                  f"standard error, not the exact traces) because {why}. Pass "
                  "method='hutchinson' to choose the probes explicitly.", stacklevel=3)


def layer_traces(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
                 layers: Sequence[str] | None = None, tol: float = 0.05, max_probes: int = 100,
                 min_probes: int | None = None, seed: int = 0,
                 device: str | torch.device | None = None,
                 criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 cache_dir: str | os.PathLike | None = None, progress: bool = True,
                 probe: str = "layer", micro_batch: int | str | None = "auto",
                 stop_rule: Callable[[pd.DataFrame], bool] | None = None,
                 method: str = "auto") -> pd.DataFrame:
    """Per-layer Hessian traces Tr(H_ii) and average traces T̄_i (docs/design.md §3, Eqs. H1–H4).

    ``method="auto"`` (default) computes them exactly with :func:`gauss_newton_traces` when its
    piecewise-linearity check passes and the model has at most :data:`GN_AUTO_MAX_OUTPUTS`
    outputs (it costs one product per output and image), with the probes described below
    otherwise (a UserWarning says which condition failed); ``"hutchinson"`` always uses the
    probes; ``"gauss_newton"`` always the exact form (raises :class:`NotPiecewiseLinearError`
    for a smooth network). The exact frame has ``avg_trace_se`` 0, ``probes`` 0, ``converged``
    True and a ``data_se`` column; ``tol``, ``max_probes``, ``min_probes`` and ``probe`` do not
    apply to it. With a ``stop_rule`` the Gauss-Newton path draws :data:`GN_FIRST_ROUND`
    output-space probes per image, doubles them until the rule holds while the total stays
    within a quarter of the outputs, and computes the exact form past that
    (:func:`gauss_newton_traces`).

    Under ``torchrun`` (an initialised torch.distributed group of N > 1 processes) the work is
    split over the ranks and every rank returns the frame one process would compute from the
    same batches and seed (equal up to the last bit of the float64 sums; only ``wall_s`` and
    ``world_size`` differ):

    * every rank must get the same full, deterministic calibration list and the same weights
      (checked: a rank whose inputs hash differently from rank 0's raises HessianError on all
      ranks); the batches are split into micro-batches (strata) first, then rank r probes the
      strata b ≡ r (mod N), with the global b in the probe generators' keys and in
      w_b = n_b / N_total, so a probe does not depend on N;
    * after every sweep the new probe values are all-reduced (SUM of zero-padded tensors, exact),
      so the stopping rule and the next sweep's schedule are computed identically on all ranks;
    * a DDP wrapper is unwrapped (DDP cannot double-backward; no gradient sync is needed);
    * ``attrs``: ``wall_s`` = the slowest rank's, ``hvps`` = the sum over ranks (= one
      process's count), ``world_size`` = N; the progress bar is rank 0's;
    * cache: the key does not depend on N; rank 0 reads the file and broadcasts a hit, only rank
      0 writes, then all ranks meet at a barrier.

    Copy-paste example (2 CPU processes; on GPUs drop ``OMP_NUM_THREADS`` and use
    ``--nproc_per_node=<GPUs>``: each rank then computes on ``cuda:LOCAL_RANK``)::

        cat > traces.py <<'PY'
        from hmqat import data, distributed, hessian, models
        with distributed.process_group() as dev:      # gloo on CPU, NCCL on CUDA
            model = models.create_model("resnet20", pretrained=True).to(dev)
            calib = data.calibration_batches(data.load_cifar10(), n_samples=2048,
                                             batch_size=256, seed=0)  # same list on every rank
            df = hessian.layer_traces(model, calib, tol=0.05, cache_dir="results/quick/cache")
            if distributed.is_main():
                print(df[["avg_trace", "rel_se", "probes"]], df.attrs["wall_s"])
        PY
        OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 traces.py

    Args:
        model: the FP32 model (or its DDP wrapper, whose ``.module`` is measured); measured in
            eval mode (BN running statistics). Its train/eval flags, requires_grad flags and
            device are restored afterwards.
        batches: list of (x, y) calibration batches (e.g. ``data.calibration_batches``). The
            estimand, on both paths and for any micro-batching, is the Hessian of the mean loss
            over all their images, (1/N) Σ_n ℓ_n.
        layers: module names (default: every Conv2d/Linear, ``models.quantizable_layers``;
            names of the unwrapped module, without DDP's ``module.`` prefix).
        tol: stop when every layer's SE/|trace| <= tol.
        max_probes: at most this many probes per (micro-)batch and layer (a probe per batch = a
            pass over the data with independent ±1 vectors; PyHessian's maxIter).
        min_probes: probes per batch before the stopping rule applies; None: the smallest r >= 2
            giving >= 8 degrees of freedom to the SE (n_batches·(r-1) >= 8).
        seed: seeds one CPU generator per layer (global RNG untouched); same seed, same result.
        device: where to compute (default: the model's device).
        criterion: a per-sample mean loss ``criterion(logits, y)``; default
            ``nn.CrossEntropyLoss()``. Checked up front (:func:`check_criterion`): reduction
            'sum'/'none', class-weighted CE/NLL, or a loss whose batch value is not the mean of
            its per-sample values raise HessianError naming the loss and the fix.
        cache_dir: a folder for the JSON cache keyed by :func:`cache_key`; None disables it.
        progress: show a tqdm bar (plain text when HMQAT_HEADLESS is set).
        probe: "layer" (default, one HVP per layer) or "joint" (one HVP over all active layers,
            docs/design.md §3's form); see the module docstring for the measurements behind the default.
        micro_batch: split batches into chunks of this many samples ("auto": 16 on CPU, the
            caller's batches elsewhere; None: the caller's batches, never split), on both paths
            (the Gauss-Newton path vectorises over one chunk at a time). Does not change the
            estimand.
        stop_rule: decision-based stopping (docs/method.md §3), e.g.
            ``sensitivity.decision_stop_rule(model, [10.34])``: called with the current frame
            after every sweep; True stops probing before ``tol`` is reached (``attrs
            ["stopped_by_rule"]``). Sweeps then at most double each layer's probes. Disables
            the cache.

    Returns:
        DataFrame indexed by layer (forward order): n_params, trace, avg_trace, avg_trace_se,
        rel_se, probes (per batch), samples (HVP samples = probes × batches), kind. ``attrs``:
        wall_s, seed, tol, converged, cache_key, max_probes, min_probes, probe, micro_batch,
        n_batches, n_samples (images), hvps, sweeps, device, world_size, version.

    Raises:
        HessianError: unknown layer names (lists the valid ones), empty, malformed or
            non-finite batches, tol <= 0, bad probe counts or modes, a NaN/inf parameter or
            buffer (named), a criterion that is not a per-sample mean; under
            torch.distributed, ranks whose model, batches or settings differ from rank 0's.

    Warns:
        UserWarning: ``method="auto"`` falls back to the probes (more than
            :data:`GN_AUTO_MAX_OUTPUTS` outputs, or the Gauss-Newton check failed), saying why.
    """
    _check_settings(tol, max_probes, min_probes, probe, micro_batch)
    if method not in METHODS:
        raise HessianError(f"method={method!r}: use one of {METHODS} ('auto' = exact "
                           "Gauss-Newton traces where they apply, Hutchinson elsewhere)")
    batches = check_batches(batches)
    model = hdist.unwrap(model)     # DDP cannot double-backward: measure the plain module
    first = next(model.parameters(), None)
    home = first.device if first is not None else torch.device("cpu")
    device = torch.device(device) if device is not None else home
    criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
    mb = _resolve_micro_batch(micro_batch, device)
    chunks = _split(batches, mb)
    r_min = min_probes if min_probes is not None else min(_auto_min_probes(len(chunks)),
                                                          max_probes)
    infos = select_layers(model, layers, (1,) + tuple(batches[0][0].shape[1:]), home)
    settings = {"layers": [i.name for i in infos], "tol": float(tol), "max_probes": max_probes,
                "min_probes": r_min, "seed": seed, "probe": probe, "micro_batch": mb,
                "criterion": _describe(criterion), "version": VERSION}
    if method != "hutchinson":        # (the default's keys stay those of earlier versions)
        settings["method"] = method
    key = path = None
    if stop_rule is not None:
        cache_dir = None          # the result depends on the rule, which is not hashable
    if cache_dir is not None or hdist.is_distributed():
        fingerprint = cache_key(model, batches, settings)
        _check_same_inputs(fingerprint)
        key = fingerprint if cache_dir is not None else None
    # after the same-inputs check, so under torchrun every rank refuses together
    check_finite_model(model, "layer_traces")
    n_out = check_criterion(model, batches, criterion, home, "layer_traces")
    if cache_dir is not None and key is not None:
        path = _cache_path(cache_dir, key)
        cached = _read_cache(path, key) if hdist.is_main() else None
        if hdist.is_distributed():   # rank 0 decides; every rank returns the same frame
            blob = hdist.broadcast_object(None if cached is None else _frame_to_json(cached))
            cached = None if blob is None else _frame_from_json(blob)
        if cached is not None:
            log.info("layer_traces: cache hit %s", path)
            return cached
    if method == "auto" and n_out > GN_AUTO_MAX_OUTPUTS:
        _warn_fallback(f"the model has {n_out} outputs > GN_AUTO_MAX_OUTPUTS = "
                       f"{GN_AUTO_MAX_OUTPUTS}, where the exact form (one product per output and "
                       "image) costs more than the probes")
        method = "hutchinson"
    if method != "hutchinson":
        try:
            df = gauss_newton_traces(model, batches, layers=[i.name for i in infos],
                                     criterion=criterion, device=device, seed=seed,
                                     micro_batch=mb,
                                     projections=None if stop_rule is None else GN_FIRST_ROUND,
                                     stop_rule=stop_rule)
        except NotPiecewiseLinearError as exc:
            if method == "gauss_newton":
                raise
            reason = str(exc).removesuffix(_GN_ADVICE)
            _warn_fallback(f"the Gauss-Newton check failed: {reason}")
        else:
            df.attrs.update({"seed": seed, "tol": float(tol), "converged": True,
                             "cache_key": key, "max_probes": 0, "min_probes": 0,
                             "probe": "none" if df.attrs["projections"] is None else "output",
                             "hvps": 0, "sweeps": 0, "world_size": hdist.world_size()})
            if path is not None:
                if hdist.is_main():
                    _write_cache(path, df)
                hdist.barrier()
            return df
    modules = dict(model.named_modules())
    params = [modules[i.name].weight for i in infos]
    t0 = time.perf_counter()
    with measurement_mode(model, params, device), twice_differentiable(model):
        try:
            samples, info = _estimate(model, criterion, chunks, infos, params, tol=tol,
                                      max_probes=max_probes, min_probes=r_min, probe=probe,
                                      seed=seed, device=device, progress=progress,
                                      stop_rule=stop_rule)
        except RuntimeError as exc:
            err = _no_double_backward(exc)
            if err is None:
                raise
            raise err from exc
    wall_s, hvps = _reduce_stats(time.perf_counter() - t0, info["hvps"])
    df = _frame(infos, samples, len(chunks))
    df.attrs.update({
        "wall_s": wall_s, "seed": seed, "tol": float(tol),
        "converged": bool((df["rel_se"] <= tol).all()), "cache_key": key,
        "max_probes": max_probes, "min_probes": r_min, "probe": probe, "micro_batch": mb,
        "n_batches": len(chunks), "n_samples": int(sum(x.shape[0] for x, _ in batches)),
        "hvps": hvps, "sweeps": info["sweeps"], "device": str(device),
        "stopped_by_rule": info["stopped_by_rule"], "method": "hutchinson",
        "world_size": hdist.world_size(), "version": VERSION})
    if path is not None:
        if hdist.is_main():
            _write_cache(path, df)
        hdist.barrier()
    return df


# --------------------------------------------------------------------------------------------
# Exact traces without probes, for networks that are piecewise linear in each layer's weights
# --------------------------------------------------------------------------------------------
#: Largest |vᵀHv − vᵀGv| / |vᵀHv| that :func:`gauss_newton_traces`' check accepts as rounding.
GN_CHECK_RTOL = 1e-3
#: Absolute floor of that check, as a fraction of vᵀJᵀJv/N (the logits' own change): below it
#: both sides are round-off, as for a softmax saturated on every image (e.g. random weights).
#: The price: a smooth net whose remaining term gᵀ∂²z[v,v] is below the floor passes too, and
#: its exact traces then miss at most that term (≤ 1e-6 of the curvature the same logit change
#: would give an unsaturated softmax): negligible for ranking layers.
GN_CHECK_ATOL = 1e-6
#: Per-image gradients held at once by :func:`gauss_newton_traces` (images × cotangents ×
#: measured weights, in elements; 64 M ≈ 256 MB in float32): cotangents go in blocks below it.
GN_MAX_ELEMENTS = 64_000_000
#: ``layer_traces(method="auto")`` computes exact traces only up to this many outputs (the
#: exact form costs one vector-Jacobian product per output and image; ImageNet's 1,000 would
#: cost more than the probes).
GN_AUTO_MAX_OUTPUTS = 32
#: Output-space probes per image in the first round of ``layer_traces(stop_rule=...)`` on the
#: Gauss-Newton path (2: the fewest that give a standard error).
GN_FIRST_ROUND = 2


def _gn_frame(v: np.ndarray, projections: int | None, infos: Sequence[Any]) -> pd.DataFrame:
    """The :func:`gauss_newton_traces` frame from ``v`` = [images, products, layers]: per
    image ‖J_{n,i}ᵀF_n‖² summed over F's columns when exact (Eq. H6), the mean over output-space
    probes with a stratified SE (one stratum per image) otherwise (Eq. H7)."""
    n_img = v.shape[0]
    per_image = v.sum(1) if projections is None else v.mean(1)    # Tr(H_n,ii) (or estimate)
    trace = per_image.mean(0)
    if projections is None:
        se = np.zeros(len(infos))
    else:
        se = np.sqrt((v.var(1, ddof=1) / v.shape[1]).sum(0)) / n_img
    data_se = per_image.std(0, ddof=1) / math.sqrt(n_img) if n_img > 1 \
        else np.full(len(infos), np.nan)
    n = np.array([i.n_params for i in infos], dtype=np.int64)
    return pd.DataFrame({
        "n_params": n, "trace": trace, "avg_trace": trace / n, "avg_trace_se": se / n,
        "rel_se": _rel_se(trace, se), "probes": projections or 0, "samples": n_img,
        "kind": [i.kind for i in infos], "data_se": data_se / n,
    }, index=pd.Index([i.name for i in infos], name="layer"))


def _loss_factor(criterion: Callable, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """F with F Fᵀ = Λ = ∂²ℓ/∂z², per sample (Eq. H5): [B, C, K]. Cross-entropy in closed form,
    Λ = diag(p) − ppᵀ = Σ_c p_c (e_c − p)(e_c − p)ᵀ, so F[:, :, c] = √p_c (e_c − p); any other
    criterion from its per-sample Hessian in z (torch.func.hessian) and an eigendecomposition."""
    if type(criterion) is nn.CrossEntropyLoss and criterion.weight is None \
            and criterion.label_smoothing == 0 and criterion.reduction == "mean":
        p = torch.softmax(z, dim=1)
        eye = torch.eye(z.shape[1], dtype=z.dtype, device=z.device)
        return (eye[None] - p[:, :, None]) * p.sqrt()[:, None, :]
    one = torch.func.hessian(lambda zi, yi: criterion(zi[None], yi[None]))
    try:
        lam = torch.func.vmap(one)(z, y)
    except RuntimeError as exc:   # a criterion with data-dependent ops (e.g. F.one_hot): loop
        if "vmap" not in str(exc):
            raise
        lam = torch.stack([one(zi, yi) for zi, yi in zip(z, y)])
    evals, evecs = torch.linalg.eigh(lam)
    if (evals < -1e-6 * evals.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)).any():
        raise HessianError(f"{_describe(criterion)} has a Hessian in the logits that is not "
                           "positive semi-definite on some sample, so Λ = F Fᵀ does not exist; "
                           "use hessian.layer_traces (Hutchinson) for this loss")
    return evecs * evals.clamp_min(0).sqrt()[:, None, :]


_GN_ADVICE = "; use hessian.layer_traces(method='hutchinson') for this model"


def _gn_check(model: nn.Module, criterion: Callable, x: torch.Tensor, y: torch.Tensor,
              names: Sequence[str], state: dict[str, torch.Tensor], seed: int) -> None:
    """The identity H_ii = G_ii holds when the logits are piecewise linear in W_i (ReLU, eval-mode
    BN, conv, linear, pooling, residual sums): ∂²z/∂W_i² = 0. Check it on one batch: for one
    Rademacher v per layer, vᵀHv (double backward) against vᵀGv = Σ_n uᵀΛu/N with u = J v
    (forward mode); a smooth activation or train-mode BN makes them differ. The criterion has
    passed :func:`check_criterion` (a per-sample mean, so vᵀGv is the Gauss-Newton part of the
    same loss), which leaves the model as the cause, and the message says so."""
    gen = torch.Generator().manual_seed(seed)
    for name in names:
        w = state[name]
        v = rademacher(w.shape, gen, w.device, w.dtype)

        def logits(wi: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(model, {**state, name: wi}, (x,))

        with warnings.catch_warnings():   # torch's first forward-mode AD call compiles its JVP
            # decompositions with torch.jit.script, which warns FutureWarning: torch's, not ours
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated",
                                    category=FutureWarning)
            z, u = torch.func.jvp(logits, (w,), (v,))
        f = _loss_factor(criterion, z.detach(), y)
        vgv = float((torch.einsum("bc,bck->bk", u, f) ** 2).sum(1).mean())
        wg = w.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(criterion(logits(wg), y), wg, create_graph=True)
        (hv,) = torch.autograd.grad(g, wg, grad_outputs=v)
        vhv = float(torch.vdot(hv.reshape(-1), v.reshape(-1)))
        # the floor: round-off against the curvature an unsaturated softmax would give the same
        # logit change (||u||²/N); a saturated softmax leaves vᵀHv and vᵀGv both at round-off
        floor = GN_CHECK_ATOL * float((u.detach() ** 2).sum()) / max(len(u), 1)
        if abs(vhv - vgv) > GN_CHECK_RTOL * max(abs(vhv), abs(vgv)) + floor:
            raise NotPiecewiseLinearError(
                f"layer {name.removesuffix('.weight')!r}: vᵀHv = {vhv:.6g} but the Gauss-Newton "
                f"part vᵀGv = {vgv:.6g} of the loss {_criterion_name(criterion)} (a per-sample "
                "mean, checked); the logits are not piecewise linear in this layer's "
                "weights (a smooth activation such as SiLU/GELU/tanh, or BN in train mode), so "
                f"the exact Gauss-Newton traces would miss the remaining term{_GN_ADVICE}")


def gauss_newton_traces(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                        *, layers: Sequence[str] | None = None,
                        criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                        projections: int | None = None, seed: int = 0,
                        device: str | torch.device | None = None, micro_batch: int | None = 16,
                        check: bool = True,
                        stop_rule: Callable[[pd.DataFrame], bool] | None = None) -> pd.DataFrame:
    """Per-layer traces Tr(H_ii) from per-image vector-Jacobian products, for networks whose
    logits are piecewise linear in each single layer's weights (docs/method.md §3.2).

        H_ii = J_iᵀ Λ J_i + Σ_c ∂ℓ/∂z_c · ∂²z_c/∂W_i²                             (Eq. H5)

    With ReLU, eval-mode BatchNorm, conv, linear, pooling and residual sums, z is linear in W_i
    between ReLU kinks, so the second term is 0 and H_ii is its Gauss-Newton block (autograd's
    double backward sees the same: ReLU has no second derivative). Writing Λ_n = F_n F_nᵀ per
    image (cross-entropy: F[:, c] = √p_c (e_c − p)):

        Tr(H_ii) = (1/N) Σ_n ‖J_{n,i}ᵀ F_n‖²_F                                     (Eq. H6)
                 = (1/N) Σ_n E_s ‖J_{n,i}ᵀ F_n s‖²,  s Rademacher in the C outputs  (Eq. H7)

    ``projections=None`` evaluates Eq. H6 exactly: C vector-Jacobian products per image (vmap
    over images and the columns of F), all layers at once, no probe noise. ``projections=r``
    (≥ 2) uses Eq. H7 with r output-space probes per image: r products per image instead of C,
    an unbiased estimate with a stratified SE (each image a stratum, as in Eq. H4). Either way
    the estimand is the trace of the Hessian of the mean loss over *these* images, the same as
    :func:`layer_traces`' (a criterion that is not a per-sample mean is refused up front,
    :func:`check_criterion`, as is a model with a NaN/inf weight). ``micro_batch``: images
    vectorised at once (None: each of the caller's batches whole); it does not change the
    result. ``check`` first verifies that Eq. H5's second term vanishes on the
    first micro-batch (vᵀHv against vᵀGv per layer, :data:`GN_CHECK_RTOL`) and raises
    HessianError naming the layer if not; then use :func:`layer_traces`.

    ``stop_rule`` (with ``projections=r``): probes only as precise as a decision needs. Round 1
    draws r probes per image; after every round the frame of all probes so far (the same
    estimator as one run with that many) goes to ``stop_rule``, and probing stops when it returns
    True (e.g. :func:`hmqat.sensitivity.decision_stop_rule`: no perturbation within the CI changes
    the Pareto pick); otherwise the next round doubles the probes, as long as the total stays
    within K/4 (K = the number of outputs); past that the exact form (K products per image, no
    probe error) is computed instead and returned. So probing that never satisfies the rule
    costs at most 1.25× the exact traces, and rounds are only tried where they can save most of
    it (with K = 10 and r = 2: one round of 2, then exact).

    Returns the :func:`layer_traces` columns (``probes`` = projections per image, 0 when exact;
    ``avg_trace_se`` and ``rel_se`` 0 when exact) plus ``data_se``: the standard error over
    images of the per-image traces (per weight), i.e. how far another calibration set of the
    same size would move T̄ (the data-sampling uncertainty a probe SE leaves out). ``attrs``:
    wall_s, n_samples, n_batches, micro_batch, method, projections (total per image; None when
    exact), rounds, stopped_by_rule, seed, device, checked, vjps (vector-Jacobian products per
    layer group, over all rounds), version.
    """
    batches = check_batches(batches)
    model = hdist.unwrap(model)
    first = next(model.parameters(), None)
    home = first.device if first is not None else torch.device("cpu")
    device = torch.device(device) if device is not None else home
    criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
    if micro_batch is not None and (not _is_int(micro_batch) or micro_batch < 1):
        raise HessianError(f"micro_batch={micro_batch!r}; use a positive int (images per "
                           "vectorised chunk; memory grows with it × outputs × weights) or None "
                           "(the caller's batches, unsplit)")
    if projections is not None and (not _is_int(projections) or projections < 2):
        raise HessianError(f"projections={projections!r}; use None (exact, C products per image) "
                           "or an int >= 2 (output-space probes per image; 2 is the fewest that "
                           "give a standard error)")
    if stop_rule is not None and projections is None:
        raise HessianError("stop_rule needs projections=r (the first round's probes per image); "
                           "the exact form (projections=None) has no probe error to stop on")
    chunks = _split(batches, micro_batch)
    infos = select_layers(model, layers, (1,) + tuple(batches[0][0].shape[1:]), home)
    check_finite_model(model, "gauss_newton_traces")
    check_criterion(model, batches, criterion, home, "gauss_newton_traces")
    modules = dict(model.named_modules())
    names = [f"{i.name}.weight" for i in infos]
    params = [modules[i.name].weight for i in infos]
    n_img = sum(x.shape[0] for x, _ in chunks)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    with measurement_mode(model, params, device), twice_differentiable(model):
        state = {k: v.detach() for k, v in {**dict(model.named_parameters()),
                                            **dict(model.named_buffers())}.items()}
        weights = {k: state[k] for k in names}
        if check:
            x, y = chunks[0]
            try:
                _gn_check(model, criterion, x.to(device), y.to(device), names, state, seed)
            except RuntimeError as exc:       # the check's vᵀHv needs a double backward
                err = _no_double_backward(exc)
                if err is None:
                    raise
                raise err from exc

        def one_image(xi: torch.Tensor, ui: torch.Tensor) -> torch.Tensor:
            """‖J_iᵀ u‖² for every cotangent u (rows of ``ui``) and layer i, one image."""
            def logits(w: dict[str, torch.Tensor]) -> torch.Tensor:
                return torch.func.functional_call(model, {**state, **w}, (xi[None],))[0]

            _, pull = torch.func.vjp(logits, weights)
            out = []
            for j in range(0, ui.shape[0], block):      # cotangent blocks (GN_MAX_ELEMENTS)
                (g,) = torch.func.vmap(pull)(ui[j:j + block])               # name -> [R, ...]
                out.append(torch.stack([g[k].pow(2).flatten(1).sum(1) for k in names], dim=1))
            return torch.cat(out)

        n_weights = sum(w.numel() for w in weights.values())
        n_out = 0

        def one_round(r: int | None) -> np.ndarray:
            """[images, r (K when exact), layers]: ‖J_{n,i}ᵀu‖² for this round's cotangents u."""
            nonlocal block, n_out
            values: list[torch.Tensor] = []
            with torch.no_grad():
                for x, y in chunks:
                    x, y = x.to(device), y.to(device)
                    f = _loss_factor(criterion, torch.func.functional_call(model, state, (x,)), y)
                    n_out = f.shape[2]
                    block = max(1, GN_MAX_ELEMENTS // (x.shape[0] * n_weights))
                    if r is None:                       # Eq. H6: every column of F
                        u = f.transpose(1, 2)                               # [B, K, C]
                    else:                               # Eq. H7: F s, s ±1 over the K columns
                        s = rademacher((x.shape[0], r, f.shape[2]), gen, device, f.dtype)
                        u = torch.einsum("bck,brk->brc", f, s)              # [B, R, C]
                    values.append(torch.func.vmap(one_image)(x, u).to(torch.float64).cpu())
            return torch.cat(values).numpy()

        block = 1
        parts = [one_round(projections)]
        total, rounds, stopped = projections, 1, False
        vjps = parts[0].shape[0] * parts[0].shape[1]
        while True:
            df = _gn_frame(np.concatenate(parts, axis=1), total, infos)
            if stop_rule is None or total is None:
                break
            if stop_rule(df):
                stopped = True
                break
            if 8 * total > n_out:           # probes would pass K/4 per image: go exact (K)
                parts, total = [one_round(None)], None
            else:
                parts.append(one_round(total))
                total *= 2
            rounds += 1
            vjps += parts[-1].shape[0] * parts[-1].shape[1]
    df.attrs.update({"wall_s": time.perf_counter() - t0, "n_samples": n_img,
                     "n_batches": len(chunks), "micro_batch": micro_batch,
                     "method": "gauss_newton", "projections": total, "rounds": rounds,
                     "stopped_by_rule": stopped, "seed": seed, "device": str(device),
                     "checked": bool(check), "vjps": vjps, "version": VERSION})
    return df
