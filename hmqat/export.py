"""Packed low-bit export: real bytes on disk for a quantized model (DESIGN §3 ``export.py``).

    >>> from hmqat import export, quant
    >>> meta = export.save_packed(qmodel, "resnet20_w4a4.hmq", arch="resnet20")
    >>> qm2 = export.load_packed("resnet20_w4a4.hmq")          # or load_packed(path, fp_model)
    >>> torch.equal(qm2(x), qmodel.eval()(x))                 # True: bit-identical outputs

File format (version 2, all integers little-endian)::

    offset  size  field
    0       8     magic  b"HMQATPK\\0"
    8       4     format version (uint32) = 2
    12      4     JSON metadata length J (uint32)
    16      8     payload length P (uint64)
    24      32    sha256 of (JSON bytes ‖ payload)
    56      J     JSON metadata (UTF-8), zlib-compressed (version 2)
    56+J    P     payload: the raw sections, back to back, at the offsets the JSON gives

The JSON holds ``format``, ``version``, ``arch`` and ``num_classes`` (for
hmqat.models.create_model; inferred for its ResNets, else the ``arch`` argument or null),
``model_class``, ``torch``, ``model_size_mb`` (HAWQ-V3, hmqat.quant.model_size_mb),
``layers`` ({name: {kind, w_bits, per_channel, weight_shape, a_bits, a_signed, init}}) and
``sections`` (list of {name, codec, shape, offset, nbytes, ...}) with two codecs:

* ``packed`` — a quantized weight as integer codes c = round(clamp(W/s, Q_N, Q_P)), stored as
  offset codes u = c − Q_N ∈ [0, 2^b − 1], b bits each, LSB first, in one little-endian bit
  stream (``numpy.packbits(..., bitorder="little")`` over the (n, b) bit matrix); ceil(n·b/8)
  bytes. Fields ``bits`` and ``qn``. On load W = c·s, which the quantizer maps back to c exactly.
* ``raw`` — every other state_dict entry (LSQ steps, biases, BN affine and running statistics,
  num_batches_tracked) as its bytes in C order; field ``dtype`` (e.g. "torch.float32").

The quantizers' ``initialized`` flags and ``bit_width`` buffers are not stored as sections (saving
requires every quantizer initialised; the bits are in ``layers``).
Payload = Σ ceil(n_i·b_i/8) + 4·(other parameters) + BN running statistics, i.e. the
HAWQ-V3 size (which counts parameters only) plus the BN buffers plus < 1 byte per layer.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import quant
from .quant import LayerSpec, _atomic_write_bytes, _build_quantized

__all__ = [
    "HEADER_BYTES",
    "MAGIC",
    "VERSION",
    "PackedFormatError",
    "infer_arch",
    "load_packed",
    "pack_codes",
    "read_metadata",
    "save_packed",
    "unpack_codes",
]

MAGIC = b"HMQATPK\x00"
VERSION = 2  # 2: zlib-compressed JSON metadata (the section table was 20 % of a ResNet-20 file)
_HEADER = struct.Struct("<8sIIQ32s")
HEADER_BYTES = _HEADER.size  # 56


class PackedFormatError(ValueError):
    """The file is not a valid hmqat packed model (wrong magic/version, truncated, corrupt)."""


# --------------------------------------------------------------------------------------------
# Bit packing
# --------------------------------------------------------------------------------------------
def pack_codes(codes: np.ndarray, bits: int, qn: int) -> bytes:
    """Pack integer codes in [qn, qn + 2^bits − 1] as ``bits``-bit offset codes, LSB first."""
    u = (np.asarray(codes, dtype=np.int64).reshape(-1) - qn)
    if u.size and (u.min() < 0 or u.max() >= 2 ** bits):
        raise ValueError(f"pack_codes: codes outside [{qn}, {qn + 2 ** bits - 1}] for {bits} bits")
    u8 = u.astype(np.uint8)
    if bits == 8:
        return u8.tobytes()
    bitmat = (u8[:, None] >> np.arange(bits, dtype=np.uint8)) & np.uint8(1)
    return np.packbits(bitmat.reshape(-1), bitorder="little").tobytes()


def unpack_codes(buf: bytes, n: int, bits: int, qn: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: ``n`` int32 codes from ``buf``."""
    raw = np.frombuffer(buf, dtype=np.uint8)
    if bits == 8:
        u = raw[:n].astype(np.int32)
    else:
        bitmat = np.unpackbits(raw, count=n * bits, bitorder="little").reshape(n, bits)
        u = bitmat.astype(np.int32) @ (1 << np.arange(bits, dtype=np.int32))
    return u + np.int32(qn)


# --------------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------------
def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def infer_arch(model: nn.Module) -> tuple[str, int] | None:
    """(arch, num_classes) for hmqat.models.create_model if ``model`` is one of its families
    (CIFAR ResNet-20/32/44/56, torchvision ResNet-18/50), else None."""
    from .models import CIFAR_RESNET_DEPTHS, CifarResNet

    if isinstance(model, CifarResNet):
        depth = 6 * len(model.layer1) + 2
        if depth in CIFAR_RESNET_DEPTHS and len(model.layer2) == len(model.layer3) == len(model.layer1):
            return f"resnet{depth}", model.linear.out_features
        return None
    try:
        from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return None
    if type(model) is ResNet:
        blocks = tuple(len(getattr(model, f"layer{i}")) for i in range(1, 5))
        kind = type(model.layer1[0])
        if kind is BasicBlock and blocks == (2, 2, 2, 2):
            return "resnet18", model.fc.out_features
        if kind is Bottleneck and blocks == (3, 4, 6, 3):
            return "resnet50", model.fc.out_features
    return None


def save_packed(qmodel: nn.Module, path: str | os.PathLike, *, arch: str | None = None
                ) -> dict[str, Any]:
    """Write ``qmodel`` in the packed format above (atomically); returns the metadata plus
    ``file_bytes``/``json_bytes``/``payload_bytes``. ``arch`` (default: :func:`infer_arch`)
    and ``num_classes`` let load_packed rebuild the FP32 template with
    hmqat.models.create_model(arch, num_classes=...)."""
    layers = quant.quantized_layers(qmodel)
    if not layers:
        raise ValueError("save_packed: the model has no QConv2d/QLinear layers; quantize it with "
                         "hmqat.quant.quantize_model first")
    for name, layer in layers.items():
        for qname, q in (("weight_quantizer", layer.weight_quantizer),
                         ("act_quantizer", layer.act_quantizer)):
            if q is not None and not bool(q.initialized):
                raise ValueError(f"save_packed: {name}.{qname} is not initialised; run "
                                 "hmqat.quant.calibrate_activations(model, batches) or a "
                                 "training step first")
    state = qmodel.state_dict()
    weight_keys = {f"{name}.weight" for name in layers}
    sections: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    offset = 0

    def add(section: dict[str, Any], data: bytes) -> None:
        nonlocal offset
        section.update(offset=offset, nbytes=len(data))
        sections.append(section)
        chunks.append(data)
        offset += len(data)

    meta_layers: dict[str, Any] = {}
    for name, layer in layers.items():
        wq = layer.weight_quantizer
        codes = wq.int_repr(layer.weight.detach()).cpu().numpy()
        add({"name": f"{name}.weight", "codec": "packed", "bits": wq.bits, "qn": wq.qn,
             "shape": list(layer.weight.shape)}, pack_codes(codes, wq.bits, wq.qn))
        aq = layer.act_quantizer
        meta_layers[name] = {"kind": type(layer).__name__, "w_bits": wq.bits,
                             "per_channel": wq.per_channel, "weight_shape": list(layer.weight.shape),
                             "a_bits": None if aq is None else aq.bits,
                             "a_signed": False if aq is None else aq.signed,
                             "init": wq.init_method}
    for key, t in state.items():
        if key in weight_keys or key.endswith((".initialized", ".bit_width")):
            continue
        add({"name": key, "codec": "raw", "dtype": str(t.dtype), "shape": list(t.shape)},
            _tensor_bytes(t))
    inferred = infer_arch(qmodel)
    num_classes = inferred[1] if inferred and (arch is None or arch == inferred[0]) else None
    if arch is None and inferred:
        arch = inferred[0]
    meta = {"format": "hmqat.packed", "version": VERSION, "arch": arch, "num_classes": num_classes,
            "model_class": f"{type(qmodel).__module__}.{type(qmodel).__qualname__}",
            "torch": torch.__version__, "model_size_mb": quant.model_size_mb(qmodel),
            "layers": meta_layers, "sections": sections}
    js = zlib.compress(json.dumps(meta, separators=(",", ":")).encode(), 9)
    payload = b"".join(chunks)
    digest = hashlib.sha256(js + payload).digest()
    header = _HEADER.pack(MAGIC, VERSION, len(js), len(payload), digest)
    _atomic_write_bytes(path, header + js + payload)
    return {**meta, "file_bytes": len(header) + len(js) + len(payload), "json_bytes": len(js),
            "payload_bytes": len(payload)}


# --------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------
def _read_verified(path: str | os.PathLike) -> tuple[dict[str, Any], bytes]:
    """Check magic, version, lengths and sha256; return (metadata, payload)."""
    blob = Path(path).read_bytes()
    if len(blob) < HEADER_BYTES:
        raise PackedFormatError(f"{path}: truncated: {len(blob)} bytes, shorter than the "
                                f"{HEADER_BYTES}-byte header; re-export with save_packed")
    magic, version, jlen, plen, digest = _HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise PackedFormatError(f"{path}: bad magic {magic!r}, expected {MAGIC!r}; not an hmqat "
                                "packed model file")
    if version != VERSION:
        raise PackedFormatError(f"{path}: format version {version} is not supported; this hmqat "
                                f"reads version {VERSION}")
    expected = HEADER_BYTES + jlen + plen
    if len(blob) != expected:
        what = "truncated" if len(blob) < expected else "has trailing bytes"
        raise PackedFormatError(f"{path}: {what}: header says {expected} bytes, file has "
                                f"{len(blob)}; re-export with save_packed")
    body = blob[HEADER_BYTES:]
    if hashlib.sha256(body).digest() != digest:
        raise PackedFormatError(f"{path}: sha256 checksum mismatch: the file is corrupt; "
                                "re-export with save_packed")
    meta = json.loads(zlib.decompress(body[:jlen]).decode())
    return meta, body[jlen:]


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The verified JSON metadata of a packed file."""
    return _read_verified(path)[0]


def _template(meta: dict[str, Any], model: nn.Module | Callable[[], nn.Module] | None
              ) -> nn.Module:
    if isinstance(model, nn.Module):
        tmpl = model
    elif callable(model):
        tmpl = model()
    elif meta.get("arch"):
        from .models import create_model
        tmpl = create_model(meta["arch"], num_classes=meta.get("num_classes"))
    else:
        raise ValueError("load_packed: the file records no arch; pass the FP32 model (or a "
                         "factory returning it) as the second argument")
    if quant.is_quantized(tmpl):
        raise ValueError("load_packed: pass the FP32 model (or its factory), not a quantized one")
    return tmpl


def load_packed(path: str | os.PathLike,
                model: nn.Module | Callable[[], nn.Module] | None = None) -> nn.Module:
    """Rebuild the quantized model saved by :func:`save_packed`, in eval mode.

    ``model`` is the FP32 template (left untouched) or a factory returning it; None uses
    ``create_model(arch)`` from the metadata. Outputs equal the saved fake-quant model's outputs
    exactly (torch.equal) in eval mode.
    """
    meta, payload = _read_verified(path)
    tmpl = _template(meta, model)
    names = dict(tmpl.named_modules())
    specs = {}
    for name, spec in meta["layers"].items():
        mod = names.get(name)
        if mod is None or list(getattr(mod, "weight", torch.empty(0)).shape) != spec["weight_shape"]:
            raise ValueError(f"load_packed: layer {name!r} (weight {spec['weight_shape']}) is "
                             f"missing from or has another shape in {type(tmpl).__name__}; pass "
                             "the architecture the file was saved from")
        specs[name] = LayerSpec(spec["w_bits"], spec["a_bits"], spec["a_signed"],
                                spec["per_channel"], spec["init"])
    extra = [n for n, m in names.items() if isinstance(m, (nn.Conv2d, nn.Linear)) and n not in specs]
    if extra:
        raise ValueError(f"load_packed: layer {extra[0]!r} of {type(tmpl).__name__} is not in the "
                         f"file ({len(extra)} such layers); pass the architecture the file was "
                         "saved from")
    qmodel = _build_quantized(tmpl, specs)
    layers = quant.quantized_layers(qmodel)
    state: dict[str, torch.Tensor] = {}
    packed = []
    for sec in meta["sections"]:
        buf = payload[sec["offset"]:sec["offset"] + sec["nbytes"]]
        if sec["codec"] == "raw":
            dtype = getattr(torch, sec["dtype"].removeprefix("torch."))
            t = torch.frombuffer(bytearray(buf), dtype=torch.uint8).view(dtype)
            state[sec["name"]] = t.reshape(sec["shape"])
        else:
            packed.append(sec)
    for sec in packed:
        layer_name = sec["name"].removesuffix(".weight")
        layer = layers[layer_name]
        n = int(np.prod(sec["shape"]))
        codes = unpack_codes(payload[sec["offset"]:sec["offset"] + sec["nbytes"]], n, sec["bits"],
                             sec["qn"])
        step = state[f"{layer_name}.weight_quantizer.step"].clamp_min(quant.MIN_STEP)
        w = torch.from_numpy(codes).to(step.dtype).reshape(sec["shape"])
        state[sec["name"]] = w * quant._step_view(step, w, layer.weight_quantizer.per_channel)
    missing, unexpected = qmodel.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith((".initialized", ".bit_width"))]
    if missing or unexpected:
        raise ValueError(f"load_packed: the file does not fit {type(tmpl).__name__}: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}")
    for m in qmodel.modules():
        if isinstance(m, quant.LSQQuantizer):
            m.mark_initialized(True)
    return qmodel.eval()
