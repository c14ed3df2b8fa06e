"""A user's own model file, as `zsq quantize tests/assets/my_net.py:build --weights W.pt --input-size 3,32,32
--mean ... --std ...` takes it (tests/models/test_factory.py). Not a zsq model: no metadata attached."""
import torch.nn as nn


class MyNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


def build():
    return MyNet()


def broken():
    raise RuntimeError("cannot build on Tuesdays")


def not_a_module():
    return {"weights": 1}


NOT_CALLABLE = 3
