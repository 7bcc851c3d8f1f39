"""Evaluation, FP32 fine-tuning and the QAT loop (docs/design.md §3), hooks, checkpoints, resume.

One loop, :func:`fit`, serves both FP32 fine-tuning and QAT:

* SGD with momentum and a per-step cosine schedule; the quantizers' step sizes get their own
  parameter group (own learning rate, no weight decay);
* gradient-norm clipping; a NaN/inf loss, and after each epoch a NaN/inf validation loss,
  parameter or buffer (BN statistics, quantizer steps), stops the run with
  :class:`NonFiniteLossError` naming the first bad tensor, before that epoch's checkpoint is
  written (the previous one stays intact); a finite loss far above chance warns
  (:func:`warn_if_diverged`); a loader that yields no batch is an error before training;
* checkpoints hold tensors and plain containers only and are read with ``weights_only=True``
  (:func:`load_checkpoint`): a checkpoint on a shared disk cannot run code;
* a checkpoint at the end of every epoch (atomic write). Rerunning the same call resumes from it
  and reaches bit-identical final metrics on CPU (data order and augmentation depend only on
  ``(seed, epoch)``);
* :class:`Callback` hooks (``on_step_start``, ``extra_loss``, ``on_after_step``, ...) through which
  transition schedules, oscillation handling and distillation plug in without touching the loop.

    >>> from hmqat import train
    >>> cfg = train.TrainConfig(epochs=2, lr=0.01, checkpoint="runs/fp32.pt")
    >>> history = train.fit(model, train_loader, test_loader, cfg)

:func:`fit` reads top to bottom: ``_setup`` (device, loaders, optimiser), ``_resume``, then per
epoch ``_train_epoch`` → ``_validate`` → ``_end_epoch`` → :func:`check_finite` → ``_save``.

The same calls run data-parallel, unchanged, under ``torchrun --nproc_per_node=N`` once
:func:`hmqat.distributed.init_from_env` has set up the process group (see :func:`fit` and
:mod:`hmqat.distributed` for the command line). Mixed precision (AMP) is deliberately not used:
the LSQ quantizers' step sizes, rounding and gradient scale are float32 computations.
"""
from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from . import data as hdata
from . import distributed as hdist
from .distributed import all_reduce_sum, unwrap
from .models import create_model
from .quant import LSQQuantizer, calibrate_activations, quantize_model
from .runtime import (CheckpointError, atomic_torch_save, load_checkpoint, progress,
                      resolve_device, seed_everything)

__all__ = [
    "Callback",
    "CheckpointError",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainState",
    "check_finite",
    "dataset_loader",
    "evaluate",
    "finetune",
    "first_nonfinite",
    "fit",
    "load_checkpoint",
    "qat",
    "warn_if_diverged",
]


class NonFiniteLossError(FloatingPointError):
    """The loss, a validation loss, a parameter or a buffer (BN statistics, quantizer steps)
    became NaN or infinite; the run stopped without writing a checkpoint for that epoch."""


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: str | torch.device | None = None,
             max_batches: int | None = None, *, all_reduce: bool = False,
             check: bool = True,
             criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
             per_image: bool = False) -> dict[str, Any]:
    """Top-1 accuracy (percent) and mean loss of ``model`` over ``loader``: cross-entropy, or
    ``criterion`` (a batch-mean loss such as ``nn.CrossEntropyLoss()``, weighted by batch size).

    With ``check`` (default) a NaN/inf loss, parameter or buffer raises
    :class:`NonFiniteLossError` naming the first non-finite tensor, instead of reporting a top-1
    taken from NaN outputs (or from a BN layer whose infinite variance zeroes its output).

    The model runs in eval mode; its previous mode is restored afterwards. With
    ``all_reduce=True`` under torch.distributed, ``loader`` is this rank's shard (see
    :func:`hmqat.distributed.shard_eval_loader`) and the sums of correct predictions, loss and
    samples are all-reduced, so every rank returns the numbers of the whole set.

    ``per_image=True`` also returns ``correct``: a bool numpy array, one entry per image in the
    loader's order (the unit of :func:`hmqat.stats.crossed_paired_difference`, which needs
    every arm scored on the same images in the same order). Not with ``all_reduce``: a rank
    sees only its shard.
    """
    if per_image and all_reduce:
        raise ValueError("evaluate(per_image=True) needs the whole loader on one process; "
                         "evaluate the unsharded loader on rank 0 instead of all_reduce=True")
    model = unwrap(model)
    dev = resolve_device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct, loss_sum, n = 0, 0.0, 0
    hits: list[torch.Tensor] = []
    try:
        for i, (x, y) in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x, y = x.to(dev), y.to(dev)
            out = model(x)
            loss_sum += (F.cross_entropy(out, y, reduction="sum").item() if criterion is None
                         else float(criterion(out, y)) * x.shape[0])
            hit = out.argmax(1) == y
            correct += hit.sum().item()
            if per_image:
                hits.append(hit.cpu())
            n += len(y)
    finally:
        model.train(was_training)
    if all_reduce:
        correct, loss_sum, n = all_reduce_sum([correct, loss_sum, n])
        n = int(n)
    if n == 0:
        raise ValueError("evaluate() got an empty loader")
    bad = first_nonfinite(model) if check else None
    if check and (bad or not math.isfinite(loss_sum)):
        raise NonFiniteLossError(f"evaluate(): the loss is {loss_sum / n} on {n} images and "
                                 f"{bad or 'every tensor is finite (the outputs overflow)'}; no "
                                 f"top-1 is reported for a non-finite model")
    result: dict[str, Any] = {"top1": 100.0 * correct / n, "loss": loss_sum / n, "n": n}
    if per_image:
        result["correct"] = torch.cat(hits).numpy()
    return result


# --------------------------------------------------------------------------------------------
# Configuration, state and hooks
# --------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Hyper-parameters of one run of :func:`fit`. Everything here enters the resume check."""

    epochs: int = 1
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    step_lr: float | None = None      # quantizer step sizes: own lr (None -> lr)
    nesterov: bool = True
    warmup_steps: int = 0
    grad_clip: float | None = 5.0
    label_smoothing: float = 0.0
    max_steps_per_epoch: int | None = None   # cap an epoch (quick/smoke profiles)
    seed: int = 0
    checkpoint: str | None = None     # path: saved every epoch, resumed from when it exists
    log_every: int = 0                # steps between printed lines (0: once per epoch)
    freeze_bn: bool = False           # keep BN running statistics fixed (BN in eval mode)
    channels_last: bool = True        # NHWC memory format: ~20 % faster conv steps on CPU
    sync_bn: bool = False             # under torch.distributed: SyncBatchNorm (CUDA only)

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.step_lr is not None and self.step_lr < 0:
            raise ValueError(f"step_lr must be >= 0, got {self.step_lr}")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ValueError(f"max_steps_per_epoch must be >= 1 (or None for whole epochs), got "
                             f"{self.max_steps_per_epoch}: an epoch without optimizer steps "
                             "trains nothing")

    def key(self) -> dict[str, Any]:
        """The fields that define the run (all but the checkpoint path, logging and the BN
        synchronisation, which like the number of processes is how a run executes: a run may
        resume on another number of GPUs)."""
        d = asdict(self)
        for k in ("checkpoint", "log_every", "sync_bn", "channels_last"):
            d.pop(k)
        return d


@dataclass
class TrainState:
    """What callbacks see: the model, optimiser, counters and the running history."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    config: TrainConfig
    steps_per_epoch: int
    epoch: int = 0
    step: int = 0                 # global step
    loss: float = float("nan")
    history: list[dict[str, Any]] = field(default_factory=list)
    inputs: torch.Tensor | None = None

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.config.epochs

    @property
    def progress(self) -> float:
        """Fraction of training done, in [0, 1]."""
        return self.step / max(self.total_steps, 1)


class Callback:
    """Hooks into :func:`fit`. Override what you need; state_dict() is checkpointed."""

    def on_train_start(self, state: TrainState) -> None: ...
    def on_epoch_start(self, state: TrainState) -> None: ...
    def on_step_start(self, state: TrainState) -> None: ...

    def extra_loss(self, state: TrainState, outputs: torch.Tensor,
                   targets: torch.Tensor) -> torch.Tensor | None:
        """An extra term added to the task loss (dampening, distillation...)."""
        return None

    def on_after_step(self, state: TrainState) -> None: ...
    def on_epoch_end(self, state: TrainState, metrics: dict[str, Any]) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------
def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Three groups: weights (decayed), BN/bias (no decay), quantizer steps (own lr, no decay).

    Each group carries ``base_lr`` and ``lr_mult``; the loop sets ``lr = base_lr * cosine *
    lr_mult`` every step, so callbacks can warm up a group by changing its ``lr_mult``.
    """
    decay, no_decay, steps = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith(".step") or name == "step":
            steps.append(p)
        elif p.dim() <= 1:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "base_lr": cfg.lr, "name": "weights"},
        {"params": no_decay, "weight_decay": 0.0, "base_lr": cfg.lr, "name": "bn_bias"},
        {"params": steps, "weight_decay": 0.0,
         "base_lr": cfg.lr if cfg.step_lr is None else cfg.step_lr, "name": "steps"},
    ]
    for g in groups:
        g["lr"], g["lr_mult"] = g["base_lr"], 1.0
    return [g for g in groups if g["params"]]


def _cosine(step: int, total: int, warmup: int) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(total - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))


def _set_train_mode(model: nn.Module, freeze_bn: bool) -> None:
    model.train()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def _set_epoch(loader: Any, epoch: int) -> None:
    """TensorLoader.set_epoch, or DataLoader.sampler.set_epoch (DistributedSampler)."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    elif hasattr(getattr(loader, "sampler", None), "set_epoch"):
        loader.sampler.set_epoch(epoch)


def _load_checkpoint(ckpt_path: Path, identity: dict[str, Any], dev: torch.device
                     ) -> dict[str, Any] | None:
    """The checkpoint to resume from, or None. Under torch.distributed rank 0 decides whether
    it exists and every rank loads it (the path must be on a file system all nodes share)."""
    if not hdist.broadcast_object(ckpt_path.exists()):
        return None
    if not ckpt_path.exists():
        raise FileNotFoundError(f"rank {hdist.rank()} cannot see checkpoint {ckpt_path}, which "
                                "rank 0 has; put checkpoints on a file system every node shares")
    ck = load_checkpoint(ckpt_path, map_location=dev)
    if not isinstance(ck, dict) or "identity" not in ck:
        raise CheckpointError(f"{ckpt_path} is not a checkpoint written by hmqat.train.fit (no "
                              "'identity' entry); delete it or pass another checkpoint path")
    if ck["identity"] != identity:
        a, b = ck["identity"]["config"], identity["config"]
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        raise ValueError(f"checkpoint {ckpt_path} belongs to another run (differs in "
                         f"{diff or 'run_info'}); delete it or pass another checkpoint path")
    return ck


def first_nonfinite(model: nn.Module) -> str | None:
    """Name of the first parameter or floating-point buffer (BN running statistics, quantizer
    steps) holding NaN or inf, with its count of bad entries; None when all are finite."""
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in named:
            if t.is_floating_point():
                bad = int((~torch.isfinite(t.detach())).sum())
                if bad:
                    return f"{kind} {name} ({bad} of {t.numel()} values NaN/inf)"
    return None


def check_finite(model: nn.Module, metrics: dict[str, Any], *, where: str,
                 last_good: Path | None) -> None:
    """Raise :class:`NonFiniteLossError` when a loss in ``metrics`` or any parameter/buffer of
    ``model`` is NaN or inf, naming the first bad one and the checkpoint left intact. Under
    torch.distributed rank 0's verdict is broadcast, so every rank raises together."""
    bad = [f"{k}={v}" for k, v in metrics.items()
           if k.endswith("loss") and isinstance(v, float) and not math.isfinite(v)]
    tensor = first_nonfinite(model)
    if bad and tensor is None:  # finite but overflowing weights: name the largest
        name, t = max(model.state_dict().items(), key=lambda kv: float(kv[1].abs().max())
                      if kv[1].is_floating_point() and kv[1].numel() else 0.0)
        tensor = f"every tensor finite, largest |value| {float(t.abs().max()):.3g} in {name}"
    problem = hdist.broadcast_object(", ".join(bad + [tensor]) if bad or tensor else "")
    if problem:
        raise NonFiniteLossError(
            f"{where}: the model is not finite: {problem}. Nothing was saved for this epoch; "
            f"{_last_good(last_good)}. Lower the learning rate, enable grad_clip, or check the "
            f"inputs for NaN.")


DIVERGED_LOSS = 100.0  # nats: the true class gets probability < e^-100 on average


def warn_if_diverged(model: nn.Module, metrics: dict[str, Any], *, where: str) -> None:
    """A RuntimeWarning when a finite loss in ``metrics`` exceeds :data:`DIVERGED_LOSS` (chance
    level is ln C, 2.3 for 10 classes): the run diverged although every tensor is finite. The
    warning names the largest-magnitude parameter."""
    high = {k: v for k, v in metrics.items() if k.endswith("loss") and isinstance(v, float)
            and math.isfinite(v) and v > DIVERGED_LOSS}
    if high:
        name, p = max(model.named_parameters(), key=lambda kv: float(kv[1].detach().abs().max()))
        warnings.warn(f"{where}: {', '.join(f'{k}={v:.3g}' for k, v in high.items())} nats, far "
                      f"above chance level: the run has diverged (largest |parameter| "
                      f"{float(p.detach().abs().max()):.3g} in {name}); lower the learning rate",
                      RuntimeWarning, stacklevel=3)


def _last_good(path: Path | None) -> str:
    if path is None:
        return "no checkpoint is set"
    if path.exists():
        return f"the last good checkpoint {path} is unchanged"
    return f"no good epoch yet ({path} was not written)"


@dataclass
class _Run:
    """What one call of :func:`fit` works with: the plain model and what wraps it (DDP), the
    loaders, the optimiser, the callbacks and where the checkpoint lives."""

    model: nn.Module
    forward: nn.Module                # the DDP wrapper under torch.distributed, else ``model``
    train_loader: Any
    val_shard: Iterable | None
    val_sharded: bool
    state: TrainState
    callbacks: list[Callback]
    dev: torch.device
    ckpt_path: Path | None
    identity: dict[str, Any]
    main: bool
    distributed: bool
    quantizers: list[nn.Module]

    @property
    def cfg(self) -> TrainConfig:
        return self.state.config


def _steps_per_epoch(train_loader: Any, cfg: TrainConfig) -> int:
    """Optimizer steps per epoch (every rank's minimum); zero steps is an error naming why."""
    n = len(train_loader)
    if cfg.max_steps_per_epoch:
        n = min(n, cfg.max_steps_per_epoch)
    n = hdist.all_reduce_min(n)  # no rank may wait for another; all ranks raise together
    if n == 0:
        ds = getattr(train_loader, "dataset", None) or getattr(train_loader, "data", None)
        size = len(ds) if ds is not None and hasattr(ds, "__len__") else "?"
        raise ValueError(
            f"the training loader yields no batch (dataset of {size} samples, batch_size "
            f"{getattr(train_loader, 'batch_size', '?')}, drop_last="
            f"{getattr(train_loader, 'drop_last', '?')}"
            f"{'; this rank or another' if hdist.is_distributed() else ''}): no optimizer step "
            f"would run. Use more training data or a smaller batch_size.")
    return n


def _setup(model: nn.Module, train_loader: Any, val_loader: Iterable | None, cfg: TrainConfig,
           callbacks: Iterable[Callback], device: str | torch.device | None,
           run_info: dict[str, Any] | None) -> _Run:
    """Model on its device (NHWC), sharded loaders, optimiser and the run's identity."""
    ddp_model = None
    if isinstance(model, DDP):
        ddp_model, model = model, model.module
    dev = resolve_device(device) if device is not None else next(model.parameters()).device
    model.to(dev)
    if cfg.channels_last:  # same values, NHWC strides (benchmarks/qat_step.py measures the gain)
        model.to(memory_format=torch.channels_last)
    train_loader = hdist.shard_train_loader(train_loader)
    steps = _steps_per_epoch(train_loader, cfg)
    val_shard, val_sharded = (hdist.shard_eval_loader(val_loader) if val_loader is not None
                              else (None, False))
    opt = torch.optim.SGD(param_groups(model, cfg), lr=cfg.lr, momentum=cfg.momentum,
                          nesterov=cfg.nesterov)
    distributed = hdist.is_distributed()
    return _Run(model=model, forward=ddp_model if ddp_model is not None else model,
                train_loader=train_loader, val_shard=val_shard, val_sharded=val_sharded,
                state=TrainState(model, opt, cfg, steps), callbacks=list(callbacks), dev=dev,
                ckpt_path=Path(cfg.checkpoint) if cfg.checkpoint else None,
                identity={"config": cfg.key(), "run_info": run_info or {}},
                main=hdist.is_main(), distributed=distributed,
                quantizers=[m for m in model.modules() if isinstance(m, LSQQuantizer)]
                if distributed else [])


def _resume(run: _Run) -> int:
    """Restore model, optimiser, callbacks, history and RNG from the checkpoint, if any; return
    the first epoch still to train."""
    if run.ckpt_path is None:
        return 0
    ck = _load_checkpoint(run.ckpt_path, run.identity, run.dev)
    if ck is None:
        return 0
    run.model.load_state_dict(ck["model"])
    run.state.optimizer.load_state_dict(ck["optimizer"])
    for cb, s in zip(run.callbacks, ck["callbacks"]):
        cb.load_state_dict(s)
    run.state.history = ck["history"]
    start = ck["epoch"] + 1
    run.state.step = start * run.state.steps_per_epoch
    torch.set_rng_state(ck["torch_rng"])
    if run.main:
        print(f"resumed from {run.ckpt_path} after epoch {start}/{run.cfg.epochs}", flush=True)
    return start


def _wrap_ddp(run: _Run) -> None:
    """Under torch.distributed, wrap the model in DDP (after resuming: DDP broadcasts rank 0's
    parameters and buffers when it is built)."""
    if run.distributed and run.forward is run.model:
        run.forward = hdist.wrap_ddp(run.model, run.dev, sync_bn=run.cfg.sync_bn,
                                     find_unused_parameters=bool(run.callbacks))


def _train_step(run: _Run, x: torch.Tensor, y: torch.Tensor, i: int) -> torch.Tensor:
    """One optimizer step on batch (x, y); returns the detached outputs."""
    cfg, state, opt = run.cfg, run.state, run.state.optimizer
    x, y = x.to(run.dev, non_blocking=True), y.to(run.dev, non_blocking=True)
    if cfg.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    scale = _cosine(state.step, state.total_steps, cfg.warmup_steps)
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * scale * g.get("lr_mult", 1.0)
    state.inputs = x
    for cb in run.callbacks:
        cb.on_step_start(state)
    lazy_init = any(not q._init_flag for q in run.quantizers)  # inits from this rank's batch
    out = run.forward(x)
    loss = F.cross_entropy(out, y, label_smoothing=cfg.label_smoothing)
    task_loss = loss.detach()
    for cb in run.callbacks:
        extra = cb.extra_loss(state, out, y)
        if extra is not None:
            loss = loss + extra
    if not torch.isfinite(loss):
        raise NonFiniteLossError(
            f"loss became {loss.item()} at epoch {state.epoch + 1}, step {i + 1} (global step "
            f"{state.step}); nothing was written for this epoch. Lower the learning rate "
            f"(lr={cfg.lr}, step_lr={cfg.step_lr}), enable grad_clip, or check the inputs "
            f"for NaN; {_last_good(run.ckpt_path)}.")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    opt.step()
    if lazy_init:
        hdist.sync_quantizers(run.model)
    state.loss = task_loss.item()
    for cb in run.callbacks:
        cb.on_after_step(state)
    state.step += 1
    return out.detach()


def _train_epoch(run: _Run, epoch: int) -> dict[str, Any]:
    """One epoch of optimizer steps; returns its training metrics (all-reduced over ranks)."""
    cfg, state = run.cfg, run.state
    state.epoch = epoch
    _set_epoch(run.train_loader, epoch)
    _set_train_mode(run.model, cfg.freeze_bn)
    for cb in run.callbacks:
        cb.on_epoch_start(state)
    t0 = time.perf_counter()
    loss_sum, correct, seen, steps = 0.0, 0, 0, 0
    bar = progress(zip(range(state.steps_per_epoch), run.train_loader), total=state.steps_per_epoch,
                   desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   **({} if run.main else {"disable": True}))  # keeps TQDM_DISABLE working
    for i, (x, y) in bar:
        out = _train_step(run, x, y, i)
        y = y.to(out.device)
        loss_sum += state.loss * len(y)
        correct += (out.argmax(1) == y).sum().item()
        seen += len(y)
        steps += 1
        if run.main and cfg.log_every and (i + 1) % cfg.log_every == 0:
            print(f"epoch {epoch + 1} step {i + 1}/{state.steps_per_epoch} "
                  f"loss {loss_sum / seen:.4f}", flush=True)
    if steps == 0:
        raise ValueError(f"epoch {epoch + 1} ran no optimizer step: the training loader yielded "
                         f"no batch although len() is {len(run.train_loader)}; nothing was saved")
    if run.distributed:
        loss_sum, correct, seen = hdist.all_reduce_sum([loss_sum, correct, seen])
    return {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_top1": 100.0 * correct / seen,
            "lr": state.optimizer.param_groups[0]["lr"], "epoch_s": time.perf_counter() - t0}


def _validate(run: _Run) -> dict[str, float]:
    """Validation top-1 and loss on rank 0's BN statistics ({} without a validation loader)."""
    if run.val_shard is None:
        return {}
    if run.distributed:
        hdist.sync_buffers(run.model)  # every rank evaluates rank 0's BN statistics
    ev = evaluate(run.model, run.val_shard, run.dev, all_reduce=run.val_sharded, check=False)
    return {"val_top1": ev["top1"], "val_loss": ev["loss"]}


def _end_epoch(run: _Run, metrics: dict[str, Any]) -> None:
    """Callbacks' on_epoch_end, the history entry and rank 0's printed line."""
    if run.distributed:  # one wall time for all ranks (rank 0's)
        metrics["epoch_s"] = hdist.broadcast_object(metrics["epoch_s"])
    for cb in run.callbacks:
        cb.on_epoch_end(run.state, metrics)
    run.state.history.append(metrics)
    if run.main:
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in metrics.items()), flush=True)


def _save(run: _Run, epoch: int) -> None:
    """Rank 0 writes the checkpoint atomically; every rank waits for it."""
    if run.ckpt_path is None:
        return
    if run.main:
        atomic_torch_save({"identity": run.identity, "epoch": epoch, "model": run.model.state_dict(),
                      "optimizer": run.state.optimizer.state_dict(),
                      "callbacks": [cb.state_dict() for cb in run.callbacks],
                      "history": run.state.history, "torch_rng": torch.get_rng_state()},
                     run.ckpt_path)
    hdist.barrier()  # no rank reads a checkpoint rank 0 is still writing


def _finish(run: _Run) -> None:
    """Hand the plain model back in eval mode and the standard (NCHW) layout."""
    run.forward = run.model  # drop DDP's gradient hooks before the caller reuses the model
    if run.cfg.channels_last:  # NCHW and NHWC convs round differently
        run.model.to(memory_format=torch.contiguous_format)
    run.model.eval()



def fit(model: nn.Module, train_loader: Any, val_loader: Iterable | None, cfg: TrainConfig, *,
        callbacks: Iterable[Callback] = (), device: str | torch.device | None = None,
        run_info: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Train ``model`` in place and return the per-epoch history (list of dicts).

    ``train_loader`` should have ``set_epoch`` (like :class:`hmqat.data.TensorLoader`) or a
    sampler with ``set_epoch`` (DistributedSampler) for exact resume. With ``cfg.checkpoint``
    set, the state is saved after each epoch and a later call with the same config and
    ``run_info`` resumes from it; a checkpoint from a different config is an error naming the
    differing keys.

    **Under torch.distributed** (``torchrun``, after :func:`hmqat.distributed.init_from_env`;
    more than one process) the same call trains data-parallel:

    * ``model`` is wrapped in ``DistributedDataParallel`` (unless it already is). Callbacks and
      checkpoints see the plain module: ``state.model`` is never the wrapper and state-dict keys
      have no ``module.`` prefix. DDP's constructor broadcasts rank 0's parameters and buffers,
      so quantizer steps calibrated before :func:`fit` agree on every rank; a step that a
      quantizer (re)initialises lazily from a batch during training is re-broadcast from rank 0
      after that optimizer step.
    * Each rank reads its shard: an unsharded TensorLoader is re-created with this rank's
      ``rank``/``world_size`` (augmentation seeds are offset by rank), a DataLoader must use a
      DistributedSampler. ``batch_size`` is per process, so the global batch is N times larger;
      the learning rate is not rescaled.
    * Gradients are averaged by DDP before clipping and the optimizer step, so all ranks keep
      identical parameters. Train and validation metrics are sums all-reduced over ranks (the
      validation set is split without padding), so every rank returns the same history.
    * Only rank 0 prints and writes the checkpoint, followed by a barrier; on resume rank 0
      checks that the checkpoint exists and every rank loads it.
    * **BatchNorm policy.** Default (``cfg.sync_bn=False``): each rank normalises with its own
      batch statistics and the running statistics are rank 0's (DDP broadcasts buffers before
      every forward; :func:`fit` broadcasts them again before evaluating). ``cfg.sync_bn=True``
      converts BN to ``torch.nn.SyncBatchNorm`` (CUDA only; the module keeps SyncBatchNorm
      layers, which behave like BN in a single process); use it when the per-GPU batch is small.
      ``cfg.freeze_bn=True`` (BN in eval mode) makes N processes compute exactly what one
      process computes on the global batch, up to float summation order.
    * Callbacks run on every rank and must act identically on each (they do when they depend
      only on the step counter and the synchronised parameters); write files only where
      :func:`hmqat.distributed.is_main`.

    AMP is not used (float32 throughout; see the module docstring).
    """
    run = _setup(model, train_loader, val_loader, cfg, callbacks, device, run_info)
    start_epoch = _resume(run)
    _wrap_ddp(run)
    for cb in run.callbacks:
        cb.on_train_start(run.state)
    for epoch in range(start_epoch, cfg.epochs):
        metrics = _train_epoch(run, epoch)
        metrics.update(_validate(run))
        _end_epoch(run, metrics)
        where = f"epoch {epoch + 1}/{cfg.epochs}"
        check_finite(run.model, metrics, where=where, last_good=run.ckpt_path)
        warn_if_diverged(run.model, metrics, where=where)
        _save(run, epoch)
    _finish(run)
    return run.state.history


def _infer_num_classes(data: Any) -> int | None:
    classes = getattr(data, "classes", None) or getattr(getattr(data, "dataset", None),
                                                        "classes", None)
    return len(classes) if classes else None


def dataset_loader(ds: Any, batch_size: int, *, train: bool, seed: int = 0,
                   device: str | torch.device = "cpu", workers: int | None = None) -> Any:
    """A DataLoader over a map-style dataset (e.g. an ImageFolder with its transforms).

    Training: shuffled (a DistributedSampler under torch.distributed), last partial batch
    dropped. Evaluation: in order. ``workers`` defaults to ``HMQAT_WORKERS`` or min(8, CPUs);
    memory is pinned on CUDA.
    """
    if workers is None:
        workers = int(os.environ.get("HMQAT_WORKERS", min(8, os.cpu_count() or 1)))
    sampler = (DistributedSampler(ds, seed=seed, shuffle=True)
               if train and hdist.is_distributed() else None)
    return DataLoader(ds, batch_size, shuffle=train and sampler is None, sampler=sampler,
                      num_workers=workers, pin_memory=torch.device(device).type == "cuda",
                      drop_last=train, generator=torch.Generator().manual_seed(seed),
                      persistent_workers=workers > 0)


def finetune(arch: str, train_data: Any, test_data: Any, cfg: TrainConfig, *,
             batch_size: int = 128, device: str | torch.device | None = None,
             pretrained: bool = True, num_classes: int | None = None,
             sync_bn: bool | None = None) -> tuple[nn.Module, list[dict[str, Any]]]:
    """FP32 fine-tune of a (pretrained) model on ``train_data``; resumable via ``cfg.checkpoint``.

    ``train_data``/``test_data`` are :class:`hmqat.data.TensorImages` or map-style datasets
    (e.g. an ImageFolder; loaders of ``batch_size`` per process are built here, sharded under
    torch.distributed), or ready loaders such as those of :func:`hmqat.data.imagenet_loaders`.
    ``num_classes`` defaults to the number of classes of the data. ``sync_bn`` overrides
    ``cfg.sync_bn`` (see :func:`fit`).

    Needed for the JPEG mirror, whose artefacts cost the published CIFAR weights ~10 points.
    A finished checkpoint makes a rerun return at once (the loop has no epochs left).
    """
    dev = resolve_device(device)
    seed_everything(cfg.seed)
    if sync_bn is not None:
        cfg = replace(cfg, sync_bn=sync_bn)
    n_cls = num_classes if num_classes is not None else _infer_num_classes(train_data)
    model = create_model(arch, pretrained=pretrained, num_classes=n_cls).to(dev)
    info: dict[str, Any] = {"arch": arch, "pretrained": pretrained}
    if isinstance(train_data, hdata.TensorImages):
        loader = hdata.make_loader(train_data, batch_size, train=True, seed=cfg.seed,
                                   drop_last=True, device=dev, rank=hdist.rank(),
                                   world_size=hdist.world_size())
        info.update(data=train_data.source, n_train=len(train_data),
                    batch_size=batch_size * hdist.world_size())  # global batch
    else:
        loader = (dataset_loader(train_data, batch_size, train=True, seed=cfg.seed, device=dev)
                  if isinstance(train_data, Dataset) else train_data)
        ds = getattr(loader, "dataset", None)
        info.update(data=str(getattr(ds, "source", getattr(ds, "root", type(loader).__name__))),
                    n_train=len(ds) if ds is not None else None,
                    batch_size=(getattr(loader, "batch_size", None) or 0) * hdist.world_size(),
                    num_classes=n_cls)
    if isinstance(test_data, hdata.TensorImages):
        test_loader = hdata.make_loader(test_data, 500, device=dev)
    elif isinstance(test_data, Dataset):
        test_loader = dataset_loader(test_data, batch_size, train=False, device=dev)
    else:
        test_loader = test_data
    history = fit(model, loader, test_loader, cfg, device=dev, run_info=info)
    return model, history


def qat(fp32_model: nn.Module, bit_config: dict[str, int], train_loader: Any,
        val_loader: Iterable | None, cfg: TrainConfig, *, a_bits: int = 4,
        policy: str = "first_last_8", per_channel: bool = True, init: str = "lsq",
        calib_batches: Iterable | None = None, callbacks: Iterable[Callback] = (),
        device: str | torch.device | None = None, run_info: dict[str, Any] | None = None,
        sync_bn: bool | None = None) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Quantization-aware training from an FP32 model (LSQ; docs/method.md §2 "Quantizer").

    Builds a quantized copy with :func:`hmqat.quant.quantize_model` (the FP32 model is left
    untouched), initialises the activation steps on ``calib_batches`` (default: the first two
    training batches), then trains with :func:`fit`. Transition schedules, oscillation handling
    and distillation come in as ``callbacks`` (see :mod:`hmqat.transitions`).

    Under torch.distributed the training loader is sharded first (see :func:`fit`), every
    rank calibrates on its own ``calib_batches`` (default: its first two shard batches) and
    :func:`fit` then wraps the model in DDP, whose constructor broadcasts rank 0's steps; pass
    the same ``calib_batches`` on every rank to get the single-process calibration.
    ``sync_bn`` overrides ``cfg.sync_bn`` (BN policy: see :func:`fit`).
    """
    dev = resolve_device(device) if device is not None else next(fp32_model.parameters()).device
    seed_everything(cfg.seed)
    if sync_bn is not None:
        cfg = replace(cfg, sync_bn=sync_bn)
    qmodel = quantize_model(fp32_model, bit_config, a_bits=a_bits, policy=policy,
                            per_channel=per_channel, init=init).to(dev)
    train_loader = hdist.shard_train_loader(train_loader)  # before DataLoader workers start
    if calib_batches is None:
        _set_epoch(train_loader, 0)
        calib_batches = [b for _, b in zip(range(2), train_loader)]
    calibrate_activations(qmodel, calib_batches)
    info = {"bit_config": dict(bit_config), "a_bits": a_bits, "policy": policy,
            "per_channel": per_channel, "init": init, **(run_info or {})}
    history = fit(qmodel, train_loader, val_loader, cfg, callbacks=callbacks, device=dev,
                  run_info=info)
    return qmodel, history
