"""The whole job in one call: load a model, get calibration images (synthesized or real),
run a method, save the quantized model, and report FP32 vs quantized accuracy."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from zsq import distributed as zdist
from zsq.errors import ZsqError

logger = logging.getLogger(__name__)


def _is_synthetic_set(path: Path) -> bool:
    from zsq.synth.dataset import META

    return path.is_dir() and (path / META).exists()


def load_calibration(spec: str, model, num_images: Optional[int] = None):
    """Calibration images from a saved SyntheticSet dir or from real labelled images.

    Returns (images N,C,H,W in the model's normalized space, labels or None, source string)."""
    from zsq.models.meta import get_meta

    meta = get_meta(model)
    p = Path(spec.split("[", 1)[0])
    if _is_synthetic_set(p):
        from zsq.synth import SyntheticSet

        ss = SyntheticSet.load(p)
        x = ss.images if num_images is None else ss.images[:num_images]
        y = None if ss.labels is None else ss.labels[:x.shape[0]]
        if tuple(x.shape[1:]) != tuple(meta.input_size):
            raise ZsqError(f"calibration images in {p} are {tuple(x.shape[1:])} but {meta.name} expects "
                           f"{tuple(meta.input_size)}")
        return x, y, f"synthetic:{ss.meta.get('method', '?')}:{p}"
    from zsq.data import load_images_tensor

    x, y = load_images_tensor(spec, meta, n=num_images)
    return x, y, f"real:{spec}"


def default_num_images(kind: str, budget: str, input_size=None) -> int:
    """How many images to synthesize when the user does not say: the PTQ budget's own number
    (the paper's 1024; quick: 256 at 32², 64 at 224²), else 256 (the fixed-set size used by the QAT benchmarks)."""
    if kind == "ptq":
        from zsq.ptq.budgets import get_budget

        return get_budget(budget, input_size).num_images
    return 256


def run_names(synthesizes: bool) -> tuple:
    """The entries `zsq quantize` writes in --out: the checkpoint, the work state and (when it
    synthesizes) the synthetic set."""
    from zsq.export.packed_checkpoint import CHECKPOINT_FILES, MANIFEST_FILE

    return CHECKPOINT_FILES + (MANIFEST_FILE, "work") + (("synth",) if synthesizes else ())


def resolve_model(model, weights: Optional[str] = None, pretrained: bool = False, random_init: bool = False,
                  meta=None, input_size=None, mean=None, std=None, seed: int = 0):
    """(float model, name for reports) from a model name or a user's nn.Module.

    A module is copied (the caller's object is never touched); it needs metadata: its own
    ``zsq_meta``, ``meta=ModelMeta(...)``, or ``input_size=``, ``mean=`` and ``std=``."""
    import copy

    import torch.nn as nn

    from zsq.models.meta import ModelMeta, set_meta

    if isinstance(model, str):
        from zsq.models import load_checked

        with torch.random.fork_rng(devices=[]):  # a random init from the run's seed; the caller's RNG is kept
            torch.manual_seed(seed)
            return load_checked(model, weights=weights, pretrained=pretrained, random_init=random_init), model
    if not isinstance(model, nn.Module):
        raise ZsqError(f"model must be a model name or a torch.nn.Module, got {type(model).__name__}")
    if weights is not None or pretrained:
        raise ZsqError("weights=/pretrained= apply to model names; load the state dict into your module first")
    name = type(model).__name__
    fp_model = copy.deepcopy(model).eval()
    if meta is None and getattr(model, "zsq_meta", None) is None:
        for arg, value in (("input_size", input_size), ("mean", mean), ("std", std)):
            if value is None:
                raise ZsqError(f"an nn.Module without zsq metadata needs meta=ModelMeta(...) or {arg}= "
                               f"(input_size=(C, H, W), mean=(...), std=(...))")
        with torch.no_grad():
            out = fp_model(torch.zeros(1, *tuple(input_size)))
        meta = ModelMeta(name, int(out.shape[-1]), tuple(input_size), tuple(mean), tuple(std))
    if meta is not None:
        if not isinstance(meta, ModelMeta):
            raise ZsqError(f"meta must be a zsq.models.ModelMeta, got {type(meta).__name__}")
        set_meta(fp_model, meta)
    return fp_model, f"module:{name}"


def _plan_images(info, method: str, synth: Optional[str], calib_data: Optional[str], num_images: Optional[int],
                 budget: str, input_size=None, options: Optional[Dict[str, Any]] = None):
    """(synthesizes?, synthesizer, number of images), every name checked before any work."""
    if calib_data is not None and synth is not None:
        raise ZsqError("give either --synth or --calib-data, not both")
    if info.kind == "calibration" and not info.needs_images and (calib_data or synth):
        raise ZsqError(f"method {method} uses no images; drop --synth/--calib-data or pick another method")
    wanted = info.run_synth(options or {}, budget)  # the synthesizer this run needs images from, if any
    synthesizes = calib_data is None and (wanted is not None or info.needs_images or synth is not None)
    if synthesizes:
        synth = synth or wanted or info.default_synth
        if synth is None:
            raise ZsqError(f"method {method} needs images: give --synth METHOD (e.g. genie) or --calib-data PATH")
        from zsq.synth import get_synthesizer

        get_synthesizer(synth)  # an unknown name fails here, before the run folder is touched
        if num_images is None:
            num_images = default_num_images(info.kind, budget, input_size)
    return synthesizes, synth, num_images


def _synthesize(job, fp_model, synth: str, num_images: int) -> float:
    """Synthesize the calibration images into ``job``; seconds taken."""
    from zsq.synth import synthesize

    t0 = time.time()
    logger.info(f"synthesizing calibration images with {synth} ({job.budget} budget)")
    sset = synthesize(fp_model, synth, num_images, budget=job.budget, seed=job.seed,
                      out=(job.out / "synth") if job.out else None, resume=job.resume,
                      compute=job.compute)
    job.calib, job.calib_source, job.synth_method = sset.images, f"synthetic:{synth}", synth
    if sset.labels is not None:
        job.extra.setdefault("calib_labels", sset.labels)
    return time.time() - t0


def _begin_run_folder(out, synthesizes: bool, fp_model, *, resume: bool, force: bool, calib_data: Optional[str],
                      **run):
    """The run folder, begun with this run's fingerprint (``run``: what defines the run)."""
    from zsq.runstate import RunFolder, fingerprint
    from zsq.synth.base import weights_digest

    run_folder = RunFolder(out, run_names(synthesizes))
    run_folder.begin(fingerprint(model=run.pop("model"), weights=weights_digest(fp_model), **run,
                                 calib_data=calib_data),
                     resume=resume, force=force, inputs=[calib_data.split("[", 1)[0]] if calib_data else [])
    return run_folder


def _save(report: Dict[str, Any], qmodel, job, model_name: str, weights: Optional[str]) -> None:
    """The packed checkpoint in ``job.out``; its sizes go into the report."""
    from zsq.export import save_quantized

    saved = save_quantized(qmodel, job.out, model_name=model_name, weights_path=weights,
                           info={k: v for k, v in report.items()}, force=True)
    report["out"] = str(job.out)
    report.update({k: saved[k] for k in ("packed_bytes", "fp32_bytes") if k in saved})


def _base_report(model_name: str, method: str, qconfig, preset: str, job, opts, compute) -> Dict[str, Any]:
    return {"model": model_name, "method": method, "bits": qconfig.bits, "preset": preset,
            "preset_version": qconfig.version, "calib_source": job.calib_source,
            "num_images": None if job.calib is None else int(job.calib.shape[0]), "options": opts,
            "compute": compute.describe(), "processes": zdist.world()}


def _add_accuracy(report: Dict[str, Any], qmodel, eval_set, fp_top1: float) -> None:
    from zsq.evaluation import evaluate

    q_res = evaluate(qmodel, eval_set)
    report.update({"fp32_top1": fp_top1, "quant_top1": q_res["top1"], "quant_top5": q_res["top5"], "n": q_res["n"]})


def _check_strict(fp_model, strict: bool) -> None:
    """``strict``: refuse before any work what quantize_model would keep in float."""
    from zsq.quant.transforms import example_input_for, kept_float_layers, refuse_float_layers

    if strict:
        refuse_float_layers(kept_float_layers(fp_model, example_input_for(fp_model)))


def _add_method_report(report: Dict[str, Any], result) -> None:
    """The method's own report (QAT: final/best top-1, epochs; PTQ: unit losses, units ...) and what graph
    capture did (capture mode, eager fallbacks, layers kept in float)."""
    report.update({k: v for k, v in result.report.items() if k not in report})
    plan = getattr(result.model, "zsq_quant_plan", {}) or {}
    report.setdefault("capture", plan.get("capture"))
    if plan.get("eager_fallback"):
        report["eager_fallback"] = [f["module"] for f in plan["eager_fallback"]]
    if plan.get("kept_float"):
        report["kept_float"] = [f["layer"] for f in plan["kept_float"]]


def quantize(model, *, weights: Optional[str] = None, pretrained: bool = False, random_init: bool = False,
             method: str = "bn-minmax", bits: str = "w4a4",
             preset: Optional[str] = None, synth: Optional[str] = None, calib_data: Optional[str] = None,
             num_images: Optional[int] = None, budget: str = "quick", iters: Optional[int] = None,
             epochs: Optional[int] = None, iters_per_epoch: Optional[int] = None,
             batch_size: Optional[int] = None, seed: int = 0, out: Optional[Path] = None,
             resume: bool = False, force: bool = False, eval_data: Optional[str] = None,
             options: Optional[Dict[str, Any]] = None, device: str = "cpu",
             precision: str = "fp32", channels_last: Optional[bool] = None, compile: bool = False,
             meta=None, input_size=None, mean=None, std=None, strict: bool = False):
    """`zsq quantize` as a function, on a model name or your own nn.Module (with ``meta=`` or
    ``input_size=``/``mean=``/``std=`` when it has no zsq metadata). Returns a QuantResult:
    ``.model`` the quantized model, ``.report`` the JSON report (see README for the keys).
    ``strict``: refuse layers zsq would keep in float (Conv3d, ConvTranspose2d, LSTM, functional
    F.conv2d/F.linear calls).

    device / precision / channels_last / compile: where and how synthesis and reconstruction/QAT compute
    (zsq.compute.resolve); the default cpu + fp32 eager is bit-reproducible. Without ``weights`` or
    ``pretrained`` the model is refused unless ``random_init=True``."""
    from zsq.compute import resolve
    from zsq.data import load_dataset
    from zsq.evaluation import evaluate
    from zsq.methods import QuantJob, QuantResult, get_method
    from zsq.models.meta import get_meta
    from zsq.quant import get_preset, parse_bits

    t_start = time.time()
    compute = resolve(device, precision, channels_last, compile)  # a missing GPU is refused before any work
    lead = zdist.rank() == 0  # under torchrun: every process computes, only rank 0 evaluates and writes
    parse_bits(bits)
    info = get_method(method)
    preset = preset or info.default_preset
    qconfig = get_preset(preset, bits)
    fp_model, model_name = resolve_model(model, weights, pretrained, random_init, meta, input_size, mean, std, seed)
    _check_strict(fp_model, strict)
    meta = get_meta(fp_model)
    eval_set = load_dataset(eval_data, meta) if eval_data is not None else None  # paths before long work
    job = QuantJob(budget=budget, num_images=num_images, iters=iters, epochs=epochs,
                   iters_per_epoch=iters_per_epoch, batch_size=batch_size, seed=seed,
                   out=Path(out) if out else None, resume=resume, compute=compute)
    opts = info.parse_options(options, meta, budget)  # bad --set keys/values: before any work
    job.extra.update(opts)

    synthesizes, synth, num_images = _plan_images(info, method, synth, calib_data, num_images, budget, meta.input_size,
                                                  opts)
    if calib_data is not None:
        job.calib, labels, job.calib_source = load_calibration(calib_data, fp_model, num_images)
        if labels is not None and job.calib_source.startswith("synthetic"):
            job.extra.setdefault("calib_labels", labels)
    run_folder = None
    zdist.barrier()  # every process has checked --out before rank 0 touches it
    if out is not None and lead:  # only once the arguments have been checked: --force may clear an earlier run
        run_folder = _begin_run_folder(out, synthesizes, fp_model, resume=resume, force=force, calib_data=calib_data,
                                       model=model_name, method=method, bits=qconfig.bits, preset=preset, synth=synth,
                                       num_images=num_images, budget=budget, iters=iters, epochs=epochs,
                                       iters_per_epoch=iters_per_epoch, batch_size=batch_size, seed=seed, options=opts)
    zdist.barrier()
    synth_seconds = _synthesize(job, fp_model, synth, num_images) if synthesizes else 0.0

    fp_top1 = None
    if eval_data is not None and lead:
        job.eval_fn = lambda m: evaluate(m, eval_set, device=next(m.parameters()).device)
        fp_top1 = evaluate(fp_model, eval_set)["top1"]

    t0 = time.time()
    logger.info(f"quantizing with {method} ({qconfig.describe()})")
    result = info.fn(fp_model, qconfig, job)
    quant_seconds = time.time() - t0

    report = _base_report(model_name, method, qconfig, preset, job, opts, compute)
    if job.out is not None and lead:
        _save(report, result.model, job, model_name, weights)
        run_folder.finish()
    zdist.barrier()
    if eval_data is not None and lead:
        _add_accuracy(report, result.model, eval_set, fp_top1)
    report.update({"synth_seconds": round(synth_seconds, 2), "quant_seconds": round(quant_seconds, 2),
                   "seconds": round(time.time() - t_start, 2)})
    _add_method_report(report, result)
    return QuantResult(model=result.model, report=report)
