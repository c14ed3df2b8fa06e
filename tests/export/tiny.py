"""A tiny residual CNN in zsq's model style (one ReLU per position, a ``shortcut`` module on the
residual path) with metadata, so export tests run in well under a second per model."""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn

from zsq.models.meta import ModelMeta, set_meta
from zsq.quant import calibrate, get_preset, quantize_model

TINY_META = ModelMeta(name="tiny_resnet", num_classes=10, input_size=(3, 16, 16), mean=(0.5, 0.5, 0.5),
                      std=(0.25, 0.25, 0.25), dataset="test")


class Block(nn.Module):
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
    def __init__(self, c: int = 8, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.block = Block(c)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=True)
        self.relu6 = nn.ReLU6()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.block(x)
        x = self.relu6(self.dw(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def tiny_factory(name: str = "tiny_resnet", seed: int = 0) -> nn.Module:
    """A randomly initialised TinyResNet with non-trivial BN statistics."""
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
