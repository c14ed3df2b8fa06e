import pytest
import torch
import torch.nn as nn

from zsq.models.meta import ModelMeta, set_meta


def tiny_bn_cnn(num_classes: int = 10, size: int = 16, seed: int = 0) -> nn.Module:
    """A small CNN with BN and strided convs, with non-trivial running statistics."""
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))
    with torch.no_grad():
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.2, 0.2)
    m.eval()
    return set_meta(m, ModelMeta(name="tiny_bn_cnn", num_classes=num_classes, input_size=(3, size, size),
                                 mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))


@pytest.fixture
def tiny_teacher():
    return tiny_bn_cnn()
