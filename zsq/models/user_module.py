"""What zsq needs of a user's ``nn.Module`` (the API's ``zsq.quantize(module, ...)``), checked before any
work: metadata that describes it (``input_size=(C, H, W)``, per-channel ``mean``/``std``), fp32
parameters (the quantizers' arithmetic is fp32), and a forward that returns one logits tensor
(N, classes). Explicit ``input_size=``/``mean=``/``std=`` that contradict a model's own metadata are
refused: neither may silently win."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from zsq.errors import ZsqError
from zsq.models.meta import ModelMeta


def check_input_size(input_size) -> tuple:
    """(C, H, W) as three positive ints, else ZsqError."""
    if (not isinstance(input_size, (tuple, list)) or len(input_size) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in input_size)):
        raise ZsqError(f"input_size must be (C, H, W), three positive integers, got {input_size!r}")
    return tuple(input_size)


def check_channel_values(name: str, values, channels: int, positive: bool = False) -> tuple:
    """``mean``/``std``: one finite number per channel (std > 0)."""
    if (not isinstance(values, (tuple, list)) or len(values) != channels
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                       and (v > 0 or not positive) for v in values)):
        what = "positive finite numbers" if positive else "finite numbers"
        raise ZsqError(f"{name} must be {channels} {what} (one per input channel), got {values!r}")
    return tuple(float(v) for v in values)


def check_float32(model: nn.Module, name: str) -> None:
    """zsq quantizes fp32 modules; an fp16/bf16/fp64 one would fail deep inside with a dtype error."""
    from torch.nn.parameter import is_lazy

    dtypes = {t.dtype for t in list(model.parameters()) + list(model.buffers())
              if not is_lazy(t) and t.is_floating_point()}  # a lazy layer's shape comes with the probe
    if dtypes - {torch.float32}:
        raise ZsqError(f"{name} has {', '.join(sorted(str(d).replace('torch.', '') for d in dtypes))} parameters; "
                       "zsq quantizes float32 modules (call .float() on a copy first)")


def probe_logits(model: nn.Module, input_size: tuple, name: str) -> int:
    """Run one zero image through ``model``; the number of classes its logits have, else ZsqError naming
    what it returned or why it failed on an input of that size."""
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, *input_size))
    except Exception as e:  # a shape the model cannot take: say which, not the layer's raw error
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ZsqError(f"{name} fails on an input of input_size {tuple(input_size)} ({type(e).__name__}: "
                       f"{text[:160]}); is input_size right?") from None
    if not torch.is_tensor(out):
        raise ZsqError(f"{name} returns a {type(out).__name__}; zsq quantizes classifiers whose forward returns one "
                       "logits tensor (N, classes): wrap the module so it returns the logits")
    if out.dim() != 2 or out.shape[0] != 1 or not out.is_floating_point():
        raise ZsqError(f"{name} returns a {out.dtype} tensor of shape {tuple(out.shape)} for one image; zsq "
                       "quantizes classifiers whose forward returns logits (N, classes)")
    return int(out.shape[1])


def check_meta_agrees(meta: ModelMeta, input_size=None, mean=None, std=None) -> None:
    """Refuse input_size/mean/std given next to a model's own metadata when they say something else."""
    for arg, given, own in (("input_size", input_size, meta.input_size), ("mean", mean, meta.mean),
                            ("std", std, meta.std)):
        if given is None:
            continue
        same = (isinstance(given, (tuple, list)) and len(given) == len(own)
                and all(isinstance(a, (int, float)) and math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)
                        for a, b in zip(given, own)))
        if not same:
            raise ZsqError(f"{arg}={tuple(given) if isinstance(given, (tuple, list)) else given!r} contradicts the "
                           f"model's own metadata ({meta.name}: {arg}={tuple(own)}); drop {arg}= or give "
                           "meta=ModelMeta(...) for the model as you mean it")


def meta_for_module(model: nn.Module, name: str, meta: Optional[ModelMeta], input_size=None, mean=None,
                    std=None) -> ModelMeta:
    """The ModelMeta a user's module runs with: ``meta``, else its own ``zsq_meta``, else one built from
    input_size/mean/std; the module's dtype and output checked on it."""
    check_float32(model, name)
    own = meta if meta is not None else getattr(model, "zsq_meta", None)
    if own is not None:
        if not isinstance(own, ModelMeta):
            raise ZsqError(f"meta must be a zsq.models.ModelMeta, got {type(own).__name__}")
        check_meta_agrees(own, input_size, mean, std)
        probe_logits(model, check_input_size(tuple(own.input_size)), name)
        return own
    for arg, value in (("input_size", input_size), ("mean", mean), ("std", std)):
        if value is None:
            raise ZsqError(f"an nn.Module without zsq metadata needs meta=ModelMeta(...) or {arg}= "
                           f"(input_size=(C, H, W), mean=(...), std=(...))")
    size = check_input_size(input_size)
    mean = check_channel_values("mean", mean, size[0])
    std = check_channel_values("std", std, size[0], positive=True)
    classes = probe_logits(model, size, name)
    return ModelMeta(name, classes, size, mean, std)
