"""BatchNorm re-estimation after the weights or their quantization change.

Quantizing a layer's weights (or changing its width) shifts the mean and variance of the
activations its BatchNorm sees, while the running statistics still describe the old network.
Re-estimating them on a few hundred training images, with no gradient and the weights
untouched, removes that mismatch (Nagel et al. 2022, arXiv:2203.11086, "BN re-estimation";
docs/method.md §7):

    μ_B ← (1/N) Σ_n E[x_n],    σ²_B ← (1/N) Σ_n Var[x_n]       (cumulative average over batches)

Only the BatchNorm modules switch to training mode while the batches pass; every other module
(quantizers, dropout) stays in evaluation mode, so nothing but ``running_mean``/``running_var``/
``num_batches_tracked`` changes.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["BNError", "batchnorm_layers", "reestimate_bn"]


class BNError(ValueError):
    """BatchNorm re-estimation was asked for without data."""


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The model's BatchNorm modules that track running statistics."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def reestimate_bn(model: nn.Module, batches: Iterable, *, max_images: int | None = None) -> int:
    """Recompute every BatchNorm's running statistics from ``batches``; returns images used.

    ``batches`` yields ``(x, y)`` or ``x`` on the model's device. Statistics are the cumulative
    average over the batches seen (``momentum=None``), so the order of batches does not matter
    beyond the last partial one. The model's training flags are restored afterwards.
    """
    bns = batchnorm_layers(model)
    if not bns:
        return 0
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in bns}
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    seen = 0
    try:
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            if max_images is not None and seen >= max_images:
                break
            if max_images is not None:
                x = x[: max_images - seen]
            model(x.to(device, non_blocking=True))
            seen += len(x)
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        for m, mode in modes.items():
            m.training = mode
    if seen == 0:
        raise BNError("reestimate_bn got no images: pass a non-empty loader or list of "
                      "batches (a few hundred training images are enough)")
    return seen
