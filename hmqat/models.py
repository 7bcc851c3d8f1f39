"""Models: CIFAR ResNet-20/32/44/56 (He et al. 2016, option-A shortcuts) and torchvision ResNets.

The CIFAR ResNets use the exact module layout of the published checkpoints
(akamaster/pytorch_resnet_cifar10), so ``model.load_state_dict`` takes them with strict=True once
the DataParallel ``module.`` prefix is stripped. ``load_pretrained`` verifies the file's sha256
before it is unpickled.

    >>> from hmqat.models import create_model, quantizable_layers
    >>> model = create_model("resnet20", pretrained=True)   # HMQAT_WEIGHTS_DIR or download
    >>> quantizable_layers(model, input_size=(1, 3, 32, 32))[0]
    LayerInfo(name='conv1', kind='Conv2d', n_params=432, macs=442368, ...)
"""
from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .runtime import CheckpointError, load_checkpoint

__all__ = [
    "CIFAR_RESNET_DEPTHS",
    "PRETRAINED",
    "LayerInfo",
    "WeightsError",
    "create_model",
    "cifar_resnet",
    "describe_state_dict",
    "fit_weights",
    "infer_arch",
    "load_weights",
    "read_weights",
    "load_pretrained",
    "quantizable_layers",
    "sha256_file",
    "state_dict_from",
]

CIFAR_RESNET_DEPTHS = (20, 32, 44, 56)

_AKAMASTER = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"


@dataclass(frozen=True)
class Checkpoint:
    """A published checkpoint: file name, download URL and expected sha256."""

    filename: str
    url: str
    sha256: str


PRETRAINED: dict[str, Checkpoint] = {
    "resnet20": Checkpoint("resnet20-12fca82f.th", _AKAMASTER + "resnet20-12fca82f.th",
                           "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8"),
    "resnet32": Checkpoint("resnet32-d509ac18.th", _AKAMASTER + "resnet32-d509ac18.th",
                           "d509ac1820d7f25398913559d7e81a13229b1e7adc5648e3bfa5e22dc137f850"),
    "resnet44": Checkpoint("resnet44-014dd654.th", _AKAMASTER + "resnet44-014dd654.th",
                           "014dd6541728a1c700b1642ab640e211dc6eb8ed507d70697458dc8f8a0ae2e4"),
    "resnet56": Checkpoint("resnet56-4bfd9763.th", _AKAMASTER + "resnet56-4bfd9763.th",
                           "4bfd97631478d6b638d2764fd2baff3edb1d7d82252d54439343b6596b9b5367"),
}


class WeightsError(RuntimeError):
    """Pretrained weights are missing, corrupt or do not fit the model."""


# --------------------------------------------------------------------------------------------
# CIFAR ResNet (option A)
# --------------------------------------------------------------------------------------------
class LambdaLayer(nn.Module):
    """Parameter-free shortcut; kept as a module so the checkpoint layout matches."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def _option_a_shortcut(planes: int) -> Callable[[torch.Tensor], torch.Tensor]:
    pad = planes // 4

    def shortcut(x: torch.Tensor) -> torch.Tensor:
        # stride-2 subsampling plus zero-padding of channels (He et al. 2016, option A)
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, pad, pad), "constant", 0.0)

    return shortcut


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = LambdaLayer(_option_a_shortcut(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: 16/32/64 channels, n basic blocks per stage."""

    def __init__(self, num_blocks: tuple[int, int, int], num_classes: int = 10):
        super().__init__()
        self.in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, num_blocks[0], 1)
        self.layer2 = self._make_layer(32, num_blocks[1], 2)
        self.layer3 = self._make_layer(64, num_blocks[2], 2)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.kaiming_normal_(m.weight)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def cifar_resnet(depth: int, num_classes: int = 10) -> CifarResNet:
    """CIFAR ResNet of the given depth (20, 32, 44 or 56)."""
    if depth not in CIFAR_RESNET_DEPTHS:
        raise ValueError(f"CIFAR ResNet depth must be one of {CIFAR_RESNET_DEPTHS}, got {depth}")
    n = (depth - 2) // 6
    return CifarResNet((n, n, n), num_classes)


# --------------------------------------------------------------------------------------------
# Factory and pretrained loading
# --------------------------------------------------------------------------------------------
TORCHVISION_ARCHS = ("resnet18", "resnet50")


def create_model(arch: str, *, pretrained: bool = False, num_classes: int | None = None,
                 weights_dir: str | os.PathLike | None = None) -> nn.Module:
    """Build ``arch`` ("resnet20/32/44/56" for CIFAR, "resnet18/50" for ImageNet).

    ``pretrained=True`` loads the published weights (CIFAR: via ``HMQAT_WEIGHTS_DIR`` or the
    published URL, sha256-checked; ImageNet: torchvision's IMAGENET1K_V1 weights, whose own
    hash check applies, or a file of that name in ``HMQAT_WEIGHTS_DIR``).
    """
    arch = arch.lower()
    if arch.startswith("resnet") and arch[6:].isdigit() and int(arch[6:]) in CIFAR_RESNET_DEPTHS:
        model = cifar_resnet(int(arch[6:]), num_classes or 10)
        if pretrained:
            load_pretrained(model, arch, weights_dir=weights_dir)
        return model
    if arch in TORCHVISION_ARCHS:
        import torchvision.models   # imported here: ~1.5 s that CIFAR models never need
        builder = getattr(torchvision.models, arch)
        if not pretrained:
            return builder(weights=None, num_classes=num_classes or 1000)
        enum = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
        wdir = weights_dir or os.environ.get("HMQAT_WEIGHTS_DIR")
        local = Path(wdir) / Path(enum.url).name if wdir else None
        model = builder(weights=None, num_classes=1000)
        if local is not None and local.exists():
            # torchvision file names end with the first hex digits of the sha256
            prefix = local.stem.rsplit("-", 1)[-1]
            digest = sha256_file(local)
            if not digest.startswith(prefix):
                raise WeightsError(f"{local}: sha256 {digest[:12]}… does not start with {prefix}; "
                                   "the file is corrupt or not the published one. Delete it.")
            model.load_state_dict(torch.load(local, map_location="cpu", weights_only=True))
        else:
            model.load_state_dict(enum.get_state_dict(progress=False, check_hash=True))
        if num_classes not in (None, 1000):
            model.fc = nn.Linear(model.fc.in_features, num_classes)
        return model
    raise ValueError(f"unknown arch {arch!r}; choose one of "
                     f"{[f'resnet{d}' for d in CIFAR_RESNET_DEPTHS] + list(TORCHVISION_ARCHS)}")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _fetch_checkpoint(arch: str, weights_dir: str | os.PathLike | None) -> Path:
    """Return a local, sha256-verified path to ``arch``'s published checkpoint."""
    ckpt = PRETRAINED[arch]
    wdir = weights_dir or os.environ.get("HMQAT_WEIGHTS_DIR")
    if wdir:
        path = Path(wdir) / ckpt.filename
        if not path.exists():
            raise WeightsError(
                f"pretrained {arch}: {path} not found. HMQAT_WEIGHTS_DIR={wdir} must contain "
                f"{ckpt.filename} (sha256 {ckpt.sha256[:12]}…); unset HMQAT_WEIGHTS_DIR to "
                f"download it from {ckpt.url}.")
    else:
        path = Path(torch.hub.get_dir()) / "checkpoints" / ckpt.filename
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                torch.hub.download_url_to_file(ckpt.url, str(path), progress=False)
            except Exception as exc:  # network errors vary by platform
                raise WeightsError(
                    f"could not download {ckpt.url} ({exc}). On a machine without internet, "
                    f"copy {ckpt.filename} into a folder and set HMQAT_WEIGHTS_DIR to it.") from exc
    digest = sha256_file(path)
    if digest != ckpt.sha256:
        raise WeightsError(
            f"sha256 mismatch for {path}: expected {ckpt.sha256}, got {digest}. The file is "
            f"corrupt or not the published checkpoint; delete it and fetch {ckpt.url} again.")
    return path


def load_pretrained(model: nn.Module, arch: str, *,
                    weights_dir: str | os.PathLike | None = None) -> nn.Module:
    """Load the published CIFAR checkpoint for ``arch`` into ``model`` (strict), in place."""
    if arch not in PRETRAINED:
        raise WeightsError(f"no published checkpoint for {arch!r}; known: {sorted(PRETRAINED)}")
    path = _fetch_checkpoint(arch, weights_dir)
    # The akamaster files are pickled dicts holding a float and a state_dict: weights_only works.
    blob = torch.load(path, map_location="cpu", weights_only=True)
    state = state_dict_from(blob, path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise WeightsError(f"{path} does not fit {type(model).__name__}: missing keys {missing}, "
                           f"unexpected keys {unexpected}")
    return model


# --------------------------------------------------------------------------------------------
# Loading weights from a file (an hmqat checkpoint or a plain state dict)
# --------------------------------------------------------------------------------------------
def state_dict_from(blob: Any, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model state dict inside a loaded checkpoint ``blob`` read from ``path``.

    Accepts the formats people save: an hmqat checkpoint (``{"model": state_dict, ...}``,
    :func:`hmqat.train.fit`, notebook 00), a ``{"state_dict": ...}`` wrapper (the published
    CIFAR files) and a plain ``torch.save(model.state_dict())``; a DataParallel/DDP ``module.``
    prefix on every key is stripped. Anything else raises :class:`CheckpointError` naming the
    file and what it holds."""
    state = blob
    if isinstance(blob, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(blob.get(key), Mapping):
                state = blob[key]
                break
    if not isinstance(state, Mapping):
        bad = [type(state).__name__]
    else:
        bad = [f"{k!r}: {type(v).__name__}" for k, v in state.items()
               if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad or not state:
        what = (f"entries that are not name -> tensor ({', '.join(bad[:3])}"
                f"{', ...' if len(bad) > 3 else ''})" if bad else "an empty state dict")
        raise CheckpointError(
            f"{path}: holds {what}; expected model weights: an hmqat checkpoint (a dict with a "
            f"'model' state dict) or a plain state dict saved with torch.save(model.state_dict(), "
            f"path)")
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return dict(state)


def _blocks_per_stage(state: Mapping[str, torch.Tensor], stages: int) -> list[int]:
    """Residual blocks in each of ``layer1..layer<stages>`` (0 where a stage is absent)."""
    counts = []
    for s in range(1, stages + 1):
        idx = {int(m.group(1)) for k in state if (m := re.match(rf"layer{s}\.(\d+)\.", k))}
        counts.append(len(idx))
    return counts


def infer_arch(state: Mapping[str, torch.Tensor]) -> tuple[str | None, str]:
    """(arch, description) of the ResNet a state dict belongs to, read from its keys and shapes.

    CIFAR ResNets (``linear`` head, three stages of ``n`` basic blocks) are ``resnet{6n+2}``;
    torchvision ResNets (``fc`` head, four stages, bottleneck blocks when ``conv3`` is present)
    are ``resnet{2·blocks+2}`` (basic) or ``resnet{3·blocks+2}`` (bottleneck). The description
    adds the blocks per stage and the number of classes, e.g. ``"resnet32 (5 blocks per stage,
    10 classes)"``; ``arch`` is None for a layout that is neither (the description then lists
    a few keys)."""
    head = next((state[k] for k in ("linear.weight", "fc.weight") if k in state), None)
    classes = f", {head.shape[0]} classes" if head is not None and head.dim() == 2 else ""
    if "linear.weight" in state:
        blocks = _blocks_per_stage(state, 3)
        if blocks[0] and len(set(blocks)) == 1:
            name = f"resnet{6 * blocks[0] + 2}"
            return name, f"{name} ({blocks[0]} blocks per stage{classes})"
        return None, f"a CIFAR ResNet with {tuple(blocks)} blocks per stage{classes}"
    if "fc.weight" in state:
        blocks = _blocks_per_stage(state, 4)
        per_block = 3 if any(".conv3." in k for k in state) else 2
        depth = per_block * sum(blocks) + 2
        kind = "bottleneck" if per_block == 3 else "basic"
        return f"resnet{depth}", f"resnet{depth} ({tuple(blocks)} {kind} blocks{classes})"
    keys = list(state)
    return None, f"an unknown model (keys {keys[:3]}{' ...' if len(keys) > 3 else ''})"


def describe_state_dict(state: Mapping[str, torch.Tensor]) -> str:
    """One phrase naming the architecture of ``state`` (:func:`infer_arch`'s description)."""
    return infer_arch(state)[1]


def _mismatch(have: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]) -> str:
    """What differs between a file's state dict and a model's: missing and unexpected keys and
    shape mismatches, a few of each; "" when they fit."""
    missing = [k for k in want if k not in have]
    unexpected = [k for k in have if k not in want]
    shapes = [f"{k} {tuple(have[k].shape)} vs {tuple(want[k].shape)}" for k in want
              if k in have and have[k].shape != want[k].shape]
    parts = []
    for label, items in (("keys the model needs but the file lacks", missing),
                         ("keys the model does not have", unexpected),
                         ("shapes differ (file vs model)", shapes)):
        if items:
            parts.append(f"{len(items)} {label}: {', '.join(items[:3])}"
                         f"{', ...' if len(items) > 3 else ''}")
    return "; ".join(parts)


def read_weights(path: str | os.PathLike, *, fix: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict in the file ``path`` (an hmqat checkpoint or a plain state dict,
    :func:`state_dict_from`), read with :func:`hmqat.runtime.load_checkpoint`: it never runs
    code; a missing file says "not found" with ``fix``, an unreadable one "truncated or
    corrupt". Cheap, so callers read the weights before any slow set-up (data, models)."""
    return state_dict_from(load_checkpoint(path, fix=fix), path)


def fit_weights(model: nn.Module, state: Mapping[str, torch.Tensor], path: str | os.PathLike,
                *, arch: str | None = None) -> nn.Module:
    """Load ``state`` (read from ``path``) into ``model`` (strict, in place) and return it.

    Weights of another architecture (e.g. ResNet-32 weights for a ResNet-20) raise one
    :class:`CheckpointError` naming the file and both architectures (:func:`infer_arch`),
    before the model is touched; any other mismatch lists the keys and shapes that differ.
    ``arch``: the model's name as the user chose it (for the message)."""
    want = model.state_dict()
    problem = _mismatch(state, want)
    if problem:
        file_arch, file_desc = infer_arch(state)
        model_arch, model_desc = infer_arch(want)
        model_arch = arch or model_arch or type(model).__name__
        if model_desc.startswith("an unknown model"):
            model_desc = model_arch
        if file_arch and file_desc != model_desc:
            advice = (f"pass a checkpoint of {model_desc}" if file_arch == model_arch else
                      f"pass a {model_arch} checkpoint, or set arch: {file_arch} to use this one")
            raise CheckpointError(f"{path}: holds {file_desc} weights, but the model is "
                                  f"{model_desc}; {advice} ({problem})")
        raise CheckpointError(f"{path}: the weights do not fit the model {model_desc} "
                              f"({problem}); pass a checkpoint saved from {model_arch}")
    model.load_state_dict(state)
    return model


def load_weights(model: nn.Module, path: str | os.PathLike, *, arch: str | None = None,
                 fix: str | None = None) -> nn.Module:
    """Load the weights in ``path`` into ``model`` and return it: :func:`read_weights` then
    :func:`fit_weights` (an hmqat checkpoint or a plain state dict; "not found" differs from
    "corrupt"; another architecture is named with the file)."""
    return fit_weights(model, read_weights(path, fix=fix), path, arch=arch)


# --------------------------------------------------------------------------------------------
# Quantizable layers
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerInfo:
    """A quantizable layer: module name, type, weight count, MACs for one input, shapes."""

    name: str
    kind: str
    n_params: int
    macs: int
    weight_shape: tuple[int, ...]
    out_shape: tuple[int, ...]


QUANTIZABLE = (nn.Conv2d, nn.Linear)


def quantizable_layers(model: nn.Module, input_size: tuple[int, ...] = (1, 3, 32, 32),
                       device: str | torch.device | None = None) -> list[LayerInfo]:
    """List every Conv2d/Linear by module name, in forward order, with n_params and MACs.

    One forward pass with hooks on a zero input of ``input_size`` records execution order and
    output shapes; MACs are per sample (batch size is divided out). ``n_params`` counts the
    weight only (the tensor that gets low-bit); biases count as FP32 "other" parameters.
    Quantized wrappers count too: any module with a ``weight`` whose class derives from
    Conv2d/Linear.
    """
    order: list[LayerInfo] = []
    names = {m: n for n, m in model.named_modules()}
    hooks = []

    def hook(mod: nn.Module, inp, out):
        w = mod.weight
        batch = out.shape[0]
        if isinstance(mod, nn.Conv2d):
            spatial = out.shape[2] * out.shape[3]
            macs = spatial * w.numel()  # out_ch * in_ch/groups * kh * kw per output pixel
        else:
            macs = w.numel() * (out.numel() // (batch * w.shape[0]))
        order.append(LayerInfo(names[mod], type(mod).__name__, w.numel(), int(macs),
                               tuple(w.shape), tuple(out.shape[1:])))

    for m in model.modules():
        if isinstance(m, QUANTIZABLE):
            hooks.append(m.register_forward_hook(hook))
    modes = {m: m.training for m in model.modules()}  # restore each module's own flag
    p = next(model.parameters(), None)
    if device is None:
        device = p.device if p is not None else "cpu"
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.get_default_dtype()
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(input_size, device=device, dtype=dtype))
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    seen: set[str] = set()
    unique = []
    for info in order:  # a module called twice is listed once (first call)
        if info.name not in seen:
            seen.add(info.name)
            unique.append(info)
    return unique
