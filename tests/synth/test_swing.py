import torch
import torch.nn as nn
import torch.nn.functional as F

from zsq.synth.swing import SwingConv2d, count_swing, set_swing, swing_copy


def test_shifts_lie_in_the_unit_square_and_shapes_are_kept():
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    sw = SwingConv2d(conv, torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 9, 9)
    seen = set()
    for _ in range(200):
        y = sw(x)
        dy, dx = sw.last_shift
        seen.add((dy, dx))
        assert y.shape == conv(x).shape
        # equals the plain conv on the reflect-shifted input
        p = F.pad(x, (1, 1, 1, 1), mode="reflect")[:, :, 1 + dy:1 + dy + 9, 1 + dx:1 + dx + 9]
        assert torch.allclose(y, conv(p))
    assert seen == {(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1)}


def test_swing_copy_wraps_strided_convs_only_and_leaves_the_original(tiny_teacher):
    x = torch.randn(2, 3, 16, 16)
    before = tiny_teacher(x)
    twin = swing_copy(tiny_teacher, torch.Generator().manual_seed(1))
    assert count_swing(twin) == 2 and count_swing(tiny_teacher) == 0
    assert not any(isinstance(m, SwingConv2d) for m in tiny_teacher.modules())
    set_swing(twin, False)
    assert torch.allclose(twin(x), before)
    set_swing(twin, True)
    outs = [twin(x) for _ in range(6)]
    assert any(not torch.allclose(o, before) for o in outs)
    assert torch.allclose(tiny_teacher(x), before)
