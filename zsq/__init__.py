"""zsq: zero-shot (data-free) quantization of PyTorch vision models.

    import zsq
    model = zsq.models.load("cifar10_resnet20", weights="resnet20-12fca82f.th")
    qmodel = zsq.quantize_model(model, zsq.get_preset("genie", "w4a4"))
"""
__version__ = "0.1.0"

from zsq import models, quant  # noqa: F401,E402
from zsq.errors import ZsqError  # noqa: F401,E402
from zsq.evaluate import evaluate  # noqa: F401,E402  (the function; the module stays importable as zsq.evaluate)
from zsq.quant import QuantConfig, get_preset, list_presets, quantize_model  # noqa: F401,E402
from zsq.api import quantize  # noqa: F401,E402


def load_quantized(path):
    """Rebuild a quantized model saved by `zsq quantize --out` (see zsq.export)."""
    from zsq.export import load_quantized as _load

    return _load(path)
