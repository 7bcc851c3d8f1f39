"""hmqat.hessian.layer_traces under torch.distributed (issue 8): 2 CPU processes with gloo.

This file is also the worker: ``torchrun --nproc_per_node=2 tests/test_distributed_traces.py
OUT`` runs :func:`_worker` on every rank, which saves each rank's frames to ``OUT``; the tests
compare the ranks with each other and with one process on the same batches and seed.

The 72 images in batches of (32, 32, 8) become 5 strata of (16, 16, 16, 16, 8) images with
``micro_batch=16``: rank 0 probes strata 0, 2, 4 and rank 1 strata 1, 3 (uneven shares, unequal
weights w_b). A stratum's HVPs are the same computation in either setting, the ranks share the
raw probe values exactly (x + 0 = x in the float64 all-reduce) and the estimate is the same
float64 arithmetic on the same values, so the frames are equal bit for bit, and are compared so.

That holds only when both sides run the float32 HVPs with the same number of threads: CPU
kernels split their reductions (conv, matmul, mean) by thread count, and another split rounds
differently. The ranks run with OMP_NUM_THREADS=1 (tests/torchrun_helpers.py) while the pytest
process gets cpu_count // xdist workers (tests/conftest.py) or all cores when run alone; a
reference computed there differed by up to 1.4e-6 relative on the joint-probe case (its
cross-block terms cancel, which magnifies the ~1e-7 relative differences of single float32
results). So the single-process reference is computed by the worker itself, in rank 0's
process before the process group starts: same threads, same kernels, exact by construction.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hmqat import distributed, hessian
from torchrun_helpers import torchrun

WORLD = 2
# tol 0.1 with at most 12 probes: several sweeps, layers stop at different probe counts
KW = {"tol": 0.1, "max_probes": 12, "seed": 3, "micro_batch": 16,
      "method": "hutchinson"}   # the probes are what the ranks split
IDLE_KW = {"tol": 0.05, "max_probes": 10, "seed": 1, "micro_batch": None, "probe": "joint",
           "method": "hutchinson"}


class SmallCNN(nn.Module):
    """conv-BN-ReLU ×2, global average pool, linear (float32, BN with non-trivial statistics)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 10)
        for bn in (self.bn1, self.bn2):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def _setup() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The model and the full, deterministic calibration list every rank (and the parent) gets."""
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))
               for n in (32, 32, 8)]
    return SmallCNN(), batches


def _save(df: pd.DataFrame, path: Path) -> None:
    path.write_text(json.dumps(hessian._frame_to_json(df)))


def _load(path: Path) -> pd.DataFrame:
    return hessian._frame_from_json(json.loads(path.read_text()))


def _no_estimate(*args, **kwargs):
    raise AssertionError("recomputed despite a cache hit")


def _worker(out: Path) -> None:
    """Runs on every rank under torchrun; writes <name><rank>.json files to ``out``, and rank 0
    first the one-process references one_cold.json and one_idle.json (no process group yet)."""
    if os.environ["RANK"] == "0":
        model, batches = _setup()
        _save(hessian.layer_traces(model, batches, progress=False, **KW), out / "one_cold.json")
        _save(hessian.layer_traces(model, batches[2:], progress=False, **IDLE_KW),
              out / "one_idle.json")
    distributed.init_from_env(device="cpu")
    r = distributed.rank()
    res: dict = {"rank": r, "world": distributed.world_size()}
    model, batches = _setup()
    ddp = distributed.wrap_ddp(model, "cpu")         # the estimator measures ddp.module
    cache = out / "cache"

    # 1. cold run through the DDP wrapper, with the progress bar requested on every rank
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        first = hessian.layer_traces(ddp, batches, cache_dir=cache, progress=True, **KW)
    res["bar_text"] = "hessian traces, sweep 1" in err.getvalue()
    res["model_training_restored"] = model.training
    _save(first, out / f"cold{r}.json")

    # 2. the same call again: a cache hit on every rank, nothing recomputed
    real, hessian._estimate = hessian._estimate, _no_estimate
    try:
        _save(hessian.layer_traces(model, batches, cache_dir=cache, progress=False, **KW),
              out / f"hit{r}.json")
    finally:
        hessian._estimate = real
    distributed.barrier()
    res["cache_files"] = sorted(p.name for p in cache.iterdir())

    # 3. joint probes on one stratum: rank 1 owns none and still takes part in every collective
    _save(hessian.layer_traces(model, batches[2:], progress=False, **IDLE_KW),
          out / f"idle{r}.json")

    # 4. other data on rank 1 only: a HessianError on every rank, no hang
    other = [(x + (r == 1), y) for x, y in batches]
    try:
        hessian.layer_traces(model, other, progress=False, **KW)
    except hessian.HessianError as exc:
        res["mismatch_error"] = str(exc)

    (out / f"rank{r}.json").write_text(json.dumps(res))
    distributed.cleanup()


# --------------------------------------------------------------------------------------------
# Launching
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_traces")
    torchrun([str(Path(__file__).resolve()), str(out)], world=WORLD,
             env={"TQDM_DISABLE": None, "OMP_WAIT_POLICY": "PASSIVE"})   # the bar is tested
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


def _assert_same_as_one_process(dist_df: pd.DataFrame, one: pd.DataFrame) -> None:
    """Same layers, probe counts and schedule; traces and SEs bit for bit (module docstring)."""
    pd.testing.assert_frame_equal(dist_df, one, check_exact=True)
    skip = {"wall_s", "world_size", "cache_key"}
    assert {k: v for k, v in dist_df.attrs.items() if k not in skip} == \
        {k: v for k, v in one.attrs.items() if k not in skip}
    assert (dist_df.attrs["world_size"], one.attrs["world_size"]) == (WORLD, 1)


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------
def test_two_ranks_give_the_single_process_estimate(ranks):
    out, (r0, r1) = ranks
    assert (r0["world"], r1["world"]) == (WORLD, WORLD)
    d0, d1 = _load(out / "cold0.json"), _load(out / "cold1.json")
    pd.testing.assert_frame_equal(d0, d1, check_exact=True)     # every rank: the same frame
    assert d0.attrs == d1.attrs                                  # incl. wall_s (max over ranks)
    one = _load(out / "one_cold.json")          # rank 0's process, before the group (docstring)
    _assert_same_as_one_process(d0, one)
    # the run exercised the schedule: 5 strata, several sweeps, layers stopped apart
    assert one.attrs["n_batches"] == 5 and one.attrs["sweeps"] > 1
    assert one["probes"].nunique() > 1
    assert d0.attrs["hvps"] == one.attrs["hvps"]                 # summed over the ranks
    assert r0["model_training_restored"] and r1["model_training_restored"]


def test_progress_bar_only_on_rank_0(ranks):
    _, (r0, r1) = ranks
    assert r0["bar_text"] and not r1["bar_text"]


def test_cache_hit_on_all_ranks_and_key_independent_of_world_size(ranks, monkeypatch):
    out, (r0, r1) = ranks
    cold = _load(out / "cold0.json")
    for r in range(WORLD):                 # the worker's patched _estimate was never called
        hit = _load(out / f"hit{r}.json")
        pd.testing.assert_frame_equal(hit, cold, check_exact=True)
        assert hit.attrs == cold.attrs
    assert r0["cache_files"] == r1["cache_files"] == [f"traces-{cold.attrs['cache_key'][:24]}.json"]
    # one process finds the file the two ranks wrote: the key does not depend on N
    monkeypatch.setattr(hessian, "_estimate", _no_estimate)
    model, batches = _setup()
    again = hessian.layer_traces(model, batches, progress=False, cache_dir=out / "cache", **KW)
    pd.testing.assert_frame_equal(again, cold, check_exact=True)


def test_rank_without_strata_and_joint_probes(ranks):
    out, _ = ranks
    d0, d1 = _load(out / "idle0.json"), _load(out / "idle1.json")
    pd.testing.assert_frame_equal(d0, d1, check_exact=True)
    one = _load(out / "one_idle.json")
    assert one.attrs["n_batches"] == 1
    _assert_same_as_one_process(d0, one)


def test_ranks_with_other_inputs_raise_on_every_rank(ranks):
    _, (r0, r1) = ranks
    for res in (r0, r1):
        assert "rank(s) [1] hold other weights, calibration batches or settings than rank 0" \
            in res["mismatch_error"]
        assert "same full, deterministic calibration list" in res["mismatch_error"]


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
