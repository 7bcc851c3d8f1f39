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
