"""Packed low-bit export: real bytes on disk for a quantized model (docs/design.md §2 ``export.py``).

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
``layers`` ({name: {kind, w_bits, per_channel, weight_shape, a_bits, a_signed, a_auto_sign,
init}}) and ``sections`` (list of {name, codec, shape, offset, nbytes, ...}) with two codecs:

* ``packed`` — a quantized weight as integer codes c = round(clamp(W/s, Q_N, Q_P)), stored as
  offset codes u = c − Q_N ∈ [0, 2^b − 1], b bits each, LSB first, in one little-endian bit
  stream (``numpy.packbits(..., bitorder="little")`` over the (n, b) bit matrix); ceil(n·b/8)
  bytes. Fields ``bits`` and ``qn``. On load W = c·s, which the quantizer maps back to c exactly.
* ``raw`` — every other state_dict entry (LSQ steps, biases, BN affine and running statistics,
  num_batches_tracked) as its bytes in C order; field ``dtype`` (e.g. "torch.float32").

The quantizers' ``initialized``, ``is_signed`` and ``bit_width`` buffers are not stored as
sections (saving requires every quantizer initialised; bits and signs are in ``layers``).
Payload = Σ ceil(n_i·b_i/8) + 4·(other parameters) + BN running statistics, i.e. the
HAWQ-V3 size (which counts parameters only) plus the BN buffers plus < 1 byte per layer.

Loading treats the file as hostile until proven otherwise, and checks it in this order, each
failure a :class:`PackedFormatError` naming the file: header and length against the file's size
(before the body is read), sha256, the metadata inflated with a bound (at most
``_META_RATIO`` × its compressed length, floor ``_META_FLOOR``, never over ``_META_MAX``: a
decompression bomb is refused after that many bytes), UTF-8 and JSON, then every field's type
and range, the section table against the payload's length and the declared shapes, and
``num_classes`` against the recorded classifier — all before any model is built, so a small
file cannot make load_packed allocate more than the sizes its own bytes account for.

Saving (and :func:`hmqat.onnx_export.export_onnx`) refuses a model with a NaN or inf in any
tensor, naming it (:func:`check_finite`): such a value has no integer code.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from . import quant
from .models import CIFAR_RESNET_DEPTHS, TORCHVISION_ARCHS, CifarResNet, create_model
from .quant import INIT_METHODS, SUPPORTED_BITS, LayerSpec, build_quantized
from .runtime import atomic_write_bytes
from .train import first_nonfinite

__all__ = [
    "HEADER_BYTES",
    "MAGIC",
    "VERSION",
    "ExportError",
    "PackedFormatError",
    "check_finite",
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
# Bounds on the inflated metadata. save_packed's JSON compresses 11-15x (ResNet-20/56/18/50
# measured); 64x leaves room for deeper, more repetitive models, the floor for tiny ones, and
# 16 MiB (~100k sections) is more than any model this package quantizes needs.
_META_RATIO = 64
_META_FLOOR = 64 * 2 ** 10
_META_MAX = 16 * 2 ** 20
_ARCHS = tuple(f"resnet{d}" for d in CIFAR_RESNET_DEPTHS) + tuple(TORCHVISION_ARCHS)
_LAYER_KINDS = {"QConv2d": 4, "QLinear": 2}   # kind -> weight dimensions
_UNSTORED = (".initialized", ".bit_width", ".is_signed")   # quantizer buffers not in sections


class PackedFormatError(ValueError):
    """The file is not a valid hmqat packed model (wrong magic/version, truncated, corrupt,
    forged metadata) or does not fit the model it is loaded into; the message names the file."""


class ExportError(ValueError):
    """The model cannot be exported (not quantized, not calibrated, non-finite tensors); the
    message names the layer or tensor."""


# --------------------------------------------------------------------------------------------
# Bit packing
# --------------------------------------------------------------------------------------------
def pack_codes(codes: np.ndarray, bits: int, qn: int, *, what: str = "pack_codes") -> bytes:
    """Pack integer codes in [qn, qn + 2^bits − 1] as ``bits``-bit offset codes, LSB first.
    ``what`` starts the error message (save_packed passes the layer)."""
    u = (np.asarray(codes, dtype=np.int64).reshape(-1) - qn)
    if u.size and (u.min() < 0 or u.max() >= 2 ** bits):
        outside = int(((u < 0) | (u >= 2 ** bits)).sum())
        raise ValueError(f"{what}: {outside} of {u.size} codes outside [{qn}, "
                         f"{qn + 2 ** bits - 1}] for {bits} bits (min {int(u.min()) + qn}, "
                         f"max {int(u.max()) + qn})")
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


def check_finite(qmodel: nn.Module, caller: str) -> None:
    """Raise :class:`ExportError` if a parameter or floating buffer of ``qmodel`` holds a NaN or
    an inf, naming the first (:func:`hmqat.train.first_nonfinite`: e.g. ``parameter
    fc.weight``, ``parameter conv1.weight_quantizer.step``). Export runs it first: a
    non-finite weight or step has no integer code (a NaN would be written as an arbitrary code,
    an inf as Q_N or Q_P), so the file would silently differ from the model."""
    bad = first_nonfinite(qmodel)
    if bad is not None:
        raise ExportError(f"{caller}: {bad}: a non-finite weight or step has no integer code, so "
                          "the export would not match the model; the model diverged or was "
                          "corrupted: export the last finite checkpoint or retrain")


def infer_arch(model: nn.Module) -> tuple[str, int] | None:
    """(arch, num_classes) for hmqat.models.create_model if ``model`` is one of its families
    (CIFAR ResNet-20/32/44/56, torchvision ResNet-18/50), else None."""
    if isinstance(model, CifarResNet):
        depth = 6 * len(model.layer1) + 2
        if depth in CIFAR_RESNET_DEPTHS and len(model.layer2) == len(model.layer3) == len(model.layer1):
            return f"resnet{depth}", model.linear.out_features
        return None
    from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet   # ~1.5 s, only here
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
        raise ExportError("save_packed: the model has no QConv2d/QLinear layers; quantize it with "
                          "hmqat.quant.quantize_model first")
    for name, layer in layers.items():
        for qname, q in (("weight_quantizer", layer.weight_quantizer),
                         ("act_quantizer", layer.act_quantizer)):
            if q is not None and not bool(q.initialized):
                raise ExportError(f"save_packed: {name}.{qname} is not initialised; run "
                                  "hmqat.quant.calibrate_activations(model, batches) or a "
                                  "training step first")
    check_finite(qmodel, "save_packed")
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
        try:
            packed = pack_codes(codes, wq.bits, wq.qn, what=f"save_packed: layer {name!r} weight")
        except ValueError as exc:   # check_finite ran, so the quantizer itself is inconsistent
            raise ExportError(f"{exc}: its weight quantizer's int_repr does not clamp to its own "
                              f"range [{wq.qn}, {wq.qp}]; the quantizer (bits {wq.bits}, signed "
                              f"{wq.signed}) is inconsistent, re-create the layer with "
                              "hmqat.quant.quantize_model") from None
        add({"name": f"{name}.weight", "codec": "packed", "bits": wq.bits, "qn": wq.qn,
             "shape": list(layer.weight.shape)}, packed)
        aq = layer.act_quantizer
        meta_layers[name] = {"kind": type(layer).__name__, "w_bits": wq.bits,
                             "per_channel": wq.per_channel, "weight_shape": list(layer.weight.shape),
                             "a_bits": None if aq is None else aq.bits,
                             "a_signed": False if aq is None else aq.signed,
                             "a_auto_sign": False if aq is None else aq.auto_sign,
                             "init": wq.init_method}
    for key, t in state.items():
        if key in weight_keys or key.endswith((".initialized", ".bit_width", ".is_signed")):
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
    atomic_write_bytes(path, header + js + payload)
    return {**meta, "file_bytes": len(header) + len(js) + len(payload), "json_bytes": len(js),
            "payload_bytes": len(payload)}


# --------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------
def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters: a forged field can be megabytes long."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bad(path: str | os.PathLike, what: str) -> PackedFormatError:
    return PackedFormatError(f"{path}: {what}; re-export with save_packed")


def _read_parts(path: str | os.PathLike) -> tuple[bytes, memoryview]:
    """Check magic, version and the header's lengths against the file's size (before reading
    the body), then the sha256; return (compressed metadata, payload)."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        head = fh.read(HEADER_BYTES)
        if len(head) < HEADER_BYTES:
            raise _bad(path, f"truncated: {len(head)} bytes, shorter than the {HEADER_BYTES}-byte "
                             "header")
        magic, version, jlen, plen, digest = _HEADER.unpack(head)
        if magic != MAGIC:
            raise PackedFormatError(f"{path}: bad magic {magic!r}, expected {MAGIC!r}; not an "
                                    "hmqat packed model file")
        if version != VERSION:
            raise PackedFormatError(f"{path}: format version {version} is not supported; this "
                                    f"hmqat reads version {VERSION}")
        expected = HEADER_BYTES + jlen + plen
        if size != expected:
            what = "truncated" if size < expected else "has trailing bytes"
            raise _bad(path, f"{what}: header says {expected} bytes, file has {size}")
        body = fh.read(jlen + plen)
    if len(body) != jlen + plen:   # the file shrank while being read
        raise _bad(path, f"truncated: header says {expected} bytes, read "
                         f"{HEADER_BYTES + len(body)}")
    if hashlib.sha256(body).digest() != digest:
        raise _bad(path, "sha256 checksum mismatch: the file is corrupt")
    return body[:jlen], memoryview(body)[jlen:]


def _meta_cap(compressed_bytes: int) -> int:
    """The most bytes the metadata may inflate to (module docstring)."""
    return min(_META_MAX, max(_META_FLOOR, _META_RATIO * compressed_bytes))


def _inflate(path: str | os.PathLike, data: bytes) -> bytes:
    """zlib-decompress the metadata, never producing more than :func:`_meta_cap` + 1 bytes."""
    cap = _meta_cap(len(data))
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, cap + 1)
    except zlib.error as exc:
        raise _bad(path, f"the metadata is not a valid zlib stream ({exc})") from None
    if len(out) > cap:
        raise _bad(path, f"the {len(data)}-byte compressed metadata inflates to more than {cap} "
                         f"bytes (the limit: {_META_RATIO}x its size, at least {_META_FLOOR}, at "
                         f"most {_META_MAX}); refused unread as a decompression bomb or corrupt "
                         "file")
    if not inflater.eof:
        raise _bad(path, f"the metadata's zlib stream ends early ({len(data)} bytes inflate to "
                         f"{len(out)} without its end marker): it is truncated")
    if inflater.unused_data:
        raise _bad(path, f"{len(inflater.unused_data)} stray bytes follow the metadata's zlib "
                         "stream")
    return out


def _parse_metadata(path: str | os.PathLike, data: bytes) -> dict[str, Any]:
    """Inflate (bounded), decode UTF-8 and parse the JSON object of the metadata."""
    raw = _inflate(path, data)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _bad(path, f"the metadata is not UTF-8 text (byte {exc.start}: {exc.reason})"
                   ) from None
    try:
        meta = json.loads(text)
    except RecursionError:
        raise _bad(path, "the metadata JSON is nested too deeply to parse") from None
    except ValueError as exc:   # JSONDecodeError, or an integer too long to convert
        raise _bad(path, f"the metadata is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise _bad(path, f"the metadata is a JSON {type(meta).__name__}, not an object")
    return meta


def _require(path: str | os.PathLike, where: str, obj: dict[str, Any], key: str,
             ok: Callable[[Any], bool], want: str, *, optional: bool = False) -> Any:
    """``obj[key]`` if present and ``ok``; else a PackedFormatError saying ``where`` lacks it
    or what it holds instead of ``want``."""
    if key not in obj:
        if optional:
            return None
        raise _bad(path, f"{where} lacks the key {key!r}")
    value = obj[key]
    if not ok(value):
        raise _bad(path, f"{where} has {key}={_short(value)}; expected {want}")
    return value


def _is_bits(value: Any) -> bool:
    return _is_int(value) and value in SUPPORTED_BITS


def _is_shape(value: Any, min_dim: int = 0) -> bool:
    """A list of at most 64 int sizes (a longer one is no tensor; it would only make the
    product of the sizes costly)."""
    return isinstance(value, list) and len(value) <= 64 \
        and all(_is_int(d) and d >= min_dim for d in value)


def _check_layer(path: str | os.PathLike, name: str, spec: Any) -> None:
    """One entry of ``layers``: every field :class:`LayerSpec` and the template check read."""
    where = f"layer {_short(name)}"
    if not isinstance(spec, dict):
        raise _bad(path, f"{where} is {_short(spec)}, not a JSON object")
    kind = _require(path, where, spec, "kind", lambda v: v in _LAYER_KINDS,
                    f"one of {sorted(_LAYER_KINDS)}")
    _require(path, where, spec, "w_bits", _is_bits, f"an int in {SUPPORTED_BITS}")
    _require(path, where, spec, "a_bits", lambda v: v is None or _is_bits(v),
             f"null or an int in {SUPPORTED_BITS}")
    for key in ("a_signed", "per_channel"):
        _require(path, where, spec, key, lambda v: isinstance(v, bool), "true or false")
    _require(path, where, spec, "a_auto_sign", lambda v: isinstance(v, bool), "true or false",
             optional=True)
    _require(path, where, spec, "init", lambda v: v in INIT_METHODS, f"one of {INIT_METHODS}")
    ndim = _LAYER_KINDS[kind]
    _require(path, where, spec, "weight_shape",
             lambda v: _is_shape(v, min_dim=1) and len(v) == ndim,
             f"a list of {ndim} positive sizes (a {kind} weight)")


def _section_bytes(path: str | os.PathLike, sec: dict[str, Any], layers: dict[str, Any]) -> int:
    """The bytes a section's codec, bits/dtype and shape need; checks them against ``layers``."""
    where = f"section {_short(sec['name'])}"
    shape = _require(path, where, sec, "shape", _is_shape, "a list of at most 64 sizes")
    n = math.prod(shape)
    codec = _require(path, where, sec, "codec", lambda v: v in ("packed", "raw"),
                     "'packed' or 'raw'")
    if codec == "packed":
        spec = layers.get(sec["name"].removesuffix(".weight"))
        if spec is None or not sec["name"].endswith(".weight"):
            raise _bad(path, f"{where} is packed but is not the weight of a recorded layer")
        bits, qn = sec.get("bits"), sec.get("qn")
        if not (_is_int(bits) and _is_int(qn)) or bits != spec["w_bits"] \
                or qn != quant.weight_qrange(spec["w_bits"])[0]:
            raise _bad(path, f"{where} has bits={_short(bits)}, qn={_short(qn)} but its layer "
                             f"records {spec['w_bits']} bits (qn "
                             f"{quant.weight_qrange(spec['w_bits'])[0]})")
        if shape != spec["weight_shape"]:
            raise _bad(path, f"{where} has shape {shape} but its layer's weight is "
                             f"{spec['weight_shape']}")
        return -(-n * bits // 8)
    dtype = _raw_dtype(sec.get("dtype"))
    if dtype is None:
        raise _bad(path, f"{where} has dtype {_short(sec.get('dtype'))}, not a real numeric "
                         "torch dtype")
    return n * dtype.itemsize


def _raw_dtype(name: Any) -> torch.dtype | None:
    """The torch dtype a raw section's ``dtype`` field names, if real and numeric."""
    if not isinstance(name, str):
        return None
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or dtype.is_complex or dtype == torch.bool:
        return None
    return dtype


def _check_metadata(path: str | os.PathLike, meta: dict[str, Any], payload_bytes: int) -> None:
    """Validate the parsed metadata against itself and the payload's length, before any model
    exists (the sha256 proves the bytes are what the writer wrote, not that the writer was
    :func:`save_packed`).

    Top-level keys and types; each layer (:func:`_check_layer`); sections that tile the payload
    back to back, a ``packed`` one the weight of a recorded layer with its bits, Q_N, shape and
    ceil(n·b/8) bytes, a ``raw`` one n·itemsize bytes of a numeric dtype; a weight step per
    layer of the shape its ``per_channel`` implies; ``num_classes`` the output size of a
    recorded QLinear (so the model it builds is no larger than the file accounts for)."""
    where = "the metadata"
    _require(path, where, meta, "format", lambda v: v == "hmqat.packed", "'hmqat.packed'")
    _require(path, where, meta, "version", lambda v: _is_int(v) and v == VERSION, str(VERSION))
    _require(path, where, meta, "arch",
             lambda v: v is None or (isinstance(v, str) and v.lower() in _ARCHS),
             f"null or one of {list(_ARCHS)}")
    num_classes = _require(path, where, meta, "num_classes",
                           lambda v: v is None or (_is_int(v) and v >= 1),
                           "null or a positive int")
    layers = _require(path, where, meta, "layers", lambda v: isinstance(v, dict) and bool(v),
                      "a non-empty object {layer: spec}")
    sections = _require(path, where, meta, "sections", lambda v: isinstance(v, list),
                        "a list of sections")
    for name, spec in layers.items():
        _check_layer(path, name, spec)

    offset, seen = 0, {}
    for i, sec in enumerate(sections):
        if not isinstance(sec, dict):
            raise _bad(path, f"section #{i} is {_short(sec)}, not a JSON object")
        _require(path, f"section #{i}", sec, "name", lambda v: isinstance(v, str), "a string")
        if sec["name"] in seen:
            raise _bad(path, f"section {_short(sec['name'])} appears twice")
        need = _section_bytes(path, sec, layers)
        if sec.get("offset") != offset or not _is_int(sec.get("offset")):
            raise _bad(path, f"section {_short(sec['name'])} starts at {_short(sec.get('offset'))}, "
                             f"expected {offset} (sections are back to back)")
        if sec.get("nbytes") != need or not _is_int(sec.get("nbytes")):
            raise _bad(path, f"section {_short(sec['name'])} says nbytes={_short(sec.get('nbytes'))} "
                             f"but its shape and bits need {need}")
        offset += need
        if offset > payload_bytes:
            raise _bad(path, f"section {_short(sec['name'])} ends at byte {offset} of a "
                             f"{payload_bytes}-byte payload")
        seen[sec["name"]] = sec
    if offset != payload_bytes:
        raise _bad(path, f"the sections cover {offset} bytes but the payload has {payload_bytes}")
    missing = [f"{name}.weight" for name in layers
               if seen.get(f"{name}.weight", {}).get("codec") != "packed"]
    if missing:
        raise _bad(path, f"no packed section for {missing[:3]} ({len(missing)} layers)")
    for name, spec in layers.items():
        steps = [("weight_quantizer", spec["weight_shape"][0] if spec["per_channel"] else 1)]
        if spec["a_bits"] is not None:
            steps.append(("act_quantizer", 1))
        for qname, size in steps:
            sec = seen.get(f"{name}.{qname}.step")
            if sec is None or sec["codec"] != "raw" or sec["shape"] != [size] \
                    or not _raw_dtype(sec["dtype"]).is_floating_point:
                raise _bad(path, f"layer {_short(name)} needs a raw floating section "
                                 f"'{name}.{qname}.step' of shape [{size}]; found "
                                 f"{'none' if sec is None else _short(sec, 160)}")
    if num_classes is not None:
        outs = sorted({spec["weight_shape"][0] for spec in layers.values()
                       if spec["kind"] == "QLinear"})
        if num_classes not in outs:
            raise _bad(path, f"the metadata has num_classes={num_classes} but the recorded "
                             f"QLinear layers have {outs or 'no'} outputs: the classifier would "
                             "not fit (refused before building the model)")


def _read_verified(path: str | os.PathLike) -> tuple[dict[str, Any], memoryview]:
    """(metadata, payload) of a packed file, every check of the module docstring passed."""
    compressed, payload = _read_parts(path)
    meta = _parse_metadata(path, compressed)
    _check_metadata(path, meta, len(payload))
    return meta, payload


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The verified JSON metadata of a packed file."""
    return _read_verified(path)[0]


def _template(path: str | os.PathLike, meta: dict[str, Any],
              model: nn.Module | Callable[[], nn.Module] | None) -> nn.Module:
    if isinstance(model, nn.Module):
        tmpl = model
    elif callable(model):
        tmpl = model()
    elif meta["arch"]:
        tmpl = create_model(meta["arch"], num_classes=meta["num_classes"])
    else:
        raise PackedFormatError(f"load_packed: {path} records no arch; pass the FP32 model (or "
                                "a factory returning it) as the second argument")
    if quant.is_quantized(tmpl):
        raise ValueError(f"load_packed({path}): pass the FP32 model (or its factory), not a "
                         "quantized one")
    return tmpl


def _check_fit(path: str | os.PathLike, meta: dict[str, Any], tmpl: nn.Module) -> None:
    """The template has exactly the file's quantized layers, with the recorded weight shapes."""
    names = dict(tmpl.named_modules())
    arch = type(tmpl).__name__
    for name, spec in meta["layers"].items():
        mod = names.get(name)
        if mod is None or list(getattr(mod, "weight", torch.empty(0)).shape) != spec["weight_shape"]:
            raise PackedFormatError(f"load_packed: {path}: layer {_short(name)} (weight "
                                    f"{spec['weight_shape']}) is missing from or has another "
                                    f"shape in {arch}; pass the architecture the file was saved "
                                    "from")
    extra = [n for n, m in names.items()
             if isinstance(m, (nn.Conv2d, nn.Linear)) and n not in meta["layers"]]
    if extra:
        raise PackedFormatError(f"load_packed: {path}: layer {extra[0]!r} of {arch} is not in "
                                f"the file ({len(extra)} such layers); pass the architecture the "
                                "file was saved from")


def _raw_state(path: str | os.PathLike, meta: dict[str, Any], payload: memoryview,
               qmodel: nn.Module) -> dict[str, torch.Tensor]:
    """The raw sections as tensors, after checking that they are exactly the model's other
    state-dict entries, with its shapes, and finite."""
    expected = {k: v for k, v in qmodel.state_dict().items()
                if not k.endswith(_UNSTORED) and k.removesuffix(".weight") not in meta["layers"]}
    raw = {sec["name"]: sec for sec in meta["sections"] if sec["codec"] == "raw"}
    missing, unexpected = sorted(expected.keys() - raw), sorted(raw.keys() - expected)
    if missing or unexpected:
        raise PackedFormatError(f"load_packed: {path} does not fit {type(qmodel).__name__}: "
                                f"missing {missing[:5]}, unexpected {unexpected[:5]}; pass the "
                                "architecture the file was saved from")
    state = {}
    for name, sec in raw.items():
        if sec["shape"] != list(expected[name].shape):
            raise PackedFormatError(f"load_packed: {path}: section {_short(name)} has shape "
                                    f"{sec['shape']} but the model's tensor is "
                                    f"{list(expected[name].shape)}; pass the architecture the "
                                    "file was saved from")
        dtype = _raw_dtype(sec["dtype"])
        buf = bytearray(payload[sec["offset"]:sec["offset"] + sec["nbytes"]])
        t = (torch.frombuffer(buf, dtype=torch.uint8).view(dtype) if buf
             else torch.empty(0, dtype=dtype))   # frombuffer refuses an empty buffer
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise _bad(path, f"section {_short(name)} holds NaN or inf values, which save_packed never "
                             "writes: the file is forged or was written by a broken exporter")
        state[name] = t.reshape(sec["shape"])
    return state


def load_packed(path: str | os.PathLike,
                model: nn.Module | Callable[[], nn.Module] | None = None) -> nn.Module:
    """Rebuild the quantized model saved by :func:`save_packed`, in eval mode.

    ``model`` is the FP32 template (left untouched) or a factory returning it; None uses
    ``create_model(arch)`` from the metadata. Outputs equal the saved fake-quant model's outputs
    exactly (torch.equal) in eval mode. The whole file is checked (module docstring) before a
    model is built; every problem with it is a :class:`PackedFormatError` naming it.
    """
    meta, payload = _read_verified(path)
    tmpl = _template(path, meta, model)
    _check_fit(path, meta, tmpl)
    specs = {name: LayerSpec(spec["w_bits"], spec["a_bits"], spec["a_signed"],
                             spec["per_channel"], spec["init"], spec.get("a_auto_sign", False))
             for name, spec in meta["layers"].items()}
    qmodel = build_quantized(tmpl, specs)
    layers = quant.quantized_layers(qmodel)
    state = _raw_state(path, meta, payload, qmodel)
    for sec in meta["sections"]:
        if sec["codec"] != "packed":
            continue
        layer_name = sec["name"].removesuffix(".weight")
        codes = unpack_codes(payload[sec["offset"]:sec["offset"] + sec["nbytes"]],
                             math.prod(sec["shape"]), sec["bits"], sec["qn"])
        step = state[f"{layer_name}.weight_quantizer.step"].clamp_min(quant.MIN_STEP)
        w = torch.from_numpy(codes).to(step.dtype).reshape(sec["shape"])
        per_channel = layers[layer_name].weight_quantizer.per_channel
        state[sec["name"]] = w * quant.step_view(step, w, per_channel)
    missing, unexpected = qmodel.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(_UNSTORED)]
    if missing or unexpected:   # pragma: no cover - _raw_state and _check_metadata rule it out
        raise PackedFormatError(f"load_packed: {path} does not fit {type(tmpl).__name__}: "
                                f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    for m in qmodel.modules():
        if isinstance(m, quant.LSQQuantizer):
            m.mark_initialized(True)
    return qmodel.eval()
