"""The papermill driver: run the study's notebooks in order for a profile (docs/design.md §2–§4).

    make reproduce                  # = python -m hmqat.study.pipeline --profile quick
    make reproduce PROFILE=paper
    python -m hmqat.study.pipeline --profile smoke --only 00_fp32_baseline 01_sensitivity

Each notebook gets the merged ``common`` + per-notebook parameters of ``params/<profile>.yaml``
(only the names its ``parameters`` cell declares), runs headlessly with papermill, and is saved
executed to ``results/<profile>/executed/``. A step whose notebook, parameters, upstream steps and
``hmqat`` sources are unchanged since its last successful run is skipped; an interrupted step
reruns and its QAT runs resume from their checkpoints. A failing notebook stops the chain with
one error line: the failing cell's error, the path of its executed copy and the command that
reruns it. ``manifest.json`` records provenance and the wall time of every step.

Step state cannot claim more than is true:

* ``results/<profile>/.stamps/<step>.json`` (the stamp) is removed when a run of the step
  starts and written only after it succeeded;
* a step is "unchanged, skipped" only with a stamp of the same digest, an executed copy that
  records no error, no unfinished attempt, and its key outputs (:data:`KEY_OUTPUTS`, what later
  steps read, e.g. 00's FP32 checkpoint) present; otherwise it reruns and says why;
* when a step reruns, the steps that read its results (:func:`hmqat.study.params.readers`)
  lose their stamps and their manifest entries say ``stale`` until they rerun, so a partial
  rerun never presents an earlier run's files as its own;
* a failed attempt stays recorded (``.stamps/<step>.attempts.json``, written before the kernel
  starts); the files it wrote are listed as stale under ``failure`` in ``manifest.json`` (its
  entry says ``failed``, or ``running`` where the disk was too full to say more), and ``--only``
  refuses to run a later step on top of them, naming the command that reruns the failed step.

Notebooks use :class:`Study` for paths, data and the files earlier steps wrote.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
import torch

from .. import data
from ..data import TensorImages
from ..distributed import is_distributed
from ..models import create_model, fit_weights, load_weights, read_weights
from ..locking import LockError, results_lock
from ..runtime import (WriteError, atomic_write_json, atomic_write_text, manifest, param_path,
                       read_json, resolve_device, seed_everything, write_error)
from ..sensitivity import VARIANTS
from .reporting import ReportingError, describe_data, update_manifest
from . import params
from .runs import data_key
from .across_models import NEEDED as NEEDED_ACROSS

__all__ = ["KEY_OUTPUTS", "NOTEBOOKS", "PipelineError", "Study", "load_params", "main",
           "rerun_command", "run_pipeline"]

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = params.NOTEBOOKS
PROFILES = ("smoke", "lab", "quick", "extended", "models", "paper", "imagenet")   # lab: the notebooks' own defaults


class PipelineError(RuntimeError):
    """A notebook of the chain failed, or the profile/parameters are wrong."""


#: What later steps read from each step (through :class:`Study`), relative to
#: ``results/<profile>/`` (``{arch}``: the profile's architecture). Only files every profile
#: writes are listed; a step is skipped as unchanged only while all of its files exist, so
#: `make clean-cache` (which deletes 00's checkpoint) makes 00 run again.
KEY_OUTPUTS: dict[str, tuple[str, ...]] = {
    "00_fp32_baseline": ("checkpoints/fp32-{arch}.pt", "data/fp32.json"),
    "01_sensitivity": ("data/traces.csv",) + tuple(f"data/omega_{v}.csv" for v in VARIANTS),
    "02_bit_allocation": ("data/configs.json", "data/frontier.csv"),
    "03_qat": ("data/qat_results.json",),
    "04_ablations": ("data/ablation_runs.csv",),
    "05_report": ("README.md",),
    "06_budget": ("data/budget_runs.json", "data/budget_verdict.json"),
    "07_frontier_walk": ("data/walk_runs.json", "data/walk_verdict.json"),
    "08_across_models": ("data/across_models.json",),
}

#: Files and folders of a results folder that are not a step's outputs: the pipeline's own
#: records, the executed copies (the record of each attempt) and the optional caches.
_NOT_OUTPUTS = (".stamps", ".lock", "manifest.json", "executed", "cache")


def rerun_command(profile: str, only: Sequence[str] | None = None, *,
                  results_root: str | os.PathLike | None = None,
                  models: Sequence[str] | None = None) -> str:
    """The command line that runs ``only`` (every step when None) of ``profile``, as error
    messages print it: ``--results-root`` only when the results are not under ``results/``;
    ``--models`` when only some models of a profile with ``models:`` are meant."""
    parts = ["python -m hmqat.study.pipeline", "--profile", shlex.quote(profile)]
    if results_root is not None and \
            Path(results_root).resolve() != (ROOT / "results").resolve():
        parts += ["--results-root", shlex.quote(str(Path(results_root).resolve()))]
    if models:
        parts += ["--models", *models]
    if only:
        parts += ["--only", *only]
    return " ".join(parts)


# --------------------------------------------------------------------------------------------
# Parameters and stamps
# --------------------------------------------------------------------------------------------
def load_params(profile: str, params_dir: Path | None = None) -> dict[str, Any]:
    """Read and validate ``params/<profile>.yaml``: ``{"common": {...}, "notebooks": {name:
    {...}}, "run": [...]}`` (schema: :mod:`hmqat.study.params`; errors name file, section, key)."""
    folder = params_dir or ROOT / "params"
    known = sorted(p.stem for p in folder.glob("*.yaml"))
    if not isinstance(profile, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", profile):
        raise PipelineError(f"profile {profile!r} is not a profile name (letters, digits, '.', "
                            f"'-', '_'); choose one of {known}")
    path = folder / f"{profile}.yaml"
    if not path.exists() and not path.is_symlink():   # a dangling link: read_profile says so
        raise PipelineError(f"unknown profile {profile!r}: there is no {path}; choose one of "
                            f"{known}, or write {path} (a copy of params/smoke.yaml to edit)")
    try:
        return params.read_profile(path)
    except params.ParamsError as exc:
        raise PipelineError(str(exc)) from None


def notebook_parameters(cfg: dict[str, Any], name: str, declared: Sequence[str],
                        results_dir: Path, profile: str) -> dict[str, Any]:
    """common + notebook section + paths, restricted to what the notebook declares."""
    merged = {**cfg.get("common", {}), **(cfg.get("notebooks", {}).get(name) or {}),
              "results_dir": str(results_dir), "profile": profile}
    missing_in_nb = sorted(k for k in (cfg.get("notebooks", {}).get(name) or {})
                           if k not in declared)
    if missing_in_nb:
        raise PipelineError(f"params for {name} set {missing_in_nb}, which its parameters cell "
                            f"does not declare (declared: {sorted(declared)})")
    unset = sorted(k for k in declared if k not in merged)
    if unset:
        raise PipelineError(f"params/{profile}.yaml does not set {unset}, which {name} declares; "
                            "every profile sets every parameter (notebook defaults are for `make "
                            "lab` only)")
    return {k: v for k, v in merged.items() if k in declared}


def _sources_digest() -> str:
    h = hashlib.sha256()
    for p in sorted((ROOT / "hmqat").rglob("*.py")):
        h.update(p.relative_to(ROOT).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def _digest_parts(nb_path: Path, params: dict[str, Any], upstream: str, sources: str,
                  env: dict[str, str]) -> dict[str, str]:
    """What a step's digest covers, each part hashed on its own (recorded in the stamp, so a
    rerun can say which part changed)."""
    def sha(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()
    return {"notebook": sha(nb_path.read_bytes()),
            "parameters": sha(json.dumps(params, sort_keys=True, default=str).encode()),
            "data and weights folders": sha(json.dumps(env, sort_keys=True).encode()),
            "upstream steps": upstream, "hmqat sources": sources}


def _step_digest(nb_path: Path, params: dict[str, Any], upstream: str, sources: str,
                 env: dict[str, str]) -> str:
    h = hashlib.sha256()
    h.update(nb_path.read_bytes())
    h.update(json.dumps(params, sort_keys=True, default=str).encode())
    h.update(json.dumps(env, sort_keys=True).encode())
    h.update(upstream.encode() + sources.encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------
class _Echo:
    """A file-like sink for one notebook's stdout or stderr stream (papermill's ``stdout_file``):
    each non-blank line or progress-bar refresh (tqdm separates them with carriage returns) goes
    to ``out`` as ``[hmqat] <notebook> | <text>``; an immediately repeated line is dropped."""

    def __init__(self, name: str, out: Any) -> None:
        self.prefix, self.out, self.buf, self.last = f"[hmqat] {name} | ", out, "", None

    def write(self, text: str) -> int:
        self.buf += text
        *lines, self.buf = self.buf.replace("\r", "\n").split("\n")
        for line in (ln.rstrip() for ln in lines):
            if line.strip() and line != self.last:
                self.out.write(self.prefix + line + "\n")
                self.last = line
        if lines:
            self.out.flush()
        return len(text)

    def flush(self) -> None:
        self.out.flush()


# The kernel's own log (ipykernel's "running over TCP without encryption" warning, and the
# "KeyboardInterrupt caught in kernel" error it logs when shut down) is not about the notebook.
_KERNEL_ARGS = ["--IPKernelApp.log_level=CRITICAL"]


def _relative_paths(nb_in: Path, nb_out: Path, roots: Sequence[str | Path] | None = None) -> None:
    """Committed executed copies hold no absolute path of the build machine (docs/method.md §8):
    papermill's recorded input/output paths become ``notebooks/<name>`` and ``executed/<name>``,
    and in the cells' text outputs (warnings and tracebacks name library files) every prefix in
    ``roots`` (default: the repository root and ``sys.prefix``, the environment) is cut to a
    relative path (``.venv/lib/...``) or ``<env>``."""
    if not nb_out.exists():
        return
    nb = json.loads(nb_out.read_text(encoding="utf-8"))
    meta = nb.get("metadata", {}).get("papermill")
    if isinstance(meta, dict):
        meta["input_path"] = f"notebooks/{nb_in.name}"
        meta["output_path"] = f"executed/{nb_out.name}"
    subs = [(f"{Path(r).resolve()}/", "") for r in (roots if roots is not None else [ROOT])]
    subs.append((f"{Path(sys.prefix).resolve()}/", "<env>/"))

    def cut(text: str) -> str:
        for old, new in subs:
            text = text.replace(old, new)
        return text

    for cell in nb.get("cells", []):
        for out in cell.get("outputs", []):
            if "text" in out:
                out["text"] = [cut(t) for t in out["text"]] if isinstance(out["text"], list) \
                    else cut(out["text"])
            if "traceback" in out:
                out["traceback"] = [cut(t) for t in out["traceback"]]
    atomic_write_text(nb_out, json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


def _one_line(text: Any) -> str:
    """``text`` with its whitespace runs (newlines included) collapsed to single spaces."""
    return " ".join(str(text).split())


def _run_notebook(nb_in: Path, nb_out: Path, params: dict[str, Any], timeout: int | None) -> None:
    """Execute one notebook with papermill, echoing its printed lines (each run's epoch and
    top-1 lines, labelled progress bars, warnings) prefixed with its name. A failing cell
    raises :class:`PipelineError` with the cell's error on one line. papermill is imported
    here, not with the module: the notebooks import this module, and papermill's import (its
    JSON-schema validator) costs every kernel ~2 s it never uses."""
    import papermill as pm
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    name = nb_in.stem
    try:
        pm.execute_notebook(str(nb_in), str(nb_out), parameters=params, kernel_name="python3",
                            cwd=str(nb_in.parent), progress_bar=False, log_output=False,
                            stdout_file=_Echo(name, sys.stdout),
                            stderr_file=_Echo(name, sys.stderr),
                            extra_arguments=_KERNEL_ARGS,
                            execution_timeout=timeout, start_timeout=180)
    except pm.PapermillExecutionError as exc:
        try:        # the record of the failure matters more than relative paths in it
            _relative_paths(nb_in, nb_out)
        except OSError:
            pass
        raise PipelineError(f"notebook {nb_in.name} failed in cell {exc.exec_count}: "
                            f"{exc.ename}: {_one_line(exc.evalue)}") from None
    except CellTimeoutError:
        raise PipelineError(f"notebook {nb_in.name}: a cell ran longer than --timeout {timeout} "
                            "s; raise --timeout or leave it out (no limit)") from None
    except DeadKernelError as exc:
        raise PipelineError(f"notebook {nb_in.name}: its kernel died ({_one_line(exc)}); out of "
                            "memory or killed? Check the memory (free -h) and rerun") from None
    _relative_paths(nb_in, nb_out)


def run_pipeline(profile: str = "quick", *, only: Sequence[str] | None = None,
                 results_root: Path | None = None, notebooks_dir: Path | None = None,
                 params_dir: Path | None = None, force: bool = False,
                 timeout: int | None = None, models: Sequence[str] | None = None
                 ) -> dict[str, Any]:
    """Run the notebooks of ``profile`` in order; return the manifest's ``steps`` dict.

    Before any notebook runs: the profile is validated (:mod:`hmqat.study.params`), every step's
    parameters are resolved against its notebook's ``parameters`` cell, and
    ``results/<profile>/.lock`` is taken (:func:`hmqat.locking.results_lock`; a second run on
    the same profile stops at once naming the holder's pid). Steps and manifest updates run
    under the lock. Every failure, a full or read-only disk included, is one
    :class:`PipelineError` whose message names the fix.

    A profile with ``models:`` (``params/models.yaml``) runs its steps once per architecture,
    each into ``results/<profile>/<arch>/`` with its own manifest (``models`` picks some of
    them), then :data:`~hmqat.study.params.ACROSS_MODELS` once in ``results/<profile>/``; the
    returned dict is then ``{arch: steps, ..., "across": steps}``."""
    cfg = load_params(profile, params_dir)
    for var in ("HMQAT_DATA_DIR", "HMQAT_WEIGHTS_DIR", "HMQAT_CACHE_DIR"):
        if os.environ.get(var):  # kernels run in notebooks/: make relative paths absolute
            os.environ[var] = str(Path(os.environ[var]).expanduser().resolve())
    results_dir = (results_root or ROOT / "results") / profile
    nb_dir = notebooks_dir or ROOT / "notebooks"
    runs = _model_runs(cfg, profile, models, results_dir)
    plans = [(where, _plan(sub, profile, only, nb_dir, where), sub, chosen)
             for where, sub, chosen in runs]
    total = time.perf_counter()
    try:
        with results_lock(results_dir):
            if cfg.get("reuse"):
                reuse_runs(results_dir.parent / cfg["reuse"], results_dir)
            upstream = []
            for where, plan, sub, chosen in plans:
                steps = _Steps(sub, profile, where, rerun_command(
                    profile, only if chosen or "models" not in cfg else [params.ACROSS_MODELS],
                    results_root=results_root, models=chosen))
                if plan:   # the comparison's identity: every model's last finished step
                    steps.run(plan, force, timeout,
                              upstream="" if chosen else "".join(upstream))
                if chosen:
                    upstream.append(steps.last_digest())
    except LockError as exc:
        raise PipelineError(str(exc)) from None
    except ReportingError as exc:
        raise PipelineError(str(exc)) from None
    except OSError as exc:
        raise PipelineError(_os_error(exc)) from None
    done = {}
    for where, _, _, chosen in plans:
        manifest_path = where / "manifest.json"
        steps = json.loads(manifest_path.read_text())["steps"] if manifest_path.exists() else {}
        if "models" not in cfg:
            done = steps
        else:
            done[chosen[0] if chosen else "across"] = steps
    print(f"[hmqat] {profile}: finished in {(time.perf_counter() - total) / 60:.1f} min; "
          f"results in {results_dir}", flush=True)
    return done


def _model_results_digest(results_root: Path, names: Sequence[str]) -> str:
    """sha256 over the result files notebook 08 reads from each of ``names`` (folders relative
    to ``results_root``; :data:`hmqat.study.across_models.NEEDED` but the manifest, which every
    pass rewrites, skipped steps included), so a rerun of e.g. the quick profile makes the
    comparison stale and a pass that changes nothing does not."""
    h = hashlib.sha256()
    for name in names:
        for rel in (r for r in NEEDED_ACROSS if r != "manifest.json"):
            path = results_root / name / rel
            h.update(f"{name}/{rel}:".encode())
            if path.is_file():
                h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


#: What a profile with ``reuse:`` copies from the other profile's folder: computed runs and
#: caches, each read back only where its identity (weights, settings, data) matches.
REUSED = ("checkpoints", "cache")


def reuse_runs(source: Path, target: Path) -> list[str]:
    """Start ``target`` from the computed runs of ``source`` (``reuse: quick`` in
    params/extended.yaml): copy :data:`REUSED` folders that ``target`` does not have yet, once.
    Nothing reported is copied (no tables, figures, data or manifest): every notebook still
    runs and writes its own results; a QAT run, FP32 fine-tune or trace computation is read back
    only when its identity (weights, settings, data) is the same, which it is exactly where the
    two profiles agree. The source must have finished at least one step (a stamp) and is read
    under its lock (a running source stops this with the holder's pid); each folder is copied
    to a temporary name first, so an interrupted copy leaves nothing half-copied. Returns the
    folders copied; the manifest records the source."""
    if not any((source / ".stamps").glob("*.json")):
        print(f"[hmqat] reuse: {source} holds no finished step; computing everything", flush=True)
        return []
    copied = []
    with results_lock(source):
        for name in REUSED:
            if (source / name).is_dir() and not (target / name).exists():
                tmp = target / f".reuse-{name}"
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(source / name, tmp, symlinks=True)
                os.replace(tmp, target / name)
                copied.append(name)
    if copied:
        print(f"[hmqat] reuse: copied {', '.join(copied)} of {source} (runs whose identity "
              f"matches are read back, the rest computed)", flush=True)
        path = target / "manifest.json"
        data = read_json(path) if path.exists() else manifest()
        data["reused_from"] = {"profile": source.name, "copied": copied}
        atomic_write_json(path, data)
    return copied


def _model_runs(cfg: dict[str, Any], profile: str, models: Sequence[str] | None,
                results_dir: Path) -> list[tuple[Path, dict[str, Any], list[str] | None]]:
    """(results folder, profile settings, ``--models`` value) of each pass: one pass for a
    single-model profile; with ``models:`` one pass per chosen architecture (``common.arch``
    set to it, :data:`~hmqat.study.params.ACROSS_MODELS` left out), then the comparison."""
    listed = cfg.get("models")
    if listed is None:
        if models:
            raise PipelineError(f"--models {' '.join(models)}: the {profile} profile has no "
                                f"models: list (params/models.yaml has one); leave --models out")
        return [(results_dir, cfg, None)]
    chosen = list(models) if models else list(listed)
    unknown = [m for m in chosen if m not in listed]
    if unknown:
        raise PipelineError(f"--models {' '.join(unknown)}: not in the {profile} profile's "
                            f"models {listed}; choose from them")
    run = list(cfg.get("run", NOTEBOOKS))
    per_model = [n for n in run if n != params.ACROSS_MODELS]
    passes = [(results_dir / arch, {**cfg, "common": {**cfg["common"], "arch": arch},
                                    "run": per_model}, [arch]) for arch in chosen]
    if params.ACROSS_MODELS in run:
        passes.append((results_dir, {**cfg, "run": [params.ACROSS_MODELS]}, None))
    return passes


def _os_error(exc: OSError) -> str:
    """One line for an ``OSError`` that stopped the pipeline: a disk problem as
    :func:`hmqat.runtime.write_error` words it, anything else with its file."""
    if exc.filename is not None:
        exc = write_error(exc.filename, exc)
    if isinstance(exc, WriteError):
        return str(exc)
    where = f" ({exc.filename})" if exc.filename is not None else ""
    return f"{exc.strerror or exc}{where}; fix it and rerun"


def _plan(cfg: dict[str, Any], profile: str, only: Sequence[str] | None, nb_dir: Path,
          results_dir: Path) -> list[tuple[str, Path, dict[str, Any]]]:
    """(name, notebook, parameters) of every step to run, all checked before the first runs."""
    import papermill as pm    # the driver's dependency only (see _run_notebook)

    names = [n for n in NOTEBOOKS if n in set(cfg.get("run", NOTEBOOKS))]
    if only is not None:
        try:
            params.check_names(list(only), "--only", "command line")
        except params.ParamsError as exc:
            raise PipelineError(str(exc)) from None
        names = [n for n in names if n in only]
    plan = []
    for name in names:
        nb_in = nb_dir / f"{name}.ipynb"
        if not nb_in.exists():
            raise PipelineError(f"missing notebook {nb_in}")
        declared = list(pm.inspect_notebook(str(nb_in)).keys())
        # relative to the kernel's working directory (the notebook's folder): the executed
        # copies that get committed then hold no absolute path of the build machine
        rel = Path(os.path.relpath(results_dir.resolve(), nb_in.parent.resolve()))
        plan.append((name, nb_in, notebook_parameters(cfg, name, declared, rel, profile)))
    return plan


class _Steps:
    """Running (or skipping) the planned steps of one profile in ``results_dir``, under its lock.

    ``rerun`` is the command line error messages give for running the same steps again."""

    def __init__(self, cfg: dict[str, Any], profile: str, results_dir: Path, rerun: str):
        self.cfg, self.profile, self.root, self.rerun = cfg, profile, results_dir, rerun
        self.arch = str(cfg.get("common", {}).get("arch", ""))
        self.manifest = results_dir / "manifest.json"

    # where a step's state lives --------------------------------------------------------------
    def stamp(self, name: str) -> Path:
        return self.root / ".stamps" / f"{name}.json"

    def attempts(self, name: str) -> Path:
        return self.root / ".stamps" / f"{name}.attempts.json"

    def executed(self, name: str) -> Path:
        return self.root / "executed" / f"{name}.ipynb"

    def key_outputs(self, name: str) -> list[str]:
        return [p.format(arch=self.arch) for p in KEY_OUTPUTS.get(name, ())]

    # the decisions ---------------------------------------------------------------------------
    def why_run(self, name: str, digest: str, parts: Mapping[str, str] | None = None
                ) -> str | None:
        """None when the step's last run is current (skip it), else why it must run
        (``parts``: :func:`_digest_parts`, to name what changed)."""
        stamp = self.stamp(name)
        if not stamp.exists():
            return "no finished run recorded"
        try:
            recorded = read_json(stamp)
            old_digest, old_parts = recorded.get("digest"), recorded.get("parts") or {}
        except (ValueError, OSError, AttributeError):
            return f"its stamp {stamp} is unreadable"
        if old_digest != digest:
            changed = [k for k, v in (parts or {}).items() if old_parts.get(k) != v]
            if old_parts and changed:
                return f"its {', '.join(changed)} changed"
            return "its notebook, parameters, upstream steps or hmqat sources changed"
        if self.attempts(name).exists():
            return "its last attempt did not finish"
        failed = _executed_failure(self.executed(name))
        if failed:
            return failed
        missing = [p for p in self.key_outputs(name) if not (self.root / p).exists()]
        if missing:
            return f"its output(s) {', '.join(missing)} are missing"
        return None

    def check_upstream(self, plan: list[tuple[str, Path, dict[str, Any]]]) -> None:
        """Refuse to run a step on top of an earlier step whose last attempt did not finish
        (possible with ``--only``): its files may be partial."""
        planned = [name for name, _, _ in plan]
        run = [n for n in NOTEBOOKS if n in set(self.cfg.get("run", NOTEBOOKS))]
        for i, earlier in enumerate(run):
            later = [p for p in run[i + 1:] if p in planned]
            if earlier in planned or not later or not self.attempts(earlier).exists():
                continue
            stale = _written_since(self.root, _attempt_started_ns(self.attempts(earlier)))
            listed = (f" (files it wrote: {', '.join(stale[:8])}"
                      + (f" and {len(stale) - 8} more" if len(stale) > 8 else "") + ")"
                      if stale else "")
            only = [n for n in run if n in planned or n == earlier]
            raise PipelineError(
                f"{earlier}'s last attempt did not finish, so its files may be partial"
                f"{listed}; {later[0]} would read them. Run it first: "
                f"{self._command(only)}")

    def _command(self, only: Sequence[str]) -> str:
        head = self.rerun.split(" --only ")[0]
        return f"{head} --only {' '.join(only)}"

    # running ---------------------------------------------------------------------------------
    def last_digest(self) -> str:
        """The digest of the last step this folder finished ('' when none has)."""
        run = [n for n in NOTEBOOKS if n in set(self.cfg.get("run", NOTEBOOKS))]
        for name in reversed(run):
            try:
                return str(read_json(self.stamp(name)).get("digest", ""))
            except (OSError, ValueError, AttributeError):
                continue
        return ""

    def run(self, plan: list[tuple[str, Path, dict[str, Any]]], force: bool,
            timeout: int | None, upstream: str = "") -> None:
        """Run (or skip, when unchanged) each planned step; stamps and manifest after each.

        The manifest's top-level ``seed`` is the profile's; each step records ``wall_s`` (this
        pass), ``compute_wall_s`` (this pass plus the measured time of earlier attempts that
        were interrupted or failed, :class:`_Attempts`) and ``attempts``; the parameters are
        recorded with ``results_dir`` relative to the manifest (``.``), so no absolute path is
        committed."""
        self.check_upstream(plan)
        (self.root / "executed").mkdir(parents=True, exist_ok=True)
        sources = _sources_digest()
        env = {k: os.environ.get(k, "") for k in ("HMQAT_DATA_DIR", "HMQAT_WEIGHTS_DIR")}
        _set_top_level(self.manifest, seed=int(self.cfg.get("common", {}).get("seed", 0)))
        for name, nb_in, step_params in plan:
            if name == params.ACROSS_MODELS:   # it reads other folders: their files count too
                upstream += _model_results_digest(self.root.parent,
                                                  step_params.get("model_results", []))
            digest = _step_digest(nb_in, step_params, upstream, sources, env)
            parts = _digest_parts(nb_in, step_params, upstream, sources, env)
            upstream = digest
            why = "--force" if force else self.why_run(name, digest, parts)
            if why is None:
                print(f"[hmqat] {name}: unchanged since its last run, skipped", flush=True)
                update_manifest(self.manifest, name, status="skipped (unchanged)")
                continue
            self.run_step(name, nb_in, step_params, {"digest": digest, "parts": parts}, why,
                          timeout)

    def run_step(self, name: str, nb_in: Path, step_params: dict[str, Any],
                 identity: dict[str, Any], why: str, timeout: int | None) -> None:
        """One step: stamp removed first, attempt recorded before the kernel starts, stamp
        written only after success; a failure lists the files it wrote as stale."""
        stamp, nb_out = self.stamp(name), self.executed(name)
        stamp.unlink(missing_ok=True)
        if name in _manifest_steps(self.manifest):   # its old entry is no longer current
            update_manifest(self.manifest, name, status="running")
        self.mark_readers_stale(name)
        print(f"[hmqat] {name}: running ({self.profile} profile; {why}) -> "
              f"executed/{nb_out.name}", flush=True)
        attempt = _Attempts(self.attempts(name))
        try:
            with attempt:
                _run_notebook(nb_in, nb_out, step_params, timeout)
            wall, earlier = attempt.elapsed, attempt.earlier
            atomic_write_json(stamp, {**identity, "wall_s": wall,
                                      "compute_wall_s": wall + sum(earlier),
                                      "key_outputs": self.key_outputs(name)})
            update_manifest(self.manifest, name, status="ran", wall_s=round(wall, 1),
                            compute_wall_s=round(wall + sum(earlier), 1),
                            attempts=1 + len(earlier), failure=None, stale=None,
                            parameters={**step_params, "results_dir": "."},
                            executed=str(nb_out.relative_to(self.root)), **_code_version())
        except BaseException as exc:
            if attempt.started_ns is None:      # its record could not be written: not started
                raise
            stale = self.record_failure(name, attempt, exc)
            if isinstance(exc, (PipelineError, OSError, ReportingError)):
                cause = str(exc) if not isinstance(exc, OSError) else _os_error(exc)
                marked = (f"; {len(stale)} file(s) it wrote are listed as stale in "
                          f"{self.manifest.name}" if stale else "")
                raise PipelineError(
                    f"{cause.rstrip('.')}; executed copy of the failed attempt: {nb_out}"
                    f"{marked}; fix the cause, then rerun (finished steps are skipped): "
                    f"{self.rerun}") from None
            raise
        print(f"[hmqat] {name}: done in {wall / 60:.1f} min"
              + (f" ({(wall + sum(earlier)) / 60:.1f} min with {len(earlier)} earlier "
                 "interrupted attempt(s))" if earlier else ""), flush=True)

    def mark_readers_stale(self, name: str) -> list[str]:
        """Once ``name`` reruns, the steps that read its results (:func:`params.readers`) hold
        an earlier run's: their stamps are removed (so they are never "unchanged, skipped"
        again) and their manifest entries say ``stale``, naming the cause and the command that
        reruns them, until they run again. Return the steps marked. This is what keeps a
        partial rerun (``--only``, or a fresh clone with committed results) from presenting the
        files of the steps it did not rerun as its own."""
        recorded, marked = _manifest_steps(self.manifest), []
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for reader in params.readers(name):
            self.stamp(reader).unlink(missing_ok=True)
            if reader in recorded and recorded[reader].get("status") != "stale":
                update_manifest(self.manifest, reader, status="stale", stale={
                    "because": f"{name} reran after it", "since_utc": since,
                    "rerun": self._command([reader])})
                marked.append(reader)
        if marked:
            print(f"[hmqat] {name} reruns, so the results of {', '.join(marked)} are an earlier "
                  f"run's: marked stale in {self.manifest.name} until they rerun", flush=True)
        return marked

    def record_failure(self, name: str, attempt: "_Attempts", exc: BaseException) -> list[str]:
        """List the files the failed attempt wrote as stale in the manifest (best effort: on a
        full disk the entry may stay ``running``); return them."""
        stale = _written_since(self.root, attempt.started_ns) if attempt.started_ns else []
        error = _one_line(exc) if not isinstance(exc, KeyboardInterrupt) else "interrupted"
        try:
            update_manifest(self.manifest, name, status="failed",
                            failure={"error": error[:500], "stale_outputs": stale,
                                     "executed": str(self.executed(name).relative_to(
                                         self.root))})
        except (OSError, ValueError):
            pass
        return stale


def _manifest_steps(path: Path) -> dict[str, Any]:
    """The ``steps`` of the manifest at ``path`` ({} when absent or unreadable)."""
    try:
        steps = read_json(path).get("steps", {}) if path.exists() else {}
    except (ValueError, OSError, AttributeError):
        return {}
    return steps if isinstance(steps, dict) else {}


def _executed_failure(nb_out: Path) -> str | None:
    """None when ``nb_out`` is an executed copy of a run that finished without an error, else
    what is wrong with it."""
    rel = f"executed/{nb_out.name}"
    if not nb_out.exists():
        return f"its executed copy {rel} is missing"
    try:
        nb = json.loads(nb_out.read_text(encoding="utf-8"))
        meta = nb.get("metadata", {}).get("papermill", {})
        errors = [o for c in nb.get("cells", []) for o in c.get("outputs", [])
                  if o.get("output_type") == "error"]
    except (ValueError, OSError, AttributeError):
        return f"its executed copy {rel} is unreadable"
    if (isinstance(meta, dict) and meta.get("exception")) or errors:
        return f"its executed copy {rel} shows a failed run"
    return None


def _written_since(root: Path, started_ns: int | None) -> list[str]:
    """Files under ``root`` (relative, sorted; the pipeline's records, executed copies and
    caches left out) modified at or after ``started_ns`` (``time.time_ns()``)."""
    if not started_ns:
        return []
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        if rel_dir == Path("."):
            dirnames[:] = [d for d in dirnames if d not in _NOT_OUTPUTS]
            filenames = [f for f in filenames if f not in _NOT_OUTPUTS]
        for f in filenames:
            try:
                if os.stat(Path(dirpath) / f).st_mtime_ns >= started_ns:
                    out.append((rel_dir / f).as_posix())
            except OSError:
                continue
    return sorted(out)


def _attempt_started_ns(path: Path) -> int | None:
    """When the unfinished attempt recorded in ``path`` started (None when not recorded)."""
    try:
        started = read_json(path).get("current", {}).get("started_ns")
    except (ValueError, OSError, AttributeError):
        return None
    return int(started) if isinstance(started, int) else None


class _Attempts:
    """Measured time of one step across attempts (docs/method.md §8, provenance).

    On entry the file ``.stamps/<step>.attempts.json`` is read: an attempt recorded there that
    never finished (killed, crashed, failed) moves its measured ``elapsed_s`` to ``earlier``.
    The file is then written before the step runs (so a disk too full for it stops the step
    before anything else is written), with the attempt's start (``started_ns``,
    ``time.time_ns()``: files modified since then are the attempt's). While the step runs, a
    daemon thread rewrites the current attempt's ``elapsed_s`` every ``beat_s`` seconds, so a
    ``kill -9`` loses at most that much. On success the file is removed (its time is in the
    manifest); on failure this attempt stays recorded for the next run (a write that fails
    then, e.g. on a full disk, never hides the step's own error)."""

    def __init__(self, path: Path, beat_s: float = 10.0):
        self.path, self.beat_s = path, beat_s
        self.earlier: list[float] = []
        self.elapsed = 0.0
        self.started_ns: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self) -> None:
        self.elapsed = time.perf_counter() - self._t0
        atomic_write_json(self.path, {"earlier_s": self.earlier,
                                      "current": {"elapsed_s": round(self.elapsed, 1),
                                                  "started_ns": self.started_ns}})

    def _beat(self) -> None:
        while not self._stop.wait(self.beat_s):
            try:
                self._write()
            except OSError:     # a full disk: the next beat (or the step's own error) tells
                pass

    def __enter__(self) -> "_Attempts":
        if self.path.exists():
            try:
                old = read_json(self.path)
                self.earlier = [float(x) for x in old.get("earlier_s", [])]
                if old.get("current"):
                    self.earlier.append(float(old["current"].get("elapsed_s", 0.0)))
            except (ValueError, TypeError, AttributeError, OSError):
                print(f"[hmqat] warning: {self.path} unreadable; earlier attempts not counted",
                      flush=True)
        self._t0 = time.perf_counter()
        self.started_ns = time.time_ns()
        self._write()
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if exc_type is None:
            self.elapsed = time.perf_counter() - self._t0
            self.path.unlink(missing_ok=True)
            return
        try:
            self._write()
        except OSError:
            pass


def _set_top_level(manifest_path: Path, *, seed: int) -> None:
    """Create the manifest (provenance of :func:`hmqat.runtime.manifest`) or update its
    top-level ``seed``; hand-written fields of an older manifest that no code writes are
    dropped, so the report reads only what the pipeline measured."""
    try:
        data = read_json(manifest_path) if manifest_path.exists() else manifest(seed=seed)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{manifest_path} is not valid JSON ({exc}); move it away and rerun "
                            "(the pipeline writes a new one)") from None
    if not isinstance(data, dict) or not isinstance(data.get("steps", {}), dict):
        raise PipelineError(f"{manifest_path} is not a manifest (expected a JSON object whose "
                            "'steps' is an object); move it away and rerun")
    for stale in ("timing_note",):
        data.pop(stale, None)
    for step in data.get("steps", {}).values():
        step.pop("compute_note", None)
    data["seed"] = seed
    atomic_write_json(manifest_path, data)


def _code_version() -> dict[str, Any]:
    """The code a step ran with: git sha and dirty flag of the checkout, and when it finished
    (the manifest's top-level provenance is from its first step, which may be older)."""
    prov = manifest()
    return {"git_sha": prov["git_sha"], "git_dirty": prov["git_dirty"],
            "finished_utc": prov["time_utc"]}


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; every failure is one ``[hmqat] ERROR: ...`` line (exit status 1)."""
    ap = argparse.ArgumentParser(prog="python -m hmqat.study.pipeline", description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="quick", help=f"one of {', '.join(PROFILES)}")
    ap.add_argument("--only", nargs="*", help="run only these notebooks (by name; at least one)")
    ap.add_argument("--force", action="store_true", help="rerun steps even if unchanged")
    ap.add_argument("--timeout", type=int, default=None, help="per-cell timeout in seconds")
    ap.add_argument("--results-root", type=Path, default=None,
                    help="folder holding <profile>/ (default: results/ of the repository)")
    ap.add_argument("--models", nargs="+", default=None,
                    help="a profile with models: (params/models.yaml): run only these")
    args = ap.parse_args(argv)
    try:
        if args.timeout is not None and args.timeout < 1:
            raise PipelineError(f"--timeout {args.timeout}: expected a number of seconds >= 1 "
                                "(leave it out for no per-cell limit)")
        run_pipeline(args.profile, only=args.only, force=args.force, timeout=args.timeout,
                     results_root=args.results_root, models=args.models)
    except PipelineError as exc:
        print(f"[hmqat] ERROR: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


# --------------------------------------------------------------------------------------------
# What the notebooks use
# --------------------------------------------------------------------------------------------
class _ImageFolderSplit(torch.utils.data.Dataset):
    """One ImageNet split for the notebooks: the ImageFolder of
    :func:`hmqat.data.imagenet_loaders` (with its transforms), plus what the CIFAR path's
    TensorImages offers: ``classes``, ``source`` and ``subset(indices)`` (decoded with the
    validation transform, Resize + CenterCrop, to uint8 TensorImages; used for calibration)."""

    def __init__(self, folder: Any, image_size: int):
        self.folder, self.image_size = folder, image_size
        self.classes = tuple(folder.classes)
        self.source = str(folder.root)

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int) -> Any:
        return self.folder[i]

    def subset(self, indices: Sequence[int] | torch.Tensor):
        import torchvision.transforms as T   # ImageNet only: CIFAR kernels skip its ~1.5 s
        idx = [int(i) for i in indices]
        tf = T.Compose([T.Resize(int(self.image_size * 256 / 224)),
                        T.CenterCrop(self.image_size), T.PILToTensor()])
        images = torch.stack([tf(self.folder.loader(self.folder.samples[i][0])) for i in idx])
        labels = torch.tensor([self.folder.targets[i] for i in idx], dtype=torch.long)
        return TensorImages(images, labels, self.classes, self.source)


@dataclass
class Study:
    """Paths, data and earlier results of one profile's run, for the notebooks.

    ``results_dir`` holds ``figures/ tables/ data/ checkpoints/ cache/`` (docs/design.md §4).
    ``dataset="imagenet"``: an ImageFolder root (``HMQAT_DATA_DIR``, ``train/`` + ``val/``)
    read through :func:`hmqat.data.imagenet_loaders` at ``image_size`` (224 for torchvision
    ResNet18/50); ``data(split)`` is then a map-style dataset with ``subset()`` for calibration.
    """

    results_dir: str
    profile: str = "smoke"
    arch: str = "resnet20"
    dataset: str = "cifar10"
    seed: int = 0
    val_size: int = 0                 # images held out as "val" (docs/method.md §8)
    val_from: str = "test"            # the split "val" is drawn from: test (unseen) or train
    device: str = "auto"
    batch_size: int = 128
    n_synthetic: int = 512
    pretrained: bool = True
    image_size: int = 224             # ImageNet only
    workers: int | None = None        # ImageNet DataLoader workers (None: HMQAT_WORKERS or 8)
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "Study":
        """The notebooks' one set-up call, ``study = Study.from_params(globals())``: the Study
        fields among a notebook's (papermill) parameters; fields a notebook does not declare
        keep their defaults."""
        names = [f.name for f in fields(cls) if not f.name.startswith("_")]
        if "results_dir" not in params:
            raise PipelineError("Study.from_params needs results_dir among the parameters (every "
                                "notebook's parameters cell declares it)")
        return cls(**{n: params[n] for n in names if n in params})

    def __post_init__(self) -> None:
        self.root = Path(self.results_dir)
        for sub in ("figures", "tables", "data", "checkpoints", "cache"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.dev = resolve_device(self.device)
        seed_everything(self.seed)

    # paths ---------------------------------------------------------------------------------
    def path(self, kind: str, name: str) -> Path:
        return self.root / kind / name

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def tables(self) -> Path:
        return self.root / "tables"

    # data ----------------------------------------------------------------------------------
    def data(self, split: str):
        """The split as :class:`hmqat.data.TensorImages` (cached in the process).

        ``val`` is ``val_size`` images (seeded by ``seed``, class-stratified) held out of the
        split ``val_from`` names (:func:`hmqat.data.load_dataset`): with ``val_from="test"``
        (the study's profiles) ``val`` and ``test`` are the two halves of the test split and
        ``train`` is every training image, so neither published nor fine-tuned weights have
        seen ``val``. Every choice and intermediate score uses ``val``; ``test`` is read once
        per final run (docs/method.md §8)."""
        if split not in ("train", "val", "test"):
            raise PipelineError(f"unknown split {split!r}; use 'train', 'val' or 'test'")
        if split == "val" and self.val_size <= 0:
            raise PipelineError(f"the {self.profile} profile holds out no validation split "
                                "(val_size: 0); set common.val_size in params/"
                                f"{self.profile}.yaml, e.g. val_size: 5000 with val_from: test")
        key = f"data:{split}"
        if key not in self._cache:
            if self.dataset == "imagenet":
                if self.val_size > 0:
                    raise PipelineError("val_size > 0 is not supported for ImageNet (its "
                                        "validation split is the test split here); set "
                                        "common.val_size: 0 in the imagenet profile")
                train, val = self._imagenet()
                folder = (train if split == "train" else val).dataset
                self._cache[key] = _ImageFolderSplit(folder, self.image_size)
            else:
                self._cache[key] = data.load_dataset(self.dataset, split,
                                                     n_synthetic=self.n_synthetic, seed=self.seed,
                                                     val_size=self.val_size, val_seed=self.seed,
                                                     val_from=self.val_from)
        return self._cache[key]

    def _imagenet(self):
        """(train, val) DataLoaders of :func:`hmqat.data.imagenet_loaders` (cached)."""
        if "imagenet" not in self._cache:
            workers = self.workers if self.workers is not None else int(
                os.environ.get("HMQAT_WORKERS", min(8, os.cpu_count() or 1)))
            self._cache["imagenet"] = data.imagenet_loaders(
                None, batch_size=self.batch_size, workers=workers, image_size=self.image_size,
                distributed=is_distributed(), seed=self.seed, num_classes=None, device=self.dev)
        return self._cache["imagenet"]

    @property
    def input_size(self) -> tuple[int, int, int, int]:
        """One input's shape, for MAC counts (``search.model_inputs(..., input_size=)``)."""
        side = self.image_size if self.dataset == "imagenet" else 32
        return (1, 3, side, side)

    @property
    def split_label(self) -> str:
        """Where validation and test come from, for every caption (docs/method.md §8)."""
        if self.dataset == "imagenet":
            return "no validation split; test = ImageNet's validation set"
        if self.val_size <= 0:
            return "no validation split; test = the whole test split"
        n_test = len(self.data("test"))
        if self.val_from == "test":
            return (f"val = {self.val_size:,} test-split images (stratified, seed {self.seed}), "
                    f"test = the other {n_test:,}")
        return (f"val = {self.val_size:,} training images (stratified, seed {self.seed}; seen "
                f"by published weights), test = the test split ({n_test:,})")

    @property
    def data_label(self) -> str:
        return f"{describe_data(self.dataset, self.data('test').source)}; {self.split_label}"

    def subtitle(self) -> str:
        return f"{self.arch}, {self.data_label}, {self.profile} profile"

    def train_loader(self, seed: int | None = None):
        if self.dataset == "imagenet":  # seed: the loaders' (Study.seed)
            return self._imagenet()[0]
        return data.make_loader(self.data("train"), self.batch_size, train=True,
                                seed=self.seed if seed is None else seed, drop_last=True,
                                device=self.dev)

    def val_loader(self):
        """The validation hold-out (``data("val")``), in order: for every choice and every
        intermediate score (docs/method.md §8)."""
        return data.make_loader(self.data("val"), 500, device=self.dev)

    def test_loader(self):
        if self.dataset == "imagenet":
            return self._imagenet()[1]
        return data.make_loader(self.data("test"), 500, device=self.dev)

    # models --------------------------------------------------------------------------------
    @property
    def fp32_checkpoint(self) -> Path:
        return self.path("checkpoints", f"fp32-{self.arch}.pt")

    def fp32_model(self, checkpoint: str | os.PathLike = "") -> torch.nn.Module:
        """The fine-tuned FP32 model written by notebook 00, or the weights in ``checkpoint``
        (notebook 01's ``fp32_checkpoint`` parameter; relative to the repository root, not to
        notebooks/). Either file may be an hmqat checkpoint or a plain state dict; weights of
        another architecture are refused naming both (:func:`hmqat.models.load_weights`)."""
        if checkpoint:
            path = param_path(checkpoint)
            fix = (f"set fp32_checkpoint (now {str(checkpoint)!r}; a relative path starts at "
                   f"the repository root {ROOT}) in params/{self.profile}.yaml to an existing "
                   f"file, or to '' for notebook 00's checkpoint")
            state = read_weights(path, fix=fix)      # a bad file fails before the data loads
            model = create_model(self.arch, num_classes=len(self.data("train").classes))
            return fit_weights(model, state, path, arch=self.arch).to(self.dev).eval()
        ck = self.fp32_checkpoint
        if not ck.exists():
            raise PipelineError(f"{ck} not found: run notebook 00_fp32_baseline first "
                                f"({self.command('00_fp32_baseline')})")
        model = create_model(self.arch, num_classes=len(self.data("train").classes))
        load_weights(model, ck, arch=self.arch)
        return model.to(self.dev).eval()

    @property
    def data_key(self) -> dict[str, Any]:
        """The data identity of this study's QAT runs (:func:`hmqat.study.runs.data_key`): the
        training split, the split runs are scored on while training (``val`` when held out,
        else ``test``) and the batch size; with a hold-out also its size and seed. Without one
        the key is :func:`~hmqat.study.runs.data_key` of (train, test), the same key the
        torchrun command line (:mod:`hmqat.study.cli`) computes, so its runs are found here."""
        if self.val_size <= 0:
            return data_key(self.data("train"), self.data("test"), batch_size=self.batch_size)
        key = data_key(self.data("train"), self.data("val"), batch_size=self.batch_size)
        key = {**key, "eval_split": "val", "val_size": self.val_size, "val_seed": self.seed}
        return key if self.val_from == "train" else {**key, "val_from": self.val_from}

    @property
    def qat_dir(self) -> Path:
        """Where :func:`hmqat.study.runs.qat_run` keeps notebook 03's runs (one folder each;
        ``python -m hmqat.study.cli qat --results DIR`` trains into the same place)."""
        return self.path("checkpoints", "qat")

    def omega(self, variant: str = "joint"):
        """The Ω table notebook 01 wrote for ``variant`` (index: layers, columns: int bits)."""
        p = self.path("data", f"omega_{variant}.csv")
        if not p.exists():
            raise PipelineError(f"{p} not found: run notebook 01_sensitivity of the "
                                f"{self.profile} profile first ({self.command('01_sensitivity')})")
        table = pd.read_csv(p, index_col=0)
        table.columns = [int(c) for c in table.columns]
        return table

    # small JSON results ----------------------------------------------------------------------
    def save_json(self, name: str, obj: Any) -> Path:
        p = self.path("data", name)
        atomic_write_json(p, obj)
        return p

    def load_json(self, name: str) -> Any:
        p = self.path("data", name)
        if not p.exists():
            writer = [s for s, outs in KEY_OUTPUTS.items() if f"data/{name}" in outs]
            raise PipelineError(f"{p} not found: an earlier notebook of the {self.profile} "
                                "profile has not run yet" + (
                                    f"; run {writer[0]} first ({self.command(writer[0])})"
                                    if writer else ""))
        return json.loads(p.read_text())

    def command(self, step: str) -> str:
        """The command line that runs ``step`` into this study's results folder (as error
        messages suggest it; :func:`rerun_command`)."""
        root = self.root.resolve()
        if root.name == self.arch and root.parent.name == self.profile:   # <profile>/<arch>/
            return rerun_command(self.profile, [step], results_root=root.parent.parent,
                                 models=[self.arch])
        return rerun_command(self.profile, [step], results_root=root.parent)


if __name__ == "__main__":
    sys.exit(main())
