"""Benchmark of hmqat.hessian.layer_traces (docs/design.md §3 "Sensitivity"): time to every
layer's Hessian trace — exact, or to a relative standard error <= tol on EVERY layer — against
the PyHessian/HAWQ-V2-style per-layer-probe reference run to the same tol.

    HMQAT_DATA_DIR=../shared/data/cifar10-jpeg HMQAT_WEIGHTS_DIR=../shared/weights/cifar10 \\
        .venv/bin/python benchmarks/hessian_traces.py        # writes results/bench/hessian_traces.txt

Without HMQAT_DATA_DIR: random-weight ResNet-20 on synthetic data (a smoke run: 256 images,
tol 0.2). ``--device cuda`` computes everything on the GPU (probes are drawn on the CPU, as in
hmqat, and copied; CUDA is synchronised before every clock read); a short GPU check is

    python benchmarks/hessian_traces.py --device cuda --ref-probes 3 --lever-samples 0 \
        --out results/bench/hessian_traces_cuda.txt

Measured side by side in one process, on the same calibration batches (estimand: the Hessian
of the mean loss over them, BN in eval mode):
  (a') FAIR reference (the headline, ``fair_ratio``): per-layer probes as HAWQ-V2 and MQBench's
      ``hessian_per_layer`` compute them: the calibration batches of --batch-size (128) images,
      one first-order graph (create_graph) kept per batch, one Rademacher vector per active
      layer per batch and round (drawn independently per batch), one HVP per layer restricted
      to that layer; the same stratified estimator and SE as hmqat (Eq. H4 of hmqat.hessian),
      and per-layer stopping: a layer stops being probed once its rel. SE <= tol (checked after
      every round, >= 2 rounds). Run to convergence, NOT extrapolated. --repeats repeats,
      interleaved with (b) and (b-h) in one process (rotating which runs first), for every
      --tols. ``fair_ratio`` = median over repeats of time(b)/time(a') at the first tol;
      ``fair_ratio_hutchinson`` the same for (b-h); the paired ratios of every repeat are printed.
  (b) hmqat: layer_traces(model, batches) with its defaults (method "auto": the exact
      Gauss-Newton traces of hmqat.hessian.gauss_newton_traces, Eqs. H5–H7, for networks
      piecewise linear in each layer's weights, such as ResNet-20 — C vector-Jacobian products
      per image, no probe error, the piecewise-linearity check timed with it; the probes of (b-h)
      otherwise). What the study uses (trace_method: auto).
  (b-h) hmqat: layer_traces(method="hutchinson", tol=tol), run to convergence.
  (f) gauss_newton_traces with --gn-projections output-space probes per image (Eq. H7),
      interleaved with (a') and (b) in the same repeats; ``fair_ratio_gauss_newton_*`` = median
      time(f)/time(a') at the first tol, with the per-layer agreement with (a').
  (g) the Pareto picks (joint Ω, --budgets) of the exact traces against those of every other
      frame at hand ((b-h) at each tol, (f), (e)'s): same pick, ΣΩ excess under the exact
      traces; ``exact_pick_ratio`` = time of the exact traces / the fair reference.
  (e) decision-based stopping (docs/method.md §3): layer_traces with ``stop_rule=
      sensitivity.decision_stop_rule(model, --budgets)``: probing stops once no perturbation of
      the traces within ±1.96 SE changes the joint-Ω Pareto pick at any requested budget. With
      the defaults ("auto") the Gauss-Newton path draws 2 output-space probes per image and
      doubles them while they stay within K/4 per image, then goes exact; --decision-methods
      hutchinson adds the parameter-space probes. ``decision_ratio`` = its time / the fair
      reference at the first tol; whether its picks equal those of the Hutchinson traces at tol
      0.05 (run in this process) and those of the exact traces. Also: whether the tol-0.05
      picks move when the traces move by ±1 SE.
  (a) the OLD shared-probe reference (kept as a labelled second row; not the headline): one Rademacher probe over all layers at a time; for each probe, every batch gets
      a fresh forward, a backward with create_graph and a second backward (double backward), and
      the per-batch HVPs are summed weighted by batch size (PyHessian's dataloader mode). Its SE is
      over probes. Running it to 5 % takes hours, so it runs --ref-probes probes and the time to
      5 % is EXTRAPOLATED: time/probe × probes·max_i(rel_se_i/tol)² (SE ∝ 1/sqrt(probes)); a 90 %
      interval from the chi-square distribution of the worst layer's variance estimate is given.
  (c) pyhessian 0.1 (dev extra): whole-model Hutchinson trace restricted to the same weights
      (requires_grad only on the Conv2d/Linear weights), run in its single-batch mode on every
      calibration batch with its own probes and averaged weighted by batch size; compared with
      hmqat's Σ_i Tr(H_ii) (the trace of H over those weights is the sum of its diagonal blocks).
      Why not pyhessian's dataloader mode (one probe shared by all batches, the algorithm of (a)):
      vᵀHv = Σ_k λ_k (u_kᵀv)² + ... is right-skewed when a few outlier eigenvalues carry much of
      the trace (measured on one batch of 128: top eigenvalue 364 of a trace of ≈1880, sample
      skewness 1.15 over 64 probes), so the mean of a handful of shared probes is usually low
      and its SE too small; averaging independent probes over the batches removes that. (a)'s
      whole-model numbers are printed for reference.
  (d) levers behind the defaults: hmqat with probe="joint" (docs/design.md §3's single HVP over all
      layers) for --joint-probes probes per batch, extrapolated to tol like (a); micro-batches of
      16 vs 128 images (interleaved on the same --lever-samples images: per-layer per-sample
      variance and per-layer HVP time give the need-based time Σ_i (CV_i/tol)²·t_i); the time of
      an HVP on a kept first-order graph vs a fresh one.
The CPU is shared with other jobs: the load average is printed; timings in one run are comparable
with each other, not across runs.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hmqat import data, hessian
from hmqat.models import create_model, quantizable_layers
from hmqat.runtime import atomic_write_text, resolve_device
from hmqat.study import reporting

LINES: list[str] = []


OUT: list[Path] = []


def say(text: str = "") -> None:
    """Print and keep the line for the output file (rewritten atomically after every line, so
    a run stopped early keeps what it measured)."""
    print(text, flush=True)
    LINES.append(text)
    if OUT:
        atomic_write_text(OUT[0], "\n".join(LINES) + "\n")


def sync(device: torch.device) -> None:
    """Wait for queued CUDA kernels before a clock read (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device) -> float:
    """perf_counter after the device has finished its queued work."""
    sync(device)
    return time.perf_counter()


def setup(n_samples: int | None, batch_size: int, seed: int):
    """(model, batches, label): pretrained ResNet-20 on CIFAR-10 when HMQAT_DATA_DIR is set, else
    random weights on synthetic data."""
    if os.environ.get("HMQAT_DATA_DIR"):
        model = create_model("resnet20", pretrained=True)
        ds = data.load_cifar10(split="train")
        n = n_samples or 1024
        label = (f"ResNet-20 pretrained (akamaster), {reporting.describe_data('cifar10', ds.source)} "
                 f"train split, {n} images")
    else:
        torch.manual_seed(seed)
        model = create_model("resnet20", pretrained=False)
        n = n_samples or 256
        ds = data.synthetic_cifar(n=n, seed=seed)
        label = f"ResNet-20 random weights, synthetic data, {n} images (smoke run)"
    batches = data.calibration_batches(ds, n_samples=n, batch_size=batch_size, seed=seed)
    return model.eval(), batches, label


def reference(model: nn.Module, batches, names: list[str], n_probes: int, seed: int,
              dev: torch.device):
    """(a) PyHessian-style per-layer Hutchinson: samples [n_probes, L], wall seconds, HVPs."""
    modules = dict(model.named_modules())
    params = [modules[n].weight for n in names]
    total = sum(x.shape[0] for x, _ in batches)
    crit = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    out = np.zeros((n_probes, len(names)))
    t0 = clock(dev)
    with hessian.measurement_mode(model, params, dev):
        for k in range(n_probes):
            v = [hessian.rademacher(p.shape, gen, dev) for p in params]
            acc = [torch.zeros_like(p) for p in params]
            for x, y in batches:
                x, y = x.to(dev), y.to(dev)
                g = torch.autograd.grad(crit(model(x), y), params, create_graph=True)
                hv = torch.autograd.grad(g, params, grad_outputs=v)
                for a, h in zip(acc, hv):
                    a.add_(h, alpha=x.shape[0] / total)
            out[k] = hessian.group_product(acc, v)
    return out, clock(dev) - t0, n_probes * len(batches)


def extrapolate(rel: np.ndarray, probes: int, tol: float, sec_per_probe: float):
    """Probes and seconds to reach rel_se <= tol on every layer (SE ∝ 1/sqrt(probes)), with a 90 %
    interval from the chi-square law of the worst layer's variance estimate (probes-1 dof)."""
    need = probes * float(np.max(rel / tol) ** 2)
    dof = probes - 1
    lo, hi = dof / stats.chi2.ppf(0.95, dof), dof / stats.chi2.ppf(0.05, dof)
    return need, need * sec_per_probe, (need * lo * sec_per_probe, need * hi * sec_per_probe)


def pyhessian_trace(model: nn.Module, batches, names: list[str], n_probes: int, seed: int,
                    dev: torch.device):
    """(c) pyhessian's whole-model trace over the same weights, single-batch mode per batch,
    weighted by batch size: (mean, stratified se, wall seconds)."""
    from pyhessian import hessian as PyHessian

    modules = dict(model.named_modules())
    params = [modules[n].weight for n in names]
    total = sum(x.shape[0] for x, _ in batches)
    torch.manual_seed(seed)   # pyhessian draws its probes from the global RNG
    mean = var = 0.0
    t0 = clock(dev)
    with hessian.measurement_mode(model, params, dev), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
        for x, y in batches:
            # pyhessian's cuda=True moves the batch with .cuda(), i.e. to the current device
            comp = PyHessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=dev.type == "cuda")
            vals = np.array(comp.trace(maxIter=n_probes, tol=0.0))   # tol=0: exactly n_probes
            w = x.shape[0] / total
            mean += w * vals.mean()
            var += w * w * vals.var(ddof=1) / len(vals)
            del comp
            for p in model.parameters():
                p.grad = None    # pyhessian leaves graph-carrying .grad tensors behind
    return mean, math.sqrt(var), clock(dev) - t0


def graph_reuse_times(model: nn.Module, batch, names: list[str], dev: torch.device,
                      reps: int = 3):
    """Seconds for one fresh HVP (forward + create_graph backward + second backward) and for one
    more HVP on a kept graph, at the calibration batch size (medians)."""
    modules = dict(model.named_modules())
    params = [modules[n].weight for n in names]
    x, y = batch[0].to(dev), batch[1].to(dev)
    gen = torch.Generator().manual_seed(0)
    crit = nn.CrossEntropyLoss()
    fresh, reused = [], []
    with hessian.measurement_mode(model, params, dev):
        for _ in range(reps):
            v = [hessian.rademacher(p.shape, gen, dev) for p in params]
            t = clock(dev)
            g = torch.autograd.grad(crit(model(x), y), params, create_graph=True)
            hessian.hessian_vector_product(g, params, v)
            fresh.append(clock(dev) - t)
            t = clock(dev)
            hessian.hessian_vector_product(g, params, v)
            reused.append(clock(dev) - t)
            del g
    return float(np.median(fresh)), float(np.median(reused))


def micro_batch_need(model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str],
                     sizes: tuple[int, ...], probes: int, tol: float, seed: int,
                     dev: torch.device) -> dict[int, float]:
    """Need-based seconds to reach tol on every layer with per-layer probes at each micro-batch
    size: Σ_i (CV_i/tol)²·t_i, CV_i² the within-batch per-sample variance over the squared trace
    (pooled over sizes) and t_i the measured seconds per HVP; sizes interleaved chunk by chunk."""
    modules = dict(model.named_modules())
    params = [modules[n].weight for n in names]
    crit = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    n, big = x.shape[0], max(sizes)
    vals = {b: np.zeros((n // b, probes, len(names))) for b in sizes}
    secs = {b: np.zeros(len(names)) for b in sizes}
    x, y = x.to(dev), y.to(dev)
    with hessian.measurement_mode(model, params, dev):
        for c in range(0, n - big + 1, big):
            for b in sizes:
                for s in range(c, c + big, b):
                    g = torch.autograd.grad(crit(model(x[s:s + b]), y[s:s + b]), params,
                                            create_graph=True)
                    for i, p in enumerate(params):
                        for k in range(probes):
                            v = hessian.rademacher(p.shape, gen, dev)
                            t = clock(dev)
                            hv = hessian.hessian_vector_product([g[i]], [p], [v])
                            secs[b][i] += clock(dev) - t
                            vals[b][s // b, k, i] = hessian.group_product(hv, [v])[0]
                    del g
    trace = np.mean([vals[b].mean((0, 1)) for b in sizes], axis=0)
    out = {}
    for b in sizes:
        cv2 = vals[b].var(1, ddof=1).mean(0) / trace ** 2
        out[b] = float((cv2 / tol ** 2 * secs[b] / vals[b].shape[0] / probes).sum())
    return out


def fair_reference(model: nn.Module, batches, names: list[str], tol: float, seed: int,
                   dev: torch.device, max_rounds: int = 100) -> dict:
    """(a') per-layer probes at the calibration batch size, run to convergence: per round, every
    batch gets a forward + create_graph backward and one fresh Rademacher HVP per active layer
    (restricted to that layer); the stratified mean/SE of Eq. H4; a layer stops once its
    rel. SE <= tol (after >= 2 rounds). Returns mean, se, rounds per layer, wall s, HVPs."""
    modules = dict(model.named_modules())
    params = [modules[n].weight for n in names]
    crit = nn.CrossEntropyLoss()
    sizes = np.array([x.shape[0] for x, _ in batches], dtype=np.float64)
    w = sizes / sizes.sum()
    gen = torch.Generator().manual_seed(seed)
    vals = [[[] for _ in batches] for _ in names]           # vals[layer][batch] -> probe values
    active = list(range(len(names)))
    rounds = np.zeros(len(names), dtype=int)
    hvps = 0
    mean = np.zeros(len(names))
    se = np.full(len(names), np.inf)
    t0 = clock(dev)
    with hessian.measurement_mode(model, params, dev):
        for r in range(max_rounds):
            if not active:
                break
            for b, (x, y) in enumerate(batches):
                x, y = x.to(dev), y.to(dev)
                g = torch.autograd.grad(crit(model(x), y), [params[i] for i in active],
                                        create_graph=True)
                for gi, i in zip(g, active):
                    v = hessian.rademacher(params[i].shape, gen, dev)
                    hv = torch.autograd.grad(gi, params[i], grad_outputs=v, retain_graph=True)[0]
                    vals[i][b].append(float(torch.vdot(hv.reshape(-1), v.reshape(-1))))
                    hvps += 1
                del g
            for i in active:
                rounds[i] += 1
                arr = [np.asarray(v) for v in vals[i]]
                mean[i] = sum(wb * a.mean() for wb, a in zip(w, arr))
                if rounds[i] >= 2:
                    se[i] = math.sqrt(sum(wb * wb * a.var(ddof=1) / len(a)
                                          for wb, a in zip(w, arr)))
            active = [i for i in active if not (rounds[i] >= 2 and se[i] <= tol * abs(mean[i]))]
    return {"mean": mean.copy(), "se": se.copy(), "rounds": rounds.copy(),
            "wall_s": clock(dev) - t0, "hvps": hvps, "converged": not active}


def agreement_z(ref: dict, df: pd.DataFrame) -> np.ndarray:
    """Per-layer z of the reference's trace against a frame's, with both SEs."""
    return (ref["mean"] - df["trace"].to_numpy()) / np.sqrt(
        ref["se"] ** 2 + (df["avg_trace_se"] * df["n_params"]).to_numpy() ** 2)


def gauss_newton_run(model: nn.Module, batches, projections: int | None, seed: int,
                     dev: torch.device) -> pd.DataFrame:
    """(f) hmqat.hessian.gauss_newton_traces: exact (projections None) or r output-space probes
    per image; the piecewise-linearity check runs in every call and is timed with it."""
    t0 = clock(dev)
    df = hessian.gauss_newton_traces(model, batches, projections=projections, seed=seed,
                                     device=dev)
    df.attrs["wall_s"] = clock(dev) - t0
    return df


def fair_comparison(model: nn.Module, batches, names: list[str], tols: list[float],
                    repeats: list[int], seed: int, dev: torch.device, max_probes: int,
                    gn_projections: list[int | None] | None = None) -> dict:
    """(a') vs (b), (b-h) and (f), interleaved repeat by repeat (the order rotates) at every tol;
    prints one line per run and returns {tol: {"hmqat": [...], "ref": [...], "frames": [...],
    "hutch": [...], "hutch:frames": [...], "gn:<r>": [...], ...}}. (b) is ``layer_traces`` with
    its defaults (method "auto": exact Gauss-Newton traces where they apply, so its time does
    not depend on tol); (b-h) the Hutchinson probes at tol; (f) a fixed number of output-space
    projections whose rel. SE is printed (no tolerance either)."""
    out = {}
    gn_keys = [f"gn:{r}" for r in (gn_projections or [])]
    for tol, reps in zip(tols, repeats):
        runs = {"hmqat": [], "ref": [], "frames": [], "ref_runs": [], "hutch": [],
                "hutch:frames": [],
                **{k: [] for k in gn_keys}, **{k + ":frames": [] for k in gn_keys}}
        for k in range(reps):
            order = ["hmqat", "hutch", "ref", *gn_keys]
            order = order[k % len(order):] + order[:k % len(order)]
            for which in order:
                if which.startswith("gn:"):
                    r = None if which == "gn:None" else int(which[3:])
                    df = gauss_newton_run(model, batches, r, seed + 10 * k + 7, dev)
                    runs[which].append(df.attrs["wall_s"])
                    runs[which + ":frames"].append(df)
                    say(f"tol {tol}: repeat {k} gauss-newton "
                        f"{'exact' if r is None else f'{r} proj.'} {df.attrs['wall_s']:7.1f} s, "
                        f"{df.attrs['vjps']} VJPs, max rel_se {df['rel_se'].max():.4f}, "
                        f"median data rel. SE {(df['data_se'] / df['avg_trace']).median():.3f}")
                elif which == "hmqat":                # (b): the defaults (method "auto")
                    df = hessian.layer_traces(model, batches, tol=tol, seed=seed + 10 * k,
                                              progress=False, device=dev,
                                              max_probes=max_probes * 8)
                    runs["hmqat"].append(df.attrs["wall_s"])
                    runs["frames"].append(df)
                    say(f"tol {tol}: repeat {k} hmqat defaults {df.attrs['wall_s']:7.1f} s, "
                        f"method {df.attrs['method']}, {df.attrs.get('vjps', 0)} VJPs, "
                        f"{df.attrs['hvps']} HVPs, max rel_se {df['rel_se'].max():.4f}")
                elif which == "hutch":                # (b-h): Hutchinson probes to tol
                    # max_probes per 16-image stratum = 8x the reference's rounds per batch of 128
                    df = hessian.layer_traces(model, batches, tol=tol, seed=seed + 10 * k,
                                              progress=False, device=dev, method="hutchinson",
                                              max_probes=max_probes * 8)
                    runs["hutch"].append(df.attrs["wall_s"])
                    runs["hutch:frames"].append(df)
                    say(f"tol {tol}: repeat {k} hutchinson {df.attrs['wall_s']:7.1f} s, "
                        f"{df.attrs['hvps']} HVPs, converged={df.attrs['converged']}, "
                        f"max rel_se {df['rel_se'].max():.4f}")
                else:
                    ref = fair_reference(model, batches, names, tol, seed + 10 * k + 5, dev,
                                         max_rounds=max_probes)
                    runs["ref"].append(ref["wall_s"])
                    runs["ref_runs"].append(ref)
                    rel = ref["se"] / np.abs(ref["mean"])
                    say(f"tol {tol}: repeat {k} reference  {ref['wall_s']:7.1f} s, "
                        f"{ref['hvps']} HVPs, converged={ref['converged']}, max rel_se "
                        f"{np.max(rel):.4f}, rounds per layer {ref['rounds'].min()}-"
                        f"{ref['rounds'].max()}")
        ref = runs["ref_runs"][0]
        for key, name in (("", "b"), ("hutch:", "b-h")):
            times = runs[key.rstrip(":") or "hmqat"]
            ratios = np.array(times) / np.array(runs["ref"])
            runs[key + "ratios"] = ratios
            z = agreement_z(ref, runs[key + "frames"][0])
            say(f"tol {tol}: time({name})/time(a') per repeat {np.round(ratios, 3).tolist()}, "
                f"median {np.median(ratios):.3f}; ({name}) median {np.median(times):.1f} s, "
                f"reference median {np.median(runs['ref']):.1f} s; per-layer agreement (repeat "
                f"0) |z| median {np.median(np.abs(z)):.2f}, max {np.abs(z).max():.2f}")
        for key in gn_keys:
            runs[key + ":ratios"] = np.array(runs[key]) / np.array(runs["ref"])
            zg = agreement_z(ref, runs[key + ":frames"][0])
            say(f"tol {tol}: time(f, {key})/time(a') per repeat "
                f"{np.round(runs[key + ':ratios'], 3).tolist()}, median "
                f"{np.median(runs[key + ':ratios']):.3f}; agreement with the reference "
                f"(repeat 0) |z| median {np.median(np.abs(zg)):.2f}, max {np.abs(zg).max():.2f}")
        out[tol] = runs
    return out


class PickJudge:
    """(e), (g): the joint-Ω Pareto picks at ``budgets`` (bits 2–8, 4-bit activations,
    first/last at 8) from a frame's traces, and how two picks compare under a frame's traces."""

    BITS = (2, 3, 4, 5, 6, 8)

    def __init__(self, model: nn.Module, budgets: list[float]) -> None:
        from hmqat import search, sensitivity

        self.sens, self.budgets = sensitivity, budgets
        self.qerr = sensitivity.omega_table(model, None, self.BITS, variant="qerr_only",
                                            method="mse")
        self.inp = search.model_inputs(model, a_bits=4, policy="first_last_8")
        self.q = self.qerr[list(self.BITS)].to_numpy(float)

    def traces(self, frame: pd.DataFrame) -> np.ndarray:
        return frame.loc[self.qerr.index, "avg_trace"].to_numpy(float)

    def picks(self, frame: pd.DataFrame) -> list[tuple[int, ...]]:
        return self.sens._picks(self.qerr, self.traces(frame), self.inp, self.budgets, self.BITS)

    def compare(self, mine: list, frame: pd.DataFrame) -> tuple[list[bool], list[str]]:
        """Same pick as ``frame``'s at each budget, and the ΣΩ of ``mine`` above ``frame``'s
        pick under ``frame``'s traces."""
        t = np.clip(self.traces(frame), 0.0, None)

        def cost(pick: tuple[int, ...]) -> float:
            return float(sum(t[i] * self.q[i, self.BITS.index(b)] for i, b in enumerate(pick)))
        theirs = self.picks(frame)
        return ([a == b for a, b in zip(mine, theirs)],
                [f"{cost(a) / cost(b) - 1.0:+.2%}" for a, b in zip(mine, theirs)])


def _exact_frame(fair: dict, tol0: float) -> tuple[pd.DataFrame | None, float | None]:
    """The exact traces of the fair comparison and their median time: (b)'s frames when the
    defaults resolved to the exact form, else (f)'s exact runs; (None, None) without either."""
    runs = fair.get(tol0, {})
    frames = runs.get("frames", [])
    if frames and frames[0].attrs.get("method") == "gauss_newton" \
            and frames[0].attrs.get("projections") is None:
        return frames[0], float(np.median(runs["hmqat"]))
    if runs.get("gn:None:frames"):
        return runs["gn:None:frames"][0], float(np.median(runs["gn:None"]))
    return None, None


def decision_section(model: nn.Module, batches, budgets: list[float], seed: int,
                     dev: torch.device, fair: dict, tols: list[float], max_probes: int,
                     pick_tol: float | None = None, fair_file: Path | None = None,
                     regret: float | None = None, methods: tuple[str, ...] = ("auto",)
                     ) -> list[tuple[str, pd.DataFrame]]:
    """(e): decision-based stopping (``layer_traces(stop_rule=decision_stop_rule(...))``) for
    each of ``methods`` ("auto" = the defaults: output-space probe rounds on the Gauss-Newton
    path; "hutchinson": parameter-space probes) vs the fair reference; its picks vs the
    Hutchinson traces at ``pick_tol`` (0.05) and vs the exact traces (same pick, and the pick's
    ΣΩ excess under the compared traces)."""
    from hmqat import sensitivity

    judge = PickJudge(model, budgets)
    bits, qerr = judge.BITS, judge.qerr
    tol0 = tols[0]
    t_ref = float(np.median(fair[tol0]["ref"])) if tol0 in fair else None
    if t_ref is None and fair_file is not None and fair_file.exists():
        refs = [float(line.split("reference")[1].split()[0]) for line in
                fair_file.read_text().splitlines()
                if line.startswith(f"tol {tol0}: repeat") and " reference " in line]
        t_ref = float(np.median(refs)) if refs else None

    say(f"\n## (e) decision-based stopping (budgets {budgets}x, joint Ω, bits {list(bits)}, "
        f"±1.96 SE, {2 * len(qerr) + 32} perturbations per check; "
        + ("same pick required)" if regret is None else
           f"stable = every perturbed optimum within {regret:g} relative ΣΩ of the pick)"))
    frames05 = fair[0.05]["hutch:frames"] if 0.05 in fair else []
    if not frames05 and pick_tol:
        df05 = hessian.layer_traces(model, batches, tol=pick_tol, seed=seed + 555,
                                    progress=False, device=dev, max_probes=max_probes * 8,
                                    method="hutchinson")
        say(f"Hutchinson alone at tol {pick_tol} (for the pick comparison; no reference run at "
            f"this tol): {df05.attrs['wall_s']:.1f} s, {df05.attrs['hvps']} HVPs, converged="
            f"{df05.attrs['converged']}")
        frames05 = [df05]
    exact, _ = _exact_frame(fair, tol0)
    out: list[tuple[str, pd.DataFrame]] = []
    for method in methods:
        rule = sensitivity.decision_stop_rule(model, budgets, bits=bits, a_bits=4,
                                              policy="first_last_8", method="mse", seed=seed,
                                              regret=regret)
        df = hessian.layer_traces(model, batches, tol=0.05, seed=seed + 777, progress=False,
                                  device=dev, max_probes=max_probes * 8, stop_rule=rule,
                                  method=method)
        t_dec = df.attrs["wall_s"]
        how = (f"{df.attrs['hvps']} HVPs in {df.attrs['sweeps']} sweeps"
               if df.attrs["method"] == "hutchinson" else
               f"{df.attrs['vjps']} VJPs in {df.attrs['rounds']} rounds, "
               f"{df.attrs['projections'] or 'exact (all'} output-space probes per image"
               + (")" if df.attrs["projections"] is None else ""))
        say(f"[{method} -> {df.attrs['method']}] stopped by the rule: "
            f"{df.attrs['stopped_by_rule']}, {how}, {t_dec:.1f} s (checks: "
            f"{[(h['probes'], h['stable']) for h in rule.history]}); max rel_se "
            f"{df['rel_se'].max():.3f}")
        key = "decision_ratio" if method == "auto" else f"decision_ratio_{method}"
        if t_ref is not None:
            say(f"{key}: {t_dec / t_ref:.4f}  (time(e, {method}) / fair reference median "
                f"{t_ref:.1f} s at tol {tol0}"
                f"{'' if tol0 in fair else f', read from {fair_file.name}'}; goal <= 0.1)")
        mine = judge.picks(df)
        for k, ref_df in enumerate(frames05):
            same, excess = judge.compare(mine, ref_df)
            say(f"  picks equal to the Hutchinson tol-{pick_tol or 0.05} traces' (run {k}) at "
                f"{budgets}: {same}; ΣΩ under those traces above their pick's {excess}")
        if exact is not None:
            same, excess = judge.compare(mine, exact)
            say(f"  picks equal to the exact traces' at {budgets}: {same}; ΣΩ under the exact "
                f"traces above the exact pick's {excess}")
        out.append((f"decision rule (e, {method})", df))
    for k, ref_df in enumerate(frames05):
        stable, info = sensitivity.decision_is_stable(
            qerr, judge.traces(ref_df),
            ref_df.loc[qerr.index, "avg_trace_se"].to_numpy(float), judge.inp, budgets,
            bits=bits, z=1.0, seed=seed)
        say(f"Hutchinson tol-{pick_tol or 0.05} picks (run {k}) unchanged by every ±1 SE "
            f"perturbation tried: {stable} ({info['n_checked']} tried; first change: "
            f"{info['changed_by']})")
    if not frames05:
        say("tol 0.05 was not run in this process: the pick comparison needs --tols with 0.05 "
            "or --pick-tol 0.05")
    return out + [(f"Hutchinson tol {pick_tol or 0.05}, run {k}", f)
                  for k, f in enumerate(frames05)]


def exact_picks_section(model: nn.Module, batches, budgets: list[float], fair: dict,
                        tols: list[float], others: list[tuple[str, pd.DataFrame]],
                        pick_tol: float | None, seed: int, dev: torch.device,
                        max_probes: int) -> None:
    """(g): the Pareto picks of the exact traces ((b) when the defaults resolved to them, else
    (f) exact) at ``budgets``, against the picks of every other frame at hand (the Hutchinson
    runs (b-h) at each tol, (f)'s projection runs, and (e)'s frames; without a Hutchinson frame
    at ``pick_tol`` one run at it is added): same pick, and the pick's ΣΩ excess under the exact
    traces."""
    if pick_tol and pick_tol not in tols and not any(f"tol {pick_tol}" in n for n, _ in others):
        df = hessian.layer_traces(model, batches, tol=pick_tol, seed=seed + 555, progress=False,
                                  device=dev, max_probes=max_probes * 8, method="hutchinson")
        others = list(others) + [(f"Hutchinson tol {pick_tol} ({df.attrs['wall_s']:.0f} s)",
                                  df)]
    tol0 = tols[0]
    exact, t_ex_time = _exact_frame(fair, tol0)
    if exact is None:
        say("\n(g) skipped: no exact Gauss-Newton run in the fair comparison")
        return
    judge = PickJudge(model, budgets)
    say(f"\n## (g) picks from the exact Gauss-Newton traces at {budgets}x (joint Ω, bits "
        f"{list(judge.BITS)})")
    frames = ([(f"Hutchinson tol {t}, repeat {k}", f) for t in tols
               for k, f in enumerate(fair.get(t, {}).get("hutch:frames", []))]
              + [(f"{key.split(':')[1]} output-space probes per image, repeat {k}", f)
                 for key, runs in fair.get(tol0, {}).items()
                 if key.startswith("gn:") and key.endswith(":frames") and key != "gn:None:frames"
                 for k, f in enumerate(runs)]
              + list(others))
    for name, frame in frames:
        same, excess = judge.compare(judge.picks(frame), exact)
        say(f"{name}: same pick as the exact traces {same}; ΣΩ under the exact traces above the "
            f"exact pick's {excess}")
    t_ref = float(np.median(fair[tol0]["ref"]))
    say(f"exact_pick_ratio: {t_ex_time / t_ref:.4f}  (median time of the exact traces / fair "
        f"reference median at tol {tol0}: the exact picks, no probe error; decision goal "
        f"<= 0.1)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-samples", type=int, default=None, help="calibration images "
                    "(default 1024 real, 256 synthetic)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--tol", type=float, default=None,
                    help="target relative SE (default 0.05; 0.2 for the synthetic smoke run)")
    ap.add_argument("--ref-probes", type=int, default=5,
                    help="probes of the OLD shared-probe reference (a); 0 skips it")
    ap.add_argument("--tols", type=float, nargs="+", default=None,
                    help="tolerances of the fair comparison (a') vs (b); the first gives "
                         "fair_ratio (default: --tol)")
    ap.add_argument("--repeats", type=int, nargs="+", default=[3],
                    help="interleaved repeats per --tols entry (one number: the same for all)")
    ap.add_argument("--budgets", type=float, nargs="+", default=[6.0, 10.34, 14.0],
                    help="compressions at which the decision rule (e) must keep its pick")
    ap.add_argument("--pick-tol", type=float, default=0.05,
                    help="when 0.05 is not in --tols: run hmqat alone at this tol for the "
                         "decision rule's pick comparison (0 skips)")
    ap.add_argument("--max-probes", type=int, default=100,
                    help="cap of (a') rounds per batch (hmqat: 8x this per 16-image stratum)")
    ap.add_argument("--regret", type=float, default=None,
                    help="decision rule (e): accept a pick whose ΣΩ is within this relative "
                         "tolerance of every perturbed optimum (default: same pick required)")
    ap.add_argument("--sections", nargs="+", default=["fair", "decision", "picks", "old"],
                    choices=["fair", "decision", "picks", "old"],
                    help="what to run (several processes can share the work; see --fair-file)")
    ap.add_argument("--fair-file", type=Path, default=None,
                    help="with --sections decision but not fair: the output file of a concurrent "
                         "fair run, whose reference times give decision_ratio")
    ap.add_argument("--skip-old", action="store_true",
                    help="skip the old sections (a) extrapolated, (c) pyhessian and (d) levers")
    ap.add_argument("--pyhessian-probes", type=int, default=3,
                    help="probes per batch (0 skips (c); it is skipped too when pyhessian is "
                         "not installed)")
    ap.add_argument("--joint-probes", type=int, default=3)
    ap.add_argument("--lever-samples", type=int, default=512,
                    help="images for the micro-batch comparison (0 skips it)")
    ap.add_argument("--gn-projections", type=int, nargs="*", default=[2],
                    help="(f) gauss_newton_traces runs in the fair comparison: r >= 2 = r "
                         "output-space probes per image, 0 = exact (what (b) computes when its "
                         "defaults resolve to it); none to skip")
    ap.add_argument("--decision-methods", nargs="+", default=["auto"],
                    choices=list(hessian.METHODS),
                    help="layer_traces(method=...) runs of the decision rule (e); 'auto' = the "
                         "defaults")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu",
                    help="cpu, cuda, cuda:N or auto (cuda when available); default cpu")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bench" / "hessian_traces.txt")
    args = ap.parse_args()
    if args.pyhessian_probes == 1:
        ap.error("--pyhessian-probes 1 gives no standard error: use 0 (skip) or >= 2")
    dev = resolve_device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch.cuda.is_available() is False here "
                         f"(torch {torch.__version__}); use --device cpu or a CUDA build of torch")
    t_start = time.perf_counter()
    pd.set_option("display.width", 160)
    OUT.append(args.out)

    model, batches, label = setup(args.n_samples, args.batch_size, args.seed)
    if args.tol is None:
        args.tol = 0.05 if os.environ.get("HMQAT_DATA_DIR") else 0.2
    names = [i.name for i in quantizable_layers(model)]
    say(f"# hmqat.hessian benchmark  ({time.strftime('%Y-%m-%d %H:%M')})")
    say(f"data/model: {label}; {len(batches)} batches of {args.batch_size}; tol={args.tol}")
    say(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average at start {os.getloadavg()[0]:.2f}")
    if dev.type == "cuda":
        say(f"device: {dev} ({torch.cuda.get_device_name(dev)}), CUDA {torch.version.cuda}, "
            f"cuDNN {torch.backends.cudnn.version()}; clocks read after torch.cuda.synchronize")
    else:
        say("device: cpu")

    # (a') vs (b): the fair comparison, interleaved repeats, run to convergence
    tols = args.tols or [args.tol]
    reps = args.repeats * len(tols) if len(args.repeats) == 1 else args.repeats
    if len(reps) != len(tols):
        ap.error(f"--repeats needs one number or one per --tols entry ({len(tols)})")
    fair: dict = {}
    if "fair" in args.sections:
        say("\n## (a') FAIR reference (per-layer probes, batch "
            f"{args.batch_size}, kept first-order graph per batch, per-layer stopping, stratified "
            "SE) vs (b) hmqat layer_traces defaults (method 'auto') and (b-h) its Hutchinson "
            "probes; all run to convergence, interleaved")
        gn = [None if r == 0 else r for r in args.gn_projections]
        fair = fair_comparison(model, batches, names, tols, reps, args.seed, dev,
                               args.max_probes, gn)
        r0, f0 = fair[tols[0]]["ratios"], fair[tols[0]]["frames"][0]
        what = (f"{f0.attrs['method']}"
                + (", exact" if f0.attrs.get("projections", 0) is None else ""))
        say(f"\nfair_ratio: {np.median(r0):.4f}  (median over {len(r0)} interleaved repeats of "
            f"time(b)/time(a') at tol {tols[0]}; (b) = layer_traces defaults -> {what}, max "
            f"rel_se {f0['rel_se'].max():.4f}; goal <= 0.25)")
        h0 = fair[tols[0]]["hutch:ratios"]
        say(f"fair_ratio_hutchinson: {np.median(h0):.4f}  (median over {len(h0)} interleaved "
            f"repeats of time(b-h)/time(a') at tol {tols[0]})")
        for r in gn:
            g = fair[tols[0]][f"gn:{r}:ratios"]
            frame = fair[tols[0]][f"gn:{r}:frames"][0]
            say(f"fair_ratio_gauss_newton_{'exact' if r is None else f'{r}proj'}: "
                f"{np.median(g):.4f}  (median over {len(g)} interleaved repeats of "
                f"time(f)/time(a') at tol {tols[0]}; max rel_se {frame['rel_se'].max():.4f}"
                f"{', exact: no probe error' if r is None else ''})")
        for t in tols[1:]:
            say(f"fair_ratio_hutchinson_tol{t}: {np.median(fair[t]['hutch:ratios']):.4f}  "
                f"(median over {len(fair[t]['hutch:ratios'])} repeats)")
    others: list[tuple[str, pd.DataFrame]] = []
    if "decision" in args.sections:
        others = decision_section(model, batches, args.budgets, args.seed, dev, fair, tols,
                                  args.max_probes, args.pick_tol, args.fair_file, args.regret,
                                  tuple(args.decision_methods))
    if "picks" in args.sections:
        exact_picks_section(model, batches, args.budgets, fair, tols, others, args.pick_tol,
                            args.seed, dev, args.max_probes)
    if "old" not in args.sections:
        args.skip_old = True
    if args.skip_old:
        say(f"\n(old sections (a) extrapolated shared-probe reference, (c), (d) skipped: "
            f"--skip-old)\ntotal benchmark wall {time.perf_counter() - t_start:.0f} s; load "
            f"average at end {os.getloadavg()[0]:.2f}")
        atomic_write_text(args.out, "\n".join(LINES) + "\n")
        print(f"wrote {args.out}")
        return

    # (b-h) the Hutchinson probes, to convergence (the first fair-comparison run at --tol when
    # there is one): the old sections compare probe estimators
    df = next((f for f in fair.get(args.tol, {}).get("hutch:frames", [])), None)
    if df is None:
        df = hessian.layer_traces(model, batches, tol=args.tol, seed=args.seed, progress=False,
                                  device=dev, method="hutchinson")
    t_hmqat = df.attrs["wall_s"]
    say("\n## (b-h) hmqat layer_traces, Hutchinson (method='hutchinson', probe='layer', "
        f"micro_batch='auto' -> {df.attrs['micro_batch']}, stratified, adaptive)")
    say(f"wall {t_hmqat:.1f} s, {df.attrs['hvps']} HVPs in {df.attrs['sweeps']} sweeps over "
        f"{df.attrs['n_batches']} micro-batches, converged={df.attrs['converged']}, "
        f"max rel_se {df['rel_se'].max():.4f}")
    show = df[["n_params", "trace", "avg_trace", "avg_trace_se", "rel_se", "probes", "samples"]]
    say(show.to_string(float_format=lambda v: f"{v:.4g}"))

    # (a) reference, extrapolated
    X, t_ref, ref_hvps = reference(model, batches, names, args.ref_probes, args.seed + 1, dev)
    mean, se = X.mean(0), X.std(0, ddof=1) / math.sqrt(len(X))
    rel = se / np.abs(mean)
    need, t_need, (t_lo, t_hi) = extrapolate(rel, len(X), args.tol, t_ref / len(X))
    say("\n## (a) OLD reference, second row only (PyHessian-style: one SHARED whole-model probe "
        "at a time, fresh double backward per batch, EXTRAPOLATED; not a fair per-layer "
        "reference)")
    say(f"{len(X)} probes = {ref_hvps} HVPs in {t_ref:.1f} s ({t_ref / ref_hvps:.2f} s per HVP at "
        f"batch {args.batch_size}, {t_ref / len(X):.1f} s per probe)")
    worst = int(np.argmax(rel))
    say(f"rel_se after {len(X)} probes: median {np.median(rel):.3f}, worst {rel[worst]:.3f} "
        f"({names[worst]})")
    say(f"EXTRAPOLATED to rel_se <= {args.tol} on every layer: {need:.0f} probes, "
        f"{t_need:.0f} s = {t_need / 3600:.2f} h (90 % interval {t_lo / 3600:.2f}-"
        f"{t_hi / 3600:.2f} h)")
    z = (mean - df["trace"].to_numpy()) / np.sqrt(se ** 2 + (df["avg_trace_se"] *
                                                            df["n_params"]).to_numpy() ** 2)
    say(f"per-layer agreement with (b-h): |z| median {np.median(np.abs(z)):.2f}, max "
        f"{np.abs(z).max():.2f} ({names[int(np.argmax(np.abs(z)))]}); "
        f"{int((np.abs(z) > 2).sum())}/{len(z)} layers beyond 2 sigma")
    say(f"\nold_shared_probe_ratio (b-h)/(a) at equal error (every layer <= {args.tol:.0%} rel. "
        f"SE, (a) extrapolated): {t_hmqat / t_need:.4f}x  (90 % interval "
        f"{t_hmqat / t_hi:.4f}-{t_hmqat / t_lo:.4f}x)")

    # (c) pyhessian whole-model trace over the same weights
    tot, tot_se = df["trace"].sum(), math.sqrt(((df["avg_trace_se"] * df["n_params"]) ** 2).sum())
    ref_tot = X.sum(1)
    ref_mean, ref_se = ref_tot.mean(), ref_tot.std(ddof=1) / math.sqrt(len(ref_tot))
    say(f"\n## (c) whole-model trace over the {len(names)} Conv2d/Linear weights")
    say(f"hmqat sum_i Tr(H_ii)                      = {tot:9.2f} +- {tot_se:.2f} (SE)")
    if args.pyhessian_probes <= 0:
        say("pyhessian: skipped (--pyhessian-probes 0)")
    elif importlib.util.find_spec("pyhessian") is None:
        say("pyhessian: skipped (not installed; requirements.txt pins PyHessian==0.1)")
    else:
        py_mean, py_se, t_py = pyhessian_trace(model, batches, names, args.pyhessian_probes,
                                               args.seed + 2, dev)
        say(f"pyhessian, {args.pyhessian_probes} probes on each of {len(batches)} batches    = "
            f"{py_mean:9.2f} +- {py_se:.2f} ({t_py:.0f} s); "
            f"z = {(py_mean - tot) / math.hypot(py_se, tot_se):+.2f}")
    say(f"reference (a), {len(X)} shared probes        = {ref_mean:9.2f} +- {ref_se:.2f}; "
        f"z = {(ref_mean - tot) / math.hypot(ref_se, tot_se):+.2f}; per-probe values "
        f"{np.round(np.sort(ref_tot)).astype(int).tolist()} (shared-probe skew: see docstring)")

    # (d) lever: docs/design.md §3's joint probe, and graph reuse
    dj = hessian.layer_traces(model, batches, tol=args.tol, seed=args.seed, progress=False,
                              probe="joint", min_probes=min(2, args.joint_probes),
                              max_probes=args.joint_probes, device=dev, method="hutchinson")
    r_j = int(dj["probes"].max())
    _, t_need_j, (tj_lo, tj_hi) = extrapolate(dj["rel_se"].to_numpy(), r_j, args.tol,
                                                   dj.attrs["wall_s"] / r_j)
    say("\n## (d) levers")
    say(f"probe='joint' (one HVP over all active layers, same micro-batches): {r_j} probes per "
        f"batch, {dj.attrs['hvps']} HVPs in {dj.attrs['wall_s']:.1f} s, worst rel_se "
        f"{dj['rel_se'].max():.3f} ({dj['rel_se'].idxmax()}); EXTRAPOLATED to {args.tol}: "
        f"{t_need_j:.0f} s (90 % {tj_lo:.0f}-{tj_hi:.0f} s) vs probe='layer' measured "
        f"{t_hmqat:.0f} s")
    per_sample = dj["rel_se"] ** 2 * dj["samples"] / (df["rel_se"] ** 2 * df["samples"])
    say(f"per-sample variance joint/layer (same micro-batches): median {per_sample.median():.1f}"
        f"x, range {per_sample.min():.1f}-{per_sample.max():.1f}x (cross-block terms "
        f"v_i'H_ij v_j)")
    if args.lever_samples >= 128:
        x = torch.cat([b[0] for b in batches])[:args.lever_samples]
        y = torch.cat([b[1] for b in batches])[:args.lever_samples]
        need = micro_batch_need(model, x, y, names, (16, 128), 3, args.tol, args.seed + 3, dev)
        say(f"micro-batch 16 vs 128 (per-layer probes, {x.shape[0]} images, 3 probes per batch, "
            f"interleaved): need-based time to {args.tol} {need[16]:.0f} s vs {need[128]:.0f} s "
            f"({need[128] / need[16]:.2f}x)")
    fresh, reused = graph_reuse_times(model, batches[0], names, dev)
    say(f"graph reuse at batch {args.batch_size}: fresh HVP {fresh:.2f} s, HVP on a kept graph "
        f"{reused:.2f} s ({fresh / reused:.2f}x)")
    say(f"\ntotal benchmark wall {time.perf_counter() - t_start:.0f} s; load average at end "
        f"{os.getloadavg()[0]:.2f}")
    atomic_write_text(args.out, "\n".join(LINES) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
