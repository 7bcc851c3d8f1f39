"""Datasets and fast tensor loaders.

Where CIFAR-10 comes from is decided by ``root=`` or ``HMQAT_DATA_DIR`` (docs/design.md §5):

* unset: torchvision downloads the original CIFAR-10 on first use (into ``~/.cache/hmqat``);
* a folder in torchvision's layout (``cifar-10-batches-py/`` directly or under ``cifar10/``);
* an ImageFolder tree (``train/<class>/*``, ``test/<class>/*``, directly or under ``cifar10/``),
  e.g. the JPEG q75 mirror.

Decoded images are cached once as uint8 tensors (``HMQAT_CACHE_DIR``, default
``~/.cache/hmqat``), so later loads take about a second. :class:`TensorLoader` does the standard
CIFAR augmentation (4-pixel padded random crop, horizontal flip) and normalisation on whole
batches, with no per-image PIL work.

    >>> from hmqat import data
    >>> train = data.load_cifar10(split="train")           # HMQAT_DATA_DIR or download
    >>> loader = data.make_loader(train, batch_size=128, train=True, seed=0)
    >>> calib = data.calibration_batches(train, n_samples=2048, batch_size=256, seed=0)
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import urllib.error
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torchvision
import torchvision.transforms as T
from torch.utils.data import DataLoader, DistributedSampler
from torchvision.datasets import ImageFolder
from torchvision.io import ImageReadMode, decode_image, read_file, write_png

from .runtime import CheckpointError, atomic_torch_save, load_checkpoint

__all__ = [
    "CIFAR10_CLASSES",
    "DatasetError",
    "TensorImages",
    "TensorLoader",
    "calibration_batches",
    "default_workers",
    "imagenet_loaders",
    "load_cifar10",
    "holdout_indices",
    "load_dataset",
    "split_train_val",
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


def _read_cache(cache: Path, n_files: int, classes: tuple[str, ...]) -> dict | None:
    """The decoded split cached at ``cache``, or None (and the file deleted, with a warning
    naming it) when it is unreadable or does not match the image files."""
    try:
        blob = load_checkpoint(cache)
        ok = (isinstance(blob, dict) and tuple(blob.get("classes", ())) == classes
              and len(blob.get("labels", ())) == n_files == len(blob.get("images", ())))
        problem = "" if ok else "it does not match the image files"
    except CheckpointError as exc:  # "<path>: <what>; <what to do>": keep <what>, shortened
        what = str(exc).removeprefix(f"{cache}: ").split(";")[0]
        problem = what if len(what) <= 160 else what[:157] + "..."
    if not problem:
        return blob
    warnings.warn(f"decode cache {cache} is unusable ({problem}); deleted it and decoding the "
                  f"images again", RuntimeWarning, stacklevel=3)
    cache.unlink(missing_ok=True)
    return None


def _load_imagefolder_split(base: Path, split: str, num_classes: int) -> TensorImages:
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
    cache = _cache_dir() / f"imagefolder-{split}-{_fingerprint(files)}.pt"
    blob = _read_cache(cache, len(files), classes) if cache.exists() else None
    if blob is not None:
        return TensorImages(blob["images"], blob["labels"], tuple(blob["classes"]), str(split_dir))
    images = _decode_files(files)
    ds = TensorImages(images, torch.tensor(labels, dtype=torch.long), classes, str(split_dir))
    atomic_torch_save({"images": ds.images, "labels": ds.labels, "classes": list(classes)}, cache)
    return ds


def _load_torchvision_split(base: Path | None, split: str) -> TensorImages:
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


def load_cifar10(root: str | os.PathLike | None = None, split: str = "train") -> TensorImages:
    """Load a CIFAR-10 split as uint8 tensors (source chosen by ``root`` / ``HMQAT_DATA_DIR``)."""
    if split not in ("train", "test"):
        raise DatasetError(f"split must be 'train' or 'test', got {split!r}")
    root = root if root is not None else os.environ.get("HMQAT_DATA_DIR") or None
    if root is None:
        return _load_torchvision_split(None, split)
    layout, base = _find_layout(Path(root).expanduser().resolve(), root)
    if layout == "torchvision":
        return _load_torchvision_split(base, split)
    return _load_imagefolder_split(base, split, num_classes=10)


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
        raise DatasetError(f"cannot hold out {n_val} validation images from {len(labels)} "
                           f"training images in {len(classes)} classes; lower val_size")
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


def load_dataset(name: str, split: str, *, root: str | os.PathLike | None = None,
                 n_synthetic: int = 512, seed: int = 0, val_size: int = 0,
                 val_seed: int = 0) -> TensorImages:
    """Profile-level entry point: ``cifar10`` or ``synthetic`` (tests, smoke profile).

    ``split``: ``train``, ``val`` or ``test``. With ``val_size > 0``, ``train`` is the training
    images minus a seeded, stratified hold-out of ``val_size`` images and ``val`` is that
    hold-out (:func:`split_train_val`); ``val`` needs ``val_size > 0``.
    """
    if split not in ("train", "val", "test"):
        raise DatasetError(f"split must be 'train', 'val' or 'test', got {split!r}")
    if split == "val" and val_size <= 0:
        raise DatasetError("split='val' needs val_size > 0 (the number of training images to "
                           "hold out for validation)")
    if name == "cifar10":
        full = load_cifar10(root, "test" if split == "test" else "train")
    elif name == "synthetic":
        full = synthetic_cifar(n_synthetic if split != "test" else max(n_synthetic // 4, 64),
                               seed=seed + (1 if split == "test" else 0))
    else:
        raise DatasetError(f"unknown dataset {name!r}; use 'cifar10' or 'synthetic' here, and "
                           "imagenet_loaders() for ImageNet")
    if split == "test" or val_size <= 0:
        return full
    train, val = split_train_val(full, val_size, val_seed)
    return train if split == "train" else val


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
