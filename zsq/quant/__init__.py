"""The quantization core: quantizers, quantized modules, configs/presets and model rewrites."""
from zsq.quant.calibration import calibrate, calibrate_from_bn  # noqa: F401
from zsq.quant.qconfig import (LayerOverride, QuantConfig, format_bits, get_preset, list_presets,  # noqa: F401
                              parse_bits, register_preset)
from zsq.quant.modules import QuantAct, QuantConv2d, QuantInput, QuantLinear  # noqa: F401
from zsq.quant.state import lazy_init_allowed, observing, quantizer_flags, quantizers_disabled, set_flags, set_quant_state  # noqa: F401
from zsq.quant.quantizer import QuantSpec, UniformQuantizer, fake_quantize, lp_search  # noqa: F401
from zsq.quant.transforms import fold_batchnorm, quantize_model  # noqa: F401
from zsq.quant.inventory import act_quantizers, quant_layers
