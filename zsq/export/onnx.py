"""ONNX QDQ export of a zsq fake-quant model (Brevitas-style "QCDQ").

Every quantizer becomes standard ONNX operators that any runtime understands:
- activation quantizer -> QuantizeLinear -> [Clip] -> DequantizeLinear, with an int8 (signed grids)
  or uint8 container; for fewer than 8 bits the Clip pins the codes to the sub-8-bit range
  (the container alone would allow 256 levels);
- weight quantizer -> an int8/uint8 initializer holding the integer codes -> DequantizeLinear
  (per output channel: ``axis=0`` with 1-D scale/zero point), so weights are stored as integers
  in the .onnx file too. Signed codes beyond [-64, 64] are stored as uint8 (codes + 128, zero point
  + 128, the same values) unless ``weight_dtype="int8"``: onnxruntime's u8 x s8 kernels on x86 CPUs
  without VNNI sum pairs of products in saturating int16 (vpmaddubsw; 2 * 255 * 127 > 32767), so an
  int8-weight file gives other results there, while u8 x u8 kernels are exact on every CPU.

The export swaps the quantizers of a deep copy for export-only modules whose forward computes the
same values as the fake-quant model and whose autograd ``symbolic`` emits the Q/DQ nodes; the
TorchScript exporter (``dynamo=False``) then writes the graph at opset 13-20 (per-axis Q/DQ needs
>= 13). Opset 21 (the default) is written by converting the opset-17 graph with the onnx package,
since torch's exporter stops at 20, and storing every weight whose codes fit 4 bits as an
INT4/UINT4 initializer (two codes a byte), so a W4 .onnx is about as small as the packed checkpoint.
"""
from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path
from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from zsq.errors import ZsqError
from zsq.quant.modules import QuantAct, QuantInput
from zsq.export.onnx_passes import drop_unused, fold_zero_pads
from zsq.export.weight_grid import weight_grid
from zsq.quant.inventory import quant_layers

OPSET = 21  # default: INT4/UINT4 weight initializers
TORCH_MAX_OPSET = 20  # torch.onnx (TorchScript) writes up to this opset
SUPPORTED_OPSETS = range(13, 22)
# "portable": 8-bit signed weight codes stored as uint8 (exact on every CPU); "int8": kept signed, about 2x
# faster in onnxruntime on CPUs with VNNI/AMX and wrong on x86 CPUs without (see the module docstring)
WEIGHT_DTYPES = ("portable", "int8")
# |code| up to this never saturates a u8 x s8 int16 pair sum: 2 * 255 * 64 = 32640 <= 32767
SATURATION_SAFE_CODE = 64


def _container(qmin: int, qmax: int, what: str) -> Tuple[torch.dtype, int, int]:
    """int8 or uint8 container for codes in [qmin, qmax]; (dtype, container min, container max)."""
    if qmin >= 0 and qmax <= 255:
        return torch.uint8, 0, 255
    if qmin >= -128 and qmax <= 127:
        return torch.int8, -128, 127
    raise ZsqError(f"{what}: code range [{qmin}, {qmax}] fits neither int8 nor uint8; ONNX QDQ cannot express it")


def _int_values(t: torch.Tensor, what: str) -> List[int]:
    vals = t.detach().reshape(-1)
    if not torch.equal(vals, torch.round(vals)):
        raise ZsqError(f"{what}: zero point is not an integer; ONNX QDQ cannot express it")
    return [int(v) for v in vals.tolist()]


class _ActQDQ(torch.autograd.Function):
    """x -> fake-quantized x; exported as QuantizeLinear [-> Clip] -> DequantizeLinear (per tensor)."""

    @staticmethod
    def forward(ctx, x, scale, zp_float, zp: int, qmin: int, qmax: int, container: str):
        q = torch.clamp(torch.round(x / scale) + zp_float, qmin, qmax)
        return (q - zp_float) * scale

    @staticmethod
    def symbolic(g, x, scale, zp_float, zp: int, qmin: int, qmax: int, container: str):
        dt = torch.int8 if container == "int8" else torch.uint8
        lo, hi = (-128, 127) if container == "int8" else (0, 255)
        zp_c = g.op("Constant", value_t=torch.tensor(zp, dtype=dt))
        q = g.op("QuantizeLinear", x, scale, zp_c)
        if (qmin, qmax) != (lo, hi):
            q = g.op("Clip", q, g.op("Constant", value_t=torch.tensor(qmin, dtype=dt)),
                     g.op("Constant", value_t=torch.tensor(qmax, dtype=dt)))
        return g.op("DequantizeLinear", q, scale, zp_c)


class _WeightDQ(torch.autograd.Function):
    """Integer codes -> weight; exported as DequantizeLinear on an int8/uint8 initializer."""

    @staticmethod
    def forward(ctx, codes, scale_b, zp_b, scale_1d, zp_1d, per_channel: bool):
        return (codes.to(scale_b.dtype) - zp_b) * scale_b

    @staticmethod
    def symbolic(g, codes, scale_b, zp_b, scale_1d, zp_1d, per_channel: bool):
        if per_channel:
            return g.op("DequantizeLinear", codes, scale_1d, zp_1d, axis_i=0)
        return g.op("DequantizeLinear", codes, scale_1d, zp_1d)


class ExportActQuant(nn.Module):
    """Export-time stand-in for a per-tensor activation quantizer."""

    def __init__(self, name: str, q: nn.Module):
        super().__init__()
        scale, zp = q.qparams(None)
        if scale.numel() != 1:
            raise ZsqError(f"activation quantizer {name}: only per-tensor activation quantizers are exported")
        self.register_buffer("scale", scale.detach().reshape(()).clone().float())
        self.register_buffer("zp_float", zp.detach().reshape(()).clone().float())
        self.zp = _int_values(self.zp_float, f"activation quantizer {name}")[0]
        self.qmin, self.qmax = int(q.qmin), int(q.qmax)
        dt, _, _ = _container(self.qmin, self.qmax, f"activation quantizer {name}")
        self.container = "int8" if dt == torch.int8 else "uint8"

    def forward(self, x):
        return _ActQDQ.apply(x, self.scale, self.zp_float, self.zp, self.qmin, self.qmax, self.container)


class ExportWeightQuant(nn.Module):
    """Export-time stand-in for a weight quantizer: holds the integer codes, returns the weight."""

    def __init__(self, name: str, layer: nn.Module, weight_dtype: str = "portable"):
        super().__init__()
        w = layer.weight.detach()
        g = weight_grid(name, layer)
        codes, scale, zp = g.codes, g.scale, g.zero_point
        dt, _, _ = _container(g.qmin, g.qmax, f"layer {name}")
        self.shifted = bool(dt == torch.int8 and weight_dtype == "portable" and codes.abs().max() > SATURATION_SAFE_CODE)
        if self.shifted:
            codes, zp, dt = codes.to(torch.int16) + 128, zp + 128, torch.uint8  # same values, u8 x u8 kernels
        # which axis the grid varies along: none (per tensor) or the output channels (axis 0)
        varying = [d for d in range(scale.dim()) if scale.shape[d] > 1 or (zp.dim() > d and zp.shape[d] > 1)]
        if scale.numel() == 1 and zp.numel() == 1:
            self.per_channel = False
            s1, z1 = scale.reshape(()), zp.reshape(())
        elif varying == [0] and scale.shape[0] == w.shape[0]:
            self.per_channel = True
            s1 = scale.reshape(-1).expand(w.shape[0]).contiguous()
            z1 = zp.reshape(-1).expand(w.shape[0]).contiguous()
        else:
            raise ZsqError(f"layer {name}: weight grid of shape {tuple(scale.shape)} is neither per-tensor nor per "
                           f"output channel; ONNX QDQ (one axis) cannot express it")
        _int_values(z1, f"layer {name}")
        self.register_buffer("codes", codes.to(dt))
        self.register_buffer("scale_b", scale.clone())
        self.register_buffer("zp_b", zp.clone())
        self.register_buffer("scale_1d", s1.clone())
        self.register_buffer("zp_1d", z1.to(dt).clone())
        # the weight DQ must give exactly the model's quantized weight
        if not torch.equal(_WeightDQ.forward(None, self.codes, self.scale_b, self.zp_b, None, None, False),
                           layer.quantized_weight().detach()):
            raise ZsqError(f"layer {name}: (codes - zero_point) * scale differs from its quantized weight; "
                           f"ONNX QDQ cannot express this weight quantizer")

    def forward(self, w):
        return _WeightDQ.apply(self.codes, self.scale_b, self.zp_b, self.scale_1d, self.zp_1d, self.per_channel)


def check_weight_dtype(weight_dtype: str) -> str:
    if weight_dtype not in WEIGHT_DTYPES:
        raise ZsqError(f"weight dtype {weight_dtype!r} is not one of {', '.join(WEIGHT_DTYPES)} (portable: exact in "
                       f"onnxruntime on every CPU; int8: faster on CPUs with VNNI, wrong on x86 CPUs without)")
    return weight_dtype


def export_model(qmodel: nn.Module, weight_dtype: str = "portable") -> nn.Module:
    """A deep copy of ``qmodel`` with every quantizer replaced by its export-only module."""
    check_weight_dtype(weight_dtype)
    m = copy.deepcopy(qmodel).eval()
    replaced = {}

    def act(name, q):
        if q is None or not getattr(q, "enabled", True):
            return None
        for attr in ("qparams", "qmin", "qmax"):
            if not hasattr(q, attr):
                raise ZsqError(f"activation quantizer {name} ({type(q).__name__}) has no {attr}; cannot export it")
        if getattr(getattr(q, "spec", None), "dynamic", False):
            raise ZsqError(f"activation quantizer {name} is dynamic (range from each input); ONNX QDQ needs a fixed grid")
        if hasattr(q, "initialized") and not bool(q.initialized):
            raise ZsqError(f"activation quantizer {name} was never initialised; calibrate before exporting")
        if id(q) not in replaced:
            replaced[id(q)] = ExportActQuant(name, q)
        return replaced[id(q)]

    for _, layer in quant_layers(m):  # a bias on the kernel grid is stored as its grid value
        if layer.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(layer.quantized_bias())
            layer.set_bias_grid(None)
    for name, layer in quant_layers(m):
        if layer.weight_quant is not None and getattr(layer.weight_quant, "enabled", True):
            layer.weight_quant = ExportWeightQuant(name, layer, weight_dtype)
        else:
            layer.weight_quant = None
        new = act(name + ".input_quant", layer.input_quant)
        layer.input_quant = new
    for name, mod in m.named_modules():
        if isinstance(mod, QuantInput):
            mod.input_quant = act(name + ".input_quant", mod.input_quant) or nn.Identity()
        elif isinstance(mod, QuantAct):
            mod.quant = act(name + ".quant", mod.quant) or nn.Identity()
    return m


def freeze_shape_dependent_modules(m: nn.Module, input_size: Tuple[int, ...]) -> List[str]:
    """Replace each module that computes something from its input's shape and offers ``static_for``
    (``SamePad2d``) by its constant form for the one input size the graph is exported at; a module
    that sees several shapes keeps its dynamic form. Returns the names replaced."""
    from zsq.hooks import Hooks
    from zsq.quant.inventory import set_submodule

    seen: dict = {}
    with Hooks() as hooks:
        for name, mod in m.named_modules():
            if callable(getattr(mod, "static_for", None)):
                hooks.pre(mod, lambda _m, inp, name=name: seen.setdefault(name, set()).add(tuple(inp[0].shape[1:])))
        with torch.no_grad():
            m(torch.zeros(1, *input_size))
    fixed = [n for n, shapes in seen.items() if len(shapes) == 1]
    for name in fixed:
        set_submodule(m, name, m.get_submodule(name).static_for((1,) + next(iter(seen[name]))))
    return fixed


def check_opset(opset: int) -> int:
    if not isinstance(opset, int) or opset not in SUPPORTED_OPSETS:
        raise ZsqError(f"ONNX opset {opset!r} is not supported: zsq writes opsets {SUPPORTED_OPSETS[0]}-"
                       f"{SUPPORTED_OPSETS[-1]} (per-channel DequantizeLinear needs 13, INT4 weights 21)")
    return opset


def _fits(arr, lo: int, hi: int) -> bool:
    return arr.size == 0 or (int(arr.min()) >= lo and int(arr.max()) <= hi)


def _int4_tensor(name: str, arr, dtype):
    import numpy as np
    from onnx import helper

    from zsq.export.packing import pack_codes

    nibbles = torch.from_numpy(arr.astype(np.int64).reshape(-1) & 0xF)  # two's complement for INT4
    return helper.make_tensor(name, dtype, list(arr.shape), pack_codes(nibbles, 4, 0).numpy().tobytes(), raw=True)


def pack_int4_weights(model) -> List[str]:
    """In place: every DequantizeLinear whose int8/uint8 initializer codes and zero point fit 4 bits
    gets INT4/UINT4 initializers (ONNX packs two codes a byte, low nibble first, as zsq's own
    packing does). Values are unchanged. Returns the converted weight names."""
    import numpy as np
    from onnx import TensorProto, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    # the exporter writes equal constants once and feeds the copies through Identity nodes
    alias = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Identity" and n.input[0] in inits}
    users = {}
    for n in model.graph.node:
        for i in n.input:
            users[i] = users.get(i, 0) + 1
    done = []
    for n in model.graph.node:
        if n.op_type != "DequantizeLinear" or len(n.input) < 3 or n.input[0] not in inits:
            continue
        if alias.get(n.input[2], n.input[2]) not in inits or users[n.input[0]] != 1:
            continue  # zero point computed, or codes shared with another node: leave them as they are
        x, zp = numpy_helper.to_array(inits[n.input[0]]), numpy_helper.to_array(inits[alias.get(n.input[2], n.input[2])])
        if x.dtype == np.uint8 and _fits(x, 0, 15) and _fits(zp, 0, 15):
            dtype = TensorProto.UINT4
        elif x.dtype == np.int8 and _fits(x, -8, 7) and _fits(zp, -8, 7):
            dtype = TensorProto.INT4
        else:
            continue
        inits[n.input[0]].CopyFrom(_int4_tensor(n.input[0], x, dtype))
        # the exporter shares equal zero points (all-zero, symmetric grids) between layers: each gets its own
        zp_name = n.input[0] + ".zero_point4"
        model.graph.initializer.append(_int4_tensor(zp_name, zp, dtype))
        users[n.input[2]] -= 1
        n.input[2] = zp_name
        done.append(n.input[0])
    drop_unused(model)
    return done


def _to_opset21(model):
    """The opset-17 graph at opset 21 with 4-bit weights; (model, converted weight names)."""
    from onnx import version_converter

    try:
        model = version_converter.convert_version(model, 21)
    except Exception as e:
        raise ZsqError(f"converting the graph to ONNX opset 21 failed ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                       f"export with opset 17") from None
    del model.graph.value_info[:]  # shapes the converter inferred: not needed, and they double small files
    return model, pack_int4_weights(model)


def export_onnx(qmodel: nn.Module, path, *, input_size: Optional[Tuple[int, int, int]] = None,
                opset: int = OPSET, weight_dtype: str = "portable") -> dict:
    """Write ``qmodel`` as a QDQ ONNX graph (batch dimension dynamic) and check it with onnx.checker.

    opset 21 (default) stores weights whose codes fit 4 bits as INT4/UINT4; 13-20 keep int8/uint8
    containers for runtimes without opset 21. ``weight_dtype``: see the module docstring."""
    import onnx

    check_opset(opset)
    if input_size is None:
        meta = getattr(qmodel, "zsq_meta", None)
        if meta is None:
            raise ZsqError("export needs the input size: the model has no zsq metadata; pass input_size=(C, H, W)")
        input_size = tuple(meta.input_size)
    em = export_model(qmodel, weight_dtype)
    shifted = [n for n, layer in quant_layers(em) if getattr(layer.weight_quant, "shifted", False)]
    freeze_shape_dependent_modules(em, input_size)
    x = torch.zeros(1, *input_size)
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(em, (x,), buf, dynamo=False, opset_version=opset if opset <= TORCH_MAX_OPSET else 17,
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, do_constant_folding=True)
    except ZsqError:
        raise
    except Exception as e:
        raise ZsqError(f"torch.onnx.export failed: {e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    model = onnx.load_from_string(buf.getvalue())
    folded_pads = fold_zero_pads(model)
    int4 = []
    if opset > TORCH_MAX_OPSET:
        model, int4 = _to_opset21(model)
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        raise ZsqError(f"the exported ONNX graph fails onnx.checker: {str(e).splitlines()[0]}") from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = model.SerializeToString()
    path.write_bytes(data)
    ops = {}
    for n in model.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return {"onnx": str(path), "onnx_bytes": len(data), "opset": opset, "weight_dtype": weight_dtype, "ops": ops,
            "int4_weights": int4, "uint8_shifted_weights": shifted,
            "pads_folded_into_convs": folded_pads}


def export_float_onnx(model: nn.Module, path, input_size: Tuple[int, int, int]) -> None:
    """``model`` as a plain float ONNX graph (opset 17, batch dynamic): the FP32 baseline a quantized graph's
    latency is compared with. A zsq fake-quant model is exported with every quantizer off (a copy), i.e. the
    float network on its dequantized weights: the same graph shape and cost as the float model."""
    from zsq.quant.state import quantizers_disabled

    model = copy.deepcopy(model).eval()
    buf = io.BytesIO()
    with warnings.catch_warnings(), quantizers_disabled(model), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, *input_size),), buf, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    Path(path).write_bytes(buf.getvalue())
