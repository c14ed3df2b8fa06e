"""The whole job in one call: ``zsq.quantize`` builds a ``zsq.run.Run`` and executes it (load a model,
get calibration images, run a method, save the quantized model, report FP32 vs quantized accuracy)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Union

from zsq.run import (Calibration, ComputeConfig, MethodSpec, ModelSource, Output, QuantSpec, Run, RunBudget,
                     default_num_images, execute, load_calibration, resolve_model, run_names)

__all__ = ["quantize", "default_num_images", "load_calibration", "resolve_model", "run_names"]


def quantize(model, *, method: str = "bn-minmax", bits: str = "w4a4", preset: Optional[str] = None,
             options: Optional[Dict[str, Any]] = None, calibration: Optional[Calibration] = None,
             budget: Union[str, RunBudget] = "quick", eval_data: Optional[str] = None,
             out: Union[None, str, Path, Output] = None, compute: Optional[ComputeConfig] = None, seed: int = 0,
             strict: bool = False):
    """`zsq quantize` as a function. Returns a QuantResult: ``.model`` the quantized model, ``.report``
    the JSON report (its keys: ``zsq.run.REPORT_KEYS``; the method's own report under ``method_report``).

    model: a model name, an ``nn.Module`` with zsq metadata, or a ``zsq.ModelSource`` (weights, pretrained,
    random_init; for a module without metadata ``meta=`` or ``input_size``/``mean``/``std``). A model name
    without weights or ``pretrained`` is refused unless ``random_init=True``.
    calibration: ``zsq.Calibration(synth=..., data=..., images=..., num_images=...)``; None: the method's own
    synthesizer when it needs images. budget: "quick", "paper" or ``zsq.RunBudget(name, iters, epochs, ...)``.
    out: a folder, or ``zsq.Output(out, force=, resume=)``. compute: ``zsq.ComputeConfig(device, precision,
    channels_last, compile)``; the default cpu + fp32 eager is bit-reproducible. strict: refuse layers zsq would
    keep in float (Conv3d, ConvTranspose2d, LSTM, functional F.conv2d/F.linear calls)."""
    run = Run(model=model if isinstance(model, ModelSource) else ModelSource(model),
              method=MethodSpec(method, options or {}), quant=QuantSpec(bits, preset),
              calibration=calibration if calibration is not None else Calibration(), eval_data=eval_data,
              output=out if isinstance(out, Output) else Output(out),
              compute=compute if compute is not None else ComputeConfig(),
              budget=budget if isinstance(budget, RunBudget) else RunBudget(budget), seed=seed, strict=strict)
    return execute(run)
