"""Swing convolution (Genie's official distill.py `SwingConv2d`): a random ±1-pixel reflect-shift before every strided conv.

A stride-2 conv only ever samples every other pixel, so pixels that no stride lands on get no
gradient and synthetic images show checkerboard artifacts. Shifting the conv's input by a random
offset in {-1,0,1}² (reflect-padded, cropped back to the same size; one offset per layer per
forward, shared by the batch) lets every pixel take part. It is used on a *copy* of the teacher
during synthesis only; quantization always sees the original convs.

Under torch.compile the draw cannot sit inside the forward (a generator draw and ``int()`` of a tensor
break the graph at every strided conv). ``SwingPlan`` draws the offsets before each forward instead,
from the same generator and in the order the forward would have drawn them, and the convs apply them by
index (a copy, exact like the slice), so a compiled teacher swings through the same offsets as eager.
"""
from __future__ import annotations

import copy
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

from zsq.hooks import Hooks


class SwingConv2d(nn.Module):
    """Wraps a strided Conv2d; shifts its input by (dy, dx) ∈ {-1,0,1}² drawn from `generator`."""

    def __init__(self, conv: nn.Conv2d, generator: torch.Generator | None = None, jitter: int = 1):
        super().__init__()
        self.conv = conv
        self.generator = generator
        self.jitter = jitter
        self.enabled = True
        self.last_shift = (0, 0)
        self.planned = None  # (2,) int64 offsets in [0, 2*jitter] set by SwingPlan.draw; None: draw here

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.conv(x)
        j = self.jitter
        if self.planned is not None:  # traceable: offsets drawn before the forward, applied by index
            h, w = x.shape[-2:]
            padded = F.pad(x, (j, j, j, j), mode="reflect")
            rows = torch.arange(h, device=x.device) + self.planned[0]
            cols = torch.arange(w, device=x.device) + self.planned[1]
            return self.conv(padded.index_select(2, rows).index_select(3, cols))
        dy, dx = (int(v) for v in torch.randint(0, 2 * j + 1, (2,), generator=self.generator))
        self.last_shift = (dy - j, dx - j)
        h, w = x.shape[-2:]
        padded = F.pad(x, (j, j, j, j), mode="reflect")
        return self.conv(padded[:, :, dy:dy + h, dx:dx + w])


def swing_copy(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """A deep copy of `model` in eval mode, with every Conv2d whose stride != 1 wrapped in
    SwingConv2d drawing from `generator`; `model` itself is untouched."""
    twin = copy.deepcopy(model).eval()
    for name, module in list(twin.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Conv2d) and tuple(child.stride) != (1, 1):
                setattr(module, child_name, SwingConv2d(child, generator))
    return twin


def set_swing(model: nn.Module, enabled: bool) -> None:
    """Turn every SwingConv2d in `model` on or off (off = the plain conv)."""
    for m in model.modules():
        if isinstance(m, SwingConv2d):
            m.enabled = enabled


def count_swing(model: nn.Module) -> int:
    return sum(isinstance(m, SwingConv2d) for m in model.modules())


class SwingPlan:
    """Offsets drawn before each forward (for a compiled teacher): ``draw(gen)`` takes from ``gen`` exactly
    what the forward would have drawn, in the order the forward runs the swing convs (found once, by
    watching one 1-image forward)."""

    def __init__(self, model: nn.Module, probe: torch.Tensor):
        self.order: List[SwingConv2d] = []
        swings = [m for m in model.modules() if isinstance(m, SwingConv2d)]
        with Hooks() as hooks, torch.no_grad():
            for m in swings:
                hooks.pre(m, lambda mod, _args: self.order.append(mod))
                m.planned = torch.full((2,), m.jitter, dtype=torch.long, device=probe.device)  # no draw here
            model(probe)

    def draw(self, gen: torch.Generator) -> None:
        for m in self.order:
            if m.enabled:
                d = torch.randint(0, 2 * m.jitter + 1, (2,), generator=gen)
                m.planned.copy_(d)
                m.last_shift = (int(d[0]) - m.jitter, int(d[1]) - m.jitter)
