"""One quantization run as a value, and the one pipeline that carries it out.

Every front door builds a :class:`Run` and calls :func:`execute`: ``zsq.quantize`` (zsq/api.py), the CLI's
``zsq quantize``, the cells of ``zsq bench`` and the scripts in ``benchmarks/``. A ``Run`` is frozen and
typed: the model source, the method (name + ``--set`` options), the quantization config (preset, bits),
the calibration source, the evaluation data, the output policy, the compute, the budget, the seed and
``strict``. ``execute`` is the list of named steps in :data:`STEPS`; each reads the run and fills a
:class:`_Context`, so what happens in which order is read in one place.

The report ``execute`` returns (and writes as the checkpoint's ``info``) has the keys of
:data:`REPORT_KEYS`; the method's own report is kept whole, unmerged, under ``method_report``
(docs/ARCHITECTURE.md points here).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from zsq import distributed as zdist
from zsq.budget_names import check_budget
from zsq.errors import InternalError, ZsqError
from zsq.options import check_run_flags, check_run_numbers
from zsq.methods.registry import QuantJob, QuantResult, get_method
from zsq.models.factory import USER_MODULE_PREFIX

logger = logging.getLogger(__name__)

# ---- the run ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSource:
    """The float model: a registered name (with ``weights``, ``pretrained`` or ``random_init``), a factory
    ``file.py:fn`` / ``package.module:fn`` (zsq.models.factory: ``input_size``/``mean``/``std``/``num_classes``
    where it carries no metadata) or a user's
    ``nn.Module`` (copied, never touched; it needs metadata: its own ``zsq_meta``, ``meta=ModelMeta(...)``,
    or ``input_size``, ``mean`` and ``std``)."""

    model: Any
    weights: Optional[str] = None
    pretrained: bool = False
    random_init: bool = False
    meta: Optional[Any] = None
    input_size: Optional[Tuple[int, ...]] = None
    mean: Optional[Tuple[float, ...]] = None
    std: Optional[Tuple[float, ...]] = None
    num_classes: Optional[int] = None  # a factory ("file.py:fn") whose output is not (N, classes)


@dataclass(frozen=True)
class MethodSpec:
    """A registered method and its ``--set`` options (checked by the method's schema before any work)."""

    name: str = "bn-minmax"
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.options, Mapping):
            raise ZsqError(f"options must be a dict of method options, got {type(self.options).__name__}")
        object.__setattr__(self, "options", dict(self.options))


@dataclass(frozen=True)
class QuantSpec:
    """Bit widths (``wXaY``) and the protocol preset (None: the method's own)."""

    bits: str = "w4a4"
    preset: Optional[str] = None


@dataclass(frozen=True)
class Calibration:
    """Where calibration images come from: at most one of ``synth`` (a synthesizer to run), ``data`` (a saved
    SyntheticSet dir or real labelled images) or ``images`` (a tensor already in the model's normalized space,
    with optional ``labels`` and a ``source`` for the report). None of them: the method's own default
    (its synthesizer when it needs images). ``num_images``: how many to synthesize or use."""

    synth: Optional[str] = None
    data: Optional[str] = None
    images: Optional[torch.Tensor] = None
    labels: Optional[torch.Tensor] = None
    source: str = "given"
    num_images: Optional[int] = None

    def __post_init__(self):
        if self.data is not None and self.synth is not None:
            raise ZsqError("give either --synth or --calib-data, not both")
        if self.images is not None and (self.data is not None or self.synth is not None):
            raise ZsqError("calibration images were given: drop synth/calib_data")
        if self.images is not None and not torch.is_tensor(self.images):
            raise ZsqError(f"calibration images must be a tensor, got {type(self.images).__name__}")
        if self.labels is not None and self.images is None:
            raise ZsqError("calibration labels need calibration images")
        check_run_numbers(num_images=self.num_images)


@dataclass(frozen=True)
class RunBudget:
    """A name of zsq.budget_names.BUDGET_NAMES; iters / epochs / iters_per_epoch / batch_size override the
    budget's own."""

    name: str = "quick"
    iters: Optional[int] = None
    epochs: Optional[int] = None
    iters_per_epoch: Optional[int] = None
    batch_size: Optional[int] = None

    def __post_init__(self):
        check_budget(self.name)
        check_run_numbers(iters=self.iters, epochs=self.epochs, iters_per_epoch=self.iters_per_epoch,
                          batch_size=self.batch_size)


@dataclass(frozen=True)
class Output:
    """Where the checkpoint goes (None: nothing is written) and what to do with an earlier run there."""

    out: Optional[Path] = None
    force: bool = False
    resume: bool = False

    def __post_init__(self):
        if self.out is not None:
            if not isinstance(self.out, (str, Path)):
                raise ZsqError(f"out must be a folder path, got {type(self.out).__name__}")
            object.__setattr__(self, "out", Path(self.out))
        check_run_flags(resume=self.resume, force=self.force)


@dataclass(frozen=True)
class ComputeConfig:
    """Where and how synthesis and reconstruction/QAT compute (zsq.compute.resolve); the default cpu + fp32
    eager is bit-reproducible."""

    device: str = "cpu"
    precision: str = "fp32"
    channels_last: Optional[bool] = None
    compile: bool = False

    def resolve(self):
        from zsq.compute import resolve

        return resolve(self.device, self.precision, self.channels_last, self.compile)


@dataclass(frozen=True)
class Run:
    """Everything that decides one quantization run; ``execute(run)`` carries it out."""

    model: ModelSource
    method: MethodSpec = field(default_factory=MethodSpec)
    quant: QuantSpec = field(default_factory=QuantSpec)
    calibration: Calibration = field(default_factory=Calibration)
    eval_data: Optional[str] = None
    output: Output = field(default_factory=Output)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    budget: RunBudget = field(default_factory=RunBudget)
    seed: int = 0
    strict: bool = False

    def __post_init__(self):
        for name, cls in (("model", ModelSource), ("method", MethodSpec), ("quant", QuantSpec),
                          ("calibration", Calibration), ("output", Output), ("compute", ComputeConfig),
                          ("budget", RunBudget)):
            if not isinstance(getattr(self, name), cls):
                raise ZsqError(f"Run.{name} must be a zsq.run.{cls.__name__}, got {type(getattr(self, name)).__name__}")
        check_run_numbers(seed=self.seed)

    def fingerprint(self, model_name: str, weights: str) -> Dict[str, Any]:
        """What decides the run's result, as the run folder records it (``--resume`` refuses another).

        Called on the run as ``execute`` resolved it (preset, synthesizer, number of images and options
        filled in); ``weights`` is the float model's digest (zsq.synth.base.weights_digest)."""
        from zsq.runstate import fingerprint

        c, b = self.calibration, self.budget
        extra = {} if c.images is None else {"calib_images": c.images}  # only when given, so older folders resume
        return fingerprint(model=model_name, weights=weights, method=self.method.name, bits=self.quant.bits,
                           preset=self.quant.preset, synth=c.synth, num_images=c.num_images, budget=b.name,
                           iters=b.iters, epochs=b.epochs, iters_per_epoch=b.iters_per_epoch,
                           batch_size=b.batch_size, seed=self.seed, options=self.method.options,
                           calib_data=c.data, **extra)


# ---- the report ------------------------------------------------------------------------------------
REPORT_KEYS: Dict[str, str] = {
    "model": "the model's name (``module:ClassName`` for a user's nn.Module)",
    "method": "the method's registered name",
    "bits": "wXaY as run",
    "preset": "the protocol preset's name",
    "preset_version": "the preset's version",
    "calib_source": "synthetic:<synth>, real:<path>, synthetic:<synth>:<dir>, a given source, or none",
    "num_images": "calibration images used (None without images)",
    "options": "the method's options after its schema (defaults filled in)",
    "compute": "zsq.compute.Compute.describe(): device, precision, layout, compile",
    "processes": "torchrun processes (1 without)",
    "capture": "how the graph was captured (fx, eager fallback in parts, ...)",
    "eager_fallback": "modules quantized eagerly (only when some were)",
    "kept_float": "layers kept in float (only when some were)",
    "fp32_top1": "FP32 top-1 on eval_data (only with eval_data)",
    "fp32_top5": "FP32 top-5 on eval_data (only with eval_data)",
    "quant_top1": "quantized top-1 on eval_data (only with eval_data)",
    "quant_top5": "quantized top-5 on eval_data (only with eval_data)",
    "n": "images in eval_data (only with eval_data)",
    "synth_seconds": "seconds spent synthesizing calibration images",
    "quant_seconds": "seconds the method took, as the pipeline timed it",
    "seconds": "seconds of the whole run up to writing the checkpoint",
    "method_report": "the method's own report, whole (PTQ: units, unit_losses, ...; QAT: epochs, final_top1, ...)",
    "out": "the output folder (only with out)",
    "packed_bytes": "the checkpoint's size (only with out; not in the checkpoint's info)",
    "fp32_bytes": "the float weights' size (only with out; not in the checkpoint's info)",
    "report": "OUT/report.md, the run in one page (zsq.run_report; only with out)",
}
FILE_KEYS = ("packed_bytes", "fp32_bytes", "report")  # known only once the checkpoint (and OUT/report.md) are written


# ---- helpers the steps (and the bench) use ---------------------------------------------------------
def _is_synthetic_set(path: Path) -> bool:
    from zsq.synth.dataset import META

    return path.is_dir() and (path / META).exists()


def load_calibration(spec: str, model, num_images: Optional[int] = None):
    """Calibration images from a saved SyntheticSet dir or from real labelled images.

    Returns (images N,C,H,W in the model's normalized space, labels or None, source string)."""
    from zsq.models.meta import get_meta

    from zsq.data.spec import parse_spec

    meta = get_meta(model)
    ds = parse_spec(spec)
    p = ds.path
    if _is_synthetic_set(p):
        from zsq.synth import SyntheticSet

        ss = SyntheticSet.load(p)  # the slice applies here as on real images
        x, y = ss.images[ds.start:ds.stop], None if ss.labels is None else ss.labels[ds.start:ds.stop]
        if x.shape[0] == 0:
            raise ZsqError(f"--calib-data {spec}: the slice selects no images (the set has {len(ss)})")
        if num_images is not None:
            x, y = x[:num_images], None if y is None else y[:num_images]
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


def run_names(synthesizes: bool, kind: str = "ptq") -> tuple:
    """The entries `zsq quantize` writes in --out: the checkpoint, the work state (PTQ and QAT resume files)
    and (when it synthesizes) the synthetic set."""
    from zsq.export.packed_checkpoint import CHECKPOINT_FILES, MANIFEST_FILE
    from zsq.run_report import REPORT_DIR, REPORT_FILE

    return CHECKPOINT_FILES + (MANIFEST_FILE, REPORT_FILE, REPORT_DIR) + run_dirs(synthesizes, kind)


def run_dirs(synthesizes: bool, kind: str) -> tuple:
    """The folders a run of this kind makes in --out (made and recorded when it begins, so a killed run
    leaves them zsq's)."""
    return (("work",) if kind in ("ptq", "qat") else ()) + (("synth",) if synthesizes else ())


def resolve_model(source: ModelSource, seed: int = 0):
    """(float model, name for reports) from a model name or a user's nn.Module (copied, never touched)."""
    import copy

    from zsq.models.meta import get_meta, set_meta
    from zsq.models.user_module import check_meta_agrees, meta_for_module

    model, meta = source.model, source.meta
    if isinstance(model, str):
        from zsq.models import load_checked
        from zsq.models.factory import canonical, is_factory_spec

        with torch.random.fork_rng(devices=[]):  # a random init from the run's seed; the caller's RNG is kept
            torch.manual_seed(seed)
            if is_factory_spec(model):  # a user's file.py:fn: its metadata from the source (zsq.models.factory)
                loaded = load_checked(model, weights=source.weights, pretrained=source.pretrained,
                                      random_init=source.random_init, input_size=source.input_size,
                                      mean=source.mean, std=source.std, num_classes=source.num_classes)
            else:
                loaded = load_checked(model, weights=source.weights, pretrained=source.pretrained,
                                      random_init=source.random_init)
        if is_factory_spec(model):
            return loaded, canonical(model)  # the name a checkpoint rebuilds from
        own = get_meta(loaded)  # explicit metadata never loses silently to the model's own
        if meta is not None and meta != own:
            raise ZsqError(f"meta= contradicts model {model!r}'s own metadata; drop meta= (it is for your own "
                           "nn.Module)")
        check_meta_agrees(own, source.input_size, source.mean, source.std)
        return loaded, model
    if not isinstance(model, nn.Module):
        raise ZsqError(f"model must be a model name or a torch.nn.Module, got {type(model).__name__}")
    if source.weights is not None or source.pretrained:
        raise ZsqError("weights=/pretrained= apply to model names; load the state dict into your module first")
    name = type(model).__name__
    fp_model = copy.deepcopy(model).eval()
    set_meta(fp_model, meta_for_module(fp_model, name, meta, source.input_size, source.mean, source.std))
    return fp_model, f"{USER_MODULE_PREFIX}{name}"


# ---- the steps -------------------------------------------------------------------------------------
@dataclass
class _Context:
    """What the steps hand on to each other (``run`` is replaced by its resolved form in ``validate``)."""

    run: Run
    t_start: float
    lead: bool = True
    compute: Any = None
    info: Any = None
    qconfig: Any = None
    fp_model: Optional[nn.Module] = None
    model_name: str = ""
    eval_set: Any = None
    synthesizes: bool = False
    job: Optional[QuantJob] = None
    run_folder: Any = None
    fp_top1: Optional[float] = None
    fp_top5: Optional[float] = None
    result: Optional[QuantResult] = None
    accuracy: Dict[str, Any] = field(default_factory=dict)
    synth_seconds: float = 0.0
    quant_seconds: float = 0.0
    report: Dict[str, Any] = field(default_factory=dict)


def _resolve_names(ctx: _Context) -> None:
    """Compute, bits, method and preset: names refused before the model is loaded (a missing GPU too)."""
    from zsq.quant import get_preset, parse_bits

    run = ctx.run
    ctx.compute = run.compute.resolve()
    ctx.lead = zdist.rank() == 0  # under torchrun: every process computes, only rank 0 evaluates and writes
    parse_bits(run.quant.bits)
    ctx.info = get_method(run.method.name)
    preset = run.quant.preset or ctx.info.default_preset
    ctx.qconfig = get_preset(preset, run.quant.bits)
    ctx.run = replace(run, quant=replace(run.quant, preset=preset))


def _load_model(ctx: _Context) -> None:
    ctx.fp_model, ctx.model_name = resolve_model(ctx.run.model, ctx.run.seed)


def _plan_images(info, method: str, cal: Calibration, budget: str, input_size,
                 options: Dict[str, Any]) -> Tuple[bool, Calibration]:
    """(synthesizes?, the calibration with its synthesizer and number of images), names checked before work."""
    given = cal.data is not None or cal.synth is not None or cal.images is not None
    if info.kind == "calibration" and not info.needs_images and given:
        raise ZsqError(f"method {method} uses no images; drop --synth/--calib-data or pick another method")
    wanted = info.run_synth(options, budget)  # the synthesizer this run needs images from, if any
    synthesizes = cal.data is None and cal.images is None and (wanted is not None or info.needs_images
                                                               or cal.synth is not None)
    if synthesizes:
        synth = cal.synth or wanted or info.default_synth
        if synth is None:
            raise ZsqError(f"method {method} needs images: give --synth METHOD (e.g. genie) or --calib-data PATH")
        from zsq.synth import get_synthesizer

        get_synthesizer(synth)  # an unknown name fails here, before the run folder is touched
        cal = replace(cal, synth=synth, num_images=cal.num_images or default_num_images(info.kind, budget,
                                                                                           input_size))
    return synthesizes, cal


def _validate(ctx: _Context) -> None:
    """Everything the user gave, checked before any long work: strict layers, eval data, options, images."""
    from zsq.data import load_dataset
    from zsq.evaluation import evaluate
    from zsq.models.meta import get_meta
    from zsq.quant.transforms import kept_float_layers, refuse_float_layers
    from zsq.quant.inventory import example_input_for

    run, info = ctx.run, ctx.info
    if run.strict:  # refuse what quantize_model would keep in float
        refuse_float_layers(kept_float_layers(ctx.fp_model, example_input_for(ctx.fp_model)))
    meta = get_meta(ctx.fp_model)
    if run.eval_data is not None:
        ctx.eval_set = load_dataset(run.eval_data, meta)  # paths before long work
    b = run.budget
    ctx.job = QuantJob(budget=b.name, num_images=run.calibration.num_images, iters=b.iters, epochs=b.epochs,
                       iters_per_epoch=b.iters_per_epoch, batch_size=b.batch_size, seed=run.seed,
                       out=run.output.out, resume=run.output.resume, compute=ctx.compute)
    opts = info.parse_options(run.method.options, meta, b.name)  # bad --set keys/values: before any work
    check_state_in_out(opts, run.output.out)
    ctx.job.extra.update(opts)
    info.check_before_work(ctx.fp_model, ctx.qconfig, ctx.job)  # e.g. GPTQ's reach: refused or replaced here
    ctx.synthesizes, cal = _plan_images(info, run.method.name, run.calibration, b.name, meta.input_size, opts)
    ctx.run = run = replace(run, method=replace(run.method, options=opts), calibration=cal)
    if cal.data is not None:
        ctx.job.calib, labels, ctx.job.calib_source = load_calibration(cal.data, ctx.fp_model, cal.num_images)
        if labels is not None and ctx.job.calib_source.startswith("synthetic"):
            ctx.job.extra.setdefault("calib_labels", labels)
    elif cal.images is not None:
        ctx.job.calib, ctx.job.calib_source = cal.images, cal.source
        if cal.labels is not None:
            ctx.job.extra["calib_labels"] = cal.labels
    if ctx.eval_set is not None and ctx.lead:
        ctx.job.eval_fn = lambda m: evaluate(m, ctx.eval_set, device=next(m.parameters()).device)


def _prepare_run_folder(ctx: _Context) -> None:
    """The run folder, begun with the run's fingerprint, once every argument has been checked
    (--force may clear an earlier run)."""
    from zsq.runlock import RunLock
    from zsq.runstate import RunFolder
    from zsq.synth.base import weights_digest

    run = ctx.run
    zdist.barrier()  # every process has checked --out before rank 0 touches it
    if run.output.out is not None and ctx.lead:
        kind = ctx.info.kind
        ctx.run_folder = RunFolder(run.output.out, run_names(ctx.synthesizes, kind),
                                   dirs=run_dirs(ctx.synthesizes, kind), lock=RunLock(run.output.out))
        weights = run.model.weights if isinstance(run.model.model, str) else None
        inputs = [str(p).split("[", 1)[0] for p in (run.calibration.data, weights, run.eval_data) if p]
        ctx.run_folder.begin(run.fingerprint(ctx.model_name, weights_digest(ctx.fp_model)),
                             resume=run.output.resume, force=run.output.force, inputs=inputs)
    zdist.barrier()


def _calibration_data(ctx: _Context) -> None:
    """Synthesize the calibration images when the run asks for it (loaded or given ones are in the job)."""
    from zsq.synth import synthesize

    if not ctx.synthesizes:
        return
    run, job = ctx.run, ctx.job
    synth, t0 = run.calibration.synth, time.time()
    logger.info(f"synthesizing calibration images with {synth} ({job.budget} budget)")
    sset = synthesize(ctx.fp_model, synth, run.calibration.num_images, budget=job.budget, seed=job.seed,
                      out=(job.out / "synth") if job.out else None, resume=job.resume, compute=job.compute)
    job.calib, job.calib_source, job.synth_method = sset.images, f"synthetic:{synth}", synth
    if sset.labels is not None:
        job.extra.setdefault("calib_labels", sset.labels)
    ctx.synth_seconds = time.time() - t0
    if ctx.run_folder is not None:
        ctx.run_folder.refresh()  # the synthetic set is recorded as zsq's before the long work


def _fp32_accuracy(ctx: _Context) -> None:
    from zsq.evaluation import evaluate

    if ctx.eval_set is not None and ctx.lead:
        fp = evaluate(ctx.fp_model, ctx.eval_set)
        ctx.fp_top1, ctx.fp_top5 = fp["top1"], fp["top5"]


def _quantize(ctx: _Context) -> None:
    t0 = time.time()
    logger.info(f"quantizing with {ctx.run.method.name} ({ctx.qconfig.describe()})")
    ctx.result = ctx.info.fn(ctx.fp_model, ctx.qconfig, ctx.job)
    ctx.quant_seconds = time.time() - t0


def _quant_accuracy(ctx: _Context) -> None:
    from zsq.evaluation import evaluate

    if ctx.eval_set is not None and ctx.lead:
        q = evaluate(ctx.result.model, ctx.eval_set)
        ctx.accuracy = {"fp32_top1": ctx.fp_top1, "fp32_top5": ctx.fp_top5, "quant_top1": q["top1"],
                        "quant_top5": q["top5"], "n": q["n"]}


def _report(ctx: _Context) -> None:
    """The run's report (REPORT_KEYS): the pipeline's keys, the method's own report whole under method_report."""
    run, job = ctx.run, ctx.job
    plan = getattr(ctx.result.model, "zsq_quant_plan", {}) or {}
    report = {"model": ctx.model_name, "method": run.method.name, "bits": ctx.qconfig.bits,
              "preset": run.quant.preset, "preset_version": ctx.qconfig.version, "calib_source": job.calib_source,
              "num_images": None if job.calib is None else int(job.calib.shape[0]), "options": run.method.options,
              "compute": ctx.compute.describe(), "processes": zdist.world(), "capture": plan.get("capture")}
    if plan.get("eager_fallback"):
        report["eager_fallback"] = [f["module"] for f in plan["eager_fallback"]]
    if plan.get("kept_float"):
        report["kept_float"] = [f["layer"] for f in plan["kept_float"]]
    report.update(ctx.accuracy)
    if run.output.out is not None:
        report["out"] = str(run.output.out)
    report.update({"synth_seconds": round(ctx.synth_seconds, 2), "quant_seconds": round(ctx.quant_seconds, 2),
                   "method_report": dict(ctx.result.report or {}),
                   "seconds": round(time.time() - ctx.t_start, 2)})
    unknown = set(report) - set(REPORT_KEYS)
    if unknown:  # the documented schema and the pipeline disagree
        raise InternalError(f"report keys not documented in zsq.run.REPORT_KEYS: {', '.join(sorted(unknown))}")
    ctx.report = report


def _write_checkpoint(ctx: _Context) -> None:
    """The packed checkpoint in --out, its ``info`` the finished report; its sizes then go into the report."""
    from zsq.export import save_quantized

    run = ctx.run
    if run.output.out is not None and ctx.lead:
        weights = run.model.weights if isinstance(run.model.model, str) else None
        saved = save_quantized(ctx.result.model, run.output.out, model_name=ctx.model_name, weights_path=weights,
                               info=dict(ctx.report), force=True)
        ctx.report.update({k: saved[k] for k in FILE_KEYS if k in saved})
        _run_report(ctx)  # before finish: the run folder records report.md and report/ as zsq's
        ctx.run_folder.finish()
    zdist.barrier()


def _run_report(ctx: _Context) -> None:
    """OUT/report.md (zsq.run_report) from the finished report, the calibration images and the plan."""
    from zsq.run_report import write_run_report

    if ctx.run.output.out is not None and ctx.lead:
        ctx.report["report"] = str(write_run_report(ctx.run.output.out, ctx.report, ctx.result.model, ctx.job.calib))


STEPS: Tuple[Tuple[str, Callable[[_Context], None]], ...] = (
    ("resolve names", _resolve_names),
    ("load model", _load_model),
    ("validate", _validate),
    ("prepare run folder", _prepare_run_folder),
    ("calibration data", _calibration_data),
    ("fp32 accuracy", _fp32_accuracy),
    ("quantize", _quantize),
    ("quantized accuracy", _quant_accuracy),
    ("report", _report),
    ("write checkpoint", _write_checkpoint),  # and OUT/report.md (_run_report)
)


def execute(run: Run) -> QuantResult:
    """Carry out ``run``: the steps of STEPS in order. Returns a QuantResult (``.model``: the quantized
    model; ``.report``: REPORT_KEYS)."""
    if not isinstance(run, Run):
        raise ZsqError(f"execute needs a zsq.run.Run, got {type(run).__name__}")
    ctx = _Context(run=run, t_start=time.time())
    try:
        for name, step in STEPS:
            logger.debug(f"run step: {name}")
            step(ctx)
    finally:
        if ctx.run_folder is not None:
            ctx.run_folder.release()  # the folder's lock, also when a step fails
    return QuantResult(model=ctx.result.model, report=ctx.report)


def check_state_in_out(opts: Mapping[str, Any], out) -> None:
    """No option moves run state out of --out: with an --out, work_dir is refused (the state lives in
    OUT/work, where --force and --resume find it); without one it is the caller's named output."""
    if out is not None and opts.get("work_dir") is not None:
        raise ZsqError(f"work_dir: with --out the run state lives in {Path(out) / 'work'} (where --resume and "
                       "--force find it); work_dir is only for API runs without out=")
