"""The README chain (traces → Ω → frontier → budget → QAT → packed export) on torchvision models
people use: MobileNetV3-small (Hardsigmoid in its squeeze-excitation blocks has no double
backward; hessian.twice_differentiable swaps it for the measurement) and EfficientNet-B0
(SiLU, squeeze-excitation with Sigmoid). Random weights, 4 synthetic 32-px images, joint probes:
this checks that every step runs and connects, not what the numbers are.
"""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from hmqat import export, hessian, quant, search, sensitivity, train


@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "efficientnet_b0"])
def test_readme_chain_on_torchvision_model(arch: str, tmp_path) -> None:
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None, num_classes=4)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 3]))]
    hardsigmoids = [n for n, m in model.named_modules() if isinstance(m, nn.Hardsigmoid)]
    if hardsigmoids:
        with pytest.warns(UserWarning, match="nn.Hardsigmoid"):
            traces = hessian.layer_traces(model, batches, max_probes=2, probe="joint",
                                          progress=False)
        assert all(isinstance(model.get_submodule(n), nn.Hardsigmoid) for n in hardsigmoids)
    else:
        traces = hessian.layer_traces(model, batches, max_probes=2, probe="joint", progress=False)
    assert len(traces) == len(quant.uniform_config(model, 4)) and traces["trace"].notna().all()
    omega = sensitivity.omega_table(model, traces, bits=(2, 4, 8))
    frontier = search.model_frontier(model, omega, bits=(2, 4, 8))
    config = search.select(frontier, min_compression=6)["config"]
    qmodel, history = train.qat(model, config, batches, batches,
                                train.TrainConfig(epochs=1, max_steps_per_epoch=1))
    assert quant.bit_config_of(qmodel) == config and len(history) == 1
    # signed where the inputs are not post-ReLU (the SE blocks' and residuals' consumers)
    assert max(quant.clamped_negative_fraction(qmodel, [batches[0][0]]).values()) \
        <= quant.NEG_TOLERANCE
    export.save_packed(qmodel, tmp_path / "m.hmq")
    back = export.load_packed(tmp_path / "m.hmq", model)
    with torch.no_grad():
        assert torch.equal(back(batches[0][0]), qmodel.eval()(batches[0][0]))


def test_op_without_double_backward_names_it() -> None:
    """An op with no double backward outside a swappable module: one HessianError naming it."""

    class FunctionalHardsigmoid(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(nn.functional.hardsigmoid(x))

    batches = [(torch.randn(4, 4), torch.tensor([0, 1, 2, 0]))]
    model = nn.Sequential(nn.Linear(4, 4), FunctionalHardsigmoid())
    with pytest.raises(hessian.HessianError, match=r"aten::hardsigmoid_backward.*twice_diff"):
        hessian.layer_traces(model, batches, max_probes=2, progress=False)
