"""hmqat: Hessian-based mixed-precision quantization-aware training (a reconstruction of HMQAT,
Huang et al., Neural Networks 182:106910, 2025, from its abstract and the work it builds on).

Three layers, arrows pointing down only (docs/design.md §2; tests/test_layers.py checks it):

infrastructure
    runtime       atomic files, read_json, progress bar, device, seeds, hashing, provenance
    data          datasets, cached uint8 tensors, fast loaders, calibration subsets
    models        CIFAR ResNet-20/32/44/56, torchvision ResNets, sha256-checked weights
    distributed   low-level torch.distributed / DDP helpers
    stats         paired seeded comparisons, bootstrap intervals
    locking       the exclusive lock on a results folder
the method
    quant         LSQ quantizers, quantize_model(model, bit_config), size/BOPs accounting
    hessian       layer_traces(): per-layer Hessian traces (Hutchinson with SEs, or exact)
    sensitivity   the Ω[layer][bits] table and its validation against measured damage
    search        the exact Pareto frontier, select(), ILP/greedy/random/uniform references
    train         evaluate, FP32 fine-tuning and the QAT loop (checkpoints, resume, hooks)
    transitions   transition-aware fine-tuning: precision transitions, oscillations, distillation
    bn, export    BatchNorm re-estimation; bit-packed low-bit files (save_packed / load_packed)
    onnx_export   ONNX with QuantizeLinear/DequantizeLinear, checked in onnxruntime (extra "onnx")
the study (hmqat.study)
    pipeline      Study (paths, data, earlier results) and the papermill driver
    runs          qat_run(): the one trained QAT run of notebooks 03/04 and the command line
    ablation      the ablation runner of notebook 04
    reporting, plotting   tables and manifest; figures
    cli           the torchrun command line (python -m hmqat.study.cli)

Import the module you need, e.g. ``from hmqat import hessian, search, train``.
"""
__version__ = "0.1.0"
