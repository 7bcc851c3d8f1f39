"""The benchmark scripts still run, on the device they are given (issue 8: --device), and refuse
a device this machine does not have with one clear message. Tiny settings: these tests check the
scripts' code paths and output tables, never their timings."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    path = ROOT / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_qat_step_benchmark_writes_its_table(tmp_path: Path) -> None:
    qat_step = _load("qat_step")
    out = tmp_path / "qat_step.txt"
    text = qat_step.main(["--device", "cpu", "--reps", "2", "--warmup", "0", "--no-compile",
                          "--no-baselines", "--layouts", "nchw", "--out", str(out)])
    assert out.read_text() == text
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines()
            if line and not line.startswith("#") and not line.startswith("variant")}
    assert set(rows) == {"fp32/nchw", "hmqat-eager/nchw"}
    assert rows["fp32/nchw"][1] == "1.000"            # wall ratio of the reference to itself
    assert float(rows["hmqat-eager/nchw"][1]) > 0
    assert "CPU" in text.splitlines()[0]
    assert "step_MiB" not in text                    # the memory column is CUDA-only


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_benchmarks_refuse_cuda_when_absent() -> None:
    qat_step = _load("qat_step")
    with pytest.raises(SystemExit, match="--device cpu"):
        qat_step.main(["--device", "cuda", "--out", ""])
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "hessian_traces.py"),
                        "--device", "cuda"], capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if k != "HMQAT_DATA_DIR"})
    assert r.returncode != 0
    assert "torch.cuda.is_available() is False" in r.stderr and "--device cpu" in r.stderr


def test_hessian_benchmark_runs_on_the_given_device(tmp_path: Path) -> None:
    out = tmp_path / "ht.txt"
    env = {k: v for k, v in os.environ.items() if k != "HMQAT_DATA_DIR"}
    env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "hessian_traces.py"), "--device", "cpu",
         "--n-samples", "32", "--batch-size", "32", "--tol", "0.5", "--ref-probes", "2",
         "--pyhessian-probes", "0", "--joint-probes", "2", "--lever-samples", "0",
         "--repeats", "1", "--budgets", "10.34", "--max-probes", "2", "--regret", "0.5",
         "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    text = out.read_text()
    for needle in ("device: cpu", "## (b-h) hmqat layer_traces, Hutchinson",
                   "## (a) OLD reference", "old_shared_probe_ratio",
                   "pyhessian: skipped (--pyhessian-probes 0)", "probe='joint'",
                   "graph reuse at batch 32", "## (a') FAIR reference",
                   "tol 0.5: repeat 0 reference", "## (e) decision-based stopping"):
        assert needle in text, needle
    # (b) = the defaults: exact Gauss-Newton traces for ResNet-20 (no probe error)
    fair = [line for line in text.splitlines() if line.startswith("fair_ratio: ")]
    assert len(fair) == 1 and float(fair[0].split()[1]) > 0
    assert "layer_traces defaults -> gauss_newton, exact, max rel_se 0.0000" in fair[0]
    assert "tol 0.5: repeat 0 hmqat defaults" in text and "method gauss_newton" in text
    for key in ("fair_ratio_hutchinson", "fair_ratio_gauss_newton_2proj"):
        line = [x for x in text.splitlines() if x.startswith(f"{key}: ")]
        assert len(line) == 1 and float(line[0].split()[1]) > 0, key
    assert "## (g) picks from the exact Gauss-Newton traces" in text
    for name in ("Hutchinson tol 0.5, repeat 0", "2 output-space probes per image, repeat 0",
                 "decision rule (e, auto)", "Hutchinson tol 0.05, run 0"):
        assert f"{name}: same pick as the exact traces [" in text, name
    ratio = [line for line in text.splitlines() if line.startswith("exact_pick_ratio: ")]
    assert len(ratio) == 1 and float(ratio[0].split()[1]) > 0
    # (e) with the defaults: output-space probe rounds on the Gauss-Newton path
    dec = [line for line in text.splitlines() if line.startswith("decision_ratio: ")]
    assert len(dec) == 1 and float(dec[0].split()[1]) > 0
    assert "[auto -> gauss_newton] stopped by the rule:" in text
    assert "within 0.5 relative ΣΩ of the pick" in text
    assert "picks equal to the Hutchinson tol-0.05 traces' (run 0)" in text
    assert "picks equal to the exact traces' at [10.34]" in text
    # all 20 ResNet-20 layers are in the hmqat table
    assert sum(line.split()[0].endswith(("conv1", "conv2", "linear"))
               for line in text.splitlines() if line.strip()) >= 20


def test_hessian_benchmark_rejects_one_pyhessian_probe() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "hessian_traces.py"),
                        "--pyhessian-probes", "1"], capture_output=True, text=True)
    assert r.returncode == 2 and "use 0 (skip) or >= 2" in r.stderr
