"""`make lab` passes the same data variables as `make reproduce`, resolved to absolute paths
(its kernels run in notebooks/, where the README's relative paths would point elsewhere)."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_lab_resolves_data_paths_and_lab_results_are_ignored():
    env = {**os.environ, "HMQAT_DATA_DIR": "../shared/data/cifar10-jpeg",
           "HMQAT_WEIGHTS_DIR": "../shared/weights/cifar10"}
    env.pop("HMQAT_CACHE_DIR", None)
    out = subprocess.run(["make", "-n", "lab"], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=True).stdout
    data = (ROOT.parent / "shared/data/cifar10-jpeg").resolve()
    weights = (ROOT.parent / "shared/weights/cifar10").resolve()
    launch = next(line for line in out.splitlines() if "jupyter lab" in line)
    assert f"HMQAT_DATA_DIR={data}" in launch and f"HMQAT_WEIGHTS_DIR={weights}" in launch
    assert "HMQAT_CACHE_DIR" not in launch               # unset stays unset
    ignored = subprocess.run(["git", "check-ignore", "-q", "results/lab/figures/x.png"],
                             cwd=ROOT).returncode
    assert ignored == 0
