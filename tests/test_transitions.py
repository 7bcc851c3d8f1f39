"""Transition-aware fine-tuning: precision transitions, oscillations, distillation, recipes."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hmqat import data, quant, train, transitions
from hmqat.transitions import (DistillationConfig, OscillationConfig, OscillationTracker,
                               PrecisionTransition, Recipe, RecipeError, TransitionConfig,
                               make_callbacks)


def PT(stages=transitions.DEFAULT_STAGES, *, warmup=0.02, unit="fraction", batches=None, **kw):
    """A PrecisionTransition from TransitionConfig keywords (warmup = step_warmup)."""
    return PrecisionTransition(TransitionConfig(enabled=True, stages=stages, unit=unit,
                                                step_warmup=warmup, **kw), batches=batches)


def OT(**kw):
    """An OscillationTracker from OscillationConfig keywords (tracking on)."""
    return OscillationTracker(OscillationConfig(track=True, **kw))


class Tiny(nn.Module):
    """Three convs and a linear layer: a few thousand weights, milliseconds per step."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


CONFIG = {"conv1": 8, "conv2": 4, "conv3": 2, "fc": 8}


def _fp32():
    torch.manual_seed(0)
    return Tiny()


def _loader(n=64, batch=16):
    return data.make_loader(data.synthetic_cifar(n, seed=0), batch, train=True, seed=0)


class Probe(train.Callback):
    """Records, before every forward, each quantizer's width, step and the steps' lr_mult."""

    def __init__(self):
        self.rows = []

    def on_step_start(self, state):
        row = {"step": state.step}
        for name, layer in quant.quantized_layers(state.model).items():
            q = layer.weight_quantizer
            row[name] = (q.bits if q.enabled else None,
                         q.step.detach().clone(), layer.weight.detach().clone())
        g = next(g for g in state.optimizer.param_groups if g["name"] == "steps")
        row["lr_mult"], row["lr"], row["base_lr"] = g["lr_mult"], g["lr"], g["base_lr"]
        self.rows.append(row)


def _qat(callbacks, epochs=1, steps=8, **kw):
    cfg = train.TrainConfig(**{"epochs": epochs, "lr": 0.01, "max_steps_per_epoch": steps, **kw})
    return train.qat(_fp32(), CONFIG, _loader(16 * steps), None, cfg, a_bits=4,
                     callbacks=callbacks)


# --------------------------------------------------------------------------------------------
# Precision transitions
# --------------------------------------------------------------------------------------------
def test_range_reinit_keeps_clipping_range_at_scheduled_steps():
    pt = PT([(0.0, 8), (0.5, "target")], reinit="range", warmup=0.25)
    probe = Probe()
    qm, _ = _qat([pt, probe], steps=8, step_lr=0.0)     # steps move only by transitions
    rows = probe.rows
    qp = {b: quant.weight_qrange(b)[1] for b in (2, 4, 8)}
    for step, row in enumerate(rows):
        assert row["conv1"][0] == 8 and row["fc"][0] == 8        # target 8: never changes
        want = 8 if step < 4 else None
        assert row["conv2"][0] == (want or 4) and row["conv3"][0] == (want or 2)
    # clipping range s·Q_P is preserved across 8 -> 4 and 8 -> 2 (Eq. T1)
    for name, b in (("conv2", 4), ("conv3", 2)):
        before, after = rows[3][name][1], rows[4][name][1]
        torch.testing.assert_close(after * qp[b], before * qp[8])
    # and 4 -> 8 at step 0 carried the initial 4-bit range too
    init = quant.init_step(_fp32().conv2.weight, 4)
    torch.testing.assert_close(rows[0]["conv2"][1] * qp[8], init * qp[4])
    assert [e["step"] for e in pt.events] == [0, 4]
    assert qm.conv2.w_bits == 4 and qm.conv3.w_bits == 2
    # warm-up: N = 0.25·8 = 2 steps after the transition at step 4, lr = base·cosine·lr_mult
    assert [r["lr_mult"] for r in rows] == [1, 1, 1, 1, 1 / 3, 2 / 3, 1, 1]


def test_fp32_stage_then_mse_exit_then_range():
    pt = PT([(0.0, "fp32"), (0.25, 8), (0.5, "target")], fp32_exit="mse",
                             reinit="range", warmup=0)
    probe = Probe()
    qm, _ = _qat([pt, probe], steps=8, step_lr=0.0)
    rows = probe.rows
    assert rows[0]["conv2"][0] is None and rows[1]["conv2"][0] is None      # FP32 stage
    assert rows[2]["conv2"][0] == 8 and rows[4]["conv2"][0] == 4
    # leaving FP32 at step 2: MSE-optimal 8-bit step of the weight as trained so far
    torch.testing.assert_close(rows[2]["conv2"][1],
                               quant.init_step(rows[2]["conv2"][2], 8, method="mse"))
    torch.testing.assert_close(rows[4]["conv2"][1] * 7, rows[3]["conv2"][1] * 127)
    assert all(r["lr_mult"] == 1 for r in rows)
    assert qm.conv2.weight_quantizer.enabled


def test_fp32_stage_is_exact_passthrough():
    qm = quant.quantize_model(_fp32(), CONFIG, a_bits=4)
    layer = qm.conv3
    layer.weight_quantizer.enabled = False
    assert layer.quantized_weight() is layer.weight
    layer.weight_quantizer.enabled = True
    assert not torch.equal(layer.quantized_weight(), layer.weight)


def test_mse_reinit_epoch_schedule_and_warmup():
    pt = PT([(0, 8), (1, "target")], unit="epoch", reinit="mse", warmup=0.5)
    probe = Probe()
    _qat([pt, probe], epochs=2, steps=3, step_lr=0.001)
    assert [e["step"] for e in pt.events] == [0, 3]                 # first step of epoch 1
    row = probe.rows[3]
    torch.testing.assert_close(row["conv3"][1], quant.init_step(row["conv3"][2], 2, method="mse"))
    # warm-up N = 0.5 epoch = 2 steps (rounded); lr = base_lr · cosine · lr_mult
    assert [r["lr_mult"] for r in probe.rows] == [1, 1, 1, 1 / 3, 2 / 3, 1]
    for r in probe.rows:
        assert r["lr"] == pytest.approx(r["base_lr"] * train._cosine(r["step"], 6, 0)
                                        * r["lr_mult"]) and r["base_lr"] == 0.001


def test_epoch_stage_beyond_training_is_an_error():
    pt = PT([(0, 8), (3, "target")], unit="epoch")
    with pytest.raises(RecipeError, match=r"epoch\(s\) \[3\] but training has only 2 epochs"):
        _qat([pt], epochs=2, steps=1)


@pytest.mark.parametrize("stages, unit, match", [
    ([(0.1, 8), (0.3, "target")], "fraction", r"first stage must start at 0"),
    ([(0.0, 8), (0.3, 4)], "fraction", r"must end with \(at, 'target'\)"),
    ([(0.0, 8), (1.0, "target")], "fraction", r"must be in \[0, 1\)"),
    ([(0.0, 8), (0.5, 8), (0.6, "target")], "fraction", r"intermediate widths must decrease"),
    ([(0.0, 8), (0.2, "fp32"), (0.6, "target")], "fraction", r"only the first stage may be FP32"),
    ([(0.0, 9), (0.5, "target")], "fraction", r"stages\[0\] bits = 9"),
    ([(0.0, 8), (0.5, "target")], "epoch", r"must be an epoch index"),
    ([(0.0, 8), (0.0, "target")], "fraction", r"strictly increase"),
])
def test_bad_stages(stages, unit, match):
    with pytest.raises(RecipeError, match=match):
        transitions.parse_stages(stages, unit)


# --------------------------------------------------------------------------------------------
# Oscillations
# --------------------------------------------------------------------------------------------
def test_oscillation_count_and_ema_on_hand_made_codes():
    m = 0.01
    tr = OT(momentum=m)
    seq = [[0, 0, 0], [1, 0, 1], [0, 0, 2], [1, 0, 1], [1, 0, 2], [2, 0, 3]]
    # w0: +,-,+,0,+ -> oscillations at steps 2 and 3; w1 constant; w2: +,+,-,+,+ -> steps 3, 4
    flips = []
    for codes in seq:
        tr.observe("w", torch.tensor(codes), bits=4)
        flips.append(float(tr.tracks["w"].events))
    assert flips == [0, 0, 1, 3, 4, 4]
    f0 = 0.0
    for o in [0, 1, 1, 0, 0]:
        f0 = m * o + (1 - m) * f0
    f2 = 0.0
    for o in [0, 0, 1, 1, 0]:
        f2 = m * o + (1 - m) * f2
    assert f0 == pytest.approx(0.01950399)
    torch.testing.assert_close(tr.tracks["w"].ema, torch.tensor([f0, 0.0, f2]))
    # a bit change restarts the tensor's state
    tr.observe("w", torch.tensor([5, 5, 5]), bits=3)
    assert tr.tracks["w"].bits == 3 and float(tr.tracks["w"].ema.sum()) == 0


def test_threshold_freezes_at_rounded_ema_of_codes():
    m, thr = 0.2, 0.5
    tr = OT(momentum=m, freeze=True, freeze_threshold=thr,
                            freeze_threshold_final=thr)
    ema_int, ema = 0.0, 0.0
    for t, c in enumerate([0, 1, 0, 1, 0, 1, 0]):
        new = tr.observe("w", torch.tensor([c, 3]), bits=4, threshold=thr)
        if t >= 1:
            ema = m * (t >= 2) + (1 - m) * ema
            if ema > thr:
                break
            ema_int = m * c + (1 - m) * ema_int
            assert not new.any()
    # f = 0, .2, .36, .488, .5904 > .5 at step 5 (code 1) -> frozen at round(.2624) = 0
    assert t == 5 and c == 1 and new.tolist() == [True, False]
    assert ema_int == pytest.approx(0.2624)
    assert tr.tracks["w"].frozen_int.tolist() == [0, 0] and tr.tracks["w"].prev.tolist() == [0, 3]
    tr.observe("w", torch.tensor([1, 2]), bits=4, threshold=thr)   # frozen: code stays 0
    assert tr.tracks["w"].prev.tolist() == [0, 2]


def test_frozen_weights_receive_no_update():
    tracker = OT(freeze=True)

    class FreezeAtStart(train.Callback):
        def on_step_start(self, state):
            if state.step == 0:
                layer = state.model.conv2
                mask = torch.zeros_like(layer.weight, dtype=torch.bool)
                mask[:, :4] = True
                tracker.freeze_weights("conv2", layer, mask, state.optimizer)
                self.before = layer.weight.detach().clone()
                self.codes = layer.weight_quantizer.int_repr(layer.weight)
                self.mask = mask

    fz = FreezeAtStart()
    qm, _ = _qat([tracker, fz], steps=4, step_lr=0.0, weight_decay=0.1)
    w = qm.conv2.weight.detach()
    assert torch.equal(w[fz.mask], fz.before[fz.mask])            # frozen: untouched
    assert not torch.allclose(w[~fz.mask], fz.before[~fz.mask])   # the others trained
    assert torch.equal(qm.conv2.weight_quantizer.int_repr(w)[fz.mask], fz.codes[fz.mask])
    assert not tracker._hooks                                      # hooks removed at the end


def test_frozen_codes_stay_fixed_while_steps_learn():
    tracker = OT(freeze=True)

    class FreezeAtStart(train.Callback):
        def on_step_start(self, state):
            if state.step == 0:
                layer = state.model.conv3
                self.mask = torch.rand(layer.weight.shape, generator=torch.Generator()
                                       .manual_seed(0)) < 0.5
                tracker.freeze_weights("conv3", layer, self.mask, state.optimizer)
                self.codes = layer.weight_quantizer.int_repr(layer.weight)
                self.step0 = layer.weight_quantizer.step.detach().clone()

    fz = FreezeAtStart()
    qm, _ = _qat([tracker, fz], steps=4, step_lr=0.05)
    q = qm.conv3.weight_quantizer
    assert not torch.equal(q.step.detach(), fz.step0)                 # the step did learn
    assert torch.equal(q.int_repr(qm.conv3.weight)[fz.mask], fz.codes[fz.mask])
    s = q.step.detach().view(-1, 1, 1, 1).expand_as(qm.conv3.weight)
    torch.testing.assert_close(qm.conv3.weight.detach()[fz.mask],
                               fz.codes[fz.mask].float() * s[fz.mask])


def test_dampening_loss_matches_hand_computation():
    q = quant.LSQQuantizer(3, signed=True, per_channel=True, channels=1, is_weight=True)
    with torch.no_grad():
        q.step.fill_(0.1)
    q.mark_initialized(True)
    w = torch.tensor([[0.26, -0.9, 0.04, 0.5]], requires_grad=True)
    # w/s = 2.6, -9, 0.4, 5 -> codes 3, -4, 0, 3 (Q_N=-4, Q_P=3); clip(w) = .26, -.4, .04, .3
    loss = transitions.dampening_loss(w, q, "sum")
    assert loss.item() == pytest.approx(0.04 ** 2 + 0.04 ** 2)
    loss.backward()
    torch.testing.assert_close(w.grad, torch.tensor([[-0.08, 0.0, 0.08, 0.0]]))
    assert q.step.grad is None                                   # no gradient to the step
    assert transitions.dampening_loss(w, q, "mean").item() == pytest.approx(0.0032 / 4)
    assert transitions.dampening_loss(w, q, "kernel_mean").item() == pytest.approx(0.0032 / 4)

    layer = quant.QLinear.from_float(nn.Linear(4, 1, bias=False), quant.LayerSpec(3, None))
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.weight_quantizer.step.fill_(0.1)

    class State:
        progress = 0.625
        model = nn.Sequential(layer)

    tracker = OT(dampen=True, dampen_weight=0.0, dampen_weight_final=0.1,
                                 dampen_start=0.25, dampen_aggregation="sum")
    expected = transitions.dampening_loss(layer.weight, layer.weight_quantizer, "sum")
    assert expected.item() == pytest.approx(0.0032)
    # cosine ramp 0 -> 0.1 from progress 0.25: at 0.625, u = 0.5 -> λ = 0.05
    assert tracker.dampen_lambda(0.625) == pytest.approx(0.05)
    assert tracker.extra_loss(State, None, None).item() == pytest.approx(0.05 * expected.item())
    assert tracker.dampen_lambda(0.1) == 0.0 and tracker.dampen_lambda(1.0) == pytest.approx(0.1)
    assert transitions.ramp(0.625, 0.0, 0.1, begin=0.25, kind="linear") == pytest.approx(0.05)


def test_tracker_logs_oscillations_per_layer_and_epoch():
    tracker = OT(dampen=True, freeze=True, freeze_start=0.0)
    _, hist = _qat([tracker], epochs=2, steps=4, lr=0.2)
    for h in hist:
        assert 0 <= h["osc_frac"] <= 1 and 0 <= h["osc_rate"] <= 1 and 0 <= h["frozen_frac"] <= 1
        assert "dampen_loss" in h and "freeze_threshold" in h
    df = tracker.log_frame()
    assert sorted(df["layer"].unique()) == ["conv1", "conv2", "conv3", "fc"]
    assert df.groupby("epoch").size().tolist() == [4, 4]
    assert df.set_index(["epoch", "layer"]).loc[(1, "conv3"), "bits"] == 2


# --------------------------------------------------------------------------------------------
# Distillation
# --------------------------------------------------------------------------------------------
def test_distillation_zero_for_identical_student_and_positive_otherwise():
    teacher = _fp32().eval()
    kd = transitions.Distillation(teacher, DistillationConfig(enabled=True, temperature=3.0,
                                                             weight=2.0))
    x = torch.randn(4, 3, 32, 32)

    class State:
        inputs = x

    student = _fp32().eval()
    out = student(x)
    assert kd.extra_loss(State, out, None).item() == pytest.approx(0.0, abs=1e-6)
    other = out + torch.randn_like(out)
    loss = kd.extra_loss(State, other.requires_grad_(), None)
    t = teacher(x).detach()
    by_hand = 2.0 * 9.0 * (F.softmax(t / 3, 1) * (F.log_softmax(t / 3, 1)
                                                   - F.log_softmax(other / 3, 1))).sum(1).mean()
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5) and loss.item() > 0
    assert all(p.grad is None for p in kd.teacher.parameters()) and not kd.teacher.training


# --------------------------------------------------------------------------------------------
# Checkpoint / resume of the callbacks
# --------------------------------------------------------------------------------------------
class _Interrupt(train.Callback):
    def __init__(self, at_step):
        self.at_step = at_step

    def on_step_start(self, state):
        if state.step == self.at_step:
            raise KeyboardInterrupt


def _resume_recipe():
    return Recipe(transition={"enabled": True, "stages": [(0, "fp32"), (0.2, 8), (0.7, "target")],
                              "step_warmup": 0.2},
                  oscillation={"dampen": True, "freeze": True, "freeze_start": 0.0})


def test_callbacks_checkpoint_and_resume_bit_identical(tmp_path):
    def run(ck, extra=()):
        cbs = make_callbacks(_resume_recipe())
        cfg = train.TrainConfig(epochs=3, lr=0.05, max_steps_per_epoch=2, checkpoint=str(ck))
        qm, hist = train.qat(_fp32(), CONFIG, _loader(32), None, cfg, callbacks=[*cbs, *extra])
        return qm, hist, cbs

    ref_model, ref_hist, ref_cbs = run(tmp_path / "a.pt")
    with pytest.raises(KeyboardInterrupt):     # stage 1 (8 bit) is in force when it dies
        run(tmp_path / "b.pt", [_Interrupt(at_step=3)])
    model, hist, cbs = run(tmp_path / "b.pt")
    assert [h["train_loss"] for h in hist] == [h["train_loss"] for h in ref_hist]
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref_model.state_dict()[k]), k
    assert quant.bit_config_of(model) == CONFIG
    assert cbs[0].state_dict() == ref_cbs[0].state_dict()
    a, b = cbs[1].state_dict(), ref_cbs[1].state_dict()
    assert a["log"] == b["log"]
    for name in b["tracks"]:
        for key, v in b["tracks"][name].items():
            assert (torch.equal(v, a["tracks"][name][key]) if isinstance(v, torch.Tensor)
                    else v == a["tracks"][name][key]), (name, key)


# --------------------------------------------------------------------------------------------
# Recipe
# --------------------------------------------------------------------------------------------
def test_recipe_builds_callbacks_in_order():
    assert make_callbacks(Recipe()) == [] and make_callbacks({}) == []
    cbs = make_callbacks({"transition": {"enabled": True}, "oscillation": {"freeze": True},
                          "distillation": {"enabled": True}}, teacher=_fp32())
    assert [type(c).__name__ for c in cbs] == ["PrecisionTransition", "OscillationTracker",
                                               "Distillation"]
    r = Recipe.from_dict({"transition": {"enabled": True,
                                         "stages": [[0, "fp32"], [0.2, 8], [0.5, "target"]]}})
    assert r.transition.stages == ((0.0, "fp32"), (0.2, 8), (0.5, "target"))
    assert Recipe.from_dict(r.to_dict()) == r
    assert r.describe().startswith("LSQ + transitions(fp32@0→8@0.2→target@0.5")


@pytest.mark.parametrize("params, match", [
    ({"osc_dampn": True}, r"unknown recipe key\(s\) \['osc_dampn'\]"),
    ({"oscillation": {"dampn": True}}, r"unknown recipe key\(s\) \['oscillation.dampn'\]"),
    ({"transition": {"enabled": "yes"}}, r"transition.enabled='yes'; use true or false"),
    ({"transition": {"reinit": "max"}}, r"transition.reinit='max' is not allowed"),
    ({"oscillation": {"momentum": 1.5}}, r"oscillation.momentum=1.5"),
    ({"oscillation": {"freeze_threshold_final": 0.01}},
     r"oscillation.freeze_threshold_final=0.01 is below 2 x oscillation.momentum"),
    ({"oscillation": {"dampen_weight_final": -1}}, r"oscillation.dampen_weight_final=-1"),
    ({"oscillation": {"dampen_aggregation": "max"}}, r"oscillation.dampen_aggregation='max'"),
    ({"oscillation": {"freeze_max_bits": 1}}, r"oscillation.freeze_max_bits=1"),
    ({"distillation": {"temperature": 0}}, r"distillation.temperature=0"),
    ({"transition": {"step_warmup": -0.1}}, r"transition.step_warmup=-0.1"),
    ({"transition": {"scale_only_steps": 1.5}}, r"transition.scale_only_steps=1.5"),
    ({"transition": {"calib_batches": 1}}, r"transition.calib_batches=1"),
    ({"bn": {"images": 0}}, r"bn.images=0"),
    ({"transition": {"stages": [(0.0, 8)]}}, r"must end with"),
    ({"transition": True}, r"recipe.transition must be a dict"),
])
def test_recipe_validation(params, match):
    with pytest.raises(RecipeError, match=match):
        Recipe.from_dict(params)


def test_distill_without_teacher_is_an_error():
    with pytest.raises(RecipeError, match=r"no teacher was given; call make_callbacks"):
        make_callbacks(Recipe(distillation={"enabled": True}))


def test_reusing_callbacks_for_a_new_run_is_an_error():
    pt = PT([(0, 8), (0.5, "target")])
    tracker = OT()
    _qat([pt, tracker], steps=2)
    with pytest.raises(RecipeError, match="PrecisionTransition already ran a training"):
        _qat([pt], steps=2)
    with pytest.raises(RecipeError, match="OscillationTracker already ran a training"):
        _qat([tracker], steps=2)


def test_callbacks_refuse_an_fp32_model():
    model = _fp32()
    cfg = train.TrainConfig(epochs=1, max_steps_per_epoch=1)
    with pytest.raises(RecipeError, match="needs a quantized model"):
        train.fit(model, _loader(16), None, cfg, callbacks=[PT()])


def test_flat_recipe_keys_still_load_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match=r"osc_freeze -> oscillation.freeze"):
        r = Recipe.from_dict({"transitions": True, "osc_freeze": True, "distill": True})
    assert r == Recipe(transition={"enabled": True}, oscillation={"freeze": True},
                       distillation={"enabled": True})
    assert r.updated({"oscillation": {"freeze": False}}).oscillation.freeze is False


# --------------------------------------------------------------------------------------------
# Issue 14: data re-init, scale-only phase, BN re-estimation, ladders, resume
# --------------------------------------------------------------------------------------------
def _batches(n=2, batch=16):
    return [b for _, b in zip(range(n), _loader(n * batch, batch))]


def _hand_made_weight(shape):
    """A heavy-tailed, deterministic weight: most values small, a few large (as trained convs)."""
    k = torch.arange(math.prod(shape), dtype=torch.float32)
    u = torch.frac(k * 0.6180339887) * 2 - 1                     # low-discrepancy in (-1, 1)
    return (u.sign() * u.abs().pow(3) * 0.5).reshape(shape)


def test_data_reinit_lands_within_one_percent_of_brute_force_mse():
    fp32 = _fp32()
    with torch.no_grad():
        fp32.conv3.weight.copy_(_hand_made_weight(fp32.conv3.weight.shape))
    pt = PT([(0, 8), (1, "target")], unit="step", reinit="data", warmup=0, batches=_batches())
    probe = Probe()
    cfg = train.TrainConfig(epochs=1, lr=0.01, max_steps_per_epoch=2)
    train.qat(fp32, CONFIG, _loader(32), None, cfg, callbacks=[pt, probe])
    bits, step, w = probe.rows[1]["conv3"]                         # just after 8 -> 2 bits
    assert bits == 2
    qn, qp = quant.weight_qrange(2)
    w2 = w.reshape(w.shape[0], -1)
    grid = torch.linspace(1e-4, 1.0, 20001) * w2.abs().amax(1, keepdim=True)      # [C, G]
    err = (torch.clamp(w2[:, None, :] / grid[..., None], qn, qp).round() * grid[..., None]
           - w2[:, None, :]).pow(2).sum(-1)                                       # [C, G]
    brute = err.min(1).values
    got = (torch.clamp(w2 / step[:, None], qn, qp).round() * step[:, None] - w2).pow(2).sum(1)
    assert (got <= brute * 1.01).all(), (got / brute)
    # the range rule would have carried the 8-bit step: 2-3x the optimum, far worse error
    carried = probe.rows[0]["conv3"][1] * 127 / qp
    bad = (torch.clamp(w2 / carried[:, None], qn, qp).round() * carried[:, None] - w2
           ).pow(2).sum(1)
    assert (bad > 1.5 * brute).all()
    row = next(d for d in pt.diagnostics if d["layer"] == "conv3" and d["when"] == "transition"
               and d["bits"] == 2)
    assert row["step_ratio"] == pytest.approx(1.0, abs=1e-6) and row["range_ratio"] > 1.5
    assert row["err_ratio"] == pytest.approx(1.0, abs=1e-6)


def test_data_reinit_calibrates_changed_activation_steps_from_the_batches():
    batches = _batches(3)
    pt = PT([(0, 8), (1, "target")], unit="step", reinit="data", warmup=0, calib_batches=2,
            batches=batches)
    seen = {}

    class Grab(train.Callback):
        def on_step_start(self, state):
            if state.step == 1:
                seen["model"] = copy.deepcopy(state.model)
                seen["act"] = state.model.conv3.act_quantizer.step.detach().clone()
                seen["first"] = state.model.conv1.act_quantizer.step.detach().clone()

        def on_after_step(self, state):
            if state.step == 0:
                seen["first0"] = state.model.conv1.act_quantizer.step.detach().clone()

    cfg = train.TrainConfig(epochs=1, lr=0.01, step_lr=0.0, max_steps_per_epoch=2)
    train.qat(_fp32(), CONFIG, _loader(32), None, cfg, callbacks=[pt, Grab()])
    assert torch.equal(seen["first"], seen["first0"])   # conv1's input stays at 8 bit: untouched
    # conv3's input moved 8 -> 4 bits: the mean of the per-batch MSE steps of its inputs
    model = copy.deepcopy(seen["model"]).eval()
    inputs = []
    h = model.conv3.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach()))
    q = model.conv3.act_quantizer
    with torch.no_grad():
        q.step.copy_(seen["act"])
        for x, _ in batches[:2]:
            model(x)
    h.remove()
    want = torch.stack([quant.init_step(x, 4, signed=False, per_channel=False, method="mse")
                        for x in inputs]).mean(0)
    torch.testing.assert_close(seen["act"], want, rtol=1e-4, atol=0)   # memory-format rounding


def test_scale_only_phase_freezes_weights_bit_identically_and_moves_steps():
    pt = PT([(0, "target")], unit="step", scale_only_steps=3, scale_only_lr_mult=2.0, warmup=0)
    probe = Probe()

    class BN(train.Callback):
        def __init__(self):
            self.bn = []

        def on_step_start(self, state):
            self.bn.append(state.model.bn2.weight.detach().clone())

    bn = BN()
    qm, _ = _qat([pt, probe, bn], steps=5, step_lr=0.05, weight_decay=0.1, lr=0.05)
    rows = probe.rows
    for name in ("conv1", "conv2", "conv3", "fc"):
        for k in (1, 2, 3):                       # steps 0, 1, 2 trained with frozen weights
            assert torch.equal(rows[k][name][2], rows[0][name][2]), (name, k)
        assert not torch.equal(rows[4][name][2], rows[3][name][2]), name   # then they train
        assert not torch.equal(rows[3][name][1], rows[0][name][1]), name   # steps moved
    assert not torch.equal(bn.bn[3], bn.bn[0])   # BN affine parameters train in the phase
    assert [r["lr_mult"] for r in rows] == [2, 2, 2, 1, 1]
    assert all(p.requires_grad for p in qm.parameters())   # handed back trainable


def test_bn_reestimation_in_qat_changes_running_stats_not_weights():
    batches = _batches(4)

    def run(recipe):
        cfg = train.TrainConfig(epochs=1, lr=0.05, max_steps_per_epoch=3)
        cbs = make_callbacks(recipe, batches=batches)
        qm, hist = train.qat(_fp32(), CONFIG, _loader(48), _loader(32), cfg, callbacks=cbs)
        return qm, hist, cbs

    ref, ref_hist, _ = run(Recipe())
    qm, hist, cbs = run(Recipe(bn={"at_end": True, "images": 40}))
    for (k, v), (_, r) in zip(qm.named_parameters(), ref.named_parameters()):
        assert torch.equal(v, r), k                              # weights and steps untouched
    assert not torch.equal(qm.bn3.running_mean, ref.bn3.running_mean)
    from hmqat.bn import reestimate_bn
    reestimate_bn(ref, batches, max_images=40)                   # the same estimate, by hand
    for name in ("bn1", "bn2", "bn3"):
        torch.testing.assert_close(getattr(qm, name).running_var, getattr(ref, name).running_var)
    assert hist[-1]["val_top1"] >= 0 and [r["layer"] for r in cbs[0].log] == ["bn1", "bn2", "bn3"]
    assert all(r["mean_shift"] >= 0 for r in cbs[0].log)


@pytest.mark.parametrize("total, at_target, ladder, stages", [
    (300, 250, (8, 4), ((0, 8), (25, 4), (50, "target"))),
    (300, 250, (8,), ((0, 8), (50, "target"))),
    (7, 7, (), ((0, "target"),)),
    (10, 7, (8, 6, 4), ((0, 8), (1, 6), (2, 4), (3, "target"))),
])
def test_ladder_stages_give_exactly_the_requested_steps_at_target(total, at_target, ladder,
                                                                 stages):
    assert transitions.ladder_stages(total, at_target, ladder) == stages


def test_schedule_trains_exactly_steps_at_target_in_a_run():
    stages = transitions.ladder_stages(7, 4, (8, 4))
    pt = PT(stages, unit="step", warmup=0)
    probe = Probe()
    _qat([pt, probe], steps=7)
    at_target = [r for r in probe.rows if r["conv3"][0] == 2 and r["conv2"][0] == 4]
    assert len(at_target) == 4 == pt.steps_at_target()
    assert [r["conv3"][0] for r in probe.rows] == [8, 4, 4, 2, 2, 2, 2]
    assert [r["conv2"][0] for r in probe.rows] == [8, 4, 4, 4, 4, 4, 4]   # target 4: done at 4


@pytest.mark.parametrize("args, match", [
    ((300, 250, ()), r"ladder=\(\) trains every step at the target"),
    ((300, 299, (8, 4)), r"needs >= 2 steps before the target"),
    ((300, 301, (8,)), r"steps_at_target=301"),
])
def test_bad_ladders(args, match):
    with pytest.raises(RecipeError, match=match):
        transitions.ladder_stages(*args)


def test_step_stage_beyond_training_is_an_error():
    with pytest.raises(RecipeError, match=r"step\(s\) \[9\] but training has only 4 steps"):
        _qat([PT([(0, 8), (9, "target")], unit="step")], steps=4)


def test_data_reinit_without_batches_is_an_error():
    with pytest.raises(RecipeError, match=r"needs training batches"):
        make_callbacks(Recipe(transition={"enabled": True, "reinit": "data"}))
    with pytest.raises(RecipeError, match=r"needs >= 2 calibration batches"):
        PrecisionTransition(TransitionConfig(enabled=True, reinit="data"), batches=_batches(1))


def _scale_only_recipe():
    return Recipe(transition={"enabled": True, "stages": [(0, 8), (2, "target")], "unit": "step",
                              "reinit": "data", "fp32_exit": "data", "scale_only_steps": 3,
                              "step_warmup": 0},
                  oscillation={"track": True}, bn={"after_transitions": True, "at_end": True,
                                                   "images": 32})


def test_resume_in_the_middle_of_a_scale_only_phase_is_bit_identical(tmp_path):
    batches = _batches(2)

    def run(ck, extra=()):
        cbs = make_callbacks(_scale_only_recipe(), batches=batches)
        cfg = train.TrainConfig(epochs=2, lr=0.05, max_steps_per_epoch=3, checkpoint=str(ck))
        qm, hist = train.qat(_fp32(), CONFIG, _loader(48), None, cfg, callbacks=[*cbs, *extra])
        return qm, hist, cbs

    ref_model, ref_hist, ref_cbs = run(tmp_path / "a.pt")
    # the phase covers steps 2, 3, 4; epoch 1 ends after step 2, so the resumed run restarts
    # at step 3 inside it
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b.pt", [_Interrupt(at_step=4)])
    model, hist, cbs = run(tmp_path / "b.pt")
    assert ref_cbs[0].in_scale_only(3) and ref_cbs[0].in_scale_only(4)
    assert [h["train_loss"] for h in hist] == [h["train_loss"] for h in ref_hist]
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref_model.state_dict()[k]), k
    assert cbs[0].state_dict() == ref_cbs[0].state_dict()
    assert cbs[-1].state_dict() == ref_cbs[-1].state_dict()
    assert [e["step"] for e in cbs[0].events] == [0, 2]


def test_each_scale_only_phase_records_how_far_it_moved_the_changed_steps():
    """events[k] of a stage with a scale-only phase carries the median and max of
    |s_end / s_start − 1| over every channel's step of the weight quantizers that stage changed
    (as transitions.step_movement measures the frontier walk's phase), recomputed here from the
    steps a probe saw: s_start before the phase's first step, s_end before the step after it."""
    import numpy as np

    def run(callbacks, steps):      # FP activations: Tiny's 4-bit activations stop the
        cfg = train.TrainConfig(epochs=1, lr=0.01, step_lr=0.01, max_steps_per_epoch=steps)
        train.qat(_fp32(), CONFIG, _loader(16 * steps), None, cfg, a_bits=None,
                  callbacks=callbacks)          # conv gradients (all codes clip)

    pt = PT([(0, 8), (4, "target")], unit="step", reinit="data", fp32_exit="data",
            scale_only_steps=2, scale_only_lr_mult=20.0, warmup=0, batches=_batches(2))
    probe = Probe()
    run([pt, probe], 8)
    rows = probe.rows
    # stage 0 (8 bit) changes conv2 (4 -> 8) and conv3 (2 -> 8); stage 1 moves them to target
    for ev, start, end in ((pt.events[0], 0, 2), (pt.events[1], 4, 6)):
        r = np.concatenate([(rows[end][n][1].double() / rows[start][n][1].double() - 1).abs()
                            .reshape(-1).numpy() for n in ("conv2", "conv3")])
        assert ev["step_layers"] == 2
        assert ev["step_median"] == pytest.approx(float(np.median(r)), rel=1e-12)
        assert ev["step_max"] == pytest.approx(float(r.max()), rel=1e-12)
        assert ev["step_median"] > 0
    # a stage whose phase is cut short by the next stage start is closed there
    cut = PT([(0, 8), (1, "target")], unit="step", reinit="data", fp32_exit="data",
             scale_only_steps=3, warmup=0, batches=_batches(2))
    class After(train.Callback):      # the steps after each optimizer step
        rows: list = []

        def on_after_step(self, state):
            self.rows.append({n: l.weight_quantizer.step.detach().clone()
                              for n, l in quant.quantized_layers(state.model).items()})

    probe, after = Probe(), After()
    run([cut, probe, after], 5)
    r = np.concatenate([(after.rows[0][n].double() / probe.rows[0][n][1].double() - 1).abs()
                        .reshape(-1).numpy() for n in ("conv2", "conv3")])
    assert cut.events[0]["step_median"] == pytest.approx(float(np.median(r)), rel=1e-12)
    assert "step_median" in cut.events[1] and cut.state_dict()["phase_start"] == {}
