"""bn-minmax on the real ResNet-20: no images, within 1 point of FP32 at W8A8."""
import pytest
import torch

import zsq
from zsq.assets import CIFAR10_EXACT, RESNET20
from zsq.methods import QuantJob, get_method
from zsq.quant import QuantInput, act_quantizers, quant_layers
from tests.conftest import need_asset


@pytest.fixture(scope="module")
def resnet20():
    return zsq.models.load("cifar10_resnet20", weights=str(need_asset(RESNET20)))


def test_w8a8_within_one_point_of_fp32_without_images(resnet20):
    data = str(need_asset(CIFAR10_EXACT))
    fp = zsq.evaluate(resnet20, data)["top1"]
    q = get_method("bn-minmax").fn(resnet20, zsq.get_preset("genie", "w8a8"), QuantJob()).model
    top1 = zsq.evaluate(q, data)["top1"]
    assert fp == pytest.approx(91.64, abs=0.1)
    assert abs(top1 - fp) <= 1.0
    # every activation quantizer got a finite range from BN statistics alone
    for name, aq in act_quantizers(q):
        assert bool(aq.initialized) and torch.isfinite(aq.scale).all() and aq.scale.max() > 0, name


def test_genie_preset_on_resnet20_shares_block_input_with_shortcut(resnet20):
    q = zsq.quantize_model(resnet20, zsq.get_preset("genie", "w4a4"))
    layers = dict(quant_layers(q))
    assert len(layers) == 20
    shortcuts = [n for n, m in q.named_modules() if isinstance(m, QuantInput)]
    assert len(shortcuts) == 9  # one per BasicBlock
    for name in shortcuts:
        block = name.rsplit(".", 1)[0]
        assert q.get_submodule(name).input_quant is layers[block + ".conv1"].input_quant
    assert layers["layer1.0.conv1"].input_quant.bits == 8  # Genie's second layer A8 reaches the residual
    assert layers["layer2.0.conv1"].input_quant.bits == 4


def test_efficientnet_lite0_is_fully_wrapped():
    m = zsq.models.load("efficientnet_lite0")
    n_float = sum(isinstance(x, (torch.nn.Conv2d, torch.nn.Linear)) for x in m.modules())
    for preset, n_act in (("gdfq", sum(isinstance(x, torch.nn.ReLU6) for x in m.modules())), ("genie", None)):
        q = zsq.quantize_model(m, zsq.get_preset(preset, "w8a8"))
        assert len(quant_layers(q)) == n_float == 50
        if n_act is not None:
            assert len(act_quantizers(q)) == n_act
