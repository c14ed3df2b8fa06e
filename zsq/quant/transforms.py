"""Rewrites that turn a float model into a fake-quantized one, placed from a captured graph.

``zsq.quant.graph`` traces each module with torch.fx (children as leaves), so quantizers go where the
preset says by what the model *calls*, not by module names: every Conv2d/Linear (a subclass with its
own forward keeps it), after every ReLU/ReLU6/hardtanh call (module or functional; one quantizer per
call site even when a module is reused), and on the skip input of every residual add/cat. Where a
parameter-free module sits on the spot (a ``shortcut``, a ReLU used once) it is wrapped in place;
elsewhere a quantizer module is inserted into that one module's graph (it becomes an fx.GraphModule
of the same class name), so every module keeps its name. A module fx cannot trace keeps module rules
(today's eager rewrite) and is named in the plan and on stderr. Every rewrite is checked: with all
quantizers off the model must reproduce the float output bit for bit, else ZsqError names the first
module that differs.
"""
from __future__ import annotations

import copy
import logging
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import torch.fx as fx

from zsq.errors import ZsqError
from zsq.hooks import Hooks
from zsq.quant import graph as G
from zsq.quant.qconfig import QuantConfig
from zsq.quant.modules import (QUANT_LAYER_TYPES, QuantAct, QuantConv2d, QuantInput, QuantLinear, folded_stand_in,
                               is_bn_act, is_plain, keep_forward_quant)
from zsq.quant.calibration import pin_image_input_ranges
from zsq.quant.deploy import place_deploy_quantizers
from zsq.quant.input_sharing import share_input_quantizers
from zsq.quant.inventory import act_quantizers, example_input_for, float_layers, quant_layers, set_submodule
from zsq.quant.quantizer import UniformQuantizer
from zsq.quant.state import quantizers_disabled

logger = logging.getLogger(__name__)

ACTIVATIONS = G.ACT_MODULES


# ---- 1. BN folding -----------------------------------------------------------------------------
def _watch_bn_act(hooks: Hooks, name: str, m: nn.Module, bad: set) -> None:
    """Check on each call that a BN-with-activation (``is_bn_act``) computes act(drop(batch_norm(x)))
    with its running statistics: its ``drop`` reads exactly the eval batch norm of the module input,
    its ``act`` reads what ``drop`` returned, and the module returns what ``act`` returned. A module
    whose forward differs (another timm version, a subclass) lands in ``bad`` and is left unfolded."""
    seen: dict = {}

    def enter(_m, inp):
        seen.clear()
        seen["x"] = inp[0]

    def drop_in(_m, inp):
        x = seen.get("x")
        ok = x is not None and m.running_mean is not None and torch.equal(inp[0], F.batch_norm(
            x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps))
        seen["bn"] = ok

    def drop_out(_m, _inp, out):
        seen["drop"] = id(out)

    def act_in(_m, inp):
        seen["chain"] = seen.get("bn", False) and seen.get("drop") == id(inp[0])

    def act_out(_m, _inp, out):
        seen["act"] = id(out) if seen.get("chain") else None

    def leave(_m, _inp, out):
        if seen.get("act") is None or seen.get("act") != id(out):
            bad.add(name)

    hooks.pre(m, enter).pre(m.drop, drop_in).post(m.drop, drop_out).pre(m.act, act_in).post(m.act, act_out)
    hooks.post(m, leave)


def _conv_bn_pairs(model: nn.Module, example: torch.Tensor) -> List[Tuple[str, str]]:
    """(conv, bn) name pairs where the BN reads exactly the conv's output tensor: a plain BatchNorm2d,
    or a BN-with-activation (timm's BatchNormAct2d) seen to compute act(drop(bn(x)))."""
    produced: Dict[int, str] = {}
    pairs: List[Tuple[str, str]] = []
    bad: set = set()

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

    with Hooks() as hooks:
        for name, m in model.named_modules():
            if isinstance(m, nn.Conv2d):
                hooks.post(m, conv_hook(name))
            elif isinstance(m, nn.BatchNorm2d) and type(m).forward is nn.BatchNorm2d.forward:
                hooks.pre(m, bn_hook(name))
            elif is_bn_act(m):
                hooks.pre(m, bn_hook(name))
                _watch_bn_act(hooks, name, m, bad)
        with torch.no_grad():
            model(example)
    return [p for p in pairs if p[1] not in bad]


def fold_batchnorm(model: nn.Module, example: torch.Tensor) -> List[Tuple[str, str]]:
    """Fold each BatchNorm2d into the conv that feeds it (in place); returns the folded pairs. A
    BN-with-activation (timm's BatchNormAct2d) keeps its ``drop`` and ``act`` (``FoldedBatchNormAct``)."""
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
        set_submodule(model, bn_name, folded_stand_in(bn))
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
        if is_plain(mod):
            cls = QuantConv2d if isinstance(mod, nn.Conv2d) else QuantLinear
            set_submodule(model, name, cls.from_float(mod, w_spec, a_spec))
        else:  # a subclass: its forward (padding, ...) is kept, it reads the quantized weight
            keep_forward_quant(mod, w_spec, a_spec)
        plan.append({"layer": name, "type": type(mod).__name__ if is_plain(mod) else mod.float_type.__name__,
                     "w_bits": w_bits, "a_bits": a_bits if q_in else None})
    return plan


# ---- 3./4. activation and residual quantizers, placed from the captured graph --------------------
def _act_bits(config: QuantConfig, name: str, count: int) -> int:
    """Activation bits of an after-activation quantizer: fnmatch overrides on its name apply."""
    a_bits = config.a_bits
    for o in config.overrides:
        if not o.pattern.startswith("@") and o.matches(name, -1, count) and o.a_bits is not None:
            a_bits = o.a_bits
    return a_bits


class _Placer:
    """Collects the quantizers a preset asks for and puts them in: wrapping a module in place where one
    sits on the spot, else inserting a quantizer module into its owner's graph."""

    def __init__(self, model: nn.Module, cap: G.Capture):
        self.model, self.cap = model, cap
        self.changed: Dict[str, fx.Graph] = {}
        self.calls: Dict[str, List[Tuple[str, fx.Node]]] = {}  # module name -> its call sites
        for owner, graph in cap.graphs.items():
            for node in graph.nodes:
                if node.op == "call_module":
                    self.calls.setdefault(G.join(owner, node.target), []).append((owner, node))

    def owner(self, name: str) -> nn.Module:
        return self.model.get_submodule(name) if name else self.model

    def wrap(self, name: str, make) -> None:
        set_submodule(self.model, name, make(self.model.get_submodule(name)))

    def _attr(self, owner: str, base: str) -> str:
        mod, attr, i = self.owner(owner), base, 1
        while hasattr(mod, attr):
            i += 1
            attr = f"{base}{i}"
        return attr

    def insert_after(self, owner: str, node: fx.Node, module: nn.Module) -> str:
        """A quantizer module reading ``node``'s output; all later users read the quantizer instead."""
        graph = self.cap.graphs[owner]
        attr = self._attr(owner, f"{node.name}_quant")
        self.owner(owner).add_module(attr, module)
        with graph.inserting_after(node):
            new = graph.call_module(attr, (node,))
        node.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
        self.changed[owner] = graph
        return G.join(owner, attr)

    def insert_before(self, owner: str, consumer: fx.Node, value: fx.Node, base: str, module: nn.Module) -> str:
        """A quantizer module between ``value`` and one consumer of it."""
        graph = self.cap.graphs[owner]
        attr = self._attr(owner, base)
        self.owner(owner).add_module(attr, module)
        with graph.inserting_before(consumer):
            new = graph.call_module(attr, (value,))
        consumer.replace_input_with(value, new)
        self.changed[owner] = graph
        return G.join(owner, attr)

    def apply(self) -> List[str]:
        """Give each changed module the forward of its edited graph (class name and attributes kept)."""
        for owner, graph in self.changed.items():
            graph.lint()
            set_forward_from_graph(self.owner(owner), graph)
        return sorted(self.changed)


def set_forward_from_graph(mod: nn.Module, graph: fx.Graph) -> None:
    """Swap ``mod``'s class for a subclass of the same name whose forward is ``graph``'s code, so the
    module keeps its name, children, attributes and isinstance, and fx traces the new forward."""
    code = graph.python_code(root_module="self")
    ns = dict(code.globals)
    exec(compile(code.src, f"<zsq-rewritten {type(mod).__name__}>", "exec"), ns)
    base = getattr(type(mod), "zsq_float_class", type(mod))
    cls = type(base.__name__, (base,), {"forward": ns["forward"], "zsq_float_class": base,
                                        "__module__": base.__module__, "__qualname__": base.__qualname__})
    mod.__class__ = cls


def quantize_after_activations(model: nn.Module, config: QuantConfig, placer: _Placer,
                               untraced: List[str]) -> List[dict]:
    """GDFQ's placement: a quantizer after every ReLU/ReLU6/hardtanh call site. A module called once
    is wrapped (QuantAct, its name kept); a reused module or a functional call gets one inserted
    quantizer per call. Modules fx could not trace: their activation children are wrapped (eager)."""
    count = len(quant_layers(model))
    sites, done = [], set()
    for owner, graph in placer.cap.graphs.items():
        omod = placer.owner(owner)
        for node in list(graph.nodes):
            if not G.is_activation(omod, node):
                continue
            if node.op == "call_module":
                name = G.join(owner, node.target)
                if len(placer.calls[name]) == 1:
                    if name not in done:
                        q = UniformQuantizer(config.act.with_bits(_act_bits(config, name, count)))
                        placer.wrap(name, lambda act: QuantAct(act, q))
                        done.add(name)
                        sites.append({"quantizer": name + ".quant", "reads": name, "how": "wrapped"})
                    continue
                reads = f"{name} (call {placer.calls[name].index((owner, node)) + 1} of {len(placer.calls[name])})"
            else:
                reads = f"{G.join(owner, node.name)} ({getattr(node.target, '__name__', node.target)})"
            q = UniformQuantizer(config.act.with_bits(_act_bits(config, G.join(owner, node.name), count)))
            qname = placer.insert_after(owner, node, QuantAct(nn.Identity(), q))
            sites.append({"quantizer": qname + ".quant", "reads": reads, "how": "inserted"})
    for owner in untraced:  # eager rules for what fx could not see
        for attr, child in placer.owner(owner).named_children():
            name = G.join(owner, attr)
            if isinstance(child, ACTIVATIONS) and name not in placer.calls:
                q = UniformQuantizer(config.act.with_bits(_act_bits(config, name, count)))
                set_submodule(model, name, QuantAct(child, q))
                sites.append({"quantizer": name + ".quant", "reads": name, "how": "eager (owner not traced)"})
    return sites


def quantize_residuals(model: nn.Module, config: QuantConfig, placer: _Placer, untraced: List[str]) -> List[dict]:
    """The skip input of every residual add/cat gets the block input quantized (Genie's Identity
    wrappers): a parameter-free module at the start of the skip path (a ``shortcut``) is wrapped in
    QuantInput, else a QuantInput(Identity) is inserted where the skip path leaves the fork.
    Modules fx could not trace: children named in ``config.residual_module_names`` (eager rule)."""
    sites, seen = [], set()
    for owner, graph in placer.cap.graphs.items():
        omod = placer.owner(owner)
        for s in G.residual_skips(omod, graph):
            first = s.chain[-1] if s.chain else None
            key = (owner, s.consumer, s.fork)
            if key in seen:
                continue
            seen.add(key)
            merge = f"{G.join(owner, s.merge.name)} input {s.index}"
            if first is not None and first.op == "call_module" and len(placer.calls[G.join(owner, first.target)]) == 1:
                name = G.join(owner, first.target)
                if not isinstance(model.get_submodule(name), QuantInput):
                    placer.wrap(name, lambda m: QuantInput(m, UniformQuantizer(config.act)))
                sites.append({"quantizer": name + ".input_quant", "reads": G.join(owner, s.fork.name),
                              "merge": merge, "how": "wrapped"})
                continue
            qname = placer.insert_before(owner, s.consumer, s.fork, f"{s.merge.name}_skip_quant",
                                         QuantInput(nn.Identity(), UniformQuantizer(config.act)))
            sites.append({"quantizer": qname + ".input_quant", "reads": G.join(owner, s.fork.name),
                          "merge": merge, "how": "inserted"})
    for owner in untraced:
        for attr, m in list(placer.owner(owner).named_children()):
            name = G.join(owner, attr)
            if attr in config.residual_module_names and not isinstance(m, QuantInput) \
                    and not any(True for _ in m.parameters()):
                set_submodule(model, name, QuantInput(m, UniformQuantizer(config.act)))
                sites.append({"quantizer": name + ".input_quant", "reads": name, "merge": "?",
                              "how": "eager (owner not traced)"})
    return sites


# ---- 6. the check: quantizers off => the float model, bit for bit ---------------------------------
def _outputs_by_module(model: nn.Module, example: torch.Tensor) -> List[Tuple[str, torch.Tensor]]:
    """(name, output) of every module that returns a tensor, in the order they finish."""
    got: List[Tuple[str, torch.Tensor]] = []

    def hook(name):
        def h(_m, _i, out):
            if isinstance(out, torch.Tensor):
                got.append((name, out.detach().clone()))
        return h

    with Hooks() as hooks, torch.no_grad():
        for name, mod in model.named_modules():
            if name:
                hooks.post(mod, hook(name))
        model(example)
    return got


def first_difference(reference: nn.Module, qmodel: nn.Module, example: torch.Tensor) -> Optional[str]:
    """The first module (in the reference's execution order) whose output the rewrite changed."""
    with quantizers_disabled(qmodel):
        mine = {}
        for name, out in _outputs_by_module(qmodel, example):
            mine.setdefault(name, out)
    for name, out in _outputs_by_module(reference, example):
        other = mine.get(name)
        if other is not None and (other.shape != out.shape or not torch.equal(other, out)):
            return f"{name} ({type(reference.get_submodule(name)).__name__})"
    return None


def check_rewrite(model: nn.Module, qmodel: nn.Module, expected: torch.Tensor, example: torch.Tensor,
                  fold: bool) -> None:
    """Raise ZsqError unless ``qmodel`` with every quantizer off reproduces ``expected`` exactly."""
    with quantizers_disabled(qmodel), torch.no_grad():
        got = qmodel(example)
    if isinstance(got, torch.Tensor) and got.shape == expected.shape and torch.equal(got, expected):
        return
    reference = copy.deepcopy(model).eval()
    if fold:
        fold_batchnorm(reference, example)
    where = first_difference(reference, qmodel, example) or "the model output"
    raise ZsqError(f"the quantized rewrite does not reproduce the float model with quantizers off: first "
                   f"difference at {where}; refusing (please report this model)")


# ---- the whole pipeline -------------------------------------------------------------------------
def _pin_image_inputs(qmodel: nn.Module, example: torch.Tensor) -> List[str]:
    return pin_image_input_ranges(qmodel, example)


def _prepare(model: nn.Module, config: QuantConfig, example_input: Optional[torch.Tensor]):
    """(the copy to rewrite, its example input), once the inputs are checked."""
    if not isinstance(config, QuantConfig):
        raise ZsqError(f"config must be a QuantConfig (e.g. zsq.get_preset('genie', 'w4a4')), got {type(config).__name__}")
    qmodel = copy.deepcopy(model).eval()
    if not float_layers(qmodel):
        raise ZsqError("the model has no Conv2d or Linear layer to quantize")
    if example_input is None:
        example_input = example_input_for(qmodel)
    if example_input is None:
        raise ZsqError("quantize_model needs an example input to check the rewrite: pass example_input= or "
                       "attach metadata with zsq.models.set_meta(model, ModelMeta(...))")
    return qmodel, example_input


def quantize_model(model: nn.Module, config: QuantConfig, example_input: Optional[torch.Tensor] = None,
                   strict: bool = False) -> nn.Module:
    """A new fake-quantized model (the float model is never mutated).

    Needs an example input (``example_input`` or the model's zsq metadata): it checks the rewrite
    (quantizers off => the float output, bit for bit) and finds which quantizers read one tensor.
    Weight quantizers are initialised from the weights at once; activation quantizers are not:
    calibrate them (``zsq.quant.calibrate``), set their ranges, or let them initialise lazily on
    the first forward. ``model.zsq_quant_plan`` records what was placed where and what stayed float.
    ``strict`` turns what would stay float (Conv3d, ConvTranspose2d, LSTM, functional F.conv2d/F.linear
    calls) into an error; without it each such layer is listed in the plan and logged as a warning.
    """
    qmodel, example_input = _prepare(model, config, example_input)
    folded = fold_batchnorm(qmodel, example_input) if config.fold_bn else []
    with torch.no_grad():
        expected = qmodel(example_input)
    cap = G.capture(qmodel)
    untraced, untraced_layers = _untraced_that_matter(qmodel, cap, example_input)
    for name, why in untraced.items():
        logger.warning(f"eager fallback for {name or 'the model'} ({type(qmodel.get_submodule(name)).__name__}): "
                       f"fx could not trace it ({why}); module rules apply inside it")
    kept_float = _kept_float(qmodel, cap, untraced_layers)
    if strict:
        refuse_float_layers(kept_float)
    for k in kept_float:
        logger.warning(f"kept in float: {k['layer']} ({k['type']}): {k['why']}")
    plan = wrap_layers(qmodel, config)
    placer = _Placer(qmodel, cap)
    after_act, residual, shared = [], [], []
    deploy = None
    if config.act_placement in ("after_relu", "deploy"):
        after_act = quantize_after_activations(qmodel, config, placer, list(untraced))
    if config.act_placement != "after_relu" and config.quantize_residual:
        residual = quantize_residuals(qmodel, config, placer, list(untraced))
    rewritten = placer.apply()
    order = {name: i for i, (name, _) in enumerate(qmodel.named_modules())}
    for sites in (after_act, residual):  # module order, as the plan listed them before graph capture
        sites.sort(key=lambda s: order.get(s["quantizer"].rsplit(".", 1)[0], len(order)))
    check_rewrite(model, qmodel, expected, example_input, bool(config.fold_bn))
    if config.act_placement == "deploy":
        deploy = place_deploy_quantizers(qmodel, config, plan, example_input)
        residual = [r for r in residual if r["quantizer"].rsplit(".", 1)[0] not in deploy["inputs_already_quantized"]]
        shared = deploy["shared"]
    elif config.act_placement != "after_relu":
        shared = share_input_quantizers(qmodel, example_input)
    pinned = _pin_image_inputs(qmodel, example_input)
    qmodel.zsq_quant_plan = {
        "config": config.to_dict(),
        "capture": "fx" if not untraced else "fx, eager fallback in parts",
        "layers": plan,
        "folded_bn": [list(p) for p in folded],
        "after_activation": [s["quantizer"].rsplit(".", 1)[0] for s in after_act],
        "residual": [s["quantizer"].rsplit(".", 1)[0] for s in residual],
        "activation_sites": after_act,
        "residual_sites": residual,
        "shared_input_quantizers": [list(s) for s in shared],
        "pinned_input_ranges": pinned,
        "rewritten_modules": rewritten,
        "eager_fallback": [{"module": n, "why": w} for n, w in untraced.items()],
        "kept_float": kept_float,
        "verified": "quantizers off reproduce the float output bit for bit",
    }
    if deploy is not None:
        qmodel.zsq_quant_plan.update(folded_outputs=deploy["folded_outputs"],
                                     inputs_already_quantized=deploy["inputs_already_quantized"])
    qmodel.zsq_quant_config = config
    for qname, q in act_quantizers(qmodel):  # an activation's range comes from data: only a calibration sets it
        q.lazy_init = False
        q.site_name = qname
    return qmodel


def _untraced_that_matter(model: nn.Module, cap: G.Capture,
                          example: torch.Tensor) -> Tuple[Dict[str, str], List[str]]:
    """Modules fx could not trace that themselves run an activation, add/cat or conv/linear (seen at
    run time; the rest, e.g. a padding module computing sizes in Python, change nothing here), and
    those of them that make a conv/linear call of their own (a call no module rule can quantize)."""
    if not cap.untraced:
        return {}, []
    inside = G.calls_inside(model, list(cap.untraced), example)
    matter = {n: f"{why}; it runs {', '.join(sorted(inside[n]))} itself"
              for n, why in cap.untraced.items() if inside.get(n)}
    return matter, [n for n in matter if "layer" in inside[n]]


UNSUPPORTED_WHY = "zsq has no quantized form for this layer type"
FUNCTIONAL_WHY = ("a functional call (F.conv2d / F.linear in forward), not a Conv2d/Linear module: zsq "
                  "quantizes layer modules only, so its weight and input stay float")


def _kept_float(model: nn.Module, cap: G.Capture, untraced_layers: List[str]) -> List[dict]:
    """Every conv/linear computation that stays float, and why: layer types zsq has no quantized form
    for, functional conv/linear calls, and such calls inside modules fx could not trace."""
    rows = [{"layer": n, "type": t, "why": UNSUPPORTED_WHY} for n, t in G.unsupported_layers(model)]
    rows += [{"layer": G.join(owner, node.name), "type": getattr(node.target, "__name__", str(node.target)),
              "why": FUNCTIONAL_WHY} for owner, graph in cap.graphs.items() for node in graph.nodes
             if G.is_functional_layer(node)]
    rows += [{"layer": n or "the model", "type": type(model.get_submodule(n)).__name__,
              "why": "fx could not trace this module and it makes a conv/linear call of its own "
                     "(functional); that call stays float"} for n in untraced_layers]
    return rows


def kept_float_layers(model: nn.Module, example: torch.Tensor) -> List[dict]:
    """What ``quantize_model`` would keep in float on ``model`` (rows: layer, type, why), without quantizing."""
    cap = G.capture(model)
    return _kept_float(model, cap, _untraced_that_matter(model, cap, example)[1])


def refuse_float_layers(kept: List[dict]) -> None:
    """``--strict``: ZsqError naming the first layer that would stay float."""
    if kept:
        k = kept[0]
        raise ZsqError(f"--strict: layer {k['layer']} ({k['type']}) would stay float: {k['why']} "
                       f"({len(kept)} such layer(s)); drop --strict to keep them in float")


# ---- the plan, for `zsq inspect` --------------------------------------------------------------
def _readers(qmodel: nn.Module, example: torch.Tensor) -> Dict[str, str]:
    """For each activation quantizer, the module that produced the tensor it reads (run with every
    quantizer off; the innermost producer is named)."""
    produced: Dict[int, str] = {}
    reads: Dict[str, str] = {}
    keep = []
    quant_ids = {id(q): n for n, q in act_quantizers(qmodel)}

    def out_hook(name):
        def h(_m, _i, out):
            if isinstance(out, torch.Tensor):  # the latest producer (in-place ReLU), not a container
                keep.append(out)
                if not produced.get(id(out), "").startswith(name + "."):
                    produced[id(out)] = name
        return h

    def in_hook(_m, args):
        x = args[0]
        keep.append(x)
        reads.setdefault(quant_ids[id(_m)], produced.get(id(x), "the model input"))

    with Hooks() as hooks:
        for name, mod in qmodel.named_modules():
            if id(mod) in quant_ids:
                hooks.pre(mod, in_hook)
            elif name and not isinstance(mod, (QuantAct, QuantInput)):
                hooks.post(mod, out_hook(name))
        with quantizers_disabled(qmodel), torch.no_grad():
            qmodel(example)
    return reads


def describe_plan(qmodel: nn.Module, example: Optional[torch.Tensor] = None) -> dict:
    """What a quantized model quantizes, where, and what it reads: one JSON-able dict."""
    plan = getattr(qmodel, "zsq_quant_plan", None)
    if plan is None:
        raise ZsqError("not a zsq quantized model (no zsq_quant_plan)")
    example = example if example is not None else example_input_for(qmodel, batch=1)
    reads = _readers(qmodel, example) if example is not None else {}
    owners: Dict[int, List[str]] = {}
    for name, m in qmodel.named_modules():
        q = getattr(m, "input_quant", None) if isinstance(m, QUANT_LAYER_TYPES + (QuantInput,)) else \
            getattr(m, "quant", None) if isinstance(m, QuantAct) else None
        if q is not None:
            owners.setdefault(id(q), []).append(name)
    residual = set(plan.get("residual", []))
    after = set(plan.get("after_activation", []))
    acts = []
    for qname, q in act_quantizers(qmodel):
        owner = qname.rsplit(".", 1)[0]
        role = "residual" if owner in residual else "after activation" if owner in after else "layer input"
        acts.append({"quantizer": qname, "role": role, "bits": q.bits, "reads": reads.get(qname, "?"),
                     "used_by": owners.get(id(q), [owner])})
    return {
        "preset": plan["config"]["preset"], "bits": f"w{plan['config']['w_bits']}a{plan['config']['a_bits']}",
        "capture": plan.get("capture"), "layers": plan["layers"], "activation_quantizers": acts,
        "residual_quantizers": plan.get("residual_sites", []),
        "shared": [a for a in acts if len(a["used_by"]) > 1],
        "kept_float": plan.get("kept_float", []), "eager_fallback": plan.get("eager_fallback", []),
        "rewritten_modules": plan.get("rewritten_modules", []),
    }
