"""The tiny models every test package builds on, in one place (each seeded, with zsq metadata).

- ``TinyResNet``: zsq's model style (one ReLU per position, a ``shortcut`` module on the residual
  path); ``tiny_factory`` / ``tiny_quantized`` for export and quantization tests.
- ``make_tiny``: stem + two of zsq's own CIFAR BasicBlocks + linear, every reconstruction unit kind.
- ``tiny_bn_cnn``: a plain strided CNN with BN and non-trivial running statistics, for synthesis.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch
import torch.nn as nn

from zsq.models.cifar_resnet import BasicBlock
from zsq.models.meta import ModelMeta, set_meta
from zsq.quant import calibrate, get_preset, quantize_model

TINY_META = ModelMeta(name="tiny_resnet", num_classes=10, input_size=(3, 16, 16), mean=(0.5, 0.5, 0.5),
                      std=(0.25, 0.25, 0.25), dataset="test")


class Block(nn.Module):
    """conv-BN-ReLU-conv-BN + shortcut, then ReLU."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class TinyResNet(nn.Module):
    """Stem conv-BN-ReLU, residual ``Block``s named ``blocks``, optionally a depthwise conv + ReLU6, pool, fc."""

    def __init__(self, c: int = 8, num_classes: int = 10, blocks: Sequence[str] = ("block",), depthwise: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.block_names = tuple(blocks)
        for name in self.block_names:
            self.add_module(name, Block(c))
        self.depthwise = depthwise
        if depthwise:
            self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=True)
            self.relu6 = nn.ReLU6()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        for name in self.block_names:
            x = getattr(self, name)(x)
        if self.depthwise:
            x = self.relu6(self.dw(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def tiny_factory(name: str = "tiny_resnet", seed: int = 0) -> nn.Module:
    """A randomly initialised TinyResNet with non-trivial BN statistics (a ``model_factory`` too)."""
    g = torch.Generator().manual_seed(seed)
    m = TinyResNet()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=g) + 0.5)
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)
                mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=g) * 0.1)
                mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g) + 0.5)
    return set_meta(m.eval(), TINY_META)


def tiny_images(n: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, *TINY_META.input_size, generator=torch.Generator().manual_seed(seed))


def tiny_quantized(preset: str, bits: str, seed: int = 0) -> nn.Module:
    """TinyResNet quantized with a preset and calibrated on random images."""
    cfg = get_preset(preset, bits)
    if cfg.weight.observer == "lp":  # a coarser clip search keeps the tests fast
        cfg = replace(cfg, weight=replace(cfg.weight, lp_ratios=20), act=replace(cfg.act, lp_ratios=20))
    q = quantize_model(tiny_factory(seed=seed), cfg)
    calibrate(q, tiny_images(32, seed=seed + 7), batch_size=16)
    return q


# ---- reconstruction: zsq's own BasicBlocks -------------------------------------------------------
UNITS_META = ModelMeta(name="tiny", num_classes=10, input_size=(3, 16, 16), mean=(0.5,) * 3, std=(0.25,) * 3)


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
        gb = torch.Generator().manual_seed(seed + 1)  # layer biases too (torch's default init draws the global RNG)
        for mod in m.modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)) and mod.bias is not None:
                mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=gb))
    return set_meta(m.eval(), UNITS_META)


# ---- synthesis: a plain CNN with BN ------------------------------------------------------------------
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
