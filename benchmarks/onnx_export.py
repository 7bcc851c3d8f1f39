"""ONNX export fidelity (hmqat.onnx_export): onnxruntime vs the PyTorch fake-quantized model.

    HMQAT_DATA_DIR=... python benchmarks/onnx_export.py [--fp32 PATH]  # results/bench/onnx_export.txt

For a fine-tuned FP32 ResNet-20 (``--fp32``: a checkpoint whose "model" entry is the state dict,
as hmqat.train writes it), two quantized models, both with activations at 4 bits and MSE step
init (the study's recipe), calibrated on 512 training images (seed 0) and NOT trained further:

* uniform W4A4 (first conv / last linear at 8 bits),
* the mixed config ``--config-label`` of ``--configs`` (default "HMQAT 10.34x" of
  results/quick/data/configs.json, 2–8-bit weights).

Each is exported with QuantizeLinear/DequantizeLinear and run in onnxruntime (CPU, 1 thread) on
the whole CIFAR-10 test split; the table gives the top-1 agreement with PyTorch, the max and mean
|logit difference| and both top-1 accuracies. Data: whatever HMQAT_DATA_DIR holds (the build
machines use the CIFAR-10 JPEG q75 mirror; the file says which).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_FP32 = ROOT / "results/quick/checkpoints/fp32-resnet20.pt"

from hmqat import data, onnx_export, quant, runtime  # noqa: E402
from hmqat.study import reporting  # noqa: E402
from hmqat.models import create_model  # noqa: E402


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fp32", default=None,
                   help=f"fine-tuned FP32 ResNet-20 checkpoint (.pt; default {DEFAULT_FP32}, "
                        "written by `make reproduce`)")
    p.add_argument("--configs", default=str(ROOT / "results/quick/data/configs.json"))
    p.add_argument("--config-label", default="HMQAT 10.34x")
    p.add_argument("--calib", type=int, default=512, help="calibration images (train split)")
    p.add_argument("--limit", type=int, default=0, help="test images (0: the whole split)")
    p.add_argument("--out", default=str(ROOT / "results/bench/onnx_export.txt"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    torch.set_num_threads(1)
    if args.fp32 is None:
        if not DEFAULT_FP32.is_file():   # `make bench` before `make reproduce`: say so, go on
            print(f"benchmarks/onnx_export.py: skipped: {DEFAULT_FP32} does not exist; run "
                  "`make reproduce` first or pass --fp32 PATH")
            return
        args.fp32 = str(DEFAULT_FP32)
    if not Path(args.fp32).is_file():
        raise SystemExit(f"--fp32 {args.fp32}: no such file; pass the fine-tuned FP32 ResNet-20 "
                         "checkpoint (notebook 00 writes results/<profile>/checkpoints/)")
    fp = create_model("resnet20")
    fp.load_state_dict(torch.load(args.fp32, map_location="cpu", weights_only=True)["model"])
    fp.eval()
    mixed = json.loads(Path(args.configs).read_text())[args.config_label]["config"]
    train = data.load_dataset("cifar10", "train")
    test = data.load_dataset("cifar10", "test")
    if args.limit:
        test = test.subset(torch.arange(args.limit))
    calib = data.calibration_batches(train, n_samples=args.calib, batch_size=256, seed=0)
    batches = list(data.make_loader(test, batch_size=500))
    label = reporting.describe_data("cifar10", train.source)
    rows = []
    for name, cfg in (("uniform W4A4", quant.uniform_config(fp, 4)),
                      (args.config_label, mixed)):
        qm = quant.quantize_model(fp, cfg, a_bits=4, init="mse")
        quant.calibrate_activations(qm, calib)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            info = onnx_export.export_onnx(qm, Path(tmp) / "m.onnx", calib[0][0][:1])
            export_s = time.perf_counter() - t0
            res = onnx_export.check_onnx(qm, Path(tmp) / "m.onnx", batches)
        n_w = {n: m.weight.numel() for n, m in quant.quantized_layers(qm).items()}
        avg_bits = sum(n_w[n] * b for n, b in cfg.items()) / sum(n_w.values())
        rows.append({"model": name, "avg_bits": avg_bits,
                     "int4_weights": info["weights"]["int4"],
                     "int8_weights": info["weights"]["int8"],
                     "onnx_kb": info["bytes"] / 1024, "export_s": export_s, **res})
    lines = [f"# ONNX QDQ export vs PyTorch fake quantization — data: {label}, test split "
             f"({rows[0]['images']} images); ResNet-20 fine-tuned FP32 {Path(args.fp32).name}, "
             f"calibrated on {args.calib} train images, no QAT; activations 4 bit, MSE init",
             f"# onnxruntime {__import__('onnxruntime').__version__} (CPU, 1 thread), onnx "
             f"{__import__('onnx').__version__}, torch {torch.__version__}, "
             f"{platform.machine()}; written by benchmarks/onnx_export.py",
             "# w bits: parameter-weighted mean weight bits; INT4/INT8 w: weight tensors stored "
             "in that ONNX type; agree %: test images with the same argmax in both",
             ""]
    hdr = (f"{'model':14s} {'w bits':>8s} {'INT4 w':>6s} {'INT8 w':>6s} {'KB':>6s} "
           f"{'agree %':>8s} {'max |dlogit|':>12s} {'mean |dlogit|':>13s} {'top1 torch':>10s} "
           f"{'top1 onnx':>9s}")
    lines.append(hdr)
    for r in rows:
        lines.append(f"{r['model']:14s} {r['avg_bits']:8.2f} {r['int4_weights']:6d} "
                     f"{r['int8_weights']:6d} {r['onnx_kb']:6.0f} {r['top1_agreement']:8.2f} "
                     f"{r['max_abs_logit_diff']:12.4f} {r['mean_abs_logit_diff']:13.5f} "
                     f"{r['top1_torch']:10.2f} {r['top1_onnx']:9.2f}")
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    if args.out:
        runtime.atomic_write_text(out, text)
    print(text, end="")


if __name__ == "__main__":
    main()
