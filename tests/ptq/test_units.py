import pytest
import torch
import torch.nn as nn

import zsq.models
from zsq.models.meta import ModelMeta, set_meta
from zsq.ptq.units import find_units, summarize_units
from zsq.quant import QuantConfig, QuantSpec, quantize_model

# cheap config (min/max, no Lp search): unit detection only needs the wrapped layers
CHEAP = QuantConfig(preset="test", w_bits=4, a_bits=4, weight=QuantSpec(per_channel=True), act=QuantSpec())


def _units(model):
    return find_units(quantize_model(model, CHEAP))


def _kinds(units):
    return [(u.kind, u.type_name) for u in units]


def test_zsq_cifar_resnet20():
    units = _units(zsq.models.load("cifar10_resnet20"))
    assert [u.name for u in units] == ["conv1"] + [f"layer{s}.{i}" for s in (1, 2, 3) for i in range(3)] + ["linear"]
    assert _kinds(units)[1] == ("block", "BasicBlock")
    assert units[1].layers == ["layer1.0.conv1", "layer1.0.conv2"]
    assert summarize_units(units) == "11 units: 9 block (BasicBlock), 2 layer (Conv2d, Linear)"


def test_efficientnet_lite0():
    units = _units(zsq.models.load("efficientnet_lite0"))
    assert len(units) == 19  # stem + 16 MBConv + head conv + fc
    assert units[0].name == "_conv_stem" and units[-2].name == "_conv_head" and units[-1].name == "_fc"
    assert all(u.type_name == "MBConvBlock" for u in units[1:-2])
    assert units[2].layers == ["_blocks.1._expand_conv", "_blocks.1._depthwise_conv", "_blocks.1._project_conv"]


def test_torchvision_resnet18():
    units = _units(zsq.models.load("torchvision:resnet18"))
    assert len(units) == 10
    assert units[3].name == "layer2.0" and "layer2.0.downsample.0" in units[3].layers


def test_torchvision_mobilenet_v2():
    units = _units(zsq.models.load("torchvision:mobilenet_v2"))
    assert len(units) == 20  # stem conv + 17 InvertedResidual + last 1x1 conv + fc (Genie's count)
    assert sum(u.type_name == "InvertedResidual" for u in units) == 17
    assert units[0].name == "features.0.0" and units[-1].name == "classifier.1"


def test_pytorchcv_resnet20():
    pytest.importorskip("pytorchcv")
    units = _units(zsq.models.load("pytorchcv:resnet20_cifar10"))
    assert len(units) == 11
    assert units[0].type_name == "ConvBlock" and sum(u.type_name == "ResUnit" for u in units) == 9


def test_unknown_model_falls_back_to_layers():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.LazyLinear(4))
    m(torch.zeros(1, 3, 8, 8))
    set_meta(m.eval(), ModelMeta("seq", 4, (3, 8, 8), (0.5,) * 3, (0.5,) * 3))
    units = _units(m)
    assert [(u.name, u.kind) for u in units] == [("0", "layer"), ("2", "layer"), ("4", "layer")]


def test_layer_granularity_splits_blocks():
    q = quantize_model(zsq.models.load("cifar10_resnet20"), CHEAP)
    units = find_units(q, "layer")
    assert len(units) == 20 and all(u.kind == "layer" for u in units)
