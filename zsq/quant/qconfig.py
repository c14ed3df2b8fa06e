"""Quantization configs and the papers' protocol presets (named, versioned, validated dataclasses).

Papers disagree on where quantizers go and which layers keep 8 bits; a preset pins one protocol so a
reported number always says which one it used (``QuantConfig.describe()``).
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Dict, Optional, Tuple

from zsq.errors import ZsqError
from zsq.quant.quantizer import QuantSpec
from zsq.registry import Registry

PLACEMENTS = ("layer_input", "after_relu", "deploy")
ACT_INITS = ("data", "bn")


def parse_bits(text: str) -> Tuple[int, int]:
    """'w4a4' -> (4, 4). Weights and activations 2..8 bits."""
    m = re.fullmatch(r"\s*[wW](\d+)\s*[aA](\d+)\s*", str(text))
    if not m:
        raise ZsqError(f"malformed bits {text!r}: expected the form wXaY, e.g. w4a4 or w2a4")
    w, a = int(m.group(1)), int(m.group(2))
    for kind, b in (("weight", w), ("activation", a)):
        if not 2 <= b <= 8:
            raise ZsqError(f"{kind} bits must be from 2 to 8, got {b} in {text!r}")
    return w, a


def format_bits(w: int, a: int) -> str:
    return f"w{w}a{a}"


@dataclass(frozen=True)
class LayerOverride:
    """Per-layer exception. ``pattern`` is an fnmatch pattern on the module name, or one of
    ``@first`` / ``@second`` / ``@last`` (the first, second and last Conv/Linear in module order).
    None keeps the config's value. ``quantize_input=False`` leaves the layer input in float."""

    pattern: str
    w_bits: Optional[int] = None
    a_bits: Optional[int] = None
    quantize_input: Optional[bool] = None

    def __post_init__(self):
        for b in (self.w_bits, self.a_bits):
            if b is not None and not 2 <= b <= 8:
                raise ZsqError(f"override {self.pattern!r}: bits must be from 2 to 8, got {b}")

    def matches(self, name: str, index: int, count: int) -> bool:
        if self.pattern == "@first":
            return index == 0
        if self.pattern == "@second":
            return index == 1
        if self.pattern == "@last":
            return index == count - 1
        return fnmatch.fnmatchcase(name, self.pattern)


@dataclass(frozen=True)
class QuantConfig:
    """Everything ``quantize_model`` needs. Build one with ``get_preset(name, bits)``.

    act_placement: "layer_input" (Genie/BRECQ: each Conv/Linear quantizes its input; with
      quantize_residual, residual ``shortcut`` modules too, sharing the quantizer of the layer that
      reads the same tensor), "after_relu" (GDFQ/AIT/HAST: a quantizer after every ReLU/ReLU6) or
      "deploy" (every tensor an integer kernel reads or writes, each once; ``zsq.quant.deploy``).
    quantize_image_input: whether the first layer's input (the image) is quantized in layer_input mode.
    fold_bn: fold BatchNorm into the preceding conv before quantizing.
    bias_grid: round each Conv/Linear bias to the int32 grid (input step x weight step) that an
      integer kernel adds, so the fake-quant model computes what QLinearConv does (deploy v2).
    act_init: where reconstruction methods (Genie-M, BRECQ, QDrop, AdaRound) start activation steps:
      "data" (the papers: a search on the calibration images) or "bn" (BatchNorm statistics, as
      bn-minmax; deploy v3, where ranges searched on synthetic images cost 3 points on Lite0 W8A8).
      ``--set act_init=...`` overrides it per run.
    """

    preset: str = "custom"
    version: int = 1
    w_bits: int = 8
    a_bits: int = 8
    weight: QuantSpec = field(default_factory=lambda: QuantSpec(per_channel=True))
    act: QuantSpec = field(default_factory=QuantSpec)
    act_placement: str = "layer_input"
    quantize_residual: bool = True
    quantize_image_input: bool = False
    overrides: Tuple[LayerOverride, ...] = ()
    fold_bn: bool = False
    bias_grid: bool = False
    residual_module_names: Tuple[str, ...] = ("shortcut",)
    act_init: str = "data"

    def __post_init__(self):
        if self.act_placement not in PLACEMENTS:
            raise ZsqError(f"act_placement must be one of {PLACEMENTS}, got {self.act_placement!r}")
        if self.act_init not in ACT_INITS:
            raise ZsqError(f"act_init must be one of {', '.join(ACT_INITS)}, got {self.act_init!r}")
        for kind, b in (("weight", self.w_bits), ("activation", self.a_bits)):
            if not isinstance(b, int) or not 2 <= b <= 8:
                raise ZsqError(f"{kind} bits must be from 2 to 8, got {b!r}")

    @property
    def bits(self) -> str:
        return format_bits(self.w_bits, self.a_bits)

    def with_bits(self, bits: str | Tuple[int, int]) -> "QuantConfig":
        w, a = parse_bits(bits) if isinstance(bits, str) else bits
        return replace(self, w_bits=w, a_bits=a)

    def with_overrides(self, *extra: LayerOverride) -> "QuantConfig":
        return replace(self, overrides=tuple(self.overrides) + tuple(extra))

    def layer_bits(self, name: str, index: int, count: int) -> Tuple[int, int, bool]:
        """(w_bits, a_bits, quantize_input) for the index-th of count Conv/Linear layers."""
        w, a = self.w_bits, self.a_bits
        q_in = self.act_placement != "after_relu" and (index > 0 or self.quantize_image_input)
        for o in self.overrides:
            if o.matches(name, index, count):
                w = o.w_bits if o.w_bits is not None else w
                a = o.a_bits if o.a_bits is not None else a
                q_in = o.quantize_input if o.quantize_input is not None else q_in
        return w, a, q_in

    def describe(self) -> str:
        return f"{self.preset}@v{self.version} {self.bits}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["overrides"] = [asdict(o) for o in self.overrides]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        d = dict(d)
        d["weight"] = QuantSpec(**d["weight"])
        d["act"] = QuantSpec(**d["act"])
        d["overrides"] = tuple(LayerOverride(**o) for o in d.get("overrides", ()))
        d["residual_module_names"] = tuple(d.get("residual_module_names", ("shortcut",)))
        return cls(**d)


# ---- presets ---------------------------------------------------------------------------------
PRESETS: Registry[Tuple[Callable[[], QuantConfig], str]] = Registry("preset")


def register_preset(name: str, summary: str):
    """Decorator: ``fn() -> QuantConfig`` becomes preset ``name`` (filled by zsq.quant and zsq.ptq on import)."""
    def deco(fn: Callable[[], QuantConfig]):
        PRESETS.register(name, (fn, summary))
        return fn

    return deco


def get_preset(name: str, bits: str | Tuple[int, int] = "w4a4") -> QuantConfig:
    return PRESETS.get(name)[0]().with_bits(bits)


def list_presets() -> Dict[str, str]:
    return {k: v[1] for k, v in PRESETS.items().items()}


@register_preset("genie", "Genie/BRECQ: W per-channel asym (Lp-2.4 init), A per-tensor sym at layer inputs "
                          "incl. residual; first layer W8 float input, 2nd layer A8, last W8A8; BN unfolded")
def _genie() -> QuantConfig:
    return QuantConfig(
        preset="genie",
        version=1,
        weight=QuantSpec(per_channel=True, symmetric=False, observer="lp", lp_p=2.4, lp_ratios=100),
        act=QuantSpec(per_channel=False, symmetric=True, signed=None, observer="lp", lp_p=2.4,
                      lp_ratios=100, learnable=True, ste="clip"),
        act_placement="layer_input",
        quantize_residual=True,
        quantize_image_input=False,
        overrides=(
            LayerOverride("@first", w_bits=8, quantize_input=False),
            LayerOverride("@second", a_bits=8),
            LayerOverride("@last", w_bits=8, a_bits=8),
        ),
        fold_bn=False,
    )


@register_preset("gdfq", "GDFQ/AIT/HAST: W per-channel asym min/max recomputed each step, A per-tensor asym EMA "
                         "after every ReLU/ReLU6; all layers (first and last too) at k bits; BN unfolded")
def _gdfq() -> QuantConfig:
    return QuantConfig(
        preset="gdfq",
        version=1,
        weight=QuantSpec(per_channel=True, symmetric=False, observer="minmax", dynamic=True, ste="identity"),
        act=QuantSpec(per_channel=False, symmetric=False, observer="ema", ema_momentum=0.9,
                      ema_bias_correction=True, ste="identity"),
        act_placement="after_relu",
        quantize_residual=False,
        overrides=(),
        fold_bn=False,
    )


@register_preset("deploy", "integer kernels (onnxruntime QLinearConv, OpenVINO int8): BN folded; W per-channel "
                           "symmetric int8 grid; A per-tensor asym (uint8) on every conv input and output, ReLU "
                           "outputs included; all layers at k bits, image input quantized; biases on the int32 kernel grid; "
                           "reconstruction starts activation steps from BN statistics")
def _deploy() -> QuantConfig:
    return QuantConfig(
        preset="deploy",
        version=3,  # v2: biases on the int32 kernel grid (bias_grid); v3: reconstruction starts act steps from BN
        act_init="bn",
        weight=QuantSpec(per_channel=True, symmetric=True, signed=True, observer="minmax"),
        act=QuantSpec(per_channel=False, symmetric=False, observer="lp", lp_p=2.4, lp_ratios=100,
                      learnable=True, ste="clip"),
        act_placement="deploy",
        quantize_residual=True,
        quantize_image_input=True,
        overrides=(),
        fold_bn=True,
        bias_grid=True,
    )


@register_preset("gdfq-fixed", "the gdfq protocol (same layers, bits, placement and granularity) on fixed grids: W per-channel "
                               "asym steps set once (Lp-2.4 init, learnable by reconstruction), A per-tensor asym LSQ "
                               "steps after every ReLU/ReLU6; what a reconstructed (warm-started) QAT student uses")
def _gdfq_fixed() -> QuantConfig:
    return fixed_grids(_gdfq(), "gdfq-fixed")


def fixed_grids(qconfig: QuantConfig, preset: str) -> QuantConfig:
    """``qconfig`` with grids a reconstruction can learn: weight steps fixed per channel instead of min/max
    recomputed every step (Lp-2.4 start, as Genie's), activation steps LSQ-learnable with the clipping STE.
    Which layers are quantized, at which bits, where and per what granularity stays the preset's, so a model
    on it answers the same protocol question (every layer at k bits for gdfq)."""
    lp = dict(observer="lp", lp_p=2.4, lp_ratios=100, ste="clip")
    return replace(qconfig, preset=preset, weight=replace(qconfig.weight, dynamic=False, **lp),
                   act=replace(qconfig.act, learnable=True, **lp))
