"""Registers the distillation QAT methods: gdfq, ait, hast, hast-paper (one loop, zsq.qat.loop).

Job mapping: job.budget picks the `paper` or `quick` config; job.epochs / iters_per_epoch /
batch_size and job.extra (any QATConfig field, ``gi_*`` / ``hast_*`` for the sub-configs) override
it. job.calib (a tensor or a SyntheticSet) is the fixed training set: required by hast, optional
for ait (then AIT trains on it, e.g. Genie-D images, instead of a generator). Checkpoints go to
job.out/work; job.resume continues them.
"""
from __future__ import annotations

import dataclasses
import logging
import time

import torch

from zsq.errors import ZsqError
from zsq.methods.registry import QuantJob, QuantResult, register_method, user_options
from zsq.models.meta import get_meta
from zsq.qat.training_config import method_config, paper_config
from zsq.qat.loop import distill

logger = logging.getLogger(__name__)

# The papers train the student with BatchNorm in place, which renormalises every conv output. On a preset
# that folds BN into the weights (deploy, brecq, qdrop) nothing does, and the papers' lr diverges: ResNet-20
# W8A8 on deploy, quick budget (benchmarks/results/deploy.md): HAST 10.23 % at its 1e-5 vs 91.25 % at 1e-6,
# GDFQ 85.74 % at 1e-4 vs 90.95 % at 1e-5. So there the default lr is this fraction of the paper's.
FOLDED_BN_LR_SCALE = 0.1


def _fixed_set(job: QuantJob):
    """(images, labels or None) from job.calib (tensor or SyntheticSet-like) and job.extra."""
    calib = job.calib
    if calib is None:
        return None, None
    labels = job.extra.get("calib_labels")
    if hasattr(calib, "images"):
        labels = labels if labels is not None else getattr(calib, "labels", None)
        calib = calib.images
    if not torch.is_tensor(calib) or calib.dim() != 4:
        raise ZsqError("QAT training images must be a float tensor (N, C, H, W)")
    if not bool(torch.isfinite(calib).all()):
        raise ZsqError("QAT training images contain NaN or inf")
    return calib, labels


def _run(name: str, fp_model, qconfig, job: QuantJob) -> QuantResult:
    t0 = time.time()
    meta = get_meta(fp_model)
    cfg = method_config(name, meta, job.budget)
    if job.epochs is not None and job.epochs != cfg.epochs:
        # a new epoch count moves the lr/rho milestones in proportion (from the published schedule)
        warm = min(cfg.warmup_epochs, job.epochs - 1)
        cfg = dataclasses.replace(paper_config(name, meta).rescaled(
            epochs=job.epochs, iters_per_epoch=cfg.iters_per_epoch, batch_size=cfg.batch_size,
            warmup_epochs=warm, live_range_epochs=min(cfg.live_range_epochs, job.epochs)),
            ema_bias_correction=cfg.ema_bias_correction)
    images, labels = _fixed_set(job)
    extra = user_options(job.extra)
    if qconfig.fold_bn and "lr" not in extra:
        logger.info(f"{name}: preset {qconfig.preset!r} folds BatchNorm into the weights, so the student trains at "
                    f"{FOLDED_BN_LR_SCALE} x the paper's lr ({cfg.lr:g} -> {cfg.lr * FOLDED_BN_LR_SCALE:g}; --set lr=... overrides)")
        cfg = dataclasses.replace(cfg, lr=cfg.lr * FOLDED_BN_LR_SCALE)
    if name == "ait" and images is not None:
        extra.setdefault("data", "fixed")
        extra.setdefault("calib_data", "fixed")
    cfg = cfg.with_options(epochs=job.epochs, iters_per_epoch=job.iters_per_epoch, batch_size=job.batch_size,
                           **extra)
    if cfg.data == "generator" and cfg.calib_data == "generator":
        images = labels = None  # a generator run: given images are not used
    model, report = distill(fp_model, qconfig, cfg, fixed=images, fixed_labels=labels, seed=job.seed,
                            out=job.out, resume=job.resume, eval_fn=job.eval_fn,
                            compute=job.compute)
    report["data"] = "generator" if images is None else job.calib_source
    report["quant_seconds"] = time.time() - t0
    return QuantResult(model, report)


def _options(name: str):
    """The QAT schema: QATConfig's fields (and gi_*/hast_* for the sub-configs), types and ranges checked."""
    def parse(values, meta, budget):
        method_config(name, meta, budget).with_options(**values)  # ZsqError on a bad key or value
        return dict(values)

    return parse


@register_method("gdfq", kind="qat", needs_images=False, default_preset="gdfq",
                 summary="GDFQ: generator (CE + 0.1*BNS) trained alongside; student CE + KL(T=20) distillation",
                 options=_options("gdfq"))
def gdfq(fp_model, qconfig, job: QuantJob) -> QuantResult:
    return _run("gdfq", fp_model, qconfig, job)


@register_method("ait", kind="qat", needs_images=False, default_preset="gdfq",
                 summary="AIT: KL-only distillation + gradient inundation (generator, or a fixed set via "
                         "--synth/--calib-data)", options=_options("ait"))
def ait(fp_model, qconfig, job: QuantJob) -> QuantResult:
    return _run("ait", fp_model, qconfig, job)


@register_method("hast", kind="qat", needs_images=True, default_preset="gdfq", default_synth="hast",
                 summary="HAST (official code): hard samples, KD + feature alignment on clean + "
                         "sign-gradient-perturbed copies", options=_options("hast"))
def hast(fp_model, qconfig, job: QuantJob) -> QuantResult:
    return _run("hast", fp_model, qconfig, job)


@register_method("hast-paper", kind="qat", needs_images=True, default_preset="gdfq", default_synth="hast",
                 summary="HAST as the paper states it: perturbation raises the student's difficulty, "
                         "loss on perturbed samples only", options=_options("hast-paper"))
def hast_paper(fp_model, qconfig, job: QuantJob) -> QuantResult:
    return _run("hast-paper", fp_model, qconfig, job)
