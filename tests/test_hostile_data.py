"""Hostile data and weight files (issue 28, items 2-4): checkpoint paths given as parameters
resolve against the repository root; a missing checkpoint says "not found", a damaged one
"truncated or corrupt"; a plain state dict loads wherever an hmqat checkpoint does; weights of
another architecture name the file and both architectures; the decode cache is optional (a
cache that cannot be written or is not a folder warns once, naming it, and the load goes on); a
half-copied split is refused before decoding; a bit-flipped decode cache is caught by its
digest. Every tree here is a few PNG/JPEG files in tmp_path, never the real dataset."""
from __future__ import annotations

import errno
import os
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from hmqat import data, models, runtime
from hmqat.study import cli, pipeline

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def _tree(root: Path, counts: dict[str, dict[str, int]], fmt: str = "PNG") -> Path:
    """An ImageFolder tree root/<split>/<class>/*.png|jpg of 32x32 RGB images written with PIL:
    ``counts[split][class]`` images per class (every CIFAR-10 class folder exists, possibly
    empty, as after a copy that stopped part-way)."""
    g = torch.Generator().manual_seed(0)
    ext = "png" if fmt == "PNG" else "jpg"
    for split, per_class in counts.items():
        for c in data.CIFAR10_CLASSES:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class.get(c, 0)):
                px = torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8)
                Image.fromarray(px.numpy()).save(d / f"{i:04d}.{ext}", fmt)
    return root


def _uniform(n: int, splits=("train", "test")) -> dict[str, dict[str, int]]:
    return {s: {c: n for c in data.CIFAR10_CLASSES} for s in splits}


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("HMQAT_CACHE_DIR", str(folder))
    return folder


def _no_decoding(monkeypatch):
    """Make any decode fail loudly: the check under test must come before decoding."""
    def refuse(files):
        raise AssertionError("images were decoded before the check")
    monkeypatch.setattr(data, "_decode_files", refuse)


# --------------------------------------------------------------------------------------------
# Item 2: fp32_checkpoint paths and formats
# --------------------------------------------------------------------------------------------
def test_param_path_is_relative_to_the_repository_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                      # a notebook kernel runs in notebooks/
    assert runtime.REPO_ROOT == pipeline.ROOT == ROOT
    assert runtime.param_path("results/x.pt") == ROOT / "results" / "x.pt"
    assert runtime.param_path("/abs/x.pt") == Path("/abs/x.pt")
    assert runtime.param_path("~/x.pt") == Path.home() / "x.pt"
    assert runtime.param_path("x.pt", base=tmp_path) == tmp_path / "x.pt"


def test_missing_checkpoint_says_not_found_with_the_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(runtime.CheckpointNotFoundError) as info:
        runtime.load_checkpoint("ckpts/fp32.pt")
    msg = str(info.value)
    assert msg == (f"ckpts/fp32.pt: checkpoint not found: no file {tmp_path}/ckpts/fp32.pt (the "
                   f"relative path 'ckpts/fp32.pt' was resolved against the current folder "
                   f"{tmp_path}); check the path (an absolute path avoids surprises), or create "
                   f"the checkpoint first")
    assert "corrupt" not in msg and "delete" not in msg
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value,
                                                                    runtime.CheckpointError)


def test_existing_damaged_checkpoint_says_corrupt_not_missing(tmp_path):
    ck = tmp_path / "fp32.pt"
    torch.save(models.create_model("resnet20").state_dict(), ck)
    ck.write_bytes(ck.read_bytes()[:2000])
    with pytest.raises(runtime.CheckpointError, match=rf"^{ck}: not a readable torch checkpoint "
                       r"\(.*\); the file is truncated or corrupt: delete it") as info:
        runtime.load_checkpoint(ck)
    assert not isinstance(info.value, runtime.CheckpointNotFoundError)
    assert "not found" not in str(info.value)


def test_a_folder_is_not_called_a_corrupt_checkpoint(tmp_path):
    with pytest.raises(runtime.CheckpointError, match=rf"^{tmp_path}: is a folder, not a "
                       r"checkpoint file; pass the path of the checkpoint file itself$"):
        runtime.load_checkpoint(tmp_path)


def _study(tmp_path) -> pipeline.Study:
    return pipeline.Study(str(tmp_path / "results"), dataset="synthetic", n_synthetic=64,
                          device="cpu")


def test_fp32_checkpoint_parameter_resolves_from_the_repository_root(tmp_path, monkeypatch):
    """notebook 01's ``fp32_checkpoint`` relative to the repository root, whatever the current
    folder (the kernel's is notebooks/); a plain state dict is accepted."""
    src = models.create_model("resnet20")
    ck = tmp_path / "weights" / "fp32.pt"
    ck.parent.mkdir()
    torch.save(src.state_dict(), ck)                 # the format hmqat's own messages advise
    rel = os.path.relpath(ck, ROOT)                  # "../../tmp/.../weights/fp32.pt"
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")
    study = _study(tmp_path)
    model = study.fp32_model(rel)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 src.state_dict().values()))
    assert not model.training


def test_missing_fp32_checkpoint_parameter_names_it_and_the_fix(tmp_path, monkeypatch):
    """Named with the absolute path it was looked for at, the parameter and its value; raised
    before any data is read."""
    monkeypatch.chdir(tmp_path)
    study = _study(tmp_path)

    def no_data(split):
        raise AssertionError("data was read before the checkpoint was checked")

    monkeypatch.setattr(study, "data", no_data)
    with pytest.raises(runtime.CheckpointNotFoundError) as info:
        study.fp32_model("results/nosuch/fp32.pt")
    want = ROOT / "results" / "nosuch" / "fp32.pt"
    assert str(info.value) == (
        f"{want}: checkpoint not found: no file {want}; set fp32_checkpoint (now "
        f"'results/nosuch/fp32.pt'; a relative path starts at the repository root {ROOT}) in "
        f"params/smoke.yaml to an existing file, or to '' for notebook 00's checkpoint")


@pytest.mark.parametrize("fmt", ["hmqat", "state_dict", "ddp", "wrapped"])
def test_notebook00_checkpoint_in_every_common_format(tmp_path, fmt):
    """Study.fp32_model (notebook 00's path) takes an hmqat checkpoint, a plain state dict, a
    DDP state dict (``module.`` prefix) and a ``{"state_dict": ...}`` wrapper alike."""
    study = _study(tmp_path)
    src = models.create_model("resnet20")
    sd = src.state_dict()
    blob = {"hmqat": {"model": sd, "epoch": 3}, "state_dict": sd,
            "ddp": {f"module.{k}": v for k, v in sd.items()},
            "wrapped": {"state_dict": sd, "best_prec1": 91.7}}[fmt]
    torch.save(blob, study.fp32_checkpoint)
    got = study.fp32_model().state_dict()
    assert list(got) == list(sd) and all(torch.equal(got[k], sd[k]) for k in sd)


def test_a_file_that_holds_no_weights_says_what_it_holds(tmp_path):
    ck = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "lr": 0.1}, ck)
    with pytest.raises(runtime.CheckpointError, match=rf"^{ck}: holds entries that are not name "
                       r"-> tensor \('epoch': int, 'lr': float\); expected model weights: an "
                       r"hmqat checkpoint \(a dict with a 'model' state dict\) or a plain state "
                       r"dict saved with torch.save\(model.state_dict\(\), path\)$"):
        models.load_weights(models.create_model("resnet20"), ck)


@pytest.mark.parametrize("arch, desc", [
    ("resnet20", "resnet20 (3 blocks per stage, 10 classes)"),
    ("resnet32", "resnet32 (5 blocks per stage, 10 classes)"),
    ("resnet44", "resnet44 (7 blocks per stage, 10 classes)"),
    ("resnet56", "resnet56 (9 blocks per stage, 10 classes)"),
    ("resnet18", "resnet18 ((2, 2, 2, 2) basic blocks, 1000 classes)"),
    ("resnet50", "resnet50 ((3, 4, 6, 3) bottleneck blocks, 1000 classes)"),
])
def test_infer_arch_from_keys_and_shapes(arch, desc):
    assert models.infer_arch(models.create_model(arch).state_dict()) == (arch, desc)


def test_wrong_architecture_names_the_file_and_both_archs(tmp_path):
    ck = tmp_path / "fp32-resnet32.pt"
    torch.save(models.create_model("resnet32").state_dict(), ck)
    model = models.create_model("resnet20")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(runtime.CheckpointError) as info:
        models.load_weights(model, ck, arch="resnet20")
    assert str(info.value) == (
        f"{ck}: holds resnet32 (5 blocks per stage, 10 classes) weights, but the model is "
        f"resnet20 (3 blocks per stage, 10 classes); pass a resnet20 checkpoint, or set arch: "
        f"resnet32 to use this one (72 keys the model does not have: layer1.3.conv1.weight, "
        f"layer1.3.bn1.weight, layer1.3.bn1.bias, ...)")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched


def test_wrong_class_count_names_both(tmp_path):
    ck = tmp_path / "c100.pt"
    torch.save({"model": models.create_model("resnet20", num_classes=100).state_dict()}, ck)
    with pytest.raises(runtime.CheckpointError, match=rf"^{ck}: holds resnet20 \(3 blocks per "
                       r"stage, 100 classes\) weights, but the model is resnet20 \(3 blocks per "
                       r"stage, 10 classes\); pass a checkpoint of resnet20 \(3 blocks per stage,"
                       r" 10 classes\) \(2 shapes differ \(file vs model\): linear.weight "
                       r"\(100, 64\) vs \(10, 64\), linear.bias \(100,\) vs \(10,\)\)$"):
        models.load_weights(models.create_model("resnet20"), ck, arch="resnet20")


def test_cli_qat_with_resnet32_weights_names_the_file(tmp_path):
    """`cli qat --fp32` (arch resnet20 from the smoke profile) with a ResNet-32 state dict:
    one CheckpointError naming the file and both archs, and no run folder written."""
    ck = tmp_path / "r32.pt"
    torch.save(models.create_model("resnet32").state_dict(), ck)
    with pytest.raises(runtime.CheckpointError, match=rf"^{ck}: holds resnet32 \(5 blocks per "
                       r"stage, 10 classes\) weights, but the model is resnet20 \(3 blocks per "
                       r"stage, 10 classes\); pass a resnet20 checkpoint, or set arch: resnet32"):
        cli.run(["qat", "--profile", "smoke", "--device", "cpu", "--fp32", str(ck),
                 "--uniform", "4", "--run-dir", str(tmp_path / "q")])
    assert not (tmp_path / "q").exists()


# --------------------------------------------------------------------------------------------
# Item 4: incomplete splits, checked before decoding
# --------------------------------------------------------------------------------------------
def test_half_copied_split_is_refused_before_decoding(tmp_path, cache_dir, monkeypatch):
    """The known counts (shrunk to 4 per class here) are the default: ``truck`` empty and
    ``ship`` half copied stop the load with one error naming the folder, the classes short and
    by how much, and the override."""
    monkeypatch.setitem(data.KNOWN_COUNTS["cifar10"], "test", 4)
    counts = _uniform(4, splits=("train", "test"))
    counts["test"].update(ship=2, truck=0)
    root = _tree(tmp_path / "cifar", counts)
    _no_decoding(monkeypatch)
    with pytest.raises(data.DatasetError) as info:
        data.load_cifar10(root, "test")
    assert str(info.value) == (
        f"{root}/test: 2 of 10 classes do not hold the expected 4 images each (truck has 0 (4 "
        f"short), ship has 2 (2 short); 34 images instead of 40); the copy looks incomplete "
        f"(interrupted?): copy the folder again from a complete source. If this is a subset on "
        f"purpose, pass expected_counts={{'train': N, 'test': M}} (images per class) or 'skip' "
        f"to load_dataset()/load_cifar10(), or export HMQAT_EXPECTED_COUNTS=train=N,test=M (or "
        f"skip) for the pipeline and notebooks")
    assert not cache_dir.exists()                    # nothing decoded, nothing cached
    with pytest.raises(data.DatasetError, match=r"truck has 0 \(4 short\)"):
        data.load_dataset("cifar10", "test", root=root)   # the profile-level entry point too


def test_real_cifar_counts_are_the_default():
    assert data.KNOWN_COUNTS["cifar10"] == {"train": 5000, "test": 1000}
    assert data._per_class_count(None, "train") == 5000
    assert data._per_class_count(None, "test") == 1000


def test_a_tiny_tree_fails_against_cifar_counts_and_names_them(tmp_path, cache_dir,
                                                              monkeypatch):
    root = _tree(tmp_path / "cifar", _uniform(2, splits=("train", "test")))
    _no_decoding(monkeypatch)
    with pytest.raises(data.DatasetError, match=rf"^{root}/train: 10 of 10 classes do not hold "
                       r"the expected 5000 images each \(airplane, automobile, bird, cat, \+6 "
                       r"more have 2 \(4998 short each\); 20 images instead of 50000\)"):
        data.load_cifar10(root, "train")


def test_extra_images_are_named_too(tmp_path, cache_dir):
    counts = _uniform(3, splits=("train", "test"))
    counts["train"]["cat"] = 4
    root = _tree(tmp_path / "cifar", counts)
    with pytest.raises(data.DatasetError, match=r"1 of 10 classes do not hold the expected 3 "
                       r"images each \(cat has 4 \(1 extra\); 31 images instead of 30\); remove "
                       r"the stray files or copy the folder again"):
        data.load_cifar10(root, "train", expected_counts={"train": 3, "test": 3})


def test_subset_overrides(tmp_path, cache_dir, monkeypatch):
    """A subset on purpose loads when declared: per split, as an int, 'skip', or through
    HMQAT_EXPECTED_COUNTS (the pipeline's and notebooks' way); load_dataset passes it on."""
    counts = {"train": {c: 3 for c in data.CIFAR10_CLASSES},
              "test": {c: 2 for c in data.CIFAR10_CLASSES}}
    counts["test"]["truck"] = 1
    root = _tree(tmp_path / "cifar", counts, fmt="JPEG")
    assert len(data.load_cifar10(root, "train", expected_counts={"train": 3})) == 30
    assert len(data.load_cifar10(root, "train", expected_counts=3)) == 30
    assert len(data.load_cifar10(root, "test", expected_counts="skip")) == 19
    val = data.load_dataset("cifar10", "val", root=root, val_size=10,
                            expected_counts={"train": 3, "test": 2})
    assert len(val) == 10
    with pytest.raises(data.DatasetError, match=r"truck has 1 \(1 short\)"):
        data.load_cifar10(root, "test", expected_counts={"train": 3, "test": 2})
    monkeypatch.setenv("HMQAT_EXPECTED_COUNTS", "train=3,test=2")
    assert len(data.load_cifar10(root, "train")) == 30
    with pytest.raises(data.DatasetError, match=r"truck has 1 \(1 short\)"):
        data.load_cifar10(root, "test")
    monkeypatch.setenv("HMQAT_EXPECTED_COUNTS", "skip")
    assert len(data.load_cifar10(root, "test")) == 19


@pytest.mark.parametrize("bad, match", [
    ({"val": 3}, r"^expected_counts names unknown splits \['val'\]; use \['train', 'test'\]"),
    (0, r"^expected_counts = 0: expected None, 'skip', a positive number of images per class"),
    ("all", r"^expected_counts = 'all': expected None, 'skip'"),
    ({"train": 2.5}, r"^expected_counts = \{'train': 2.5\}: expected None"),
])
def test_malformed_override_is_named_before_any_work(tmp_path, bad, match, monkeypatch):
    _no_decoding(monkeypatch)
    with pytest.raises(data.DatasetError, match=match):
        data.load_cifar10(tmp_path / "nowhere", "train", expected_counts=bad)


def test_malformed_override_variable_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("HMQAT_EXPECTED_COUNTS", "half")
    with pytest.raises(data.DatasetError, match=r"^HMQAT_EXPECTED_COUNTS='half' is not "
                       r"understood; use skip, a number of images per class, or train=N,test=M$"):
        data.load_cifar10(tmp_path / "nowhere", "train")


# --------------------------------------------------------------------------------------------
# Item 3: the decode cache is optional
# --------------------------------------------------------------------------------------------
@pytest.fixture
def small_tree(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HMQAT_EXPECTED_COUNTS", "2")
    return _tree(tmp_path / "cifar", _uniform(2))


def _decoded(root: Path, split: str) -> torch.Tensor:
    """The split decoded straight from the files (no cache involved)."""
    files, _, _ = data._list_imagefolder(root / split)
    return data._decode_files(files)


@pytest.mark.parametrize("where", ["folder", "parent"])
def test_cache_folder_that_is_a_file_warns_before_decoding(small_tree, tmp_path, monkeypatch,
                                                           where):
    blocker = tmp_path / "cachefile"
    blocker.write_text("keep me")
    folder = blocker if where == "folder" else blocker / "hmqat"
    monkeypatch.setenv("HMQAT_CACHE_DIR", str(folder))
    decode, seen = data._decode_files, []

    def decode_after_warning(files):
        seen.append(len(record))                     # warnings given before decoding began
        return decode(files)

    monkeypatch.setattr(data, "_decode_files", decode_after_warning)
    with pytest.warns(RuntimeWarning) as record:
        train = data.load_cifar10(small_tree, "train")
        test = data.load_cifar10(small_tree, "test")
    what = ("exists and is not a folder" if where == "folder"
            else f"cannot be created: {blocker} is not a folder")
    assert [str(w.message) for w in record if "decode cache" in str(w.message)] == [
        f"decode cache not used: the cache folder {folder} {what}; move that away or set "
        f"HMQAT_CACHE_DIR to a folder; going on without it (the images are decoded on every "
        f"load: slower, same data)"]                 # once, not once per split
    assert seen == [1, 1]
    assert torch.equal(train.images, _decoded(small_tree, "train")) and len(test) == 20
    assert blocker.read_text() == "keep me"          # nothing lost


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_cache_write_failure_warns_once_and_the_load_goes_on(small_tree, cache_dir, monkeypatch,
                                                             code):
    """Disk full, read-only disk, no permission while writing the cache (raised inside the real
    atomic write, at its fsync): one warning naming the folder, both splits load, and no
    temporary file is left behind."""
    def fail(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(runtime.os, "fsync", fail)
    with pytest.warns(RuntimeWarning) as record:
        train = data.load_cifar10(small_tree, "train")
        test = data.load_cifar10(small_tree, "test")
    messages = [str(w.message) for w in record if "decode cache" in str(w.message)]
    assert len(messages) == 1
    assert messages[0].startswith(f"decode cache not used: could not write imagefolder-train-")
    assert messages[0].endswith(
        f".pt in the cache folder {cache_dir} ({os.strerror(code)}); free space there, make it "
        f"writable, or set HMQAT_CACHE_DIR to another folder; going on without it (the images "
        f"are decoded on every load: slower, same data)")
    assert torch.equal(train.images, _decoded(small_tree, "train"))
    assert torch.equal(test.images, _decoded(small_tree, "test"))
    assert list(cache_dir.iterdir()) == []           # no half-written or temporary file


def test_cache_file_name_taken_by_a_folder_warns_and_loads(small_tree, cache_dir):
    first = data.load_cifar10(small_tree, "train")
    (cache,) = cache_dir.glob("imagefolder-train-*.pt")
    cache.unlink()
    cache.mkdir()
    (cache / "keep").write_text("x")
    with pytest.warns(RuntimeWarning, match=rf"^decode cache not used: the cache file {cache} "
                      r"exists and is not a file; remove it; going on without it"):
        again = data.load_cifar10(small_tree, "train")
    assert torch.equal(again.images, first.images) and (cache / "keep").read_text() == "x"


def test_bit_flipped_cache_is_caught_by_its_digest(small_tree, cache_dir):
    """One flipped bit in the cached pixels (same file size, still a valid zip): torch.load
    alone returns the wrong pixel; the stored sha256 catches it, the cache is rebuilt."""
    first = data.load_cifar10(small_tree, "train")
    (cache,) = cache_dir.glob("imagefolder-train-*.pt")
    raw = bytearray(cache.read_bytes())
    at = raw.find(first.images.numpy().tobytes()[:256]) + 1000   # inside the image bytes
    assert at > 1000
    raw[at] ^= 0x10
    cache.write_bytes(bytes(raw))
    flipped = torch.load(cache, weights_only=True)["images"]
    assert int((flipped != first.images).sum()) == 1  # control: plain loading is fooled
    with pytest.warns(RuntimeWarning, match=rf"^decode cache {cache} is unusable \(its content "
                      r"does not match its sha256 digest: the file was damaged on disk\); "
                      r"deleted it and decoding the images again$"):
        again = data.load_cifar10(small_tree, "train")
    assert torch.equal(again.images, first.images)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)   # rebuilt: the next load is silent
        assert torch.equal(data.load_cifar10(small_tree, "train").images, first.images)


def test_cache_without_a_digest_is_rebuilt(small_tree, cache_dir):
    first = data.load_cifar10(small_tree, "train")
    (cache,) = cache_dir.glob("imagefolder-train-*.pt")
    blob = torch.load(cache, weights_only=True)
    del blob["sha256"]
    torch.save(blob, cache)                          # as an older hmqat wrote it
    with pytest.warns(RuntimeWarning, match=r"is unusable \(it carries no content digest "
                      r"\(written by an older hmqat\)\)"):
        again = data.load_cifar10(small_tree, "train")
    assert torch.equal(again.images, first.images)
    assert "sha256" in torch.load(cache, weights_only=True)
