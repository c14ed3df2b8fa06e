"""`squant`: SQuant (Guo et al., ICLR 2022) -- no images, no back-propagation. Weights rounded by SQuant's
element/kernel/channel flips (``zsq.quant.squant``) on the preset's grid, activation ranges from BatchNorm
statistics as bn-minmax sets them. ``equalize``/``bias_correct`` put DFQ's float transform before it and
its analytic bias correction after it (``zsq.quant.equalize``)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Literal

from zsq.errors import ZsqError
from zsq.methods.registry import QuantJob, QuantResult, register_method, schema_options, user_options
from zsq.options import check_range, parse_options
from zsq.quant import calibrate_from_bn, quantize_model, quant_layers
from zsq.quant.calibration import bn_layers
from zsq.quant.squant import squant_layer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SquantOptions:
    """mode: squant (element + kernel + channel flips, the paper's), squant-e (round to nearest),
    squant-k, squant-c (one stage only). weight_range: preset (the preset's weight grid, e.g. Genie's
    Lp-searched one) or minmax (each channel's min/max, the paper's). bn_k: activation ranges as bn-minmax's.
    equalize: DFQ's cross-layer equalization + high-bias absorption first. bias_correct: DFQ's analytic
    bias correction after rounding."""

    mode: Literal["squant", "squant-e", "squant-k", "squant-c"] = "squant"
    weight_range: Literal["preset", "minmax"] = "preset"
    bn_k: float = 4.0
    equalize: bool = False
    bias_correct: bool = False

    def __post_init__(self):
        check_range("bn_k", self.bn_k, 0.0, 64.0, lo_open=True)


def require_bn(fp_model, method: str) -> None:
    """ZsqError before any work when the model has no BatchNorm statistics to take ranges from."""
    if not bn_layers(fp_model):
        raise ZsqError(f"{method} needs BatchNorm layers: this model has none, so there are no statistics to "
                       "derive activation ranges from (use a method that calibrates on images)")


@register_method("squant", kind="calibration", needs_images=False, default_preset="genie",
                 summary="no images: SQuant's kernel/channel flipping rounding, activation ranges from BN statistics",
                 options=schema_options(SquantOptions, "squant"))
def squant(fp_model, qconfig, job: QuantJob) -> QuantResult:
    opts = parse_options(SquantOptions, user_options(job.extra), "squant")
    require_bn(fp_model, "squant")
    t0 = time.time()
    from zsq.quant.equalize import prepare_data_free, correct_bias

    prep = prepare_data_free(fp_model, equalize=opts.equalize, fold=opts.equalize or opts.bias_correct)
    qmodel = quantize_model(prep.model, qconfig)
    layers = {}
    for name, layer in quant_layers(qmodel):
        if layer.weight_quant is None:
            continue
        st = squant_layer(layer, opts.mode, minmax_range=opts.weight_range == "minmax")
        layers[name] = {"kernel_flips": st.kernel_flips, "channel_flips": st.channel_flips,
                        "objective_nearest": round(st.objective_nearest, 4),
                        "objective_squant": round(st.objective_squant, 4)}
    t_round = time.time() - t0
    calibrate_from_bn(qmodel, k=opts.bn_k, seed=job.seed)
    report = {"mode": opts.mode, "weight_range": opts.weight_range, "bn_k": opts.bn_k, "squant_layers": layers,
              "squant_seconds": round(t_round, 3)}
    report.update(prep.report())
    if opts.bias_correct:
        report["bias_correction"] = correct_bias(qmodel, prep)
    report["quant_seconds"] = time.time() - t0
    return QuantResult(qmodel, report)
