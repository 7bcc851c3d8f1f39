"""The perturbation table Ω_i(b), its variants, and checks that it predicts damage (docs/method.md §3).

    Ω_i(b) = T̄_i · ||Q_b(W_i) − W_i||²                         "joint" (default, HAWQ-V2/V3)   (Eq. Ω)
    Ω_i(b) = T̄_i · Σ_c n_c Δ_{c,b}² / 12                       "trace_size" (analytic noise)
    Ω_i(b) = T̄_i · 4^{-(b-2)}                                  "trace" (the trace alone)
    Ω_i(b) = n_i · 4^{-(b-2)}                                   "param_size" (size only, no data)
    Ω_i(b) = ||Q_b(W_i) − W_i||²                                "qerr_only" (no Hessian)
    Ω_i(b) = T̄_π(i) · ||Q_b(W_i) − W_i||², π a seeded permutation  "permuted_trace" (control)
    Ω_i(b) = Σ_j F_jj · (Q_b(W_i) − W_i)_j²,  F = E_n[g_n ⊙ g_n]   "fisher" (diag. empirical Fisher,
                                                                 BRECQ 2102.05426 / FIT 2210.08502)
    Ω_i(b) = ΔW_iᵀ H_ii ΔW_i,  ΔW_i = Q_b(W_i) − W_i              "exact_quad" (one HVP per cell)

Every variant is on the scale of 2·ΔL (the ½ of the Taylor expansion is dropped, as in HAWQ); the
single-layer check (:func:`single_layer_study`) puts it back.

Renamed in this release (the old names still work, with a DeprecationWarning, for one release):
``size_only`` -> ``qerr_only`` (it was never size only: ||ΔW||² is the quantization error) and
``random`` -> ``permuted_trace`` (it keeps the error term and permutes the traces).

T̄_i is the average Hessian trace from :func:`hmqat.hessian.layer_traces`; Q_b is
:func:`hmqat.quant.quantize_weight`, the same quantizer and *initial* step QAT starts from
(LSQ init by default, per output channel); Δ_{c,b} is that initial step of channel c and n_c its
number of weights. ``fisher`` and ``exact_quad`` need calibration batches (``batches=``): the
per-sample squared gradients resp. the Hessian of the mean loss over them, BN in eval mode.

Choices (docs/method.md §3):

* Negative average traces (a Hutchinson estimate of a near-flat or locally concave block) are
  clipped to 0 with a warning, so Ω >= 0 as the search requires; so are negative exact quadratic
  forms.
* ``trace``/``param_size``: 4^{-b} is the relative noise power of a uniform quantizer over a
  fixed range (Δ ∝ 2^{-b}), normalised to 1 at 2 bits. ``param_size`` is what a planner knowing
  only the layer sizes would use.
* ``qerr_only`` uses the same ||Q_b(W) − W||² as ``joint``, so joint vs qerr_only isolates what
  the trace adds.
* ``permuted_trace`` keeps the measured traces but assigns them to layers by a seeded
  permutation: same spread of sensitivities, no information about which layer has which.

The experiments that tell sensitivity apart from size (docs/method.md §3, notebook 01) live here
too: :func:`single_layer_study`, :func:`noise_study`, :func:`additivity_study`,
:func:`fixed_size_configs` + :func:`fixed_size_validation`, :func:`ptq_frontier`, and the
decision-based stopping rule :func:`decision_is_stable` / :func:`decision_stop_rule`.

Serialise with :func:`omega_to_json` / :func:`omega_from_json` (exact round trip, atomic write),
or ``df.to_csv(path)`` and ``pd.read_csv(path, index_col=0)`` followed by
``df.columns = [int(c) for c in df.columns]``.

    >>> om = omega_table(model, traces, bits=(2, 3, 4, 5, 6, 8))            # "joint"
    >>> per_config, summary = validate_omega(model, {"joint": om}, held_out, n_configs=30)
"""
from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import stats
from torch import nn
from torch.func import functional_call, grad, vmap

from . import hessian, quant, runtime, search, train
from .bn import reestimate_bn
from .hessian import check_batches, measurement_mode, select_layers
from .stats import bootstrap_ci

__all__ = [
    "VARIANTS",
    "SensitivityError",
    "omega_from_json",
    "omega_table",
    "omega_to_json",
    "sample_configs",
    "validate_omega",
    "weight_perturbation",
]

VARIANTS = ("joint", "trace_size", "trace", "param_size", "qerr_only", "permuted_trace", "fisher",
            "exact_quad")
DEPRECATED_VARIANTS = {"size_only": "qerr_only", "random": "permuted_trace"}
DATA_VARIANTS = ("fisher", "exact_quad")     # need calibration batches
DEFAULT_BITS = (2, 3, 4, 5, 6, 8)
_REF_BITS = 2     # "trace" variant: 4^{-(b - 2)} is 1 at 2 bits


class SensitivityError(ValueError):
    """Bad input to the Ω table or its validation; the message names the value and the fix."""


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------
def _check_bits(bits: Sequence[int]) -> tuple[int, ...]:
    """Sorted, de-duplicated candidate bits, each in quant.SUPPORTED_BITS (BitConfigError)."""
    if isinstance(bits, (str, bytes)) or not isinstance(bits, Iterable):
        raise quant.BitConfigError(f"bits={bits!r}: pass a sequence of ints, e.g. {DEFAULT_BITS}")
    bits = list(bits)
    if not bits:
        raise quant.BitConfigError(f"bits is empty; pass candidate bit widths, e.g. {DEFAULT_BITS}")
    bad = [b for b in bits if isinstance(b, bool) or not isinstance(b, numbers.Integral)
           or int(b) not in quant.SUPPORTED_BITS]
    if bad:
        raise quant.BitConfigError(f"unsupported bits {bad}; every candidate must be an int in "
                                   f"{quant.SUPPORTED_BITS}")
    return tuple(sorted({int(b) for b in bits}))


def _check_variant(variant: str) -> str:
    """The canonical variant name; an old name warns (DeprecationWarning) and maps to the new."""
    if variant in DEPRECATED_VARIANTS:
        new = DEPRECATED_VARIANTS[variant]
        warnings.warn(f"Ω variant {variant!r} is renamed {new!r} (it is the "
                      f"{'quantization error alone' if new == 'qerr_only' else 'joint form with permuted traces'}"
                      f"); the old name stops working in the next release", DeprecationWarning,
                      stacklevel=3)
        return new
    if variant not in VARIANTS:
        raise SensitivityError(f"unknown variant {variant!r}; use one of {VARIANTS}")
    return variant


def _layer_weights(model: nn.Module, input_size: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """{name: weight} of every quantizable layer, forward order."""
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    modules = dict(model.named_modules())
    return {i.name: modules[i.name].weight.detach()
            for i in select_layers(model, None, input_size, device)}


def _avg_traces(traces_df: pd.DataFrame, layers: Sequence[str]) -> np.ndarray:
    """T̄_i for ``layers`` from a layer_traces frame; negative values clipped to 0 (warning)."""
    if not isinstance(traces_df, pd.DataFrame) or "avg_trace" not in traces_df.columns:
        raise SensitivityError("traces_df must be the DataFrame of hessian.layer_traces (index = "
                               "layer, column 'avg_trace')")
    missing = [n for n in layers if n not in traces_df.index]
    extra = [n for n in traces_df.index if n not in set(layers)]
    if missing or extra:
        raise SensitivityError(
            f"traces_df does not match the model's quantizable layers: missing {missing}, "
            f"unknown {extra}. Recompute the traces for this model with "
            f"hessian.layer_traces(model, batches) (layers=None covers every layer).")
    t = traces_df.loc[list(layers), "avg_trace"].to_numpy(dtype=np.float64)
    if not np.isfinite(t).all():
        bad = [n for n, v in zip(layers, t) if not math.isfinite(v)]
        raise SensitivityError(f"avg_trace of {bad} is not finite; recompute the traces")
    neg = [n for n, v in zip(layers, t) if v < 0]
    if neg:
        warnings.warn(f"negative average trace for {neg} (Hutchinson noise or a locally concave "
                      f"block); clipped to 0 so that Ω >= 0", stacklevel=3)
    return np.clip(t, 0.0, None)


# --------------------------------------------------------------------------------------------
# Perturbations
# --------------------------------------------------------------------------------------------
def weight_perturbation(w: torch.Tensor, bits: int, *, per_channel: bool = True,
                        method: str = "lsq") -> float:
    """||Q_b(W) − W||² with QAT's quantizer and initial step (docs/design.md §3, Eq. Ω)."""
    q = quant.quantize_weight(w, bits, per_channel=per_channel, method=method)
    return float((q.double() - w.double()).pow(2).sum())


def analytic_noise(w: torch.Tensor, bits: int, *, per_channel: bool = True,
                   method: str = "lsq") -> float:
    """Σ_c n_c Δ_c²/12: uniform rounding noise of the initial step Δ_c of each channel c."""
    step = quant.init_step(w, bits, signed=True, per_channel=per_channel, method=method).double()
    per_step = w.numel() / step.numel()
    return float(per_step * step.pow(2).sum() / 12.0)


def omega_table(model: nn.Module, traces_df: pd.DataFrame | None,
                 bits: Sequence[int] = DEFAULT_BITS, *, variant: str = "joint",
                 per_channel: bool = True, seed: int = 0, method: str = "lsq",
                 input_size: tuple[int, ...] = (1, 3, 32, 32),
                 batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
                 criterion: Callable | None = None) -> pd.DataFrame:
    """Ω_i(b) for every quantizable layer and candidate bit width (docs/method.md §3; variants
    in the module docstring).

    Args:
        model: the FP32 model the traces were measured on.
        traces_df: :func:`hmqat.hessian.layer_traces` output covering every quantizable layer
            (unused, may be None, for ``param_size``, ``qerr_only``, ``fisher``, ``exact_quad``).
        bits: candidate bit widths (ints in quant.SUPPORTED_BITS).
        variant: one of VARIANTS (old names: DEPRECATED_VARIANTS, with a DeprecationWarning).
        per_channel, method: the weight quantizer's granularity and step init, as in QAT.
        seed: the permutation of the ``permuted_trace`` variant.
        input_size: the probe input used to list the layers (models.quantizable_layers).
        batches, criterion: calibration batches (and mean-reduced loss) for ``fisher`` and
            ``exact_quad``.

    Returns:
        DataFrame index = layer (forward order, name "layer"), columns = bits (ints), values >= 0;
        attrs: variant, bits, per_channel, method, seed.
    """
    variant = _check_variant(variant)
    bits = _check_bits(bits)
    if variant in DATA_VARIANTS and batches is None:
        raise SensitivityError(f"variant {variant!r} needs calibration batches: pass "
                               f"batches=data.calibration_batches(train_split, n_samples=512)")
    weights = _layer_weights(model, input_size)
    names = list(weights)
    needs_trace = variant in ("joint", "trace_size", "trace", "permuted_trace")
    t_avg = _avg_traces(traces_df, names) if needs_trace else np.zeros(len(names))
    if variant == "permuted_trace":
        t_avg = np.random.default_rng(seed).permutation(t_avg)
    deltas = {n: {b: quant.quantize_weight(w, b, per_channel=per_channel, method=method) - w
                  for b in bits} for n, w in weights.items()}
    if variant == "fisher":
        fisher = fisher_diagonal(model, batches, layers=names, criterion=criterion)
        rows = [[float((fisher[n].double() * deltas[n][b].double().pow(2)).sum()) for b in bits]
                for n in names]
    elif variant == "exact_quad":
        quad = quadratic_forms(model, batches, deltas, criterion=criterion)
        rows = [[quad.loc[(n, b), "quad"] for b in bits] for n in names]
        rows = np.clip(np.asarray(rows, dtype=np.float64), 0.0, None).tolist()
    else:
        rows = []
        for name, t in zip(names, t_avg):
            w = weights[name]
            if variant == "trace":
                rows.append([t * 4.0 ** -(b - _REF_BITS) for b in bits])
            elif variant == "param_size":
                rows.append([w.numel() * 4.0 ** -(b - _REF_BITS) for b in bits])
            elif variant == "trace_size":
                rows.append([t * analytic_noise(w, b, per_channel=per_channel, method=method)
                             for b in bits])
            else:
                dw = [float(deltas[name][b].double().pow(2).sum()) for b in bits]
                rows.append(dw if variant == "qerr_only" else [t * d for d in dw])
    df = pd.DataFrame(rows, index=pd.Index(names, name="layer"), columns=list(bits),
                      dtype=np.float64)
    df.attrs.update({"variant": variant, "bits": list(bits), "per_channel": per_channel,
                     "method": method, "seed": seed})
    return df


# --------------------------------------------------------------------------------------------
# Data-based Ω: diagonal empirical Fisher and exact quadratic forms
# --------------------------------------------------------------------------------------------
def fisher_diagonal(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
                    layers: Sequence[str] | None = None, criterion: Callable | None = None,
                    chunk: int = 64) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher F_i = (1/N) Σ_n (∂ℓ_n/∂W_i)² of every layer's weight, from
    per-sample gradients (torch.func vmap), BN in eval mode (docs/method.md §3, "fisher").

    ``criterion(logits, y)`` must be mean-reduced; it is applied to one sample at a time.
    """
    batches = check_batches(batches)
    criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
    first = next(model.parameters())
    names = list(layers) if layers is not None else [
        i.name for i in select_layers(model, None, (1,) + tuple(batches[0][0].shape[1:]),
                                       first.device)]
    keys = [f"{n}.weight" for n in names]
    state = {k: v.detach() for k, v in model.named_parameters()}
    state.update({k: v for k, v in model.named_buffers()})
    rest = {k: v for k, v in state.items() if k not in keys}
    mine = {k: state[k] for k in keys}

    def loss_one(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, {**rest, **p}, (x.unsqueeze(0),))
        return criterion(out, y.unsqueeze(0))

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))
    acc = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in mine.items()}
    n = 0
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        for x, y in batches:
            x, y = x.to(first.device), y.to(first.device)
            for xs, ys in zip(torch.split(x, chunk), torch.split(y, chunk)):
                g = per_sample(mine, xs, ys)
                for k in keys:
                    acc[k] += g[k].double().pow(2).sum(0)
                n += xs.shape[0]
    finally:
        for m, training in modes:
            m.training = training
    return {name: (acc[k] / n).to(mine[k].dtype) for name, k in zip(names, keys)}


def quadratic_forms(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    deltas: Mapping[str, Mapping[int, torch.Tensor]], *,
                    criterion: Callable | None = None) -> pd.DataFrame:
    """ΔWᵀ H_ii ΔW and gᵢᵀ ΔW for every (layer i, key b) of ``deltas`` (docs/method.md §3):
    H_ii and g_i of the size-weighted mean loss over ``batches`` (BN in eval mode), one
    first-order graph per batch and one HVP per (layer, key).

    Returns a frame indexed by (layer, bits) with columns ``quad`` and ``grad_dot``.
    """
    batches = check_batches(batches)
    criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
    modules = dict(model.named_modules())
    names = list(deltas)
    unknown = [n for n in names if n not in modules or not hasattr(modules[n], "weight")]
    if unknown:
        raise SensitivityError(f"deltas name {unknown}, which are not weight layers of the model")
    params = [modules[n].weight for n in names]
    first = next(model.parameters())
    total = sum(x.shape[0] for x, _ in batches)
    quad = {(n, b): 0.0 for n in names for b in deltas[n]}
    gdot = dict(quad)
    with measurement_mode(model, params, first.device):
        for x, y in batches:
            w = x.shape[0] / total
            x, y = x.to(first.device), y.to(first.device)
            grads = torch.autograd.grad(criterion(model(x), y), params, create_graph=True)
            for n, p, g in zip(names, params, grads):
                for b, d in deltas[n].items():
                    d = d.to(p.device, p.dtype)
                    hv = torch.autograd.grad(g, p, grad_outputs=d, retain_graph=True)[0]
                    quad[(n, b)] += w * float(torch.vdot(hv.reshape(-1), d.reshape(-1)))
                    gdot[(n, b)] += w * float(torch.vdot(g.detach().reshape(-1), d.reshape(-1)))
            del grads
    idx = pd.MultiIndex.from_tuples(list(quad), names=["layer", "bits"])
    return pd.DataFrame({"quad": list(quad.values()), "grad_dot": list(gdot.values())},
                        index=idx)


# --------------------------------------------------------------------------------------------
# Serialisation
# --------------------------------------------------------------------------------------------
def omega_to_json(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write an Ω table (and its attrs) as JSON, atomically; floats round-trip exactly."""
    blob = {"index": [str(i) for i in df.index], "bits": [int(c) for c in df.columns],
            "values": df.to_numpy(dtype=np.float64).tolist(), "attrs": df.attrs}
    return runtime.atomic_write_text(path, json.dumps(blob) + "\n")


def omega_from_json(path: str | os.PathLike) -> pd.DataFrame:
    """Read a table written by :func:`omega_to_json` (int bit columns, attrs restored)."""
    blob = json.loads(Path(path).read_text(encoding="utf-8"))
    try:
        df = pd.DataFrame(blob["values"], index=pd.Index(blob["index"], name="layer"),
                          columns=[int(b) for b in blob["bits"]], dtype=np.float64)
    except KeyError as exc:
        raise SensitivityError(f"{path} is not an Ω table written by omega_to_json "
                               f"(missing key {exc})") from None
    df.attrs.update(blob.get("attrs", {}))
    return df


# --------------------------------------------------------------------------------------------
# Validation: does ΣΩ rank post-training damage?
# --------------------------------------------------------------------------------------------
def sample_configs(layers: Sequence[str], bits: Sequence[int], n_configs: int, *,
                   fixed: Mapping[str, int] | None = None, seed: int = 0,
                   spread: float = 1.0) -> list[dict[str, int]]:
    """Random bit configs spanning sizes: per config a target t ~ U[min b, max b], then per free
    layer the candidate nearest to t + N(0, spread²); ``fixed`` layers keep their bits."""
    rng = np.random.default_rng(seed)
    cand = np.array(sorted(bits), dtype=np.float64)
    fixed = dict(fixed or {})
    out = []
    for _ in range(n_configs):
        t = rng.uniform(cand[0], cand[-1])
        cfg = {}
        for name in layers:
            if name in fixed:
                cfg[name] = int(fixed[name])
            else:
                cfg[name] = int(cand[np.abs(cand - (t + rng.normal(0.0, spread))).argmin()])
        out.append(cfg)
    return out


def _evaluate(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
              criterion: Callable, device: torch.device) -> tuple[float, float]:
    """(size-weighted mean loss, top-1 %) of ``model`` on ``batches``: :func:`hmqat.train.evaluate`."""
    ev = train.evaluate(model, batches, device, criterion=criterion)
    return ev["loss"], ev["top1"]


def _check_omegas(omegas: Mapping[str, pd.DataFrame], bits: Sequence[int] | None,
                  fixed: Mapping[str, int] | None) -> tuple[list[str], tuple[int, ...]]:
    """The common layer list and candidate bits of the Ω tables; errors name the mismatch."""
    if not isinstance(omegas, Mapping) or not omegas:
        raise SensitivityError("omegas must be a non-empty dict {variant: Ω table}, e.g. "
                               "{'joint': omega_table(model, traces)}")
    first_name, first = next(iter(omegas.items()))
    layers = list(first.index)
    for name, om in omegas.items():
        if list(om.index) != layers:
            raise SensitivityError(f"omegas[{name!r}] has layers {list(om.index)}, but "
                                   f"omegas[{first_name!r}] has {layers}; build every table "
                                   f"for the same model")
    bits = _check_bits(bits if bits is not None else list(first.columns))
    for name, om in omegas.items():
        missing = [b for b in bits if b not in om.columns]
        if missing:
            raise SensitivityError(f"omegas[{name!r}] has no column for bits {missing}; build "
                                   f"it with omega_table(..., bits={list(bits)})")
    for k, b in (fixed or {}).items():
        if k not in layers:
            raise SensitivityError(f"fixed layer {k!r} is not a layer of the Ω tables {layers}")
        if b not in omegas[first_name].columns:
            raise SensitivityError(f"fixed[{k!r}] = {b!r} is not a column of the Ω tables "
                                   f"{list(first.columns)}")
    return layers, bits


def _partial_spearman(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[float, float]:
    """Spearman correlation of x and y with the ranks of z regressed out (t test, n-3 df)."""
    rx, ry, rz = (stats.rankdata(a) for a in (x, y, z))
    design = np.column_stack([np.ones_like(rz), rz])
    res = [r - design @ np.linalg.lstsq(design, r, rcond=None)[0] for r in (rx, ry)]
    if len(x) < 4 or min(np.std(r) for r in res) < 1e-9:   # x or y is a function of z's ranks
        return float("nan"), float("nan")
    rho = float(np.corrcoef(*res)[0, 1])
    dof = len(x) - 3
    t = rho * math.sqrt(dof / max(1e-300, 1 - rho * rho))
    return rho, float(2 * stats.t.sf(abs(t), dof))


def validate_omega(model: nn.Module, omegas: Mapping[str, pd.DataFrame],
                   eval_batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
                   n_configs: int = 30, bits: Sequence[int] | None = None,
                   fixed: Mapping[str, int] | None = None, seed: int = 0,
                   per_channel: bool = True, method: str = "lsq",
                   criterion: Callable | None = None, device: str | torch.device | None = None,
                   progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Quantize the FP32 weights post-training (no QAT, activations FP, BN as is) with
    ``n_configs`` random bit configs (:func:`sample_configs`), measure the loss increase on
    ``eval_batches`` and correlate it with ΣΩ of each variant.

    Returns:
        per_config: one row per (config, variant): config_id, variant, avg_bits, size_mb, loss,
            loss_increase, top1, top1_drop, omega (= Σ_i Ω_i(b_i)), config (JSON).
        summary: one row per variant: spearman_rho, spearman_p (scipy.stats.spearmanr),
            partial_rho, partial_p (Spearman with avg_bits partialled out: does Ω rank configs of
            similar size?), n_configs.
    """
    if not isinstance(n_configs, numbers.Integral) or n_configs < 3:
        raise SensitivityError(f"n_configs={n_configs!r}: need an int >= 3 for a rank correlation "
                               f"(>= 30 recommended)")
    layers, bits = _check_omegas(omegas, bits, fixed)
    batches = check_batches(eval_batches)
    modules = dict(model.named_modules())
    unknown = [n for n in layers if n not in modules or not hasattr(modules[n], "weight")]
    if unknown:
        raise SensitivityError(f"Ω layers {unknown} are not weight layers of the model")
    first = next(model.parameters())
    device = torch.device(device) if device is not None else first.device
    criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
    configs = sample_configs(layers, bits, n_configs, fixed=fixed, seed=seed)
    weights = {n: modules[n].weight for n in layers}
    saved = {n: w.detach().clone() for n, w in weights.items()}
    n_par = np.array([saved[n].numel() for n in layers], dtype=np.float64)
    qcache: dict[tuple[str, int], torch.Tensor] = {}
    modes = [(m, m.training) for m in model.modules()]
    rows = []
    bar = runtime.progress(total=n_configs + 1, desc="omega validation", unit="config",
                           disable=not progress)
    try:
        model.eval()
        base_loss, base_top1 = _evaluate(model, batches, criterion, device)
        bar.update(1)
        for cid, cfg in enumerate(configs):
            with torch.no_grad():
                for n in layers:
                    key = (n, cfg[n])
                    if key not in qcache:
                        qcache[key] = quant.quantize_weight(saved[n], cfg[n],
                                                            per_channel=per_channel,
                                                            method=method)
                    weights[n].copy_(qcache[key])
            loss, top1 = _evaluate(model, batches, criterion, device)
            b = np.array([cfg[n] for n in layers], dtype=np.float64)
            common = {"config_id": cid, "avg_bits": float((b * n_par).sum() / n_par.sum()),
                      "size_mb": quant.model_size_mb(model, cfg, per_channel=per_channel),
                      "loss": loss, "loss_increase": loss - base_loss, "top1": top1,
                      "top1_drop": base_top1 - top1, "config": json.dumps(cfg)}
            for variant, om in omegas.items():
                omega = float(sum(om.at[n, cfg[n]] for n in layers))
                rows.append({**common, "variant": variant, "omega": omega})
            bar.update(1)
    finally:
        bar.close()
        with torch.no_grad():
            for n, w in weights.items():
                w.copy_(saved[n])
        for m, training in modes:
            m.training = training
    cols = ["config_id", "variant", "avg_bits", "size_mb", "loss", "loss_increase", "top1",
            "top1_drop", "omega", "config"]
    per_config = pd.DataFrame(rows)[cols]
    per_config.attrs.update({"fp32_loss": base_loss, "fp32_top1": base_top1, "seed": seed,
                             "bits": list(bits), "n_eval": sum(x.shape[0] for x, _ in batches)})
    return per_config, _summary(per_config)


def _summary(per_config: pd.DataFrame) -> pd.DataFrame:
    """Spearman ρ (and the size-partialled ρ) of ΣΩ vs loss increase per variant."""
    out = []
    for variant, sub in per_config.groupby("variant", sort=False):
        res = stats.spearmanr(sub["omega"], sub["loss_increase"])
        prho, pp = _partial_spearman(sub["omega"].to_numpy(), sub["loss_increase"].to_numpy(),
                                     sub["avg_bits"].to_numpy())
        out.append({"variant": variant, "spearman_rho": float(res.statistic),
                    "spearman_p": float(res.pvalue), "partial_rho": prho, "partial_p": pp,
                    "n_configs": len(sub)})
    return pd.DataFrame(out)


# --------------------------------------------------------------------------------------------
# Experiments that tell sensitivity apart from size (docs/method.md §3; notebook 01)
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _swapped_weights(model: nn.Module, new: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Replace the weights of the named layers for the ``with`` block; restored afterwards."""
    modules = dict(model.named_modules())
    saved = {n: modules[n].weight.detach().clone() for n in new}
    try:
        with torch.no_grad():
            for n, w in new.items():
                modules[n].weight.copy_(w)
        yield
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                modules[n].weight.copy_(w)


def _eval_mode_loss(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
                    criterion: Callable | None = None) -> tuple[float, float]:
    """(mean loss, top-1 %) of ``model`` in eval mode; the caller's train/eval flags restored."""
    modes = [(m, m.training) for m in model.modules()]
    first = next(model.parameters())
    try:
        model.eval()
        return _evaluate(model, batches, criterion or nn.CrossEntropyLoss(), first.device)
    finally:
        for m, training in modes:
            m.training = training


def _loglog_slope(pred: np.ndarray, meas: np.ndarray) -> tuple[float, int]:
    """OLS slope of log(measured) on log(predicted) over the rows where both are > 0."""
    ok = (pred > 0) & (meas > 0) & np.isfinite(pred) & np.isfinite(meas)
    if ok.sum() < 3:
        return float("nan"), int(ok.sum())
    return float(np.polyfit(np.log(pred[ok]), np.log(meas[ok]), 1)[0]), int(ok.sum())


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman ρ, NaN (not a warning) when either side is constant: a bootstrap resample of a
    few rows can be, and ρ is undefined there (the percentile interval drops NaN draws)."""
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    rx, ry = _average_ranks(x), _average_ranks(y)   # Pearson of the ranks (scipy's ρ)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / np.sqrt((rx * rx).sum() * (ry * ry).sum()))


def _average_ranks(a: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (scipy.stats.rankdata's default),
    in numpy: the bootstrap calls this tens of thousands of times, where scipy's per-call
    overhead dominated the sensitivity report."""
    sorter = np.argsort(a, kind="mergesort")
    inv = np.empty_like(sorter)
    inv[sorter] = np.arange(len(a))
    s = a[sorter]
    first = np.r_[True, s[1:] != s[:-1]]
    dense = first.cumsum()[inv]
    bounds = np.r_[np.nonzero(first)[0], len(a)]
    return 0.5 * (bounds[dense] + bounds[dense - 1] + 1)


def prediction_summary(df: pd.DataFrame, predictors: Sequence[str],
                       measured: str = "measured") -> pd.DataFrame:
    """Per predictor: Spearman ρ (all rows), log-log slope and median measured/predicted ratio
    (rows where both are > 0), each with a percentile bootstrap 95 % CI over the rows
    (hmqat.stats.bootstrap_ci). A slope of 1 and ratio 1 mean the prediction holds in scale."""
    out = []
    meas = df[measured].to_numpy(float)
    for p in predictors:
        pred = df[p].to_numpy(float)

        def rho(idx: np.ndarray, pred: np.ndarray = pred) -> float:
            return _spearman(pred[idx], meas[idx])

        def slope(idx: np.ndarray, pred: np.ndarray = pred) -> float:
            return _loglog_slope(pred[idx], meas[idx])[0]

        def ratio(idx: np.ndarray, pred: np.ndarray = pred) -> float:
            ok = (pred[idx] > 0) & (meas[idx] > 0)
            return float(np.median(meas[idx][ok] / pred[idx][ok])) if ok.any() else float("nan")

        row: dict[str, Any] = {"predictor": p}
        for name, fn in (("spearman_rho", rho), ("loglog_slope", slope),
                         ("median_ratio", ratio)):
            try:
                row[name], row[f"{name}_low"], row[f"{name}_high"] = bootstrap_ci(
                    fn, len(df), n_boot=1000)
            except (IndexError, ValueError):
                row[name], row[f"{name}_low"], row[f"{name}_high"] = (
                    fn(np.arange(len(df))), float("nan"), float("nan"))
        row.update({"n": len(df), "n_positive": _loglog_slope(pred, meas)[1]})
        out.append(row)
    return pd.DataFrame(out)


def single_layer_study(model: nn.Module, traces_df: pd.DataFrame,
                       calib_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                       eval_batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
                       bits: Sequence[int] = (2, 3, 4), layers: Sequence[str] | None = None,
                       per_channel: bool = True, method: str = "lsq",
                       progress: bool = True) -> pd.DataFrame:
    """One layer at a time (HAWQ-V2's check, docs/method.md §3 "Experiment 1"): quantize only
    layer i to b bits (weights only, activations FP, BN as is) and compare the measured loss
    increase on ``eval_batches`` with

        pred_trace = ½ T̄_i ||ΔW||²      (isotropic trace approximation)
        pred_quad  = ½ ΔWᵀ H_ii ΔW      (exact second-order term, one HVP)
        grad_dot   = g_iᵀ ΔW            (first-order term)
        pred_taylor = grad_dot + pred_quad

    with H_ii and g_i of the loss over ``calib_batches`` (the data the traces came from).

    Returns one row per (layer, bits): n_params, qerr (= ||ΔW||²), avg_trace, measured,
    pred_trace, pred_quad, grad_dot, pred_taylor, top1_drop. ``attrs``: base_loss, base_top1.
    """
    evalb = check_batches(eval_batches)
    calib = check_batches(calib_batches)
    bits = _check_bits(bits)
    weights = _layer_weights(model, (1,) + tuple(calib[0][0].shape[1:]))
    names = list(layers) if layers is not None else list(weights)
    t_avg = dict(zip(weights, _avg_traces(traces_df, list(weights))))
    deltas = {n: {b: quant.quantize_weight(weights[n], b, per_channel=per_channel,
                                           method=method) - weights[n] for b in bits}
              for n in names}
    qf = quadratic_forms(model, calib, deltas)
    base_loss, base_top1 = _eval_mode_loss(model, evalb)
    rows = []
    bar = runtime.progress(total=len(names) * len(bits), desc="single-layer quantization", unit="eval",
                           disable=not progress)
    try:
        for n in names:
            for b in bits:
                d = deltas[n][b]
                with _swapped_weights(model, {n: weights[n] + d}):
                    loss, top1 = _eval_mode_loss(model, evalb)
                quad, gdot = qf.loc[(n, b), "quad"], qf.loc[(n, b), "grad_dot"]
                qerr = float(d.double().pow(2).sum())
                rows.append({"layer": n, "bits": b, "n_params": int(d.numel()), "qerr": qerr,
                             "avg_trace": float(t_avg[n]), "measured": loss - base_loss,
                             "pred_trace": 0.5 * t_avg[n] * qerr, "pred_quad": 0.5 * quad,
                             "grad_dot": gdot, "pred_taylor": gdot + 0.5 * quad,
                             "top1_drop": base_top1 - top1})
                bar.update(1)
    finally:
        bar.close()
    df = pd.DataFrame(rows)
    df.attrs.update({"base_loss": base_loss, "base_top1": base_top1})
    return df


def noise_study(model: nn.Module, traces_df: pd.DataFrame,
                eval_batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
                matched_bits: int = 4, n_pairs: int = 2, seed: int = 0, per_channel: bool = True,
                method: str = "lsq", layers: Sequence[str] | None = None,
                progress: bool = True) -> pd.DataFrame:
    """Matched isotropic noise (docs/method.md §3 "Experiment 2"): on one layer at a time add
    ε ~ N(0, σ² I) with n_i σ² = ||Q_b(W_i) − W_i||² at ``matched_bits``, and compare the
    antithetic mean ΔL = ½[L(W+ε) + L(W−ε)] − L(W) (first-order term cancels exactly) with
    E[ΔL] = ½ σ² Tr(H_ii) = ½ σ² n_i T̄_i.

    Returns one row per layer: sigma2, measured (mean over pairs), measured_se (over pairs),
    predicted, predicted_se (from the trace SE), ratio = measured / predicted.
    """
    evalb = check_batches(eval_batches)
    weights = _layer_weights(model, (1,) + tuple(evalb[0][0].shape[1:]))
    t_all = dict(zip(weights, _avg_traces(traces_df, list(weights))))
    names = list(layers) if layers is not None else list(weights)
    t_avg = [t_all[n] for n in names]
    t_se = traces_df.loc[names, "avg_trace_se"].to_numpy(float)
    base_loss, _ = _eval_mode_loss(model, evalb)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    bar = runtime.progress(total=len(names) * n_pairs * 2, desc="matched noise", unit="eval",
                           disable=not progress)
    try:
        for n, t, se in zip(names, t_avg, t_se):
            w = weights[n]
            qerr = weight_perturbation(w, matched_bits, per_channel=per_channel, method=method)
            sigma2 = qerr / w.numel()
            vals = []
            for _ in range(n_pairs):
                eps = torch.randn(w.shape, generator=gen, dtype=w.dtype) * math.sqrt(sigma2)
                pair = []
                for sign in (1.0, -1.0):
                    with _swapped_weights(model, {n: w + sign * eps.to(w.device)}):
                        pair.append(_eval_mode_loss(model, evalb)[0] - base_loss)
                    bar.update(1)
                vals.append(0.5 * sum(pair))
            v = np.asarray(vals)
            pred = 0.5 * sigma2 * w.numel() * t
            rows.append({"layer": n, "n_params": int(w.numel()), "sigma2": sigma2,
                         "measured": float(v.mean()),
                         "measured_se": float(v.std(ddof=1) / math.sqrt(len(v)))
                         if len(v) > 1 else float("nan"),
                         "predicted": pred, "predicted_se": 0.5 * sigma2 * w.numel() * se,
                         "ratio": float(v.mean() / pred) if pred > 0 else float("nan")})
    finally:
        bar.close()
    return pd.DataFrame(rows)


def additivity_study(model: nn.Module, single: pd.DataFrame,
                     eval_batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
                     n_configs: int = 24, exclude: Iterable[str] = (), seed: int = 0,
                     per_channel: bool = True, method: str = "lsq",
                     progress: bool = True) -> pd.DataFrame:
    """Additivity (docs/method.md §3 "Experiment 3"): quantize a random subset of k layers
    (k uniform in 2..L, bits drawn from the bits of ``single``; the other layers and
    ``exclude`` stay FP32, weights only) and compare the measured ΔL with the sum of the
    single-layer ΔL of :func:`single_layer_study` for the same (layer, bits).

    Returns one row per config: k, avg_bits_quantized, measured, sum_single, n_2bit, config.
    """
    evalb = check_batches(eval_batches)
    table = single.set_index(["layer", "bits"])["measured"]
    excl = set(exclude)
    names = [n for n in dict.fromkeys(single["layer"]) if n not in excl]
    cand = sorted(set(int(b) for b in single["bits"]))
    weights = _layer_weights(model, (1,) + tuple(evalb[0][0].shape[1:]))
    rng = np.random.default_rng(seed)
    base_loss, _ = _eval_mode_loss(model, evalb)
    rows = []
    bar = runtime.progress(total=n_configs, desc="additivity", unit="eval",
                           disable=not progress)
    try:
        for cid in range(n_configs):
            k = int(rng.integers(2, len(names) + 1))
            chosen = rng.choice(len(names), size=k, replace=False)
            cfg = {names[i]: int(rng.choice(cand)) for i in sorted(chosen)}
            new = {n: quant.quantize_weight(weights[n], b, per_channel=per_channel,
                                            method=method) for n, b in cfg.items()}
            with _swapped_weights(model, new):
                loss, _ = _eval_mode_loss(model, evalb)
            rows.append({"config_id": cid, "k": k, "measured": loss - base_loss,
                         "sum_single": float(sum(table[(n, b)] for n, b in cfg.items())),
                         "n_2bit": sum(b == 2 for b in cfg.values()), "config": json.dumps(cfg)})
            bar.update(1)
    finally:
        bar.close()
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# Fixed-size configurations (size-neutral bit swaps)
# --------------------------------------------------------------------------------------------
def size_target_bits(inputs: Mapping[str, Any], compression: float) -> float:
    """Σ n_i b_i (bits) that a model with ``search.model_inputs`` accounting ``inputs`` needs
    for ``compression`` (Eq. S of docs/method.md §4: size = Σ n_i b_i/8 + 4·other_params)."""
    if not (isinstance(compression, (int, float)) and compression > 0):
        raise SensitivityError(f"compression={compression!r}: need a number > 0, e.g. 10.34")
    size_bytes = 4.0 * inputs["fp32_params"] / compression
    return 8.0 * (size_bytes - 4.0 * inputs["other_params"])


def fixed_size_configs(model: nn.Module, n: int, *, compression: float,
                       bits: Sequence[int] = DEFAULT_BITS, policy: str = "first_last_8",
                       a_bits: int | None = 4, per_channel: bool = True, rel_tol: float = 0.01,
                       seed: int = 0, thin: int = 25,
                       input_size: tuple[int, ...] = (1, 3, 32, 32)) -> list[dict[str, int]]:
    """``n`` distinct bit configs whose model size (quant.model_size_mb, a_bits accounting) is
    within ±``rel_tol`` of the size at ``compression`` (docs/method.md §3 "Experiment 4").

    A seeded Markov chain of size-neutral bit swaps: move one free layer to a random other
    width, then, if the size left the band, move the one other layer (and width) that brings it
    closest to the target; keep the move only if the size is inside the band. Every ``thin``
    accepted moves one config is recorded (duplicates skipped). The policy's fixed layers keep
    their widths. Raises SensitivityError when the band cannot be reached.
    """
    if not isinstance(n, numbers.Integral) or n < 1:
        raise SensitivityError(f"n={n!r}: need an int >= 1 configs")
    if not 0 < rel_tol < 0.5:
        raise SensitivityError(f"rel_tol={rel_tol!r}: need 0 < rel_tol < 0.5 (0.01 = ±1 %)")
    bits = _check_bits(bits)
    inp = search.model_inputs(model, a_bits=a_bits, policy=policy, per_channel=per_channel,
                              input_size=input_size)
    fixed = inp["fixed"]
    names = list(inp["n_params"])
    free = [k for k in names if k not in fixed]
    if not free:
        raise SensitivityError("every layer is fixed by the policy; nothing to allocate")
    nw = np.array([inp["n_params"][k] for k in free], dtype=np.float64)
    cand = np.array(bits, dtype=np.int64)
    target_total = size_target_bits(inp, compression)
    const = float(sum(inp["n_params"][k] * b for k, b in fixed.items()))
    # the band on the whole size (bytes) -> band on Σ n_i b_i (bits)
    size_target = 4.0 * inp["fp32_params"] / compression
    lo = 8.0 * (size_target * (1 - rel_tol) - 4.0 * inp["other_params"])
    hi = 8.0 * (size_target * (1 + rel_tol) - 4.0 * inp["other_params"])
    total_min, total_max = const + nw.sum() * cand[0], const + nw.sum() * cand[-1]
    if hi < total_min or lo > total_max:
        raise SensitivityError(
            f"compression {compression:g}x is out of reach with bits {list(bits)}: sizes from "
            f"{(total_min / 8 + 4 * inp['other_params']) / 2**20:.4g} to "
            f"{(total_max / 8 + 4 * inp['other_params']) / 2**20:.4g} MB are possible")
    rng = np.random.default_rng(seed)
    # start: every free layer at the width nearest the uniform average, then greedy repair
    avg = (target_total - const) / nw.sum()
    cur = np.full(len(free), int(cand[np.abs(cand - avg).argmin()]))
    for _ in range(10 * len(free)):
        tot = const + float(nw @ cur)
        if lo <= tot <= hi:
            break
        delta = (cand[None, :] - cur[:, None]) * nw[:, None]            # [layer, width]
        i, j = np.unravel_index(np.abs(tot + delta - target_total).argmin(), delta.shape)
        cur[i] = cand[j]
    if not lo <= const + float(nw @ cur) <= hi:
        raise SensitivityError(f"no config within ±{rel_tol:.0%} of {compression:g}x found; "
                               f"widen rel_tol or add candidate bits")
    out: list[dict[str, int]] = []
    seen: set[tuple[int, ...]] = set()
    accepted = 0
    for _ in range(200 * thin * n):
        prop = cur.copy()
        i = int(rng.integers(len(free)))
        others = cand[cand != prop[i]]
        prop[i] = int(rng.choice(others))
        tot = const + float(nw @ prop)
        if not lo <= tot <= hi and len(free) > 1:
            delta = (cand[None, :] - prop[:, None]) * nw[:, None]
            delta[i] = np.inf                                       # do not undo the move
            err = np.abs(tot + delta - target_total)
            j, k = np.unravel_index(err.argmin(), err.shape)
            prop[j] = cand[k]
            tot = const + float(nw @ prop)
        if not lo <= tot <= hi:
            continue
        cur = prop
        accepted += 1
        if accepted % thin == 0 and tuple(cur) not in seen:
            seen.add(tuple(cur))
            cfg = {k: int(fixed[k]) if k in fixed else 0 for k in names}
            cfg.update({k: int(b) for k, b in zip(free, cur)})
            out.append(cfg)
            if len(out) == n:
                return out
    raise SensitivityError(f"found only {len(out)} distinct configs within ±{rel_tol:.0%} of "
                           f"{compression:g}x; ask for fewer, widen rel_tol or add bits")


# --------------------------------------------------------------------------------------------
# Post-training evaluation with QAT's quantizers (4-bit activations, BN re-estimated)
# --------------------------------------------------------------------------------------------
def ptq_evaluate(model: nn.Module, config: Mapping[str, int],
                 calib_batches: list[tuple[torch.Tensor, torch.Tensor]],
                 eval_batches: list[tuple[torch.Tensor, torch.Tensor]], *, a_bits: int | None = 4,
                 policy: str = "first_last_8", init: str = "lsq", per_channel: bool = True,
                 bn_images: int | None = None, calib_max_batches: int | None = 2
                 ) -> tuple[float, float]:
    """(loss, top-1 %) on ``eval_batches`` of ``model`` quantized post-training as QAT starts
    (docs/method.md §3 "Experiment 4"): quant.quantize_model (weights at ``config``, inputs at
    ``a_bits``), activation steps from the first ``calib_max_batches`` calibration batches (2,
    as train.quantize_and_fit does), then BatchNorm re-estimated on all ``calib_batches``
    (hmqat.bn.reestimate_bn) with the quantizers active."""
    q = ptq_model(model, config, calib_batches, a_bits=a_bits, policy=policy, init=init,
                  per_channel=per_channel, bn_images=bn_images,
                  calib_max_batches=calib_max_batches)
    return _eval_mode_loss(q, eval_batches)


def ptq_model(model: nn.Module, config: Mapping[str, int],
              calib_batches: list[tuple[torch.Tensor, torch.Tensor]], *, a_bits: int | None = 4,
              policy: str = "first_last_8", init: str = "lsq", per_channel: bool = True,
              bn_images: int | None = None, calib_max_batches: int | None = 2) -> nn.Module:
    """The quantized model :func:`ptq_evaluate` scores (a copy; ``model`` is unchanged): weights
    at ``config``, activation steps from the first ``calib_max_batches`` batches, BatchNorm
    re-estimated on ``calib_batches``. Zero QAT steps: the start of every QAT run."""
    q = quant.quantize_model(model, config, a_bits=a_bits, policy=policy, init=init,
                             per_channel=per_channel)
    quant.calibrate_activations(q, calib_batches, max_batches=calib_max_batches)
    reestimate_bn(q, calib_batches, max_images=bn_images)
    return q


class PTQCache:
    """Memo of :func:`ptq_evaluate` keyed by the config, so a config picked by several variants
    (or drawn twice) is evaluated once."""

    def __init__(self, model: nn.Module, calib_batches, eval_batches, **kwargs: Any):
        self.model, self.kwargs = model, kwargs
        self.calib = check_batches(calib_batches)
        self.evalb = check_batches(eval_batches)
        self.memo: dict[str, tuple[float, float]] = {}
        self.fp32 = _eval_mode_loss(model, self.evalb)

    def __call__(self, config: Mapping[str, int]) -> tuple[float, float]:
        key = json.dumps(dict(config), sort_keys=True)
        if key not in self.memo:
            self.memo[key] = ptq_evaluate(self.model, config, self.calib, self.evalb,
                                          **self.kwargs)
        return self.memo[key]


def _config_columns(model_inputs: Mapping[str, Any], cfg: Mapping[str, int]) -> dict[str, Any]:
    """size_mb, compression, avg_bits, n_2bit of one config (search.model_inputs accounting)."""
    n_w = model_inputs["n_params"]
    size = (sum(n_w[k] * b for k, b in cfg.items()) / 8 + 4.0 * model_inputs["other_params"])
    return {"size_mb": size / 2 ** 20, "compression": 4.0 * model_inputs["fp32_params"] / size,
            "avg_bits": sum(n_w[k] * b for k, b in cfg.items()) / sum(n_w.values()),
            "n_2bit": int(sum(b == 2 for b in cfg.values()))}


def fixed_size_validation(model: nn.Module, omegas: Mapping[str, pd.DataFrame],
                          configs: Sequence[Mapping[str, int]], cache: PTQCache, *,
                          a_bits: int | None = 4, policy: str = "first_last_8",
                          progress: bool = True,
                          checkpoint: str | os.PathLike | None = None) -> pd.DataFrame:
    """Evaluate ``configs`` post-training (:class:`PTQCache`) and attach Σ_i Ω_i(b_i) of every
    variant (docs/method.md §3 "Experiment 4"). One row per config: config_id, loss,
    loss_increase, top1, top1_drop, size_mb, compression, avg_bits, n_2bit, omega_<variant>...,
    config (JSON). ``checkpoint``: a CSV rewritten after every config; rows already in it (same
    config) are not evaluated again."""
    inp = search.model_inputs(model, a_bits=a_bits, policy=policy)
    base_loss, base_top1 = cache.fp32
    if checkpoint is not None and Path(checkpoint).exists():
        for _, r in pd.read_csv(checkpoint).iterrows():
            cache.memo.setdefault(json.dumps(json.loads(r["config"]), sort_keys=True),
                                  (float(r["loss"]), float(r["top1"])))
    rows = []
    bar = runtime.progress(total=len(configs), desc="fixed-size validation", unit="config",
                           disable=not progress)
    try:
        for cid, cfg in enumerate(configs):
            loss, top1 = cache(cfg)
            row = {"config_id": cid, "loss": loss, "loss_increase": loss - base_loss,
                   "top1": top1, "top1_drop": base_top1 - top1, **_config_columns(inp, cfg)}
            for v, om in omegas.items():
                row[f"omega_{v}"] = float(sum(om.at[k, b] for k, b in cfg.items()))
            row["config"] = json.dumps(dict(cfg))
            rows.append(row)
            if checkpoint is not None:
                runtime.atomic_write_text(checkpoint, pd.DataFrame(rows).to_csv(index=False,
                                                                         lineterminator="\n"))
            bar.update(1)
    finally:
        bar.close()
    df = pd.DataFrame(rows)
    df.attrs.update({"fp32_loss": base_loss, "fp32_top1": base_top1})
    return df


def kendall_tau_b(x: np.ndarray, y: np.ndarray) -> float:
    """Kendall's τ-b of two samples (scipy.stats.kendalltau's default), from the pair sign
    matrices: Σ sign(x_i − x_j)·sign(y_i − y_j) / √(Σ sign(x_i − x_j)² · Σ sign(y_i − y_j)²),
    i.e. (P − Q)/√((P + Q + T_y)(P + Q + T_x)). O(n²) numpy instead of scipy's per-call
    overhead, which dominated the bootstrap (2,000 resamples × every predictor). NaN when
    either sample is constant (τ undefined)."""
    dx = np.sign(x[:, None] - x[None, :])
    dy = np.sign(y[:, None] - y[None, :])
    den = float(np.sqrt((dx * dx).sum() * (dy * dy).sum()))
    return float((dx * dy).sum() / den) if den > 0 else float("nan")


def kendall_table(per_config: pd.DataFrame, predictors: Sequence[str], *,
                  reference: str = "omega_joint", target: str = "loss_increase",
                  n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Kendall τ of each predictor column with ``target`` over the configs, a percentile
    bootstrap CI (hmqat.stats.bootstrap_ci, configs resampled), and the paired bootstrap of
    τ(reference) − τ(predictor) on the same resamples (docs/method.md §3)."""
    y = per_config[target].to_numpy(float)
    cols = {p: per_config[p].to_numpy(float) for p in predictors}
    ref = per_config[reference].to_numpy(float)

    def tau(x: np.ndarray, idx: np.ndarray) -> float:
        return kendall_tau_b(x[idx], y[idx])

    def boot(fn: Callable[[np.ndarray], float]) -> tuple[float, float, float]:
        """bootstrap_ci; NaN bounds when (almost) every resample has a constant column."""
        try:
            return bootstrap_ci(fn, len(y), n_boot=n_boot, seed=seed)
        except IndexError:
            return fn(np.arange(len(y))), float("nan"), float("nan")

    rows = []
    for p in predictors:
        x = cols[p]
        t, lo, hi = boot(lambda idx, x=x: tau(x, idx))
        row = {"predictor": p, "kendall_tau": t, "tau_low": lo, "tau_high": hi,
               "n_configs": len(y)}
        if p != reference:
            d, dlo, dhi = boot(lambda idx, x=x: tau(ref, idx) - tau(x, idx))
            row.update({"ref_minus_tau": d, "diff_low": dlo, "diff_high": dhi})
        else:
            row.update({"ref_minus_tau": float("nan"), "diff_low": float("nan"),
                        "diff_high": float("nan")})
        rows.append(row)
    out = pd.DataFrame(rows)
    out.attrs["reference"] = reference
    return out


def ptq_frontier(model: nn.Module, omegas: Mapping[str, pd.DataFrame],
                 compressions: Sequence[float], cache: PTQCache, *,
                 bits: Sequence[int] = DEFAULT_BITS, n_random: int = 20,
                 a_bits: int | None = 4, policy: str = "first_last_8",
                 random_configs: Mapping[float, Sequence[Mapping[str, int]]] | None = None,
                 seed: int = 0, progress: bool = True,
                 checkpoint: str | os.PathLike | None = None) -> pd.DataFrame:
    """PTQ frontier curves (docs/method.md §3 "Experiment 6"): for each target compression the
    top-1 (post-training, ``cache``'s quantizers) of every variant's Pareto pick
    (search.model_frontier + search.select) against ``n_random`` random configs of the same
    size (:func:`fixed_size_configs`, ±1 %; reused from ``random_configs`` where given).

    One row per (compression, kind, name): kind "pick" (name = variant) or "random"
    (name = draw index), size_mb, compression_actual, avg_bits, n_2bit, loss, top1, config.
    """
    inp = search.model_inputs(model, a_bits=a_bits, policy=policy)
    fronts = {v: search.model_frontier(model, om, bits, a_bits=a_bits, policy=policy)
              for v, om in omegas.items()}
    jobs: list[tuple[float, str, str, dict[str, int]]] = []
    for r in compressions:
        for v, fr in fronts.items():
            jobs.append((r, "pick", v, dict(search.select(fr, min_compression=r)["config"])))
        given = list((random_configs or {}).get(r, []))[:n_random]
        extra = fixed_size_configs(model, n_random - len(given), compression=r, bits=bits,
                                   policy=policy, a_bits=a_bits,
                                   seed=seed + int(round(100 * r))) \
            if len(given) < n_random else []
        for k, cfg in enumerate(given + extra):
            jobs.append((r, "random", str(k), dict(cfg)))
    rows = []
    bar = runtime.progress(total=len(jobs), desc="PTQ frontier", unit="config",
                           disable=not progress)
    try:
        for r, kind, name, cfg in jobs:
            loss, top1 = cache(cfg)
            c = _config_columns(inp, cfg)
            rows.append({"target_compression": r, "kind": kind, "name": name,
                         "size_mb": c["size_mb"], "compression_actual": c["compression"],
                         "avg_bits": c["avg_bits"], "n_2bit": c["n_2bit"], "loss": loss,
                         "top1": top1, "config": json.dumps(cfg)})
            if checkpoint is not None:   # rows so far, so a stopped run keeps what it measured
                runtime.atomic_write_text(checkpoint, pd.DataFrame(rows).to_csv(index=False,
                                                                         lineterminator="\n"))
            bar.update(1)
    finally:
        bar.close()
    df = pd.DataFrame(rows)
    df.attrs.update({"fp32_loss": cache.fp32[0], "fp32_top1": cache.fp32[1]})
    return df


def with_fixed_size_randoms(front: pd.DataFrame, fixed: pd.DataFrame,
                            compression: float) -> pd.DataFrame:
    """``front`` plus the fixed-size configs (:func:`fixed_size_validation` rows, all within
    ±1 % of ``compression``) as its "random" rows at that compression, unless it has some."""
    has = (front["kind"] == "random") & np.isclose(front["target_compression"], compression)
    if has.any() or fixed.empty:
        return front
    extra = pd.DataFrame({"target_compression": compression, "kind": "random",
                          "name": fixed["config_id"].astype(str), "size_mb": fixed["size_mb"],
                          "compression_actual": fixed["compression"],
                          "avg_bits": fixed["avg_bits"], "n_2bit": fixed["n_2bit"],
                          "loss": fixed["loss"], "top1": fixed["top1"],
                          "config": fixed["config"]})
    return pd.concat([front, extra], ignore_index=True)


def frontier_summary(front: pd.DataFrame) -> pd.DataFrame:
    """Per (target compression, variant): the pick's top-1, the random configs' median and
    [min, max], and the pick's percentile among them (share of random configs it beats)."""
    rows = []
    for r, sub in front.groupby("target_compression", sort=True):
        rnd = sub[sub["kind"] == "random"]["top1"].to_numpy(float)
        nan = float("nan")
        for _, pick in sub[sub["kind"] == "pick"].iterrows():
            rows.append({"target_compression": r, "variant": pick["name"],
                         "top1": pick["top1"], "compression_actual": pick["compression_actual"],
                         "n_2bit": pick["n_2bit"],
                         "random_median": float(np.median(rnd)) if len(rnd) else nan,
                         "random_min": float(rnd.min()) if len(rnd) else nan,
                         "random_max": float(rnd.max()) if len(rnd) else nan,
                         "beats_random_pct": float(100 * np.mean(pick["top1"] > rnd))
                         if len(rnd) else nan, "n_random": len(rnd)})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# Traces only as precise as the decision needs
# --------------------------------------------------------------------------------------------
def _picks(qerr: pd.DataFrame, avg_trace: np.ndarray, inputs: Mapping[str, Any],
           compressions: Sequence[float], bits: Sequence[int]) -> list[tuple[int, ...]]:
    """The joint-Ω Pareto pick (as a bits tuple in qerr's layer order) at each compression."""
    om = qerr.mul(np.clip(avg_trace, 0.0, None), axis=0)
    front = search.pareto_frontier(om, inputs["n_params"], bits, fixed=inputs["fixed"],
                                   other_params=inputs["other_params"],
                                   fp32_params=inputs["fp32_params"])
    out = []
    for r in compressions:
        cfg = search.select(front, min_compression=r)["config"]
        out.append(tuple(int(cfg[k]) for k in qerr.index))
    return out


def decision_is_stable(qerr: pd.DataFrame, avg_trace: Sequence[float],
                       avg_trace_se: Sequence[float], inputs: Mapping[str, Any],
                       compressions: Sequence[float], *, bits: Sequence[int] | None = None,
                       z: float = 1.96, n_random: int = 32, seed: int = 0,
                       regret: float | None = None) -> tuple[bool, dict[str, Any]]:
    """Does any perturbation of the traces within their CI change the selected configs?
    (docs/method.md §3, "decision-based stopping").

    Ω = T̄_i·qerr_i(b) (the ``joint`` form, ``qerr`` = the qerr_only table). The picks at every
    ``compressions`` budget are recomputed for T̄ ± z·SE one layer at a time (2L perturbations)
    and for ``n_random`` random corners of the box T̄ + z·SE·{−1, +1}^L (seeded); stable when all
    of them give the same picks. A layer with a non-finite SE makes it unstable.

    ``regret``: instead of "the same pick", ask for a pick that is good under every plausible
    trace vector: stable when, for every perturbation T' and budget, the base pick's
    ΣΩ(T') exceeds the best pick's ΣΩ(T') by at most ``regret`` (relative, e.g. 0.02). Near-ties,
    whose order the traces cannot settle, then no longer keep the probing going.

    Returns (stable, info): info["picks"] (base picks), info["n_checked"],
    info["changed_by"] (description of the first perturbation that changed a pick, or None),
    info["max_regret"] (largest relative regret seen; 0 when every pick was unchanged).
    """
    t = np.asarray(avg_trace, dtype=np.float64)
    se = np.asarray(avg_trace_se, dtype=np.float64)
    if t.shape != (len(qerr),) or se.shape != t.shape:
        raise SensitivityError(f"avg_trace and avg_trace_se need one value per layer of qerr "
                               f"({len(qerr)}), got {t.shape} and {se.shape}")
    bits = list(qerr.columns) if bits is None else list(bits)
    base = _picks(qerr, t, inputs, compressions, bits)
    info: dict[str, Any] = {"picks": base, "n_checked": 0, "changed_by": None,
                            "max_regret": 0.0}
    if regret is not None and not regret >= 0:
        raise SensitivityError(f"regret={regret!r}: use None (same pick) or a relative "
                               f"tolerance >= 0, e.g. 0.02")
    q = qerr[bits].to_numpy(np.float64)
    col = {b: j for j, b in enumerate(bits)}

    def cost(pick: tuple[int, ...], trace: np.ndarray) -> float:
        """ΣΩ of ``pick`` under ``trace`` (Eq. Ω, joint form)."""
        return float(sum(np.clip(trace[i], 0.0, None) * q[i, col[b]]
                         for i, b in enumerate(pick)))
    if not np.isfinite(se).all():
        info["changed_by"] = "non-finite SE"
        return False, info
    rng = np.random.default_rng(seed)
    perturbations = []
    for i in range(len(t)):
        for sign in (1.0, -1.0):
            e = np.zeros_like(t)
            e[i] = sign
            perturbations.append((f"layer {qerr.index[i]} {'+' if sign > 0 else '-'}{z:g} SE", e))
    for k in range(n_random):
        perturbations.append((f"random corner {k}", rng.choice([-1.0, 1.0], size=len(t))))
    for desc, e in perturbations:
        info["n_checked"] += 1
        tp = t + z * se * e
        picks = _picks(qerr, tp, inputs, compressions, bits)
        if picks == base:
            continue
        if regret is not None:
            worst = max((cost(b0, tp) - cost(p, tp)) / max(cost(p, tp), 1e-300)
                        for b0, p in zip(base, picks))
            info["max_regret"] = max(info["max_regret"], worst)
            if worst <= regret:
                continue
        info["changed_by"] = desc
        return False, info
    return True, info


def decision_stop_rule(model: nn.Module, compressions: Sequence[float], *,
                       bits: Sequence[int] = DEFAULT_BITS, a_bits: int | None = 4,
                       policy: str = "first_last_8", per_channel: bool = True,
                       method: str = "lsq", z: float = 1.96, n_random: int = 32,
                       seed: int = 0, regret: float | None = None
                       ) -> Callable[[pd.DataFrame], bool]:
    """A ``stop_rule`` for :func:`hmqat.hessian.layer_traces`: True (stop probing) once
    :func:`decision_is_stable` (with ``regret``) holds for the current traces at
    ``compressions``. The callable keeps ``.history`` (one dict per check: probes, stable,
    changed_by, picks, max_regret)."""
    qerr = omega_table(model, None, bits, variant="qerr_only", per_channel=per_channel,
                       method=method)
    inp = search.model_inputs(model, a_bits=a_bits, policy=policy, per_channel=per_channel)

    def rule(traces_df: pd.DataFrame) -> bool:
        t = traces_df.loc[qerr.index, "avg_trace"].to_numpy(float)
        se = traces_df.loc[qerr.index, "avg_trace_se"].to_numpy(float)
        ok, info = decision_is_stable(qerr, t, se, inp, compressions, bits=bits, z=z,
                                      n_random=n_random, seed=seed, regret=regret)
        rule.history.append({"probes": int(traces_df["probes"].max()), "stable": ok,
                             "changed_by": info["changed_by"], "picks": info["picks"],
                             "max_regret": info["max_regret"]})
        return ok

    rule.history = []  # type: ignore[attr-defined]
    return rule


def calibration_variability(model: nn.Module, calib_sets: Sequence[list[tuple[torch.Tensor,
                                                                              torch.Tensor]]],
                            *, tol: float = 0.1, max_probes: int = 64, seed: int = 0,
                            compressions: Sequence[float] = (10.34,),
                            bits: Sequence[int] = DEFAULT_BITS, a_bits: int | None = 4,
                            policy: str = "first_last_8", method: str = "lsq",
                            cache_dir: str | os.PathLike | None = None,
                            progress: bool = True, trace_method: str = "auto"
                            ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """How much do the traces move between disjoint calibration sets, which the stratified SE
    (probe noise on *these* images) leaves out? (docs/method.md §3).

    ``trace_method`` goes to :func:`hmqat.hessian.layer_traces` (``method=``). Returns
    (per_layer, picks): per_layer has one row per layer with the mean over sets, the between-set
    SD, the mean within-set (probe) SE and their ratio, and, for exact traces, the mean
    per-image SE ``data_se`` (the between-set SD it predicts) and ``between_over_data_se``;
    picks one row per (set, compression) with the joint-Ω pick (JSON) and whether it equals set
    0's.
    """
    if len(calib_sets) < 2:
        raise SensitivityError("calibration_variability needs >= 2 disjoint calibration sets")
    frames = [hessian.layer_traces(model, c, tol=tol, max_probes=max_probes, seed=seed + k,
                                   cache_dir=cache_dir, progress=progress, method=trace_method)
              for k, c in enumerate(calib_sets)]
    t = np.stack([f["avg_trace"].to_numpy(float) for f in frames])
    se = np.stack([f["avg_trace_se"].to_numpy(float) for f in frames])
    names = list(frames[0].index)
    per_layer = pd.DataFrame({"layer": names, "avg_trace_mean": t.mean(0),
                              "between_set_sd": t.std(0, ddof=1), "within_set_se": se.mean(0)})
    with np.errstate(divide="ignore", invalid="ignore"):    # exact traces: no probe SE
        per_layer["between_over_within"] = (per_layer["between_set_sd"]
                                            / per_layer["within_set_se"].replace(0, np.nan))
    per_layer["between_rel_sd"] = per_layer["between_set_sd"] / np.abs(per_layer["avg_trace_mean"])
    if all("data_se" in f for f in frames):       # per-image spread: predicts between_set_sd
        per_layer["data_se"] = np.stack([f["data_se"].to_numpy(float) for f in frames]).mean(0)
        per_layer["between_over_data_se"] = per_layer["between_set_sd"] / per_layer["data_se"]
    qerr = omega_table(model, None, bits, variant="qerr_only", method=method)
    inp = search.model_inputs(model, a_bits=a_bits, policy=policy)
    rows = []
    ref = None
    for k, f in enumerate(frames):
        picks = _picks(qerr, f.loc[qerr.index, "avg_trace"].to_numpy(float), inp, compressions,
                       bits)
        ref = picks if ref is None else ref
        for r, p, p0 in zip(compressions, picks, ref):
            rows.append({"set": k, "target_compression": r, "same_as_set0": p == p0,
                         "n_layers_changed": int(sum(a != b for a, b in zip(p, p0))),
                         "wall_s": f.attrs.get("wall_s", float("nan")),
                         "config": json.dumps(dict(zip(qerr.index, p)))})
    return per_layer, pd.DataFrame(rows)
