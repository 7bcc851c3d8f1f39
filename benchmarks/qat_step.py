"""QAT train-step cost vs FP32 (issue 3): ResNet-20, batch 128, one process, interleaved.

    .venv/bin/python benchmarks/qat_step.py            # the recorded run (make bench), ~2-4 min
    .venv/bin/python benchmarks/qat_step.py --threads 0,2 --reps 30
    .venv/bin/python benchmarks/qat_step.py --layouts nchw --no-baselines --out ''
    python benchmarks/qat_step.py --device cuda --out results/bench/qat_step_cuda.txt

One "step" is forward + cross-entropy + backward + SGD(momentum) step on a fixed random batch.
Every variant has its own model copy and optimizer; each repetition runs one step of every
variant in a rotated order, so machine load (shared CPUs) hits all variants alike. Reported:
median step time per variant, the ratio of medians, and the median of per-repetition ratios
(QAT step / FP32 step of the same repetition), for wall time and for process CPU time (with
one thread the CPU time is barely affected by other processes on shared cores). Variants:

* ``fp32``           plain ResNet-20
* ``hmqat-eager``    hmqat.quant, eager kernels (default backend)
* ``hmqat-compile``  hmqat.quant, torch.compile-fused kernels (``set_backend("compile")``)
* ``naive-lsq``      the textbook LSQ expression with detach-STE and grad scale
* ``torch-fused``    torch._fake_quantize_learnable_per_{tensor,channel}_affine

QAT variants use mixed 2-8-bit weights (cycling 2,3,...,8 over the layers; first conv and last
linear at 8, policy first_last_8) and 4-bit activations. Every variant runs in each requested
memory layout (default NCHW and channels_last/NHWC), compared with FP32 in the same layout.
``--threads 0,2`` repeats the whole measurement at each thread count (0 = the process
default, i.e. OMP_NUM_THREADS). Writes the tables (atomically) to results/bench/qat_step.txt
unless --out '' is given.

``--device cuda`` (or ``cuda:N``) runs everything on that GPU. Each timed step is bracketed by
``torch.cuda.synchronize``, so the wall time covers the kernels, not just their launch. A
memory column is added: the peak of ``torch.cuda.max_memory_allocated`` during one step of each
variant minus the allocation before it (the resident models and optimizer states of all
variants excluded). The cpu columns then measure only the host's launch overhead.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hmqat import quant
from hmqat.models import create_model
from hmqat.runtime import atomic_write_bytes, resolve_device


def mixed_config(model: nn.Module) -> dict[str, int]:
    """Bits cycling 2..8 over the layers in forward order, first/last layer at 8."""
    names = list(quant.uniform_config(model, 8, policy="none"))
    cfg = {n: quant.SUPPORTED_BITS[i % len(quant.SUPPORTED_BITS)] for i, n in enumerate(names)}
    cfg.update(quant.fixed_layers(model, "first_last_8"))
    return cfg


def _naive_forward(self: quant.LSQQuantizer, x: torch.Tensor) -> torch.Tensor:
    """Textbook LSQ: grad-scaled step, clamp, round with x + (round(x) - x).detach()."""
    g = self.grad_scale(x)
    s = self.step.view((-1,) + (1,) * (x.dim() - 1)) if self.per_channel else self.step
    s = (s - s * g).detach() + s * g
    v = torch.clamp(x / s, self.qn, self.qp)
    return (v + (torch.round(v) - v).detach()) * s


def _torch_fused_forward(self: quant.LSQQuantizer, x: torch.Tensor) -> torch.Tensor:
    """torch's fused learnable fake-quant ops (zero point fixed at 0)."""
    g = self.grad_scale(x)
    zp = torch.zeros_like(self.step)
    if self.per_channel:
        return torch._fake_quantize_learnable_per_channel_affine(
            x, self.step, zp, 0, self.qn, self.qp, g)
    return torch._fake_quantize_learnable_per_tensor_affine(x, self.step, zp, self.qn, self.qp, g)


def sync(device: torch.device) -> None:
    """Wait for the device's queued kernels (CUDA runs asynchronously; no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_variants(names: list[str], x: torch.Tensor) -> dict[str, dict]:
    """name -> {model, opt, backend} on x's device, QAT models calibrated on the same batch."""
    torch.manual_seed(0)
    fp = create_model("resnet20").to(x.device)
    cfg = mixed_config(fp)
    base = quant.quantize_model(fp, cfg, a_bits=4)
    quant.calibrate_activations(base, [x])
    out = {}
    for name in names:
        model = copy.deepcopy(fp if name == "fp32" else base)
        patch = {"naive-lsq": _naive_forward, "torch-fused": _torch_fused_forward}.get(name)
        if patch is not None:
            for m in model.modules():
                if isinstance(m, quant.LSQQuantizer):
                    m.forward = types.MethodType(patch, m)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        backend = "compile" if name == "hmqat-compile" else "eager"
        out[name] = {"model": model, "opt": opt, "backend": backend}
    return out


def train_step(v: dict, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """One forward/backward/SGD step; returns (wall seconds, process CPU seconds). On CUDA the
    device is synchronised before and after, so the wall time includes the kernels."""
    quant.set_backend(v["backend"])
    sync(x.device)
    t0, c0 = time.perf_counter(), time.process_time()
    v["opt"].zero_grad(set_to_none=True)
    loss = F.cross_entropy(v["model"](x), y)
    loss.backward()
    v["opt"].step()
    sync(x.device)
    return time.perf_counter() - t0, time.process_time() - c0


def peak_memory_mib(v: dict, x: torch.Tensor, y: torch.Tensor) -> float | None:
    """CUDA memory (MiB) one train step of this variant needs above what is already allocated
    (all variants' models, optimizer states and the input stay resident): peak during the step
    minus the allocation before it, i.e. activations saved for backward, gradients and
    temporaries. None off CUDA (the CPU allocator keeps no such counter)."""
    if x.device.type != "cuda":
        return None
    v["opt"].zero_grad(set_to_none=True)
    sync(x.device)
    before = torch.cuda.memory_allocated(x.device)
    torch.cuda.reset_peak_memory_stats(x.device)
    train_step(v, x, y)
    return (torch.cuda.max_memory_allocated(x.device) - before) / 2 ** 20


def check_backends_agree(x: torch.Tensor) -> str:
    """Forward outputs and gradients of the eager and compile backends on one model."""
    torch.manual_seed(1)
    fp = create_model("resnet20").to(x.device)
    qm = quant.quantize_model(fp, mixed_config(fp), a_bits=4)
    quant.calibrate_activations(qm, [x])
    qm.train()
    res = {}
    for b in ("eager", "compile"):
        quant.set_backend(b)
        m = copy.deepcopy(qm)
        out = m(x)
        out.square().mean().backward()
        res[b] = (out.detach(), [p.grad.clone() for p in m.parameters()])
    quant.set_backend("eager")
    same_out = torch.equal(res["eager"][0], res["compile"][0])
    rel = max(((a - b).norm() / (a.norm() + 1e-30)).item()
              for a, b in zip(res["eager"][1], res["compile"][1]))
    return f"eager vs compile: forward outputs bit-identical={same_out}; max rel. grad diff={rel:.2e}"


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--no-baselines", dest="baselines", action="store_false",
                    help="skip the naive-lsq and torch-fused variants")
    ap.add_argument("--no-compile", action="store_true", help="skip the compile backend")
    ap.add_argument("--layouts", default="nchw,nhwc",
                    help="memory formats to run, comma-separated: nchw (contiguous), nhwc "
                         "(channels_last); ratios are against fp32 in the same layout")
    ap.add_argument("--threads", default="0",
                    help="comma-separated torch.set_num_threads values, one full interleaved "
                         "measurement each (0: the process default)")
    ap.add_argument("--device", default="cpu",
                    help="cpu, cuda, cuda:N or auto (cuda when available); default cpu")
    ap.add_argument("--out", default="results/bench/qat_step.txt")
    args = ap.parse_args(argv)
    args.device = resolve_device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch.cuda.is_available() is False here "
                         f"(torch {torch.__version__}); use --device cpu or a CUDA build of torch")

    default_threads = torch.get_num_threads()
    texts = []
    for th in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(th or default_threads)
        texts.append(measure(args, argv))
    text = "\n".join(texts)
    if args.out:
        atomic_write_bytes(args.out, text.encode())
    return text


def measure(args: argparse.Namespace, argv: list[str] | None) -> str:
    """One full interleaved measurement at the current thread count; returns the table."""
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32).to(args.device)
    y = torch.randint(0, 10, (args.batch,)).to(args.device)
    base_names = ["fp32", "hmqat-eager"] + ([] if args.no_compile else ["hmqat-compile"])
    if args.baselines:
        base_names += ["naive-lsq", "torch-fused"]
    layouts = [lay.strip() for lay in args.layouts.split(",") if lay.strip()]
    if not layouts or set(layouts) - {"nchw", "nhwc"}:
        raise SystemExit(f"--layouts {args.layouts!r}: use nchw, nhwc or nchw,nhwc")
    agree = "" if args.no_compile else check_backends_agree(x[:32])
    variants, inputs = {}, {}
    for lay in layouts:
        fmt = torch.channels_last if lay == "nhwc" else torch.contiguous_format
        inputs[lay] = x.contiguous(memory_format=fmt)
        for n, v in build_variants(base_names, x).items():
            v["model"].to(memory_format=fmt)
            variants[f"{n}/{lay}"] = {**v, "layout": lay}
    names = list(variants)
    t0 = time.perf_counter()
    for _ in range(args.warmup):  # includes compilation for hmqat-compile
        for n in names:
            train_step(variants[n], inputs[variants[n]["layout"]], y)
    warm_s = time.perf_counter() - t0
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            w, c = train_step(variants[n], inputs[variants[n]["layout"]], y)
            wall[n].append(w)
            cpu[n].append(c)
    mem = {n: peak_memory_mib(variants[n], inputs[variants[n]["layout"]], y) for n in names}
    quant.set_backend("eager")
    dev = args.device
    where = (f"{dev} ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else "CPU")
    header = (
        f"# QAT step vs FP32: ResNet-20, batch {args.batch}, {where}, {args.reps} interleaved reps "
        f"(median), {args.warmup} warm-up reps ({warm_s:.1f} s incl. compile)"
    )
    machine = (
        f"# torch {torch.__version__}, threads {torch.get_num_threads()} (OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}), {platform.machine()}, "
        f"{os.cpu_count()} CPUs, load avg at end {os.getloadavg()[0]:.1f}; "
        f"date {time.strftime('%Y-%m-%d %H:%M')}"
    )
    if dev.type == "cuda":
        machine += f"; CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
    command = f"# command: .venv/bin/python benchmarks/qat_step.py {' '.join(argv or sys.argv[1:])}"
    lines = [header, command.rstrip(), machine,
             "# weights: mixed 2-8 bit (first/last 8), per-channel LSQ; activations 4 bit per-tensor"]
    if agree:
        lines.append(f"# {agree}")
    lines += [
        ("# wall = perf_counter per step; cpu = process CPU time per step (less sensitive to "
         "other processes on the shared cores when single-threaded)"),
        ("# ratio = median / median of fp32 in the same layout; paired = median over reps "
         "of (step / fp32 step of the same rep)"),
        (f"{'variant':<20} {'wall_ms':>8} {'wall_ratio':>10} {'wall_paired':>11} "
         f"{'cpu_ms':>8} {'cpu_ratio':>9} {'cpu_paired':>10}"
         + (f" {'step_MiB':>9} {'mem_ratio':>9}" if dev.type == "cuda" else "")),
    ]
    for n in names:
        ref_name = f"fp32/{variants[n]['layout']}"
        cols = []
        for t in (wall, cpu):
            med, ref = statistics.median(t[n]), statistics.median(t[ref_name])
            paired = statistics.median(a / b for a, b in zip(t[n], t[ref_name]))
            cols.append((med * 1e3, med / ref, paired))
        (wm, wr, wp), (cm, cr, cp) = cols
        row = (f"{n:<20} {wm:>8.1f} {wr:>10.3f} {wp:>11.3f} {cm:>8.1f} {cr:>9.3f} "
               f"{cp:>10.3f}")
        if mem[n] is not None:
            row += f" {mem[n]:>9.1f} {mem[n] / mem[ref_name]:>9.3f}"
        lines.append(row)
    text = "\n".join(lines) + "\n"
    print(text, end="", flush=True)
    return text


if __name__ == "__main__":
    main()
