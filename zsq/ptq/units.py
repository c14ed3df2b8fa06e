"""Reconstruction units: which parts of a model are optimised together (official Genie code: reconstruct.py `reconstruct`).

Residual blocks are reconstructed as a whole (their output error is what the next block sees, and the
residual add lets the convs compensate each other); every Conv/Linear outside a block is its own
unit. Blocks come from the captured graph (``zsq.quant.graph``): a module whose own forward merges two
paths from its input (an add/cat after an identity or projection shortcut) is a block, and so is every
module of the same class (a stride-2 block of that type without its skip). A registry of class names
(torchvision, pytorchcv, timm and zsq's own blocks; ``register_block_type`` adds more) is applied
first, as an override, and covers modules fx cannot trace.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional

import torch.nn as nn

from zsq.errors import ZsqError
from zsq.quant import graph as G
from zsq.quant.modules import QUANT_LAYER_TYPES, float_type_name
from zsq.registry import Registry

# class name -> where it comes from (documentation only)
BLOCK_TYPES: Registry[str] = Registry("block type")
for _name, _source in {
    "BasicBlock": "torchvision/timm ResNet, zsq CIFAR ResNet",
    "Bottleneck": "torchvision/timm ResNet",
    "InvertedResidual": "torchvision MobileNetV2/V3, timm EfficientNet",
    "DepthwiseSeparableConv": "timm EfficientNet first stage",
    "MBConvBlock": "zsq EfficientNet-Lite",
    "ResUnit": "pytorchcv ResNet (CIFAR and ImageNet)",
    "ResBottleneckBlock": "RegNet (BRECQ/Genie model files)",
    "DwsConvBlock": "pytorchcv MobileNet",
    "ConvBlock": "pytorchcv conv-bn-act (stems); target is its activated output",
}.items():
    BLOCK_TYPES.register(_name, _source)

GRANULARITIES = ("block", "layer")


def register_block_type(class_name: str, source: str = "user") -> None:
    """Treat modules whose class is named ``class_name`` as one reconstruction unit."""
    BLOCK_TYPES.register(class_name, source)


def block_types() -> Dict[str, str]:
    return BLOCK_TYPES.items()


@dataclass
class Unit:
    """One reconstruction unit: a module name in the (quantized) model and the layers it holds."""

    name: str
    kind: str  # "block" or "layer"
    type_name: str
    layers: List[str] = field(default_factory=list)

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "type": self.type_name, "layers": list(self.layers)}


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def graph_block_types(qmodel: nn.Module) -> Dict[str, str]:
    """Class names of the modules the captured graph shows to be residual blocks."""
    return {type(qmodel.get_submodule(n)).__name__: "found in the graph (residual merge)"
            for n in G.residual_blocks(qmodel)}


def find_units(qmodel: nn.Module, granularity: str = "block",
               extra_block_types: Optional[Iterable[str]] = None, use_graph: bool = True) -> List[Unit]:
    """Units of a quantized model in module (= network) order.

    granularity "block": registered blocks and blocks found in the graph, then single layers for what
    no block covers (Genie, BRECQ, QDrop); "layer": every Conv/Linear alone (AdaRound).
    """
    if granularity not in GRANULARITIES:
        raise ZsqError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    names = set(BLOCK_TYPES) | set(extra_block_types or ())
    if granularity == "block" and use_graph:
        names |= set(graph_block_types(qmodel))
    modules = list(qmodel.named_modules())
    layer_names = [n for n, m in modules if isinstance(m, QUANT_LAYER_TYPES)]
    if not layer_names:
        raise ZsqError("the model has no quantized Conv/Linear layer to reconstruct (run quantize_model first)")
    units: List[Unit] = []
    covered: List[str] = []
    for name, mod in modules:
        if not name or any(_under(name, c) for c in covered):
            continue
        if granularity == "block" and type(mod).__name__ in names:
            inner = [ln for ln in layer_names if _under(ln, name)]
            if inner:
                units.append(Unit(name, "block", type(mod).__name__, inner))
                covered.append(name)
                continue
        if isinstance(mod, QUANT_LAYER_TYPES):
            units.append(Unit(name, "layer", float_type_name(mod), [name]))
            covered.append(name)
    return units


def summarize_units(units: List[Unit]) -> str:
    """'11 units: 9 block (BasicBlock), 2 layer (Conv2d, Linear)'."""
    parts = []
    for kind in ("block", "layer"):
        sel = [u for u in units if u.kind == kind]
        if sel:
            types = sorted({u.type_name for u in sel})
            parts.append(f"{len(sel)} {kind} ({', '.join(types)})")
    return f"{len(units)} units: " + ", ".join(parts)
