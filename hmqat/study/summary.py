"""Results text that cannot go stale (issue 24, item 4): the numbers of README.md's results section
and of docs/method.md's verdicts, written by code from one results folder.

Every generated block sits between two markers in a document::

    <!-- results:NAME -->
    ...text written by render_blocks()...
    <!-- /results:NAME -->

:func:`render_blocks` reads ``results/<profile>/`` (``manifest.json``, ``data/*.json``,
``data/*.csv`` and the tables of :func:`hmqat.study.reporting.write_table`, read with
:func:`~hmqat.study.reporting.read_table`) and returns ``{NAME: markdown}``. Every sentence that
says which way a comparison goes derives it from the interval: paired rows through
:func:`hmqat.study.reporting.describe_comparison`, the other intervals through
:func:`interval_words`; the notebooks' own verdict functions
(:func:`hmqat.study.sensitivity_study.verdict`, :func:`hmqat.study.ablation.qat_level_verdict`,
:func:`hmqat.study.ablation.transition_verdict`) write the method verdicts, so a notebook and the
docs say the same thing. An optional block (:data:`OPTIONAL_BLOCKS`: the budget axis of notebook
06) is left out while its files do not exist; its markers then hold nothing.

Command line (``tests/test_summary.py`` runs the check on the committed files)::

    python -m hmqat.study.summary --results results/quick           # exit 1 + a diff if stale
    python -m hmqat.study.summary --results results/quick --write   # rewrite the blocks
"""
from __future__ import annotations

import argparse
import difflib
import math
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ..runtime import atomic_write_text, read_json
from ..transitions import Recipe
from . import ablation, reporting, sensitivity_study

__all__ = ["BLOCK_STEPS", "DOCS", "OPTIONAL_BLOCKS", "PRODUCERS", "SummaryError", "apply_blocks",
           "interval_words", "main", "render_blocks", "stale_docs"]

#: The repository root (documents are named relative to it).
ROOT = Path(__file__).resolve().parents[2]
#: The documents whose marked blocks are generated, relative to :data:`ROOT`.
DOCS = ("README.md", "docs/method.md")
#: Blocks left out (empty between their markers) while their files do not exist.
OPTIONAL_BLOCKS = ("readme-budget-axis", "method-walk", "readme-models", "readme-choices")

#: Which notebook writes each result file (a path relative to the results folder; tables
#: without their ``.csv``), for the message that names a missing file.
PRODUCERS: dict[str, str] = {
    "manifest.json": "the pipeline",
    **{f: "08_across_models" for f in ("data/across_models.json", "tables/across_models_paired",
                                       "tables/across_models_kendall",
                                       "tables/across_models_ptq_gain",
                                       "tables/across_models_step_cost",
                                       "tables/across_models_wall_time")},
    "data/fp32.json": "00_fp32_baseline",
    "data/traces.csv": "01_sensitivity",
    "tables/sensitivity_kendall_fixed_size": "01_sensitivity",
    "data/qat_results.json": "03_qat",
    "tables/ablation": "04_ablations",
    "data/ablation_runs.csv": "04_ablations",
    "tables/qat_level_kendall": "04_ablations",
    "data/qat_level.csv": "04_ablations",
    "tables/transition_experiment": "04_ablations",
    "tables/transition_screen": "04_ablations",
    "data/transition_experiment.json": "04_ablations",
    "data/transition_experiment.csv": "04_ablations",
    "data/transition_diagnostics.csv": "04_ablations",
    "tables/walk_frontier": "07_frontier_walk",
    "tables/walk_movement": "07_frontier_walk",
    "data/walk_verdict.json": "07_frontier_walk",
    "tables/headline": "05_report",
    "tables/recipe_choices": "03_qat",
    "data/recipe_choices.json": "03_qat",
    "tables/budget_axis": "06_budget",
    "tables/budget_accuracy": "06_budget",
    "data/budget_verdict.json": "06_budget",
}
#: notebook 01's summary tables that :func:`sensitivity_study.verdict` reads when present.
SENSITIVITY_TABLES = ("single_layer_summary", "noise_summary", "additivity_summary",
                      "kendall_fixed_size", "ptq_frontier_summary", "trace_variability",
                      "trace_variability_picks")
#: The budget axis's files (notebook 06): all or none.
BUDGET_FILES = ("tables/budget_axis", "tables/budget_accuracy", "data/budget_verdict.json")
#: Notebook 03 §5's files (the recipe's choices re-decided on validation): all or none.
CHOICE_FILES = ("tables/recipe_choices", "data/recipe_choices.json")
#: Notebook 07's files (the frontier walk); the block is left out while none exists.
WALK_FILES = ("tables/walk_frontier", "tables/walk_movement", "data/walk_verdict.json")
#: HAWQ (V1, Dong et al., ICCV 2019), ResNet-20 on the original CIFAR-10: weights-only
#: compression, top-1 and its FP32 top-1 (docs/method.md §8). The paper's numbers, not ours.
HAWQ_ANCHOR = {"compression": 13.11, "top1": 92.22, "fp32": 92.37}
#: HMQAT's headline (ResNet18/ImageNet, the abstract): % of FP32 top-1 at 10.34x.
PAPER_PCT_OF_FP32 = 99.81

_MARK = re.compile(r"<!-- (/?)results:([A-Za-z0-9_.-]+) -->")


class SummaryError(reporting.ReportingError):
    """A results folder or a document the generated text cannot be made from; the message
    names the file and the fix."""


# --------------------------------------------------------------------------------------------
# Reading a results folder
# --------------------------------------------------------------------------------------------
class _Results:
    """One results folder: every read names the missing file and the command that writes it."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise SummaryError(f"results folder {self.root} does not exist; run `make reproduce` "
                               f"(or `python -m hmqat.study.pipeline --profile <profile>`) first, "
                               f"or pass --results results/<profile>")
        self.profile = self.root.name
        self.shown = _shown_path(self.root)
        self._cache: dict[str, Any] = {}

    # -- existence --------------------------------------------------------------------------
    def _file(self, rel: str) -> Path:
        return self.root / (rel if "." in Path(rel).name else rel + ".csv")

    def has(self, rel: str) -> bool:
        return self._file(rel).is_file()

    def missing(self, rel: str) -> SummaryError:
        step = PRODUCERS.get(rel, "")
        if step == "the pipeline":
            how = (f"the pipeline writes it: run `python -m hmqat.study.pipeline --profile "
                   f"{self.profile}` (`make reproduce PROFILE={self.profile}`)")
        elif step:
            how = (f"notebook {step} writes it: run `python -m hmqat.study.pipeline --profile "
                   f"{self.profile} --only {step}` (or the whole study: `make reproduce "
                   f"PROFILE={self.profile}`)")
        else:
            how = f"run `make reproduce PROFILE={self.profile}`"
        return SummaryError(f"{self._file(rel)} is missing; {how}, then `python -m "
                            f"hmqat.study.summary --results {self.shown} --write`")

    # -- reads ------------------------------------------------------------------------------
    def _read(self, rel: str, reader: Any) -> Any:
        if rel not in self._cache:
            if not self.has(rel):
                raise self.missing(rel)
            try:
                self._cache[rel] = reader(self._file(rel))
            except (ValueError, KeyError, OSError) as exc:
                raise SummaryError(f"{self._file(rel)} cannot be read ({exc}); rerun the notebook "
                                   f"that writes it ({PRODUCERS.get(rel, 'make reproduce')})"
                                   ) from exc
        return self._cache[rel]

    def table(self, stem: str) -> pd.DataFrame:
        """A :func:`reporting.write_table` table (``stem`` like ``tables/headline``)."""
        return self._read(stem, lambda p: reporting.read_table(p))

    def json(self, rel: str) -> Any:
        return self._read(rel, read_json)

    def csv(self, rel: str, **kw: Any) -> pd.DataFrame:
        return self._read(rel, lambda p: pd.read_csv(p, **kw))

    def params(self, step: str) -> dict[str, Any]:
        """The parameters ``manifest.json`` recorded for ``step`` (e.g. ``03_qat``)."""
        steps = self.json("manifest.json").get("steps", {})
        if step not in steps or "parameters" not in steps[step]:
            raise SummaryError(f"{self._file('manifest.json')} has no parameters for step "
                               f"{step!r}; run `python -m hmqat.study.pipeline --profile "
                               f"{self.profile} --only {step}`")
        return steps[step]["parameters"]

    def runs(self) -> pd.DataFrame:
        """Notebook 03's QAT runs (one row per label and seed)."""
        rows = self.json("data/qat_results.json")
        if not isinstance(rows, list) or not rows:
            raise SummaryError(f"{self._file('data/qat_results.json')} holds no runs; rerun "
                               f"notebook 03_qat")
        return pd.DataFrame(rows)


def _shown_path(root: Path) -> str:
    """``root`` relative to the repository when it lies inside it (so generated text is the
    same whoever runs it), else as given."""
    try:
        return root.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return root.as_posix()


# --------------------------------------------------------------------------------------------
# Numbers and words
# --------------------------------------------------------------------------------------------
def _ci(value: float, low: float, high: float, fmt: str = "{:+.2f}") -> str:
    return f"{fmt.format(value)} [{fmt.format(low)}, {fmt.format(high)}]"


def interval_words(low: float, high: float, *, above: str, below: str, neither: str) -> str:
    """The words an interval supports: ``above`` when it lies above 0, ``below`` when it lies
    below 0, ``neither`` when it includes 0 (or is NaN: one seed)."""
    if math.isfinite(low) and low > 0:
        return above
    if math.isfinite(high) and high < 0:
        return below
    return neither


def _interval_kind(row: Mapping[str, Any]) -> str:
    """Which noise the interval of a :func:`reporting.paired_comparisons` row carries (tables
    written before the ``interval`` column existed used the seed-only interval)."""
    kind = str(row.get("interval") or "seeds only")
    if kind == "seeds × images":
        return "Interval over seeds and test images (Eq. V)."
    return "Interval over seeds only (Eq. P: it treats the test images as fixed)."


def _markdown(df: pd.DataFrame, formats: Mapping[str, str] | None = None) -> str:
    """``df`` as a Markdown table, numbers through :func:`reporting.format_numbers` (the
    formatter of every committed table)."""
    fmt = {c: f for c, f in (formats or {}).items() if c in df.columns}
    shown = reporting.format_numbers(df.reset_index(drop=True), fmt)
    numeric = [pd.api.types.is_numeric_dtype(df[c]) for c in df.columns]
    return shown.to_markdown(index=False, disable_numparse=True,
                             colalign=["right" if n else "left" for n in numeric])


def _paragraphs(text: str) -> str:
    """``text`` with a blank line wherever a bullet list starts or ends, so Markdown renders the
    verdict functions' lines (written for a notebook cell) as paragraphs and lists."""
    out: list[str] = []
    for line in text.split("\n"):
        bullet = line.startswith("* ")
        if out and out[-1] and bullet != out[-1].startswith("* ") and not line.startswith(" "):
            out.append("")
        out.append(line)
    return "\n".join(out)


def _caption(res: _Results, stem: str) -> str:
    """The caption line of a table (its CSV's first line, without ``#``)."""
    with open(res._file(stem), encoding="utf-8") as fh:
        return fh.readline().lstrip("#").strip()


def _row(table: pd.DataFrame, column: str, label: str) -> pd.Series | None:
    hit = table[table[column].astype(str) == label]
    return hit.iloc[0] if len(hit) else None


def _steps_text(epochs: Any, max_steps: Any) -> str:
    if max_steps:
        return f"{int(epochs)} epoch(s) of at most {int(max_steps)} steps"
    return f"{int(epochs)} epoch(s)"


def _lr_ratio(step_lr: float, lr: float) -> str:
    ratio = step_lr / lr
    return "= lr" if math.isclose(ratio, 1.0) else f"= lr/{1 / ratio:g}" if ratio < 1 else \
        f"= {ratio:g}·lr"


def _split_text(res: _Results) -> str:
    """Where validation and test come from (the FP32 step's parameters; runs before the clean
    split recorded no ``val_from`` and held validation out of the training split)."""
    p = res.params("00_fp32_baseline")
    size, seed = int(p.get("val_size") or 0), p.get("seed", 0)
    if size <= 0:
        return "no validation split; test = the whole test split"
    if p.get("val_from", "train") == "test":
        return (f"validation = {size:,} images of the test split (class-stratified, seed {seed}), "
                f"test = the other images of the test split; no model involved saw either")
    return (f"validation = {size:,} images held out of the training split (class-stratified, "
            f"seed {seed}), which the published weights saw in their own training, so "
            f"validation scores only rank (docs/method.md §8); test = the test split")


def _commit(res: _Results) -> str:
    """The run's commit (the manifest's top level: its first step), and the commits of the
    steps that ran at another one (a run resumed or continued with newer code)."""
    m = res.json("manifest.json")
    sha = str(m.get("git_sha") or "unknown")[:7]
    dirty = " + uncommitted changes" if m.get("git_dirty") else ""
    later: dict[str, list[str]] = {}
    for step, entry in m.get("steps", {}).items():
        other = str(entry.get("git_sha") or "")[:7]
        if other and (other != sha or bool(entry.get("git_dirty")) != bool(m.get("git_dirty"))):
            key = f"`{other}`" + (" + uncommitted changes" if entry.get("git_dirty") else "")
            later.setdefault(key, []).append(step[:2])
    also = "".join(f"; steps {', '.join(steps)} at {key}" for key, steps in later.items())
    return f"commit `{sha}`{dirty}{also}"


def _pairs(res: _Results) -> pd.DataFrame:
    """Notebook 03's runs paired by seed (the way notebooks 03 and 05 pair them): every
    equal-size pair, then the 13.11x trade against uniform W2A4 when both ran."""
    runs = res.runs()
    pairs = reporting.headline_pairs(list(runs["label"]))
    return reporting.paired_comparisons(runs, pairs) if pairs else pd.DataFrame()


def _pair_sentence(row: Mapping[str, Any]) -> str:
    """:func:`reporting.describe_comparison`, the interval's kind, and, where the interval
    decides the sign, which way it points."""
    text = reporting.describe_comparison(row)
    if int(row["seeds"]) < 2 or not math.isfinite(float(row["ci_low"])):
        return text
    way = interval_words(float(row["ci_low"]), float(row["ci_high"]),
                         above=f" **{row['a']} is better than {row['b']}** here.",
                         below=f" **{row['a']} is worse than {row['b']}** here.", neither="")
    return f"{text} {_interval_kind(row)}{way}"


def _weights_only(row: pd.Series) -> float:
    """32 / average weight bits, HAWQ's compression count (the headline's column when present)."""
    if "W-only compression" in row.index and pd.notna(row["W-only compression"]):
        return float(row["W-only compression"])
    return 32.0 / float(row["avg bits"])


# --------------------------------------------------------------------------------------------
# README blocks
# --------------------------------------------------------------------------------------------
def _readme_run(res: _Results) -> str:
    m, fp32 = res.json("manifest.json"), res.json("data/fp32.json")
    p00, p03 = res.params("00_fp32_baseline"), res.params("03_qat")
    data = str(fp32.get("data_label", "")).split(";")[0] or p00.get("dataset", "")
    seeds = sorted(res.runs()["seed"].unique().tolist())
    recipe = Recipe.from_dict(p03.get("recipe") or {}).describe()
    when = str(m.get("time_utc", ""))[:10]
    cores = f", {m['cpu_count']} CPU cores" if m.get("cpu_count") else ""
    train_on = ("the training split minus the validation hold-out"
                if p00.get("val_from", "train") == "train" and p00.get("val_size") else
                "all training images")
    step_lr, lr = float(p03.get("step_lr") or p03["qat_lr"]), float(p03["qat_lr"])
    return "\n".join([
        f"Every number between `<!-- results: -->` markers in this section and in "
        f"docs/method.md is written by `python -m hmqat.study.summary --results {res.shown} "
        f"--write` from the files of **one `make reproduce` ({res.profile} profile)** under "
        f"[{res.shown}/]({res.shown}/README.md) ({_commit(res)}, started {when}, device "
        f"{m.get('device', '?')}{cores}; the executed notebooks are there too); "
        f"`tests/test_summary.py` fails when the text and those files disagree.",
        "",
        f"**Data:** {data}; {_split_text(res)}. **FP32 reference:** the published "
        f"{fp32.get('arch', p00.get('arch'))} ({fp32['pretrained_top1']:.2f} % test top-1 as "
        f"published), fine-tuned {p00['fp32_epochs']} epoch(s) on {train_on}: "
        f"**{fp32['test_top1']:.2f} %** test top-1"
        + (f", {fp32['val_top1']:.2f} % on validation" if fp32.get("val_top1") else "")
        + f". **QAT:** {recipe}, {p03.get('init', 'lsq').upper()} step init, "
        f"{p03.get('a_bits')}-bit activations, first/last layer per `{p03.get('policy')}`, "
        f"**{_steps_text(p03['qat_epochs'], p03.get('max_steps_per_epoch'))} per run, seeds "
        f"{', '.join(map(str, seeds))}**, lr {lr:g}, step learning rate {step_lr:g} "
        f"({_lr_ratio(step_lr, lr)}); every accuracy below is the test split, read once per "
        f"trained model, unless it says validation.",
    ])


def _readme_headline(res: _Results) -> str:
    head = res.table("tables/headline")
    fp32 = res.json("data/fp32.json")
    pairs = _pairs(res)
    lines = []
    ten = _row(head, "config", "HMQAT 10.34x")
    if ten is not None:
        lines.append(
            f"* **10.34×:** HMQAT 10.34× ({ten['avg bits']:.2f} average weight bits, "
            f"{ten['compression']:.2f}× the whole model, {_weights_only(ten):.1f}× weights only) "
            f"reaches {ten['test top-1']:.2f} ± {ten['± std']:.2f} % = "
            f"**{ten['% of FP32']:.1f} %** "
            f"of FP32 ({fp32['test_top1']:.2f} %), mean ± sd over {int(ten['seeds'])} seeds. The "
            f"paper reports {PAPER_PCT_OF_FP32} % for ResNet18/ImageNet; that is its number, not "
            f"one we reproduced.")
    anchor = _row(head, "config", "HMQAT 13.11x")
    if anchor is not None:
        h = HAWQ_ANCHOR
        lines.append(
            f"* **The HAWQ anchor** (the 13.11× budget's pick): {anchor['avg bits']:.2f} average "
            f"weight bits = **{_weights_only(anchor):.1f}× weights only** (HAWQ's count), "
            f"{anchor['compression']:.2f}× the whole model: {anchor['test top-1']:.2f} ± "
            f"{anchor['± std']:.2f} % = **{anchor['% of FP32']:.1f} %** of FP32. HAWQ (V1, ICCV "
            f"2019) reports {h['top1']} % against its FP32 {h['fp32']} % "
            f"({100 * h['top1'] / h['fp32']:.2f} %) at {h['compression']}× weights only, on the "
            f"original CIFAR-10 after full QAT: not this experiment.")
    for _, row in pairs.iterrows():
        if row["equal_size"]:
            lines.append(f"* **Mixed vs uniform at equal size** (paired by seed): "
                         f"{_pair_sentence(row)}")
    labels = set(res.runs()["label"])
    if "uniform W2A4" in labels and "HMQAT =W2A4 size" not in labels:
        lines.append("* **At uniform W2A4's size notebook 02 made no mixed pick** (with the "
                     "first and last layer at 8 bits and no width below 2, the only config of "
                     "that size is uniform W2 itself), so there is no equal-size pair there.")
    for _, row in pairs.iterrows():
        if not row["equal_size"]:
            lines.append(f"* **A size-for-accuracy trade, not an equal-size pair:** "
                         f"{_pair_sentence(row)}")
    formats = {**reporting.SEEDED_FORMATS, "W-only compression": "{:.1f}×"}
    return "\n".join(lines + ["", _caption(res, "tables/headline") + f" (`{res.shown}/tables/"
                              "headline.md`)", "", _markdown(head, formats)])


def _all_or_none(res: _Results, files: Sequence[str]) -> bool:
    """True when every one of an optional block's ``files`` exists, False when none does; a
    partial set names the first missing file and the notebook that writes it."""
    if not any(res.has(f) for f in files):
        return False
    for f in files:
        if not res.has(f):
            raise res.missing(f)
    return True


def _sentences(res: _Results, name: str) -> list[str]:
    """A verdict file: the list of sentences its notebook wrote (:data:`PRODUCERS`)."""
    verdict = res.json(name)
    if not isinstance(verdict, list):
        raise SummaryError(f"{res._file(name)} is not a list of sentences; rerun notebook "
                           f"{PRODUCERS[name]}")
    return verdict


def _readme_budget_axis(res: _Results) -> str | None:
    if not _all_or_none(res, BUDGET_FILES):
        return None
    axis = res.table("tables/budget_axis")
    acc = res.table("tables/budget_accuracy")
    verdict = _sentences(res, "data/budget_verdict.json")
    cells = acc.assign(cell=[f"{m:.2f} ± {s:.2f}" if pd.notna(s) else f"{m:.2f}"
                             for m, s in zip(acc["test_top1"], acc["std"])])
    wide = cells.pivot_table(index="label", columns="budget", values="cell", aggfunc="first",
                             sort=False)
    wide = wide[list(dict.fromkeys(acc["budget"]))].reset_index()
    return "\n".join([
        "**The budget axis** (notebook 06): " + _caption(res, "tables/budget_axis"), "",
        _markdown(axis, {"diff": "{:+.2f}", "ci_low": "{:+.2f}", "ci_high": "{:+.2f}",
                         "half_width": "{:.2f}", "size gap %": "{:+.2f}", "BOPs ratio": "{:.2f}",
                         "seeds": "{:.0f}", "images": "{:.0f}"}),
        "", "Test top-1 (mean ± sd over seeds) per arm and budget:", "",
        _markdown(wide), "", *[f"* {line}" for line in verdict],
    ])


def _readme_choices(res: _Results) -> str | None:
    """Notebook 03 §5: each recipe choice paired over seeds on validation, and its verdict
    (:func:`hmqat.study.ablation.choice_verdict`, as the notebook printed it)."""
    if not _all_or_none(res, CHOICE_FILES):
        return None
    table = res.table("tables/recipe_choices")
    verdict = res.json("data/recipe_choices.json").get("verdict")
    if not isinstance(verdict, list):
        raise SummaryError(f"{res._file('data/recipe_choices.json')} has no list 'verdict'; "
                           f"rerun notebook 03_qat")
    return "\n".join([
        "**The recipe's choices** (notebook 03 §5): " + _caption(res, "tables/recipe_choices"),
        "", _markdown(table, {"diff": "{:+.2f}", "ci_low": "{:+.2f}", "ci_high": "{:+.2f}",
                              "seeds": "{:.0f}", "images": "{:.0f}"}),
        "", *[f"* {line}" for line in verdict]])


def _method_walk(res: _Results) -> str | None:
    """Notebook 07's table, the scale phases' movement and its verdict (docs/method.md §5.5)."""
    if not _all_or_none(res, WALK_FILES):
        return None
    verdict = _sentences(res, "data/walk_verdict.json")
    return "\n".join([
        "**The frontier walk** (notebook 07): " + _caption(res, "tables/walk_frontier"), "",
        _markdown(res.table("tables/walk_frontier")), "",
        "Scale-only phases: " + _caption(res, "tables/walk_movement"), "",
        _markdown(res.table("tables/walk_movement")), "", *[f"* {line}" for line in verdict],
    ])


#: The models profile's folder, beside the summarised one (``results/models`` next to
#: ``results/quick``), and the files of its block (notebook 08).
MODELS_FOLDER = "models"
MODELS_FILES = ("data/across_models.json", "tables/across_models_paired",
                "tables/across_models_kendall", "tables/across_models_ptq_gain",
                "tables/across_models_step_cost", "tables/across_models_wall_time")


def _readme_models(res: _Results) -> str | None:
    """Notebook 08's tables and verdict from the ``models`` profile's folder beside this one
    (left out until ``make reproduce PROFILE=models`` has run)."""
    other = res.root.parent / MODELS_FOLDER
    if other.resolve() == res.root.resolve() or not other.is_dir():
        return None
    models = _Results(other)
    if not _all_or_none(models, MODELS_FILES):
        return None
    summary = models.json("data/across_models.json")
    fmt = {"diff": "{:+.2f}", "ci_low": "{:+.2f}", "ci_high": "{:+.2f}", "half_width": "{:.2f}",
           "size gap %": "{:+.2f}", "BOPs ratio": "{:.2f}", "seeds": "{:.0f}",
           "images": "{:.0f}"}
    paired = models.table("tables/across_models_paired")
    paired = paired[[c for c in ("model", "a", "b", "seeds", "size gap %", "BOPs ratio", "diff",
                                 "ci_low", "ci_high") if c in paired.columns]]
    return "\n".join([
        f"**Across models** (notebook 08, `{models.shown}`; models: "
        f"{', '.join(summary.get('models', []))}). " + _caption(models,
                                                                "tables/across_models_paired"),
        "", _markdown(paired, fmt), "",
        _caption(models, "tables/across_models_kendall"), "",
        _markdown(models.table("tables/across_models_kendall")), "",
        _caption(models, "tables/across_models_ptq_gain"), "",
        _markdown(models.table("tables/across_models_ptq_gain")), "",
        _caption(models, "tables/across_models_step_cost"), "",
        _markdown(models.table("tables/across_models_step_cost")), "",
        _caption(models, "tables/across_models_wall_time"), "",
        _markdown(models.table("tables/across_models_wall_time")), "",
        *[f"* {line}" for line in summary.get("verdict", [])],
    ])


def _kendall_summary(k: pd.DataFrame) -> tuple[str, str]:
    """(τ list of joint, qerr_only and the 2-bit count; what τ(joint) − τ(qerr_only) says)."""
    k = k.set_index("predictor")
    names = {"omega_joint": "`joint` (trace × error)", "omega_qerr_only": "`qerr_only` (error "
             "alone)", "n_2bit": "the count of 2-bit layers"}
    taus = ", ".join(f"{names[p]} " + _ci(*k.loc[p, ["kendall_tau", "tau_low", "tau_high"]],
                                          fmt="{:.2f}")
                     for p in names if p in k.index)
    if "omega_qerr_only" not in k.index:
        return taus, ""
    q = k.loc["omega_qerr_only"]
    words = interval_words(q["diff_low"], q["diff_high"],
                           above="the Hessian trace improves the ranking over the quantization "
                                 "error alone",
                           below="the Hessian trace makes the ranking worse than the "
                                 "quantization error alone",
                           neither="the Hessian trace adds nothing measurable over the "
                                   "quantization error alone")
    beats = [p.removeprefix("omega_") for p, r in k.iterrows() if pd.notna(r["diff_low"])
             and r["diff_low"] > 0]
    loses = [p.removeprefix("omega_") for p, r in k.iterrows() if pd.notna(r["diff_high"])
             and r["diff_high"] < 0]
    diff = (f"paired τ(joint) − τ(qerr_only) = "
            f"**{_ci(q['ref_minus_tau'], q['diff_low'], q['diff_high'])}**: {words}")
    if beats:
        diff += f"; `joint` ranks better than {', '.join(f'`{b}`' for b in beats)}"
    if loses:
        diff += f"; `joint` ranks worse than {', '.join(f'`{b}`' for b in loses)}"
    return taus, diff + " (paired bootstrap CIs)"


def _readme_sensitivity(res: _Results) -> str:
    p01 = res.params("01_sensitivity")
    k = res.table("tables/sensitivity_kendall_fixed_size")
    taus, diff = _kendall_summary(k)
    lines = [f"* **At fixed size** ({int(k['n_configs'].iloc[0])} configs within ±1 % of "
             f"{p01.get('target_compression')}×, post-training quantization with "
             f"{p01.get('a_bits')}-bit activations and BN re-estimated, loss increase on the "
             f"validation split; notebook 01): Kendall τ of ΣΩ with the loss increase: {taus}; "
             f"{diff}."]
    if res.has("tables/qat_level_kendall"):
        q = res.table("tables/qat_level_kendall").set_index("predictor")
        j = q.loc["omega_joint"]
        parts = [f"`{p.removeprefix('omega_')}` {q.at[p, 'kendall_tau']:.2f}"
                 for p in q.index if p != "omega_joint"]
        apart = [p.removeprefix("omega_") for p, r in q.iterrows() if p != "omega_joint"
                 and pd.notna(r["diff_low"]) and (r["diff_low"] > 0 or r["diff_high"] < 0)]
        lines.append(
            f"* **After QAT** (experiment 7, notebook 04: {int(j['n_configs'])} equal-size "
            f"configs, one training seed each, validation top-1): Kendall τ of ΣΩ (`joint`) "
            f"with "
            f"the QAT error {_ci(j['kendall_tau'], j['tau_low'], j['tau_high'], '{:.2f}')}; "
            f"{', '.join(parts)}; "
            + (f"the paired CI tells `joint` apart from {', '.join(f'`{a}`' for a in apart)}."
               if apart else "no paired CI tells another predictor apart from `joint`."))
    lines.append("* docs/method.md §3.3 has every sensitivity experiment's verdict (one layer at "
                 "a time, matched noise, additivity, the PTQ frontier, calibration sets).")
    return "\n".join(lines)


def _readme_transitions(res: _Results) -> str:
    paired = res.table("tables/transition_experiment")
    choices = res.json("data/transition_experiment.json").get("choices", {})
    return ("**Transition-aware fine-tuning vs plain LSQ** (notebook 04, docs/method.md §7.1; "
            "`ablation.transition_verdict`). "
            + _paragraphs(ablation.transition_verdict(paired, choices)))


def _allocation(res: _Results) -> tuple[pd.DataFrame, str]:
    """(the allocation rows of notebook 04's table, one sentence on joint vs random)."""
    t = res.table("tables/ablation")
    t = t[t["group"] == "allocation"]
    if t.empty:
        raise SummaryError(f"{res._file('tables/ablation')} has no allocation rows; rerun "
                           f"notebook 04_ablations with 'allocation' in ablation_groups")
    runs = res.csv("data/ablation_runs.csv")
    joint, rand, ilp = (_row(t, "variant", v) for v in ("hmqat-joint", "random", "ilp"))
    text = []
    if joint is not None and rand is not None and pd.notna(rand["top1_std"]):
        z = (joint["top1"] - rand["top1"]) / rand["top1_std"]
        text.append(f"the Hessian `joint` pick {joint['top1']:.2f} % vs random allocation "
                    f"{rand['top1']:.2f} ± {rand['top1_std']:.2f} % over {int(rand['n'])} random "
                    f"configs of the same size: {abs(z):.1f} random-row SDs "
                    f"{'above' if z > 0 else 'below'} their mean")
    if joint is not None and ilp is not None:
        cfg = runs.set_index("variant")["bit_config"]
        same = ("hmqat-joint" in cfg and "ilp" in cfg
                and str(cfg["hmqat-joint"]) == str(cfg["ilp"]))
        text.append("HAWQ-V3's ILP picks the same config as the `joint` frontier" if same else
                    f"HAWQ-V3's ILP {ilp['top1']:.2f} %")
    gone = [m for m in ablation.ALLOCATION_METHODS if _row(t, "variant", m) is None]
    if gone:
        text.append(f"left out for missing the budget by more than 1 % (notebook 04 prints each "
                    f"one's size): {', '.join(gone)}")
    return t, "; ".join(text)


def _ablation_setup(res: _Results) -> str:
    p04 = res.params("04_ablations")
    runs = res.csv("data/ablation_runs.csv")
    recipe = ", ".join(sorted(runs["recipe"].astype(str).unique())) if "recipe" in runs else "?"
    step_lr, lr = float(p04.get("step_lr") or p04["qat_lr"]), float(p04["qat_lr"])
    return (f"recipe {recipe}, step learning rate {_lr_ratio(step_lr, lr)}, "
            f"{_steps_text(p04.get('ablation_epochs', 1), p04.get('max_steps_per_epoch'))} per "
            f"run (mean {runs['wall_s'].mean():.0f} s), one training seed per row, scored on the "
            f"validation split; every row within ±1 % of the {p04.get('ablation_compression')}× "
            f"budget ({runs['size_mb'].median():.4f} MB)")


def _readme_allocation(res: _Results) -> str:
    _, sentence = _allocation(res)
    return (f"* **Allocation at equal size** (notebook 04; {_ablation_setup(res)}): {sentence}. "
            f"One training seed per row: a screen, not a paired result (docs/method.md §7).")


def _readme_cost(res: _Results) -> str:
    m = res.json("manifest.json")
    steps = m.get("steps", {})
    if not steps:
        raise SummaryError(f"{res._file('manifest.json')} records no steps; rerun `make "
                           f"reproduce PROFILE={res.profile}`")
    parts, total = [], 0.0
    for name, s in steps.items():
        wall = float(s.get("compute_wall_s", s.get("wall_s", 0.0)))
        total += wall
        extra = f" in {s['attempts']} attempts" if int(s.get("attempts", 1)) > 1 else ""
        parts.append(f"{name.split('_')[0]} {wall / 60:.1f}{extra}")
    cores = f"{m['cpu_count']}-core " if m.get("cpu_count") else ""
    return (f"**What the run cost** (measured by the pipeline, `{res.shown}/manifest.json`, per "
            f"step `compute_wall_s`: all attempts of its last computation; {cores}"
            f"{m.get('device', '?')}): **{total / 60:.1f} min in all** ({', '.join(parts)} min).")


# --------------------------------------------------------------------------------------------
# docs/method.md blocks
# --------------------------------------------------------------------------------------------
def _trace_words(res: _Results) -> str:
    """How notebook 01's traces were computed, from data/traces.csv (exact traces have no
    probes and SE 0)."""
    t = res.csv("data/traces.csv", index_col=0)
    exact = bool((t["probes"] == 0).all() and (t["avg_trace_se"].fillna(-1) == 0).all())
    text = ("**exact** traces (Gauss-Newton, Eq. H6: no probe error, SE 0)" if exact else
            f"probe estimates of the traces (relative SE up to {t['rel_se'].max():.1%})")
    if "data_se" in t and t["data_se"].notna().all():
        rel = t["data_se"] / t["avg_trace"]
        text += (f"; the per-image SE `data_se` is {100 * rel.min():.0f}–{100 * rel.max():.0f} % "
                 f"of T̄ (how far another calibration set would move it)")
    return text


def _method_sensitivity(res: _Results) -> str:
    p01 = res.params("01_sensitivity")
    tables = {n: (res.table(f"tables/sensitivity_{n}"), "") for n in SENSITIVITY_TABLES
              if res.has(f"tables/sensitivity_{n}")}
    if "kendall_fixed_size" not in tables:
        raise res.missing("tables/sensitivity_kendall_fixed_size")
    lines = [
        f"From the {res.profile}-profile run of {_commit(res)} (tables `{res.shown}/tables/"
        f"sensitivity_*`, raw frames `{res.shown}/data/sensitivity/`; notebook 01 prints the same "
        f"verdict with `sensitivity_study.verdict`): `trace_method: {p01.get('trace_method')}` "
        f"on {p01.get('calib_samples')} calibration images from the training split, "
        f"{_trace_words(res)}; {_split_text(res)}; every loss and accuracy on the validation "
        f"split. One model and one calibration set: the CIs are bootstrap intervals over layers "
        f"or configs, not over training seeds.", "",
        sensitivity_study.verdict(tables)]
    if res.has("tables/qat_level_kendall"):
        p04 = res.params("04_ablations")
        steps = int(p04.get("ablation_epochs", 1)) * int(p04.get("max_steps_per_epoch") or 0)
        level = ablation.qat_level_verdict(
            {"kendall": res.table("tables/qat_level_kendall"),
             "runs": res.csv("data/qat_level.csv")},
            steps=steps, split="validation").split("\n")
        lines.append("7. **After QAT** (experiment 7, FIT's protocol; notebook 04, `tables/"
                     "qat_level_kendall`, `figures/qat_level`): " + level[0])
        lines += ["   " + line for line in level[1:]]
    return "\n".join(lines)


def _method_allocation(res: _Results) -> str:
    t, sentence = _allocation(res)
    names = {"hmqat-joint": "Hessian `joint` Ω, exact frontier",
             "hmqat-qerr_only": "`qerr_only` Ω (quantization error alone)",
             "hmqat-fisher": "diagonal empirical Fisher Ω",
             "hmqat-permuted_trace": "`joint` with the traces permuted across layers",
             "hmqat-param_size": "parameter count only (`param_size`)",
             "hmqat-trace_size": "`trace_size` Ω", "hmqat-trace": "`trace` Ω",
             "hmqat-exact_quad": "`exact_quad` Ω", "random": "random allocation",
             "ilp": "HAWQ-V3's ILP", "greedy": "greedy", "uniform": "uniform"}
    rows = pd.DataFrame({
        "allocation": [names.get(v, f"`{v}`") for v in t["variant"]],
        "seeds": t["n"].astype(int),
        "val top-1 (mean ± sd)": [f"{m:.2f} ± {s:.2f}" if pd.notna(s) else f"{m:.2f}"
                                  for m, s in zip(t["top1"], t["top1_std"])]})
    return "\n".join([f"Allocation at equal size ({_ablation_setup(res)}; "
                      f"`{res.shown}/tables/ablation.*`):", "", _markdown(rows), "",
                      sentence[0].upper() + sentence[1:] + "."])


def _method_transitions(res: _Results) -> str:
    info = res.json("data/transition_experiment.json")
    s, choices = info.get("settings", {}), info.get("choices", {})
    paired = res.table("tables/transition_experiment")
    screen = res.table("tables/transition_screen")
    runs = res.csv("data/transition_experiment.csv")
    lines = [
        f"From the {res.profile}-profile run of {_commit(res)} (`ablation.transition_study`; "
        f"data `{res.shown}/data/transition_experiment.csv`, `transition_diagnostics.csv`; tables "
        f"`{res.shown}/tables/transition_screen.*`, `transition_experiment.*`; figure "
        f"`{res.shown}/figures/transition_diagnostics.*`): recipe {s.get('recipe')}, lr "
        f"{s.get('lr')}, wd {s.get('weight_decay')}, batch {s.get('batch_size')}, cosine; "
        f"**{s.get('steps')} optimizer steps per run** (budget A), ladders spend "
        f"{s.get('pre_steps')} of them above the target, scale-only phase "
        f"{s.get('scale_only_steps')} steps; every choice on the validation split, the test "
        f"split read once per final model.", "",
        f"**Screening** (seed {choices.get('screen_seed')}, {choices.get('screen_point')}, "
        f"validation top-1, one seed: a ranking, not evidence):", "",
        _markdown(screen[["arm", "steps_at_target", "step_lr", "val_top1"]].rename(columns={
            "steps_at_target": "steps at target", "step_lr": "step lr", "val_top1": "val top-1"}),
            {"step lr": "{:g}", "val top-1": "{:.2f}"}), ""]

    def ci(r: pd.Series, prefix: str) -> str:
        if pd.isna(r[prefix + "diff"]):
            return "–"
        return _ci(r[prefix + "diff"], r[prefix + "ci_low"], r[prefix + "ci_high"])

    a = paired[(paired["budget"] == "A")]
    lines += [f"**Decision on {int(a['seeds'].max())} paired seeds, budget A** (equal total "
              f"steps; test top-1; difference to plain LSQ with a 95 % paired-t CI):", "",
              _markdown(pd.DataFrame({
                  "point": a["point"], "arm": [f"`{x}`" for x in a["arm"]], "role": a["role"],
                  "steps at target": a["steps_at_target"].astype(int),
                  "test top-1 (mean ± sd)": [f"{m:.2f} ± {sd:.2f}" for m, sd in
                                             zip(a["test_mean"], a["test_std"])],
                  "diff to plain LSQ": [ci(r, "test_") for _, r in a.iterrows()]})), ""]
    b = paired[(paired["budget"] == "B")
               & ((paired["role"] == "control") | paired["ctrl_test_diff"].notna())]
    if not b.empty:
        lines += ["**Budget B** (equal steps *at the target width*; plain LSQ given the arm's "
                  "total steps is the control, so that more training is not mistaken for a "
                  "better schedule):", "",
                  _markdown(pd.DataFrame({
                      "point": b["point"], "arm": [f"`{x}`" for x in b["arm"]],
                      "total / at target": [f"{int(t)} / {int(g)}" for t, g in
                                            zip(b["total_steps"], b["steps_at_target"])],
                      "test top-1": [f"{m:.2f} ± {sd:.2f}" for m, sd in
                                     zip(b["test_mean"], b["test_std"])],
                      "diff to plain LSQ": [ci(r, "test_") for _, r in b.iterrows()],
                      "diff to the control": [ci(r, "ctrl_test_") for _, r in b.iterrows()]})),
                  ""]
    lines += ["**Verdict** (`ablation.transition_verdict`, as notebook 04 prints it): "
              + _paragraphs(ablation.transition_verdict(paired, choices)), ""]
    ref = paired[paired["role"] == "reference"].drop_duplicates("point")
    gaps = [f"{r['point']} {r['val_mean']:.2f} vs {r['test_mean']:.2f}" for _, r in ref.iterrows()]
    extra = [f"* Validation vs test top-1 of plain LSQ: {'; '.join(gaps)} (only differences on "
             f"validation are used)."]
    if res.has("data/transition_diagnostics.csv"):
        d = res.csv("data/transition_diagnostics.csv")
        bn = d[(d["kind"] == "bn") & (d["when"] == "end")]["mean_shift"].dropna()
        if len(bn):
            extra.append(f"* BN re-estimation at the end moved the running means by a median "
                         f"{bn.median():.3f} σ (max {bn.max():.3f}) over the BN layers of the "
                         f"`+bn` runs.")
    extra.append(f"* Wall time: {paired['wall_s_mean'].min():.0f}–"
                 f"{paired['wall_s_mean'].max():.0f} s per run (`wall_s_mean`, the mean per point, "
                 f"budget and arm; train + eval, runs sharing the {s.get('device', '?')}); the "
                 f"experiment took {info['wall_s_this_call'] / 60:.1f} min "
                 f"({runs['run_id'].nunique()} trained runs, {info['run_wall_s_sum'] / 3600:.2f} h "
                 f"of run time).")
    return "\n".join(lines + extra)


def _method_anchor(res: _Results) -> str:
    head = res.table("tables/headline")
    rows = head[head["config"].astype(str) != "FP32 (fine-tuned)"]
    table = pd.DataFrame({
        "point": rows["config"], "size MB": rows["size MB"],
        "compression": rows["compression"],
        "weights-only": [_weights_only(r) for _, r in rows.iterrows()],
        "BOPs (G)": rows["BOPs (G)"],
        "test top-1": [f"{m:.2f} ± {s:.2f}" for m, s in zip(rows["test top-1"], rows["± std"])]})
    p03 = res.params("03_qat")
    lines = [f"What the accounting says ({res.profile}-profile run of {_commit(res)}, "
             f"`{res.shown}/tables/headline.*`; W·A{p03.get('a_bits')}, first/last layer per "
             f"`{p03.get('policy')}`, BOPs at the model's input size; test top-1 mean ± sd over "
             f"seeds, {_steps_text(p03['qat_epochs'], p03.get('max_steps_per_epoch'))} of QAT):",
             "", _markdown(table, {"size MB": "{:.5f}", "compression": "{:.2f}×",
                                   "weights-only": "{:.2f}×", "BOPs (G)": "{:.3f}"}), ""]
    for _, row in _pairs(res).iterrows():
        if row["equal_size"]:
            lines.append(f"* The equal-size pair: {_pair_sentence(row)}")
        else:
            smaller = 100 * (1 - 1 / (1 + row["size gap %"] / 100))
            lines.append(f"* {row['b']} is {abs(smaller):.1f} % "
                         f"{'smaller' if smaller > 0 else 'larger'} than {row['a']}, so this is "
                         f"a size-for-accuracy trade, not an equal-size comparison: "
                         f"{_pair_sentence(row)}")
    return "\n".join(lines)


#: Every block: its name and the function that writes it (None: an optional block left out).
_BLOCKS = {
    "readme-run": _readme_run,
    "readme-headline": _readme_headline,
    "readme-choices": _readme_choices,
    "readme-budget-axis": _readme_budget_axis,
    "readme-sensitivity": _readme_sensitivity,
    "readme-transitions": _readme_transitions,
    "readme-allocation": _readme_allocation,
    "readme-models": _readme_models,
    "readme-cost": _readme_cost,
    "method-sensitivity": _method_sensitivity,
    "method-allocation": _method_allocation,
    "method-transitions": _method_transitions,
    "method-anchor": _method_anchor,
    "method-walk": _method_walk,
}


#: The notebook whose results a block reports, where the run may not have reached it yet
#: (``--only``, or a run resumed across sessions): until that step has finished in the run the
#: manifest records, the block says so instead of reading its files.
BLOCK_STEPS = {"readme-transitions": "04_ablations", "readme-allocation": "04_ablations",
               "method-allocation": "04_ablations", "method-transitions": "04_ablations",
               "readme-budget-axis": "06_budget", "method-walk": "07_frontier_walk"}


def _pending(res: _Results, step: str) -> str:
    """The text of a block whose notebook has not finished in this run."""
    status = res.json("manifest.json").get("steps", {}).get(step, {}).get("status")
    why = {"stale": "has not rerun since a step it reads reran",
           "failed": "failed"}.get(str(status), "has not run yet")
    return (f"*Notebook {step} {why} in the run of `{res.shown}` named above, so "
            f"nothing is reported here from it (no earlier run's numbers are mixed in). It "
            f"runs with `python -m hmqat.study.pipeline --profile {res.profile} --only {step}`; "
            f"then `python -m hmqat.study.summary --results {res.shown} --write`.*")


def render_blocks(results_dir: str | Path) -> dict[str, str]:
    """``{block name: markdown}`` for every block whose files exist in ``results_dir``
    (optional blocks, :data:`OPTIONAL_BLOCKS`, are left out while their files are absent; a
    block of :data:`BLOCK_STEPS` whose notebook has not finished in the manifest's run says
    so; a missing required file raises :class:`SummaryError` naming it and the command that
    writes it)."""
    res = _Results(results_dir)
    out = {}
    for name, make in _BLOCKS.items():
        step = BLOCK_STEPS.get(name)
        if step is None or reporting.step_finished(res.json("manifest.json"), step):
            text = make(res)
        elif name in OPTIONAL_BLOCKS and step not in res.json("manifest.json").get("steps", {}):
            text = None       # a step this profile never ran: no block at all
        else:
            text = _pending(res, step)
        if text is not None:
            out[name] = text.strip("\n")
    return out


# --------------------------------------------------------------------------------------------
# Documents
# --------------------------------------------------------------------------------------------
def apply_blocks(text: str, blocks: Mapping[str, str], *, source: str = "document") -> str:
    """``text`` with the body of every ``<!-- results:NAME -->`` … ``<!-- /results:NAME -->``
    pair replaced by ``blocks[NAME]`` (nothing for an absent optional block). Unpaired,
    nested or unknown markers raise :class:`SummaryError` naming ``source`` and the line."""
    out, pos, open_at = [], 0, None
    for m in _MARK.finditer(text):
        closing, name = m.group(1) == "/", m.group(2)
        line = text.count("\n", 0, m.start()) + 1
        if name not in _BLOCKS:
            raise SummaryError(f"{source}:{line}: unknown results block {name!r}; the generated "
                               f"blocks are {sorted(_BLOCKS)}")
        if not closing:
            if open_at is not None:
                raise SummaryError(f"{source}:{line}: <!-- results:{name} --> opens inside "
                                   f"results:{open_at[0]} (line {open_at[1]}); close that one "
                                   f"first with <!-- /results:{open_at[0]} -->")
            out.append(text[pos:m.end()])
            open_at, pos = (name, line), m.end()
            continue
        if open_at is None or open_at[0] != name:
            raise SummaryError(f"{source}:{line}: <!-- /results:{name} --> closes a block that "
                               f"is not open" + (f" (results:{open_at[0]} is, from line "
                                                 f"{open_at[1]})" if open_at else ""))
        body = blocks.get(name)
        if body is None and name not in OPTIONAL_BLOCKS:
            raise SummaryError(f"{source}:{line}: no text for results:{name}; pass every block "
                               f"of render_blocks()")
        out.append("\n" + (body + "\n" if body else ""))
        open_at, pos = None, m.start()
    if open_at is not None:
        raise SummaryError(f"{source}:{open_at[1]}: <!-- results:{open_at[0]} --> is never "
                           f"closed; add <!-- /results:{open_at[0]} --> after its text")
    out.append(text[pos:])
    return "".join(out)


def stale_docs(results_dir: str | Path, docs: Sequence[str | Path] | None = None
               ) -> dict[Path, tuple[str, str]]:
    """``{document: (committed text, text with the blocks rendered from results_dir)}`` for every
    document whose blocks differ. Every rendered block must have markers in some document."""
    blocks = render_blocks(results_dir)
    paths = [Path(d) for d in docs] if docs is not None else [ROOT / d for d in DOCS]
    seen: set[str] = set()
    out = {}
    for path in paths:
        if not path.is_file():
            raise SummaryError(f"document {path} does not exist; pass --docs with the README "
                               f"and docs/method.md that hold the results markers")
        old = path.read_text(encoding="utf-8")
        seen |= {m.group(2) for m in _MARK.finditer(old)}
        new = apply_blocks(old, blocks, source=str(path))
        if new != old:
            out[path] = (old, new)
    unplaced = sorted(set(blocks) - seen)
    if unplaced:
        raise SummaryError(f"block(s) {unplaced} have no markers in {[str(p) for p in paths]}; "
                           f"add <!-- results:NAME --> and <!-- /results:NAME --> where each "
                           f"belongs")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m hmqat.study.summary --results results/quick [--write]``: exit 0 when every
    block is current (or was just written), 1 with a diff when one is stale, 2 on an error."""
    ap = argparse.ArgumentParser(prog="python -m hmqat.study.summary",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--results", type=Path, default=ROOT / "results" / "quick",
                    help="the results folder (default: results/quick)")
    ap.add_argument("--write", action="store_true", help="rewrite the stale blocks")
    ap.add_argument("--docs", nargs="+", type=Path, default=None,
                    help=f"documents holding the markers (default: {' '.join(DOCS)})")
    args = ap.parse_args(argv)
    try:
        stale = stale_docs(args.results, args.docs)
    except SummaryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path, (old, new) in stale.items():
        if args.write:
            atomic_write_text(path, new)
            print(f"rewrote the results blocks of {path}")
        else:
            sys.stdout.writelines(difflib.unified_diff(
                old.splitlines(keepends=True), new.splitlines(keepends=True),
                fromfile=f"{path} (committed)", tofile=f"{path} (from {args.results})"))
    if stale and not args.write:
        print(f"\n{len(stale)} document(s) out of date with {args.results}: run `python -m "
              f"hmqat.study.summary --results {_shown_path(args.results)} --write`",
              file=sys.stderr)
        return 1
    if not stale:
        print(f"every results block is current with {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
