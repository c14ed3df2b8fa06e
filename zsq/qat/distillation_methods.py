"""Registers the distillation QAT methods: gdfq, ait, hast, hast-paper, synq (one loop, zsq.qat.loop).

Job mapping: job.budget picks the `paper` or `quick` config; job.epochs / iters_per_epoch /
batch_size and job.extra (any QATConfig field, ``gi_*`` / ``hast_*`` for the sub-configs) override
it; ``synq=true`` adds SynQ's parts to gdfq/ait/hast (then ``synq_*`` options). job.calib (a tensor or a SyntheticSet) is the fixed training set: required by hast, optional
for ait (then AIT trains on it, e.g. Genie-D images, instead of a generator). Checkpoints go to
job.out/work; job.resume continues them.
"""
from __future__ import annotations

import dataclasses
import logging
import time

import torch

from zsq.errors import ZsqError
from zsq.methods.registry import QuantJob, QuantResult, get_method, register_method, user_options
from zsq.models.meta import get_meta
from zsq.qat.training_config import STANDARD_WARM_START, method_config, paper_config
from zsq.qat.loop import distill
from zsq.quant.qconfig import fixed_grids

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


def refuse_warm_start_on_paper(name: str, budget: str, warm_start: str) -> None:
    """--budget paper is the published recipe; a warm start departs from it (checked with the options,
    before any image is made, and again by the method for direct calls)."""
    if budget == "paper" and warm_start != "none":
        raise ZsqError(f"--budget paper is {name}'s published recipe, which starts from a calibrated student; "
                       f"warm_start={warm_start} departs from it: use --budget quick or standard for a warm start")


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
            ema_bias_correction=cfg.ema_bias_correction, warm_start=cfg.warm_start)
    images, labels = _fixed_set(job)
    extra = user_options(job.extra)
    if "synq" in extra:
        cfg = cfg.with_synq(extra.pop("synq"), meta)
    if qconfig.fold_bn and "lr" not in extra:
        logger.info(f"{name}: preset {qconfig.preset!r} folds BatchNorm into the weights, so the student trains at "
                    f"{FOLDED_BN_LR_SCALE} x the paper's lr ({cfg.lr:g} -> {cfg.lr * FOLDED_BN_LR_SCALE:g}; --set lr=... overrides)")
        cfg = dataclasses.replace(cfg, lr=cfg.lr * FOLDED_BN_LR_SCALE)
    if name == "ait" and images is not None:
        extra.setdefault("data", "fixed")
        extra.setdefault("calib_data", "fixed")
    cfg = cfg.with_options(epochs=job.epochs, iters_per_epoch=job.iters_per_epoch, batch_size=job.batch_size,
                           **extra)
    refuse_warm_start_on_paper(name, job.budget, cfg.warm_start)
    start = warm = None
    if cfg.warm_start != "none":
        qconfig, cfg, start, warm = _warm_start(fp_model, qconfig, cfg, images, job)
    if cfg.data == "generator" and cfg.calib_data == "generator":
        images = labels = None  # a generator run: given images are not used
    model, report = distill(fp_model, qconfig, cfg, fixed=images, fixed_labels=labels, seed=job.seed,
                            out=job.out, resume=job.resume, eval_fn=job.eval_fn,
                            compute=job.compute, start=start)
    if warm is not None:
        report["warm_start"] = warm
        report["preset"] = qconfig.describe()
    report["data"] = "generator" if images is None else job.calib_source
    report["quant_seconds"] = time.time() - t0
    return QuantResult(model, report)


def _warm_start(fp_model, qconfig, cfg, images, job: QuantJob):
    """Reconstruct the student first (cfg.warm_start, e.g. Genie-M) on the training images, on the preset's
    fixed-grid form: (qconfig, cfg, student, report). The loop then trains that student with no calibration
    epochs: its activation steps are the reconstruction's, and a min/max or EMA pass would throw them away."""
    if images is None:
        raise ZsqError(f"warm_start={cfg.warm_start} reconstructs the student on images first: give --synth genie "
                       "(or --calib-data)")
    if qconfig.weight.dynamic:
        qconfig = fixed_grids(qconfig, f"{qconfig.preset}-fixed")
        logger.info(f"{cfg.method}: warm start on {qconfig.describe()} (the preset's layers and bits on fixed grids: "
                    "weight steps set once instead of min/max every step, LSQ activation steps)")
    ptq_job = QuantJob(calib=images, calib_source=job.calib_source, budget=job.budget, iters=cfg.warm_iters,
                       seed=job.seed, out=job.out, resume=job.resume, compute=job.compute)
    t0 = time.time()
    result = get_method(cfg.warm_start).fn(fp_model, qconfig, ptq_job)
    warm = {"method": cfg.warm_start, "seconds": time.time() - t0, "preset": qconfig.describe(),
            "units": result.report.get("units"), "iters": result.report.get("iters")}
    if job.eval_fn is not None:
        warm["top1"] = float(job.eval_fn(result.model)["top1"])
    if cfg.warmup_epochs or cfg.live_range_epochs:
        logger.info(f"{cfg.method}: warm start keeps the reconstructed activation steps: no calibration epochs "
                    f"(warmup_epochs {cfg.warmup_epochs} -> 0, live_range_epochs {cfg.live_range_epochs} -> 0)")
    shift = cfg.warmup_epochs  # the schedule's milestones count from the first student epoch
    cfg = dataclasses.replace(cfg, warmup_epochs=0, live_range_epochs=0,
                              milestones=tuple(max(1, m - shift) for m in cfg.milestones))
    if cfg.gi is not None:
        cfg = dataclasses.replace(cfg, gi=dataclasses.replace(
            cfg.gi, rho_milestones=tuple(max(1, m - shift) for m in cfg.gi.rho_milestones)))
    return qconfig, cfg, result.model, warm


def _warm_start_images(options: dict, budget: str):
    """A warm start (asked, or the standard budget's) reconstructs on images: Genie-D's unless given."""
    warm = options.get("warm_start")
    if warm is None and budget == "standard":
        warm = STANDARD_WARM_START
    return "genie" if warm not in (None, "none") else None


def _options(name: str):
    """The QAT schema: QATConfig's fields (and gi_*/hast_* for the sub-configs), types and ranges checked."""
    def parse(values, meta, budget):
        values = dict(values)
        cfg = method_config(name, meta, budget)
        if "synq" in values:
            cfg = cfg.with_synq(values["synq"], meta)
        cfg = cfg.with_options(**{k: v for k, v in values.items() if k != "synq"})  # ZsqError on a bad key or value
        refuse_warm_start_on_paper(name, budget, cfg.warm_start)
        return dict(values)

    return parse


@register_method("gdfq", kind="qat", needs_images=False, default_preset="gdfq",
                 summary="GDFQ: generator (CE + 0.1*BNS) trained alongside; student CE + KL(T=20) distillation",
                 options=_options("gdfq"), images_for=_warm_start_images)
def gdfq(fp_model, qconfig, job: QuantJob) -> QuantResult:
    return _run("gdfq", fp_model, qconfig, job)


@register_method("ait", kind="qat", needs_images=False, default_preset="gdfq",
                 summary="AIT: KL-only distillation + gradient inundation (generator, or a fixed set via "
                         "--synth/--calib-data)", options=_options("ait"), images_for=_warm_start_images)
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


@register_method("synq", kind="qat", needs_images=True, default_preset="gdfq", default_synth="synq",
                 summary="SynQ: HAST's step + low-pass filtered images, Grad-CAM alignment, CE on easy samples only",
                 options=_options("synq"))
def synq(fp_model, qconfig, job: QuantJob) -> QuantResult:
    return _run("synq", fp_model, qconfig, job)
