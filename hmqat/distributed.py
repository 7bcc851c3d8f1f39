"""Data-parallel training on many GPUs and nodes with PyTorch's own torch.distributed + DDP.

:func:`hmqat.train.fit` (and so ``finetune``/``qat``) notices an initialised process group and
runs data-parallel by itself; this module holds the few helpers it uses and a small command line
for real runs. Launch with ``torchrun``; the batch size on the command line is the GLOBAL batch,
split evenly over the processes:

    # one node, 8 GPUs: FP32 fine-tune, then QAT of torchvision ResNet18 on ImageNet
    export HMQAT_DATA_DIR=/data/imagenet            # train/<wnid>/*.JPEG, val/<wnid>/*.JPEG
    torchrun --standalone --nproc_per_node=8 -m hmqat.distributed finetune --profile imagenet
    torchrun --standalone --nproc_per_node=8 -m hmqat.distributed qat --profile imagenet \\
        --fp32 runs/finetune-resnet18.pt --config my_config.json     # {"layer1.0.conv1": 4, ...}
    # uniform W4A4 baseline, SyncBN, a shorter schedule
    torchrun --standalone --nproc_per_node=8 -m hmqat.distributed qat --profile imagenet \\
        --fp32 runs/finetune-resnet18.pt --uniform 4 --a-bits 4 --epochs 30 --sync-bn
    # the notebooks' runs: read results/imagenet (FP32 checkpoint, configs.json of notebook 02)
    # and write the checkpoint where notebook 03 finds it (it then reuses the finished run)
    torchrun --standalone --nproc_per_node=8 -m hmqat.distributed qat --profile imagenet \\
        --results results/imagenet --label "HMQAT 10.34x"
    # two nodes x 8 GPUs (run on each node; $MASTER is the first node's address)
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=$MASTER:29500 \\
        --rdzv-id=hmqat-qat -m hmqat.distributed qat --profile imagenet --uniform 4 \\
        --fp32 /shared/fp32.pt --checkpoint /shared/runs/w4a4.pt
    # CPU smoke test: 2 processes, gloo, synthetic data
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 -m hmqat.distributed qat \\
        --profile smoke --uniform 4 --max-steps 2 --device cpu --checkpoint /tmp/qat.pt

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

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

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
    "main",
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
    is :func:`hmqat.train.resolve_device` of ``device``. Under torchrun: CUDA (when available
    and ``device`` is not "cpu") -> ``cuda:LOCAL_RANK``, made current, backend NCCL; otherwise
    CPU with gloo. Calling it again returns the same device.
    """
    from .train import resolve_device

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
    from .quant import LSQQuantizer

    return [m for m in unwrap(model).modules() if isinstance(m, LSQQuantizer)]


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
    from torch.utils.data import DataLoader, DistributedSampler

    from .data import TensorLoader

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
    from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler, Subset

    from .data import TensorLoader

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


# --------------------------------------------------------------------------------------------
# Command line: python -m hmqat.distributed finetune|qat ...
# --------------------------------------------------------------------------------------------
_PROFILE_KEYS = {  # CLI option -> (params section, key)
    "finetune": {"epochs": ("00_fp32_baseline", "fp32_epochs"), "lr": ("00_fp32_baseline", "fp32_lr"),
                 "wd": ("00_fp32_baseline", "fp32_wd"),
                 "max_steps": ("00_fp32_baseline", "max_steps_per_epoch")},
    "qat": {"epochs": ("03_qat", "qat_epochs"), "lr": ("03_qat", "qat_lr"),
            "step_lr": ("03_qat", "step_lr"), "wd": ("03_qat", "qat_wd"),
            "max_steps": ("03_qat", "max_steps_per_epoch"), "recipe": ("03_qat", "recipe")},
}
_COMMON_KEYS = ("arch", "dataset", "pretrained", "seed", "batch_size", "a_bits", "policy",
                "init", "n_synthetic")
_BUILTIN = {"arch": "resnet18", "dataset": "imagenet", "pretrained": True, "seed": 0,
            "batch_size": 256, "a_bits": 4, "policy": "first_last_8", "init": "mse",
            "n_synthetic": 512,
            "epochs": 1, "lr": 0.01, "step_lr": None, "wd": 1e-4, "max_steps": None,
            "recipe": {}}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="torchrun ... -m hmqat.distributed",
                                 description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Options left out come from --profile (params/<profile>"
                                        ".yaml), else from built-in ImageNet defaults.")
    ap.add_argument("command", choices=("finetune", "qat"))
    ap.add_argument("--profile", help="defaults from params/<profile>.yaml (e.g. imagenet)")
    ap.add_argument("--arch")
    ap.add_argument("--dataset", choices=("imagenet", "cifar10", "synthetic"))
    ap.add_argument("--data", help="dataset root (default: $HMQAT_DATA_DIR)")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--step-lr", type=float, help="learning rate of the quantizer steps")
    ap.add_argument("--wd", type=float, help="weight decay")
    ap.add_argument("--batch-size", type=int, help="GLOBAL batch, split over the processes")
    ap.add_argument("--max-steps", type=int, help="cap on steps per epoch")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--workers", type=int, default=8, help="DataLoader workers per process")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--fp32", help="qat: FP32 checkpoint (a fit checkpoint or a state dict)")
    ap.add_argument("--config", help="qat: bit config JSON ({layer: bits}, or notebook 02's "
                                     "configs.json with --label)")
    ap.add_argument("--label", help="qat: which entry of configs.json")
    ap.add_argument("--uniform", type=int, help="qat: uniform weight bits instead of --config")
    ap.add_argument("--a-bits", type=int)
    ap.add_argument("--policy")
    ap.add_argument("--init", help="qat: step-size init, lsq or mse")
    ap.add_argument("--recipe", help="qat: transitions recipe as JSON (hmqat.transitions.Recipe)")
    ap.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across GPUs")
    ap.add_argument("--freeze-bn", action="store_true", help="keep BN statistics fixed")
    ap.add_argument("--checkpoint", help="saved every epoch, resumed from (default runs/...)")
    ap.add_argument("--results", help="a results/<profile> folder: read the FP32 checkpoint and "
                                      "configs.json there, and write the checkpoint where "
                                      "notebooks 00/03 look for it (they then reuse the run)")
    ap.add_argument("--device", default="auto", help="auto (CUDA when present) or cpu")
    return ap


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """Merge built-in defaults < --profile < explicit options."""
    out = dict(_BUILTIN)
    if args.profile:
        from .pipeline import load_params

        cfg = load_params(args.profile)
        common = cfg.get("common", {})
        out.update({k: common[k] for k in _COMMON_KEYS if k in common})
        for opt, (section, key) in _PROFILE_KEYS[args.command].items():
            sec = cfg.get("notebooks", {}).get(section) or {}
            if key in sec:
                out[opt] = sec[key]
    for k, v in vars(args).items():
        if v is not None and k not in ("command", "profile"):
            out[k] = v
    if isinstance(out.get("recipe"), str):
        out["recipe"] = json.loads(out["recipe"])
    return out


def _data(s: dict[str, Any], dev: torch.device) -> tuple[Any, Any, int, int]:
    """(train, val, num_classes, per-process batch): ImageNet DataLoaders for this rank, or
    CIFAR/synthetic TensorImages. ``s["batch_size"]`` is the global batch."""
    from . import data

    w = world_size()
    if s["batch_size"] % w:
        raise DistributedConfigError(f"--batch-size {s['batch_size']} (global) is not divisible "
                                     f"by the {w} processes; use a multiple of {w}")
    per_rank = s["batch_size"] // w
    if s["dataset"] == "imagenet":
        train, val = data.imagenet_loaders(s.get("data"), batch_size=per_rank,
                                           workers=s["workers"], image_size=s["image_size"],
                                           distributed=is_distributed(), seed=s["seed"],
                                           num_classes=None, device=dev)
        return train, val, len(train.dataset.classes), per_rank
    tr, te = (data.load_dataset(s["dataset"], split, root=s.get("data"),
                                n_synthetic=s["n_synthetic"], seed=s["seed"])
              for split in ("train", "test"))
    return tr, te, len(tr.classes), per_rank


def _bit_config(s: dict[str, Any], model: nn.Module) -> dict[str, int]:
    from . import quant

    if s.get("results") and not s.get("config") and s.get("uniform") is None:
        s["config"] = str(Path(s["results"]) / "data" / "configs.json")
    if s.get("uniform") is not None:
        return quant.uniform_config(model, s["uniform"], policy=s["policy"])
    if not s.get("config"):
        raise DistributedConfigError("qat needs --config FILE.json (a bit config) or --uniform B")
    cfg = json.loads(Path(s["config"]).read_text())
    if s.get("label"):
        if s["label"] not in cfg:
            raise DistributedConfigError(f"--label {s['label']!r} is not in {s['config']}; "
                                         f"labels there: {sorted(cfg)}")
        cfg = cfg[s["label"]]["config"]
    elif cfg and all(isinstance(v, dict) for v in cfg.values()):
        raise DistributedConfigError(f"{s['config']} holds several configs {sorted(cfg)}; "
                                     "pick one with --label")
    return {k: int(v) for k, v in cfg.items()}


def run(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Parse ``argv``, train, and return the history (every rank returns the same one)."""
    from . import data as hdata
    from . import models, train, transitions
    from .pipeline import Study

    args = _parser().parse_args(argv)
    s = _settings(args)
    dev = init_from_env(device=s["device"])
    train.seed_everything(s["seed"])  # the same random init on every rank and every rerun
    train_data, val_data, n_cls, per_rank = _data(s, dev)
    results = Path(s["results"]) if s.get("results") else None
    ckpt = s.get("checkpoint") or f"runs/{args.command}-{s['arch']}.pt"
    if results is not None and args.command == "finetune" and not s.get("checkpoint"):
        ckpt = str(results / "checkpoints" / f"fp32-{s['arch']}.pt")       # notebook 00's
    if results is not None and not s.get("fp32"):
        s["fp32"] = str(results / "checkpoints" / f"fp32-{s['arch']}.pt")
    cfg = train.TrainConfig(epochs=s["epochs"], lr=s["lr"], weight_decay=s["wd"],
                            step_lr=s["step_lr"], seed=s["seed"], freeze_bn=s["freeze_bn"],
                            max_steps_per_epoch=s["max_steps"], checkpoint=ckpt,
                            sync_bn=s["sync_bn"])
    if args.command == "finetune":
        model, history = train.finetune(s["arch"], train_data, val_data, cfg, batch_size=per_rank,
                                        device=dev, pretrained=s["pretrained"], num_classes=n_cls)
    else:
        fp32 = models.create_model(s["arch"], pretrained=s["pretrained"] and not s.get("fp32"),
                                   num_classes=n_cls)
        if s.get("fp32"):
            if not Path(s["fp32"]).exists():
                raise DistributedConfigError(
                    f"FP32 checkpoint {s['fp32']} not found; run `-m hmqat.distributed finetune` "
                    "(with the same --results) or notebook 00 first, or pass --fp32 FILE")
            ck = torch.load(s["fp32"], map_location="cpu", weights_only=False)
            fp32.load_state_dict(ck.get("model", ck) if isinstance(ck, dict) else ck)
        fp32.to(dev).eval()
        bits = _bit_config(s, fp32)
        train_loader, val_loader = train_data, val_data
        if isinstance(train_data, hdata.TensorImages):
            train_loader = hdata.make_loader(train_data, per_rank, train=True, seed=s["seed"],
                                             drop_last=True, device=dev)   # fit shards it
            val_loader = hdata.make_loader(val_data, 500, device=dev)
        recipe = transitions.Recipe.from_dict(s["recipe"])
        run_info: dict[str, Any] = {"recipe": recipe.to_dict()}
        if results is not None and not s.get("checkpoint"):              # notebook 03's run
            name, run_info = Study.qat_run_id(bits, s["a_bits"], s["recipe"], s["init"])
            ckpt = str(results / "checkpoints" / name)
            cfg = dataclasses.replace(cfg, checkpoint=ckpt)
        model, history = train.qat(fp32, bits, train_loader, val_loader, cfg, a_bits=s["a_bits"],
                                   policy=s["policy"], init=s["init"], device=dev,
                                   callbacks=transitions.make_callbacks(recipe, teacher=fp32),
                                   run_info=run_info)
    if is_main():
        from .reporting import atomic_write_json

        summary = {"command": args.command, "settings": s, "world_size": world_size(),
                   "history": history, "manifest": train.manifest(s["seed"], dev)}
        atomic_write_json(Path(ckpt).with_suffix(".json"), summary)
        print(f"[hmqat] {args.command} done on {world_size()} process(es): checkpoint {ckpt}, "
              f"summary {Path(ckpt).with_suffix('.json')}", flush=True)
    return history


def main(argv: Sequence[str] | None = None) -> int:
    try:
        run(argv)
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
