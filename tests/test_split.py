"""The clean validation split (docs/method.md §8): validation is drawn from the TEST split, so
published weights trained on the whole training split never saw it; val and test are disjoint,
class-stratified and seeded; training keeps every training image."""
import json
from pathlib import Path

import pytest
import torch

from hmqat import data

REPO = Path(__file__).resolve().parent.parent


def _same(a: data.TensorImages, b: data.TensorImages) -> bool:
    return torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_val_from_test_splits_the_test_split_and_keeps_all_training_images():
    kw = dict(n_synthetic=256, seed=0, val_size=20, val_seed=0, val_from="test")
    train = data.load_dataset("synthetic", "train", **kw)
    val = data.load_dataset("synthetic", "val", **kw)
    test = data.load_dataset("synthetic", "test", **kw)
    full_train = data.load_dataset("synthetic", "train", n_synthetic=256, seed=0)
    full_test = data.load_dataset("synthetic", "test", n_synthetic=256, seed=0)
    assert _same(train, full_train)                        # the fine-tune sees all of train
    assert len(val) == 20 and len(val) + len(test) == len(full_test)
    # disjoint and together exactly the test split: every test image is in one of them
    idx = data.holdout_indices(full_test.labels, 20, 0)
    rest = torch.ones(len(full_test), dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(val.images, full_test.images[idx])
    assert torch.equal(test.images, full_test.images[rest])
    # unseen by construction: no validation image is a training image
    flat_train = {bytes(x.numpy()) for x in full_train.images}
    assert not any(bytes(x.numpy()) in flat_train for x in val.images)


def test_the_split_is_stratified_and_seeded():
    labels = torch.arange(1000) % 10
    a = data.holdout_indices(labels, 500, seed=0)
    assert torch.equal(a, data.holdout_indices(labels, 500, seed=0))
    assert not torch.equal(a, data.holdout_indices(labels, 500, seed=1))
    assert torch.bincount(labels[a], minlength=10).tolist() == [50] * 10
    assert len(set(a.tolist())) == 500


def test_val_from_train_keeps_the_old_hold_out():
    kw = dict(n_synthetic=256, seed=0, val_size=32, val_seed=0, val_from="train")
    full_train = data.load_dataset("synthetic", "train", n_synthetic=256, seed=0)
    train, val = data.split_train_val(full_train, 32, 0)
    assert _same(data.load_dataset("synthetic", "train", **kw), train)
    assert _same(data.load_dataset("synthetic", "val", **kw), val)
    assert _same(data.load_dataset("synthetic", "test", **kw),
                 data.load_dataset("synthetic", "test", n_synthetic=256, seed=0))


def test_bad_val_from_names_the_choices():
    with pytest.raises(data.DatasetError, match=r"val_from must be one of \('train', 'test'\)"):
        data.load_dataset("synthetic", "val", val_size=10, val_from="holdout")
    with pytest.raises(data.DatasetError, match="number of test images"):
        data.load_dataset("synthetic", "val", val_size=0, val_from="test")


def test_committed_split_record_is_what_the_code_draws():
    """params/splits/*.json: the committed validation indices of the JPEG mirror's test split
    are exactly holdout_indices(labels, val_size, val_seed), stratified, with matching digests."""
    files = sorted((REPO / "params" / "splits").glob("*.json"))
    assert files, "the study's split is committed under params/splits/"
    for f in files:
        rec = json.loads(f.read_text())
        labels = torch.tensor(rec["labels"])
        full = data.TensorImages(torch.zeros(len(labels), 1, 1, 1, dtype=torch.uint8), labels,
                                 tuple(str(c) for c in range(rec["num_classes"])), rec["source"])
        again = data.split_record(full, rec["val_size"], rec["val_seed"])
        assert again["val_indices"] == rec["val_indices"], f.name
        assert again["val_indices_sha256"] == rec["val_indices_sha256"], f.name
        assert again["labels_sha256"] == rec["labels_sha256"], f.name
        per_class = torch.bincount(labels[rec["val_indices"]], minlength=rec["num_classes"])
        assert per_class.tolist() == [rec["val_size"] // rec["num_classes"]] * rec["num_classes"]
