"""Low-level data-parallel helpers over PyTorch's own torch.distributed + DDP (docs/design.md §2).

:func:`hmqat.train.fit` (and so ``finetune``/``qat``) notices an initialised process group and
runs data-parallel by itself with these helpers; the torchrun command line for real runs is
:mod:`hmqat.study.cli`.

What happens under ``torchrun`` (details in :func:`hmqat.train.fit`):

* :func:`init_from_env` reads RANK/WORLD_SIZE/LOCAL_RANK, picks NCCL on CUDA (one GPU per local
  rank) and gloo on CPU;
* the model is wrapped in ``DistributedDataParallel`` after the activation steps are calibrated:
  DDP's constructor broadcasts every parameter and buffer from rank 0, so the learned step sizes
  and the quantizers' ``initialized``/``bit_width`` buffers agree on every rank;
* each rank reads its shard of every epoch (TensorLoader ``rank``/``world_size`` or a
  DistributedSampler), evaluation sums are all-reduced, and only rank 0 prints and writes files.

BatchNorm: by default each rank normalises with its own batch statistics and the running
statistics are rank 0's (DDP broadcasts buffers at every forward); ``--sync-bn``
(``TrainConfig.sync_bn``) uses ``torch.nn.SyncBatchNorm`` (CUDA only) so BN sees the global
batch, which matters when the per-GPU batch is small (< 32). AMP is not used: the LSQ quantizers
need float32 step sizes and rounding.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import warnings
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler, Subset

from .data import TensorLoader
from .runtime import resolve_device

__all__ = [
    "DistributedConfigError",
    "all_reduce_sum",
    "all_reduce_min",
    "barrier",
    "broadcast_object",
    "cleanup",
    "init_from_env",
    "is_distributed",
    "is_initialized",
    "is_main",
    "launched_by_torchrun",
    "local_rank",
    "process_group",
    "rank",
    "refresh_quantizers",
    "shard_eval_loader",
    "shard_train_loader",
    "sync_buffers",
    "sync_quantizers",
    "unwrap",
    "world_size",
    "wrap_ddp",
]


class DistributedConfigError(ValueError):
    """A distributed setting cannot work as given (the message says what to change)."""


# --------------------------------------------------------------------------------------------
# Process group
# --------------------------------------------------------------------------------------------
def launched_by_torchrun() -> bool:
    """True when torchrun (or an equivalent launcher) set RANK and WORLD_SIZE."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_initialized() -> bool:
    """True when a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank (0 without a process group)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    """Rank on this node (torchrun's LOCAL_RANK; 0 when unset)."""
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    """True on rank 0, the process that prints and writes files."""
    return rank() == 0


def is_distributed() -> bool:
    """True when a process group with more than one process is running."""
    return world_size() > 1


def init_from_env(backend: str | None = None, *, device: str | torch.device | None = None,
                  timeout_s: float = 1800.0) -> torch.device:
    """Join the process group torchrun describes and return this process's device.

    Without torchrun's variables (a plain ``python`` run) nothing is initialised and the device
    is :func:`hmqat.runtime.resolve_device` of ``device``. Under torchrun: CUDA (when available
    and ``device`` is not "cpu") -> ``cuda:LOCAL_RANK``, made current, backend NCCL; otherwise
    CPU with gloo. Calling it again returns the same device.
    """
    want = resolve_device(device)
    if not launched_by_torchrun():
        return want
    if want.type == "cuda":
        n = torch.cuda.device_count()
        if local_rank() >= n:
            raise DistributedConfigError(
                f"LOCAL_RANK={local_rank()} but this node has {n} CUDA device(s); launch with "
                f"torchrun --nproc_per_node={n} (or fewer), or set CUDA_VISIBLE_DEVICES")
        dev = torch.device("cuda", local_rank())
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not is_initialized():
        backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=dev if dev.type == "cuda" else None)
    return dev


def cleanup() -> None:
    """Destroy the default process group (if any)."""
    if is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(backend: str | None = None, *, device: str | torch.device | None = None
                  ) -> Iterator[torch.device]:
    """``with process_group() as dev:`` -- :func:`init_from_env`, then :func:`cleanup`."""
    dev = init_from_env(backend, device=device)
    try:
        yield dev
    finally:
        cleanup()


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if not is_initialized():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def comm_device() -> torch.device:
    """Where collective buffers must live: the current GPU for NCCL, else the CPU."""
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (float64; identity without a group)."""
    if not is_initialized():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_min(value: int) -> int:
    """The smallest ``value`` over all ranks (e.g. steps per epoch, so no rank waits forever)."""
    if not is_initialized():
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=comm_device())
    return box[0]


# --------------------------------------------------------------------------------------------
# Model state across ranks
# --------------------------------------------------------------------------------------------
def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DDP wrapper (or ``model`` itself)."""
    return model.module if isinstance(model, DDP) else model


def _quantizers(model: nn.Module) -> list[nn.Module]:
    """The quantizers of ``model``: modules with an ``initialized`` and a ``bit_width`` buffer
    and python mirrors of them (``hmqat.quant.LSQQuantizer``), found by those attributes so this
    low-level module does not import the method layer."""
    return [m for m in unwrap(model).modules()
            if hasattr(m, "mark_initialized") and isinstance(getattr(m, "bit_width", None),
                                                             torch.Tensor)]


def refresh_quantizers(model: nn.Module) -> None:
    """Re-read each quantizer's python-side mirrors from its buffers.

    ``LSQQuantizer`` keeps python copies of its ``initialized``, ``bit_width`` and ``is_signed``
    buffers (no device sync per forward). A broadcast that overwrites the buffers -- DDP's
    constructor, or :func:`sync_quantizers` -- must be followed by this call (so every rank also
    uses rank 0's calibrated activation signs).
    """
    for q in _quantizers(model):
        q.mark_initialized(bool(q.initialized))
        if int(q.bit_width) != q.bits:
            q.bits = int(q.bit_width)
        if bool(q.is_signed) != q.signed:
            q._set_signed(bool(q.is_signed))


def sync_quantizers(model: nn.Module, src: int = 0) -> None:
    """Broadcast every quantizer's step, ``initialized``, ``bit_width`` and ``is_signed`` from
    rank ``src``.

    Needed after a step was (re)initialised lazily from a rank's own batch during training
    (e.g. ``set_bits(reinit="mse")`` without data): without it the ranks' steps would drift
    apart, since DDP only averages gradients. Collective: call it on every rank.
    """
    if not is_initialized():
        return
    with torch.no_grad():
        for q in _quantizers(model):
            for t in (q.step.data, q.initialized, q.bit_width, q.is_signed):
                dist.broadcast(t, src)
    refresh_quantizers(model)


def sync_buffers(model: nn.Module, src: int = 0) -> None:
    """Broadcast every buffer (BN running statistics, quantizer flags) from rank ``src``."""
    if not is_initialized():
        return
    with torch.no_grad():
        for b in unwrap(model).buffers():
            dist.broadcast(b, src)
    refresh_quantizers(model)


def wrap_ddp(model: nn.Module, device: str | torch.device | None = None, *, sync_bn: bool = False,
             find_unused_parameters: bool = False) -> DDP:
    """Wrap ``model`` in DistributedDataParallel (already wrapped: returned as is).

    Wrap AFTER :func:`hmqat.quant.calibrate_activations`: the constructor broadcasts parameters
    and buffers from rank 0, which makes the calibrated steps identical on every rank (this
    function then refreshes the quantizers' python mirrors). ``sync_bn`` converts BatchNorm
    layers to ``torch.nn.SyncBatchNorm`` in place (same parameters, same state-dict keys; CUDA
    only). ``find_unused_parameters`` is needed when some parameters get no gradient in a step,
    e.g. quantizer steps during an FP32 stage of :class:`hmqat.transitions.PrecisionTransition`.
    """
    if isinstance(model, DDP):
        return model
    if not is_initialized():
        raise DistributedConfigError("wrap_ddp needs a process group: launch with torchrun and "
                                     "call hmqat.distributed.init_from_env() first")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    if sync_bn:
        if dev.type != "cuda":
            raise DistributedConfigError(
                f"sync_bn=True needs CUDA devices (torch.nn.SyncBatchNorm trains on GPUs only), "
                f"but the model is on {dev}; use sync_bn=False (per-rank BN statistics) or "
                f"freeze_bn=True on CPU")
        nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ddp = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None,
              find_unused_parameters=find_unused_parameters)
    refresh_quantizers(model)
    return ddp


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------
def shard_train_loader(loader: Any) -> Any:
    """This rank's view of a training loader.

    * :class:`hmqat.data.TensorLoader` with ``world_size=1``: a copy with this rank's
      ``rank``/``world_size`` (each epoch's permutation is split like DistributedSampler; the
      augmentation generator is offset by rank);
    * a DataLoader over a DistributedSampler: returned as is, with its worker seed offset by
      rank (otherwise every rank draws the same augmentation stream);
    * any other DataLoader: an error (build it with ``imagenet_loaders(distributed=True)``);
    * other iterables (lists of batches): used as given, with a warning.
    """
    if not is_distributed():
        return loader
    if isinstance(loader, TensorLoader):
        if loader.world_size == 1:
            return dataclasses.replace(loader, rank=rank(), world_size=world_size())
        if (loader.rank, loader.world_size) != (rank(), world_size()):
            raise DistributedConfigError(
                f"train loader is sharded as rank {loader.rank}/{loader.world_size} but this "
                f"process is rank {rank()}/{world_size()}; pass rank=hmqat.distributed.rank(), "
                f"world_size=hmqat.distributed.world_size() (or leave them at 0/1)")
        return loader
    if isinstance(loader, DataLoader):
        if not isinstance(loader.sampler, DistributedSampler):
            raise DistributedConfigError(
                "under torchrun the training DataLoader needs a DistributedSampler (each rank "
                "must read its own shard); use hmqat.data.imagenet_loaders(..., distributed=True)")
        if loader.generator is not None and not getattr(loader, "_hmqat_rank_seeded", False):
            seed = loader.generator.initial_seed() + 7_919 * (rank() + 1)
            loader.generator = torch.Generator().manual_seed(seed)
            loader._hmqat_rank_seeded = True
        return loader
    if is_main():
        warnings.warn("fit() under torchrun got a plain iterable as train loader; every rank "
                      "uses the batches it was given (shard them yourself)")
    return loader


def shard_eval_loader(loader: Any) -> tuple[Any, bool]:
    """``(loader, sharded)``: this rank's disjoint share of an evaluation loader.

    Every sample is evaluated exactly once over all ranks (no DistributedSampler padding), so
    summing correct/loss/n over ranks gives the single-process numbers. TensorLoaders and
    DataLoaders with a sequential sampler are split by index ``rank::world_size``; a
    DataLoader over a DistributedSampler counts as sharded (its padding repeats up to
    ``world_size - 1`` samples); anything else is evaluated whole on every rank (not sharded).
    """
    if not is_distributed():
        return loader, False
    r, w = rank(), world_size()
    if isinstance(loader, TensorLoader):
        n = len(loader.data)
        return dataclasses.replace(loader, data=loader.data.subset(range(r, n, w)), rank=0,
                                   world_size=1), True
    if isinstance(loader, DataLoader):
        if isinstance(loader.sampler, DistributedSampler):
            return loader, True
        if isinstance(loader.sampler, SequentialSampler) and loader.batch_size is not None:
            part = Subset(loader.dataset, range(r, len(loader.dataset), w))
            return DataLoader(part, loader.batch_size, shuffle=False,
                              num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                              pin_memory=loader.pin_memory, drop_last=loader.drop_last), True
    return loader, False
