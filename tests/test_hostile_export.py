"""Hand-made ``.hmq`` files and non-finite models at export (issue 28, items 6 and 7).

Every forged file here carries a correct sha256, so only the checks after it can refuse it; each
refusal must be one :class:`hmqat.export.PackedFormatError` naming the file, raised before any
model is built. Non-finite weights or steps must be refused by save_packed and export_onnx
before anything is written, naming the layer and the tensor.

Run: .venv/bin/python -m pytest -q -p no:xdist tests/test_hostile_export.py
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import tracemalloc
import zlib
from collections import OrderedDict

import pytest
import torch
from test_export import _forge, _mixed_model
from torch import nn

from hmqat import export, onnx_export, quant


# --------------------------------------------------------------------------------------------
# Helpers: a valid file, and files assembled from raw parts with a correct sha256
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mixed():
    return _mixed_model()


@pytest.fixture
def valid(mixed, tmp_path):
    """(path, blob) of a valid ResNet-20 file saved with its arch and num_classes."""
    path = tmp_path / "good.hmq"
    export.save_packed(mixed[1], path, arch="resnet20")
    return path, path.read_bytes()


def _split(blob: bytes) -> tuple[dict, bytes]:
    _, _, jlen, _, _ = export._HEADER.unpack_from(blob)
    body = blob[export.HEADER_BYTES:]
    return json.loads(zlib.decompress(body[:jlen])), body[jlen:]


def _assemble(compressed_meta: bytes, payload: bytes) -> bytes:
    """A packed file with these exact metadata bytes and a matching sha256."""
    return export._HEADER.pack(export.MAGIC, export.VERSION, len(compressed_meta), len(payload),
                               hashlib.sha256(compressed_meta + payload).digest()
                               ) + compressed_meta + payload


@pytest.fixture
def no_model_built(monkeypatch):
    """Fail the test if load_packed gets as far as building a template or a quantized model."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built from an unchecked file")
    monkeypatch.setattr(export, "create_model", refuse)
    monkeypatch.setattr(export, "build_quantized", refuse)


def _refused(path, message: str) -> str:
    """Load ``path``, expect a PackedFormatError starting with the path and containing
    ``message`` literally; return the message (load_packed and read_metadata agree)."""
    with pytest.raises(export.PackedFormatError) as info:
        export.load_packed(path)
    text = str(info.value)
    assert text.startswith(f"{path}: "), text
    assert message in text, text
    with pytest.raises(export.PackedFormatError, match=re.escape(message)):
        export.read_metadata(path)
    return text


# --------------------------------------------------------------------------------------------
# Valid files still round-trip bit-exactly
# --------------------------------------------------------------------------------------------
def test_valid_file_round_trips_bit_exactly(mixed, valid, tmp_path) -> None:
    _, qm, cfg = mixed
    path, blob = valid
    loaded = export.load_packed(path)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(x), qm.eval()(x))
    assert quant.bit_config_of(loaded) == cfg
    for (k, a), (k2, b) in zip(qm.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and a.dtype == b.dtype
        if not k.endswith(("weight", "initialized")) or "quantizer" in k:
            assert torch.equal(a, b), k     # steps, biases, BN: the stored bytes themselves
    # saving the reloaded model writes the very same bytes
    export.save_packed(loaded, tmp_path / "again.hmq", arch="resnet20")
    assert (tmp_path / "again.hmq").read_bytes() == blob


def test_metadata_cap_is_derived_from_the_compressed_length() -> None:
    assert export._meta_cap(100) == 64 * 1024                 # the floor
    assert export._meta_cap(4096) == 64 * 4096                # 64x the compressed bytes
    assert export._meta_cap(10 ** 6) == 16 * 2 ** 20          # the absolute cap


# --------------------------------------------------------------------------------------------
# Truncated, bad zlib, bad UTF-8, bad JSON, decompression bomb
# --------------------------------------------------------------------------------------------
def test_truncated_body_is_refused_before_reading_it(valid, tmp_path) -> None:
    _, blob = valid
    bad = tmp_path / "cut.hmq"
    bad.write_bytes(blob[: len(blob) // 2])
    _refused(bad, f"truncated: header says {len(blob)} bytes, file has {len(blob) // 2}")


def test_truncated_zlib_stream(valid, tmp_path, no_model_built) -> None:
    meta, payload = _split(valid[1])
    js = zlib.compress(json.dumps(meta).encode())
    bad = tmp_path / "short-meta.hmq"
    bad.write_bytes(_assemble(js[:-20], payload))
    _refused(bad, f"the metadata's zlib stream ends early ({len(js) - 20} bytes inflate to")


def test_bad_zlib(valid, tmp_path, no_model_built) -> None:
    _, payload = _split(valid[1])
    bad = tmp_path / "not-zlib.hmq"
    bad.write_bytes(_assemble(b'{"format": "hmqat.packed"}', payload))
    _refused(bad, "the metadata is not a valid zlib stream (Error -3 while decompressing data: "
                  "incorrect header check); re-export with save_packed")


def test_stray_bytes_after_zlib_stream(valid, tmp_path, no_model_built) -> None:
    meta, payload = _split(valid[1])
    bad = tmp_path / "stray.hmq"
    bad.write_bytes(_assemble(zlib.compress(json.dumps(meta).encode()) + b"XYZ", payload))
    _refused(bad, "3 stray bytes follow the metadata's zlib stream")


def test_bad_utf8(valid, tmp_path, no_model_built) -> None:
    _, payload = _split(valid[1])
    bad = tmp_path / "latin1.hmq"
    bad.write_bytes(_assemble(zlib.compress('{"arch": "résnet"}'.encode("latin-1")), payload))
    _refused(bad, "the metadata is not UTF-8 text (byte 11: invalid continuation byte)")


@pytest.mark.parametrize("text, message", [
    ('{"format": "hmqat.packed",', "the metadata is not valid JSON (Expecting property name "
                                   "enclosed in double quotes: line 1 column 27 (char 26))"),
    ("[" * 5000 + "]" * 5000, "the metadata JSON is nested too deeply to parse"),
    ("[1, 2]", "the metadata is a JSON list, not an object"),
])
def test_bad_json(valid, tmp_path, no_model_built, text, message) -> None:
    _, payload = _split(valid[1])
    bad = tmp_path / "bad-json.hmq"
    bad.write_bytes(_assemble(zlib.compress(text.encode()), payload))
    _refused(bad, message)


def test_decompression_bomb_fails_without_inflating(tmp_path, no_model_built) -> None:
    """64 MiB of JSON whitespace (valid JSON once ``{}`` ends it) compressed to ~64 KB: refused
    after at most the cap (64x the compressed size, ~4 MiB), never inflated in full."""
    bomb_size = 64 * 2 ** 20
    zc = zlib.compressobj(9)
    chunk = b" " * 2 ** 20
    js = b"".join(zc.compress(chunk) for _ in range(bomb_size // len(chunk)))
    js += zc.compress(b"{}") + zc.flush()
    assert len(js) < bomb_size // 500
    bad = tmp_path / "bomb.hmq"
    bad.write_bytes(_assemble(js, b""))
    cap = export._meta_cap(len(js))
    tracemalloc.start()
    try:
        with pytest.raises(export.PackedFormatError) as info:
            export.load_packed(bad)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(info.value) == (
        f"{bad}: the {len(js)}-byte compressed metadata inflates to more than {cap} bytes (the "
        f"limit: 64x its size, at least 65536, at most 16777216); refused unread as a "
        "decompression bomb or corrupt file; re-export with save_packed")
    assert peak < 2 * cap + 2 ** 20 < bomb_size // 4


# --------------------------------------------------------------------------------------------
# Missing keys, wrong types, absurd sizes: refused before any model is built
# --------------------------------------------------------------------------------------------
def _drop(*keys):
    def edit(meta, payload):
        target = meta
        for k in keys[:-1]:
            target = target[k]
        del target[keys[-1]]
        return payload
    return edit


def _set(value, *keys):
    def edit(meta, payload):
        target = meta
        for k in keys[:-1]:
            target = target[k]
        target[keys[-1]] = value
        return payload
    return edit


def _set_section(name, key, value):
    def edit(meta, payload):
        next(s for s in meta["sections"] if s["name"] == name)[key] = value
        return payload
    return edit


@pytest.mark.parametrize("edit, message", [
    (_drop("sections"), "the metadata lacks the key 'sections'"),
    (_drop("num_classes"), "the metadata lacks the key 'num_classes'"),
    (_drop("layers", "conv1", "w_bits"), "layer 'conv1' lacks the key 'w_bits'"),
    (_drop("layers", "linear", "weight_shape"), "layer 'linear' lacks the key 'weight_shape'"),
    (_drop("sections", 0, "codec"), "section 'conv1.weight' lacks the key 'codec'"),
    (_drop("sections", 0, "name"), "section #0 lacks the key 'name'"),
], ids=["sections", "num_classes", "w_bits", "weight_shape", "codec", "name"])
def test_missing_keys(valid, tmp_path, no_model_built, edit, message) -> None:
    bad = tmp_path / "missing.hmq"
    bad.write_bytes(_forge(valid[0], edit))
    assert _refused(bad, message).endswith("; re-export with save_packed")


@pytest.mark.parametrize("edit, message", [
    (_set("2", "version"), "the metadata has version='2'; expected 2"),
    (_set("vgg16", "arch"), "the metadata has arch='vgg16'; expected null or one of "
                            "['resnet20', 'resnet32', 'resnet44', 'resnet56', 'resnet18', "
                            "'resnet50']"),
    (_set("10", "num_classes"), "the metadata has num_classes='10'; expected null or a "
                                "positive int"),
    (_set(0, "num_classes"), "the metadata has num_classes=0; expected null or a positive int"),
    (_set([], "layers"), "the metadata has layers=[]; expected a non-empty object "
                         "{layer: spec}"),
    (_set({}, "sections"), "the metadata has sections={}; expected a list of sections"),
    (_set("x" * 50_000, "format"), "the metadata has format='" + "x" * 79 + "… (50002 "
                                   "characters); expected 'hmqat.packed'"),
    (_set(4.0, "layers", "conv1", "w_bits"), "layer 'conv1' has w_bits=4.0; expected an int in "
                                             "(2, 3, 4, 5, 6, 7, 8)"),
    (_set(True, "layers", "conv1", "a_bits"), "layer 'conv1' has a_bits=True; expected null or "
                                              "an int in (2, 3, 4, 5, 6, 7, 8)"),
    (_set("yes", "layers", "conv1", "per_channel"), "layer 'conv1' has per_channel='yes'; "
                                                    "expected true or false"),
    (_set([16, "3", 3, 3], "layers", "conv1", "weight_shape"),
     "layer 'conv1' has weight_shape=[16, '3', 3, 3]; expected a list of 4 positive sizes "
     "(a QConv2d weight)"),
    (_set("QConv3d", "layers", "conv1", "kind"), "layer 'conv1' has kind='QConv3d'; expected "
                                                 "one of ['QConv2d', 'QLinear']"),
    (_set(7, "layers", "conv1"), "layer 'conv1' is 7, not a JSON object"),
    (_set(0.0, "sections", 0, "offset"), "section 'conv1.weight' starts at 0.0, expected 0"),
    (_set_section("conv1.weight_quantizer.step", "dtype", "torch.complex64"),
     "section 'conv1.weight_quantizer.step' has dtype 'torch.complex64', not a real numeric "
     "torch dtype"),
    (_set_section("conv1.weight_quantizer.step", "shape", [1] * 65),
     "section 'conv1.weight_quantizer.step' has shape=" + repr([1] * 65)[:80]
     + "… (195 characters); expected a list of at most 64 sizes"),
    (_set_section("conv1.weight", "name", "x" * 10_000),
     "section '" + "x" * 79 + "… (10002 characters) is packed but is not the weight of a "
     "recorded layer"),
], ids=["version", "arch", "num_classes-str", "num_classes-0", "layers", "sections", "long-str",
        "w_bits", "a_bits", "per_channel", "weight_shape", "kind", "layer", "offset", "dtype",
        "shape-dims", "long-name"])
def test_wrong_types(valid, tmp_path, no_model_built, edit, message) -> None:
    assert _split(valid[1])[0]["sections"][0]["name"] == "conv1.weight"
    bad = tmp_path / "types.hmq"
    bad.write_bytes(_forge(valid[0], edit))
    _refused(bad, message)


def test_absurd_num_classes_builds_no_model(valid, tmp_path, no_model_built) -> None:
    bad = tmp_path / "classes.hmq"
    bad.write_bytes(_forge(valid[0], _set(10 ** 6, "num_classes")))
    _refused(bad, "the metadata has num_classes=1000000 but the recorded QLinear layers have "
                  "[10] outputs: the classifier would not fit (refused before building the model)")


def test_absurd_classifier_shape_builds_no_model(valid, tmp_path, no_model_built) -> None:
    """The classifier's recorded shape forged to match 10^6 classes: its section cannot hold
    it, and the payload is what the file length says, so nothing is built."""
    def grow(meta, payload):
        meta["num_classes"] = 10 ** 6
        meta["layers"]["linear"]["weight_shape"] = [10 ** 6, 64]
        next(s for s in meta["sections"] if s["name"] == "linear.weight")["shape"] = [10 ** 6, 64]
        return payload
    bad = tmp_path / "classes.hmq"
    bad.write_bytes(_forge(valid[0], grow))
    bits = _split(valid[1])[0]["layers"]["linear"]["w_bits"]
    _refused(bad, f"section 'linear.weight' says nbytes={math.ceil(10 * 64 * bits / 8)} but its "
                  f"shape and bits need {math.ceil(10 ** 6 * 64 * bits / 8)}")


def test_section_beyond_the_payload(valid, tmp_path, no_model_built) -> None:
    def swell(meta, payload):
        sec = meta["sections"][-1]
        assert (sec["name"], sec["dtype"]) == ("linear.act_quantizer.step", "torch.float32")
        sec["shape"], sec["nbytes"] = [2 ** 40], 4 * 2 ** 40
        return payload
    bad = tmp_path / "swell.hmq"
    bad.write_bytes(_forge(valid[0], swell))
    payload = len(_split(valid[1])[1])
    _refused(bad, f"section 'linear.act_quantizer.step' ends at byte {payload - 4 + 4 * 2 ** 40} "
                  f"of a {payload}-byte payload")


def test_missing_or_misshapen_step_section(valid, tmp_path, no_model_built) -> None:
    bad = tmp_path / "step.hmq"
    bad.write_bytes(_forge(valid[0], _set_section("conv1.weight_quantizer.step", "name",
                                                  "conv1.weight_quantizer.stap")))
    _refused(bad, "layer 'conv1' needs a raw floating section 'conv1.weight_quantizer.step' of "
                  "shape [16]; found none")
    # the right name, but one step for a per-channel layer of 16 output channels
    def one_step(meta, payload):
        sec = next(s for s in meta["sections"] if s["name"] == "conv1.weight_quantizer.step")
        del payload[sec["offset"] + 4:sec["offset"] + sec["nbytes"]]
        sec["shape"], sec["nbytes"] = [1], 4
        for later in meta["sections"]:
            if later["offset"] > sec["offset"]:
                later["offset"] -= 60
        return payload
    bad.write_bytes(_forge(valid[0], one_step))
    _refused(bad, "layer 'conv1' needs a raw floating section 'conv1.weight_quantizer.step' of "
                  "shape [16]; found {'name': 'conv1.weight_quantizer.step', 'codec': 'raw'")


def test_non_finite_stored_step_is_refused(valid, tmp_path) -> None:
    def poison(meta, payload):
        sec = next(s for s in meta["sections"]
                   if s["name"] == "layer1.0.conv2.weight_quantizer.step")
        payload[sec["offset"]:sec["offset"] + 4] = torch.tensor([math.nan]).numpy().tobytes()
        return payload
    bad = tmp_path / "nan.hmq"
    bad.write_bytes(_forge(valid[0], poison))
    with pytest.raises(export.PackedFormatError, match=re.escape(
            f"{bad}: section 'layer1.0.conv2.weight_quantizer.step' holds NaN or inf values, "
            "which save_packed never writes")):
        export.load_packed(bad)


# --------------------------------------------------------------------------------------------
# Non-finite weights and steps at export
# --------------------------------------------------------------------------------------------
def _tiny_calibrated() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 8, 3), act=nn.ReLU(),
                                      flat=nn.Flatten(), fc=nn.Linear(8 * 6 * 6, 5)))
    qm = quant.quantize_model(model, {"conv": 8, "fc": 4}, a_bits=4, policy="none",
                              input_size=(1, 3, 8, 8))
    return quant.calibrate_activations(qm, [torch.randn(4, 3, 8, 8)]).eval()


@pytest.fixture(scope="module")
def tiny():
    return _tiny_calibrated()


@pytest.mark.parametrize("writer", ["save_packed", "export_onnx"])
@pytest.mark.parametrize("tensor, value, count", [
    ("fc.weight", math.nan, "1 of 1440"),
    ("fc.weight", math.inf, "1 of 1440"),
    ("conv.weight_quantizer.step", math.nan, "1 of 8"),
    ("conv.weight_quantizer.step", -math.inf, "1 of 8"),
], ids=["weight-nan", "weight-inf", "step-nan", "step-inf"])
def test_non_finite_weight_or_step_is_refused(tiny, tmp_path, writer, tensor, value,
                                              count) -> None:
    qm = copy.deepcopy(tiny)
    with torch.no_grad():
        qm.state_dict()[tensor].view(-1)[3] = value
    path = tmp_path / ("m.hmq" if writer == "save_packed" else "m.onnx")
    path.write_bytes(b"the previous export")
    with pytest.raises(export.ExportError) as info:
        if writer == "save_packed":
            export.save_packed(qm, path)
        else:
            onnx_export.export_onnx(qm, path, torch.randn(1, 3, 8, 8))
    assert str(info.value) == (
        f"{writer}: parameter {tensor} ({count} values NaN/inf): a non-finite weight or step has "
        "no integer code, so the export would not match the model; the model diverged or was "
        "corrupted: export the last finite checkpoint or retrain")
    assert path.read_bytes() == b"the previous export"     # nothing overwritten
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]   # no temporary left


def test_non_finite_bias_or_activation_step_is_refused_too(tiny, tmp_path) -> None:
    qm = copy.deepcopy(tiny)
    with torch.no_grad():
        qm.fc.act_quantizer.step.fill_(math.inf)
    with pytest.raises(export.ExportError, match=re.escape(
            "save_packed: parameter fc.act_quantizer.step (1 of 1 values NaN/inf): ")):
        export.save_packed(qm, tmp_path / "m.hmq")
    with torch.no_grad():
        qm.conv.bias[0] = math.nan
    with pytest.raises(export.ExportError, match=re.escape(
            "export_onnx: parameter conv.bias (1 of 8 values NaN/inf): ")):
        onnx_export.export_onnx(qm, tmp_path / "m.onnx", torch.randn(1, 3, 8, 8))
    assert list(tmp_path.iterdir()) == []


def test_out_of_range_codes_name_the_layer_and_cause(tiny, tmp_path, monkeypatch) -> None:
    qm = copy.deepcopy(tiny)
    wq = qm.fc.weight_quantizer
    real = wq.int_repr
    monkeypatch.setattr(wq, "int_repr", lambda w: real(w) + 9)   # a quantizer that ignores Q_P
    with pytest.raises(export.ExportError) as info:
        export.save_packed(qm, tmp_path / "m.hmq")
    codes = real(qm.fc.weight.detach()) + 9
    outside = int((codes > 7).sum())
    assert str(info.value) == (
        f"save_packed: layer 'fc' weight: {outside} of 1440 codes outside [-8, 7] for 4 bits "
        f"(min {int(codes.min())}, max {int(codes.max())}): its weight quantizer's int_repr does "
        "not clamp to its own range [-8, 7]; the quantizer (bits 4, signed True) is "
        "inconsistent, re-create the layer with hmqat.quant.quantize_model")
    assert not (tmp_path / "m.hmq").exists()
