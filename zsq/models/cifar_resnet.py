"""CIFAR-10 ResNet-20/32/44/56 (He et al. 2016, section 4.2) with the option-A shortcut.

Written from the layout in shared/assets/MANIFEST.md (1c) so that the akamaster checkpoints load with
their own key names (conv1, bn1, layer{1,2,3}.{i}.conv1/bn1/conv2/bn2, linear).

Layout rules the quantization core relies on: every activation position has its own nn.ReLU
instance, and every residual path goes through a module attribute named ``shortcut``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from zsq.models.meta import ModelMeta
from zsq.models.registry import register_model

CIFAR10_META = dict(
    num_classes=10,
    input_size=(3, 32, 32),
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    resize=None,
    dataset="cifar10",
)


class ShortcutA(nn.Module):
    """Parameter-free option-A shortcut: subsample by ``stride``, zero-pad channels on both sides."""

    zsq_grid_preserving = True  # outputs are input values or 0: a quantized input stays on its grid

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        if (out_planes - in_planes) % 2:
            raise ValueError("option-A shortcut needs an even channel increase")
        self.stride = stride
        self.pad = (out_planes - in_planes) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad, self.pad))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, channel_pad={self.pad}"


class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn, plus shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = ShortcutA(in_planes, planes, stride)
        else:
            self.shortcut = nn.Identity()
        self.relu_out = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu_out(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """Stem 3x3 conv (16), three stages of n BasicBlocks (16/32/64), global pool, linear."""

    def __init__(self, depth: int, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = self._stage(16, 16, n, 1)
        self.layer2 = self._stage(16, 32, n, 2)
        self.layer3 = self._stage(32, 64, n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _stage(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride)]
        blocks += [BasicBlock(planes, planes, 1) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(self.flatten(self.avgpool(x)))


def _meta(name: str) -> ModelMeta:
    return ModelMeta(name=name, **CIFAR10_META)


@register_model(_meta("cifar10_resnet20"), default_weights="cifar10/resnet20-12fca82f.th")
def cifar10_resnet20() -> nn.Module:
    return CifarResNet(20)


@register_model(_meta("cifar10_resnet32"), default_weights="cifar10/resnet32-d509ac18.th")
def cifar10_resnet32() -> nn.Module:
    return CifarResNet(32)


@register_model(_meta("cifar10_resnet44"), default_weights="cifar10/resnet44-014dd654.th")
def cifar10_resnet44() -> nn.Module:
    return CifarResNet(44)


@register_model(_meta("cifar10_resnet56"), default_weights="cifar10/resnet56-4bfd9763.th")
def cifar10_resnet56() -> nn.Module:
    return CifarResNet(56)
