"""hmqat.hessian.layer_traces against exact block traces of small nets (docs/design.md §3, Eqs. H1–H4)."""
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hmqat import hessian
from hmqat.hessian import HessianError, layer_traces


# --------------------------------------------------------------------------------------------
# Small nets and their exact Hessians
# --------------------------------------------------------------------------------------------
def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


class TinyCNN(nn.Module):
    """conv-BN-ReLU ×2, global average pool, linear; BN with non-trivial running statistics."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)
        for bn in (self.bn1, self.bn2):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.2, 0.2)
        self.double()

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def orthogonal_mlp(scale: float = 0.3, seed: int = 0) -> nn.Module:
    """8-8-10 tanh MLP with orthogonal W1 and W2 ⟂ 1: near-diagonal Hessian blocks, so the
    Rademacher variance 2·Σ(off-diagonal²) is small enough for a sub-percent check."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 10)).double()
    q1, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    a = torch.randn(10, 8, generator=g, dtype=torch.float64)
    q2, _ = torch.linalg.qr(a - a.mean(0))
    with torch.no_grad():
        model[0].weight.copy_(scale * q1)
        model[2].weight.copy_(scale * q2)
        model[0].bias.zero_()
        model[2].bias.zero_()
    return model


def make_batches(shape, sizes=(16, 16, 8), classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn((n,) + shape, generator=g, dtype=torch.float64),
             torch.randint(0, classes, (n,), generator=g)) for n in sizes]


def exact_block_traces(model, batches, names, criterion=F.cross_entropy):
    """Tr(H_ii) of the size-weighted mean loss, from the full Hessian of the flattened weights
    (torch.autograd.functional.hessian over torch.func.functional_call)."""
    training = model.training
    model.eval()
    state = {k: v.detach() for k, v in {**dict(model.named_parameters()),
                                        **dict(model.named_buffers())}.items()}
    keys = [f"{n}.weight" for n in names]
    shapes = [state[k].shape for k in keys]
    sizes = [state[k].numel() for k in keys]
    total = sum(x.shape[0] for x, _ in batches)

    def loss(flat):
        s, off = dict(state), 0
        for k, shp, n in zip(keys, shapes, sizes):
            s[k] = flat[off:off + n].view(shp)
            off += n
        return sum(criterion(torch.func.functional_call(model, s, (x,)), y) * x.shape[0] / total
                   for x, y in batches)

    H = torch.autograd.functional.hessian(loss, torch.cat([state[k].reshape(-1) for k in keys]))
    model.train(training)
    out, off = [], 0
    for n in sizes:
        out.append(float(H[off:off + n, off:off + n].trace()))
        off += n
    return np.array(out)


# --------------------------------------------------------------------------------------------
# Correctness against the exact traces
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("probe", ["layer", "joint"])
def test_mlp_matches_exact_block_traces_within_3_se(probe):
    model, batches = mlp(), make_batches((5,))
    exact = exact_block_traces(model, batches, ["0", "2"])
    df = layer_traces(model, batches, tol=0.1, max_probes=1000, seed=1, progress=False,
                      probe=probe)
    assert list(df.index) == ["0", "2"]
    assert df.attrs["converged"]
    z = np.abs(df["trace"].to_numpy() - exact) / (df["avg_trace_se"] * df["n_params"]).to_numpy()
    assert (z < 3).all(), (df, exact)
    np.testing.assert_allclose(df["avg_trace"], df["trace"] / df["n_params"])


def test_cnn_with_eval_bn_matches_exact_within_3_se():
    model, batches = TinyCNN(), make_batches((2, 5, 5))
    model.train()   # the estimator must measure in eval mode (BN running statistics)
    exact = exact_block_traces(model, batches, ["conv1", "conv2", "fc"])
    df = layer_traces(model, batches, tol=0.03, max_probes=4000, seed=0, progress=False, method="hutchinson",
                      micro_batch=None)
    se = (df["avg_trace_se"] * df["n_params"]).to_numpy()
    assert df.attrs["converged"] and (df["rel_se"] <= 0.03).all()
    assert (np.abs(df["trace"].to_numpy() - exact) < 3 * se).all(), (df, exact)
    assert model.training and model.bn1.training


def test_many_probes_agree_within_2_percent():
    model, batches = orthogonal_mlp(), make_batches((8,), sizes=(32, 32), classes=10)
    exact = exact_block_traces(model, batches, ["0", "2"])
    df = layer_traces(model, batches, tol=0.006, max_probes=20000, seed=0, progress=False,
                      micro_batch=None)
    assert df.attrs["converged"] and df["samples"].min() > 200
    np.testing.assert_allclose(df["trace"].to_numpy(), exact, rtol=0.02)


def test_micro_batches_do_not_change_the_estimand():
    model, batches = TinyCNN(seed=1), make_batches((2, 5, 5), sizes=(24, 13))
    exact = exact_block_traces(model, batches, ["conv1", "conv2", "fc"])
    df = layer_traces(model, batches, tol=0.02, max_probes=1000, seed=3, progress=False, method="hutchinson",
                      micro_batch=5)
    assert df.attrs["n_batches"] == 5 + 3 and df.attrs["n_samples"] == 37
    assert (df["samples"] == df["probes"] * 8).all()
    se = (df["avg_trace_se"] * df["n_params"]).to_numpy()
    assert (np.abs(df["trace"].to_numpy() - exact) < 3 * se).all(), (df, exact)


# --------------------------------------------------------------------------------------------
# State restore, determinism, cache
# --------------------------------------------------------------------------------------------
def _flags(model):
    return ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()])


def test_restores_modes_and_requires_grad_also_after_an_exception():
    model, batches = TinyCNN(), make_batches((2, 5, 5))
    model.train()
    model.bn2.eval()
    model.conv2.weight.requires_grad_(False)
    model.bn1.bias.requires_grad_(False)
    before = _flags(model)
    layer_traces(model, batches, tol=0.5, seed=0, progress=False)
    assert _flags(model) == before
    assert all(p.grad is None for p in model.parameters())

    def broken(out, y):     # a mean loss for the up-front check (no grad), fails while measuring
        if out.requires_grad:
            raise RuntimeError("boom")
        return F.cross_entropy(out, y)

    with pytest.raises(RuntimeError, match="boom"):
        layer_traces(model, batches, tol=0.5, seed=0, progress=False, criterion=broken,
                     method="hutchinson")
    assert _flags(model) == before


def test_same_seed_same_frame_other_seed_differs_global_rng_untouched():
    model, batches = mlp(), make_batches((5,))
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    a = layer_traces(model, batches, tol=0.1, seed=7, progress=False, method="hutchinson")
    assert torch.equal(torch.get_rng_state(), rng)
    b = layer_traces(model, batches, tol=0.1, seed=7, progress=False, method="hutchinson")
    c = layer_traces(model, batches, tol=0.1, seed=8, progress=False, method="hutchinson")
    pd.testing.assert_frame_equal(a, b)
    assert not np.allclose(a["trace"], c["trace"])
    # a layer's probes depend on (seed, layer name) only, not on the other layers measured
    d = layer_traces(model, batches, layers=["2"], tol=0.1, seed=7, progress=False, method="hutchinson",
                     min_probes=a.loc["2", "probes"], max_probes=a.loc["2", "probes"])
    assert d.loc["2", "trace"] == a.loc["2", "trace"]


def test_cache_hit_returns_identical_frame_without_recomputing(tmp_path, monkeypatch):
    model, batches = mlp(), make_batches((5,))
    first = layer_traces(model, batches, tol=0.2, seed=0, progress=False, cache_dir=tmp_path)
    files = list(tmp_path.glob("traces-*.json"))
    assert len(files) == 1 and first.attrs["cache_key"] in files[0].read_text()

    def no_estimate(*a, **k):
        raise AssertionError("recomputed despite a cache hit")

    monkeypatch.setattr(hessian, "_estimate", no_estimate)
    again = layer_traces(model, batches, tol=0.2, seed=0, progress=False, cache_dir=tmp_path)
    pd.testing.assert_frame_equal(first, again)
    assert again.attrs == first.attrs
    with torch.no_grad():          # other weights, other data or other settings: a miss
        model[0].weight.add_(0.01)
    for kwargs in ({}, {"seed": 1}):
        with pytest.raises(AssertionError, match="recomputed"):
            layer_traces(model, batches, tol=0.2, progress=False, cache_dir=tmp_path, **kwargs)
    assert len(list(tmp_path.glob("*.tmp"))) == 0


# --------------------------------------------------------------------------------------------
# Stopping rule
# --------------------------------------------------------------------------------------------
class Concave(nn.Module):
    """One linear layer under the loss -mean(out²): every block trace is negative."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 3, bias=False).double()

    def forward(self, x):
        return self.fc(x)


def neg_square(out, y):
    return -(out ** 2).sum(1).mean() + 0 * y.sum()


def test_negative_traces_use_abs_in_the_stopping_rule():
    model, batches = Concave(), make_batches((4,), sizes=(8, 8))
    exact = exact_block_traces(model, batches, ["fc"], criterion=neg_square)
    assert exact[0] < 0
    df = layer_traces(model, batches, tol=0.02, max_probes=500, seed=0, progress=False, method="hutchinson",
                      criterion=neg_square, micro_batch=None)
    row = df.loc["fc"]
    assert row["trace"] < 0 and row["rel_se"] > 0
    assert row["rel_se"] == pytest.approx(row["avg_trace_se"] / abs(row["avg_trace"]))
    # without abs() the rule se/mean <= tol would hold at once; here it needed more probes
    assert row["rel_se"] <= 0.02 and row["probes"] > df.attrs["min_probes"]
    assert abs(row["trace"] - exact[0]) < 3 * row["avg_trace_se"] * row["n_params"]


def test_max_probes_stops_unconverged_and_converged_layers_stop_early():
    model, batches = TinyCNN(), make_batches((2, 5, 5))
    df = layer_traces(model, batches, tol=1e-4, max_probes=6, seed=0, progress=False, method="hutchinson",
                      micro_batch=None)
    assert not df.attrs["converged"] and (df["probes"] == 6).all()
    loose = layer_traces(model, batches, tol=0.08, max_probes=500, seed=0, progress=False, method="hutchinson",
                         micro_batch=None)
    assert loose.attrs["converged"]
    assert loose["probes"].nunique() > 1     # each layer stopped when it alone converged
    assert loose.attrs["min_probes"] == 4    # 3 batches: n_batches·(r-1) >= 8 -> r = 4


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------
def test_unknown_layer_name_lists_valid_names():
    model, batches = TinyCNN(), make_batches((2, 5, 5))
    with pytest.raises(HessianError, match=r"unknown layer name\(s\) \['conv9'\].*"
                                           r"\['conv1', 'conv2', 'fc'\]"):
        layer_traces(model, batches, layers=["conv1", "conv9"], progress=False)


@pytest.mark.parametrize("batches, match", [
    ([], r"batches is empty"),
    (torch.zeros(3, 2), r"list of \(x, y\) pairs"),
    ([(torch.zeros(0, 5), torch.zeros(0))], r"batches\[0\].*non-zero"),
    ([(torch.zeros(2, 5), torch.zeros(3))], r"batches\[0\]: x has 2 samples and y has 3"),
    ([torch.zeros(2, 5)], r"batches\[0\] must be an \(x, y\) pair"),
])
def test_bad_batches_raise(batches, match):
    with pytest.raises(HessianError, match=match):
        layer_traces(mlp(), batches, progress=False)


@pytest.mark.parametrize("kwargs, match", [
    ({"tol": 0}, r"tol=0: .* > 0"),
    ({"tol": -0.1}, r"tol=-0.1"),
    ({"tol": float("nan")}, r"tol=nan"),
    ({"max_probes": 1}, r"max_probes=1: need an int >= 2"),
    ({"min_probes": 1}, r"min_probes=1"),
    ({"min_probes": 50, "max_probes": 10}, r"min_probes=50: .*max_probes=10"),
    ({"probe": "all"}, r"probe='all': use one of \('layer', 'joint'\)"),
    ({"micro_batch": 0}, r"micro_batch=0"),
])
def test_bad_settings_raise(kwargs, match):
    with pytest.raises(HessianError, match=match):
        layer_traces(mlp(), make_batches((5,)), progress=False, **kwargs)


# --------------------------------------------------------------------------------------------
# gauss_newton_traces: exact traces for piecewise-linear nets (Eqs. H5–H7)
# --------------------------------------------------------------------------------------------
def mse_logits(out, y):
    """A non-cross-entropy loss with a PSD Hessian in the logits (the generic Λ path)."""
    return ((out - F.one_hot(y, out.shape[1]).to(out.dtype)) ** 2).mean() * 3


@pytest.mark.parametrize("criterion, micro_batch", [(None, 4), (None, None), (mse_logits, 5)])
def test_gauss_newton_equals_the_exact_block_traces_of_a_relu_bn_net(criterion, micro_batch):
    model, batches = TinyCNN(), make_batches((2, 5, 5), sizes=(6, 5))
    exact = exact_block_traces(model, batches, ["conv1", "conv2", "fc"],
                               criterion=criterion or F.cross_entropy)
    df = hessian.gauss_newton_traces(model, batches, criterion=criterion,
                                     micro_batch=micro_batch)
    np.testing.assert_allclose(df["trace"].to_numpy(), exact, rtol=1e-9)
    assert (df["avg_trace_se"] == 0).all() and (df["probes"] == 0).all()
    assert (df["samples"] == 11).all() and df.attrs["checked"]


def test_gauss_newton_data_se_is_the_spread_of_per_image_traces():
    model, batches = TinyCNN(), make_batches((2, 5, 5), sizes=(3,))
    x, y = batches[0]
    per_image = np.array([exact_block_traces(model, [(x[i:i + 1], y[i:i + 1])], ["conv2"])[0]
                          for i in range(3)])
    df = hessian.gauss_newton_traces(model, batches, layers=["conv2"])
    want = per_image.std(ddof=1) / np.sqrt(3) / df.loc["conv2", "n_params"]
    assert df.loc["conv2", "data_se"] == pytest.approx(want, rel=1e-9)


def test_gauss_newton_projections_are_unbiased_with_an_honest_se():
    model, batches = TinyCNN(), make_batches((2, 5, 5), sizes=(6, 5))
    exact = exact_block_traces(model, batches, ["conv1", "conv2", "fc"])
    df = hessian.gauss_newton_traces(model, batches, projections=8, seed=3)
    se = (df["avg_trace_se"] * df["n_params"]).to_numpy()
    assert (se > 0).all() and (np.abs(df["trace"].to_numpy() - exact) < 3 * se).all()
    again = hessian.gauss_newton_traces(model, batches, projections=8, seed=3)
    pd.testing.assert_frame_equal(df, again)
    other = hessian.gauss_newton_traces(model, batches, projections=8, seed=4)
    assert not np.allclose(other["trace"], df["trace"])


def test_gauss_newton_refuses_a_smooth_net_naming_the_layer():
    with pytest.raises(HessianError, match=r"layer '0'.*not piecewise linear.*layer_traces"):
        hessian.gauss_newton_traces(mlp(), make_batches((5,)))


def test_gauss_newton_accepts_a_saturated_softmax_where_both_sides_are_round_off():
    """Huge logits (every image's softmax one-hot, as after a few steps from random weights):
    vᵀHv and vᵀGv are both ~1e-27, their ratio is noise, and the traces are ~0 either way."""
    model, batches = TinyCNN(), make_batches((2, 5, 5), sizes=(6,))
    with torch.no_grad():
        model.fc.weight.mul_(1e4)
        model.fc.bias.zero_()
    x, y = batches[0]
    y = model(x).argmax(1)          # the saturated class is the label: p ≈ one-hot on y
    df = hessian.gauss_newton_traces(model, [(x, y)])
    assert df.attrs["checked"] and (df["trace"].abs() < 1e-6).all()
    with pytest.raises(HessianError, match="not piecewise linear"):   # a smooth net still fails
        hessian.gauss_newton_traces(mlp(), make_batches((5,)))


@pytest.mark.parametrize("kwargs, match", [
    ({"projections": 1}, "projections=1; use None"),
    ({"micro_batch": 0}, "micro_batch=0; use a positive int"),
    ({"layers": ["conv9"]}, r"unknown layer name\(s\) \['conv9'\]"),
    ({"criterion": neg_square, "check": False}, "not positive semi-definite"),
    ({"stop_rule": lambda df: True}, r"stop_rule needs projections=r"),
])
def test_gauss_newton_bad_inputs_raise(kwargs, match):
    with pytest.raises(HessianError, match=match):
        hessian.gauss_newton_traces(TinyCNN(), make_batches((2, 5, 5), sizes=(6, 5)), **kwargs)


def test_gauss_newton_rounds_double_until_the_stop_rule_holds_then_go_exact():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 32)).double()   # K = 32
    batches = make_batches((5,), sizes=(6, 5), classes=32)
    exact = hessian.gauss_newton_traces(model, batches)
    seen: list[int] = []

    def four(df):                       # stop once 4 probes per image are in
        seen.append(int(df["probes"].max()))
        return seen[-1] >= 4

    df = hessian.gauss_newton_traces(model, batches, projections=2, stop_rule=four, seed=1)
    assert seen == [2, 4] and df.attrs["projections"] == 4 and df.attrs["rounds"] == 2
    assert df.attrs["stopped_by_rule"] and df.attrs["vjps"] == 11 * (2 + 2)
    se = df["avg_trace_se"].to_numpy()
    assert (se > 0).all() and (np.abs(df["avg_trace"] - exact["avg_trace"]) < 4 * se).all()
    never: list[int] = []
    df = hessian.gauss_newton_traces(
        model, batches, projections=2, stop_rule=lambda d: never.append(int(d["probes"].max())))
    # 2, 4, 8 probes per image (8 = K/4); a fourth round would pass K/4: exact instead
    assert never == [2, 4, 8] and df.attrs["projections"] is None and df.attrs["rounds"] == 4
    assert not df.attrs["stopped_by_rule"] and df.attrs["vjps"] == 11 * (2 + 2 + 4 + 32)
    np.testing.assert_allclose(df["trace"], exact["trace"], rtol=1e-12)
    # K = 10 (ResNet-20 on CIFAR-10): 4 probes would pass K/4, so one round of 2, then exact
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 10)).double()
    batches = make_batches((5,), sizes=(6, 5), classes=10)
    never.clear()
    df = hessian.gauss_newton_traces(
        model, batches, projections=2, stop_rule=lambda d: never.append(int(d["probes"].max())))
    assert never == [2] and df.attrs["projections"] is None and df.attrs["rounds"] == 2
    assert df.attrs["vjps"] == 11 * (2 + 10)
    np.testing.assert_allclose(df["trace"], hessian.gauss_newton_traces(model, batches)["trace"],
                               rtol=1e-12)
    # layer_traces hands its stop_rule to the Gauss-Newton path (first round: GN_FIRST_ROUND)
    lt = layer_traces(model, batches, method="auto", stop_rule=lambda d: True, progress=False)
    assert lt.attrs["method"] == "gauss_newton" and lt.attrs["probe"] == "output"
    assert lt.attrs["stopped_by_rule"] and (lt["probes"] == hessian.GN_FIRST_ROUND).all()


def test_layer_traces_method_switch_exact_auto_fallback_and_cache(tmp_path):
    model, batches = TinyCNN(), make_batches((2, 5, 5), sizes=(6, 5))
    exact = exact_block_traces(model, batches, ["conv1", "conv2", "fc"])
    df = layer_traces(model, batches, method="gauss_newton", cache_dir=tmp_path, progress=False)
    np.testing.assert_allclose(df["trace"].to_numpy(), exact, rtol=1e-9)
    assert df.attrs["method"] == "gauss_newton" and df.attrs["converged"]
    assert df.attrs["hvps"] == 0 and (df["probes"] == 0).all()
    hit = layer_traces(model, batches, method="gauss_newton", cache_dir=tmp_path, progress=False)
    pd.testing.assert_frame_equal(hit, df)
    auto = layer_traces(model, batches, method="auto", progress=False)
    np.testing.assert_allclose(auto["trace"].to_numpy(), exact, rtol=1e-9)
    # a tanh net: "auto" falls back to the probes, "gauss_newton" refuses
    smooth, sb = mlp(), make_batches((5,))
    fallback = layer_traces(smooth, sb, method="auto", tol=0.5, progress=False)
    assert fallback.attrs["method"] == "hutchinson" and fallback.attrs["hvps"] > 0
    with pytest.raises(hessian.NotPiecewiseLinearError, match="layer '0'"):
        layer_traces(smooth, sb, method="gauss_newton", progress=False)
    with pytest.raises(HessianError, match="method='exact': use one of"):
        layer_traces(model, batches, method="exact")


def test_gauss_newton_cotangent_blocks_and_auto_with_many_outputs(monkeypatch):
    model, batches = TinyCNN(), make_batches((2, 5, 5), sizes=(6, 5))
    exact = exact_block_traces(model, batches, ["conv1", "conv2", "fc"])
    monkeypatch.setattr(hessian, "GN_MAX_ELEMENTS", 1)      # one cotangent per block
    df = hessian.gauss_newton_traces(model, batches)
    np.testing.assert_allclose(df["trace"].to_numpy(), exact, rtol=1e-9)
    monkeypatch.setattr(hessian, "GN_AUTO_MAX_OUTPUTS", 2)  # 3 logits > 2: probes instead
    auto = layer_traces(model, batches, method="auto", tol=0.5, progress=False)
    assert auto.attrs["method"] == "hutchinson" and auto.attrs["hvps"] > 0
