"""Data-parallel training on many GPUs and nodes with PyTorch's own torch.distributed + DDP.

:func:`hmqat.train.fit` (and so ``finetune``/``qat``) notices an initialised process group and
runs data-parallel by itself with the helpers of :mod:`hmqat.distributed`; this module is the
small command line for real runs. Launch with ``torchrun``; the batch size on the command line is the GLOBAL batch,
split evenly over the processes:

    # one node, 8 GPUs: FP32 fine-tune, then QAT of torchvision ResNet18 on ImageNet
    export HMQAT_DATA_DIR=/data/imagenet            # train/<wnid>/*.JPEG, val/<wnid>/*.JPEG
    torchrun --standalone --nproc_per_node=8 -m hmqat.study.cli finetune --profile imagenet
    torchrun --standalone --nproc_per_node=8 -m hmqat.study.cli qat --profile imagenet \\
        --fp32 runs/finetune-resnet18.pt --config my_config.json     # {"layer1.0.conv1": 4, ...}
    # uniform W4A4 baseline, SyncBN, a shorter schedule
    torchrun --standalone --nproc_per_node=8 -m hmqat.study.cli qat --profile imagenet \\
        --fp32 runs/finetune-resnet18.pt --uniform 4 --a-bits 4 --epochs 30 --sync-bn
    # the notebooks' runs: read results/imagenet (FP32 checkpoint, configs.json of notebook 02)
    # and write the checkpoint where notebook 03 finds it (it then reuses the finished run)
    torchrun --standalone --nproc_per_node=8 -m hmqat.study.cli qat --profile imagenet \\
        --results results/imagenet --label "HMQAT 10.34x"
    # two nodes x 8 GPUs (run on each node; $MASTER is the first node's address)
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=$MASTER:29500 \\
        --rdzv-id=hmqat-qat -m hmqat.study.cli qat --profile imagenet --uniform 4 \\
        --fp32 /shared/fp32.pt --run-dir /shared/runs
    # CPU smoke test: 2 processes, gloo, synthetic data
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 -m hmqat.study.cli qat \\
        --profile smoke --uniform 4 --max-steps 2 --device cpu --run-dir /tmp/qat
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from .. import data, models, quant, train, transitions
from ..distributed import (DistributedConfigError, cleanup, init_from_env, is_distributed,
                           is_main, world_size)
from ..locking import LockError, results_lock
from ..runtime import CheckpointError, WriteError, atomic_write_json, manifest, seed_everything
from . import params
from .params import COMMON, NOTEBOOK_KEYS, Key, ParamsError, bit_width, integer
from .pipeline import PipelineError, load_params
from .runs import RunError, data_key, qat_run

__all__ = ["main", "run"]


# --------------------------------------------------------------------------------------------
# Command line: python -m hmqat.study.cli finetune|qat ...
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
    ap = argparse.ArgumentParser(prog="torchrun ... -m hmqat.study.cli",
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
    ap.add_argument("--checkpoint", help="finetune: saved every epoch, resumed from (default "
                                         "runs/finetune-<arch>.pt)")
    ap.add_argument("--run-dir", help="qat: folder of the runs (hmqat.study.runs.qat_run: "
                                      "<run dir>/<run id>/checkpoint.pt, result.json; default "
                                      "<results>/checkpoints/qat with --results, else runs/qat)")
    ap.add_argument("--results", help="a results/<profile> folder: read the FP32 checkpoint and "
                                      "configs.json there, and write the checkpoint where "
                                      "notebooks 00/03 look for it (they then reuse the run)")
    ap.add_argument("--device", default="auto", help="auto (CUDA when present) or cpu")
    return ap


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """Merge built-in defaults < --profile < explicit options."""
    out = dict(_BUILTIN)
    if args.profile:
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
        try:
            out["recipe"] = json.loads(out["recipe"])
        except json.JSONDecodeError as exc:
            raise ParamsError(f"--recipe is not valid JSON ({exc.msg} at character {exc.pos}); "
                              "give a JSON object, e.g. --recipe "
                              "'{\"distillation\": {\"enabled\": true}}'") from None
    return out


#: Options that are not profile keys, and their rules.
_OPTION_KEYS = {
    "uniform": Key(bit_width, "uniform weight bits instead of --config"),
    "workers": Key(integer(0), "DataLoader workers per process"),
    "image_size": Key(integer(1), "ImageNet image side in pixels"),
}


def _check_options(s: dict[str, Any], command: str) -> None:
    """Every setting against the rule the profile schema (:mod:`hmqat.study.params`) has for
    it, before any set-up: a bad option is one :class:`~hmqat.study.params.ParamsError` naming
    the option, what is expected and why, not a traceback after minutes of data loading."""
    rules = {k: COMMON[k] for k in _COMMON_KEYS}
    rules["device"] = COMMON["device"]
    rules.update({opt: NOTEBOOK_KEYS[section][key]
                  for opt, (section, key) in _PROFILE_KEYS[command].items()})
    rules.update(_OPTION_KEYS)
    for key, rule in rules.items():
        if s.get(key) is not None:      # None: left out, or null in the profile (checked there)
            params.check_value(f"--{key.replace('_', '-')}", s[key], rule)
    if command == "qat" and s.get("checkpoint"):
        raise DistributedConfigError("qat keeps its checkpoint in its run folder "
                                     "(<run dir>/<run id>/checkpoint.pt); pass --run-dir DIR "
                                     "instead of --checkpoint")


def _prepare(s: dict[str, Any], command: str) -> tuple[Path | None, str, dict[str, int] | None]:
    """The files a run needs, checked before any set-up: (results folder or None, the
    checkpoint path it writes, qat's bit config read from --config or None for --uniform)."""
    results = Path(s["results"]) if s.get("results") else None
    ckpt = s.get("checkpoint") or f"runs/{command}-{s['arch']}.pt"
    if results is not None and command == "finetune" and not s.get("checkpoint"):
        ckpt = str(results / "checkpoints" / f"fp32-{s['arch']}.pt")       # notebook 00's
    if command == "finetune":
        return results, ckpt, None
    if results is not None and not s.get("fp32"):
        s["fp32"] = str(results / "checkpoints" / f"fp32-{s['arch']}.pt")
    if s.get("fp32") and not Path(s["fp32"]).exists():
        raise DistributedConfigError(
            f"FP32 checkpoint {s['fp32']} not found; run `-m hmqat.study.cli finetune` "
            "(with the same --results) or notebook 00 first, or pass --fp32 FILE")
    return results, ckpt, None if s.get("uniform") is not None else _read_config(s)


def _data(s: dict[str, Any], dev: torch.device) -> tuple[Any, Any, int, int]:
    """(train, val, num_classes, per-process batch): ImageNet DataLoaders for this rank, or
    CIFAR/synthetic TensorImages. ``s["batch_size"]`` is the global batch."""
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


def _read_config(s: dict[str, Any]) -> dict[str, int]:
    """qat's bit config ``{layer: bits}`` from --config (default with --results: notebook 02's
    ``configs.json``; ``--label`` picks one of its entries), checked before any set-up."""
    if s.get("results") and not s.get("config"):
        s["config"] = str(Path(s["results"]) / "data" / "configs.json")
    if not s.get("config"):
        raise DistributedConfigError("qat needs --config FILE.json (a bit config) or --uniform B")
    path = Path(s["config"])
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DistributedConfigError(f"--config {path} not found; pass a bit config JSON file "
                                     "({layer: bits}), or --uniform B") from None
    except (OSError, ValueError) as exc:
        raise DistributedConfigError(f"--config {path} is not a readable JSON file ({exc}); "
                                     "pass a bit config JSON file ({layer: bits})") from None
    if not isinstance(cfg, dict):
        raise DistributedConfigError(f"--config {path} holds a {type(cfg).__name__}; expected "
                                     "a JSON object {layer: bits}")
    if s.get("label"):
        if s["label"] not in cfg:
            raise DistributedConfigError(f"--label {s['label']!r} is not in {s['config']}; "
                                         f"labels there: {sorted(cfg)}")
        entry = cfg[s["label"]]
        cfg = entry.get("config") if isinstance(entry, dict) else None
        if not isinstance(cfg, dict):
            raise DistributedConfigError(f"entry {s['label']!r} of {path} has no 'config' "
                                         "object {layer: bits}")
    elif cfg and all(isinstance(v, dict) for v in cfg.values()):
        raise DistributedConfigError(f"{s['config']} holds several configs {sorted(cfg)}; "
                                     "pick one with --label")
    bad = {k: v for k, v in cfg.items() if bit_width(v) is not None}
    if bad:
        first = next(iter(bad))
        raise DistributedConfigError(f"--config {path}: layer {first!r} has {bad[first]!r}; "
                                     f"expected {bit_width(bad[first])} ({len(bad)} bad "
                                     "entries)")
    return {k: int(v) for k, v in cfg.items()}


def run(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Parse ``argv``, train, and return the history (every rank returns the same one).

    Every option and file is checked before any set-up (:func:`_check_options`,
    :func:`_prepare`); with ``--results`` the first process holds that folder's lock
    (:func:`hmqat.locking.results_lock`, as the pipeline does) for the whole run."""
    args = _parser().parse_args(argv)
    s = _settings(args)
    _check_options(s, args.command)
    results, ckpt, config = _prepare(s, args.command)
    with contextlib.ExitStack() as stack:
        if results is not None and os.environ.get("RANK", "0") == "0":
            stack.enter_context(results_lock(results))
        return _train(args.command, s, results, ckpt, config)


def _train(command: str, s: dict[str, Any], results: Path | None, ckpt: str,
           config: dict[str, int] | None) -> list[dict[str, Any]]:
    """Set up the process group, data and model, then fine-tune or run QAT (``config``: the
    bit config, None for ``--uniform``)."""
    dev = init_from_env(device=s["device"])
    seed_everything(s["seed"])  # the same random init on every rank and every rerun
    train_data, val_data, n_cls, per_rank = _data(s, dev)
    cfg = train.TrainConfig(epochs=s["epochs"], lr=s["lr"], weight_decay=s["wd"],
                            step_lr=s["step_lr"], seed=s["seed"], freeze_bn=s["freeze_bn"],
                            max_steps_per_epoch=s["max_steps"], checkpoint=ckpt,
                            sync_bn=s["sync_bn"])
    if command == "finetune":
        model, history = train.finetune(s["arch"], train_data, val_data, cfg, batch_size=per_rank,
                                        device=dev, pretrained=s["pretrained"], num_classes=n_cls)
    else:
        fp32 = models.create_model(s["arch"], pretrained=s["pretrained"] and not s.get("fp32"),
                                   num_classes=n_cls)
        if s.get("fp32"):
            models.load_weights(fp32, s["fp32"], arch=s["arch"])   # names file and both archs
        fp32.to(dev).eval()
        bits = config if config is not None else quant.uniform_config(fp32, s["uniform"],
                                                                     policy=s["policy"])
        train_loader, val_loader = train_data, val_data
        if isinstance(train_data, data.TensorImages):
            train_loader = data.make_loader(train_data, per_rank, train=True, seed=s["seed"],
                                             drop_last=True, device=dev)   # fit shards it
            val_loader = data.make_loader(val_data, 500, device=dev)
        run_dir = s.get("run_dir") or (results / "checkpoints" / "qat" if results is not None
                                       else Path("runs") / "qat")    # notebook 03's runs
        run = qat_run(fp32, bits, s["recipe"], train_loader, val_loader, cfg, run_dir=run_dir,
                      a_bits=s["a_bits"], policy=s["policy"], init=s["init"], device=dev,
                      input_size=(1, 3, s["image_size"], s["image_size"])
                      if s["dataset"] == "imagenet" else (1, 3, 32, 32),
                      data=data_key(train_data, val_data, batch_size=s["batch_size"]),
                      eval_each_epoch=True)
        history, ckpt = run.record["history"], str(run.folder / "checkpoint.pt")
    if is_main():
        summary = {"command": command, "settings": s, "world_size": world_size(),
                   "history": history, "manifest": manifest(s["seed"], dev)}
        atomic_write_json(Path(ckpt).with_suffix(".json"), summary)
        print(f"[hmqat] {command} done on {world_size()} process(es): checkpoint {ckpt}, "
              f"summary {Path(ckpt).with_suffix('.json')}", flush=True)
    return history


#: What the command line reports as one ``[hmqat] ERROR`` line instead of a traceback.
_USAGE_ERRORS = (ParamsError, PipelineError, DistributedConfigError)
_ONE_LINE_ERRORS = _USAGE_ERRORS + (LockError, WriteError, CheckpointError, RunError,
                                    data.DatasetError, models.WeightsError,
                                    quant.BitConfigError, transitions.RecipeError,
                                    train.NonFiniteLossError)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m hmqat.study.cli``: exit status 0, or 1 with one ``[hmqat] ERROR: ...`` line
    (printed by the first process only when every process fails alike: a bad option)."""
    try:
        run(argv)
    except _ONE_LINE_ERRORS as exc:
        rank = os.environ.get("RANK")
        if rank in (None, "0") or not isinstance(exc, _USAGE_ERRORS):
            where = f" (rank {rank})" if rank not in (None, "0") else ""
            print(f"[hmqat] ERROR{where}: {' '.join(str(exc).split())}", file=sys.stderr,
                  flush=True)
        return 1
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
