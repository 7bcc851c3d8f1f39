"""hmqat.study.summary: the results text of README.md and docs/method.md is written by code from
one results folder (issue 24, item 4). The stale-text test compares the committed documents with
what the committed results produce; the other tests render a small synthetic results folder and
check the numbers against hand computations, the optional budget-axis block, the words derived
from each interval, and the message that names a missing file and the command that writes it."""
from __future__ import annotations

import math
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hmqat.runtime import atomic_write_json
from hmqat.study import plotting, reporting, summary
from hmqat.study.runs import pack_correct

ROOT = Path(__file__).resolve().parent.parent
T975_2 = 4.302652729911275          # t(0.975, 2 degrees of freedom): 3 paired seeds
DATA = "CIFAR-10 (JPEG q75 mirror)"


# --------------------------------------------------------------------------------------------
# (a) the committed documents equal what the committed results produce
# --------------------------------------------------------------------------------------------
def test_committed_docs_match_committed_results():
    stale = summary.stale_docs(ROOT / "results" / "quick")
    assert stale == {}, (f"{sorted(str(p) for p in stale)} differ from results/quick: run "
                         f"`python -m hmqat.study.summary --results results/quick --write`")


def test_committed_docs_hold_no_known_stale_number():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    method = (ROOT / "docs" / "method.md").read_text(encoding="utf-8")
    assert "chosen on the hold-out" not in readme and "a tenth" not in readme
    assert "87.60" not in method and "41.6 min" not in method and "1.12 h" not in method


# --------------------------------------------------------------------------------------------
# A synthetic results folder
# --------------------------------------------------------------------------------------------
SEEDS = (0, 1, 2)
TOP1 = {"HMQAT =W3A4 size": (86.6, 86.5, 86.7), "uniform W3A4": (86.7, 86.8, 86.6),
        "HMQAT 10.34x": (85.0, 85.2, 85.4), "HMQAT 13.11x": (85.0, 85.5, 86.0),
        "uniform W2A4": (84.0, 84.3, 84.8)}
SIZE = {"HMQAT =W3A4 size": (3.0, 0.1046, 9.83, 6.6e8), "uniform W3A4": (3.0, 0.1046, 9.83, 5.1e8),
        "HMQAT 10.34x": (2.86, 0.0994, 10.35, 5.9e8), "HMQAT 13.11x": (2.2, 0.0783, 13.15, 4.5e8),
        "uniform W2A4": (2.0, 0.0728, 14.14, 3.5e8)}


def _table(root: Path, stem: str, df: pd.DataFrame, caption: str = "synthetic table") -> None:
    reporting.write_table(df, root / "tables" / stem, caption=caption, data_label=DATA,
                          profile=root.name)


def _qat_runs() -> list[dict]:
    return [{"label": label, "seed": s, "avg_bits": SIZE[label][0], "size_mb": SIZE[label][1],
             "compression": SIZE[label][2], "bops": SIZE[label][3], "test_top1": TOP1[label][k],
             "val_top1": TOP1[label][k] + 5, "kind": "mixed" if "HMQAT" in label else "uniform"}
            for label in TOP1 for k, s in enumerate(SEEDS)]


def _transition_table() -> pd.DataFrame:
    nan = math.nan
    rows = []
    for point in ("HMQAT 10.34x", "uniform W2A4"):
        for budget in ("A", "B"):
            rows.append(dict(point=point, budget=budget, arm="lsq", role="reference", seeds=3,
                             total_steps=300, steps_at_target=300, val_mean=91.0, test_mean=86.0,
                             test_std=0.1, wall_s_mean=120.0, test_diff=nan, test_ci_low=nan,
                             test_ci_high=nan, ctrl_test_diff=nan, ctrl_test_ci_low=nan,
                             ctrl_test_ci_high=nan))
            rows.append(dict(point=point, budget=budget, arm="data+so/8>T", role="arm", seeds=3,
                             total_steps=300 if budget == "A" else 350, steps_at_target=250
                             if budget == "A" else 300, val_mean=90.5, test_mean=85.5,
                             test_std=0.2, wall_s_mean=150.0, test_diff=-0.5, test_ci_low=-0.7,
                             test_ci_high=-0.3, ctrl_test_diff=-0.6 if budget == "B" else nan,
                             ctrl_test_ci_low=-0.9 if budget == "B" else nan,
                             ctrl_test_ci_high=-0.2 if budget == "B" else nan))
    return pd.DataFrame(rows)


def _synthetic(tmp_path: Path, name: str = "quick") -> Path:
    """Every required file of a results folder, with hand-chosen numbers."""
    root = tmp_path / name
    (root / "data").mkdir(parents=True)
    (root / "tables").mkdir()
    atomic_write_json(root / "manifest.json", {
        "git_sha": "abcdef0123456789", "git_dirty": False, "time_utc": "2027-01-02T03:04:05Z",
        "device": "cpu", "cpu_count": 2, "steps": {
            "00_fp32_baseline": {"wall_s": 60.0, "compute_wall_s": 60.0, "attempts": 1,
                                 "parameters": {"arch": "resnet20", "dataset": "cifar10",
                                                "val_size": 5000, "val_from": "test", "seed": 0,
                                                "fp32_epochs": 2}},
            "01_sensitivity": {"wall_s": 90.0, "compute_wall_s": 150.0, "attempts": 2,
                               "parameters": {"target_compression": 10.34, "a_bits": 4,
                                              "trace_method": "auto", "calib_samples": 512}},
            "03_qat": {"wall_s": 600.0, "compute_wall_s": 600.0, "attempts": 1,
                       "parameters": {"qat_lr": 0.004, "step_lr": 0.0004, "qat_epochs": 1,
                                      "max_steps_per_epoch": None, "init": "mse", "a_bits": 4,
                                      "policy": "first_last_8",
                                      "recipe": {"distillation": {"enabled": True}}}},
            "04_ablations": {"wall_s": 1200.0, "compute_wall_s": 1200.0, "attempts": 1,
                             "parameters": {"qat_lr": 0.004, "step_lr": 0.004,
                                            "ablation_epochs": 1, "max_steps_per_epoch": 150,
                                            "ablation_compression": 10.34}}}})
    atomic_write_json(root / "data" / "fp32.json", {
        "arch": "resnet20", "data_label": DATA, "pretrained_top1": 80.0, "test_top1": 90.0,
        "val_top1": 89.5})
    runs = _qat_runs()
    atomic_write_json(root / "data" / "qat_results.json", runs)
    _table(root, "headline", reporting.seeded_headline(pd.DataFrame(runs), 90.0),
           caption="synthetic headline")
    pd.DataFrame({"layer": ["a", "b"], "avg_trace": [1.0, 2.0], "avg_trace_se": [0.0, 0.0],
                  "rel_se": [0.0, 0.0], "probes": [0, 0], "data_se": [0.1, 0.4]}
                 ).to_csv(root / "data" / "traces.csv", index=False)
    _table(root, "sensitivity_kendall_fixed_size", pd.DataFrame({
        "predictor": ["omega_joint", "omega_qerr_only", "n_2bit"],
        "kendall_tau": [0.6, 0.5, 0.4], "tau_low": [0.5, 0.4, 0.3], "tau_high": [0.7, 0.6, 0.5],
        "n_configs": [64, 64, 64], "ref_minus_tau": [math.nan, 0.1, 0.2],
        "diff_low": [math.nan, 0.05, -0.1], "diff_high": [math.nan, 0.2, 0.5]}))
    _table(root, "ablation", pd.DataFrame({
        "group": ["allocation"] * 3, "variant": ["hmqat-joint", "random", "ilp"],
        "top1": [89.0, 85.0, 89.0], "top1_std": [math.nan, 1.0, math.nan], "n": [1, 3, 1],
        "size_mb": [0.0994] * 3, "compression": [10.35] * 3, "avg_bits": [2.86] * 3,
        "osc_frac": [0.004] * 3}))
    pd.DataFrame({"variant": ["hmqat-joint", "random", "random", "random", "ilp"],
                  "bit_config": ['{"a": 4}', '{"a": 3}', '{"a": 2}', '{"a": 5}', '{"a": 4}'],
                  "recipe": ["LSQ"] * 5, "wall_s": [30.0, 40.0, 40.0, 40.0, 50.0],
                  "size_mb": [0.0994] * 5}).to_csv(root / "data" / "ablation_runs.csv",
                                                   index=False)
    _table(root, "transition_experiment", _transition_table())
    _table(root, "transition_screen", pd.DataFrame({
        "arm": ["lsq", "data+so/8>T"], "seed": [0, 0], "steps_at_target": [300, 250],
        "step_lr": [0.0004, 0.0004], "val_top1": [91.0, 90.5]}))
    atomic_write_json(root / "data" / "transition_experiment.json", {
        "choices": {"screen_seed": 0, "step_lr": "lr/10 (0.0004)", "final_arm": "data+so/8>T",
                    "screen_point": "HMQAT 10.34x"},
        "settings": {"recipe": "LSQ + KD(T=4, w=1)", "lr": 0.004, "weight_decay": 5e-05,
                     "batch_size": 128, "steps": 300, "pre_steps": 50, "scale_only_steps": 20,
                     "device": "cpu"},
        "wall_s_this_call": 2394.0, "run_wall_s_sum": 3888.0})
    pd.DataFrame({"run_id": ["r1", "r2", "r3", "r3", "r4"],
                  "phase": ["screen", "screen", "final", "final", "final"]}
                 ).to_csv(root / "data" / "transition_experiment.csv", index=False)
    return root


def _budget_files(root: Path) -> None:
    """Notebook 06's files, and its finished entry in the manifest."""
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["steps"]["06_budget"] = {"status": "ran", "wall_s": 900.0, "compute_wall_s": 900.0,
                                      "attempts": 1, "parameters": {"seeds": [0, 1, 2]}}
    atomic_write_json(root / "manifest.json", manifest)
    _table(root, "budget_axis", pd.DataFrame({
        "budget": ["0 (PTQ)", "390 (1 ep)"], "pair": ["=W3A4 size: mixed − uniform W3A4"] * 2,
        "seeds": [3, 3], "images": [5000, 5000], "diff": [1.25, -0.25],
        "ci_low": [0.75, -0.75], "ci_high": [1.75, 0.25], "half_width": [0.5, 0.5],
        "size gap %": [0.0, 0.0], "BOPs ratio": [1.3, 1.3]}), caption="Budget axis: synthetic")
    _table(root, "budget_accuracy", pd.DataFrame({
        "budget": ["0 (PTQ)", "0 (PTQ)", "390 (1 ep)", "390 (1 ep)"],
        "label": ["HMQAT =W3A4 size", "uniform W3A4"] * 2,
        "test_top1": [80.0, 78.75, 86.5, 86.75], "std": [0.5, 0.25, 0.25, 0.5],
        "seeds": [3, 3, 3, 3], "size_mb": [0.1046] * 4, "compression": [9.83] * 4,
        "bops": [6.6e8, 5.1e8] * 2, "% of FP32": [88.9, 87.5, 96.1, 96.2]}))
    atomic_write_json(root / "data" / "budget_verdict.json",
                      ["=W3A4 size: mixed − uniform W3A4 — 0 (PTQ): +1.25 [+0.75, +1.75] "
                       "a > b."])


def _docs(tmp_path: Path) -> list[Path]:
    """A README and a method.md holding every block's markers, around fixed prose."""
    readme, method = tmp_path / "README.md", tmp_path / "method.md"
    names = list(summary._BLOCKS)
    mark = lambda n: f"<!-- results:{n} -->\nold text 1.23\n<!-- /results:{n} -->\n"
    readme.write_text("# Title\n\nProse before.\n\n" + "".join(
        mark(n) + "\nbetween\n\n" for n in names if n.startswith("readme-")) + "Prose after.\n",
        encoding="utf-8")
    method.write_text("# Method\n\n" + "".join(mark(n) for n in names if n.startswith("method-")),
                      encoding="utf-8")
    return [readme, method]


# --------------------------------------------------------------------------------------------
# (b) the numbers of a synthetic results folder
# --------------------------------------------------------------------------------------------
def test_headline_numbers_match_a_hand_computation(tmp_path):
    blocks = summary.render_blocks(_synthetic(tmp_path))
    head = blocks["readme-headline"]
    # 10.34x: mean 85.2, sd 0.2, 85.2 / 90 = 94.67 % of FP32; weights only 32 / 2.86 = 11.19
    assert ("HMQAT 10.34× (2.86 average weight bits, 10.35× the whole model, 11.2× weights "
            "only) reaches 85.20 ± 0.20 % = **94.7 %** of FP32 (90.00 %), mean ± sd over 3 "
            "seeds") in head
    # equal-size pair: d = (-0.1, -0.3, +0.1), mean -0.1, sd 0.2, half-width t·0.2/√3 = 0.497
    half = T975_2 * 0.2 / math.sqrt(3)
    assert f"95 % CI [{-0.1 - half:+.2f}, {-0.1 + half:+.2f}]" == "95 % CI [-0.60, +0.40]"
    assert ("HMQAT =W3A4 size − uniform W3A4: -0.10 points test top-1 (size gap +0.00 %, BOPs "
            "×1.29), 95 % CI [-0.60, +0.40] over 3 seeds; the interval includes 0: no "
            "difference shown. Interval over seeds only (Eq. P: it treats the test images as "
            "fixed).") in head
    # the trade: d = (1.0, 1.2, 1.2), mean 1.133, sd 0.1155 -> [0.85, 1.42], above 0
    d = np.array([1.0, 1.2, 1.2])
    half = T975_2 * d.std(ddof=1) / math.sqrt(3)
    assert f"[{d.mean() - half:+.2f}, {d.mean() + half:+.2f}]" == "[+0.85, +1.42]"
    assert ("HMQAT 13.11x − uniform W2A4: +1.13 points test top-1 (size gap +7.55 %, BOPs "
            "×1.29), 95 % CI [+0.85, +1.42] over 3 seeds; the interval excludes 0.") in head
    assert "**HMQAT 13.11x is better than uniform W2A4** here." in head
    assert "A size-for-accuracy trade, not an equal-size pair" in head
    # the HAWQ anchor: 32 / 2.2 = 14.5x weights only; HAWQ's 92.22 / 92.37 = 99.84 %
    assert "2.20 average weight bits = **14.5× weights only**" in head
    assert "HAWQ (V1, ICCV 2019) reports 92.22 % against its FP32 92.37 % (99.84 %)" in head
    assert "| HMQAT 10.34x     |" in head and "synthetic headline" in head


def test_run_cost_and_split_come_from_the_manifest(tmp_path):
    blocks = summary.render_blocks(_synthetic(tmp_path))
    run = blocks["readme-run"]
    assert "commit `abcdef0`, started 2027-01-02, device cpu, 2 CPU cores" in run
    assert ("validation = 5,000 images of the test split (class-stratified, seed 0), test = "
            "the other images of the test split") in run
    assert "(80.00 % test top-1 as published), fine-tuned 2 epoch(s) on all training images" in run
    assert "**90.00 %** test top-1, 89.50 % on validation" in run
    assert "QAT:** LSQ + KD(T=4, w=1), MSE step init" in run
    assert "step learning rate 0.0004 (= lr/10)" in run
    # compute_wall_s: 60 + 150 + 600 + 1200 s = 33.5 min; 01 took 2 attempts
    assert ("**33.5 min in all** (00 1.0, 01 2.5 in 2 attempts, 03 10.0, 04 20.0 min)"
            in blocks["readme-cost"])


def test_interval_words_follow_the_interval(tmp_path):
    blocks = summary.render_blocks(_synthetic(tmp_path))
    # τ(joint) − τ(qerr_only) = +0.10 [+0.05, +0.20]: above 0
    assert ("paired τ(joint) − τ(qerr_only) = **+0.10 [+0.05, +0.20]**: the Hessian trace "
            "improves the ranking over the quantization error alone; `joint` ranks better than "
            "`qerr_only`") in blocks["readme-sensitivity"]
    words = dict(above="up", below="down", neither="undecided")
    assert [summary.interval_words(lo, hi, **words) for lo, hi in
            [(0.01, 0.2), (-0.2, -0.01), (-0.1, 0.1), (math.nan, math.nan), (0.0, 0.3)]] == \
        ["up", "down", "undecided", "undecided", "undecided"]


def test_allocation_transitions_and_sensitivity_blocks(tmp_path):
    blocks = summary.render_blocks(_synthetic(tmp_path))
    alloc = blocks["readme-allocation"]
    # (89 - 85) / 1.0 = 4.0 SDs; mean wall of the 5 rows = 40 s
    assert ("the Hessian `joint` pick 89.00 % vs random allocation 85.00 ± 1.00 % over 3 random "
            "configs of the same size: 4.0 random-row SDs above their mean") in alloc
    assert "HAWQ-V3's ILP picks the same config as the `joint` frontier" in alloc
    assert "(mean 40 s)" in alloc
    assert "more than 1 % (notebook 04 prints each one's size): uniform, greedy" in alloc
    assert "| random allocation                 |       3 | 85.00 ± 1.00" in \
        blocks["method-allocation"]
    trans = blocks["method-transitions"]
    assert "the experiment took 39.9 min (4 trained runs, 1.08 h of run time)" in trans
    assert "120–150 s per run" in trans
    assert ("| HMQAT 10.34x | `data+so/8>T` | 350 / 300           | 85.50 ± 0.20 | "
            "-0.50 [-0.70, -0.30] | -0.60 [-0.90, -0.20]  |") in trans
    assert "**No arm meets it: plain LSQ (+ KD) stays the default.**" in trans
    assert "\n\n* **HMQAT 10.34x, budget A**" in blocks["readme-transitions"]   # a real list
    sens = blocks["method-sensitivity"]
    assert "**exact** traces (Gauss-Newton, Eq. H6: no probe error, SE 0)" in sens
    assert "the per-image SE `data_se` is 10–20 % of T̄" in sens      # 0.1/1.0, 0.4/2.0
    assert "commit `abcdef0`" in sens
    assert "7. **After QAT**" not in sens            # experiment 7's files are optional


def test_the_budget_axis_block_appears_only_with_its_files(tmp_path):
    root = _synthetic(tmp_path)
    blocks = summary.render_blocks(root)
    assert "readme-budget-axis" not in blocks
    docs = _docs(tmp_path)
    summary.main(["--results", str(root), "--write", "--docs", *map(str, docs)])
    assert "<!-- results:readme-budget-axis -->\n<!-- /results:readme-budget-axis -->" in \
        docs[0].read_text(encoding="utf-8")
    _budget_files(root)
    axis = summary.render_blocks(root)["readme-budget-axis"]
    assert "**The budget axis** (notebook 06): Budget axis: synthetic" in axis
    assert ("| 390 (1 ep) | =W3A4 size: mixed − uniform W3A4 |       3 |     5000 |  -0.25 |    "
            "-0.75 |     +0.25 |         0.50 |") in axis
    assert "| HMQAT =W3A4 size | 80.00 ± 0.50 | 86.50 ± 0.25 |" in axis
    assert "* =W3A4 size: mixed − uniform W3A4 — 0 (PTQ): +1.25 [+0.75, +1.75] a > b." in axis


def test_per_image_bits_give_the_seeds_and_images_interval(tmp_path):
    root = _synthetic(tmp_path)
    rng = np.random.default_rng(0)
    runs = _qat_runs()
    for r in runs:
        r["test_correct"], r["n_test"] = pack_correct(rng.random(200) < 0.86), 200
    atomic_write_json(root / "data" / "qat_results.json", runs)
    row = summary._pairs(summary._Results(root)).iloc[0]
    assert row["interval"] == "seeds × images" and row["images"] == 200
    head = summary.render_blocks(root)["readme-headline"]
    assert (f"95 % CI [{row['ci_low']:+.2f}, {row['ci_high']:+.2f}] over 3 seeds and 200 test "
            f"images") in head
    assert "Interval over seeds and test images (Eq. V)." in head


# --------------------------------------------------------------------------------------------
# (c) a missing file names itself and the command that writes it
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rel, step", [
    ("data/fp32.json", "00_fp32_baseline"),
    ("tables/headline.csv", "05_report"),
    ("data/transition_experiment.json", "04_ablations"),
])
def test_a_missing_required_file_is_named_with_its_command(tmp_path, rel, step):
    root = _synthetic(tmp_path)
    (root / rel).unlink()
    with pytest.raises(summary.SummaryError) as err:
        summary.render_blocks(root)
    msg = str(err.value)
    assert str(root / rel) in msg
    assert f"notebook {step} writes it" in msg
    assert f"`python -m hmqat.study.pipeline --profile quick --only {step}`" in msg


def test_a_partial_budget_axis_names_the_missing_file(tmp_path):
    root = _synthetic(tmp_path)
    _budget_files(root)
    (root / "data" / "budget_verdict.json").unlink()
    with pytest.raises(summary.SummaryError, match=r"budget_verdict\.json is missing; notebook "
                                                   r"06_budget writes it: run `python -m "
                                                   r"hmqat\.study\.pipeline --profile quick "
                                                   r"--only 06_budget`"):
        summary.render_blocks(root)


def test_the_command_line_reports_a_missing_file_and_exits_2(tmp_path, capsys):
    root = _synthetic(tmp_path)
    (root / "manifest.json").unlink()
    assert summary.main(["--results", str(root), "--docs", *map(str, _docs(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert f"error: {root / 'manifest.json'} is missing; the pipeline writes it" in err


# --------------------------------------------------------------------------------------------
# The command line and the markers
# --------------------------------------------------------------------------------------------
def test_check_exits_1_with_a_diff_and_write_fixes_only_the_blocks(tmp_path, capsys):
    root = _synthetic(tmp_path)
    docs = _docs(tmp_path)
    before = [d.read_text(encoding="utf-8") for d in docs]
    assert summary.main(["--results", str(root), "--docs", *map(str, docs)]) == 1
    out = capsys.readouterr()
    assert "-old text 1.23" in out.out and "+* **10.34×:**" in out.out
    assert "2 document(s) out of date" in out.err
    assert [d.read_text(encoding="utf-8") for d in docs] == before      # a check writes nothing
    assert summary.main(["--results", str(root), "--write", "--docs", *map(str, docs)]) == 0
    after = docs[0].read_text(encoding="utf-8")
    assert after.startswith("# Title\n\nProse before.\n\n<!-- results:readme-run -->\n")
    assert after.endswith("<!-- /results:readme-cost -->\n\nbetween\n\nProse after.\n")
    assert "old text" not in after
    assert summary.main(["--results", str(root), "--docs", *map(str, docs)]) == 0


@pytest.mark.parametrize("text, message", [
    ("<!-- results:nope -->\n<!-- /results:nope -->\n", "doc:1: unknown results block 'nope'"),
    ("a\n<!-- results:readme-run -->\nx\n", "doc:2: <!-- results:readme-run --> is never closed"),
    ("<!-- results:readme-run -->\n<!-- results:readme-cost -->\n",
     "doc:2: <!-- results:readme-cost --> opens inside results:readme-run (line 1)"),
    ("<!-- /results:readme-run -->\n", "doc:1: <!-- /results:readme-run --> closes a block that "
                                       "is not open"),
])
def test_bad_markers_name_the_document_and_line(text, message):
    with pytest.raises(summary.SummaryError) as err:
        summary.apply_blocks(text, {"readme-run": "x", "readme-cost": "y"}, source="doc")
    assert message in str(err.value)


def test_a_block_without_markers_is_an_error(tmp_path):
    root = _synthetic(tmp_path)
    docs = _docs(tmp_path)
    docs[1].write_text("# Method without markers\n", encoding="utf-8")
    with pytest.raises(summary.SummaryError, match=r"block\(s\) \['method-allocation', "
                                                   r"'method-anchor', 'method-sensitivity', "
                                                   r"'method-transitions'\] have no markers"):
        summary.stale_docs(root, docs)


def test_a_missing_results_folder_says_how_to_make_it(tmp_path):
    with pytest.raises(summary.SummaryError, match=r"does not exist; run `make reproduce`"):
        summary.render_blocks(tmp_path / "nothing")


# --------------------------------------------------------------------------------------------
# The layer-trace figure says what the run used
# --------------------------------------------------------------------------------------------
def _label(se: list[float]) -> str:
    traces = pd.DataFrame({"avg_trace": [0.02, 0.01], "avg_trace_se": se},
                          index=["conv1", "linear"])
    fig = plotting.plot_layer_traces(traces, n_params=False)
    return fig.axes[0].get_ylabel()


def test_layer_traces_axis_label_says_exact_when_the_se_is_zero():
    assert _label([0.0, 0.0]) == "avg. trace Tr(H)/n  (exact: no probe error)"
    assert _label([0.001, 0.0]) == "avg. trace Tr(H)/n  (±2 SE)"


def test_the_models_block_comes_from_the_models_folder_beside(tmp_path):
    root = _synthetic(tmp_path)
    assert "readme-models" not in summary.render_blocks(root)
    models = tmp_path / "models"
    (models / "data").mkdir(parents=True)
    _table(models, "across_models_paired", pd.DataFrame([
        {"model": "resnet56", "a": "HMQAT =W3A4 size", "b": "uniform W3A4", "seeds": 3,
         "size gap %": 0.0, "BOPs ratio": 1.3, "diff": -0.2, "ci_low": -0.5, "ci_high": 0.1}]),
        caption="Across models: paired")
    with pytest.raises(summary.SummaryError, match=r"across_models.json is missing; notebook "
                       r"08_across_models writes it: run `python -m hmqat.study.pipeline "
                       r"--profile models --only 08_across_models`"):
        summary.render_blocks(root)                   # all of its files, or none
    for stem in ("kendall", "ptq_gain", "step_cost", "wall_time"):
        _table(models, f"across_models_{stem}", pd.DataFrame([{"model": "resnet56", "x": 1.5}]),
               caption=f"Across models: {stem}")
    (models / "data" / "across_models.json").write_text(json.dumps(
        {"models": ["resnet20", "resnet56"], "verdict": ["The trace ... same sign."]}))
    block = summary.render_blocks(root)["readme-models"]
    assert block.startswith("**Across models** (notebook 08, `")
    assert "models: resnet20, resnet56). Across models: paired" in block
    assert ("| resnet56 | HMQAT =W3A4 size | uniform W3A4 |       3 |        +0.00 |         1.30 "
            "|  -0.20 |    -0.50 |     +0.10 |") in block
    assert "Across models: wall_time" in block and block.endswith("* The trace ... same sign.")


@pytest.mark.parametrize("status, why", [(None, "has not run yet"),
                                         ("running", "has not run yet"),
                                         ("failed", "failed"),
                                         ("stale", "has not rerun since a step it reads reran")])
@pytest.mark.parametrize("step", ["04_ablations", "06_budget"])
def test_a_block_whose_notebook_has_not_finished_says_so(tmp_path, step, status, why):
    """A run that has not reached a notebook yet (--only, or resumed across sessions), or that
    reran a step it reads since, reports nothing from it, even where an earlier run's files are
    still there; an optional block whose notebook the manifest never recorded is left out."""
    root = _synthetic(tmp_path)
    _budget_files(root)
    manifest = json.loads((root / "manifest.json").read_text())
    if status is None:
        del manifest["steps"][step]
    else:
        manifest["steps"][step]["status"] = status
    atomic_write_json(root / "manifest.json", manifest)
    blocks = summary.render_blocks(root)
    names = [n for n, s in summary.BLOCK_STEPS.items() if s == step]
    assert names
    for name in names:
        if status is None and name in summary.OPTIONAL_BLOCKS:
            assert name not in blocks, name       # a step this run never recorded: no block
            continue
        assert f"Notebook {step} {why} in the run of" in blocks[name], name
        assert f"--profile quick --only {step}`" in blocks[name]
        for number in ("89.00", "-0.25", "+1.25"):               # nothing from the old files
            assert number not in blocks[name], (name, number)
    assert "Notebook" not in blocks["readme-headline"].split("\n")[0]
    finished = [n for n, s in summary.BLOCK_STEPS.items() if s != step and n in blocks]
    assert finished and not any(blocks[n].startswith("*Notebook") for n in finished)


def test_the_recipe_choices_block_appears_only_with_its_files(tmp_path):
    root = _synthetic(tmp_path)
    assert "readme-choices" not in summary.render_blocks(root)       # 03 §5 did not run
    _table(root, "recipe_choices", pd.DataFrame({
        "choice": ["step_lr", "distillation"], "a": ["step_lr = lr/10", "distillation off"],
        "b": ["profile", "profile"], "seeds": [3, 3], "images": [5000, 5000],
        "diff": [0.07, -1.5], "ci_low": [-0.28, -2.62], "ci_high": [0.41, -0.41]}),
        caption="Recipe choices: synthetic")
    with pytest.raises(summary.SummaryError, match="recipe_choices.json is missing.*03_qat"):
        summary.render_blocks(root)                                  # half of them: named
    atomic_write_json(root / "data" / "recipe_choices.json",
                      {"verdict": ["distillation: the profile's choice is confirmed."]})
    block = summary.render_blocks(root)["readme-choices"]
    assert block.startswith("**The recipe's choices** (notebook 03 §5): Recipe choices: "
                            "synthetic")
    assert "| step_lr " in block and "+0.07" in block and "-2.62" in block
    assert block.endswith("* distillation: the profile's choice is confirmed.")


def test_the_run_block_names_the_commits_of_steps_run_with_newer_code(tmp_path):
    """A run continued later (e.g. 04 and 06 after 00-03) says which steps ran at which commit."""
    root = _synthetic(tmp_path)
    assert "(commit `abcdef0`, started" in summary.render_blocks(root)["readme-run"]
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["steps"]["00_fp32_baseline"]["git_sha"] = "abcdef0123456789"
    for step in ("03_qat", "04_ablations"):
        manifest["steps"][step].update(git_sha="1234567890abcdef", git_dirty=False)
    manifest["steps"]["01_sensitivity"].update(git_sha="abcdef0123456789", git_dirty=True)
    atomic_write_json(root / "manifest.json", manifest)
    assert ("(commit `abcdef0`; steps 01 at `abcdef0` + uncommitted changes; steps 03, 04 at "
            "`1234567`, started") in summary.render_blocks(root)["readme-run"]
