"""The smoke profile end to end through papermill, on synthetic data (no ../shared)."""
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from hmqat.study import pipeline

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    steps = pipeline.run_pipeline("smoke", results_root=out)
    return out / "smoke", steps


def test_every_notebook_ran_and_artifacts_are_well_formed(smoke_run):
    root, steps = smoke_run
    assert list(steps) == list(pipeline.NOTEBOOKS)
    assert all(s["status"] == "ran" and s["wall_s"] >= 0 for s in steps.values())
    for nb in pipeline.NOTEBOOKS:
        executed = json.loads((root / "executed" / f"{nb}.ipynb").read_text())
        assert executed["metadata"]["papermill"]["exception"] in (None, False)
    for fig in ("fp32_finetune", "layer_traces", "sensitivity_kendall", "sensitivity_frontier",
                "sensitivity_single_layer", "pareto_frontier", "bit_allocation", "accuracy_size",
                "ablation"):
        png, pdf = root / "figures" / f"{fig}.png", root / "figures" / f"{fig}.pdf"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", fig
        assert pdf.read_bytes()[:4] == b"%PDF", fig
    for table in ("headline", "ablation", "sensitivity_kendall_fixed_size", "layer_traces",
                  "search_comparison"):
        for ext in ("csv", "md", "tex"):
            text = (root / "tables" / f"{table}.{ext}").read_text()
            assert "synthetic" in text and "smoke" in text, (table, ext)
    headline = pd.read_csv(root / "tables" / "headline.csv", comment="#")
    assert len(headline) >= 4 and headline["top-1"].between(0, 100).all()
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["git_sha"] is None or len(manifest["git_sha"]) == 40
    assert "torch" in manifest and set(manifest["steps"]) == set(pipeline.NOTEBOOKS)
    for step in manifest["steps"].values():     # each step records the code it ran with
        assert step["git_sha"] is None or len(step["git_sha"]) == 40
        assert isinstance(step["git_dirty"], bool) and step["finished_utc"].endswith("Z")
    assert "synthetic data" in (root / "README.md").read_text()


def test_executed_notebooks_show_their_figures(smoke_run):
    """Every plotting.savefig call leaves an image/png output in its executed notebook."""
    root, _ = smoke_run
    for nb in pipeline.NOTEBOOKS:
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
