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
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

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


@contextlib.contextmanager
def results_lock(results_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive, non-blocking lock on ``results_dir/.lock`` (which records this pid)
    for the body of the ``with``; raise :class:`ResultsLocked` naming the holder's pid at once
    when another process holds it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        raise LockError("hmqat locks results folders with fcntl.flock, which this platform "
                        "(Windows) lacks; run the pipeline under Linux, macOS or WSL") from None
    folder = Path(results_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ResultsLocked(f"{folder} is in use by {_holder(path)} (lock {path}); wait for "
                                "that run to finish or stop it. Two runs on one results folder "
                                "would overwrite each other's checkpoints and manifest.") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        yield path
    finally:
        os.close(fd)  # releases the flock
