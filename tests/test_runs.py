"""hmqat.study.runs.qat_run: the one trained QAT run of notebooks 03/04 and the command line.
Its identity covers the FP32 weights and the data, so a changed FP32 checkpoint or data split is a
new run (the stale-results bug), while an unchanged run resumes without training."""
import copy

import pandas as pd

import pytest
import torch

from hmqat import data, models, quant, runtime, search, train
from hmqat.study import runs
from hmqat.transitions import Recipe


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    fp32 = models.create_model("resnet20", pretrained=False).eval()
    tr_data, te_data = data.synthetic_cifar(32, seed=0), data.synthetic_cifar(16, seed=1)
    tr = data.make_loader(tr_data, 16, train=True, seed=0, drop_last=True)
    te = data.make_loader(te_data, 16)
    cfg = train.TrainConfig(epochs=1, lr=0.01, step_lr=0.001, max_steps_per_epoch=1, seed=0)
    return fp32, tr, te, cfg, quant.uniform_config(fp32, 4)


def _run(setup, tmp_path, **kw):
    fp32, tr, te, cfg, config = setup
    args = dict(run_dir=tmp_path, a_bits=4, init="lsq", device="cpu")
    args.update(kw)
    return runs.qat_run(args.pop("fp32", fp32), config, Recipe(), args.pop("tr", tr), te, cfg,
                        **args)


def test_unchanged_run_resumes_without_training(setup, tmp_path, monkeypatch):
    first = _run(setup, tmp_path)
    assert not first.cached and first.model is not None
    assert (first.folder / "result.json").exists() and (first.folder / "checkpoint.pt").exists()
    assert first.record["bops"] == quant.bops(first.model, input_size=(1, 3, 32, 32))

    def no_training(*a, **k):
        raise AssertionError("a finished run must not train again")

    monkeypatch.setattr(runs.train, "qat", no_training)
    again = _run(setup, tmp_path)
    assert again.cached and again.run_id == first.run_id and again.model is None
    assert again.record["top1"] == first.record["top1"]


def test_changed_fp32_weights_or_data_give_a_new_run(setup, tmp_path):
    fp32, tr, te, cfg, config = setup
    base = runs.run_identity(runtime_fp := runtime.model_fingerprint(fp32), config, Recipe(), cfg,
                             runs.data_key(tr, te, batch_size=16), a_bits=4,
                             policy="first_last_8", per_channel=True, init="lsq")[0]
    changed = copy.deepcopy(fp32)
    with torch.no_grad():
        next(changed.parameters()).add_(1e-3)          # a re-trained FP32 checkpoint
    assert runtime.model_fingerprint(changed) != runtime_fp
    new_fp32 = runs.run_identity(runtime.model_fingerprint(changed), config, Recipe(), cfg,
                                 runs.data_key(tr, te, batch_size=16), a_bits=4,
                                 policy="first_last_8", per_channel=True, init="lsq")[0]
    other = data.make_loader(data.synthetic_cifar(48, seed=0), 16, train=True, seed=0)
    new_data = runs.run_identity(runtime_fp, config, Recipe(), cfg,
                                 runs.data_key(other, te, batch_size=16), a_bits=4,
                                 policy="first_last_8", per_channel=True, init="lsq")[0]
    assert len({base, new_fp32, new_data}) == 3
    # end to end: the same call with re-trained FP32 weights trains a new run next to the old
    first = _run(setup, tmp_path)
    second = _run(setup, tmp_path, fp32=changed)
    assert not second.cached and second.run_id != first.run_id
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.run_id, second.run_id])


def test_keep_model_returns_the_trained_model_of_a_finished_run(setup, tmp_path):
    first = _run(setup, tmp_path)
    again = _run(setup, tmp_path, keep_model=True)
    assert again.cached and again.model is not None
    fp32, tr, te, cfg, config = setup
    assert train.evaluate(again.model, te)["top1"] == first.record["top1"]


def test_data_key_ignores_the_per_process_batch_and_names_unknown_data(setup):
    fp32, tr, te, cfg, config = setup
    assert runs.data_key(tr, te, batch_size=32) == runs.data_key(tr.data, te.data, batch_size=32)
    with pytest.raises(runs.RunError, match="cannot identify the data of a list"):
        runs.data_key([(torch.zeros(1, 3, 32, 32), torch.zeros(1))], te, batch_size=1)


def test_bops_at_the_study_input_size_agree_with_configs_json(tmp_path):
    """At 224 px (the ImageNet profile) a trained run's BOPs are what notebook 02 wrote into
    configs.json (search accounting at Study.input_size), ~49x the 32-px count."""
    torch.manual_seed(0)
    fp32 = models.create_model("resnet20", pretrained=False).eval()
    size = (1, 3, 224, 224)
    acct = search.model_inputs(fp32, a_bits=4, input_size=size)
    config = quant.uniform_config(fp32, 4)
    omega = pd.DataFrame({b: 1.0 for b in (4, 8)}, index=list(acct["n_params"]))
    planned = search.evaluate_config(config, omega, acct["n_params"], macs=acct["macs"],
                                     a_bits=acct["a_bits"], fixed=acct["fixed"],
                                     other_params=acct["other_params"],
                                     fp32_params=acct["fp32_params"])
    tr = data.make_loader(data.synthetic_cifar(4, seed=0, image_size=224), 2, train=True, seed=0,
                          drop_last=True)
    te = data.make_loader(data.synthetic_cifar(2, seed=1, image_size=224), 2)
    cfg = train.TrainConfig(epochs=1, lr=0.01, step_lr=0.001, max_steps_per_epoch=1, seed=0)
    run = runs.qat_run(fp32, config, Recipe(), tr, te, cfg, run_dir=tmp_path, a_bits=4,
                       device="cpu", input_size=size)
    assert run.record["bops"] == pytest.approx(planned.bops, rel=1e-12)
    at_32 = quant.bops(run.model, input_size=(1, 3, 32, 32))
    assert run.record["bops"] / at_32 == pytest.approx(49.0, rel=0.01)


def test_test_loader_is_read_once_into_test_top1_under_its_own_identity(setup, tmp_path):
    """qat_run(test_loader=): the eval loader (the validation hold-out in the study) gives
    top1, the test split is evaluated once after training into test_top1 (docs/method.md §8);
    a run that reads the test split is a different record from one that does not, and it
    resumes from result.json like any other."""
    fp32, tr, te, cfg, config = setup
    test = data.make_loader(data.synthetic_cifar(24, seed=7), 8)
    plain = _run(setup, tmp_path)
    with_test = _run(setup, tmp_path, test_loader=test)
    assert with_test.run_id != plain.run_id and "test_top1" not in plain.record
    expected = train.evaluate(with_test.model, test)
    assert with_test.record["test_top1"] == expected["top1"]
    assert with_test.record["n_test"] == 24 and with_test.record["n_val"] == 16
    again = _run(setup, tmp_path, test_loader=test)
    assert again.cached and again.run_id == with_test.run_id
    assert again.record["test_top1"] == with_test.record["test_top1"]


def test_records_keep_which_images_were_right(setup, tmp_path):
    """result.json keeps one bit per evaluated image, in loader order, for the eval split and
    the test split; they reproduce top1/test_top1 and survive the read-back of a finished run."""
    import numpy as np
    test = data.make_loader(data.synthetic_cifar(24, seed=7), 8)
    run = _run(setup, tmp_path, test_loader=test)
    ev = train.evaluate(run.model, setup[2], per_image=True)
    te = train.evaluate(run.model, test, per_image=True)
    val_bits = runs.unpack_correct(run.record["correct"], run.record["n_val"])
    test_bits = runs.unpack_correct(run.record["test_correct"], run.record["n_test"])
    assert np.array_equal(val_bits, ev["correct"]) and np.array_equal(test_bits, te["correct"])
    assert 100.0 * test_bits.mean() == pytest.approx(run.record["test_top1"])
    again = _run(setup, tmp_path, test_loader=test)
    m = runs.correct_matrix([again.record, run.record])
    assert m.shape == (2, 24) and np.array_equal(m[0], 100.0 * test_bits)
    assert runs.correct_matrix([{"test_top1": 1.0}]) is None   # a record from before the bits


def test_pack_correct_round_trips_and_refuses_a_wrong_length():
    import numpy as np
    bits = np.array([1, 0, 1, 1, 0, 0, 0, 1, 1, 1, 0], dtype=bool)
    assert np.array_equal(runs.unpack_correct(runs.pack_correct(bits), 11), bits)
    with pytest.raises(runs.RunError, match="corrupt"):
        runs.unpack_correct(runs.pack_correct(bits), 30)
    with pytest.raises(ValueError, match="per_image=True"):
        train.evaluate(models.create_model("resnet20", pretrained=False),
                       data.make_loader(data.synthetic_cifar(8, seed=0), 8),
                       per_image=True, all_reduce=True)
