"""The frontier walk (issue 26; hmqat.transitions' per-transition mechanics, hmqat.study.walk's
driver): only the layers whose width changes switch, a walk interrupted mid-point resumes
bit-identically, every exported point reloads exactly, the scale phase's movement report is
the hand computation, and bad input is one clear error before anything is written.

A random-init ResNet-20 on 32 synthetic images (two batches of 16), three points of a few
optimizer steps each: seconds per walk on one CPU thread."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from hmqat import data, export, models, quant, runtime, train, transitions
from hmqat.runtime import load_checkpoint
from hmqat.study import runs
from hmqat.study import walk as hwalk
from hmqat.transitions import Recipe, WalkConfig, WalkError

# scale_lr 0.5 moves the switched steps by a median of ~5 % here (0.01: ~0.1 %, a failed phase);
# the fine-tune is 2 epochs of 2 steps, so a walk can be interrupted inside a point
WALK = WalkConfig(scale_steps=2, scale_lr=0.5, finetune_steps=4)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    fp32 = models.create_model("resnet20", pretrained=False).eval()
    tr = data.make_loader(data.synthetic_cifar(32, seed=0), 16, train=True, seed=0,
                          drop_last=True)
    te = data.make_loader(data.synthetic_cifar(16, seed=1), 16)
    cfg = train.TrainConfig(epochs=1, lr=0.01, step_lr=0.001, max_steps_per_epoch=2, seed=0)
    a = quant.uniform_config(fp32, 8)
    b = {**a, **{n: 4 for n in a if n.startswith("layer2.")}}
    c = {**b, **{n: 4 for n in b if n.startswith("layer3.")}, "layer2.0.conv1": 2}
    return fp32, tr, te, cfg, [("A", a), ("B", b), ("C", c)]


TEST = data.make_loader(data.synthetic_cifar(24, seed=7), 8)    # the test split, read once


def _walk(setup, run_dir, **kw):
    fp32, tr, te, cfg, configs = setup
    return hwalk.walk_frontier(fp32, kw.pop("configs", configs), None, tr, te, cfg,
                               kw.pop("walk", WALK), run_dir=run_dir, device="cpu",
                               test_loader=kw.pop("test_loader", TEST), **kw)


@pytest.fixture(scope="module")
def walked(setup, tmp_path_factory):
    """One uninterrupted walk, with the model captured right before and right after every
    switch (before any training of the point)."""
    switches = []
    real = transitions.switch_layers

    def spy(qmodel, bit_config):
        before = {k: v.detach().clone() for k, v in qmodel.state_dict().items()}
        changed = real(qmodel, bit_config)
        after = {k: v.detach().clone() for k, v in qmodel.state_dict().items()}
        switches.append({"before": before, "after": after, "changed": changed,
                         "weights": {n: m.weight.detach().clone()
                                     for n, m in quant.quantized_layers(qmodel).items()}})
        return changed

    run_dir = tmp_path_factory.mktemp("walk")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(transitions, "switch_layers", spy)
        points = _walk(setup, run_dir)
    return points, switches, run_dir


def _model_state(point):
    ck = load_checkpoint(point.folder / point.record["checkpoint"])
    return ck["model"]


def test_walk_switches_only_the_layers_whose_width_changes(setup, walked):
    """Each transition changes exactly the layers whose bits differ between neighbouring
    configs; at the switch every other layer keeps its bits and its weight step, every
    activation step is untouched, and the switched steps are the data re-init (Eq. T2, the MSE
    step of the current weights)."""
    *_, configs = setup
    points, switches, _ = walked
    assert [p.label for p in points] == ["A", "B", "C"] and len(switches) == 2
    assert [p.record["bit_config"] for p in points] == [c for _, c in configs]
    for k, sw in enumerate(switches, start=1):
        old, new = configs[k - 1][1], configs[k][1]
        expected = [n for n in new if new[n] != old[n]]
        assert list(sw["changed"]) == expected == points[k].record["changed_layers"]
        assert points[k].record["bits_before"] == {n: old[n] for n in expected}
        for key, before in sw["before"].items():
            layer = key.split(".weight_quantizer.")[0]
            if ".weight_quantizer." in key and layer in expected:
                continue
            assert torch.equal(sw["after"][key], before), key    # not re-initialised
        for name in expected:
            q = f"{name}.weight_quantizer"
            assert int(sw["after"][f"{q}.bit_width"]) == new[name]
            reinit = quant.init_step(sw["weights"][name], new[name], method="mse")
            assert torch.equal(sw["after"][f"{q}.step"], reinit)
            assert not torch.equal(sw["after"][f"{q}.step"], sw["before"][f"{q}.step"])
    assert points[0].record["changed_layers"] == [] and points[0].record["step_median"] is None


def test_each_point_id_chains_its_predecessor(setup, walked):
    """A point's spec holds its predecessor's id: changing the phase settings changes every
    transition point's id but not point 0's (the QAT run), and changing B's config changes B's
    id and, through the chain, C's."""
    fp32, tr, te, cfg, configs = setup
    points, _, _ = walked
    assert [p.record["predecessor"] for p in points] == [None, points[0].run_id,
                                                         points[1].run_id]
    assert all(json.loads((p.folder / "spec.json").read_text())["walk_point"] == k
               for k, p in enumerate(points))

    def ids(configs, walk):
        vp = transitions.validate_frontier(fp32, configs)
        specs = hwalk._specs(runtime.model_fingerprint(fp32), vp, Recipe(), cfg, walk,
                             runs.data_key(tr, te, batch_size=16), len(tr),
                             {"a_bits": 4, "policy": "first_last_8", "per_channel": True,
                              "init": "lsq"}, True)
        return [hwalk._digest(s)[:16] for s in specs]

    assert ids(configs, WALK) == [p.run_id for p in points]
    other_lr = ids(configs, WalkConfig(scale_steps=2, scale_lr=0.25, finetune_steps=4))
    assert other_lr[0] == points[0].run_id and set(other_lr[1:]).isdisjoint(ids(configs, WALK))
    (la, a), (lb, b), (lc, c) = configs
    other_b = ids([(la, a), (lb, {**b, "layer1.0.conv1": 4}), (lc, c)], WALK)
    assert other_b[0] == points[0].run_id and other_b[1] != points[1].run_id
    assert other_b[2] != points[2].run_id          # C's config is the same: the chain moved it


def test_scale_phase_movement_equals_a_hand_computation(walked):
    """step_median / step_max: |s_after/s_before − 1| over every per-channel step of the
    switched layers, s_before right after the switch, s_after from the scale phase's final
    checkpoint; the moved flag is median >= 1 %."""
    points, switches, _ = walked
    for point, sw in zip(points[1:], switches):
        after = load_checkpoint(point.folder / "scale.pt")["model"]
        r = np.concatenate([
            (after[f"{n}.weight_quantizer.step"].double()
             / sw["after"][f"{n}.weight_quantizer.step"].double() - 1).abs().numpy()
            for n in sw["changed"]])
        rec = point.record
        assert rec["step_median"] == float(np.median(r)) and rec["step_max"] == float(r.max())
        assert rec["scale_phase_moved"] is (float(np.median(r)) >= 0.01) is True
        assert set(rec["step_movement_layers"]) == set(sw["changed"])
        # the scale phase trained nothing but steps: every weight is still the switched one
        for name, w in sw["weights"].items():
            assert torch.equal(after[f"{name}.weight"], w)
    assert [p.record["steps"] for p in points] == [2, 6, 6]
    assert [p.record["cumulative_steps"] for p in points] == [2, 8, 14]


def test_step_movement_and_split_steps_by_hand():
    before = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([4.0])}
    after = {"a": torch.tensor([1.01, 1.0]), "b": torch.tensor([4.4])}
    m = transitions.step_movement(before, after)
    # r = [0.01, 0.5, 0.1] (float64 of the float32 steps): median 0.1, max 0.5
    r = [abs(np.float64(np.float32(1.01)) - 1), 0.5, abs(np.float64(np.float32(4.4)) / 4 - 1)]
    assert m["step_median"] == float(np.median(r)) and m["step_max"] == 0.5
    assert m["scale_phase_moved"] is True
    assert m["step_movement_layers"]["a"] == {"median": float(np.median(r[:2])), "max": 0.5}
    assert transitions.split_steps(1000, 390) == (4, 250)
    assert transitions.split_steps(3, 5) == (1, 3)
    assert transitions.split_steps(7, 2) == (7, 1)        # a prime: one step per epoch


def test_failed_scale_phase_warns_and_is_recorded(setup):
    """A scale_lr that cannot move the steps: the transition warns, names the fix and records
    scale_phase_moved=False; it does not raise."""
    fp32, tr, te, cfg, configs = setup
    qm = quant.quantize_model(fp32, configs[0][1], a_bits=4)
    quant.calibrate_activations(qm, [next(iter(te))])
    slow = WalkConfig(scale_steps=1, scale_lr=1e-9, finetune_steps=1)
    with pytest.warns(RuntimeWarning, match=r"frontier walk 'B': the scale-only phase moved the "
                      r"switched layers' steps by a median of 0\.000% .*below 1%: the phase "
                      r"has failed; raise walk\.scale_lr \(now 1e-09\) or walk\.scale_steps"):
        rec = transitions.frontier_transition(qm, configs[1][1], tr, cfg, slow, label="B")
    assert rec["scale_phase_moved"] is False and rec["step_median"] < 1e-6
    assert rec["steps"] == 2 and [h["phase"] for h in rec["history"]] == ["scale", "finetune"]


def test_resume_mid_walk_is_bit_identical(setup, walked, tmp_path, monkeypatch):
    """Interrupted after the first epoch checkpoint of point B's fine-tune, the rerun reads A
    back (no QAT), resumes B at its second fine-tune epoch and trains C: every point's weights,
    steps, BN statistics, top-1, per-image bits and .hmq bytes equal the uninterrupted walk's."""
    points, _, _ = walked
    real_save = train.atomic_torch_save

    class Interrupted(Exception):
        pass

    def save_then_stop(obj, path):
        real_save(obj, path)
        if str(path).endswith("finetune.pt") and obj["epoch"] == 0:
            raise Interrupted(path)

    monkeypatch.setattr(train, "atomic_torch_save", save_then_stop)
    with pytest.raises(Interrupted):
        _walk(setup, tmp_path)
    b_folder = tmp_path / points[1].run_id
    assert (tmp_path / points[0].run_id / "result.json").exists()
    assert load_checkpoint(b_folder / "finetune.pt")["epoch"] == 0
    assert not (b_folder / "result.json").exists()

    saved = []
    monkeypatch.setattr(train, "atomic_torch_save",
                        lambda obj, path: (saved.append((str(path), obj["epoch"])),
                                           real_save(obj, path)))
    monkeypatch.setattr(train, "qat", lambda *a, **k: pytest.fail("point A must not retrain"))
    resumed = _walk(setup, tmp_path)
    assert [p.cached for p in resumed] == [True, False, False]
    assert [e for p, e in saved if p.startswith(str(b_folder))] == [1]   # B: epoch 2 only
    for ref, got in zip(points, resumed):
        assert got.run_id == ref.run_id
        a, b = _model_state(ref), _model_state(got)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), ref.label
        for key in ("top1", "loss", "correct", "step_median", "step_max", "bit_config",
                    "changed_layers", "cumulative_steps"):
            assert got.record[key] == ref.record[key], (ref.label, key)
        assert (got.folder / "model.hmq").read_bytes() == (ref.folder / "model.hmq").read_bytes()


def test_a_finished_walk_is_read_back_without_training(setup, walked, monkeypatch):
    points, _, run_dir = walked
    monkeypatch.setattr(train, "fit", lambda *a, **k: pytest.fail("nothing may train"))
    again = _walk(setup, run_dir)
    assert all(p.cached for p in again)
    assert [p.record["top1"] for p in again] == [p.record["top1"] for p in points]


def test_every_exported_point_reloads_exactly(setup, walked):
    """model.hmq → load_packed gives the trained model's outputs exactly (torch.equal); the
    ONNX file, run in onnxruntime, agrees with it within the runtime's float rounding."""
    fp32, _, te, _, _ = setup
    points, _, _ = walked
    x, y = next(iter(te))
    for p in points:
        model = hwalk.load_point_model(fp32, p)
        assert quant.bit_config_of(model) == p.record["bit_config"]
        with torch.no_grad():
            ref = model(x)
            assert torch.equal(export.load_packed(p.record["hmq"], fp32)(x), ref)
        assert train.evaluate(model, te)["top1"] == p.record["top1"]
        test = train.evaluate(model, TEST, per_image=True)
        assert p.record["test_top1"] == test["top1"] and p.record["n_test"] == 24
        assert np.array_equal(runs.unpack_correct(p.record["test_correct"], 24), test["correct"])
        assert np.array_equal(runs.unpack_correct(p.record["correct"], 16),
                              train.evaluate(model, te, per_image=True)["correct"])
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            assert p.record["onnx"] is None and "pip install" in p.record["onnx_skipped"]
            continue
        from hmqat import onnx_export
        res = onnx_export.check_onnx(model, p.record["onnx"], [(x, y)])
        # Not torch.equal: onnxruntime sums each convolution in another order, and a one-ulp
        # difference can move an activation across a rounding boundary of Eq. Q, changing that
        # code by a whole step downstream (check_onnx's docstring). The bound is the one
        # tests/test_onnx_export.py uses for ResNet-20: logits within a tenth of their spread.
        spread = float(ref.std())
        assert res["top1_agreement"] >= 90 and res["mean_abs_logit_diff"] < 0.1 * spread
        assert p.record["onnx_skipped"] is None


def test_onnx_missing_is_skipped_with_its_reason(setup, tmp_path, monkeypatch):
    """Without onnx a (one-point) walk still writes model.hmq and records why ONNX is missing."""
    monkeypatch.setitem(sys.modules, "onnx", None)     # `import onnx` raises ImportError
    (point,) = _walk(setup, tmp_path, configs=setup[4][:1])
    assert point.record["onnx"] is None and not (point.folder / "model.onnx").exists()
    assert point.record["onnx_skipped"].startswith(
        "hmqat.onnx_export needs the optional extra: pip install 'hmqat[onnx]'")
    assert (point.folder / "model.hmq").exists() and point.record["cumulative_steps"] == 2


@pytest.mark.parametrize("case, match", [
    ("empty", r"configs is empty; give \[\(label, bit_config\), \.\.\.\] from the largest model "
              r"to the smallest"),
    ("increasing", r"configs\[1\] \('A'\) is [\d.]+ MB, not smaller than configs\[0\] \('B'\) "
                   r"at [\d.]+ MB; .*order configs by decreasing size"),
    ("equal", r"configs\[1\] \('A2'\) is [\d.]+ MB, not smaller than .*drop configs of equal "
              r"size"),
    ("unknown", r"configs\[1\] \('B'\): invalid bit config:\n  unknown layer 'layer9.conv'"),
    ("label", r"configs\[1\] label 'A' is used twice"),
    ("transition", r"enables precision transitions, but the frontier walk makes its own"),
    ("walk", r"walk.scale_lr=0; use a learning rate > 0"),
])
def test_bad_input_is_one_clear_error_before_anything_is_written(setup, tmp_path, case, match):
    fp32, tr, te, cfg, configs = setup
    (la, a), (lb, b), _ = configs
    kw: dict = {}
    if case == "empty":
        kw["configs"] = []
    elif case == "increasing":
        kw["configs"] = [(lb, b), (la, a)]
    elif case == "equal":
        kw["configs"] = [(la, a), ("A2", dict(a))]
    elif case == "unknown":
        kw["configs"] = [(la, a), (lb, {**b, "layer9.conv": 4})]
    elif case == "label":
        kw["configs"] = [(la, a), (la, b)]
    elif case == "walk":
        kw["walk"] = {"scale_steps": 2, "scale_lr": 0, "finetune_steps": 4}
    if case == "transition":
        with pytest.raises(WalkError, match=match):
            hwalk.walk_frontier(fp32, configs, {"transition": {"enabled": True}}, tr, te, cfg,
                                WALK, run_dir=tmp_path)
    else:
        with pytest.raises(WalkError, match=match):
            _walk(setup, tmp_path, **kw)
    assert list(tmp_path.iterdir()) == []
