"""BatchNorm re-estimation changes running statistics and nothing else."""
import pytest
import torch
from torch import nn

from hmqat import quant
from hmqat.bn import BNError, batchnorm_layers, reestimate_bn
from hmqat.models import create_model


def _batches(n=4, bs=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 3, 32, 32, generator=g) * 2 + 1, torch.zeros(bs, dtype=torch.long))
            for _ in range(n)]


def test_reestimate_bn_changes_stats_not_weights():
    torch.manual_seed(0)
    model = create_model("resnet20")
    qmodel = quant.quantize_model(model, quant.uniform_config(model, 4), a_bits=4)
    qmodel.eval()
    batches = _batches()
    quant.calibrate_activations(qmodel, batches[:1])  # initialises activation steps
    params = {k: v.clone() for k, v in qmodel.named_parameters()}
    before = [b.running_var.clone() for b in batchnorm_layers(qmodel)]
    used = reestimate_bn(qmodel, batches, max_images=40)
    assert used == 40
    for k, v in qmodel.named_parameters():
        assert torch.equal(v, params[k]), k          # weights and steps bit-identical
    after = [b.running_var for b in batchnorm_layers(qmodel)]
    assert any(not torch.allclose(a, b) for a, b in zip(before, after))
    assert not qmodel.training and all(not m.training for m in qmodel.modules())
    assert all(b.momentum == 0.1 for b in batchnorm_layers(qmodel))


def test_reestimate_bn_equals_full_batch_statistics():
    bn = nn.BatchNorm2d(3)
    net = nn.Sequential(bn).eval()
    batches = _batches(n=3, bs=8)
    reestimate_bn(net, batches)
    x = torch.cat([b[0] for b in batches])
    assert torch.allclose(bn.running_mean, x.mean((0, 2, 3)), atol=1e-5)
    # cumulative average of per-batch unbiased variances (equal batch sizes)
    v = torch.stack([b[0].var((0, 2, 3), unbiased=True) for b in batches]).mean(0)
    assert torch.allclose(bn.running_var, v, atol=1e-5)


def test_reestimate_bn_without_images_is_an_error():
    with pytest.raises(BNError, match="no images"):
        reestimate_bn(nn.Sequential(nn.BatchNorm2d(3)), [])
