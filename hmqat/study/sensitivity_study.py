"""The sensitivity study of notebook 01 (docs/method.md §3.1–§3.3): runs the discrimination
experiments of :mod:`hmqat.sensitivity` stage by stage (cheapest first, each stage's frame kept
as a CSV so a rerun resumes), and writes their tables and figures.

    >>> from hmqat.study import sensitivity_study
    >>> res = sensitivity_study.run_study(model, train_ds, val_ds, "results/quick")  # +SKIP
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from .. import data as hdata
from .. import hessian, quant, runtime
from ..sensitivity import (DEFAULT_BITS, VARIANTS, PTQCache, SensitivityError,
                           additivity_study, calibration_variability, fixed_size_configs,
                           fixed_size_validation, frontier_summary, kendall_table, noise_study,
                           omega_table, prediction_summary, ptq_frontier, single_layer_study,
                           with_fixed_size_randoms)
from ..stats import bootstrap_ci
from . import plotting
from .reporting import write_table


# --------------------------------------------------------------------------------------------
# The whole study (notebook 01 and the quick-profile run call this) and its report
# --------------------------------------------------------------------------------------------
STUDY_STAGES = ("traces", "omegas", "single_layer", "noise", "additivity", "fixed_size",
                "frontier", "variability")


def _csv(root: Path, name: str) -> Path:
    """Where :func:`run_study` publishes a stage's raw frame: root/data/sensitivity/<name>.csv."""
    return root / "data" / "sensitivity" / f"{name}.csv"


def work_dir(root: str | os.PathLike, model: nn.Module, settings: Mapping[str, Any]) -> Path:
    """The resume folder of one study: root/cache/sensitivity/<key>, key = sha256 of the model's
    weights and every setting that changes a number. Stages resume only from here (git-ignored),
    never from the published CSVs: a changed model or setting starts afresh, and a fresh clone
    recomputes instead of replaying committed results."""
    h = hashlib.sha256(runtime.model_fingerprint(model).encode())
    h.update(runtime.to_json(dict(settings), indent=None).encode())
    return Path(root) / "cache" / "sensitivity" / h.hexdigest()[:16]


def run_study(model: nn.Module, train_ds: Any, val_ds: Any, root: str | os.PathLike, *,
              stages: Sequence[str] = STUDY_STAGES, bits: Sequence[int] = DEFAULT_BITS,
              a_bits: int | None = 4, policy: str = "first_last_8", method: str = "lsq",
              calib_samples: int = 512, calib_batch: int = 128, trace_tol: float = 0.05,
              trace_method: str = "auto",
              trace_max_probes: int = 64, single_bits: Sequence[int] = (2, 3, 4),
              noise_pairs: int = 1, noise_every: int = 1, additivity_configs: int = 16,
              fixed_configs: int = 64,
              target_compression: float = 10.34,
              frontier_compressions: Sequence[float] = (6.0, 10.34, 14.0),
              frontier_random: int = 20, variability_sets: int = 3, variability_tol: float = 0.1,
              seed: int = 0, eval_batch: int = 500, progress: bool = True,
              channels_last: bool = True, fixed_reverse: bool = False,
              report: Callable[[dict[str, pd.DataFrame]], None] | None = None,
              omega_tables: Mapping[str, pd.DataFrame] | None = None
              ) -> dict[str, pd.DataFrame]:
    """Run the experiments of docs/method.md §3 in ``stages`` (cheapest first), on calibration
    images from ``train_ds`` and every measured loss/accuracy on all of ``val_ds``.

    Every finished stage is published as ``root/data/sensitivity/<stage>.csv``; a stage whose
    CSV already exists in the study's :func:`work_dir` (same weights, same settings) is read
    back instead of recomputed (resume). ``report(results)`` (e.g. a partial of
    :func:`write_study_report`) is called after every stage so finished parts are on disk
    early. ``omega_tables``: Ω of every variant, already computed by the caller from the same
    model, traces and calibration settings (notebook 01 shows them first), so the most costly
    tables (``fisher``, ``exact_quad``) are not computed twice. Returns {name: frame}.
    """
    unknown = [s for s in stages if s not in STUDY_STAGES]
    if omega_tables is not None and set(VARIANTS) - set(omega_tables):
        raise SensitivityError(f"omega_tables lacks the variants "
                               f"{sorted(set(VARIANTS) - set(omega_tables))}; pass every one of "
                               f"{VARIANTS} (sensitivity.omega_table) or None")
    if unknown:
        raise SensitivityError(f"unknown stage(s) {unknown}; use some of {STUDY_STAGES}")
    root = Path(root)
    (root / "data" / "sensitivity").mkdir(parents=True, exist_ok=True)
    work = work_dir(root, model, dict(
        bits=list(bits), a_bits=a_bits, policy=policy, method=method,
        calib_samples=calib_samples, calib_batch=calib_batch, trace_tol=trace_tol,
        trace_method=trace_method,
        trace_max_probes=trace_max_probes, single_bits=list(single_bits),
        noise_pairs=noise_pairs, noise_every=noise_every,
        additivity_configs=additivity_configs, fixed_configs=fixed_configs,
        target_compression=target_compression,
        frontier_compressions=list(frontier_compressions), frontier_random=frontier_random,
        variability_sets=variability_sets, variability_tol=variability_tol, seed=seed,
        train_images=len(train_ds), val_images=len(val_ds)))
    work.mkdir(parents=True, exist_ok=True)
    dev = next(model.parameters()).device
    calib = hdata.calibration_batches(train_ds, n_samples=calib_samples, batch_size=calib_batch,
                                      seed=seed, device=dev)
    val = list(hdata.make_loader(val_ds, batch_size=eval_batch, device=dev))
    if channels_last:   # same float32 math, ~1.5x faster convolutions on CPU (measured)
        model.to(memory_format=torch.channels_last)
        val = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in val]
    fixed = quant.fixed_layers(model, policy)
    res: dict[str, pd.DataFrame] = {}

    def done(name: str) -> bool:
        p = _csv(work, name)
        if p.exists():
            res[name] = pd.read_csv(p)
            return True
        return False

    def save(name: str, df: pd.DataFrame) -> None:
        """Each stage's CSV as soon as it is done (a crashed study resumes from them); the
        report (tables with bootstrap CIs, figures) is written once, at the end."""
        res[name] = df
        for folder in (work, root):
            runtime.atomic_write_text(_csv(folder, name),
                                      df.to_csv(index=False, lineterminator="\n"))

    traces = hessian.layer_traces(model, calib, tol=trace_tol, max_probes=trace_max_probes,
                                  seed=seed, cache_dir=root / "cache", progress=progress,
                                  method=trace_method)
    if "traces" in stages and not done("traces"):
        save("traces", traces.reset_index())
    omegas: dict[str, pd.DataFrame] = {}
    if {"omegas", "fixed_size", "frontier"} & set(stages):
        if done("omegas"):   # the tables of an earlier run of the same stage
            for v, sub in res["omegas"].groupby("variant", sort=False):
                om = sub.pivot(index="layer", columns="bits", values="omega")
                om = om.loc[list(dict.fromkeys(sub["layer"]))]
                om.columns = [int(c) for c in om.columns]
                omegas[v] = om
        elif omega_tables is not None:   # the caller's tables of these settings
            omegas = {v: omega_tables[v] for v in VARIANTS}
        else:
            omegas = {v: omega_table(model, traces, bits, variant=v, seed=seed, method=method,
                                     batches=calib) for v in VARIANTS}
    if "omegas" in stages and "omegas" not in res:
        long = pd.concat([om.stack().rename("omega").reset_index().assign(variant=v)
                          for v, om in omegas.items()])
        long.columns = ["layer", "bits", "omega", "variant"]
        save("omegas", long)
    if "single_layer" in stages and not done("single_layer"):
        save("single_layer", single_layer_study(model, traces, calib, val, bits=single_bits,
                                                method=method, progress=progress))
    if "noise" in stages and not done("noise"):
        save("noise", noise_study(model, traces, val, n_pairs=noise_pairs, seed=seed,
                                  method=method, progress=progress,
                                  layers=list(traces.index)[::noise_every]))
    if "additivity" in stages and "single_layer" in res and not done("additivity"):
        save("additivity", additivity_study(model, res["single_layer"], val,
                                            n_configs=additivity_configs, exclude=fixed,
                                            seed=seed, method=method, progress=progress))
    cache = None
    configs: list[dict[str, int]] = []
    if {"fixed_size", "frontier"} & set(stages):
        cache = PTQCache(model, calib, val, a_bits=a_bits, policy=policy, init=method)
        configs = fixed_size_configs(model, fixed_configs, compression=target_compression,
                                     bits=bits, policy=policy, a_bits=a_bits, seed=seed)
    if "fixed_size" in stages and not done("fixed_size"):
        if fixed_reverse:   # a second process working from the other end (merge_fixed_size)
            fixed_size_validation(model, omegas, configs[::-1], cache, a_bits=a_bits,
                                  policy=policy, progress=progress,
                                  checkpoint=_csv(work, "fixed_size_partial_rev"))
        else:
            per = fixed_size_validation(model, omegas, configs, cache, a_bits=a_bits,
                                        policy=policy, progress=progress,
                                        checkpoint=_csv(work, "fixed_size_partial"))
            save("fixed_size", per)
    if "fixed_size" not in res and "fixed_size" in stages:
        merged = merge_fixed_size(work, configs)
        if merged is not None:
            res["fixed_size"] = merged
    if "fixed_size" in res and "kendall" not in res:
        preds = [f"omega_{v}" for v in VARIANTS] + ["n_2bit", "avg_bits"]
        res["kendall"] = kendall_table(res["fixed_size"], preds, seed=seed)
    if "frontier" in stages and not done("frontier"):
        if "fixed_size" in res:   # the target-size random configs are the fixed-size ones
            for cfg in res["fixed_size"]["config"]:
                cache.memo.setdefault(json.dumps(json.loads(cfg), sort_keys=True),
                                      tuple(res["fixed_size"].set_index("config")
                                            .loc[cfg, ["loss", "top1"]]))
        front = ptq_frontier(model, omegas, frontier_compressions, cache, bits=bits,
                             n_random=frontier_random, a_bits=a_bits, policy=policy,
                             random_configs={target_compression: configs}, seed=seed,
                             progress=progress, checkpoint=_csv(work, "frontier_partial"))
        save("frontier", front)
    if "frontier" in res:
        fs = res.get("fixed_size")
        if fs is None and _csv(work, "fixed_size_partial").exists():
            fs = pd.read_csv(_csv(work, "fixed_size_partial"))
        if fs is not None:
            res["frontier"] = with_fixed_size_randoms(res["frontier"], fs, target_compression)
    if "variability" in stages and variability_sets > 0 and not done("variability_picks"):
        n_sets = variability_sets
        pool = hdata.calibration_subset(train_ds, min(len(train_ds), n_sets * calib_samples),
                                        seed=seed + 1000)
        idx = torch.arange(len(pool))
        sets = [list(hdata.make_loader(pool.subset(idx[k::n_sets]), batch_size=calib_batch,
                                       device=dev)) for k in range(n_sets)]
        per_layer, picks = calibration_variability(
            model, sets, tol=variability_tol, max_probes=trace_max_probes, seed=seed,
            compressions=[target_compression], bits=bits, a_bits=a_bits, policy=policy,
            method=method, cache_dir=root / "cache", progress=progress,
            trace_method=trace_method)
        save("variability_layers", per_layer)
        save("variability_picks", picks)
    if "variability_picks" in res and "variability_layers" not in res:
        done("variability_layers")
    if report is not None:
        report(res)
    return res


def merge_fixed_size(work: str | os.PathLike, configs: Sequence[Mapping[str, int]]
                     ) -> pd.DataFrame | None:
    """The fixed-size rows evaluated so far by the forward and the reverse process (their
    checkpoint CSVs under the study's :func:`work_dir` ``work``/data/sensitivity), one row per config of ``configs`` that either
    finished, config_id = its index in ``configs``; None when neither has a row."""
    parts = [pd.read_csv(p) for p in (_csv(Path(work), "fixed_size_partial"),
                                      _csv(Path(work), "fixed_size_partial_rev")) if p.exists()]
    if not parts:
        return None
    allrows = pd.concat(parts, ignore_index=True)
    allrows["key"] = [json.dumps(json.loads(c), sort_keys=True) for c in allrows["config"]]
    allrows = allrows.drop_duplicates("key")
    order = {json.dumps(dict(c), sort_keys=True): i for i, c in enumerate(configs)}
    allrows["config_id"] = allrows["key"].map(order)
    allrows = allrows.dropna(subset=["config_id"]).astype({"config_id": int})
    return allrows.drop(columns="key").sort_values("config_id").reset_index(drop=True)


def study_tables(res: Mapping[str, pd.DataFrame]) -> dict[str, tuple[pd.DataFrame, str]]:
    """The summary tables of the study ({stem: (frame, caption)}) from :func:`run_study`'s
    results; only the parts present are built."""
    out: dict[str, tuple[pd.DataFrame, str]] = {}
    if "single_layer" in res:
        sl = res["single_layer"]
        preds = ["pred_trace", "pred_quad", "pred_taylor", "grad_dot"]
        parts = [prediction_summary(sl, preds).assign(bits="all")]
        parts += [prediction_summary(sub, preds[:2]).assign(bits=str(b))
                  for b, sub in sl.groupby("bits", sort=True)]
        t = pd.concat(parts, ignore_index=True)
        t = t[["bits"] + [c for c in t.columns if c != "bits"]]
        out["single_layer_summary"] = (t, f"One layer at a time ({len(sl)} layer x bits cells, "
                                          f"weights only): measured loss increase vs predictions "
                                          f"(per bit width: ranks layers at equal bits), "
                                          f"bootstrap 95 % CIs over cells")
    if "noise" in res:
        nz = res["noise"]
        t = prediction_summary(nz, ["predicted"])
        t["median_ratio_ci"] = str(_median_ci(nz["ratio"].to_numpy(float)))
        out["noise_summary"] = (t, "Matched isotropic noise on one layer: antithetic loss "
                                   "increase vs 1/2 sigma^2 Tr(H_ii)")
    if "additivity" in res:
        out["additivity_summary"] = (prediction_summary(res["additivity"], ["sum_single"]),
                                     "Additivity: a config's loss increase vs the sum of its "
                                     "single-layer increases")
    if "kendall" in res:
        n = int(res["kendall"]["n_configs"].iloc[0])
        out["kendall_fixed_size"] = (res["kendall"], f"Kendall tau of predictor vs PTQ loss "
                                     f"increase over {n} configs within 1 % of the target size "
                                     f"(4-bit activations, BN re-estimated); bootstrap 95 % CIs; "
                                     f"ref_minus_tau = tau(joint) - tau(predictor), paired")
    if "frontier" in res:
        out["ptq_frontier_summary"] = (frontier_summary(res["frontier"]),
                                       "PTQ frontier: each variant's Pareto pick vs random "
                                       "configs of the same size (4-bit activations, BN "
                                       "re-estimated, no QAT)")
    if "variability_layers" in res:
        out["trace_variability"] = (res["variability_layers"],
                                    "Average traces on disjoint calibration sets: between-set "
                                    "SD vs the stratified within-set (probe) SE and, for exact "
                                    "traces, the per-image SE data_se")
    if "variability_picks" in res:
        out["trace_variability_picks"] = (res["variability_picks"].drop(columns="config"),
                                          "Joint-Omega pick per disjoint calibration set")
    return out


def _ci(row: Mapping[str, Any], col: str, low: str, high: str) -> str:
    """'value [low, high]' of one summary-table row, 2 decimals."""
    return f"{row[col]:.2f} [{row[low]:.2f}, {row[high]:.2f}]"


def verdict(tables: Mapping[str, tuple[pd.DataFrame, str]]) -> str:
    """The study's verdict as markdown, computed from :func:`study_tables` (so an executed
    notebook states what *its* run measured). The rules (docs/method.md §3): a predictor "holds"
    in scale when its log-log slope CI contains 1; the Hessian "adds" over a baseline only when
    the paired τ(joint) − τ(baseline) CI lies above 0; allocation "matters" when a pick beats
    ≥ 95 % of the random configs of its size."""
    lines: list[str] = []
    if "single_layer_summary" in tables:
        t = tables["single_layer_summary"][0]
        t = t[t["bits"] == "all"].set_index("predictor")
        parts = [f"`{p}` slope {_ci(t.loc[p], 'loglog_slope', 'loglog_slope_low', 'loglog_slope_high')}"
                 f", Spearman {t.loc[p, 'spearman_rho']:.2f}"
                 for p in ("pred_quad", "pred_trace") if p in t.index]
        lines.append("1. **One layer at a time** (measured ΔL vs ½ΔWᵀH_iiΔW = `pred_quad` and "
                     "½T̄‖ΔW‖² = `pred_trace`; slope 1 = right in scale): " + "; ".join(parts))
    if "noise_summary" in tables:
        r = tables["noise_summary"][0].iloc[0]
        lines.append(f"2. **Matched noise** (are the traces right?): measured/predicted "
                     f"½σ²Tr(H_ii) median {r['median_ratio']:.2f} [{r['median_ratio_low']:.2f}, "
                     f"{r['median_ratio_high']:.2f}] over {int(r['n'])} layers (1 = right)")
    if "additivity_summary" in tables:
        r = tables["additivity_summary"][0].iloc[0]
        lines.append(f"3. **Additivity**: config ΔL / Σ single-layer ΔL median "
                     f"{r['median_ratio']:.2f} [{r['median_ratio_low']:.2f}, "
                     f"{r['median_ratio_high']:.2f}], Spearman {r['spearman_rho']:.2f} over "
                     f"{int(r['n'])} configs")
    if "kendall_fixed_size" in tables:
        k = tables["kendall_fixed_size"][0].set_index("predictor")
        ranked = k.sort_values("kendall_tau", ascending=False)
        taus = ", ".join(f"`{p.removeprefix('omega_')}` {_ci(r, 'kendall_tau', 'tau_low', 'tau_high')}"
                         for p, r in ranked.iterrows())
        base = [p for p in ("omega_qerr_only", "n_2bit", "avg_bits", "omega_param_size")
                if p in k.index and np.isfinite(k.loc[p, "diff_low"])]
        above = [p for p in base if k.loc[p, "diff_low"] > 0]
        diffs = ", ".join(f"vs `{p.removeprefix('omega_')}` {_ci(k.loc[p], 'ref_minus_tau', 'diff_low', 'diff_high')}"
                          for p in base)
        below = [p.removeprefix("omega_") for p in base if k.loc[p, "diff_high"] < 0]
        says = ("the Hessian-weighted ΣΩ (`joint`) ranks configs better than "
                + ", ".join(f"`{p.removeprefix('omega_')}`" for p in above)
                if above else "**the Hessian adds nothing measurable over the size/error-only "
                              "baselines here**")
        if below:
            says += f" (and `joint` ranks worse than {', '.join(f'`{p}`' for p in below)})"
        lines.append(f"4. **Fixed size** ({int(k['n_configs'].iloc[0])} configs within ±1 % of "
                     f"the target): Kendall τ with the loss increase {taus}. Paired τ(joint) − "
                     f"τ(baseline): {diffs}: {says}.")
    if "ptq_frontier_summary" in tables:
        f = tables["ptq_frontier_summary"][0]
        per = []
        for r, sub in f.groupby("target_compression", sort=True):
            n_rand = int(sub["n_random"].iloc[0]) if "n_random" in sub else 0
            beats = (sub["beats_random_pct"] >= 95).sum()
            per.append(f"{r:g}×: {beats}/{len(sub)} picks beat ≥ 95 % of {n_rand} random "
                       f"same-size configs (picks {sub['top1'].min():.1f}–{sub['top1'].max():.1f} "
                       f"%, random median {sub['random_median'].iloc[0]:.1f} %)")
        lines.append("5. **PTQ frontier** (does allocation matter?): " + "; ".join(per))
    if "trace_variability" in tables:
        v = tables["trace_variability"][0]
        # exact traces have no probe SE; their per-image SE (data_se) predicts the between-set SD
        col, what = (("between_over_data_se", "per-image SE of the exact traces (data_se)")
                     if "between_over_data_se" in v else
                     ("between_over_within", "stratified probe SE"))
        text = (f"6. **Calibration sets**: between-set SD / {what} median {v[col].median():.2f} "
                f"(range {v[col].min():.2f}–{v[col].max():.2f}); between-set SD "
                f"{v['between_rel_sd'].min():.0%}–{v['between_rel_sd'].max():.0%} of the trace")
        if "trace_variability_picks" in tables:
            p = tables["trace_variability_picks"][0]
            text += (f"; the joint-Ω pick equals set 0's in {int(p['same_as_set0'].sum())} of "
                     f"{len(p)} (set, budget) rows")
        lines.append(text)
    return "\n".join(lines) if lines else "No part of the study ran."


def _median_ci(x: np.ndarray) -> tuple[float, float, float]:
    """Median of x with a bootstrap 95 % CI (hmqat.stats.bootstrap_ci), rounded to 3 digits."""
    x = x[np.isfinite(x)]
    if len(x) < 2:
        return (float("nan"),) * 3
    m, lo, hi = bootstrap_ci(lambda idx: float(np.median(x[idx])), len(x))
    return round(m, 3), round(lo, 3), round(hi, 3)


def write_study_report(res: Mapping[str, pd.DataFrame], root: str | os.PathLike, *,
                       data_label: str, profile: str, split_label: str) -> list[Path]:
    """Write the study's tables (root/tables, via reporting.write_table) and figures
    (root/figures, via the hmqat.plotting functions) for the parts of ``res`` present.
    ``data_label`` and ``split_label`` go into every table header and figure subtitle."""
    root = Path(root)
    label = f"{data_label}; {split_label}"
    written: list[Path] = []
    for stem, (df, caption) in study_tables(res).items():
        written += list(write_table(df, root / "tables" / f"sensitivity_{stem}", caption=caption,
                                    data_label=label, profile=profile,
                                    float_format="{:.3g}").values())
    sub = f"{data_label}, {profile} profile; {split_label}"
    figs = {
        "single_layer": lambda: plotting.plot_single_layer(res["single_layer"], subtitle=sub),
        "noise": lambda: plotting.plot_noise_check(res["noise"], subtitle=sub),
        "additivity": lambda: plotting.plot_additivity(res["additivity"], subtitle=sub),
        "kendall": lambda: plotting.plot_kendall(res["kendall"], subtitle=sub),
        "frontier": lambda: plotting.plot_ptq_frontier(res["frontier"], subtitle=sub),
    }
    for name, make in figs.items():
        if name in res:
            written += plotting.savefig(make(), root / "figures" / f"sensitivity_{name}")
    return written
