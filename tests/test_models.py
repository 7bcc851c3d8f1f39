import pytest
import torch

from hmqat import models


def test_resnet20_layers_params_and_macs():
    m = models.create_model("resnet20")
    layers = models.quantizable_layers(m)
    assert [l.name for l in layers][:3] == ["conv1", "layer1.0.conv1", "layer1.0.conv2"]
    assert layers[-1].name == "linear" and len(layers) == 20
    # conv1 3->16, stage 1: 6 convs 16->16, stage 2: 32<-16 then 5x 32->32, stage 3 likewise 64
    expected = [432] + [2304] * 6 + [4608] + [9216] * 5 + [18432] + [36864] * 5 + [640]
    assert [l.n_params for l in layers] == expected
    assert sum(expected) == 268_336
    total = sum(p.numel() for p in m.parameters())
    assert total == 269_722 and round(total / 1e6, 2) == 0.27
    assert layers[0].macs == 32 * 32 * 432
    assert layers[7].macs == 16 * 16 * 4608 and layers[-1].macs == 640


@pytest.mark.parametrize("depth,n_layers", [(32, 32), (44, 44), (56, 56)])
def test_deeper_cifar_resnets(depth, n_layers):
    assert len(models.quantizable_layers(models.create_model(f"resnet{depth}"))) == n_layers


def test_torchvision_resnet18_layer_list():
    m = models.create_model("resnet18")
    layers = models.quantizable_layers(m, input_size=(1, 3, 224, 224))
    assert len(layers) == 21 and layers[0].name == "conv1" and layers[-1].name == "fc"
    assert "layer2.0.downsample.0" in [l.name for l in layers]
    assert sum(l.n_params for l in layers) == 11_678_912


def _fake_checkpoint(tmp_path, monkeypatch):
    src = models.create_model("resnet20")
    state = {"module." + k: v for k, v in src.state_dict().items()}
    path = tmp_path / models.PRETRAINED["resnet20"].filename
    torch.save({"best_prec1": 91.7, "state_dict": state}, path)
    ck = models.PRETRAINED["resnet20"]
    monkeypatch.setitem(models.PRETRAINED, "resnet20",
                        models.Checkpoint(ck.filename, ck.url, models.sha256_file(path)))
    return src, path


def test_pretrained_loads_exactly_with_module_prefix(tmp_path, monkeypatch):
    src, _ = _fake_checkpoint(tmp_path, monkeypatch)
    monkeypatch.setenv("HMQAT_WEIGHTS_DIR", str(tmp_path))
    m = models.create_model("resnet20", pretrained=True)
    for k, v in src.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k


def test_checksum_mismatch_is_an_error(tmp_path, monkeypatch):
    _, path = _fake_checkpoint(tmp_path, monkeypatch)
    with open(path, "ab") as f:
        f.write(b"corrupt")
    with pytest.raises(models.WeightsError, match="sha256 mismatch.*delete it"):
        models.create_model("resnet20", pretrained=True, weights_dir=tmp_path)


def test_missing_weights_names_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv("HMQAT_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(models.WeightsError, match="resnet20-12fca82f.th.*HMQAT_WEIGHTS_DIR"):
        models.create_model("resnet20", pretrained=True)


def test_unknown_arch():
    with pytest.raises(ValueError, match="unknown arch 'vgg11'.*resnet20"):
        models.create_model("vgg11")


def test_layer_listing_keeps_each_modules_mode_and_float64():
    m = models.create_model("resnet20").double()
    m.train()
    m.bn1.eval()  # a caller's mixed modes (e.g. frozen BN) survive the listing
    layers = models.quantizable_layers(m)
    assert len(layers) == 20 and m.training and not m.bn1.training and m.layer1[0].bn1.training
