"""Tests for hmqat.quant: LSQ quantizer numerics and gradients, configs, conversion, accounting.

Run: .venv/bin/python -m pytest -q tests/test_quant.py
"""
from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

from hmqat import quant
from hmqat.models import create_model
from hmqat.quant import BitConfigError, LSQQuantizer

# ResNet-20 by hand (He et al. 2016, option A): conv1 3->16, three stages of 6 3x3 convs at
# 16/32/64 channels (the first conv of stages 2 and 3 has stride 2 and half the input
# channels), linear 64->10 with bias, one BN (weight+bias) after every conv.
CONV1 = 3 * 16 * 9
STAGE1 = 6 * (16 * 16 * 9)
STAGE2 = 16 * 32 * 9 + 5 * (32 * 32 * 9)
STAGE3 = 32 * 64 * 9 + 5 * (64 * 64 * 9)
FC = 64 * 10
N_WEIGHTS = CONV1 + STAGE1 + STAGE2 + STAGE3 + FC
BN_PARAMS = 2 * (16 + 6 * 16 + 6 * 32 + 6 * 64)
FC_BIAS = 10
N_PARAMS = N_WEIGHTS + BN_PARAMS + FC_BIAS
W_STEPS = 16 + 6 * 16 + 6 * 32 + 6 * 64 + 10   # per-output-channel weight steps
A_STEPS = 20                                     # one per quantized layer's input
MACS_CONV1 = 32 * 32 * CONV1
MACS_FC = FC
MACS = (MACS_CONV1 + 6 * 32 * 32 * (16 * 16 * 9)
        + 16 * 16 * (16 * 32 * 9) + 5 * 16 * 16 * (32 * 32 * 9)
        + 8 * 8 * (32 * 64 * 9) + 5 * 8 * 8 * (64 * 64 * 9) + MACS_FC)
MB = 2 ** 20


@pytest.fixture(scope="module")
def r20() -> nn.Module:
    torch.manual_seed(0)
    return create_model("resnet20")


def _fixed_quantizer(bits: int, signed: bool, steps: list[float], per_channel: bool = False,
                     dtype: torch.dtype = torch.float32) -> LSQQuantizer:
    q = LSQQuantizer(bits, signed=signed, per_channel=per_channel, channels=len(steps),
                     is_weight=True, dtype=dtype)
    with torch.no_grad():
        q.step.copy_(torch.tensor(steps, dtype=dtype))
    q.mark_initialized()
    return q


# ------------------------------------------------------------------------------------------
# Quantizer numerics
# ------------------------------------------------------------------------------------------
def test_qranges() -> None:
    assert quant.weight_qrange(2) == (-2, 1)
    assert quant.weight_qrange(4) == (-8, 7)
    assert quant.weight_qrange(8) == (-128, 127)
    assert quant.act_qrange(4) == (0, 15)
    assert quant.act_qrange(8) == (0, 255)


def test_rounding_and_clipping_signed_by_hand() -> None:
    q = _fixed_quantizer(3, True, [0.5])  # Q_N = -4, Q_P = 3
    x = torch.tensor([-3.0, -2.1, -0.74, -0.25, 0.26, 0.75, 1.6, 3.4])
    # x/s = -6, -4.2, -1.48, -0.5, 0.52, 1.5, 3.2, 6.8 -> round (half to even), clamp [-4, 3]
    codes = [-4, -4, -1, 0, 1, 2, 3, 3]
    assert q.int_repr(x).tolist() == codes
    assert q.int_repr(x).dtype == torch.int32
    assert torch.equal(q(x), torch.tensor(codes, dtype=torch.float32) * 0.5)


def test_rounding_and_clipping_unsigned_by_hand() -> None:
    q = _fixed_quantizer(2, False, [0.25])  # [0, 3]
    x = torch.tensor([-1.0, 0.1, 0.2, 0.45, 0.9])
    # x/s = -4, 0.4, 0.8, 1.8, 3.6 -> 0, 0, 1, 2, 3
    assert q.int_repr(x).tolist() == [0, 0, 1, 2, 3]
    assert torch.allclose(q(x), torch.tensor([0.0, 0.0, 0.25, 0.5, 0.75]))


def _reference(x: torch.Tensor, s: torch.Tensor, qn: int, qp: int) -> torch.Tensor:
    """The textbook LSQ expression: clamp, then round with the detach STE (no grad scale)."""
    v = torch.clamp(x / s, qn, qp)
    return (v + (torch.round(v) - v).detach()) * s


# The torch.compile backend needs a C++ compiler and ~30 s of cold compilation, too slow for the
# default suite: HMQAT_TEST_COMPILE=1 adds it (benchmarks/qat_step.py also checks it agrees).
BACKENDS = ["eager"] + (["compile"] if os.environ.get("HMQAT_TEST_COMPILE") else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("signed,bits", [(True, 2), (True, 4), (False, 4), (False, 8)])
def test_lsq_gradients_match_explicit_formula(backend: str, per_channel: bool, signed: bool,
                                              bits: int, monkeypatch) -> None:
    torch.manual_seed(bits + 10 * signed + 100 * per_channel)
    quant.set_backend(backend)
    monkeypatch.setattr(quant, "_COMPILE_MIN_NUMEL", 0)  # compile even these small tensors
    try:
        C = 6
        steps = (torch.rand(C, dtype=torch.float64) * 0.3 + 0.2).tolist() if per_channel else [0.3]
        steps[0] = 0.5  # exact binary step: put elements exactly on the clipping boundaries
        q = _fixed_quantizer(bits, signed, steps, per_channel, torch.float64)
        x = torch.randn(C, 5, 4, 4, dtype=torch.float64) * (q.qp * 0.3)
        x[0, 0, 0, :4] = torch.tensor([q.qn, q.qp, q.qn - 0.2, q.qp + 0.2], dtype=torch.float64) * 0.5
        x.requires_grad_(True)
        out = q(x)
        gout = torch.randn_like(out)
        out.backward(gout)

        x2 = x.detach().clone().requires_grad_(True)
        s2 = q.step.detach().clone().requires_grad_(True)
        ref = _reference(x2, s2.view(-1, 1, 1, 1) if per_channel else s2, q.qn, q.qp)
        ref.backward(gout)

        assert torch.allclose(out, ref, rtol=0, atol=1e-12)
        assert torch.allclose(x.grad, x2.grad, rtol=1e-12, atol=1e-12)
        # STE: zero outside (Q_N, Q_P), including exactly on the boundaries (LSQ eq. 3)
        assert x.grad[0, 0, 0, :4].abs().sum() == 0
        g = q.grad_scale(x)
        assert torch.allclose(q.step.grad, s2.grad * g, rtol=1e-9, atol=1e-12)
        if backend == "compile":
            assert not quant._COMPILE_FAILED, "the compile backend fell back to eager"
    finally:
        quant.set_backend("eager")


def test_step_gradient_by_hand() -> None:
    """dq/ds = round(v) - v inside, Q_N below, Q_P above; times g = 1/sqrt(N*Q_P)."""
    q = _fixed_quantizer(3, True, [0.5])
    x = torch.tensor([-3.0, 0.26, 3.4], requires_grad=True)   # v = -6, 0.52, 6.8
    q(x).sum().backward()
    g = 1 / math.sqrt(3 * 3)
    assert q.step.grad.item() == pytest.approx(((-4) + (1 - 0.52) + 3) * g, rel=1e-6)
    assert x.grad.tolist() == [0.0, 1.0, 0.0]


def test_quantizer_runs_in_float32_under_autocast() -> None:
    """Under autocast a half-precision input is quantized in float32 (type promotion against the
    float32 step), exactly as outside autocast, and the step still gets its float32 gradient."""
    q = _fixed_quantizer(4, False, [0.0371])
    x = (torch.rand(2, 3, 8, 8) * 0.6).to(torch.bfloat16)
    ref = q(x.float())
    (ref_grad,) = torch.autograd.grad(ref.sum(), q.step)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(x)
        (grad,) = torch.autograd.grad(out.sum(), q.step)
    assert out.dtype == torch.float32
    assert torch.equal(out, ref) and torch.equal(grad, ref_grad)
    # a quantized layer under autocast: its conv runs in bfloat16 on float32-quantized inputs
    torch.manual_seed(0)
    qm = quant.quantize_model(create_model("resnet20"), quant.uniform_config(
        create_model("resnet20"), 4), a_bits=4)
    quant.calibrate_activations(qm, [torch.randn(8, 3, 32, 32)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = qm.eval()(torch.randn(4, 3, 32, 32))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


def test_grad_scale_counts_elements_per_step() -> None:
    w = torch.randn(8, 4, 3, 3)
    pc = LSQQuantizer(4, signed=True, per_channel=True, channels=8, is_weight=True)
    pt = LSQQuantizer(4, signed=True, per_channel=False, is_weight=True)
    act = LSQQuantizer(4, signed=False)
    assert pc.grad_scale(w) == pytest.approx(1 / math.sqrt(36 * 7))
    assert pt.grad_scale(w) == pytest.approx(1 / math.sqrt(288 * 7))
    assert act.grad_scale(torch.randn(16, 4, 5, 5)) == pytest.approx(1 / math.sqrt(100 * 15))


def test_per_channel_vs_per_tensor() -> None:
    torch.manual_seed(0)
    w = torch.randn(4, 3, 3, 3) * torch.tensor([0.01, 0.1, 1.0, 10.0]).view(-1, 1, 1, 1)
    s_pc = quant.init_step(w, 4, per_channel=True)
    s_pt = quant.init_step(w, 4, per_channel=False)
    assert s_pc.shape == (4,) and s_pt.shape == (1,)
    expected = 2 * w.abs().flatten(1).mean(1) / math.sqrt(7)
    assert torch.allclose(s_pc, expected)
    assert torch.allclose(s_pt, 2 * w.abs().mean() / math.sqrt(7))
    err_pc = (quant.quantize_weight(w, 4, per_channel=True) - w).pow(2).sum()
    err_pt = (quant.quantize_weight(w, 4, per_channel=False) - w).pow(2).sum()
    assert err_pc < err_pt
    # a per-channel quantizer acts on channel c exactly like a per-tensor one with step s_c
    qpc = _fixed_quantizer(4, True, s_pc.tolist(), per_channel=True)
    for c in range(4):
        qc = _fixed_quantizer(4, True, [s_pc[c].item()])
        assert torch.equal(qpc(w)[c], qc(w[c]))


def test_mse_init_beats_lsq_and_every_grid_point() -> None:
    torch.manual_seed(1)
    w = torch.randn(3, 50) ** 3  # heavy tails: the range-based step is far from optimal
    s = quant.init_step(w, 3, per_channel=True, method="mse")
    s_lsq = quant.init_step(w, 3, per_channel=True, method="lsq")

    def err(step: torch.Tensor) -> torch.Tensor:
        return (quant._fake_quant_ref(w, step[:, None], -4, 3) - w).pow(2).sum(1)

    assert torch.all(err(s) <= err(s_lsq) + 1e-6)
    amax = w.abs().amax(1)
    for k in (5, 20, 50, 100):
        assert torch.all(err(s) <= err(amax * k / 100 / 3) + 1e-6)


def test_quantize_weight_equals_qat_initial_weight(r20: nn.Module) -> None:
    qm = quant.quantize_model(r20, quant.uniform_config(r20, 3), a_bits=4)
    w = r20.layer2[0].conv1.weight
    assert torch.equal(quant.quantize_weight(w, 3), qm.layer2[0].conv1.quantized_weight().detach())
    qm2 = quant.quantize_model(r20, quant.uniform_config(r20, 5), init="mse", per_channel=False)
    assert torch.equal(quant.quantize_weight(w, 5, per_channel=False, method="mse"),
                       qm2.layer2[0].conv1.quantized_weight().detach())


def test_bad_bits_and_options_raise() -> None:
    with pytest.raises(BitConfigError, match=r"unsupported bits 9"):
        quant.weight_qrange(9)
    with pytest.raises(BitConfigError, match=r"unsupported bits 1"):
        LSQQuantizer(1, signed=True)
    with pytest.raises(BitConfigError, match=r"unknown init method 'minmax'"):
        quant.init_step(torch.randn(4, 4), 4, method="minmax")
    with pytest.raises(BitConfigError, match=r"unknown reinit 'foo'"):
        LSQQuantizer(4, signed=True).set_bits(3, reinit="foo")
    with pytest.raises(BitConfigError, match=r"unknown quant backend 'cuda'"):
        quant.set_backend("cuda")


# ------------------------------------------------------------------------------------------
# set_bits (precision transitions)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("signed", [True, False])
def test_set_bits_range_preserves_clipping_range(signed: bool) -> None:
    q = _fixed_quantizer(8, signed, [0.01, 0.02, 0.04], per_channel=True)
    step_param = q.step
    before = q.step.detach() * q.qp
    q.set_bits(3, reinit="range")
    assert q.bits == 3 and q.step is step_param  # in place: an optimizer keeps working
    assert torch.allclose(q.step.detach() * q.qp, before)
    q.set_bits(5)
    assert torch.allclose(q.step.detach() * q.qp, before)


def test_set_bits_data_reinit_and_lazy_reinit() -> None:
    torch.manual_seed(0)
    w = torch.randn(4, 18)
    q = LSQQuantizer(8, signed=True, per_channel=True, channels=4, is_weight=True)
    q.initialize(w)
    q.set_bits(2, reinit="mse", x=w)
    assert torch.equal(q.step.detach(), quant.init_step(w, 2, method="mse"))
    q.set_bits(4, reinit="lsq")           # no data: re-init from the next forward
    assert not bool(q.initialized)
    q(w)
    assert bool(q.initialized)
    assert torch.equal(q.step.detach(), quant.init_step(w, 4, method="lsq"))


def test_set_bit_config_on_model(r20: nn.Module) -> None:
    qm = quant.quantize_model(r20, quant.uniform_config(r20, 8), a_bits=4)
    target = quant.uniform_config(r20, 4)
    s_before = qm.layer1[0].conv1.weight_quantizer.step.detach().clone()
    quant.set_bit_config(qm, target, policy="first_last_8")
    assert quant.bit_config_of(qm) == target
    assert torch.allclose(qm.layer1[0].conv1.weight_quantizer.step.detach() * 7, s_before * 127)


# ------------------------------------------------------------------------------------------
# Bit configs
# ------------------------------------------------------------------------------------------
def test_fixed_and_uniform_config(r20: nn.Module) -> None:
    assert quant.fixed_layers(r20, "first_last_8") == {"conv1": 8, "linear": 8}
    assert quant.fixed_layers(r20, "none") == {}
    cfg = quant.uniform_config(r20, 4)
    assert len(cfg) == 20 and cfg["conv1"] == 8 and cfg["linear"] == 8
    assert cfg["layer2.0.conv1"] == 4
    assert set(quant.uniform_config(r20, 2, policy="none").values()) == {2}
    quant.validate_bit_config(r20, cfg)  # valid: no exception
    assert quant.validate_bit_config(r20, cfg, raise_errors=False) == []


@pytest.mark.parametrize("key,value,message", [
    ("layer9.conv", 4, r"unknown layer 'layer9.conv'"),
    ("layer1.0.conv1", 1, r"layer 'layer1.0.conv1': unsupported bits 1"),
    ("layer1.0.conv1", 9, r"layer 'layer1.0.conv1': unsupported bits 9"),
    ("layer1.0.conv1", 3.5, r"layer 'layer1.0.conv1': unsupported bits 3.5"),
    ("layer1.0.conv1", "4", r"layer 'layer1.0.conv1': unsupported bits '4'"),
    ("layer1.0.conv1", True, r"layer 'layer1.0.conv1': unsupported bits True"),
    ("conv1", 4, r"layer 'conv1': policy 'first_last_8' fixes .* got 4; set it to 8"),
    ("linear", 2, r"layer 'linear': policy 'first_last_8' fixes .* got 2"),
])
def test_validate_bit_config_errors(r20: nn.Module, key: str, value, message: str) -> None:
    cfg = dict(quant.uniform_config(r20, 4))
    cfg[key] = value
    with pytest.raises(BitConfigError, match=message):
        quant.validate_bit_config(r20, cfg)
    with pytest.raises(BitConfigError, match=message):
        quant.quantize_model(r20, cfg)


def test_validate_missing_layer_and_policy(r20: nn.Module) -> None:
    cfg = quant.uniform_config(r20, 4)
    del cfg["layer3.2.conv2"]
    with pytest.raises(BitConfigError, match=r"missing layer 'layer3.2.conv2'"):
        quant.validate_bit_config(r20, cfg)
    errors = quant.validate_bit_config(r20, {**cfg, "bogus": 4}, raise_errors=False)
    assert len(errors) == 2
    with pytest.raises(BitConfigError, match=r"unknown policy 'first_last_4'"):
        quant.uniform_config(r20, 4, policy="first_last_4")
    with pytest.raises(BitConfigError, match=r"must be a dict"):
        quant.validate_bit_config(r20, [4] * 20)
    # the conflict disappears under policy none
    quant.validate_bit_config(r20, quant.uniform_config(r20, 4, policy="none"), policy="none")


def test_config_json_roundtrip_and_errors(r20: nn.Module, tmp_path) -> None:
    cfg = quant.uniform_config(r20, 3)
    path = tmp_path / "cfg.json"
    quant.save_config(cfg, path)
    loaded = quant.load_config(path)
    assert loaded == cfg and list(loaded) == list(cfg)
    path.write_text('{"conv1": 8, "layer1.0.conv1": "4"}')
    with pytest.raises(BitConfigError, match=r"layer 'layer1.0.conv1': unsupported bits '4'"):
        quant.load_config(path)
    path.write_text('[8, 4]')
    with pytest.raises(BitConfigError, match=r"must be a JSON object"):
        quant.load_config(path)
    path.write_text('{"conv1": 8,')
    with pytest.raises(BitConfigError, match=r"not valid JSON"):
        quant.load_config(path)
    with pytest.raises(BitConfigError, match=r"layer 'conv1': unsupported bits 1"):
        quant.save_config({"conv1": 1}, tmp_path / "bad.json")


# ------------------------------------------------------------------------------------------
# quantize_model
# ------------------------------------------------------------------------------------------
def test_quantize_model_leaves_original_untouched(r20: nn.Module) -> None:
    before = {k: v.clone() for k, v in r20.state_dict().items()}
    types_before = [type(m) for m in r20.modules()]
    qm = quant.quantize_model(r20, quant.uniform_config(r20, 4), a_bits=4)
    qm.train()
    opt = torch.optim.SGD(qm.parameters(), lr=0.1)
    qm(torch.randn(8, 3, 32, 32)).sum().backward()
    opt.step()
    assert [type(m) for m in r20.modules()] == types_before
    after = r20.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not quant.is_quantized(r20)
    # weights/bias/BN carried over; BN kept as BatchNorm2d
    qm2 = quant.quantize_model(r20, quant.uniform_config(r20, 4), a_bits=4)
    assert isinstance(qm2.layer1[0].conv1, quant.QConv2d) and isinstance(qm2.linear, quant.QLinear)
    assert type(qm2.layer1[0].bn1) is nn.BatchNorm2d
    assert torch.equal(qm2.linear.bias, r20.linear.bias)
    assert torch.equal(qm2.layer1[0].bn1.running_var, r20.layer1[0].bn1.running_var)
    assert qm2.linear.weight is not r20.linear.weight
    with pytest.raises(BitConfigError, match=r"already quantized"):
        quant.quantize_model(qm2, quant.uniform_config(r20, 4))


def test_first_layer_input_quantizer(r20: nn.Module) -> None:
    qm = quant.quantize_model(r20, quant.uniform_config(r20, 4), a_bits=4)
    assert qm.conv1.act_quantizer.signed and qm.conv1.act_quantizer.bits == 8
    assert not qm.layer1[0].conv1.act_quantizer.signed and qm.layer1[0].conv1.a_bits == 4
    assert qm.linear.a_bits == 4 and qm.linear.w_bits == 8
    qn = quant.quantize_model(r20, quant.uniform_config(r20, 2, policy="none"), a_bits=2,
                              policy="none")
    assert qn.conv1.act_quantizer.signed and qn.conv1.a_bits == 2 and qn.conv1.w_bits == 2
    qw = quant.quantize_model(r20, quant.uniform_config(r20, 4), a_bits=None)
    assert qw.conv1.act_quantizer is None and len(quant.quantizer_parameters(qw)) == 20


def test_lazy_activation_init_and_calibration() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
    qm = quant.quantize_model(model, {"0": 8, "2": 4}, a_bits=4, policy="none")
    act = qm[2].act_quantizer
    assert not bool(act.initialized)
    x = torch.randn(5, 3, 8, 8)
    qm.eval()
    with pytest.warns(UserWarning, match=r"not initialised.*calibrate_activations"):
        y = qm(x)
    assert not bool(act.initialized)
    qm.train()
    qm(x)
    assert bool(act.initialized)
    h = torch.relu(qm[0](x)).detach()
    assert torch.allclose(act.step.detach(), quant.init_step(h, 4, signed=False,
                                                             per_channel=False))
    # calibration: step = mean of the per-batch estimates; BN/mode untouched
    xs = [torch.randn(5, 3, 8, 8), 3 * torch.randn(5, 3, 8, 8)]
    qm2 = quant.quantize_model(model, {"0": 8, "2": 4}, a_bits=4, policy="none")
    qm2.train()
    quant.calibrate_activations(qm2, [(xb, None) for xb in xs])
    assert qm2.training
    est = [quant.init_step(xb, 4, signed=True, per_channel=False) for xb in xs]
    assert torch.allclose(qm2[0].act_quantizer.step.detach(), (est[0] + est[1]) / 2)
    # later layers are calibrated on the outputs of the already-quantized earlier layers
    qm3 = quant.quantize_model(model, {"0": 8, "2": 4}, a_bits=4, policy="none")
    quant.calibrate_activations(qm3, xs[:1])
    with torch.no_grad():
        h = torch.relu(qm3[0](xs[0]))
    assert torch.equal(qm3[2].act_quantizer.step.detach(),
                       quant.init_step(h, 4, signed=False, per_channel=False))
    with pytest.raises(ValueError, match=r"no batches given"):
        quant.calibrate_activations(qm3, [])
    assert y.shape == (5, 2, 6, 6)


def test_parameter_groups(r20: nn.Module) -> None:
    qm = quant.quantize_model(r20, quant.uniform_config(r20, 4), a_bits=4)
    steps = quant.quantizer_parameters(qm)
    rest = quant.weight_parameters(qm)
    assert len(steps) == 40
    assert {id(p) for p in steps}.isdisjoint(id(p) for p in rest)
    assert len(steps) + len(rest) == len(list(qm.parameters()))
    assert sum(p.numel() for p in steps) == W_STEPS + A_STEPS


def test_state_dict_roundtrip_restores_initialized_and_bits(r20: nn.Module) -> None:
    cfg = quant.uniform_config(r20, 4)
    qm = quant.quantize_model(r20, cfg, a_bits=4)
    quant.calibrate_activations(qm, [torch.randn(4, 3, 32, 32)])
    quant.set_bit_config(qm, quant.uniform_config(r20, 3))   # a precision transition
    fresh = quant.quantize_model(r20, cfg, a_bits=4)
    fresh.load_state_dict(qm.state_dict())
    assert fresh.layer1[0].conv1.act_quantizer._init_flag
    assert quant.bit_config_of(fresh) == quant.uniform_config(r20, 3)
    # state dicts from before the bit_width buffer still load (strict) and keep the model's bits
    old = {k: v for k, v in qm.state_dict().items() if not k.endswith(".bit_width")}
    fresh2 = quant.quantize_model(r20, cfg, a_bits=4)
    fresh2.load_state_dict(old)
    assert quant.bit_config_of(fresh2) == cfg
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(fresh.eval()(x), qm.eval()(x))


# ------------------------------------------------------------------------------------------
# Accounting (HAWQ-V3)
# ------------------------------------------------------------------------------------------
def test_resnet20_layer_sizes(r20: nn.Module) -> None:
    assert N_PARAMS == 269_722
    assert sum(p.numel() for p in r20.parameters()) == N_PARAMS
    layers = quant._layers(r20)
    assert sum(i.n_params for i in layers) == N_WEIGHTS
    assert sum(i.macs for i in layers) == MACS == 40_551_040


def test_fp32_size_and_bops(r20: nn.Module) -> None:
    assert quant.fp32_size_mb(r20) == pytest.approx(4 * 269_722 / MB)
    assert quant.model_size_mb(r20) == pytest.approx(1.028907776)
    assert quant.bops(r20) == MACS * 32 * 32
    assert quant.compression_ratio(r20) == pytest.approx(1.0)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_uniform_size_policy_none(r20: nn.Module, bits: int) -> None:
    cfg = quant.uniform_config(r20, bits, policy="none")
    other = BN_PARAMS + FC_BIAS + W_STEPS + A_STEPS
    expected = (N_WEIGHTS * bits / 8 + 4 * other) / MB
    assert quant.model_size_mb(r20, cfg, a_bits=4) == pytest.approx(expected, rel=1e-12)
    assert quant.compression_ratio(r20, cfg, a_bits=4) == pytest.approx(
        4 * N_PARAMS / (N_WEIGHTS * bits / 8 + 4 * other), rel=1e-12)
    # weight-only quantization has no activation steps
    assert quant.model_size_mb(r20, cfg) == pytest.approx(
        (N_WEIGHTS * bits / 8 + 4 * (other - A_STEPS)) / MB, rel=1e-12)
    # one step per layer when per-tensor
    assert quant.model_size_mb(r20, cfg, a_bits=4, per_channel=False) == pytest.approx(
        (N_WEIGHTS * bits / 8 + 4 * (BN_PARAMS + FC_BIAS + 20 + A_STEPS)) / MB, rel=1e-12)
    assert quant.bops(r20, cfg, a_bits=bits, policy="none") == MACS * bits * bits
    # the quantized model reports the same size and BOPs from its own quantizers
    qm = quant.quantize_model(r20, cfg, a_bits=bits, policy="none")
    assert quant.model_size_mb(qm) == pytest.approx(expected, rel=1e-12)
    assert quant.bops(qm) == MACS * bits * bits
    assert quant.fp32_size_mb(qm) == pytest.approx(quant.fp32_size_mb(r20))


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_uniform_size_first_last_8(r20: nn.Module, bits: int) -> None:
    cfg = quant.uniform_config(r20, bits)
    other = BN_PARAMS + FC_BIAS + W_STEPS + A_STEPS
    wbytes = (CONV1 + FC) * 8 / 8 + (N_WEIGHTS - CONV1 - FC) * bits / 8
    assert quant.model_size_mb(r20, cfg, a_bits=4) == pytest.approx((wbytes + 4 * other) / MB,
                                                                     rel=1e-12)
    # first layer: 8-bit weights x 8-bit (signed image) input; last: 8-bit weights x a_bits
    expected_bops = (MACS_CONV1 * 8 * 8 + MACS_FC * 8 * 4
                     + (MACS - MACS_CONV1 - MACS_FC) * bits * 4)
    assert quant.bops(r20, cfg, a_bits=4) == expected_bops
    qm = quant.quantize_model(r20, cfg, a_bits=4)
    assert quant.bops(qm) == expected_bops
    assert quant.model_size_mb(qm) == pytest.approx((wbytes + 4 * other) / MB, rel=1e-12)


def test_accounting_rejects_bad_config(r20: nn.Module) -> None:
    cfg = quant.uniform_config(r20, 4)
    cfg["layer1.0.conv1"] = 10
    with pytest.raises(BitConfigError, match=r"layer 'layer1.0.conv1': unsupported bits 10"):
        quant.model_size_mb(r20, cfg)
    with pytest.raises(BitConfigError, match=r"a_bits: unsupported bits 1"):
        quant.bops(r20, quant.uniform_config(r20, 4), a_bits=1)


def test_other_input_sizes_and_model_types() -> None:
    """A model that only accepts 1x28x28 inputs: pass input_size wherever order/MACs matter."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
    size = (1, 1, 28, 28)
    with pytest.raises(RuntimeError):
        quant.uniform_config(model, 4)  # the default 3x32x32 probe does not fit this model
    cfg = quant.uniform_config(model, 4, input_size=size)
    assert cfg == {"0": 8, "3": 8}
    qm = quant.quantize_model(model, {"0": 8, "3": 8}, a_bits=4, input_size=size)
    quant.calibrate_activations(qm, [torch.randn(4, 1, 28, 28)])
    assert qm(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    macs0, macs3 = 26 * 26 * 36, 4 * 26 * 26 * 10
    assert quant.bops(qm, input_size=size) == macs0 * 8 * 8 + macs3 * 8 * 4
    assert quant.bops(model, cfg, a_bits=4, input_size=size) == macs0 * 8 * 8 + macs3 * 8 * 4
    # size needs no probe for a quantized model; 4 + 10 weight steps, 2 activation steps
    n_other = 4 + 10 + 4 + 10 + 2
    assert quant.model_size_mb(qm) == pytest.approx((36 + 4 * 26 * 26 * 10 + 4 * n_other) / MB)
    assert quant.model_size_mb(model, cfg, a_bits=4, input_size=size) == pytest.approx(
        quant.model_size_mb(qm))
