"""A weight quantizer with a fixed grid: what a loaded checkpoint's layers use.

Whatever quantized a weight before saving (a Lp-initialised UniformQuantizer, GDFQ's dynamic
min/max, a PTQ method's hard-rounded quantizer), the checkpoint keeps only its integer codes and
the (scale, zero point) grid. On load the layer weight is set to (codes - zp) * scale and this
module re-quantizes it on that fixed grid, which returns exactly the same values, so a loaded model
is bit-identical to the saved one and still offers the generic interface (int_repr, qparams,
qmin, qmax, bits) that export and re-saving rely on.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn

from zsq.quant.quantizer import fake_quantize, quantize_to_int


class FrozenWeightQuantizer(nn.Module):
    """Fake-quantizes a weight on a stored grid. ``scale``/``zero_point`` are stored already
    shaped to broadcast against the weight (e.g. [C, 1, 1, 1] per output channel, [] per tensor)."""

    def __init__(self, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, qmin: int, qmax: int):
        super().__init__()
        self.register_buffer("scale", scale.detach().clone().float())
        self.register_buffer("zero_point", zero_point.detach().clone().float())
        self._bits, self._qmin, self._qmax = int(bits), int(qmin), int(qmax)
        self.enabled = True

    @property
    def bits(self) -> int:
        return self._bits

    @property
    def qmin(self) -> int:
        return self._qmin

    @property
    def qmax(self) -> int:
        return self._qmax

    @property
    def signed(self) -> bool:
        return self._qmin < 0

    def extra_repr(self) -> str:
        return f"bits={self._bits}, codes=[{self._qmin}, {self._qmax}], scale shape={tuple(self.scale.shape)}"

    def qparams(self, x: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.scale, self.zero_point

    def int_repr(self, x: torch.Tensor) -> torch.Tensor:
        return quantize_to_int(x, self.scale, self.zero_point, self._qmin, self._qmax)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        return fake_quantize(w, self.scale, self.zero_point, self._qmin, self._qmax, "clip")
