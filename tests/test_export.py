"""Tests for hmqat.export: bit packing, exact round trip, file size, integrity errors.

Run: .venv/bin/python -m pytest -q tests/test_export.py
"""
from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch
from torch import nn

from hmqat import export, quant
from hmqat.models import create_model


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("signed", [True, False])
def test_pack_unpack_roundtrip(bits: int, signed: bool) -> None:
    qn, qp = quant.weight_qrange(bits) if signed else quant.act_qrange(bits)
    rng = np.random.default_rng(bits)
    codes = np.concatenate([[qn, qp, 0], rng.integers(qn, qp + 1, size=997)])
    buf = export.pack_codes(codes, bits, qn)
    assert len(buf) == math.ceil(codes.size * bits / 8)
    assert np.array_equal(export.unpack_codes(buf, codes.size, bits, qn), codes)


def test_pack_layout_is_lsb_first_offset_codes() -> None:
    # 2-bit signed codes -2, -1, 0, 1 -> offsets 0, 1, 2, 3 -> bits 00 10 01 11 (LSB first)
    assert export.pack_codes(np.array([-2, -1, 0, 1]), 2, -2) == bytes([0b11100100])
    with pytest.raises(ValueError, match=r"codes outside \[-2, 1\] for 2 bits"):
        export.pack_codes(np.array([2]), 2, -2)


def _mixed_model() -> tuple[nn.Module, nn.Module, dict[str, int]]:
    torch.manual_seed(0)
    fp = create_model("resnet20")
    names = list(quant.uniform_config(fp, 8))
    cfg = {n: quant.SUPPORTED_BITS[i % 7] for i, n in enumerate(names)}
    cfg.update(quant.fixed_layers(fp))
    qm = quant.quantize_model(fp, cfg, a_bits=4)
    quant.calibrate_activations(qm, [torch.randn(16, 3, 32, 32)])
    # a few QAT steps so weights/steps/BN statistics are no longer at their initial values
    qm.train()
    opt = torch.optim.SGD(qm.parameters(), lr=0.05)
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(qm(torch.randn(16, 3, 32, 32)), torch.randint(0, 10, (16,))).backward()
        opt.step()
    return fp, qm.eval(), cfg


@pytest.fixture(scope="module")
def mixed():
    return _mixed_model()


def test_infer_arch() -> None:
    assert export.infer_arch(create_model("resnet32", num_classes=7)) == ("resnet32", 7)
    assert export.infer_arch(create_model("resnet18", num_classes=4)) == ("resnet18", 4)
    assert export.infer_arch(nn.Linear(2, 2)) is None


def test_torchvision_resnet18_roundtrip_without_arch(tmp_path) -> None:
    torch.manual_seed(0)
    fp = create_model("resnet18", num_classes=4)
    qm = quant.quantize_model(fp, quant.uniform_config(fp, 3), a_bits=4)
    quant.calibrate_activations(qm, [torch.randn(2, 3, 32, 32)])
    path = tmp_path / "r18.hmq"
    export.save_packed(qm, path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(export.load_packed(path)(x), qm.eval()(x))


def test_roundtrip_outputs_exact_and_size(mixed, tmp_path) -> None:
    fp, qm, cfg = mixed
    path = tmp_path / "r20.hmq"
    meta = export.save_packed(qm, path, arch="resnet20")
    x = torch.randn(32, 3, 32, 32)
    with torch.no_grad():
        ref = qm(x)
        for source in (None, fp, lambda: create_model("resnet20")):
            loaded = export.load_packed(path, source)
            assert not loaded.training
            assert quant.bit_config_of(loaded) == cfg
            assert torch.equal(loaded(x), ref)
    # file size: header + JSON + HAWQ-V3 size (within 2 %) + BN running statistics
    size_bytes = quant.model_size_mb(qm) * 2 ** 20
    bn_buffers = sum(b.numel() * b.element_size() for n, b in qm.named_buffers()
                     if n.endswith(("running_mean", "running_var", "num_batches_tracked")))
    file_bytes = path.stat().st_size
    assert file_bytes == meta["file_bytes"] == export.HEADER_BYTES + meta["json_bytes"] + meta["payload_bytes"]
    assert export.HEADER_BYTES <= 4096
    assert abs(meta["payload_bytes"] - bn_buffers - size_bytes) <= 0.02 * size_bytes
    # packing overhead is < 1 byte per layer
    assert 0 <= meta["payload_bytes"] - bn_buffers - size_bytes < len(cfg)
    assert export.read_metadata(path)["layers"]["layer1.0.conv1"]["w_bits"] == cfg["layer1.0.conv1"]


def test_corrupt_and_truncated_files(mixed, tmp_path) -> None:
    _, qm, _ = mixed
    path = tmp_path / "m.hmq"
    export.save_packed(qm, path, arch="resnet20")
    blob = path.read_bytes()

    bad = tmp_path / "bad.hmq"
    flipped = bytearray(blob)
    flipped[-100] ^= 0xFF
    bad.write_bytes(bytes(flipped))
    with pytest.raises(export.PackedFormatError, match=r"checksum mismatch: the file is corrupt"):
        export.load_packed(bad)
    bad.write_bytes(blob[:-10])
    with pytest.raises(export.PackedFormatError, match=r"truncated: header says \d+ bytes"):
        export.load_packed(bad)
    bad.write_bytes(blob[:20])
    with pytest.raises(export.PackedFormatError, match=r"truncated: 20 bytes, shorter than"):
        export.load_packed(bad)
    bad.write_bytes(b"PK\x03\x04" + blob[4:])
    with pytest.raises(export.PackedFormatError, match=r"bad magic .* not an hmqat packed"):
        export.load_packed(bad)
    bad.write_bytes(blob[:8] + struct.pack("<I", 99) + blob[12:])
    with pytest.raises(export.PackedFormatError, match=r"format version 99 is not supported"):
        export.load_packed(bad)


def test_save_and_load_errors(mixed, tmp_path) -> None:
    fp, qm, _ = mixed
    with pytest.raises(ValueError, match=r"no QConv2d/QLinear layers"):
        export.save_packed(fp, tmp_path / "x.hmq")
    fresh = quant.quantize_model(fp, quant.uniform_config(fp, 4), a_bits=4)
    with pytest.raises(ValueError, match=r"conv1.act_quantizer is not initialised"):
        export.save_packed(fresh, tmp_path / "x.hmq")
    path = tmp_path / "noarch.hmq"
    small = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
    qsmall = quant.quantize_model(small, {"0": 8, "2": 4}, a_bits=None, policy="none")
    export.save_packed(qsmall, path)
    with pytest.raises(ValueError, match=r"records no arch; pass the FP32 model"):
        export.load_packed(path)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(export.load_packed(path, small)(x), qsmall.eval()(x))
    path = tmp_path / "inferred.hmq"
    export.save_packed(qm, path)            # arch inferred from the model
    with pytest.raises(ValueError, match=r"layer 'linear' \(weight \[10, 64\]\) is missing "
                                         r"from or has another shape"):
        export.load_packed(path, create_model("resnet20", num_classes=100))
    with pytest.raises(ValueError, match=r"layer 'layer1.3.conv1' of CifarResNet is not in the file"):
        export.load_packed(path, create_model("resnet32"))
    with pytest.raises(ValueError, match=r"not a quantized one"):
        export.load_packed(path, qm)


def test_qat_trained_model_round_trips_exactly(tmp_path):
    """QAT trains in channels_last; the model it returns must export and reload bit-identically."""
    from hmqat import data, models, train

    fp32 = models.create_model("resnet20")
    ds = data.synthetic_cifar(64, seed=0)
    cfg = quant.uniform_config(fp32, 3)
    qmodel, _ = train.qat(fp32, cfg, data.make_loader(ds, 32, train=True), None,
                          train.TrainConfig(epochs=1, max_steps_per_epoch=2, channels_last=True))
    # NHWC vs NCHW convs round differently and a flip at a rounding boundary of a 4-bit
    # activation cascades, so the returned model must be in the standard layout export uses.
    assert all(p.is_contiguous() for p in qmodel.parameters())
    path = tmp_path / "m.hmq"
    meta = export.save_packed(qmodel, path)
    x = next(iter(data.make_loader(ds, 64)))[0]
    with torch.no_grad():
        assert torch.equal(export.load_packed(path).eval()(x), qmodel.eval()(x))
    bn_buffer_bytes = sum(b.numel() * b.element_size() for n, b in qmodel.named_buffers()
                          if "running_" in n or "num_batches" in n)
    hawq_bytes = quant.model_size_mb(qmodel) * 2**20
    assert meta["payload_bytes"] - bn_buffer_bytes <= 1.02 * hawq_bytes
    assert meta["json_bytes"] < 4096  # compressed metadata: a few KB, not 20 % of the file


def _forge(path, edit) -> bytes:
    """The packed file at ``path`` with its section table edited by ``edit(meta, payload)`` and
    a recomputed sha256 (integrity holds; only the cross-checks can catch it)."""
    import hashlib
    import json
    import zlib

    blob = path.read_bytes()
    _, version, jlen, _, _ = export._HEADER.unpack_from(blob)
    body = blob[export.HEADER_BYTES:]
    meta = json.loads(zlib.decompress(body[:jlen]))
    payload = edit(meta, bytearray(body[jlen:]))
    js = zlib.compress(json.dumps(meta).encode())
    return export._HEADER.pack(export.MAGIC, version, len(js), len(payload),
                               hashlib.sha256(js + payload).digest()) + js + bytes(payload)


def test_forged_section_table_is_refused(mixed, tmp_path) -> None:
    _, qm, cfg = mixed
    path = tmp_path / "m.hmq"
    export.save_packed(qm, path, arch="resnet20")
    name = "layer1.0.conv1"
    bits = cfg[name]
    assert bits >= 3

    def sec(meta):
        return next(s for s in meta["sections"] if s["name"] == f"{name}.weight")

    def fewer_bytes(meta, payload):   # nbytes shrunk, later offsets shifted, bytes cut out
        s, cut = sec(meta), 8
        del payload[s["offset"] + s["nbytes"] - cut:s["offset"] + s["nbytes"]]
        s["nbytes"] -= cut
        for t in meta["sections"]:
            if t["offset"] > s["offset"]:
                t["offset"] -= cut
        return payload

    def other_bits(meta, payload):
        sec(meta)["bits"] = bits - 1
        return payload

    def layer_bits_too(meta, payload):   # the layer table agrees with the forged section
        other_bits(meta, payload)
        sec(meta)["qn"] = -(2 ** (bits - 2))
        meta["layers"][name]["w_bits"] = bits - 1
        return payload

    def overlap(meta, payload):
        meta["sections"][1]["offset"] -= 1
        return payload

    bad = tmp_path / "forged.hmq"
    for edit, msg in ((fewer_bytes, r"says nbytes=\d+ but its shape and bits need \d+"),
                      (other_bits, rf"has bits={bits - 1}, qn=-?\d+ but its layer records "
                                   rf"{bits} bits"),
                      (layer_bits_too, r"says nbytes=\d+ but its shape and bits need \d+"),
                      (overlap, r"starts at \d+, expected \d+ \(sections are back to back\)")):
        bad.write_bytes(_forge(path, edit))
        with pytest.raises(export.PackedFormatError, match=rf"{bad}: section '.*' {msg}"):
            export.load_packed(bad)


def test_packed_and_config_files_follow_the_umask(mixed, tmp_path) -> None:
    import os
    import stat

    _, qm, cfg = mixed
    old = os.umask(0o022)
    try:
        export.save_packed(qm, tmp_path / "m.hmq", arch="resnet20")
        quant.save_config(cfg, tmp_path / "c.json")
        os.umask(0o027)
        quant.save_config(cfg, tmp_path / "d.json")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.hmq").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "c.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d.json").stat().st_mode) == 0o640
