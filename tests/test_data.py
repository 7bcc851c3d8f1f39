import pytest
import torch

from hmqat import data


@pytest.fixture(autouse=True)
def _tiny_trees_are_subsets(monkeypatch):
    """The ImageFolder trees here hold a few images per class, not CIFAR-10's 5,000/1,000: say
    they are subsets on purpose (the count check itself: tests/test_hostile_data.py)."""
    monkeypatch.setenv("HMQAT_EXPECTED_COUNTS", "skip")


def test_synthetic_shapes_and_determinism():
    a = data.synthetic_cifar(64, seed=3)
    b = data.synthetic_cifar(64, seed=3)
    assert a.images.shape == (64, 3, 32, 32) and a.images.dtype == torch.uint8
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert len(a.classes) == 10


def test_loader_normalises_and_covers_each_image_once():
    ds = data.synthetic_cifar(70, seed=0)
    batches = list(data.make_loader(ds, batch_size=32))
    assert [len(y) for _, y in batches] == [32, 32, 6]
    x = torch.cat([b[0] for b in batches])
    expected = (ds.images.float() / 255 - torch.tensor(data.MEAN).view(1, 3, 1, 1)) / \
        torch.tensor(data.STD).view(1, 3, 1, 1)
    assert torch.allclose(x, expected, atol=1e-6)


def test_train_loader_depends_only_on_seed_and_epoch():
    ds = data.synthetic_cifar(50, seed=0)
    l1, l2 = data.make_loader(ds, 16, train=True, seed=5), data.make_loader(ds, 16, train=True, seed=5)
    l1.set_epoch(3)
    l2.set_epoch(3)
    for (x1, y1), (x2, y2) in zip(l1, l2):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    l2.set_epoch(4)
    assert not torch.equal(next(iter(l1))[1], next(iter(l2))[1])


def test_random_crop_flip_matches_a_per_image_crop():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32)
    g = torch.Generator().manual_seed(0)
    out = data.random_crop_flip(x, g)
    g = torch.Generator().manual_seed(0)
    oy, ox = torch.randint(0, 9, (2,), generator=g), torch.randint(0, 9, (2,), generator=g)
    flip = torch.rand(2, generator=g) < 0.5
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(2):
        ref = padded[i, :, oy[i]:oy[i] + 32, ox[i]:ox[i] + 32]
        if flip[i]:
            ref = ref.flip(-1)
        assert torch.equal(out[i], ref)


def test_calibration_batches_are_seeded_subsets():
    ds = data.synthetic_cifar(200, seed=0)
    a = data.calibration_batches(ds, n_samples=96, batch_size=32, seed=1)
    b = data.calibration_batches(ds, n_samples=96, batch_size=32, seed=1)
    c = data.calibration_batches(ds, n_samples=96, batch_size=32, seed=2)
    assert len(a) == 3 and all(torch.equal(p[0], q[0]) for p, q in zip(a, b))
    assert not torch.equal(a[0][1], c[0][1])
    with pytest.raises(ValueError, match="n_samples must be in 1..200"):
        data.calibration_subset(ds, 0)


def test_imagefolder_cifar_loads_and_caches(tmp_path, monkeypatch):
    root = data.write_synthetic_imagefolder(tmp_path / "cifar", per_class=2)
    monkeypatch.setenv("HMQAT_DATA_DIR", str(root))
    train = data.load_cifar10(split="train")
    assert train.images.shape == (20, 3, 32, 32)
    assert sorted(set(train.labels.tolist())) == list(range(10))
    again = data.load_cifar10(split="train")  # from the uint8 cache
    assert torch.equal(train.images, again.images)


def test_missing_dataset_names_env_var(tmp_path):
    with pytest.raises(data.DatasetError, match="does not exist.*HMQAT_DATA_DIR"):
        data.load_cifar10(tmp_path / "nowhere")


def test_wrong_layout_is_explained(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(data.DatasetError, match="no CIFAR-10 layout.*train/<class>"):
        data.load_cifar10(tmp_path)


def test_wrong_class_count_is_explained(tmp_path):
    root = data.write_synthetic_imagefolder(tmp_path / "c3", num_classes=3, per_class=2)
    with pytest.raises(data.DatasetError, match="has 3 class folders.*expected 10"):
        data.load_cifar10(root, "train")


def test_unknown_split_and_dataset():
    with pytest.raises(data.DatasetError, match="split must be 'train' or 'test'"):
        data.load_cifar10(split="val")
    with pytest.raises(data.DatasetError, match="unknown dataset 'mnist'"):
        data.load_dataset("mnist", "train")


def test_imagenet_loaders_on_tiny_imagefolder(tmp_path):
    root = data.write_synthetic_imagefolder(tmp_path / "inet", num_classes=4, per_class=2,
                                           image_size=64, splits=("train", "val"))
    train, val = data.imagenet_loaders(root, batch_size=4, workers=0, image_size=32,
                                       num_classes=4)
    x, y = next(iter(train))
    assert x.shape == (4, 3, 32, 32) and y.dtype == torch.long
    with pytest.raises(data.DatasetError, match="has 4 classes, expected 1000"):
        data.imagenet_loaders(root, workers=0)
    with pytest.raises(data.DatasetError, match="must contain train/<class>/ and val/<class>/"):
        data.imagenet_loaders(tmp_path / "empty", workers=0)


def test_validation_holdout_is_disjoint_stratified_and_seeded():
    from hmqat.data import load_dataset, split_train_val, synthetic_cifar

    ds = synthetic_cifar(200, seed=0)
    train, val = split_train_val(ds, 50, seed=0)
    assert len(train) + len(val) == len(ds) and len(val) == 50
    # disjoint: no image of val appears in train (synthetic images are distinct)
    flat_t = {bytes(x.flatten().tolist()) for x in train.images}
    assert not any(bytes(x.flatten().tolist()) in flat_t for x in val.images)
    counts = torch.bincount(val.labels, minlength=10)
    assert int(counts.max() - counts.min()) <= 1           # stratified
    again = split_train_val(ds, 50, seed=0)[1]
    assert torch.equal(again.images, val.images)           # seeded
    other = split_train_val(ds, 50, seed=1)[1]
    assert not torch.equal(other.images, val.images)
    v = load_dataset("synthetic", "val", n_synthetic=200, val_size=50)
    t = load_dataset("synthetic", "train", n_synthetic=200, val_size=50)
    assert torch.equal(v.images, val.images) and len(t) == 150


def test_validation_holdout_errors_name_the_fix():
    from hmqat.data import DatasetError, load_dataset, split_train_val, synthetic_cifar

    with pytest.raises(DatasetError, match="val_size > 0"):
        load_dataset("synthetic", "val", n_synthetic=64)
    with pytest.raises(DatasetError, match="lower val_size"):
        split_train_val(synthetic_cifar(40), 100)
    with pytest.raises(DatasetError, match="'train', 'val' or 'test'"):
        load_dataset("synthetic", "valid")


def test_renamed_or_reordered_cifar_class_folders_are_refused(tmp_path):
    root = data.write_synthetic_imagefolder(tmp_path / "c", per_class=1)
    (root / "train" / "automobile").rename(root / "train" / "car")
    with pytest.raises(data.DatasetError, match=r"train: class folders are not CIFAR-10's \("
                                                r"missing \['automobile'\], unexpected \['car'\]"):
        data.load_cifar10(root, "train")
    (root / "train" / "car").rename(root / "train" / "automobile")
    assert data.load_cifar10(root, "train").classes == data.CIFAR10_CLASSES
    (root / "test" / "automobile").rename(root / "test" / "zebra")   # sorts last: labels shift
    with pytest.raises(data.DatasetError, match=r"unexpected \['zebra'\]"):
        data.load_cifar10(root, "test")


def _jpeg_tree(tmp_path, n_per_class=1):
    """A CIFAR ImageFolder tree of 32x32 JPEGs."""
    from torchvision.io import encode_jpeg

    root = tmp_path / "jpeg"
    ds = data.synthetic_cifar(10 * n_per_class, seed=0, balanced=True)
    for i, (img, lab) in enumerate(zip(ds.images, ds.labels.tolist())):
        for split in ("train", "test"):
            d = root / split / data.CIFAR10_CLASSES[lab]
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{i:05d}.jpg").write_bytes(encode_jpeg(img, quality=75).numpy().tobytes())
    return root


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_undecodable_image_names_the_file(tmp_path, damage):
    root = _jpeg_tree(tmp_path)
    bad = sorted((root / "train" / "cat").iterdir())[0]
    bad.write_bytes(bad.read_bytes()[:100] if damage == "truncated" else b"")
    with pytest.raises(data.DatasetError, match=rf"cannot decode {bad}.*empty, truncated or not "
                                                r"an image; replace it"):
        data.load_cifar10(root, "train")


def test_odd_sized_image_names_the_file(tmp_path):
    from torchvision.io import encode_jpeg

    root = _jpeg_tree(tmp_path)
    bad = sorted((root / "train" / "truck").iterdir())[0]
    bad.write_bytes(encode_jpeg(torch.zeros(3, 40, 32, dtype=torch.uint8)).numpy().tobytes())
    with pytest.raises(data.DatasetError, match=rf"{bad} is \(3, 40, 32\) \(C,H,W\) but .* is "
                                                r"\(3, 32, 32\); CIFAR images are 3x32x32"):
        data.load_cifar10(root, "train")


@pytest.mark.parametrize("damage", ["truncated", "foreign"])
def test_bad_decode_cache_is_named_deleted_and_rebuilt(tmp_path, damage, monkeypatch):
    monkeypatch.setenv("HMQAT_CACHE_DIR", str(tmp_path / "cache"))
    root = _jpeg_tree(tmp_path)
    first = data.load_cifar10(root, "train")
    (cache,) = (tmp_path / "cache").glob("imagefolder-train-*.pt")
    if damage == "truncated":
        cache.write_bytes(cache.read_bytes()[:1000])
    else:   # a readable cache of other images
        torch.save({"images": first.images[:3], "labels": first.labels[:3],
                    "classes": list(first.classes)}, cache)
    with pytest.warns(RuntimeWarning, match=rf"decode cache {cache} is unusable .*deleted it and "
                                            r"decoding the images again"):
        again = data.load_cifar10(root, "train")
    assert torch.equal(again.images, first.images) and cache.exists()


def test_write_synthetic_imagefolder_leaves_the_warning_filters_alone(tmp_path):
    import warnings

    before = list(warnings.filters)
    data.write_synthetic_imagefolder(tmp_path, num_classes=2, per_class=1, splits=("train",))
    assert list(warnings.filters) == before
    assert len(list((tmp_path / "train").rglob("*.png"))) == 2


def test_relative_data_dir_error_names_the_fix(tmp_path, monkeypatch):
    """A relative HMQAT_DATA_DIR read from notebooks/ (the kernel's folder) points elsewhere."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HMQAT_DATA_DIR", "../shared/data/cifar10-jpeg")
    with pytest.raises(data.DatasetError, match=r"is relative and was resolved against the "
                       r"current folder .*use an absolute path.*make lab"):
        data.load_cifar10(split="test")


def test_offline_download_error_names_the_fix(tmp_path, monkeypatch):
    """No HMQAT_DATA_DIR and no internet: one DatasetError saying so, not a raw URLError."""
    import urllib.error

    import torchvision

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(data.DatasetError, match=r"no internet.*Set HMQAT_DATA_DIR to an "
                       r"absolute path") as info:
        data.load_cifar10(split="test")
    assert info.value.__cause__ is None
