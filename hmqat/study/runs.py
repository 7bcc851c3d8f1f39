"""One trained QAT run, the way notebooks 03 and 04 and the torchrun command line all train:
:func:`qat_run` (docs/design.md §3).

Each record also keeps which images the model got right (``correct``, and ``test_correct`` with
a test read): a packed bit string, one bit per image in the loader's order
(:func:`pack_correct`), so paired comparisons can carry the finite test set's noise as well as
the seeds' (:func:`hmqat.stats.crossed_paired_difference`).

A run lives in ``run_dir/<run id>/``: ``spec.json`` (what defines it), ``checkpoint.pt`` (every
epoch, resumed after an interruption) and ``result.json`` (written atomically once the run has
finished and been evaluated; a later call reads it instead of training). The run id is the first
16 hex digits of sha256 over the bit config, activation bits, quantizer options (policy,
per-channel, step init), the recipe, the training schedule and seed (``TrainConfig.key()``), the
FP32 weights' fingerprint and the data key, so a changed FP32 checkpoint or data split gives a
new run instead of silently resuming an old one.
"""
from __future__ import annotations

import base64
import hashlib
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
import torch.nn as nn

from .. import quant, search, train
from ..distributed import is_main, shard_eval_loader
from ..runtime import atomic_write_json, model_fingerprint, read_json
from ..transitions import (BNReestimation, OscillationTracker, PrecisionTransition, Recipe,
                           make_callbacks)

__all__ = ["QATRun", "RunError", "correct_matrix", "data_key", "pack_correct", "qat_run",
           "recipe_batches", "run_identity", "unpack_correct"]


class RunError(ValueError):
    """Bad input to :func:`qat_run`; the message names the value and the fix."""


def _dataset(obj: Any) -> Any:
    """The dataset behind a loader (TensorLoader.data, DataLoader.dataset) or ``obj`` itself."""
    for attr in ("data", "dataset"):
        inner = getattr(obj, attr, None)
        if inner is not None and not callable(inner):
            return inner
    return obj


def data_key(train_data: Any, eval_data: Any, *, batch_size: int) -> dict[str, Any]:
    """What identifies a run's data: each split's source and size, and the global batch size.

    ``train_data``/``eval_data`` are datasets (:class:`hmqat.data.TensorImages`, an
    ImageFolder split) or loaders over them; the per-process batch of a torchrun launch does not
    enter, so a run trained with ``torchrun`` is found again by a single-process notebook."""
    def one(d: Any) -> dict[str, Any]:
        ds = _dataset(d)
        source = getattr(ds, "source", None) or getattr(ds, "root", None)
        if source is None:
            raise RunError(f"cannot identify the data of a {type(ds).__name__}: pass a "
                           "hmqat.data.TensorImages/TensorLoader or an ImageFolder loader, or "
                           "give qat_run(data=...) explicitly")
        return {"source": str(source), "n": len(ds)}
    return {"train": one(train_data), "eval": one(eval_data), "batch_size": int(batch_size)}


def run_identity(fp32_key: str, bit_config: Mapping[str, int], recipe: Recipe,
                 cfg: train.TrainConfig, data: Mapping[str, Any], *, a_bits: int | None,
                 policy: str, per_channel: bool, init: str) -> tuple[str, dict[str, Any]]:
    """``(run id, spec)``: the spec is everything that defines the trained weights (see the
    module docstring); the id is the first 16 hex digits of its sha256."""
    spec = {
        "bit_config": {k: int(v) for k, v in bit_config.items()},
        "recipe": recipe.to_dict(),
        "train": cfg.key(),
        "quant": {"a_bits": a_bits, "policy": policy, "per_channel": per_channel, "init": init},
        "fp32": fp32_key,
        "data": dict(data),
    }
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()
    return digest[:16], spec


def pack_correct(correct: np.ndarray) -> str:
    """One bit per image (1 = top-1 correct), packed and base64-encoded for a JSON record."""
    return base64.b64encode(np.packbits(np.asarray(correct, dtype=bool)).tobytes()).decode()


def unpack_correct(text: str, n: int) -> np.ndarray:
    """The bool array of :func:`pack_correct` for ``n`` images."""
    bits = np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8))
    if len(bits) < n or bits[n:].any():
        raise RunError(f"a packed per-image record holds {len(bits)} bits, not {n} images: "
                       "the result.json is corrupt; delete its run folder to retrain")
    return bits[:n].astype(bool)


def correct_matrix(records: Iterable[Mapping[str, Any]], key: str = "test_correct",
                   n_key: str = "n_test") -> np.ndarray | None:
    """(seeds, images) matrix of 100 × correct from run records in seed order, or None when
    any record lacks ``key`` (a run recorded before per-image results, or a sharded eval)."""
    rows = []
    for rec in records:
        if not rec.get(key):
            return None
        rows.append(100.0 * unpack_correct(rec[key], int(rec[n_key])))
    if len({len(r) for r in rows}) > 1:
        raise RunError(f"runs scored on different image counts {[len(r) for r in rows]}; "
                       "paired runs must share the evaluation split")
    return np.stack(rows) if rows else None


@dataclass
class QATRun:
    """A finished run: its id and folder, the result record, and the trained model when this
    call trained it or ``keep_model=True`` (otherwise None)."""

    run_id: str
    folder: Path
    record: dict[str, Any]
    model: nn.Module | None

    @property
    def cached(self) -> bool:
        """True when the record was read from ``result.json`` instead of trained now."""
        return bool(self.record.get("cached"))


def _record(run_id: str, digest: str, qmodel: nn.Module, history: list[dict[str, Any]],
            ev: dict[str, float], eval_s: float, recipe: Recipe, callbacks: list[Any],
            policy: str, input_size: tuple[int, ...]) -> dict[str, Any]:
    """The result record of a trained model (HAWQ-V3 accounting of :mod:`hmqat.quant`)."""
    n_params = {n: m.weight.numel() for n, m in quant.quantized_layers(qmodel).items()}
    tracker = next((c for c in callbacks if isinstance(c, OscillationTracker)), None)
    transition = next((c for c in callbacks if isinstance(c, PrecisionTransition)), None)
    last = history[-1] if history else {}
    bit_config = quant.bit_config_of(qmodel)
    record = {
        "run_id": run_id, "spec_hash": digest,
        "top1": ev["top1"], "loss": ev["loss"], "n_val": ev["n"],
        "size_mb": quant.model_size_mb(qmodel),
        "compression": quant.compression_ratio(qmodel),
        "bops": quant.bops(qmodel, policy=policy, input_size=input_size),
        "avg_bits": search.average_bits(bit_config, n_params),
        "train_s": sum(h.get("epoch_s", 0.0) for h in history),
        "eval_s": eval_s,
        "osc_frac": last.get("osc_frac", float("nan")),
        "frozen_frac": last.get("frozen_frac", float("nan")),
        "bit_config": bit_config,
        "recipe": recipe.to_dict(), "recipe_text": recipe.describe(),
        "history": history,
        "osc_log": tracker.log if tracker is not None else [],
        "transition_events": transition.events if transition is not None else [],
        "transition_diagnostics": transition.diagnostics if transition is not None else [],
        "bn_drift": next((c.log for c in callbacks if isinstance(c, BNReestimation)), []),
    }
    record["wall_s"] = record["train_s"] + eval_s
    return record


def recipe_batches(recipe: Recipe, train_loader: Any,
                   calib_batches: Iterable | None = None) -> list | None:
    """The training batches a recipe's callbacks need (data re-init, BN re-estimation), or None.

    ``calib_batches`` if given, else the first batches of ``train_loader``'s epoch 0 covering
    max(bn.images, transition.calib_batches batches) images (the loader's epoch is reset by
    :func:`hmqat.train.fit` before training, so the run sees the same data either way).
    """
    if not recipe.needs_batches:
        return None
    if calib_batches is not None:
        return list(calib_batches)
    if hasattr(train_loader, "set_epoch"):
        train_loader.set_epoch(0)
    need_batches = recipe.transition.calib_batches if recipe.transition.enabled else 0
    out, seen = [], 0
    for batch in train_loader:
        if len(out) >= need_batches and seen >= recipe.bn.images:
            break
        out.append(batch)
        seen += len(batch[0])
    return out


def qat_run(fp32_model: nn.Module, bit_config: Mapping[str, int], recipe: Recipe | Mapping,
            train_loader: Any, eval_loader: Iterable, cfg: train.TrainConfig, *,
            run_dir: str | Path, a_bits: int | None = 4, policy: str = "first_last_8",
            per_channel: bool = True, init: str = "lsq", calib_batches: Iterable | None = None,
            device: str | torch.device | None = None,
            input_size: tuple[int, ...] = (1, 3, 32, 32), data: Mapping[str, Any] | None = None,
            fp32_key: str | None = None, eval_each_epoch: bool = False,
            keep_model: bool = False, test_loader: Iterable | None = None) -> QATRun:
    """Train (or resume, or read back) one QAT run of ``bit_config`` from ``fp32_model``.

    ``recipe``: a :class:`hmqat.transitions.Recipe` or its dict. ``input_size``: one input's
    shape for the BOPs count (the study's, ``Study.input_size``). ``data``: the data key
    (default :func:`data_key` of the two loaders at ``train_loader``'s batch size; notebooks
    pass ``Study.data_key``). ``fp32_key``: the FP32 fingerprint when already computed.
    ``eval_each_epoch``: also evaluate ``eval_loader`` after every epoch (into the history).
    ``keep_model``: return the trained model even when the record is read back (the finished
    checkpoint is then loaded through :func:`hmqat.train.qat`, which trains nothing).
    ``test_loader``: the test split, read once after training into ``test_top1``/``test_loss``
    (``top1``/``loss`` are then the ``eval_loader`` split's, the validation hold-out in the
    study; docs/method.md §8); a run with a test read has its own identity. The
    device is not part of the identity: a result computed on CPU is reused on GPU and back.
    """
    if isinstance(recipe, Mapping):
        recipe = Recipe.from_dict(dict(recipe))
    if not isinstance(recipe, Recipe):
        raise RunError(f"recipe must be a hmqat.transitions.Recipe or its dict, got "
                       f"{type(recipe).__name__}; build one with Recipe.from_dict(params)")
    if data is None:
        data = data_key(train_loader, eval_loader,
                        batch_size=getattr(train_loader, "batch_size", 0) or 0)
    run_id, spec = run_identity(fp32_key or model_fingerprint(fp32_model), bit_config, recipe,
                                cfg, data, a_bits=a_bits, policy=policy,
                                per_channel=per_channel, init=init)
    if test_loader is not None:   # a run that also reads the test split is another record
        spec["final_test"] = True
        run_id = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()
                                ).hexdigest()[:16]
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()
    folder = Path(run_dir) / run_id
    result_path = folder / "result.json"
    if result_path.exists() and not keep_model:
        return QATRun(run_id, folder, {**read_json(result_path), "cached": True}, None)
    if is_main():
        atomic_write_json(folder / "spec.json", spec)
    callbacks = make_callbacks(recipe, teacher=fp32_model,
                               batches=recipe_batches(recipe, train_loader, calib_batches))
    qmodel, history = train.qat(fp32_model, dict(bit_config), train_loader,
                                eval_loader if eval_each_epoch else None,
                                replace(cfg, checkpoint=str(folder / "checkpoint.pt")),
                                a_bits=a_bits, policy=policy, per_channel=per_channel, init=init,
                                calib_batches=calib_batches, callbacks=callbacks, device=device,
                                run_info={"run": digest})
    if result_path.exists():
        return QATRun(run_id, folder, {**read_json(result_path), "cached": True}, qmodel)
    t0 = time.perf_counter()
    shard, sharded = shard_eval_loader(eval_loader)   # under torchrun: each rank its share
    ev = train.evaluate(qmodel, shard, all_reduce=sharded, per_image=not sharded)
    if test_loader is not None:
        shard, sharded = shard_eval_loader(test_loader)
        test = train.evaluate(qmodel, shard, all_reduce=sharded, per_image=not sharded)
    record = _record(run_id, digest, qmodel, history, ev, time.perf_counter() - t0, recipe,
                     callbacks, policy, input_size)
    if "correct" in ev:
        record["correct"] = pack_correct(ev["correct"])
    if test_loader is not None:
        record.update(test_top1=test["top1"], test_loss=test["loss"], n_test=test["n"])
        if "correct" in test:
            record["test_correct"] = pack_correct(test["correct"])
    if is_main():
        atomic_write_json(result_path, record)
    return QATRun(run_id, folder, {**record, "cached": False}, qmodel)
