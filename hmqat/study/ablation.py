"""Ablation runner of notebook 04 (docs/design.md §3 "Ablations in notebook 04").

Two groups of QAT runs, all with the same TrainConfig (seed, epochs, learning rates):

* ``"transition"``: one bit config (the HMQAT frontier point at the budget) trained with each
  reading of "transition-aware fine-tuning" switched on and off (:data:`TRANSITION_VARIANTS`):
  plain LSQ, + precision transitions, + oscillation dampening, + freezing, + KD, all, all + KD.
* ``"allocation"``: one QAT recipe, at equal model size: the Hessian-guided frontier pick for
  every Ω variant, and the uniform, random (several seeds), greedy and HAWQ-V3 ILP allocations
  of :mod:`hmqat.search` under the same size limit.

Every run is one :func:`hmqat.study.runs.qat_run` in ``run_dir/<run id>/`` (the id covers
everything that defines the training: bit config, recipe, TrainConfig, quantizer options, FP32
weights, data). The loop checkpoints there every epoch; a finished run writes ``result.json`` and
a rerun reads it instead of training, so an interrupted notebook resumes and a finished one is
free to re-execute.

    >>> from hmqat import train
    >>> from hmqat.study import ablation
    >>> cfg = train.TrainConfig(epochs=1, lr=0.004, step_lr=0.0004, weight_decay=5e-5)
    >>> table = ablation.run_ablations(fp32, train_loader, test_loader, cfg, omegas, n_params,
    ...                                min_compression=10.34, run_dir="results/quick/ablations")
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd
import torch.nn as nn

from .. import search, train
from ..runtime import model_fingerprint
from ..transitions import Recipe
from .runs import qat_run

__all__ = [
    "ALLOCATION_METHODS",
    "AblationError",
    "COLUMNS",
    "RunSpec",
    "TRANSITION_VARIANTS",
    "allocation_ablation",
    "allocation_specs",
    "run_ablations",
    "run_specs",
    "summarize",
    "transition_ablation",
    "transition_specs",
]

#: Recipe switches per transition-group variant; every other switch is off. Hyper-parameters
#: come from the base recipe. The "lsq+…" variants add one remedy to plain LSQ; "all" is the
#: three transition remedies together, "all+distill" adds FP32 distillation to them.
TRANSITION_VARIANTS: dict[str, dict[str, bool]] = {
    "lsq": {},
    "lsq+transitions": {"transitions": True},
    "lsq+dampen": {"osc_dampen": True},
    "lsq+freeze": {"osc_freeze": True},
    "lsq+distill": {"distill": True},
    "all": {"transitions": True, "osc_dampen": True, "osc_freeze": True},
    "all+distill": {"transitions": True, "osc_dampen": True, "osc_freeze": True,
                    "distill": True},
}
_SWITCHES = ("transitions", "osc_dampen", "osc_freeze", "distill")
#: Reference allocations of the allocation group (hmqat.search), besides one row per Ω variant.
ALLOCATION_METHODS: tuple[str, ...] = ("uniform", "random", "greedy", "ilp")
#: Columns of the tables, in order (the first eleven are the tidy core).
COLUMNS = ["group", "variant", "seed", "top1", "loss", "size_mb", "compression", "bops",
           "avg_bits", "wall_s", "recipe", "train_seed", "omega", "search_ms", "osc_frac",
           "frozen_frac", "bit_config", "run_id"]


class AblationError(ValueError):
    """Bad input to the ablation runner; the message names the value and the fix."""


@dataclass(frozen=True)
class RunSpec:
    """One row of an ablation table before training: labels, bit config and recipe."""

    group: str
    variant: str
    seed: int                   # replicate seed of the row (random allocation seed, else training)
    bit_config: dict[str, int]
    recipe: Recipe
    train_seed: int
    omega: float = float("nan")   # Σ Ω of bit_config under the primary Ω table
    info: dict[str, Any] = field(default_factory=dict)


def _row(spec: RunSpec, rec: Mapping[str, Any]) -> dict[str, Any]:
    return {"group": spec.group, "variant": spec.variant, "seed": spec.seed,
            "top1": rec["top1"], "loss": rec["loss"], "size_mb": rec["size_mb"],
            "compression": rec["compression"], "bops": rec["bops"], "avg_bits": rec["avg_bits"],
            "wall_s": rec["wall_s"], "recipe": spec.recipe.describe(),
            "train_seed": spec.train_seed, "omega": spec.omega,
            "search_ms": spec.info.get("search_ms", float("nan")),
            "osc_frac": rec.get("osc_frac", float("nan")),
            "frozen_frac": rec.get("frozen_frac", float("nan")),
            "bit_config": json.dumps(spec.bit_config), "run_id": rec["run_id"]}


def run_specs(specs: Sequence[RunSpec], fp32_model: nn.Module, train_loader: Any,
              val_loader: Iterable, cfg: train.TrainConfig, *, run_dir: str | Path,
              **run_kw: Any) -> pd.DataFrame:
    """Train every spec (``cfg`` with the spec's ``train_seed``) and return the tidy table
    (:data:`COLUMNS`). ``table.attrs``: ``trained`` and ``cached`` run ids of this call,
    ``records`` (the full result records, in row order). ``run_kw`` goes to :func:`hmqat.study.runs.qat_run`."""
    if val_loader is None:
        raise AblationError("val_loader is None; the ablation table needs a test loader for top1")
    fp32_key = run_kw.pop("fp32_key", None) or model_fingerprint(fp32_model)
    rows, records, trained, cached = [], [], [], []
    for spec in specs:
        rec = qat_run(fp32_model, spec.bit_config, spec.recipe, train_loader, val_loader,
                      replace(cfg, seed=spec.train_seed), run_dir=run_dir, fp32_key=fp32_key,
                      **run_kw).record
        (cached if rec["cached"] else trained).append(rec["run_id"])
        rows.append(_row(spec, rec))
        records.append(rec)
        print(f"[{spec.group}] {spec.variant} (seed {spec.seed}): top-1 {rec['top1']:.2f} %, "
              f"{rec['size_mb'] * 1024:.1f} KB, {rec['compression']:.2f}x"
              f"{' (cached)' if rec['cached'] else ''}", flush=True)
    table = pd.DataFrame(rows, columns=COLUMNS)
    table.attrs.update(trained=trained, cached=cached, records=records)
    return table


# --------------------------------------------------------------------------------------------
# The two groups
# --------------------------------------------------------------------------------------------
def transition_specs(bit_config: Mapping[str, int], *, base: Recipe | None = None,
                     variants: Sequence[str] | None = None, seeds: Sequence[int] = (0,),
                     omega: float = float("nan")) -> list[RunSpec]:
    """Specs (a)–(f) of the transition group: ``base`` with each variant's switches
    (:data:`TRANSITION_VARIANTS`) and every other switch off. Default base: ``Recipe(osc_track=
    True)``, so every row reports its oscillating fraction (tracking does not change training)."""
    base = Recipe(osc_track=True) if base is None else base
    variants = list(TRANSITION_VARIANTS) if variants is None else list(variants)
    unknown = [v for v in variants if v not in TRANSITION_VARIANTS]
    if unknown:
        raise AblationError(f"unknown transition variant(s) {unknown}; choose from "
                            f"{list(TRANSITION_VARIANTS)}")
    if not seeds:
        raise AblationError("seeds is empty; give at least one training seed, e.g. (0,)")
    specs = []
    for seed in seeds:
        for v in variants:
            switches = {**{s: False for s in _SWITCHES}, **TRANSITION_VARIANTS[v]}
            recipe = replace(base, **switches)
            specs.append(RunSpec("transition", v, int(seed), dict(bit_config), recipe, int(seed),
                                 omega))
    return specs


def _budget_kw(max_mb: float | None, min_compression: float | None) -> dict[str, float]:
    if (max_mb is None) == (min_compression is None):
        raise AblationError("give exactly one size budget: max_mb=... (MB) or "
                            "min_compression=... (e.g. 10.34 for the paper's ResNet18 point)")
    return {"max_mb": max_mb} if max_mb is not None else {"min_compression": min_compression}


def allocation_specs(omegas: Mapping[str, pd.DataFrame], n_params: Mapping[str, int], *,
                     max_mb: float | None = None, min_compression: float | None = None,
                     primary: str | None = None, recipe: Recipe | None = None,
                     bits: Iterable[int] | None = None, random_seeds: Sequence[int] = (0, 1, 2),
                     methods: Sequence[str] = ALLOCATION_METHODS,
                     fixed: Mapping[str, int] | None = None,
                     tied: Sequence[Sequence[str]] | None = None, other_params: int = 0,
                     fp32_params: int | None = None, train_seed: int = 0,
                     size_tol: float = 0.01) -> list[RunSpec]:
    """Specs of the allocation group, all at equal model size (docs/design.md §3 "Search").

    One :class:`hmqat.search.Problem` per Ω table. The ``primary`` table's exact frontier picks the
    HMQAT config at the budget (:func:`hmqat.search.select`); its size S then caps every other
    allocation (``max_mb=S``): the frontier pick of every other Ω variant, ``uniform`` (the
    widest uniform config ≤ S), ``random`` (one per seed), ``greedy`` and ``ilp`` (HAWQ-V3 ILP,
    PuLP/CBC), the last four on the primary table. ``omega`` of each spec is its ΣΩ under the
    primary table. ``info`` keeps the search method, search_ms and the planned size. ``recipe``
    defaults to ``Recipe(osc_track=True)`` (plain LSQ, oscillations logged).

    Equal size means within ``size_tol`` (±1 %) of S (docs/method.md §8): an allocation farther
    away (``uniform`` when no uniform width lands near S, e.g. W2 at 14.1× against 10.35×; a
    ``greedy`` that stops short) is left out, with a printed line naming its size.
    """
    if not omegas:
        raise AblationError("omegas is empty; pass {variant: Ω table}, e.g. "
                            "{'joint': sensitivity.omega_table(...)}")
    primary = next(iter(omegas)) if primary is None else primary
    if primary not in omegas:
        raise AblationError(f"primary={primary!r} is not a key of omegas {list(omegas)}")
    bad = [m for m in methods if m not in ALLOCATION_METHODS]
    if bad:
        raise AblationError(f"unknown allocation method(s) {bad}; choose from "
                            f"{list(ALLOCATION_METHODS)}")
    recipe = Recipe(osc_track=True) if recipe is None else recipe
    problems = {name: search.Problem(table, n_params, bits, fixed=fixed, tied=tied,
                                     other_params=other_params, fp32_params=fp32_params)
                for name, table in omegas.items()}
    budget = _budget_kw(max_mb, min_compression)
    picks: list[tuple[str, int, dict[str, int], dict[str, Any]]] = []

    def frontier_pick(problem: search.Problem, **kw: float) -> tuple[dict[str, int], dict[str, Any]]:
        front = problem.frontier()
        row = search.select(front, **kw)
        return dict(row["config"]), {"method": "dp", "search_ms": front.search_ms,
                                     "planned_mb": float(row["size_mb"])}

    config, info = frontier_pick(problems[primary], **budget)
    size = info["planned_mb"]
    picks.append((f"hmqat-{primary}", train_seed, config, info))
    for name, problem in problems.items():
        if name != primary:
            c, i = frontier_pick(problem, max_mb=size)
            picks.append((f"hmqat-{name}", train_seed, c, i))
    ref = problems[primary]
    for method in methods:
        for seed in (random_seeds if method == "random" else [None]):
            kw = {"seed": int(seed)} if seed is not None else {}
            t0 = time.perf_counter()
            alloc = getattr(ref, method)(max_mb=size, **kw)
            ms = (time.perf_counter() - t0) * 1e3
            picks.append((method, train_seed if seed is None else int(seed), dict(alloc.config),
                          {"method": alloc.method, "search_ms": ms,
                           "planned_mb": float(alloc.size_mb)}))
    specs = []
    for variant, seed, config, info in picks:
        gap = info["planned_mb"] / size - 1.0
        if abs(gap) > size_tol:
            # printed, not warned: a warning's text carries this file's absolute path into
            # the committed executed notebook
            print(f"[ablation] allocation {variant!r} is {info['planned_mb']:.5f} MB, "
                  f"{100 * gap:+.1f} % from the {size:.5f} MB budget (outside "
                  f"±{100 * size_tol:g} %): left out of the equal-size comparison", flush=True)
            continue
        omega = ref.evaluate(config).omega
        specs.append(RunSpec("allocation", variant, seed, config, recipe, int(train_seed),
                             float(omega), info))
    return specs


def transition_ablation(fp32_model: nn.Module, train_loader: Any, val_loader: Iterable,
                        cfg: train.TrainConfig, bit_config: Mapping[str, int], *,
                        run_dir: str | Path, base: Recipe | None = None,
                        variants: Sequence[str] | None = None, seeds: Sequence[int] | None = None,
                        **run_kw: Any) -> pd.DataFrame:
    """Train the transition group (a)–(f) on ``bit_config``; see :func:`transition_specs`.
    ``seeds`` defaults to ``(cfg.seed,)``; ``run_kw`` goes to :func:`hmqat.study.runs.qat_run` (a_bits,
    policy, device, ...)."""
    specs = transition_specs(bit_config, base=base, variants=variants,
                             seeds=(cfg.seed,) if seeds is None else seeds)
    return run_specs(specs, fp32_model, train_loader, val_loader, cfg, run_dir=run_dir, **run_kw)


def allocation_ablation(fp32_model: nn.Module, train_loader: Any, val_loader: Iterable,
                        cfg: train.TrainConfig, omegas: Mapping[str, pd.DataFrame],
                        n_params: Mapping[str, int] | None = None, *, run_dir: str | Path,
                        max_mb: float | None = None, min_compression: float | None = None,
                        primary: str | None = None, recipe: Recipe | None = None,
                        bits: Iterable[int] | None = None,
                        random_seeds: Sequence[int] = (0, 1, 2),
                        methods: Sequence[str] = ALLOCATION_METHODS,
                        fixed: Mapping[str, int] | None = None,
                        tied: Sequence[Sequence[str]] | None = None,
                        other_params: int | None = None, fp32_params: int | None = None,
                        **run_kw: Any) -> pd.DataFrame:
    """Train the allocation group at equal size; see :func:`allocation_specs`. ``n_params``,
    ``fixed`` (the policy's first/last layers at 8 bits), ``other_params`` and ``fp32_params``
    default to :func:`hmqat.search.model_inputs` of ``fp32_model`` (so planned and measured
    sizes agree)."""
    specs = _allocation_specs_for(fp32_model, omegas, n_params, cfg, max_mb=max_mb,
                                  min_compression=min_compression, primary=primary, recipe=recipe,
                                  bits=bits, random_seeds=random_seeds, methods=methods,
                                  fixed=fixed, tied=tied, other_params=other_params,
                                  fp32_params=fp32_params, run_kw=run_kw)
    return run_specs(specs, fp32_model, train_loader, val_loader, cfg, run_dir=run_dir, **run_kw)


def _allocation_specs_for(fp32_model, omegas, n_params, cfg, *, max_mb, min_compression, primary,
                          recipe, bits, random_seeds, methods, fixed, tied, other_params,
                          fp32_params, run_kw) -> list[RunSpec]:
    acct = search.model_inputs(fp32_model, a_bits=run_kw.get("a_bits", 4),
                               policy=run_kw.get("policy", "first_last_8"),
                               per_channel=run_kw.get("per_channel", True),
                               input_size=run_kw.get("input_size", (1, 3, 32, 32)))
    n_params = acct["n_params"] if n_params is None else n_params
    unknown = sorted(set(n_params) - set(acct["n_params"]))
    if unknown:
        raise AblationError(f"n_params names layers {unknown[:4]} that the model does not have "
                            f"as Conv2d/Linear; use search.model_inputs(fp32_model)['n_params']")
    other_params = acct["other_params"] if other_params is None else other_params
    fp32_params = acct["fp32_params"] if fp32_params is None else fp32_params
    fixed = acct["fixed"] if fixed is None else fixed
    return allocation_specs(omegas, n_params, max_mb=max_mb, min_compression=min_compression,
                            primary=primary, recipe=recipe, bits=bits, random_seeds=random_seeds,
                            methods=methods, fixed=fixed, tied=tied, other_params=other_params,
                            fp32_params=fp32_params, train_seed=cfg.seed)


def run_ablations(fp32_model: nn.Module, train_loader: Any, val_loader: Iterable,
                  cfg: train.TrainConfig, omegas: Mapping[str, pd.DataFrame],
                  n_params: Mapping[str, int] | None = None, *, run_dir: str | Path,
                  max_mb: float | None = None, min_compression: float | None = None,
                  primary: str | None = None, base: Recipe | None = None,
                  recipe: Recipe | None = None, variants: Sequence[str] | None = None,
                  bits: Iterable[int] | None = None, random_seeds: Sequence[int] = (0, 1, 2),
                  methods: Sequence[str] = ALLOCATION_METHODS,
                  fixed: Mapping[str, int] | None = None,
                  tied: Sequence[Sequence[str]] | None = None, other_params: int | None = None,
                  fp32_params: int | None = None,
                  groups: Sequence[str] = ("transition", "allocation"),
                  **run_kw: Any) -> pd.DataFrame:
    """Both groups in one table (notebook 04): the transition group on the primary Ω table's
    frontier pick at the budget, then the allocation group at that pick's size.

    ``base``: hyper-parameters of the transition group; ``recipe``: the one QAT recipe of the
    allocation group. Both default to plain LSQ with oscillation tracking (``Recipe(osc_track=
    True)``: logging only), so the HMQAT/LSQ run of both groups is one run, trained once.
    ``run_kw`` goes to :func:`hmqat.study.runs.qat_run` (a_bits, policy, per_channel, init, device,
    calib_batches, input_size).
    """
    bad = [g for g in groups if g not in ("transition", "allocation")]
    if bad or not groups:
        raise AblationError(f"groups={list(groups)}; choose from ['transition', 'allocation']")
    alloc = _allocation_specs_for(fp32_model, omegas, n_params, cfg, max_mb=max_mb,
                                  min_compression=min_compression, primary=primary,
                                  recipe=recipe, bits=bits, random_seeds=random_seeds,
                                  methods=methods, fixed=fixed, tied=tied,
                                  other_params=other_params, fp32_params=fp32_params,
                                  run_kw=run_kw)
    specs: list[RunSpec] = []
    if "transition" in groups:
        hm = alloc[0]
        specs += transition_specs(hm.bit_config, base=base, variants=variants,
                                  seeds=(cfg.seed,), omega=hm.omega)
    if "allocation" in groups:
        specs += alloc
    return run_specs(specs, fp32_model, train_loader, val_loader, cfg, run_dir=run_dir, **run_kw)


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation of top1 (and the size columns) per (group, variant), over the
    seeds; ``n`` rows each. Keeps the table's row order."""
    if table.empty:
        raise AblationError("the ablation table is empty; nothing to summarise")
    g = table.groupby(["group", "variant"], sort=False)
    out = g.agg(top1=("top1", "mean"), top1_std=("top1", "std"), n=("top1", "size"),
                size_mb=("size_mb", "mean"), compression=("compression", "mean"),
                avg_bits=("avg_bits", "mean"), osc_frac=("osc_frac", "mean"))
    out["top1_std"] = out["top1_std"].where(out["n"] > 1, math.nan)
    return out.reset_index()
