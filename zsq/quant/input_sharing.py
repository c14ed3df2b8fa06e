"""Genie's input sharing: the wrapped modules that read one tensor use one input quantizer, so a residual
carries the same quantized values as the main path (a step of ``quantize_model`` and of the deploy placement)."""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.nn as nn

from zsq.hooks import Hooks
from zsq.quant.modules import QUANT_LAYER_TYPES, QuantInput
from zsq.quant.state import quantizers_disabled


def share_input_quantizers(model: nn.Module, example: torch.Tensor) -> List[Tuple[str, str]]:
    """Where several wrapped modules read the same tensor (a block's conv1, its shortcut and its
    downsample conv), all use the quantizer of the first one that runs (Genie's rule), so the
    residual carries the same quantized values as the main path. Returns (sharer, owner) pairs."""
    first_reader: Dict[int, Tuple[str, nn.Module]] = {}
    shares: List[Tuple[str, str]] = []
    keep_alive = []
    owners = [(n, m) for n, m in model.named_modules()
              if isinstance(m, QUANT_LAYER_TYPES + (QuantInput,)) and m.input_quant is not None]

    def pre(name, mod):
        def h(_m, inp):
            x = inp[0]
            keep_alive.append(x)
            prev = first_reader.get(id(x))
            if prev is None:
                first_reader[id(x)] = (name, mod)
            elif prev[1] is not mod:
                shares.append((name, prev[0]))
        return h

    with Hooks() as hooks:
        for name, mod in owners:
            hooks.pre(mod, pre(name, mod))
        with torch.no_grad(), quantizers_disabled(model, weights=False):
            model(example)
    for sharer, owner in shares:
        s_mod, o_mod = model.get_submodule(sharer), model.get_submodule(owner)
        s_mod.input_quant = o_mod.input_quant
    return shares
