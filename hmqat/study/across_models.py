"""Across models: does any conclusion of the study change with depth? (docs/method.md §10)

Notebook 08 reads the results folders of several models, each written by notebooks 00-03
(``results/quick`` for ResNet-20; ``results/models/<arch>`` for the ``models`` profile's
ResNet-32 and -56), and puts three of the study's conclusions side by side:

1. **the trace over the quantization error**: Kendall τ of ``joint`` and of ``qerr_only``
   against the PTQ loss increase of equal-size configs, with the paired bootstrap interval of
   τ(joint) − τ(qerr_only) (notebook 01, docs/method.md §3.3);
2. **mixed against uniform at equal size** (and the 13.11× pick against uniform W2A4): test
   top-1 differences paired over seeds and test images (Eq. V, docs/method.md §8);
3. **allocation against random at PTQ**: the joint pick's validation top-1 minus the median of
   random configs of the same size (notebook 01's PTQ frontier).

It also times one QAT step of each architecture side by side (:func:`step_cost`) and sums each
model's measured wall time from its manifest (:func:`wall_times`). Nothing here trains a model
that is reported; every number comes from the folders read.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from .. import train
from ..models import create_model
from ..quant import uniform_config
from ..transitions import Recipe, make_callbacks
from . import reporting

__all__ = ["AcrossModelsError", "ModelResults", "accuracy_points", "kendall_table",
           "paired_table", "ptq_gain_table", "read_model", "read_models", "same_split",
           "split_of", "step_cost", "verdict", "wall_times"]

#: What a model's folder must hold (written by notebooks 00, 01 and 03), relative to it.
NEEDED = ("data/fp32.json", "data/qat_results.json", "tables/sensitivity_kendall_fixed_size.csv",
          "tables/sensitivity_ptq_frontier_summary.csv", "manifest.json")


class AcrossModelsError(ValueError):
    """A model's results folder is missing or incomplete; the message names the command."""


@dataclass
class ModelResults:
    """The results of one model's study, as notebook 08 reads them."""

    arch: str
    folder: Path
    profile: str
    fp32: dict[str, Any]
    runs: pd.DataFrame          # notebook 03: one row per (config, seed)
    kendall: pd.DataFrame       # notebook 01: the fixed-size Kendall table
    ptq: pd.DataFrame           # notebook 01: the PTQ frontier against random configs
    manifest: dict[str, Any]


def read_model(folder: str | Path) -> ModelResults:
    """One model's results: the files of :data:`NEEDED` in ``folder``; the architecture from
    its ``fp32.json`` (else its manifest), the profile from its manifest. Raises
    :class:`AcrossModelsError` naming what is missing."""
    folder = Path(folder)
    missing = [p for p in NEEDED if not (folder / p).is_file()]
    if missing:
        raise AcrossModelsError(
            f"{folder}: no finished study of this model ({', '.join(missing)} missing); run "
            f"notebooks 00-03 into it first (make reproduce PROFILE=quick for ResNet-20, "
            f"PROFILE=models for ResNet-32 and -56)")
    manifest = json.loads((folder / "manifest.json").read_text())
    params = (manifest.get("steps", {}).get("03_qat", {}) or {}).get("parameters", {})
    fp32 = json.loads((folder / "data/fp32.json").read_text())
    runs = pd.DataFrame(json.loads((folder / "data/qat_results.json").read_text()))
    if runs.empty:
        raise AcrossModelsError(f"{folder}/data/qat_results.json holds no run; rerun notebook "
                                f"03 of that profile")
    return ModelResults(
        arch=str(fp32.get("arch") or params.get("arch") or _arch_of(folder)), folder=folder,
        profile=str(params.get("profile") or folder.name),
        fp32=fp32, runs=runs,
        kendall=reporting.read_table(folder / "tables/sensitivity_kendall_fixed_size"),
        ptq=reporting.read_table(folder / "tables/sensitivity_ptq_frontier_summary"),
        manifest=manifest)


def _arch_of(folder: Path) -> str:
    """The architecture of a folder whose manifest names none: its FP32 checkpoint's name."""
    found = sorted((folder / "checkpoints").glob("fp32-*.pt"))
    return found[0].stem.removeprefix("fp32-") if found else folder.name


def read_models(root: str | Path, names: Sequence[str]) -> tuple[list[ModelResults], list[str]]:
    """The models of ``names`` (folders relative to the results root ``root``) that have
    finished, ordered by depth, and one line for each that has not (so a notebook can say
    which are missing and still compare the rest)."""
    found, missing = [], []
    for name in names:
        try:
            found.append(read_model(Path(root) / name))
        except AcrossModelsError as exc:
            missing.append(str(exc))
    archs = [m.arch for m in found]
    twice = sorted({a for a in archs if archs.count(a) > 1})
    if twice:
        raise AcrossModelsError(f"{twice} appear in more than one folder of {list(names)}; "
                                f"list one folder per model")
    found, other = same_split(found)
    missing += [f"{m.folder}: measured on another split ({split_of(m)!r}, the others on "
                f"{split_of(found[0])!r}); rerun that profile with the current split to compare it"
                for m in other]
    return sorted(found, key=lambda m: _depth(m.arch)), missing


def split_of(model: ModelResults) -> str:
    """The data and split a model's study was measured on (``fp32.json``'s data label)."""
    return str(model.fp32.get("data_label", ""))


def same_split(models: Sequence[ModelResults]) -> tuple[list[ModelResults], list[ModelResults]]:
    """(the models measured on the most common split, the others): differences between models
    are compared only on the same validation/test halves (docs/method.md §8); ties go to the
    split of the model listed first."""
    if not models:
        return [], []
    splits = [split_of(m) for m in models]
    common = max(dict.fromkeys(splits), key=splits.count)
    return ([m for m in models if split_of(m) == common],
            [m for m in models if split_of(m) != common])


def _depth(arch: str) -> int:
    digits = "".join(c for c in arch if c.isdigit())
    return int(digits) if digits else 0


def accuracy_points(models: Sequence[ModelResults]) -> pd.DataFrame:
    """One row per (model, config): size, compression, BOPs, test top-1 mean and std over
    seeds (the figure's points), with the fine-tuned FP32 model as a row of its own."""
    rows = []
    for m in models:
        head = reporting.seeded_headline(m.runs, float(m.fp32["test_top1"]))
        for _, r in head.iterrows():
            rows.append({"model": m.arch, "config": r["config"],
                         "kind": "uniform" if str(r["config"]).startswith("uniform")
                         else "mixed", "size MB": r["size MB"],
                         "compression": r["compression"], "BOPs (G)": r["BOPs (G)"],
                         "test top-1": r["test top-1"], "± std": r["± std"],
                         "seeds": int(r["seeds"]), "% of FP32": r["% of FP32"]})
        rows.append({"model": m.arch, "config": "FP32 (fine-tuned)", "kind": "fp32",
                     "size MB": float(m.fp32.get("fp32_size_mb", math.nan)), "compression": 1.0,
                     "BOPs (G)": math.nan, "test top-1": float(m.fp32["test_top1"]),
                     "± std": math.nan, "seeds": 1, "% of FP32": 100.0})
    return pd.DataFrame(rows, columns=["model", "config", "kind", "size MB", "compression",
                                       "BOPs (G)", "test top-1", "± std", "seeds", "% of FP32"])


def paired_table(models: Sequence[ModelResults]) -> pd.DataFrame:
    """Per model, :func:`hmqat.study.reporting.paired_comparisons` of
    :func:`~hmqat.study.reporting.headline_pairs`
    (a − b in test top-1, paired over seeds and test images, Eq. V), with a ``model`` column."""
    parts = []
    for m in models:
        pairs = reporting.headline_pairs(list(m.runs["label"]))
        if pairs:
            parts.append(reporting.paired_comparisons(m.runs, pairs).assign(model=m.arch))
    if not parts:
        return pd.DataFrame(columns=["model", "a", "b", "seeds", "images", "size gap %",
                                     "BOPs ratio", "diff", "ci_low", "ci_high", "half_width",
                                     "interval", "significant", "equal_size"])
    out = pd.concat(parts, ignore_index=True)
    return out[["model"] + [c for c in out.columns if c != "model"]]


def kendall_table(models: Sequence[ModelResults]) -> pd.DataFrame:
    """Per model: τ of ``joint`` and of ``qerr_only`` with their bootstrap CIs, and the paired
    τ(joint) − τ(qerr_only) with its CI (notebook 01's fixed-size table, docs/method.md §3.3)."""
    rows = []
    for m in models:
        k = m.kendall.set_index("predictor")
        for name in ("omega_joint", "omega_qerr_only"):
            if name not in k.index:
                raise AcrossModelsError(f"{m.folder}: the Kendall table has no {name} row; "
                                        f"rerun notebook 01 of that profile")
        j, q = k.loc["omega_joint"], k.loc["omega_qerr_only"]
        rows.append({"model": m.arch, "configs": int(j["n_configs"]),
                     "tau joint": j["kendall_tau"], "joint low": j["tau_low"],
                     "joint high": j["tau_high"], "tau qerr_only": q["kendall_tau"],
                     "qerr low": q["tau_low"], "qerr high": q["tau_high"],
                     "joint - qerr_only": q["ref_minus_tau"], "diff low": q["diff_low"],
                     "diff high": q["diff_high"]})
    return pd.DataFrame(rows, columns=["model", "configs", "tau joint", "joint low",
                                       "joint high", "tau qerr_only", "qerr low", "qerr high",
                                       "joint - qerr_only", "diff low", "diff high"])


def ptq_gain_table(models: Sequence[ModelResults], variant: str = "joint") -> pd.DataFrame:
    """Per model and PTQ budget: the ``variant`` pick's validation top-1, the median of the
    random same-size configs, the gain (pick − median, points) and the share of random configs
    the pick beats (notebook 01's PTQ frontier, 4-bit activations, BN re-estimated, no QAT)."""
    rows = []
    for m in models:
        sub = m.ptq[m.ptq["variant"] == variant]
        if sub.empty:
            raise AcrossModelsError(f"{m.folder}: the PTQ frontier table has no {variant!r} "
                                    f"rows; rerun notebook 01 of that profile")
        for _, r in sub.iterrows():
            rows.append({"model": m.arch, "compression": r["target_compression"],
                         "pick top-1": r["top1"], "random median": r["random_median"],
                         "gain": r["top1"] - r["random_median"],
                         "beats random %": r["beats_random_pct"],
                         "random configs": int(r["n_random"])})
    return pd.DataFrame(rows, columns=["model", "compression", "pick top-1", "random median",
                                       "gain", "beats random %", "random configs"])


#: The steps every model's study runs (the models profile's per-model steps): the wall-time
#: table compares these only, so a profile that ran more (quick: 04, 06) is not overstated.
PER_MODEL_STEPS = ("00_fp32_baseline", "01_sensitivity", "02_bit_allocation", "03_qat",
                   "05_report")


def wall_times(models: Sequence[ModelResults],
               steps: Sequence[str] = PER_MODEL_STEPS) -> pd.DataFrame:
    """Each model's measured wall time (minutes; ``compute_wall_s`` of its manifest, earlier
    interrupted attempts included) for each of ``steps`` and their total, with the profile that
    ran it; a step its manifest lacks is NaN and left out of the total."""
    rows = []
    for m in models:
        recorded = m.manifest.get("steps", {})
        row: dict[str, Any] = {"model": m.arch, "profile": m.profile}
        total = 0.0
        for name in steps:
            step = recorded.get(name, {})
            wall = step.get("compute_wall_s", step.get("wall_s"))
            row[name] = round(float(wall) / 60, 1) if wall is not None else math.nan
            total += float(wall) if wall is not None else 0.0
        row["total (min)"] = round(total / 60, 1)
        rows.append(row)
    return pd.DataFrame(rows, columns=["model", "profile", *steps, "total (min)"])


def step_cost(archs: Sequence[str], train_loader: Any, *, steps: int, rounds: int,
              num_classes: int, recipe: Recipe | Mapping[str, Any] | None = None,
              bits: int = 4, a_bits: int = 4, lr: float = 0.004,
              device: str | torch.device | None = None) -> pd.DataFrame:
    """Seconds per QAT optimizer step of each architecture, timed side by side in one process.

    In each of ``rounds`` rounds every architecture (fresh weights, uniform W``bits``A``a_bits``,
    the ``recipe``'s callbacks, e.g. distillation from an FP32 teacher) trains ``steps`` steps
    on ``train_loader`` through :func:`hmqat.train.qat`; the time is the training loop's own
    (``epoch_s``: set-up and step-size init excluded). Rounds interleave the architectures, so
    a change in machine load touches them alike. Returns the median seconds per step over the
    rounds and its ratio to the first architecture (the reference, ResNet-20)."""
    if not archs:
        raise AcrossModelsError("step_cost needs at least one architecture")
    if steps < 1 or rounds < 1:
        raise AcrossModelsError(f"steps and rounds must be >= 1, got {steps} and {rounds}")
    recipe = recipe if isinstance(recipe, Recipe) else Recipe.from_dict(dict(recipe or {}))
    times: dict[str, list[float]] = {a: [] for a in archs}
    for r in range(rounds):
        for arch in archs:
            model = create_model(arch, num_classes=num_classes)
            if device is not None:
                model = model.to(device)
            cfg = train.TrainConfig(epochs=1, lr=lr, max_steps_per_epoch=steps, seed=r)
            callbacks = make_callbacks(recipe, teacher=model)
            with contextlib.redirect_stdout(io.StringIO()):   # fit's per-epoch line
                _, history = train.qat(model, uniform_config(model, bits), train_loader, None,
                                       cfg, a_bits=a_bits, callbacks=callbacks, device=device)
            times[arch].append(float(history[-1]["epoch_s"]) / steps)
    ref = statistics.median(times[archs[0]])
    return pd.DataFrame([{"model": a, "s/step": statistics.median(times[a]),
                          "min s/step": min(times[a]), "max s/step": max(times[a]),
                          "rounds": rounds, "steps per round": steps,
                          f"× {archs[0]}": statistics.median(times[a]) / ref} for a in archs])


def _sign(low: float, high: float) -> str:
    """'+' when an interval lies above 0, '-' below, '0' when it straddles it, '?' when there
    is no interval (one seed: a screen, not a result)."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return "?"
    return "+" if low > 0 else "-" if high < 0 else "0"


def _beats(pct: float) -> str:
    """The PTQ allocation's sign by notebook 01's rule (docs/method.md §3.1): '+' when the pick
    beats ≥ 95 % of the random same-size configs, '-' when it beats ≤ 5 %, else '0'."""
    if not math.isfinite(pct):
        return "?"
    return "+" if pct >= 95 else "-" if pct <= 5 else "0"


def _across(signs: Mapping[str, str], models: Sequence[str], same: str) -> str:
    """How a conclusion's per-model signs read across depth: ``same`` when every model has a
    decided sign and they agree; "reverses" when one model's interval lies above 0 and
    another's below; "shown at A, not at B" when one direction meets straddling intervals
    (missing evidence at B, not a reversal); and which models are undecided (not run, one seed)."""
    if len(models) < 2:
        return "(one model: nothing to compare)"
    undecided = [m for m in models if signs.get(m, "?") == "?"]
    decided = {m: s for m, s in signs.items() if s != "?"}
    values = set(decided.values())
    if {"+", "-"} <= values:
        above = [m for m, s in decided.items() if s == "+"]
        below = [m for m, s in decided.items() if s == "-"]
        text = (f"**reverses with depth** (above 0 at {', '.join(above)}, below 0 at "
                f"{', '.join(below)})")
    elif len(values) > 1:
        shown = [m for m, s in decided.items() if s != "0"]
        flat = [m for m, s in decided.items() if s == "0"]
        text = (f"**is shown at {', '.join(shown)} but not at {', '.join(flat)}** (an interval "
                f"that straddles 0: missing evidence there, not a reversal)")
    elif undecided:
        return f"is not decided for {', '.join(undecided)} (not run, or one seed)"
    else:
        return same
    return text + (f"; not decided for {', '.join(undecided)}" if undecided else "")


def verdict(kendall: pd.DataFrame, paired: pd.DataFrame, ptq: pd.DataFrame) -> list[str]:
    """Sentences, written from the tables, on whether each conclusion holds at every depth.

    A conclusion's *sign* per model is '+', '-' or '0' by whether its 95 % interval lies above
    0, below 0 or straddles 0 (for the PTQ gain, which has no interval: whether the pick beats
    ≥ 95 % or ≤ 5 % of the random configs, notebook 01's rule); it
    "changes with depth" when two models' signs differ, and is "not decided" for a model
    without an interval (not run, or one seed)."""
    if kendall.empty:
        return ["No model has finished notebooks 00-03: nothing to compare."]
    lines = []
    models = list(kendall["model"])
    if len(models) < 2:
        lines.append(f"Only {models[0]} has finished: the comparison across depth needs two "
                     f"models or more; what follows describes {models[0]} alone.")
    signs = {r["model"]: _sign(r["diff low"], r["diff high"]) for _, r in kendall.iterrows()}
    words = {"+": "the trace improves the ranking", "-": "the trace worsens the ranking",
             "0": "no difference shown", "?": "no interval"}
    detail = "; ".join(f"{r['model']}: {r['joint - qerr_only']:+.2f} [{r['diff low']:+.2f}, "
                       f"{r['diff high']:+.2f}] ({words[signs[r['model']]]})"
                       for _, r in kendall.iterrows())
    lines.append("The trace over the quantization error, τ(joint) − τ(qerr_only) on "
                 "equal-size configs at PTQ, " + _across(signs, models, "has the same sign at "
                                                          "every depth") + f": {detail}.")
    for (a, b), sub in (paired.groupby(["a", "b"], sort=False) if not paired.empty else []):
        s = {r["model"]: _sign(r["ci_low"], r["ci_high"]) for _, r in sub.iterrows()}
        detail = "; ".join(
            f"{r['model']}: {r['diff']:+.2f}"
            + (f" [{r['ci_low']:+.2f}, {r['ci_high']:+.2f}] ({int(r['seeds'])} seeds, "
               f"{r['interval']})" if s[r["model"]] != "?"
               else f" ({int(r['seeds'])} seed, no interval)")
            for _, r in sub.iterrows())
        lines.append(f"{a} − {b} (test top-1, paired) "
                     + _across(s, models, "has the same sign at every depth") + f": {detail}.")
    for comp, sub in ptq.groupby("compression", sort=True):
        s = {r["model"]: _beats(r["beats random %"]) for _, r in sub.iterrows()}
        detail = "; ".join(f"{r['model']}: {r['gain']:+.2f} (beats {r['beats random %']:.0f} % "
                           f"of {int(r['random configs'])})" for _, r in sub.iterrows())
        lines.append(f"At PTQ, {comp:g}×, the joint pick minus the random median "
                     + _across(s, models, "keeps its sign at every depth") + f": {detail}.")
    return lines
