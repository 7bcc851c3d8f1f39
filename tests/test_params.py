"""The params/*.yaml schema (hmqat.study.params): every bad profile is one error naming file, section,
key and what is expected, raised before any notebook runs; and the results-folder lock."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from hmqat.study import params, pipeline
from hmqat.locking import ResultsLocked, results_lock

ROOT = Path(__file__).resolve().parent.parent
SMOKE = (ROOT / "params" / "smoke.yaml").read_text()


def _profile(tmp_path, text, name="smoke"):
    d = tmp_path / "params"
    d.mkdir(exist_ok=True)
    (d / f"{name}.yaml").write_text(text)
    return d


def _edited(edit):
    cfg = yaml.safe_load(SMOKE)
    edit(cfg)
    return yaml.safe_dump(cfg, sort_keys=False)


def test_every_shipped_profile_passes_the_schema():
    for profile in ("smoke", "quick", "paper", "imagenet"):
        cfg = params.read_profile(ROOT / "params" / f"{profile}.yaml")
        assert set(cfg["common"]) == set(params.COMMON)


@pytest.mark.parametrize("edit, match", [
    (lambda c: c["common"].update(archh="resnet20"),
     r"smoke.yaml: unknown key 'archh' in section common; known keys: \['a_bits', 'arch'"),
    (lambda c: c["notebooks"]["03_qat"].update(qat_epochs="two"),
     r"smoke.yaml: notebooks.03_qat.qat_epochs = 'two' \(str\); expected an integer >= 1 "
     r"\(QAT epochs\)"),
    (lambda c: c["notebooks"]["03_qat"].update(qat_wd="5e-5"),
     r"notebooks.03_qat.qat_wd = '5e-5' \(str\); expected a number >= 0 .*YAML reads 5e-5 as "
     r"text: write it with a dot, e.g. 5.0e-05"),
    (lambda c: c["notebooks"]["03_qat"].pop("qat_lr"),
     r"smoke.yaml: section notebooks.03_qat does not set \['qat_lr'\] \(qat_lr: QAT learning "
     r"rate\)"),
    (lambda c: c["common"].pop("seed"), r"section common does not set \['seed'\]"),
    (lambda c: c["common"].update(bits=[2, 16]),
     r"common.bits = \[2, 16\] \(list\); expected a list of at least 1 items, each a bit width "
     r"in \[2, 3, 4, 5, 6, 7, 8\]"),
    (lambda c: c["common"].update(pretrained="yes please"),
     r"common.pretrained = 'yes please' \(str\); expected true or false"),
    (lambda c: c["common"].update(batch_size=True), r"common.batch_size = True \(bool\)"),
    (lambda c: c["notebooks"]["03_qat"].update(recipe={"distil": True}),
     r"notebooks.03_qat.recipe = .*expected a valid recipe \(unknown recipe key\(s\) "
     r"\['distil'\]"),
    (lambda c: c["notebooks"]["03_qat"].update(uniform_baselines=[[8, 8], [1, 4]]),
     r"notebooks.03_qat.uniform_baselines = .*\[weight bits, activation bits\] pair"),
    (lambda c: c.update(run=["00_fp32_baseline", "01_sensitivty"]),
     r"smoke.yaml: run names unknown notebooks \['01_sensitivty'\]; known notebooks: "
     r"\['00_fp32_baseline', '01_sensitivity'"),
    (lambda c: c.update(run=[]), r"run is empty; name at least one of"),
    (lambda c: c["notebooks"].update({"06_extra": {}}),
     r"unknown notebook sections \['06_extra'\] under notebooks"),
    (lambda c: c.update(comon={}), r"unknown top-level section\(s\) \['comon'\]"),
    (lambda c: c["notebooks"]["00_fp32_baseline"].update(max_steps_per_epoch=-1),
     r"notebooks.00_fp32_baseline.max_steps_per_epoch = -1 \(int\); expected null or an "
     r"integer >= 1"),
])
def test_bad_profile_is_one_clear_error(tmp_path, edit, match):
    d = _profile(tmp_path, _edited(edit))
    with pytest.raises(pipeline.PipelineError, match=match):
        pipeline.load_params("smoke", d)


def test_yaml_errors_name_file_and_line(tmp_path):
    broken = SMOKE.replace("  03_qat:\n    qat_epochs: 1", "  03_qat:\n    qat_epochs: [1")
    line = broken.splitlines().index("    qat_epochs: [1") + 1
    d = _profile(tmp_path, broken)
    with pytest.raises(pipeline.PipelineError, match=r"smoke.yaml:\d+:\d+: YAML error: "):
        pipeline.load_params("smoke", d)
    try:
        pipeline.load_params("smoke", d)
    except pipeline.PipelineError as exc:
        reported = int(str(exc).split("smoke.yaml:")[1].split(":")[0])
    assert line <= reported <= line + 2          # the scanner stops at the next key
    d = _profile(tmp_path, SMOKE.replace("  seed: 0\n", "  seed: 0\n  seed: 1\n"))
    with pytest.raises(pipeline.PipelineError, match=r"smoke.yaml:\d+:\d+: YAML error: key 'seed' "
                                                     r"is given twice"):
        pipeline.load_params("smoke", d)


def test_missing_parameter_stops_before_any_notebook_runs(tmp_path):
    d = _profile(tmp_path, _edited(lambda c: c["notebooks"]["03_qat"].pop("qat_lr")))
    with pytest.raises(pipeline.PipelineError, match="does not set \\['qat_lr'\\]"):
        pipeline.run_pipeline("smoke", results_root=tmp_path / "r", params_dir=d)
    assert not (tmp_path / "r").exists()      # nothing ran, nothing was written


def test_only_needs_known_names(tmp_path, capsys):
    with pytest.raises(pipeline.PipelineError, match=r"--only is empty; name at least one of"):
        pipeline.run_pipeline("smoke", results_root=tmp_path, only=[])
    assert pipeline.main(["--profile", "smoke", "--only"]) == 1
    assert "--only is empty" in capsys.readouterr().err
    with pytest.raises(pipeline.PipelineError, match=r"--only names unknown notebooks \['03_qta'\]"
                                                     r"; known notebooks: \['00_fp32_baseline'"):
        pipeline.run_pipeline("smoke", results_root=tmp_path, only=["03_qta"])
    assert not (tmp_path / "smoke").exists()


_HOLDER = textwrap.dedent("""
    import sys, time
    from hmqat.locking import results_lock
    with results_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(600)
""")


def test_second_run_on_a_locked_profile_stops_naming_the_holder(tmp_path):
    results = tmp_path / "r" / "smoke"
    results.mkdir(parents=True)
    (results / "manifest.json").write_text('{"steps": {"00_fp32_baseline": {"status": "ran"}}}')
    before = sorted(p.name for p in results.iterdir())
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(results)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(pipeline.PipelineError,
                           match=rf"{results} is in use by pid {holder.pid} .*wait for that run"):
            pipeline.run_pipeline("smoke", results_root=tmp_path / "r")
        with pytest.raises(ResultsLocked, match=f"pid {holder.pid}"):
            with results_lock(results):
                pass
        assert json.loads((results / "manifest.json").read_text())["steps"] == {
            "00_fp32_baseline": {"status": "ran"}}            # nothing touched
        assert sorted(p.name for p in results.iterdir()) == sorted(before + [".lock"])
    finally:
        holder.send_signal(signal.SIGKILL)                     # kill -9: the kernel frees it
        holder.wait()
    with results_lock(results) as lock:                       # the stale .lock blocks nothing
        assert lock.read_text().strip() == str(os.getpid())


@pytest.mark.parametrize("edit, match", [
    (lambda c: c["common"].update(val_size=-1), r"common\.val_size = -1 .*integer >= 0"),
    (lambda c: c["common"].pop("val_size"), r"section common does not set \['val_size'\]"),
    (lambda c: c["notebooks"]["03_qat"].update(seeds=[]), r"03_qat\.seeds = \[\]"),
    (lambda c: c["notebooks"]["03_qat"].update(seeds=[0, "1"]), r"03_qat\.seeds"),
])
def test_val_size_and_seeds_are_checked(tmp_path, edit, match):
    d = _profile(tmp_path, _edited(edit))
    with pytest.raises(params.ParamsError, match=match):
        params.read_profile(d / "smoke.yaml")


def test_quick_and_paper_hold_out_5000_and_run_three_seeds():
    for profile in ("quick", "paper"):
        cfg = params.read_profile(ROOT / "params" / f"{profile}.yaml")
        assert cfg["common"]["val_size"] == 5000
        assert len(cfg["notebooks"]["03_qat"]["seeds"]) >= 3
    quick = params.read_profile(ROOT / "params" / "quick.yaml")["notebooks"]
    assert 13.11 in quick["02_bit_allocation"]["target_compressions"]      # the HAWQ anchor
    assert [2, 4] in quick["03_qat"]["uniform_baselines"]
    assert {2, 3} <= set(quick["02_bit_allocation"]["match_uniform_bits"])
