"""Every worked solution under notebooks/solutions/ runs (py:percent sources, executed in-process
with tiny synthetic settings in place of the lab defaults; 04/05/02 read the committed quick
results). The answers' numbers are checked where they are cheap to check."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

SOLUTIONS = Path(__file__).resolve().parent.parent / "notebooks" / "solutions"
NOTEBOOKS = SOLUTIONS.parent
TINY = {"dataset": "synthetic", "n_synthetic": 64, "pretrained": False}
OVERRIDES = {
    "00_fp32_baseline": {**TINY, "epochs_list": [1], "max_steps_per_epoch": 2, "batch_size": 16},
    "01_sensitivity": {**TINY, "tols": [0.5], "max_probes": 2, "n_calib": 32, "small_calib": 16,
                       "n_configs": 4, "val_size": 20},
    "02_bit_allocation": {"n_budgets": 3},
    "03_qat": {**TINY, "max_steps_per_epoch": 1, "batch_size": 16},
    "04_ablations": {},
    "05_report": {},
}


def _run(path: Path, overrides: dict) -> dict:
    """Execute a py:percent notebook: its parameters cell, then ``overrides``, then the rest."""
    text = path.read_text()
    head, rest = text.split('# %% tags=["parameters"]\n', 1)
    params, _, body = rest.partition("\n# %%")
    scope: dict = {"__name__": "__solution__"}
    exec(compile(head + params, str(path), "exec"), scope)
    unknown = set(overrides) - set(scope)
    assert not unknown, f"{path.name}: overrides {unknown} are not parameters"
    scope.update(overrides)
    exec(compile("# %%" + body, str(path), "exec"), scope)
    return scope


def test_every_notebook_has_a_solution_and_hints():
    for nb in OVERRIDES:
        assert (SOLUTIONS / f"{nb}_solutions.py").is_file(), nb
        assert (SOLUTIONS / f"{nb}_solutions.ipynb").is_file(), nb   # the jupytext pair
        text = (NOTEBOOKS / f"{nb}.py").read_text()
        exercises = text.split("## Exercises", 1)[1]
        n = len(re.findall(r"^# \d\. ", exercises, re.M))
        assert n >= 2 and exercises.count("*Hint:*") == n, nb
        assert f"solutions/{nb}_solutions" in exercises, nb


@pytest.mark.parametrize("nb", list(OVERRIDES))
def test_solution_runs(nb: str, monkeypatch) -> None:
    monkeypatch.chdir(SOLUTIONS)
    scope = _run(SOLUTIONS / f"{nb}_solutions.py", OVERRIDES[nb])
    if nb == "05_report":   # W3A4 with first/last at 8 bits: between 32·32/(8·8) and 32·32/(3·4)
        bc = scope["headline"].set_index("config")["BOPs compression"]
        assert 16 < bc["uniform W3A4"] < 32 * 32 / (3 * 4)
        assert bc["uniform W2A4"] > bc["uniform W3A4"]
    if nb == "02_bit_allocation":   # the exact frontier and the ILP find the same optimum
        assert scope["same"] < 1e-6
    if nb == "04_ablations":
        assert len(scope["rnd"]) == 3 and scope["z"] > 0
