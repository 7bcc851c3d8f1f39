"""Launching the 2-process gloo tests (tests/test_distributed*.py, which are also the workers)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], *, world: int, env: dict[str, str | None] | None = None,
             timeout: int = 240) -> subprocess.CompletedProcess:
    """``torch.distributed.run --nproc_per_node=world args`` on one node from the repo root,
    one thread per rank over loopback gloo; ``env`` adds variables (None removes one). Asserts
    success, showing the tail of both streams otherwise."""
    full = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
            "PYTHONPATH": str(ROOT), "HMQAT_HEADLESS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
           "--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={free_port()}", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env={k: v for k, v in full.items() if v is not None},
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc
