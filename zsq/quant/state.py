"""The one place that writes quantizer flags: ``enabled`` (quantize in forward) and ``observing``
(update the range from each input).

A temporary change goes through a context manager, which puts every quantizer's own flags back even
when the block raises, so a failed calibration or probe never leaves a model half-switched:

    with quantizers_disabled(model):          # float forward through a fake-quant model
    with observing(model):                    # calibration: observe float inputs, freeze on exit
    with lazy_init_allowed(model):            # uncalibrated activations take their range from the first input
    with quantizer_flags(quants, enabled=False):

``set_flags`` is for lasting changes (a phase of reconstruction or training, restoring a checkpoint).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator, List, Optional, Sequence, Union

import torch.nn as nn

from zsq.quant.inventory import act_quantizers, quant_layers

Quantizers = Union[nn.Module, Iterable[nn.Module]]


def _act_list(target: Quantizers) -> List[nn.Module]:
    """The activation quantizers of a model, or the given quantizers."""
    if isinstance(target, nn.Module) and not hasattr(target, "observing"):
        return [q for _, q in act_quantizers(target)]
    return [target] if isinstance(target, nn.Module) else list(target)


def _weight_list(model: nn.Module) -> List[nn.Module]:
    return [layer.weight_quant for _, layer in quant_layers(model)
            if layer.weight_quant is not None and hasattr(layer.weight_quant, "enabled")]


def set_flags(quants: Sequence[nn.Module], *, enabled: Optional[bool] = None,
              observing: Optional[bool] = None) -> None:
    """Set the given flags (None leaves one as it is) on every quantizer that has it."""
    for q in quants:
        if enabled is not None:
            q.enabled = enabled
        if observing is not None and hasattr(q, "observing"):
            q.observing = observing


def set_quant_state(model: nn.Module, weights: bool = True, acts: bool = True) -> None:
    """Turn weight / activation fake quantization on or off for good (e.g. a float reference copy)."""
    set_flags(_weight_list(model), enabled=weights)
    set_flags(_act_list(model), enabled=acts)


@contextmanager
def quantizer_flags(target: Quantizers, *, enabled: Optional[bool] = None,
                    observing: Optional[bool] = None) -> Iterator[List[nn.Module]]:
    """Set flags for the block; each quantizer gets its own earlier values back afterwards."""
    quants = _act_list(target)
    saved = [(q, q.enabled, getattr(q, "observing", None)) for q in quants]
    try:
        set_flags(quants, enabled=enabled, observing=observing)
        yield quants
    finally:
        for q, e, o in saved:
            q.enabled = e
            if o is not None:
                q.observing = o


@contextmanager
def quantizers_disabled(model: nn.Module, weights: bool = True, acts: bool = True) -> Iterator[nn.Module]:
    """Float forward through a fake-quant model for the block (weights and/or activations off)."""
    quants = (_weight_list(model) if weights else []) + (_act_list(model) if acts else [])
    with quantizer_flags(quants, enabled=False):
        yield model


@contextmanager
def lazy_init_allowed(target: Quantizers) -> Iterator[List[nn.Module]]:
    """For the block, an activation quantizer with no range takes it from its first input (Genie's lazy
    initialisation, reconstruction's first pass, a probe that only needs shapes). Outside such a block
    a quantized model whose activations were never calibrated refuses a forward (``UniformQuantizer``):
    a library user never gets ranges from whatever batch came first without asking for it."""
    quants = [q for q in _act_list(target) if hasattr(q, "lazy_init")]
    saved = [(q, q.lazy_init) for q in quants]
    try:
        for q in quants:
            q.lazy_init = True
        yield quants
    finally:
        for q, v in saved:
            q.lazy_init = v


@contextmanager
def observing(target: Quantizers, seed: int = 0) -> Iterator[List[nn.Module]]:
    """Calibration: forget earlier ranges, observe float inputs (quantization off) in the block, then
    ``freeze()`` every quantizer (grid from what was seen, observing off, enabled) — also on error, so
    no quantizer is left observing. ``seed`` (the run's) seeds the subsamples range searches see."""
    quants = _act_list(target)
    for q in quants:
        q.reset_observer()
        if not getattr(q, "pinned", False):  # a pinned range (the image input's) stays as it is
            q.initialized.fill_(False)
        q.sample_seed = seed
    set_flags(quants, enabled=False, observing=True)
    try:
        yield quants
    finally:
        for q in quants:
            q.freeze()
