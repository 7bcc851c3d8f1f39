"""A checkpoint is data, never code: a pickle whose ``__reduce__`` would create a marker file is
refused by every loader hmqat has, each error naming the file; and results are written by the
atomic writers only."""
import os
import re
from pathlib import Path

import pytest
import torch

from hmqat import data, export, models, runtime, train
from hmqat.study import cli, pipeline

ROOT = Path(__file__).resolve().parent.parent


class _Payload:
    """Unpickling this calls os.system (what a hostile checkpoint on a shared disk would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _evil(path, marker, wrap=True):
    """A torch checkpoint at ``path`` that runs ``touch marker`` when unpickled in full."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"identity": {}, "model": _Payload(marker)} if wrap else _Payload(marker), path)
    return path


def test_the_payload_is_live_when_loaded_unsafely(tmp_path):
    """Control: torch.load(weights_only=False), as hmqat did, runs the payload."""
    marker = tmp_path / "ran"
    torch.load(_evil(tmp_path / "c.pt", marker), weights_only=False)
    assert marker.exists()


@pytest.fixture
def evil(tmp_path):
    marker = tmp_path / "PWNED"
    yield lambda path, wrap=True: _evil(path, marker, wrap)
    assert not marker.exists(), "a loader ran code from a checkpoint"


def test_load_checkpoint(evil, tmp_path):
    ck = evil(tmp_path / "x.pt")
    with pytest.raises(runtime.CheckpointError, match=rf"{ck}: refused to load: it holds objects "
                                                    r"other than tensors.*never runs code"):
        runtime.load_checkpoint(ck)


def test_train_resume(evil, tmp_path):
    ck = evil(tmp_path / "run" / "qat.pt")
    tr = data.make_loader(data.synthetic_cifar(64, seed=0), 32, train=True)
    with pytest.raises(runtime.CheckpointError, match=rf"{ck}: refused to load"):
        train.fit(models.create_model("resnet20"), tr, None, train.TrainConfig(checkpoint=str(ck)))


def test_study_fp32_model(evil, tmp_path):
    study = pipeline.Study(str(tmp_path / "results"), dataset="synthetic", n_synthetic=64,
                           device="cpu")
    evil(study.fp32_checkpoint)
    with pytest.raises(runtime.CheckpointError, match=rf"{study.fp32_checkpoint}: refused to load"):
        study.fp32_model()


def test_distributed_command_line(evil, tmp_path):
    ck = evil(tmp_path / "fp32.pt", wrap=False)
    with pytest.raises(runtime.CheckpointError, match=rf"{ck}: refused to load"):
        cli.run(["qat", "--profile", "smoke", "--device", "cpu", "--fp32", str(ck),
                 "--uniform", "4", "--run-dir", str(tmp_path / "q")])
    assert not list((tmp_path / "q").rglob("*.pt"))


def test_decode_cache(evil, tmp_path, monkeypatch):
    monkeypatch.setenv("HMQAT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HMQAT_EXPECTED_COUNTS", "skip")        # a 1-image-per-class subset
    root = data.write_synthetic_imagefolder(tmp_path / "cifar", per_class=1)
    good = data.load_cifar10(root, "train")
    (cache,) = (tmp_path / "cache").glob("imagefolder-train-*.pt")
    evil(cache)
    with pytest.warns(RuntimeWarning, match=rf"decode cache {cache} is unusable .*refused to "
                                            r"load.*deleted it and decoding the images again"):
        again = data.load_cifar10(root, "train")
    assert torch.equal(again.images, good.images)


def test_export_load_packed(evil, tmp_path):
    path = evil(tmp_path / "model.hmq")
    with pytest.raises(export.PackedFormatError, match=rf"{path}: bad magic .* not an hmqat "
                                                       r"packed model file"):
        export.load_packed(path)


def test_models_load_pretrained(evil, tmp_path, monkeypatch):
    ckpt = models.PRETRAINED["resnet20"]
    path = evil(tmp_path / "weights" / ckpt.filename)
    monkeypatch.setenv("HMQAT_WEIGHTS_DIR", str(path.parent))
    with pytest.raises(models.WeightsError, match=rf"sha256 mismatch for {path}"):
        models.create_model("resnet20", pretrained=True)


def test_no_loader_unpickles_code():
    """Every torch.load in the package goes through weights_only=True."""
    for src in (ROOT / "hmqat").rglob("*.py"):
        for call in re.findall(r"torch\.load\([^)]*\)", src.read_text()):
            assert "weights_only=True" in call, (src.name, call)


def test_notebooks_write_results_through_the_atomic_writers():
    for nb in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py")):
        for line in nb.read_text().splitlines():
            if ".to_csv(" in line:   # only as text for atomic_write_text, never to a path
                assert re.search(r"\.to_csv\((index=False)?\)", line), (nb.name, line)
