"""The frontier walk: every budget's model from one QAT run (docs/method.md §5, issue 26).

:func:`walk_frontier` trains the largest config of ``configs`` from FP32 (point 0, the way
:func:`hmqat.study.runs.qat_run` trains a run), then walks down the list: each next point starts
from the previous point's trained model and runs :func:`hmqat.transitions.frontier_transition`
(switch only the layers whose width changes, data re-init of their steps, scale-only phase with
its step-movement report, short fine-tune). Every point is evaluated (``top1`` with one bit per
image, ``test_top1`` when a test loader is given) and exported (``model.hmq``;
``model.onnx`` when onnx is installed, else the record says why not).

A point lives in ``run_dir/<point id>/``: ``spec.json``, its checkpoints (``checkpoint.pt`` for
point 0; ``scale.pt`` and ``finetune.pt`` after), ``model.hmq``, ``model.onnx`` and
``result.json`` (written last, atomically). The point id is the first 16 hex digits of sha256
over its spec: point 0's is qat_run's spec (bit config, recipe, schedule, quantizer options,
FP32 fingerprint, data key, test read) marked as walk point 0; point k's holds its
**predecessor's id**, its bit config, the walk's phase settings and the phases' TrainConfigs.
So a changed FP32 model, data split, recipe or earlier config changes every later id, while a
rerun of the same walk reads finished points back from ``result.json`` and resumes an
interrupted point from its checkpoints, bit-identically on CPU (fit's guarantee; the data
re-init is deterministic and each phase reseeds torch with ``cfg.seed``).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn as nn

from .. import export, onnx_export, quant, train
from ..distributed import is_distributed
from ..runtime import (CheckpointError, atomic_write_json, load_checkpoint, model_fingerprint,
                       read_json, resolve_device)
from ..transitions import (Distillation, Recipe, WalkConfig, WalkError, frontier_transition,
                           make_callbacks, phase_configs, validate_frontier)
from .runs import _record, data_key, pack_correct, recipe_batches, run_identity

__all__ = ["WalkPoint", "load_point_model", "walk_frontier"]


@dataclass
class WalkPoint:
    """One point of a walk: its index, label, id and folder, and its result record."""

    point: int
    label: str
    run_id: str
    folder: Path
    record: dict[str, Any]

    @property
    def cached(self) -> bool:
        """True when the record was read from ``result.json`` instead of computed now."""
        return bool(self.record.get("cached"))


def _digest(spec: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


def _per_epoch(loader: Any, cfg: train.TrainConfig) -> int:
    """Optimizer steps per epoch of ``cfg`` on ``loader`` (as :func:`hmqat.train.fit` counts)."""
    n = len(loader)
    return min(n, cfg.max_steps_per_epoch) if cfg.max_steps_per_epoch else n


def _test_read(model: nn.Module, test_loader: Iterable) -> dict[str, Any]:
    """The test split's fields of a record, as qat_run writes them."""
    ev = train.evaluate(model, test_loader, per_image=True)
    return {"test_top1": ev["top1"], "test_loss": ev["loss"], "n_test": ev["n"],
            "test_correct": pack_correct(ev["correct"])}


def _export(model: nn.Module, folder: Path, example: torch.Tensor, onnx: bool
            ) -> dict[str, Any]:
    """``model.hmq`` always; ``model.onnx`` when asked and onnx is installed, else the reason."""
    meta = export.save_packed(model, folder / "model.hmq")
    out: dict[str, Any] = {"hmq": str(folder / "model.hmq"), "hmq_bytes": meta["file_bytes"],
                           "onnx": None, "onnx_skipped": None}
    if not onnx:
        out["onnx_skipped"] = "walk_frontier(onnx=False)"
        return out
    try:
        info = onnx_export.export_onnx(model, folder / "model.onnx", example)
    except ImportError as exc:
        out["onnx_skipped"] = str(exc)
    else:
        out.update(onnx=info["path"], onnx_bytes=info["bytes"], onnx_weights=info["weights"])
    return out


def load_point_model(fp32_model: nn.Module, point: WalkPoint, *,
                     device: str | torch.device | None = None) -> nn.Module:
    """The trained model of a walk point, from its final checkpoint in its folder (the latent
    float weights, as training left them: the exact model the next point starts from). For
    inference the ``.hmq`` file (:func:`hmqat.export.load_packed`) gives identical outputs."""
    record = point.record
    q = record["quant"]
    dev = resolve_device(device) if device is not None else next(fp32_model.parameters()).device
    model = quant.quantize_model(fp32_model, record["bit_config"], a_bits=q["a_bits"],
                                 policy=q["policy"], per_channel=q["per_channel"],
                                 init=q["init"]).to(dev)
    path = Path(point.folder) / record["checkpoint"]
    ck = load_checkpoint(path, map_location=dev)
    if not isinstance(ck, dict) or ck.get("identity", {}).get("run_info", {}).get("run") \
            != record["spec_hash"]:
        raise CheckpointError(f"{path} is not the final checkpoint of walk point "
                              f"{record['label']!r} (its identity differs from the spec in "
                              f"result.json); delete the folder {point.folder} to retrain the "
                              f"point")
    model.load_state_dict(ck["model"])
    return model.eval()


def _specs(fp32_key: str, points: list[tuple[str, dict[str, int], float]], recipe: Recipe,
           cfg: train.TrainConfig, walk: WalkConfig, data: Mapping[str, Any], per_epoch: int,
           quant_opts: Mapping[str, Any], final_test: bool) -> list[dict[str, Any]]:
    """Every point's spec, chained: point k's holds point k−1's id. Computed before anything
    trains (ids do not depend on results), so a rerun finds every folder."""
    _, spec0 = run_identity(fp32_key, points[0][1], recipe, cfg, data, **quant_opts)
    spec0 = {**spec0, "walk_point": 0}
    if final_test:
        spec0["final_test"] = True
    specs = [spec0]
    for k, (_, config, _) in enumerate(points[1:], start=1):
        scale_cfg, ft_cfg = phase_configs(cfg, walk, per_epoch)
        specs.append({
            "walk_point": k, "predecessor": _digest(specs[-1])[:16], "bit_config": config,
            "walk": walk.to_dict(), "recipe": recipe.to_dict(),
            "scale_train": None if scale_cfg is None else scale_cfg.key(),
            "finetune_train": ft_cfg.key(), "final_test": final_test})
    return specs


@dataclass
class _Context:
    """What every point of one walk shares."""

    fp32_model: nn.Module
    recipe: Recipe
    cfg: train.TrainConfig
    walk: WalkConfig
    train_loader: Any
    eval_loader: Iterable
    test_loader: Iterable | None
    quant_opts: dict[str, Any]
    calib_batches: Iterable | None
    device: str | torch.device | None
    input_size: tuple[int, ...]
    onnx: bool
    batches: list | None          # training batches the recipe's callbacks need
    example: torch.Tensor         # one input for the ONNX export
    epochs_per_point: int         # loader epochs one transition reads


def _train_point(ctx: _Context, k: int, label: str, config: dict[str, int],
                 model: nn.Module | None, folder: Path, digest: str
                 ) -> tuple[nn.Module, dict[str, Any]]:
    """Train (or resume) point ``k``: QAT from FP32 for point 0, else the transition from the
    previous point's ``model`` (in place). Returns the model and the record so far."""
    callbacks = make_callbacks(ctx.recipe, teacher=ctx.fp32_model, batches=ctx.batches)
    extra: dict[str, Any] = {"changed_layers": [], "bits_before": {}, "step_median": None,
                             "step_max": None, "scale_phase_moved": None,
                             "step_movement_layers": {}}
    if k == 0:
        q = ctx.quant_opts
        model, history = train.qat(
            ctx.fp32_model, config, ctx.train_loader, None,
            replace(ctx.cfg, checkpoint=str(folder / "checkpoint.pt")), a_bits=q["a_bits"],
            policy=q["policy"], per_channel=q["per_channel"], init=q["init"],
            calib_batches=ctx.calib_batches, callbacks=callbacks, device=ctx.device,
            run_info={"run": digest})
        checkpoint = "checkpoint.pt"
    else:
        assert model is not None
        scale_cbs = ([Distillation(ctx.fp32_model, ctx.recipe.distillation)]
                     if ctx.recipe.distillation.enabled else [])
        extra = frontier_transition(
            model, config, ctx.train_loader, ctx.cfg, ctx.walk, folder=folder,
            epoch_offset=ctx.cfg.epochs + (k - 1) * ctx.epochs_per_point,
            scale_callbacks=scale_cbs, finetune_callbacks=callbacks, device=ctx.device,
            run_info={"run": digest}, label=label)
        history = extra.pop("history")
        del extra["epochs"], extra["steps"]
        checkpoint = "finetune.pt"
    t0 = time.perf_counter()
    ev = train.evaluate(model, ctx.eval_loader, per_image=True)
    record = _record(digest[:16], digest, model, history, ev, 0.0, ctx.recipe, callbacks,
                     ctx.quant_opts["policy"], ctx.input_size)
    record.update(extra, correct=pack_correct(ev["correct"]), point=k, label=label,
                  checkpoint=checkpoint, eval_s=time.perf_counter() - t0)
    return model, record


def _evaluate_and_export(ctx: _Context, model: nn.Module, folder: Path) -> dict[str, Any]:
    """The test read (when a test loader is given) and the exports, with their times."""
    out: dict[str, Any] = {}
    if ctx.test_loader is not None:
        t0 = time.perf_counter()
        out.update(_test_read(model, ctx.test_loader), test_eval_s=time.perf_counter() - t0)
    t0 = time.perf_counter()
    out.update(_export(model, folder, ctx.example, ctx.onnx))
    out["export_s"] = time.perf_counter() - t0
    return out


def walk_frontier(fp32_model: nn.Module, configs: Sequence[tuple[str, Mapping[str, int]]]
                  | Mapping[str, Mapping[str, int]], recipe: Recipe | Mapping[str, Any] | None,
                  train_loader: Any, eval_loader: Iterable, cfg: train.TrainConfig,
                  walk: WalkConfig | Mapping[str, Any], *, run_dir: str | Path,
                  test_loader: Iterable | None = None, a_bits: int | None = 4,
                  policy: str = "first_last_8", per_channel: bool = True, init: str = "lsq",
                  calib_batches: Iterable | None = None,
                  device: str | torch.device | None = None,
                  input_size: tuple[int, ...] = (1, 3, 32, 32),
                  data: Mapping[str, Any] | None = None, fp32_key: str | None = None,
                  onnx: bool = True) -> list[WalkPoint]:
    """Walk ``configs`` (``[(label, bit_config), ...]`` from the largest model to the smallest)
    with one QAT run and a transition per further point; train, resume or read back each point.

    Args:
        fp32_model: the FP32 model (left untouched; the teacher when the recipe distils).
        configs: checked up front by :func:`hmqat.transitions.validate_frontier` (valid configs,
            distinct labels, strictly decreasing size).
        recipe: point 0's QAT recipe and every fine-tune's (distillation, oscillation handling,
            BN re-estimation; the scale-only phase distils too when the recipe does). The walk
            makes its own transitions, so ``recipe.transition`` must be off.
        cfg: point 0's training schedule (as for :func:`hmqat.train.qat`); the phases of later
            points derive from it (:func:`hmqat.transitions.phase_configs`).
        walk: :class:`hmqat.transitions.WalkConfig` (or its dict): scale_steps, scale_lr,
            finetune_steps, finetune_lr, moved_threshold.
        run_dir: where the point folders live (module docstring).
        test_loader: the test split, read once per point into ``test_top1`` (``top1`` is the
            ``eval_loader`` split's); part of the identity, as in qat_run.
        a_bits, policy, per_channel, init, calib_batches, device, input_size, data, fp32_key:
            as in :func:`hmqat.study.runs.qat_run`.
        onnx: also export ``model.onnx`` (skipped, with the reason recorded, without onnx).

    Returns one :class:`WalkPoint` per config. Its record has qat_run's fields (top1, loss,
    n_val, correct, size_mb, compression, bops, avg_bits, bit_config, history, train_s,
    eval_s, ...) and: ``point``, ``label``, ``predecessor``, ``changed_layers`` and
    ``bits_before`` (empty for point 0, which comes from FP32), ``step_median``,
    ``step_max``, ``scale_phase_moved``, ``step_movement_layers`` (None / {} for point 0 or
    without a scale phase), ``steps`` (optimizer steps at this point) and
    ``cumulative_steps`` (up to and including it: the budget of a direct QAT at equal
    steps), ``hmq``/``onnx`` paths (``onnx_skipped``: why not), ``checkpoint`` (the final
    one's name in the folder, see :func:`load_point_model`), ``eval_s``, ``test_eval_s``,
    ``export_s`` and ``wall_s`` (their sum with ``train_s``, the phases' epoch times).
    """
    if recipe is None or isinstance(recipe, Mapping):
        recipe = Recipe.from_dict(recipe)
    if not isinstance(recipe, Recipe):
        raise WalkError(f"recipe must be a hmqat.transitions.Recipe or its dict, got "
                        f"{type(recipe).__name__}")
    if recipe.transition.enabled:
        raise WalkError(f"recipe {recipe.describe()!r} enables precision transitions, but the "
                        f"frontier walk makes its own (only the layers whose width changes); "
                        f"pass the recipe with transition.enabled=False")
    walk = WalkConfig.from_value(walk)
    if not isinstance(cfg, train.TrainConfig):
        raise WalkError(f"cfg must be a hmqat.train.TrainConfig, got {type(cfg).__name__}")
    if is_distributed():
        raise WalkError("walk_frontier runs in one process (each point's evaluation and export "
                        "are single-process); launch it without torchrun")
    points = validate_frontier(fp32_model, configs, a_bits=a_bits, per_channel=per_channel,
                               policy=policy, input_size=input_size)
    per_epoch = _per_epoch(train_loader, cfg)
    if per_epoch < 1:
        raise WalkError("the training loader yields no batch; use more training data or a "
                        "smaller batch_size")
    if data is None:
        data = data_key(train_loader, eval_loader,
                        batch_size=getattr(train_loader, "batch_size", 0) or 0)
    quant_opts = {"a_bits": a_bits, "policy": policy, "per_channel": per_channel, "init": init}
    specs = _specs(fp32_key or model_fingerprint(fp32_model), points, recipe, cfg, walk, data,
                   len(train_loader), quant_opts, test_loader is not None)
    steps = [cfg.epochs * per_epoch] + [walk.scale_steps + walk.finetune_steps] * (len(points) - 1)
    scale_cfg, ft_cfg = phase_configs(cfg, walk, len(train_loader))
    ctx = _Context(fp32_model, recipe, cfg, walk, train_loader, eval_loader, test_loader,
                   quant_opts, calib_batches, device, input_size, onnx,
                   recipe_batches(recipe, train_loader, calib_batches),
                   next(iter(eval_loader))[0][:1],
                   (0 if scale_cfg is None else scale_cfg.epochs) + ft_cfg.epochs)
    run_dir = Path(run_dir)
    out: list[WalkPoint] = []
    model: nn.Module | None = None      # the previous point's trained model, when in memory
    for k, ((label, config, _), spec) in enumerate(zip(points, specs)):
        digest = _digest(spec)
        folder = run_dir / digest[:16]
        if (folder / "result.json").exists():
            record = {**read_json(folder / "result.json"), "label": label, "cached": True}
            out.append(WalkPoint(k, label, digest[:16], folder, record))
            model = None
            continue
        atomic_write_json(folder / "spec.json", spec)
        if k > 0 and model is None:
            model = load_point_model(fp32_model, out[-1], device=device)
        model, record = _train_point(ctx, k, label, config, model, folder, digest)
        record.update(_evaluate_and_export(ctx, model, folder))
        record.update(
            predecessor=spec.get("predecessor"), steps=steps[k],
            cumulative_steps=sum(steps[:k + 1]), walk=walk.to_dict(), quant=quant_opts,
            wall_s=(record["train_s"] + record["eval_s"] + record.get("test_eval_s", 0.0)
                    + record["export_s"]))
        atomic_write_json(folder / "result.json", record)
        out.append(WalkPoint(k, label, digest[:16], folder, {**record, "cached": False}))
    return out
