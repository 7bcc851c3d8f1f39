"""Hostile inputs to hmqat.hessian (issue 28, items 7 and 10): one estimand, checked up front.

``layer_traces`` returns the trace of the Hessian of the *mean* loss over the calibration images,
on both paths (exact Gauss-Newton and Hutchinson) and for any micro-batching. The reference
here is an explicit Hessian: torch.autograd.functional.hessian of the criterion over the whole
calibration set in one call, in float64. A criterion that is not a per-sample mean (summed,
class-weighted) and a model with a NaN weight are refused before anything is measured.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hmqat import hessian
from hmqat.hessian import HessianError, layer_traces

LAYERS = ["gate", "conv", "fc"]


class GateNet(nn.Module):
    """1×1 conv with ONE weight ("gate"), 3×3 conv, ReLUs, global average pool, linear (4
    classes), float64. With probe="layer" a Rademacher probe of "gate" is ±1, so each probe
    value vᵀH_bv is H_b exactly: the Hutchinson estimate of that layer is Σ_b w_b H_b with no
    probe noise, which pins the estimand of the probe path exactly, micro-batch by micro-batch."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.gate = nn.Conv2d(1, 1, 1)
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.fc = nn.Linear(3, 4)
        with torch.no_grad():
            self.gate.weight.fill_(0.9)
            self.gate.bias.fill_(0.3)
        self.double()

    def forward(self, x):
        x = F.relu(self.gate(x))
        x = F.relu(self.conv(x))
        return self.fc(x.mean((2, 3)))


def calib(sizes=(20, 5, 3), seed=0):
    """Calibration batches of [n, 1, 4, 4] images, 4 classes; 20 > 16 so that micro_batch None
    and 16 differ."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64),
             torch.randint(0, 4, (n,), generator=g)) for n in sizes]


def explicit_traces(model, batches, loss_of_all, names=LAYERS):
    """Tr(H_ii) of ``loss_of_all(logits of every image, every label)``: one call over the whole
    calibration set, its Hessian in the flattened weights of ``names`` from
    torch.autograd.functional.hessian (eval mode)."""
    model.eval()
    state = {k: v.detach() for k, v in {**dict(model.named_parameters()),
                                        **dict(model.named_buffers())}.items()}
    keys = [f"{n}.weight" for n in names]
    sizes = [state[k].numel() for k in keys]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])

    def loss(flat):
        s, off = dict(state), 0
        for k, n in zip(keys, sizes):
            s[k] = flat[off:off + n].view(state[k].shape)
            off += n
        return loss_of_all(torch.func.functional_call(model, s, (x,)), y)

    H = torch.autograd.functional.hessian(loss, torch.cat([state[k].reshape(-1) for k in keys]))
    out, off = [], 0
    for n in sizes:
        out.append(float(H[off:off + n, off:off + n].trace()))
        off += n
    return np.array(out)


def _quiet(**kw):
    return {"progress": False, **kw}


# --------------------------------------------------------------------------------------------
# One estimand: the mean loss's Hessian, on both paths, for every micro-batching
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("micro_batch", [None, 16, 4, 1])
def test_both_paths_measure_the_mean_loss_hessian_for_any_micro_batch(micro_batch):
    model, batches = GateNet(), calib()
    exact = explicit_traces(model, batches, F.cross_entropy)       # mean over all 28 images
    # the sum-reduced loss over the whole set is N × the mean loss (the "70.02" kind)
    total = explicit_traces(model, batches, lambda z, y: F.cross_entropy(z, y, reduction="sum"))
    np.testing.assert_allclose(total / 28, exact, rtol=1e-12)
    gn = layer_traces(model, batches, **_quiet(method="gauss_newton", micro_batch=micro_batch))
    np.testing.assert_allclose(gn["trace"].to_numpy(), exact, rtol=1e-9)
    hu = layer_traces(model, batches, **_quiet(method="hutchinson", micro_batch=micro_batch,
                                               tol=0.05, max_probes=400, seed=1))
    # the one-weight layer has no probe noise: the stratified estimate IS the estimand
    assert hu.loc["gate", "rel_se"] < 1e-12        # equal probe values (the mean's last bit)
    assert hu.loc["gate", "trace"] == pytest.approx(exact[0], rel=1e-12)
    se = (hu["avg_trace_se"] * hu["n_params"]).to_numpy()[1:]
    assert (np.abs(hu["trace"].to_numpy()[1:] - exact[1:]) < 3 * se).all(), (hu, exact)
    # micro_batch=None means the caller's batches, unsplit, on both paths
    n_chunks = {None: 3, 16: 4, 4: 5 + 2 + 1, 1: 28}[micro_batch]
    assert gn.attrs["micro_batch"] == hu.attrs["micro_batch"] == micro_batch
    assert gn.attrs["n_batches"] == hu.attrs["n_batches"] == n_chunks


def test_a_label_smoothed_mean_loss_is_accepted_and_exact():
    """A per-sample mean that is not plain CE (the generic Λ path) passes the check and gives
    the explicit Hessian; its cache key differs from plain CE's (repr hides label_smoothing)."""
    model, batches = GateNet(), calib()
    smooth = nn.CrossEntropyLoss(label_smoothing=0.2)
    exact = explicit_traces(model, batches, smooth)
    gn = layer_traces(model, batches, **_quiet(method="gauss_newton", criterion=smooth))
    np.testing.assert_allclose(gn["trace"].to_numpy(), exact, rtol=1e-9)
    assert hessian._describe(nn.CrossEntropyLoss()) == "CrossEntropyLoss()"  # old keys kept
    assert hessian._describe(smooth) == 'CrossEntropyLoss() {"label_smoothing": 0.2}'


# --------------------------------------------------------------------------------------------
# Criteria that are not a per-sample mean: refused on every path, naming the loss and the fix
# --------------------------------------------------------------------------------------------
def _no_measuring(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("measured despite a refused input")
    monkeypatch.setattr(hessian, "_estimate", fail)
    monkeypatch.setattr(hessian, "_gn_check", fail)


CE_FIX = r"pass nn\.CrossEntropyLoss\(\) \(reduction='mean', no class weights\)"


@pytest.mark.parametrize("method", ["auto", "gauss_newton", "hutchinson"])
@pytest.mark.parametrize("criterion, match", [
    (nn.CrossEntropyLoss(reduction="sum"),
     r"layer_traces: criterion nn\.CrossEntropyLoss\(reduction='sum'\) is not a per-sample mean "
     r"loss, and the traces are those of the mean loss over the calibration images "
     r"\(docs/design\.md §3\.2\): reduction='sum': it sums over the samples, so each "
     r"micro-batch's Hessian would be its size times the mean's and the result would depend on "
     r"micro_batch; " + CE_FIX),
    (nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)),
     r"criterion nn\.CrossEntropyLoss\(weight=<\[4\] sha256:[0-9a-f]{12}>\) is not a per-sample "
     r"mean loss.*its class weights make it the weighted mean Σ w_y·ℓ / Σ w_y, whose normaliser "
     r"depends on each micro-batch's labels.*" + CE_FIX),
    (nn.NLLLoss(reduction="none"), r"nn\.NLLLoss\(reduction='none'\).*reduction='none': it "
     r"returns one loss per sample.*pass nn\.NLLLoss\(\) \(reduction='mean', no class weights\)"),
    (nn.MSELoss(reduction="sum"), r"reduction='sum'.*pass nn\.MSELoss\(reduction='mean'\)"),
])
def test_non_mean_loss_modules_are_refused_before_measuring(monkeypatch, method, criterion,
                                                              match):
    _no_measuring(monkeypatch)
    with pytest.raises(HessianError, match=match) as info:
        layer_traces(GateNet(), calib(), **_quiet(method=method, criterion=criterion))
    assert not isinstance(info.value, hessian.NotPiecewiseLinearError)   # the loss is the cause


def sum_ce(z, y):
    return F.cross_entropy(z, y, reduction="sum")


def weighted_ce(z, y):
    return F.cross_entropy(z, y, weight=torch.tensor([1.0, 5.0, 1.0, 1.0], dtype=z.dtype))


def per_sample(z, y):
    return F.cross_entropy(z, y, reduction="none")


@pytest.mark.parametrize("criterion, match", [
    (sum_ce, r"criterion sum_ce is not a per-sample mean loss.*on the first 8 images it gives "
             r"[0-9.]+, the mean of its per-sample values is [0-9.]+: it sums over the samples; "
             r"pass a criterion that returns the mean over the batch of per-sample losses"),
    (weighted_ce, r"criterion weighted_ce .*: it is not the mean of its per-sample values \(a "
                  r"weighted mean, or a loss that couples the samples\)"),
    (per_sample, r"criterion per_sample .*: it returns \[8\] for 8 images, not one number"),
])
def test_non_mean_plain_functions_are_refused_by_the_numeric_check(monkeypatch, criterion,
                                                                   match):
    _no_measuring(monkeypatch)
    with pytest.raises(HessianError, match=match):
        layer_traces(GateNet(), calib(), **_quiet(criterion=criterion))
    with pytest.raises(HessianError, match="gauss_newton_traces: " + match):
        hessian.gauss_newton_traces(GateNet(), calib(), criterion=criterion)


def test_gauss_newton_refusal_for_a_smooth_model_names_the_checked_loss():
    torch.manual_seed(0)
    smooth = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 5, generator=g, dtype=torch.float64),
                torch.randint(0, 3, (8,), generator=g))]
    with pytest.raises(hessian.NotPiecewiseLinearError,
                       match=r"layer '0': vᵀHv = .* but the Gauss-Newton part vᵀGv = .* of the "
                             r"loss nn\.CrossEntropyLoss\(\) \(a per-sample mean, checked\); the "
                             r"logits are not piecewise linear in this layer's weights"):
        layer_traces(smooth, batches, **_quiet(method="gauss_newton"))


# --------------------------------------------------------------------------------------------
# method="auto" falls back to the probes with a warning that says why
# --------------------------------------------------------------------------------------------
def test_auto_fallback_warns_why(monkeypatch):
    torch.manual_seed(0)
    smooth = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 5, generator=g, dtype=torch.float64),
                torch.randint(0, 3, (8,), generator=g))]
    with pytest.warns(UserWarning, match=r"layer_traces\(method='auto'\): using Hutchinson probes "
                                         r"\(an estimate with a standard error, not the exact "
                                         r"traces\) because the Gauss-Newton check failed: "
                                         r"layer '0'.*not piecewise linear"):
        df = layer_traces(smooth, batches, **_quiet(tol=0.5))
    assert df.attrs["method"] == "hutchinson"
    monkeypatch.setattr(hessian, "GN_AUTO_MAX_OUTPUTS", 3)       # GateNet has 4 outputs
    with pytest.warns(UserWarning, match=r"because the model has 4 outputs > GN_AUTO_MAX_OUTPUTS "
                                         r"= 3, where the exact form .* costs more than the "
                                         r"probes\. Pass method='hutchinson'"):
        df = layer_traces(GateNet(), calib(), **_quiet(tol=0.5))
    assert df.attrs["method"] == "hutchinson"
    with warnings.catch_warnings():           # chosen explicitly: no warning
        warnings.simplefilter("error")
        layer_traces(GateNet(), calib(), **_quiet(tol=0.5, method="hutchinson"))


# --------------------------------------------------------------------------------------------
# Non-finite weights and inputs: refused up front, naming the tensor
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["auto", "hutchinson", "gauss_newton"])
def test_a_nan_weight_is_named_before_anything_is_measured(monkeypatch, tmp_path, method):
    _no_measuring(monkeypatch)
    model = GateNet()
    with torch.no_grad():
        model.conv.weight[1, 0, 2, 2] = float("nan")
    with pytest.raises(HessianError,
                       match=r"^layer_traces: the model is not finite: parameter conv\.weight "
                             r"\(1 of 27 values NaN/inf\), so every trace would be NaN; nothing "
                             r"was measured\. Load a finite checkpoint"):
        layer_traces(model, calib(), **_quiet(method=method, cache_dir=tmp_path))
    assert list(tmp_path.iterdir()) == []                          # nothing cached


def test_a_non_finite_bn_statistic_and_gauss_newton_traces():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8, 3)).double()
    model[1].running_var[1] = float("inf")
    batches = [(torch.randn(4, 1, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0]))]
    with pytest.raises(HessianError, match=r"^gauss_newton_traces: the model is not finite: "
                                           r"buffer 1\.running_var \(1 of 2 values NaN/inf\)"):
        hessian.gauss_newton_traces(model, batches)


def test_non_finite_calibration_images_are_named():
    batches = calib()
    batches[1][0][3, 0, 1, 1] = float("nan")
    with pytest.raises(HessianError, match=r"batches\[1\]: x holds 1 NaN/inf of 80 values, so "
                                           r"every trace would be NaN"):
        layer_traces(GateNet(), batches, progress=False)
