"""The perturbation table Ω_i(b), its variants, and a check that it predicts damage (docs/design.md §3).

    Ω_i(b) = T̄_i · ||Q_b(W_i) − W_i||²                         "joint" (default, HAWQ-V2/V3)   (Eq. Ω)
    Ω_i(b) = T̄_i · Σ_c n_c Δ_{c,b}² / 12                       "trace_size" (analytic noise)
    Ω_i(b) = T̄_i · 4^{-(b-2)}                                  "trace" (the trace alone)
    Ω_i(b) = ||Q_b(W_i) − W_i||²                                "size_only" (no Hessian)
    Ω_i(b) = T̄_π(i) · ||Q_b(W_i) − W_i||², π a seeded permutation  "random" (control)

T̄_i is the average Hessian trace from :func:`hmqat.hessian.layer_traces`; Q_b is
:func:`hmqat.quant.quantize_weight`, the same quantizer and *initial* step QAT starts from
(LSQ init by default, per output channel); Δ_{c,b} is that initial step of channel c and n_c its
number of weights.

Choices (docs/method.md §3 gives the reasons):

* Negative average traces (a Hutchinson estimate of a near-flat or locally concave block) are
  clipped to 0 with a warning, so Ω >= 0 as the search requires.
* ``trace``: the search needs Ω to fall with b, and "the trace alone" must not bring the layer's
  size or weight range back in. 4^{-b} is the relative noise power of a uniform quantizer over a
  fixed range (Δ ∝ 2^{-b}); it is the same for every layer, normalised to 1 at 2 bits, so layers
  are ranked by T̄_i only and size enters only through the cost axis of the Pareto search.
* ``size_only`` uses the same ||Q_b(W) − W||² as ``joint``, so joint vs size_only isolates what
  the trace adds.
* ``random`` keeps the measured traces but assigns them to layers by a seeded permutation: same
  spread of sensitivities, no information about which layer has which.

Serialise with :func:`omega_to_json` / :func:`omega_from_json` (exact round trip, atomic write),
or ``df.to_csv(path)`` and ``pd.read_csv(path, index_col=0)`` followed by
``df.columns = [int(c) for c in df.columns]``.

    >>> om = omega_table(model, traces, bits=(2, 3, 4, 5, 6, 8))            # "joint"
    >>> per_config, summary = validate_omega(model, {"joint": om}, held_out, n_configs=30)
"""
from __future__ import annotations

import json
import math
import numbers
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats
from torch import nn

from . import quant
from . import runtime, train
from .hessian import check_batches, select_layers

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

VARIANTS = ("joint", "trace_size", "trace", "size_only", "random")
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


def omega_table(model: nn.Module, traces_df: pd.DataFrame, bits: Sequence[int] = DEFAULT_BITS,
                *, variant: str = "joint", per_channel: bool = True, seed: int = 0,
                method: str = "lsq", input_size: tuple[int, ...] = (1, 3, 32, 32)
                ) -> pd.DataFrame:
    """Ω_i(b) for every quantizable layer and candidate bit width (docs/design.md §3; variants above).

    Args:
        model: the FP32 model the traces were measured on.
        traces_df: :func:`hmqat.hessian.layer_traces` output covering every quantizable layer.
        bits: candidate bit widths (ints in quant.SUPPORTED_BITS).
        variant: one of VARIANTS.
        per_channel, method: the weight quantizer's granularity and step init, as in QAT.
        seed: the permutation of the ``random`` variant.
        input_size: the probe input used to list the layers (models.quantizable_layers).

    Returns:
        DataFrame index = layer (forward order, name "layer"), columns = bits (ints), values >= 0;
        attrs: variant, bits, per_channel, method, seed.
    """
    _check_variant(variant)
    bits = _check_bits(bits)
    weights = _layer_weights(model, input_size)
    names = list(weights)
    t_avg = _avg_traces(traces_df, names)
    if variant == "random":
        t_avg = np.random.default_rng(seed).permutation(t_avg)
    rows = []
    for name, t in zip(names, t_avg):
        w = weights[name]
        if variant == "trace":
            rows.append([t * 4.0 ** -(b - _REF_BITS) for b in bits])
        elif variant == "trace_size":
            rows.append([t * analytic_noise(w, b, per_channel=per_channel, method=method)
                         for b in bits])
        else:
            dw = [weight_perturbation(w, b, per_channel=per_channel, method=method) for b in bits]
            rows.append(dw if variant == "size_only" else [t * d for d in dw])
    df = pd.DataFrame(rows, index=pd.Index(names, name="layer"), columns=list(bits),
                      dtype=np.float64)
    df.attrs.update({"variant": variant, "bits": list(bits), "per_channel": per_channel,
                     "method": method, "seed": seed})
    return df


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
