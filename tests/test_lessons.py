"""The lessons (issue 27): the lab profile equals the notebooks' own defaults, a notebook opened
first computes its upstream steps (or names a command that works), the headers' run times come
from a measured lab run, the exercise checks follow one convention (untouched: "not attempted",
wrong: a helpful error), and the narrative agrees with the defaults."""
from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from hmqat.study import lessons, pipeline
from hmqat.study.params import NOTEBOOKS

ROOT = Path(__file__).resolve().parent.parent
NB_DIR = ROOT / "notebooks"


def parameters_cell(name: str) -> dict:
    """The values of a notebook's parameters cell (its .py source, executed)."""
    text = (NB_DIR / f"{name}.py").read_text(encoding="utf-8")
    cell = text.split('# %% tags=["parameters"]\n', 1)[1].split("\n# %%", 1)[0]
    scope: dict = {}
    exec(compile(cell, f"{name}.py (parameters cell)", "exec"), scope)
    return {k: v for k, v in scope.items() if not k.startswith("__")}


# --------------------------------------------------------------------------------------------
# The lab profile
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_lab_profile_equals_the_notebooks_parameters_cell(name: str) -> None:
    cfg = pipeline.load_params("lab")
    cell = parameters_cell(name)
    assert cell["profile"] == "lab" and cell["results_dir"] == "../results/lab"
    resolved = pipeline.notebook_parameters(cfg, name, list(cell), Path("../results/lab"), "lab")
    differ = {k: (resolved[k], cell[k]) for k in cell if resolved[k] != cell[k]}
    assert not differ, f"params/lab.yaml vs {name}'s parameters cell (yaml, notebook): {differ}"


def test_lab_profile_gives_every_notebook_a_validation_split() -> None:
    cfg = pipeline.load_params("lab")
    assert cfg["common"]["val_size"] == 5000
    for name in NOTEBOOKS:
        if "val_size" in parameters_cell(name):
            assert parameters_cell(name)["val_size"] == 5000, name


def test_the_named_pipeline_command_is_accepted(tmp_path: Path) -> None:
    """`python -m hmqat.study.pipeline --profile lab --only …` (what ensure_upstream and the
    error messages name) parses and plans every step, with the notebooks' own parameters."""
    cmd = lessons.pipeline_command(["00_fp32_baseline", "01_sensitivity"])
    argv = cmd.split()[3:]
    assert argv[:2] == ["--profile", "lab"]
    cfg = pipeline.load_params("lab")
    only = argv[argv.index("--only") + 1:]
    plan = pipeline._plan(cfg, "lab", only, NB_DIR, ROOT / "results" / "lab")
    assert [step[0] for step in plan] == ["00_fp32_baseline", "01_sensitivity"]
    assert plan[0][2]["val_size"] == 5000 and plan[0][2]["results_dir"] == "../results/lab"
    full = pipeline._plan(cfg, "lab", None, NB_DIR, ROOT / "results" / "lab")
    assert [step[0] for step in full] == list(NOTEBOOKS)


# --------------------------------------------------------------------------------------------
# A notebook opened first computes its upstream steps (or names a command that works)
# --------------------------------------------------------------------------------------------
def _study(root: Path, profile: str = "lab", val_size: int = 5000) -> SimpleNamespace:
    return SimpleNamespace(root=root, profile=profile, arch="resnet20", val_size=val_size)


def _write_artifacts(root: Path, step: str, val_size: int = 5000) -> None:
    names = lessons.KEY_OUTPUTS[step] + (lessons.ARTIFACTS_WITH_VAL.get(step, ()) if val_size else ())
    for name in names:
        p = root / name.format(arch="resnet20")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x")


class _FakePipeline:
    """Stands in for run_pipeline: records the call and writes the steps' artifacts."""

    def __init__(self, write: bool = True) -> None:
        self.calls: list[tuple] = []
        self.write = write

    def __call__(self, profile: str, *, only: list, results_root: Path) -> dict:
        self.calls.append((profile, list(only), results_root))
        if self.write:
            for step in only:
                _write_artifacts(results_root / profile, step)
        return {}


def test_notebook_02_opened_first_runs_00_and_01_and_says_so(tmp_path: Path, capsys) -> None:
    study, run = _study(tmp_path / "lab"), _FakePipeline()
    assert lessons.ensure_upstream(study, "02_bit_allocation", run=run) == \
        ["00_fp32_baseline", "01_sensitivity"]
    assert run.calls == [("lab", ["00_fp32_baseline", "01_sensitivity"], tmp_path)]
    out = capsys.readouterr().out
    assert ("[lessons] 02_bit_allocation reads results of 00_fp32_baseline, 01_sensitivity, "
            "which are not in") in out
    assert "missing: checkpoints/fp32-resnet20.pt, data/fp32.json, data/traces.csv" in out
    minutes = lessons._lab_minutes(["00_fp32_baseline", "01_sensitivity"])   # "" without a lab run
    assert (f"Running them now at the lab profile{minutes}, as `python -m hmqat.study.pipeline "
            f"--profile lab --only 00_fp32_baseline 01_sensitivity` would") in out
    assert "[lessons] done: 00_fp32_baseline, 01_sensitivity ran; continuing with " \
           "02_bit_allocation." in out
    # a second call finds everything and runs nothing, silently
    assert lessons.ensure_upstream(study, "02_bit_allocation", run=run) == []
    assert len(run.calls) == 1 and capsys.readouterr().out == ""


def test_only_the_steps_from_the_first_missing_one_run(tmp_path: Path) -> None:
    root = tmp_path / "lab"
    _write_artifacts(root, "00_fp32_baseline")
    run = _FakePipeline()
    assert lessons.ensure_upstream(_study(root), "02_bit_allocation", run=run) == ["01_sensitivity"]
    assert run.calls[0][1] == ["01_sensitivity"]
    # 01's fixed-size frame counts only with a validation split (04 reads it)
    (root / "data/sensitivity/fixed_size.csv").unlink()
    assert lessons.ensure_upstream(_study(root, val_size=0), "02_bit_allocation", run=run) == []
    assert lessons.ensure_upstream(_study(root), "02_bit_allocation", run=run) == ["01_sensitivity"]


def test_a_given_checkpoint_skips_notebook_00(tmp_path: Path) -> None:
    run = _FakePipeline()
    assert lessons.ensure_upstream(_study(tmp_path / "lab"), "01_sensitivity", run=run,
                                   skip=("00_fp32_baseline",)) == []
    assert lessons.ensure_upstream(_study(tmp_path / "lab"), "00_fp32_baseline", run=run) == []
    assert run.calls == []


def test_outside_the_lab_profile_the_error_names_a_command_that_works(tmp_path: Path) -> None:
    root = tmp_path / "quick"
    _write_artifacts(root, "00_fp32_baseline")
    with pytest.raises(lessons.LessonError) as err:
        lessons.ensure_upstream(_study(root, profile="quick"), "02_bit_allocation",
                                run=_FakePipeline())
    msg = str(err.value)
    files = ", ".join(lessons.KEY_OUTPUTS["01_sensitivity"]
                      + lessons.ARTIFACTS_WITH_VAL["01_sensitivity"])
    assert msg == (f"02_bit_allocation reads results of 01_sensitivity, which are missing from "
                   f"{root} ({files}). Run them first, from the repository "
                   f"root: python -m hmqat.study.pipeline --profile quick --only 01_sensitivity")
    argv = msg.rsplit(": ", 1)[1].split()[3:]
    plan = pipeline._plan(pipeline.load_params("quick"), "quick", argv[3:], NB_DIR, root)
    assert [p[0] for p in plan] == ["01_sensitivity"]


def test_steps_that_write_nothing_and_a_held_lock_are_reported(tmp_path: Path) -> None:
    with pytest.raises(lessons.LessonError, match=r"00_fp32_baseline ran but did not write "
                                                  r"\[.*fp32-resnet20\.pt"):
        lessons.ensure_upstream(_study(tmp_path / "lab"), "01_sensitivity",
                                run=_FakePipeline(write=False))
    from hmqat.locking import results_lock
    with results_lock(tmp_path / "lab"):   # e.g. the pipeline runs this notebook with --only
        with pytest.raises(lessons.LessonError) as err:
            lessons.ensure_upstream(_study(tmp_path / "lab"), "01_sensitivity")
    msg = str(err.value)
    assert msg.startswith("could not compute 00_fp32_baseline for 01_sensitivity: ")
    assert "is in use by pid" in msg
    assert msg.endswith("Run them yourself from the repository root: python -m "
                        "hmqat.study.pipeline --profile lab --only 00_fp32_baseline")
    assert not (tmp_path / "lab" / "executed" / "00_fp32_baseline.ipynb").exists()


def test_unknown_notebook_is_refused(tmp_path: Path) -> None:
    with pytest.raises(lessons.LessonError, match="unknown notebook '07_x'; known notebooks"):
        lessons.ensure_upstream(_study(tmp_path), "07_x")


# --------------------------------------------------------------------------------------------
# Header run times: written from a lab run's manifest, never typed
# --------------------------------------------------------------------------------------------
def _manifest(path: Path, profile: str = "lab", skip: str = "") -> Path:
    steps = {n: {"status": "ran", "wall_s": 60.0 * (i + 1), "compute_wall_s": 60.0 * (i + 1) + 6,
                 "finished_utc": f"2026-12-0{i + 1}T10:00:00Z", "git_sha": "abcdef1234567",
                 "parameters": {"profile": profile}}
             for i, n in enumerate(NOTEBOOKS) if n != skip}
    path.write_text(json.dumps({"cpu_count": 2, "git_sha": "0000000", "steps": steps}))
    return path


def _copy_notebooks(dst: Path) -> Path:
    dst.mkdir()
    for name in NOTEBOOKS:
        for suffix in (".py", ".ipynb"):
            (dst / f"{name}{suffix}").write_text((NB_DIR / f"{name}{suffix}").read_text())
    return dst


def test_write_lab_times_fills_the_json_and_all_six_headers(tmp_path: Path) -> None:
    nbs = _copy_notebooks(tmp_path / "notebooks")
    times = lessons.write_lab_times(_manifest(tmp_path / "manifest.json"), notebooks_dir=nbs)
    written = json.loads((nbs / "lab_times.json").read_text())
    assert written == times
    assert written["notebooks"] == {n: round((60.0 * (i + 1) + 6) / 60, 1)
                                    for i, n in enumerate(NOTEBOOKS)}
    assert written["chain_min"] == round(sum(60.0 * (i + 1) + 6
                                             for i in range(len(NOTEBOOKS))) / 60, 1)
    assert written["core_min"] == round(sum(60.0 * (i + 1) + 6 for i in range(6)) / 60, 1)
    assert (written["date"], written["git_sha"], written["cpu_count"]) == \
        (f"2026-12-0{len(NOTEBOOKS)}", "abcdef1234567", 2)
    text01 = lessons.lab_time_text("01_sensitivity", written)
    assert text01 == (f"2.1 min, measured by the pipeline in the lab run of "
                      f"2026-12-0{len(NOTEBOOKS)} (2 CPU cores, git abcdef1); the chain of "
                      f"{len(NOTEBOOKS)} notebooks took {written['chain_min']} min (00–05: "
                      f"{written['core_min']} min)")
    for name in NOTEBOOKS:
        for suffix in (".py", ".ipynb"):
            src = (nbs / f"{name}{suffix}").read_text()
            assert lessons.header_times(src, name) == [lessons.lab_time_text(name, written)]
        nb = json.loads((nbs / f"{name}.ipynb").read_text())   # still output-free
        assert all(not c.get("outputs") for c in nb["cells"])
    # 1.1 ... 9.1 min each, 00-05 sum to 21.6 min: both goals met
    assert lessons.lab_budget_verdict(written) == [
        "each notebook <= 10 min: met",
        f"core chain 00–05 <= 30 min: met ({written['core_min']:.1f} min; all "
        f"{len(NOTEBOOKS)} notebooks {written['chain_min']:.1f} min)"]
    slow = {**written, "notebooks": {**written["notebooks"], "01_sensitivity": 11.4},
            "core_min": 32.1}
    assert lessons.lab_budget_verdict(slow) == [
        "each notebook <= 10 min: MISSED by 01_sensitivity (11.4 min)",
        f"core chain 00–05 <= 30 min: MISSED (32.1 min; all {len(NOTEBOOKS)} notebooks "
        f"{written['chain_min']:.1f} min)"]
    before = {p.name: p.read_text() for p in nbs.iterdir()}
    lessons.write_lab_times(tmp_path / "manifest.json", notebooks_dir=nbs)   # idempotent
    assert {p.name: p.read_text() for p in nbs.iterdir()} == before


def test_write_lab_times_refuses_an_incomplete_or_foreign_manifest(tmp_path: Path, capsys) -> None:
    nbs = _copy_notebooks(tmp_path / "notebooks")
    before = {p.name: p.read_text() for p in nbs.iterdir()}
    with pytest.raises(lessons.LessonError) as err:
        lessons.write_lab_times(_manifest(tmp_path / "m.json", skip="03_qat"), notebooks_dir=nbs)
    assert str(err.value) == (f"{tmp_path / 'm.json'} has no measured time for ['03_qat']: run "
                              "them (python -m hmqat.study.pipeline --profile lab --only 03_qat) "
                              "and write the times again")
    with pytest.raises(lessons.LessonError, match=r"is a \['quick'\] run, not the lab profile's"):
        lessons.write_lab_times(_manifest(tmp_path / "q.json", profile="quick"), notebooks_dir=nbs)
    assert {p.name: p.read_text() for p in nbs.iterdir()} == before   # nothing written
    assert lessons.main(["--write-times", str(tmp_path / "absent.json")]) == 1
    assert (f"[hmqat] ERROR: {tmp_path / 'absent.json'} not found: run the lab chain first "
            "(python -m hmqat.study.pipeline --profile lab)") in capsys.readouterr().err


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_headers_agree_with_notebooks_lab_times_json(name: str) -> None:
    """The committed headers quote notebooks/lab_times.json; with no json (no lab run measured
    yet) every header says so."""
    times = lessons.read_lab_times()
    want = lessons.lab_time_text(name, times)
    if times is None:
        assert want == lessons.NOT_MEASURED
    for suffix in (".py", ".ipynb"):
        src = (NB_DIR / f"{name}{suffix}").read_text(encoding="utf-8")
        assert lessons.header_times(src, f"{name}{suffix}") == [want], suffix
        header = src[:src.index("tags")] if suffix == ".py" else src
        assert "min measured on" not in header, "a typed run time is left in the header"


# --------------------------------------------------------------------------------------------
# The exercise convention: untouched -> "not attempted" (no raise), wrong -> a helpful error
# --------------------------------------------------------------------------------------------
def test_the_checking_core(capsys) -> None:
    @lessons.exercise("9.9", hint="add them")
    def check_sum(value, a, b):
        got = lessons.answer(value, "total")
        lessons.check_close(got, a + b, "total", hint="a + b")
        return f"{a} + {b} = {got}"

    assert check_sum(..., 1, 2) is False
    assert capsys.readouterr().out == ("○ exercise 9.9 not attempted yet: total is still `...`. "
                                       "Fill in the cell marked `# YOUR CODE HERE` and rerun it "
                                       "and this check (hint: add them).\n")
    with pytest.raises(lessons.ExerciseError) as err:
        check_sum(4, 1, 2)
    assert str(err.value) == "✗ exercise 9.9: total = 4, expected 3 (tolerance 0.0003). a + b"
    assert isinstance(err.value, AssertionError)
    assert check_sum(3, 1, 2) is True
    assert capsys.readouterr().out == "✓ exercise 9.9: 1 + 2 = 3\n"

    def todo():
        raise NotImplementedError

    with pytest.raises(lessons.NotAttempted, match=r"todo\(\) still raises NotImplementedError"):
        lessons.attempt(todo)
    with pytest.raises(lessons.ExerciseError, match="expected a function, got int 3"):
        lessons.attempt(3)
    with pytest.raises(lessons.ExerciseError, match=r"total has shape \(2,\), expected \(3,\)"):
        lessons.check_close([1, 2], [1, 2, 3], "total")
    with pytest.raises(lessons.ExerciseError, match=r"total = 9 at index \(1,\), expected 2"):
        lessons.check_close([1, 9, 3], [1, 2, 3], "total")


def _tiny_model_and_loader():
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    x, y = torch.randn(40, 3, 2, 2), torch.arange(40) % 3
    return model, [(x[:20], y[:20]), (x[20:], y[20:])]


def test_check_00_per_class_top1(capsys) -> None:
    import torch

    model, loader = _tiny_model_and_loader()
    classes = ("cat", "dog", "ship")

    def right(m, ld, n):
        hit, tot = torch.zeros(n), torch.zeros(n)
        for x, y in ld:
            pred = m(x).argmax(1)
            tot += torch.bincount(y, minlength=n)
            hit += torch.bincount(y[pred == y], minlength=n)
        return 100 * hit / tot

    def untouched(m, ld, n):
        raise NotImplementedError

    assert lessons.check_00_per_class_top1(untouched, model, loader, classes) is False
    assert "○ exercise 00.1 not attempted yet" in capsys.readouterr().out
    assert lessons.check_00_per_class_top1(right, model, loader, classes) is True
    assert "✓ exercise 00.1: per-class top-1 matches; hardest class" in capsys.readouterr().out
    with pytest.raises(lessons.ExerciseError, match="fractions, not percent; multiply by 100"):
        lessons.check_00_per_class_top1(lambda m, ld, n: right(m, ld, n) / 100, model, loader,
                                        classes)
    with pytest.raises(lessons.ExerciseError, match=r"divide the correct predictions of each "
                                                    r"class by that class's images"):
        lessons.check_00_per_class_top1(lambda m, ld, n: right(m, ld, n) / 3, model, loader,
                                        classes)
    with pytest.raises(lessons.ExerciseError, match=r"returned 2 values; expected one per class "
                                                    r"\(3: cat, dog, ship\)"):
        lessons.check_00_per_class_top1(lambda m, ld, n: right(m, ld, n)[:2], model, loader,
                                        classes)


def test_check_00_percent_of_fp32(capsys) -> None:
    kw = dict(published_top1=80.0, finetuned_top1=90.0)
    assert lessons.check_00_percent_of_fp32(..., ..., 89.0, **kw) is False
    assert lessons.check_00_percent_of_fp32(100 * 89 / 80, 100 * 89 / 90, 89.0, **kw) is True
    assert ("111.2 % of the published weights (above 100 %: that reference credits quantization "
            "with the accuracy that fine-tuning on the data in use alone buys); 98.9 % of the "
            "fine-tuned reference, the fair ratio") in capsys.readouterr().out
    with pytest.raises(lessons.ExerciseError, match="pct_of_published equals the ratio to the "
                                                    "fine-tuned model"):
        lessons.check_00_percent_of_fp32(100 * 89 / 90, 100 * 89 / 90, 89.0, **kw)
    with pytest.raises(lessons.ExerciseError, match="pct_of_finetuned = 0.9889 is a fraction"):
        lessons.check_00_percent_of_fp32(100 * 89 / 80, 89 / 90, 89.0, **kw)
    with pytest.raises(lessons.ExerciseError, match="pct_of_published should be a number, got "
                                                    "str 'high'"):
        lessons.check_00_percent_of_fp32("high", 1.0, 89.0, **kw)


def _traces_and_omega():
    import pandas as pd

    layers = pd.Index(["conv1", "layer1.0.conv1", "layer3.0.conv1"], name="layer")
    traces = pd.DataFrame({"avg_trace": [5.0, 1.0, 0.5], "n_params": [432, 2304, 36864]},
                          index=layers)
    dw2 = pd.Series([0.1, 2.0, 0.3], index=layers)
    omega = pd.DataFrame({2: traces["avg_trace"] * dw2, 4: traces["avg_trace"] * dw2 / 16})
    return traces, omega   # largest trace: conv1; largest Ω(2): layer1.0.conv1 (2.0)


def test_check_01_trace_vs_omega(capsys) -> None:
    traces, omega = _traces_and_omega()
    kw = dict(traces=traces, omega=omega)
    assert lessons.check_01_trace_vs_omega(..., ..., ..., **kw) is False
    assert lessons.check_01_trace_vs_omega("conv1", "layer1.0.conv1", 2.0, **kw) is True
    assert ("the largest trace is in 'conv1', the largest Ω(2) in 'layer1.0.conv1' (432 vs "
            "2,304 weights)") in capsys.readouterr().out
    with pytest.raises(lessons.ExerciseError) as err:
        lessons.check_01_trace_vs_omega("conv1", "conv1", 2.0, **kw)
    assert str(err.value) == (
        "✗ exercise 01.2: top_omega2_layer = 'conv1' has Ω(2) = 0.5 (that is the largest average "
        "trace, not the largest Ω), but 'layer1.0.conv1' has 2; take the largest of the 2-bit "
        "column omegas['joint'][2]")
    with pytest.raises(lessons.ExerciseError, match=r"omega2_by_hand is Ω\(2\) of 'conv1'; "
                                                    r"compute it for top_omega2_layer"):
        lessons.check_01_trace_vs_omega("conv1", "layer1.0.conv1", 0.5, **kw)
    with pytest.raises(lessons.ExerciseError, match=r"top_trace_layer = 'fc' is not a layer of "
                                                    r"the table; the layers are conv1, "):
        lessons.check_01_trace_vs_omega("fc", "layer1.0.conv1", 2.0, **kw)
    with pytest.raises(lessons.ExerciseError, match=r"omega2_by_hand = 1, expected 2 .*T̄ = 1 "
                                                    r"times ‖Q_2\(W\) − W‖²"):
        lessons.check_01_trace_vs_omega("conv1", "layer1.0.conv1", 1.0, **kw)


def test_check_01_sum_omega(capsys) -> None:
    _, omega = _traces_and_omega()
    configs = [{"conv1": 2, "layer1.0.conv1": 4, "layer3.0.conv1": 2},
               {"conv1": 4, "layer1.0.conv1": 2, "layer3.0.conv1": 4}]
    want = [0.5 + 0.125 + 0.15, 0.03125 + 2.0 + 0.009375]

    def right(om, cfg):
        return sum(om.loc[k, b] for k, b in cfg.items())

    def todo(om, cfg):
        raise NotImplementedError

    assert lessons.check_01_sum_omega(todo, omega, configs) is False
    assert lessons.check_01_sum_omega(right, omega, configs, expected=want) is True
    assert "✓ exercise 01.3: ΣΩ of all 2 configs matches the library's" in capsys.readouterr().out
    with pytest.raises(lessons.ExerciseError, match="returns the mean over layers; return the sum"):
        lessons.check_01_sum_omega(lambda om, cfg: right(om, cfg) / 3, omega, configs)
    with pytest.raises(lessons.ExerciseError, match="the fixed first/last layers included"):
        lessons.check_01_sum_omega(lambda om, cfg: right(om, cfg) - om.loc["conv1", cfg["conv1"]],
                                   omega, configs)


@pytest.fixture(scope="module")
def problem_setup():
    from hmqat import models, search, sensitivity

    model = models.create_model("resnet20")
    omega = sensitivity.omega_table(model, None, [2, 3, 4, 8], variant="param_size")
    problem = search.Problem.from_model(model, omega, [2, 3, 4, 8])
    return model, omega, problem


def test_check_02_hawq_bits(problem_setup, capsys) -> None:
    from hmqat import search

    model, omega, problem = problem_setup
    kw = dict(model=model, omega=omega, a_bits=4, policy="first_last_8", input_size=(1, 3, 32, 32))
    pts = search.Problem.from_model(model, omega[[4, 8]], [4, 8]).frontier().points
    mb, comp = pts["size_mb"].min(), pts["compression"].max()
    assert lessons.check_02_hawq_bits(..., ..., **kw) is False
    assert lessons.check_02_hawq_bits(mb, comp, **kw) is True
    assert f"= {comp:.2f}x: below 32/4 = 8x" in capsys.readouterr().out
    with pytest.raises(lessons.ExerciseError, match=r"is the frontier with all of \[2, 3, 4, 8\]"):
        lessons.check_02_hawq_bits(problem.frontier().points["size_mb"].min(), comp, **kw)
    with pytest.raises(lessons.ExerciseError, match="smallest_mb_48 holds the compression"):
        lessons.check_02_hawq_bits(comp, mb, **kw)


def test_check_02_bops_pick(problem_setup, capsys) -> None:
    from hmqat import search

    _, _, problem = problem_setup
    size_pick = search.select(problem.frontier(), min_compression=8)
    right = search.select(problem.frontier(cost="bops"), max_bops=float(size_pick["bops"]))
    assert lessons.check_02_bops_pick(..., problem=problem, size_pick=size_pick) is False
    assert lessons.check_02_bops_pick(right, problem=problem, size_pick=size_pick) is True
    assert "the BOPs pick's ΣΩ can only be lower or equal" in capsys.readouterr().out
    assert right["omega"] < size_pick["omega"]   # this table: the size pick is not BOPs-optimal
    with pytest.raises(lessons.ExerciseError, match="bops_pick is the size pick itself"):
        lessons.check_02_bops_pick(size_pick, problem=problem, size_pick=size_pick)
    with pytest.raises(lessons.ExerciseError, match="should be a frontier row with 'config'"):
        lessons.check_02_bops_pick({"omega": 1.0}, problem=problem, size_pick=size_pick)


# --------------------------------------------------------------------------------------------
# Every notebook has a fill-in exercise and a from-scratch cell; its solution fills them in
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_each_notebook_has_a_checked_fill_in_exercise(name: str) -> None:
    text = (NB_DIR / f"{name}.py").read_text(encoding="utf-8")
    cells = text.split("\n# %%")
    fill_ins = [c for c in cells if "# YOUR CODE HERE" in c and not c.startswith(" [markdown]")]
    assert fill_ins, f"{name} has no `# YOUR CODE HERE` cell"
    for cell in fill_ins:   # the placeholder the checks recognise, not an exception
        assert "raise NotImplementedError" in cell or re.search(r"= \.\.\.", cell), cell
    checks = set(re.findall(r"lessons\.(check_\d\d_\w+)\(", text))
    assert checks and all(hasattr(lessons, c) for c in checks), checks
    solution = (NB_DIR / "solutions" / f"{name}_solutions.py").read_text(encoding="utf-8")
    missing = checks - set(re.findall(r"lessons\.(check_\d\d_\w+)\(", solution))
    assert not missing, f"{name}: the solution does not call {sorted(missing)}"
    assert "YOUR CODE HERE" not in solution and "NotImplementedError" not in solution


def _exercises(name: str, where: Path = NB_DIR) -> str:
    text = (where / f"{name}.py").read_text(encoding="utf-8")
    return text.split("## Exercises", 1)[1]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_exercise_text_names_only_apis_that_exist(name: str) -> None:
    """`search.pareto_frontier(omega, cost="bops")` (missing n_params) once sent students astray:
    every `module.function` and `problem.method` an exercise names exists."""
    import importlib

    from hmqat import search

    text = _exercises(name)
    for mod, attr in re.findall(r"\b(search|hessian|sensitivity|quant|train|models|data|bn|"
                                r"stats|transitions|export)\.(\w+)\(", text):
        module = importlib.import_module(f"hmqat.{mod}")
        assert hasattr(module, attr), f"{name}'s exercises name {mod}.{attr}, which does not exist"
    for attr in re.findall(r"\bproblem\.(\w+)\(", text):
        assert hasattr(search.Problem, attr), f"{name}: problem.{attr} does not exist"
    assert "pareto_frontier(" not in text and "ilp_select(" not in text, \
        f"{name}: exercises use the notebook's API (search.Problem), not the free functions"


def test_from_scratch_cells_check_against_the_library() -> None:
    t00 = (NB_DIR / "00_fp32_baseline.py").read_text(encoding="utf-8")
    assert "## 3. From scratch: top-1 and BatchNorm statistics by hand" in t00
    for what in ('"top-1 by hand"', '"eval-mode BatchNorm output by hand"',
                 '"batch mean by hand"', '"batch variance by hand"'):
        assert f"lessons.check_close(" in t00 and what in t00, what
    t01 = (NB_DIR / "01_sensitivity.py").read_text(encoding="utf-8")
    assert "### From scratch: one Hutchinson probe" in t01
    t02 = (NB_DIR / "02_bit_allocation.py").read_text(encoding="utf-8")
    assert "## 1. From scratch: two layers merged by hand" in t02
    assert "library = two.frontier()" in t02 and '"frontier costs by hand"' in t02


# --------------------------------------------------------------------------------------------
# The narrative agrees with the defaults and the run
# --------------------------------------------------------------------------------------------
def _header(name: str) -> str:
    text = (NB_DIR / f"{name}.py").read_text(encoding="utf-8")
    md = text.split("# %% [markdown]\n", 1)[1].split("\n# %%", 1)[0]
    return " ".join(line.lstrip("# >").strip() for line in md.splitlines())


def _bullet(header: str, label: str) -> str:
    return header.split(f"**{label}", 1)[1].split("- **", 1)[0]


def test_01_header_names_the_estimator_and_statistic_the_run_uses() -> None:
    cell, header = parameters_cell("01_sensitivity"), _header("01_sensitivity")
    will = _bullet(header, "You will")
    assert cell["trace_method"] in ("auto", "gauss_newton")
    assert "exactly" in will and "Gauss-Newton" in will and "Kendall τ" in will
    assert "Spearman" not in header and "Hutchinson's method" not in will
    quick = pipeline.load_params("quick")["notebooks"]["01_sensitivity"]
    lab = _bullet(header, "Lab defaults vs the quick profile")
    for phrase in (f"{cell['calib_samples']} calibration images (quick: {quick['calib_samples']})",
                   f"{cell['additivity_configs']} additivity configs "
                   f"({quick['additivity_configs']})",
                   f"{cell['fixed_configs']} fixed-size configs ({quick['fixed_configs']})",
                   f"{cell['frontier_random']} random configs",
                   f"{cell['variability_sets']} calibration sets for the variability check "
                   f"({quick['variability_sets']})"):
        assert phrase in lab, phrase
    assert len(cell["single_bits"]) == 1 and f"at {cell['single_bits'][0]} bits" in lab
    assert len(cell["frontier_compressions"]) == 1 and "one PTQ frontier budget" in lab


@pytest.mark.parametrize("name", ["00_fp32_baseline", "01_sensitivity", "02_bit_allocation"])
def test_prerequisites_name_every_upstream_notebook(name: str) -> None:
    prereq = _bullet(_header(name), "Prerequisites")
    for step in lessons.UPSTREAM[name]:
        assert re.search(rf"\b{step[:2]}\b", prereq), f"{name}'s prerequisites omit {step}"
    if not lessons.UPSTREAM[name]:
        assert "none among the notebooks" in prereq


def test_solutions_say_what_they_compute() -> None:
    sol = NB_DIR / "solutions"
    s00 = (sol / "00_fp32_baseline_solutions.py").read_text(encoding="utf-8")
    params00 = parameters_cell_of(sol / "00_fp32_baseline_solutions.py")
    steps = sum(params00["epochs_list"]) * params00["max_steps_per_epoch"]
    assert "a few minutes" not in s00 and f"{steps} steps" in s00
    assert "other_data_dir" not in s00   # no second (original, downloaded) CIFAR-10 needed
    s01 = (sol / "01_sensitivity_solutions.py").read_text(encoding="utf-8")
    assert "validate_omega(" not in s01 and "spearman" not in s01.lower()
    assert 'method="hutchinson"' in s01   # exercise 1 really runs Hutchinson probes
    s02 = (sol / "02_bit_allocation_solutions.py").read_text(encoding="utf-8")
    assert "about the same Ω" not in s02 and "can only be lower or equal" in s02
    t00 = (NB_DIR / "00_fp32_baseline.py").read_text(encoding="utf-8")
    assert '"test split)"' not in t00   # the old title that contradicted the "val." axis
    assert 'set_ylabel(("val." if val_size > 0 else "test") + " top-1 (%)")' in t00


def parameters_cell_of(path: Path) -> dict:
    cell = path.read_text(encoding="utf-8").split('# %% tags=["parameters"]\n', 1)[1]
    scope: dict = {}
    exec(compile(cell.split("\n# %%", 1)[0], str(path), "exec"), scope)
    return scope


# --------------------------------------------------------------------------------------------
# Notebook 01's cost: the study reuses the Ω tables the notebook has already shown
# --------------------------------------------------------------------------------------------
def test_run_study_reuses_the_callers_omega_tables(tmp_path: Path, monkeypatch) -> None:
    from hmqat import data, models, sensitivity
    from hmqat.study import sensitivity_study

    model = models.create_model("resnet20").eval()
    train = data.load_dataset("synthetic", "train", n_synthetic=64, seed=0)
    tables = {v: sensitivity.omega_table(model, None, [2, 4, 8], variant="param_size") * (i + 1)
              for i, v in enumerate(sensitivity.VARIANTS)}
    with pytest.raises(sensitivity.SensitivityError, match=r"omega_tables lacks the variants "
                                                           r"\['exact_quad', 'fisher'\]"):
        sensitivity_study.run_study(model, train, train, tmp_path, stages=("omegas",),
                                    omega_tables={v: tables[v] for v in sensitivity.VARIANTS
                                                  if v not in ("fisher", "exact_quad")})

    def no_recompute(*args, **kwargs):
        raise AssertionError("omega_table was called although the tables were given")

    monkeypatch.setattr(sensitivity_study, "omega_table", no_recompute)
    res = sensitivity_study.run_study(model, train, train, tmp_path, stages=("omegas",),
                                      bits=[2, 4, 8], calib_samples=16, calib_batch=16,
                                      trace_method="gauss_newton", progress=False,
                                      omega_tables=tables)
    got = res["omegas"].query("variant == 'exact_quad'").set_index(["layer", "bits"])["omega"]
    want = tables["exact_quad"].stack()
    assert got.to_dict() == {(l, int(b)): v for (l, b), v in want.items()}
