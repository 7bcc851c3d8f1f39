"""Benchmark of hmqat.hessian.layer_traces (docs/design.md §3 "Sensitivity"): time to reach a relative
standard error <= tol (5 %) on EVERY layer's trace, against the PyHessian/HAWQ-V2-style reference.

    HMQAT_DATA_DIR=../shared/data/cifar10-jpeg HMQAT_WEIGHTS_DIR=../shared/weights/cifar10 \\
        .venv/bin/python benchmarks/hessian_traces.py        # writes results/bench/hessian_traces.txt

Without HMQAT_DATA_DIR: random-weight ResNet-20 on synthetic data (a smoke run: 256 images,
tol 0.2). ``--device cuda`` computes everything on the GPU (probes are drawn on the CPU, as in
hmqat, and copied; CUDA is synchronised before every clock read); a short GPU check is

    python benchmarks/hessian_traces.py --device cuda --ref-probes 3 --lever-samples 0 \
        --out results/bench/hessian_traces_cuda.txt

Measured side by side in one process, on the same calibration batches (estimand: the Hessian
of the mean loss over them, BN in eval mode):
  (a) reference: one Rademacher probe over all layers at a time; for each probe, every batch gets
      a fresh forward, a backward with create_graph and a second backward (double backward), and
      the per-batch HVPs are summed weighted by batch size (PyHessian's dataloader mode). Its SE is
      over probes. Running it to 5 % takes hours, so it runs --ref-probes probes and the time to
      5 % is EXTRAPOLATED: time/probe × probes·max_i(rel_se_i/tol)² (SE ∝ 1/sqrt(probes)); a 90 %
      interval from the chi-square distribution of the worst layer's variance estimate is given.
  (b) hmqat: layer_traces(model, batches, tol=0.05) with its defaults, run to convergence
      (measured, not extrapolated).
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

LINES: list[str] = []


def say(text: str = "") -> None:
    """Print and keep the line for the output file."""
    print(text, flush=True)
    LINES.append(text)


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
        label = f"ResNet-20 pretrained (akamaster), CIFAR-10 train ({ds.source}), {n} images"
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-samples", type=int, default=None, help="calibration images "
                    "(default 1024 real, 256 synthetic)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--tol", type=float, default=None,
                    help="target relative SE (default 0.05; 0.2 for the synthetic smoke run)")
    ap.add_argument("--ref-probes", type=int, default=5)
    ap.add_argument("--pyhessian-probes", type=int, default=3,
                    help="probes per batch (0 skips (c); it is skipped too when pyhessian is "
                         "not installed)")
    ap.add_argument("--joint-probes", type=int, default=3)
    ap.add_argument("--lever-samples", type=int, default=512,
                    help="images for the micro-batch comparison (0 skips it)")
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

    # (b) hmqat, to convergence
    df = hessian.layer_traces(model, batches, tol=args.tol, seed=args.seed, progress=False,
                              device=dev)
    t_hmqat = df.attrs["wall_s"]
    say("\n## (b) hmqat layer_traces (defaults: probe='layer', micro_batch='auto' -> "
        f"{df.attrs['micro_batch']}, stratified, adaptive)")
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
    say("\n## (a) reference (PyHessian-style: one probe at a time, fresh double backward per "
        "batch)")
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
    say(f"per-layer agreement with (b): |z| median {np.median(np.abs(z)):.2f}, max "
        f"{np.abs(z).max():.2f} ({names[int(np.argmax(np.abs(z)))]}); "
        f"{int((np.abs(z) > 2).sum())}/{len(z)} layers beyond 2 sigma")
    say(f"\n## ratio (b)/(a) at equal error (every layer <= {args.tol:.0%} rel. SE): "
        f"{t_hmqat / t_need:.4f}x  (90 % interval {t_hmqat / t_hi:.4f}-{t_hmqat / t_lo:.4f}x; "
        f"goal <= 0.25x)")

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
                              max_probes=args.joint_probes, device=dev)
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
