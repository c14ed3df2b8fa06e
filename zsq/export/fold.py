"""``zsq export --fold``: a paper-preset model (BN kept after quantized convs) re-expressed with its
BatchNorms folded into the quantized weights, where that changes nothing but float rounding.

BN after a conv scales each output channel by f_c = gamma_c / sqrt(var_c + eps) and shifts it. The
conv's quantized weight is (q - z_c) * s_c per output channel, so the folded weight is
(q - z_c) * (s_c f_c): the same integer codes on a grid with step s_c |f_c| (for f_c < 0 the codes
are mirrored, q -> qmin + qmax - q, with the zero point), and the BN shift goes into the bias. No
value moves to another grid point, so the folded model computes what the original computes up to
float rounding (checked here, and by ``zsq export``'s parity check against the original).

What folding cannot do is quantize a tensor the preset left in float (a conv output going to a
residual add, the image) or widen a sub-8-bit activation grid: the runtime keeps those layers in
float between Q/DQ pairs, and ``zsq export`` lists them from the runtime's own optimized graph.
"""
from __future__ import annotations

import copy
from typing import List, Tuple

import torch
import torch.nn as nn

from zsq.errors import ZsqError
from zsq.export.frozen import FrozenWeightQuantizer
from zsq.export.weight_grid import weight_grid
from zsq.quant.modules import QuantConv2d, folded_stand_in
from zsq.quant.state import quantizer_flags
from zsq.quant.transforms import _conv_bn_pairs
from zsq.quant.inventory import act_quantizers, set_submodule


def _fold_one(layer: QuantConv2d, name: str, bn: nn.BatchNorm2d) -> None:
    g = weight_grid(name, layer)
    with torch.no_grad():
        f = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
        beta = bn.bias if bn.affine else torch.zeros_like(f)
        fc = f.reshape(-1, 1, 1, 1)
        neg = fc < 0
        mirror = g.qmin + g.qmax
        codes = torch.where(neg, mirror - g.codes, g.codes).float()
        zp = torch.where(neg, mirror - g.zero_point, g.zero_point.expand_as(fc))
        scale = (g.scale * fc).abs()
        bias = layer.bias if layer.bias is not None else torch.zeros_like(f)
        new_bias = beta + (bias - bn.running_mean) * f
        layer.weight.copy_((codes - zp) * scale)
        layer.bias = nn.Parameter(new_bias.detach().clone())
    layer.weight_quant = FrozenWeightQuantizer(scale, zp, g.bits, g.qmin, g.qmax)


def fold_quantized_batchnorm(qmodel: nn.Module, example: torch.Tensor, rtol: float = 1e-4
                             ) -> Tuple[nn.Module, List[List[str]]]:
    """A copy of ``qmodel`` with every BatchNorm2d that reads exactly a quantized conv's output
    folded into that conv's weight grid and bias. Returns (model, [[conv, bn], ...]).
    Refuses (ZsqError) when the folded model's outputs differ beyond float rounding."""
    m = copy.deepcopy(qmodel).eval()
    pairs = [(c, b) for c, b in _conv_bn_pairs(m, example) if isinstance(m.get_submodule(c), QuantConv2d)
             and m.get_submodule(c).weight_quant is not None]
    for conv_name, bn_name in pairs:
        bn = m.get_submodule(bn_name)
        _fold_one(m.get_submodule(conv_name), conv_name, bn)
        set_submodule(m, bn_name, folded_stand_in(bn))
    # compare with activation quantizers off: then only float rounding of the weights differs, and no
    # activation near a rounding boundary can flip and cascade
    with quantizer_flags([q for mod in (qmodel, m) for _, q in act_quantizers(mod)], enabled=False), \
            torch.no_grad():
        ref, got = qmodel.eval()(example), m(example)
    rel = float((ref - got).abs().max() / ref.abs().max().clamp(min=1e-12))
    if rel > rtol:
        raise ZsqError(f"folding BatchNorm into the quantized weights changed the outputs by {rel:.2e} (relative); "
                       f"export without --fold")
    m.zsq_quant_plan = dict(getattr(qmodel, "zsq_quant_plan", {}), folded_after_quantization=[list(p) for p in pairs])
    return m, [list(p) for p in pairs]
