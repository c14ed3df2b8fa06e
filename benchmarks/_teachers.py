"""Teachers for the synthesis benchmark: zsq.models.load when it exists, else a local ResNet-20
written from the asset MANIFEST (option-A shortcuts) so the benchmark runs before the models
package lands. Not part of the library."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from zsq.assets import RESNET20, asset
from zsq.models.meta import ModelMeta, set_meta

CIFAR_META = ModelMeta(name="cifar10_resnet20", num_classes=10, input_size=(3, 32, 32),
                       mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), dataset="cifar10")


class _Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = (cout - cin) // 2 if (stride != 1 or cin != cout) else None

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        sc = x if self.pad is None else F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + sc)


class _ResNet20(nn.Module):
    def __init__(self, n=3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(_Block(cin, cout, stride if i == 0 else 1))
                cin = cout
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.linear = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))


def resnet20() -> nn.Module:
    try:
        from zsq.models import load
        return load("cifar10_resnet20", weights=str(asset(RESNET20)))
    except Exception:  # models package not there yet
        pass
    m = _ResNet20()
    sd = torch.load(asset(RESNET20), map_location="cpu", weights_only=False)["state_dict"]
    m.load_state_dict({k.replace("module.", ""): v for k, v in sd.items()}, strict=False)
    return set_meta(m.eval(), CIFAR_META)


def cifar_exact():
    """(images normalized, labels) of the exact first-1017 CIFAR-10 test images."""
    import numpy as np
    from zsq.assets import CIFAR10_EXACT

    d = np.load(asset(CIFAR10_EXACT))
    x = torch.from_numpy(d["x"]).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(CIFAR_META.mean).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_META.std).view(1, 3, 1, 1)
    return (x - mean) / std, torch.from_numpy(d["y"]).long()
