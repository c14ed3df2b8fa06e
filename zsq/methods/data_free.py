"""The image-free methods beyond bn-minmax, on one pipeline: an optional DFQ float transform (BN folding,
cross-layer equalization, high-bias absorption; ``zsq.quant.equalize``), the preset's quantized model,
the weights rounded to nearest or by SQuant (``zsq.quant.squant``), activation ranges from BatchNorm
statistics (bn-minmax's ``calibrate_from_bn``), and optionally DFQ's analytic bias correction.

- ``squant`` (Guo et al., ICLR 2022): SQuant's rounding; ``--set equalize=true`` / ``bias_correct=true``
  add DFQ's parts.
- ``dfq`` (Nagel et al., ICCV 2019): CLE + HBA + bias correction, rounding to nearest
  (``--set rounding=squant`` for both).
No images and no back-propagation in either.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Literal

from zsq.errors import ZsqError
from zsq.methods.registry import QuantJob, QuantResult, register_method, schema_options, user_options
from zsq.options import check_range, parse_options
from zsq.quant import calibrate_from_bn, quant_layers, quantize_model
from zsq.quant.calibration import bn_layers
from zsq.quant.equalize import correct_bias, prepare_data_free, structure_of
from zsq.quant.squant import squant_layer

logger = logging.getLogger(__name__)


def require_bn(fp_model, method: str) -> None:
    """ZsqError before any work when the model has no BatchNorm statistics to take ranges from."""
    if not bn_layers(fp_model):
        raise ZsqError(f"{method} needs BatchNorm layers: this model has none, so there are no statistics to "
                       "derive activation ranges from (use a method that calibrates on images)")


def data_free_quantize(fp_model, qconfig, job: QuantJob, *, rounding: str = "nearest", mode: str = "squant",
                       weight_range: str = "preset", bn_k: float = 4.0, equalize: bool = False,
                       bias_correct: bool = False, iterations: int = 100, relu6: str = "clip",
                       absorb: str = "unpadded") -> QuantResult:
    """The shared pipeline (see the module docstring); ``fp_model`` is not changed."""
    t0 = time.time()
    prep = prepare_data_free(fp_model, fold=equalize or bias_correct, equalize=equalize, iterations=iterations,
                             relu6=relu6, absorb=absorb)
    qmodel = quantize_model(prep.model, qconfig)
    report = {"bn_k": bn_k, "rounding": rounding}
    if rounding == "squant":
        t_round = time.time()
        layers = {}
        for name, layer in quant_layers(qmodel):
            if layer.weight_quant is None:
                continue
            st = squant_layer(layer, mode, minmax_range=weight_range == "minmax")
            layers[name] = {"kernel_flips": st.kernel_flips, "channel_flips": st.channel_flips,
                            "objective_nearest": round(st.objective_nearest, 4),
                            "objective_squant": round(st.objective_squant, 4)}
        report.update(mode=mode, weight_range=weight_range, squant_layers=layers,
                      squant_seconds=round(time.time() - t_round, 3))  # the rounding alone
    calibrate_from_bn(qmodel, k=bn_k, seed=job.seed)
    report.update(prep.report())
    if bias_correct:
        report["bias_correction"] = correct_bias(qmodel, prep)
    if prep.folded:  # a saved checkpoint rebuilds these modules before loading (zsq.export.packed_checkpoint)
        qmodel.zsq_quant_plan["dfq_structure"] = dict(structure_of(prep), biases=[
            n for n, m in quant_layers(qmodel) if m.bias is not None])
    report["quant_seconds"] = time.time() - t0
    return QuantResult(qmodel, report)


@dataclass(frozen=True)
class DfqTransformOptions:
    """DFQ's float transform, usable before squant and bn-minmax: equalize (CLE over conv pairs with
    ReLU/ReLU6/nothing between, then high-bias absorption), iterations (CLE passes at most; 1 = AIMET's
    single pass), relu6 (clip: its clip becomes per channel, exact; relu: replaced by ReLU, the paper's;
    skip: such pairs are left alone), absorb (unpadded: only into layers without zero padding, where it is
    exact for pre-activations above beta - 3 gamma; all; none), bias_correct (analytic, from BN statistics)."""

    equalize: bool = False
    bias_correct: bool = False
    iterations: int = 100
    relu6: Literal["clip", "relu", "skip"] = "clip"
    absorb: Literal["unpadded", "all", "none"] = "unpadded"

    def __post_init__(self):
        check_range("iterations", self.iterations, 1, 1000)


@dataclass(frozen=True)
class SquantOptions(DfqTransformOptions):
    """mode: squant (element + kernel + channel flips, the paper's), squant-e (round to nearest), squant-k,
    squant-c (one stage only). weight_range: preset (the preset's weight grid, e.g. Genie's Lp-searched one)
    or minmax (each channel's min/max, the paper's). bn_k: activation range = mean +- bn_k std of the
    BN-simulated activations (bn-minmax's)."""

    mode: Literal["squant", "squant-e", "squant-k", "squant-c"] = "squant"
    weight_range: Literal["preset", "minmax"] = "preset"
    bn_k: float = 4.0

    def __post_init__(self):
        super().__post_init__()
        check_range("bn_k", self.bn_k, 0.0, 64.0, lo_open=True)


@dataclass(frozen=True)
class DfqOptions(SquantOptions):
    """DFQ: equalize and bias_correct default to true; rounding nearest (or squant, with mode/weight_range)."""

    equalize: bool = True
    bias_correct: bool = True
    rounding: Literal["nearest", "squant"] = "nearest"


def transform_kwargs(o: DfqTransformOptions) -> dict:
    return dict(equalize=o.equalize, bias_correct=o.bias_correct, iterations=o.iterations, relu6=o.relu6,
                absorb=o.absorb)


@register_method("squant", kind="calibration", needs_images=False, default_preset="genie",
                 summary="no images: SQuant's kernel/channel flipping rounding, activation ranges from BN statistics",
                 options=schema_options(SquantOptions, "squant"))
def squant(fp_model, qconfig, job: QuantJob) -> QuantResult:
    o = parse_options(SquantOptions, user_options(job.extra), "squant")
    require_bn(fp_model, "squant")
    return data_free_quantize(fp_model, qconfig, job, rounding="squant", mode=o.mode, weight_range=o.weight_range,
                              bn_k=o.bn_k, **transform_kwargs(o))


@register_method("dfq", kind="calibration", needs_images=False, default_preset="genie",
                 summary="no images: DFQ's cross-layer equalization, high-bias absorption and analytic bias "
                         "correction, activation ranges from BN statistics",
                 options=schema_options(DfqOptions, "dfq"))
def dfq(fp_model, qconfig, job: QuantJob) -> QuantResult:
    o = parse_options(DfqOptions, user_options(job.extra), "dfq")
    require_bn(fp_model, "dfq")
    return data_free_quantize(fp_model, qconfig, job, rounding=o.rounding, mode=o.mode, weight_range=o.weight_range,
                              bn_k=o.bn_k, **transform_kwargs(o))
