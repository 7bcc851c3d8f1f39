"""The papermill driver: run the study's notebooks in order for a profile (docs/design.md §2–§4).

    make reproduce                  # = python -m hmqat.study.pipeline --profile quick
    make reproduce PROFILE=paper
    python -m hmqat.study.pipeline --profile smoke --only 00_fp32_baseline 01_sensitivity

Each notebook gets the merged ``common`` + per-notebook parameters of ``params/<profile>.yaml``
(only the names its ``parameters`` cell declares), runs headlessly with papermill, and is saved
executed to ``results/<profile>/executed/``. A step whose notebook, parameters, upstream steps and
``hmqat`` sources are unchanged since its last successful run is skipped (a stamp in
``results/<profile>/.stamps/``); an interrupted step reruns and its QAT runs resume from their
checkpoints. A failing notebook stops the chain with the path of its executed copy and the
failing cell's error. ``manifest.json`` records provenance and the wall time of every step.

Notebooks use :class:`Study` for paths, data and the files earlier steps wrote.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
import papermill as pm
import torch
import torchvision.transforms as T

from .. import data
from ..data import TensorImages
from ..distributed import is_distributed
from ..models import create_model
from ..locking import LockError, results_lock
from ..runtime import (CheckpointError, atomic_write_json, atomic_write_text, load_checkpoint, manifest, read_json,
                       resolve_device, seed_everything)
from .reporting import describe_data, update_manifest
from . import params
from .runs import data_key

__all__ = ["NOTEBOOKS", "PipelineError", "Study", "load_params", "main", "run_pipeline"]

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = params.NOTEBOOKS
PROFILES = ("smoke", "quick", "paper", "imagenet")


class PipelineError(RuntimeError):
    """A notebook of the chain failed, or the profile/parameters are wrong."""


# --------------------------------------------------------------------------------------------
# Parameters and stamps
# --------------------------------------------------------------------------------------------
def load_params(profile: str, params_dir: Path | None = None) -> dict[str, Any]:
    """Read and validate ``params/<profile>.yaml``: ``{"common": {...}, "notebooks": {name:
    {...}}, "run": [...]}`` (schema: :mod:`hmqat.study.params`; errors name file, section, key)."""
    path = (params_dir or ROOT / "params") / f"{profile}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise PipelineError(f"no parameter file {path} for profile {profile!r}; known profiles: "
                            f"{known}. Run e.g. `make reproduce PROFILE=quick`.")
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


def _run_notebook(nb_in: Path, nb_out: Path, params: dict[str, Any], timeout: int | None) -> None:
    """Execute one notebook with papermill, echoing its printed lines (each run's epoch and
    top-1 lines, labelled progress bars, warnings) prefixed with its name."""
    name = nb_in.stem
    try:
        pm.execute_notebook(str(nb_in), str(nb_out), parameters=params, kernel_name="python3",
                            cwd=str(nb_in.parent), progress_bar=False, log_output=False,
                            stdout_file=_Echo(name, sys.stdout),
                            stderr_file=_Echo(name, sys.stderr),
                            extra_arguments=_KERNEL_ARGS,
                            execution_timeout=timeout, start_timeout=180)
        _relative_paths(nb_in, nb_out)
    except pm.PapermillExecutionError as exc:
        _relative_paths(nb_in, nb_out)
        raise PipelineError(
            f"notebook {nb_in.name} failed in cell {exc.exec_count}: {exc.ename}: {exc.evalue}\n"
            f"  executed copy (inspect it, fix, then rerun; finished steps are skipped): "
            f"{nb_out}") from None


def run_pipeline(profile: str = "quick", *, only: Sequence[str] | None = None,
                 results_root: Path | None = None, notebooks_dir: Path | None = None,
                 params_dir: Path | None = None, force: bool = False,
                 timeout: int | None = None) -> dict[str, Any]:
    """Run the notebooks of ``profile`` in order; return the manifest's ``steps`` dict.

    Before any notebook runs: the profile is validated (:mod:`hmqat.study.params`), every step's
    parameters are resolved against its notebook's ``parameters`` cell, and
    ``results/<profile>/.lock`` is taken (:func:`hmqat.locking.results_lock`; a second run on
    the same profile stops at once naming the holder's pid). Steps and manifest updates run
    under the lock."""
    if profile not in PROFILES and not (params_dir or ROOT / "params").joinpath(
            f"{profile}.yaml").exists():
        raise PipelineError(f"unknown profile {profile!r}; choose one of {list(PROFILES)}")
    cfg = load_params(profile, params_dir)
    for var in ("HMQAT_DATA_DIR", "HMQAT_WEIGHTS_DIR", "HMQAT_CACHE_DIR"):
        if os.environ.get(var):  # kernels run in notebooks/: make relative paths absolute
            os.environ[var] = str(Path(os.environ[var]).expanduser().resolve())
    results_dir = (results_root or ROOT / "results") / profile
    plan = _plan(cfg, profile, only, notebooks_dir or ROOT / "notebooks", results_dir)
    total = time.perf_counter()
    try:
        with results_lock(results_dir):
            _run_steps(plan, results_dir, profile, force, timeout,
                       seed=int(cfg.get("common", {}).get("seed", 0)))
    except LockError as exc:
        raise PipelineError(str(exc)) from None
    manifest_path = results_dir / "manifest.json"
    steps = json.loads(manifest_path.read_text())["steps"] if manifest_path.exists() else {}
    print(f"[hmqat] {profile}: finished in {(time.perf_counter() - total) / 60:.1f} min; "
          f"results in {results_dir}", flush=True)
    return steps


def _plan(cfg: dict[str, Any], profile: str, only: Sequence[str] | None, nb_dir: Path,
          results_dir: Path) -> list[tuple[str, Path, dict[str, Any]]]:
    """(name, notebook, parameters) of every step to run, all checked before the first runs."""
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


def _run_steps(plan: list[tuple[str, Path, dict[str, Any]]], results_dir: Path, profile: str,
               force: bool, timeout: int | None, *, seed: int = 0) -> None:
    """Run (or skip, when unchanged) each planned step; stamps and manifest after each.

    The manifest's top-level ``seed`` is the profile's; each step records ``wall_s`` (this
    pass), ``compute_wall_s`` (this pass plus the measured time of earlier attempts that were
    interrupted or failed, :class:`_Attempts`) and ``attempts``; the parameters are recorded
    with ``results_dir`` relative to the manifest (``.``), so no absolute path is committed."""
    (results_dir / "executed").mkdir(parents=True, exist_ok=True)
    sources = _sources_digest()
    env = {k: os.environ.get(k, "") for k in ("HMQAT_DATA_DIR", "HMQAT_WEIGHTS_DIR")}
    manifest_path = results_dir / "manifest.json"
    _set_top_level(manifest_path, seed=seed)
    upstream = ""
    for name, nb_in, step_params in plan:
        digest = _step_digest(nb_in, step_params, upstream, sources, env)
        upstream = digest
        stamp = results_dir / ".stamps" / f"{name}.json"
        nb_out = results_dir / "executed" / f"{name}.ipynb"
        if not force and stamp.exists() and nb_out.exists() and \
                json.loads(stamp.read_text()).get("digest") == digest:
            print(f"[hmqat] {name}: unchanged since its last run, skipped", flush=True)
            update_manifest(manifest_path, name, status="skipped (unchanged)")
            continue
        print(f"[hmqat] {name}: running ({profile} profile) -> executed/{nb_out.name}",
              flush=True)
        with _Attempts(results_dir / ".stamps" / f"{name}.attempts.json") as attempt:
            _run_notebook(nb_in, nb_out, step_params, timeout)
        wall, earlier = attempt.elapsed, attempt.earlier
        atomic_write_json(stamp, {"digest": digest, "wall_s": wall,
                                  "compute_wall_s": wall + sum(earlier)})
        update_manifest(manifest_path, name, status="ran", wall_s=round(wall, 1),
                        compute_wall_s=round(wall + sum(earlier), 1),
                        attempts=1 + len(earlier),
                        parameters={**step_params, "results_dir": "."},
                        executed=str(nb_out.relative_to(results_dir)), **_code_version())
        print(f"[hmqat] {name}: done in {wall / 60:.1f} min"
              + (f" ({(wall + sum(earlier)) / 60:.1f} min with {len(earlier)} earlier "
                 "interrupted attempt(s))" if earlier else ""), flush=True)


class _Attempts:
    """Measured time of one step across attempts (docs/method.md §8, provenance).

    On entry the file ``.stamps/<step>.attempts.json`` is read: an attempt recorded there that
    never finished (killed, crashed, failed) moves its measured ``elapsed_s`` to ``earlier``.
    While the step runs, a daemon thread rewrites the current attempt's ``elapsed_s`` every
    ``beat_s`` seconds, so a ``kill -9`` loses at most that much. On success the file is removed
    (its time is in the manifest); on failure this attempt stays recorded for the next run."""

    def __init__(self, path: Path, beat_s: float = 10.0):
        self.path, self.beat_s = path, beat_s
        self.earlier: list[float] = []
        self.elapsed = 0.0
        self._stop = threading.Event()

    def _write(self) -> None:
        self.elapsed = time.perf_counter() - self._t0
        atomic_write_json(self.path, {"earlier_s": self.earlier,
                                      "current": {"elapsed_s": round(self.elapsed, 1)}})

    def _beat(self) -> None:
        while not self._stop.wait(self.beat_s):
            self._write()

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
        self._write()
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._write()
        if exc_type is None:
            self.path.unlink(missing_ok=True)


def _set_top_level(manifest_path: Path, *, seed: int) -> None:
    """Create the manifest (provenance of :func:`hmqat.runtime.manifest`) or update its
    top-level ``seed``; hand-written fields of an older manifest that no code writes are
    dropped, so the report reads only what the pipeline measured."""
    data = read_json(manifest_path) if manifest_path.exists() else manifest(seed=seed)
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
    ap = argparse.ArgumentParser(prog="python -m hmqat.study.pipeline", description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="quick", help=f"one of {', '.join(PROFILES)}")
    ap.add_argument("--only", nargs="*", help="run only these notebooks (by name; at least one)")
    ap.add_argument("--force", action="store_true", help="rerun steps even if unchanged")
    ap.add_argument("--timeout", type=int, default=None, help="per-cell timeout in seconds")
    args = ap.parse_args(argv)
    try:
        run_pipeline(args.profile, only=args.only, force=args.force, timeout=args.timeout)
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
    val_size: int = 0                 # training images held out as "val" (docs/method.md §8)
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

        ``train`` is the training images minus the ``val`` hold-out (``val_size`` images, seeded
        by ``seed``, class-stratified: :func:`hmqat.data.split_train_val`); every choice and
        intermediate score uses ``val``, the ``test`` split is read once per final run
        (docs/method.md §8)."""
        if split not in ("train", "val", "test"):
            raise PipelineError(f"unknown split {split!r}; use 'train', 'val' or 'test'")
        if split == "val" and self.val_size <= 0:
            raise PipelineError(f"the {self.profile} profile holds out no validation split "
                                "(val_size: 0); set common.val_size in params/"
                                f"{self.profile}.yaml, e.g. val_size: 5000")
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
                                                     val_size=self.val_size, val_seed=self.seed)
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
    def data_label(self) -> str:
        return describe_data(self.dataset, self.data("test").source)

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

    def fp32_model(self) -> torch.nn.Module:
        """The fine-tuned FP32 model written by notebook 00."""
        ck = self.fp32_checkpoint
        if not ck.exists():
            raise PipelineError(f"{ck} not found: run notebook 00_fp32_baseline first "
                                f"(python -m hmqat.study.pipeline --profile {self.profile} "
                                f"--only 00_fp32_baseline)")
        model = create_model(self.arch, num_classes=len(self.data("train").classes))
        blob = load_checkpoint(ck)
        if not isinstance(blob, dict) or "model" not in blob:
            raise CheckpointError(f"{ck} is not notebook 00's checkpoint (no 'model' entry); "
                                  "delete it and rerun notebook 00_fp32_baseline")
        model.load_state_dict(blob["model"])
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
        return {**key, "eval_split": "val", "val_size": self.val_size, "val_seed": self.seed}

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
                                f"{self.profile} profile first")
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
            raise PipelineError(f"{p} not found: an earlier notebook of the {self.profile} "
                                "profile has not run yet")
        return json.loads(p.read_text())


if __name__ == "__main__":
    sys.exit(main())
