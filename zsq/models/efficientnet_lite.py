"""EfficientNet-Lite0 (TF "SAME" padding, BN eps 1e-3, ReLU6, no squeeze-excite).

Written from shared/assets/MANIFEST.md (2b) so that the converted official checkpoint loads strictly
with the efficientnet_pytorch key names (_conv_stem, _bn0, _blocks.N._expand_conv, ..., _fc).

Layout rules the quantization core relies on: TF "SAME" padding is a separate parameter-free
``SamePad2d`` module in front of a plain ``nn.Conv2d(padding=0)``; every activation position has
its own nn.ReLU6; the residual path goes through a module attribute named ``shortcut``.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from zsq.models.meta import ModelMeta
from zsq.models.registry import register_model

BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # TF's 0.99 decay; only matters when training

# (repeats, kernel, first stride, expand ratio, in channels, out channels) per stage.
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


def same_pads(size: int, kernel: int, stride: int, dilation: int = 1) -> Tuple[int, int]:
    """TF "SAME" (before, after) padding for one spatial dim: the extra pixel goes after."""
    total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class SamePad2d(nn.Module):
    """Parameter-free TF "SAME" padding, computed from the input size at forward time."""

    zsq_grid_preserving = True  # zero padding: a quantized input stays on its grid
    zsq_zero_pad = True  # per-channel zero padding: channel scales pass through it (cross-layer equalization)

    def __init__(self, kernel: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.kernel, self.stride, self.dilation = kernel, stride, dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = same_pads(x.shape[-2], self.kernel, self.stride, self.dilation)
        left, right = same_pads(x.shape[-1], self.kernel, self.stride, self.dilation)
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return x

    def static_for(self, shape: Tuple[int, ...]) -> nn.Module:
        """This padding for one fixed input shape, with the pads as constants: the ONNX export uses
        it so the graph holds a Pad of constant pads, which ``zsq.export.onnx_passes`` can move into
        the conv (computed pads would leave a float Pad between Q/DQ and the conv)."""
        top, bottom = same_pads(shape[-2], self.kernel, self.stride, self.dilation)
        left, right = same_pads(shape[-1], self.kernel, self.stride, self.dilation)
        return nn.ZeroPad2d((left, right, top, bottom)) if top or bottom or left or right else nn.Identity()

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}, stride={self.stride}, dilation={self.dilation}"


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """[1x1 expand, BN, ReLU6] -> kxk depthwise, BN, ReLU6 -> 1x1 project, BN (+ shortcut)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(in_ch, mid, 1, bias=False)
            self._bn0 = _bn(mid)
            self._expand_act = nn.ReLU6()
        self._depthwise_pad = SamePad2d(kernel, stride)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, padding=0, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._depthwise_act = nn.ReLU6()
        self._project_conv = nn.Conv2d(mid, out_ch, 1, bias=False)
        self._bn2 = _bn(out_ch)
        # Residual only where shapes match; drop-connect is training-only and left out.
        self.shortcut: Optional[nn.Module] = nn.Identity() if stride == 1 and in_ch == out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.has_expand:
            out = self._expand_act(self._bn0(self._expand_conv(out)))
        out = self._depthwise_act(self._bn1(self._depthwise_conv(self._depthwise_pad(out))))
        out = self._bn2(self._project_conv(out))
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return out


class EfficientNetLite(nn.Module):
    def __init__(self, stages=LITE0_STAGES, stem_ch: int = 32, head_ch: int = 1280,
                 num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        self._stem_pad = SamePad2d(3, 2)
        self._conv_stem = nn.Conv2d(3, stem_ch, 3, 2, padding=0, bias=False)
        self._bn0 = _bn(stem_ch)
        self._stem_act = nn.ReLU6()
        blocks = []
        for repeats, k, s, e, cin, cout in stages:
            for i in range(repeats):
                blocks.append(MBConvBlock(cin if i == 0 else cout, cout, k, s if i == 0 else 1, e))
        self._blocks = nn.Sequential(*blocks)
        self._conv_head = nn.Conv2d(stages[-1][5], head_ch, 1, bias=False)
        self._bn1 = _bn(head_ch)
        self._head_act = nn.ReLU6()
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._flatten = nn.Flatten(1)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(head_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.uniform_(m.weight, -1 / math.sqrt(head_ch), 1 / math.sqrt(head_ch))
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._stem_act(self._bn0(self._conv_stem(self._stem_pad(x))))
        x = self._blocks(x)
        x = self._head_act(self._bn1(self._conv_head(x)))
        return self._fc(self._dropout(self._flatten(self._avg_pooling(x))))


LITE0_META = ModelMeta(
    name="efficientnet_lite0",
    num_classes=1000,
    input_size=(3, 224, 224),
    mean=(127 / 255,) * 3,
    std=(128 / 255,) * 3,
    resize=256,
    interpolation="bilinear",
    dataset="imagenet",
)


@register_model(LITE0_META, default_weights="imagenet/efficientnet-lite0-57934424.pth")
def efficientnet_lite0() -> nn.Module:
    return EfficientNetLite()
