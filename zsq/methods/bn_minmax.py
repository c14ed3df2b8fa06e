"""`bn-minmax`: the data-free baseline. Weights from their own ranges (the preset's weight
initialisation), activation ranges from BatchNorm statistics -- no images at all."""
from __future__ import annotations

import time

from zsq.methods.registry import QuantJob, QuantResult, register_method
from zsq.quant import calibrate_from_bn, quantize_model


@register_method("bn-minmax", kind="calibration", needs_images=False, default_preset="genie",
                 summary="no images: weight ranges from the weights, activation ranges from BN statistics")
def bn_minmax(fp_model, qconfig, job: QuantJob) -> QuantResult:
    t0 = time.time()
    k = float(job.extra.get("bn_k", 4.0))
    qmodel = quantize_model(fp_model, qconfig)
    calibrate_from_bn(qmodel, k=k, seed=job.seed)
    return QuantResult(qmodel, {"bn_k": k, "quant_seconds": time.time() - t0})


@register_method("minmax", kind="calibration", needs_images=True, default_preset="genie",
                 summary="plain calibration: activation ranges by the preset's observer on the given images")
def minmax(fp_model, qconfig, job: QuantJob) -> QuantResult:
    from zsq.quant import calibrate

    t0 = time.time()
    qmodel = quantize_model(fp_model, qconfig)
    calibrate(qmodel, job.calib, batch_size=job.batch_size or 64, quiet=job.quiet)
    return QuantResult(qmodel, {"quant_seconds": time.time() - t0})
