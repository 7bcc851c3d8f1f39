"""Run-time infrastructure shared by every layer (docs/design.md §2): atomic files, JSON, one
progress bar, the device, seeding and provenance.

Every file the package writes goes through :func:`atomic_write_bytes`: the bytes land in a
hidden temporary file in the target's folder, are flushed to disk, then ``os.replace`` swaps
them in, so a crash leaves either the old file or the new one, never half of one.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import pickle
import platform
import random
import subprocess
import sys
import time
import uuid
from importlib.metadata import version as _version
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas
import torch
from tqdm import std as tqdm_std
from tqdm.auto import tqdm as tqdm_auto

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "WriteError",
    "REPO_ROOT",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "git",
    "hash_state_dict",
    "hash_tensor",
    "in_notebook",
    "load_checkpoint",
    "manifest",
    "model_fingerprint",
    "param_path",
    "progress",
    "read_json",
    "resolve_device",
    "seed_everything",
    "temporary_path",
    "to_json",
    "write_error",
]


# --------------------------------------------------------------------------------------------
# Atomic files
# --------------------------------------------------------------------------------------------
def temporary_path(path: Path) -> Path:
    """A fresh hidden name next to ``path`` (same folder, so ``os.replace`` is atomic)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


class WriteError(OSError):
    """A file could not be written because of its disk: full, over quota, read-only, or not
    writable by this user. One line naming the file, the cause and the fix; ``errno`` and
    ``filename`` are those of the underlying ``OSError`` (so ``except OSError`` still works)."""

    def __init__(self, message: str, code: int | None, filename: str):
        super().__init__(code, message)
        self.message, self.filename = message, filename

    def __str__(self) -> str:
        return self.message


# errno -> (cause, fix); {folder} is the folder that could not be written
_WRITE_FAILURES = {
    errno.ENOSPC: ("the disk is full (No space left on device)",
                   "free space on the disk holding {folder} (`df -h {folder}` shows it) and rerun"),
    errno.EDQUOT: ("the disk quota is exceeded",
                   "free space within your quota on the disk holding {folder} and rerun"),
    errno.EROFS: ("the file system is read-only",
                  "remount it read-write, or use a folder on a writable disk"),
    errno.EACCES: ("permission denied",
                   "make {folder} writable by this user (e.g. `chmod u+w {folder}`) and rerun"),
    errno.EPERM: ("operation not permitted",
                  "make {folder} writable by this user (e.g. `chmod u+w {folder}`) and rerun"),
}


def write_error(path: str | os.PathLike, exc: OSError) -> OSError:
    """``exc``, raised while writing ``path``, as a one-line :class:`WriteError` naming the file
    (absolute), the cause and the fix when its errno is a disk problem (full, quota, read-only,
    permissions); any other ``OSError`` (and an existing :class:`WriteError`) is returned as
    is."""
    if isinstance(exc, WriteError) or exc.errno not in _WRITE_FAILURES:
        return exc
    target = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(target)
    cause, fix = _WRITE_FAILURES[exc.errno]
    return WriteError(f"cannot write {target}: {cause}; {fix.format(folder=folder)}",
                      exc.errno, target)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: a temporary file in the same folder, fsync, then
    ``os.replace``. Parent folders are created; on any error the temporary file is removed and
    the old file (if any) is untouched. A full, read-only or unwritable disk raises
    :class:`WriteError` (one line: the file, the cause, the fix). Returns the path."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "xb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        err = write_error(path, exc)
        if err is exc:
            raise
        raise err from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` with :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` with :func:`atomic_write_bytes`."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


# --------------------------------------------------------------------------------------------
# Safe checkpoint loading
# --------------------------------------------------------------------------------------------
class CheckpointError(ValueError):
    """A checkpoint file is unsafe to load (not plain tensors/containers), truncated or corrupt,
    or was not written by :func:`hmqat.train.fit`. The message names the file."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint path names no file. Distinct from a file that exists but does not load (the
    advice differs: fix the path, not delete the file); also a ``FileNotFoundError``."""


#: The repository root (the folder holding ``hmqat/``, ``notebooks/`` and ``params/``).
REPO_ROOT = Path(__file__).resolve().parents[1]


def param_path(value: str | os.PathLike, base: str | os.PathLike | None = None) -> Path:
    """A path given as a parameter (``params/<profile>.yaml``, a notebook's parameters cell) as
    an absolute path: ``~`` is expanded and a relative path is taken from ``base`` (default: the
    repository root, :data:`REPO_ROOT`), not from the current folder, which is ``notebooks/``
    inside a notebook kernel and wherever the user stands on the command line."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else Path(base or REPO_ROOT) / path


def _missing_checkpoint(path: str | os.PathLike, fix: str | None) -> CheckpointNotFoundError:
    """The error for a checkpoint path that names no file: the path as given, the absolute path
    it was looked up at (and from where, when it is relative) and ``fix``."""
    where = Path(path).expanduser()
    if where.is_absolute():
        looked = f"no file {where}"
    else:
        looked = (f"no file {Path.cwd() / where} (the relative path {os.fspath(path)!r} was "
                  f"resolved against the current folder {Path.cwd()})")
    fix = fix or ("check the path (an absolute path avoids surprises), or create the "
                  "checkpoint first")
    return CheckpointNotFoundError(f"{path}: checkpoint not found: {looked}; {fix}")


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", *,
                    fix: str | None = None) -> Any:
    """``torch.load(path, weights_only=True)`` with errors that name the file.

    Every file hmqat writes holds only tensors and plain containers, so nothing is ever
    unpickled as code: a file whose pickle asks for anything else (a ``__reduce__`` calling
    ``os.system``, a pickled class) raises :class:`CheckpointError` before it runs, and so does
    a truncated or corrupt file. A path that names no file raises
    :class:`CheckpointNotFoundError` with the absolute path looked at and ``fix`` (what the
    caller's user should do, e.g. which parameter to set; a generic hint by default); a folder
    or an unreadable file say so instead of calling the file corrupt.
    """
    where = Path(path).expanduser()
    if not where.exists():
        raise _missing_checkpoint(path, fix)
    if where.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file; "
                              f"{fix or 'pass the path of the checkpoint file itself'}")
    try:
        return torch.load(where, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if "GLOBAL" in ln or "global" in ln]
        first = lines[0].rstrip(".") if lines else type(exc).__name__  # "...GLOBAL posix.system"
        raise CheckpointError(
            f"{path}: refused to load: it holds objects other than tensors and plain containers "
            f"({first}); hmqat loads checkpoints with weights_only=True and never runs code from "
            f"one. Delete the file, or re-save a trusted one as torch.save(model.state_dict(), "
            f"path).") from None
    except FileNotFoundError:    # removed between the check and the read
        raise _missing_checkpoint(path, fix) from None
    except PermissionError as exc:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({exc.strerror}); give this "
                              f"user read access to it (chmod u+r) or copy it somewhere "
                              f"readable") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({exc}); the file is "
                              f"truncated or corrupt: delete it (a training run then starts "
                              f"over) or restore it from a copy") from None


def _json_default(obj: Any) -> Any:
    """JSON fallback: numpy/torch scalars and arrays, paths, sets."""
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if hasattr(obj, "tolist") and callable(obj.tolist):   # numpy scalar/array, torch tensor
        return obj.tolist()
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    raise TypeError(f"cannot write an object of type {type(obj).__name__} as JSON; convert it "
                    f"to a dict/list/str/number first")


def to_json(obj: Any, indent: int | None = 2) -> str:
    """``obj`` as JSON text (sorted keys); numpy/torch scalars and arrays become numbers/lists,
    paths strings. Raises ``TypeError`` naming the type that cannot be written."""
    return json.dumps(obj, indent=indent, sort_keys=True, default=_json_default,
                      ensure_ascii=False)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as JSON (indent 2, sorted keys, trailing newline) atomically. A value that
    cannot be written raises ``ValueError`` naming the file, before anything is written."""
    try:
        text = to_json(obj)
    except TypeError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    return atomic_write_text(path, text + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file written by :func:`atomic_write_json`."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------
# Hashing tensors and models (cache keys, run identities)
# --------------------------------------------------------------------------------------------
def hash_tensor(h: "hashlib._Hash", t: torch.Tensor) -> None:
    """Feed ``t``'s dtype, shape and bytes (on CPU) into the hash ``h``."""
    t = t.detach().to("cpu").contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def hash_state_dict(h: "hashlib._Hash", model: torch.nn.Module) -> None:
    """Feed every ``state_dict`` entry (name, dtype, shape, bytes: weights and BN statistics)
    of ``model`` into ``h``, in the state dict's order."""
    for name, t in model.state_dict().items():
        h.update(name.encode())
        hash_tensor(h, t)


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 hex of ``model``'s state dict (:func:`hash_state_dict`): keys runs to the exact
    weights they started from."""
    h = hashlib.sha256()
    hash_state_dict(h, model)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------
def in_notebook() -> bool:
    """True inside a Jupyter kernel (where tqdm.auto would draw a widget)."""
    ipython = sys.modules.get("IPython")
    get = getattr(ipython, "get_ipython", None)
    return get is not None and type(get()).__name__ == "ZMQInteractiveShell"


def progress(iterable: Iterable | None = None, **kw: Any) -> Any:
    """The one progress bar (tqdm). Text-only (ASCII, refreshed every ``TQDM_MININTERVAL`` s,
    default 30) when ``HMQAT_HEADLESS`` is set (papermill, CI) and outside a notebook; the
    notebook widget only in an interactive notebook, so executed notebooks keep a few plain
    lines and no widget. ``kw`` goes to tqdm (``total``, ``desc``, ``unit``, ``disable``...)."""
    headless = bool(os.environ.get("HMQAT_HEADLESS"))
    if headless or not in_notebook():
        kw.setdefault("ascii", True)
        kw.setdefault("mininterval",
                      float(os.environ.get("TQDM_MININTERVAL", 30)) if headless else 1.0)
        return tqdm_std.tqdm(iterable, **kw)
    return tqdm_auto(iterable, **kw)


# --------------------------------------------------------------------------------------------
# Device, seeds, provenance
# --------------------------------------------------------------------------------------------
def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/"auto" -> CUDA when available, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed python, numpy and torch; optionally switch torch to deterministic algorithms."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def git(*args: str) -> str:
    """Output of ``git args`` run in the package's folder; "" when git fails or is missing."""
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def manifest(seed: int | None = None, device: str | torch.device | None = None,
             **extra: Any) -> dict[str, Any]:
    """Provenance of a run: git sha and dirty flag (tracked changes outside results/), versions,
    device, seed, plus ``extra``."""
    dev = resolve_device(device)
    return {
        "git_sha": git("rev-parse", "HEAD") or None,
        # dirty = uncommitted changes to tracked files outside results/ (a run's own outputs
        # there do not change the code that produced them)
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no", "--", ":(top)",
                              ":(top,exclude)results")),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),   # its metadata: importing it costs ~1.5 s
        "numpy": np.__version__,
        "pandas": pandas.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(dev) + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""),
        "seed": seed,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **extra,
    }
