"""The integer view of a quantized layer's weight, shared by the checkpoint writer and the ONNX export.

Codes are read off the layer's *quantized* weight, w_hat = (q - z) * s, as q = round(w_hat / s) + z,
instead of asking the quantizer to re-quantize the float weight: what the model computes with is
w_hat, whatever quantizer made it (soft-rounding PTQ quantizers keep no float weight to re-quantize).
The result is verified: (q - z) * s must reproduce w_hat bit for bit, so whatever the codes say is
exactly what the model used.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from zsq.errors import ZsqError


@dataclass
class WeightGrid:
    codes: torch.Tensor       # int32, the weight's shape
    scale: torch.Tensor       # float32, broadcastable against the weight
    zero_point: torch.Tensor  # float32 (integer values), broadcastable against the weight
    bits: int
    qmin: int
    qmax: int
    quantizer: str            # type name of the weight quantizer


def weight_grid(name: str, layer: nn.Module) -> WeightGrid:
    """Codes and grid of ``layer``'s quantized weight; ZsqError naming the layer if it has none."""
    wq = getattr(layer, "weight_quant", None)
    missing = [a for a in ("qparams", "qmin", "qmax", "bits") if not hasattr(wq, a)]
    if wq is None or missing:
        raise ZsqError(f"layer {name}: weight quantizer {type(wq).__name__} lacks {', '.join(missing) or 'everything'}; "
                       f"its weight cannot be stored as integer codes")
    w = layer.weight.detach()
    with torch.no_grad():
        scale, zp = wq.qparams(w)
        scale = torch.as_tensor(scale, dtype=w.dtype).detach().clone()
        zp = torch.as_tensor(zp, dtype=w.dtype).detach().clone()
        w_hat = layer.quantized_weight().detach()
        codes = (torch.round(w_hat / scale) + zp).to(torch.int32)
        deq = (codes.to(w.dtype) - zp) * scale
    bits, qmin, qmax = int(wq.bits), int(wq.qmin), int(wq.qmax)
    if deq.shape != w_hat.shape or not torch.equal(deq, w_hat):
        diff = (deq - w_hat).abs().max().item() if deq.shape == w_hat.shape else float("nan")
        raise ZsqError(f"layer {name}: the quantized weight of {type(wq).__name__} is not (codes - zero_point) * scale "
                       f"on its grid (max diff {diff:.3g}); it cannot be stored as integer codes")
    if not torch.equal(zp, torch.round(zp)):
        raise ZsqError(f"layer {name}: zero point is not an integer; it cannot be stored as integer codes")
    if int(codes.min()) < qmin or int(codes.max()) > qmax:
        raise ZsqError(f"layer {name}: codes [{int(codes.min())}, {int(codes.max())}] leave the grid [{qmin}, {qmax}]")
    if qmax - qmin + 1 > 1 << bits:
        raise ZsqError(f"layer {name}: code range [{qmin}, {qmax}] does not fit in {bits} bits")
    return WeightGrid(codes, scale, zp, bits, qmin, qmax, type(wq).__name__)
