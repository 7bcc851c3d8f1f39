"""The models profile in its smoke form: two architectures on synthetic data through notebooks
00-03 each (results/<profile>/<arch>/), then notebook 08 across them, all through papermill;
a rerun skips every finished step; the profile's checks and --models."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from hmqat.study import across_models, pipeline

ROOT = Path(__file__).resolve().parent.parent
ARCHS = ["resnet20", "resnet32"]
PER_MODEL = ["00_fp32_baseline", "01_sensitivity", "02_bit_allocation", "03_qat"]


def smoke_models_profile(folder: Path) -> Path:
    """params/smoke.yaml cut to the models profile's shape: two architectures, the per-model
    steps at their smallest, and notebook 08 reading both folders."""
    cfg = yaml.safe_load((ROOT / "params" / "smoke.yaml").read_text())
    cfg["run"] = PER_MODEL + ["08_across_models"]
    cfg["models"] = ARCHS
    cfg["common"].update(n_synthetic=128, batch_size=32)
    nb = cfg["notebooks"]
    nb["01_sensitivity"].update(calib_samples=32, calib_batch=32, trace_max_probes=2,
                                additivity_configs=2, fixed_configs=4, frontier_random=2,
                                variability_sets=0)
    nb["02_bit_allocation"]["n_candidates"] = 50
    nb["03_qat"].update(seeds=[0, 1], uniform_baselines=[[4, 4]], max_steps_per_epoch=1,
                        choice_seeds=[])
    nb["08_across_models"] = {"recipe": {"distillation": {"enabled": True}},
                              "model_results": [f"models/{a}" for a in ARCHS],
                              "cost_steps": 1, "cost_rounds": 1, "cost_archs": ARCHS}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "models.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return folder


@pytest.fixture(scope="module")
def models_run(tmp_path_factory):
    params_dir = smoke_models_profile(tmp_path_factory.mktemp("params"))
    out = tmp_path_factory.mktemp("results")
    steps = pipeline.run_pipeline("models", results_root=out, params_dir=params_dir)
    return out, params_dir, steps


def test_each_model_runs_in_its_own_folder_then_08_compares_them(models_run):
    out, _, steps = models_run
    assert set(steps) == set(ARCHS) | {"across"}
    for arch in ARCHS:
        root = out / "models" / arch
        assert list(steps[arch]) == PER_MODEL
        assert all(s["status"] == "ran" for s in steps[arch].values())
        assert (root / "checkpoints" / f"fp32-{arch}.pt").is_file()
        assert json.loads((root / "data" / "fp32.json").read_text())["arch"] == arch
        manifest = json.loads((root / "manifest.json").read_text())
        assert manifest["steps"]["03_qat"]["parameters"]["arch"] == arch
        for nb in PER_MODEL:
            executed = json.loads((root / "executed" / f"{nb}.ipynb").read_text())
            assert executed["metadata"]["papermill"]["exception"] in (None, False)
    assert list(steps["across"]) == ["08_across_models"]
    top = out / "models"
    assert not (top / "data" / "qat_results.json").exists()   # 00-03 ran only per model
    summary = json.loads((top / "data" / "across_models.json").read_text())
    assert summary["models"] == ARCHS
    assert [r["model"] for r in summary["step_cost"]] == ARCHS
    assert summary["step_cost"][0]["× resnet20"] == pytest.approx(1.0)
    assert all(r["s/step"] > 0 for r in summary["step_cost"])
    assert [r["model"] for r in summary["wall_time"]] == ARCHS
    assert any("τ(joint) − τ(qerr_only)" in line for line in summary["verdict"])
    for table in ("across_models_points", "across_models_paired", "across_models_kendall",
                  "across_models_ptq_gain", "across_models_step_cost",
                  "across_models_wall_time"):
        text = (top / "tables" / f"{table}.csv").read_text()
        assert "synthetic" in text and "models" in text, table
    points = pd.read_csv(top / "tables" / "across_models_points.csv", comment="#")
    assert set(points["model"]) == set(ARCHS)
    assert {"mixed", "uniform", "fp32"} <= set(points["kind"])
    assert (top / "figures" / "across_models.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_rerun_skips_every_finished_step(models_run):
    out, params_dir, _ = models_run
    steps = pipeline.run_pipeline("models", results_root=out, params_dir=params_dir)
    for arch in ARCHS:
        assert all(s["status"] == "skipped (unchanged)" for s in steps[arch].values())
    assert steps["across"]["08_across_models"]["status"] == "skipped (unchanged)"


def test_reading_the_models_back(models_run):
    out, _, _ = models_run
    models, missing = across_models.read_models(out, ["models/resnet20", "models/resnet32",
                                                      "models/resnet56"])
    assert [m.arch for m in models] == ARCHS
    assert len(missing) == 1 and "models/resnet56" in missing[0]
    assert "PROFILE=models" in missing[0]
    study = pipeline.Study(results_dir=str(out / "models" / "resnet32"), profile="models",
                           arch="resnet32", dataset="synthetic", n_synthetic=64, device="cpu")
    cmd = study.command("00_fp32_baseline")
    assert "--models resnet32" in cmd and cmd.endswith("--only 00_fp32_baseline")
    assert f"--results-root {out.resolve()}" in cmd


def test_models_are_checked_before_anything_runs(tmp_path):
    params_dir = smoke_models_profile(tmp_path / "params")
    path = params_dir / "models.yaml"
    good = yaml.safe_load(path.read_text())
    for bad, match in ((["resnet20", "resnet20"], "more than once"),
                       (["resnet99"], "unknown architectures"), ([], "non-empty list")):
        path.write_text(yaml.safe_dump({**good, "models": bad}, sort_keys=False))
        with pytest.raises(pipeline.PipelineError, match=match):
            pipeline.run_pipeline("models", results_root=tmp_path / "r", params_dir=params_dir)
    path.write_text(yaml.safe_dump(good, sort_keys=False))
    with pytest.raises(pipeline.PipelineError, match="not in the models profile's models"):
        pipeline.run_pipeline("models", results_root=tmp_path / "r", params_dir=params_dir,
                              models=["resnet56"])
    with pytest.raises(pipeline.PipelineError, match="has no models: list"):
        pipeline.run_pipeline("smoke", results_root=tmp_path / "r", models=["resnet32"])
    assert not (tmp_path / "r").exists()


def test_the_shipped_models_profile_compares_with_quick():
    cfg = pipeline.load_params("models")
    assert cfg["models"] == ["resnet32", "resnet56"]
    assert cfg["notebooks"]["08_across_models"]["model_results"][0] == "quick"
    quick = pipeline.load_params("quick")
    for key in ("val_size", "val_from", "seed", "bits", "a_bits", "init", "batch_size"):
        assert cfg["common"][key] == quick["common"][key], key
    for nb in ("00_fp32_baseline", "01_sensitivity", "02_bit_allocation"):
        assert cfg["notebooks"][nb] == quick["notebooks"][nb], nb
    same = {k: v for k, v in quick["notebooks"]["03_qat"].items() if k != "choice_seeds"}
    assert {k: cfg["notebooks"]["03_qat"][k] for k in same} == same


def test_verdict_words_separate_a_reversal_from_missing_evidence():
    def kendall(rows):
        return pd.DataFrame([{"model": m, "joint - qerr_only": d, "diff low": lo,
                              "diff high": hi} for m, d, lo, hi in rows])

    empty = pd.DataFrame(columns=["model", "a", "b"])
    no_ptq = pd.DataFrame(columns=["model", "compression", "gain", "beats random %",
                                   "random configs"])
    same = across_models.verdict(kendall([("r20", 0.0, -0.1, 0.1), ("r56", 0.1, -0.1, 0.2)]),
                                 empty, no_ptq)
    assert "has the same sign at every depth" in same[0]
    flip = across_models.verdict(kendall([("r20", 0.3, 0.1, 0.5), ("r56", -0.3, -0.5, -0.1)]),
                                 empty, no_ptq)
    assert "**reverses with depth** (above 0 at r20, below 0 at r56)" in flip[0]
    gap = across_models.verdict(kendall([("r20", 0.3, 0.1, 0.5), ("r56", 0.1, -0.1, 0.2)]),
                                empty, no_ptq)
    assert "**is shown at r20 but not at r56**" in gap[0] and "not a reversal" in gap[0]
    one = across_models.verdict(kendall([("r20", 0.3, 0.1, 0.5)]), empty, no_ptq)
    assert one[0].startswith("Only r20 has finished") and "nothing to compare" in one[1]
    ptq = pd.DataFrame([{"model": "r20", "compression": 6.0, "gain": 4.0, "beats random %": 100.0,
                         "random configs": 20},
                        {"model": "r56", "compression": 6.0, "gain": 1.0,
                         "beats random %": float("nan"), "random configs": 0}])
    lines = across_models.verdict(kendall([("r20", 0.0, -0.1, 0.1), ("r56", 0.0, -0.1, 0.1)]),
                                  empty, ptq)
    assert "not decided for r56" in lines[-1]      # no random configs: no sign, not "0"
    assert across_models.verdict(kendall([]), empty, no_ptq) == [
        "No model has finished notebooks 00-03: nothing to compare."]


def test_wall_times_compare_the_steps_every_model_runs():
    def model(arch, steps):
        return across_models.ModelResults(arch, Path(arch), "p", {}, pd.DataFrame(),
                                           pd.DataFrame(), pd.DataFrame(),
                                           {"steps": {k: {"compute_wall_s": v}
                                                      for k, v in steps.items()}})

    walls = across_models.wall_times([model("resnet20", {"00_fp32_baseline": 90, "03_qat": 30,
                                                         "04_ablations": 3000}),
                                      model("resnet56", {"00_fp32_baseline": 150})])
    assert "04_ablations" not in walls.columns
    assert list(walls["total (min)"]) == [2.0, 2.5]
    assert math.isnan(walls.loc[1, "03_qat"])


def test_the_comparison_reruns_when_a_folder_it_reads_changes(tmp_path):
    folder = tmp_path / "quick"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "qat_results.json").write_text("[1]")
    before = pipeline._model_results_digest(tmp_path, ["quick", "models/resnet32"])
    assert before == pipeline._model_results_digest(tmp_path, ["quick", "models/resnet32"])
    (folder / "data" / "qat_results.json").write_text("[2]")
    assert pipeline._model_results_digest(tmp_path, ["quick", "models/resnet32"]) != before


def test_models_measured_on_another_split_are_set_aside_not_compared():
    def model(arch, label):
        return across_models.ModelResults(arch, Path(arch), "p", {"data_label": label},
                                           pd.DataFrame(), pd.DataFrame(), pd.DataFrame(), {})

    clean = "CIFAR-10 (JPEG q75 mirror); val = 5,000 test-split images"
    kept, other = across_models.same_split([model("resnet20", "CIFAR-10 (JPEG q75 mirror)"),
                                            model("resnet32", clean), model("resnet56", clean)])
    assert [m.arch for m in kept] == ["resnet32", "resnet56"]
    assert [m.arch for m in other] == ["resnet20"]
    assert across_models.same_split([]) == ([], [])
