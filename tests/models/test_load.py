import sys

import pytest
import torch

import zsq.models as zm
from zsq.errors import ZsqError


def test_list_models():
    assert zm.list_models() == ["cifar10_resnet20", "cifar10_resnet32", "cifar10_resnet44",
                                "cifar10_resnet56", "efficientnet_lite0"]
    assert zm.list_models("*lite*") == ["efficientnet_lite0"]


def test_unknown_name_suggests_close_names():
    with pytest.raises(ZsqError, match=r"unknown model 'cifar10_resnet21'.*cifar10_resnet20.*list_models"):
        zm.load("cifar10_resnet21")
    with pytest.raises(ZsqError, match=r"torchvision:resnet18"):
        zm.load("torchvision:resnet19")
    with pytest.raises(ZsqError, match=r"pytorchcv:resnet20_cifar10"):
        zm.load("pytorchcv:resnet20_cifar11")


def _save_akamaster_style(model, path):
    sd = {"module." + k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"best_prec1": 91.7, "state_dict": sd}, path)


def test_weights_with_module_prefix_and_no_bn_counters(tmp_path):
    src = zm.load("cifar10_resnet20")
    with torch.no_grad():
        for b in src.modules():
            if isinstance(b, torch.nn.BatchNorm2d):
                b.running_mean.uniform_(-1, 1)
    p = tmp_path / "w.th"
    _save_akamaster_style(src, p)
    dst = zm.load("cifar10_resnet20", weights=p)
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(dst(x), src(x))


@pytest.mark.parametrize("wrapper", ["model", "model_state_dict", None])
def test_weights_wrappers(tmp_path, wrapper):
    src = zm.load("cifar10_resnet20")
    sd = src.state_dict()
    torch.save(sd if wrapper is None else {wrapper: sd}, tmp_path / "w.pt")
    dst = zm.load("cifar10_resnet20", weights=tmp_path / "w.pt")
    assert torch.equal(dst.linear.weight, src.linear.weight)


def test_weights_errors(tmp_path):
    with pytest.raises(ZsqError, match="weights file not found"):
        zm.load("cifar10_resnet20", weights=tmp_path / "nope.th")
    bad = tmp_path / "bad.th"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ZsqError, match="cannot read weights file"):
        zm.load("cifar10_resnet20", weights=bad)
    sd = zm.load("cifar10_resnet20").state_dict()

    def save(d):
        torch.save(d, tmp_path / "x.pt")
        return tmp_path / "x.pt"

    d = dict(sd)
    del d["layer2.1.bn1.weight"]
    with pytest.raises(ZsqError, match=r"missing key 'layer2.1.bn1.weight'"):
        zm.load("cifar10_resnet20", weights=save(d))
    d = dict(sd, **{"layer4.0.conv1.weight": torch.zeros(1)})
    with pytest.raises(ZsqError, match=r"unexpected key 'layer4.0.conv1.weight'"):
        zm.load("cifar10_resnet20", weights=save(d))
    d = dict(sd, **{"linear.weight": torch.zeros(100, 64)})
    with pytest.raises(ZsqError, match=r"'linear.weight' has shape \(100, 64\) in the file but \(10, 64\)"):
        zm.load("cifar10_resnet20", weights=save(d))
    # A ResNet-32 checkpoint in a ResNet-20: the first extra block is named.
    with pytest.raises(ZsqError, match=r"unexpected key 'layer1.3.conv1.weight'"):
        zm.load("cifar10_resnet20", weights=save(zm.load("cifar10_resnet32").state_dict()))
    with pytest.raises(ZsqError, match="holds no state_dict"):
        zm.load("cifar10_resnet20", weights=save([1, 2]))


def test_missing_optional_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ZsqError, match=r"pip install 'zsq\[timm\]'"):
        zm.load("timm:resnet18")


def test_pretrained_own_model_without_assets(monkeypatch, tmp_path):
    monkeypatch.setenv("ZSQ_ASSETS", str(tmp_path))
    with pytest.raises(ZsqError, match="reference weights for 'cifar10_resnet20' not found"):
        zm.load("cifar10_resnet20", pretrained=True)


def test_pytorchcv_cifar_model():
    m = zm.load("pytorchcv:resnet20_cifar10")
    meta = zm.get_meta(m)
    assert meta.input_size == (3, 32, 32) and meta.num_classes == 10 and meta.resize is None
    assert meta.mean == (0.4914, 0.4822, 0.4465)
    assert not m.training
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("arch,resize", [("resnet18", 256), ("mobilenet_v2", 232)])
def test_torchvision_models(arch, resize):
    m = zm.load(f"torchvision:{arch}")
    meta = zm.get_meta(m)
    # resize from the DEFAULT weights' own eval preset (mobilenet_v2's V2 weights use 232).
    assert meta.input_size == (3, 224, 224) and meta.resize == resize and meta.num_classes == 1000
    assert meta.mean == (0.485, 0.456, 0.406)
    assert m(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


def test_timm_model_meta_from_pretrained_cfg():
    m = zm.load("timm:mobilenetv3_small_050")
    meta = zm.get_meta(m)
    assert meta.input_size == (3, 224, 224) and meta.resize == 256  # floor(224 / 0.875)
    assert meta.interpolation == "bicubic" and meta.num_classes == 1000
    assert m(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
