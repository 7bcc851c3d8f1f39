"""hmqat: Hessian-based mixed-precision quantization-aware training (a reconstruction of HMQAT,
Huang et al., Neural Networks 182:106910, 2025, from its abstract and the work it builds on).

One module per concept (DESIGN.md §3):

    data          datasets, cached uint8 tensors, fast loaders, calibration subsets
    models        CIFAR ResNet-20/32/44/56, torchvision ResNets, sha256-checked weights
    quant         LSQ quantizers, quantize_model(model, bit_config), size/BOPs accounting
    hessian       layer_traces(): per-layer Hutchinson traces with standard errors
    sensitivity   the Ω[layer][bits] table and its validation against measured damage
    search        the exact Pareto frontier, select(), ILP/greedy/random/uniform references
    train         evaluate, FP32 fine-tuning and the QAT loop (checkpoints, resume, hooks)
    transitions   transition-aware fine-tuning: precision transitions, oscillations, distillation
    ablation      the ablation runner of notebook 04
    export        bit-packed low-bit files (save_packed / load_packed)
    onnx_export   ONNX with QuantizeLinear/DequantizeLinear, checked in onnxruntime (extra "onnx")
    distributed   torchrun / DDP helpers and the multi-GPU command line
    plotting, reporting, pipeline   figures, tables, manifest; the papermill driver

Import the module you need, e.g. ``from hmqat import hessian, search, train``.
"""
__version__ = "0.1.0"
