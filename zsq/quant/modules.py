"""Quantized stand-ins for float modules (a Brevitas-style float -> quant module map).

Each wrapper keeps the float module's parameter names (``weight``, ``bias``) so checkpoints line up,
and holds its quantizers as swappable submodules: ``weight_quant`` (any module mapping a weight to
its fake-quantized value -- the PTQ code swaps in soft-rounding quantizers) and ``input_quant``
(an activation quantizer applied to the layer input, or None).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from zsq.compute import fp32_region
from zsq.quant.quantizer import QuantSpec, UniformQuantizer, round_ste


def make_weight_quantizer(weight: torch.Tensor, spec: QuantSpec) -> UniformQuantizer:
    """A weight quantizer initialised from the weight itself (data-free)."""
    q = UniformQuantizer(spec, num_channels=weight.shape[spec.ch_axis] if spec.per_channel else None)
    if not spec.dynamic:
        q.init_from(weight.detach())
    return q


def weight_step(weight_quant: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """The step of a weight grid (one per output channel, or one), whatever quantizer holds it: a
    UniformQuantizer, the soft-rounding quantizers of reconstruction, a frozen export grid."""
    if isinstance(weight_quant, UniformQuantizer):
        return weight_quant.qparams(weight)[0]
    step = getattr(weight_quant, "scale", None)
    if not isinstance(step, torch.Tensor):
        raise TypeError(f"{type(weight_quant).__name__} exposes no weight step (.scale)")
    return step


class _WeightQuantMixin:
    """What QuantConv2d and QuantLinear share: copying the float layer in, building the quantizers,
    and the fake-quantized weight / input used by forward."""

    weight_quant: Optional[nn.Module]
    input_quant: Optional[nn.Module]

    def _take_float(self, layer: nn.Module, w_spec: Optional[QuantSpec], a_spec: Optional[QuantSpec]):
        self.to_empty(device=layer.weight.device)
        with torch.no_grad():
            self.weight.copy_(layer.weight)
            if layer.bias is not None:
                self.bias.copy_(layer.bias)
        self.weight.requires_grad_(layer.weight.requires_grad)
        self.weight_quant = make_weight_quantizer(self.weight, w_spec) if w_spec is not None else None
        self.input_quant = UniformQuantizer(a_spec) if a_spec is not None else None
        return self

    def quantized_weight(self) -> torch.Tensor:
        return self.weight if self.weight_quant is None else self.weight_quant(self.weight)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quant is None else self.input_quant(x)

    def set_bias_grid(self, input_quant: Optional[nn.Module]) -> None:
        """Round the bias to the int32 grid s_in * s_w that an integer kernel adds (QLinearConv: the
        bias is quantized at the input step times each channel's weight step), ``input_quant`` being
        the quantizer whose grid this layer's input lies on. Held outside the module tree (it is
        another layer's quantizer, or this layer's own), so it is neither saved twice nor visited twice."""
        self.__dict__["_bias_input_quant"] = input_quant

    def quantized_bias(self) -> Optional[torch.Tensor]:
        src, wq, b = self.__dict__.get("_bias_input_quant"), self.weight_quant, self.bias
        if b is None or src is None or wq is None or not getattr(src, "enabled", True) \
                or not getattr(wq, "enabled", True):
            return b
        with fp32_region(b):  # grid arithmetic in float32 (float64 in the float-floor copy)
            dt = torch.float64 if b.dtype == torch.float64 else torch.float32
            step = src.qparams()[0].to(dt).reshape(()) * weight_step(wq, self.weight).to(dt).reshape(-1)
            return round_ste(b.to(dt) / step) * step


class QuantConv2d(_WeightQuantMixin, nn.Conv2d):
    """nn.Conv2d (grouped/depthwise included) with fake-quantized weight and, optionally, input."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight_quant: Optional[nn.Module] = None
        self.input_quant: Optional[nn.Module] = None

    @classmethod
    def from_float(cls, conv: nn.Conv2d, w_spec: Optional[QuantSpec], a_spec: Optional[QuantSpec]):
        # built on the meta device: the float weights are copied in, so no default init and no global RNG draw
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                bias=conv.bias is not None, padding_mode=conv.padding_mode, device="meta")
        return q._take_float(conv, w_spec, a_spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantized_input(x), self.quantized_weight(), self.quantized_bias())


class QuantLinear(_WeightQuantMixin, nn.Linear):
    """nn.Linear with fake-quantized weight (per output row) and, optionally, input."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight_quant: Optional[nn.Module] = None
        self.input_quant: Optional[nn.Module] = None

    @classmethod
    def from_float(cls, lin: nn.Linear, w_spec: Optional[QuantSpec], a_spec: Optional[QuantSpec]):
        q = cls(lin.in_features, lin.out_features, bias=lin.bias is not None, device="meta")
        return q._take_float(lin, w_spec, a_spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantized_input(x), self.quantized_weight(), self.quantized_bias())


class QuantAct(nn.Module):
    """An activation module followed by an activation quantizer (GDFQ's ReLU -> QuantAct)."""

    def __init__(self, act: nn.Module, quant: nn.Module):
        super().__init__()
        self.act = act
        self.quant = quant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant(self.act(x))


class QuantInput(nn.Module):
    """Quantizes the input of a parameter-free module (a residual ``shortcut``), as Genie's
    Identity wrappers do, so that the residual branch carries the quantized block input."""

    def __init__(self, module: nn.Module, quant: nn.Module):
        super().__init__()
        self.module = module
        self.input_quant = quant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(self.input_quant(x))


class QuantKeepForward(_WeightQuantMixin):
    """Weight (and input) quantization for a Conv2d/Linear *subclass* with its own forward (timm's
    ``Conv2dSame``, efficientnet_pytorch's ``Conv2dStaticSamePadding``, a user's padded conv): the
    subclass's forward runs unchanged, reading the fake-quantized weight in place of ``weight``, so
    its padding and whatever else it does are kept. Built by ``keep_forward_quant``."""

    float_type: type

    def forward(self, x, *args, **kwargs):
        w, b = self._parameters["weight"], self._parameters.get("bias")
        self._parameters["weight"] = self.quantized_weight()  # plain tensors for this call only
        if b is not None:
            self._parameters["bias"] = self.quantized_bias()
        try:
            return self.float_type.forward(self, self.quantized_input(x), *args, **kwargs)
        finally:
            self._parameters["weight"] = w
            if b is not None:
                self._parameters["bias"] = b


_KEEP_FORWARD_TYPES: dict = {}


def keep_forward_quant(layer: nn.Module, w_spec: Optional[QuantSpec], a_spec: Optional[QuantSpec]) -> nn.Module:
    """Turn ``layer`` (a Conv2d/Linear subclass, modified in place) into its quantized form that keeps
    the subclass's forward. One class per float class, so every such layer of a type looks alike."""
    cls = type(layer)
    qcls = _KEEP_FORWARD_TYPES.get(cls)
    if qcls is None:
        qcls = type(f"Quant{cls.__name__}", (QuantKeepForward, cls), {"float_type": cls})
        _KEEP_FORWARD_TYPES[cls] = qcls
    layer.__class__ = qcls
    layer.weight_quant = make_weight_quantizer(layer.weight, w_spec) if w_spec is not None else None
    layer.input_quant = UniformQuantizer(a_spec) if a_spec is not None else None
    return layer


def is_plain(layer: nn.Module) -> bool:
    """An exact nn.Conv2d / nn.Linear (not a subclass that might change what forward computes)."""
    return type(layer) in (nn.Conv2d, nn.Linear)


class FoldedBatchNorm(nn.Identity):
    """What a BatchNorm2d becomes once folded into the conv before it: the identity, keeping the
    BN's affine (gamma, beta) as non-saved buffers so data-free calibration (``calibrate_from_bn``)
    can still simulate what the layer outputs. Nothing of it is in the state dict."""

    affine = True

    def __init__(self, num_features: int, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.num_features = num_features
        self.register_buffer("weight", weight.detach().clone(), persistent=False)
        self.register_buffer("bias", bias.detach().clone(), persistent=False)

    @classmethod
    def from_bn(cls, bn: nn.BatchNorm2d) -> "FoldedBatchNorm":
        c = bn.num_features
        w = bn.weight if bn.affine else torch.ones(c, device=bn.running_mean.device)
        b = bn.bias if bn.affine else torch.zeros(c, device=bn.running_mean.device)
        return cls(c, w, b)

    def extra_repr(self) -> str:
        return f"{self.num_features}, folded"


# BatchNorm subclasses whose forward is "batch norm, then self.drop, then self.act", by (module, class name):
# timm's BatchNormAct2d (timm.layers since 0.9, timm.models.layers before). Matched by exact type, never
# by isinstance, and each call is checked to flow that way before the BN is folded (transforms.py).
BN_ACT_TYPES = {("timm.layers.norm_act", "BatchNormAct2d"), ("timm.models.layers.norm_act", "BatchNormAct2d")}


def is_bn_act(m: nn.Module) -> bool:
    """A BatchNorm2d followed by its own ``drop`` and ``act`` children (timm's BatchNormAct2d)."""
    return (isinstance(m, nn.BatchNorm2d) and (type(m).__module__, type(m).__name__) in BN_ACT_TYPES
            and isinstance(getattr(m, "drop", None), nn.Module) and isinstance(getattr(m, "act", None), nn.Module))


class FoldedBatchNormAct(nn.Module):
    """What a folded BatchNorm-with-activation (timm's BatchNormAct2d) becomes: the folded BN (an
    identity that keeps gamma/beta, so ``calibrate_from_bn`` samples its output before the
    activation), then the BN's own ``drop`` and ``act`` children, unchanged, so graph capture finds
    the activation call and places the after-activation quantizer there."""

    def __init__(self, bn: FoldedBatchNorm, drop: nn.Module, act: nn.Module):
        super().__init__()
        self.bn, self.drop, self.act = bn, drop, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(self.bn(x)))


def folded_stand_in(bn: nn.BatchNorm2d) -> nn.Module:
    """The module that replaces ``bn`` once it is folded into the conv before it."""
    folded = FoldedBatchNorm.from_bn(bn)
    return FoldedBatchNormAct(folded, bn.drop, bn.act) if is_bn_act(bn) else folded


QUANT_LAYER_TYPES = (QuantConv2d, QuantLinear, QuantKeepForward)
FLOAT_TO_QUANT = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}


def float_type_name(layer: nn.Module) -> str:
    """The float layer a quant wrapper stands in for ('Conv2d' for QuantConv2d, 'Conv2dSame' for
    QuantConv2dSame)."""
    if isinstance(layer, QuantKeepForward):
        return layer.float_type.__name__
    return next((f.__name__ for f, q in FLOAT_TO_QUANT.items() if isinstance(layer, q)), type(layer).__name__)


class ChannelClippedReLU(nn.Hardtanh):
    """min(max(x, 0), cap_c) with one cap per channel: what a ReLU6 becomes when cross-layer equalization
    divides the channels feeding it by s_c (ReLU6(z)/s = min(max(z/s, 0), 6/s)), so the float function is
    kept exactly. A Hardtanh, so graph capture places activation quantizers after it as after a ReLU6."""

    def __init__(self, cap: torch.Tensor):
        super().__init__(0.0, float(cap.max()) if cap.numel() else 6.0)
        self.register_buffer("cap", cap.detach().clone().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        view = (1, -1) + (1,) * (x.dim() - 2)
        return torch.minimum(torch.clamp(x, min=0.0), self.cap.reshape(view).to(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.cap.numel()} channels, caps in [{float(self.cap.min()):.4g}, {float(self.cap.max()):.4g}]"
