"""Graph capture: where a model calls what, found with torch.fx instead of from module names.

Each module that is not a layer or a torch.nn building block is traced on its own, with all of its
children kept as leaves (``call_module`` nodes). So the graphs are small, module names stay the
model's own, and a module that fx cannot trace (data-dependent control flow) costs only itself: it
is listed, and if it runs an activation, a merge or a conv/linear of its own (checked at run time)
the rewrite falls back to module rules for it and says so. From these graphs come the activation
call sites (ReLU/ReLU6/hardtanh, module or functional, one per call even when a module is reused),
the residual merges (add/cat) and which of their inputs is the skip path, and the blocks that
contain a merge (reconstruction units).
"""
from __future__ import annotations

import operator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Set, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from zsq.hooks import Hooks

ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh)  # ReLU6 is a Hardtanh
ACT_FUNCTIONS = {F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.hardtanh, F.hardtanh_}
ACT_METHODS = {"relu", "relu_"}
MERGE_FUNCTIONS = {operator.add, operator.iadd, torch.add, torch.cat, torch.concat}
MERGE_METHODS = {"add", "add_"}
LAYER_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
                   F.linear, torch.conv2d, torch.conv1d, torch.conv3d}
NON_TENSOR_METHODS = {"size", "dim", "numel", "item", "tolist", "__len__"}
# run-time names of the calls that matter inside a module that fx could not trace
_RUNTIME_KINDS = {"relu": "activation", "relu_": "activation", "relu6": "activation", "hardtanh": "activation",
                  "hardtanh_": "activation", "add": "merge", "add_": "merge", "__add__": "merge",
                  "__iadd__": "merge", "__radd__": "merge", "cat": "merge", "concat": "merge",
                  "conv1d": "layer", "conv2d": "layer", "conv3d": "layer", "conv_transpose1d": "layer",
                  "conv_transpose2d": "layer", "conv_transpose3d": "layer", "linear": "layer"}
# layers zsq has no quantized form for: kept in float and listed
UNSUPPORTED_LAYERS = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                      nn.RNNBase, nn.RNNCellBase, nn.Bilinear, nn.MultiheadAttention, nn.Embedding)
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def is_leaf(mod: nn.Module) -> bool:
    """Modules whose inside is not traced: layers (any Conv2d/Linear subclass too, whose forward is kept
    whole), torch.nn building blocks, and zsq's own quantization modules."""
    from zsq.quant.modules import QUANT_LAYER_TYPES, QuantAct, QuantInput
    from zsq.quant.quantizer import UniformQuantizer

    if isinstance(mod, (nn.Conv2d, nn.Linear, UniformQuantizer, QuantAct, QuantInput) + QUANT_LAYER_TYPES
                  + UNSUPPORTED_LAYERS):
        return True
    if isinstance(mod, fx.GraphModule) or isinstance(mod, _CONTAINERS):
        return False
    return type(mod).__module__.startswith("torch.nn.modules")


class _ChildrenAsLeaves(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


def trace(mod: nn.Module) -> fx.Graph:
    """The graph of ``mod.forward`` with every submodule call as one node (raises if fx cannot trace)."""
    return _ChildrenAsLeaves().trace(mod)


@dataclass
class Capture:
    """The traced graphs of a model: ``graphs[name]`` for each traced module, ``untraced[name]`` the
    reason fx gave for each module it could not trace."""

    graphs: Dict[str, fx.Graph] = field(default_factory=dict)
    untraced: Dict[str, str] = field(default_factory=dict)


def capture(model: nn.Module) -> Capture:
    """Trace every non-leaf module of ``model`` (the model itself included)."""
    cap = Capture()
    for name, mod in model.named_modules():
        if is_leaf(mod) or isinstance(mod, (nn.ModuleList, nn.ModuleDict)):
            continue
        try:
            cap.graphs[name] = trace(mod)
        except Exception as e:  # fx raises many types; the module is listed, never silently skipped
            first = (str(e).strip().splitlines() or [""])[0][:160]
            cap.untraced[name] = f"{type(e).__name__}: {first}"
    return cap


def join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


# ---- node classification -------------------------------------------------------------------------
def module_of(root: nn.Module, node: fx.Node) -> Optional[nn.Module]:
    if node.op != "call_module":
        return None
    try:
        return root.get_submodule(node.target)
    except AttributeError:
        return None


def is_activation(owner: nn.Module, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(module_of(owner, node), ACT_MODULES)
    if node.op == "call_function":
        return node.target in ACT_FUNCTIONS
    return node.op == "call_method" and node.target in ACT_METHODS


def is_merge(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in MERGE_FUNCTIONS
    return node.op == "call_method" and node.target in MERGE_METHODS


def is_functional_layer(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in LAYER_FUNCTIONS


def _tensorish(node) -> bool:
    """Whether a node (probably) holds a tensor, not a size or a number."""
    if not isinstance(node, fx.Node):
        return False
    if node.op in ("placeholder", "call_module"):
        return True
    if node.op == "get_attr":
        return False
    if node.op == "call_method" and node.target in NON_TENSOR_METHODS:
        return False
    if node.op == "call_function" and node.target is getattr:
        return False
    first = next((a for a in node.args if isinstance(a, fx.Node)), None)
    return first is not None and _tensorish(first)


def merge_inputs(node: fx.Node) -> List[fx.Node]:
    """The tensor inputs of an add/cat node (cat's come as a list)."""
    if node.target in (torch.cat, torch.concat):
        seq = node.args[0] if node.args else node.kwargs.get("tensors", ())
        return [a for a in seq if _tensorish(a)]
    return [a for a in list(node.args[:2]) + [node.kwargs.get("other")] if _tensorish(a)]


def _has_own_weights(mod: nn.Module) -> bool:
    """A module that computes with weights of its own (quantizers' steps do not count)."""
    from zsq.quant.modules import QuantAct, QuantInput
    from zsq.quant.quantizer import UniformQuantizer

    if isinstance(mod, (UniformQuantizer,)):
        return False
    if isinstance(mod, QuantInput):
        return _has_own_weights(mod.module)
    if isinstance(mod, QuantAct):
        return _has_own_weights(mod.act)
    return any(True for _ in mod.parameters())


@dataclass
class SkipInput:
    """One skip-path input of a residual merge: ``fork`` is the tensor the skip branches off,
    ``consumer`` the first node on the skip path that reads it (the merge itself when the skip is
    the bare tensor), ``chain`` the parameter-free nodes between them (nearest the merge first)."""

    merge: fx.Node
    index: int
    fork: fx.Node
    consumer: fx.Node
    chain: List[fx.Node]


def skip_input(owner: nn.Module, merge: fx.Node, index: int, inp: fx.Node) -> Optional[SkipInput]:
    """Walk back from a merge input through parameter-free one-input ops; it is a skip path if it
    reaches a tensor that is also read elsewhere (a fork) or the module's input, not a layer."""
    chain: List[fx.Node] = []
    consumer, cur = merge, inp
    while True:
        if cur.op == "placeholder" or len(cur.users) >= 2:
            return SkipInput(merge, index, cur, consumer, chain)
        if cur.op == "call_module":
            mod = module_of(owner, cur)
            if mod is None or _has_own_weights(mod):
                return None
        elif cur.op not in ("call_function", "call_method") or is_functional_layer(cur) or is_merge(cur):
            return None
        tensor_args = [a for a in cur.args if _tensorish(a)]
        if len(tensor_args) != 1:
            return None
        chain.append(cur)
        consumer, cur = cur, tensor_args[0]


def residual_skips(owner: nn.Module, graph: fx.Graph) -> List[SkipInput]:
    """The skip inputs of every add/cat in one module's graph."""
    out = []
    for node in graph.nodes:
        if not is_merge(node):
            continue
        ins = merge_inputs(node)
        if len(ins) < 2:
            continue
        for i, inp in enumerate(ins):
            s = skip_input(owner, node, i, inp)
            if s is not None:
                out.append(s)
    return out


def _inputs_reached(graph: fx.Graph) -> Dict[fx.Node, Set[str]]:
    """For each node, the module inputs (placeholders) it depends on."""
    reach: Dict[fx.Node, Set[str]] = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            reach[node] = {node.name}
        else:
            reach[node] = set().union(*[reach.get(a, set()) for a in node.all_input_nodes])
    return reach


def is_block_graph(graph: fx.Graph) -> bool:
    """A residual block: some add/cat merges two or more paths that start from the same module input
    (an identity or a projection shortcut next to the computed path)."""
    reach = _inputs_reached(graph)
    for node in graph.nodes:
        if is_merge(node):
            ins = merge_inputs(node)
            if len(ins) >= 2 and set.intersection(*[reach[i] for i in ins]):
                return True
    return False


def residual_blocks(model: nn.Module, cap: Optional[Capture] = None) -> List[str]:
    """Modules whose own forward merges two paths from its input (a residual block)."""
    cap = cap or capture(model)
    return [name for name, graph in cap.graphs.items() if name and is_block_graph(graph)]


# ---- run-time look inside modules fx could not trace -----------------------------------------------
class _CallRecorder(TorchFunctionMode):
    def __init__(self, stack: List[str], seen: Dict[str, Set[str]]):
        super().__init__()
        self.stack, self.seen = stack, seen

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kind = _RUNTIME_KINDS.get(getattr(func, "__name__", ""))
        if kind is not None and self.stack and self.stack[-1] is not None:
            self.seen.setdefault(self.stack[-1], set()).add(kind)
        return func(*args, **(kwargs or {}))


@contextmanager
def _module_stack(model: nn.Module, names: List[str]) -> Iterator[List[Optional[str]]]:
    """Keeps the name of the innermost running module among ``names`` (others push None; the model
    itself is named "")."""
    stack: List[Optional[str]] = []
    wanted = set(names)

    def pre(name):
        def h(_m, _a):
            stack.append(name if name in wanted else None)
        return h

    def post(_m, _a, _o):
        stack.pop()

    with Hooks() as hooks:
        for name, mod in model.named_modules():
            hooks.pre(mod, pre(name)).post(mod, post)
        yield stack


def calls_inside(model: nn.Module, names: List[str], example: torch.Tensor) -> Dict[str, Set[str]]:
    """Which kinds of call (activation, merge, layer) each named module makes itself, not through a
    child, on ``example``."""
    seen: Dict[str, Set[str]] = {}
    if not names:
        return seen
    with _module_stack(model, names) as stack, torch.no_grad(), _CallRecorder(stack, seen):
        model(example)
    return seen


def unsupported_layers(model: nn.Module) -> List[Tuple[str, str]]:
    """(name, type) of layers zsq has no quantized form for."""
    return [(n, type(m).__name__) for n, m in model.named_modules() if isinstance(m, UNSUPPORTED_LAYERS)]


# ---- the whole model as one data-flow graph ---------------------------------------------------------
@dataclass
class FlowNode:
    """One call in the model's flattened graph: ``kind`` is "input", "module" (a leaf, or a module kept
    whole), "call_function", "call_method", "get_attr", "output" or "opaque" (a tuple or a call whose
    arguments could not be followed); ``target`` the module name, function or method name; ``inputs``
    and ``users`` indices into the node list (a value read twice by one node is listed twice)."""

    kind: str
    target: object
    inputs: List[int]
    users: List[int] = field(default_factory=list)


def _node_args(args) -> List[fx.Node]:
    out: List[fx.Node] = []
    for a in args:
        if isinstance(a, fx.Node):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(_node_args(a))
        elif isinstance(a, dict):
            out.extend(_node_args(list(a.values())))
    return out


def flow_graph(model: nn.Module, cap: Optional[Capture] = None, keep: Tuple[type, ...] = ()) -> List[FlowNode]:
    """The model's calls as one graph: every traced module's graph inlined into its caller, so a chain
    conv -> BN -> activation -> conv is found across Sequential / block boundaries (torchvision's
    Conv2dNormActivation, timm's blocks) and each tensor's readers are all known. Modules of a type in
    ``keep``, modules fx could not trace and calls whose arguments cannot be mapped to the child's inputs
    stay single nodes. The model's output is an "output" node, so it counts as a reader."""
    cap = cap or capture(model)
    nodes: List[FlowNode] = []

    def new(kind, target, inputs: List[Optional[int]]) -> int:
        ins = [i for i in inputs if i is not None]
        nodes.append(FlowNode(kind, target, ins))
        for i in ins:
            nodes[i].users.append(len(nodes) - 1)
        return len(nodes) - 1

    def run(prefix: str, args: List[Optional[int]]) -> Optional[int]:
        env: Dict[fx.Node, Optional[int]] = {}
        pos = 0
        for node in cap.graphs[prefix].nodes:
            ins = [env.get(a) for a in _node_args(node.args) + _node_args(node.kwargs)]
            if node.op == "placeholder":
                env[node] = args[pos] if pos < len(args) else None
                pos += 1
            elif node.op == "call_module":
                name = join(prefix, str(node.target))
                mod = model.get_submodule(name)
                simple = not node.kwargs and all(isinstance(a, fx.Node) for a in node.args)
                if name in cap.graphs and not isinstance(mod, keep) and simple:
                    env[node] = run(name, [env.get(a) for a in node.args])
                else:
                    env[node] = new("module", name, ins)
            elif node.op == "output":
                out = node.args[0]
                return env.get(out) if isinstance(out, fx.Node) else new("opaque", "output", ins)
            else:
                env[node] = new(node.op, node.target, ins)
        return None

    if "" not in cap.graphs:
        raise ValueError(f"fx could not trace the model itself ({cap.untraced.get('', '?')})")
    root = run("", [new("input", "input", [])])
    new("output", "output", [root])
    return nodes
