"""ONNX export of a quantized model with QuantizeLinear/DequantizeLinear (docs/method.md §2).

The packed ``.hmq`` file (:mod:`hmqat.export`) is storage; this is the path to a runtime. Every
QConv2d/QLinear of a fake-quantized model becomes, in the ONNX graph (opset 21):

* its **weight**: the integer codes c = round(clamp(W/s, Q_N, Q_P)) as a constant of the
  smallest ONNX integer type that holds them (INT4 for 2–4-bit layers, INT8 for 5–8-bit), then
  ``DequantizeLinear(c, s, 0, axis=0)`` with the per-output-channel LSQ steps s. The codes are
  the quantizer's own, so the clipping range [Q_N·s, Q_P·s] is preserved exactly;
* its **input activation** (when quantized): ``Clip(x, Q_N·s, Q_P·s)`` (only when the bit
  width is narrower than the 8-bit type), ``QuantizeLinear(·, s, 0)`` to INT8 (signed) or UINT8
  (unsigned), ``DequantizeLinear``: the values of Eq. Q, s·clamp(round(x/s), Q_N, Q_P);
* then Conv / Gemm in float, followed by the model's other modules (BatchNorm, ReLU, adds,
  pooling) as the exporter writes them.

This is the QDQ ("quantize-dequantize") representation that ONNX Runtime, TensorRT and OpenVINO
read. What a runtime can accelerate from it: 8-bit activations × 8-bit weights map onto INT8
kernels (ORT fuses DQ→Conv→Q into QLinearConv on CPU); 4-bit weights with INT4
DequantizeLinear save memory and bandwidth (weight-only dequantization), not arithmetic. No
mainstream runtime has 2- or 3-bit kernels: such weights are stored in INT4 (2× the bits they
need) and computed in float or INT8 after dequantization, so at 2–3 bits the gain is the file
size and memory traffic, not speed. :func:`check_onnx` measures how closely the runtime
reproduces the PyTorch fake-quantized outputs.

Needs the optional extra ``onnx`` (``pip install hmqat[onnx]``: onnx and onnxruntime); the
exporter is PyTorch's TorchScript-based ``torch.onnx.export(dynamo=False)``.
"""
from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import quant
from .export import ExportError, check_finite

__all__ = ["OPSET", "check_onnx", "export_onnx"]

OPSET = 21          # INT4 / UINT4 tensors in QuantizeLinear/DequantizeLinear
_EXPORT_OPSET = 20  # the TorchScript exporter's newest; the INT4 rewrite then declares 21


def _require_onnx() -> Any:
    try:
        import onnx
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("hmqat.onnx_export needs the optional extra: pip install "
                          "'hmqat[onnx]' (onnx and onnxruntime, versions in requirements.txt)"
                          ) from exc
    return onnx


class _ActQDQ(torch.autograd.Function):
    """Eq. Q on activations in the forward; Clip → QuantizeLinear → DequantizeLinear in ONNX."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float, qn: int, qp: int) -> torch.Tensor:
        return torch.clamp(x / scale, qn, qp).round() * scale

    @staticmethod
    def symbolic(g: Any, x: Any, scale: float, qn: int, qp: int) -> Any:
        signed = qn < 0
        lo, hi = (-128, 127) if signed else (0, 255)
        if (qn, qp) != (lo, hi):  # narrower than the 8-bit type: keep the quantizer's range
            x = g.op("Clip", x, g.op("Constant", value_t=torch.tensor(qn * scale)),
                     g.op("Constant", value_t=torch.tensor(qp * scale)))
        s = g.op("Constant", value_t=torch.tensor(scale, dtype=torch.float32))
        zp = g.op("Constant", value_t=torch.tensor(0, dtype=torch.int8 if signed else torch.uint8))
        return g.op("DequantizeLinear", g.op("QuantizeLinear", x, s, zp), s, zp)


class _WeightDQ(torch.autograd.Function):
    """Integer codes × per-channel steps in the forward; DequantizeLinear(codes, s, 0, axis=0)
    on an INT8 constant in ONNX (narrowed to INT4 afterwards when the codes fit)."""

    @staticmethod
    def forward(ctx: Any, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return codes.float() * scale.view((-1,) + (1,) * (codes.dim() - 1))

    @staticmethod
    def symbolic(g: Any, codes: Any, scale: Any) -> Any:
        zp = g.op("Constant", value_t=torch.zeros(int(scale.type().sizes()[0]),
                                                  dtype=torch.int8))
        return g.op("DequantizeLinear", codes, scale, zp, axis_i=0)


class _ExportLayer(nn.Module):
    """A QConv2d/QLinear frozen for export: int8 codes, float steps, the same forward values."""

    def __init__(self, layer: quant.QConv2d | quant.QLinear) -> None:
        super().__init__()
        wq = layer.weight_quantizer
        if not wq.per_channel:
            raise ExportError("export_onnx: per-tensor weight steps are not supported; quantize "
                              "with per_channel=True (the default)")
        w = layer.weight.detach()
        self.register_buffer("codes", wq.int_repr(w, torch.int8))
        self.register_buffer("scale", wq.step.detach().clamp_min(quant.MIN_STEP).float().clone())
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())
        aq = layer.act_quantizer
        self.act = None if aq is None else (float(aq.step.detach().clamp_min(quant.MIN_STEP)),
                                            aq.qn, aq.qp)
        self.conv = None
        if isinstance(layer, nn.Conv2d):
            if layer.padding_mode != "zeros":
                raise ExportError(f"export_onnx: padding_mode={layer.padding_mode!r} is not "
                                  "supported; only 'zeros'")
            self.conv = dict(stride=layer.stride, padding=layer.padding,
                             dilation=layer.dilation, groups=layer.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            x = _ActQDQ.apply(x, *self.act)
        w = _WeightDQ.apply(self.codes, self.scale)
        if self.conv is not None:
            return F.conv2d(x, w, self.bias, **self.conv)
        return F.linear(x, w, self.bias)


def _frozen(qmodel: nn.Module) -> nn.Module:
    """A deep copy with every quantized layer replaced by its :class:`_ExportLayer`."""
    layers = quant.quantized_layers(qmodel)
    if not layers:
        raise ExportError("export_onnx: the model has no QConv2d/QLinear; quantize it with "
                          "hmqat.quant.quantize_model first")
    uninit = [n for n, m in layers.items()
              if m.act_quantizer is not None and not bool(m.act_quantizer.initialized)]
    if uninit:
        raise ExportError(f"export_onnx: activation steps of {uninit[:3]} are not initialised; "
                          "run hmqat.quant.calibrate_activations(model, batches) first")
    check_finite(qmodel, "export_onnx")
    model = copy.deepcopy(qmodel).eval().float()
    for name, layer in quant.quantized_layers(model).items():
        quant.replace_module(model, name, _ExportLayer(layer))
    return model


def _narrow_weights(model: Any) -> dict[str, int]:
    """Rewrite the INT8 weight codes that fit in [-8, 7] (and their zero points) as INT4 and
    declare opset 21. Returns {"int4": n, "int8": m}: how many weight tensors have each type."""
    onnx = _require_onnx()
    from onnx import helper, numpy_helper
    inits = {t.name: t for t in model.graph.initializer}
    counts = {"int4": 0, "int8": 0}
    for node in model.graph.node:
        init = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if init is None or init.data_type != onnx.TensorProto.INT8:
            continue
        codes = numpy_helper.to_array(init)
        if codes.min() < -8 or codes.max() > 7:
            counts["int8"] += 1
            continue
        init.CopyFrom(helper.make_tensor(init.name, onnx.TensorProto.INT4, codes.shape,
                                         codes.ravel().tolist()))
        zp_name = f"{init.name}.zero_point"
        model.graph.initializer.append(helper.make_tensor(
            zp_name, onnx.TensorProto.INT4, [codes.shape[0]], [0] * codes.shape[0]))
        node.input[2] = zp_name
        counts["int4"] += 1
    used = {name for node in model.graph.node for name in node.input}
    for node in [n for n in model.graph.node if n.op_type == "Constant"
                 and n.output[0] not in used]:  # the replaced INT8 zero points
        model.graph.node.remove(node)
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            op.version = OPSET
    return counts


def export_onnx(qmodel: nn.Module, path: str | os.PathLike, example_input: torch.Tensor
                ) -> dict[str, Any]:
    """Write ``qmodel`` (a calibrated fake-quantized model, left untouched) to ``path`` as ONNX
    with QDQ nodes (module docstring). ``example_input``: one batch of the model's input shape;
    the batch dimension is dynamic. Returns {"path", "opset", "nodes": {op: count},
    "weights": {"int4": n, "int8": m}, "bytes"}. Raises :class:`hmqat.export.ExportError`
    naming the tensor if a weight, step or other tensor holds a NaN or inf (they have no integer
    code: a NaN weight would be exported as code 0, an inf one as Q_P)."""
    model = _frozen(qmodel)   # refuses an unquantized, uncalibrated or non-finite model
    onnx = _require_onnx()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    x = example_input.detach().float().cpu()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # the legacy exporter's deprecation notice
            torch.onnx.export(model.cpu(), (x,), str(tmp), dynamo=False,
                              opset_version=_EXPORT_OPSET, input_names=["input"],
                              output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                              do_constant_folding=False)
        proto = onnx.load(str(tmp))
        weights = _narrow_weights(proto)
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    nodes: dict[str, int] = {}
    for n in proto.graph.node:
        nodes[n.op_type] = nodes.get(n.op_type, 0) + 1
    return {"path": str(path), "opset": OPSET, "nodes": nodes, "weights": weights,
            "bytes": path.stat().st_size}


def check_onnx(qmodel: nn.Module, path: str | os.PathLike, batches: Iterable[Any], *,
               threads: int = 1) -> dict[str, float]:
    """Run the ONNX file in onnxruntime (CPU, ``threads`` intra-op threads) and the PyTorch
    fake-quantized ``qmodel`` (eval) on the same ``batches`` (tensors or (x, y) pairs): top-1
    agreement (% of images whose argmax matches), max and mean |logit difference|, and, with
    labels, both top-1 accuracies.

    Exact equality is not expected: the runtime sums convolutions in another order, and a
    difference of one float ulp can move an activation across a rounding boundary of Eq. Q; one
    flipped 4-bit code changes that activation by a whole step and propagates."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 3   # errors only
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    p = next(qmodel.parameters())
    was_training = qmodel.training
    qmodel.eval()
    n = agree = correct_t = correct_o = 0
    max_diff, sum_diff, n_logits, labelled = 0.0, 0.0, 0, True
    try:
        with torch.no_grad():
            for batch in batches:
                x = quant.as_input(batch)
                y = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
                ref = qmodel(x.to(device=p.device, dtype=p.dtype)).float().cpu()
                out = torch.from_numpy(sess.run(None, {"input": x.float().cpu().numpy()})[0])
                diff = (out - ref).abs()
                max_diff = max(max_diff, float(diff.max()))
                sum_diff += float(diff.sum())
                n_logits += diff.numel()
                agree += int((out.argmax(1) == ref.argmax(1)).sum())
                if y is None:
                    labelled = False
                else:
                    correct_t += int((ref.argmax(1) == y.cpu()).sum())
                    correct_o += int((out.argmax(1) == y.cpu()).sum())
                n += x.shape[0]
    finally:
        qmodel.train(was_training)
    if n == 0:
        raise ValueError("check_onnx: no batches given")
    res = {"images": n, "top1_agreement": 100.0 * agree / n, "max_abs_logit_diff": max_diff,
           "mean_abs_logit_diff": sum_diff / n_logits}
    if labelled:
        res.update(top1_torch=100.0 * correct_t / n, top1_onnx=100.0 * correct_o / n)
    return res
