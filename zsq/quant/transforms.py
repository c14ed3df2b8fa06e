"""Graph rewrites that turn a float model into a fake-quantized one, one small transform each.

All work in eager mode on module attributes (no tracing compiler needed), so any CNN built from
nn.Conv2d / nn.Linear / nn.ReLU(6) modules can be wrapped. Models whose activations are functional
(F.relu) get no "after_relu" quantizers there; models that reuse one ReLU module in several places
(torchvision's ResNet blocks) share one quantizer between those places.
"""
from __future__ import annotations

import copy
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

from zsq.errors import ZsqError
from zsq.quant.config import QuantConfig
from zsq.quant.modules import QUANT_LAYER_TYPES, QuantAct, QuantConv2d, QuantInput, QuantLinear
from zsq.quant.quantizer import UniformQuantizer

ACTIVATIONS = (nn.ReLU, nn.ReLU6)


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def float_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """Conv2d/Linear layers (not yet wrapped) in module order."""
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
    return torch.randn(batch, *meta.input_size, device=dev, generator=None)


# ---- 1. BN folding -----------------------------------------------------------------------------
def _conv_bn_pairs(model: nn.Module, example: torch.Tensor) -> List[Tuple[str, str]]:
    """(conv, bn) name pairs where the BN reads exactly the conv's output tensor."""
    produced: Dict[int, str] = {}
    pairs: List[Tuple[str, str]] = []
    hooks = []

    def conv_hook(name):
        def h(mod, inp, out):
            produced[id(out)] = name
        return h

    def bn_hook(name):
        def h(mod, inp):
            src = produced.get(id(inp[0]))
            if src is not None:
                pairs.append((src, name))
        return h

    try:
        for name, m in model.named_modules():
            if isinstance(m, nn.Conv2d):
                hooks.append(m.register_forward_hook(conv_hook(name)))
            elif isinstance(m, nn.BatchNorm2d):
                hooks.append(m.register_forward_pre_hook(bn_hook(name)))
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    return pairs


def fold_batchnorm(model: nn.Module, example: torch.Tensor) -> List[Tuple[str, str]]:
    """Fold each BatchNorm2d into the conv that feeds it (in place); returns the folded pairs."""
    model.eval()
    pairs = _conv_bn_pairs(model, example)
    for conv_name, bn_name in pairs:
        conv = model.get_submodule(conv_name)
        bn = model.get_submodule(bn_name)
        with torch.no_grad():
            std = torch.sqrt(bn.running_var + bn.eps)
            gamma = bn.weight if bn.affine else torch.ones_like(std)
            beta = bn.bias if bn.affine else torch.zeros_like(std)
            factor = gamma / std
            conv.weight.mul_(factor.reshape(-1, 1, 1, 1))
            bias = conv.bias if conv.bias is not None else torch.zeros_like(std)
            new_bias = beta + (bias - bn.running_mean) * factor
            conv.bias = nn.Parameter(new_bias)
        set_submodule(model, bn_name, nn.Identity())
    return pairs


# ---- 2. wrap Conv/Linear -----------------------------------------------------------------------
def wrap_layers(model: nn.Module, config: QuantConfig) -> List[dict]:
    """Replace every Conv2d/Linear with its quantized wrapper; returns one plan row per layer."""
    layers = float_layers(model)
    if not layers:
        raise ZsqError("the model has no Conv2d or Linear layer to quantize")
    plan = []
    for i, (name, mod) in enumerate(layers):
        w_bits, a_bits, q_in = config.layer_bits(name, i, len(layers))
        w_spec = config.weight.with_bits(w_bits)
        a_spec = config.act.with_bits(a_bits) if q_in else None
        cls = QuantConv2d if isinstance(mod, nn.Conv2d) else QuantLinear
        set_submodule(model, name, cls.from_float(mod, w_spec, a_spec))
        plan.append({"layer": name, "type": type(mod).__name__, "w_bits": w_bits,
                     "a_bits": a_bits if q_in else None})
    return plan


# ---- 3. activation quantizers after ReLU/ReLU6 --------------------------------------------------
def quantize_after_activations(model: nn.Module, config: QuantConfig) -> List[str]:
    """Replace each ReLU/ReLU6 module with QuantAct(act, quantizer) (GDFQ's placement)."""
    names = [n for n, m in model.named_modules() if isinstance(m, ACTIVATIONS)]
    layers = [n for n, _ in quant_layers(model)]
    for name in names:
        a_bits = config.a_bits
        for o in config.overrides:
            if not o.pattern.startswith("@") and o.matches(name, -1, len(layers)) and o.a_bits is not None:
                a_bits = o.a_bits
        act = model.get_submodule(name)
        set_submodule(model, name, QuantAct(act, UniformQuantizer(config.act.with_bits(a_bits))))
    return names


# ---- 4. residual inputs ------------------------------------------------------------------------
def quantize_residuals(model: nn.Module, config: QuantConfig) -> List[str]:
    """Wrap parameter-free residual modules (named in config.residual_module_names) in QuantInput."""
    done = []
    for name, m in list(model.named_modules()):
        attr = name.rpartition(".")[2]
        if attr in config.residual_module_names and not isinstance(m, QuantInput):
            if any(True for _ in m.parameters()):
                continue  # a projection shortcut: its conv is a wrapped layer already
            set_submodule(model, name, QuantInput(m, UniformQuantizer(config.act)))
            done.append(name)
    return done


# ---- 5. consumers of one tensor share one input quantizer --------------------------------------
def share_input_quantizers(model: nn.Module, example: torch.Tensor) -> List[Tuple[str, str]]:
    """Where several wrapped modules read the same tensor (a block's conv1, its shortcut and its
    downsample conv), all use the quantizer of the first one that runs (Genie's rule), so the
    residual carries the same quantized values as the main path. Returns (sharer, owner) pairs."""
    first_reader: Dict[int, Tuple[str, nn.Module]] = {}
    shares: List[Tuple[str, str]] = []
    keep_alive = []
    hooks = []
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

    was_enabled = [(q, q.enabled) for _, q in act_quantizers(model)]
    try:
        for _, q in act_quantizers(model):
            q.enabled = False
        for name, mod in owners:
            hooks.append(mod.register_forward_pre_hook(pre(name, mod)))
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
        for q, e in was_enabled:
            q.enabled = e
    for sharer, owner in shares:
        s_mod, o_mod = model.get_submodule(sharer), model.get_submodule(owner)
        s_mod.input_quant = o_mod.input_quant
    return shares


# ---- the whole pipeline -------------------------------------------------------------------------
def quantize_model(model: nn.Module, config: QuantConfig, example_input: Optional[torch.Tensor] = None
                   ) -> nn.Module:
    """A new fake-quantized model (the float model is never mutated).

    Weight quantizers are initialised from the weights at once; activation quantizers are not:
    calibrate them (``zsq.quant.calibrate``), set their ranges, or let them initialise lazily on
    the first forward. ``model.zsq_quant_plan`` records what was placed where.
    """
    if not isinstance(config, QuantConfig):
        raise ZsqError(f"config must be a QuantConfig (e.g. zsq.get_preset('genie', 'w4a4')), got {type(config).__name__}")
    qmodel = copy.deepcopy(model).eval()
    if example_input is None:
        example_input = example_input_for(qmodel)
    folded = []
    if config.fold_bn:
        if example_input is None:
            raise ZsqError("BN folding needs an example input (model has no zsq metadata)")
        folded = fold_batchnorm(qmodel, example_input)
    plan = wrap_layers(qmodel, config)
    after_act, residual, shared = [], [], []
    if config.act_placement == "after_relu":
        after_act = quantize_after_activations(qmodel, config)
    else:
        if config.quantize_residual:
            residual = quantize_residuals(qmodel, config)
        if example_input is not None:
            shared = share_input_quantizers(qmodel, example_input)
    qmodel.zsq_quant_plan = {
        "config": config.to_dict(),
        "layers": plan,
        "folded_bn": [list(p) for p in folded],
        "after_activation": after_act,
        "residual": residual,
        "shared_input_quantizers": [list(s) for s in shared],
    }
    qmodel.zsq_quant_config = config
    return qmodel


def set_quant_state(model: nn.Module, weights: bool = True, acts: bool = True) -> None:
    """Turn weight / activation fake quantization on or off (e.g. to compare with float)."""
    for _, layer in quant_layers(model):
        if layer.weight_quant is not None and hasattr(layer.weight_quant, "enabled"):
            layer.weight_quant.enabled = weights
    for _, q in act_quantizers(model):
        q.enabled = acts
