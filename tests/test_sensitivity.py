"""hmqat.sensitivity: the Ω table (docs/design.md §3, Eq. Ω), its variants and the damage validation."""
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hmqat import quant, sensitivity
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
    om = omega_table(Net(), traces(), BITS, variant=variant, seed=1)
    values = om.to_numpy()
    assert (values >= 0).all() and np.isfinite(values).all()
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


def test_size_only_ignores_traces_and_random_permutes_them():
    model = Net()
    a = omega_table(model, traces(), BITS, variant="size_only")
    b = omega_table(model, traces((1, 1, 1, 1)), BITS, variant="size_only")
    pd.testing.assert_frame_equal(a, b)
    r1 = omega_table(model, traces(), BITS, variant="random", seed=3)
    r1b = omega_table(model, traces(), BITS, variant="random", seed=3)
    pd.testing.assert_frame_equal(r1, r1b)
    implied = (r1[4] / a[4]).to_numpy()            # the trace each layer was given
    assert sorted(implied.round(8)) == sorted(traces()["avg_trace"].round(8))
    others = [omega_table(model, traces(), BITS, variant="random", seed=s) for s in range(4, 9)]
    assert any(not np.allclose(o.to_numpy(), r1.to_numpy()) for o in others)


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
    omegas = {v: omega_table(model, tr, BITS, variant=v) for v in ("joint", "size_only", "trace")}
    per_config, summary = validate_omega(model, omegas, held_out, n_configs=30, seed=0,
                                         fixed={"conv1": 8}, progress=False)
    assert len(per_config) == 90 and set(per_config["variant"]) == set(omegas)
    assert per_config.groupby("variant")["config_id"].nunique().eq(30).all()
    assert all(json.loads(c)["conv1"] == 8 for c in per_config["config"])
    assert list(summary["variant"]) == ["joint", "size_only", "trace"]
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
