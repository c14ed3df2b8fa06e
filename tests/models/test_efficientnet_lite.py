import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import zsq.models as zm
from zsq.models.efficientnet_lite import MBConvBlock, SamePad2d, same_pads
from tests.models.layout import assert_layout


@pytest.mark.parametrize(
    "size,k,s,pads",
    [
        (224, 3, 2, (0, 1)),  # stride 2 on even input: the extra pixel goes bottom/right
        (224, 5, 2, (1, 2)),
        (112, 3, 1, (1, 1)),
        (14, 5, 1, (2, 2)),
        (7, 3, 2, (1, 1)),  # odd input: total pad 2
        (7, 1, 1, (0, 0)),
        (227, 3, 2, (1, 1)),
    ],
)
def test_same_pads_match_tf(size, k, s, pads):
    assert same_pads(size, k, s) == pads


def test_samepad_module_pads_exactly():
    x = torch.randn(1, 2, 6, 8)
    y = SamePad2d(5, 2)(x)
    assert y.shape == (1, 2, 6 + 3, 8 + 3)
    assert torch.equal(y[:, :, 1:7, 1:9], x)
    assert y[:, :, 0].abs().sum() == 0 and y[:, :, 7:].abs().sum() == 0
    assert y[:, :, :, 0].abs().sum() == 0 and y[:, :, :, 9:].abs().sum() == 0
    # Same result as TF SAME: output ceil(H/s), i.e. 3x4 here.
    assert F.conv2d(y, torch.ones(1, 2, 5, 5), stride=2).shape[-2:] == (3, 4)


def test_forward_shape_meta_and_convs_are_plain():
    m = zm.load("efficientnet_lite0")
    out = m(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000)
    meta = zm.get_meta(m)
    assert meta.input_size == (3, 224, 224) and meta.resize == 256 and meta.interpolation == "bilinear"
    assert meta.mean == (127 / 255,) * 3 and meta.std == (128 / 255,) * 3
    convs = [c for c in m.modules() if isinstance(c, nn.Conv2d)]
    assert all(c.padding == (0, 0) and c.bias is None for c in convs)
    assert all(b.eps == 1e-3 for b in m.modules() if isinstance(b, nn.BatchNorm2d))
    # Every kxk conv with k > 1 is preceded by its own SamePad2d.
    pads = [p for p in m.modules() if isinstance(p, SamePad2d)]
    assert len(pads) == sum(c.kernel_size[0] > 1 for c in convs) == 17


def test_layout_relu6_and_shortcuts():
    m = zm.load("efficientnet_lite0")
    graph = assert_layout(m, nn.ReLU6)
    assert sum(isinstance(x, nn.ReLU6) for x in m.modules()) == 1 + 1 + 15 * 2 + 1
    blocks = [b for b in m.modules() if isinstance(b, MBConvBlock)]
    assert len(blocks) == 16
    with_res = [i for i, b in enumerate(blocks) if b.shortcut is not None]
    # Residual on every non-first block of a stage (stride 1, in == out).
    assert with_res == [2, 4, 6, 7, 9, 10, 12, 13, 14]
    adds = [n for n in graph.nodes if n.op == "call_function" and n.target is operator.add]
    assert len(adds) == len(with_res)


def test_state_dict_keys_match_checkpoint_layout():
    sd = zm.load("efficientnet_lite0").state_dict()
    assert len(sd) == 296
    assert "_blocks.0._expand_conv.weight" not in sd
    assert sd["_blocks.1._expand_conv.weight"].shape == (96, 16, 1, 1)
    assert sd["_blocks.15._depthwise_conv.weight"].shape == (1152, 1, 3, 3)
    assert sd["_fc.weight"].shape == (1000, 1280)
