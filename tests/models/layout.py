"""Shared layout checks: zsq's own models must expose every activation and residual as modules."""
import operator

import torch
import torch.fx as fx
import torch.nn as nn

from zsq.models.cifar_resnet import ShortcutA
from zsq.models.efficientnet_lite import SamePad2d


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, (ShortcutA, SamePad2d)) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.Graph:
    return _Tracer().trace(model)


def assert_layout(model: nn.Module, act_type):
    # Every activation module instance appears at exactly one position in the module tree.
    acts = [m for _, m in model.named_modules(remove_duplicate=False) if isinstance(m, act_type)]
    assert len(acts) == len({id(m) for m in acts})
    graph = trace(model)
    mods = dict(model.named_modules())
    act_calls = []
    for node in graph.nodes:
        # No functional activations (relu, relu6/hardtanh, clamp) anywhere in the forward.
        if node.op in ("call_function", "call_method"):
            name = getattr(node.target, "__name__", str(node.target))
            assert not any(s in name for s in ("relu", "hardtanh", "clamp")), f"functional {name} in forward"
        if node.op == "call_module" and isinstance(mods[node.target], act_type):
            act_calls.append(node.target)
        # Every residual add takes one operand straight from a module named *.shortcut.
        if node.op == "call_function" and node.target in (operator.add, torch.add):
            srcs = [a.target for a in node.args if isinstance(a, fx.Node) and a.op == "call_module"]
            assert any(s.split(".")[-1] == "shortcut" for s in srcs), f"residual add without shortcut: {node}"
    # Each activation module is called exactly once.
    assert sorted(act_calls) == sorted(n for n, m in model.named_modules() if isinstance(m, act_type))
    return graph
