"""What a fake-quantized model holds, found by type: its wrapped layers, its activation quantizers, a
shape probe for it. The bottom of zsq.quant's model-level modules: the state, calibration, deploy and
rewrite modules all read a model through these, so none of them needs another to find its parts."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from zsq.quant.modules import QUANT_LAYER_TYPES, QuantAct, QuantInput
from zsq.quant.quantizer import UniformQuantizer


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def float_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """Conv2d/Linear layers (subclasses too; not yet wrapped) in module order."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and not isinstance(m, QUANT_LAYER_TYPES)]


def quant_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """Wrapped Conv/Linear layers in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QUANT_LAYER_TYPES)]


def act_quantizers(model: nn.Module) -> List[Tuple[str, UniformQuantizer]]:
    """Every activation quantizer (input, residual and after-activation), each listed once."""
    seen, out = set(), []
    for name, m in model.named_modules():
        q = None
        if isinstance(m, QUANT_LAYER_TYPES + (QuantInput,)):
            q, qname = m.input_quant, name + ".input_quant"
        elif isinstance(m, QuantAct):
            q, qname = m.quant, name + ".quant"
        if q is not None and id(q) not in seen:
            seen.add(id(q))
            out.append((qname, q))
    return out


def example_input_for(model: nn.Module, batch: int = 2) -> Optional[torch.Tensor]:
    meta = getattr(model, "zsq_meta", None)
    if meta is None:
        return None
    dev = next(model.parameters()).device
    gen = torch.Generator(device=dev).manual_seed(0)  # a shape probe: its values never reach a result
    return torch.randn(batch, *meta.input_size, device=dev, generator=gen)
