"""Quantization protocols of the baselines, beside the core's `genie` preset (as in the official BRECQ and QDrop repositories).

BRECQ and QDrop fold BN first and use per-tensor *asymmetric* activation steps (LSQ-learnable in
their reconstruction); BRECQ keeps the second layer's input at 8 bits, QDrop does not. Both place
activation quantizers after layers in their code; zsq's core offers layer-input placement, which
quantizes the same tensors except that the last block output is quantized after pooling (as Genie).
"""
from __future__ import annotations

from zsq.quant.qconfig import LayerOverride, QuantConfig, register_preset
from zsq.quant.quantizer import QuantSpec

_W = QuantSpec(per_channel=True, symmetric=False, observer="lp", lp_p=2.4, lp_ratios=100)
_A = QuantSpec(per_channel=False, symmetric=False, observer="lp", lp_p=2.4, lp_ratios=100,
               learnable=True, ste="clip")


@register_preset("brecq", "BRECQ: BN folded; W per-channel asym (Lp-2.4 init), A per-tensor asym learnable at "
                          "layer inputs incl. residual; first layer W8 float input, 2nd layer A8, last W8A8")
def brecq_preset() -> QuantConfig:
    return QuantConfig(preset="brecq", version=1, weight=_W, act=_A, act_placement="layer_input",
                       quantize_residual=True, quantize_image_input=False, fold_bn=True,
                       overrides=(LayerOverride("@first", w_bits=8, quantize_input=False),
                                  LayerOverride("@second", a_bits=8),
                                  LayerOverride("@last", w_bits=8, a_bits=8)))


@register_preset("qdrop", "QDrop: as brecq but the 2nd layer's input is low-bit too (first layer W8 float "
                          "input, last W8A8); BN folded")
def qdrop_preset() -> QuantConfig:
    return QuantConfig(preset="qdrop", version=1, weight=_W, act=_A, act_placement="layer_input",
                       quantize_residual=True, quantize_image_input=False, fold_bn=True,
                       overrides=(LayerOverride("@first", w_bits=8, quantize_input=False),
                                  LayerOverride("@last", w_bits=8, a_bits=8)))
