"""The lessons' helpers: checks of the notebooks' exercises, upstream steps a notebook opened on
its own needs, and the measured lab run times in the notebooks' headers.

**Exercises** follow MIT 6.5940's labs: a fill-in cell marked ``# YOUR CODE HERE`` is followed by
a ``lessons.check_<NN>_<what>(...)`` call (``NN``: the notebook's number; one section of this
module per notebook) that asserts the answer and prints what it found. One convention for every
notebook:

* an **unfilled** exercise is a value left as ``...`` (Ellipsis) or a function whose body still
  says ``raise NotImplementedError``; its check prints ``○ exercise 00.1 not attempted yet: …``
  and returns False **without raising**, so a papermill run of the untouched lab notebook (and of
  ``make reproduce``) succeeds;
* a **wrong** answer raises :class:`ExerciseError` (an ``AssertionError``) whose message names
  what was expected, what was found and where to look;
* a **right** answer prints ``✓ exercise 00.1: …`` and the check returns True.

A check function is written with :func:`exercise` (the decorator that applies the convention),
:func:`answer` / :func:`attempt` (which turn the placeholder into "not attempted") and
:func:`check` / :func:`check_close` (which raise the helpful message)::

    @exercise("00.1", hint="torch.bincount over the labels of the correct predictions")
    def check_00_per_class_top1(fn, model, loader):
        got = attempt(fn, model, loader)            # NotImplementedError -> not attempted
        check(len(got) == 10, f"expected one value per class, got {len(got)}")
        return "per-class top-1 matches"            # printed after the tick

**Upstream steps.** :func:`ensure_upstream` lets any notebook run on its own at the lab profile:
when an artifact of an earlier notebook is missing from ``results/lab/``, it runs the missing
steps through the pipeline (``params/lab.yaml``) and says so first.

**Run times.** :func:`write_lab_times` copies the per-notebook wall times of a lab run
(``results/lab/manifest.json``, written by the pipeline) into ``notebooks/lab_times.json`` and
rewrites the run-time line of every notebook's header between ``<!-- lab-time -->`` and
``<!-- /lab-time -->`` (in the ``.py`` and its paired ``.ipynb``)::

    python -m hmqat.study.pipeline --profile lab
    python -m hmqat.study.lessons --write-times results/lab/manifest.json
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats as st

from .. import models, quant, search
from ..runtime import atomic_write_json, atomic_write_text
from ..transitions import distillation_loss
from .params import NOTEBOOKS, UPSTREAM
from .pipeline import KEY_OUTPUTS, PipelineError, run_pipeline

__all__ = ["ExerciseError", "LessonError", "answer", "attempt", "check", "check_close",
           "ensure_upstream", "exercise", "lab_budget_verdict", "lab_time_text", "write_lab_times",
           "main",
           "check_00_per_class_top1", "check_00_percent_of_fp32", "check_01_trace_vs_omega",
           "check_01_sum_omega", "check_02_hawq_bits", "check_02_bops_pick"]

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS_DIR = ROOT / "notebooks"
LAB_TIMES = NOTEBOOKS_DIR / "lab_times.json"
LAB_PROFILE = "lab"


class ExerciseError(AssertionError):
    """A student's answer to an exercise is wrong; the message says what was expected, what was
    found, and where to look."""


class LessonError(RuntimeError):
    """A lesson cannot run as asked (a missing upstream step that cannot be computed here, a
    manifest without the lab run's times); the message names the command that fixes it."""


class NotAttempted(Exception):
    """Internal: the answer is still the placeholder (``...`` or ``raise NotImplementedError``);
    :func:`exercise` turns it into a "not attempted yet" line."""


# --------------------------------------------------------------------------------------------
# The checking core (every notebook's checks use these)
# --------------------------------------------------------------------------------------------
def answer(value: Any, what: str = "the answer") -> Any:
    """``value`` unchanged, or :class:`NotAttempted` when it is still the placeholder ``...``."""
    if value is Ellipsis:
        raise NotAttempted(f"{what} is still `...`")
    return value


def attempt(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, or :class:`NotAttempted` when ``fn`` is the placeholder ``...``
    or its body still raises ``NotImplementedError``."""
    if fn is Ellipsis:
        raise NotAttempted("the function is still `...`")
    if not callable(fn):
        raise ExerciseError(f"expected a function, got {type(fn).__name__} {fn!r}")
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        name = getattr(fn, "__name__", "the function")
        raise NotAttempted(f"{name}() still raises NotImplementedError") from None


def check(cond: Any, message: str) -> None:
    """Raise :class:`ExerciseError` with ``message`` unless ``cond`` holds."""
    if not cond:
        raise ExerciseError(message)


def _number(value: Any, what: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ExerciseError(f"{what} should be a number, got {type(value).__name__} "
                            f"{value!r}") from None
    if not math.isfinite(x):
        raise ExerciseError(f"{what} is {x}, not a finite number")
    return x


def check_close(got: Any, expected: Any, what: str, *, rtol: float = 1e-4, atol: float = 0.0,
                hint: str = "") -> None:
    """Raise :class:`ExerciseError` unless every element of ``got`` is within ``atol + rtol·|e|``
    of ``expected`` (numbers, sequences or tensors of the same shape); the message shows both
    values, the worst element and ``hint``."""
    def arr(v: Any) -> np.ndarray:
        if hasattr(v, "detach"):
            v = v.detach().cpu().numpy()
        return np.asarray(v, dtype=float)

    try:
        g, e = arr(got), arr(expected)
    except (TypeError, ValueError):
        raise ExerciseError(f"{what} should be numbers, got {type(got).__name__} "
                            f"{got!r}") from None
    check(g.shape == e.shape, f"{what} has shape {tuple(g.shape)}, expected {tuple(e.shape)}"
          + (f". {hint}" if hint else ""))
    check(bool(np.isfinite(g).all()), f"{what} contains NaN or inf" + (f". {hint}" if hint else ""))
    err = np.abs(g - e) - (atol + rtol * np.abs(e))
    if (err > 0).any():
        i = np.unravel_index(int(np.argmax(err)), err.shape) if err.ndim else ()
        at = f" at index {tuple(int(k) for k in i)}" if err.ndim else ""
        raise ExerciseError(f"{what} = {float(g[i]):.6g}{at}, expected {float(e[i]):.6g} "
                            f"(tolerance {atol + rtol * abs(float(e[i])):.2g})"
                            + (f". {hint}" if hint else ""))


def exercise(label: str, hint: str = "") -> Callable[[Callable[..., str]], Callable[..., bool]]:
    """Decorator of a check function that returns its success text: the wrapped check prints
    ``✓ exercise <label>: <text>`` and returns True; when the answer is still the placeholder
    it prints ``○ exercise <label> not attempted yet: … (hint)`` and returns False; a wrong
    answer raises :class:`ExerciseError` prefixed with ``✗ exercise <label>:``."""
    def wrap(fn: Callable[..., str]) -> Callable[..., bool]:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> bool:
            try:
                text = fn(*args, **kwargs)
            except NotAttempted as exc:
                print(f"○ exercise {label} not attempted yet: {exc}. Fill in the cell marked "
                      f"`# YOUR CODE HERE` and rerun it and this check"
                      + (f" (hint: {hint})" if hint else "") + ".", flush=True)
                return False
            except ExerciseError as exc:
                raise ExerciseError(f"✗ exercise {label}: {exc}") from None
            print(f"✓ exercise {label}: {text}", flush=True)
            return True
        run.label = label  # type: ignore[attr-defined]
        return run
    return wrap


# --------------------------------------------------------------------------------------------
# Upstream steps: any notebook runs on its own at the lab profile
# --------------------------------------------------------------------------------------------
# with a validation split, notebook 01 also writes the fixed-size frame 04 reads
ARTIFACTS_WITH_VAL: dict[str, tuple[str, ...]] = {
    "01_sensitivity": ("data/sensitivity/fixed_size.csv",),
}


def pipeline_command(steps: Sequence[str], profile: str = LAB_PROFILE) -> str:
    """The command line that runs ``steps`` of ``profile`` (from the repository root)."""
    return f"python -m hmqat.study.pipeline --profile {profile} --only {' '.join(steps)}"


def missing_artifacts(study: Any, step: str) -> list[Path]:
    """The files ``step`` writes that are not in ``study.root`` (empty: the step is done)."""
    names = KEY_OUTPUTS[step] + (ARTIFACTS_WITH_VAL.get(step, ()) if study.val_size > 0 else ())
    paths = [study.root / n.format(arch=study.arch) for n in names]
    return [p for p in paths if not p.exists()]


def _lab_minutes(steps: Sequence[str]) -> str:
    """" (about N min, measured)" from notebooks/lab_times.json, or ""."""
    try:
        times = json.loads(LAB_TIMES.read_text(encoding="utf-8"))["notebooks"]
        return f" (about {sum(float(times[s]) for s in steps):.0f} min in the measured lab run)"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def ensure_upstream(study: Any, notebook: str, *, skip: Sequence[str] = (),
                    run: Callable[..., Any] | None = None) -> list[str]:
    """Make sure the results ``notebook`` reads exist; return the steps that were run.

    When an upstream step's artifacts are missing from ``study.root`` (e.g. notebook 02 opened
    first), the steps from the first missing one up to ``notebook`` (exclusive) are run through
    the pipeline at the lab profile, after a line saying which and why. ``skip``: upstream steps
    this run does not need (e.g. 00 when notebook 01 analyses a given checkpoint). Outside the
    lab profile (``make reproduce`` runs the chain in order) or when ``results_dir`` is not
    ``…/lab``, nothing is run: :class:`LessonError` names the command to run instead.
    ``run`` replaces :func:`hmqat.study.pipeline.run_pipeline` (tests)."""
    if notebook not in UPSTREAM:
        raise LessonError(f"unknown notebook {notebook!r}; known notebooks: {list(NOTEBOOKS)}")
    needed = [s for s in UPSTREAM[notebook] if s not in skip]
    first = next((i for i, s in enumerate(needed) if missing_artifacts(study, s)), None)
    if first is None:
        return []
    todo = needed[first:]
    missing = [p.relative_to(study.root).as_posix() for s in todo
               for p in missing_artifacts(study, s)]
    cmd = pipeline_command(todo, study.profile)
    if study.profile != LAB_PROFILE or study.root.name != LAB_PROFILE:
        raise LessonError(
            f"{notebook} reads results of {', '.join(todo)}, which are missing from "
            f"{study.root} ({', '.join(missing)}). Run them first, from the repository root: "
            f"{cmd}")
    print(f"[lessons] {notebook} reads results of {', '.join(todo)}, which are not in "
          f"{study.root} yet (missing: {', '.join(missing)}). Running them now at the lab "
          f"profile{_lab_minutes(todo)}, as `{cmd}` would; their executed copies go to "
          f"{study.root / 'executed'}.", flush=True)
    try:
        (run or run_pipeline)(LAB_PROFILE, only=todo, results_root=study.root.resolve().parent)
    except PipelineError as exc:
        raise LessonError(f"could not compute {', '.join(todo)} for {notebook}: {exc}\n"
                          f"Run them yourself from the repository root: {cmd}") from None
    still = [p for s in todo for p in missing_artifacts(study, s)]
    if still:
        raise LessonError(f"{', '.join(todo)} ran but did not write {[str(p) for p in still]}; "
                          f"see their executed copies in {study.root / 'executed'}")
    print(f"[lessons] done: {', '.join(todo)} ran; continuing with {notebook}.", flush=True)
    return todo


# --------------------------------------------------------------------------------------------
# Measured run times in the headers
# --------------------------------------------------------------------------------------------
TIME_OPEN, TIME_CLOSE = "<!-- lab-time -->", "<!-- /lab-time -->"
#: The course's core chain, one lesson per concept of the method (FP32 → traces → allocation →
#: QAT → ablations → report); 06–08 are the study's further questions. The lab budget: each
#: notebook <= 10 min, the core chain <= 30 min on a 2-core CPU (params/lab.yaml).
CORE = NOTEBOOKS[:6]
LAB_GOAL_NOTEBOOK_MIN, LAB_GOAL_CORE_MIN = 10.0, 30.0
TIME_RE = re.compile(re.escape(TIME_OPEN) + r"(.*?)" + re.escape(TIME_CLOSE))
NOT_MEASURED = ("not yet measured (after a lab run, `python -m hmqat.study.lessons "
                "--write-times results/lab/manifest.json` writes it here)")


def lab_time_text(name: str, times: Mapping[str, Any] | None) -> str:
    """The header's run-time text for notebook ``name``: from ``notebooks/lab_times.json``'s
    content ``times``, or :data:`NOT_MEASURED` when there is none."""
    if times is None:
        return NOT_MEASURED
    minutes = float(times["notebooks"][name])
    core = (f" ({CORE[0][:2]}–{CORE[-1][:2]}: {float(times['core_min']):.1f} min)"
            if "core_min" in times else "")
    return (f"{minutes:.1f} min, measured by the pipeline in the lab run of "
            f"{times['date']} ({times['cpu_count']} CPU cores, git {times['git_sha'][:7]}); the "
            f"chain of {len(times['notebooks'])} notebooks took {float(times['chain_min']):.1f} min"
            f"{core}")


def lab_budget_verdict(times: Mapping[str, Any]) -> list[str]:
    """The lab budget's two goals against a measured run (``notebooks/lab_times.json``'s
    content): each notebook <= :data:`LAB_GOAL_NOTEBOOK_MIN`, the core chain <=
    :data:`LAB_GOAL_CORE_MIN`; one line each, saying met or missed with the numbers."""
    over = {n: float(m) for n, m in times["notebooks"].items() if float(m) > LAB_GOAL_NOTEBOOK_MIN}
    core = float(times["core_min"])
    return [
        (f"each notebook <= {LAB_GOAL_NOTEBOOK_MIN:.0f} min: "
         + ("met" if not over else "MISSED by " + ", ".join(f"{n} ({m:.1f} min)"
                                                            for n, m in over.items()))),
        (f"core chain {CORE[0][:2]}–{CORE[-1][:2]} <= {LAB_GOAL_CORE_MIN:.0f} min: "
         + ("met" if core <= LAB_GOAL_CORE_MIN else "MISSED") + f" ({core:.1f} min; all "
         f"{len(times['notebooks'])} notebooks {float(times['chain_min']):.1f} min)")]


def read_lab_times(path: Path = LAB_TIMES) -> dict[str, Any] | None:
    """``notebooks/lab_times.json`` (None when absent: no lab run has been measured)."""
    if not path.exists():
        return None
    try:
        times = json.loads(path.read_text(encoding="utf-8"))
        missing = [n for n in NOTEBOOKS if n not in times["notebooks"]]
        if missing:
            raise LessonError(f"{path} has no time for {missing}; rewrite it with "
                              "`python -m hmqat.study.lessons --write-times "
                              "results/lab/manifest.json`")
        return times
    except (ValueError, KeyError, TypeError) as exc:
        raise LessonError(f"{path} is not a lab-times file ({exc}); delete it or rewrite it "
                          "with `python -m hmqat.study.lessons --write-times "
                          "results/lab/manifest.json`") from None


def header_times(text: str, where: str) -> list[str]:
    """The texts between the lab-time markers of a notebook's source (exactly one expected)."""
    found = TIME_RE.findall(text)
    if len(found) != 1:
        raise LessonError(f"{where} has {len(found)} `{TIME_OPEN}…{TIME_CLOSE}` markers; its "
                          "header's run-time line needs exactly one")
    return found


def set_header_time(path: Path, text: str) -> bool:
    """Put ``text`` between the lab-time markers of ``path`` (a ``.py`` or ``.ipynb``); True when
    the file changed. The ``.ipynb`` is edited as JSON so its cells stay output-free."""
    src = path.read_text(encoding="utf-8")
    header_times(src, str(path))
    if path.suffix == ".ipynb":
        nb = json.loads(src)
        for cell in nb["cells"]:
            lines = cell["source"] if isinstance(cell["source"], list) else [cell["source"]]
            new = [TIME_RE.sub(lambda _: TIME_OPEN + text + TIME_CLOSE, ln) for ln in lines]
            cell["source"] = new if isinstance(cell["source"], list) else new[0]
        out = json.dumps(nb, indent=1, ensure_ascii=False) + "\n"
    else:
        out = TIME_RE.sub(lambda _: TIME_OPEN + text + TIME_CLOSE, src)
    if out == src:
        return False
    atomic_write_text(path, out)
    return True


def write_lab_times(manifest_path: str | Path, *, notebooks_dir: Path = NOTEBOOKS_DIR,
                    out: Path | None = None) -> dict[str, Any]:
    """Copy a lab run's per-notebook wall times (``results/lab/manifest.json``) into
    ``notebooks_dir/lab_times.json`` and rewrite the run-time line of every notebook'
    headers (``.py`` and ``.ipynb``); return the written times.

    Each notebook's minutes are the manifest's ``compute_wall_s`` (this run plus interrupted
    earlier attempts); the chain total is their sum. The manifest must be the lab profile's
    and hold every notebook, else :class:`LessonError` says what is missing."""
    manifest_path = Path(manifest_path)
    if not manifest_path.exists():
        raise LessonError(f"{manifest_path} not found: run the lab chain first "
                          "(python -m hmqat.study.pipeline --profile lab)")
    data = json.loads(manifest_path.read_text(encoding="utf-8"))
    steps = data.get("steps", {})
    missing = [n for n in NOTEBOOKS if "compute_wall_s" not in steps.get(n, {})]
    if missing:
        raise LessonError(f"{manifest_path} has no measured time for {missing}: run them "
                          f"({pipeline_command(missing)}) and write the times again")
    profiles = {steps[n].get("parameters", {}).get("profile") for n in NOTEBOOKS} - {None}
    if profiles - {LAB_PROFILE}:
        raise LessonError(f"{manifest_path} is a {sorted(profiles)} run, not the lab profile's; "
                          "the headers quote the lab defaults' times (results/lab/manifest.json)")
    minutes = {n: round(float(steps[n]["compute_wall_s"]) / 60, 1) for n in NOTEBOOKS}
    last = max(NOTEBOOKS, key=lambda n: str(steps[n].get("finished_utc", "")))
    times = {
        "source": "results/lab/manifest.json (compute_wall_s of each step, kernel start "
                  "included)",
        "date": str(steps[last].get("finished_utc", data.get("time_utc", "")))[:10],
        "git_sha": str(steps[last].get("git_sha", data.get("git_sha", ""))),
        "cpu_count": data.get("cpu_count"),
        "notebooks": minutes,
        "chain_min": round(sum(float(steps[n]["compute_wall_s"]) for n in NOTEBOOKS) / 60, 1),
        "core_min": round(sum(float(steps[n]["compute_wall_s"]) for n in CORE) / 60, 1),
    }
    atomic_write_json(out or notebooks_dir / "lab_times.json", times)
    for name in NOTEBOOKS:
        for suffix in (".py", ".ipynb"):
            set_header_time(notebooks_dir / f"{name}{suffix}", lab_time_text(name, times))
    return times


# --------------------------------------------------------------------------------------------
# --- 00 --- notebook 00_fp32_baseline
# --------------------------------------------------------------------------------------------

def _per_class_reference(model: Any, loader: Any, n_classes: int) -> torch.Tensor:
    """Top-1 (%) per class, counted here (the reference of exercise 00.1)."""
    hit, n = torch.zeros(n_classes, dtype=torch.float64), torch.zeros(n_classes, dtype=torch.float64)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x, y in loader:
                pred = model(x).argmax(1)
                y = y.cpu()
                n += torch.bincount(y, minlength=n_classes)
                hit += torch.bincount(y[pred.cpu() == y], minlength=n_classes)
    finally:
        model.train(was)
    return 100.0 * hit / n.clamp_min(1)


@exercise("00.1", hint="torch.bincount(y, minlength=n_classes) over all labels and over the "
                       "labels of the correct predictions, y[pred == y]; divide, times 100")
def check_00_per_class_top1(per_class_top1: Any, model: Any, loader: Any,
                            classes: Sequence[str]) -> str:
    """Exercise 00.1: ``per_class_top1(model, loader, n_classes)`` returns each class's top-1 in
    percent, as counted here on the same loader."""
    got = attempt(per_class_top1, model, loader, len(classes))
    ref = _per_class_reference(model, loader, len(classes))
    try:
        values = [float(v) for v in (got.tolist() if hasattr(got, "tolist") else list(got))]
    except (TypeError, ValueError):
        raise ExerciseError(f"per_class_top1 returned {type(got).__name__} {got!r}; return one "
                            f"number per class ({len(classes)} values, e.g. a tensor)") from None
    check(len(values) == len(classes), f"per_class_top1 returned {len(values)} values; expected "
          f"one per class ({len(classes)}: {', '.join(classes)})")
    if max(values) <= 1.0 < float(ref.max()):
        raise ExerciseError("the values are all <= 1: fractions, not percent; multiply by 100")
    check_close(values, ref, "top-1 of a class", atol=1e-3,
                hint="divide the correct predictions of each class by that class's images (not "
                     "by all images), and keep the classes in label order 0..C-1")
    worst, best = int(ref.argmin()), int(ref.argmax())
    return (f"per-class top-1 matches; hardest class {classes[worst]!r} {float(ref[worst]):.1f} "
            f"%, easiest {classes[best]!r} {float(ref[best]):.1f} %")


@exercise("00.3", hint="% of FP32 = 100 * quantized_top1 / reference_top1")
def check_00_percent_of_fp32(pct_of_published: Any, pct_of_finetuned: Any,
                             quantized_top1: float, *, published_top1: float,
                             finetuned_top1: float) -> str:
    """Exercise 00.3: "% of FP32 top-1" of ``quantized_top1`` against the published weights and
    against the fine-tuned reference."""
    pub = _number(answer(pct_of_published, "pct_of_published"), "pct_of_published")
    fin = _number(answer(pct_of_finetuned, "pct_of_finetuned"), "pct_of_finetuned")
    want_pub = 100.0 * quantized_top1 / published_top1
    want_fin = 100.0 * quantized_top1 / finetuned_top1
    if not math.isclose(pub, want_pub, rel_tol=1e-4) and math.isclose(pub, want_fin, rel_tol=1e-4):
        raise ExerciseError("pct_of_published equals the ratio to the fine-tuned model; divide "
                            f"by the published weights' top-1 ({published_top1:.2f} %) instead")
    for got, want, name in ((pub, want_pub, "pct_of_published"), (fin, want_fin, "pct_of_finetuned")):
        if math.isclose(got, want / 100.0, rel_tol=1e-4):
            raise ExerciseError(f"{name} = {got:.4f} is a fraction; the exercise asks for percent "
                                "(times 100)")
        check_close(got, want, name, rtol=1e-4,
                    hint="100 * quantized_top1 / the reference's top-1 on the same test split")
    if want_pub > 100:
        verdict = ("above 100 %: that reference credits quantization with the accuracy that "
                   "fine-tuning on the data in use alone buys")
    elif want_pub > want_fin:
        verdict = f"{want_pub - want_fin:.1f} points more flattering than the fair ratio"
    else:
        verdict = "lower than the fair ratio here: the published weights score higher on this data"
    return (f"{want_pub:.1f} % of the published weights ({verdict}); {want_fin:.1f} % of the "
            "fine-tuned reference, the fair ratio")



# --------------------------------------------------------------------------------------------
# --- 01 --- notebook 01_sensitivity
# --------------------------------------------------------------------------------------------

def _layer_name(value: Any, what: str, layers: Sequence[str]) -> str:
    name = answer(value, what)
    check(isinstance(name, str), f"{what} should be a layer name (a string such as "
          f"{layers[0]!r}), got {type(name).__name__} {name!r}")
    check(name in layers, f"{what} = {name!r} is not a layer of the table; the layers are "
          f"{', '.join(layers)}")
    return name


@exercise("01.2", hint="traces['avg_trace'].idxmax(), omega[2].idxmax(), and "
                       "traces.loc[name, 'avg_trace'] * sensitivity.weight_perturbation(w, 2, "
                       "method=init)")
def check_01_trace_vs_omega(top_trace_layer: Any, top_omega2_layer: Any, omega2_by_hand: Any, *,
                            traces: Any, omega: Any) -> str:
    """Exercise 01.2: the layer with the largest average trace, the one with the largest Ω at 2
    bits (joint), and that Ω from its factors T̄·‖Q_2(W) − W‖²."""
    layers = [str(n) for n in omega.index]
    t_name = _layer_name(top_trace_layer, "top_trace_layer", layers)
    o_name = _layer_name(top_omega2_layer, "top_omega2_layer", layers)
    by_hand = _number(answer(omega2_by_hand, "omega2_by_hand"), "omega2_by_hand")
    avg = traces["avg_trace"]
    want_t, want_o = str(avg.idxmax()), str(omega[2].idxmax())
    check(t_name == want_t, f"top_trace_layer = {t_name!r} has T̄ = {avg[t_name]:.4g}, but "
          f"{want_t!r} has {avg[want_t]:.4g}; take the largest of traces['avg_trace']")
    if o_name != want_o:
        hint = (" (that is the largest average trace, not the largest Ω)" if o_name == want_t
                else "")
        raise ExerciseError(f"top_omega2_layer = {o_name!r} has Ω(2) = {omega.loc[o_name, 2]:.4g}"
                            f"{hint}, but {want_o!r} has {omega.loc[want_o, 2]:.4g}; take the "
                            f"largest of the 2-bit column omegas['joint'][2]")
    want = float(omega.loc[want_o, 2])
    others = [n for n in layers if n != want_o and math.isclose(by_hand, float(omega.loc[n, 2]),
                                                                  rel_tol=1e-4)]
    if others:
        raise ExerciseError(f"omega2_by_hand is Ω(2) of {others[0]!r}; compute it for "
                            f"top_omega2_layer = {want_o!r}")
    check_close(by_hand, want, "omega2_by_hand", rtol=1e-4,
                hint=f"T̄ = {avg[want_o]:.4g} times ‖Q_2(W) − W‖², the squared quantization error "
                     "of all the layer's weights with the study's quantizer "
                     "(sensitivity.weight_perturbation(w, 2, method=init)); not its mean")
    n = traces["n_params"] if "n_params" in traces else None
    sizes = (f" ({int(n[want_t]):,} vs {int(n[want_o]):,} weights)" if n is not None else "")
    same = ("the same layer tops both" if want_t == want_o else
            f"the largest trace is in {want_t!r}, the largest Ω(2) in {want_o!r}{sizes}: "
            "Ω counts every weight's error, so a large layer with a moderate trace can top it")
    return f"Ω(2) of {want_o!r} = {want:.4g} by hand; {same}"


@exercise("01.3", hint="sum(omega.loc[layer, bits] for layer, bits in config.items())")
def check_01_sum_omega(sum_omega: Any, omega: Any, configs: Sequence[Mapping[str, int]],
                       expected: Sequence[float] | None = None) -> str:
    """Exercise 01.3: ``sum_omega(omega, config)`` = Σ_layers Ω_layer(bits) for every config;
    ``expected``: the library's ΣΩ of the same configs (the fixed-size frame's ``omega_joint``),
    else the sum is counted here."""
    check(len(configs) > 0, "no configurations to check")
    want = [float(sum(omega.loc[l, int(b)] for l, b in c.items())) for c in configs]
    if expected is not None:   # the library's own numbers must agree with the count here
        check_close(want, list(expected), "the fixed-size frame's ΣΩ (internal consistency)",
                    rtol=1e-6)
    got = [_number(attempt(sum_omega, omega, dict(c)), "sum_omega(omega, config)")
           for c in configs]
    first = dict(configs[0])
    if math.isclose(got[0], want[0] / len(first), rel_tol=1e-6):
        raise ExerciseError("sum_omega returns the mean over layers; return the sum")
    check_close(got, want, "sum_omega(omega, config)", rtol=1e-6,
                hint="add omega.loc[layer, bits] over every (layer, bits) of the config, "
                     "the fixed first/last layers included")
    return (f"ΣΩ of all {len(configs)} configs matches"
            + (" the library's (the fixed-size frame's omega_joint)" if expected is not None
               else " the sum counted here"))



# --------------------------------------------------------------------------------------------
# --- 02 --- notebook 02_bit_allocation
# --------------------------------------------------------------------------------------------

@exercise("02.1", hint="search.Problem.from_model(model, omega[[4, 8]], [4, 8], ...)"
                       ".frontier().points: the smallest size_mb and the largest compression")
def check_02_hawq_bits(smallest_mb: Any, max_compression: Any, *, model: Any, omega: Any,
                       a_bits: int | None, policy: str, input_size: tuple[int, ...]) -> str:
    """Exercise 02.1: the smallest model (MB) and the largest compression the frontier reaches
    with candidate bits {4, 8}."""
    mb = _number(answer(smallest_mb, "smallest_mb_48"), "smallest_mb_48")
    comp = _number(answer(max_compression, "max_compression_48"), "max_compression_48")
    kw = dict(a_bits=a_bits, policy=policy, input_size=input_size)
    pts = search.Problem.from_model(model, omega[[4, 8]], [4, 8], **kw).frontier().points
    all_bits = [int(b) for b in omega.columns]
    full = search.Problem.from_model(model, omega, all_bits, **kw).frontier().points
    want_mb, want_comp = float(pts["size_mb"].min()), float(pts["compression"].max())
    if math.isclose(mb, float(full["size_mb"].min()), rel_tol=1e-6) and \
            not math.isclose(mb, want_mb, rel_tol=1e-6):
        raise ExerciseError(f"smallest_mb_48 = {mb:.4f} MB is the frontier with all of "
                            f"{all_bits}; build the problem with bits [4, 8] only")
    if math.isclose(mb, want_comp, rel_tol=1e-6):
        raise ExerciseError("smallest_mb_48 holds the compression; give the size in MB "
                            "(points['size_mb'])")
    check_close(mb, want_mb, "smallest_mb_48 (MB)", rtol=1e-6,
                hint="the frontier's smallest size_mb: every free layer at 4 bits")
    check_close(comp, want_comp, "max_compression_48", rtol=1e-6,
                hint="the frontier's largest compression, FP32 size / smallest size")
    return (f"with bits {{4, 8}} the smallest model is {want_mb:.4f} MB = {want_comp:.2f}x: below "
            "32/4 = 8x, because the first and last layers stay at 8 bits and BN, biases and "
            "step sizes stay FP32, so no 10x budget is reachable")


@exercise("02.2", hint="search.select(problem.frontier(cost='bops'), "
                       "max_bops=float(size_pick['bops']))")
def check_02_bops_pick(bops_pick: Any, *, problem: Any, size_pick: Any) -> str:
    """Exercise 02.2: the least-ΣΩ point of the BOPs frontier within the size pick's BOPs."""
    got = answer(bops_pick, "bops_pick")
    check(hasattr(got, "__getitem__") and not isinstance(got, (str, bytes)),
          f"bops_pick should be a frontier row (search.select returns one), got "
          f"{type(got).__name__}")
    try:
        got_config, got_omega, got_bops = dict(got["config"]), float(got["omega"]), float(got["bops"])
    except (KeyError, TypeError, ValueError, IndexError):
        raise ExerciseError("bops_pick should be a frontier row with 'config', 'omega' and "
                            "'bops' (what search.select returns)") from None
    budget = float(size_pick["bops"])
    want = search.select(problem.frontier(cost="bops"), max_bops=budget)
    if got_config == dict(size_pick["config"]) and got_config != dict(want["config"]):
        raise ExerciseError("bops_pick is the size pick itself; build the frontier with "
                            "problem.frontier(cost='bops') and select on max_bops")
    check(got_bops <= budget * (1 + 1e-12), f"bops_pick has {got_bops / 1e9:.4f} GBOPs, over "
          f"the budget of {budget / 1e9:.4f} GBOPs (the size pick's)")
    check_close(got_omega, float(want["omega"]), "bops_pick's ΣΩ", rtol=1e-9,
                hint="the least ΣΩ within the BOPs budget: select on the BOPs frontier")
    size_omega = float(size_pick["omega"])
    return (f"BOPs pick ΣΩ {got_omega:.4g} vs size pick {size_omega:.4g} at the same BOPs "
            f"({budget / 1e9:.3f} G): the size pick fits the BOPs budget, so the BOPs pick's ΣΩ "
            f"can only be lower or equal; it spends the difference on weight bits "
            f"({float(want['size_mb']):.4f} MB vs {float(size_pick['size_mb']):.4f} MB)")



# --------------------------------------------------------------------------------------------
# --- 03 --- notebook 03_qat
# --------------------------------------------------------------------------------------------

def _lsq_step_grad_reference(w: Any, s: Any, bits: int) -> tuple[Any, Any, float]:
    """(per-channel Σ ∂q/∂s inside the range, the same at the clipping ends, g) by autograd
    through :class:`hmqat.quant.LSQQuantizer` (its step gradient divided by LSQ's scale g)."""
    c = w.shape[0]
    q = quant.LSQQuantizer(bits, signed=True, per_channel=True, channels=c, is_weight=True)
    with torch.no_grad():
        q.step.copy_(s.reshape(-1).expand(c) if s.numel() == 1 else s.reshape(-1))
    q.mark_initialized(True)
    v = w / s
    inside = ((v > q.qn) & (v < q.qp)).to(w.dtype)
    sums = []
    for mask in (inside, 1.0 - inside):
        q.step.grad = None
        q(w).backward(mask)
        sums.append(q.step.grad.detach().clone())
    g = q.grad_scale(w)
    return sums[0] / g, sums[1] / g, g


@exercise("03.1", hint="v = w / s; inside Q_N < v < Q_P the gradient is round(v) - v, below "
                       "it Q_N, above it Q_P, with Q_N = -2**(b-1), Q_P = 2**(b-1) - 1")
def check_03_step_grad(lsq_step_grad: Any, w: Any, s: Any, bits: int) -> str:
    """Exercise 03.1: ``lsq_step_grad(w, s, bits)`` returns LSQ's ∂q/∂s for every element of
    the weight tensor ``w`` ([C, ...], steps ``s`` of shape [C, 1, ...], signed range), before
    LSQ's gradient scale g. Checked against autograd through :class:`hmqat.quant.LSQQuantizer`
    on ``w`` and on a ramp that reaches both clipping ends, separately inside the range and at
    the clipping ends, so the message says which part is wrong."""
    w = w.detach().float().cpu()           # the reference quantizer lives on the CPU
    s = torch.as_tensor(s).detach().float().cpu()
    ramp = torch.linspace(-2.05, 1.95, 41).reshape(1, 41)   # w/s never exactly on a boundary
    cases = [(f"the notebook's weights ({tuple(w.shape)}, {bits} bits)", w,
              s.reshape(-1, *([1] * (w.dim() - 1)))),
             ("a ramp from -2.05 to 1.95 at s = 0.25, clipped at both ends", ramp,
              torch.full((1, 1), 0.25))]
    g_w = 0.0
    for i, (what, x, sx) in enumerate(cases):
        got = attempt(lsq_step_grad, x.clone(), sx.clone(), bits)
        check(isinstance(got, torch.Tensor), f"lsq_step_grad returned {type(got).__name__}; "
              "return a tensor of ∂q/∂s, one value per element of w")
        check(tuple(got.shape) == tuple(x.shape), f"on {what}: lsq_step_grad returned shape "
              f"{tuple(got.shape)}; return one value per element of w, shape {tuple(x.shape)} "
              "(do not sum over the channel yet)")
        inside_ref, ends_ref, g = _lsq_step_grad_reference(x, sx, bits)
        g_w = g if i == 0 else g_w
        v = x / sx
        qn, qp = -2 ** (bits - 1), 2 ** (bits - 1) - 1
        inside = (v > qn) & (v < qp)
        per_channel = lambda t: t.detach().float().reshape(x.shape[0], -1).sum(1)  # noqa: E731
        check_close(per_channel(torch.where(inside, got, 0.0)), inside_ref,
                    f"on {what}, inside the range (Q_N < w/s < Q_P), Σ ∂q/∂s of a channel",
                    rtol=1e-4, atol=1e-3,
                    hint="inside the range q = s·round(w/s), so ∂q/∂s = round(w/s) − w/s (the "
                         "rounding is passed straight through: its derivative counts as 0)")
        check_close(per_channel(torch.where(inside, 0.0, got)), ends_ref,
                    f"on {what}, at the clipping ends (w/s <= Q_N or >= Q_P), Σ ∂q/∂s of a "
                    "channel", rtol=1e-4, atol=1e-3,
                    hint=f"a clipped value is q = s·Q_N or s·Q_P, so ∂q/∂s is Q_N = {qn} below "
                         f"the range and Q_P = {qp} above it")
    return (f"∂q/∂s matches LSQ's autograd inside the range and at both clipping ends; the "
            f"optimizer sees it times g = 1/√(N·Q_P) = {g_w:.4f} for this layer "
            f"(N = {w[0].numel()} weights per step)")


@exercise("03.2", hint="T² times KL(teacher ‖ student) of the two softmaxes at temperature T, "
                       "averaged over the batch: F.log_softmax and F.kl_div(..., "
                       "reduction='batchmean', log_target=True)")
def check_03_distillation(kd_term: Any, z_student: Any, z_teacher: Any,
                          temperature: float) -> str:
    """Exercise 03.2: ``kd_term(z_student, z_teacher, T)`` returns the distillation term of the
    recipe (Eq. D without its weight), T²·KL(softmax(z_teacher/T) ‖ softmax(z_student/T)) as a
    batch mean, checked against :func:`hmqat.transitions.distillation_loss`; the common slips
    (no T², the KL the wrong way round, a sum over the batch, no temperature) are named."""
    zs, zt = z_student.detach().float().cpu(), z_teacher.detach().float().cpu()
    t = float(temperature)
    got = _number(answer(attempt(kd_term, zs.clone(), zt.clone(), t)), "kd_term(...)")
    want = float(distillation_loss(zs, zt, t))

    def kl(p_logits: torch.Tensor, q_logits: torch.Tensor, temp: float) -> float:
        """KL(softmax(p/temp) ‖ softmax(q/temp)), batch mean."""
        return float(F.kl_div(F.log_softmax(q_logits / temp, 1), F.log_softmax(p_logits / temp, 1),
                              reduction="batchmean", log_target=True))

    slips = [(want / (t * t), "it lacks the factor T² (the soft targets' gradients shrink as "
                              "1/T², and T² restores their scale)"),
             (kl(zs, zt, t) * t * t, "it is KL(student ‖ teacher); the recipe's KL is "
                                     "KL(teacher ‖ student): the teacher's distribution is the "
                                     "target"),
             (want * zs.shape[0], f"it sums over the {zs.shape[0]} images; take the batch mean"),
             (kl(zt, zs, 1.0), "it uses T = 1: divide both logits by T before the softmax")]
    if not math.isclose(got, want, rel_tol=1e-4, abs_tol=1e-6):
        for value, why in slips:
            if math.isclose(got, value, rel_tol=1e-4, abs_tol=1e-6):
                raise ExerciseError(f"kd_term = {got:.6g}, expected {want:.6g}: {why}")
    check_close(got, want, "kd_term(z_student, z_teacher, T)", rtol=1e-4, atol=1e-6,
                hint="T² · KL(softmax(z_teacher/T) ‖ softmax(z_student/T)), averaged over the "
                     "images of the batch")
    agree = float((zs.argmax(1) == zt.argmax(1)).float().mean()) * 100
    return (f"T²·KL = {want:.4f} at T = {t:g} on {zs.shape[0]} images, equal to "
            f"hmqat.transitions.distillation_loss; the quantized model agrees with its FP32 "
            f"teacher's top-1 class on {agree:.1f} % of them")


# --------------------------------------------------------------------------------------------
# --- 04 --- notebook 04_ablations
# --------------------------------------------------------------------------------------------

def _pairs_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall τ-b (scipy), the statistic of :func:`hmqat.sensitivity.kendall_table`."""
    return float(st.kendalltau(x, y).statistic)


@exercise("04.2", hint="loop over all pairs i < j: concordant when (x_i − x_j)·(y_i − y_j) > 0, "
                       "discordant when < 0; τ = (concordant − discordant) / (n(n−1)/2)")
def check_04_kendall(kendall_tau: Any, x: Sequence[float] | None = None,
                     y: Sequence[float] | None = None, reported: float | None = None) -> str:
    """Exercise 04.2: ``kendall_tau(x, y)`` counts concordant and discordant pairs (no ties).
    Checked on fixed vectors and, when given, on this run's ``x`` (ΣΩ of the trained configs)
    and ``y`` (their QAT error) against scipy and the ``reported`` τ of the notebook's table.
    With tied values there τ-b (scipy) is not the plain pair count, so those are not compared."""
    cases = [([1, 2, 3, 4, 5], [1, 2, 3, 4, 5]), ([1, 2, 3, 4, 5], [5, 4, 3, 2, 1]),
             ([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]), ([0.3, 0.1, 0.9, 0.5], [10.0, 30.0, 20.0, 40.0])]
    for cx, cy in cases:
        got = _number(answer(attempt(kendall_tau, list(cx), list(cy)), "kendall_tau(x, y)"),
                      f"kendall_tau({cx}, {cy})")
        want = _pairs_tau(cx, cy)
        n_pairs = len(cx) * (len(cx) - 1) / 2
        if not math.isclose(got, want, abs_tol=1e-9):
            if math.isclose(got, -want, abs_tol=1e-9):
                raise ExerciseError(f"kendall_tau({cx}, {cy}) = {got:+.4f}, expected "
                                    f"{want:+.4f}: the sign is flipped; a pair is concordant "
                                    "when x and y move the same way, (x_i − x_j)(y_i − y_j) > 0")
            for denom, what in ((len(cx) ** 2, "n²"), (len(cx) * (len(cx) - 1), "n(n−1)")):
                if math.isclose(got, want * n_pairs / denom, abs_tol=1e-9):
                    raise ExerciseError(f"kendall_tau({cx}, {cy}) = {got:+.4f}, expected "
                                        f"{want:+.4f}: divide by the number of pairs "
                                        f"n(n−1)/2 = {n_pairs:g}, not by {what}")
            raise ExerciseError(f"kendall_tau({cx}, {cy}) = {got:+.4f}, expected {want:+.4f} "
                                f"(n = {len(cx)}, {n_pairs:g} pairs)")
    note = "on 4 fixed cases"
    if x is not None and y is not None:
        xs, ys = [float(v) for v in x], [float(v) for v in y]
        if len(set(xs)) < len(xs) or len(set(ys)) < len(ys):
            note += "; this run's configs hold tied values (τ-b ≠ the plain pair count), so " \
                    "they were not compared"
        else:
            got = _number(attempt(kendall_tau, xs, ys), "kendall_tau(x, y)")
            check_close(got, _pairs_tau(xs, ys), f"kendall_tau on this run's {len(xs)} configs",
                        atol=1e-9)
            if reported is not None:
                check_close(got, float(reported), "kendall_tau vs the table's kendall_tau",
                            atol=1e-9)
            note += (f" and on this run's {len(xs)} configs: τ = {got:+.3f}, as the table "
                     "reports" if reported is not None else f" and on this run: τ = {got:+.3f}")
    return f"τ matches scipy's Kendall τ {note}"


@exercise("04.1", hint="(hessian_top1 − mean(random)) / std(random) with the sample std "
                       "(ddof=1, pandas' default)")
def check_04_random_z(z: Any, hessian_top1: float, random_top1: Sequence[float]) -> str:
    """Exercise 04.1: ``z``, how many standard deviations of the random allocations' top-1 the
    Hessian-guided allocation lies above their mean (sample std, as :func:`ablation.summarize`)."""
    z = answer(z, "z")
    r = np.asarray([float(v) for v in random_top1])
    sd1, sd0 = (float(r.std(ddof=1)), float(r.std(ddof=0))) if len(r) > 1 else (0.0, 0.0)
    if sd1 == 0:
        return (f"z not checked: {len(r)} random seed(s) with no spread between them, so z is "
                "undefined here (set random_seeds to 3 or more seeds)")
    got = _number(z, "z")
    want = (float(hessian_top1) - float(r.mean())) / sd1
    if not math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9):
        if sd0 > 0 and math.isclose(got, (float(hessian_top1) - r.mean()) / sd0, rel_tol=1e-6):
            raise ExerciseError(f"z = {got:+.4f} divides by the population std (ddof=0, numpy's "
                                f"default); the table's std is the sample std (ddof=1): "
                                f"z = {want:+.4f}")
        if math.isclose(got, -want, rel_tol=1e-6):
            raise ExerciseError(f"z = {got:+.4f} has the wrong sign: Hessian-guided minus the "
                                "random mean")
    check_close(got, want, "z", rtol=1e-6, atol=1e-9,
                hint=f"random top-1 {r.mean():.2f} ± {sd1:.2f} % over {len(r)} seeds, "
                     f"Hessian-guided {float(hessian_top1):.2f} %")
    return (f"z = {want:+.2f}: the Hessian-guided allocation is {abs(want):.1f} random-std "
            f"{'above' if want >= 0 else 'below'} the random mean; with {len(r)} random seeds "
            "that std is itself rough, and the comparison is not paired")


# --------------------------------------------------------------------------------------------
# --- 05 --- notebook 05_report
# --------------------------------------------------------------------------------------------

@exercise("05.1", hint="sum over models.quantizable_layers(model, input_size) of info.macs, "
                       "times 32 · 32 (FP32 weights and activations)")
def check_05_fp32_bops(fp32_bops: Any, model: Any, input_size: Sequence[int]) -> str:
    """Exercise 05.1: ``fp32_bops``, the FP32 model's bit operations per image (Eq. B at 32-bit
    weights and activations), against :func:`hmqat.quant.bops` of the FP32 model."""
    got = _number(answer(fp32_bops, "fp32_bops"), "fp32_bops")
    layers = models.quantizable_layers(model, input_size=tuple(input_size))
    macs = sum(i.macs for i in layers)
    want = float(quant.bops(model, input_size=tuple(input_size)))
    if math.isclose(got, want / 1e9, rel_tol=1e-6):
        raise ExerciseError(f"fp32_bops = {got:g} is in GBOPs; give BOPs per image "
                            f"({want:.4g}), the unit of quant.bops")
    if math.isclose(got, macs, rel_tol=1e-6):
        raise ExerciseError(f"fp32_bops = {got:.4g} is the MAC count; Eq. B weighs each MAC by "
                            "its weight and activation bits, 32 · 32 at FP32")
    n_w = sum(i.n_params for i in layers)
    if math.isclose(got, n_w * 32 * 32, rel_tol=1e-6):
        raise ExerciseError(f"fp32_bops = {got:.4g} counts weights, not MACs: a conv weight is "
                            "used once per output position (info.macs, not info.n_params)")
    check_close(got, want, "fp32_bops", rtol=1e-9,
                hint=f"Σ MACs · 32 · 32 over the {len(layers)} quantizable layers")
    return (f"{want / 1e9:.2f} GBOPs per image ({macs / 1e6:.1f} M MACs · 32 · 32), equal to "
            "hmqat.quant.bops of the FP32 model")


def _seeds_needed_reference(diff: float, sd: float, n_max: int) -> int:
    """Smallest n >= 2 with t(0.975, n−1)·sd/√n < diff (n_max when none is)."""
    for n in range(2, n_max + 1):
        if st.t.ppf(0.975, n - 1) * sd / math.sqrt(n) < diff:
            return n
    return n_max


@exercise("05.2", hint="try n = 2, 3, … until scipy.stats.t.ppf(0.975, n - 1) * sd / n ** 0.5 "
                       "< diff")
def check_05_seeds_needed(seeds_needed: Any) -> str:
    """Exercise 05.2: ``seeds_needed(diff, sd)``, the smallest number of paired seeds n >= 2
    whose 95 % t interval half-width t(0.975, n−1)·sd/√n is below ``diff`` (docs/method.md §8),
    on a few (diff, sd) cases; a normal quantile (1.96) instead of t is named."""
    cases = [(0.2, 0.1), (0.2, 0.2), (0.2, 0.3), (0.5, 0.3), (1.0, 0.2)]
    rows = []
    for diff, sd in cases:
        got = answer(attempt(seeds_needed, diff, sd), f"seeds_needed({diff}, {sd})")
        check(isinstance(got, int) or (hasattr(got, "is_integer") and float(got).is_integer()),
              f"seeds_needed({diff}, {sd}) returned {got!r}; return a whole number of seeds")
        got = int(got)
        want = _seeds_needed_reference(diff, sd, 1000)
        if got != want:
            z_n = next(n for n in range(2, 1001) if 1.959964 * sd / math.sqrt(n) < diff)
            if got == z_n and z_n != want:
                raise ExerciseError(f"seeds_needed({diff}, {sd}) = {got}, expected {want}: that "
                                    "is the normal quantile 1.96; with n seeds the interval uses "
                                    "t(0.975, n−1), much wider for few seeds (12.7 at n = 2)")
            raise ExerciseError(f"seeds_needed({diff}, {sd}) = {got}, expected {want}: the "
                                f"smallest n >= 2 with t(0.975, n−1)·sd/√n < diff")
        rows.append(f"{want} for {diff:g} points at s_d = {sd:g}")
    return "seeds needed: " + "; ".join(rows)


# --------------------------------------------------------------------------------------------
# --- 07 --- notebook 07_frontier_walk
# --------------------------------------------------------------------------------------------

@exercise("07.1", hint="sort the table by k; the walk's steps are its last row's `walk steps`, "
                       "the separate runs' the sum of `study budget steps`")
def check_07_compute_ratio(compute_ratio: Any, table: Any) -> str:
    """Exercise 07.1: ``compute_ratio(table)`` is the walk's optimizer steps (its last point's
    cumulative steps) over one study-budget run per point (their sum), the number the goal
    (≤ 1/3) is about; checked against :func:`hmqat.study.walk_study.compute_summary`. Summing
    the walk's cumulative steps (counting the shared path once per point) is named."""
    ordered = table.sort_values("k", kind="stable")
    walk_total = float(ordered["walk steps"].iloc[-1])
    separate = float(ordered["study budget steps"].sum())
    want = walk_total / separate
    got = _number(answer(attempt(compute_ratio, table.copy())), "compute_ratio(table)")
    if not math.isclose(got, want, rel_tol=1e-9):
        if math.isclose(got, float(ordered["walk steps"].sum()) / separate, rel_tol=1e-9):
            raise ExerciseError(f"compute_ratio = {got:.4g}, expected {want:.4g}: `walk steps` "
                                "is cumulative; one walk yields every point, so count its last "
                                "row only")
        if math.isclose(got, 1 / want, rel_tol=1e-9):
            raise ExerciseError(f"compute_ratio = {got:.4g}, expected {want:.4g}: it is upside "
                                "down; the walk's steps go on top")
        check_close(got, want, "compute_ratio(table)", rtol=1e-9)
    goal = "meets" if want <= 1 / 3 else "misses"
    return (f"the walk costs {want:.3f} of {len(ordered)} separate runs ({int(walk_total):,} vs "
            f"{int(separate):,} steps): it {goal} the ≤ 1/3 goal")


@exercise("08.1", hint="ptq[(ptq.variant == 'joint') & (ptq.target_compression == "
                       "compression)], then its top1 minus its random_median")
def check_08_ptq_gain(ptq_gain: Any, ptq: Any) -> str:
    """Exercise 08.1: ``ptq_gain(ptq, c)`` is the joint pick's PTQ top-1 minus the median of the
    random same-size configs at budget ``c``, for every budget of notebook 01's frontier table
    ``ptq``; the gain of the wrong variant or against the best random config is named."""
    joint = ptq[ptq["variant"] == "joint"]
    check(not joint.empty, "the PTQ frontier table has no joint rows; rerun notebook 01")
    lines = []
    for _, row in joint.iterrows():
        c = float(row["target_compression"])
        want = float(row["top1"]) - float(row["random_median"])
        got = _number(answer(attempt(ptq_gain, ptq.copy(), c)), f"ptq_gain(ptq, {c:g})")
        if not math.isclose(got, want, abs_tol=1e-9):
            if math.isclose(got, float(row["top1"]) - float(row["random_max"]), abs_tol=1e-9):
                raise ExerciseError(f"ptq_gain(ptq, {c:g}) = {got:.4g}, expected {want:.4g}: "
                                    "that is against the best random config; the median is "
                                    "the typical one")
            others = ptq[(ptq["target_compression"] == c) & (ptq["variant"] != "joint")]
            if any(math.isclose(got, float(r["top1"]) - float(r["random_median"]), abs_tol=1e-9)
                   for _, r in others.iterrows()):
                raise ExerciseError(f"ptq_gain(ptq, {c:g}) = {got:.4g}, expected {want:.4g}: "
                                    "that is another variant's row; keep variant == 'joint'")
            check_close(got, want, f"ptq_gain(ptq, {c:g})", atol=1e-9)
        lines.append(f"{c:g}x: {want:+.2f}")
    return "the joint pick's gain over the random median, " + ", ".join(lines) + " points"


# --------------------------------------------------------------------------------------------
# --- 06 --- notebook 06_budget
# --------------------------------------------------------------------------------------------

@exercise("06.1", hint="the per-image differences d_j = a_j − b_j of one seed, in points; their "
                       "standard deviation (ddof=1) over the M images, divided by √M")
def check_06_image_se(image_se: Any, bits_a: Any, bits_b: Any) -> str:
    """Exercise 06.1: ``image_se(bits_a, bits_b)`` is the standard error of one seed's mean
    difference over its M test images, sd(d_j)/√M with d_j = 100·(a_j − b_j) (the image term
    that a seed-only interval leaves out, docs/method.md §8). Checked on a fixed pair and on
    the notebook's own bits; a population sd (ddof=0) and a missing √M are named."""
    cases = [(np.array([1, 1, 0, 1, 0, 1, 1, 0], bool), np.array([1, 0, 0, 1, 1, 1, 0, 0], bool))]
    cases.append((np.asarray(bits_a, bool), np.asarray(bits_b, bool)))
    for a, b in cases:
        d = 100.0 * (a.astype(float) - b.astype(float))
        m = len(d)
        want = float(d.std(ddof=1) / math.sqrt(m))
        got = _number(answer(attempt(image_se, a.copy(), b.copy()), "image_se(a, b)"),
                      "image_se(a, b)")
        if not math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9):
            if math.isclose(got, float(d.std(ddof=0) / math.sqrt(m)), rel_tol=1e-6):
                raise ExerciseError(f"image_se = {got:.6g}, expected {want:.6g}: use the "
                                    "sample standard deviation (ddof=1)")
            if math.isclose(got, float(d.std(ddof=1)), rel_tol=1e-6):
                raise ExerciseError(f"image_se = {got:.6g}, expected {want:.6g}: that is the "
                                    f"sd of one image's difference; divide by √M = √{m}")
            check_close(got, want, f"image_se on {m} images", rtol=1e-6,
                        hint="sd(d_j, ddof=1) / √M with d_j in points")
    return (f"one seed's mean difference moves by ±{want:.3f} points (1 SE) with another "
            f"{len(cases[-1][0]):,} test images: no number of seeds removes that term")


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hmqat.study.lessons",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--write-times", metavar="MANIFEST", required=True,
                    help="copy a lab run's per-notebook times (results/lab/manifest.json) into "
                         "notebooks/lab_times.json and the notebooks' headers")
    args = ap.parse_args(argv)
    try:
        times = write_lab_times(args.write_times)
    except LessonError as exc:
        print(f"[hmqat] ERROR: {exc}", file=sys.stderr, flush=True)
        return 1
    print(f"[hmqat] wrote {LAB_TIMES.relative_to(ROOT)}: "
          + ", ".join(f"{n[:2]} {m} min" for n, m in times["notebooks"].items())
          + f"; chain {times['chain_min']} min; headers of all {len(times['notebooks'])} "
            f"notebooks updated", flush=True)
    for line in lab_budget_verdict(times):
        print(f"[hmqat] {line}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
