import operator

import pytest
import torch
import torch.nn as nn

import zsq.models as zm
from zsq.models.cifar_resnet import BasicBlock, ShortcutA
from tests.models.layout import assert_layout


@pytest.mark.parametrize("depth", [20, 32, 44, 56])
def test_forward_shape_and_block_count(depth):
    m = zm.load(f"cifar10_resnet{depth}")
    assert not m.training
    out = m(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    n = (depth - 2) // 6
    assert sum(isinstance(b, BasicBlock) for b in m.modules()) == 3 * n
    meta = zm.get_meta(m)
    assert meta.input_size == (3, 32, 32) and meta.num_classes == 10 and meta.resize is None
    assert meta.mean == (0.485, 0.456, 0.406) and meta.std == (0.229, 0.224, 0.225)


def test_layout_relus_and_shortcuts():
    m = zm.load("cifar10_resnet20")
    graph = assert_layout(m, nn.ReLU)
    assert sum(isinstance(x, nn.ReLU) for x in m.modules()) == 1 + 2 * 9
    adds = [n for n in graph.nodes if n.op == "call_function" and n.target is operator.add]
    assert len(adds) == 9
    assert isinstance(m.layer2[0].shortcut, ShortcutA) and isinstance(m.layer3[0].shortcut, ShortcutA)
    assert isinstance(m.layer1[0].shortcut, nn.Identity) and isinstance(m.layer2[1].shortcut, nn.Identity)
    assert not list(m.layer2[0].shortcut.parameters())


def test_shortcut_a_values():
    x = torch.randn(2, 16, 8, 8)
    y = ShortcutA(16, 32, 2)(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert y[:, :8].abs().sum() == 0 and y[:, 24:].abs().sum() == 0


def test_state_dict_keys_match_akamaster_layout():
    keys = set(zm.load("cifar10_resnet20").state_dict())
    for k in ["conv1.weight", "bn1.running_var", "layer1.0.conv1.weight", "layer3.2.bn2.bias",
              "linear.weight", "linear.bias"]:
        assert k in keys
    assert not any("shortcut" in k or "relu" in k for k in keys)
