import pytest
import torch

from hmqat import data, models, runtime, train


def _setup(global_seed=0):
    runtime.seed_everything(0)
    model = models.create_model("resnet20")
    torch.manual_seed(global_seed)
    tr = data.make_loader(data.synthetic_cifar(96, seed=0), 32, train=True, seed=0)
    te = data.make_loader(data.synthetic_cifar(64, seed=1), 64)
    return model, tr, te


def test_evaluate_counts_and_restores_mode():
    model, _, te = _setup()
    model.train()
    ev = train.evaluate(model, te)
    assert ev["n"] == 64 and 0 <= ev["top1"] <= 100 and ev["loss"] > 0
    assert model.training


def test_training_learns_synthetic_data():
    model, tr, te = _setup()
    before = train.evaluate(model, te)["loss"]
    train.fit(model, tr, None, train.TrainConfig(epochs=3, lr=0.05))
    assert train.evaluate(model, te)["loss"] < before


class _Interrupt(train.Callback):
    def __init__(self, at_step):
        self.at_step = at_step

    def on_step_start(self, state):
        if state.step == self.at_step:
            raise KeyboardInterrupt


def test_interrupted_run_resumes_bit_identical(tmp_path):
    cfg = dict(epochs=3, lr=0.05)
    model, tr, te = _setup()
    ref = train.fit(model, tr, te, train.TrainConfig(**cfg, checkpoint=str(tmp_path / "a.pt")))
    ref_state = {k: v.clone() for k, v in model.state_dict().items()}

    ck = str(tmp_path / "b.pt")
    model, tr, te = _setup()
    with pytest.raises(KeyboardInterrupt):  # dies in the middle of epoch 2
        train.fit(model, tr, te, train.TrainConfig(**cfg, checkpoint=ck),
                  callbacks=[_Interrupt(at_step=len(tr) + 1)])
    model, tr, te = _setup(global_seed=123)  # a fresh process has another RNG state
    resumed = train.fit(model, tr, te, train.TrainConfig(**cfg, checkpoint=ck))
    assert [h["val_top1"] for h in resumed] == [h["val_top1"] for h in ref]
    assert [h["val_loss"] for h in resumed] == [h["val_loss"] for h in ref]
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref_state[k]), k


def test_checkpoint_of_another_run_is_refused(tmp_path):
    ck = str(tmp_path / "c.pt")
    model, tr, _ = _setup()
    train.fit(model, tr, None, train.TrainConfig(epochs=1, lr=0.05, checkpoint=ck))
    with pytest.raises(ValueError, match=r"another run \(differs in \['lr'\]\)"):
        train.fit(model, tr, None, train.TrainConfig(epochs=1, lr=0.01, checkpoint=ck))


def test_nan_loss_stops_without_writing(tmp_path):
    model, _, _ = _setup()
    bad = data.synthetic_cifar(32, seed=0)
    loader = [(torch.full((32, 3, 32, 32), float("nan")), bad.labels)]
    ck = tmp_path / "nan.pt"
    with pytest.raises(train.NonFiniteLossError, match="loss became nan.*Lower the learning rate"):
        train.fit(model, loader, None, train.TrainConfig(epochs=1, checkpoint=str(ck)))
    assert not ck.exists()


def test_bad_config_values():
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        train.TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="lr must be positive"):
        train.TrainConfig(lr=0)


def test_manifest_records_provenance():
    m = runtime.manifest(seed=7, profile="smoke")
    for key in ("git_sha", "git_dirty", "torch", "device", "seed", "profile", "python"):
        assert key in m
    assert m["seed"] == 7 and m["profile"] == "smoke"


def test_bad_max_steps_per_epoch_is_refused():
    with pytest.raises(ValueError, match=r"max_steps_per_epoch must be >= 1 .*got -1"):
        train.TrainConfig(max_steps_per_epoch=-1)
    with pytest.raises(ValueError, match=r"max_steps_per_epoch must be >= 1 .*got 0"):
        train.TrainConfig(max_steps_per_epoch=0)


def test_loader_shorter_than_a_batch_is_an_error_before_training(tmp_path):
    model, _, te = _setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    short = data.make_loader(data.synthetic_cifar(20, seed=0), 32, train=True, drop_last=True)
    ck = tmp_path / "zero.pt"
    with pytest.raises(ValueError, match=r"yields no batch \(dataset of 20 samples, batch_size "
                                         r"32, drop_last=True\).*smaller batch_size"):
        train.fit(model, short, te, train.TrainConfig(epochs=1, checkpoint=str(ck)))
    assert not ck.exists()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="yields no batch"):  # finetune: no "FP32 reference"
        train.finetune("resnet20", data.synthetic_cifar(20, seed=0), data.synthetic_cifar(64),
                       train.TrainConfig(epochs=1), batch_size=32, pretrained=False,
                       device="cpu")


def test_huge_lr_is_not_reported_as_trained(tmp_path):
    """lr = 1e6: the training loss stays finite, the model does not; nothing is saved."""
    model, tr, te = _setup()
    ck = tmp_path / "huge.pt"
    with pytest.raises(train.NonFiniteLossError,
                       match=r"epoch 1/2: the model is not finite: .*no good epoch yet"):
        train.fit(model, tr, te, train.TrainConfig(epochs=2, lr=1e6, checkpoint=str(ck)))
    assert not ck.exists()


class _PoisonBN(train.Callback):
    """At the start of epoch 2: remember the checkpoint's bytes, then make a BN buffer inf."""

    def __init__(self, ck):
        self.ck, self.saved = ck, None

    def on_epoch_start(self, state):
        if state.epoch == 1:
            self.saved = self.ck.read_bytes()
            state.model.layer2[0].bn1.running_var.fill_(float("inf"))


def test_nonfinite_buffer_names_the_tensor_and_keeps_the_last_checkpoint(tmp_path):
    model, tr, te = _setup()
    ck = tmp_path / "bn.pt"
    poison = _PoisonBN(ck)
    with pytest.raises(train.NonFiniteLossError,
                       match=r"epoch 2/2: the model is not finite: .*buffer "
                             r"layer2\.0\.bn1\.running_var \(32 of 32 values NaN/inf\).*"
                             r"last good checkpoint .*bn\.pt is unchanged"):
        train.fit(model, tr, None, train.TrainConfig(epochs=2, lr=0.05, checkpoint=str(ck)),
                  callbacks=[poison])
    assert ck.read_bytes() == poison.saved
    with pytest.raises(train.NonFiniteLossError, match=r"evaluate\(\): the loss is .* and "
                                                      r"buffer layer2\.0\.bn1\.running_var"):
        train.evaluate(model, te)   # no top-1 from NaN outputs


_KILLED_RUN = """
import os, signal, sys, torch
from hmqat import data, models, runtime, train
torch.set_num_threads(int(sys.argv[2]))     # the parent's: float sums depend on the thread count
runtime.seed_everything(0)
model = models.create_model("resnet20")
tr = data.make_loader(data.synthetic_cifar(96, seed=0), 32, train=True, seed=0)
te = data.make_loader(data.synthetic_cifar(64, seed=1), 64)
class Kill(train.Callback):
    def on_step_start(self, state):
        if state.step == len(tr) + 1:          # in the middle of epoch 2
            os.kill(os.getpid(), signal.SIGKILL)
train.fit(model, tr, te, train.TrainConfig(epochs=3, lr=0.05, checkpoint=sys.argv[1]),
          callbacks=[Kill()])
"""


def test_resume_after_kill_9_is_bit_identical(tmp_path):
    import signal
    import subprocess
    import sys

    cfg = dict(epochs=3, lr=0.05)
    model, tr, te = _setup()
    ref = train.fit(model, tr, te, train.TrainConfig(**cfg, checkpoint=str(tmp_path / "a.pt")))
    ref_state = {k: v.clone() for k, v in model.state_dict().items()}
    ck = tmp_path / "k.pt"
    proc = subprocess.run([sys.executable, "-c", _KILLED_RUN, str(ck), str(torch.get_num_threads())],
                          capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert runtime.load_checkpoint(ck)["epoch"] == 0     # killed in epoch 2: epoch 1 on disk
    model, tr, te = _setup(global_seed=123)
    resumed = train.fit(model, tr, te, train.TrainConfig(**cfg, checkpoint=str(ck)))
    assert [h["val_loss"] for h in resumed] == [h["val_loss"] for h in ref]
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref_state[k]), k


def test_finite_but_diverged_qat_warns_naming_the_largest_parameter():
    """QAT at lr = 1e6 stays finite (|param| ~1e14, loss ~1e9): a warning, not silence."""
    from hmqat import quant

    model, tr, te = _setup()
    with pytest.warns(RuntimeWarning, match=r"epoch [12]/2: train_loss=.* nats, far above chance "
                                            r"level: the run has diverged \(largest \|parameter\| "
                                            r".* in .*\); lower the learning rate"):
        train.qat(model, quant.uniform_config(model, 4), tr, None,
                  train.TrainConfig(epochs=2, lr=1e6))
