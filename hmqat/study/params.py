"""The schema of ``params/<profile>.yaml`` and its checker (docs/method.md §1, "Pipeline").

A profile file has three top-level sections::

    run: [00_fp32_baseline, ...]     # optional: the notebooks to run (default: all, in order)
    common: {arch: resnet20, ...}    # every notebook's shared parameters
    notebooks:
      03_qat: {qat_epochs: 2, ...}   # one section per notebook (a common key may be overridden)

:func:`read_profile` parses the file (a YAML error names the file, line and column; a key given
twice is an error) and :func:`validate` checks it against :data:`COMMON` and :data:`NOTEBOOK_KEYS`
before any notebook runs: unknown sections and keys, wrong types and values out of range raise
:class:`ParamsError` naming the file, the section, the key and what is expected; every key of
``common`` and of the notebooks in ``run`` must be set.

    >>> from hmqat.study import params
    >>> cfg = params.read_profile("params/quick.yaml")      # parsed and validated
"""
from __future__ import annotations

import math
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..models import CIFAR_RESNET_DEPTHS, TORCHVISION_ARCHS
from ..quant import INIT_METHODS, POLICIES, SUPPORTED_BITS
from ..sensitivity import VARIANTS
from ..transitions import Recipe

__all__ = ["ACROSS_MODELS", "ALSO_READS", "COMMON", "NOTEBOOKS", "NOTEBOOK_KEYS", "Key",
           "ParamsError", "UPSTREAM", "check_value", "read_profile", "readers", "validate"]

NOTEBOOKS = ("00_fp32_baseline", "01_sensitivity", "02_bit_allocation", "03_qat",
             "04_ablations", "05_report", "06_budget", "07_frontier_walk", "08_across_models")
#: The notebook that compares models; in a profile with ``models:`` it runs once, after every
#: model's steps, in ``results/<profile>/`` (the others run per model in ``<profile>/<arch>/``).
ACROSS_MODELS = "08_across_models"

# The steps each notebook reads results of (in chain order). A step counts as done when all its
# key outputs (hmqat.study.pipeline.KEY_OUTPUTS, {arch}: the study's architecture) exist.
UPSTREAM: dict[str, tuple[str, ...]] = {
    "00_fp32_baseline": (),
    "01_sensitivity": ("00_fp32_baseline",),
    "02_bit_allocation": ("00_fp32_baseline", "01_sensitivity"),
    "03_qat": ("00_fp32_baseline", "01_sensitivity", "02_bit_allocation"),
    "04_ablations": ("00_fp32_baseline", "01_sensitivity", "02_bit_allocation"),
    "05_report": ("00_fp32_baseline", "01_sensitivity", "02_bit_allocation", "03_qat"),
    "06_budget": ("00_fp32_baseline", "01_sensitivity", "02_bit_allocation"),
    "07_frontier_walk": ("00_fp32_baseline", "01_sensitivity", "02_bit_allocation"),
    "08_across_models": (),   # reads other profiles' finished studies (model_results)
}
#: Results a notebook reads when they exist but does not need (05 reports 04's ablation table).
ALSO_READS: dict[str, tuple[str, ...]] = {"05_report": ("04_ablations",)}


def readers(step: str) -> tuple[str, ...]:
    """The steps whose results rest on ``step``'s (:data:`UPSTREAM` and :data:`ALSO_READS`), in
    chain order: once ``step`` reruns, what they wrote is an earlier run's."""
    return tuple(n for n in NOTEBOOKS
                 if step in UPSTREAM.get(n, ()) + ALSO_READS.get(n, ()))


class ParamsError(ValueError):
    """A parameter file is malformed, names an unknown section/key/notebook, or gives a value of
    the wrong type or range. The message names the file, section and key."""


# --------------------------------------------------------------------------------------------
# Value checks: each returns None when the value is fine, else what was expected
# --------------------------------------------------------------------------------------------
Check = Callable[[Any], "str | None"]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def integer(minimum: int = 0) -> Check:
    return lambda v: None if _is_int(v) and v >= minimum else f"an integer >= {minimum}"


def number(minimum: float = 0.0, *, strict: bool = False) -> Check:
    rel = ">" if strict else ">="

    def check(v: Any) -> str | None:
        ok = _is_number(v) and (v > minimum if strict else v >= minimum)
        return None if ok else f"a number {rel} {minimum:g}"
    return check


def optional(inner: Check) -> Check:
    return lambda v: None if v is None else (None if inner(v) is None else f"null or {inner(v)}")


def choice(options: tuple[str, ...]) -> Check:
    def check(v: Any) -> str | None:
        return None if isinstance(v, str) and v in options else f"one of {list(options)}"
    return check


def text(v: Any) -> str | None:
    return None if isinstance(v, str) else "a string"


def boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "true or false"


def list_of(inner: Check, *, min_len: int = 1) -> Check:
    def check(v: Any) -> str | None:
        if isinstance(v, list) and len(v) >= min_len and all(inner(x) is None for x in v):
            return None
        return f"a list of at least {min_len} items, each {inner(None) or 'valid'}"
    return check


def bit_width(v: Any) -> str | None:
    bits = SUPPORTED_BITS
    return None if _is_int(v) and v in bits else f"a bit width in {list(bits)}"


def bit_pair(v: Any) -> str | None:
    ok = isinstance(v, list) and len(v) == 2 and all(bit_width(b) is None for b in v)
    widths = list(SUPPORTED_BITS)
    return None if ok else f"a [weight bits, activation bits] pair of widths in {widths}"


def recipe(v: Any) -> str | None:
    if not isinstance(v, Mapping):
        return "a mapping of recipe keys (docs/method.md §5.4), e.g. {distillation: {enabled: true}}"
    try:
        Recipe.from_dict(v)
    except (TypeError, ValueError) as exc:
        return f"a valid recipe ({exc})"
    return None


def walk_point(v: Any) -> str | None:
    """A frontier-walk point: 'W<b>A<a> size' (the pick at a uniform config's size) or a
    compression ratio > 1 (hmqat.study.walk_study.frontier_points checks the rest)."""
    if isinstance(v, str) and v.startswith("W") and v.endswith(" size"):
        return None
    if _is_number(v) and v > 1:
        return None
    return "'W<b>A<a> size' or a compression ratio > 1"


def device(v: Any) -> str | None:
    ok = isinstance(v, str) and (v in ("auto", "cpu", "cuda", "mps")
                                 or (v.startswith("cuda:") and v[5:].isdigit()))
    return None if ok else "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"


@dataclass(frozen=True)
class Key:
    """One parameter: its check and a one-line description (shown in errors)."""

    check: Check
    doc: str


# --------------------------------------------------------------------------------------------
# The schema
# --------------------------------------------------------------------------------------------
_ARCHS = tuple(f"resnet{d}" for d in CIFAR_RESNET_DEPTHS) + TORCHVISION_ARCHS
COMMON: dict[str, Key] = {
    "arch": Key(choice(_ARCHS), "model architecture (a profile with models: runs each of "
                "those instead)"),
    "dataset": Key(choice(("cifar10", "synthetic", "imagenet")), "dataset"),
    "n_synthetic": Key(integer(0), "synthetic training images (dataset: synthetic)"),
    "pretrained": Key(boolean, "start from the published weights"),
    "seed": Key(integer(0), "global seed (also the validation hold-out's seed)"),
    "val_size": Key(integer(0), "images held out as the validation split (0: none; "
                    "docs/method.md §8)"),
    "val_from": Key(choice(("test", "train")), "the split validation is drawn from: test (never "
                    "seen by published or fine-tuned weights; the study's choice) or train "
                    "(for models trained from scratch)"),
    "device": Key(device, "torch device"),
    "batch_size": Key(integer(1), "training batch size"),
    "bits": Key(list_of(bit_width), "candidate weight bit widths"),
    "a_bits": Key(optional(bit_width), "activation bits (null: FP activations)"),
    "policy": Key(choice(POLICIES), "fixed-layer policy"),
    "init": Key(choice(INIT_METHODS), "step-size init"),
}
_MAX_STEPS = Key(optional(integer(1)), "cap on optimizer steps per epoch (null: whole epochs)")
NOTEBOOK_KEYS: dict[str, dict[str, Key]] = {
    "00_fp32_baseline": {
        "fp32_epochs": Key(integer(1), "FP32 fine-tuning epochs"),
        "fp32_lr": Key(number(0, strict=True), "FP32 learning rate"),
        "fp32_wd": Key(number(0), "FP32 weight decay"),
        "max_steps_per_epoch": _MAX_STEPS,
    },
    "01_sensitivity": {
        "calib_samples": Key(integer(1), "images for the Hessian traces"),
        "calib_batch": Key(integer(1), "Hessian batch size"),
        "trace_tol": Key(number(0, strict=True), "relative tolerance of the trace estimate"),
        "trace_max_probes": Key(integer(1), "most Hutchinson probes"),
        "trace_method": Key(choice(("hutchinson", "gauss_newton", "auto")),
                            "trace estimator: Hutchinson probes, exact Gauss-Newton traces "
                            "(piecewise-linear nets), or auto (exact where it applies)"),
        "fp32_checkpoint": Key(text, "FP32 checkpoint to analyse ('' = notebook 00's)"),
        "single_bits": Key(list_of(bit_width), "widths of the one-layer-at-a-time check"),
        "noise_pairs": Key(integer(1), "antithetic noise pairs per layer"),
        "noise_every": Key(integer(1), "the matched-noise control on every k-th layer (1: all)"),
        "additivity_configs": Key(integer(1), "configs of the additivity check"),
        "fixed_configs": Key(integer(1), "fixed-size configs of the Kendall check"),
        "target_compression": Key(number(1, strict=True), "size of the fixed-size configs"),
        "frontier_compressions": Key(list_of(number(1, strict=True)), "PTQ frontier budgets"),
        "frontier_random": Key(integer(0), "random configs per PTQ frontier budget"),
        "variability_sets": Key(integer(0), "disjoint calibration sets for trace variability"),
        "variability_tol": Key(number(0, strict=True), "trace tolerance of those sets"),
    },
    "02_bit_allocation": {
        "target_compressions": Key(list_of(number(1, strict=True)), "compression targets"),
        "match_uniform_bits": Key(list_of(bit_width, min_len=0), "uniform widths to match"),
        "n_candidates": Key(integer(1), "random candidates for the baselines"),
    },
    "03_qat": {
        "qat_epochs": Key(integer(1), "QAT epochs"),
        "qat_lr": Key(number(0, strict=True), "QAT learning rate"),
        "step_lr": Key(optional(number(0)), "quantizer step learning rate"),
        "qat_wd": Key(number(0), "QAT weight decay"),
        "uniform_baselines": Key(list_of(bit_pair, min_len=0), "uniform [w, a] baselines"),
        "seeds": Key(list_of(integer(0)), "training seeds of every headline run (>= 3 for a "
                     "comparison with a CI, docs/method.md §8)"),
        "recipe": Key(recipe, "transition/oscillation/distillation recipe"),
        "max_steps_per_epoch": _MAX_STEPS,
        "choice_seeds": Key(list_of(integer(0), min_len=0), "seeds of the recipe-choice "
                            "re-decision on validation (section 5; [] skips it)"),
    },
    "04_ablations": {
        "ablation_compression": Key(number(1, strict=True), "compression of the ablation configs"),
        "ablation_epochs": Key(integer(1), "QAT epochs per ablation run"),
        "qat_lr": Key(number(0, strict=True), "QAT learning rate"),
        "step_lr": Key(optional(number(0)), "quantizer step learning rate"),
        "qat_wd": Key(number(0), "QAT weight decay"),
        "random_seeds": Key(list_of(integer(0)), "seeds of the random-allocation runs"),
        "max_steps_per_epoch": _MAX_STEPS,
        "ablation_groups": Key(list_of(choice(("transition", "allocation"))),
                               "row groups: the single-seed recipe rows, the allocation rows"),
        "ablation_variants": Key(optional(list_of(choice(VARIANTS))),
                                 "Ω variants of the allocation rows (null: all)"),
        "qat_level_configs": Key(integer(0), "equal-size configs spanning ΣΩ trained for the "
                                 "QAT-level check (experiment 7, §3.3; 0: off)"),
        "transition_experiment": Key(boolean, "run the seeded transition experiment (§7)"),
        "transition_val_size": Key(integer(1), "training images held out for every choice"),
        "transition_fp32_epochs": Key(integer(1), "FP32 fine-tuning epochs on train minus hold-out"),
        "transition_fp32_lr": Key(number(0, strict=True), "FP32 learning rate (hold-out model)"),
        "transition_fp32_wd": Key(number(0), "FP32 weight decay (hold-out model)"),
        "transition_fp32_max_steps": _MAX_STEPS,
        "transition_recipe": Key(recipe, "base recipe of the transition experiment"),
        "transition_steps": Key(integer(1), "total optimizer steps per run (budget A)"),
        "transition_pre_steps": Key(integer(0), "steps a ladder spends above the target width"),
        "transition_scale_only": Key(integer(0), "scale-only steps after every stage start"),
        "transition_seeds": Key(list_of(integer(0)), "paired seeds of the final runs"),
        "transition_budgets": Key(list_of(choice(("A", "B"))), "step budgets (A, B)"),
        "transition_uniform_points": Key(list_of(bit_width, min_len=0),
                                         "uniform W<b> points the chosen arm also runs at"),
        "transition_workers": Key(integer(1), "forked worker processes"),
    },
    "05_report": {},
    "06_budget": {
        "qat_lr": Key(number(0, strict=True), "QAT learning rate (notebook 03's)"),
        "step_lr": Key(optional(number(0)), "quantizer step learning rate (notebook 03's)"),
        "qat_wd": Key(number(0), "QAT weight decay (notebook 03's)"),
        "recipe": Key(recipe, "QAT recipe (notebook 03's)"),
        "seeds": Key(list_of(integer(0)), "paired training seeds at every budget"),
        "budget_steps": Key(list_of(integer(0)), "QAT budgets in optimizer steps (0: PTQ; "
                            "below an epoch: one cut epoch; above: whole epochs)"),
        "random_budgets": Key(list_of(integer(0), min_len=0), "budgets of the allocation "
                              "contrast against random same-size configs"),
        "bn_batches": Key(integer(1), "training batches for the 0-step BN re-estimation"),
        "target_half_width": Key(number(0, strict=True), "the CI half-width goal (points)"),
    },
    "07_frontier_walk": {
        "qat_epochs": Key(integer(1), "QAT epochs of a direct run (notebook 03's)"),
        "qat_lr": Key(number(0, strict=True), "QAT learning rate (notebook 03's)"),
        "step_lr": Key(optional(number(0)), "quantizer step learning rate (notebook 03's)"),
        "qat_wd": Key(number(0), "QAT weight decay (notebook 03's)"),
        "recipe": Key(recipe, "QAT recipe (notebook 03's)"),
        "max_steps_per_epoch": _MAX_STEPS,
        "seeds": Key(list_of(integer(0)), "paired seeds of the walk and the direct runs"),
        "walk_points": Key(list_of(walk_point, min_len=2), "the frontier points, largest first"),
        "walk_scale_steps": Key(integer(0), "scale-only steps after each switch"),
        "walk_scale_lr": Key(optional(number(0, strict=True)), "step lr of the scale-only phase "
                             "(null: screened on one seed on validation)"),
        "walk_screen_scale_lrs": Key(list_of(number(0, strict=True), min_len=0),
                                     "candidate scale-phase step lrs for the screen"),
        "walk_finetune_steps": Key(integer(1), "full fine-tune steps after each scale phase"),
        "walk_finetune_lr": Key(optional(number(0, strict=True)), "fine-tune lr (null: qat_lr)"),
        "walk_onnx": Key(boolean, "also export every point as ONNX"),
    },
    "08_across_models": {
        "recipe": Key(recipe, "QAT recipe of the cost probe (notebook 03's)"),
        "model_results": Key(list_of(text, min_len=0), "results folders of one model each, "
                             "relative to the results root (e.g. quick, models/resnet32)"),
        "cost_steps": Key(integer(1), "timed QAT steps per model and round (the cost probe)"),
        "cost_rounds": Key(integer(1), "interleaved rounds of the cost probe (median taken)"),
        "cost_archs": Key(list_of(choice(_ARCHS[:len(CIFAR_RESNET_DEPTHS)])),
                          "architectures the cost probe times side by side (resnet20 first: "
                          "the reference)"),
    },
}
TOP_LEVEL = ("run", "common", "notebooks", "models", "reuse")


# --------------------------------------------------------------------------------------------
# Reading and checking
# --------------------------------------------------------------------------------------------
_SHOWN = 40          # characters of a value an error message shows


def _short(v: Any) -> str:
    """``repr(v)``, cut to :data:`_SHOWN` characters: an error never echoes a whole file."""
    text = repr(v)
    return text if len(text) <= _SHOWN else text[:_SHOWN - 1] + "…"


def _describe(v: Any) -> str:
    size = f", {len(v)} {'characters' if isinstance(v, str) else 'items'}" \
        if isinstance(v, (str, list, tuple, Mapping)) and len(repr(v)) > _SHOWN else ""
    return f"{_short(v)} ({type(v).__name__}{size})"


def _names(items: list[Any]) -> str:
    """A list of names for an error message: at most three, each cut (:func:`_short`)."""
    shown = ", ".join(_short(x) for x in items[:3])
    return f"[{shown}" + (f", and {len(items) - 3} more]" if len(items) > 3 else "]")


def check_value(where: str, value: Any, key: Key) -> None:
    """Raise :class:`ParamsError` ``"<where> = <value>: expected ... (<doc>)"`` unless ``value``
    passes ``key``'s check: the schema's rules, for values given elsewhere (the command line of
    :mod:`hmqat.study.cli`)."""
    expected = key.check(value)
    if expected is not None:
        raise ParamsError(f"{where} = {_describe(value)}: expected {expected} ({key.doc})"
                          f"{_hint(value)}")


def _hint(v: Any) -> str:
    """PyYAML reads 1e-4 (no dot) as a string: say how to write it."""
    if isinstance(v, str):
        try:
            float(v)
        except ValueError:
            return ""
        return f" (YAML reads {v} as text: write it with a dot, e.g. {float(v):.1e})"
    return ""


def _check_section(path: str, section: str, values: Any, schema: Mapping[str, Key],
                   extra_ok: Mapping[str, Key] = {}) -> None:
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise ParamsError(f"{path}: section {section} is {_describe(values)}; expected a mapping "
                          f"of key: value")
    allowed = {**extra_ok, **schema}
    for key, v in values.items():
        if key not in allowed:
            raise ParamsError(f"{path}: unknown key {_short(key)} in section {section}; known "
                              f"keys: {sorted(allowed)}")
        expected = allowed[key].check(v)
        if expected is not None:
            raise ParamsError(f"{path}: {section}.{key} = {_describe(v)}; expected {expected} "
                              f"({allowed[key].doc}){_hint(v)}")


def _require(path: str, section: str, values: Mapping[str, Any] | None,
             schema: Mapping[str, Key]) -> None:
    missing = [k for k in schema if k not in (values or {})]
    if missing:
        raise ParamsError(f"{path}: section {section} does not set {missing} "
                          f"({'; '.join(f'{k}: {schema[k].doc}' for k in missing)}); every "
                          f"profile sets every parameter")


def check_names(names: Any, what: str, where: str) -> list[str]:
    """``names`` as a list of known notebook names, else :class:`ParamsError` naming the
    unknown ones and the known ones."""
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ParamsError(f"{where}: {what} is {_describe(names)}; expected a list of notebook "
                          f"names from {list(NOTEBOOKS)}")
    if not names:
        raise ParamsError(f"{where}: {what} is empty; name at least one of {list(NOTEBOOKS)}")
    unknown = [n for n in names if n not in NOTEBOOKS]
    if unknown:
        raise ParamsError(f"{where}: {what} names unknown notebooks {_names(unknown)}; known "
                          f"notebooks: {list(NOTEBOOKS)}")
    return names


def _check_models(path: str, models: Any) -> None:
    """``models:`` (optional) lists distinct architectures, each run through the per-model steps
    into ``results/<profile>/<arch>/``; :data:`ACROSS_MODELS` then runs once and compares the
    folders its ``model_results`` names (in a profile without ``models:`` it is a step like
    any other)."""
    if models is None:
        return
    if not isinstance(models, list) or not models or \
            not all(isinstance(m, str) for m in models):
        raise ParamsError(f"{path}: models is {_describe(models)}; expected a non-empty list of "
                          f"architectures from {list(_ARCHS)}")
    unknown = [m for m in models if m not in _ARCHS]
    if unknown:
        raise ParamsError(f"{path}: models names unknown architectures {_names(unknown)}; known: "
                          f"{list(_ARCHS)}")
    twice = sorted({m for m in models if models.count(m) > 1})
    if twice:
        raise ParamsError(f"{path}: models lists {twice} more than once; list each "
                          f"architecture once")


def validate(cfg: Any, path: str | os.PathLike, *, name: str | None = None) -> dict[str, Any]:
    """Check a parsed profile against the schema; return it (``{}`` sections filled in).
    Errors start with ``name`` (default: ``path``); no error shows more than a few dozen
    characters of any value."""
    path = name or str(path)
    if cfg is None:
        cfg = {}
    if not isinstance(cfg, Mapping):
        raise ParamsError(f"{path}: the file holds {_describe(cfg)}; expected a mapping with "
                          f"sections {list(TOP_LEVEL)}")
    unknown = [k for k in cfg if k not in TOP_LEVEL]
    if unknown:
        raise ParamsError(f"{path}: unknown top-level section(s) {_names(unknown)}; known "
                          f"sections: {list(TOP_LEVEL)}")
    run = check_names(cfg["run"], "run", path) if "run" in cfg else list(NOTEBOOKS)
    _check_models(path, cfg.get("models"))
    reuse = cfg.get("reuse")
    if reuse is not None and (not isinstance(reuse, str) or not reuse or "/" in reuse
                              or reuse.startswith(".")):
        raise ParamsError(f"{path}: reuse is {_describe(reuse)}; expected the name of another "
                          f"profile whose computed runs this one starts from (e.g. reuse: quick)")
    if reuse is not None and reuse == Path(path.split(" (a link")[0]).stem:
        raise ParamsError(f"{path}: reuse: {reuse} names this profile itself; name another "
                          f"profile (e.g. reuse: quick) or leave reuse out")
    if reuse is not None and cfg.get("models") is not None:
        raise ParamsError(f"{path}: reuse and models together are not supported (each model has "
                          f"its own folder); leave reuse out of a profile with models:")
    _check_section(path, "common", cfg.get("common"), COMMON)
    _require(path, "common", cfg.get("common"), COMMON)
    notebooks = cfg.get("notebooks") or {}
    if not isinstance(notebooks, Mapping):
        raise ParamsError(f"{path}: section notebooks is {_describe(notebooks)}; expected a "
                          f"mapping of notebook name: parameters")
    bad = [n for n in notebooks if n not in NOTEBOOKS]
    if bad:
        raise ParamsError(f"{path}: unknown notebook sections {_names(bad)} under notebooks; "
                          f"known notebooks: {list(NOTEBOOKS)}")
    for name, values in notebooks.items():
        _check_section(path, f"notebooks.{name}", values, NOTEBOOK_KEYS[name], extra_ok=COMMON)
    for name in run:
        _require(path, f"notebooks.{name}", notebooks.get(name), NOTEBOOK_KEYS[name])
    return {**cfg, "notebooks": {n: dict(v or {}) for n, v in notebooks.items()}}


def _strict_loader():
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader: Any, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return loader.construct_mapping(node, deep=deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return Loader


#: The largest profile file read (the shipped ones are a few KiB).
MAX_PROFILE_BYTES = 1 << 20


def _read_text(path: Path, shown: str) -> str:
    """The text of the profile file ``path`` (``shown`` names it in errors): a regular file of
    at most :data:`MAX_PROFILE_BYTES` bytes of UTF-8, else :class:`ParamsError`."""
    try:
        st = path.stat()
    except OSError as exc:
        raise ParamsError(f"{shown}: cannot read the profile ({exc.strerror}); "
                          + ("point the link at an existing file or remove it"
                             if path.is_symlink() else "check the path")) from None
    if not stat.S_ISREG(st.st_mode):
        raise ParamsError(f"{shown}: not a regular file; a profile is a YAML file "
                          f"(start from params/smoke.yaml)")
    if st.st_size > MAX_PROFILE_BYTES:
        raise ParamsError(f"{shown}: {st.st_size:,} bytes, more than a profile's "
                          f"{MAX_PROFILE_BYTES:,}; is it the right file? (start from "
                          f"params/smoke.yaml)")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ParamsError(f"{shown}: cannot read the profile ({exc.strerror})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ParamsError(f"{shown}: not UTF-8 text (byte {raw[exc.start]:#04x} at offset "
                          f"{exc.start}); is it the right file? save it as UTF-8") from None


def read_profile(path: str | os.PathLike) -> dict[str, Any]:
    """Parse and :func:`validate` a profile file. YAML errors name the file, line and column.

    A profile that is a symbolic link is named with its target; no error shows its content
    beyond a few dozen characters of the offending value, whatever the file is."""
    path = Path(path)
    shown = str(path)
    if path.is_symlink():
        shown = f"{path} (a link to {os.path.realpath(path)})"
    text = _read_text(path, shown)
    try:
        cfg = yaml.load(text, Loader=_strict_loader())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{shown}:{mark.line + 1}:{mark.column + 1}" if mark is not None else shown
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        context = getattr(exc, "context", None)
        raise ParamsError(f"{where}: YAML error: {problem[:200]}"
                          + (f" ({context[:200]})" if context else "")
                          + "; fix the file (indentation, ':' after each key, quotes)") from None
    return validate(cfg, path, name=shown)
