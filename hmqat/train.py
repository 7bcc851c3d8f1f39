"""Evaluation, FP32 fine-tuning and the QAT loop (DESIGN.md §2), with hooks, checkpoints, resume.

One loop, :func:`fit`, serves both FP32 fine-tuning and QAT:

* SGD with momentum and a per-step cosine schedule; the quantizers' step sizes get their own
  parameter group (own learning rate, no weight decay);
* gradient-norm clipping; a NaN/inf loss stops the run with :class:`NonFiniteLossError` before
  anything is written;
* a checkpoint at the end of every epoch (atomic write). Rerunning the same call resumes from it
  and reaches bit-identical final metrics on CPU (data order and augmentation depend only on
  ``(seed, epoch)``);
* :class:`Callback` hooks (``on_step_start``, ``extra_loss``, ``on_after_step``, ...) through which
  transition schedules, oscillation handling and distillation plug in without touching the loop.

    >>> from hmqat import train
    >>> cfg = train.TrainConfig(epochs=2, lr=0.01, checkpoint="runs/fp32.pt")
    >>> history = train.fit(model, train_loader, test_loader, cfg)
"""
from __future__ import annotations

import math
import os
import platform
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "Callback",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainState",
    "evaluate",
    "fit",
    "manifest",
    "progress",
    "resolve_device",
    "seed_everything",
]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the run stopped without writing a checkpoint."""


# --------------------------------------------------------------------------------------------
# Small utilities
# --------------------------------------------------------------------------------------------
def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/"auto" -> CUDA when available, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed python, numpy and torch; optionally switch torch to deterministic algorithms."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def progress(iterable: Iterable, **kw: Any):
    """tqdm: plain text when ``HMQAT_HEADLESS`` is set (papermill, CI), widgets in JupyterLab."""
    if os.environ.get("HMQAT_HEADLESS"):
        from tqdm.std import tqdm
        kw.setdefault("mininterval", float(os.environ.get("TQDM_MININTERVAL", 30)))
    else:
        from tqdm.auto import tqdm
    return tqdm(iterable, **kw)


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def manifest(seed: int | None = None, device: str | torch.device | None = None,
             **extra: Any) -> dict[str, Any]:
    """Provenance of a run: git sha and dirty flag, versions, device, seed, plus ``extra``."""
    import pandas
    import torchvision

    dev = resolve_device(device)
    return {
        "git_sha": _git("rev-parse", "HEAD") or None,
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "pandas": pandas.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(dev) + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""),
        "seed": seed,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **extra,
    }


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: str | torch.device | None = None,
             max_batches: int | None = None) -> dict[str, float]:
    """Top-1 accuracy (percent) and mean cross-entropy of ``model`` over ``loader``.

    The model runs in eval mode; its previous mode is restored afterwards.
    """
    dev = resolve_device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct, loss_sum, n = 0, 0.0, 0
    try:
        for i, (x, y) in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x, y = x.to(dev), y.to(dev)
            out = model(x)
            loss_sum += F.cross_entropy(out, y, reduction="sum").item()
            correct += (out.argmax(1) == y).sum().item()
            n += len(y)
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("evaluate() got an empty loader")
    return {"top1": 100.0 * correct / n, "loss": loss_sum / n, "n": n}


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

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.step_lr is not None and self.step_lr < 0:
            raise ValueError(f"step_lr must be >= 0, got {self.step_lr}")

    def key(self) -> dict[str, Any]:
        """The fields that define the run (all but the checkpoint path and logging)."""
        d = asdict(self)
        d.pop("checkpoint")
        d.pop("log_every")
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


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _set_train_mode(model: nn.Module, freeze_bn: bool) -> None:
    model.train()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def fit(model: nn.Module, train_loader: Any, val_loader: Iterable | None, cfg: TrainConfig, *,
        callbacks: Iterable[Callback] = (), device: str | torch.device | None = None,
        run_info: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Train ``model`` in place and return the per-epoch history (list of dicts).

    ``train_loader`` should have ``set_epoch`` (like :class:`hmqat.data.TensorLoader` or a
    DistributedSampler-backed loader) for exact resume. With ``cfg.checkpoint`` set, the state
    is saved after each epoch and a later call with the same config and ``run_info`` resumes
    from it; a checkpoint from a different config is an error naming the differing keys.
    """
    dev = resolve_device(device) if device is not None else next(model.parameters()).device
    callbacks = list(callbacks)
    model.to(dev)
    steps_per_epoch = len(train_loader)
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    opt = torch.optim.SGD(param_groups(model, cfg), lr=cfg.lr, momentum=cfg.momentum,
                          nesterov=cfg.nesterov)
    state = TrainState(model, opt, cfg, steps_per_epoch)
    identity = {"config": cfg.key(), "run_info": run_info or {}}
    ckpt_path = Path(cfg.checkpoint) if cfg.checkpoint else None

    start_epoch = 0
    if ckpt_path is not None and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=dev, weights_only=False)
        if ck["identity"] != identity:
            a, b = ck["identity"]["config"], identity["config"]
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            raise ValueError(f"checkpoint {ckpt_path} belongs to another run (differs in "
                             f"{diff or 'run_info'}); delete it or pass another checkpoint path")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        for cb, s in zip(callbacks, ck["callbacks"]):
            cb.load_state_dict(s)
        state.history = ck["history"]
        start_epoch = ck["epoch"] + 1
        state.step = start_epoch * steps_per_epoch
        torch.set_rng_state(ck["torch_rng"])
        print(f"resumed from {ckpt_path} after epoch {ck['epoch'] + 1}/{cfg.epochs}", flush=True)

    for cb in callbacks:
        cb.on_train_start(state)
    for epoch in range(start_epoch, cfg.epochs):
        state.epoch = epoch
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(epoch)
        _set_train_mode(model, cfg.freeze_bn)
        for cb in callbacks:
            cb.on_epoch_start(state)
        t0 = time.perf_counter()
        loss_sum, correct, seen = 0.0, 0, 0
        bar = progress(zip(range(steps_per_epoch), train_loader), total=steps_per_epoch,
                       desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False)
        for i, (x, y) in bar:
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            scale = _cosine(state.step, state.total_steps, cfg.warmup_steps)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * scale * g.get("lr_mult", 1.0)
            state.inputs = x
            for cb in callbacks:
                cb.on_step_start(state)
            out = model(x)
            loss = F.cross_entropy(out, y, label_smoothing=cfg.label_smoothing)
            task_loss = loss.detach()
            for cb in callbacks:
                extra = cb.extra_loss(state, out, y)
                if extra is not None:
                    loss = loss + extra
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"loss became {loss.item()} at epoch {epoch + 1}, step {i + 1} (global step "
                    f"{state.step}); nothing was written for this epoch. Lower the learning rate "
                    f"(lr={cfg.lr}, step_lr={cfg.step_lr}), enable grad_clip, or check the inputs "
                    f"for NaN. The last good checkpoint is {ckpt_path or '(none: no checkpoint set)'}.")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            state.loss = task_loss.item()
            for cb in callbacks:
                cb.on_after_step(state)
            loss_sum += state.loss * len(y)
            correct += (out.detach().argmax(1) == y).sum().item()
            seen += len(y)
            state.step += 1
            if cfg.log_every and (i + 1) % cfg.log_every == 0:
                print(f"epoch {epoch + 1} step {i + 1}/{steps_per_epoch} loss {loss_sum / seen:.4f}",
                      flush=True)
        metrics: dict[str, Any] = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1),
                                   "train_top1": 100.0 * correct / max(seen, 1),
                                   "lr": opt.param_groups[0]["lr"],
                                   "epoch_s": time.perf_counter() - t0}
        if val_loader is not None:
            ev = evaluate(model, val_loader, dev)
            metrics.update(val_top1=ev["top1"], val_loss=ev["loss"])
        for cb in callbacks:
            cb.on_epoch_end(state, metrics)
        state.history.append(metrics)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in metrics.items()), flush=True)
        if ckpt_path is not None:
            _atomic_save({"identity": identity, "epoch": epoch, "model": model.state_dict(),
                          "optimizer": opt.state_dict(),
                          "callbacks": [cb.state_dict() for cb in callbacks],
                          "history": state.history, "torch_rng": torch.get_rng_state()}, ckpt_path)
    model.eval()
    return state.history


def finetune(arch: str, train_data: Any, test_data: Any, cfg: TrainConfig, *,
             batch_size: int = 128, device: str | torch.device | None = None,
             pretrained: bool = True) -> tuple[nn.Module, list[dict[str, Any]]]:
    """FP32 fine-tune of a (pretrained) model on ``train_data``; resumable via ``cfg.checkpoint``.

    Needed for the JPEG mirror, whose artefacts cost the published CIFAR weights ~10 points.
    A finished checkpoint makes a rerun return at once (the loop has no epochs left).
    """
    from . import data as hdata
    from .models import create_model

    dev = resolve_device(device)
    seed_everything(cfg.seed)
    model = create_model(arch, pretrained=pretrained).to(dev)
    loader = hdata.make_loader(train_data, batch_size, train=True, seed=cfg.seed, drop_last=True,
                               device=dev)
    test_loader = hdata.make_loader(test_data, 500, device=dev)
    info = {"arch": arch, "pretrained": pretrained, "data": train_data.source,
            "n_train": len(train_data), "batch_size": batch_size}
    history = fit(model, loader, test_loader, cfg, device=dev, run_info=info)
    return model, history


def qat(fp32_model: nn.Module, bit_config: dict[str, int], train_loader: Any,
        val_loader: Iterable | None, cfg: TrainConfig, *, a_bits: int = 4,
        policy: str = "first_last_8", per_channel: bool = True, init: str = "lsq",
        calib_batches: Iterable | None = None, callbacks: Iterable[Callback] = (),
        device: str | torch.device | None = None, run_info: dict[str, Any] | None = None
        ) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Quantization-aware training from an FP32 model (LSQ; DESIGN.md §2 "Quantizer").

    Builds a quantized copy with :func:`hmqat.quant.quantize_model` (the FP32 model is left
    untouched), initialises the activation steps on ``calib_batches`` (default: the first two
    training batches), then trains with :func:`fit`. Transition schedules, oscillation handling
    and distillation come in as ``callbacks`` (see :mod:`hmqat.transitions`).
    """
    from .quant import calibrate_activations, quantize_model

    dev = resolve_device(device) if device is not None else next(fp32_model.parameters()).device
    seed_everything(cfg.seed)
    qmodel = quantize_model(fp32_model, bit_config, a_bits=a_bits, policy=policy,
                            per_channel=per_channel, init=init).to(dev)
    if calib_batches is None:
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(0)
        calib_batches = [b for _, b in zip(range(2), train_loader)]
    calibrate_activations(qmodel, calib_batches)
    info = {"bit_config": dict(bit_config), "a_bits": a_bits, "policy": policy,
            "per_channel": per_channel, "init": init, **(run_info or {})}
    history = fit(qmodel, train_loader, val_loader, cfg, callbacks=callbacks, device=dev,
                  run_info=info)
    return qmodel, history
