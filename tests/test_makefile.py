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


def _dry_run(*args: str) -> str:
    """`make -n` (print, run nothing) in the repository root, without the data variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HMQAT_")}
    return subprocess.run(["make", "-n", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, check=True).stdout


def _launch(out: str) -> str:
    """The `jupyter lab` command line, with runs of spaces (empty make variables) collapsed."""
    return " ".join(next(line for line in out.splitlines() if "jupyter lab" in line).split())


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_lab_passes_lab_args_and_adds_allow_root_only_for_root():
    args = "LAB_ARGS=--port 8890 --no-browser"
    user = _dry_run("lab", args, "LAB_UID=1000")
    assert _launch(user).endswith("jupyter lab notebooks/ --port 8890 --no-browser")
    assert "--allow-root" not in user                     # not root: jupyter's own default
    root = _dry_run("lab", args, "LAB_UID=0")
    assert _launch(root).endswith("jupyter lab notebooks/ --allow-root --port 8890 --no-browser")
    assert "running as root: adding --allow-root" in root
    given = _launch(_dry_run("lab", "LAB_ARGS=--allow-root --port 8891", "LAB_UID=0"))
    assert given.count("--allow-root") == 1 and given.endswith("--allow-root --port 8891")


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_lab_expands_home_and_root_relative_paths():
    out = _dry_run("lab", "LAB_UID=1000", "HMQAT_CACHE_DIR=~/cache", "HMQAT_DATA_DIR=data/x")
    launch = _launch(out)
    assert f"HMQAT_CACHE_DIR={Path.home() / 'cache'}" in launch
    assert f"HMQAT_DATA_DIR={ROOT / 'data/x'}" in launch
    assert f'echo "HMQAT_DATA_DIR={ROOT / "data/x"}"' in out      # printed before the launch


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_bench_leaves_out_the_browser_check():
    out = _dry_run("bench")
    loop = next(line for line in out.splitlines() if line.startswith("for b in"))
    assert "benchmarks/qat_step.py" in loop and "benchmarks/hessian_traces.py" in loop
    assert "lab_e2e" not in loop
