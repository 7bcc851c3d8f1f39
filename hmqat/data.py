"""Datasets and fast tensor loaders.

Where CIFAR-10 comes from is decided by ``root=`` or ``HMQAT_DATA_DIR`` (docs/design.md §5):

* unset: torchvision downloads the original CIFAR-10 on first use (into ``~/.cache/hmqat``);
* a folder in torchvision's layout (``cifar-10-batches-py/`` directly or under ``cifar10/``);
* an ImageFolder tree (``train/<class>/*``, ``test/<class>/*``, directly or under ``cifar10/``),
  e.g. the JPEG q75 mirror.

An ImageFolder split must hold CIFAR-10's images per class (5,000 train, 1,000 test; checked
before decoding, so a half-copied folder is an error, not a silently smaller test set); a subset
on purpose says so with ``expected_counts=`` or ``HMQAT_EXPECTED_COUNTS`` (:data:`KNOWN_COUNTS`).

Decoded images are cached once as uint8 tensors (``HMQAT_CACHE_DIR``, default
``~/.cache/hmqat``), so later loads take about a second. The cache carries a sha256 of its
tensors, checked on every load (a damaged cache is deleted and rebuilt, with a warning), and it
is optional: when it cannot be written (disk full, read-only, not a folder) a warning names the
folder and the images are used without it. :class:`TensorLoader` does the standard CIFAR
augmentation (4-pixel padded random crop, horizontal flip) and normalisation on whole batches,
with no per-image PIL work.

    >>> from hmqat import data
    >>> train = data.load_cifar10(split="train")           # HMQAT_DATA_DIR or download
    >>> loader = data.make_loader(train, batch_size=128, train=True, seed=0)
    >>> calib = data.calibration_batches(train, n_samples=2048, batch_size=256, seed=0)
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import urllib.error
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence, Union

import torch
from torch.utils.data import DataLoader, DistributedSampler
# torchvision is imported inside the functions that use it (JPEG decoding, the CIFAR download,
# ImageNet transforms): its import costs ~1.5 s per process, which every notebook kernel would
# otherwise pay although the decode cache (or synthetic data) needs none of it.

from .runtime import CheckpointError, atomic_torch_save, hash_tensor, load_checkpoint

__all__ = [
    "CIFAR10_CLASSES",
    "DatasetError",
    "ExpectedCounts",
    "KNOWN_COUNTS",
    "TensorImages",
    "TensorLoader",
    "calibration_batches",
    "default_workers",
    "imagenet_loaders",
    "load_cifar10",
    "holdout_indices",
    "load_dataset",
    "split_record",
    "split_train_val",
    "VAL_SOURCES",
    "make_loader",
    "synthetic_cifar",
    "write_synthetic_imagefolder",
]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
# The published CIFAR ResNets were trained with ImageNet statistics (weights PROVENANCE.md).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
_IMG_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp")

#: Images per class in each split of the datasets whose size is known. An ImageFolder split
#: holding other counts is refused (a copy that stopped half-way), unless the caller declares a
#: subset with ``expected_counts`` (see :func:`load_cifar10`).
KNOWN_COUNTS: dict[str, dict[str, int]] = {"cifar10": {"train": 5000, "test": 1000}}
#: ``expected_counts``: None (the known counts, or ``HMQAT_EXPECTED_COUNTS``), "skip", an
#: int (images per class in every split) or ``{split: images per class}``.
ExpectedCounts = Union[None, str, int, Mapping[str, int]]
_COUNTS_ENV = "HMQAT_EXPECTED_COUNTS"


class DatasetError(RuntimeError):
    """A dataset is missing or does not have the expected layout."""


@dataclass
class TensorImages:
    """A whole split held in memory: uint8 images [N,C,H,W], int64 labels [N]."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    source: str = ""

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DatasetError(f"images must be uint8 [N,C,H,W], got {self.images.dtype} "
                               f"{tuple(self.images.shape)}")
        if len(self.images) != len(self.labels):
            raise DatasetError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: torch.Tensor | Sequence[int]) -> "TensorImages":
        idx = torch.as_tensor(indices, dtype=torch.long)
        return TensorImages(self.images[idx], self.labels[idx], self.classes, self.source)


# --------------------------------------------------------------------------------------------
# Locating and decoding CIFAR-10
# --------------------------------------------------------------------------------------------
def _cache_dir() -> Path:
    return Path(os.environ.get("HMQAT_CACHE_DIR", Path.home() / ".cache" / "hmqat"))


def _expected(root: Path | None) -> str:
    where = f"{root}" if root else "HMQAT_DATA_DIR"
    return (f"Expected in {where}: either torchvision's CIFAR-10 layout (cifar-10-batches-py/, "
            f"optionally under cifar10/) or an ImageFolder tree train/<class>/*.jpg and "
            f"test/<class>/*.jpg with the 10 CIFAR classes. Set HMQAT_DATA_DIR (or pass root=) to "
            f"such a folder, or unset it to download CIFAR-10 with torchvision.")


def _is_network_error(exc: BaseException) -> bool:
    """True when ``exc`` (or its cause chain) is a failed connection or name resolution."""
    while exc is not None:
        if isinstance(exc, (urllib.error.URLError, socket.gaierror, ConnectionError,
                            TimeoutError)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _find_layout(root: Path, given: str | os.PathLike | None = None) -> tuple[str, Path]:
    """Return ("torchvision" | "imagefolder", folder) for a CIFAR root, or raise DatasetError.
    ``given``: the path as the user wrote it (a relative one is named in the error)."""
    if not root.exists():
        rel = ""
        if given is not None and not Path(given).expanduser().is_absolute():
            rel = (f" The path {str(given)!r} is relative and was resolved against the current "
                   f"folder {Path.cwd()} (notebooks run in notebooks/): use an absolute path, "
                   "e.g. export HMQAT_DATA_DIR=$PWD/../shared/data/cifar10-jpeg from the "
                   "repository root, or start them with `make lab` / `make reproduce`, which "
                   "resolve it.")
        raise DatasetError(f"dataset folder {root} does not exist.{rel} {_expected(root)}")
    for base in (root, root / "cifar10", root / "cifar-10"):
        if (base / "cifar-10-batches-py").is_dir():
            return "torchvision", base
        if (base / "train").is_dir() and (base / "test").is_dir():
            return "imagefolder", base
    raise DatasetError(f"no CIFAR-10 layout found under {root}. {_expected(root)}")


def _list_imagefolder(split_dir: Path) -> tuple[list[Path], list[int], tuple[str, ...]]:
    classes = tuple(sorted(d.name for d in split_dir.iterdir() if d.is_dir()))
    files: list[Path] = []
    labels: list[int] = []
    for ci, c in enumerate(classes):
        for f in sorted((split_dir / c).iterdir()):
            if f.suffix.lower() in _IMG_EXT:
                files.append(f)
                labels.append(ci)
    return files, labels, classes


@contextlib.contextmanager
def _quiet_torchvision_io() -> Iterator[None]:
    """Silence torchvision 0.29's deprecation of its image io (in favour of torchcodec) inside
    this block only; the process-wide warning filters are restored on exit."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The image decoding and encoding", DeprecationWarning)
        yield


def _decode_files(files: Sequence[Path]) -> torch.Tensor:
    """Decode image files to one uint8 [N,3,H,W] tensor with torchvision.io (no PIL).

    A file that does not decode (truncated, empty, not an image) or whose size differs from the
    first image's raises :class:`DatasetError` naming that file."""
    # imported here: see the imports' note
    from torchvision.io import ImageReadMode, decode_image, read_file
    out = []
    with _quiet_torchvision_io():
        for f in files:
            try:
                img = decode_image(read_file(str(f)), mode=ImageReadMode.RGB)
            except (RuntimeError, ValueError, OSError) as exc:
                raise DatasetError(f"cannot decode {f} ({str(exc).strip().splitlines()[0]}): "
                                   f"the file is empty, truncated or not an image; replace it "
                                   f"with a good copy or delete it") from None
            if out and img.shape != out[0].shape:
                raise DatasetError(f"{f} is {tuple(img.shape)} (C,H,W) but {files[0]} is "
                                   f"{tuple(out[0].shape)}; CIFAR images are 3x32x32. Resize or "
                                   f"remove it, or use imagenet_loaders() for variable-size "
                                   f"ImageFolder data.")
            out.append(img)
    return torch.stack(out)


def _fingerprint(files: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _check_cifar_classes(split_dir: Path, classes: tuple[str, ...]) -> None:
    """The class folders must be :data:`CIFAR10_CLASSES`: labels follow the sorted folder names
    and the published weights CIFAR-10's order, so a renamed folder shifts labels silently.
    Raise naming the missing and unexpected names."""
    if classes == CIFAR10_CLASSES:
        return
    missing = [c for c in CIFAR10_CLASSES if c not in classes]
    extra = [c for c in classes if c not in CIFAR10_CLASSES]  # same names sort the same way
    diff = f"missing {missing}, unexpected {extra}"
    raise DatasetError(f"{split_dir}: class folders are not CIFAR-10's ({diff}); rename the "
                       f"folders to exactly {list(CIFAR10_CLASSES)}, so label i means "
                       f"CIFAR10_CLASSES[i] as the pretrained weights expect")


_OVERRIDE_HINT = (f"pass expected_counts={{'train': N, 'test': M}} (images per class) or "
                  f"'skip' to load_dataset()/load_cifar10(), or export {_COUNTS_ENV}=train=N,"
                  f"test=M (or skip) for the pipeline and notebooks")


def _parse_counts_env(text: str) -> ExpectedCounts:
    """``HMQAT_EXPECTED_COUNTS`` as an ``expected_counts`` value: "skip", "N" or
    "train=N,test=M"; anything else raises :class:`DatasetError` naming the variable."""
    text = text.strip()
    if text == "skip":
        return "skip"
    try:
        if "=" not in text:
            return int(text)
        return {k.strip(): int(v) for k, v in (item.split("=", 1) for item in text.split(","))}
    except ValueError:
        raise DatasetError(f"{_COUNTS_ENV}={text!r} is not understood; use skip, a number of "
                           f"images per class, or train=N,test=M") from None


def _per_class_count(expected: ExpectedCounts, split: str, dataset: str = "cifar10"
                     ) -> int | None:
    """The number of images each class of ``split`` must hold, or None (not checked).

    ``expected``: None = ``HMQAT_EXPECTED_COUNTS`` when set, else :data:`KNOWN_COUNTS`;
    "skip"; an int for every split; or ``{split: int}`` (a split it does not name gets the
    known count). A malformed value raises :class:`DatasetError` naming it."""
    source = "expected_counts"
    if expected is None and os.environ.get(_COUNTS_ENV, "").strip():
        expected, source = _parse_counts_env(os.environ[_COUNTS_ENV]), _COUNTS_ENV
    if expected is None:
        return KNOWN_COUNTS[dataset][split]
    if expected == "skip":
        return None
    if isinstance(expected, Mapping):
        unknown = [k for k in expected if k not in KNOWN_COUNTS[dataset]]
        if unknown:
            raise DatasetError(f"{source} names unknown splits {unknown}; use "
                               f"{list(KNOWN_COUNTS[dataset])}, e.g. {{'train': 500, "
                               f"'test': 100}} (images per class)")
        value = expected.get(split, KNOWN_COUNTS[dataset][split])
    else:
        value = expected
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise DatasetError(f"{source} = {expected!r}: expected None, 'skip', a positive number "
                           f"of images per class, or {{split: that number}}")
    return value


def _count_group(names: Sequence[str], n: int, want: int) -> str:
    """"ship has 500 (500 short)", or for several classes with the same count "bird, cat, +3
    more have 1 (4999 short each)"."""
    diff = f"{want - n} short" if n < want else f"{n - want} extra"
    if len(names) == 1:
        return f"{names[0]} has {n} ({diff})"
    shown = ", ".join(names[:4]) + (f", +{len(names) - 4} more" if len(names) > 4 else "")
    return f"{shown} have {n} ({diff} each)"


def _check_counts(split_dir: Path, split: str, classes: tuple[str, ...], labels: Sequence[int],
                  expected: ExpectedCounts) -> None:
    """Every class folder of ``split_dir`` must hold :func:`_per_class_count` images: a copy
    that stopped half-way (one class empty, another half full) would otherwise load as a
    smaller split and every accuracy on it would be silently off. Raise one
    :class:`DatasetError` naming the folder, each class off and by how much, and the
    override for a subset on purpose. Runs on the file list, before any image is decoded."""
    want = _per_class_count(expected, split)
    if want is None:
        return
    have = torch.bincount(torch.tensor(labels, dtype=torch.long), minlength=len(classes))
    off = [(c, int(n)) for c, n in zip(classes, have.tolist()) if n != want]
    if not off:
        return
    details = ", ".join(_count_group([c for c, m in off if m == n], n, want)
                        for n in sorted({n for _, n in off}))
    cause = ("the copy looks incomplete (interrupted?): copy the folder again from a complete "
             "source" if all(n < want for _, n in off) else
             "remove the stray files or copy the folder again from a complete source")
    raise DatasetError(f"{split_dir}: {len(off)} of {len(classes)} classes do not hold the "
                       f"expected {want} images each ({details}; {int(have.sum())} images "
                       f"instead of {want * len(classes)}); {cause}. If this is a subset on "
                       f"purpose, {_OVERRIDE_HINT}")


#: Decode-cache folders (or files) this process has warned about and no longer writes to: one
#: warning per folder, not one per split or per load.
_CACHE_OFF: set[Path] = set()


def _cache_off(where: Path, problem: str) -> None:
    """Warn, once per path and process, that the decode cache at ``where`` (its folder, or one
    cache file) is not used (``problem``: why, and the fix), and stop writing there; loading
    goes on without it."""
    if where in _CACHE_OFF:
        return
    _CACHE_OFF.add(where)
    warnings.warn(f"decode cache not used: {problem}; going on without it (the images are "
                  f"decoded on every load: slower, same data)", RuntimeWarning, stacklevel=4)


def _cache_file(split: str, files: Sequence[Path]) -> Path | None:
    """Where the decoded ``split`` is cached, or None when the cache cannot be used there: the
    folder (or one above it) or the cache file's own name exists as something else. Checked
    before decoding, with one warning naming the path (:func:`_cache_off`)."""
    folder = _cache_dir()
    existing = next((p for p in (folder, *folder.parents) if p.exists() or p.is_symlink()),
                    None)
    if existing is not None and not existing.is_dir():
        what = ("exists and is not a folder" if existing == folder else
                f"cannot be created: {existing} is not a folder")
        _cache_off(folder, f"the cache folder {folder} {what}; move that away or set "
                           f"HMQAT_CACHE_DIR to a folder")
        return None
    cache = folder / f"imagefolder-{split}-{_fingerprint(files)}.pt"
    if (cache.exists() or cache.is_symlink()) and not cache.is_file():
        _cache_off(cache, f"the cache file {cache} exists and is not a file; remove it")
        return None
    return cache


def _content_digest(images: torch.Tensor, labels: torch.Tensor,
                    classes: Sequence[str]) -> str:
    """sha256 of a decoded split (images' and labels' dtype, shape and bytes, class names):
    stored in the decode cache and checked on load, so a flipped bit is caught."""
    h = hashlib.sha256()
    hash_tensor(h, images)
    hash_tensor(h, labels)
    h.update("\n".join(classes).encode())
    return h.hexdigest()


def _write_cache(cache: Path, ds: TensorImages) -> None:
    """Save the decoded split with its :func:`_content_digest`, atomically. The cache is
    optional: a failure to write it (disk full, read-only disk, no permission) warns once
    naming the folder and returns; nothing half-written is left (atomic_write_bytes)."""
    if cache.parent in _CACHE_OFF:      # failed here before in this process: do not retry
        return
    blob = {"images": ds.images, "labels": ds.labels, "classes": list(ds.classes),
            "sha256": _content_digest(ds.images, ds.labels, ds.classes)}
    try:
        atomic_torch_save(blob, cache)
    except OSError as exc:    # runtime.WriteError too (its errno is the underlying one)
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        _cache_off(cache.parent, f"could not write {cache.name} in the cache folder "
                                 f"{cache.parent} ({why}); free space there, make it writable, "
                                 f"or set HMQAT_CACHE_DIR to another folder")


def _read_cache(cache: Path, n_files: int, classes: tuple[str, ...]) -> dict | None:
    """The decoded split cached at ``cache``, or None (and the file deleted, with a warning
    naming it) when it is unreadable, does not match the image files, or its tensors do not
    hash to the sha256 stored with them (a flipped bit, a partial overwrite)."""
    try:
        blob = load_checkpoint(cache)
        ok = (isinstance(blob, dict) and isinstance(blob.get("images"), torch.Tensor)
              and isinstance(blob.get("labels"), torch.Tensor)
              and tuple(blob.get("classes", ())) == classes
              and len(blob["labels"]) == n_files == len(blob["images"]))
        problem = "" if ok else "it does not match the image files"
        if ok and "sha256" not in blob:
            problem = "it carries no content digest (written by an older hmqat)"
        elif ok and blob["sha256"] != _content_digest(blob["images"], blob["labels"], classes):
            problem = ("its content does not match its sha256 digest: the file was damaged "
                       "on disk")
    except CheckpointError as exc:  # "<path>: <what>; <what to do>": keep <what>, shortened
        what = str(exc).removeprefix(f"{cache}: ").split(";")[0]
        problem = what if len(what) <= 160 else what[:157] + "..."
    if not problem:
        return blob
    warnings.warn(f"decode cache {cache} is unusable ({problem}); deleted it and decoding the "
                  f"images again", RuntimeWarning, stacklevel=3)
    with contextlib.suppress(OSError):   # a read-only folder: the rewrite then warns
        cache.unlink(missing_ok=True)
    return None


def _load_imagefolder_split(base: Path, split: str, num_classes: int,
                            expected_counts: ExpectedCounts = None) -> TensorImages:
    split_dir = base / split
    if not split_dir.is_dir():
        raise DatasetError(f"missing split folder {split_dir}. {_expected(base)}")
    files, labels, classes = _list_imagefolder(split_dir)
    if len(classes) != num_classes:
        raise DatasetError(f"{split_dir} has {len(classes)} class folders {list(classes)[:12]}, "
                           f"expected {num_classes}. {_expected(base)}")
    if num_classes == len(CIFAR10_CLASSES):
        _check_cifar_classes(split_dir, classes)
    if not files:
        raise DatasetError(f"{split_dir} holds no image files ({', '.join(_IMG_EXT)}).")
    _check_counts(split_dir, split, classes, labels, expected_counts)
    cache = _cache_file(split, files)
    blob = None
    if cache is not None and cache.exists():
        blob = _read_cache(cache, len(files), classes)
    if blob is not None:
        return TensorImages(blob["images"], blob["labels"], tuple(blob["classes"]), str(split_dir))
    images = _decode_files(files)
    ds = TensorImages(images, torch.tensor(labels, dtype=torch.long), classes, str(split_dir))
    if cache is not None:
        _write_cache(cache, ds)
    return ds


def _load_torchvision_split(base: Path | None, split: str) -> TensorImages:
    import torchvision.datasets   # imported here: see the imports' note
    download = base is None
    folder = base if base is not None else _cache_dir() / "torchvision"
    try:
        tv = torchvision.datasets.CIFAR10(str(folder), train=(split == "train"), download=download)
    except Exception as exc:  # download or integrity failures
        if download and _is_network_error(exc):
            raise DatasetError(
                f"HMQAT_DATA_DIR is not set and CIFAR-10 is not in {folder}, so torchvision "
                f"tried to download it, and this machine has no internet ({exc}). Set "
                "HMQAT_DATA_DIR to an absolute path of a local copy, e.g. `export "
                "HMQAT_DATA_DIR=$PWD/../shared/data/cifar10-jpeg` from the repository root "
                "(notebooks run in notebooks/, so a relative path would point elsewhere); the "
                "folder holds cifar-10-batches-py/ or an ImageFolder tree train/<class>/*, "
                "test/<class>/*.") from None
        raise DatasetError(f"could not load CIFAR-10 from torchvision into {folder} ({exc}). "
                           f"{_expected(base)}") from exc
    images = torch.from_numpy(tv.data).permute(0, 3, 1, 2).contiguous()
    return TensorImages(images, torch.tensor(tv.targets, dtype=torch.long), tuple(tv.classes),
                        f"torchvision:{folder}")


def load_cifar10(root: str | os.PathLike | None = None, split: str = "train", *,
                 expected_counts: ExpectedCounts = None) -> TensorImages:
    """Load a CIFAR-10 split as uint8 tensors (source chosen by ``root`` / ``HMQAT_DATA_DIR``).

    ``expected_counts``: the images per class an ImageFolder split must hold, checked before
    decoding. None: ``HMQAT_EXPECTED_COUNTS`` when set (``skip``, ``N`` or ``train=N,test=M``),
    else CIFAR-10's 5,000 train / 1,000 test (:data:`KNOWN_COUNTS`); ``"skip"``: no check;
    an int: that many per class; ``{"train": N, "test": M}``: per split, for a subset on
    purpose. torchvision's files are verified by torchvision's own checksums instead.
    """
    if split not in ("train", "test"):
        raise DatasetError(f"split must be 'train' or 'test', got {split!r}")
    _per_class_count(expected_counts, split)          # a malformed override fails first
    root = root if root is not None else os.environ.get("HMQAT_DATA_DIR") or None
    if root is None:
        return _load_torchvision_split(None, split)
    layout, base = _find_layout(Path(root).expanduser().resolve(), root)
    if layout == "torchvision":
        return _load_torchvision_split(base, split)
    return _load_imagefolder_split(base, split, num_classes=10, expected_counts=expected_counts)


def holdout_indices(labels: torch.Tensor, n_val: int, seed: int = 0) -> torch.Tensor:
    """Sorted indices of a seeded, class-stratified validation hold-out of ``n_val`` images.

    Each class gives ``n_val // C`` images (the first ``n_val % C`` classes one more), drawn
    without replacement with ``torch.Generator().manual_seed(seed)``: the same seed and labels
    always give the same hold-out, on every machine (docs/method.md §8).
    """
    classes = torch.unique(labels)
    counts = torch.bincount(labels, minlength=int(classes.max()) + 1)[classes]
    per = [n_val // len(classes) + (1 if i < n_val % len(classes) else 0)
           for i in range(len(classes))]
    if n_val < 0 or any(p > int(c) for p, c in zip(per, counts)):
        raise DatasetError(f"cannot hold out {n_val} validation images (stratified: "
                           f"{max(per)} per class) from {len(labels)} images in {len(classes)} "
                           f"classes (the smallest has {int(counts.min())}); lower val_size")
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c, k in zip(classes.tolist(), per):
        members = torch.nonzero(labels == c).flatten()
        picks.append(members[torch.randperm(len(members), generator=g)[:k]])
    return torch.cat(picks).sort().values if picks else torch.empty(0, dtype=torch.long)


def split_train_val(ds: TensorImages, n_val: int, seed: int = 0
                    ) -> tuple[TensorImages, TensorImages]:
    """(train, val): the training split minus a held-out validation set, and that set.

    Every choice the study makes (recipes, inits, Ω validation, hyper-parameters) is scored on
    ``val``; the test split is read once per final run. ``n_val=0`` gives ``(ds, empty)``.
    """
    val_idx = holdout_indices(ds.labels, n_val, seed)
    keep = torch.ones(len(ds), dtype=torch.bool)
    keep[val_idx] = False
    return ds.subset(torch.nonzero(keep).flatten()), ds.subset(val_idx)


#: Where the validation split may come from (``load_dataset(val_from=...)``).
VAL_SOURCES = ("train", "test")


def load_dataset(name: str, split: str, *, root: str | os.PathLike | None = None,
                 n_synthetic: int = 512, seed: int = 0, val_size: int = 0,
                 val_seed: int = 0, expected_counts: ExpectedCounts = None,
                 val_from: str = "train") -> TensorImages:
    """Profile-level entry point: ``cifar10`` or ``synthetic`` (tests, smoke profile).

    ``split``: ``train``, ``val`` or ``test``. With ``val_size > 0`` a seeded, class-stratified
    set of ``val_size`` images (:func:`holdout_indices`, seed ``val_seed``) is held out of the
    split named by ``val_from``:

    * ``"test"`` (the study's choice, docs/method.md §8): ``val`` is drawn from the test split
      and ``test`` is the rest of it; ``train`` is the whole training split. Published weights
      trained on the whole training split have seen neither ``val`` nor ``test``.
    * ``"train"`` (for models trained from scratch here): ``val`` is drawn from the training
      split, ``train`` is the rest of it and ``test`` the whole test split.

    ``val`` needs ``val_size > 0``. ``expected_counts``: images per class of the CIFAR-10
    folder's splits (:func:`load_cifar10`; counted before anything is held out); ignored for
    ``synthetic``.
    """
    if split not in ("train", "val", "test"):
        raise DatasetError(f"split must be 'train', 'val' or 'test', got {split!r}")
    if val_from not in VAL_SOURCES:
        raise DatasetError(f"val_from must be one of {VAL_SOURCES}, got {val_from!r}: 'test' "
                           "holds validation out of the test split (unseen by published "
                           "weights), 'train' out of the training split")
    if split == "val" and val_size <= 0:
        raise DatasetError(f"split='val' needs val_size > 0 (the number of {val_from} images "
                           "to hold out for validation)")
    source = "train" if split == "train" or (split == "val" and val_from == "train") else "test"
    if name == "cifar10":
        full = load_cifar10(root, source, expected_counts=expected_counts)
    elif name == "synthetic":
        full = synthetic_cifar(n_synthetic if source == "train" else max(n_synthetic // 4, 64),
                               seed=seed + (1 if source == "test" else 0))
    else:
        raise DatasetError(f"unknown dataset {name!r}; use 'cifar10' or 'synthetic' here, and "
                           "imagenet_loaders() for ImageNet")
    if val_size <= 0 or source != val_from:
        return full
    rest, val = split_train_val(full, val_size, val_seed)
    return val if split == "val" else rest


def split_record(full: TensorImages, val_size: int, val_seed: int) -> dict[str, Any]:
    """What defines a validation hold-out of ``full``, for committing (params/splits/): the
    sorted indices of :func:`holdout_indices` into ``full`` (its loading order), the labels they
    were drawn from, and sha256 digests of both (the index digest names the split)."""
    idx = holdout_indices(full.labels, val_size, val_seed)
    labels = full.labels.tolist()
    indices = idx.tolist()
    source = "/".join(Path(str(full.source)).parts[-2:])   # no machine-specific prefix
    return {"source": source, "n": len(full), "val_size": int(val_size),
            "val_seed": int(val_seed), "num_classes": len(full.classes),
            "labels_sha256": hashlib.sha256(json.dumps(labels).encode()).hexdigest(),
            "val_indices_sha256": hashlib.sha256(json.dumps(indices).encode()).hexdigest(),
            "val_indices": indices, "labels": labels}


# --------------------------------------------------------------------------------------------
# Synthetic data (tests, smoke profile)
# --------------------------------------------------------------------------------------------
def synthetic_cifar(n: int = 256, num_classes: int = 10, seed: int = 0,
                    image_size: int = 32, balanced: bool = False) -> TensorImages:
    """A learnable CIFAR-shaped dataset: each class is a fixed random pattern plus noise.

    Uses its own generator (the class patterns depend on ``num_classes`` and ``image_size``
    only, so train and test splits drawn with different seeds share them).
    """
    proto_gen = torch.Generator().manual_seed(1234)
    protos = torch.rand(num_classes, 3, image_size, image_size, generator=proto_gen) * 255
    g = torch.Generator().manual_seed(seed)
    if balanced:  # every class equally often (n a multiple of num_classes)
        labels = torch.arange(n) % num_classes
    else:
        labels = torch.randint(0, num_classes, (n,), generator=g)
    noise = torch.randn(n, 3, image_size, image_size, generator=g) * 60
    images = (protos[labels] + noise).clamp(0, 255).round().to(torch.uint8)
    classes = tuple(f"class{i}" for i in range(num_classes))
    return TensorImages(images, labels, classes, f"synthetic(n={n},seed={seed})")


def write_synthetic_imagefolder(root: str | os.PathLike, *, num_classes: int = 10,
                                per_class: int = 4, image_size: int = 32, seed: int = 0,
                                splits: Sequence[str] = ("train", "test")) -> Path:
    """Write a tiny ImageFolder tree of PNGs (tests of the folder and ImageNet paths). Class
    folders are :data:`CIFAR10_CLASSES` for 10 classes, else ``class000``, ``class001``, ..."""
    from torchvision.io import write_png   # imported here: see the imports' note
    root = Path(root)
    for si, split in enumerate(splits):
        ds = synthetic_cifar(num_classes * per_class, num_classes, seed + si, image_size,
                             balanced=True)
        for i, (img, lab) in enumerate(zip(ds.images, ds.labels.tolist())):
            d = root / split / (CIFAR10_CLASSES[lab] if num_classes == len(CIFAR10_CLASSES)
                                else f"class{lab:03d}")
            d.mkdir(parents=True, exist_ok=True)
            with _quiet_torchvision_io():
                write_png(img, str(d / f"{i:05d}.png"))
    return root


# --------------------------------------------------------------------------------------------
# Tensor loaders
# --------------------------------------------------------------------------------------------
def normalize(x_uint8: torch.Tensor, mean: Sequence[float] = MEAN,
              std: Sequence[float] = STD) -> torch.Tensor:
    """uint8 [B,C,H,W] -> float32, scaled to [0,1] and normalised per channel."""
    m = torch.tensor(mean, device=x_uint8.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x_uint8.device).view(1, -1, 1, 1)
    return (x_uint8.float().div_(255.0) - m) / s


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Batched CIFAR augmentation: zero-pad by ``pad``, random crop back, random h-flip."""
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    rows = oy[:, None] + torch.arange(h)[None, :]                      # [B,H]
    cols = ox[:, None] + torch.arange(w)[None, :]                      # [B,W]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    bi = torch.arange(b)[:, None, None, None]
    ci = torch.arange(c)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


@dataclass
class TensorLoader:
    """Iterates normalised float batches from a :class:`TensorImages`, on ``device``.

    Shuffling and augmentation for epoch ``e`` depend only on ``(seed, e)`` (call
    :meth:`set_epoch`), so a resumed run sees exactly the batches it would have seen.
    ``rank``/``world_size`` shard each epoch's permutation like DistributedSampler.
    """

    data: TensorImages
    batch_size: int = 128
    train: bool = False
    seed: int = 0
    drop_last: bool = False
    device: str | torch.device = "cpu"
    rank: int = 0
    world_size: int = 1
    epoch: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if len(self.data) == 0:
            raise DatasetError("the dataset is empty")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> torch.Tensor:
        n = len(self.data)
        if self.train:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            idx = torch.randperm(n, generator=g)
        else:
            idx = torch.arange(n)
        if self.world_size > 1:
            per = -(-n // self.world_size)
            idx = torch.cat([idx, idx[: per * self.world_size - n]])  # pad like DistributedSampler
            idx = idx[self.rank::self.world_size]
        return idx

    def __len__(self) -> int:
        n = len(self._indices())
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = self._indices()
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch + 7_919 * (self.rank + 1))
        pin = torch.device(self.device).type == "cuda"
        for start in range(0, len(idx), self.batch_size):
            bidx = idx[start:start + self.batch_size]
            if self.drop_last and len(bidx) < self.batch_size:
                break
            x = self.data.images[bidx]
            if self.train:
                x = random_crop_flip(x, g)
            y = self.data.labels[bidx]
            if pin:
                x, y = x.pin_memory(), y.pin_memory()
            x = x.to(self.device, non_blocking=pin)
            yield normalize(x), y.to(self.device, non_blocking=pin)


def make_loader(ds: TensorImages, batch_size: int = 128, train: bool = False, seed: int = 0,
                drop_last: bool = False, device: str | torch.device = "cpu",
                rank: int = 0, world_size: int = 1) -> TensorLoader:
    """A :class:`TensorLoader` (train=True adds crop+flip augmentation and shuffling)."""
    return TensorLoader(ds, batch_size, train, seed, drop_last, device, rank, world_size)


def calibration_subset(ds: TensorImages, n_samples: int, seed: int = 0) -> TensorImages:
    """A seeded random subset of ``n_samples`` images (drawn without replacement)."""
    if not 0 < n_samples <= len(ds):
        raise ValueError(f"n_samples must be in 1..{len(ds)}, got {n_samples}")
    g = torch.Generator().manual_seed(seed)
    return ds.subset(torch.randperm(len(ds), generator=g)[:n_samples].sort().values)


def calibration_batches(ds: TensorImages, n_samples: int = 2048, batch_size: int = 256,
                        seed: int = 0, device: str | torch.device = "cpu"
                        ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Seeded calibration subset of the training split as a list of normalised batches."""
    sub = calibration_subset(ds, min(n_samples, len(ds)), seed)
    return list(make_loader(sub, batch_size=batch_size, train=False, device=device))


# --------------------------------------------------------------------------------------------
# ImageNet (ImageFolder root)
# --------------------------------------------------------------------------------------------
def default_workers(cap: int = 8) -> int:
    """DataLoader worker processes: the CPUs this process may use, at most ``cap``."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS / Windows
        n = os.cpu_count() or 1
    return max(0, min(cap, n))


def imagenet_loaders(root: str | os.PathLike | None = None, *, batch_size: int = 256,
                     workers: int | None = None, image_size: int = 224,
                     distributed: bool = False, seed: int = 0, num_classes: int | None = 1000,
                     device: str | torch.device = "cpu"):
    """(train_loader, val_loader) for an ImageNet-style ImageFolder root (``train/``, ``val/``).

    Standard torchvision transforms: RandomResizedCrop+flip for training, Resize(256/224·size)
    + CenterCrop for validation. With ``distributed=True`` a DistributedSampler shards training.
    ``workers``: None = :func:`default_workers` (the usable CPUs, at most 8). The training loader
    drops its last incomplete batch only when there is at least one full batch, so a folder with
    fewer images than ``batch_size`` still gives one (smaller) batch instead of none.
    """
    workers = default_workers() if workers is None else workers
    root = Path(root or os.environ.get("HMQAT_DATA_DIR") or "")
    val_name = "val" if (root / "val").is_dir() else "test"
    if not (root / "train").is_dir() or not (root / val_name).is_dir():
        raise DatasetError(f"ImageNet root {root or '(unset)'} must contain train/<class>/ and "
                           "val/<class>/ folders (ImageFolder layout). Set HMQAT_DATA_DIR to it.")
    import torchvision.transforms as T   # imported here: see the imports' note
    from torchvision.datasets import ImageFolder
    norm = T.Normalize(MEAN, STD)
    train_tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(),
                          T.ToTensor(), norm])
    val_tf = T.Compose([T.Resize(int(image_size * 256 / 224)), T.CenterCrop(image_size),
                        T.ToTensor(), norm])
    train_ds = ImageFolder(str(root / "train"), train_tf)
    val_ds = ImageFolder(str(root / val_name), val_tf)
    if num_classes is not None and len(train_ds.classes) != num_classes:
        raise DatasetError(f"{root / 'train'} has {len(train_ds.classes)} classes, expected "
                           f"{num_classes}. Pass num_classes= to match your data.")
    pin = torch.device(device).type == "cuda"
    sampler = DistributedSampler(train_ds, seed=seed) if distributed else None
    g = torch.Generator().manual_seed(seed)
    train = DataLoader(train_ds, batch_size, shuffle=sampler is None, sampler=sampler,
                       num_workers=workers, pin_memory=pin,
                       drop_last=len(train_ds) >= batch_size, generator=g,
                       persistent_workers=workers > 0)
    val = DataLoader(val_ds, batch_size, shuffle=False, num_workers=workers, pin_memory=pin)
    return train, val
