"""The smoke profile end to end through papermill, on synthetic data (no ../shared)."""
import json
import os
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from hmqat.study import pipeline

ROOT = Path(__file__).resolve().parent.parent
#: The notebooks the smoke profile runs (07_frontier_walk has its own end-to-end test).
SMOKE = [n for n in pipeline.NOTEBOOKS if n in pipeline.load_params("smoke")["run"]]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    steps = pipeline.run_pipeline("smoke", results_root=out)
    return out / "smoke", steps


def test_every_notebook_ran_and_artifacts_are_well_formed(smoke_run):
    root, steps = smoke_run
    assert list(steps) == SMOKE
    assert all(s["status"] == "ran" and s["wall_s"] >= 0 for s in steps.values())
    for nb in SMOKE:
        executed = json.loads((root / "executed" / f"{nb}.ipynb").read_text())
        assert executed["metadata"]["papermill"]["exception"] in (None, False)
    for fig in ("fp32_finetune", "layer_traces", "sensitivity_kendall", "sensitivity_frontier",
                "sensitivity_single_layer", "pareto_frontier", "bit_allocation", "accuracy_size",
                "accuracy_bops", "ablation"):
        png, pdf = root / "figures" / f"{fig}.png", root / "figures" / f"{fig}.pdf"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", fig
        assert pdf.read_bytes()[:4] == b"%PDF", fig
    for table in ("headline", "ablation", "sensitivity_kendall_fixed_size", "layer_traces",
                  "search_comparison"):
        for ext in ("csv", "md", "tex"):
            text = (root / "tables" / f"{table}.{ext}").read_text()
            assert "synthetic" in text and "smoke" in text, (table, ext)
    headline = pd.read_csv(root / "tables" / "headline.csv", comment="#")
    assert len(headline) >= 4 and headline["test top-1"].between(0, 100).all()
    assert {"BOPs (G)", "size MB", "± std", "seeds", "val top-1"} <= set(headline.columns)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["git_sha"] is None or len(manifest["git_sha"]) == 40
    assert "torch" in manifest and set(manifest["steps"]) == set(SMOKE)
    for step in manifest["steps"].values():     # each step records the code it ran with
        assert step["git_sha"] is None or len(step["git_sha"]) == 40
        assert isinstance(step["git_dirty"], bool) and step["finished_utc"].endswith("Z")
    assert "synthetic data" in (root / "README.md").read_text()
    for step, outputs in ((s, pipeline.KEY_OUTPUTS[s]) for s in SMOKE):   # skip needs them
        stamp = json.loads((root / ".stamps" / f"{step}.json").read_text())
        assert stamp["key_outputs"] == [p.format(arch="resnet20") for p in outputs]
        assert all((root / p).exists() for p in stamp["key_outputs"]), step
        assert manifest["steps"][step]["failure"] is None


def test_qat_level_check_and_budget_b_rows_in_the_smoke_run(smoke_run):
    """Experiment 7 and the transition experiment's budget B (smoke profile: both on)."""
    root, _ = smoke_run
    level = pd.read_csv(root / "data" / "qat_level.csv")
    assert len(level) == 3 and level["omega_joint"].is_monotonic_increasing
    assert level["qat_top1"].between(0, 100).all()
    kendall = pd.read_csv(root / "tables" / "qat_level_kendall.csv", comment="#")
    assert kendall["predictor"].iloc[0] == "omega_joint" and (kendall["n_configs"] == 3).all()
    paired = pd.read_csv(root / "tables" / "transition_experiment.csv", comment="#")
    b = paired[paired["budget"] == "B"]
    assert set(b["point"]) == set(paired["point"]) and set(b["role"]) <= {"reference", "arm",
                                                                          "control"}
    # a control (plain LSQ with the ladder's extra steps) exactly where the chosen arm has a
    # ladder; the ladder path itself: tests/test_ablation.py
    ladder = b[(b["role"] == "arm") & (b["total_steps"] > b["steps_at_target"])]
    assert (b["role"] == "control").any() == (not ladder.empty)
    assert ladder["ctrl_test_diff"].notna().all()
    assert b.loc[b["role"] != "arm", "ctrl_test_diff"].isna().all()
    readme = (root / "README.md").read_text()
    assert "After QAT (experiment 7)" in readme and "Experiment 7: Kendall" in readme


def test_executed_notebooks_show_their_figures(smoke_run):
    """Every plotting.savefig call leaves an image/png output in its executed notebook."""
    root, _ = smoke_run
    for nb in SMOKE:
        source = (ROOT / "notebooks" / f"{nb}.py").read_text()
        executed = json.loads((root / "executed" / f"{nb}.ipynb").read_text())
        images = sum("image/png" in out.get("data", {}) for cell in executed["cells"]
                     for out in cell.get("outputs", []))
        assert images >= source.count("plotting.savefig("), nb


def test_rerun_skips_unchanged_steps(smoke_run):
    root, _ = smoke_run
    steps = pipeline.run_pipeline("smoke", results_root=root.parent)
    assert all(s["status"].startswith("skipped") for s in steps.values())


def test_echo_prefixes_lines_and_progress_refreshes():
    import io

    out = io.StringIO()
    echo = pipeline._Echo("03_qat", out)
    echo.write("epoch 1/2:   0%|          | 0/2\repoch 1/2:  50%|#####     | 1/2")
    echo.write("\r          \r\nepoch=1 train_loss=2.3 val_top1=10.5\n\n")
    echo.write("epoch=1 train_loss=2.3 val_top1=10.5\npartial")
    assert out.getvalue().splitlines() == [
        "[hmqat] 03_qat | epoch 1/2:   0%|          | 0/2",
        "[hmqat] 03_qat | epoch 1/2:  50%|#####     | 1/2",
        "[hmqat] 03_qat | epoch=1 train_loss=2.3 val_top1=10.5"]


def test_failing_notebook_names_its_executed_copy(tmp_path, capfd):
    nbs = tmp_path / "notebooks"
    shutil.copytree(ROOT / "notebooks", nbs)
    nb = json.loads((nbs / "00_fp32_baseline.ipynb").read_text())
    nb["cells"].append({"cell_type": "code", "id": "boom", "metadata": {}, "execution_count": None,
                        "outputs": [], "source": "raise RuntimeError('boom in cell')"})
    (nbs / "00_fp32_baseline.ipynb").write_text(json.dumps(nb))
    with pytest.raises(pipeline.PipelineError, match=r"00_fp32_baseline.ipynb failed.*"
                       r"RuntimeError: boom in cell(.|\n)*executed copy.*00_fp32_baseline.ipynb"):
        pipeline.run_pipeline("smoke", results_root=tmp_path / "r", notebooks_dir=nbs,
                              only=["00_fp32_baseline"])
    console = capfd.readouterr()
    assert "IPKernelApp" not in console.out + console.err          # quiet kernel transport
    assert "[hmqat] 00_fp32_baseline | epoch=" in console.out      # each run's lines echoed


def test_unknown_profile_and_notebook(tmp_path):
    with pytest.raises(pipeline.PipelineError, match="unknown profile 'huge'"):
        pipeline.run_pipeline("huge", results_root=tmp_path)
    with pytest.raises(pipeline.PipelineError, match=r"unknown notebooks \['99_x'\]"):
        pipeline.run_pipeline("smoke", results_root=tmp_path, only=["99_x"])


def test_every_profile_sets_every_declared_parameter():
    import papermill as pm

    for profile in ("smoke", "quick", "paper", "imagenet"):
        cfg = pipeline.load_params(profile)
        for nb in pipeline.NOTEBOOKS:
            declared = list(pm.inspect_notebook(str(ROOT / "notebooks" / f"{nb}.ipynb")))
            params = pipeline.notebook_parameters(cfg, nb, declared, Path("r"), profile)
            assert sorted(params) == sorted(declared), (profile, nb)
            assert params["profile"] == profile and params["results_dir"] == "r"
    cfg = pipeline.load_params("smoke")
    declared = list(pm.inspect_notebook(str(ROOT / "notebooks" / "03_qat.ipynb"))) + ["new_knob"]
    with pytest.raises(pipeline.PipelineError, match=r"does not set \['new_knob'\]"):
        pipeline.notebook_parameters(cfg, "03_qat", declared, Path("r"), "smoke")


def test_study_from_params_takes_the_declared_fields(tmp_path):
    params = {"results_dir": str(tmp_path / "r"), "profile": "smoke", "arch": "resnet20",
              "dataset": "synthetic", "seed": 3, "device": "cpu", "batch_size": 16,
              "n_synthetic": 64, "fp32_lr": 0.1, "__name__": "__main__"}
    study = pipeline.Study.from_params(params)
    assert (study.profile, study.seed, study.batch_size, study.n_synthetic) == ("smoke", 3, 16, 64)
    assert study.pretrained is True and study.root == tmp_path / "r"   # undeclared: default
    with pytest.raises(pipeline.PipelineError, match="needs results_dir"):
        pipeline.Study.from_params({"profile": "smoke"})


def _walk(obj, path=""):
    """(path, value) of every leaf of a JSON object."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _walk(v, f"{path}[{i}]")
    else:
        yield path, obj


def test_manifest_is_complete_relative_and_finite(smoke_run):
    """Provenance written by code only (docs/method.md §8): the manifest has no NaN, no
    absolute path, the profile's seed, and every field notebook 05's report reads."""
    root, _ = smoke_run
    text = (root / "manifest.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    manifest = json.loads(text)
    assert manifest["seed"] == pipeline.load_params("smoke")["common"]["seed"]
    for path, value in _walk(manifest):
        if isinstance(value, str):
            assert not value.startswith("/") and str(root) not in value, (path, value)
            assert ":\\" not in value, (path, value)
    for name, step in manifest["steps"].items():   # what 05_report's timing table reads
        assert step["status"] in ("ran", "skipped (unchanged)"), name   # a skip keeps the rest
        assert step["wall_s"] >= 0 and step["compute_wall_s"] >= step["wall_s"], name
        assert step["attempts"] == 1, name
        assert step["parameters"]["results_dir"] == "."
    for nb in SMOKE:   # the executed copies name the results folder relatively
        executed = (root / "executed" / f"{nb}.ipynb").read_text()
        before = {executed[m.start() - 1] for m in re.finditer(re.escape(str(root)), executed)}
        assert before <= {"."}, nb                 # only as the tail of "../../…"
        assert str(ROOT) not in executed, nb
    assert "nan" not in (root / "README.md").read_text().split("## Wall time")[1]


def test_smoke_run_scores_on_validation_and_reads_test_once(smoke_run):
    root, _ = smoke_run
    fp32 = json.loads((root / "data" / "fp32.json").read_text())
    assert fp32["val_size"] == pipeline.load_params("smoke")["common"]["val_size"] > 0
    assert 0 <= fp32["val_top1"] <= 100 and 0 <= fp32["test_top1"] <= 100
    runs = pd.DataFrame(json.loads((root / "data" / "qat_results.json").read_text()))
    assert runs[["val_top1", "test_top1"]].notna().all().all()
    assert set(runs["seed"]) == set(pipeline.load_params("smoke")["notebooks"]["03_qat"]["seeds"])
    picks = json.loads((root / "data" / "configs.json").read_text())
    equal_size = [k for k in picks if k.startswith("HMQAT =W")]
    readme = (root / "README.md").read_text()
    if equal_size:       # one seed: the sentence says it is a screen, not a result
        pairs = pd.read_csv(root / "tables" / "paired_comparisons.csv", comment="#")
        assert list(pairs["a"]) == equal_size and pairs["equal_size"].all()
        assert "a screen, not a result" in readme
    else:                # 02 found that the only config of that size is the uniform one
        executed = (root / "executed" / "02_bit_allocation.ipynb").read_text()
        assert "no equal-size pick" in executed and "no equal-size pair" in readme


@pytest.mark.parametrize("val_from", ["test", "train"])
def test_study_val_split_is_disjoint_seeded_and_unseen(tmp_path, val_from):
    """val_from='test' (the study's profiles): val and test are disjoint halves of the test
    split and train is every training image; val_from='train': val is held out of train."""
    def make(seed, val_size=20):
        return pipeline.Study(str(tmp_path / f"r{seed}-{val_size}"), profile="smoke",
                              dataset="synthetic", n_synthetic=128, val_size=val_size,
                              val_from=val_from, seed=seed, device="cpu")
    a, b = make(0), make(0)
    tr, va, te = a.data("train"), a.data("val"), a.data("test")
    full = make(0, val_size=0)
    assert len(va) == 20
    if val_from == "test":
        assert len(tr) == len(full.data("train")) == 128
        assert len(va) + len(te) == len(full.data("test"))
    else:
        assert len(tr) + len(va) == 128 and len(te) == len(full.data("test"))

    def rows(ds):
        return {tuple(x.flatten()[:64].tolist()) for x in ds.images}
    assert not rows(tr) & rows(va) and not rows(te) & rows(va)   # disjoint
    assert rows(va) == rows(b.data("val"))               # same seed, same hold-out
    assert a.data_key["val_size"] == 20 and a.data_key["eval_split"] == "val"
    assert a.data_key.get("val_from", "train") == val_from
    assert a.data_key != full.data_key                   # another split, another run identity
    assert a.data_key != make(1).data_key                # another hold-out seed, too
    assert "val_size" not in full.data_key               # = the torchrun CLI's key
    assert ("test-split images" in a.split_label) == (val_from == "test")
    with pytest.raises(pipeline.PipelineError, match="val_size"):
        full.data("val")


def test_attempts_count_an_interrupted_attempt(tmp_path):
    """A step killed mid-run leaves its measured time; the next run adds it to compute_wall_s."""
    path = tmp_path / "step.attempts.json"
    path.write_text(json.dumps({"earlier_s": [5.0], "current": {"elapsed_s": 12.5}}))
    with pipeline._Attempts(path, beat_s=0.01) as attempt:
        pass
    assert attempt.earlier == [5.0, 12.5] and attempt.elapsed >= 0
    assert not path.exists()                      # a finished step leaves no attempt behind
    with pytest.raises(RuntimeError):
        with pipeline._Attempts(path, beat_s=0.01):
            raise RuntimeError("boom")
    left = json.loads(path.read_text())
    assert left["earlier_s"] == [] and left["current"]["elapsed_s"] >= 0


def test_executed_copies_hold_no_absolute_paths(tmp_path):
    """Warnings in cell outputs name library files: the repository root and the environment's
    prefix are cut, as are papermill's recorded paths."""
    import sys

    site = f"{Path(sys.prefix).resolve()}/lib/site.py:1: FutureWarning: x\n"
    mine = f"{ROOT.resolve()}/hmqat/hessian.py:9: UserWarning: y\n"
    nb = {"metadata": {"papermill": {"input_path": str(ROOT / "notebooks" / "a.ipynb"),
                                     "output_path": str(tmp_path / "a.ipynb")}},
          "cells": [{"cell_type": "code", "outputs": [
              {"output_type": "stream", "name": "stderr", "text": [site, mine]},
              {"output_type": "error", "traceback": [mine]}]}]}
    out = tmp_path / "a.ipynb"
    out.write_text(json.dumps(nb))
    pipeline._relative_paths(ROOT / "notebooks" / "a.ipynb", out)
    text = out.read_text()
    assert str(ROOT.resolve()) not in text and str(Path(sys.prefix).resolve()) not in text
    got = json.loads(text)
    assert got["cells"][0]["outputs"][0]["text"][1] == "hmqat/hessian.py:9: UserWarning: y\n"
    assert got["metadata"]["papermill"]["input_path"] == "notebooks/a.ipynb"


def test_reuse_copies_computed_runs_once_and_never_results(tmp_path, capsys):
    source, target = tmp_path / "quick", tmp_path / "extended"
    assert pipeline.reuse_runs(source, target) == []            # nothing finished there yet
    assert "holds no finished step" in capsys.readouterr().out
    (source / "manifest.json").parent.mkdir(parents=True)
    (source / "manifest.json").write_text("{}")             # started, nothing finished yet
    assert pipeline.reuse_runs(source, target) == []
    for rel in ("checkpoints/qat/abc/result.json", "cache/traces-1.json", "tables/headline.csv",
                "data/qat_results.json", ".stamps/00_fp32_baseline.json"):
        (source / rel).parent.mkdir(parents=True, exist_ok=True)
        (source / rel).write_text("{}")
    target.mkdir()
    assert pipeline.reuse_runs(source, target) == ["checkpoints", "cache"]
    assert (target / "checkpoints/qat/abc/result.json").is_file()
    assert (target / "cache/traces-1.json").is_file()
    assert not (target / "tables").exists() and not (target / "data").exists()
    assert not list(target.glob(".reuse-*"))                 # copied under a temporary name
    assert json.loads((target / "manifest.json").read_text())["reused_from"] == {
        "profile": "quick", "copied": ["checkpoints", "cache"]}
    (target / "checkpoints/qat/abc/result.json").write_text('{"mine": 1}')
    assert pipeline.reuse_runs(source, target) == []             # once: nothing overwritten
    assert "mine" in (target / "checkpoints/qat/abc/result.json").read_text()
    cfg = pipeline.load_params("extended")
    assert cfg["reuse"] == "quick"
    from hmqat.locking import results_lock
    with results_lock(source):                               # a running source is not copied
        with pytest.raises(Exception, match=str(os.getpid())):
            pipeline.reuse_runs(source, tmp_path / "other")


def test_a_bad_reuse_is_one_clear_error(tmp_path):
    import yaml

    cfg = yaml.safe_load((ROOT / "params" / "smoke.yaml").read_text())
    for bad in ("../quick", "", 3, "smoke"):
        (tmp_path / "smoke.yaml").write_text(yaml.safe_dump({**cfg, "reuse": bad}))
        with pytest.raises(pipeline.PipelineError, match="reuse(:| is) .*(expected the name "
                                                         "of another profile|itself)"):
            pipeline.load_params("smoke", tmp_path)
