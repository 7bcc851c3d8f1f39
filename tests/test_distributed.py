"""Data-parallel training (issue 8): 2 CPU processes with gloo, launched by torchrun.

This file is also the worker: ``torchrun --nproc_per_node=2 tests/test_distributed.py OUT``
runs :func:`_worker` on every rank, which saves what each rank ends up with to ``OUT``; the
tests compare the ranks with each other and with one process on the same global batch.

Exactness: with ``freeze_bn=True`` (BN in eval mode) N processes on per-rank batches of B/N
compute the gradient of one process on batch B, up to float summation order, so parameters
agree to ~1e-6. With per-rank BN statistics (the default) they agree only approximately, since
BN normalises each rank's half batch with that half's own mean and variance.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from hmqat import data, distributed, models, quant, train
from hmqat.study import cli
from torchrun_helpers import free_port, torchrun

PER_RANK, WORLD = 8, 2
# NCHW: with channels_last, oneDNN picks batch-size-dependent conv algorithms, so a rank's half
# batch and one process's full batch round differently (~1e-3 after this short, high-lr run).
CFG = dict(epochs=2, lr=0.05, step_lr=0.005, max_steps_per_epoch=2, freeze_bn=True,
           channels_last=False)


# --------------------------------------------------------------------------------------------
# Shared set-up (parent and workers build the same thing)
# --------------------------------------------------------------------------------------------
def _setup(batch: int):
    """FP32 ResNet-20, uniform 4-bit config, an unshuffled train loader, val set, calibration."""
    torch.manual_seed(0)
    fp32 = models.create_model("resnet20").eval()
    config = quant.uniform_config(fp32, 4)
    tr = data.synthetic_cifar(64, seed=0)
    train_loader = data.make_loader(tr, batch)          # sequential: batches are index slices
    val_loader = data.make_loader(data.synthetic_cifar(37, seed=1), 16)  # 37: uneven shards
    calib = data.calibration_batches(tr, n_samples=32, batch_size=16, seed=0)
    return fp32, config, train_loader, val_loader, calib


def _qat(batch: int, checkpoint: str | None = None, callbacks=()):
    fp32, config, tr, va, calib = _setup(batch)
    return train.qat(fp32, config, tr, va, train.TrainConfig(**CFG, checkpoint=checkpoint),
                     calib_batches=calib, callbacks=callbacks, device="cpu")


class _Interrupt(train.Callback):
    def on_step_start(self, state):
        if state.step == 3:
            raise KeyboardInterrupt


class _LazyReinit(train.Callback):
    """At step 1 activation quantizers re-init from the next (rank-local) batch."""

    def on_step_start(self, state):
        if state.step == 1:
            for m in state.model.modules():
                if isinstance(m, quant.LSQQuantizer) and not m.is_weight:
                    m.set_bits(m.bits, reinit="mse")


def _steps(model):
    return torch.cat([m.step.detach().flatten() for m in model.modules()
                      if isinstance(m, quant.LSQQuantizer)])


def _worker(out: Path) -> None:
    """Runs on every rank under torchrun; writes rank<r>.pt / rank<r>.json to ``out``."""
    import torch.distributed as dist

    dev = distributed.init_from_env(device="cpu")
    r = distributed.rank()
    res: dict = {"rank": r, "world": distributed.world_size(), "device": str(dev)}

    # 1. DDP's constructor syncs steps calibrated on different data, and the python mirrors.
    fp32, config, tr, va, calib = _setup(PER_RANK)
    qm = quant.quantize_model(fp32, config, a_bits=4)
    if r == 0:
        quant.calibrate_activations(qm, [b for b in tr][:2])
    else:  # rank 1: other data for one quantizer set, and one quantizer left uninitialised
        quant.calibrate_activations(qm, [b for b in tr][2:4])
        act = [m for m in qm.modules() if isinstance(m, quant.LSQQuantizer) and not m.is_weight]
        act[-1].mark_initialized(False)
    res["steps_before"] = _steps(qm).tolist()
    ddp = distributed.wrap_ddp(qm, dev)
    res["steps_after_wrap"] = _steps(qm).tolist()
    res["all_flags_after_wrap"] = all(m._init_flag for m in qm.modules()
                                      if isinstance(m, quant.LSQQuantizer) and not m.is_weight)
    del ddp

    # 2. a sharded TensorLoader of another layout is refused with a clear message
    try:
        distributed.shard_train_loader(data.make_loader(tr.data, 8, rank=1, world_size=4))
    except distributed.DistributedConfigError as exc:
        res["shard_error"] = str(exc)

    # 3. DDP QAT: per-rank batch 8 (global 16), checkpointed every epoch
    qmodel, hist = _qat(PER_RANK, checkpoint=str(out / "ref.pt"))
    torch.save(qmodel.state_dict(), out / f"qat{r}.pt")
    res["history"] = hist
    res["state_dict_keys_plain"] = not any(k.startswith("module.")
                                           for k in torch.load(out / "ref.pt", weights_only=False)["model"])
    # after fit the DDP hooks are gone: a local backward gives rank-local gradients
    x, y = [b for b in tr][r]
    torch.nn.functional.cross_entropy(qmodel.train()(x), y).backward()
    g = next(p for p in qmodel.parameters() if p.grad is not None).grad.flatten()[:4]
    gathered = [None] * WORLD
    dist.all_gather_object(gathered, g.tolist())
    res["grads_differ_after_fit"] = gathered[0] != gathered[1]

    # 4. resume under DDP: interrupted in epoch 2, rerun -> the uninterrupted result
    try:
        _qat(PER_RANK, checkpoint=str(out / "resume.pt"), callbacks=[_Interrupt()])
    except KeyboardInterrupt:
        res["interrupted"] = True
    resumed, hist2 = _qat(PER_RANK, checkpoint=str(out / "resume.pt"))
    torch.save(resumed.state_dict(), out / f"resumed{r}.pt")
    res["history_resumed"] = hist2

    # 5. a step re-initialised lazily from a rank-local batch is re-broadcast
    lazy, _ = _qat(PER_RANK, callbacks=[_LazyReinit()])
    torch.save(_steps(lazy), out / f"lazy{r}.pt")

    # 6. the command line, inside the same process group (`-m hmqat.study.cli` calls run())
    cli.run(["qat", "--profile", "smoke", "--uniform", "4", "--epochs", "1",
             "--max-steps", "2", "--batch-size", "32", "--device", "cpu",
             "--run-dir", str(out / "cli")])

    (out / f"rank{r}.json").write_text(json.dumps(res))
    distributed.cleanup()


# --------------------------------------------------------------------------------------------
# Launching
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    proc = torchrun([str(Path(__file__).resolve()), str(out)], world=WORLD,
                    env={"TQDM_DISABLE": "1"})
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return out, ranks, proc.stdout


def _assert_same_state(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if tol and a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], msg=k, **tol)
        else:
            assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------
def test_wrapping_after_calibration_syncs_steps_and_flags(ddp_run):
    _, (r0, r1), _ = ddp_run
    assert (r0["world"], r0["device"]) == (2, "cpu")
    assert r0["steps_before"] != r1["steps_before"]          # calibrated on different batches
    assert r0["steps_after_wrap"] == r1["steps_after_wrap"] == r0["steps_before"]
    assert r1["all_flags_after_wrap"]                        # rank 0's `initialized` adopted


def test_ddp_qat_keeps_ranks_identical_and_matches_one_process(ddp_run):
    out, (r0, r1), _ = ddp_run
    s0, s1 = (torch.load(out / f"qat{r}.pt") for r in range(WORLD))
    _assert_same_state(s0, s1)                               # bit-identical across ranks
    assert r0["history"] == r1["history"]                    # every rank reports the same
    assert r0["state_dict_keys_plain"]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like the OMP_NUM_THREADS=1 ranks: thread count changes rounding
    try:
        single, hist = _qat(PER_RANK * WORLD)                # one process, same global batch
    finally:
        torch.set_num_threads(threads)
    fp32, config, _, val_loader, calib = _setup(PER_RANK)
    calibrated = _steps(quant.calibrate_activations(quant.quantize_model(fp32, config), calib))
    assert not torch.allclose(_steps(single), calibrated)    # the steps did train
    _assert_same_state(single.state_dict(), s0, rtol=1e-4, atol=1e-5)
    for h_ddp, h_one in zip(r0["history"], hist):
        assert h_ddp["train_loss"] == pytest.approx(h_one["train_loss"], rel=1e-4)
        assert h_ddp["val_loss"] == pytest.approx(h_one["val_loss"], rel=1e-4)

    ddp_model = quant.quantize_model(fp32, config)          # rank 0's weights, one process:
    ddp_model.load_state_dict(s0)                            # the all-reduced evaluation over
    ev = train.evaluate(ddp_model, val_loader)               # uneven shards (19 + 18 images)
    assert ev["n"] == 37 and ev["top1"] == r0["history"][-1]["val_top1"]
    assert ev["loss"] == pytest.approx(r0["history"][-1]["val_loss"], rel=1e-6)


def test_fit_removes_ddp_hooks_and_refuses_foreign_shards(ddp_run):
    _, (r0, _), _ = ddp_run
    assert r0["grads_differ_after_fit"]
    assert "sharded as rank 1/4 but this process is rank 0/2" in r0["shard_error"]


def test_resume_under_ddp_is_exact(ddp_run):
    out, (r0, r1), _ = ddp_run
    assert r0["interrupted"] and r1["interrupted"]
    for r in range(WORLD):
        _assert_same_state(torch.load(out / f"resumed{r}.pt"), torch.load(out / f"qat{r}.pt"))
    assert [h["val_loss"] for h in r0["history_resumed"]] == [h["val_loss"] for h in r0["history"]]


def test_lazily_reinitialised_steps_are_rebroadcast(ddp_run):
    out, _, _ = ddp_run
    torch.testing.assert_close(torch.load(out / "lazy0.pt"), torch.load(out / "lazy1.pt"),
                               rtol=0, atol=0)


def test_cli_qat_two_processes(ddp_run):
    out, _, stdout = ddp_run
    runs = sorted((out / "cli").iterdir())                # hmqat.study.runs: one folder per run
    assert len(runs) == 1
    ck = runs[0] / "checkpoint.pt"
    result = json.loads((runs[0] / "result.json").read_text())
    assert result["run_id"] == runs[0].name and 0 <= result["top1"] <= 100
    assert stdout.count("[hmqat] qat done on 2 process(es)") == 1        # rank 0 prints
    assert stdout.count("resumed from") == 1                             # rank 0 prints
    summary = json.loads(ck.with_suffix(".json").read_text())
    assert summary["world_size"] == 2 and summary["settings"]["arch"] == "resnet20"
    assert len(summary["history"]) == 1 and 0 <= summary["history"][0]["val_top1"] <= 100
    assert "module." not in "".join(torch.load(ck, weights_only=False)["model"])


def test_cli_and_wrap_errors(tmp_path):
    with pytest.raises(distributed.DistributedConfigError, match="needs a process group"):
        distributed.wrap_ddp(torch.nn.Linear(2, 2))
    with pytest.raises(distributed.DistributedConfigError, match="--config FILE.json"):
        cli.run(["qat", "--profile", "smoke", "--device", "cpu",
                 "--run-dir", str(tmp_path / "x")])
    with pytest.raises(distributed.DistributedConfigError, match="pass --run-dir DIR instead"):
        cli.run(["qat", "--profile", "smoke", "--device", "cpu", "--uniform", "4",
                 "--checkpoint", str(tmp_path / "x.pt")])
    with pytest.raises(distributed.DistributedConfigError, match=r"FP32 checkpoint .*fp32-resnet20"
                       r".pt not found; run `-m hmqat.study.cli finetune`"):
        cli.run(["qat", "--profile", "smoke", "--device", "cpu", "--uniform", "4",
                         "--results", str(tmp_path / "nothing")])
    cfgs = tmp_path / "configs.json"
    cfgs.write_text(json.dumps({"a": {"config": {}}, "b": {"config": {}}}))
    with pytest.raises(distributed.DistributedConfigError, match=r"several configs \['a', 'b'\]"):
        cli.run(["qat", "--profile", "smoke", "--device", "cpu", "--config", str(cfgs),
                 "--run-dir", str(tmp_path / "x")])


def test_sync_bn_on_cpu_is_refused():
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    try:
        with pytest.raises(distributed.DistributedConfigError, match="sync_bn=True needs CUDA"):
            distributed.wrap_ddp(models.create_model("resnet20"), "cpu", sync_bn=True)
    finally:
        dist.destroy_process_group()


def test_imagenet_path_end_to_end(tmp_path):
    """finetune + QAT + evaluation of torchvision ResNet18 through imagenet_loaders."""
    root = data.write_synthetic_imagefolder(tmp_path / "inet", num_classes=4, per_class=4,
                                            image_size=40, splits=("train", "val"))
    tr, va = data.imagenet_loaders(root, batch_size=4, workers=0, image_size=32, num_classes=4)
    cfg = train.TrainConfig(epochs=1, lr=0.01, max_steps_per_epoch=2,
                            checkpoint=str(tmp_path / "fp32.pt"))
    fp32, hist = train.finetune("resnet18", tr, va, cfg, pretrained=False, device="cpu")
    assert fp32.fc.out_features == 4 and hist[0]["val_top1"] >= 0
    config = quant.uniform_config(fp32, 4)
    qmodel, qhist = train.qat(fp32, config, tr, va, train.TrainConfig(
        epochs=1, lr=0.01, step_lr=0.001, max_steps_per_epoch=2), device="cpu")
    ev = train.evaluate(qmodel, va)
    assert ev["n"] == 16 and ev["top1"] == qhist[-1]["val_top1"]
    assert quant.compression_ratio(qmodel) > 1


def test_study_reads_imagenet_for_the_notebooks(tmp_path, monkeypatch):
    """What notebooks 00-03 call on a Study with dataset="imagenet" (tiny ImageFolder)."""
    from hmqat.study.pipeline import Study

    root = data.write_synthetic_imagefolder(tmp_path / "inet", num_classes=4, per_class=3,
                                            image_size=40, splits=("train", "val"))
    monkeypatch.setenv("HMQAT_DATA_DIR", str(root))
    study = Study(str(tmp_path / "res"), profile="t", arch="resnet18", dataset="imagenet",
                  device="cpu", batch_size=4, pretrained=False, image_size=32, workers=0)
    train_split = study.data("train")
    assert len(train_split) == 12 and len(train_split.classes) == 4 and study.input_size[-1] == 32
    calib = data.calibration_batches(train_split, n_samples=6, batch_size=4, seed=0)  # nb 01
    assert [tuple(x.shape) for x, _ in calib] == [(4, 3, 32, 32), (2, 3, 32, 32)]
    cfg = train.TrainConfig(epochs=1, lr=0.01, max_steps_per_epoch=1,
                            checkpoint=str(study.fp32_checkpoint))
    model, hist = train.finetune("resnet18", train_split, study.data("test"), cfg,   # nb 00
                                 batch_size=4, device="cpu", pretrained=False)
    assert model.fc.out_features == 4 and study.fp32_model().fc.out_features == 4
    assert len(study.train_loader()) == 3 and len(study.test_loader().dataset) == 12  # nb 03
    assert study.data_label == ("ImageNet (ImageFolder); no validation split; test = ImageNet's "
                                "validation set")


def test_cli_results_folder_is_reused_by_the_notebooks(tmp_path, capsys):
    """`-m hmqat.study.cli finetune|qat --results DIR` writes the checkpoints notebooks 00
    and 03 look for; their calls then return the finished runs without training."""
    from hmqat import transitions
    from hmqat.study import pipeline, runs

    res = tmp_path / "smoke"
    common = ["--profile", "smoke", "--device", "cpu", "--results", str(res)]
    fp32_hist = cli.run(["finetune", *common])
    qat_hist = cli.run(["qat", *common, "--uniform", "4"])
    p = pipeline.load_params("smoke")
    c, nb0, nb3 = p["common"], p["notebooks"]["00_fp32_baseline"], p["notebooks"]["03_qat"]
    study = pipeline.Study(str(res), profile="smoke", arch=c["arch"], dataset=c["dataset"],
                           device="cpu", batch_size=c["batch_size"], n_synthetic=c["n_synthetic"],
                           pretrained=c["pretrained"])
    capsys.readouterr()
    _, hist = train.finetune(c["arch"], study.data("train"), study.data("test"), train.TrainConfig(
        epochs=nb0["fp32_epochs"], lr=nb0["fp32_lr"], weight_decay=nb0["fp32_wd"], seed=0,
        max_steps_per_epoch=nb0["max_steps_per_epoch"], checkpoint=str(study.fp32_checkpoint)),
        batch_size=c["batch_size"], device="cpu", pretrained=c["pretrained"])
    assert hist == fp32_hist
    fp32 = study.fp32_model()
    config = quant.uniform_config(fp32, 4, policy=c["policy"])
    cfg = train.TrainConfig(epochs=nb3["qat_epochs"], lr=nb3["qat_lr"], step_lr=nb3["step_lr"],
                            weight_decay=nb3["qat_wd"], seed=0,
                            max_steps_per_epoch=nb3["max_steps_per_epoch"])
    run = runs.qat_run(fp32, config, transitions.Recipe.from_dict(nb3["recipe"]),   # nb 03's call
                       study.train_loader(), study.test_loader(), cfg, run_dir=study.qat_dir,
                       a_bits=c["a_bits"], policy=c["policy"], init=c["init"], device="cpu",
                       input_size=study.input_size, data=study.data_key,
                       eval_each_epoch=True, keep_model=True)
    assert run.cached and run.record["history"] == qat_hist
    assert run.model is not None
    assert capsys.readouterr().out.count("resumed from") == 2


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
