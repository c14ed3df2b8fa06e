"""`bn-minmax`: the data-free baseline. Weights from their own ranges (the preset's weight
initialisation), activation ranges from BatchNorm statistics -- no images at all."""
from __future__ import annotations

import time
from dataclasses import dataclass

from zsq.errors import ZsqError
from zsq.methods.data_free import DfqTransformOptions, data_free_quantize, require_bn, transform_kwargs
from zsq.methods.registry import QuantJob, QuantResult, register_method, schema_options, user_options
from zsq.options import check_range, parse_options
from zsq.quant import calibrate_from_bn, quantize_model


@dataclass(frozen=True)
class BnMinmaxOptions(DfqTransformOptions):
    """bn_k: activation range = mean +- bn_k std of the BN-simulated activations (clipped to what they reach).
    The inherited equalize / bias_correct / iterations / relu6 / absorb put DFQ's float transform first and
    its analytic bias correction after (off by default, so bn-minmax stays the plain baseline)."""

    bn_k: float = 4.0

    def __post_init__(self):
        super().__post_init__()
        check_range("bn_k", self.bn_k, 0.0, 64.0, lo_open=True)


@register_method("bn-minmax", kind="calibration", needs_images=False, default_preset="genie",
                 summary="no images: weight ranges from the weights, activation ranges from BN statistics",
                 options=schema_options(BnMinmaxOptions, "bn-minmax"))
def bn_minmax(fp_model, qconfig, job: QuantJob) -> QuantResult:
    t0 = time.time()
    o = parse_options(BnMinmaxOptions, user_options(job.extra), "bn-minmax")
    k = o.bn_k
    if o.equalize or o.bias_correct:
        require_bn(fp_model, "bn-minmax")
        return data_free_quantize(fp_model, qconfig, job, bn_k=k, **transform_kwargs(o))
    qmodel = quantize_model(fp_model, qconfig)
    calibrate_from_bn(qmodel, k=k, seed=job.seed)
    return QuantResult(qmodel, {"bn_k": k, "quant_seconds": time.time() - t0})


@register_method("minmax", kind="calibration", needs_images=True, default_preset="genie",
                 summary="plain calibration: activation ranges by the preset's observer on the given images")
def minmax(fp_model, qconfig, job: QuantJob) -> QuantResult:
    from zsq.quant import calibrate

    t0 = time.time()
    if user_options(job.extra):
        raise ZsqError(f"method minmax takes no options (got {', '.join(sorted(user_options(job.extra)))})")
    qmodel = quantize_model(fp_model, qconfig)
    calibrate(qmodel, job.calib, batch_size=job.batch_size or 64, seed=job.seed)
    return QuantResult(qmodel, {"quant_seconds": time.time() - t0})
