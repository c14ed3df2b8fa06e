"""zsq: zero-shot (data-free) quantization of PyTorch vision models.

    import zsq
    result = zsq.quantize("cifar10_resnet20", weights="resnet20-12fca82f.th", bits="w4a4")
    result = zsq.quantize(zsq.ModelSource(my_module, input_size=(3, 224, 224), mean=(0.485, 0.456, 0.406),
                                          std=(0.229, 0.224, 0.225)), method="bn-minmax", bits="w8a8")
    result.model, result.report
    # the same as a value: zsq.execute(zsq.Run(model=zsq.ModelSource(...), method=zsq.MethodSpec("genie"), ...))
"""
__version__ = "0.1.0"

from zsq import models, quant  # noqa: E402
from zsq.errors import ZsqError  # noqa: E402
from zsq.evaluation import evaluate  # noqa: E402  (the function; its module is zsq.evaluation)
from zsq.quant import QuantConfig, get_preset, list_presets, quantize_model  # noqa: E402
from zsq.api import quantize  # noqa: E402
from zsq.run import (Calibration, ComputeConfig, MethodSpec, ModelSource, Output, QuantSpec, Run,  # noqa: E402
                     RunBudget, execute)
from zsq import methods, ptq, qat, synth  # noqa: F401,E402  (fill the method, preset and synthesizer registries)

__all__ = [
    "quantize", "Run", "execute", "ModelSource", "MethodSpec", "QuantSpec", "Calibration", "RunBudget", "Output",
    "ComputeConfig", "QuantResult", "quantize_model", "QuantConfig", "get_preset", "list_presets", "evaluate",
    "synthesize", "load_quantized", "get_method", "list_methods", "register_method", "ZsqError", "models", "quant",
    "__version__",
]

# names of the method and synthesis packages, reached through them
_LAZY = {"QuantResult": "zsq.methods", "get_method": "zsq.methods", "list_methods": "zsq.methods",
         "register_method": "zsq.methods", "synthesize": "zsq.synth"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'zsq' has no attribute {name!r}")


def load_quantized(path, **kwargs):
    """Rebuild a quantized model saved by `zsq quantize --out` (see zsq.export)."""
    from zsq.export import load_quantized as _load

    return _load(path, **kwargs)
