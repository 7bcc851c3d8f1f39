"""One writer per results folder: an exclusive lock on ``results/<profile>/.lock``.

Two pipelines on one profile would both run every step, and one would "resume" the other's
half-written checkpoints; :func:`hmqat.study.reporting.update_manifest` is a read-modify-write. The
pipeline therefore holds :func:`results_lock` for its whole run, so the second run stops at once
with the holder's pid, before any work:

    >>> from hmqat.locking import results_lock
    >>> with results_lock(Path("results/quick")):
    ...     ...                                      # run steps, update manifest.json

The lock is ``fcntl.flock`` (POSIX), released by the kernel when the holder exits, even after
``kill -9``: a stale ``.lock`` file left behind never blocks a later run. It works on local file
systems and on NFS v4; on Windows (no ``fcntl``) :func:`results_lock` raises :class:`LockError`
saying so, rather than running unprotected.

The lock file is opened with ``O_NOFOLLOW``: a ``.lock`` that is a symbolic link is refused
(writing the pid through it would empty the file it points to), and so is one that is not a
regular file. A results folder that cannot be written (read-only disk, full disk, permissions)
is one :class:`LockError` naming the folder and the fix, before any work.
"""
from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from .runtime import write_error

__all__ = ["LockError", "ResultsLocked", "results_lock"]

LOCK_NAME = ".lock"


class LockError(RuntimeError):
    """The results folder cannot be locked on this system."""


class ResultsLocked(LockError):
    """Another process holds the results folder's lock; the message names its pid."""


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid else "another process (pid not recorded yet)"


def _refuse_link(path: Path) -> None:
    """Raise :class:`LockError` when ``path`` is a symbolic link (naming its target)."""
    if path.is_symlink():
        try:
            target = f" (to {os.readlink(path)})"
        except OSError:
            target = ""
        raise LockError(f"{path} is a symbolic link{target}; hmqat refuses to lock through a "
                        f"link, which would overwrite the file it points to. Remove the link "
                        f"(rm {path}) and rerun: the lock file is created again")


def _open_lock(folder: Path, path: Path) -> int:
    """Create ``folder`` if needed and open ``path`` for the lock without following a link;
    every failure is one :class:`LockError` naming the path and the fix."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        err = write_error(folder, exc)
        if err is not exc:
            raise LockError(f"results folder: {err}") from None
        raise LockError(f"cannot create the results folder {folder} ({exc.strerror}); move "
                        f"away what is there and rerun") from None
    _refuse_link(path)
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as exc:
        _refuse_link(path)          # ELOOP: made a link between the check and the open
        err = write_error(path, exc)
        if err is not exc:
            raise LockError(f"results folder: {err}") from None
        raise LockError(f"cannot open the lock file {path} ({exc.strerror}); remove whatever is "
                        f"there (rm -r {path}) and rerun") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise LockError(f"{path} is not a regular file; remove it (rm -r {path}) and rerun: the "
                        f"lock file is created again")
    return fd


@contextlib.contextmanager
def results_lock(results_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive, non-blocking lock on ``results_dir/.lock`` (which records this pid)
    for the body of the ``with``; raise :class:`ResultsLocked` naming the holder's pid at once
    when another process holds it, and :class:`LockError` when the lock file is a symbolic
    link or not a regular file, or the folder cannot be written."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        raise LockError("hmqat locks results folders with fcntl.flock, which this platform "
                        "(Windows) lacks; run the pipeline under Linux, macOS or WSL") from None
    folder = Path(results_dir)
    path = folder / LOCK_NAME
    fd = _open_lock(folder, path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ResultsLocked(f"{folder} is in use by {_holder(path)} (lock {path}); wait for "
                                "that run to finish or stop it. Two runs on one results folder "
                                "would overwrite each other's checkpoints and manifest.") from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            os.fsync(fd)
        except OSError as exc:
            raise LockError(f"results folder: {write_error(path, exc)}") from None
        yield path
    finally:
        os.close(fd)  # releases the flock
