"""hmqat.sensitivity: the Ω table (docs/design.md §3, Eq. Ω), its variants and the damage validation."""
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hmqat import quant, search, sensitivity
from hmqat.hessian import layer_traces
from hmqat.sensitivity import SensitivityError, omega_table, validate_omega

BITS = (2, 3, 4, 5, 6, 8)


class Net(nn.Module):
    """3 convs + BN + linear; any spatial size (global pooling)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.conv3(x))
        return self.fc(x.mean((2, 3)))


LAYERS = ["conv1", "conv2", "conv3", "fc"]


def traces(values=(0.5, 0.2, 0.1, 0.05)):
    return pd.DataFrame({"avg_trace": list(values), "n_params": [216, 1152, 2304, 160]},
                        index=pd.Index(LAYERS, name="layer"))


def lsq_reference(w, bits):
    """Q_b(w) by hand: s = 2·mean|w|/sqrt(Q_P) per output channel, s·clamp(round(w/s))."""
    qn, qp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    s = 2 * w.abs().reshape(w.shape[0], -1).mean(1) / math.sqrt(qp)
    s = s.view((-1,) + (1,) * (w.dim() - 1))
    return s * torch.clamp(torch.round(w / s), qn, qp)


def batches(n=64, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n // 2, 3, size, size, generator=g), torch.randint(0, 10, (n // 2,),
                                                                          generator=g))
            for _ in range(2)]


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------
def test_joint_is_avg_trace_times_lsq_init_perturbation():
    model, tr = Net(), traces()
    om = omega_table(model, tr, BITS)
    assert list(om.index) == LAYERS and list(om.columns) == list(BITS)
    assert om.attrs["variant"] == "joint"
    for name in LAYERS:
        w = dict(model.named_modules())[name].weight.detach()
        for b in BITS:
            expect = tr.at[name, "avg_trace"] * float((lsq_reference(w, b) - w).pow(2).sum())
            assert om.at[name, b] == pytest.approx(expect, rel=1e-5)


@pytest.mark.parametrize("variant", sensitivity.VARIANTS)
def test_every_variant_is_nonnegative_and_decreases_with_bits(variant):
    model, calib, _ = trained_net()
    om = omega_table(model, traces(), BITS, variant=variant, seed=1, batches=calib)
    values = om.to_numpy()
    assert (values >= 0).all() and np.isfinite(values).all()
    if variant in sensitivity.DATA_VARIANTS:   # anisotropic weights: only the trend is certain
        assert (values[:, 0] > values[:, -1]).all(), om
    else:
        assert (np.diff(values, axis=1) < 0).all(), om


def test_trace_size_is_analytic_noise_of_the_initial_step():
    model, tr = Net(), traces()
    ts = omega_table(model, tr, BITS, variant="trace_size")
    joint = omega_table(model, tr, BITS, variant="joint")
    w = model.conv2.weight.detach()
    for b in BITS:
        step = quant.init_step(w, b, per_channel=True)
        expect = tr.at["conv2", "avg_trace"] * (w[0].numel() * step.pow(2).sum() / 12)
        assert ts.at["conv2", b] == pytest.approx(float(expect), rel=1e-5)
    # rounding noise Δ²/12 per weight approximates the real ||ΔW||² within a factor 2 at 3-6 bits
    ratio = (ts / joint).loc[:, [3, 4, 5, 6]].to_numpy()
    assert ((ratio > 0.5) & (ratio < 2)).all(), ratio


def test_trace_variant_ranks_layers_by_trace_and_quarters_per_bit():
    om = omega_table(Net(), traces(), BITS, variant="trace")
    np.testing.assert_allclose(om[2], traces()["avg_trace"])
    np.testing.assert_allclose(om[3] / om[2], 0.25)
    np.testing.assert_allclose(om[8] / om[6], 1 / 16)


def test_qerr_only_ignores_traces_and_permuted_trace_permutes_them():
    model = Net()
    a = omega_table(model, traces(), BITS, variant="qerr_only")
    b = omega_table(model, traces((1, 1, 1, 1)), BITS, variant="qerr_only")
    pd.testing.assert_frame_equal(a, b)
    r1 = omega_table(model, traces(), BITS, variant="permuted_trace", seed=3)
    r1b = omega_table(model, traces(), BITS, variant="permuted_trace", seed=3)
    pd.testing.assert_frame_equal(r1, r1b)
    implied = (r1[4] / a[4]).to_numpy()            # the trace each layer was given
    assert sorted(implied.round(8)) == sorted(traces()["avg_trace"].round(8))
    others = [omega_table(model, traces(), BITS, variant="permuted_trace", seed=s)
              for s in range(4, 9)]
    assert any(not np.allclose(o.to_numpy(), r1.to_numpy()) for o in others)


@pytest.mark.parametrize("old, new", [("size_only", "qerr_only"), ("random", "permuted_trace")])
def test_old_variant_names_warn_and_give_the_renamed_table(old, new):
    with pytest.warns(DeprecationWarning, match=rf"{old!r} is renamed {new!r}"):
        a = omega_table(Net(), traces(), BITS, variant=old, seed=3)
    b = omega_table(Net(), traces(), BITS, variant=new, seed=3)
    pd.testing.assert_frame_equal(a, b)
    assert a.attrs["variant"] == new


def test_param_size_is_layer_size_times_four_to_the_minus_bits():
    om = omega_table(Net(), None, BITS, variant="param_size")
    n = traces()["n_params"].to_numpy(float)
    for b in BITS:
        np.testing.assert_allclose(om[b].to_numpy(), n * 4.0 ** -(b - 2))


def test_fisher_matches_per_sample_squared_gradients_by_hand():
    model, calib, _ = trained_net()
    om = omega_table(model, None, (2, 4), variant="fisher", batches=calib)
    modules = dict(model.named_modules())
    for name in ("conv2", "fc"):
        w = modules[name].weight
        acc, n = torch.zeros_like(w, dtype=torch.float64), 0
        model.eval()
        for x, y in calib:
            for i in range(x.shape[0]):
                g, = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), w)
                acc += g.double() ** 2
                n += 1
        for b in (2, 4):
            d = (quant.quantize_weight(w.detach(), b) - w.detach()).double()
            assert om.at[name, b] == pytest.approx(float((acc / n * d * d).sum()), rel=1e-4)


def _explicit_block_hessian(model, batches_, name):
    """H_ii of the size-weighted mean loss, by torch.autograd.functional.hessian."""
    from torch.func import functional_call

    w0 = dict(model.named_modules())[name].weight.detach()
    total = sum(x.shape[0] for x, _ in batches_)
    model.eval()

    def loss(flat):
        p = {f"{name}.weight": flat.reshape(w0.shape)}
        return sum(F.cross_entropy(functional_call(model, p, (x,)), y) * x.shape[0] / total
                   for x, y in batches_)

    return torch.autograd.functional.hessian(loss, w0.reshape(-1).double().float())


def test_exact_quad_and_single_layer_predictions_equal_explicit_quadratic_forms():
    model, calib, held_out = trained_net()
    tr = layer_traces(model, calib, tol=0.3, progress=False)
    om = omega_table(model, tr, (2, 3), variant="exact_quad", batches=calib)
    single = sensitivity.single_layer_study(model, tr, calib, held_out, bits=(2, 3),
                                            layers=["conv3", "fc"], progress=False)
    for name in ("conv3", "fc"):
        h = _explicit_block_hessian(model, calib, name).double()
        w = dict(model.named_modules())[name].weight.detach()
        for b in (2, 3):
            d = (quant.quantize_weight(w, b) - w).reshape(-1).double()
            exact = float(d @ h @ d)
            assert om.at[name, b] == pytest.approx(max(exact, 0.0), rel=1e-3, abs=1e-9)
            row = single[(single.layer == name) & (single.bits == b)].iloc[0]
            assert row["pred_quad"] == pytest.approx(0.5 * exact, rel=1e-3, abs=1e-9)
            assert row["pred_trace"] == pytest.approx(
                0.5 * tr.at[name, "avg_trace"] * float(d @ d), rel=1e-6)
            assert row["pred_taylor"] == pytest.approx(row["grad_dot"] + row["pred_quad"])
    # the measured increase is the loss of the model with only that layer quantized
    w = model.fc.weight.detach().clone()
    base = sum(F.cross_entropy(model.eval()(x), y).item() * len(y) for x, y in held_out) / 256
    with torch.no_grad():
        model.fc.weight.copy_(quant.quantize_weight(w, 2))
    q = sum(F.cross_entropy(model(x), y).item() * len(y) for x, y in held_out) / 256
    row = single[(single.layer == "fc") & (single.bits == 2)].iloc[0]
    assert row["measured"] == pytest.approx(q - base, rel=1e-4, abs=1e-7)


def test_data_variants_need_batches():
    with pytest.raises(SensitivityError, match=r"'fisher' needs calibration batches"):
        omega_table(Net(), None, BITS, variant="fisher")


def test_negative_trace_is_clipped_to_zero_with_a_warning():
    with pytest.warns(UserWarning, match=r"negative average trace for \['conv3'\]"):
        om = omega_table(Net(), traces((0.5, 0.2, -0.01, 0.05)), BITS)
    assert (om.loc["conv3"] == 0).all() and (om.loc["conv2"] > 0).all()


def test_works_with_layer_traces_output():
    model = Net()
    tr = layer_traces(model, batches(32), tol=0.5, max_probes=4, progress=False)
    om = omega_table(model, tr, (2, 4, 8))
    assert list(om.index) == list(tr.index) == LAYERS


def test_json_round_trip_is_exact_and_csv_recipe_works(tmp_path):
    om = omega_table(Net(), traces(), BITS, variant="trace_size")
    sensitivity.omega_to_json(om, tmp_path / "omega.json")
    back = sensitivity.omega_from_json(tmp_path / "omega.json")
    pd.testing.assert_frame_equal(om, back)
    assert back.attrs == json.loads(json.dumps(om.attrs))
    om.to_csv(tmp_path / "omega.csv")
    csv = pd.read_csv(tmp_path / "omega.csv", index_col=0)
    csv.columns = [int(c) for c in csv.columns]
    pd.testing.assert_frame_equal(om, csv, check_exact=False, rtol=1e-12, check_names=False)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
def test_unknown_variant():
    with pytest.raises(SensitivityError, match=r"unknown variant 'hawq'; use one of \('joint'"):
        omega_table(Net(), traces(), variant="hawq")


@pytest.mark.parametrize("bits, match", [
    ((2, 9), r"unsupported bits \[9\]"),
    ((1, 4), r"unsupported bits \[1\]"),
    (("4",), r"unsupported bits \['4'\]"),
    ((), r"bits is empty"),
    (4, r"bits=4: pass a sequence"),
])
def test_unsupported_bits(bits, match):
    with pytest.raises(quant.BitConfigError, match=match):
        omega_table(Net(), traces(), bits)


def test_traces_missing_or_foreign_layers():
    tr = traces().drop(index="conv2")
    with pytest.raises(SensitivityError, match=r"missing \['conv2'\], unknown \[\].*layer_traces"):
        omega_table(Net(), tr)
    tr = pd.concat([traces(), pd.DataFrame({"avg_trace": [1.0]}, index=["layer9.conv"])])
    with pytest.raises(SensitivityError, match=r"missing \[\], unknown \['layer9.conv'\]"):
        omega_table(Net(), tr)
    with pytest.raises(SensitivityError, match=r"column 'avg_trace'"):
        omega_table(Net(), traces().rename(columns={"avg_trace": "t"}))


# --------------------------------------------------------------------------------------------
# Validation experiment
# --------------------------------------------------------------------------------------------
def test_sample_configs_span_sizes_and_keep_fixed_layers():
    cfgs = sensitivity.sample_configs(LAYERS, BITS, 40, fixed={"fc": 8}, seed=0)
    assert len(cfgs) == 40 and all(c["fc"] == 8 and set(c) == set(LAYERS) for c in cfgs)
    assert all(set(c.values()) <= set(BITS) for c in cfgs)
    means = [np.mean([c[n] for n in LAYERS[:-1]]) for c in cfgs]
    assert min(means) < 3.5 and max(means) > 6
    assert cfgs == sensitivity.sample_configs(LAYERS, BITS, 40, fixed={"fc": 8}, seed=0)


def trained_net(seed: int = 1, steps: int = 60):
    """Net fitted for a few Adam steps on class prototypes plus noise: (model, calib, held-out)."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(10, 3, 8, 8, generator=g)

    def draw(n):
        y = torch.randint(0, 10, (n,), generator=g)
        return protos[y] + torch.randn(n, 3, 8, 8, generator=g), y

    model, (x, y) = Net(seed), draw(256)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    xe, ye = draw(256)
    return model, [(x[:128], y[:128]), (x[128:], y[128:])], [(xe[:128], ye[:128]),
                                                              (xe[128:], ye[128:])]


def test_validate_omega_measures_damage_and_restores_the_model():
    model, calib, held_out = trained_net()
    tr = layer_traces(model, calib, tol=0.2, progress=False)
    model.train()
    model.bn2.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    omegas = {v: omega_table(model, tr, BITS, variant=v) for v in ("joint", "qerr_only", "trace")}
    per_config, summary = validate_omega(model, omegas, held_out, n_configs=30, seed=0,
                                         fixed={"conv1": 8}, progress=False)
    assert len(per_config) == 90 and set(per_config["variant"]) == set(omegas)
    assert per_config.groupby("variant")["config_id"].nunique().eq(30).all()
    assert all(json.loads(c)["conv1"] == 8 for c in per_config["config"])
    assert list(summary["variant"]) == ["joint", "qerr_only", "trace"]
    assert {"spearman_rho", "spearman_p", "partial_rho", "partial_p"} <= set(summary.columns)
    joint = summary.set_index("variant").loc["joint"]
    assert joint["spearman_rho"] > 0.5 and joint["spearman_p"] < 0.01
    # ΣΩ is recomputed from the table for each config
    row = per_config[per_config["variant"] == "joint"].iloc[0]
    cfg = json.loads(row["config"])
    assert row["omega"] == pytest.approx(sum(omegas["joint"].at[n, b] for n, b in cfg.items()))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert [m.training for m in model.modules()] == modes
    assert per_config.attrs["fp32_loss"] > 0


def test_validate_omega_bad_input():
    model = Net()
    om = omega_table(model, traces(), BITS)
    with pytest.raises(SensitivityError, match=r"n_configs=2: need an int >= 3"):
        validate_omega(model, {"joint": om}, batches(), n_configs=2, progress=False)
    with pytest.raises(SensitivityError, match=r"fixed layer 'conv9'"):
        validate_omega(model, {"joint": om}, batches(), fixed={"conv9": 8}, progress=False)
    with pytest.raises(SensitivityError, match=r"omegas\['small'\] has no column for bits \[3"):
        validate_omega(model, {"joint": om, "small": om[[2, 4]]}, batches(), progress=False)
    with pytest.raises(SensitivityError, match=r"omegas\['sub'\] has layers"):
        validate_omega(model, {"joint": om, "sub": om.iloc[:2]}, batches(), progress=False)
    with pytest.raises(SensitivityError, match=r"non-empty dict"):
        validate_omega(model, {}, batches(), progress=False)


# --------------------------------------------------------------------------------------------
# Fixed-size configurations and the decision-based stopping rule (docs/method.md §3)
# --------------------------------------------------------------------------------------------
class WideNet(nn.Module):
    """Six layers of different widths, so that size-neutral swaps exist."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.convs = nn.ModuleList([nn.Conv2d(3, 8, 3, padding=1)] + [
            nn.Conv2d(8 if i == 0 else c, c2, 3, padding=1)
            for i, (c, c2) in enumerate([(8, 16), (16, 16), (16, 32), (32, 32)])])
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        for c in self.convs:
            x = F.relu(c(x))
        return self.fc(x.mean((2, 3)))


def test_fixed_size_configs_stay_within_one_percent_and_are_seeded():
    model = WideNet()
    fp32 = quant.fp32_size_mb(model)
    target = fp32 / 6.0
    cfgs = sensitivity.fixed_size_configs(model, 40, compression=6.0, a_bits=4, seed=3)
    assert len(cfgs) == 40
    assert len({json.dumps(c, sort_keys=True) for c in cfgs}) == 40          # distinct
    sizes = np.array([quant.model_size_mb(model, c, a_bits=4) for c in cfgs])
    assert (np.abs(sizes / target - 1) <= 0.01).all(), sizes / target
    fixed = quant.fixed_layers(model, "first_last_8")
    assert all(c[k] == 8 for c in cfgs for k in fixed)
    free = [k for k in cfgs[0] if k not in fixed]
    assert len({c[k] for c in cfgs for k in free}) >= 4          # the chain explores the widths
    again = sensitivity.fixed_size_configs(model, 40, compression=6.0, a_bits=4, seed=3)
    assert again == cfgs
    other = sensitivity.fixed_size_configs(model, 40, compression=6.0, a_bits=4, seed=4)
    assert other != cfgs


def test_fixed_size_configs_reject_unreachable_sizes():
    with pytest.raises(SensitivityError, match=r"compression 100x is out of reach"):
        sensitivity.fixed_size_configs(WideNet(), 4, compression=100.0)
    with pytest.raises(SensitivityError, match=r"rel_tol=0: need 0 < rel_tol"):
        sensitivity.fixed_size_configs(WideNet(), 4, compression=6.0, rel_tol=0)


def _decision_inputs():
    layers = ["a", "b", "c"]
    qerr = pd.DataFrame({2: [16.0, 16.0, 16.0], 4: [1.0, 1.0, 1.0], 8: [0.0, 0.0, 0.0]},
                        index=pd.Index(layers, name="layer"))
    inputs = {"n_params": {k: 1000 for k in layers}, "fixed": {}, "other_params": 0,
              "fp32_params": 3000}
    return qerr, inputs


def test_decision_rule_stops_when_the_pick_is_stable_and_continues_when_not():
    qerr, inputs = _decision_inputs()
    # 5x = at most 6.4 bits per weight: (8, 4, 4) and (8, 8, 2) fit, (8, 8, 4) does not. With
    # T = (10, 5, 1) the pick is (8, 4, 4) (ΣΩ = 6) and ±0.2 cannot change that.
    stable, info = sensitivity.decision_is_stable(qerr, [10.0, 5.0, 1.0], [0.1, 0.1, 0.1],
                                                  inputs, [5.0], n_random=16)
    assert stable and info["changed_by"] is None and info["n_checked"] == 6 + 16
    assert info["picks"] == [(8, 4, 4)]
    # T = (5, 4.9, 1) ± 1: which of a, b keeps 8 bits is not determined by the traces
    unstable, info = sensitivity.decision_is_stable(qerr, [5.0, 4.9, 1.0], [0.5, 0.5, 0.1],
                                                    inputs, [5.0], n_random=16)
    assert info["picks"] == [(8, 4, 4)]
    assert not unstable and info["changed_by"] is not None
    nan_se, info = sensitivity.decision_is_stable(qerr, [10.0, 5.0, 1.0], [0.1, np.nan, 0.1],
                                                  inputs, [5.0])
    assert not nan_se and info["changed_by"] == "non-finite SE"


def test_decision_rule_with_regret_accepts_near_ties_only():
    qerr, inputs = _decision_inputs()
    # T = (5, 4.9, 1) ± (0.5, 0.5, 0): the pick (8, 4, 4) may lose to (4, 8, 4). Worst corner by
    # hand: T' = (4.5, 5.4, 1): ΣΩ(8,4,4) = 5.4 + 1 = 6.4, ΣΩ(4,8,4) = 4.5 + 1 = 5.5, regret
    # 0.9/5.5 (the seeded random corners include it).
    args = (qerr, [5.0, 4.9, 1.0], [0.5, 0.5, 0.0], inputs, [5.0])
    loose, info = sensitivity.decision_is_stable(*args, z=1.0, n_random=16, regret=0.2)
    assert loose and info["changed_by"] is None
    assert info["max_regret"] == pytest.approx(0.9 / 5.5)
    tight, info = sensitivity.decision_is_stable(*args, z=1.0, n_random=16, regret=0.1)
    assert not tight and info["changed_by"] is not None
    with pytest.raises(SensitivityError, match="regret=-0.1"):
        sensitivity.decision_is_stable(*args, regret=-0.1)


def test_decision_stop_rule_ends_layer_traces_early():
    model, calib, _ = trained_net()
    rule = sensitivity.decision_stop_rule(model, [4.0], bits=(2, 4, 8), policy="none",
                                          a_bits=None, n_random=8)
    df = layer_traces(model, calib, tol=1e-4, max_probes=64, progress=False, stop_rule=rule,
                      method="hutchinson")
    full = layer_traces(model, calib, tol=1e-4, max_probes=16, progress=False,
                        method="hutchinson")
    # the 4x pick of this net is clear after the first sweep: the rule stops long before tol
    assert df.attrs["stopped_by_rule"] and rule.history[-1]["stable"]
    assert df.attrs["hvps"] < full.attrs["hvps"] and not df.attrs["converged"]
    assert list(df.index) == LAYERS and (df["probes"] >= 2).all()
    # the defaults (a ReLU/BN net: the Gauss-Newton path): 2 output-space probes per image
    # settle the pick, far fewer products than the exact traces' 10 per image
    rule = sensitivity.decision_stop_rule(model, [4.0], bits=(2, 4, 8), policy="none",
                                          a_bits=None, n_random=8)
    gn = layer_traces(model, calib, progress=False, stop_rule=rule)
    exact = layer_traces(model, calib, progress=False)
    assert gn.attrs["method"] == exact.attrs["method"] == "gauss_newton"
    assert gn.attrs["stopped_by_rule"] and [h["probes"] for h in rule.history] == [2]
    assert gn.attrs["vjps"] == 256 * 2 and exact.attrs["vjps"] == 256 * 10
    qerr = sensitivity.omega_table(model, None, (2, 4, 8), variant="qerr_only")
    inp = search.model_inputs(model, a_bits=None, policy="none")
    assert sensitivity._picks(qerr, gn["avg_trace"].to_numpy(), inp, [4.0], (2, 4, 8)) == \
        sensitivity._picks(qerr, exact["avg_trace"].to_numpy(), inp, [4.0], (2, 4, 8))


def test_study_verdict_says_what_the_paired_tau_supports():
    from hmqat.study import sensitivity_study

    def kendall(diff_low, diff_high):
        return pd.DataFrame({
            "predictor": ["omega_joint", "omega_qerr_only", "avg_bits"],
            "kendall_tau": [0.5, 0.4, 0.2], "tau_low": [0.3, 0.2, 0.0],
            "tau_high": [0.7, 0.6, 0.4], "n_configs": [64] * 3,
            "ref_minus_tau": [np.nan, 0.1, 0.3], "diff_low": [np.nan, diff_low, 0.1],
            "diff_high": [np.nan, diff_high, 0.5]})
    better = sensitivity_study.verdict({"kendall_fixed_size": (kendall(0.02, 0.2), "")})
    assert "ranks configs better than `qerr_only`, `avg_bits`" in better
    assert "64 configs" in better and "`joint` 0.50 [0.30, 0.70]" in better
    same = sensitivity_study.verdict({"kendall_fixed_size": (kendall(-0.1, 0.3), "")})
    assert "ranks configs better than `avg_bits`" in same and "`qerr_only`," not in same
    worse = kendall(-0.4, -0.1)
    worse.loc[2, ["diff_low", "diff_high"]] = [-0.2, 0.2]
    text = sensitivity_study.verdict({"kendall_fixed_size": (worse, "")})
    assert "adds nothing measurable" in text and "ranks worse than `qerr_only`" in text
    front = pd.DataFrame({"target_compression": [10.34, 10.34], "variant": ["joint", "trace"],
                          "top1": [82.0, 76.0], "random_median": [75.0, 75.0],
                          "beats_random_pct": [100.0, 60.0], "n_random": [20, 20]})
    assert "10.34×: 1/2 picks beat ≥ 95 % of 20 random" in sensitivity_study.verdict(
        {"ptq_frontier_summary": (front, "")})
    assert sensitivity_study.verdict({}) == "No part of the study ran."


def test_study_verdict_compares_calibration_sets_with_the_right_se():
    from hmqat.study import sensitivity_study

    layers = pd.DataFrame({"between_set_sd": [0.1, 0.3], "within_set_se": [0.0, 0.0],
                           "between_over_within": [np.nan, np.nan], "data_se": [0.1, 0.2],
                           "between_over_data_se": [1.0, 1.5], "between_rel_sd": [0.05, 0.1]})
    picks = pd.DataFrame({"set": [0, 1, 2], "same_as_set0": [True, True, False]})
    text = sensitivity_study.verdict({"trace_variability": (layers, ""),
                                      "trace_variability_picks": (picks, "")})
    assert "per-image SE of the exact traces (data_se) median 1.25 (range 1.00–1.50)" in text
    assert "5%–10% of the trace" in text and "equals set 0's in 2 of 3" in text
    probes = layers.drop(columns=["data_se", "between_over_data_se"]).assign(
        between_over_within=[2.0, 4.0])
    text = sensitivity_study.verdict({"trace_variability": (probes, "")})
    assert "stratified probe SE median 3.00 (range 2.00–4.00)" in text and "nan" not in text


def test_study_resume_folder_is_keyed_by_weights_and_settings(tmp_path):
    from hmqat.study import sensitivity_study

    model = WideNet()
    base = sensitivity_study.work_dir(tmp_path, model, {"trace_tol": 0.05, "seed": 0})
    assert base == sensitivity_study.work_dir(tmp_path, model, {"trace_tol": 0.05, "seed": 0})
    assert base.parent == tmp_path / "cache" / "sensitivity"   # git-ignored, never data/
    assert base != sensitivity_study.work_dir(tmp_path, model, {"trace_tol": 0.1, "seed": 0})
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert base != sensitivity_study.work_dir(tmp_path, model, {"trace_tol": 0.05, "seed": 0})


def test_calibration_variability_with_exact_traces_reports_the_per_image_se():
    model = Net().eval()
    sets = [batches(n=16, seed=s) for s in (1, 2)]
    kw = dict(compressions=[4.0], bits=(2, 4, 8), a_bits=None, policy="none", method="mse",
              progress=False)
    exact, picks = sensitivity.calibration_variability(model, sets, trace_method="gauss_newton",
                                                       **kw)
    assert (exact["within_set_se"] == 0).all() and exact["between_over_within"].isna().all()
    assert (exact["data_se"] > 0).all()
    by_hand = np.array([layer_traces(model, s, method="gauss_newton")["avg_trace"] for s in sets])
    np.testing.assert_allclose(exact["between_set_sd"], by_hand.std(0, ddof=1), rtol=1e-9)
    np.testing.assert_allclose(exact["between_over_data_se"],
                               exact["between_set_sd"] / exact["data_se"], rtol=1e-12)
    assert len(picks) == 2 and bool(picks["same_as_set0"].iloc[0])
    probes, _ = sensitivity.calibration_variability(model, sets, tol=0.5, max_probes=4,
                                                    trace_method="hutchinson", **kw)
    assert "data_se" not in probes and (probes["within_set_se"] > 0).all()


def test_kendall_tau_b_equals_scipy_with_and_without_ties():
    from scipy import stats as st

    from hmqat.sensitivity import kendall_tau_b
    rng = np.random.default_rng(0)
    for n in (2, 5, 17, 64):
        for ties in (False, True):
            x = rng.integers(0, 4, n).astype(float) if ties else rng.normal(size=n)
            y = rng.integers(0, 3, n).astype(float) if ties else x + rng.normal(size=n)
            want = st.kendalltau(x, y).statistic
            got = kendall_tau_b(x, y)
            assert (np.isnan(want) and np.isnan(got)) or abs(got - want) < 1e-12
    assert np.isnan(kendall_tau_b(np.ones(5), np.arange(5.0)))


def test_spearman_equals_scipy_with_and_without_ties():
    from scipy import stats as st

    from hmqat.sensitivity import _average_ranks, _spearman
    rng = np.random.default_rng(1)
    for n in (3, 9, 40):
        for ties in (False, True):
            x = rng.integers(0, 4, n).astype(float) if ties else rng.normal(size=n)
            y = rng.integers(0, 3, n).astype(float) if ties else x + rng.normal(size=n)
            assert np.array_equal(_average_ranks(x), st.rankdata(x))
            want = st.spearmanr(x, y).statistic
            got = _spearman(x, y)
            assert (np.isnan(want) and np.isnan(got)) or abs(got - want) < 1e-12
