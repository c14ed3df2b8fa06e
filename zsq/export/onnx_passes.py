"""Exact rewrites of an exported ONNX graph that let runtimes fuse more of it into integer kernels.

onnxruntime fuses ``DequantizeLinear -> Conv -> QuantizeLinear`` into QLinearConv only when the
DequantizeLinear feeds the Conv directly. A model that pads explicitly (TF "SAME" padding as a
``ZeroPad2d`` before a depthwise conv, as EfficientNet-Lite's ported checkpoints do) puts a ``Pad``
in between, and that conv then runs in float. Zero padding followed by a convolution is the same
convolution with those pads, so the Pad can move into the Conv's ``pads`` attribute (which may be
asymmetric); in an integer kernel the padded positions hold the zero point, i.e. the value 0.
"""
from __future__ import annotations

from collections import defaultdict
from typing import List, Optional

import numpy as np


def _shape_only_ancestors(model, name: str) -> Optional[list]:
    """The nodes that compute tensor ``name``, in graph order, if it depends on the graph input only
    through ``Shape`` (so on the fixed input size, not on pixel values); else None."""
    producer = {o: n for n in model.graph.node for o in n.output}
    inputs = {i.name for i in model.graph.input}
    need, seen, todo = set(), set(), [name]
    while todo:
        t = todo.pop()
        if t in seen or not t:
            continue
        seen.add(t)
        if t in inputs:
            return None
        node = producer.get(t)
        if node is None:
            continue  # an initializer
        need.add(id(node))
        if node.op_type != "Shape":
            todo.extend(node.input)
    return [n for n in model.graph.node if id(n) in need]


def _static_shapes(model) -> dict:
    """name -> dims of every tensor whose shape inference gives one (None for a symbolic dim: the batch)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    out = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            out[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    return out


def _shape_node_as_constant(node, dims: list, batch: int):
    """A Constant standing for ``Shape(x)`` of a tensor with these dims, the symbolic batch set."""
    from onnx import helper, numpy_helper

    full = np.array([batch if d is None else d for d in dims], dtype=np.int64)
    start, end = _attr(node, "start", 0), _attr(node, "end", None)
    value = full[start:end] if end is not None else full[start:]
    return helper.make_node("Constant", [], [node.output[0]], value=numpy_helper.from_array(value))


def _constant(model, name: str, shapes: Optional[dict] = None) -> Optional[np.ndarray]:
    """The value of tensor ``name`` when it is a constant for this graph: an initializer, or computed
    from constants and tensor shapes (TF "SAME" pads of ``SamePad2d``), the same at batch 1 and 2;
    else None."""
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    from onnx import numpy_helper

    if not name:
        return None
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    nodes = _shape_only_ancestors(model, name)
    if nodes is None:
        return None
    shapes = _static_shapes(model) if shapes is None else shapes
    values = []
    for batch in (1, 2):
        sub_nodes = []
        for n in nodes:
            if n.op_type == "Shape":
                dims = shapes.get(n.input[0])
                if dims is None or any(d is None for d in dims[1:]):
                    return None
                n = _shape_node_as_constant(n, dims, batch)
            sub_nodes.append(n)
        graph = helper.make_graph(sub_nodes, "constant", [], [helper.make_tensor_value_info(name, 0, None)],
                                  [i for i in model.graph.initializer if i.name in {x for n in nodes for x in n.input}])
        sub = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
        try:
            values.append(ReferenceEvaluator(sub).run(None, {})[0])
        except Exception:  # an op the reference evaluator lacks: leave the tensor alone
            return None
    return values[0] if np.array_equal(values[0], values[1]) else None


def _attr(node, name: str, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _spatial_zero_pads(model, pad, shapes: dict) -> Optional[List[int]]:
    """[h_begin, w_begin, h_end, w_end] of a constant-zero Pad over the spatial axes of an NCHW
    tensor, or None when the Pad is anything else."""
    mode = _attr(pad, "mode", b"constant")
    if mode not in (b"constant", "constant") or len(pad.input) > 3 and pad.input[3]:
        return None
    pads = _constant(model, pad.input[1], shapes) if len(pad.input) > 1 else _attr(pad, "pads")
    value = _constant(model, pad.input[2], shapes) if len(pad.input) > 2 and pad.input[2] else np.zeros(())
    if pads is None or value is None or np.any(value != 0):
        return None
    pads = [int(p) for p in np.asarray(pads).reshape(-1)]
    if len(pads) != 8 or any(p < 0 for p in pads) or pads[0] or pads[1] or pads[4] or pads[5]:
        return None
    return [pads[2], pads[3], pads[6], pads[7]]


def drop_unused(model) -> None:
    """Remove the nodes (ONNX operators have no side effects) and initializers nothing reads any more."""
    outputs = {o.name for o in model.graph.output}
    while True:
        used = {i for n in model.graph.node for i in n.input} | outputs
        dead = [n for n in model.graph.node if not any(o in used for o in n.output)]
        for n in dead:
            model.graph.node.remove(n)
        if not dead:
            break
    used = {i for n in model.graph.node for i in n.input}
    for t in [t for t in model.graph.initializer if t.name not in used]:
        model.graph.initializer.remove(t)


def _fold_pass(model, shapes: dict) -> List[str]:
    """One pass of ``fold_zero_pads`` with these inferred shapes; the names of the Convs that took a Pad."""
    from onnx import helper

    readers = defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            readers[name].append(node)
    outputs = {o.name for o in model.graph.output}
    pads_of = {n.output[0]: n for n in model.graph.node if n.op_type == "Pad"}
    folded, dead = [], []
    for conv in model.graph.node:
        pad = pads_of.get(conv.input[0]) if conv.op_type == "Conv" else None
        if pad is None or len(readers[pad.output[0]]) != 1 or pad.output[0] in outputs:
            continue
        extra = _spatial_zero_pads(model, pad, shapes)
        if extra is None or _attr(conv, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            continue
        old = list(_attr(conv, "pads", [0, 0, 0, 0]))
        keep = [a for a in conv.attribute if a.name != "pads"]
        del conv.attribute[:]
        conv.attribute.extend(keep + [helper.make_attribute("pads", [o + e for o, e in zip(old, extra)])])
        conv.input[0] = pad.input[0]
        dead.append(pad)
        folded.append(conv.name)
    for pad in dead:
        model.graph.node.remove(pad)
    return folded


def fold_zero_pads(model) -> List[str]:
    """Move every zero ``Pad`` whose only reader is a Conv into that Conv's ``pads`` (in place), and
    remove what computed the pads (timm's ``Conv2dSame`` computes them from ``Shape`` at run time).
    Returns the names of the Convs that took a Pad.

    A run-time pad is constant only once its input's shape is known, and shape inference knows a
    shape after a run-time Pad only once that Pad is folded: so fold, infer again, repeat until a
    pass folds nothing (at most once per Pad)."""
    folded: List[str] = []
    for _ in range(sum(n.op_type == "Pad" for n in model.graph.node)):
        done = _fold_pass(model, _static_shapes(model))
        if not done:
            break
        folded += done
        drop_unused(model)
    return folded
