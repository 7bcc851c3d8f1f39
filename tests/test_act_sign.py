"""Activation sign from calibration (hmqat.quant act_sign="auto", docs/method.md §2).

A quantizer that assumes post-ReLU inputs clamps every negative input to 0. On nets whose
quantized layers see negative inputs (MobileNetV2's expand convs after the linear-bottleneck
residual adds, GELU/LayerNorm nets) "auto" must switch those quantizers to a signed range, while
a ReLU ResNet must keep exactly the unsigned quantizers it had (bit for bit).
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch import nn

from hmqat import export, quant
from hmqat.models import create_model
from hmqat.quant import LSQQuantizer


def _batches(shape: tuple[int, ...], n: int = 2, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


class _GeluLayerNormNet(nn.Module):
    """A ConvNeXt/ViT-like toy: patch conv → LayerNorm → Linear-GELU-Linear MLP → mean → head."""

    def __init__(self, dim: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.norm(self.patch(x).flatten(2).transpose(1, 2))
        t = t + self.fc2(nn.functional.gelu(self.fc1(t)))
        return self.head(t.mean(1))


def _quantize(model: nn.Module, act_sign: str, size: tuple[int, ...],
              batches: list[torch.Tensor]) -> tuple[nn.Module, list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qm = quant.quantize_model(model, quant.uniform_config(model, 4, input_size=size),
                                  a_bits=4, act_sign=act_sign, input_size=size)
        quant.calibrate_activations(qm, batches)
    return qm, [w for w in caught if "clamps" in str(w.message)]


@pytest.mark.parametrize("name", ["mobilenet_v2", "gelu_layernorm"])
def test_no_layer_clamps_negatives_under_auto(name: str) -> None:
    torch.manual_seed(0)
    if name == "mobilenet_v2":
        model, size = torchvision.models.mobilenet_v2(weights=None, num_classes=10), (1, 3, 32, 32)
    else:
        model, size = _GeluLayerNormNet(), (1, 3, 16, 16)
    batches = _batches((4,) + size[1:])
    legacy, warned = _quantize(model, "unsigned", size, batches)
    before = quant.clamped_negative_fraction(legacy, batches)
    n_bad = sum(f > quant.NEG_TOLERANCE for f in before.values())
    assert n_bad >= (10 if name == "mobilenet_v2" else 2)   # the fault the issue reports
    assert len(warned) >= n_bad      # one warning per layer whose FP inputs it would clamp
    auto, warned = _quantize(model, "auto", size, batches)
    after = quant.clamped_negative_fraction(auto, batches)
    assert max(after.values()) <= quant.NEG_TOLERANCE and not warned
    signed = {n for n, m in quant.quantized_layers(auto).items() if m.act_quantizer.signed}
    assert {n for n, f in before.items() if f > quant.NEG_TOLERANCE} <= signed


def test_relu_resnet_unchanged_bit_for_bit() -> None:
    """auto == the post-ReLU quantizers (act_sign="unsigned"): steps, outputs, gradients."""
    torch.manual_seed(0)
    fp = create_model("resnet20")
    cfg = quant.uniform_config(fp, 4)
    x = _batches((8, 3, 32, 32))
    runs = {}
    for mode in ("auto", "unsigned"):
        qm = quant.quantize_model(fp, cfg, a_bits=4, init="mse", act_sign=mode)
        quant.calibrate_activations(qm, x[:1])
        qm.train()
        qm(x[1]).square().mean().backward()
        grads = [p.grad for p in qm.parameters()]
        runs[mode] = (qm.state_dict(), qm.eval()(x[0]).detach(), grads)
        signs = [m.act_quantizer.signed for m in quant.quantized_layers(qm).values()]
        assert sum(signs) == 1   # only the image input of conv1
    (sa, ya, ga), (su, yu, gu) = runs["auto"], runs["unsigned"]
    assert torch.equal(ya, yu)
    assert sa.keys() == su.keys() and all(torch.equal(sa[k], su[k]) for k in sa)
    assert all(torch.equal(a, b) for a, b in zip(ga, gu))


def test_sign_survives_state_dict_and_packed_export(tmp_path) -> None:
    torch.manual_seed(0)
    model, size = _GeluLayerNormNet(), (1, 3, 16, 16)
    batches = _batches((4, 3, 16, 16))
    qm, _ = _quantize(model, "auto", size, batches)
    signs = {n: m.act_quantizer.signed for n, m in quant.quantized_layers(qm).items()}
    assert sum(signs.values()) >= 3
    fresh = quant.quantize_model(model, quant.bit_config_of(qm), a_bits=4, input_size=size)
    fresh.load_state_dict(qm.state_dict())
    assert {n: m.act_quantizer.signed for n, m in quant.quantized_layers(fresh).items()} == signs
    export.save_packed(qm, tmp_path / "m.hmq")
    back = export.load_packed(tmp_path / "m.hmq", model)
    with torch.no_grad():
        assert torch.equal(back(batches[0]), qm.eval()(batches[0]))


def test_refresh_quantizers_adopts_a_broadcast_sign() -> None:
    """DDP's constructor overwrites buffers in place; refresh_quantizers re-reads the sign."""
    from hmqat import distributed as hdist

    q = LSQQuantizer(4, signed=False, auto_sign=True)
    q.is_signed.fill_(True)                      # what a broadcast from rank 0 would do
    hdist.refresh_quantizers(q)
    assert q.signed and (q.qn, q.qp) == (-8, 7)
