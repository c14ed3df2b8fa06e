import pytest
import torch
import torch.nn as nn

from zsq.models.cifar_resnet import BasicBlock
from zsq.models.meta import ModelMeta, set_meta

TINY_META = ModelMeta(name="tiny", num_classes=10, input_size=(3, 16, 16), mean=(0.5,) * 3, std=(0.25,) * 3)


class TinyNet(nn.Module):
    """Stem conv + two zsq CIFAR BasicBlocks + linear: the smallest model with every unit kind."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = nn.Sequential(BasicBlock(16, 16, 1), BasicBlock(16, 32, 2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.linear = nn.Linear(32, 10)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        return self.linear(self.flatten(self.avgpool(self.layer1(x))))


def make_tiny(seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    m = TinyNet()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * (2.0 / mod.weight[0].numel()) ** 0.5)
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.copy_(0.1 * torch.randn(mod.num_features, generator=g))
                mod.running_var.copy_(0.5 + torch.rand(mod.num_features, generator=g))
                mod.weight.copy_(0.8 + 0.4 * torch.rand(mod.num_features, generator=g))
                mod.bias.copy_(0.1 * torch.randn(mod.num_features, generator=g))
    return set_meta(m.eval(), TINY_META)


@pytest.fixture
def tiny():
    return make_tiny()


@pytest.fixture
def tiny_images():
    return torch.randn(48, 3, 16, 16, generator=torch.Generator().manual_seed(1))
