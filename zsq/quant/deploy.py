"""Activation-quantizer placement for the ``deploy`` presets: every tensor an integer kernel reads
or writes is on a grid, and no tensor is quantized twice.

A runtime runs a convolution in integers (onnxruntime's QDQ fusion -> QLinearConv, OpenVINO's
low-precision transformations) only when its input *and its output* pass through Q/DQ. The paper
presets quantize layer inputs only, so every conv output stays float and nothing fuses. Here, on a
model whose BatchNorms are folded:

1. every ReLU/ReLU6 output is quantized (so conv -> ReLU -> Q fuses; a zero point at 0 lets the
   runtime drop the ReLU);
2. a folded BN's slot (= the conv's output) is quantized when no ReLU reads it (conv -> add);
3. every Conv/Linear and residual module whose input is not already on a grid gets an input
   quantizer (the image, pooled features, a residual sum); one whose input is (directly, or through
   zero padding / slicing / flatten / dropout, which keep values on the grid) gets none;
4. readers of one tensor share its quantizer (``share_input_quantizers``);
5. with ``bias_grid`` (deploy v2), each layer's bias is rounded to the int32 grid s_in x s_w of the
   quantizer its input lies on, as the runtime's integer kernel adds it.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Set

import torch
import torch.nn as nn

from zsq.errors import ZsqError
from zsq.hooks import Hooks
from zsq.quant.qconfig import QuantConfig
from zsq.quant.modules import QUANT_LAYER_TYPES, FoldedBatchNorm, QuantAct, QuantInput
from zsq.quant.input_sharing import share_input_quantizers
from zsq.quant.inventory import act_quantizers, set_submodule
from zsq.quant.quantizer import UniformQuantizer
from zsq.quant.state import quantizer_flags

# parameter-free modules whose output values are a subset of their input's, plus 0 (always on a grid)
GRID_PRESERVING = (nn.Identity, nn.Flatten, nn.Dropout, nn.MaxPool2d, nn.ZeroPad2d)


def _preserves_grid(m: nn.Module) -> bool:
    return isinstance(m, GRID_PRESERVING) or bool(getattr(m, "zsq_grid_preserving", False))


class _Trace:
    """One forward (activation quantizers off) recording which tensors are quantizer outputs and
    which input each watched module reads. Hooks live only inside ``run``."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.on_grid: Set[int] = set()
        self.keep: list = []
        self.outputs: Dict[int, str] = {}
        self.reads: Dict[str, int] = {}
        self.source: Dict[int, nn.Module] = {}  # tensor id -> the quantizer whose grid it lies on

    def run(self, example: torch.Tensor, watch: List[str], produce: List[str]) -> "_Trace":


        def on_quant(m, _inp, out):
            self.keep.append(out)
            self.on_grid.add(id(out))
            self.source[id(out)] = m.quant

        def on_pass(_m, inp, out):
            if id(inp[0]) in self.on_grid:
                self.keep.append(out)
                self.on_grid.add(id(out))
                self.source[id(out)] = self.source[id(inp[0])]

        def on_produce(name):
            def h(_m, _inp, out):
                self.keep.append(out)
                self.outputs[id(out)] = name
            return h

        def on_read(name):
            def h(_m, inp):
                self.keep.append(inp[0])
                self.reads[name] = id(inp[0])
            return h

        with quantizer_flags([q for _, q in act_quantizers(self.model)], enabled=False), Hooks() as hooks:
            for name, m in self.model.named_modules():
                if isinstance(m, QuantAct):
                    hooks.post(m, on_quant)
                elif _preserves_grid(m):
                    hooks.post(m, on_pass)
                if name in produce:
                    hooks.post(m, on_produce(name))
                if name in watch:
                    hooks.pre(m, on_read(name))
            with torch.no_grad():
                self.model(example)
        return self


def quantize_folded_outputs(model: nn.Module, config: QuantConfig, example: torch.Tensor) -> List[str]:
    """Wrap each folded BN that no ReLU reads (a conv output going to an add or to the next block)
    in QuantAct, so the conv writes a quantized tensor."""

    folded = [n for n, m in model.named_modules() if isinstance(m, FoldedBatchNorm)]
    acts = [n for n, m in model.named_modules() if isinstance(m, QuantAct)]
    t = _Trace(model).run(example, watch=acts, produce=folded)
    read_by_act = {t.outputs[i] for i in t.reads.values() if i in t.outputs}
    done = []
    for name in folded:
        if name not in read_by_act:
            set_submodule(model, name, QuantAct(model.get_submodule(name), UniformQuantizer(config.act)))
            done.append(name)
    return done


def drop_redundant_input_quantizers(model: nn.Module, example: torch.Tensor, plan: List[dict]) -> Dict[str, nn.Module]:
    """Remove the input quantizer of every layer / residual module whose input is on a grid already.
    Returns {name: the quantizer whose grid that input lies on}."""

    readers = [n for n, m in model.named_modules()
               if isinstance(m, QUANT_LAYER_TYPES + (QuantInput,)) and m.input_quant is not None]
    t = _Trace(model).run(example, watch=readers, produce=[])
    dropped = {n: t.source[t.reads[n]] for n in readers if t.reads.get(n) in t.on_grid}
    rows = {r["layer"]: r for r in plan}
    for name in dropped:
        mod = model.get_submodule(name)
        if isinstance(mod, QuantInput):
            set_submodule(model, name, mod.module)
        else:
            mod.input_quant = None
            if name in rows:
                rows[name]["a_bits"] = None
    return dropped


def place_deploy_quantizers(model: nn.Module, config: QuantConfig, plan: List[dict],
                            example: Optional[torch.Tensor]) -> dict:
    """Steps 2-4 of the module docstring, on a model whose layers are wrapped (inputs quantized) and
    whose ReLU outputs and residual inputs already have quantizers (``quantize_model`` placed them)."""

    if example is None:
        raise ZsqError("the deploy placement needs an example input (the model has no zsq metadata)")
    outputs = quantize_folded_outputs(model, config, example)
    dropped = drop_redundant_input_quantizers(model, example, plan)
    shared = share_input_quantizers(model, example)
    if config.bias_grid:
        place_bias_grids(model, dropped)
    return {"folded_outputs": outputs, "inputs_already_quantized": list(dropped), "shared": shared}


def place_bias_grids(model: nn.Module, upstream: Dict[str, nn.Module]) -> None:
    """Step 5: every layer with a bias reads its input's grid from its own input quantizer, or from
    the upstream quantizer ``drop_redundant_input_quantizers`` found; a layer with neither (its
    input is float) keeps a float bias, as the runtime then runs it in float too."""
    for name, m in model.named_modules():
        if isinstance(m, QUANT_LAYER_TYPES) and m.bias is not None:
            m.set_bias_grid(m.input_quant if m.input_quant is not None else upstream.get(name))
