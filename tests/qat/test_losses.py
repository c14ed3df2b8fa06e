import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from zsq.errors import ZsqError
from zsq.qat.losses import (FeatureTaps, channel_attention, feature_alignment_loss, kd_kl_loss,
                            residual_branch_taps)


def _softmax(z):
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def test_kl_matches_hand_computation_both_normalisations():
    s = [[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]]
    t = [[0.0, 1.0, 3.0], [2.0, 0.0, -2.0]]
    T, scale = 2.0, 7.0
    total = 0.0
    for zs, zt in zip(s, t):
        ps, pt = _softmax([v / T for v in zs]), _softmax([v / T for v in zt])
        total += sum(a * math.log(a / b) for a, b in zip(pt, ps))
    st, tt = torch.tensor(s), torch.tensor(t)
    mean = kd_kl_loss(st, tt, temperature=T, scale=scale, reduction="mean")
    batchmean = kd_kl_loss(st, tt, temperature=T, scale=scale, reduction="batchmean")
    assert mean.item() == pytest.approx(scale * total / 6, rel=1e-6)  # / (B*C)
    assert batchmean.item() == pytest.approx(scale * total / 2, rel=1e-6)  # / B
    # "mean" is what nn.KLDivLoss() (legacy default) computes in GDFQ/AIT
    ref = F.kl_div(F.log_softmax(st / T, 1), F.softmax(tt / T, 1), reduction="mean")
    assert mean.item() == pytest.approx(scale * ref.item(), rel=1e-6)


def test_kl_zero_for_identical_logits_and_rejects_bad_options():
    z = torch.randn(4, 10)
    assert kd_kl_loss(z, z).abs().item() < 1e-6
    with pytest.raises(ZsqError):
        kd_kl_loss(z, z, reduction="sum")
    with pytest.raises(ZsqError):
        kd_kl_loss(z, z, temperature=0)


def test_feature_alignment_matches_hand_computation():
    fs = torch.tensor([[[[1.0, 3.0]], [[2.0, 0.0]]]])  # (1, 2, 1, 2)
    ft = torch.tensor([[[[0.0, 1.0]], [[1.0, 1.0]]]])
    # a_S = normalize([ (1+9)/2, (4+0)/2 ]) = normalize([5, 2]); a_T = normalize([0.5, 1])
    aS = [5 / math.sqrt(29), 2 / math.sqrt(29)]
    aT = [0.5 / math.sqrt(1.25), 1 / math.sqrt(1.25)]
    assert channel_attention(fs)[0].tolist() == pytest.approx(aS, rel=1e-6)
    expected = 1000 * ((aS[0] - aT[0]) ** 2 + (aS[1] - aT[1]) ** 2) / 2
    got = feature_alignment_loss([fs, fs], [ft, ft], weight=1000.0)
    assert got.item() == pytest.approx(2 * expected, rel=1e-5)  # summed over two taps
    with pytest.raises(ZsqError):
        feature_alignment_loss([fs], [])


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)
        self.conv2, self.bn2 = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)
        self.shortcut = nn.Identity()

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + self.shortcut(x))


def test_taps_find_residual_branch_outputs_and_remove_hooks():
    net = nn.Sequential(_Block(), _Block()).eval()
    names = residual_branch_taps(net)
    assert names == ["0.bn2", "1.bn2"]
    x = torch.randn(3, 2, 4, 4)
    with FeatureTaps(net, names) as taps:
        net(x)
        feats = taps.take()
    assert torch.allclose(feats[0], net[0].bn2(net[0].conv2(torch.relu(net[0].bn1(net[0].conv1(x))))))
    assert not net[0].bn2._forward_hooks
    with pytest.raises(ZsqError):
        FeatureTaps(nn.Sequential(nn.Conv2d(2, 2, 1)), residual_branch_taps(nn.Sequential(nn.Conv2d(2, 2, 1))))
